//! Scorer presses (kvpress `presses/scorer_press.py`): a [`Scorer`] writes a score per context
//! token and KV head from what a layer showed during the prefill; [`ScorerPress`] keeps the best
//! tokens of every head, in original position order, through [`KvCache::gather_layer`].
//!
//! How many tokens each layer and head keeps is the press's [`Allocation`]: the same count
//! everywhere (kvpress `ScorerPress`), a pyramid over layers ([`super::pyramidkv`]) or
//! head-adaptive counts within a layer ([`super::adakv`]; per-head counts use the cache's padded
//! layout with masked padding, so memory is really freed).

use std::ops::Range;

use burn::tensor::activation::softmax;
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use super::{check_prefilled, Budget, ForwardModel, Press, PressReport};
use crate::capture::{CaptureSpec, LayerCapture, PrefillCapture};
use crate::select::top_k_protected;
use crate::{CoreError, KvCache};

/// What a scorer sees of one layer (batch 1).
pub struct ScoreInput<'a, B: Backend> {
    /// Layer index.
    pub layer: usize,
    /// Layers of the model.
    pub num_layers: usize,
    /// The context's keys after RoPE, `[1, kv_heads, T, head_dim]`.
    pub keys: &'a Tensor<B, 4>,
    /// The context's values, `[1, kv_heads, T, head_dim]`.
    pub values: &'a Tensor<B, 4>,
    /// What the layer showed during the prefill.
    pub capture: &'a LayerCapture<B>,
    /// Query heads.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Context tokens `T`.
    pub context_len: usize,
    /// Tokens each head of this layer will keep under a uniform allocation (kvpress
    /// `int(T * (1 - compression_ratio))`, unclamped); StreamingLLM's window depends on it.
    pub n_kept: usize,
    /// RoPE inverse frequencies `[head_dim / 2]` of the model.
    pub rope_inv_freq: &'a [f32],
}

/// A scorer's output for one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadScores {
    /// Scores `[kv_heads * T]` (row-major), higher = keep; the values kvpress hands to `topk`
    /// (protected positions carry kvpress's `max + 1` padding).
    pub scores: Vec<f32>,
    /// Positions every head keeps before any scored token (sinks, an observation window, the
    /// last token); empty when none.
    pub protected: Range<usize>,
}

/// What a scorer reads of the prefill beyond the cached keys and values (independent of the
/// backend, so that a registry can merge the needs of presses before any model is loaded).
pub trait PrefillNeeds {
    /// Default: nothing.
    fn needs(&self) -> CaptureSpec {
        CaptureSpec::default()
    }
}

/// A score per context token and KV head (kvpress `ScorerPress.score`). One small file per method.
pub trait Scorer<B: Backend>: PrefillNeeds + std::fmt::Debug {
    /// The scorer's name in the registry.
    fn name(&self) -> &'static str;

    /// Scores of one layer.
    ///
    /// # Errors
    /// [`CoreError::Unsupported`] when the capture lacks what [`Scorer::needs`] asked for;
    /// tensor read-back errors as [`CoreError::Model`].
    fn score(&self, input: &ScoreInput<'_, B>) -> Result<HeadScores, CoreError>;
}

/// How many tokens each layer and head keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Allocation {
    /// Every head of every layer keeps `Budget::kept(1, T)` tokens (kvpress `ScorerPress`).
    Uniform,
    /// PyramidKV's per-layer budgets (kvpress `PyramidKVPress.get_layer_budget`).
    Pyramid {
        /// The observation window the pyramid is built around (`window_size`).
        window_size: usize,
        /// Steepness (`beta`, >= 1).
        beta: f64,
    },
    /// AdaKV's head-adaptive budgets within a layer (kvpress `AdaKVPress`).
    AdaKv {
        /// Fraction of the uniform budget every head keeps at least (`alpha_safeguard`, [0, 1]).
        alpha_safeguard: f64,
    },
}

/// A [`Scorer`] run as a press: per layer, score, then keep the best tokens of every head under
/// the [`Allocation`], in original position order.
#[derive(Debug)]
pub struct ScorerPress<B: Backend> {
    /// The registry name of the press (e.g. `snapkv`, `pyramidkv`, `adakv`).
    pub name: &'static str,
    /// The scorer.
    pub scorer: Box<dyn Scorer<B>>,
    /// Kept tokens.
    pub budget: Budget,
    /// How the budget is spread over layers and heads.
    pub allocation: Allocation,
    last_scores: Option<Vec<HeadScores>>,
}

impl<B: Backend> ScorerPress<B> {
    /// A press named `name` from a scorer, a budget and an allocation.
    pub fn new(name: &'static str, scorer: Box<dyn Scorer<B>>, budget: Budget, allocation: Allocation) -> Self {
        Self { name, scorer, budget, allocation, last_scores: None }
    }

    /// The per-layer scores of the last [`Press::compress`] call (`[layers]`, each
    /// `[kv_heads * T]`), for inspection and parity tests.
    pub fn last_scores(&self) -> Option<&[HeadScores]> {
        self.last_scores.as_deref()
    }

    /// Tokens every head keeps under [`Allocation::Uniform`] (and AdaKV's average):
    /// `int(T * (1 - r))` as kvpress (at least 1), or the token budget.
    pub fn uniform_kept(&self, context_len: usize) -> usize {
        self.budget.kept(1, context_len)
    }

    /// Kept positions per head of one layer, each in ascending order.
    fn select(&self, s: &HeadScores, layer: usize, num_layers: usize, kv_heads: usize, t: usize) -> Vec<Vec<u32>> {
        let rows = || s.scores.chunks(t);
        match self.allocation {
            Allocation::Uniform => {
                let k = self.uniform_kept(t);
                rows().map(|row| top_k_protected(row, &s.protected, k)).collect()
            }
            Allocation::Pyramid { window_size, beta } => {
                let k = super::pyramidkv::layer_budget(layer, num_layers, t, self.ratio(t), window_size, beta);
                rows().map(|row| top_k_protected(row, &s.protected, k)).collect()
            }
            Allocation::AdaKv { alpha_safeguard } => {
                super::adakv::select(&s.scores, &s.protected, kv_heads, t, self.uniform_kept(t), alpha_safeguard)
            }
        }
    }

    /// The budget as a compression ratio of a `T`-token context.
    fn ratio(&self, t: usize) -> f64 {
        match self.budget {
            Budget::Ratio(r) => r,
            Budget::Tokens(n) => 1.0 - n as f64 / t as f64,
        }
    }
}

impl<B: Backend> Press<B> for ScorerPress<B> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn needs(&self) -> CaptureSpec {
        self.scorer.needs()
    }

    fn last_scores(&self) -> Option<Vec<Vec<f32>>> {
        self.last_scores.as_ref().map(|s| s.iter().map(|h| h.scores.clone()).collect())
    }

    fn compress(
        &mut self,
        model: &dyn ForwardModel<B>,
        context: &[u32],
        cache: &mut KvCache<B>,
        prefill: &PrefillCapture<B>,
    ) -> Result<PressReport, CoreError> {
        let t = context.len();
        self.budget.validate(t)?;
        let layers = model.num_layers();
        check_prefilled(cache, layers, t)?;
        if self.budget == Budget::Ratio(0.0) {
            // kvpress returns the cache untouched at ratio 0
            return Ok(PressReport::unchanged(cache, t));
        }
        let needs = self.scorer.needs();
        let captured = prefill.spec();
        if captured.merge(needs) != captured || (!needs.is_empty() && prefill.tokens() != t) {
            return Err(CoreError::Unsupported(format!(
                "press {}: the prefill captured {captured:?} of {} tokens, the scorer needs {needs:?} of {t}",
                self.name,
                prefill.tokens()
            )));
        }
        let bytes_before = cache.bytes();
        let (q_heads, kv_heads) = (model.num_heads(), model.num_kv_heads());
        let inv_freq = model.rope_inv_freq();
        let n_kept = match self.budget {
            Budget::Ratio(r) => (t as f64 * (1.0 - r)) as usize,
            Budget::Tokens(n) => n,
        };
        let mut all_scores = Vec::with_capacity(layers);
        let mut kept = Vec::with_capacity(layers);
        for layer in 0..layers {
            let kv = cache.layer(layer)?.ok_or(CoreError::EmptyLayer(layer))?;
            let empty = LayerCapture::default();
            // scores from f32 keys and values whatever the cache's dtype (a no-op for f32)
            let (keys, values) = (kv.keys.clone().cast(DType::F32), kv.values.clone().cast(DType::F32));
            let input = ScoreInput {
                layer,
                num_layers: layers,
                keys: &keys,
                values: &values,
                capture: prefill.layer(layer).unwrap_or(&empty),
                q_heads,
                kv_heads,
                context_len: t,
                n_kept,
                rope_inv_freq: &inv_freq,
            };
            let s = self.scorer.score(&input)?;
            if s.scores.len() != kv_heads * t || s.protected.end > t {
                return Err(CoreError::Shape(format!(
                    "scorer {} returned {} scores (protected {:?}) for {kv_heads} heads x {t} tokens",
                    self.scorer.name(),
                    s.scores.len(),
                    s.protected
                )));
            }
            let idx = self.select(&s, layer, layers, kv_heads, t);
            kept.push(idx.iter().map(Vec::len).collect::<Vec<_>>());
            if idx.iter().any(|row| row.len() != t) {
                cache.gather_layer(layer, std::slice::from_ref(&idx))?;
            }
            all_scores.push(s);
        }
        self.last_scores = Some(all_scores);
        Ok(PressReport { context_len: t, kept, bytes_before, bytes_after: cache.bytes() })
    }
}

/// Reads a small tensor back to the host as f32.
///
/// # Errors
/// [`CoreError::Model`] when the backend cannot read it.
pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, CoreError> {
    t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| CoreError::Model(format!("reading scores: {e:?}")))
}

/// Attention of the last `w` context queries over all `T` context keys (kvpress
/// `SnapKVPress.compute_window_attention`): `softmax(q K^T / sqrt(d))` with the causal mask
/// (window query `i`, at position `T - w + i`, sees keys `0..=T - w + i`); query head `h` reads KV
/// head `h / (q_heads / kv_heads)`.
///
/// `queries`: `[1, q_heads, >= w, d]` (the last `w` are used), `keys`: `[1, kv_heads, T, d]`.
/// Returns `[1, q_heads, w, T]`.
pub fn window_attention<B: Backend>(queries: &Tensor<B, 4>, keys: &Tensor<B, 4>, w: usize) -> Tensor<B, 4> {
    let [_, hq, n, d] = queries.dims();
    let [_, hkv, t, _] = keys.dims();
    let g = hq / hkv;
    let q = queries.clone().narrow(2, n - w, w);
    // the scale is applied to q (a power of two for head_dim 64: same bits as scaling scores)
    let scores = (q * (d as f64).powf(-0.5)).reshape([1, hkv, g * w, d]).matmul(keys.clone().swap_dims(2, 3));
    let mut mask = vec![0f32; w * t];
    for i in 0..w {
        mask[i * t + (t - w + i + 1)..(i + 1) * t].fill(f32::NEG_INFINITY);
    }
    let mask: Tensor<B, 4> = Tensor::from_data(TensorData::new(mask, [1, 1, w, t]), &keys.device());
    let scores = scores.reshape([1, hkv * g, w, t]) + mask;
    softmax(scores, 3)
}

/// Mean over the query heads of each GQA group: `[q_heads * n]` -> `[kv_heads * n]` (query head
/// `h` belongs to KV head `h / g`; kvpress `scores.view(b, kv_heads, g, n).mean(2)`).
pub fn group_mean(per_query_head: &[f32], q_heads: usize, kv_heads: usize) -> Vec<f32> {
    let n = per_query_head.len() / q_heads.max(1);
    let g = q_heads / kv_heads.max(1);
    let mut out = Vec::with_capacity(kv_heads * n);
    for kh in 0..kv_heads {
        let rows = (kh * g..(kh + 1) * g).map(|h| &per_query_head[h * n..(h + 1) * n]);
        out.extend(crate::select::Agg::Mean.reduce(rows));
    }
    out
}

/// Inserts `width` positions scored `max + 1` (kvpress's protection padding: the maximum over
/// every head) into each row of `rows` (`[heads * n]`) at offset `at` (0 = front, `n` = back).
pub fn pad_rows(rows: &[f32], heads: usize, at: usize, width: usize) -> Vec<f32> {
    let n = rows.len() / heads.max(1);
    let pad = rows.iter().copied().fold(f32::NEG_INFINITY, f32::max) + 1.0;
    let pad = if pad.is_finite() { pad } else { f32::MAX };
    let mut out = Vec::with_capacity(heads * (n + width));
    for row in rows.chunks(n.max(1)).take(heads) {
        out.extend_from_slice(&row[..at]);
        out.extend(std::iter::repeat_n(pad, width));
        out.extend_from_slice(&row[at..]);
    }
    if n == 0 {
        out = vec![pad; heads * width];
    }
    out
}

/// The capture's window queries, or an error naming the press.
///
/// # Errors
/// [`CoreError::Unsupported`] when the prefill kept fewer than `w` window queries.
pub fn window_queries<'a, B: Backend>(c: &'a LayerCapture<B>, w: usize, press: &str) -> Result<&'a Tensor<B, 4>, CoreError> {
    c.window_queries
        .as_ref()
        .filter(|q| q.dims()[2] >= w)
        .ok_or_else(|| CoreError::Unsupported(format!("{press}: the prefill did not keep the last {w} queries")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_mean_maps_query_head_h_to_kv_head_h_over_g() {
        // 4 query heads, 2 KV heads (g = 2), 1 token: heads 0,1 -> kv 0; heads 2,3 -> kv 1
        assert_eq!(group_mean(&[1.0, 3.0, 10.0, 30.0], 4, 2), vec![2.0, 20.0]);
    }

    #[test]
    fn padding_uses_the_global_max_plus_one() {
        assert_eq!(pad_rows(&[1.0, 2.0, 5.0, 0.0], 2, 2, 1), vec![1.0, 2.0, 6.0, 5.0, 0.0, 6.0]);
        assert_eq!(pad_rows(&[1.0, 2.0], 1, 0, 2), vec![3.0, 3.0, 1.0, 2.0]);
    }
}
