//! # kvc-core
//!
//! The pieces of KV-cache compression that do not depend on a particular model:
//!
//! - [`KvCache`]: per-layer keys and values `[batch, kv_heads, len_l, head_dim]` (keys stored after
//!   RoPE), the original position of every kept token, an optional per-slot validity mask (for
//!   per-head budgets), and byte accounting. Layers may have different lengths (KVCompose leaves
//!   them so).
//! - [`PrefillCapture`]: what presses read of the context prefill (window queries, attention
//!   sums, query statistics), recorded by an observer while the prefill runs.
//! - [`AttentionObserver`]: the hook through which a decoder shows each layer's queries, keys,
//!   values and (on request) attention probabilities, without knowing what looks at them.
//! - [`press`]: compression methods (presses) applied between prefill and decode, and the pieces
//!   they share ([`select`]: score aggregation, top-k, global budget allocation).
//!
//! - [`KvcBackend`] ([`kernels`]): the attention kernel a decoder calls, with a generic default and
//!   a multi-threaded host kernel for the CPU backends.
//!
//! Everything is generic over `B: burn::tensor::backend::Backend`; backends are named only in
//! `kernels`' feature-gated `KvcBackend` impls.

pub mod cache;
pub mod capture;
pub mod error;
pub mod kernels;
pub mod observer;
pub mod press;
pub mod select;

pub use cache::{KvCache, LayerKv};
pub use capture::{CaptureSpec, PrefillCapture};
pub use error::CoreError;
pub use kernels::{KvcBackend, QueryReduce};
pub use observer::{AttentionObserver, LayerObservation};
pub use press::{Budget, ForwardModel, Press, PressReport, PressSpec};
