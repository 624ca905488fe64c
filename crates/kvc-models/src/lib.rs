//! # kvc-models
//!
//! Decoder-only LLMs on burn for kvc: Llama (SmolLM2, Llama 2/3 incl. llama3 RoPE scaling),
//! Qwen2/Qwen2.5 and Qwen3, loaded from GGUF files (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! Q4_K, Q5_K, Q6_K, dequantized to f32) or HF folders (`config.json` + `*.safetensors` in
//! F32/F16/BF16, `tokenizer.json`), with their tokenizer, chat template, and a generation loop
//! whose KV cache a press can compress between prefill and decode.
//!
//! A burn app compressing a document's KV cache with a press and asking two questions on it
//! (`examples/compress.rs`; the same code opens kvc-core's docs):
//!
//! ```no_run
//! # fn demo<B: kvc_core::KvcBackend>(device: &B::Device) -> Result<(), Box<dyn std::error::Error>> {
//! use kvc_core::{Budget, PressSpec};
//! use kvc_models::pipeline::{Pipeline, Request};
//! let loaded = kvc_models::load::<B>(&kvc_models::default_model::ensure_default_model()?, device)?;
//! let request = Request {
//!     context: std::fs::read_to_string("assets/pride_and_prejudice_ch1-2.txt")?,
//!     questions: vec!["Which estate has been let?".into(), "Who has taken it?".into()],
//!     press: Some(PressSpec::new("kvcompose", Budget::Ratio(0.5))), // any press of `kvc presses`
//!     ..Default::default()
//! };
//! let response = Pipeline::new(&loaded).run(&request, &mut |_event| {})?;
//! for answer in &response.answers {
//!     println!("{}", answer.text); // both questions answered on one compressed cache
//! }
//! println!("KV cache {} -> {} bytes", response.kv_bytes.0, response.kv_bytes.1);
//! # Ok(()) }
//! ```
//!
//! Generic over the backend: loading needs `B: Backend`, running the decoder
//! `B: kvc_core::KvcBackend` (burn's backend plus kvc's kernels, with generic defaults; burn's
//! backends have it through kvc-core's features). No backend is named in this crate. The lower
//! level, prefill and decode by hand:
//!
//! ```no_run
//! # fn demo<B: kvc_core::KvcBackend>(device: &B::Device) -> Result<(), kvc_models::ModelError> {
//! let path = kvc_models::default_model::ensure_default_model()?;
//! let loaded = kvc_models::load::<B>(&path, device)?;
//! let ids = loaded.tokenizer.encode("The capital of France is", true)?;
//! let mut cache = loaded.model.new_cache();
//! let logits = loaded.model.prefill(&ids, &mut cache, None, 512)?;
//! let out = kvc_models::generate::decode(&loaded.model, &mut cache, logits,
//!     &Default::default(), loaded.tokenizer.eos_ids(), |_| true, device)?;
//! println!("{}", loaded.tokenizer.decode(&out.tokens, true)?);
//! # Ok(()) }
//! ```

pub mod config;
pub mod default_model;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod pipeline;
pub mod rope;
pub mod tokenizer;
pub mod weights;

use std::path::Path;

use burn::tensor::{backend::Backend, DType};

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use generate::{GenerationConfig, StopReason};
pub use model::{Decoder, Logits, WeightStorage, INT8_PLAIN_LOOPS_WARNING};
pub use tokenizer::{ChatMessage, Tokenizer};

/// Summary of a model file for `kvc inspect`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelInfo {
    /// Format: `gguf` or `safetensors`.
    pub format: String,
    /// Number of tensors in the file(s).
    pub tensor_count: usize,
    /// Tensor count per dtype / quantization type.
    pub dtypes: std::collections::BTreeMap<String, usize>,
    /// Parameters (elements over all tensors).
    pub parameters: usize,
}

/// A loaded model: decoder, tokenizer, config and file summary.
pub struct LoadedModel<B: Backend> {
    /// The decoder.
    pub model: Decoder<B>,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its config.
    pub config: ModelConfig,
    /// What the file holds.
    pub info: ModelInfo,
}

/// Reads config and file summary without building the model (cheap; for `kvc inspect`).
///
/// # Errors
/// As [`load`], minus weight and tokenizer errors.
pub fn inspect(path: &Path) -> Result<(ModelConfig, ModelInfo)> {
    match open_source(path)? {
        Source::Gguf(file) => {
            let config = ModelConfig::from_gguf(&file)?;
            let info = gguf_info(&file);
            Ok((config, info))
        }
        Source::Hf(dir) => {
            let config = hf_config(&dir)?;
            Ok((config, safetensors_info(&dir)?))
        }
    }
}

enum Source {
    Gguf(gguf::GgufFile),
    Hf(std::path::PathBuf),
}

fn open_source(path: &Path) -> Result<Source> {
    if !path.exists() {
        return Err(ModelError::ModelNotFound { path: path.to_path_buf(), reason: "no such file or folder".into() });
    }
    if path.is_dir() {
        if !path.join("config.json").exists() {
            return Err(ModelError::ModelNotFound {
                path: path.to_path_buf(),
                reason: "a model folder needs config.json and *.safetensors (or pass a .gguf file)".into(),
            });
        }
        return Ok(Source::Hf(path.to_path_buf()));
    }
    Ok(Source::Gguf(gguf::GgufFile::open(path)?))
}

fn hf_config(dir: &Path) -> Result<ModelConfig> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|source| ModelError::Io { path: p, source })?;
    ModelConfig::from_hf_json(&text)
}

fn gguf_info(file: &gguf::GgufFile) -> ModelInfo {
    let mut dtypes = std::collections::BTreeMap::new();
    let mut parameters = 0;
    for t in &file.tensors {
        *dtypes.entry(t.kind.name()).or_insert(0) += 1;
        parameters += t.shape.iter().product::<usize>();
    }
    ModelInfo { format: "gguf".into(), tensor_count: file.tensors.len(), dtypes, parameters }
}

fn safetensors_info(dir: &Path) -> Result<ModelInfo> {
    let mut dtypes = std::collections::BTreeMap::new();
    let (mut parameters, mut tensor_count) = (0, 0);
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| ModelError::InvalidSafetensors { path: path.clone(), reason: e.to_string() })?;
        for (_, view) in st.tensors() {
            tensor_count += 1;
            parameters += view.shape().iter().product::<usize>();
            *dtypes.entry(format!("{:?}", view.dtype())).or_insert(0) += 1;
        }
    }
    Ok(ModelInfo { format: "safetensors".into(), tensor_count, dtypes, parameters })
}

/// Loads a model from a `.gguf` file or a HF folder (`config.json`, `*.safetensors`,
/// `tokenizer.json`) onto `device`, with dense copies of the weights (as [`load_as`]).
///
/// # Errors
/// [`ModelError::ModelNotFound`] for a missing path, format errors
/// ([`ModelError::InvalidGguf`], [`ModelError::InvalidSafetensors`],
/// [`ModelError::UnsupportedTensorType`]), [`ModelError::Config`],
/// [`ModelError::ShapeMismatch`], [`ModelError::MissingTensor`], [`ModelError::Tokenizer`].
pub fn load<B: Backend>(path: &Path, device: &B::Device) -> Result<LoadedModel<B>> {
    load_as(path, device, None)
}

/// As [`load`], with the weights (and so the activations and the KV cache) in `dtype` on the
/// device: `Some(DType::F16)` or `Some(DType::BF16)` halve the KV cache on backends that support
/// them (flex, cuda); `None` = the backend's default float type (f32). Attention sums and
/// presses' scores compute in f32 ([`kvc_core::kernels::in_f32`] on backends without a
/// half-precision kernel; flex reads half caches in place, [`kvc_core::kernels::host`]).
/// Loads dense copies of every matrix ([`model::WeightStorage::Dense`], a GGUF's codes kept
/// beside them for decode steps); [`load_with`] holds a GGUF's matrices as their codes only.
///
/// # Errors
/// As [`load`].
pub fn load_as<B: Backend>(path: &Path, device: &B::Device, dtype: Option<DType>) -> Result<LoadedModel<B>> {
    load_source(path, |config, source| Decoder::from_source_as(config, source, device, dtype))
}

/// Opens `path` and builds its decoder with `build` (config, weights), with the tokenizer and
/// file info beside it.
fn load_source<B: Backend>(path: &Path, build: impl FnOnce(&ModelConfig, &dyn weights::WeightSource) -> Result<Decoder<B>>) -> Result<LoadedModel<B>> {
    let (config, info, tokenizer, source): (_, _, _, Box<dyn weights::WeightSource>) = match open_source(path)? {
        Source::Gguf(file) => {
            let config = ModelConfig::from_gguf(&file)?;
            let (info, tokenizer) = (gguf_info(&file), Tokenizer::from_gguf(&file)?);
            let source = weights::GgufWeights::new(file, config.architecture, config.num_heads, config.num_kv_heads);
            (config, info, tokenizer, Box::new(source))
        }
        Source::Hf(dir) => {
            let (config, info, tokenizer) = (hf_config(&dir)?, safetensors_info(&dir)?, Tokenizer::from_hf_dir(&dir)?);
            (config, info, tokenizer, Box::new(weights::SafetensorsWeights::open(&dir)?))
        }
    };
    let model = build(&config, source.as_ref())?;
    Ok(LoadedModel { model, tokenizer, config, info })
}

/// As [`load_as`], with the matrices where `storage` puts them ([`model::WeightStorage`]):
/// [`model::WeightStorage::Codes`] holds a GGUF's quantized matrices only as their codes on a
/// backend with the kernels (flex, ndarray), so the process holds about the file's bytes and no
/// dense f32 copy (Qwen2.5-Coder-1.5B `Q4_K_M`: 1.16 GB instead of a 7.1 GB dense f32 copy); elsewhere, and for
/// [`model::WeightStorage::Dense`], it loads as [`load_as`] does. The codes are not kept on a
/// backend without the kernels, nor with [`model::WeightStorage::DenseOnly`].
///
/// # Errors
/// As [`load_as`].
pub fn load_with<B: kvc_core::KvcBackend>(path: &Path, device: &B::Device, dtype: Option<DType>, storage: model::WeightStorage) -> Result<LoadedModel<B>> {
    load_source(path, |config, source| Decoder::from_source_with(config, source, device, dtype, storage))
}

/// Peak resident memory of this process so far, in bytes (Linux `VmHWM` from
/// `/proc/self/status`); `None` where unknown. Reported by `kvc generate --json` per phase and
/// by the benchmarks.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Loads only the tokenizer of a `.gguf` file or HF folder (no weights).
///
/// # Errors
/// As [`load`], minus weight errors.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    match open_source(path)? {
        Source::Gguf(file) => Tokenizer::from_gguf(&file),
        Source::Hf(dir) => Tokenizer::from_hf_dir(&dir),
    }
}

/// Loads only the decoder from a HF folder (no tokenizer needed), e.g. for weight-only tests.
///
/// # Errors
/// As [`load`].
pub fn load_hf_weights<B: Backend>(dir: &Path, config: &ModelConfig, device: &B::Device) -> Result<Decoder<B>> {
    let source = weights::SafetensorsWeights::open(dir)?;
    Decoder::from_source(config, &source, device)
}

/// Loads the decoder and config of a HF folder.
///
/// # Errors
/// As [`load`].
pub fn load_hf_decoder<B: Backend>(dir: &Path, device: &B::Device) -> Result<Decoder<B>> {
    let config = hf_config(dir)?;
    load_hf_weights(dir, &config, device)
}
