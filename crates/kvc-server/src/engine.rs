//! The one thread that owns the model. Handlers send [`Command`]s through a channel; each answer
//! sends its [`AnswerEvent`]s back through its own channel (streaming turns that receiver into
//! server-sent events).
//!
//! Every turn of [`Engine::run`]'s loop: take the commands that arrived, admit waiting answers
//! into the batch (up to `--max-batch`: a question is fed on a copy of its document's cache), make
//! one [`Engine::step`] (every active answer gets one token), and prefill one chunk of the oldest
//! document being processed (or compress it once prefilled). Answers therefore interleave token by
//! token, and a long document does not stall them for longer than one chunk (or its compression).
//!
//! Each answer reproduces `Pipeline::answer` + `generate::decode` of kvc-models token by token
//! (same question ids, cache copy, reserves, sampler and seed, stop rules), so an answer equals
//! `kvc generate --question ... --press ... [--chat]` on the same document, token for token.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Tensor;
use kvc_core::{AttentionObserver, CaptureSpec, KvCache, KvQuant, KvcBackend, PrefillCapture, PressSpec};
use kvc_models::generate::{self, TextStream};
use kvc_models::pipeline::{Pipeline, Prefilled, Request};
use kvc_models::{ChatMessage, GenerationConfig, LoadedModel, Logits, ModelError};
use rand::SeedableRng;
use tokio::sync::mpsc::UnboundedSender;

use crate::openai::ApiError;
use crate::state::{DocId, DocMeta, Status};
use crate::Shared;

/// Prompt tokens per prefill chunk (kvc generate's default `--prefill-chunk`: the same chunks
/// give the same cache).
pub const PREFILL_CHUNK: usize = 512;

/// Work for the engine.
pub enum Command {
    /// Prefill and compress a new document.
    Document(NewDocument),
    /// Answer a chat request.
    Answer(AnswerJob),
    /// Forget a document (the registry entry is already gone): drop its cache and files.
    Delete(DocId),
}

/// A document to create.
pub struct NewDocument {
    /// Its id (fresh).
    pub id: DocId,
    /// The text.
    pub text: String,
    /// The press (`None`: kept whole).
    pub press: Option<PressSpec>,
    /// Quantization of the compressed cache (`None`: the model's float dtype).
    pub kv_quant: Option<KvQuant>,
    /// Wrap in the chat template.
    pub chat: bool,
    /// Where the engine reports progress.
    pub events: UnboundedSender<DocEvent>,
}

/// What the engine tells the creator of a document.
#[derive(Debug)]
pub enum DocEvent {
    /// Tokenized and accepted: context tokens.
    Accepted(usize),
    /// Refused before any work (bad press budget for this length, too long, ...).
    Refused(ApiError),
    /// Ready, or failed with this error.
    Done(Result<(), String>),
}

/// What an answer is asked on.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// A stored document's cache as the context, then `question` (kvpress's protocol).
    Document {
        /// The document.
        id: DocId,
        /// The question.
        question: String,
    },
    /// A plain conversation, rendered with the chat template and prefilled.
    Chat(Vec<ChatMessage>),
}

/// Counts answers admitted and not yet finished; dropping it (the job ends, however) frees the
/// place.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Takes a place if fewer than `limit` are taken.
    pub fn try_take(counter: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1)).ok().map(|_| Self(counter.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A chat request for the engine.
pub struct AnswerJob {
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling and length.
    pub generation: GenerationConfig,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Where the answer goes; when the receiver is dropped (client gone) the answer is cancelled.
    pub events: UnboundedSender<AnswerEvent>,
    /// Arrival time (time to first token).
    pub arrived: Instant,
    /// Its place in the queue.
    pub slot: InFlight,
}

impl AnswerJob {
    /// Frees the job's place in the queue, then sends its last event (a client that asks again
    /// as soon as it has its answer finds the place free).
    fn end(self, last: AnswerEvent) {
        let AnswerJob { events, slot, .. } = self;
        drop(slot);
        let _ = events.send(last);
    }
}

/// What an answer sends back.
#[derive(Debug)]
pub enum AnswerEvent {
    /// The question was fed; generation starts.
    Started {
        /// Prompt tokens (a document's context plus the question).
        prompt_tokens: usize,
        /// Of those, read from a stored cache.
        cached_tokens: usize,
        /// The document used.
        document: Option<DocId>,
    },
    /// Text completed by the last token.
    Text(String),
    /// The end.
    Done {
        /// `stop` or `length`.
        finish: &'static str,
        /// Generated ids.
        ids: Vec<u32>,
        /// The whole text (cut before a stop string).
        text: String,
    },
    /// The request failed.
    Failed(ApiError),
}

/// A document being prefilled.
struct DocWork<B: KvcBackend> {
    id: DocId,
    ids: Vec<u32>,
    press: Option<PressSpec>,
    kv_quant: Option<KvQuant>,
    cache: KvCache<B>,
    capture: PrefillCapture<B>,
    observe: bool,
    done: usize,
    events: UnboundedSender<DocEvent>,
}

/// An answer being generated.
struct Active<'a, B: KvcBackend> {
    job: AnswerJob,
    cache: KvCache<B>,
    /// Logits of the last fed token `[1, 1, vocab]` (taken by each step).
    logits: Option<Tensor<B, 3>>,
    rng: rand::rngs::StdRng,
    stream: TextStream<'a>,
    ids: Vec<u32>,
    out: Output,
    last_token: Instant,
}

/// What became of an answer after a step.
enum Outcome {
    /// Feed this token next.
    Next(u32),
    /// Finished (`stop` / `length`).
    Finished(&'static str),
    /// The client went away.
    Cancelled,
}

/// The engine: the model, the documents' caches in RAM, the answers.
pub struct Engine<'a, B: KvcBackend> {
    model: &'a LoadedModel<B>,
    pipeline: Pipeline<'a, B>,
    device: B::Device,
    shared: Arc<Shared>,
    fingerprint: String,
    caches: HashMap<DocId, KvCache<B>>,
    documents: VecDeque<DocWork<B>>,
    waiting: VecDeque<AnswerJob>,
    active: Vec<Active<'a, B>>,
}

fn model_error(e: ModelError) -> ApiError {
    match e {
        ModelError::PromptTooLong { .. } => ApiError::bad_request(e.to_string(), Some("context_length_exceeded")),
        ModelError::EmptyPrompt | ModelError::Tokenizer(_) | ModelError::Generation(_) | ModelError::Core(_) => ApiError::bad_request(e.to_string(), None),
        other => ApiError::internal(other.to_string()),
    }
}

impl<'a, B: KvcBackend> Engine<'a, B> {
    /// An engine over `model`; `fingerprint` is the model's ([`kvc_models::Decoder::fingerprint`]).
    pub fn new(model: &'a LoadedModel<B>, shared: Arc<Shared>, fingerprint: String) -> Self {
        Self {
            model,
            pipeline: Pipeline::new(model),
            device: model.model.device(),
            shared,
            fingerprint,
            caches: HashMap::new(),
            documents: VecDeque::new(),
            waiting: VecDeque::new(),
            active: Vec::new(),
        }
    }

    /// Runs until every sender of `commands` is gone.
    pub fn run(mut self, commands: Receiver<Command>) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() && self.documents.is_empty() {
                match commands.recv() {
                    Ok(c) => self.command(c),
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(c) => self.command(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            // a panic in the model or a press must not stop the server: the work of this turn
            // fails (its clients get an error), the engine goes on
            let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.admit();
                self.step();
                self.advance_document();
            }));
            if turn.is_err() {
                eprintln!("kvc serve: the engine recovered from a panic; {} answer(s) and the document in work dropped", self.active.len());
                self.active.clear();
                if let Some(work) = self.documents.pop_front() {
                    self.fail_document(work.id, &work.events, "internal error while processing".into());
                }
            }
            let m = &self.shared.metrics;
            m.queue_depth.store(self.waiting.len(), Ordering::Relaxed);
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Document(d) => self.accept_document(d),
            Command::Answer(job) => self.waiting.push_back(job),
            Command::Delete(id) => {
                self.caches.remove(&id);
                self.documents.retain(|d| d.id != id);
                if let Some(disk) = &self.shared.disk {
                    disk.remove(&id);
                }
            }
        }
    }

    /// Tokenizes a new document, checks its press against its length, registers it.
    fn accept_document(&mut self, d: NewDocument) {
        let request = Request { context: d.text.clone(), questions: vec!["?".into()], chat: d.chat, ..Default::default() };
        let checked = self.pipeline.tokenize(&request).map_err(model_error).and_then(|t| {
            let window = self.model.config.max_position_embeddings;
            generate::check_prompt(t.context.len() + 1, window, 1).map_err(model_error)?;
            let needs = match &d.press {
                Some(p) => {
                    let budget = p.budget().map_err(|e| ApiError::bad_request(e.to_string(), None).param("press"))?;
                    let field = if matches!(budget, kvc_core::Budget::Tokens(_)) { "budget" } else { "ratio" };
                    budget.validate(t.context.len()).map_err(|e| ApiError::bad_request(e.to_string(), None).param(field))?;
                    p.needs().map_err(|e| ApiError::bad_request(e.to_string(), None).param("press"))?
                }
                None => CaptureSpec::default(),
            };
            if let Some(q) = d.kv_quant {
                q.check(self.model.config.head_dim).map_err(|e| ApiError::bad_request(e.to_string(), Some("invalid_kv_dtype")).param("kv_dtype"))?;
            }
            Ok((t.context, needs))
        });
        let (ids, needs) = match checked {
            Ok(x) => x,
            Err(e) => {
                let _ = d.events.send(DocEvent::Refused(e));
                return;
            }
        };
        let meta = DocMeta {
            id: d.id.clone(),
            object: "document",
            created: crate::openai::now(),
            tokens: ids.len(),
            kv_bytes: 0,
            kv_bytes_uncompressed: 0,
            press: d.press.clone(),
            kv_quant: d.kv_quant,
            kept_per_layer: Vec::new(),
            chat: d.chat,
            status: Status::Processing { phase: "queued", done: 0, total: ids.len() },
            in_memory: false,
            on_disk: false,
            text: d.text,
            last_used: 0,
        };
        self.shared.registry().insert(meta);
        let _ = d.events.send(DocEvent::Accepted(ids.len()));
        let mut cache = self.model.model.new_cache();
        cache.reserve(ids.len());
        let capture = PrefillCapture::new(needs, self.model.config.num_layers);
        self.documents.push_back(DocWork { id: d.id, ids, press: d.press, kv_quant: d.kv_quant, cache, capture, observe: !needs.is_empty(), done: 0, events: d.events });
    }

    fn set_status(&self, id: &DocId, status: Status) {
        if let Some(m) = self.shared.registry().get_mut(id) {
            m.status = status;
        }
    }

    /// Prefills one chunk of the oldest document in work, or compresses and stores it once
    /// prefilled (as `Pipeline::prefill` + `Pipeline::compress_prefilled`).
    fn advance_document(&mut self) {
        let Some(work) = self.documents.front_mut() else { return };
        if work.done < work.ids.len() {
            let end = (work.done + PREFILL_CHUNK).min(work.ids.len());
            let obs: Option<&mut dyn AttentionObserver<B>> = if work.observe { Some(&mut work.capture) } else { None };
            let fed = self.model.model.feed(&work.ids[work.done..end], &mut work.cache, obs, PREFILL_CHUNK);
            let (id, total) = (work.id.clone(), work.ids.len());
            match fed {
                Ok(()) => {
                    work.done = end;
                    self.set_status(&id, Status::Processing { phase: "prefill", done: end, total });
                }
                Err(e) => {
                    if let Some(w) = self.documents.pop_front() {
                        self.fail_document(w.id, &w.events, e.to_string());
                    }
                }
            }
            return;
        }
        let Some(work) = self.documents.pop_front() else { return };
        let DocWork { id, ids, press, kv_quant, cache, capture, events, .. } = work;
        let total = ids.len();
        let bytes_before = cache.bytes();
        let compressed = match &press {
            None => Ok((cache, None)),
            Some(p) => {
                self.set_status(&id, Status::Processing { phase: "compress", done: 0, total });
                let prefilled = Prefilled { context: ids, cache, capture, seconds: 0.0 };
                let shared = self.shared.clone();
                let progress = &mut |done: usize, total: usize| {
                    if let Some(m) = shared.registry().get_mut(&id) {
                        m.status = Status::Processing { phase: "compress", done, total };
                    }
                };
                self.pipeline.compress_prefilled(prefilled, p, progress).map(|c| (c.cache, Some(c.report)))
            }
        };
        let (mut cache, report) = match compressed {
            Ok(x) => x,
            Err(e) => return self.fail_document(id, &events, e.to_string()),
        };
        let kept = report.as_ref().map_or_else(|| cache.lens(), |r| r.kept_per_layer());
        // quantized after the press (which scored the full-precision cache), as `Pipeline::run`
        if let Some(q) = kv_quant {
            if let Err(e) = cache.quantize(q) {
                return self.fail_document(id, &events, format!("quantizing the cache as {}: {e}", q.name()));
            }
        }
        let kv_bytes = cache.bytes();
        if let (None, Some(limit)) = (&self.shared.disk, self.shared.config.cache_memory) {
            let used = self.shared.registry().ram_bytes();
            if used + kv_bytes > limit {
                let msg = format!("the document's {kv_bytes} bytes of KV cache do not fit --cache-memory ({used} of {limit} bytes in use; give --cache-dir to keep documents on disk)");
                return self.fail_document(id, &events, msg);
            }
        }
        let meta = {
            let mut registry = self.shared.registry();
            let Some(m) = registry.get_mut(&id) else {
                return; // deleted while processing
            };
            m.kv_bytes = kv_bytes;
            m.kv_bytes_uncompressed = bytes_before;
            m.kept_per_layer = kept;
            m.clone()
        };
        let mut on_disk = false;
        if let Some(disk) = &self.shared.disk {
            let header = self.pipeline.cache_header(&cache, total, press.clone(), meta.chat);
            let saved = self.pipeline.save_cache(&cache, &header, &disk.cache_path(&id)).map_err(|e| e.to_string());
            match saved.and_then(|()| disk.commit(&id, meta.to_disk(&self.fingerprint)).map_err(|e| e.to_string())) {
                Ok(()) => on_disk = true,
                Err(e) => {
                    disk.remove(&id);
                    return self.fail_document(id, &events, format!("saving to --cache-dir: {e}"));
                }
            }
        }
        {
            let mut registry = self.shared.registry();
            let Some(m) = registry.get_mut(&id) else {
                // deleted while it was written
                if let Some(disk) = &self.shared.disk {
                    disk.remove(&id);
                }
                return;
            };
            m.status = Status::Ready;
            m.in_memory = true;
            m.on_disk = on_disk;
            registry.touch(&id);
        }
        self.caches.insert(id, cache);
        self.enforce_memory();
        let _ = events.send(DocEvent::Done(Ok(())));
    }

    fn fail_document(&self, id: DocId, events: &UnboundedSender<DocEvent>, error: String) {
        eprintln!("kvc serve: document {id} failed: {error}");
        self.set_status(&id, Status::Failed { error: error.clone() });
        let _ = events.send(DocEvent::Done(Err(error)));
    }

    /// Drops the least recently used caches that are also on disk until those in RAM fit
    /// `--cache-memory`.
    fn enforce_memory(&mut self) {
        let Some(limit) = self.shared.config.cache_memory else { return };
        let mut registry = self.shared.registry();
        while registry.ram_bytes() > limit {
            let Some(id) = registry.eviction_candidate(None) else { break };
            self.caches.remove(&id);
            if let Some(m) = registry.get_mut(&id) {
                m.in_memory = false;
            }
            self.shared.metrics.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The cache of a ready document, read back from disk when it is not in RAM.
    fn document_cache(&mut self, id: &DocId) -> Result<(KvCache<B>, DocMeta), ApiError> {
        let meta = self.shared.registry().get(id).cloned().ok_or_else(|| ApiError::no_document(id.as_str()))?;
        match &meta.status {
            Status::Ready => {}
            Status::Processing { .. } => return Err(ApiError { code: Some("document_processing"), ..ApiError::bad_request(format!("document {id} is still being processed"), None) }),
            Status::Failed { error } => return Err(ApiError::bad_request(format!("document {id} failed: {error}"), Some("document_failed"))),
        }
        self.shared.registry().touch(id);
        if let Some(cache) = self.caches.get(id) {
            return Ok((cache.clone(), meta));
        }
        let disk = self.shared.disk.as_ref().ok_or_else(|| ApiError::internal(format!("document {id} has no cache")))?;
        let (cache, _) = self.pipeline.load_cache(&disk.cache_path(id)).map_err(|e| ApiError::internal(format!("reading document {id} back: {e}")))?;
        if cache.kv_quant() != meta.kv_quant {
            return Err(ApiError::internal(format!("document {id}: the saved cache's KV format differs from its description's")));
        }
        self.shared.metrics.disk_loads.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = self.shared.registry().get_mut(id) {
            m.in_memory = true;
        }
        self.caches.insert(id.clone(), cache.clone());
        self.enforce_memory();
        Ok((cache, meta))
    }

    /// Moves waiting answers into the batch while there is room.
    fn admit(&mut self) {
        while self.active.len() < self.shared.config.max_batch.max(1) {
            let Some(job) = self.waiting.pop_front() else { return };
            if job.events.is_closed() {
                drop(job);
                self.shared.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match self.start(&job) {
                Ok((cache, logits, started)) => {
                    let _ = job.events.send(started);
                    let rng = rand::rngs::StdRng::seed_from_u64(job.generation.seed);
                    let stream = TextStream::new(&self.model.tokenizer);
                    self.active.push(Active { job, cache, logits: Some(logits), rng, stream, ids: Vec::new(), out: Output::default(), last_token: Instant::now() });
                }
                Err(e) => job.end(AnswerEvent::Failed(e)),
            }
        }
    }

    /// Feeds a job's prompt: a question on a copy of its document's cache, or a conversation
    /// prefilled on a new cache with its last token held back as the question (as
    /// `kvc generate --chat`). Returns the cache, the logits of the question's last token and the
    /// `Started` event.
    fn start(&mut self, job: &AnswerJob) -> Result<(KvCache<B>, Tensor<B, 3>, AnswerEvent), ApiError> {
        let cfg = &job.generation;
        cfg.validate().map_err(model_error)?;
        let window = self.model.config.max_position_embeddings;
        let (mut cache, question, context, cached, document) = match &job.prompt {
            Prompt::Document { id, question } => {
                let (cache, meta) = self.document_cache(id)?;
                // the question's ids do not depend on the context (as `Pipeline::run_saved`)
                let request = Request { context: "context".into(), questions: vec![question.clone()], chat: meta.chat, ..Default::default() };
                let q = self.pipeline.tokenize(&request).map_err(model_error)?.questions.pop().unwrap_or_default();
                self.shared.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
                (cache, q, meta.tokens, meta.tokens, Some(id.clone()))
            }
            Prompt::Chat(messages) => {
                let tok = &self.model.tokenizer;
                let mut ids = tok.encode(&tok.apply_chat_template(messages).map_err(model_error)?, false).map_err(model_error)?;
                let last = ids.pop().ok_or_else(|| model_error(ModelError::EmptyPrompt))?;
                generate::check_prompt(ids.len() + 1, window, cfg.max_new_tokens).map_err(model_error)?;
                let prefilled = self.pipeline.prefill(&ids, CaptureSpec::default(), PREFILL_CHUNK, &mut |_| {}).map_err(model_error)?;
                (prefilled.cache, vec![last], ids.len(), 0, None)
            }
        };
        if question.is_empty() {
            return Err(model_error(ModelError::EmptyPrompt));
        }
        // `Pipeline::answer`, then the start of `generate::decode`
        generate::check_prompt(cache.next_position() + question.len(), window, cfg.max_new_tokens).map_err(model_error)?;
        cache.reserve(question.len() + cfg.max_new_tokens);
        let logits = self.model.model.forward(generate::token_tensor::<B>(&question, &self.device), &mut cache, None, Logits::Last).map_err(model_error)?;
        cache.reserve(cfg.max_new_tokens);
        let prompt_tokens = context + question.len();
        let m = &self.shared.metrics;
        m.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        m.cached_tokens.fetch_add(cached as u64, Ordering::Relaxed);
        Ok((cache, logits, AnswerEvent::Started { prompt_tokens, cached_tokens: cached, document }))
    }

    /// One decode step of every active answer: each picks its next token from its logits (sends
    /// its text, checks its stop rules), then every answer that goes on is fed its token, all of
    /// them in one batched forward pass ([`kvc_models::Decoder::forward_batch`]: the weights are
    /// read once for the whole batch; each answer's logits are those it would get alone).
    fn step(&mut self) {
        if self.active.is_empty() {
            return;
        }
        self.shared.metrics.batch_size.store(self.active.len(), Ordering::Relaxed);
        let mut outcomes = Vec::with_capacity(self.active.len());
        for a in &mut self.active {
            outcomes.push(pick(a, self.model, &self.shared));
        }
        let window = self.model.config.max_position_embeddings;
        let mut rows = Vec::with_capacity(self.active.len());
        for (i, (a, outcome)) in self.active.iter().zip(outcomes.iter_mut()).enumerate() {
            if let Ok(Outcome::Next(token)) = outcome {
                if a.cache.next_position() >= window {
                    *outcome = Ok(Outcome::Finished("length"));
                } else {
                    rows.push((i, *token));
                }
            }
        }
        if !rows.is_empty() {
            self.shared.metrics.batch_size_max.fetch_max(rows.len(), Ordering::Relaxed);
            let tokens: Vec<u32> = rows.iter().map(|r| r.1).collect();
            let going: std::collections::HashSet<usize> = rows.iter().map(|r| r.0).collect();
            let mut caches: Vec<&mut KvCache<B>> = self.active.iter_mut().enumerate().filter(|(i, _)| going.contains(i)).map(|(_, a)| &mut a.cache).collect();
            match self.model.model.forward_batch(&tokens, &mut caches) {
                Ok(logits) => {
                    let vocab = logits.dims()[1];
                    for (row, &(i, _)) in rows.iter().enumerate() {
                        self.active[i].logits = Some(logits.clone().narrow(0, row, 1).reshape([1, 1, vocab]));
                    }
                }
                Err(e) => {
                    let e = model_error(e);
                    for &(i, _) in &rows {
                        outcomes[i] = Err(e.clone());
                    }
                }
            }
        }
        let mut kept = Vec::with_capacity(self.active.len());
        for (a, outcome) in self.active.drain(..).zip(outcomes) {
            match outcome {
                Ok(Outcome::Next(_)) => kept.push(a),
                Ok(Outcome::Finished(finish)) => finish_answer(a, finish),
                Ok(Outcome::Cancelled) => {
                    drop(a);
                    self.shared.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => a.job.end(AnswerEvent::Failed(e)),
            }
        }
        self.active = kept;
    }
}

/// Picks an answer's next token from its logits and sends the text it completes (the body of
/// `generate::decode`'s loop before the forward pass).
fn pick<B: KvcBackend>(a: &mut Active<'_, B>, model: &LoadedModel<B>, shared: &Shared) -> Result<Outcome, ApiError> {
    if a.job.events.is_closed() {
        return Ok(Outcome::Cancelled);
    }
    let cfg = &a.job.generation;
    let Some(logits) = a.logits.take() else { return Ok(Outcome::Finished("length")) };
    let host = logits.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| ApiError::internal(format!("{e:?}")))?;
    let next = generate::sample(&host, cfg, &mut a.rng);
    a.ids.push(next);
    let now = Instant::now();
    if a.ids.len() == 1 {
        shared.metrics.time_to_first_token.observe(now.duration_since(a.job.arrived).as_secs_f64());
    } else {
        shared.metrics.token_latency.observe(now.duration_since(a.last_token).as_secs_f64());
    }
    a.last_token = now;
    shared.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let delta = a.stream.push(next).map_err(model_error)?;
    a.out.text.push_str(&delta);
    if a.out.send(&a.job.events, &a.job.stop, false) {
        return Ok(Outcome::Finished("stop"));
    }
    if cfg.stop_at_eos && model.tokenizer.eos_ids().contains(&next) {
        return Ok(Outcome::Finished("stop"));
    }
    if a.ids.len() >= cfg.max_new_tokens {
        return Ok(Outcome::Finished("length"));
    }
    Ok(Outcome::Next(next))
}

/// An answer's text: what was completed so far (deltas concatenated) and how much was sent.
#[derive(Default)]
struct Output {
    text: String,
    sent: usize,
    /// A stop string was hit (the text ends before it).
    stopped: bool,
}

impl Output {
    /// Sends the unsent text, cut before the first stop string (then returns true), holding back
    /// a tail that may begin a stop string unless `all`.
    fn send(&mut self, events: &UnboundedSender<AnswerEvent>, stops: &[String], all: bool) -> bool {
        let hit = stops.iter().filter(|s| !s.is_empty()).filter_map(|s| self.text.find(s.as_str())).min();
        let end = match hit {
            Some(pos) => pos,
            None if all => self.text.len(),
            None => {
                let hold = stops
                    .iter()
                    .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k])))
                    .max()
                    .unwrap_or(0);
                self.text.len() - hold
            }
        };
        let end = end.max(self.sent);
        if end > self.sent {
            let _ = events.send(AnswerEvent::Text(self.text[self.sent..end].to_string()));
            self.sent = end;
        }
        if hit.is_some() {
            self.text.truncate(self.sent);
            self.stopped = true;
        }
        hit.is_some()
    }
}

/// Sends the rest of an answer's text (what the text stream held back) and its end.
fn finish_answer<B: KvcBackend>(a: Active<'_, B>, mut finish: &'static str) {
    let Active { job, stream, ids, mut out, .. } = a;
    if !out.stopped {
        match stream.finish() {
            Ok((_, rest)) => {
                out.text.push_str(&rest);
                if out.send(&job.events, &job.stop, true) {
                    finish = "stop";
                }
            }
            Err(e) => return job.end(AnswerEvent::Failed(model_error(e))),
        }
    }
    job.end(AnswerEvent::Done { finish, ids, text: out.text });
}
