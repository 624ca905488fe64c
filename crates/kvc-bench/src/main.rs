//! kvc-bench: speed harness. `speed` measures prefill and decode tokens/s of a model on the
//! backends compiled in, on a prompt cut from a text file to an exact token count.
//!
//! ```text
//! cargo run --release -p kvc-bench -- speed --text assets/<book>.txt --tokens 1024 --decode 32
//! ```

use std::path::PathBuf;

/// Large tensors are allocated and freed on every op: mimalloc keeps freed blocks for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
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
    /// Prefill time, then compression time with a press, on one prompt length; peak RSS of the
    /// process. Run once with `--press none` and once with a press, in separate processes, to
    /// compare peak memory.
    Compress {
        /// Model path or known name (default: the default model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Text to cut the context from (repeated if shorter).
        #[arg(long)]
        text: PathBuf,
        /// Context length in tokens.
        #[arg(long, default_value_t = 1024)]
        tokens: usize,
        /// Press (`none` = plain prefill only).
        #[arg(long, default_value = "kvcompose")]
        press: String,
        /// Compression ratio.
        #[arg(long, default_value_t = 0.5)]
        ratio: f64,
        /// Backend (ndarray, flex, wgpu, cuda; among those compiled in).
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Repetitions (the best time is reported).
        #[arg(long, default_value_t = 2)]
        repeat: usize,
    },
}

/// Peak resident set size of this process (VmHWM), bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

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

fn compress_bench<B: Backend>(model: &std::path::Path, text: &str, n: usize, press_name: &str, ratio: f64, repeat: usize) -> Result<()> {
    let device = B::Device::default();
    let m = kvc_models::load::<B>(model, &device)?;
    let ids = context_ids(&m.tokenizer, text, n)?;
    let (mut best_prefill, mut best_compress) = (f64::INFINITY, f64::INFINITY);
    let mut bytes = (0, 0);
    for _ in 0..repeat.max(1) {
        let mut cache = m.model.new_cache();
        let t = Instant::now();
        generate::feed(&m.model, &ids, &mut cache, None, 512, &device)?;
        B::sync(&device).map_err(|e| anyhow::anyhow!("device: {e:?}"))?;
        best_prefill = best_prefill.min(t.elapsed().as_secs_f64());
        if press_name != "none" {
            let mut press = kvc_core::press::build::<B>(press_name, kvc_core::Budget::Ratio(ratio), &[])?;
            let t = Instant::now();
            let r = press.compress(&m.model, &ids, &mut cache)?;
            best_compress = best_compress.min(t.elapsed().as_secs_f64());
            bytes = (r.bytes_before, r.bytes_after);
        }
    }
    let compress = if press_name == "none" { None } else { Some(best_compress) };
    println!(
        "{}",
        serde_json::json!({"tokens": n, "press": press_name, "ratio": ratio, "prefill_s": best_prefill,
            "compress_s": compress, "total_over_prefill": compress.map(|c| (best_prefill + c) / best_prefill),
            "kv_bytes_before": bytes.0, "kv_bytes_after": bytes.1, "peak_rss_bytes": peak_rss()})
    );
    Ok(())
}

fn speed<B: Backend>(name: &str, model: &std::path::Path, text: &str, lens: &[usize], n_decode: usize, chunk: usize) -> Result<()> {
    let device = B::Device::default();
    let loaded = kvc_models::load::<B>(model, &device)?;
    let ids = context_ids(&loaded.tokenizer, text, lens.iter().copied().max().unwrap_or(1))?;
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

fn resolve_model(model: Option<PathBuf>) -> Result<PathBuf> {
    Ok(match model {
        Some(p) if p.exists() => p,
        Some(p) => match p.to_str().and_then(kvc_models::default_model::find) {
            Some(k) => kvc_models::default_model::ensure_model(k)?,
            None => bail!("no model at {}", p.display()),
        },
        None => kvc_models::default_model::ensure_default_model()?,
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Compress { model, text, tokens, press, ratio, backend, repeat } => {
            let model = resolve_model(model)?;
            let text = std::fs::read_to_string(&text).with_context(|| format!("reading {}", text.display()))?;
            match backend.as_str() {
                #[cfg(feature = "ndarray")]
                "ndarray" => compress_bench::<burn::backend::NdArray<f32>>(&model, &text, tokens, &press, ratio, repeat)?,
                #[cfg(feature = "flex")]
                "flex" => compress_bench::<burn::backend::Flex>(&model, &text, tokens, &press, ratio, repeat)?,
                #[cfg(feature = "wgpu")]
                "wgpu" => compress_bench::<burn::backend::Wgpu>(&model, &text, tokens, &press, ratio, repeat)?,
                #[cfg(feature = "cuda")]
                "cuda" => compress_bench::<burn::backend::Cuda>(&model, &text, tokens, &press, ratio, repeat)?,
                other => bail!("backend {other} is not compiled in (features: ndarray, flex, wgpu, cuda)"),
            }
        }
        Command::Speed { model, text, tokens, decode, backends, chunk } => {
            let model = resolve_model(model)?;
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
