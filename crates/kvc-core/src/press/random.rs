//! Random scores (kvpress `presses/random_press.py`): the floor every method must beat.

use burn::tensor::backend::Backend;
use rand::{Rng, SeedableRng};

use super::scorer::{PrefillNeeds, HeadScores, ScoreInput, Scorer};
use super::spec::{Layout, OptionDoc, Options, PressDoc, Registered};
use crate::CoreError;

/// Uniform `[0, 1)` scores from a generator seeded with `seed` and the layer index: the same seed
/// gives the same kept sets (kvpress uses torch's generator, so the sets differ from kvpress's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Random {
    /// Seed (`seed`, default 0).
    pub seed: u64,
}

impl Registered for Random {
    const DOC: PressDoc = PressDoc {
        name: "random",
        about: "uniform random scores (the floor every method must beat)",
        source: "kvpress presses/random_press.py",
        layout: Layout::Uniform,
        cost: "none",
        refeeds: 0,
        options: &[OptionDoc { name: "seed", default: "0", help: "generator seed: the same seed keeps the same tokens" }],
    };

    fn from_options(o: &mut Options<'_>) -> Result<Self, CoreError> {
        Ok(Self { seed: o.usize("seed")? as u64 })
    }
}

impl PrefillNeeds for Random {}

impl<B: Backend> Scorer<B> for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn score(&self, input: &ScoreInput<'_, B>) -> Result<HeadScores, CoreError> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ (input.layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let scores = (0..input.kv_heads * input.context_len).map(|_| rng.random::<f32>()).collect();
        Ok(HeadScores { scores, protected: 0..0 })
    }
}
