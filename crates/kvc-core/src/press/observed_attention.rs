//! ObservedAttention, H2O-style (kvpress `presses/observed_attention_press.py`; Zhang et al. 2023,
//! arXiv 2306.14048): the attention every token received from all context queries during the
//! prefill, averaged over the queries that could see it, then over the GQA group.

use burn::tensor::backend::Backend;

use super::scorer::{PrefillNeeds, group_mean, host, HeadScores, ScoreInput, Scorer};
use super::spec::{Layout, Options, PressDoc, Registered};
use crate::capture::CaptureSpec;
use crate::CoreError;

/// Scores `sum_i a[i, j] / (T - j)`, mean over the query heads of each KV head. The prefill takes
/// the explicit-softmax attention path to provide the probabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObservedAttention;

impl Registered for ObservedAttention {
    const DOC: PressDoc = PressDoc {
        name: "observed_attention",
        about: "attention received from all context queries during the prefill, per query that saw it (H2O)",
        source: "kvpress presses/observed_attention_press.py; Zhang et al. 2023 (H2O), arXiv 2306.14048",
        layout: Layout::Uniform,
        cost: "the prefill takes the explicit-softmax attention path (probabilities summed per chunk)",
        refeeds: 0,
        options: &[],
    };

    fn from_options(_: &mut Options<'_>) -> Result<Self, CoreError> {
        Ok(Self)
    }
}

impl PrefillNeeds for ObservedAttention {
    fn needs(&self) -> CaptureSpec {
        CaptureSpec { attention_sums: true, ..Default::default() }
    }
}

impl<B: Backend> Scorer<B> for ObservedAttention {
    fn name(&self) -> &'static str {
        "observed_attention"
    }

    fn score(&self, input: &ScoreInput<'_, B>) -> Result<HeadScores, CoreError> {
        let t = input.context_len;
        let sums = input
            .capture
            .attention_sums
            .clone()
            .filter(|s| s.dims()[1] == t)
            .ok_or_else(|| CoreError::Unsupported("observed_attention: the prefill did not sum attention".into()))?;
        let mut per_q = host(sums)?;
        for row in per_q.chunks_mut(t) {
            for (j, x) in row.iter_mut().enumerate() {
                *x /= (t - j) as f32;
            }
        }
        Ok(HeadScores { scores: group_mean(&per_q, input.q_heads, input.kv_heads), protected: 0..0 })
    }
}
