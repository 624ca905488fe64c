//! The decoder: Llama / Qwen2 / Qwen3 as burn modules.
//!
//! `x -> embed -> [RMSNorm -> GQA attention (RoPE, KV cache) -> + -> RMSNorm -> SwiGLU MLP -> +] x L
//! -> RMSNorm -> LM head`, as in HF transformers' `modeling_llama.py`, `modeling_qwen2.py`,
//! `modeling_qwen3.py`.

use burn::module::{Module, Param};
use burn::nn::{Embedding, RmsNorm};
use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};
use kvc_core::kernels::observed_attention;
use kvc_core::Activations;
use kvc_core::{AttentionObserver, KvCache, KvcBackend, QuantMatrix};
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::rope;
use crate::weights::WeightSource;

/// What a front end prints when [`Decoder::enable_int8_activations`] returns `false`.
pub const INT8_PLAIN_LOOPS_WARNING: &str = "this CPU has neither AVX2+FMA nor AVX-512 VNNI: --int8-activations runs plain loops (the same numbers up to the order of f32 sums), likely slower than the default";

/// Which positions to compute logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every position of the input: `[batch, tokens, vocab]`.
    All,
    /// Only the last position: `[batch, 1, vocab]` (prefill, decode).
    Last,
}

/// A linear layer `y = x W^T + b`: the weight dense on the device (burn's `Linear` layout
/// `[in, out]`), or held only in the file's blocks of codes ([`QuantizedWeights`], a model
/// loaded with [`WeightStorage::Codes`]).
#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    /// `[in, out]`; `None` when only the codes are held.
    pub weight: Option<Param<Tensor<B, 2>>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

/// Where a model's matrices live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightStorage {
    /// Dense copies in the model's dtype on the device (every backend); a GGUF's blocks of codes
    /// kept beside them for decode steps where the backend has the kernel. Prefill chunks
    /// multiply the dense copies. (`kvc-bench speed`, `compress` and `eval` with `--dense-weights`.)
    Dense,
    /// Dense copies only: every product, decode steps too, multiplies them; the codes are
    /// dropped after loading. (`kvc generate --dense-weights`, `kvc serve --dense-weights`.)
    DenseOnly,
    /// A GGUF's blocks of codes only, as the file holds them ([`QuantMatrix`]): no dense copy of
    /// any quantized matrix (the embedding included: rows are dequantized per token); decode
    /// reads the codes, prefill chunks multiply dequantized tiles ([`kvc_core::kernels::quant::matmul`]).
    /// Matrices the file keeps as floats stay dense. Needs a backend with
    /// [`KvcBackend::kvc_has_quant_linear`] (flex, ndarray); elsewhere the model loads dense.
    #[default]
    Codes,
}

impl WeightStorage {
    /// [`WeightStorage::Dense`] when `dense` (a `--dense-weights` flag), else
    /// [`WeightStorage::Codes`].
    pub fn dense_if(dense: bool) -> Self {
        if dense {
            Self::Dense
        } else {
            Self::Codes
        }
    }

    /// [`WeightStorage::DenseOnly`] when `dense`, else [`WeightStorage::Codes`].
    pub fn dense_only_if(dense: bool) -> Self {
        if dense {
            Self::DenseOnly
        } else {
            Self::Codes
        }
    }
}

/// Self-attention with grouped KV heads.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[hidden, heads*head_dim]` (+ bias for Qwen2).
    pub q_proj: Projection<B>,
    /// `[hidden, kv_heads*head_dim]`.
    pub k_proj: Projection<B>,
    /// `[hidden, kv_heads*head_dim]`.
    pub v_proj: Projection<B>,
    /// `[heads*head_dim, hidden]`.
    pub o_proj: Projection<B>,
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
    pub gate_proj: Projection<B>,
    /// `[hidden, intermediate]`.
    pub up_proj: Projection<B>,
    /// `[intermediate, hidden]`.
    pub down_proj: Projection<B>,
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

impl<B: Backend> DecoderLayer<B> {
    /// The layer's matrices in the order of [`QuantizedWeights`]: `q, k, v, o, gate, up, down`.
    pub fn projections(&self) -> [&Projection<B>; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }
}

/// The whole decoder-only model.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// Token embedding `[vocab, hidden]` (`None` when only its codes are held:
    /// [`WeightStorage::Codes`]).
    pub embed_tokens: Option<Embedding<B>>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// LM head `[hidden, vocab]` (a materialized transpose of the embedding when tied, so the
    /// matmul never works on a strided view).
    pub lm_head: Projection<B>,
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
    /// How products on the codes take the activations ([`Decoder::set_activations`]).
    #[module(skip)]
    activations: Activations,
    /// How products on the codes of several tokens per sequence take the activations
    /// ([`Decoder::set_prefill_activations`]).
    #[module(skip)]
    prefill_activations: Activations,
    /// The float dtype of the activations and the KV cache (the dense weights' dtype).
    #[module(skip)]
    dtype: DType,
}

/// On a model with dense copies ([`WeightStorage::Dense`]), products of at most this many rows
/// (tokens x batch) read the quantized weights kept beside them: decode steps, and any chunk of
/// at most this many tokens (a short question, the last piece of a chunked prefill, the
/// prefill's last-token LM head); longer inputs use the dense GEMM. A matrix held only as codes
/// ([`WeightStorage::Codes`]) always multiplies its codes.
pub const QUANTIZED_MAX_ROWS: usize = 4;

/// The weights of a GGUF model kept in their blocks of integer codes ([`QuantMatrix`]): the only
/// copy of a matrix with [`WeightStorage::Codes`], or beside the dense copies for decode steps
/// with [`WeightStorage::Dense`]. Products on them read 4- to 8-bit codes instead of f32
/// (SmolLM2-135M `Q4_1`/`Q8_0`: ~115 MB instead of 540 MB per token), in f32 arithmetic whatever
/// the model's dtype (f16/bf16 activations are widened and the products rounded back). Used on
/// backends with [`KvcBackend::kvc_quant_linear`] (flex, ndarray); [`Decoder::drop_quantized`]
/// frees them when there are dense copies.
#[derive(Clone, Debug, Default)]
pub struct QuantizedWeights {
    /// Per layer: `q, k, v, o, gate, up, down` (`None` where the file keeps floats or a format
    /// [`crate::weights::WeightSource::quantized`] does not read).
    layers: Vec<[Option<QuantMatrix>; 7]>,
    /// The LM head `[vocab, hidden]` (the embedding's codes when tied).
    lm_head: Option<Arc<QuantMatrix>>,
    /// The embedding `[vocab, hidden]` when held only as codes ([`WeightStorage::Codes`]).
    embed: Option<Arc<QuantMatrix>>,
}

impl QuantizedWeights {
    /// Bytes held by the codes, scales and mins.
    pub fn bytes(&self) -> usize {
        let shared = match (&self.lm_head, &self.embed) {
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) => None,
            _ => self.embed.as_deref(),
        };
        self.layers.iter().flatten().flatten().chain(self.lm_head.as_deref()).chain(shared).map(QuantMatrix::bytes).sum()
    }

    /// Matrices held (of `7 x layers + 1`).
    pub fn matrices(&self) -> usize {
        self.layers.iter().flatten().count() + self.lm_head.is_some() as usize
    }
}

/// `x W_j` for each linear layer of `lins` (all on the same input `x`, `[batch, tokens, in]`):
/// through their block codes in one call ([`KvcBackend::kvc_quant_linear`]: a fused Q/K/V or
/// gate/up product) when `x` has at most [`QUANTIZED_MAX_ROWS`] rows or a layer has no dense
/// weight, every layer has codes and the backend has the kernel; otherwise layer by layer,
/// each through its codes or its dense weight. `act`: how the codes' matrix-vector products
/// take `x` ([`Decoder::set_activations`]).
fn project<B: KvcBackend, const N: usize>(lins: [(&Projection<B>, Option<&QuantMatrix>); N], x: Tensor<B, 3>, act: Activations) -> Result<[Tensor<B, 3>; N]> {
    project_rows(lins, x, QUANTIZED_MAX_ROWS, act)
}

/// `max_rows` of [`project_rows`] for a batched decode step ([`Decoder::forward_batch`]): the
/// codes are read for any number of rows, at most [`kvc_core::kernels::quant::MATVEC_MAX_ROWS`]
/// per call, so that every row's result is the one it gets alone (the matrix-vector kernels keep
/// each row's order of sums; the prefill GEMM would not).
const BATCHED: usize = usize::MAX;

/// As [`project`], reading the codes for up to `max_rows` rows (or [`BATCHED`]: a batched
/// decode step, every row one sequence's token, the codes read once for up to 32 of them).
fn project_rows<B: KvcBackend, const N: usize>(lins: [(&Projection<B>, Option<&QuantMatrix>); N], x: Tensor<B, 3>, max_rows: usize, act: Activations) -> Result<[Tensor<B, 3>; N]> {
    let [b, c, i] = x.dims();
    let x = x.reshape([b * c, i]);
    fn codes<'a, B: Backend>(lin: &Projection<B>, w: Option<&'a QuantMatrix>, rows: usize, max_rows: usize) -> Option<&'a QuantMatrix> {
        w.filter(|_| rows <= max_rows || lin.weight.is_none())
    }
    let codes = |lin: &Projection<B>, w| codes(lin, w, b * c, max_rows);
    let finish = |lin: &Projection<B>, y: Tensor<B, 2>| {
        let out = y.dims()[1];
        let y = y.reshape([b, c, out]);
        match &lin.bias {
            Some(bias) => y + bias.val().reshape([1, 1, out]),
            None => y,
        }
    };
    let rows = b * c;
    let quant = |x: &Tensor<B, 2>, ws: &[&QuantMatrix]| -> Option<Tensor<B, 2>> {
        let most = kvc_core::kernels::quant::MATVEC_MAX_ROWS;
        if max_rows != BATCHED || rows <= most {
            return B::kvc_quant_linear(x.clone(), ws, act);
        }
        let parts = (0..rows).step_by(most).map(|r| B::kvc_quant_linear(x.clone().narrow(0, r, most.min(rows - r)), ws, act)).collect::<Option<Vec<_>>>()?;
        Some(Tensor::cat(parts, 0))
    };
    if N > 1 {
        if let Some(ws) = lins.iter().map(|(lin, w)| codes(lin, *w)).collect::<Option<Vec<_>>>() {
            if let Some(y) = quant(&x, &ws) {
                let mut start = 0;
                return Ok(lins.map(|(lin, w)| {
                    let rows = w.map_or(0, QuantMatrix::rows);
                    let part = y.clone().narrow(1, start, rows);
                    start += rows;
                    finish(lin, part)
                }));
            }
        }
    }
    let mut missing = false;
    let out = lins.map(|(lin, w)| {
        let y = codes(lin, w).and_then(|w| quant(&x, &[w]));
        let y = match (y, &lin.weight) {
            (Some(y), _) => y,
            (None, Some(weight)) => B::kvc_linear(x.clone(), &weight.val()).unwrap_or_else(|| x.clone().matmul(weight.val())),
            (None, None) => {
                missing = true;
                x.clone()
            }
        };
        finish(lin, y)
    });
    if missing {
        return Err(ModelError::Config("a matrix held only in its codes on a backend without the quantized kernel".into()));
    }
    Ok(out)
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
    /// Hold the source's codes instead of dense copies where it has them.
    codes_only: bool,
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

    /// A linear layer from a PyTorch `[out, in]` weight (transposed to burn's `[in, out]`), and
    /// its codes when the source has them: with `codes_only` the layer then holds no dense
    /// weight.
    fn linear(&self, prefix: &str, input: usize, output: usize, bias: bool) -> Result<(Projection<B>, Option<QuantMatrix>)> {
        let name = format!("{prefix}.weight");
        let codes = self.quantized(&name, input, output);
        let weight = if self.codes_only && codes.is_some() {
            None
        } else {
            let w = self.host(&name, &[output, input])?;
            Some(Param::from_tensor(self.tensor(transpose(&w, output, input), [input, output])))
        };
        let bias = if bias { Some(self.vector(&format!("{prefix}.bias"), output)?) } else { None };
        Ok((Projection { weight, bias }, codes))
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
        Self::build(config, source, device, dtype, false)
    }

    fn build(config: &ModelConfig, source: &dyn WeightSource, device: &B::Device, dtype: Option<DType>, codes_only: bool) -> Result<Self> {
        config.validate()?;
        let l = Loader::<B> { source, device, dtype, codes_only };
        let c = config;
        let (h, d, eps) = (c.hidden_size, c.head_dim, c.rms_norm_eps);
        let mut quantized = QuantizedWeights::default();
        // the embedding's codes, read once: held instead of the dense table (codes only) and/or
        // as the tied LM head's codes
        let embed_codes = (codes_only || c.tie_word_embeddings).then(|| l.quantized("model.embed_tokens.weight", h, c.vocab_size)).flatten().map(Arc::new);
        let embed = match (&embed_codes, codes_only) {
            (Some(_), true) => None,
            _ => Some(l.host("model.embed_tokens.weight", &[c.vocab_size, h])?),
        };
        let lm_head = if c.tie_word_embeddings {
            quantized.lm_head = embed_codes.clone();
            let weight = embed.as_ref().map(|e| Param::from_tensor(l.tensor(transpose(e, c.vocab_size, h), [h, c.vocab_size])));
            Projection { weight, bias: None }
        } else {
            let (head, codes) = l.linear("lm_head", h, c.vocab_size, false)?;
            quantized.lm_head = codes.map(Arc::new);
            head
        };
        let embed_tokens = embed.map(|e| Embedding { weight: Param::from_tensor(l.tensor(e, [c.vocab_size, h])) });
        quantized.embed = embed_codes.filter(|_| codes_only);
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
            let (qd, kvd, im) = (c.num_heads * d, c.num_kv_heads * d, c.intermediate_size);
            let (q_proj, q) = l.linear(&format!("{a}.q_proj"), h, qd, c.attention_bias)?;
            let (k_proj, k) = l.linear(&format!("{a}.k_proj"), h, kvd, c.attention_bias)?;
            let (v_proj, v) = l.linear(&format!("{a}.v_proj"), h, kvd, c.attention_bias)?;
            let (o_proj, o) = l.linear(&format!("{a}.o_proj"), qd, h, false)?;
            let (gate_proj, gate) = l.linear(&format!("{p}.mlp.gate_proj"), h, im, false)?;
            let (up_proj, up) = l.linear(&format!("{p}.mlp.up_proj"), h, im, false)?;
            let (down_proj, down) = l.linear(&format!("{p}.mlp.down_proj"), im, h, false)?;
            layers.push(DecoderLayer {
                input_layernorm: l.norm(&format!("{p}.input_layernorm.weight"), h, eps)?,
                self_attn: Attention { q_proj, k_proj, v_proj, o_proj, q_norm, k_norm, num_heads: c.num_heads, num_kv_heads: c.num_kv_heads, head_dim: d },
                post_attention_layernorm: l.norm(&format!("{p}.post_attention_layernorm.weight"), h, eps)?,
                mlp: Mlp { gate_proj, up_proj, down_proj },
            });
            quantized.layers.push([q, k, v, o, gate, up, down]);
        }
        let norm = l.norm("model.norm.weight", h, eps)?;
        let dtype = norm.gamma.val().dtype();
        let quantized = (quantized.matrices() > 0 || quantized.embed.is_some()).then(|| Arc::new(quantized));
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config: config.clone(),
            inv_freq: rope::inv_freq(config),
            quantized_decode: quantized.is_some(),
            activations: Activations::F32,
            prefill_activations: Activations::F32,
            quantized,
            dtype,
        })
    }

    /// The block-quantized weights, if the source had any ([`QuantizedWeights`]).
    pub fn quantized(&self) -> Option<&QuantizedWeights> {
        self.quantized.as_deref()
    }

    /// Whether products of at most [`QUANTIZED_MAX_ROWS`] rows (decode steps) read the
    /// quantized weights kept beside dense copies (on by default when there are any; the logits
    /// then differ from the dense f32 product only by f32 rounding of the sums). Off: those
    /// products use the dense weights (the codes stay, to be turned on again). Matrices held
    /// only as codes ([`WeightStorage::Codes`]) keep multiplying their codes.
    pub fn set_quantized_decode(&mut self, on: bool) {
        self.quantized_decode = on && self.quantized.is_some();
    }

    /// How decode steps' products on the quantized weights take the activations:
    /// [`Activations::F32`] (the default: the product by the dequantized weights up to f32
    /// rounding) or [`Activations::Int8`] (rounded to int8 per block of 32 and multiplied by the
    /// codes in integer arithmetic, as llama.cpp does: faster where decode is bound by
    /// arithmetic, and the logits move by the rounding; `kvc generate --int8-activations`).
    /// Decode steps are [`Decoder::forward`] / [`Decoder::forward_hidden`] on one token per
    /// sequence and [`Decoder::forward_batch`]; [`Decoder::prefill`], [`Decoder::feed`] and
    /// forward passes of several tokens (a question) take [`Decoder::set_prefill_activations`]'s
    /// (f32 by default). No effect on products of dense
    /// weights (a model without [`Decoder::quantized_decode`]).
    pub fn set_activations(&mut self, act: Activations) {
        self.activations = act;
    }

    /// [`Decoder::set_activations`]'s setting.
    pub fn activations(&self) -> Activations {
        self.activations
    }

    /// How forward passes of several tokens per sequence ([`Decoder::prefill`], [`Decoder::feed`],
    /// a question) take the activations in products on the codes: [`Activations::F32`] (the
    /// default: the product by the dequantized weights, so the KV cache the presses score is the
    /// dense model's up to f32 rounding) or [`Activations::Int8`] (each token's row rounded to
    /// int8 per block of 32 and multiplied by the codes in integer arithmetic, as llama.cpp's
    /// prefill does; each row's products are those a decode step gives it; measured with
    /// `kvc-bench speed --int8-prefill`: about as fast as f32 for `Q4_K_M` on AVX2, 0.3-0.55x
    /// for `Q4_1`; docs/quantized-weights.md). Only matrices held as codes
    /// ([`WeightStorage::Codes`], the default): prefill on dense copies keeps the dense GEMM.
    pub fn set_prefill_activations(&mut self, act: Activations) {
        self.prefill_activations = act;
    }

    /// [`Decoder::set_prefill_activations`]'s setting.
    pub fn prefill_activations(&self) -> Activations {
        self.prefill_activations
    }

    /// Frees the quantized weights (every product then uses the dense ones): for a backend
    /// without [`KvcBackend::kvc_quant_linear`], or an app that never wants them. No effect on a
    /// model that holds some matrices only as codes ([`WeightStorage::Codes`]: they are its
    /// weights).
    pub fn drop_quantized(&mut self) {
        if !self.codes_only() {
            self.quantized = None;
            self.quantized_decode = false;
        }
    }

    /// Whether some matrix is held only in its codes ([`WeightStorage::Codes`]).
    pub fn codes_only(&self) -> bool {
        self.embed_tokens.is_none() || self.lm_head.weight.is_none() || self.layers.iter().any(|l| l.projections().iter().any(|p| p.weight.is_none()))
    }

    /// Bytes of the matrices held: the embedding, the projections and the LM head, dense (in
    /// their dtype) and as codes (norms and biases, a few KB, left out).
    pub fn weight_bytes(&self) -> usize {
        let dense = |p: &Projection<B>| p.weight.as_ref().map_or(0, |w| w.val().shape().num_elements() * self.dtype.size());
        let embed = self.embed_tokens.as_ref().map_or(0, |e| e.weight.val().shape().num_elements() * self.dtype.size());
        embed + dense(&self.lm_head) + self.layers.iter().flat_map(|l| l.projections()).map(dense).sum::<usize>() + self.quantized().map_or(0, QuantizedWeights::bytes)
    }

    /// The float dtype of the weights on the device, which the activations and the KV cache share
    /// (F32 unless loaded with [`Decoder::from_source_as`] in F16 / BF16).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device holding the weights.
    pub fn device(&self) -> B::Device {
        self.norm.gamma.device()
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
        // held only as codes: the dequantized values in the dense layout and dtype, the bytes
        // the dense copy would give
        let codes_bytes = |values: Vec<f32>| -> Vec<u8> {
            match self.dtype {
                DType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
                DType::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
                _ => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
            }
        };
        match (&self.embed_tokens, self.quantized.as_ref().and_then(|q| q.embed.as_ref())) {
            (Some(e), _) => eat(e.weight.val().narrow(0, 0, rows).into_data().as_bytes()),
            (None, Some(codes)) => {
                let mut v = vec![0f32; rows * codes.cols()];
                codes.dequantize_rows_into(0, rows, &mut v);
                eat(&codes_bytes(v));
            }
            (None, None) => {}
        }
        let n = self.layers.len();
        for i in [0, n.saturating_sub(1)].into_iter().filter(|_| n > 0) {
            let attn = &self.layers[i].self_attn;
            for (proj, j) in [(&attn.k_proj, 1), (&attn.v_proj, 2)] {
                match (&proj.weight, self.quantized.as_ref().and_then(|q| q.layers.get(i)?.get(j)?.as_ref())) {
                    (Some(w), _) => eat(w.val().into_data().as_bytes()),
                    (None, Some(codes)) => eat(&codes_bytes(transpose(&codes.dequantize(), codes.rows(), codes.cols()))),
                    (None, None) => {}
                }
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

    /// Turns on [`Activations::Int8`] for decode steps, as `--int8-activations` asks (`kvc
    /// generate`, `kvc serve`, `kvc-bench eval`): the one check and setting every front end
    /// shares. Returns whether this CPU runs explicit SIMD kernels for it
    /// ([`kvc_core::kernels::quant::int8_kernels_native`]: AVX-512 VNNI or AVX2); where it does
    /// not, plain loops give the same numbers up to the order of f32 sums, likely slower than
    /// f32 (a front end warns:
    /// [`INT8_PLAIN_LOOPS_WARNING`]).
    ///
    /// # Errors
    /// [`ModelError::Int8Activations`] when decode does not multiply quantized weights (a
    /// safetensors model, a GPU backend, or the codes dropped: [`Decoder::drop_quantized`]):
    /// there are no codes for int8 activations to multiply. The setting is left as it was.
    pub fn enable_int8_activations(&mut self) -> Result<bool> {
        if !self.quantized_decode() {
            return Err(ModelError::Int8Activations);
        }
        self.activations = Activations::Int8;
        Ok(kvc_core::kernels::quant::int8_kernels_native())
    }

    /// Turns on [`Activations::Int8`] for prefill chunks and questions
    /// ([`Decoder::set_prefill_activations`]), as `kvc-bench speed --int8-prefill` asks: returns
    /// as [`Decoder::enable_int8_activations`] does.
    ///
    /// # Errors
    /// [`ModelError::Int8Prefill`] when no matrix is held only as codes (dense copies beside the
    /// codes, `--dense-weights`, a safetensors model, a GPU backend): prefill multiplies dense
    /// weights. The setting is left as it was.
    pub fn enable_int8_prefill(&mut self) -> Result<bool> {
        if !(self.codes_only() && B::kvc_has_quant_linear()) {
            return Err(ModelError::Int8Prefill);
        }
        self.prefill_activations = Activations::Int8;
        Ok(kvc_core::kernels::quant::int8_kernels_native())
    }

    /// As [`Decoder::from_source_as`], with the matrices where `storage` puts them:
    /// [`WeightStorage::Codes`] holds a GGUF's quantized matrices only as their codes when this
    /// backend has the kernel ([`KvcBackend::kvc_has_quant_linear`]), and loads dense
    /// otherwise. Codes a backend without the kernel cannot use, and those of
    /// [`WeightStorage::DenseOnly`], are not kept ([`Decoder::drop_quantized`]).
    ///
    /// # Errors
    /// As [`Decoder::from_source`].
    pub fn from_source_with(config: &ModelConfig, source: &dyn WeightSource, device: &B::Device, dtype: Option<DType>, storage: WeightStorage) -> Result<Self> {
        // the host kernels compute in f32 from f32, f16 or bf16 activations
        let float = matches!(dtype, None | Some(DType::F32 | DType::F16 | DType::BF16));
        let mut model = Self::build(config, source, device, dtype, storage == WeightStorage::Codes && B::kvc_has_quant_linear() && float)?;
        if storage == WeightStorage::DenseOnly || !B::kvc_has_quant_linear() {
            model.drop_quantized();
        }
        Ok(model)
    }

    /// The quantized matrix `index` (`q, k, v, o, gate, up, down`) of `layer` when in use
    /// (always when the layer has no dense copy).
    fn quant(&self, layer: usize, index: usize) -> Option<&QuantMatrix> {
        let m = self.quantized.as_deref()?.layers.get(layer)?.get(index)?.as_ref()?;
        let dense = self.layers.get(layer).is_some_and(|l| l.projections()[index].weight.is_some());
        (self.quantized_decode() || !dense).then_some(m)
    }

    /// The LM head's codes when in use.
    fn head_codes(&self) -> Option<&QuantMatrix> {
        let m = self.quantized.as_deref()?.lm_head.as_deref()?;
        (self.quantized_decode() || self.lm_head.weight.is_none()).then_some(m)
    }

    /// The embeddings of `ids` `[1, ids.len(), hidden]` (from the codes when the embedding is
    /// held only so).
    ///
    /// # Errors
    /// [`ModelError::Generation`] for an id outside the vocabulary.
    fn embed_ids(&self, ids: &[u32], device: &B::Device) -> Result<Tensor<B, 3>> {
        let vocab = self.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::Generation(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        match self.embed_codes() {
            // the host ids straight to the codes (no tensor to read back: every decode step)
            Some(codes) => Ok(Self::gather(codes, &ids.iter().map(|&id| id as usize).collect::<Vec<_>>(), [1, ids.len()], device, self.dtype)?),
            None => self.embed(crate::generate::token_tensor::<B>(ids, device)),
        }
    }

    /// The embedding's codes when it is held only so.
    fn embed_codes(&self) -> Option<&QuantMatrix> {
        self.embed_tokens.is_none().then(|| self.quantized.as_ref()?.embed.as_deref()).flatten()
    }

    /// Rows `ids` of `codes` dequantized, as `[b, c, hidden]` in `dtype`.
    fn gather(codes: &QuantMatrix, ids: &[usize], [b, c]: [usize; 2], device: &B::Device, dtype: DType) -> Result<Tensor<B, 3>> {
        let rows = codes
            .gather_rows(ids)
            .ok_or_else(|| ModelError::Generation(format!("a token id outside the vocabulary of {}", codes.rows())))?;
        Ok(Tensor::from_data(TensorData::new(rows, [b, c, codes.cols()]), (device, dtype)))
    }

    /// The embeddings of `tokens` `[batch, chunk]` -> `[batch, chunk, hidden]`.
    fn embed(&self, tokens: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>> {
        if let Some(e) = &self.embed_tokens {
            return Ok(e.forward(tokens));
        }
        let codes = self.embed_codes().ok_or_else(|| ModelError::Config("no embedding".into()))?;
        let (dims, device) = (tokens.dims(), tokens.device());
        let ids: Vec<usize> = tokens.into_data().convert::<i64>().iter::<i64>().map(|v| usize::try_from(v).unwrap_or(usize::MAX)).collect();
        Self::gather(codes, &ids, dims, &device, self.dtype)
    }

    /// Feeds `ids` (batch 1) into `cache` in chunks of at most `chunk` tokens without computing
    /// logits: a context prefill before compression, or a press's scoring pass (with an
    /// observer, which sees every chunk of every layer).
    ///
    /// # Errors
    /// Errors of the forward pass.
    pub fn feed(&self, ids: &[u32], cache: &mut KvCache<B>, mut observer: Option<&mut dyn AttentionObserver<B>>, chunk: usize) -> Result<()> {
        let device = self.device();
        cache.reserve(ids.len());
        for part in ids.chunks(chunk.max(1)) {
            let obs = observer.as_mut().map(|o| &mut **o as &mut dyn AttentionObserver<B>);
            self.forward_layers(crate::generate::token_tensor::<B>(part, &device), cache, obs, false, self.prefill_activations)?;
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
        let device = self.device();
        self.forward_as(crate::generate::token_tensor::<B>(&ids[last..], &device), cache, observer, Logits::Last, self.prefill_activations)
    }

    /// Runs `tokens` (`[batch, chunk]`) through the decoder at positions
    /// `cache.next_position()..+chunk`, appending their keys/values to `cache`, and returns
    /// logits `[batch, n, vocab]` for the positions `logits` asks for.
    ///
    /// Every key already in the cache is visible to every new token (they all precede it); the
    /// chunk itself is causal. For long prompts call this per chunk (see [`Decoder::prefill`]) so
    /// no `chunk x len` score tensor grows beyond one chunk.
    /// The observer, if any, sees each layer's queries/keys/values (and attention if it asks).
    /// One token per sequence is a decode step: its products on the codes take the activations
    /// as [`Decoder::set_activations`] says; longer chunks as [`Decoder::set_prefill_activations`].
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        observer: Option<&mut dyn AttentionObserver<B>>,
        logits: Logits,
    ) -> Result<Tensor<B, 3>> {
        let act = self.step_activations(tokens.dims()[1]);
        self.forward_as(tokens, cache, observer, logits, act)
    }

    /// The activations of a forward pass of `tokens` per sequence: one is a decode step
    /// ([`Decoder::set_activations`]); more (a prefill chunk, a question) are
    /// [`Decoder::set_prefill_activations`]'s.
    fn step_activations(&self, tokens: usize) -> Activations {
        if tokens == 1 {
            self.activations
        } else {
            self.prefill_activations
        }
    }

    /// [`Decoder::forward`] with the products on the codes taking the activations as `act`.
    fn forward_as(&self, tokens: Tensor<B, 2, Int>, cache: &mut KvCache<B>, observer: Option<&mut dyn AttentionObserver<B>>, logits: Logits, act: Activations) -> Result<Tensor<B, 3>> {
        let chunk = tokens.dims()[1];
        let x = self.forward_layers(tokens, cache, observer, true, act)?.ok_or_else(|| ModelError::Config("the decoder has no layers".into()))?;
        let x = match logits {
            Logits::All => x,
            Logits::Last => x.narrow(1, chunk - 1, 1),
        };
        let [logits] = project([(&self.lm_head, self.head_codes())], norm(&self.norm, x), act)?;
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
        let device = self.device();
        let c = &self.config;
        let dtype = self.dtype;
        let positions: Vec<usize> = caches.iter().map(|cache| cache.next_position()).collect();
        let rope_q = rope::tables_at::<B>(&self.inv_freq, positions.iter().copied(), c.num_heads, &device, dtype);
        let rope_k = rope::tables_at::<B>(&self.inv_freq, positions.iter().copied(), c.num_kv_heads, &device, dtype);
        // the n tokens as one chunk of a batch of 1: `[1, n, hidden]` rows for the products
        let mut x = self.embed_ids(tokens, &device)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = norm(&layer.input_layernorm, x.clone());
            let quant = ([0, 1, 2, 3].map(|j| self.quant(i, j)), self.activations);
            let a = layer.self_attn.forward_batch(h, i, &rope_q, &rope_k, caches, quant)?;
            let x1 = x + a;
            let h = norm(&layer.post_attention_layernorm, x1.clone());
            let m = &layer.mlp;
            let [gate, up] = project_rows([(&m.gate_proj, self.quant(i, 4)), (&m.up_proj, self.quant(i, 5))], h, BATCHED, self.activations)?;
            let [ff] = project_rows([(&m.down_proj, self.quant(i, 6))], B::kvc_swiglu(gate, up), BATCHED, self.activations)?;
            x = x1 + ff;
        }
        for cache in caches.iter_mut() {
            cache.advance(1);
        }
        let [logits] = project_rows([(&self.lm_head, self.head_codes())], norm(&self.norm, x), BATCHED, self.activations)?;
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
        let act = self.step_activations(tokens.dims()[1]);
        let out = self.forward_layers(tokens, cache, observer, true, act)?;
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
        act: Activations,
    ) -> Result<Option<Tensor<B, 3>>> {
        let [_, chunk] = tokens.dims();
        let device = tokens.device();
        let first = cache.next_position();
        // RoPE tables laid out like the projections' output `[1, chunk, heads, head_dim]`
        let c = &self.config;
        let dtype = self.dtype;
        let rope_q = rope::tables::<B>(&self.inv_freq, first, chunk, c.num_heads, &device, dtype);
        let rope_k = rope::tables::<B>(&self.inv_freq, first, chunk, c.num_kv_heads, &device, dtype);
        let mut x = Some(self.embed(tokens)?);
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let Some(xi) = x.take() else { break };
            let h = norm(&layer.input_layernorm, xi.clone());
            let quant = ([0, 1, 2, 3].map(|j| self.quant(i, j)), act);
            let obs = observer.as_mut().map(|o| &mut **o as &mut dyn AttentionObserver<B>);
            let part = if output || i < last { AttentionPart::Output } else if obs.is_some() { AttentionPart::Attention } else { AttentionPart::KeysValues };
            let Some(a) = layer.self_attn.forward(h, i, first, &rope_q, &rope_k, cache, obs, quant, part)? else { break };
            let x1 = xi + a;
            let h = norm(&layer.post_attention_layernorm, x1.clone());
            let m = &layer.mlp;
            let [gate, up] = project([(&m.gate_proj, self.quant(i, 4)), (&m.up_proj, self.quant(i, 5))], h, act)?;
            let [ff] = project([(&m.down_proj, self.quant(i, 6))], B::kvc_swiglu(gate, up), act)?;
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
        (quant, act): ([Option<&QuantMatrix>; 4], Activations),
        part: AttentionPart,
    ) -> Result<Option<Tensor<B, 3>>> {
        let [b, c, _] = x.dims();
        let (hq, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // [b, c, heads * d] -> [b, c, heads, d]; RoPE (and Qwen3's q/k norm) work in this contiguous
        // layout, then heads move to dim 1
        let split = |t: Tensor<B, 3>, heads: usize| t.reshape([b, c, heads, d]);
        if part == AttentionPart::KeysValues {
            let [k, v] = project([(&self.k_proj, quant[1]), (&self.v_proj, quant[2])], x, act)?;
            let mut k = split(k, hkv);
            if let Some(kn) = &self.k_norm {
                k = norm(kn, k);
            }
            let k = rope::apply(k, &rope_k.0, &rope_k.1).swap_dims(1, 2);
            cache.append_with(layer, first, k, split(v, hkv).swap_dims(1, 2), B::kvc_write_slots)?;
            return Ok(None);
        }
        let [q, k, v] = project([(&self.q_proj, quant[0]), (&self.k_proj, quant[1]), (&self.v_proj, quant[2])], x, act)?;
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
        let kv = cache.layer(layer)?;
        let valid = kv.and_then(|kv| kv.valid.as_deref());
        let out = match kv.and_then(|kv| kv.quant.as_deref()) {
            // a quantized layer: `keys` / `values` are its residual window, the codes come first
            Some(quant) if observer.is_none() => {
                B::kvc_quant_attention(kvc_core::kernels::AttentionArgs { queries: q, keys, values, valid, reduce: None, probs: false }, quant).output
            }
            Some(quant) => {
                let (keys, values) = kvc_core::kvquant::with_codes(quant, keys, values);
                observed_attention(observer, layer, first, q, || q_pre_rope.swap_dims(1, 2), keys, values, valid, B::kvc_attention)
            }
            None => observed_attention(observer, layer, first, q, || q_pre_rope.swap_dims(1, 2), keys, values, valid, B::kvc_attention),
        };
        let out = out.swap_dims(1, 2).reshape([b, c, hq * d]);
        if part == AttentionPart::Attention {
            return Ok(None);
        }
        let [out] = project([(&self.o_proj, quant[3])], out, act)?;
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
        (quant, act): ([Option<&QuantMatrix>; 4], Activations),
    ) -> Result<Tensor<B, 3>> {
        let [_, n, _] = x.dims();
        let (hq, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v] = project_rows([(&self.q_proj, quant[0]), (&self.k_proj, quant[1]), (&self.v_proj, quant[2])], x, BATCHED, act)?;
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
            let kv = cache.layer(layer)?;
            let valid = kv.and_then(|kv| kv.valid.as_deref());
            let args = kvc_core::kernels::AttentionArgs { queries: row(&q), keys, values, valid, reduce: None, probs: false };
            let out = match kv.and_then(|kv| kv.quant.as_deref()) {
                Some(quant) => B::kvc_quant_attention(args, quant),
                None => B::kvc_attention(args),
            }
            .output;
            outs.push(out.swap_dims(1, 2).reshape([1, 1, hq * d]));
        }
        let [out] = project_rows([(&self.o_proj, quant[3])], Tensor::cat(outs, 1), BATCHED, act)?;
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
