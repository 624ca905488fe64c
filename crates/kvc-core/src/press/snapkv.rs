//! SnapKV (kvpress `presses/snapkv_press.py`; Li et al. 2024, arXiv 2404.14469): the attention the
//! last `window_size` context queries pay to every earlier token, averaged over the window,
//! smoothed by average pooling, averaged over the GQA group; the window itself is kept.

use burn::tensor::backend::Backend;

use super::scorer::{PrefillNeeds, group_mean, host, pad_rows, window_attention, window_queries, HeadScores, ScoreInput, Scorer};
use super::spec::{Layout, OptionDoc, Options, PressDoc, Registered};
use crate::capture::CaptureSpec;
use crate::CoreError;

/// SnapKV's scorer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapKv {
    /// Observation window: the last queries of the context (`window_size`, default 64).
    pub window_size: usize,
    /// Average-pooling kernel over positions (`kernel_size`, odd, default 5).
    pub kernel_size: usize,
}

impl Default for SnapKv {
    fn default() -> Self {
        Self { window_size: 64, kernel_size: 5 }
    }
}

/// `torch.nn.functional.avg_pool1d(x, k, stride=1, padding=k/2)` over each row of `rows`
/// (`count_include_pad`: always divided by `k`).
pub fn avg_pool(rows: &[f32], n: usize, k: usize) -> Vec<f32> {
    let half = k / 2;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows.chunks(n.max(1)) {
        for i in 0..n {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(n);
            let mut sum = 0f32;
            for x in &row[lo..hi] {
                sum += x;
            }
            out.push(sum / k as f32);
        }
    }
    out
}

impl Registered for SnapKv {
    const DOC: PressDoc = PressDoc {
        name: "snapkv",
        about: "attention of the last window_size context queries, averaged and pooled; the window is kept",
        source: "kvpress presses/snapkv_press.py; Li et al. 2024, arXiv 2404.14469",
        layout: Layout::Uniform,
        cost: "the window's queries kept during the prefill; one [heads, window, T] attention per layer",
        refeeds: 0,
        options: &[
            OptionDoc { name: "window_size", default: "64", help: "observation window: the last context queries (kept)" },
            OptionDoc { name: "kernel_size", default: "5", help: "average-pooling kernel over positions (odd)" },
        ],
    };

    fn from_options(o: &mut Options<'_>) -> Result<Self, CoreError> {
        Ok(Self { window_size: o.positive("window_size")?, kernel_size: o.odd("kernel_size")? })
    }
}

impl PrefillNeeds for SnapKv {
    fn needs(&self) -> CaptureSpec {
        CaptureSpec { window: self.window_size, ..Default::default() }
    }
}

impl<B: Backend> Scorer<B> for SnapKv {
    fn name(&self) -> &'static str {
        "snapkv"
    }

    fn score(&self, input: &ScoreInput<'_, B>) -> Result<HeadScores, CoreError> {
        let (t, hq) = (input.context_len, input.q_heads);
        // kvpress asserts T > window_size; kvc shrinks the window so that one token is scored
        let w = self.window_size.min(t - 1).max(1);
        let q = window_queries(input.capture, w, "snapkv")?;
        let n = t - w;
        let att = window_attention(q, input.keys, w).narrow(3, 0, n);
        let mean = host(att.mean_dim(2).reshape([hq, n]))?;
        let pooled = avg_pool(&mean, n, self.kernel_size);
        let per_kv = group_mean(&pooled, hq, input.kv_heads);
        Ok(HeadScores { scores: pad_rows(&per_kv, input.kv_heads, n, w), protected: n..t })
    }
}

#[cfg(test)]
mod tests {
    use super::avg_pool;

    #[test]
    fn pooling_matches_torch_avg_pool1d_with_zero_padding() {
        // torch: F.avg_pool1d(tensor([[1., 2., 3., 4.]]), 3, padding=1, stride=1) = [1, 2, 3, 7/3]
        let p = avg_pool(&[1.0, 2.0, 3.0, 4.0], 4, 3);
        let want = [1.0, 2.0, 3.0, 7.0 / 3.0];
        assert!(p.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{p:?}");
    }
}
