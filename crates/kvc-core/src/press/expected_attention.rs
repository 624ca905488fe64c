//! ExpectedAttention (kvpress `presses/expected_attention_press.py`; Devoto et al. 2025,
//! arXiv 2510.00636): the attention that *future* queries are expected to pay to each key, from the
//! statistics of the context's queries.
//!
//! 1. Mean `mu` and covariance `S` (population) of the pre-RoPE queries of positions `>= n_sink`,
//!    per query head (recorded during the prefill, [`crate::capture::QueryStats`]).
//! 2. `R` = the RoPE rotation averaged over the next `n_future_positions` positions `T..T+n`
//!    (rotate-half convention: `R_p = cos_p I + sin_p P`, `P = [[0, -I], [I, 0]]`);
//!    `mu' = R mu`, `S' = R S R^T`.
//! 3. Per key `k` (after RoPE, sinks excluded): `z = k.mu' / sqrt(d) + k^T S' k / (2 d)`, softmax
//!    over keys, mean over the GQA group, times `||v||` (plus `epsilon`) when `use_vnorm`.
//! 4. The `n_sink` first tokens are kept (padded with `max + 1`).

use burn::tensor::activation::softmax;
use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::scorer::{PrefillNeeds, group_mean, host, pad_rows, HeadScores, ScoreInput, Scorer};
use super::spec::{Layout, OptionDoc, Options, PressDoc, Registered};
use crate::capture::CaptureSpec;
use crate::CoreError;

/// ExpectedAttention's scorer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpectedAttention {
    /// Future positions the RoPE rotation is averaged over (`n_future_positions`, default 512).
    pub n_future_positions: usize,
    /// First tokens kept and left out of the query statistics (`n_sink`, default 4).
    pub n_sink: usize,
    /// Include the covariance term (`use_covariance`, default true).
    pub use_covariance: bool,
    /// Multiply by the value norm (`use_vnorm`, default true).
    pub use_vnorm: bool,
    /// Added to the scores before the value-norm rescaling (`epsilon`, default 0).
    pub epsilon: f64,
}

impl Default for ExpectedAttention {
    fn default() -> Self {
        Self { n_future_positions: 512, n_sink: 4, use_covariance: true, use_vnorm: true, epsilon: 0.0 }
    }
}

/// The averaged rotation `R` `[d, d]` (row-major) over positions `first..first+n`.
fn averaged_rotation(inv_freq: &[f32], first: usize, n: usize) -> Vec<f32> {
    let half = inv_freq.len();
    let d = 2 * half;
    let (mut cos, mut sin) = (vec![0f64; half], vec![0f64; half]);
    for p in first..first + n {
        for (i, &f) in inv_freq.iter().enumerate() {
            let a = ((p as f32) * f) as f64;
            cos[i] += a.cos() as f32 as f64;
            sin[i] += a.sin() as f32 as f64;
        }
    }
    let mut r = vec![0f32; d * d];
    for i in 0..d {
        let (c, s) = ((cos[i % half] / n as f64) as f32, (sin[i % half] / n as f64) as f32);
        r[i * d + i] = c;
        // P[i][j]: +1 at (half + j, j), -1 at (j, half + j)
        if i < half {
            r[i * d + i + half] = -s;
        } else {
            r[i * d + i - half] = s;
        }
    }
    r
}

impl Registered for ExpectedAttention {
    const DOC: PressDoc = PressDoc {
        name: "expected_attention",
        about: "attention expected from future queries (query mean/covariance, RoPE averaged over future positions), times ||v||",
        source: "kvpress presses/expected_attention_press.py; Devoto et al. 2025, arXiv 2510.00636",
        layout: Layout::Uniform,
        cost: "query mean and covariance accumulated during the prefill; a [heads, T, d] x [d, d] product per layer",
        refeeds: 0,
        options: &[
            OptionDoc { name: "n_future_positions", default: "512", help: "future positions the RoPE rotation is averaged over" },
            OptionDoc { name: "n_sink", default: "4", help: "first tokens kept and left out of the statistics" },
            OptionDoc { name: "use_covariance", default: "true", help: "include the covariance term" },
            OptionDoc { name: "use_vnorm", default: "true", help: "multiply by the value norm" },
            OptionDoc { name: "epsilon", default: "0", help: "added to the scores before the value-norm rescaling" },
        ],
    };

    fn from_options(o: &mut Options<'_>) -> Result<Self, CoreError> {
        Ok(Self {
            n_future_positions: o.positive("n_future_positions")?,
            n_sink: o.usize("n_sink")?,
            use_covariance: o.bool("use_covariance")?,
            use_vnorm: o.bool("use_vnorm")?,
            epsilon: o.f64("epsilon")?,
        })
    }
}

impl PrefillNeeds for ExpectedAttention {
    fn needs(&self) -> CaptureSpec {
        CaptureSpec { query_stats: Some(self.n_sink), ..Default::default() }
    }
}

impl<B: Backend> Scorer<B> for ExpectedAttention {
    fn name(&self) -> &'static str {
        "expected_attention"
    }

    fn score(&self, input: &ScoreInput<'_, B>) -> Result<HeadScores, CoreError> {
        let (t, hq, hkv) = (input.context_len, input.q_heads, input.kv_heads);
        // kvpress asserts T > n_sink; on shorter contexts every token is a sink
        let sink = self.n_sink.min(t);
        if sink == t {
            return Ok(HeadScores { scores: vec![1.0; hkv * t], protected: 0..t });
        }
        let stats = input
            .capture
            .query_stats
            .as_ref()
            .ok_or_else(|| CoreError::Unsupported("expected_attention: the prefill did not record query statistics".into()))?;
        let [_, _, _, d] = input.keys.dims();
        let device = input.keys.device();
        let r = averaged_rotation(input.rope_inv_freq, t, self.n_future_positions);
        let r: Tensor<B, 2> = Tensor::from_data(TensorData::new(r, [d, d]), &device);
        let n = t - sink;
        let g = hq / hkv;
        // keys of every query head's KV head, sinks left out: [hq, n, d]
        let keys = input.keys.clone().narrow(2, sink, n).reshape([hkv, 1, n, d]).expand([hkv, g, n, d]).reshape([hq, n, d]);
        let mu = stats.mean.clone().matmul(r.clone().transpose()); // [hq, d] = (R mu)^T
        let mut z = keys.clone().matmul(mu.reshape([hq, d, 1])).reshape([hq, n]) / (d as f64).sqrt();
        if self.use_covariance {
            let r3 = r.clone().reshape([1, d, d]);
            let cov = r3.clone().matmul(stats.covariance()).matmul(r3.transpose()); // [hq, d, d]
            let quad = (keys.clone().matmul(cov) * keys).sum_dim(2).reshape([hq, n]);
            z = z + quad / (d as f64) / 2.0;
        }
        let probs = host(softmax(z, 1))?;
        let mut per_kv = group_mean(&probs, hq, hkv);
        if self.use_vnorm {
            let norms = host(input.values.clone().narrow(2, sink, n).square().sum_dim(3).sqrt().reshape([hkv, n]))?;
            let eps = self.epsilon as f32;
            per_kv.iter_mut().zip(norms).for_each(|(s, v)| *s = (*s + eps) * v);
        }
        Ok(HeadScores { scores: pad_rows(&per_kv, hkv, 0, sink), protected: 0..sink })
    }
}

#[cfg(test)]
mod tests {
    use super::averaged_rotation;

    #[test]
    fn rotation_of_one_position_is_rope() {
        // d = 2, inv_freq [1], position 1: R = [[cos 1, -sin 1], [sin 1, cos 1]]
        let r = averaged_rotation(&[1.0], 1, 1);
        let (c, s) = (1f64.cos() as f32, 1f64.sin() as f32);
        assert_eq!(r, vec![c, -s, s, c]);
    }
}
