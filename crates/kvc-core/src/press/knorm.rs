//! Knorm (kvpress `presses/knorm_press.py`; Devoto et al. 2024, arXiv 2406.11430): keys with a
//! small L2 norm attract attention, so the score is `-||k||` per KV head and token.

use burn::tensor::{backend::Backend, DType};

use super::scorer::{PrefillNeeds, host, HeadScores, ScoreInput, Scorer};
use super::spec::{Layout, Options, PressDoc, Registered};
use crate::CoreError;

/// Scores `-||k||_2`, computed in f32 whatever the cache's dtype (half-precision norms would tie
/// keys that f32 tells apart).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Knorm;

impl Registered for Knorm {
    const DOC: PressDoc = PressDoc {
        name: "knorm",
        about: "-||k||: keys with a small norm attract attention",
        source: "kvpress presses/knorm_press.py; Devoto et al. 2024, arXiv 2406.11430",
        layout: Layout::Uniform,
        cost: "one pass over the keys",
        refeeds: 0,
        options: &[],
    };

    fn from_options(_: &mut Options<'_>) -> Result<Self, CoreError> {
        Ok(Self)
    }
}

impl PrefillNeeds for Knorm {}

impl<B: Backend> Scorer<B> for Knorm {
    fn name(&self) -> &'static str {
        "knorm"
    }

    fn score(&self, input: &ScoreInput<'_, B>) -> Result<HeadScores, CoreError> {
        let [_, h, t, _] = input.keys.dims();
        let keys = input.keys.clone().cast(DType::F32);
        let norms = keys.square().sum_dim(3).sqrt().reshape([h, t]);
        Ok(HeadScores { scores: host(norms.neg())?, protected: 0..0 })
    }
}
