//! The HTTP API (axum handlers). Every error is answered in OpenAI's shape
//! ([`ApiError`]); request bodies are read as bytes (bounded by `--max-body`) and parsed here, so
//! that malformed JSON and wrong types get 400 and oversized bodies 413 in that shape too.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use kvc_core::{Budget, PressSpec};
use kvc_models::{ChatMessage, GenerationConfig};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::engine::{AnswerEvent, AnswerJob, Command, DocEvent, InFlight, NewDocument, Prompt};
use crate::openai::{self, ApiError, ChatChunk, ChatCompletion, ChatRequest, ChunkChoice, Delta, DocumentRequest, Stop, Usage};
use crate::state::DocId;
use crate::Shared;

/// Documents of at most this many tokens are answered once ready; longer ones at once, with
/// `status: "processing"`.
pub const SYNC_TOKENS: usize = 2048;

/// `max_tokens` when a request gives none.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// The page of `GET /`.
const PAGE: &str = include_str!("page/index.html");

type AppState = State<Arc<Shared>>;

/// The routes, with API-key check, request counting and the body limit.
pub fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.body_limit;
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/documents", get(list_documents).post(create_document))
        .route("/v1/documents/{id}", get(get_document).delete(delete_document))
        .route("/v1/chat/completions", post(chat))
        .fallback(|| async { ApiError { status: StatusCode::NOT_FOUND, kind: "not_found_error", ..ApiError::bad_request("unknown route", None) } })
        .method_not_allowed_fallback(|| async {
            ApiError { status: StatusCode::METHOD_NOT_ALLOWED, ..ApiError::bad_request("method not allowed on this route", None) }
        })
        .layer(middleware::from_fn_with_state(shared.clone(), authorize))
        .layer(middleware::from_fn_with_state(shared.clone(), count))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

/// Counts every request by route and status.
async fn count(State(s): AppState, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let response = next.run(request).await;
    s.metrics.request(&route, response.status().as_u16());
    response
}

/// With `--api-key`: every route but `/health` and the page needs `Authorization: Bearer KEY`.
async fn authorize(State(s): AppState, request: Request, next: Next) -> Response {
    let Some(key) = &s.config.api_key else { return next.run(request).await };
    let path = request.uri().path();
    if path == "/health" || path == "/" {
        return next.run(request).await;
    }
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same(g.trim().as_bytes(), key.as_bytes()) => next.run(request).await,
        _ => {
            let mut e = ApiError::bad_request(
                if given.is_some() { "invalid API key" } else { "missing API key: send Authorization: Bearer KEY" },
                Some("invalid_api_key"),
            );
            e.status = StatusCode::UNAUTHORIZED;
            e.kind = "authentication_error";
            let mut response = e.into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// Compares in time that depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses a JSON body: 413 beyond the limit, 400 for anything that is not the expected JSON.
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        let mut err = ApiError::bad_request(e.body_text(), None);
        err.status = status;
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            err.code = Some("request_too_large");
        }
        err
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let what = if e.is_data() { "the request body does not fit the schema" } else { "the request body is not valid JSON" };
        ApiError::bad_request(format!("{what}: {e}"), Some(if e.is_data() { "invalid_type" } else { "invalid_json" }))
    })
}

fn ready(s: &Shared) -> Result<(), ApiError> {
    if s.ready.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err(ApiError::loading())
    }
}

fn engine_gone() -> ApiError {
    ApiError::internal("the engine stopped")
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn health(State(s): AppState) -> Response {
    match ready(&s) {
        Ok(()) => Json(serde_json::json!({ "status": "ok" })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(s): AppState) -> Response {
    let tiers = s.registry().tiers();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render(tiers)).into_response()
}

async fn models(State(s): AppState) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{ "id": s.config.model_name, "object": "model", "created": 0, "owned_by": "kvc" }],
    }))
}

/// The press of a document request: its own, or the server's `--press` (with the request's
/// budget if it gives one). `"press": "none"` keeps the document whole.
fn document_press(default: Option<&PressSpec>, r: &DocumentRequest) -> Result<Option<PressSpec>, ApiError> {
    let budget_given = r.ratio.is_some() || r.budget.is_some();
    let name = match (r.press.as_deref(), default) {
        (Some("none"), _) | (None, None) if budget_given => return Err(ApiError::bad_request("ratio and budget need a press", None).param("press")),
        (Some("none"), _) | (None, None) => return Ok(None),
        (Some(name), _) => name.to_string(),
        (None, Some(d)) => d.name.clone(),
    };
    let budget = match (r.ratio, r.budget, default) {
        (Some(_), Some(_), _) => return Err(ApiError::bad_request("give ratio or budget, not both", None).param("budget")),
        (Some(ratio), None, _) => Budget::Ratio(ratio),
        (None, Some(tokens), _) => Budget::Tokens(tokens),
        (None, None, Some(d)) => d.budget().map_err(|e| ApiError::bad_request(e.to_string(), None))?,
        (None, None, None) => return Err(ApiError::bad_request(format!("press {name} needs a ratio or a budget"), None).param("ratio")),
    };
    let mut spec = PressSpec::new(&name, budget);
    if let Some(d) = default.filter(|d| d.name == name) {
        spec.options = d.options.clone();
    }
    spec.check().map_err(|e| ApiError::bad_request(e.to_string(), Some("invalid_press")).param("press"))?;
    Ok(Some(spec))
}

async fn create_document(State(s): AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    ready(&s)?;
    let request: DocumentRequest = parse(body)?;
    if request.text.trim().is_empty() {
        return Err(ApiError::bad_request("the document's text is empty", None).param("text"));
    }
    let press = document_press(s.config.press.as_ref(), &request)?;
    let kv_quant = match &request.kv_dtype {
        None => s.config.kv_quant,
        Some(name) => crate::parse_kv_dtype(name, s.config.dtype).map_err(|e| ApiError::bad_request(e, Some("invalid_kv_dtype")).param("kv_dtype"))?,
    };
    let id = DocId::random();
    let (events, mut rx) = unbounded_channel();
    let chat = request.chat.unwrap_or(true);
    if !s.send(Command::Document(NewDocument { id: id.clone(), text: request.text, press, kv_quant, chat, events })) {
        return Err(engine_gone());
    }
    let tokens = match rx.recv().await {
        Some(DocEvent::Accepted(tokens)) => tokens,
        Some(DocEvent::Refused(e)) => return Err(e),
        _ => return Err(engine_gone()),
    };
    if tokens <= SYNC_TOKENS {
        match rx.recv().await {
            Some(DocEvent::Done(Ok(()))) => {}
            Some(DocEvent::Done(Err(e))) => return Err(ApiError::internal(format!("document {id}: {e}"))),
            _ => return Err(engine_gone()),
        }
    }
    let meta = s.registry().get(&id).cloned().ok_or_else(|| ApiError::no_document(id.as_str()))?;
    Ok((StatusCode::CREATED, Json(meta)).into_response())
}

async fn list_documents(State(s): AppState) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "object": "list", "data": s.registry().list() }))
}

fn document_id(text: &str) -> Result<DocId, ApiError> {
    DocId::parse(text).ok_or_else(|| ApiError::bad_request("a document id is 32 lowercase hex digits", Some("invalid_document_id")))
}

async fn get_document(State(s): AppState, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = document_id(&id)?;
    let meta = s.registry().get(&id).cloned().ok_or_else(|| ApiError::no_document(id.as_str()))?;
    Ok(Json(meta).into_response())
}

async fn delete_document(State(s): AppState, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = document_id(&id)?;
    s.registry().remove(&id).ok_or_else(|| ApiError::no_document(id.as_str()))?;
    s.send(Command::Delete(id.clone()));
    Ok(Json(serde_json::json!({ "id": id, "object": "document.deleted", "deleted": true })).into_response())
}

/// The prompt of a chat request: a named document and the last user message, a conversation
/// of one user message that begins with a stored document's text (that document, and the rest
/// as the question), or the plain conversation.
fn chat_prompt(s: &Shared, request: &ChatRequest) -> Result<Prompt, ApiError> {
    let mut messages = Vec::with_capacity(request.messages.len());
    for m in &request.messages {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => return Err(ApiError::bad_request(format!("message role {other:?} is not supported (system, user, assistant)"), None).param("messages")),
        };
        let content = m.content.as_ref().map(openai::Content::text).transpose()?.unwrap_or_default();
        messages.push(ChatMessage { role: role.into(), content });
    }
    if let Some(doc) = &request.document {
        let id = document_id(doc).map_err(|e| e.param("document"))?;
        if s.registry().get(&id).is_none() {
            return Err(ApiError::no_document(id.as_str()).param("document"));
        }
        let question = messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone());
        let question = question.filter(|q| !q.trim().is_empty()).ok_or_else(|| ApiError::bad_request("with a document, the last user message is the question: give one", None).param("messages"))?;
        return Ok(Prompt::Document { id, question });
    }
    if let [only] = messages.as_slice() {
        if only.role == "user" {
            if let Some((id, question)) = s.registry().prefix_match(&only.content) {
                return Ok(Prompt::Document { id, question });
            }
        }
    }
    Ok(Prompt::Chat(messages))
}

/// Sampling and length settings of a chat request, checked.
fn generation(s: &Shared, r: &ChatRequest) -> Result<GenerationConfig, ApiError> {
    if r.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported", None).param("n"));
    }
    let window = s.window.load(Ordering::SeqCst);
    let field = if r.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
    let max = match r.max_completion_tokens.or(r.max_tokens) {
        Some(0) => return Err(ApiError::bad_request(format!("{field} must be at least 1"), None).param(field)),
        Some(n) if n as usize >= window || n > u32::MAX as u64 => {
            return Err(ApiError::bad_request(format!("{field} {n} does not fit the model's window of {window} tokens"), Some("context_length_exceeded")).param(field))
        }
        Some(n) => n as usize,
        None => DEFAULT_MAX_TOKENS.min(window / 2),
    };
    let temperature = r.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(format!("temperature {temperature} must be in [0, 2]"), None).param("temperature"));
    }
    let top_p = r.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(format!("top_p {top_p} must be in (0, 1]"), None).param("top_p"));
    }
    let cfg = GenerationConfig { max_new_tokens: max, temperature, top_p, seed: r.seed.unwrap_or(0), ..Default::default() };
    cfg.validate().map_err(|e| ApiError::bad_request(e.to_string(), None))?;
    Ok(cfg)
}

async fn chat(State(s): AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    ready(&s)?;
    let request: ChatRequest = parse(body)?;
    if request.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty", None).param("messages"));
    }
    let generation = generation(&s, &request)?;
    let stop = match &request.stop {
        None => Vec::new(),
        Some(Stop::One(x)) => vec![x.clone()],
        Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
        Some(Stop::Many(_)) => return Err(ApiError::bad_request("at most 4 stop strings", None).param("stop")),
    };
    let prompt = chat_prompt(&s, &request)?;
    let limit = s.config.max_batch.max(1) + s.config.max_queue;
    let Some(slot) = InFlight::try_take(&s.in_flight, limit) else {
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            code: Some("queue_full"),
            retry_after: Some(1),
            ..ApiError::bad_request(format!("the queue is full ({limit} answers running or waiting): retry later"), None)
        });
    };
    let (events, mut rx) = unbounded_channel();
    if !s.send(Command::Answer(AnswerJob { prompt, generation, stop, events, arrived, slot })) {
        return Err(engine_gone());
    }
    let (usage, document) = match rx.recv().await {
        Some(AnswerEvent::Started { prompt_tokens, cached_tokens, document }) => {
            (Usage { prompt_tokens, prompt_tokens_details: openai::PromptTokensDetails { cached_tokens }, ..Default::default() }, document)
        }
        Some(AnswerEvent::Failed(e)) => return Err(e),
        _ => return Err(engine_gone()),
    };
    let id = format!("chatcmpl-{}", DocId::random());
    let model = request.model.clone().unwrap_or_else(|| s.config.model_name.clone());
    if request.stream {
        let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return Ok(stream_answer(rx, id, model, usage, include_usage).into_response());
    }
    loop {
        match rx.recv().await {
            Some(AnswerEvent::Text(_)) | Some(AnswerEvent::Started { .. }) => {}
            Some(AnswerEvent::Done { finish, ids, text }) => {
                let usage = Usage { completion_tokens: ids.len(), total_tokens: usage.prompt_tokens + ids.len(), ..usage };
                let completion = ChatCompletion {
                    id,
                    object: "chat.completion",
                    created: openai::now(),
                    model,
                    choices: vec![openai::Choice {
                        index: 0,
                        message: openai::AssistantMessage { role: "assistant", content: text },
                        finish_reason: finish,
                        logprobs: None,
                    }],
                    usage,
                    kvc: openai::KvcExtras { completion_ids: ids, document: document.map(|d| d.to_string()) },
                };
                return Ok(Json(completion).into_response());
            }
            Some(AnswerEvent::Failed(e)) => return Err(e),
            None => return Err(engine_gone()),
        }
    }
}

/// The answer as server-sent events: a first chunk with the role, one chunk per piece of text,
/// a last chunk with `finish_reason`, with `include_usage` a chunk with `usage`, then
/// `data: [DONE]`. Dropping the stream (the client went away) drops `rx`, which cancels the
/// answer.
fn stream_answer(rx: UnboundedReceiver<AnswerEvent>, id: String, model: String, usage: Usage, include_usage: bool) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let created = openai::now();
    let chunk = move |delta: Delta, finish: Option<&'static str>, usage: Option<Usage>| {
        let choices = if usage.is_some() { Vec::new() } else { vec![ChunkChoice { index: 0, delta, finish_reason: finish }] };
        let c = ChatChunk { id: id.clone(), object: "chat.completion.chunk", created, model: model.clone(), choices, usage };
        Event::default().data(serde_json::to_string(&c).unwrap_or_default())
    };
    let first = chunk(Delta { role: Some("assistant"), content: Some(String::new()) }, None, None);
    // state: the receiver, or None once [DONE] was sent
    let events = stream::unfold(Some(rx), move |rx| {
        let chunk = chunk.clone();
        async move {
            let mut rx = rx?;
            let out: Vec<Event> = match rx.recv().await {
                Some(AnswerEvent::Text(t)) => return Some((vec![chunk(Delta { role: None, content: Some(t) }, None, None)], Some(rx))),
                Some(AnswerEvent::Started { .. }) => Vec::new(),
                Some(AnswerEvent::Done { finish, ids, .. }) => {
                    let mut v = vec![chunk(Delta::default(), Some(finish), None)];
                    if include_usage {
                        let u = Usage { completion_tokens: ids.len(), total_tokens: usage.prompt_tokens + ids.len(), ..usage };
                        v.push(chunk(Delta::default(), None, Some(u)));
                    }
                    v.push(Event::default().data("[DONE]"));
                    return Some((v, None));
                }
                Some(AnswerEvent::Failed(e)) => vec![Event::default().data(e.body().to_string()), Event::default().data("[DONE]")],
                None => vec![Event::default().data(engine_gone().body().to_string()), Event::default().data("[DONE]")],
            };
            let next = if out.is_empty() { Some(rx) } else { None };
            Some((out, next))
        }
    });
    let all = stream::iter([first]).chain(events.flat_map(stream::iter)).map(Ok);
    Sse::new(all).keep_alive(KeepAlive::default())
}
