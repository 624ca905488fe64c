//! `kvc-bench compress`: prefill time, then compression time with a press, on one prompt length,
//! and the process's peak RSS (one JSON line). Run once with `--press none` and once with a press,
//! in separate processes, to compare peak memory.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::builder::PossibleValuesParser;
use kvc_core::{Budget, KvcBackend, PressSpec};
use kvc_models::pipeline::Pipeline;

use super::{backend, context_ids, peak_rss};

/// The arguments of `kvc-bench compress`.
#[derive(clap::Args)]
pub struct CompressArgs {
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
    #[arg(long, value_parser = PossibleValuesParser::new(backend::COMPILED), default_value = backend::default_backend())]
    backend: String,
    /// Repetitions (the best time is reported).
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Prefill chunk (tokens).
    #[arg(long, default_value_t = kvc_models::GenerationConfig::default().prefill_chunk)]
    chunk: usize,
    /// A press option, key=value (repeatable), as `kvc generate --press-option`.
    #[arg(long = "press-option", value_name = "KEY=VALUE")]
    press_options: Vec<String>,
    /// Float type of weights, activations and KV cache (as `kvc generate --dtype`).
    #[arg(long, default_value = "f32", value_parser = backend::DTYPES)]
    dtype: String,
    /// Prefill and score on dense copies of a GGUF's matrices (`WeightStorage::Dense`, the codes
    /// kept beside them) instead of holding the codes only, as `kvc generate` does by default.
    #[arg(long)]
    dense_weights: bool,
}

/// Runs `kvc-bench compress`.
///
/// # Errors
/// Resolving the model, reading --text, a press option; the backend's errors (an unsupported --dtype, loading, running).
pub fn run(args: CompressArgs) -> Result<()> {
    let CompressArgs { model, text, tokens, press, ratio, backend, repeat, chunk, press_options, dtype, dense_weights } = args;
    let model = kvc_models::default_model::resolve(model.as_deref())?;
    let text = std::fs::read_to_string(&text).with_context(|| format!("reading {}", text.display()))?;
    let spec = if press == "none" {
        None
    } else {
        let mut spec = PressSpec::new(&press, Budget::Ratio(ratio));
        for o in &press_options {
            let (k, v) = kvc_core::press::parse_option(&press, o)?;
            spec = spec.with_option(&k, v);
        }
        Some(spec)
    };
    backend::run(&backend, CompressJob { model: &model, text: &text, tokens, press: &press, spec, ratio, repeat, chunk, dtype: (&dtype, backend::dtype(&dtype)), dense_weights })?;
    Ok(())
}

struct CompressJob<'a> {
    model: &'a std::path::Path,
    text: &'a str,
    tokens: usize,
    press: &'a str,
    spec: Option<PressSpec>,
    ratio: f64,
    repeat: usize,
    chunk: usize,
    /// The name and burn dtype of `--dtype`.
    dtype: (&'a str, burn::tensor::DType),
    dense_weights: bool,
}

impl backend::BackendJob for CompressJob<'_> {
    type Output = ();

    fn run<B: KvcBackend>(self, device: B::Device) -> Result<()> {
        if !B::supports_dtype(&device, self.dtype.1) {
            bail!("--dtype {} is not supported by this backend", self.dtype.0);
        }
        let storage = kvc_models::WeightStorage::dense_if(self.dense_weights);
        let m = kvc_models::load_with::<B>(self.model, &device, Some(self.dtype.1), storage)?;
        let ids = context_ids(&m.tokenizer, self.text, self.tokens)?;
        let pipeline = Pipeline::new(&m);
        let spec = self.spec;
        let needs = match &spec {
            Some(s) => s.needs()?,
            None => Default::default(),
        };
        let (mut best_prefill, mut best_compress) = (f64::INFINITY, f64::INFINITY);
        let mut bytes = (0, 0);
        for _ in 0..self.repeat.max(1) {
            let prefilled = pipeline.prefill(&ids, needs, self.chunk, &mut |_| {})?;
            best_prefill = best_prefill.min(prefilled.seconds);
            if let Some(spec) = &spec {
                // in place, as `kvc generate` compresses (one context cache at the peak)
                let c = pipeline.compress_prefilled(prefilled, spec, &mut |_, _| {})?;
                best_compress = best_compress.min(c.seconds);
                bytes = (c.report.bytes_before, c.report.bytes_after);
            }
        }
        let compress = spec.as_ref().map(|_| best_compress);
        println!(
            "{}",
            serde_json::json!({"tokens": self.tokens, "dtype": self.dtype.0, "press": self.press, "ratio": self.ratio, "chunk": self.chunk, "prefill_s": best_prefill,
                "compress_s": compress, "total_over_prefill": compress.map(|c| (best_prefill + c) / best_prefill),
                "kv_bytes_before": bytes.0, "kv_bytes_after": bytes.1, "peak_rss_bytes": peak_rss(), "weights": if m.model.codes_only() { "codes" } else { "dense" }})
        );
        Ok(())
    }
}
