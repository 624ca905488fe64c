//! Observation hook between a decoder's attention and whoever wants to look at it (presses).

use burn::tensor::{backend::Backend, Tensor};

use crate::QueryReduce;

/// What one attention layer shows an observer during a forward pass over a chunk of `chunk` new
/// tokens.
///
/// Shapes: `batch`, query heads `q_heads`, key/value heads `kv_heads` (GQA: `q_heads` is a multiple
/// of `kv_heads`; query head `h` reads KV head `h / (q_heads / kv_heads)`), `len` = keys visible to
/// this chunk (the layer's cache length *after* appending the chunk), `head_dim`.
pub struct LayerObservation<'a, B: Backend> {
    /// Layer index, 0-based.
    pub layer: usize,
    /// Position of the chunk's first token (positions are consecutive within a chunk).
    pub first_position: usize,
    /// Queries after RoPE, `[batch, q_heads, chunk, head_dim]`.
    pub queries: &'a Tensor<B, 4>,
    /// Queries before RoPE (after Qwen3's q-norm), `[batch, q_heads, chunk, head_dim]`; present
    /// only when [`AttentionObserver::wants_pre_rope_queries`] returned true for this layer.
    pub queries_pre_rope: Option<&'a Tensor<B, 4>>,
    /// All keys visible to the chunk, after RoPE, `[batch, kv_heads, len, head_dim]`; the last
    /// `chunk` of them are the chunk's own.
    pub keys: &'a Tensor<B, 4>,
    /// All values visible to the chunk, `[batch, kv_heads, len, head_dim]`.
    pub values: &'a Tensor<B, 4>,
    /// Attention probabilities (softmax over the visible keys, causal within the chunk),
    /// `[batch, q_heads, chunk, len]`; present only when [`AttentionObserver::wants_attention`]
    /// returned true for this layer.
    pub attention: Option<&'a Tensor<B, 4>>,
    /// Attention probabilities reduced over the chunk's queries, `[batch, q_heads, len]`; present
    /// only when [`AttentionObserver::reduce_attention`] returned a reduction for this layer.
    /// Computed inside the attention kernel's softmax pass (no `[.., chunk, len]` tensor).
    pub attention_reduced: Option<&'a Tensor<B, 3>>,
}

/// Receives per-layer observations during a forward pass.
///
/// The decoder calls [`observe`](Self::observe) once per layer and chunk, after attention was
/// computed and before the layer's output projection. Computing `attention` costs a
/// `[batch, q_heads, chunk, len]` tensor (and the explicit-softmax attention path); it is only
/// passed when asked for.
pub trait AttentionObserver<B: Backend> {
    /// Whether this layer's attention probabilities should be passed (default: no).
    fn wants_attention(&self, _layer: usize) -> bool {
        false
    }
    /// Whether (and how) this layer's attention probabilities should be reduced over the chunk's
    /// queries and passed as [`LayerObservation::attention_reduced`] (default: no). Far cheaper
    /// than [`wants_attention`](Self::wants_attention) on CPU backends.
    fn reduce_attention(&self, _layer: usize) -> Option<QueryReduce> {
        None
    }
    /// Whether this layer's pre-RoPE queries should be passed (default: no).
    fn wants_pre_rope_queries(&self, _layer: usize) -> bool {
        false
    }
    /// Called once per layer and chunk.
    fn observe(&mut self, observation: LayerObservation<'_, B>);
}
