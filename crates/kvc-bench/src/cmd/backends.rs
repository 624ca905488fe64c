//! `kvc-bench backends`: the same prefill + KVCompose + decode on several backends (and float
//! types), side by side: speed, cache bytes, peak memory, and agreement with the first backend
//! (kept sets, first logits, greedy tokens).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::builder::PossibleValuesParser;
use kvc_core::{Budget, KvcBackend, PressSpec};
use kvc_models::pipeline::Pipeline;

use super::{backend, context_ids, decode_after, peak_rss, CPU_BACKENDS};

/// The arguments of `kvc-bench backends`.
#[derive(clap::Args)]
pub struct BackendsArgs {
    /// Model path or known name (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text to cut the context from (repeated if shorter).
    #[arg(long)]
    text: PathBuf,
    /// Context tokens.
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    /// KVCompose compression ratio.
    #[arg(long, default_value_t = 0.5)]
    ratio: f64,
    /// Tokens decoded after the last context token.
    #[arg(long, default_value_t = 16)]
    decode: usize,
    /// Backends, among those compiled in; the first is the reference (default: the CPU ones
    /// compiled in, flex first).
    #[arg(long, value_delimiter = ',', value_parser = PossibleValuesParser::new(backend::COMPILED), default_values = CPU_BACKENDS)]
    backends: Vec<String>,
    /// Float types of weights and KV cache to run each backend in (f32, f16, bf16); the
    /// reference is the first backend in the first type. A type a backend does not support
    /// gives a row that says so.
    #[arg(long, alias = "dtype", value_delimiter = ',', default_value = "f32", value_parser = backend::DTYPES)]
    dtypes: Vec<String>,
}

/// Runs `kvc-bench backends`.
///
/// # Errors
/// Resolving the model, reading --text, --tokens under 3; the reference backend's errors (the others' are rows that say they did not run).
pub fn run(args: BackendsArgs) -> Result<()> {
    let BackendsArgs { model, text, tokens, ratio, decode, backends, dtypes } = args;
    let model = kvc_models::default_model::resolve(model.as_deref())?;
    let text = std::fs::read_to_string(&text).with_context(|| format!("reading {}", text.display()))?;
    if tokens < 3 {
        bail!("--tokens must be at least 3 (a context of two tokens and one to answer)");
    }
    let tok = kvc_models::load_tokenizer(&model)?;
    let ids = context_ids(&tok, &text, tokens)?;
    let mut runs: Vec<(String, BackendRun)> = Vec::new();
    let mut unsupported = Vec::new();
    for b in &backends {
        for t in &dtypes {
            let dtype = backend::dtype(t);
            let name = if dtypes.len() > 1 || t != "f32" { format!("{b} {t}") } else { b.clone() };
            match backend::run(b, BackendsJob { model: &model, ids: &ids, ratio, n_decode: decode, dtype }) {
                Ok(run) => runs.push((name, run)),
                Err(e) if runs.is_empty() => return Err(e.context(format!("{name} (the reference)"))),
                Err(e) => unsupported.push(format!("{name}: {e:#}")),
            }
        }
    }
    println!(
        "{:<12} {:>11} {:>11} {:>10} {:>16} {:>13} {:>14} {:>15} {:>10}",
        "backend", "prefill t/s", "compress s", "decode t/s", "KV MB (after)", "peak RSS MB", "kept sets =", "max |dlogit|", "tokens ="
    );
    let reference = &runs[0].1;
    for (name, r) in &runs {
        let heads: usize = r.kept.iter().map(Vec::len).sum();
        let same = r.kept.iter().flatten().zip(reference.kept.iter().flatten()).filter(|(a, b)| a == b).count();
        let dlogit = r.first_logits.iter().zip(&reference.first_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let tokens_same = r.tokens.iter().zip(&reference.tokens).take_while(|(a, b)| a == b).count();
        println!(
            "{:<12} {:>11.1} {:>11.2} {:>10.1} {:>16} {:>13} {:>14} {:>15.2e} {:>10}",
            name,
            r.prefill_tok_s,
            r.compress_s,
            r.decode_tok_s,
            format!("{:.1} ({:.1})", r.kv_bytes.0 as f64 / 1e6, r.kv_bytes.1 as f64 / 1e6),
            r.peak_rss.map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6)),
            format!("{same}/{heads}"),
            dlogit,
            format!("{tokens_same}/{}", reference.tokens.len())
        );
    }
    for u in &unsupported {
        println!("not run: {u}");
    }
    println!("peak RSS is the process's high-water mark after each backend (backends run in this order, in one process)");
    Ok(())
}

/// One backend's run of `kvc-bench backends`.
struct BackendRun {
    prefill_tok_s: f64,
    compress_s: f64,
    decode_tok_s: f64,
    kv_bytes: (usize, usize),
    peak_rss: Option<u64>,
    /// Original positions kept per layer and KV head (sorted).
    kept: Vec<Vec<Vec<u32>>>,
    first_logits: Vec<f32>,
    tokens: Vec<u32>,
}

struct BackendsJob<'a> {
    model: &'a std::path::Path,
    ids: &'a [u32],
    ratio: f64,
    n_decode: usize,
    dtype: burn::tensor::DType,
}

impl backend::BackendJob for BackendsJob<'_> {
    type Output = BackendRun;

    fn run<B: KvcBackend>(self, device: B::Device) -> Result<BackendRun> {
        if !B::supports_dtype(&device, self.dtype) {
            bail!("{:?} is not supported by this backend", self.dtype);
        }
        let m = kvc_models::load_as::<B>(self.model, &device, Some(self.dtype))?;
        let pipeline = Pipeline::new(&m);
        let spec = PressSpec::new("kvcompose", Budget::Ratio(self.ratio));
        let (context, last) = self.ids.split_at(self.ids.len() - 1);
        // warm-up (first-call allocations, thread pool, autotuning on GPUs)
        pipeline.prefill(&context[..16.min(context.len())], spec.needs()?, 512, &mut |_| {})?;
        let prefilled = pipeline.prefill(context, spec.needs()?, 512, &mut |_| {})?;
        let compressed = pipeline.compress(&prefilled, &spec, &mut |_, _| {})?;
        let mut kept = Vec::new();
        for l in 0..compressed.cache.num_layers() {
            let kv = compressed.cache.layer(l)?.context("empty layer after compression")?;
            kept.push(kv.kept_positions());
        }
        let (first_logits, d) = decode_after(&m, compressed.cache.clone(), last, self.n_decode, &device)?;
        Ok(BackendRun {
            prefill_tok_s: context.len() as f64 / prefilled.seconds,
            compress_s: compressed.seconds,
            decode_tok_s: d.tokens.len().saturating_sub(1) as f64 / d.elapsed.as_secs_f64(),
            kv_bytes: (compressed.report.bytes_before, compressed.report.bytes_after),
            peak_rss: peak_rss(),
            kept,
            first_logits,
            tokens: d.tokens,
        })
    }
}
