//! TOVA (kvpress `presses/tova_press.py`; Oren et al. 2024, arXiv 2401.06104): the attention the
//! last context token pays to every earlier token, averaged over all query heads (the same score
//! for every KV head); the last token itself is kept.

use burn::tensor::backend::Backend;

use super::scorer::{PrefillNeeds, host, pad_rows, window_attention, window_queries, HeadScores, ScoreInput, Scorer};
use super::spec::{Layout, Options, PressDoc, Registered};
use crate::capture::CaptureSpec;
use crate::CoreError;

/// TOVA's scorer; no options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tova;

impl Registered for Tova {
    const DOC: PressDoc = PressDoc {
        name: "tova",
        about: "attention of the last context token, averaged over all heads; the last token is kept",
        source: "kvpress presses/tova_press.py; Oren et al. 2024, arXiv 2401.06104",
        layout: Layout::Uniform,
        cost: "the last query kept during the prefill; one [heads, 1, T] attention per layer",
        refeeds: 0,
        options: &[],
    };

    fn from_options(_: &mut Options<'_>) -> Result<Self, CoreError> {
        Ok(Self)
    }
}

impl PrefillNeeds for Tova {
    fn needs(&self) -> CaptureSpec {
        CaptureSpec { window: 1, ..Default::default() }
    }
}

impl<B: Backend> Scorer<B> for Tova {
    fn name(&self) -> &'static str {
        "tova"
    }

    fn score(&self, input: &ScoreInput<'_, B>) -> Result<HeadScores, CoreError> {
        let t = input.context_len;
        let q = window_queries(input.capture, 1, "tova")?;
        // [1, hq, 1, T] -> keys before the last one, mean over all query heads
        let att = window_attention(q, input.keys, 1).narrow(3, 0, t - 1);
        let mean = host(att.mean_dim(1).reshape([t - 1]))?;
        let rows = mean.repeat(input.kv_heads);
        Ok(HeadScores { scores: pad_rows(&rows, input.kv_heads, t - 1, 1), protected: t - 1..t })
    }
}
