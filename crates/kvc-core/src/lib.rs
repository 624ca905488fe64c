//! # kvc-core
//!
//! The pieces of KV-cache compression that do not depend on a particular model:
//!
//! - [`KvCache`]: per-layer keys and values `[batch, kv_heads, len_l, head_dim]` (keys stored after
//!   RoPE), the original position of every kept token, and byte accounting. Layers may have
//!   different lengths (KVCompose leaves them so).
//! - [`AttentionObserver`]: the hook through which a decoder shows each layer's queries, keys,
//!   values and (on request) attention probabilities, without knowing what looks at them. Presses
//!   (compression methods) are built on it.
//!
//! Everything is generic over `B: burn::tensor::backend::Backend`; no backend is named here.

pub mod cache;
pub mod error;
pub mod observer;

pub use cache::{KvCache, LayerKv};
pub use error::CoreError;
pub use observer::{AttentionObserver, LayerObservation};
