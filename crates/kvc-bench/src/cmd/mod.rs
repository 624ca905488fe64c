//! The subcommands of `kvc-bench`, one module each (its arguments and its body), and what several
//! of them share: the backend selection (`kvc`'s `backend.rs`), the CPU backends' defaults, the
//! prompt cut to a token count, the peak RSS and a greedy decode after a cache.

use anyhow::{bail, Result};
use kvc_core::KvcBackend;
use kvc_models::{generate, GenerationConfig};

pub mod backends;
pub mod batch;
pub mod compress;
pub mod eval;
pub mod needle;
pub mod products;
pub mod scaling;
pub mod speed;

#[path = "../../../kvc-cli/src/backend.rs"]
pub mod backend;

/// The CPU backends compiled in, flex first: the default of `speed` and `backends` (a build
/// without one of them must not default to it).
const CPU_BACKENDS: &[&str] = &[
    #[cfg(feature = "flex")]
    "flex",
    #[cfg(feature = "ndarray")]
    "ndarray",
];

pub(crate) use kvc_bench::batch::peak_rss;

/// The first `n` tokens of `text` (repeated as often as it takes).
///
/// # Errors
/// Tokenizing; a text without tokens.
fn context_ids(tok: &kvc_models::Tokenizer, text: &str, n: usize) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, false)?;
    if ids.is_empty() {
        bail!("the text has no tokens");
    }
    while ids.len() < n {
        ids.extend_from_within(..);
    }
    ids.truncate(n);
    Ok(ids)
}

/// Feeds `token` on `cache` (as a question would be) and decodes `n` tokens greedily, EOS
/// ignored: the first logits on the host and the decode run.
fn decode_after<B: KvcBackend>(
    m: &kvc_models::LoadedModel<B>,
    mut cache: kvc_core::KvCache<B>,
    token: &[u32],
    n: usize,
    device: &B::Device,
) -> Result<(Vec<f32>, generate::Decoded)> {
    let logits = m.model.forward(generate::token_tensor::<B>(token, device), &mut cache, None, kvc_models::Logits::Last)?;
    let first = logits.clone().into_data().convert::<f32>().to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let cfg = GenerationConfig { max_new_tokens: n, stop_at_eos: false, ..Default::default() };
    Ok((first, generate::decode(&m.model, &mut cache, logits, &cfg, &[], |_| true, device)?))
}
