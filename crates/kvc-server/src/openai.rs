//! OpenAI's wire types (the subset `kvc serve` speaks): chat completion requests, responses and
//! stream chunks, errors in OpenAI's shape `{"error": {"message", "type", "code", "param"}}`, and the
//! document objects of `/v1/documents`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// An error answered to a client: HTTP status plus OpenAI's error object.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `rate_limit_error`, `server_error`, ...
    pub kind: &'static str,
    /// A machine-readable code (`document_not_found`, `context_length_exceeded`, ...).
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (`Retry-After`, with 429 and 503).
    pub retry_after: Option<u64>,
    /// OpenAI's `param`: the request field at fault (`kv_dtype`, `max_tokens`, ...), when one is.
    pub param: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>, code: Option<&'static str>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", code, retry_after: None, param: None }
    }

    /// The same error naming the request field at fault (OpenAI's `param`).
    #[must_use]
    pub fn param(self, field: &'static str) -> Self {
        Self { param: Some(field), ..self }
    }

    /// A 404 for an unknown document.
    pub fn no_document(id: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("no document {id:?}"),
            kind: "not_found_error",
            code: Some("document_not_found"),
            retry_after: None,
            param: None,
        }
    }

    /// A 503 while the model loads.
    pub fn loading() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the model is loading".into(),
            kind: "server_error",
            code: Some("model_loading"),
            retry_after: Some(1),
            param: None,
        }
    }

    /// A 500 naming what failed inside the server.
    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), kind: "server_error", code: None, retry_after: None, param: None }
    }

    /// The JSON body (`{"error": {...}}`).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "message": self.message, "type": self.kind, "code": self.code, "param": self.param } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Message content: a string, or an array of parts of which the `text` ones count.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type": "text", "text": ...}`); other part types are refused.
    Parts(Vec<ContentPart>),
}

/// One part of an array content.
#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    /// The part's type (`text` is the only one served).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

impl Content {
    /// The text.
    ///
    /// # Errors
    /// A 400 for a non-text part.
    pub fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    _ => Err(ApiError::bad_request(format!("content parts of type {:?} are not supported (text only)", p.kind), None).param("messages")),
                })
                .collect(),
        }
    }
}

/// One chat message.
#[derive(Clone, Debug, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or `developer`, read as `system`).
    pub role: String,
    /// The content (`null` for an assistant message without text).
    #[serde(default)]
    pub content: Option<Content>,
}

/// `stop`: one string or several.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Up to 4 stop strings.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions`. Unknown fields are ignored (as OpenAI-compatible servers do).
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// Model name (any value is accepted: the server serves one model).
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Most tokens to generate (legacy name).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// Sampling temperature; absent or 0 = greedy (kvc's default, reproducible).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Sampler seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings (the answer ends before the first one).
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Server-sent events of `chat.completion.chunk` objects.
    #[serde(default)]
    pub stream: bool,
    /// Stream options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Choices (1 only).
    #[serde(default)]
    pub n: Option<u32>,
    /// kvc: a stored document as the context (the last user message is the question).
    #[serde(default)]
    pub document: Option<String>,
}

/// `usage.prompt_tokens_details`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens read from a stored document's (compressed) cache instead of prefilled.
    pub cached_tokens: usize,
}

/// Token counts of a completion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Usage {
    /// Prompt tokens (a document's context tokens plus the question's).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// The sum.
    pub total_tokens: usize,
    /// What came from a stored cache.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `chat.completion`.
#[derive(Clone, Debug, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// One choice.
    pub choices: Vec<Choice>,
    /// Token counts.
    pub usage: Usage,
    /// kvc's extras: the generated ids and the document used.
    pub kvc: KvcExtras,
}

/// One choice of a completion.
#[derive(Clone, Debug, Serialize)]
pub struct Choice {
    /// 0.
    pub index: usize,
    /// The answer.
    pub message: AssistantMessage,
    /// `stop` (end of turn or a stop string) or `length` (max tokens or the model's window).
    pub finish_reason: &'static str,
    /// Not computed (`null`).
    pub logprobs: Option<()>,
}

/// The assistant's message.
#[derive(Clone, Debug, Serialize)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: &'static str,
    /// The text.
    pub content: String,
}

/// Fields outside OpenAI's schema (clients ignore them).
#[derive(Clone, Debug, Serialize)]
pub struct KvcExtras {
    /// Generated token ids (with the EOS id when the answer ended on one), as `kvc generate
    /// --json`'s `completion_ids`.
    pub completion_ids: Vec<u32>,
    /// The document whose cache was the context, if any.
    pub document: Option<String>,
}

/// `chat.completion.chunk`.
#[derive(Clone, Debug, Serialize)]
pub struct ChatChunk {
    /// The completion's id (same in every chunk).
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// One choice (none in the usage chunk).
    pub choices: Vec<ChunkChoice>,
    /// In the last chunk with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One choice of a chunk.
#[derive(Clone, Debug, Serialize)]
pub struct ChunkChoice {
    /// 0.
    pub index: usize,
    /// What the chunk adds.
    pub delta: Delta,
    /// Set in the last content chunk.
    pub finish_reason: Option<&'static str>,
}

/// A chunk's delta.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Delta {
    /// `assistant` in the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `POST /v1/documents`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentRequest {
    /// The document's text.
    pub text: String,
    /// A press name (`kvc presses`); absent: the server's `--press`.
    #[serde(default)]
    pub press: Option<String>,
    /// Compression ratio in [0, 1) (with `press`, or replacing the server's ratio).
    #[serde(default)]
    pub ratio: Option<f64>,
    /// Kept tokens per layer (instead of `ratio`).
    #[serde(default)]
    pub budget: Option<usize>,
    /// Wrap the document in the chat template (default true; questions are asked the same way).
    #[serde(default)]
    pub chat: Option<bool>,
    /// How the compressed cache stores keys and values: `float` (the model's dtype), `int8` or
    /// `int4` (quantized after the press), `f16` / `bf16` (16-bit copies, for a model in f32);
    /// absent: the server's `--kv-dtype`.
    #[serde(default)]
    pub kv_dtype: Option<String>,
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
