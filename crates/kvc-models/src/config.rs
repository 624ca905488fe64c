//! Decoder configuration, from a HF `config.json` or from GGUF metadata.

use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufValue};

/// Decoder family. All share RMSNorm, RoPE (rotate-half), GQA attention and a SwiGLU MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM2.
    Llama,
    /// Qwen2 / Qwen2.5: biases on q, k, v projections.
    Qwen2,
    /// Qwen3: per-head RMSNorm on queries and keys before RoPE.
    Qwen3,
}

impl Architecture {
    /// Parses HF `model_type` / GGUF `general.architecture`.
    ///
    /// # Errors
    /// [`ModelError::UnsupportedArchitecture`].
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }
}

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    /// Llama 3.x scaling (HF `rope_type: "llama3"`, `_compute_llama3_parameters`).
    Llama3 {
        /// Overall factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context length the base model was trained with.
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors (GGUF `rope_freqs.weight`, how llama.cpp stores llama3 scaling).
    FreqFactors(Vec<f32>),
}

/// Everything the decoder needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// Decoder family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA groups).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Trained context length (tokens).
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2).
    pub attention_bias: bool,
    /// Per-head q/k RMSNorm (Qwen3).
    pub qk_norm: bool,
}

/// The largest size kvc accepts for any config dimension (vocabulary, hidden, layers, heads, ...):
/// 2^24, far above real models, low enough that no product of two sizes overflows or sizes an
/// allocation the weights could not back.
pub const MAX_SIZE: usize = 1 << 24;

impl ModelConfig {
    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Checks internal consistency.
    ///
    /// # Errors
    /// [`ModelError::Config`] naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
            if v > MAX_SIZE {
                return bad(format!("{name} is {v}, more than kvc supports ({MAX_SIZE})"));
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return bad(format!("{} attention heads not divisible by {} KV heads", self.num_heads, self.num_kv_heads));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim {} is odd (RoPE needs pairs)", self.head_dim));
        }
        if !(self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} is not positive", self.rope_theta));
        }
        if let Some(RopeScaling::FreqFactors(f)) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return bad(format!("rope_freqs has {} factors, head_dim/2 is {}", f.len(), self.head_dim / 2));
            }
        }
        Ok(())
    }

    /// Reads a HF `config.json` (as text).
    ///
    /// # Errors
    /// [`ModelError::Config`] for malformed JSON or missing fields,
    /// [`ModelError::UnsupportedArchitecture`].
    pub fn from_hf_json(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Raw {
            model_type: String,
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            rms_norm_eps: Option<f64>,
            rope_theta: Option<f64>,
            rope_scaling: Option<serde_json::Value>,
            rope_parameters: Option<serde_json::Value>,
            max_position_embeddings: Option<usize>,
            tie_word_embeddings: Option<bool>,
            attention_bias: Option<bool>,
        }
        let raw: Raw = serde_json::from_str(text).map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let architecture = Architecture::parse(&raw.model_type)?;
        // transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x `rope_scaling`.
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref()).filter(|v| !v.is_null());
        let rope_theta = raw
            .rope_theta
            .or_else(|| rope.and_then(|r| r.get("rope_theta")).and_then(serde_json::Value::as_f64))
            .unwrap_or(10000.0);
        let rope_scaling = match rope {
            None => None,
            Some(r) => {
                let kind = r.get("rope_type").or_else(|| r.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| {
                            r.get(k).and_then(serde_json::Value::as_f64).ok_or_else(|| {
                                ModelError::Config(format!("rope_scaling llama3 needs {k}"))
                            })
                        };
                        Some(RopeScaling::Llama3 {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f("original_max_position_embeddings")?,
                        })
                    }
                    other => return Err(ModelError::Config(format!("unsupported rope scaling type {other:?}"))),
                }
            }
        };
        let cfg = Self {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(architecture == Architecture::Qwen2),
            qk_norm: architecture == Architecture::Qwen3,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the config from GGUF metadata (`general.architecture` and `{arch}.*` keys) and the
    /// tensor directory (vocab size, tied LM head, rope_freqs).
    ///
    /// # Errors
    /// [`ModelError::Config`] for a missing key, [`ModelError::UnsupportedArchitecture`].
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch_name = file
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| ModelError::Config("GGUF has no general.architecture".into()))?
            .to_string();
        let architecture = Architecture::parse(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &str| -> Result<usize> {
            file.get(&key(k))
                .and_then(GgufValue::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Config(format!("GGUF metadata {} missing", key(k))))
        };
        let float = |k: &str| file.get(&key(k)).and_then(GgufValue::as_f64);
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let embd = file.tensor_info("token_embd.weight").ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let vocab_size = embd.shape.first().copied().unwrap_or(0);
        let head_dim = int("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let rope_scaling = match file.tensor_info("rope_freqs.weight") {
            Some(_) => Some(RopeScaling::FreqFactors(file.tensor_f32("rope_freqs.weight")?.0)),
            None => None,
        };
        let cfg = Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads: int("attention.head_count_kv").unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            rope_theta: float("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: int("context_length").unwrap_or(2048),
            tie_word_embeddings: file.tensor_info("output.weight").is_none(),
            attention_bias: file.tensor_info("blk.0.attn_q.bias").is_some(),
            qk_norm: file.tensor_info("blk.0.attn_q_norm.weight").is_some(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
