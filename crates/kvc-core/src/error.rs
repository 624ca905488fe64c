//! Errors of kvc-core.

/// Errors raised by cache manipulation and presses.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A layer index beyond the cache's number of layers.
    #[error("layer {layer} out of range: the cache has {num_layers} layers")]
    LayerOutOfRange {
        /// The index asked for.
        layer: usize,
        /// Layers in the cache.
        num_layers: usize,
    },
    /// The layer has not been filled yet (no prefill happened).
    #[error("layer {0} of the KV cache is empty")]
    EmptyLayer(usize),
    /// Tensors whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A compression ratio outside [0, 1).
    #[error("compression ratio {0} is outside [0, 1)")]
    Ratio(f64),
    /// A token budget of 0 or above the context length.
    #[error("token budget {budget} must be between 1 and the context length {context}")]
    Budget {
        /// Kept tokens per layer asked for.
        budget: usize,
        /// Context tokens.
        context: usize,
    },
    /// A context too short to compress.
    #[error("context of {0} token(s): compression needs at least 2")]
    ContextTooShort(usize),
    /// A press name nobody implements.
    #[error("unknown press {name:?} (known: {known})")]
    UnknownPress {
        /// The name given.
        name: String,
        /// The names accepted.
        known: String,
    },
    /// A press option that does not exist or has a bad value.
    #[error("press {press}: {message}")]
    PressOption {
        /// The press.
        press: String,
        /// What is wrong.
        message: String,
    },
    /// Something the press does not support (e.g. batch > 1).
    #[error("{0}")]
    Unsupported(String),
    /// An error of the model while a press ran it.
    #[error("model: {0}")]
    Model(String),
}
