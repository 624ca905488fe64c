//! Presses: KV-cache compression methods applied between prefill and decode.
//!
//! A press gets the model (to run extra scoring passes through [`ForwardModel`]), the context
//! tokens, and the [`KvCache`] holding exactly the prefilled context; it leaves the cache
//! compressed and reports what it kept. Presses that score from the prefill itself can watch it
//! through [`Press::prefill_observer`]. One file per method; shared pieces live in
//! [`crate::select`] and [`KvCache`].

use burn::tensor::backend::Backend;

use crate::{AttentionObserver, CoreError, KvCache};

pub mod kvcompose;

pub use kvcompose::KvCompose;

/// How much of the context to keep: a compression ratio or a token budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Fraction of KV entries to remove, in `[0, 1)` (kvpress `compression_ratio`).
    Ratio(f64),
    /// Kept tokens per layer on average (per layer and head for per-head methods).
    Tokens(usize),
}

impl Budget {
    /// Checks the budget against a context of `context_len` tokens.
    ///
    /// # Errors
    /// [`CoreError::Ratio`] outside `[0, 1)`, [`CoreError::Budget`] for 0 or more tokens than the
    /// context, [`CoreError::ContextTooShort`] for a context of fewer than 2 tokens.
    pub fn validate(&self, context_len: usize) -> Result<(), CoreError> {
        if context_len < 2 {
            return Err(CoreError::ContextTooShort(context_len));
        }
        match *self {
            Budget::Ratio(r) if !(0.0..1.0).contains(&r) => Err(CoreError::Ratio(r)),
            Budget::Tokens(n) if n == 0 || n > context_len => Err(CoreError::Budget { budget: n, context: context_len }),
            _ => Ok(()),
        }
    }

    /// Entries kept out of `units` rows of `context_len` tokens (e.g. `units` = layers).
    /// For a ratio this is kvpress's `compute_n_kept(units * context_len, ratio)`:
    /// `max(1, floor(units * context_len * (1 - ratio)))`; for a token budget, `units * tokens`.
    pub fn kept(&self, units: usize, context_len: usize) -> usize {
        match *self {
            Budget::Ratio(r) => (((units * context_len) as f64 * (1.0 - r)) as usize).max(1),
            Budget::Tokens(n) => units * n.min(context_len),
        }
    }
}

/// What a press needs of a model: run tokens through it, appending to the cache, while an
/// observer watches every layer. Implemented by `kvc_models::Decoder`.
pub trait ForwardModel<B: Backend> {
    /// Decoder layers.
    fn num_layers(&self) -> usize;
    /// Query heads per layer.
    fn num_heads(&self) -> usize;
    /// KV heads per layer.
    fn num_kv_heads(&self) -> usize;
    /// Feeds `tokens` (batch 1) at positions `cache.next_position()..`, in chunks of at most
    /// `chunk` tokens, appending their keys/values to `cache`; no logits are computed.
    ///
    /// # Errors
    /// [`CoreError::Model`] for an error inside the model.
    fn feed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        observer: &mut dyn AttentionObserver<B>,
        chunk: usize,
    ) -> Result<(), CoreError>;
}

/// What a press did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PressReport {
    /// Context tokens.
    pub context_len: usize,
    /// Tokens kept per layer and KV head (`[layers][kv_heads]`; equal across heads for
    /// structured methods).
    pub kept: Vec<Vec<usize>>,
    /// KV cache bytes before compression (the context only).
    pub bytes_before: usize,
    /// KV cache bytes after compression (including any padding of per-head layouts).
    pub bytes_after: usize,
}

impl PressReport {
    /// Kept tokens per layer (the largest head's count, i.e. the layer's cache length).
    pub fn kept_per_layer(&self) -> Vec<usize> {
        self.kept.iter().map(|h| h.iter().copied().max().unwrap_or(0)).collect()
    }
}

/// A KV-cache compression method.
pub trait Press<B: Backend> {
    /// The press's name (as given to `--press`).
    fn name(&self) -> &'static str;

    /// An observer to run during the context prefill, for presses that score from it.
    fn prefill_observer(&mut self) -> Option<&mut dyn AttentionObserver<B>> {
        None
    }

    /// Compresses `cache`, which holds exactly the prefilled `context` (batch 1). Afterwards the
    /// cache's `next_position` is `context.len()`: decoding continues at the original position.
    ///
    /// # Errors
    /// Budget errors ([`Budget::validate`]), [`CoreError::Unsupported`], model errors.
    fn compress(&mut self, model: &dyn ForwardModel<B>, context: &[u32], cache: &mut KvCache<B>) -> Result<PressReport, CoreError>;
}

/// Names accepted by [`build`].
pub const PRESSES: &[&str] = &["kvcompose"];

/// Builds a press by name with a budget and `key=value` options.
///
/// # Errors
/// [`CoreError::UnknownPress`], [`CoreError::PressOption`].
pub fn build<B: Backend>(name: &str, budget: Budget, options: &[(String, String)]) -> Result<Box<dyn Press<B>>, CoreError> {
    match name {
        "kvcompose" => Ok(Box::new(kvcompose(budget, options)?)),
        other => Err(CoreError::UnknownPress { name: other.to_string(), known: PRESSES.join(", ") }),
    }
}

/// Checks a press name and its options without building it for a backend (e.g. before loading
/// a model).
///
/// # Errors
/// As [`build`].
pub fn check(name: &str, budget: Budget, options: &[(String, String)]) -> Result<(), CoreError> {
    match name {
        "kvcompose" => kvcompose(budget, options).map(|_| ()),
        other => Err(CoreError::UnknownPress { name: other.to_string(), known: PRESSES.join(", ") }),
    }
}

fn kvcompose(budget: Budget, options: &[(String, String)]) -> Result<KvCompose, CoreError> {
    let mut p = KvCompose::new(budget);
    for (k, v) in options {
        p.set_option(k, v)?;
    }
    Ok(p)
}

/// Parses a `key=value` option of press `press`.
///
/// # Errors
/// [`CoreError::PressOption`] without `=`.
pub fn parse_option(press: &str, s: &str) -> Result<(String, String), CoreError> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| CoreError::PressOption { press: press.into(), message: format!("option {s:?} is not key=value") })
}
