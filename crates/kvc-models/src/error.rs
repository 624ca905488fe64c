//! Errors of kvc-models.

use std::path::PathBuf;

/// Everything that can go wrong loading a model or running it on user input.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The model path does not exist or holds nothing we can load.
    #[error("no model at {path}: {reason}")]
    ModelNotFound {
        /// The path given.
        path: PathBuf,
        /// What was expected there.
        reason: String,
    },
    /// A GGUF file that is not well-formed (bad magic, truncated, offsets out of range, ...).
    #[error("invalid GGUF file {path}: {reason}")]
    InvalidGguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor type (quantization) this loader cannot dequantize.
    #[error("tensor {tensor}: unsupported tensor type {kind}")]
    UnsupportedTensorType {
        /// The tensor's name.
        tensor: String,
        /// The GGUF/safetensors type name or number.
        kind: String,
    },
    /// A safetensors file that could not be parsed.
    #[error("invalid safetensors file {path}: {reason}")]
    InvalidSafetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// Missing or inconsistent model configuration.
    #[error("invalid model config: {0}")]
    Config(String),
    /// An architecture we have no decoder for.
    #[error("unsupported architecture {0:?} (supported: llama, qwen2, qwen3)")]
    UnsupportedArchitecture(String),
    /// A weight the architecture needs is absent.
    #[error("missing tensor {0}")]
    MissingTensor(String),

    /// A weight is NaN or infinite (a corrupt or badly converted file): found at load, with the
    /// tensor's name and the first bad element.
    #[error("tensor {name}: element {index} is {value} (weights must be finite)")]
    NonFiniteWeight {
        /// HF tensor name.
        name: String,
        /// Flat index of the first non-finite element.
        index: usize,
        /// Its value (NaN, inf or -inf).
        value: f32,
    },
    /// A weight whose shape does not match the config.
    #[error("tensor {name}: shape {actual:?} does not match the config, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor's name.
        name: String,
        /// Shape from the config.
        expected: Vec<usize>,
        /// Shape in the file.
        actual: Vec<usize>,
    },
    /// No tokenizer could be found or built.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Int8 activations asked of a model whose decode multiplies dense weights
    /// ([`crate::Decoder::enable_int8_activations`]).
    #[error("--int8-activations needs a GGUF model's quantized weights in use on a CPU backend (flex, ndarray); this model's decode multiplies dense weights")]
    Int8Activations,
    /// Int8 prefill asked of a model whose prefill multiplies dense weights
    /// ([`crate::Decoder::enable_int8_prefill`]).
    #[error("--int8-prefill needs a GGUF model's quantized weights held as codes only on a CPU backend (flex, ndarray; not --dense-weights); this model's prefill multiplies dense weights")]
    Int8Prefill,
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt does not fit the model's context.
    #[error("the prompt has {tokens} tokens, more than the model's context of {context} (minus {reserved} for generation)")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// Model context length.
        context: usize,
        /// Tokens reserved for generation.
        reserved: usize,
    },
    /// Invalid generation settings.
    #[error("invalid generation settings: {0}")]
    Generation(String),
    /// The default model could not be fetched.
    #[error("cannot fetch the default model: {0}")]
    Fetch(String),
    /// An error from the cache layer.
    #[error(transparent)]
    Core(#[from] kvc_core::CoreError),
    /// The KV cache a request needs does not fit the memory it may use.
    #[error("a context of {context} tokens needs {needed} bytes of KV cache ({:.1} MiB), more than the {available} bytes ({:.1} MiB) available; shorten the context or raise the limit", *needed as f64 / 1048576.0, *available as f64 / 1048576.0)]
    KvMemory {
        /// KV cache bytes at the peak ([`crate::pipeline::Pipeline::kv_bytes_needed`]).
        needed: usize,
        /// The limit.
        available: usize,
        /// Context tokens.
        context: usize,
    },
    /// A saved KV cache that cannot be written or read.
    #[error(transparent)]
    CacheFile(#[from] kvc_core::CacheFileError),
    /// A saved KV cache written by another model (or the same model in another dtype), or whose
    /// shapes do not fit this model.
    #[error("the saved KV cache {path} does not fit this model: {reason}")]
    CacheMismatch {
        /// The cache file.
        path: std::path::PathBuf,
        /// What differs.
        reason: String,
    },
}

/// Result alias of kvc-models.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
