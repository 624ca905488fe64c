//! `kvc-bench scaling`: prefill, compression and decode time against context length, measured on
//! one backend; the table, the JSON lines and the plot are [`kvc_bench::scaling`]'s.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::builder::PossibleValuesParser;
use kvc_core::{Budget, KvcBackend, PressSpec};
use kvc_models::pipeline::Pipeline;

use super::{backend, context_ids, decode_after};

/// The arguments of `kvc-bench scaling`.
#[derive(clap::Args)]
pub struct ScalingArgs {
    /// Model path or known name (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text to cut the contexts from (repeated if shorter).
    #[arg(long)]
    text: PathBuf,
    /// Context lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8000")]
    tokens: Vec<usize>,
    /// Press.
    #[arg(long, default_value = "kvcompose")]
    press: String,
    /// Compression ratio.
    #[arg(long, default_value_t = 0.75)]
    ratio: f64,
    /// Decode steps timed on each cache (uncompressed and compressed).
    #[arg(long, default_value_t = 32)]
    decode: usize,
    /// Prefill chunk (tokens).
    #[arg(long, default_value_t = kvc_models::GenerationConfig::default().prefill_chunk)]
    chunk: usize,
    /// Backend (ndarray, flex, wgpu, cuda; among those compiled in).
    #[arg(long, value_parser = PossibleValuesParser::new(backend::COMPILED), default_value = backend::default_backend())]
    backend: String,
    /// Folder for the plot (created).
    #[arg(long, default_value = "scaling")]
    out: PathBuf,
}

/// Runs `kvc-bench scaling`.
///
/// # Errors
/// Resolving the model, reading --text, lengths that are not positive, an unknown press, creating --out; the backend's errors; writing the plot.
pub fn run(args: ScalingArgs) -> Result<()> {
    let ScalingArgs { model, text, tokens, press, ratio, decode, chunk, backend, out } = args;
    let model = kvc_models::default_model::resolve(model.as_deref())?;
    let text = std::fs::read_to_string(&text).with_context(|| format!("reading {}", text.display()))?;
    if tokens.is_empty() || tokens.contains(&0) {
        bail!("--tokens needs positive lengths");
    }
    let spec = PressSpec::new(&press, Budget::Ratio(ratio));
    spec.needs()?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let job = ScalingJob { model: &model, text: &text, lens: &tokens, spec, n_decode: decode, chunk };
    let rows = backend::run(&backend, job)?;
    print!("{}", kvc_bench::scaling::table(&rows));
    for f in kvc_bench::scaling::write_plot(&out, &rows, &format!("{press} {ratio}"))? {
        println!("wrote {}", f.display());
    }
    Ok(())
}

struct ScalingJob<'a> {
    model: &'a std::path::Path,
    text: &'a str,
    lens: &'a [usize],
    spec: PressSpec,
    n_decode: usize,
    chunk: usize,
}

impl backend::BackendJob for ScalingJob<'_> {
    type Output = Vec<kvc_bench::scaling::ScalingRow>;

    fn run<B: KvcBackend>(self, device: B::Device) -> Result<Self::Output> {
        let m = kvc_models::load::<B>(self.model, &device)?;
        let window = m.model.config().max_position_embeddings;
        let longest = self.lens.iter().copied().max().unwrap_or(1);
        if longest + self.n_decode + 1 > window {
            bail!("{longest} context tokens + {} decoded exceed the model's window of {window} tokens", self.n_decode + 1);
        }
        let ids = context_ids(&m.tokenizer, self.text, longest)?;
        let pipeline = Pipeline::new(&m);
        let needs = self.spec.needs()?;
        // warm-up (first-call allocations, thread pool)
        pipeline.prefill(&ids[..16.min(ids.len())], needs, self.chunk, &mut |_| {})?;
        let mut rows = Vec::new();
        for &n in self.lens {
            let context = &ids[..n];
            let prefilled = pipeline.prefill(context, needs, self.chunk, &mut |_| {})?;
            let compressed = pipeline.compress(&prefilled, &self.spec, &mut |_, _| {})?;
            let mut step_ms = [0.0; 2];
            for (slot, cache) in step_ms.iter_mut().zip([prefilled.cache.clone(), compressed.cache.clone()]) {
                // one more token gives the first logits (a question would play this part)
                let (_, d) = decode_after(&m, cache, &context[n - 1..], self.n_decode, &device)?;
                *slot = d.elapsed.as_secs_f64() * 1e3 / d.tokens.len().max(1) as f64;
            }
            let row = kvc_bench::scaling::ScalingRow {
                tokens: n,
                prefill_s: prefilled.seconds,
                compress_s: compressed.seconds,
                total_over_prefill: (prefilled.seconds + compressed.seconds) / prefilled.seconds,
                decode_step_ms: step_ms[0],
                decode_step_ms_compressed: step_ms[1],
                kv_bytes: (compressed.report.bytes_before, compressed.report.bytes_after),
            };
            println!("{}", serde_json::to_string(&row)?);
            rows.push(row);
        }
        Ok(rows)
    }
}
