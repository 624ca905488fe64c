//! The decoder: Llama / Qwen2 / Qwen3 as burn modules.
//!
//! `x -> embed -> [RMSNorm -> GQA attention (RoPE, KV cache) -> + -> RMSNorm -> SwiGLU MLP -> +] x L
//! -> RMSNorm -> LM head`, as in HF transformers' `modeling_llama.py`, `modeling_qwen2.py`,
//! `modeling_qwen3.py`.

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};
use kvc_core::kernels::observed_attention;
use kvc_core::{AttentionObserver, KvCache, KvcBackend, QuantMatrix};
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::rope;
use crate::weights::WeightSource;

/// Which positions to compute logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every position of the input: `[batch, tokens, vocab]`.
    All,
    /// Only the last position: `[batch, 1, vocab]` (prefill, decode).
    Last,
}

/// Self-attention with grouped KV heads.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[hidden, heads*head_dim]` (+ bias for Qwen2).
    pub q_proj: Linear<B>,
    /// `[hidden, kv_heads*head_dim]`.
    pub k_proj: Linear<B>,
    /// `[hidden, kv_heads*head_dim]`.
    pub v_proj: Linear<B>,
    /// `[heads*head_dim, hidden]`.
    pub o_proj: Linear<B>,
    /// Qwen3 per-head query norm over `head_dim`.
    pub q_norm: Option<RmsNorm<B>>,
    /// Qwen3 per-head key norm over `head_dim`.
    pub k_norm: Option<RmsNorm<B>>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[hidden, intermediate]`.
    pub gate_proj: Linear<B>,
    /// `[hidden, intermediate]`.
    pub up_proj: Linear<B>,
    /// `[intermediate, hidden]`.
    pub down_proj: Linear<B>,
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Attention.
    pub self_attn: Attention<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// MLP.
    pub mlp: Mlp<B>,
}

/// The whole decoder-only model.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// Token embedding `[vocab, hidden]`.
    pub embed_tokens: Embedding<B>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// LM head `[hidden, vocab]` (a materialized transpose of the embedding when tied, so the
    /// matmul never works on a strided view).
    pub lm_head: Linear<B>,
    #[module(skip)]
    config: ModelConfig,
    #[module(skip)]
    inv_freq: Vec<f32>,
    /// Block-quantized copies of the projections for small products (decode), when the source
    /// keeps them so (for any dtype of the dense weights).
    #[module(skip)]
    quantized: Option<Arc<QuantizedWeights>>,
    /// Whether small products use [`Decoder::quantized`] ([`Decoder::set_quantized_decode`]).
    #[module(skip)]
    quantized_decode: bool,
}

/// Products of at most this many rows (tokens x batch) read quantized weights when the model has
/// them: decode steps, and any chunk of at most this many tokens (a short question, the last piece
/// of a chunked prefill, the prefill's last-token LM head); longer inputs are bound by arithmetic,
/// where the dense GEMM is faster.
pub const QUANTIZED_MAX_ROWS: usize = 4;

/// The weights of a GGUF model kept in their blocks of integer codes ([`QuantMatrix`]) beside the
/// dense copies: a decode step's matrix-vector products read 4- or 8-bit codes instead of f32
/// (SmolLM2-135M `Q4_1`/`Q8_0`: ~115 MB instead of 540 MB per token), in f32 arithmetic whatever
/// the model's dtype (f16/bf16 activations are widened and the products rounded back). Used on
/// backends with [`KvcBackend::kvc_quant_linear`] (flex, ndarray; ndarray runs f32 only);
/// [`Decoder::drop_quantized`] frees them.
#[derive(Clone, Debug, Default)]
pub struct QuantizedWeights {
    /// Per layer: `q, k, v, o, gate, up, down` (`None` where the file keeps floats or a block
    /// format without one scale per 32 elements).
    layers: Vec<[Option<QuantMatrix>; 7]>,
    /// The LM head `[vocab, hidden]` (the embedding's codes when tied).
    lm_head: Option<QuantMatrix>,
}

impl QuantizedWeights {
    /// Bytes held by the codes, scales and mins.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().chain([&self.lm_head]).flatten().map(QuantMatrix::bytes).sum()
    }

    /// Matrices held (of `7 x layers + 1`).
    pub fn matrices(&self) -> usize {
        self.layers.iter().flatten().chain([&self.lm_head]).flatten().count()
    }
}

/// `x W_j` for each linear layer of `lins` (all on the same input `x`, `[batch, tokens, in]`):
/// through their block codes in one call ([`KvcBackend::kvc_quant_linear`]: a fused Q/K/V or
/// gate/up product) when `x` has at most [`QUANTIZED_MAX_ROWS`] rows, every layer has codes and
/// the backend has the kernel; otherwise through the dense weights.
fn project<B: KvcBackend, const N: usize>(lins: [(&Linear<B>, Option<&QuantMatrix>); N], x: Tensor<B, 3>) -> [Tensor<B, 3>; N] {
    project_rows(lins, x, QUANTIZED_MAX_ROWS)
}

/// As [`project`], reading the codes for up to `max_rows` rows (a batched decode step: every row
/// is one sequence's token, and the codes are read once for all of them).
fn project_rows<B: KvcBackend, const N: usize>(lins: [(&Linear<B>, Option<&QuantMatrix>); N], x: Tensor<B, 3>, max_rows: usize) -> [Tensor<B, 3>; N] {
    let [b, c, i] = x.dims();
    if b * c <= max_rows {
        if let Some(ws) = lins.iter().map(|(_, w)| *w).collect::<Option<Vec<_>>>() {
            if let Some(y) = B::kvc_quant_linear(x.clone().reshape([b * c, i]), &ws) {
                let mut start = 0;
                return lins.map(|(lin, w)| {
                    let rows = w.map_or(0, QuantMatrix::rows);
                    let part = if N == 1 { y.clone() } else { y.clone().narrow(1, start, rows) };
                    start += rows;
                    let part = part.reshape([b, c, rows]);
                    match &lin.bias {
                        Some(bias) => part + bias.val().reshape([1, 1, rows]),
                        None => part,
                    }
                });
            }
        }
    }
    lins.map(|(lin, _)| {
        let Some(y) = B::kvc_linear(x.clone().reshape([b * c, i]), &lin.weight.val()) else {
            return lin.forward(x.clone());
        };
        let out = y.dims()[1];
        let y = y.reshape([b, c, out]);
        match &lin.bias {
            Some(bias) => y + bias.val().reshape([1, 1, out]),
            None => y,
        }
    })
}

/// `norm(x)` through [`KvcBackend::kvc_rms_norm`] (the host kernel on flex).
fn norm<B: KvcBackend, const D: usize>(norm: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    B::kvc_rms_norm(x, norm.gamma.val(), norm.epsilon)
}

struct Loader<'a, B: Backend> {
    source: &'a dyn WeightSource,
    device: &'a B::Device,
    /// The weights' float dtype on the device; `None` = the backend's default.
    dtype: Option<DType>,
}

impl<B: Backend> Loader<'_, B> {
    fn host(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (data, shape) = self.source.tensor(name)?;
        if shape != expected {
            return Err(ModelError::ShapeMismatch { name: name.into(), expected: expected.to_vec(), actual: shape });
        }
        if let Some(index) = data.iter().position(|x| !x.is_finite()) {
            return Err(ModelError::NonFiniteWeight { name: name.into(), index, value: data[index] });
        }
        Ok(data)
    }

    /// Host f32 values as a device tensor in the loader's dtype.
    fn tensor<const D: usize>(&self, data: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
        let data = TensorData::new(data, shape);
        match self.dtype {
            Some(dtype) => Tensor::from_data(data, (self.device, dtype)),
            None => Tensor::from_data(data, self.device),
        }
    }

    fn vector(&self, name: &str, len: usize) -> Result<Param<Tensor<B, 1>>> {
        let data = self.host(name, &[len])?;
        Ok(Param::from_tensor(self.tensor(data, [len])))
    }

    /// A linear layer from a PyTorch `[out, in]` weight (transposed to burn's `[in, out]`).
    fn linear(&self, prefix: &str, input: usize, output: usize, bias: bool) -> Result<Linear<B>> {
        let w = self.host(&format!("{prefix}.weight"), &[output, input])?;
        let weight = Param::from_tensor(self.tensor(transpose(&w, output, input), [input, output]));
        let bias = if bias { Some(self.vector(&format!("{prefix}.bias"), output)?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// The source's block codes of `name` when the shape is `[output, input]` (for any dtype: the
    /// host kernels widen f16/bf16 rows to f32 and round the product back).
    fn quantized(&self, name: &str, input: usize, output: usize) -> Option<QuantMatrix> {
        self.source.quantized(name).filter(|w| w.rows() == output && w.cols() == input)
    }

    fn norm(&self, name: &str, len: usize, eps: f64) -> Result<RmsNorm<B>> {
        Ok(RmsNorm { gamma: self.vector(name, len)?, epsilon: eps })
    }
}

fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

impl<B: Backend> Decoder<B> {
    /// Builds the decoder from a weight source (HF tensor names, PyTorch layout), checking every
    /// tensor's shape against `config`.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`], [`ModelError::ShapeMismatch`],
    /// [`ModelError::NonFiniteWeight`] for a NaN or infinite weight, format errors of the source,
    /// [`ModelError::Config`] for an inconsistent config.
    pub fn from_source(config: &ModelConfig, source: &dyn WeightSource, device: &B::Device) -> Result<Self> {
        Self::from_source_as(config, source, device, None)
    }

    /// As [`Decoder::from_source`], with the weights in `dtype` on the device (`None`: the
    /// backend's default float type, f32 for burn's backends). Activations and the KV cache follow
    /// the weights' dtype (`F16`/`BF16` halve the cache); weights are dequantized to f32 on the
    /// host first and rounded once.
    ///
    /// # Errors
    /// As [`Decoder::from_source`].
    pub fn from_source_as(config: &ModelConfig, source: &dyn WeightSource, device: &B::Device, dtype: Option<DType>) -> Result<Self> {
        config.validate()?;
        let l = Loader::<B> { source, device, dtype };
        let c = config;
        let (h, d, eps) = (c.hidden_size, c.head_dim, c.rms_norm_eps);
        let embed = l.host("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head_weight = if c.tie_word_embeddings {
            transpose(&embed, c.vocab_size, h)
        } else {
            transpose(&l.host("lm_head.weight", &[c.vocab_size, h])?, c.vocab_size, h)
        };
        let embed_tokens = Embedding {
            weight: Param::from_tensor(l.tensor(embed, [c.vocab_size, h])),
        };
        let lm_head = Linear {
            weight: Param::from_tensor(l.tensor(lm_head_weight, [h, c.vocab_size])),
            bias: None,
        };
        let head_name = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let mut quantized = QuantizedWeights { layers: Vec::new(), lm_head: l.quantized(head_name, h, c.vocab_size) };
        // grows with the tensors found (the config's count is checked against them, not trusted)
        let mut layers = Vec::new();
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let (q_norm, k_norm) = if c.qk_norm {
                (Some(l.norm(&format!("{a}.q_norm.weight"), d, eps)?), Some(l.norm(&format!("{a}.k_norm.weight"), d, eps)?))
            } else {
                (None, None)
            };
            layers.push(DecoderLayer {
                input_layernorm: l.norm(&format!("{p}.input_layernorm.weight"), h, eps)?,
                self_attn: Attention {
                    q_proj: l.linear(&format!("{a}.q_proj"), h, c.num_heads * d, c.attention_bias)?,
                    k_proj: l.linear(&format!("{a}.k_proj"), h, c.num_kv_heads * d, c.attention_bias)?,
                    v_proj: l.linear(&format!("{a}.v_proj"), h, c.num_kv_heads * d, c.attention_bias)?,
                    o_proj: l.linear(&format!("{a}.o_proj"), c.num_heads * d, h, false)?,
                    q_norm,
                    k_norm,
                    num_heads: c.num_heads,
                    num_kv_heads: c.num_kv_heads,
                    head_dim: d,
                },
                post_attention_layernorm: l.norm(&format!("{p}.post_attention_layernorm.weight"), h, eps)?,
                mlp: Mlp {
                    gate_proj: l.linear(&format!("{p}.mlp.gate_proj"), h, c.intermediate_size, false)?,
                    up_proj: l.linear(&format!("{p}.mlp.up_proj"), h, c.intermediate_size, false)?,
                    down_proj: l.linear(&format!("{p}.mlp.down_proj"), c.intermediate_size, h, false)?,
                },
            });
            let (qd, kvd, im) = (c.num_heads * d, c.num_kv_heads * d, c.intermediate_size);
            quantized.layers.push([
                l.quantized(&format!("{a}.q_proj.weight"), h, qd),
                l.quantized(&format!("{a}.k_proj.weight"), h, kvd),
                l.quantized(&format!("{a}.v_proj.weight"), h, kvd),
                l.quantized(&format!("{a}.o_proj.weight"), qd, h),
                l.quantized(&format!("{p}.mlp.gate_proj.weight"), h, im),
                l.quantized(&format!("{p}.mlp.up_proj.weight"), h, im),
                l.quantized(&format!("{p}.mlp.down_proj.weight"), im, h),
            ]);
        }
        let norm = l.norm("model.norm.weight", h, eps)?;
        let quantized = (quantized.matrices() > 0).then(|| Arc::new(quantized));
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config: config.clone(),
            inv_freq: rope::inv_freq(config),
            quantized_decode: quantized.is_some(),
            quantized,
        })
    }

    /// The block-quantized weights kept for decode, if the source had any ([`QuantizedWeights`]).
    pub fn quantized(&self) -> Option<&QuantizedWeights> {
        self.quantized.as_deref()
    }

    /// Whether products of at most [`QUANTIZED_MAX_ROWS`] rows (decode steps) read the
    /// quantized weights (on by default when there are any; the logits then differ from the
    /// dense f32 product only by f32 rounding of the sums). Off: every product uses the dense
    /// weights (the codes stay, to be turned on again).
    pub fn set_quantized_decode(&mut self, on: bool) {
        self.quantized_decode = on && self.quantized.is_some();
    }

    /// Frees the quantized weights (every product then uses the dense ones): for a backend
    /// without [`KvcBackend::kvc_quant_linear`], or an app that never wants them.
    pub fn drop_quantized(&mut self) {
        self.quantized = None;
        self.quantized_decode = false;
    }

    /// The float dtype of the weights on the device, which the activations and the KV cache share
    /// (F32 unless loaded with [`Decoder::from_source_as`] in F16 / BF16).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.weight.val().dtype()
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device holding the weights.
    pub fn device(&self) -> B::Device {
        self.embed_tokens.weight.device()
    }

    /// An empty KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.config.num_layers)
    }

    /// A fingerprint of the model: 16 hex digits of a 64-bit FNV-1a hash over the config (JSON)
    /// and the bits of the weights that make its keys and values (the first 64 rows of the
    /// embedding, layer 0's K and V projections, the last layer's K and V projections), in the
    /// weights' dtype. A saved KV cache records it ([`kvc_core::CacheHeader::model`]) so that it
    /// is never read by another model: any fine-tune changes those weights; the same file loaded
    /// twice gives the same fingerprint on every backend that holds the same dtype.
    ///
    /// Reads those weights back from the device (about 1 MB for SmolLM2-135M).
    pub fn fingerprint(&self) -> String {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut hash = OFFSET;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                hash = (hash ^ b as u64).wrapping_mul(PRIME);
            }
        };
        eat(serde_json::to_string(&self.config).unwrap_or_default().as_bytes());
        let rows = self.config.vocab_size.min(64);
        eat(self.embed_tokens.weight.val().narrow(0, 0, rows).into_data().as_bytes());
        let first = self.layers.first().map(|l| &l.self_attn);
        let last = self.layers.last().map(|l| &l.self_attn);
        for attn in first.into_iter().chain(last) {
            for proj in [&attn.k_proj, &attn.v_proj] {
                eat(proj.weight.val().into_data().as_bytes());
                if let Some(b) = &proj.bias {
                    eat(b.val().into_data().as_bytes());
                }
            }
        }
        format!("{hash:016x}")
    }
}

impl<B: KvcBackend> Decoder<B> {
    /// Whether decode steps read quantized weights: the model has them, they are on
    /// ([`Decoder::set_quantized_decode`]) and the backend has the kernel
    /// ([`KvcBackend::kvc_has_quant_linear`]).
    pub fn quantized_decode(&self) -> bool {
        self.quantized_decode && B::kvc_has_quant_linear()
    }

    /// The quantized matrix `index` (`q, k, v, o, gate, up, down`) of `layer` when in use.
    fn quant(&self, layer: usize, index: usize) -> Option<&QuantMatrix> {
        let q = self.quantized.as_deref().filter(|_| self.quantized_decode())?;
        q.layers.get(layer)?.get(index)?.as_ref()
    }

    /// Feeds `ids` (batch 1) into `cache` in chunks of at most `chunk` tokens without computing
    /// logits: a context prefill before compression, or a press's scoring pass (with an
    /// observer, which sees every chunk of every layer).
    ///
    /// # Errors
    /// Errors of the forward pass.
    pub fn feed(&self, ids: &[u32], cache: &mut KvCache<B>, mut observer: Option<&mut dyn AttentionObserver<B>>, chunk: usize) -> Result<()> {
        let device = self.embed_tokens.weight.device();
        cache.reserve(ids.len());
        for part in ids.chunks(chunk.max(1)) {
            let obs = observer.as_mut().map(|o| &mut **o as &mut dyn AttentionObserver<B>);
            self.forward_layers(crate::generate::token_tensor::<B>(part, &device), cache, obs, false)?;
        }
        Ok(())
    }

    /// Feeds `ids` (batch 1) into `cache` in chunks of `chunk` tokens and returns the logits of the
    /// last position `[1, 1, vocab]`.
    ///
    /// # Errors
    /// [`ModelError::EmptyPrompt`], errors of the forward pass.
    pub fn prefill(&self, ids: &[u32], cache: &mut KvCache<B>, mut observer: Option<&mut dyn AttentionObserver<B>>, chunk: usize) -> Result<Tensor<B, 3>> {
        if ids.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        let chunk = chunk.max(1);
        cache.reserve(ids.len());
        let last = (ids.len() - 1) / chunk * chunk;
        self.feed(&ids[..last], cache, observer.as_mut().map(|o| &mut **o as &mut dyn AttentionObserver<B>), chunk)?;
        let device = self.embed_tokens.weight.device();
        self.forward(crate::generate::token_tensor::<B>(&ids[last..], &device), cache, observer, Logits::Last)
    }

    /// Runs `tokens` (`[batch, chunk]`) through the decoder at positions
    /// `cache.next_position()..+chunk`, appending their keys/values to `cache`, and returns
    /// logits `[batch, n, vocab]` for the positions `logits` asks for.
    ///
    /// Every key already in the cache is visible to every new token (they all precede it); the
    /// chunk itself is causal. For long prompts call this per chunk (see [`Decoder::prefill`]) so
    /// no `chunk x len` score tensor grows beyond one chunk.
    /// The observer, if any, sees each layer's queries/keys/values (and attention if it asks).
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        observer: Option<&mut dyn AttentionObserver<B>>,
        logits: Logits,
    ) -> Result<Tensor<B, 3>> {
        let chunk = tokens.dims()[1];
        let x = self.forward_hidden(tokens, cache, observer)?;
        let x = match logits {
            Logits::All => x,
            Logits::Last => x.narrow(1, chunk - 1, 1),
        };
        let head = self.quantized.as_deref().filter(|_| self.quantized_decode()).and_then(|q| q.lm_head.as_ref());
        let [logits] = project([(&self.lm_head, head)], norm(&self.norm, x));
        Ok(logits)
    }

    /// One decode step of `tokens.len()` sequences, each on its own KV cache: `tokens[i]` is fed
    /// at `caches[i].next_position()` and appended to `caches[i]` (its own length, per-layer
    /// lengths, per-head masks and positions), and the logits of each are returned, `[n, vocab]`
    /// (row `i` for sequence `i`).
    ///
    /// Every linear layer and the LM head run once for the `n` rows (`[n, hidden]` products; on a
    /// GGUF model the quantized blocks are read once per step for all rows: [`QuantMatrix`]);
    /// RoPE at each sequence's own position; attention per sequence over its own cache. A row's
    /// logits do not depend on the others: with quantized decode they are bit for bit those of
    /// [`Decoder::forward`] on that sequence alone (the products keep each row's order of sums);
    /// on dense weights they differ by the GEMM's rounding only.
    ///
    /// # Errors
    /// [`ModelError::Generation`] when `tokens` is empty or its length differs from `caches`',
    /// cache errors (a cache of another model's shape).
    pub fn forward_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache<B>]) -> Result<Tensor<B, 2>> {
        let n = tokens.len();
        if n == 0 || n != caches.len() {
            return Err(ModelError::Generation(format!("a batched step needs one token per cache ({n} tokens, {} caches)", caches.len())));
        }
        let device = self.embed_tokens.weight.device();
        let c = &self.config;
        let dtype = self.embed_tokens.weight.val().dtype();
        let positions: Vec<usize> = caches.iter().map(|cache| cache.next_position()).collect();
        let rope_q = rope::tables_at::<B>(&self.inv_freq, positions.iter().copied(), c.num_heads, &device, dtype);
        let rope_k = rope::tables_at::<B>(&self.inv_freq, positions.iter().copied(), c.num_kv_heads, &device, dtype);
        // the n tokens as one chunk of a batch of 1: `[1, n, hidden]` rows for the products
        let mut x = self.embed_tokens.forward(crate::generate::token_tensor::<B>(tokens, &device));
        for (i, layer) in self.layers.iter().enumerate() {
            let h = norm(&layer.input_layernorm, x.clone());
            let quant = [0, 1, 2, 3].map(|j| self.quant(i, j));
            let a = layer.self_attn.forward_batch(h, i, &rope_q, &rope_k, caches, quant)?;
            let x1 = x + a;
            let h = norm(&layer.post_attention_layernorm, x1.clone());
            let m = &layer.mlp;
            let [gate, up] = project_rows([(&m.gate_proj, self.quant(i, 4)), (&m.up_proj, self.quant(i, 5))], h, usize::MAX);
            let [ff] = project_rows([(&m.down_proj, self.quant(i, 6))], B::kvc_swiglu(gate, up), usize::MAX);
            x = x1 + ff;
        }
        for cache in caches.iter_mut() {
            cache.advance(1);
        }
        let head = self.quantized.as_deref().filter(|_| self.quantized_decode()).and_then(|q| q.lm_head.as_ref());
        let [logits] = project_rows([(&self.lm_head, head)], norm(&self.norm, x), usize::MAX);
        Ok(logits.reshape([n, c.vocab_size]))
    }

    /// As [`forward`](Self::forward), but returns the last layer's hidden states
    /// `[batch, chunk, hidden]` (before the final norm) and computes no logits. (Prefill chunks
    /// and presses' scoring passes go through [`Decoder::feed`], which also skips the last
    /// layer's output.)
    pub fn forward_hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        observer: Option<&mut dyn AttentionObserver<B>>,
    ) -> Result<Tensor<B, 3>> {
        let out = self.forward_layers(tokens, cache, observer, true)?;
        out.ok_or_else(|| ModelError::Config("the decoder has no layers".into()))
    }

    /// The layers over `tokens`; with `output` false (a feed: only the KV cache and the
    /// observer's view matter) the last layer stops once it has what they need: its keys and
    /// values without an observer (no queries, attention, output projection or MLP), its
    /// attention with one (no output projection or MLP), and `None` is returned.
    fn forward_layers(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        mut observer: Option<&mut dyn AttentionObserver<B>>,
        output: bool,
    ) -> Result<Option<Tensor<B, 3>>> {
        let [_, chunk] = tokens.dims();
        let device = tokens.device();
        let first = cache.next_position();
        // RoPE tables laid out like the projections' output `[1, chunk, heads, head_dim]`
        let c = &self.config;
        let dtype = self.embed_tokens.weight.val().dtype();
        let rope_q = rope::tables::<B>(&self.inv_freq, first, chunk, c.num_heads, &device, dtype);
        let rope_k = rope::tables::<B>(&self.inv_freq, first, chunk, c.num_kv_heads, &device, dtype);
        let mut x = Some(self.embed_tokens.forward(tokens));
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let Some(xi) = x.take() else { break };
            let h = norm(&layer.input_layernorm, xi.clone());
            let quant = [0, 1, 2, 3].map(|j| self.quant(i, j));
            let obs = observer.as_mut().map(|o| &mut **o as &mut dyn AttentionObserver<B>);
            let part = if output || i < last { AttentionPart::Output } else if obs.is_some() { AttentionPart::Attention } else { AttentionPart::KeysValues };
            let Some(a) = layer.self_attn.forward(h, i, first, &rope_q, &rope_k, cache, obs, quant, part)? else { break };
            let x1 = xi + a;
            let h = norm(&layer.post_attention_layernorm, x1.clone());
            let m = &layer.mlp;
            let [gate, up] = project([(&m.gate_proj, self.quant(i, 4)), (&m.up_proj, self.quant(i, 5))], h);
            let [ff] = project([(&m.down_proj, self.quant(i, 6))], B::kvc_swiglu(gate, up));
            x = Some(x1 + ff);
        }
        cache.advance(chunk);
        Ok(x)
    }
}

/// How much of a layer's attention to compute.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AttentionPart {
    /// Keys and values into the cache, output projected (every layer of a forward pass).
    Output,
    /// Keys and values into the cache and the attention shown to the observer; no output.
    Attention,
    /// Keys and values into the cache only.
    KeysValues,
}

impl<B: KvcBackend> Attention<B> {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: Tensor<B, 3>,
        layer: usize,
        first: usize,
        rope_q: &(Tensor<B, 4>, Tensor<B, 4>),
        rope_k: &(Tensor<B, 4>, Tensor<B, 4>),
        cache: &mut KvCache<B>,
        observer: Option<&mut dyn AttentionObserver<B>>,
        quant: [Option<&QuantMatrix>; 4],
        part: AttentionPart,
    ) -> Result<Option<Tensor<B, 3>>> {
        let [b, c, _] = x.dims();
        let (hq, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // [b, c, heads * d] -> [b, c, heads, d]; RoPE (and Qwen3's q/k norm) work in this contiguous
        // layout, then heads move to dim 1
        let split = |t: Tensor<B, 3>, heads: usize| t.reshape([b, c, heads, d]);
        if part == AttentionPart::KeysValues {
            let [k, v] = project([(&self.k_proj, quant[1]), (&self.v_proj, quant[2])], x);
            let mut k = split(k, hkv);
            if let Some(kn) = &self.k_norm {
                k = norm(kn, k);
            }
            let k = rope::apply(k, &rope_k.0, &rope_k.1).swap_dims(1, 2);
            cache.append_with(layer, first, k, split(v, hkv).swap_dims(1, 2), B::kvc_write_slots)?;
            return Ok(None);
        }
        let [q, k, v] = project([(&self.q_proj, quant[0]), (&self.k_proj, quant[1]), (&self.v_proj, quant[2])], x);
        let (mut q, mut k) = (split(q, hq), split(k, hkv));
        let v = split(v, hkv).swap_dims(1, 2);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = norm(qn, q);
            k = norm(kn, k);
        }
        let q_pre_rope = q.clone();
        let q = rope::apply(q, &rope_q.0, &rope_q.1).swap_dims(1, 2);
        let k = rope::apply(k, &rope_k.0, &rope_k.1).swap_dims(1, 2);
        let (keys, values) = cache.append_with(layer, first, k, v, B::kvc_write_slots)?;
        // per-head budgets leave padded slots in the cache: the kernel masks them out
        let valid = cache.layer(layer)?.and_then(|kv| kv.valid.as_deref());
        let out = observed_attention(observer, layer, first, q, || q_pre_rope.swap_dims(1, 2), keys, values, valid, B::kvc_attention);
        let out = out.swap_dims(1, 2).reshape([b, c, hq * d]);
        if part == AttentionPart::Attention {
            return Ok(None);
        }
        let [out] = project([(&self.o_proj, quant[3])], out);
        Ok(Some(out))
    }
}

impl<B: KvcBackend> Attention<B> {
    /// A batched decode step's attention ([`Decoder::forward_batch`]): `x` `[1, n, hidden]` (row
    /// `s` = sequence `s`'s token), RoPE tables `[1, n, heads, head_dim]` at each sequence's
    /// position; row `s`'s key and value go to `caches[s]` and its query attends over that cache
    /// alone. Returns `[1, n, hidden]`.
    #[allow(clippy::too_many_arguments)]
    fn forward_batch(
        &self,
        x: Tensor<B, 3>,
        layer: usize,
        rope_q: &(Tensor<B, 4>, Tensor<B, 4>),
        rope_k: &(Tensor<B, 4>, Tensor<B, 4>),
        caches: &mut [&mut KvCache<B>],
        quant: [Option<&QuantMatrix>; 4],
    ) -> Result<Tensor<B, 3>> {
        let [_, n, _] = x.dims();
        let (hq, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v] = project_rows([(&self.q_proj, quant[0]), (&self.k_proj, quant[1]), (&self.v_proj, quant[2])], x, usize::MAX);
        let (mut q, mut k, v) = (q.reshape([1, n, hq, d]), k.reshape([1, n, hkv, d]), v.reshape([1, n, hkv, d]));
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = norm(qn, q);
            k = norm(kn, k);
        }
        let q = rope::apply(q, &rope_q.0, &rope_q.1);
        let k = rope::apply(k, &rope_k.0, &rope_k.1);
        let mut outs = Vec::with_capacity(n);
        for (s, cache) in caches.iter_mut().enumerate() {
            // `[1, 1, heads, d]` rows, heads moved to dim 1 as in `forward`
            let row = |t: &Tensor<B, 4>| t.clone().narrow(1, s, 1).swap_dims(1, 2);
            let first = cache.next_position();
            let (keys, values) = cache.append_with(layer, first, row(&k), row(&v), B::kvc_write_slots)?;
            let valid = cache.layer(layer)?.and_then(|kv| kv.valid.as_deref());
            let out = B::kvc_attention(kvc_core::kernels::AttentionArgs { queries: row(&q), keys, values, valid, reduce: None, probs: false }).output;
            outs.push(out.swap_dims(1, 2).reshape([1, 1, hq * d]));
        }
        let [out] = project_rows([(&self.o_proj, quant[3])], Tensor::cat(outs, 1), usize::MAX);
        Ok(out)
    }
}

impl<B: KvcBackend> kvc_core::ForwardModel<B> for Decoder<B> {
    fn num_layers(&self) -> usize {
        self.config.num_layers
    }
    fn num_heads(&self) -> usize {
        self.config.num_heads
    }
    fn num_kv_heads(&self) -> usize {
        self.config.num_kv_heads
    }
    fn rope_inv_freq(&self) -> Vec<f32> {
        self.inv_freq.clone()
    }
    fn feed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        observer: &mut dyn AttentionObserver<B>,
        chunk: usize,
    ) -> std::result::Result<(), kvc_core::CoreError> {
        Decoder::feed(self, tokens, cache, Some(observer), chunk).map_err(|e| kvc_core::CoreError::Model(e.to_string()))
    }
}
