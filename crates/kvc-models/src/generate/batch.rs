//! Continuous batching: many sequences, each on its own KV cache, advanced one token each in one
//! step ([`Decoder::forward_batch`]).
//!
//! A decode step is bound by reading the weights (SmolLM2-135M: ~115 MB of quantized codes per
//! token); stepping `n` sequences together reads them once for all `n`. Each sequence keeps its
//! own cache (its own length, per-layer lengths after KVCompose / PyramidKV, per-head masks after
//! AdaKV), next position, sampling settings and stop rules, so its tokens are those it would get
//! decoded alone ([`decode`](super::decode) is a batch of one). Sequences join
//! ([`Batch::add`]) and leave (finished, or [`Batch::cancel`]) between steps, as in vLLM's and
//! mistral.rs's schedulers.
//!
//! ```no_run
//! # use kvc_models::generate::batch::Batch;
//! # fn demo<B: kvc_core::KvcBackend>(m: &kvc_models::LoadedModel<B>, doc: &kvc_core::KvCache<B>, qs: &[Vec<u32>]) -> kvc_models::Result<()> {
//! let mut batch = Batch::new();
//! for q in qs {
//!     // each question on its own copy of the (compressed) document cache
//!     batch.add(&m.model, doc.clone(), q, Default::default(), m.tokenizer.eos_ids())?;
//! }
//! while !batch.is_empty() {
//!     for step in batch.step(&m.model)? {
//!         println!("sequence {:?}: token {} (stop: {:?})", step.id, step.token, step.stop);
//!     }
//! }
//! for done in batch.take_finished() {
//!     println!("{:?}: {:?}", done.id, done.tokens);
//! }
//! # Ok(()) }
//! ```

use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use kvc_core::{KvCache, KvcBackend};
use rand::SeedableRng;

use super::{check_prompt, sample, token_tensor, GenerationConfig, StopReason};
use crate::error::{ModelError, Result};
use crate::model::{Decoder, Logits};

/// A sequence's handle in a [`Batch`] (unique within it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(pub u64);

/// One sequence's token of a [`Batch::step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// The sequence.
    pub id: SequenceId,
    /// The token it produced.
    pub token: u32,
    /// Why the sequence stopped with this token (it has left the batch), or `None`.
    pub stop: Option<StopReason>,
}

/// A sequence that left the batch.
#[derive(Clone, Debug)]
pub struct Finished<B: KvcBackend> {
    /// The sequence.
    pub id: SequenceId,
    /// Its generated ids.
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub stop: StopReason,
    /// Its cache: the question's and the generated tokens appended (but the last token, which
    /// was never fed).
    pub cache: KvCache<B>,
    /// Time from joining to leaving.
    pub elapsed: Duration,
}

/// A sequence being decoded.
struct Sequence<B: KvcBackend> {
    id: SequenceId,
    cache: KvCache<B>,
    /// Logits of its last fed position `[vocab]` (host), which the next step samples from.
    logits: Vec<f32>,
    tokens: Vec<u32>,
    config: GenerationConfig,
    rng: rand::rngs::StdRng,
    eos: Vec<u32>,
    joined: Instant,
}

/// Sequences decoded together, one token each per [`Batch::step`].
pub struct Batch<B: KvcBackend> {
    active: Vec<Sequence<B>>,
    finished: Vec<Finished<B>>,
    next_id: u64,
}

impl<B: KvcBackend> Default for Batch<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: KvcBackend> Batch<B> {
    /// An empty batch.
    pub fn new() -> Self {
        Self { active: Vec::new(), finished: Vec::new(), next_id: 0 }
    }

    /// Sequences being decoded.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    /// Whether no sequence is being decoded.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// The ids of the sequences being decoded, in the order of their rows.
    pub fn ids(&self) -> Vec<SequenceId> {
        self.active.iter().map(|s| s.id).collect()
    }

    /// The logits `[vocab]` that sequence `id`'s next step samples from (its last fed
    /// position's); `None` when it is not active.
    pub fn logits(&self, id: SequenceId) -> Option<&[f32]> {
        self.active.iter().find(|s| s.id == id).map(|s| s.logits.as_slice())
    }

    /// Bytes of keys and values held by the active sequences' caches.
    pub fn kv_bytes(&self) -> usize {
        self.active.iter().map(|s| s.cache.bytes()).sum()
    }

    /// Adds a sequence: feeds `question` (its own short prefill, at `cache.next_position()`, as
    /// [`crate::pipeline::Pipeline::answer`] does) into `cache` and keeps its logits for the next
    /// step. `cache` is the sequence's own (a copy of a document's compressed cache, a saved
    /// cache, or an empty one for a plain prompt).
    ///
    /// # Errors
    /// [`ModelError::EmptyPrompt`] for an empty question, [`ModelError::PromptTooLong`] when the
    /// cache, the question and `max_new_tokens` do not fit the model's context,
    /// [`ModelError::Generation`] for invalid settings, errors of the forward pass.
    pub fn add(&mut self, model: &Decoder<B>, mut cache: KvCache<B>, question: &[u32], config: GenerationConfig, eos: &[u32]) -> Result<SequenceId> {
        config.validate()?;
        if question.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        check_prompt(cache.next_position() + question.len(), model.config().max_position_embeddings, config.max_new_tokens)?;
        cache.reserve(question.len() + config.max_new_tokens);
        let logits = model.forward(token_tensor::<B>(question, &model.device()), &mut cache, None, Logits::Last)?;
        self.add_prefilled(cache, logits, config, eos)
    }

    /// Adds a sequence whose last position is already fed: `logits` `[1, 1, vocab]` are its
    /// last position's (a prefill's output). The first step samples from them.
    ///
    /// # Errors
    /// [`ModelError::Generation`] for invalid settings or logits of another shape.
    pub fn add_prefilled(&mut self, mut cache: KvCache<B>, logits: Tensor<B, 3>, config: GenerationConfig, eos: &[u32]) -> Result<SequenceId> {
        config.validate()?;
        let [b, c, _] = logits.dims();
        if (b, c) != (1, 1) {
            return Err(ModelError::Generation(format!("a sequence joins with the logits of one position, got {:?}", logits.dims())));
        }
        cache.reserve(config.max_new_tokens);
        let id = SequenceId(self.next_id);
        self.next_id += 1;
        let rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        let logits = host(logits)?;
        self.active.push(Sequence { id, cache, logits, tokens: Vec::new(), config, rng, eos: eos.to_vec(), joined: Instant::now() });
        Ok(id)
    }

    /// Removes a sequence now (a client that went away); `None` when it is not active.
    pub fn cancel(&mut self, id: SequenceId) -> Option<Finished<B>> {
        let at = self.active.iter().position(|s| s.id == id)?;
        Some(finish(self.active.remove(at), StopReason::Cancelled))
    }

    /// The sequences that left the batch since the last call, in the order they left.
    pub fn take_finished(&mut self) -> Vec<Finished<B>> {
        std::mem::take(&mut self.finished)
    }

    /// [`Batch::step_with`] without a callback.
    ///
    /// # Errors
    /// As [`Batch::step_with`].
    pub fn step(&mut self, model: &Decoder<B>) -> Result<Vec<Step>> {
        self.step_with(model, |_, _| true)
    }

    /// Advances every sequence by one token: each samples its next token from its logits
    /// (greedy or its own temperature / top-p / seed), `on_token(id, token)` sees it (returning
    /// false stops that sequence: [`StopReason::Callback`]), then the sequence stops at an EOS id
    /// (when `stop_at_eos`), at `max_new_tokens` or at the model's context, in that order, as
    /// [`decode`](super::decode) does; the others are fed their token together in one
    /// [`Decoder::forward_batch`]. Stopped sequences leave the batch ([`Batch::take_finished`]).
    /// Returns one [`Step`] per sequence that was active, in row order.
    ///
    /// # Errors
    /// Errors of the forward pass (the batch is then empty: its sequences are dropped).
    pub fn step_with(&mut self, model: &Decoder<B>, mut on_token: impl FnMut(SequenceId, u32) -> bool) -> Result<Vec<Step>> {
        let context = model.config().max_position_embeddings;
        let mut steps = Vec::with_capacity(self.active.len());
        let mut going = Vec::with_capacity(self.active.len());
        for mut seq in std::mem::take(&mut self.active) {
            let token = sample(&seq.logits, &seq.config, &mut seq.rng);
            seq.tokens.push(token);
            let stop = if !on_token(seq.id, token) {
                Some(StopReason::Callback)
            } else if seq.config.stop_at_eos && seq.eos.contains(&token) {
                Some(StopReason::Eos)
            } else if seq.tokens.len() >= seq.config.max_new_tokens {
                Some(StopReason::MaxTokens)
            } else if seq.cache.next_position() >= context {
                Some(StopReason::Context)
            } else {
                None
            };
            steps.push(Step { id: seq.id, token, stop });
            match stop {
                Some(reason) => self.finished.push(finish(seq, reason)),
                None => going.push(seq),
            }
        }
        if going.is_empty() {
            return Ok(steps);
        }
        let tokens: Vec<u32> = going.iter().map(|s| s.tokens[s.tokens.len() - 1]).collect();
        let logits = {
            let mut caches: Vec<&mut KvCache<B>> = going.iter_mut().map(|s| &mut s.cache).collect();
            model.forward_batch(&tokens, &mut caches)?
        };
        let vocab = logits.dims()[1];
        let all = host(logits.reshape([1, going.len(), vocab]))?;
        for (seq, row) in going.iter_mut().zip(all.chunks_exact(vocab)) {
            seq.logits.clear();
            seq.logits.extend_from_slice(row);
        }
        self.active = going;
        Ok(steps)
    }
}

fn finish<B: KvcBackend>(seq: Sequence<B>, stop: StopReason) -> Finished<B> {
    Finished { id: seq.id, tokens: seq.tokens, stop, cache: seq.cache, elapsed: seq.joined.elapsed() }
}

/// Logits `[1, n, vocab]` as host f32 values.
fn host<B: KvcBackend>(logits: Tensor<B, 3>) -> Result<Vec<f32>> {
    logits.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| ModelError::Generation(format!("{e:?}")))
}
