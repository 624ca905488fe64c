//! StreamingLLM (kvpress `presses/streaming_llm_press.py`; Xiao et al. 2023, arXiv 2309.17453):
//! keep the first `n_sink` tokens (attention sinks) and the most recent ones.

use burn::tensor::backend::Backend;

use super::scorer::{PrefillNeeds, HeadScores, ScoreInput, Scorer};
use super::spec::{Layout, OptionDoc, Options, PressDoc, Registered};
use crate::CoreError;

/// Scores 1 everywhere except 0 on the `T - n_kept` positions after the sinks (kvpress: ones with
/// zeros at `[n_sink, n_sink + n_pruned)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamingLlm {
    /// Initial tokens always kept (`n_sink`, default 4).
    pub n_sink: usize,
}

impl Default for StreamingLlm {
    fn default() -> Self {
        Self { n_sink: 4 }
    }
}

impl Registered for StreamingLlm {
    const DOC: PressDoc = PressDoc {
        name: "streaming_llm",
        about: "the first n_sink tokens (attention sinks) and the most recent ones",
        source: "kvpress presses/streaming_llm_press.py; Xiao et al. 2023, arXiv 2309.17453",
        layout: Layout::Uniform,
        cost: "none",
        refeeds: 0,
        options: &[OptionDoc { name: "n_sink", default: "4", help: "initial tokens always kept" }],
    };

    fn from_options(o: &mut Options<'_>) -> Result<Self, CoreError> {
        Ok(Self { n_sink: o.usize("n_sink")? })
    }
}

impl PrefillNeeds for StreamingLlm {}

impl<B: Backend> Scorer<B> for StreamingLlm {
    fn name(&self) -> &'static str {
        "streaming_llm"
    }

    fn score(&self, input: &ScoreInput<'_, B>) -> Result<HeadScores, CoreError> {
        let (t, h) = (input.context_len, input.kv_heads);
        // kvpress asserts T > n_sink; on shorter contexts every token is a sink
        let sink = self.n_sink.min(t);
        let pruned = t - input.n_kept.min(t);
        let mut row = vec![1f32; t];
        row[sink..(sink + pruned).min(t)].fill(0.0);
        Ok(HeadScores { scores: row.repeat(h), protected: 0..sink })
    }
}
