//! Generation: token-by-token decode with greedy (default) or temperature/top-p sampling
//! ([`sampling`]), after a prefill ([`crate::Decoder::prefill`]); prefill and decode are separate
//! so a press can compress the cache between them. [`stream`] turns generated ids into text as
//! they arrive.

pub mod batch;
pub mod sampling;
pub mod stream;

pub use sampling::sample;
pub use stream::TextStream;

use std::time::{Duration, Instant};

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use kvc_core::{KvCache, KvcBackend};

use crate::error::{ModelError, Result};
use crate::model::Decoder;

/// Decoding settings.
#[derive(Clone, Debug)]
pub struct GenerationConfig {
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax, lowest id on ties, as torch.argmax); > 0 samples from
    /// `softmax(logits / temperature)`.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it. Only used when sampling.
    pub top_p: f32,
    /// Seed of the sampler (same seed, same tokens).
    pub seed: u64,
    /// Prompt tokens per prefill chunk (bounds the `chunk x len` attention scores).
    pub prefill_chunk: usize,
    /// Stop at the tokenizer's EOS / end-of-turn ids.
    pub stop_at_eos: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, seed: 0, prefill_chunk: 512, stop_at_eos: true }
    }
}

impl GenerationConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// [`ModelError::Generation`] naming the bad value.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::Generation(format!("temperature {} must be >= 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Generation(format!("top_p {} must be in (0, 1]", self.top_p)));
        }
        if self.max_new_tokens == 0 {
            return Err(ModelError::Generation("max_new_tokens must be at least 1".into()));
        }
        if self.prefill_chunk == 0 {
            return Err(ModelError::Generation("prefill chunk must be at least 1 token".into()));
        }
        Ok(())
    }
}

/// Why decoding stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An EOS / end-of-turn token was produced (it is included in the output).
    Eos,
    /// `max_new_tokens` reached.
    MaxTokens,
    /// The model's context is full.
    Context,
    /// The token callback asked to stop.
    Callback,
    /// Taken out of a batch before it finished ([`batch::Batch::cancel`]).
    Cancelled,
}

/// Output of [`decode`].
#[derive(Clone, Debug)]
pub struct Decoded {
    /// Generated ids.
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub stop: StopReason,
    /// Wall time of the decode loop.
    pub elapsed: Duration,
}

/// Checks a prompt against the model's context.
///
/// # Errors
/// [`ModelError::EmptyPrompt`], [`ModelError::PromptTooLong`].
pub fn check_prompt(prompt_tokens: usize, context: usize, reserved: usize) -> Result<()> {
    if prompt_tokens == 0 {
        return Err(ModelError::EmptyPrompt);
    }
    if prompt_tokens + reserved > context {
        return Err(ModelError::PromptTooLong { tokens: prompt_tokens, context, reserved });
    }
    Ok(())
}

/// Token ids as a `[1, len]` int tensor.
pub fn token_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}

/// Decodes after a prefill: picks a token from `logits` (`[1, 1, vocab]`), feeds it, and repeats
/// until EOS, `max_new_tokens`, the model's context, or `on_token` returning false. Each token is
/// fed at `cache.next_position()` (the original position, also after compression). A
/// [`batch::Batch`] of one sequence: the same steps as any sequence of a batch.
///
/// # Errors
/// [`ModelError::Generation`] for invalid settings, errors of the forward pass.
pub fn decode<B: KvcBackend>(
    model: &Decoder<B>,
    cache: &mut KvCache<B>,
    logits: Tensor<B, 3>,
    config: &GenerationConfig,
    eos_ids: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
    _device: &B::Device,
) -> Result<Decoded> {
    config.validate()?;
    let start = Instant::now();
    let mut batch = batch::Batch::new();
    // the cache joins the batch and comes back with the finished sequence
    batch.add_prefilled(std::mem::replace(cache, model.new_cache()), logits, config.clone(), eos_ids)?;
    while !batch.is_empty() {
        batch.step_with(model, |_, token| on_token(token))?;
    }
    let done = batch.take_finished().pop().ok_or_else(|| ModelError::Generation("the decoded sequence was lost".into()))?;
    *cache = done.cache;
    Ok(Decoded { tokens: done.tokens, stop: done.stop, elapsed: start.elapsed() })
}

/// A prompt split for compression: the context (prefilled, then compressed) and the question
/// (fed after compression, at the original positions), as kvpress's pipeline splits them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitPrompt {
    /// Context token ids.
    pub context: Vec<u32>,
    /// Question token ids (never empty).
    pub question: Vec<u32>,
}

/// Splits a prompt into context and question, following kvpress's `pipeline.preprocess`:
///
/// - with `chat`: the model's chat template renders one user message `context + question`; the
///   context part ends where the question starts, the question part carries the template's tail
///   (end of turn, assistant header). Both are tokenized without adding special tokens.
/// - without: the context is tokenized as given (BOS only where the tokenizer adds it), the
///   question is `question + "\n"`.
/// - without a question: the last token of the prompt is held back as the question, so that
///   every generated token sees the compressed cache.
///
/// The context may be empty (a one-token prompt without a question).
///
/// # Errors
/// [`ModelError::EmptyPrompt`] when there is no token at all, tokenizer and template errors.
pub fn split_prompt(tok: &crate::Tokenizer, context: &str, question: Option<&str>, chat: bool, answer_prefix: &str) -> Result<SplitPrompt> {
    let (mut context_ids, mut question_ids) = match (question, chat) {
        (Some(q), true) => {
            // a separator that cannot occur in the text, as kvpress does
            let sep = "#".repeat(context.len() + 10);
            let msg = crate::ChatMessage { role: "user".into(), content: format!("{context}{sep}") };
            let rendered = tok.apply_chat_template(&[msg])?;
            let (c, suffix) = rendered
                .split_once(&sep)
                .ok_or_else(|| ModelError::Tokenizer("the chat template dropped the user message".into()))?;
            (tok.encode(c, false)?, tok.encode(&format!("{q}{suffix}{answer_prefix}"), false)?)
        }
        (Some(q), false) => (tok.encode(context, true)?, tok.encode(&format!("{q}\n{answer_prefix}"), false)?),
        (None, true) => {
            let msg = crate::ChatMessage { role: "user".into(), content: context.to_string() };
            (tok.encode(&tok.apply_chat_template(&[msg])?, false)?, Vec::new())
        }
        (None, false) => (tok.encode(context, true)?, Vec::new()),
    };
    if question_ids.is_empty() {
        let last = context_ids.pop().ok_or(ModelError::EmptyPrompt)?;
        question_ids.push(last);
    }
    Ok(SplitPrompt { context: context_ids, question: question_ids })
}
