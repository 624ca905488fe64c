//! `kvc-bench speed`: prefill and decode tokens/s of a model on the backends compiled in, on a
//! prompt cut from a text file to an exact token count, with a GGUF's matrices held as their codes
//! (the default) or as dense copies (`--dense-weights`: decode also on the codes kept beside them,
//! measured in the same run). The KV cache may be quantized after the prefill (`--kv-dtype`: the
//! quantization timed apart, decode then reads the codes). One JSON line per backend and prompt
//! length, with the process's peak RSS.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::builder::PossibleValuesParser;
use kvc_core::Activations;
use kvc_core::{KvQuant, KvcBackend};
use kvc_models::{generate, GenerationConfig};

use super::{backend, context_ids, CPU_BACKENDS};

/// The arguments of `kvc-bench speed`.
#[derive(clap::Args)]
pub struct SpeedArgs {
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
    /// Load dense copies of the weights (`WeightStorage::Dense`: a GGUF's codes kept beside them,
    /// so decode is measured on both; `kvc generate --dense-weights` drops the codes) instead of
    /// holding a GGUF's quantized matrices as their codes only.
    #[arg(long)]
    dense_weights: bool,
    /// Also decode with int8 activations (`kvc generate --int8-activations`) from the same
    /// prefilled cache, after the f32 run: `decode_tok_s_int8_activations`, and
    /// `int8_tokens_as_f32` (how many of its first greedy tokens are the f32 run's). Float caches
    /// only.
    #[arg(long)]
    int8_activations: bool,
    /// Also prefill with int8 activations (`Decoder::enable_int8_prefill`: no `kvc generate`
    /// flag; matrices held as codes only), after the f32 prefill: `prefill_tok_s_int8`, and `int8_prefill_logit_diff` (the
    /// largest |difference| of its last token's logits from the f32 prefill's).
    #[arg(long)]
    int8_prefill: bool,
    /// KV cache storage for the decode: `float` (--dtype), `int8`, `int4`, or `f16` / `bf16`
    /// with --dtype f32, stored after the prefill (timed apart: `quantize_s`). The dense-weights comparison runs on float caches only.
    #[arg(long, default_value = "float")]
    kv_dtype: String,
}

/// Runs `kvc-bench speed`.
///
/// # Errors
/// An unknown --kv-dtype, resolving the model, reading --text; a backend's errors (loading,
/// tokenizing, quantizing the cache, running).
pub fn run(args: SpeedArgs) -> Result<()> {
    let SpeedArgs { model, text, tokens, decode, backends, chunk, dtype, dense_weights, int8_activations, int8_prefill, kv_dtype } = args;
    let kv_quant = KvQuant::parse_for(&kv_dtype, backend::dtype(&dtype)).context("--kv-dtype")?;
    let model = kvc_models::default_model::resolve(model.as_deref())?;
    let text = std::fs::read_to_string(&text).with_context(|| format!("reading {}", text.display()))?;
    for b in backends {
        let job = SpeedJob { name: &b, model: &model, text: &text, lens: &tokens, n_decode: decode, chunk, dtype: (&dtype, backend::dtype(&dtype)), dense_weights, int8_activations, int8_prefill, kv_quant };
        backend::run(&b, job)?;
    }
    Ok(())
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
    dense_weights: bool,
    int8_activations: bool,
    int8_prefill: bool,
    /// `--kv-dtype` (`None`: float).
    kv_quant: Option<KvQuant>,
}

impl backend::BackendJob for SpeedJob<'_> {
    type Output = ();

    fn run<B: KvcBackend>(self, device: B::Device) -> Result<()> {
        if !B::supports_dtype(&device, self.dtype.1) {
            // as `kvc-bench backends`: the other backends of the list still run
            eprintln!("not run: {} {}: {:?} is not supported by this backend", self.name, self.dtype.0, self.dtype.1);
            return Ok(());
        }
        let storage = kvc_models::WeightStorage::dense_if(self.dense_weights);
        let mut loaded = kvc_models::load_with::<B>(self.model, &device, Some(self.dtype.1), storage)?;
        if let Some(q) = self.kv_quant {
            q.check(loaded.config.head_dim)?;
        }
        let ids = context_ids(&loaded.tokenizer, self.text, self.lens.iter().copied().max().unwrap_or(1))?;
        let kv_dtype_name = self.kv_quant.map_or("float", |q| q.name());
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
            // the same prefill with int8 activations (the lever measured in the same run)
            let int8_prefill = if self.int8_prefill {
                let was = loaded.model.prefill_activations();
                let r = loaded.model.enable_int8_prefill().map_err(anyhow::Error::from).and_then(|native| {
                    if !native {
                        eprintln!("warning: {}", kvc_models::INT8_PLAIN_LOOPS_WARNING);
                    }
                    let mut c = loaded.model.new_cache();
                    let t = Instant::now();
                    let l = loaded.model.prefill(prompt, &mut c, None, self.chunk)?;
                    let secs = t.elapsed().as_secs_f64();
                    let diff: f32 = burn::tensor::ElementConversion::elem((l - logits.clone()).abs().max().into_scalar());
                    Ok((n as f64 / secs, diff))
                });
                loaded.model.set_prefill_activations(was);
                Some(r?)
            } else {
                None
            };
            let quantize_s = match self.kv_quant {
                Some(q) => {
                    let t = Instant::now();
                    cache.quantize(q)?;
                    Some(t.elapsed().as_secs_f64())
                }
                None => None,
            };
            let cfg = GenerationConfig { max_new_tokens: self.n_decode, stop_at_eos: false, ..Default::default() };
            let d = generate::decode(&loaded.model, &mut cache, logits.clone(), &cfg, &[], |_| true, &device)?;
            let decode_tps = (d.tokens.len().saturating_sub(1)) as f64 / d.elapsed.as_secs_f64();
            let kv_bytes = cache.bytes();
            // the same steps on the dense weights (the lever measured in the same run; float
            // caches only: a quantized one cut back to the prompt may hold its slots otherwise
            // than right after `quantize`, codes re-made or residual window moved)
            let dense_tps = if self.kv_quant.is_none() && loaded.model.quantized_decode() && !loaded.model.codes_only() {
                let (m, c) = (&mut loaded.model, &mut cache);
                Some(decode_again(m, c, n, logits.clone(), &cfg, &device, |m, on| m.set_quantized_decode(!on))?.0)
            } else {
                None
            };
            // the same steps with int8 activations (the lever measured in the same run)
            let int8 = if self.int8_activations && self.kv_quant.is_none() && loaded.model.quantized_decode() {
                let set = |m: &mut kvc_models::Decoder<B>, on: bool| m.set_activations(if on { Activations::Int8 } else { Activations::F32 });
                let (tps, tokens) = decode_again(&mut loaded.model, &mut cache, n, logits, &cfg, &device, set)?;
                Some((tps, tokens.iter().zip(&d.tokens).take_while(|(a, b)| a == b).count()))
            } else {
                if self.int8_activations {
                    eprintln!("--int8-activations: not measured at {n} tokens (it needs a float KV cache and quantized weights in use)");
                }
                None
            };
            println!(
                "{}",
                serde_json::json!({"backend": self.name, "dtype": self.dtype.0, "kv_dtype": kv_dtype_name, "prompt_tokens": n, "prefill_s": prefill, "quantize_s": quantize_s,
                    "prefill_tok_s": n as f64 / prefill, "prefill_tok_s_int8": int8_prefill.map(|p| p.0), "int8_prefill_logit_diff": int8_prefill.map(|p| p.1), "decode_tokens": d.tokens.len(), "decode_tok_s": decode_tps,
                    "decode_tok_s_dense_weights": dense_tps, "decode_tok_s_int8_activations": int8.map(|i| i.0),
                    "int8_tokens_as_f32": int8.map(|i| i.1), "kv_cache_bytes": kv_bytes,
                    "weights": if loaded.model.codes_only() { "codes" } else { "dense" }, "weight_bytes": loaded.model.weight_bytes(),
                    "peak_rss_mb": kvc_bench::batch::peak_rss().map(|b| b as f64 / 1e6)})
            );
        }
        Ok(())
    }
}

/// The decode steps measured again from the end of the `n`-token prompt (the cache cut back to
/// it) with the model changed by `set(model, true)`, undone by `set(model, false)` whatever the
/// outcome: (tokens/s over the steps after the first token, the tokens).
fn decode_again<B: KvcBackend>(
    model: &mut kvc_models::Decoder<B>,
    cache: &mut kvc_core::KvCache<B>,
    n: usize,
    logits: burn::tensor::Tensor<B, 3>,
    cfg: &GenerationConfig,
    device: &B::Device,
    set: impl Fn(&mut kvc_models::Decoder<B>, bool),
) -> Result<(f64, Vec<u32>)> {
    cache.truncate(n);
    cache.set_next_position(n);
    set(model, true);
    let r = generate::decode(model, cache, logits, cfg, &[], |_| true, device);
    set(model, false);
    let r = r?;
    Ok(((r.tokens.len().saturating_sub(1)) as f64 / r.elapsed.as_secs_f64(), r.tokens))
}
