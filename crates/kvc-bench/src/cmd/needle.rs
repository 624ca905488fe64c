//! `kvc-bench needle`: writes needle-in-a-haystack rows for `eval --data` (Paul Graham essays,
//! one needle at each depth of each context length, the lengths measured with the model's
//! tokenizer).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use kvc_bench::eval;

/// The arguments of `kvc-bench needle`.
#[derive(clap::Args)]
pub struct NeedleArgs {
    /// Model whose tokenizer measures the lengths (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Context lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192")]
    lengths: Vec<usize>,
    /// Needle depths in percent of the context.
    #[arg(long, value_delimiter = ',', default_value = "0,10,20,30,40,50,60,70,80,90,100")]
    depths: Vec<u32>,
    /// Seed of the needles' keys and values.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output JSONL file.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `kvc-bench needle`.
///
/// # Errors
/// A depth over 100; resolving the model, reading its tokenizer, fetching the essays, writing --out.
pub fn run(args: NeedleArgs) -> Result<()> {
    let NeedleArgs { model, lengths, depths, seed, out } = args;
    let model = kvc_models::default_model::resolve(model.as_deref())?;
    let (config, _) = kvc_models::inspect(&model)?;
    // room for the chat template, the question and the answer
    let most = config.max_position_embeddings.saturating_sub(128);
    let lengths: Vec<usize> = lengths
        .iter()
        .map(|&l| {
            if l > most {
                eprintln!("context length {l} -> {most}: the model's window is {} tokens", config.max_position_embeddings);
            }
            l.min(most)
        })
        .collect();
    if let Some(d) = depths.iter().find(|&&d| d > 100) {
        bail!("depth {d} is not a percentage");
    }
    let tok = kvc_models::load_tokenizer(&model)?;
    let (req, file) = eval::needle::ESSAYS_WHEEL;
    let text = eval::needle::essays(&kvc_models::default_model::ensure_wheel(req, file)?)?;
    let rows = eval::needle::rows(&tok, &text, &lengths, &depths, seed)?;
    let body: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&out, body).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {} rows to {}", rows.len(), out.display());
    Ok(())
}
