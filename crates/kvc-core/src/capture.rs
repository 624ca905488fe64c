//! What presses read of the context prefill itself, recorded while it runs.
//!
//! kvpress's scorer presses compute their scores inside a forward hook of every attention layer
//! during the prefill, from the layer's input, keys, values and (eager) attention weights. kvc
//! prefills in chunks (512 tokens by default) and compresses afterwards, so whatever a scorer needs
//! beyond the cached keys and values is recorded per layer by a [`PrefillCapture`] (an
//! [`AttentionObserver`]) during the prefill: no second pass over the context.
//!
//! Eviction happens after the whole prefill, so the prefill's own hidden states never see a
//! compressed cache (as in kvpress, where layer `l` is compressed after its attention ran).

use burn::tensor::{backend::Backend, DType, Tensor};

use crate::{AttentionObserver, LayerObservation, QueryReduce};

/// What to record during a prefill. Merge the needs of several presses with [`CaptureSpec::merge`]
/// to serve them all from one prefill.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureSpec {
    /// Keep the last `window` queries (after RoPE) of every layer, across prefill chunks
    /// (SnapKV's observation window, TOVA's last query). 0 = none.
    pub window: usize,
    /// Sum, over all context queries, of the attention probabilities paid to every key
    /// (ObservedAttention / H2O), reduced inside the attention kernel.
    pub attention_sums: bool,
    /// Mean and covariance of the pre-RoPE queries of positions `>= skip`
    /// (ExpectedAttention); `None` = not recorded.
    pub query_stats: Option<usize>,
}

impl CaptureSpec {
    /// The union of two needs: the larger window, either flag, the smaller skip.
    pub fn merge(self, other: Self) -> Self {
        Self {
            window: self.window.max(other.window),
            attention_sums: self.attention_sums || other.attention_sums,
            query_stats: match (self.query_stats, other.query_stats) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Running mean and (population) covariance of pre-RoPE queries per query head, merged chunk by
/// chunk with Chan et al.'s parallel update (no catastrophic cancellation of `E[qq^T] - mu mu^T`).
#[derive(Clone, Debug)]
pub struct QueryStats<B: Backend> {
    /// Queries counted.
    pub count: usize,
    /// Mean, `[q_heads, head_dim]`.
    pub mean: Tensor<B, 2>,
    /// Sum of outer products of centered queries, `[q_heads, head_dim, head_dim]`; the
    /// covariance is `m2 / count`.
    pub m2: Tensor<B, 3>,
}

impl<B: Backend> QueryStats<B> {
    /// Covariance `[q_heads, head_dim, head_dim]` (divided by the count, as kvpress's
    /// `ExpectedAttentionPress.get_query_statistics`).
    pub fn covariance(&self) -> Tensor<B, 3> {
        self.m2.clone() / self.count.max(1) as f64
    }

    /// Statistics of `q` `[q_heads, n, head_dim]` merged into `self`.
    fn merged(prev: Option<Self>, q: Tensor<B, 3>) -> Self {
        let [h, n, d] = q.dims();
        let mean_b = q.clone().mean_dim(1); // [h, 1, d]
        let centered = q - mean_b.clone();
        let m2_b = centered.clone().swap_dims(1, 2).matmul(centered); // [h, d, d]
        let mean_b = mean_b.reshape([h, d]);
        match prev {
            None => Self { count: n, mean: mean_b, m2: m2_b },
            Some(a) => {
                let total = a.count + n;
                let delta = mean_b - a.mean.clone(); // [h, d]
                let outer = delta.clone().reshape([h, d, 1]).matmul(delta.clone().reshape([h, 1, d]));
                let w = (a.count as f64) * (n as f64) / total as f64;
                Self {
                    count: total,
                    mean: a.mean + delta * (n as f64 / total as f64),
                    m2: a.m2 + m2_b + outer * w,
                }
            }
        }
    }
}

/// What one layer showed during the prefill (batch 1).
#[derive(Clone, Debug)]
pub struct LayerCapture<B: Backend> {
    /// The last `min(window, T)` queries after RoPE, `[1, q_heads, w, head_dim]`.
    pub window_queries: Option<Tensor<B, 4>>,
    /// Attention summed over all context queries, per query head and key, `[q_heads, T]`.
    pub attention_sums: Option<Tensor<B, 2>>,
    /// Pre-RoPE query statistics of positions `>= skip`.
    pub query_stats: Option<QueryStats<B>>,
}

impl<B: Backend> Default for LayerCapture<B> {
    fn default() -> Self {
        Self { window_queries: None, attention_sums: None, query_stats: None }
    }
}

/// Records, per layer, what a [`CaptureSpec`] asks for while the context is prefilled. Use it as
/// the observer of the context's prefill (and only of that prefill).
#[derive(Clone, Debug)]
pub struct PrefillCapture<B: Backend> {
    spec: CaptureSpec,
    layers: Vec<LayerCapture<B>>,
    tokens: usize,
}

impl<B: Backend> PrefillCapture<B> {
    /// An empty capture for a decoder of `num_layers` layers.
    pub fn new(spec: CaptureSpec, num_layers: usize) -> Self {
        Self { spec, layers: (0..num_layers).map(|_| LayerCapture::default()).collect(), tokens: 0 }
    }

    /// What is recorded.
    pub fn spec(&self) -> CaptureSpec {
        self.spec
    }

    /// Context tokens observed (layer 0's count).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// What layer `layer` showed (empty for an out-of-range layer or an empty spec).
    pub fn layer(&self, layer: usize) -> Option<&LayerCapture<B>> {
        self.layers.get(layer)
    }
}

impl<B: Backend> AttentionObserver<B> for PrefillCapture<B> {
    fn reduce_attention(&self, _layer: usize) -> Option<QueryReduce> {
        self.spec.attention_sums.then_some(QueryReduce::Sum)
    }

    fn wants_pre_rope_queries(&self, _layer: usize) -> bool {
        self.spec.query_stats.is_some()
    }

    fn observe(&mut self, o: LayerObservation<'_, B>) {
        let Some(slot) = self.layers.get_mut(o.layer) else { return };
        let [_, hq, c, d] = o.queries.dims();
        if o.layer == 0 {
            self.tokens += c;
        }
        let w = self.spec.window;
        // recorded in f32 whatever the model's dtype: scores accumulate in f32
        let f32 = |t: &Tensor<B, 4>| t.clone().cast(DType::F32);
        if w > 0 {
            let q = match slot.window_queries.take() {
                None => f32(o.queries),
                Some(prev) => Tensor::cat(vec![prev, f32(o.queries)], 2),
            };
            let n = q.dims()[2];
            slot.window_queries = Some(if n > w { q.narrow(2, n - w, w) } else { q });
        }
        if self.spec.attention_sums {
            if let Some(sums) = o.attention_reduced {
                let len = sums.dims()[2];
                let sums = sums.clone().reshape([hq, len]);
                slot.attention_sums = Some(match slot.attention_sums.take() {
                    None => sums,
                    Some(prev) => {
                        // keys of earlier chunks get this chunk's attention added; the chunk's own
                        // keys start their sums here
                        let old = prev.dims()[1];
                        let head = sums.clone().narrow(1, 0, old) + prev;
                        if len > old {
                            Tensor::cat(vec![head, sums.narrow(1, old, len - old)], 1)
                        } else {
                            head
                        }
                    }
                });
            }
        }
        if let (Some(skip), Some(pre)) = (self.spec.query_stats, o.queries_pre_rope) {
            // positions first..first+c; those before `skip` are left out
            let start = skip.saturating_sub(o.first_position).min(c);
            if start < c {
                let q = f32(pre).narrow(2, start, c - start).reshape([hq, c - start, d]);
                slot.query_stats = Some(QueryStats::merged(slot.query_stats.take(), q));
            }
        }
    }
}
