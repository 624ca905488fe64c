//! `kvc-bench batch`: batched decoding speed ([`kvc_bench::batch`]): aggregate decode tokens/s
//! and per-step latency for each batch size, every sequence on its own copy of one context's KV
//! cache (uncompressed, or compressed once by `--press`). One JSON line per batch size on stdout,
//! then a table.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::builder::PossibleValuesParser;
use kvc_core::{Budget, KvcBackend, PressSpec};

use super::{backend, context_ids};

/// The arguments of `kvc-bench batch`.
#[derive(clap::Args)]
pub struct BatchArgs {
    /// Model path or known name (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text to cut each sequence's context from (repeated if shorter than --tokens).
    #[arg(long)]
    text: PathBuf,
    /// Context tokens of every sequence.
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Batch sizes (sequences stepped together).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    batches: Vec<usize>,
    /// Decode steps timed per batch size (after one warm-up step).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Press compressing the context once before the sequences copy it (`none`: uncompressed).
    #[arg(long, default_value = "none")]
    press: String,
    /// Compression ratio of --press.
    #[arg(long, default_value_t = 0.5)]
    ratio: f64,
    /// Backend (among those compiled in).
    #[arg(long, default_value = "flex", value_parser = PossibleValuesParser::new(backend::COMPILED))]
    backend: String,
    /// Float type of weights, activations and KV cache (as `kvc generate --dtype`).
    #[arg(long, default_value = "f32", value_parser = backend::DTYPES)]
    dtype: String,
    /// Decode with int8 activations (`kvc generate --int8-activations`; a GGUF model on a CPU
    /// backend): on AVX2 CPUs the `Q4_K` / `Q6_K` codes of each weight row are unpacked once for
    /// 4 sequences.
    #[arg(long)]
    int8_activations: bool,
}

/// Runs `kvc-bench batch`.
///
/// # Errors
/// A batch size or step count of 0, resolving the model, reading --text, an unknown press; the
/// backend's errors.
pub fn run(args: BatchArgs) -> Result<()> {
    if args.batches.contains(&0) || args.steps == 0 || args.tokens == 0 {
        bail!("--batches, --steps and --tokens must be at least 1");
    }
    let press = (args.press != "none").then(|| PressSpec::new(&args.press, Budget::Ratio(args.ratio)));
    if let Some(p) = &press {
        p.check()?;
    }
    let model = kvc_models::default_model::resolve(args.model.as_deref())?;
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("reading {}", args.text.display()))?;
    let job = BatchJob { args: &args, model: &model, text: &text, press: press.as_ref() };
    backend::run(&args.backend, job)
}

struct BatchJob<'a> {
    args: &'a BatchArgs,
    model: &'a std::path::Path,
    text: &'a str,
    press: Option<&'a PressSpec>,
}

impl backend::BackendJob for BatchJob<'_> {
    type Output = ();

    fn run<B: KvcBackend>(self, device: B::Device) -> Result<()> {
        let a = self.args;
        let dtype = backend::dtype(&a.dtype);
        if !B::supports_dtype(&device, dtype) {
            bail!("{} does not support --dtype {}", a.backend, a.dtype);
        }
        let mut loaded = kvc_models::load_with::<B>(self.model, &device, Some(dtype), kvc_models::WeightStorage::Codes)?;
        if a.int8_activations && !loaded.model.enable_int8_activations().with_context(|| format!("model {}", self.model.display()))? {
            eprintln!("warning: {}", kvc_models::INT8_PLAIN_LOOPS_WARNING);
        }
        let ids = context_ids(&loaded.tokenizer, self.text, a.tokens + 1)?;
        let (context, question) = ids.split_at(a.tokens);
        let mut print = |r: &kvc_bench::batch::BatchRow| println!("{}", serde_json::to_string(r).unwrap_or_default());
        let rows = kvc_bench::batch::run(&loaded, context, question[0], self.press, &a.batches, a.steps, &mut print)?;
        let base = rows.first().map_or(1.0, |r| r.tokens_per_second / r.batch as f64);
        let act = if a.int8_activations { "int8" } else { "f32" };
        println!("\n{} {}, {act} activations", a.backend, a.dtype);
        println!("\n| B | step ms | tokens/s | aggregate x B=1 | KV MB per sequence | peak RSS MB |\n|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {:.1} | {:.1} | {:.2} | {:.1} | {} |",
                r.batch,
                r.step_ms,
                r.tokens_per_second,
                r.tokens_per_second / base,
                r.kv_bytes_per_sequence as f64 / 1e6,
                r.peak_rss.map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6))
            );
        }
        Ok(())
    }
}
