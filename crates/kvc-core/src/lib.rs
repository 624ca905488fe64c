//! # kvc-core
//!
//! A burn app compressing a document's KV cache with a press and asking two questions on it,
//! through kvc-models' pipeline (`examples/compress.rs`; compiled as kvc-models' opening doc
//! example, which kvc-core cannot depend on):
//!
//! ```text
//! use kvc_core::{Budget, PressSpec};
//! use kvc_models::pipeline::{Pipeline, Request};
//! let loaded = kvc_models::load::<B>(&kvc_models::default_model::ensure_default_model()?, device)?;
//! let request = Request {
//!     context: std::fs::read_to_string("assets/pride_and_prejudice_ch1-2.txt")?,
//!     questions: vec!["Which estate has been let?".into(), "Who has taken it?".into()],
//!     press: Some(PressSpec::new("kvcompose", Budget::Ratio(0.5))), // any press of `kvc presses`
//!     ..Default::default()
//! };
//! let response = Pipeline::new(&loaded).run(&request, &mut |_event| {})?;
//! for answer in &response.answers {
//!     println!("{}", answer.text); // both questions answered on one compressed cache
//! }
//! println!("KV cache {} -> {} bytes", response.kv_bytes.0, response.kv_bytes.1);
//! ```
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
//! - [`kvquant`]: int8 / int4 (KIVI) or f16 / bf16 storage of a cache's older slots, applied after a press
//!   ([`KvCache::quantize`]), read where it lies by decode attention.
//! - [`saved`]: a (compressed) cache written to a safetensors file and read back in another
//!   process ([`KvCache::save`], [`KvCache::load`], [`CacheHeader`]).
//! - [`KvcBackend`] ([`kernels`]): the attention kernel a decoder calls, with a generic default and
//!   a multi-threaded host kernel for the CPU backends.
//!
//! Everything is generic over `B: burn::tensor::backend::Backend`; backends are named only in
//! `kernels`' feature-gated `KvcBackend` impls.

pub mod cache;
pub mod capture;
pub mod error;
pub mod kernels;
pub mod kvquant;
pub mod observer;
pub mod press;
pub mod saved;
pub mod select;

pub use cache::{KvCache, LayerKv};
pub use capture::{CaptureSpec, PrefillCapture};
pub use error::CoreError;
pub use kernels::quant::{Activations, QuantMatrix};
pub use kernels::{KvcBackend, QueryReduce};
pub use kvquant::{KvBits, KvQuant};
pub use observer::{AttentionObserver, LayerObservation};
pub use press::{Budget, ForwardModel, Press, PressReport, PressSpec};
pub use saved::{CacheFileError, CacheHeader};
