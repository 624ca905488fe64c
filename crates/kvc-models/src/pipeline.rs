//! The compression pipeline as a library (kvpress `pipeline.py`): prefill the context, compress
//! the KV cache with a press, feed each question at the original positions, decode. The CLI, the
//! benchmarks, the evaluation harness, tests and apps all run through it.
//!
//! Two levels:
//! - [`Pipeline::run`]: a [`Request`] (context, questions, press, generation settings) in, a
//!   [`Response`] (answers, optional uncompressed answers, press report, timings) out, with
//!   progress and streamed text through an [`Event`] callback.
//! - The steps, for harnesses that share work: [`Pipeline::prefill`] once (recording what every
//!   press of interest needs), [`Pipeline::compress`] a copy of the prefilled cache per press and
//!   budget, [`Pipeline::answer`] each question on a copy of a cache. Several questions on one
//!   compressed cache do not interfere (each reads its own copy).
//!
//! ```no_run
//! # fn demo<B: kvc_core::KvcBackend>(device: &B::Device) -> Result<(), kvc_models::ModelError> {
//! use kvc_core::{Budget, PressSpec};
//! use kvc_models::pipeline::{Pipeline, Request};
//! let loaded = kvc_models::load::<B>(&kvc_models::default_model::ensure_default_model()?, device)?;
//! let request = Request {
//!     context: std::fs::read_to_string("assets/pride_and_prejudice_ch1-2.txt").unwrap(),
//!     questions: vec!["Who is Mr. Bingley?".into(), "Where does he live?".into()],
//!     press: Some(PressSpec::new("snapkv", Budget::Ratio(0.5))),
//!     ..Default::default()
//! };
//! let response = Pipeline::new(&loaded).run(&request, &mut |_| {})?;
//! for a in &response.answers {
//!     println!("{}", a.text);
//! }
//! # Ok(()) }
//! ```

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::DType;
use kvc_core::{AttentionObserver, CacheHeader, CaptureSpec, CoreError, ForwardModel, KvCache, KvQuant, KvcBackend, PrefillCapture, PressReport, PressSpec};

use crate::error::{ModelError, Result};
use crate::generate::{self, GenerationConfig, StopReason, TextStream};
use crate::{Decoder, LoadedModel, Logits};

/// What to run.
#[derive(Clone, Debug)]
pub struct Request {
    /// The context (a document), prefilled and compressed.
    pub context: String,
    /// Questions, each answered on its own copy of the (compressed) cache. Empty: the last token
    /// of the context is held back and plays the question (plain generation whose every token
    /// reads the compressed cache).
    pub questions: Vec<String>,
    /// Wrap context and question as one user message of the model's chat template (split where
    /// the question starts, as kvpress's pipeline does).
    pub chat: bool,
    /// Text the answer starts with, fed after the question (kvpress's `answer_prefix`).
    pub answer_prefix: String,
    /// The press; `None` = no compression.
    pub press: Option<PressSpec>,
    /// Decoding settings.
    pub generation: GenerationConfig,
    /// With a press: also answer from the uncompressed cache.
    pub compare: bool,
    /// Write the (compressed) context cache to this file before answering
    /// ([`Pipeline::save_cache`]); [`Pipeline::run_saved`] answers questions on it later.
    pub save_cache: Option<PathBuf>,
    /// Bytes the KV caches may take at their peak (see [`Pipeline::kv_bytes_needed`]); a
    /// request that needs more fails before the prefill allocates anything. `None`: no check
    /// (the CLI passes the memory available on CPU backends, or `--max-kv-memory`).
    pub kv_memory_limit: Option<usize>,
    /// Store the (compressed) cache's keys and values as int8 or int4 codes, or f16 / bf16
    /// copies of an f32 model's ([`kvc_core::kvquant`]), after the press; `None`: the model's float dtype. Answers, the
    /// saved cache and `kv_bytes` then use the quantized cache; `compare`'s baseline stays the
    /// uncompressed full-precision one.
    pub kv_quant: Option<KvQuant>,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            context: String::new(),
            questions: Vec::new(),
            chat: true,
            answer_prefix: String::new(),
            press: None,
            generation: GenerationConfig::default(),
            compare: false,
            save_cache: None,
            kv_memory_limit: None,
            kv_quant: None,
        }
    }
}

/// Progress and streamed output of [`Pipeline::run`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Context tokens prefilled so far.
    Prefill {
        /// Tokens done.
        done: usize,
        /// Context tokens.
        total: usize,
    },
    /// Compression started (`done = 0`) or advanced: tokens of a press's own passes over the
    /// context (KVCompose re-feeds it); presses without a pass report `0` then `total` only.
    Compress {
        /// Tokens done.
        done: usize,
        /// Tokens of the pass.
        total: usize,
    },
    /// Text of a generated token (whole characters only).
    Text {
        /// Question index.
        question: usize,
        /// True for the uncompressed comparison answer.
        baseline: bool,
        /// The text the token completed.
        delta: String,
    },
}

/// One generated answer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Answer {
    /// Generated ids (decoded text is `text`, from these ids only).
    pub ids: Vec<u32>,
    /// Decoded text (special tokens skipped).
    pub text: String,
    /// Why decoding stopped.
    pub stop: StopReason,
    /// Question tokens fed (answer prefix included).
    pub question_tokens: usize,
    /// Seconds of the question step plus the decode loop.
    pub seconds: f64,
    /// Seconds of the decode loop alone (every token after the first).
    pub decode_seconds: f64,
    /// KV cache bytes after the answer (question and generated tokens appended).
    pub kv_bytes_final: usize,
}

impl Answer {
    /// Decode speed in tokens/s (tokens after the first, which comes from the question step).
    pub fn decode_tokens_per_second(&self) -> f64 {
        if self.ids.len() > 1 {
            (self.ids.len() - 1) as f64 / self.decode_seconds.max(1e-9)
        } else {
            0.0
        }
    }
}

/// The prefilled context: its cache and what the prefill showed.
#[derive(Clone, Debug)]
pub struct Prefilled<B: Backend> {
    /// Context ids.
    pub context: Vec<u32>,
    /// The cache holding exactly the context.
    pub cache: KvCache<B>,
    /// What was recorded for presses.
    pub capture: PrefillCapture<B>,
    /// Wall seconds of the prefill (device synchronized).
    pub seconds: f64,
}

/// KVCompose scoring passes of one prefilled context, kept by [`Pipeline::compress_reusing`]
/// for the next budget (host f32: per layer `[q_heads * T]`, so 28 layers x 12 heads x 4096
/// tokens = 5.5 MB). One memo per prefill; used with another context or model it starts over.
#[derive(Clone, Debug, Default)]
pub struct ScoreMemo {
    context: Vec<u32>,
    /// The address of the decoder that scored (which model, while it lives).
    model: usize,
    kvcompose: Vec<(PressSpec, kvc_core::press::kvcompose::TaskScores)>,
}

/// A compressed copy of a prefilled cache.
#[derive(Clone, Debug)]
pub struct Compressed<B: Backend> {
    /// The compressed cache.
    pub cache: KvCache<B>,
    /// What the press kept.
    pub report: PressReport,
    /// Wall seconds of the compression (device synchronized).
    pub seconds: f64,
}

/// Seconds per phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Context prefill.
    pub prefill: f64,
    /// Compression (0 without a press).
    pub compress: f64,
    /// Questions and decoding of the (compressed) answers.
    pub answer: f64,
}

/// What [`Pipeline::run`] returns.
#[derive(Clone, Debug)]
pub struct Response {
    /// Context tokens.
    pub context_tokens: usize,
    /// Answers, one per question (one when no question was given).
    pub answers: Vec<Answer>,
    /// Answers from the uncompressed cache (with `compare` and a press).
    pub baseline: Option<Vec<Answer>>,
    /// What the press kept.
    pub report: Option<PressReport>,
    /// KV cache bytes of the context before and after compression.
    pub kv_bytes: (usize, usize),
    /// Seconds per phase.
    pub timings: Timings,
    /// True when no question was given (the last prompt token played it).
    pub held_back_question: bool,
}

/// Runs the pipeline on a loaded model.
pub struct Pipeline<'a, B: KvcBackend> {
    model: &'a LoadedModel<B>,
    device: B::Device,
}

/// Tokens of a context and of each question, split as kvpress's pipeline does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenized {
    /// Context ids.
    pub context: Vec<u32>,
    /// Question ids (answer prefix included), one per question.
    pub questions: Vec<Vec<u32>>,
}

impl<'a, B: KvcBackend> Pipeline<'a, B> {
    /// A pipeline over `model` on the device of its weights.
    pub fn new(model: &'a LoadedModel<B>) -> Self {
        let device = model.model.device();
        Self { model, device }
    }

    /// Splits context and questions into ids (see [`generate::split_prompt`]); every question
    /// ends with the answer prefix.
    ///
    /// # Errors
    /// Tokenizer and template errors, [`ModelError::EmptyPrompt`].
    pub fn tokenize(&self, request: &Request) -> Result<Tokenized> {
        let tok = &self.model.tokenizer;
        if request.questions.is_empty() {
            let split = generate::split_prompt(tok, &request.context, None, request.chat, "")?;
            return Ok(Tokenized { context: split.context, questions: vec![split.question] });
        }
        let mut context = None;
        let mut questions = Vec::with_capacity(request.questions.len());
        for question in &request.questions {
            let split = generate::split_prompt(tok, &request.context, Some(question), request.chat, &request.answer_prefix)?;
            match &context {
                None => context = Some(split.context),
                Some(c) if *c != split.context => {
                    return Err(ModelError::Tokenizer("the chat template renders the context differently per question".into()))
                }
                Some(_) => {}
            }
            questions.push(split.question);
        }
        Ok(Tokenized { context: context.unwrap_or_default(), questions })
    }

    /// Prefills `context` into a new cache, recording what `needs` asks for, in chunks of
    /// `chunk` tokens; `progress` gets the tokens done after each chunk. An empty context gives
    /// an empty cache (a one-token prompt whose token plays the question).
    ///
    /// # Errors
    /// Errors of the forward pass.
    pub fn prefill(&self, context: &[u32], needs: CaptureSpec, chunk: usize, progress: &mut dyn FnMut(usize)) -> Result<Prefilled<B>> {
        let model = &self.model.model;
        let mut cache = model.new_cache();
        cache.reserve(context.len());
        let mut capture = PrefillCapture::new(needs, model.config().num_layers);
        let start = Instant::now();
        let mut done = 0;
        for part in context.chunks(chunk.max(1)) {
            let obs: Option<&mut dyn AttentionObserver<B>> = if needs.is_empty() { None } else { Some(&mut capture) };
            model.feed(part, &mut cache, obs, chunk)?;
            done += part.len();
            progress(done);
        }
        self.sync()?;
        Ok(Prefilled { context: context.to_vec(), cache, capture, seconds: start.elapsed().as_secs_f64() })
    }

    /// Compresses a copy of the prefilled cache with `press`; `progress` gets the tokens done of
    /// a press's own passes over the context (KVCompose's scoring pass).
    ///
    /// # Errors
    /// Press errors (unknown press, options, budget, a capture without what the press needs),
    /// errors of the model during a press's pass.
    pub fn compress(&self, prefilled: &Prefilled<B>, press: &PressSpec, progress: &mut dyn FnMut(usize, usize)) -> Result<Compressed<B>> {
        self.compress_cache(prefilled.cache.clone(), &prefilled.context, &prefilled.capture, press, progress)
    }

    /// As [`Pipeline::compress`], sharing KVCompose's scoring pass between budgets: its output
    /// ([`kvc_core::press::kvcompose::TaskScores`]: attention of the re-fed context reduced over queries, which no budget
    /// changes) is kept in `memo` for the prefilled context, and a later KVCompose spec with the
    /// same options and another ratio or token budget only selects and gathers. The kept tokens
    /// are those of [`Pipeline::compress`] (same scores, same selection; tested). The memo belongs
    /// to one prefill: pass a fresh one (or the same) for each [`Prefilled`] (a memo that meets
    /// another context or another model starts over; a new prefill of the same tokens by the same
    /// model reuses it, which holds for the same weights and dtype). Every other press
    /// compresses as [`Pipeline::compress`] does. `seconds` of a reusing call counts selection and
    /// gather only. (kvpress's pipeline runs the pass once per press call; `kvc-bench eval` runs
    /// every ratio of a row through one memo.)
    ///
    /// # Errors
    /// As [`Pipeline::compress`].
    pub fn compress_reusing(&self, prefilled: &Prefilled<B>, press: &PressSpec, memo: &mut ScoreMemo, progress: &mut dyn FnMut(usize, usize)) -> Result<Compressed<B>> {
        let Some(mut kvc) = press.kvcompose()? else {
            return self.compress(prefilled, press, progress);
        };
        if kvc.budget == kvc_core::Budget::Ratio(0.0) {
            return self.compress(prefilled, press, progress);
        }
        // a hit skips `score`, which validates the budget: validate here, as a fresh run does
        kvc.budget.validate(prefilled.context.len())?;
        let model_id = std::ptr::from_ref(&self.model.model) as usize;
        if memo.context != prefilled.context || memo.model != model_id {
            *memo = ScoreMemo { context: prefilled.context.clone(), model: model_id, kvcompose: Vec::new() };
        }
        let start = Instant::now();
        let mut cache = prefilled.cache.clone();
        let key = PressSpec { ratio: None, tokens: None, ..press.clone() };
        let at = match memo.kvcompose.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                let model = Reporting { model: &self.model.model, progress: RefCell::new(progress), total: prefilled.context.len() };
                let scores = kvc.score(&model, &prefilled.context, &mut cache)?;
                memo.kvcompose.push((key, scores));
                memo.kvcompose.len() - 1
            }
        };
        let report = kvc.compress_scored(&memo.kvcompose[at].1, &mut cache)?;
        self.sync()?;
        Ok(Compressed { cache, report, seconds: start.elapsed().as_secs_f64() })
    }

    /// As [`Pipeline::compress`], compressing the prefilled cache itself instead of a copy: the
    /// peak then holds one context cache, not two (KVCompose: `2T` slots during its scoring pass
    /// instead of `3T`). For a prefill compressed once.
    ///
    /// # Errors
    /// As [`Pipeline::compress`]; the prefilled cache is gone with the error.
    pub fn compress_prefilled(&self, prefilled: Prefilled<B>, press: &PressSpec, progress: &mut dyn FnMut(usize, usize)) -> Result<Compressed<B>> {
        let Prefilled { context, cache, capture, .. } = prefilled;
        self.compress_cache(cache, &context, &capture, press, progress)
    }

    fn compress_cache(
        &self,
        mut cache: KvCache<B>,
        context: &[u32],
        capture: &PrefillCapture<B>,
        press: &PressSpec,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Compressed<B>> {
        let mut p = press.build::<B>()?;
        let model = Reporting { model: &self.model.model, progress: RefCell::new(progress), total: context.len() };
        let start = Instant::now();
        let report = p.compress(&model, context, &mut cache, capture)?;
        self.sync()?;
        Ok(Compressed { cache, report, seconds: start.elapsed().as_secs_f64() })
    }

    /// Feeds `question` (one step) on a copy of `cache` at the original positions and decodes;
    /// `on_text` gets each completed piece of text.
    ///
    /// # Errors
    /// [`ModelError::PromptTooLong`] when the question and `max_new_tokens` do not fit the
    /// model's context, errors of the forward pass.
    pub fn answer(&self, cache: &KvCache<B>, question: &[u32], cfg: &GenerationConfig, on_text: &mut dyn FnMut(String)) -> Result<Answer> {
        let m = self.model;
        if question.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        generate::check_prompt(cache.next_position() + question.len(), m.config.max_position_embeddings, cfg.max_new_tokens)?;
        let start = Instant::now();
        let mut cache = cache.clone();
        cache.reserve(question.len() + cfg.max_new_tokens);
        let logits = m.model.forward(generate::token_tensor::<B>(question, &self.device), &mut cache, None, Logits::Last)?;
        let mut stream = TextStream::new(&m.tokenizer);
        let mut failed = None;
        let decoded = generate::decode(&m.model, &mut cache, logits, cfg, m.tokenizer.eos_ids(), |t| match stream.push(t) {
            Ok(delta) => {
                if !delta.is_empty() {
                    on_text(delta);
                }
                true
            }
            Err(e) => {
                failed = Some(e);
                false
            }
        }, &self.device)?;
        if let Some(e) = failed {
            return Err(e);
        }
        let (text, rest) = stream.finish()?;
        if !rest.is_empty() {
            on_text(rest);
        }
        Ok(Answer {
            ids: decoded.tokens,
            text,
            stop: decoded.stop,
            question_tokens: question.len(),
            seconds: start.elapsed().as_secs_f64(),
            decode_seconds: decoded.elapsed.as_secs_f64(),
            kv_bytes_final: cache.bytes(),
        })
    }

    /// Answers several questions, each on a copy of its own cache, decoded together in one
    /// [`generate::batch::Batch`] (one pass over the weights per step for all of them): the
    /// answers of [`Pipeline::answer`] on each, token for token, in the order of `jobs`. Each
    /// answer's `seconds` is its question step plus its time in the batch (`decode_seconds`),
    /// which it shares with the others.
    ///
    /// # Errors
    /// As [`Pipeline::answer`], for any of the jobs (checked before any decoding).
    pub fn answer_batch(&self, jobs: &[(&KvCache<B>, &[u32])], cfg: &GenerationConfig) -> Result<Vec<Answer>> {
        let m = self.model;
        let mut batch = generate::batch::Batch::new();
        let mut joined = Vec::with_capacity(jobs.len());
        for (cache, question) in jobs {
            let start = Instant::now();
            let id = batch.add(&m.model, (*cache).clone(), question, cfg.clone(), m.tokenizer.eos_ids())?;
            joined.push((id, question.len(), start.elapsed().as_secs_f64()));
        }
        while !batch.is_empty() {
            batch.step(&m.model)?;
        }
        let mut finished: std::collections::HashMap<_, _> = batch.take_finished().into_iter().map(|f| (f.id, f)).collect();
        joined
            .into_iter()
            .map(|(id, question_tokens, question_seconds)| {
                let f = finished.remove(&id).ok_or_else(|| ModelError::Generation("a batched answer was lost".into()))?;
                let decode_seconds = f.elapsed.as_secs_f64();
                Ok(Answer {
                    text: m.tokenizer.decode(&f.tokens, true)?,
                    ids: f.tokens,
                    stop: f.stop,
                    question_tokens,
                    seconds: question_seconds + decode_seconds,
                    decode_seconds,
                    kv_bytes_final: f.cache.bytes(),
                })
            })
            .collect()
    }

    /// The whole pipeline: tokenize, check sizes, prefill, (answer uncompressed,) compress,
    /// answer every question.
    ///
    /// # Errors
    /// [`ModelError::EmptyPrompt`], [`ModelError::PromptTooLong`] (context + the longest question
    /// + `max_new_tokens` beyond the model's context), press errors (budget errors name the
    /// budget and the context length), errors of the forward pass.
    pub fn run(&self, request: &Request, events: &mut dyn FnMut(Event)) -> Result<Response> {
        request.generation.validate()?;
        if request.context.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        let tokens = self.tokenize(request)?;
        let longest = tokens.questions.iter().map(Vec::len).max().unwrap_or(0);
        generate::check_prompt(tokens.context.len() + longest, self.model.config.max_position_embeddings, request.generation.max_new_tokens)?;
        if request.save_cache.is_some() && request.questions.is_empty() {
            // without a question the last context token is held back (and a chat context ends in
            // the assistant header): a cache that later questions could not follow
            return Err(ModelError::Generation("saving the KV cache needs at least one question (the cache is the context before it)".into()));
        }
        if let Some(limit) = request.kv_memory_limit {
            let needed = self.kv_bytes_needed(tokens.context.len(), longest + request.generation.max_new_tokens, request.press.as_ref());
            if needed > limit {
                return Err(ModelError::KvMemory { needed, available: limit, context: tokens.context.len() });
            }
        }
        let needs = match &request.press {
            Some(p) => {
                let budget = p.budget()?;
                budget.validate(tokens.context.len()).map_err(ModelError::Core)?;
                p.needs()?
            }
            None => CaptureSpec::default(),
        };
        let total = tokens.context.len();
        let prefilled = self.prefill(&tokens.context, needs, request.generation.prefill_chunk, &mut |done| events(Event::Prefill { done, total }))?;
        let mut timings = Timings { prefill: prefilled.seconds, ..Default::default() };
        let ask = |cache: &KvCache<B>, baseline: bool, events: &mut dyn FnMut(Event)| -> Result<Vec<Answer>> {
            tokens
                .questions
                .iter()
                .enumerate()
                .map(|(question, q)| self.answer(cache, q, &request.generation, &mut |delta| events(Event::Text { question, baseline, delta })))
                .collect()
        };
        let baseline = match (&request.press, request.compare) {
            (Some(_), true) => Some(ask(&prefilled.cache, true, events)?),
            _ => None,
        };
        let bytes_before = prefilled.cache.bytes();
        let (mut cache, report) = match &request.press {
            Some(p) => {
                events(Event::Compress { done: 0, total });
                // the prefilled cache is not read after this (the baseline answers came first)
                let c = self.compress_prefilled(prefilled, p, &mut |done, total| events(Event::Compress { done, total }))?;
                events(Event::Compress { done: total, total });
                timings.compress = c.seconds;
                (c.cache, Some(c.report))
            }
            None => (prefilled.cache, None),
        };
        if let Some(q) = request.kv_quant {
            let start = Instant::now();
            cache.quantize(q)?;
            timings.compress += start.elapsed().as_secs_f64();
        }
        if let Some(path) = &request.save_cache {
            let header = self.cache_header(&cache, total, request.press.clone(), request.chat);
            self.save_cache(&cache, &header, path)?;
        }
        let start = Instant::now();
        let answers = ask(&cache, false, events)?;
        timings.answer = start.elapsed().as_secs_f64();
        Ok(Response {
            context_tokens: total,
            answers,
            baseline,
            report,
            kv_bytes: (bytes_before, cache.bytes()),
            timings,
            held_back_question: request.questions.is_empty(),
        })
    }

    /// Bytes of KV cache alive at the peak of [`Pipeline::run`] for a context of `context` tokens,
    /// `answer` more tokens per question (question + new tokens) and `press`: an answer's copy
    /// (`T + answer`) beside the cache it copies (the prefilled one, or the compressed one of at
    /// most `T`), or, when larger, the press's working cache: the prefilled cache is compressed
    /// in place ([`Pipeline::compress_prefilled`]) and grows by `T` per pass over the context the
    /// press makes ([`kvc_core::press::spec::PressDoc::refeeds`]), plus one layer's old buffer
    /// while it grows. Per token: layers x KV heads x head_dim x 2 (keys, values) x the weights'
    /// element size. Weights and activations are not counted.
    pub fn kv_bytes_needed(&self, context: usize, answer: usize, press: Option<&PressSpec>) -> usize {
        let per_token = self.kv_bytes_per_token();
        let refeeds = press.and_then(|p| kvc_core::press::spec::docs().into_iter().find(|d| d.name == p.name)).map_or(0, |d| d.refeeds);
        let answering = (2 * context).saturating_add(answer);
        let working = if refeeds > 0 { context * (1 + refeeds) + context.div_ceil(self.model.model.config().num_layers.max(1)) } else { 0 };
        per_token.saturating_mul(answering.max(working))
    }

    /// The header a cache of this model is saved with: the model's fingerprint and shape,
    /// `cache`'s next position, the context's token count, the press that compressed it.
    pub fn cache_header(&self, cache: &KvCache<B>, context_tokens: usize, press: Option<PressSpec>, chat: bool) -> CacheHeader {
        let c = &self.model.config;
        CacheHeader {
            model: self.model.model.fingerprint(),
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            next_position: cache.next_position(),
            context_tokens,
            press,
            chat,
            kv_quant: cache.kv_quant(),
        }
    }

    /// Writes `cache` to `path` ([`KvCache::save`]: safetensors with keys, values, original
    /// positions, per-head masks and `header`).
    ///
    /// # Errors
    /// [`ModelError::CacheFile`] (I/O, an empty layer).
    pub fn save_cache(&self, cache: &KvCache<B>, header: &CacheHeader, path: &Path) -> Result<()> {
        Ok(cache.save(path, header)?)
    }

    /// Reads a cache saved by [`Pipeline::save_cache`] (in this process or another) onto the
    /// model's device and checks that it belongs to this model: same fingerprint (config and
    /// weights), same layers, KV heads and head size, and room left in the model's context.
    ///
    /// # Errors
    /// [`ModelError::CacheFile`] for a missing, corrupt or foreign file,
    /// [`ModelError::CacheMismatch`] for a cache of another model, of another float type than
    /// the model runs in (the message names the `--dtype` to give), or whose context fills the
    /// model's window.
    pub fn load_cache(&self, path: &Path) -> Result<(KvCache<B>, CacheHeader)> {
        let (cache, header) = KvCache::<B>::load(path, &self.device)?;
        let c = &self.model.config;
        let mismatch = |reason: String| ModelError::CacheMismatch { path: path.to_path_buf(), reason };
        if (header.num_layers, header.num_kv_heads, header.head_dim) != (c.num_layers, c.num_kv_heads, c.head_dim) {
            return Err(mismatch(format!(
                "it holds {} layers x {} KV heads x {} per head, the model has {} x {} x {}",
                header.num_layers, header.num_kv_heads, header.head_dim, c.num_layers, c.num_kv_heads, c.head_dim
            )));
        }
        let (saved, model) = (cache.layer(0).ok().flatten().map(|l| l.keys.dtype()), self.model.model.dtype());
        if let Some(saved) = saved.filter(|&d| d != model) {
            let name = |d: DType| format!("{d:?}").to_lowercase();
            return Err(mismatch(format!(
                "it holds {} keys and values, the model runs in {} (load the model in the dtype the cache was saved with; kvc: --dtype {})",
                name(saved),
                name(model),
                name(saved)
            )));
        }
        let fingerprint = self.model.model.fingerprint();
        if header.model != fingerprint {
            return Err(mismatch(format!("written by model {}, this model is {fingerprint} (another model or weight dtype)", header.model)));
        }
        if header.next_position >= c.max_position_embeddings {
            return Err(mismatch(format!("its context of {} tokens fills the model's window of {}", header.next_position, c.max_position_embeddings)));
        }
        Ok((cache, header))
    }

    /// Answers `request.questions` on a saved cache (from [`Pipeline::load_cache`]) without
    /// prefilling anything: each question is fed at the cache's next position, as
    /// [`Pipeline::run`] does after compression. `request.context` and `request.press` must be
    /// empty (the cache is the context); `request.chat` must match the cache's.
    ///
    /// # Errors
    /// [`ModelError::Generation`] for a request with a context, a press, no question or another
    /// chat setting; [`ModelError::PromptTooLong`]; errors of the forward pass.
    pub fn run_saved(&self, cache: &KvCache<B>, header: &CacheHeader, request: &Request, events: &mut dyn FnMut(Event)) -> Result<Response> {
        request.generation.validate()?;
        let refuse = |what: &str| Err(ModelError::Generation(format!("a saved KV cache is the context: {what}")));
        if !request.context.is_empty() || request.press.is_some() || request.compare || request.save_cache.is_some() {
            return refuse("no context, press, comparison or saving with it");
        }
        if request.questions.is_empty() {
            return refuse("ask at least one question");
        }
        if request.chat != header.chat {
            return refuse(if header.chat {
                "it was saved with the chat template (--chat): ask with it too"
            } else {
                "it was saved without the chat template (no --chat): ask without it"
            });
        }
        // the question's ids do not depend on the context (see `generate::split_prompt`)
        let tokens = self.tokenize(&Request { context: "context".into(), ..request.clone() })?;
        // the cache's dtype is the model's: `load_cache` checked the fingerprint (weights' bits)
        let uncompressed = header.context_tokens.saturating_mul(self.kv_bytes_per_token());
        if let (Some(want), Some(held)) = (request.kv_quant, cache.kv_quant()) {
            if want != held {
                return refuse(&format!(
                    "it holds {} codes and cannot be quantized again as {} (ask without --kv-dtype, or save the cache again with the format wanted)",
                    held.name(),
                    want.name()
                ));
            }
        }
        let quantized;
        let cache = match request.kv_quant {
            // a float cache quantized for these answers (the file keeps its own format)
            Some(q) if cache.kv_quant() != Some(q) => {
                let mut c = cache.clone();
                c.quantize(q)?;
                quantized = c;
                &quantized
            }
            _ => cache,
        };
        let start = Instant::now();
        let mut answers = Vec::with_capacity(tokens.questions.len());
        for (question, q) in tokens.questions.iter().enumerate() {
            answers.push(self.answer(cache, q, &request.generation, &mut |delta| events(Event::Text { question, baseline: false, delta }))?);
        }
        Ok(Response {
            context_tokens: header.context_tokens,
            answers,
            baseline: None,
            report: None,
            kv_bytes: (uncompressed, cache.bytes()),
            timings: Timings { answer: start.elapsed().as_secs_f64(), ..Default::default() },
            held_back_question: false,
        })
    }

    /// KV cache bytes of one token: layers x KV heads x head_dim x 2 (keys, values) x the
    /// weights' element size.
    fn kv_bytes_per_token(&self) -> usize {
        let c = &self.model.config;
        c.num_layers * c.num_kv_heads * c.head_dim * 2 * self.model.model.dtype().size()
    }

    fn sync(&self) -> Result<()> {
        B::sync(&self.device).map_err(|e| ModelError::Generation(format!("device: {e:?}")))
    }
}

/// The decoder as a press sees it, reporting the tokens of every pass a press makes.
struct Reporting<'a, 'p, B: KvcBackend> {
    model: &'a Decoder<B>,
    progress: RefCell<&'p mut dyn FnMut(usize, usize)>,
    total: usize,
}

impl<B: KvcBackend> ForwardModel<B> for Reporting<'_, '_, B> {
    fn num_layers(&self) -> usize {
        self.model.num_layers()
    }
    fn num_heads(&self) -> usize {
        ForwardModel::num_heads(self.model)
    }
    fn num_kv_heads(&self) -> usize {
        ForwardModel::num_kv_heads(self.model)
    }
    fn rope_inv_freq(&self) -> Vec<f32> {
        self.model.rope_inv_freq()
    }
    fn feed(&self, tokens: &[u32], cache: &mut KvCache<B>, observer: &mut dyn AttentionObserver<B>, chunk: usize) -> std::result::Result<(), CoreError> {
        let mut done = 0;
        for part in tokens.chunks(chunk.max(1)) {
            ForwardModel::feed(self.model, part, cache, observer, chunk)?;
            done += part.len();
            (self.progress.borrow_mut())(done, tokens.len().max(self.total));
        }
        Ok(())
    }
}
