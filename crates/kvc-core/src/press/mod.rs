//! Presses: KV-cache compression methods applied between prefill and decode.
//!
//! A press gets the model (to run extra scoring passes through [`ForwardModel`]), the context
//! tokens, the [`KvCache`] holding exactly the prefilled context and what the prefill showed
//! ([`PrefillCapture`]); it leaves the cache compressed and reports what it kept.
//!
//! Most methods are a [`Scorer`] (one small file that writes a score per context token and KV
//! head, as kvpress's `ScorerPress`) run by the generic [`ScorerPress`], whose [`Allocation`]
//! decides how many tokens each layer and head keeps (uniform, PyramidKV's pyramid, AdaKV's
//! head-adaptive budgets). [`spec`] is the one registry of names, options and defaults.

use burn::tensor::backend::Backend;

use crate::capture::{CaptureSpec, PrefillCapture};
use crate::{AttentionObserver, CoreError, KvCache};

pub mod adakv;
pub mod expected_attention;
pub mod knorm;
pub mod kvcompose;
pub mod observed_attention;
pub mod pyramidkv;
pub mod random;
pub mod scorer;
pub mod snapkv;
pub mod spec;
pub mod streaming_llm;
pub mod tova;

pub use kvcompose::KvCompose;
pub use scorer::{Allocation, HeadScores, ScoreInput, Scorer, ScorerPress};
pub use spec::{PressDoc, PressSpec};

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
    /// RoPE inverse frequencies `[head_dim / 2]` (rotate-half convention, scaling applied), for
    /// presses that rotate query statistics to future positions (ExpectedAttention).
    fn rope_inv_freq(&self) -> Vec<f32>;
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

    /// Kept KV entries over all layers and heads.
    pub fn kept_entries(&self) -> usize {
        self.kept.iter().flatten().sum()
    }

    /// KV entries of the uncompressed context (`layers x kv_heads x context_len`).
    pub fn context_entries(&self) -> usize {
        self.kept.iter().map(Vec::len).sum::<usize>() * self.context_len
    }

    /// The report of a press that kept everything of `cache`.
    pub fn unchanged<B: Backend>(cache: &KvCache<B>, context_len: usize) -> Self {
        let kept = (0..cache.num_layers())
            .map(|l| cache.layer(l).ok().flatten().map_or_else(Vec::new, |kv| kv.tokens_per_head().swap_remove(0)))
            .collect();
        Self { context_len, kept, bytes_before: cache.bytes(), bytes_after: cache.bytes() }
    }
}

/// A KV-cache compression method.
///
/// The caller prefills the context with a [`PrefillCapture`] built from [`Press::needs`] as the
/// observer (or from the merged needs of several presses), then calls [`Press::compress`] on the
/// prefilled cache (or on a copy of it, to try several presses on one prefill).
pub trait Press<B: Backend> {
    /// The press's name (as given to `--press`).
    fn name(&self) -> &'static str;

    /// What the press reads of the context prefill (default: nothing beyond the cache).
    fn needs(&self) -> CaptureSpec {
        CaptureSpec::default()
    }

    /// The scores of the last [`Press::compress`] call, per layer `[kv_heads * T]` (row-major),
    /// for inspection and parity tests; `None` before the first call or for presses without
    /// per-token scores.
    fn last_scores(&self) -> Option<Vec<Vec<f32>>> {
        None
    }

    /// Compresses `cache`, which holds exactly the prefilled `context` (batch 1); `prefill` is what
    /// was recorded during that prefill. Afterwards the cache's `next_position` is
    /// `context.len()`: decoding continues at the original position.
    ///
    /// # Errors
    /// Budget errors ([`Budget::validate`]), [`CoreError::Shape`] when the cache does not hold
    /// exactly the context, [`CoreError::Unsupported`] (batch > 1, a capture lacking what the
    /// press needs), model errors.
    fn compress(
        &mut self,
        model: &dyn ForwardModel<B>,
        context: &[u32],
        cache: &mut KvCache<B>,
        prefill: &PrefillCapture<B>,
    ) -> Result<PressReport, CoreError>;
}

/// Checks that `cache` holds exactly the `context_len` prefilled tokens of a batch-1 context in
/// each of `layers` layers.
///
/// # Errors
/// [`CoreError::Shape`], [`CoreError::Unsupported`] for batch > 1.
pub fn check_prefilled<B: Backend>(cache: &KvCache<B>, layers: usize, context_len: usize) -> Result<(), CoreError> {
    let lens = cache.lens();
    if cache.next_position() != context_len || lens.len() != layers || lens.iter().any(|&l| l != context_len) {
        return Err(CoreError::Shape(format!(
            "the cache must hold exactly the {context_len} context tokens (holds {lens:?}, next position {})",
            cache.next_position()
        )));
    }
    if cache.layer(0)?.is_some_and(|kv| kv.keys.dims()[0] != 1) {
        return Err(CoreError::Unsupported("presses support batch 1".into()));
    }
    Ok(())
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
