//! kvc-bench: speed harness. `speed` measures prefill and decode tokens/s of a model on the
//! backends compiled in, on a prompt cut from a text file to an exact token count.
//!
//! ```text
//! cargo run --release -p kvc-bench -- speed --text assets/<book>.txt --tokens 1024 --decode 32
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::{Parser, Subcommand};
use kvc_models::{generate, GenerationConfig};

#[derive(Parser)]
#[command(name = "kvc-bench", about = "kvc evaluation and speed harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prefill and decode speed.
    Speed {
        /// Model path or known name (default: the default model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Text to cut the prompt from (repeated if shorter than --tokens).
        #[arg(long)]
        text: PathBuf,
        /// Prompt lengths in tokens.
        #[arg(long, value_delimiter = ',', default_value = "1024,2048")]
        tokens: Vec<usize>,
        /// Tokens to decode after each prefill.
        #[arg(long, default_value_t = 32)]
        decode: usize,
        /// Backends to measure, among those compiled in (ndarray, flex, wgpu, cuda).
        #[arg(long, value_delimiter = ',', default_value = "ndarray,flex")]
        backends: Vec<String>,
        /// Prefill chunk size.
        #[arg(long, default_value_t = 512)]
        chunk: usize,
    },
}

fn speed<B: Backend>(name: &str, model: &std::path::Path, text: &str, lens: &[usize], n_decode: usize, chunk: usize) -> Result<()> {
    let device = B::Device::default();
    let loaded = kvc_models::load::<B>(model, &device)?;
    let mut ids = loaded.tokenizer.encode(text, false)?;
    if ids.is_empty() {
        bail!("the text has no tokens");
    }
    let max = *lens.iter().max().unwrap_or(&0);
    while ids.len() < max {
        ids.extend_from_within(..);
    }
    for &n in lens {
        let prompt = &ids[..n];
        // warm-up on a short prompt (first-call allocations, autotune)
        let mut cache = loaded.model.new_cache();
        let l = generate::prefill(&loaded.model, &prompt[..16.min(n)], &mut cache, None, chunk, &device)?;
        let _ = l.into_data();
        let mut cache = loaded.model.new_cache();
        let t = Instant::now();
        let logits = generate::prefill(&loaded.model, prompt, &mut cache, None, chunk, &device)?;
        let logits = burn::tensor::Tensor::<B, 3>::from_data(logits.into_data(), &device);
        let prefill = t.elapsed().as_secs_f64();
        let cfg = GenerationConfig { max_new_tokens: n_decode, stop_at_eos: false, ..Default::default() };
        let d = generate::decode(&loaded.model, &mut cache, logits, &cfg, &[], |_| true, &device)?;
        let decode_tps = (d.tokens.len().saturating_sub(1)) as f64 / d.elapsed.as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"backend": name, "prompt_tokens": n, "prefill_s": prefill,
                "prefill_tok_s": n as f64 / prefill, "decode_tokens": d.tokens.len(), "decode_tok_s": decode_tps,
                "kv_cache_bytes": cache.bytes()})
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Speed { model, text, tokens, decode, backends, chunk } => {
            let model = match model {
                Some(p) if p.exists() => p,
                Some(p) => match p.to_str().and_then(kvc_models::default_model::find) {
                    Some(k) => kvc_models::default_model::ensure_model(k)?,
                    None => bail!("no model at {}", p.display()),
                },
                None => kvc_models::default_model::ensure_default_model()?,
            };
            let text = std::fs::read_to_string(&text).with_context(|| format!("reading {}", text.display()))?;
            for b in backends {
                match b.as_str() {
                    #[cfg(feature = "ndarray")]
                    "ndarray" => speed::<burn::backend::NdArray<f32>>(&b, &model, &text, &tokens, decode, chunk)?,
                    #[cfg(feature = "flex")]
                    "flex" => speed::<burn::backend::Flex>(&b, &model, &text, &tokens, decode, chunk)?,
                    #[cfg(feature = "wgpu")]
                    "wgpu" => speed::<burn::backend::Wgpu>(&b, &model, &text, &tokens, decode, chunk)?,
                    #[cfg(feature = "cuda")]
                    "cuda" => speed::<burn::backend::Cuda>(&b, &model, &text, &tokens, decode, chunk)?,
                    other => bail!("backend {other} is not compiled in (features: ndarray, flex, wgpu, cuda)"),
                }
            }
        }
    }
    Ok(())
}
