//! Errors of kvc-core.

/// Errors raised by cache manipulation and presses.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A layer index beyond the cache's number of layers.
    #[error("layer {layer} out of range: the cache has {num_layers} layers")]
    LayerOutOfRange { layer: usize, num_layers: usize },
    /// The layer has not been filled yet (no prefill happened).
    #[error("layer {0} of the KV cache is empty")]
    EmptyLayer(usize),
    /// Tensors whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
}
