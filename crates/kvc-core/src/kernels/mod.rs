//! Kernels a backend may specialise: burn's documented way to add custom operations is a trait
//! extending `Backend` whose methods have a generic default ([`KvcBackend`]).
//!
//! kvc's kernels: attention over a KV cache, the SwiGLU activation, RMSNorm, products with
//! block-quantized weights and bf16 linear layers. Attention because that is where burn's generic
//! tensor API leaves CPU speed on the table (issue 10: burn-flex's fused attention runs on one
//! thread with a scalar `exp`; the explicit path materializes full-size masks) and where presses
//! want more than the output (KVCompose's max over queries, H2O's sum over queries); SwiGLU
//! because burn-flex computes `silu` with a scalar `expf` per element; RMSNorm because it is six
//! tensor ops (strided iteration in half precision on burn-flex); quantized products because a
//! decode step is bound by reading weights ([`quant`]); bf16 products because burn-flex converts
//! bf16 operands to f32 ([`bf16`]).
//!
//! - Every backend gets [`generic_attention`] (burn's fused `attention` when only the output is
//!   wanted; an explicit softmax with device-side masks otherwise).
//! - CPU backends (`flex`, `ndarray` features) run [`host::attention`]: blocked, multi-threaded,
//!   GEMM-based, reductions computed inside the softmax pass.
//!
//! An app on another backend opts in with one line, `impl kvc_core::KvcBackend for MyBackend {}`.

pub mod bf16;
pub mod host;
mod impls;
pub mod quant;

use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{backend::Backend, Bool, DType, Int, Tensor, TensorData};

/// How attention probabilities are reduced over a chunk's queries for an observer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryReduce {
    /// Maximum over queries (KVCompose's `max` aggregation, kvpress `KVComposePress`).
    Max,
    /// Sum over queries (ObservedAttention / H2O, kvpress `ObservedAttentionPress`).
    Sum,
}

/// One attention call of a decoder layer over its KV cache.
///
/// Query `i` of the chunk sits at cache slot `len - chunk + i` and sees slots `0..=len - chunk + i`:
/// cached keys all visible, the chunk causal (bottom-right aligned); decode is `chunk = 1`.
/// Scale: `1/sqrt(head_dim)`.
#[derive(Clone, Debug)]
pub struct AttentionArgs<'a, B: Backend> {
    /// Queries after RoPE, `[batch, q_heads, chunk, head_dim]`.
    pub queries: Tensor<B, 4>,
    /// Keys after RoPE, `[batch, kv_heads, len, head_dim]` (GQA: query head `h` reads KV head
    /// `h / (q_heads / kv_heads)`).
    pub keys: Tensor<B, 4>,
    /// Values, `[batch, kv_heads, len, head_dim]`.
    pub values: Tensor<B, 4>,
    /// Which cache slots hold a real token, row-major `[batch, kv_heads, len]`; `None` = all
    /// (see [`crate::LayerKv::valid`]).
    pub valid: Option<&'a [bool]>,
    /// Also return the probabilities reduced over the chunk's queries.
    pub reduce: Option<QueryReduce>,
    /// Also return the full probabilities `[batch, q_heads, chunk, len]`.
    pub probs: bool,
}

/// What an attention call returns.
#[derive(Clone, Debug)]
pub struct AttentionOutput<B: Backend> {
    /// Output `[batch, q_heads, chunk, head_dim]`.
    pub output: Tensor<B, 4>,
    /// Probabilities reduced over queries, `[batch, q_heads, len]` (when asked).
    pub reduced: Option<Tensor<B, 3>>,
    /// Probabilities `[batch, q_heads, chunk, len]` (when asked).
    pub probs: Option<Tensor<B, 4>>,
}

/// Runs `kernel` on queries, keys and values cast to f32 and casts the output back to the queries'
/// dtype: attention of a half-precision model (`F16`/`BF16` weights and KV cache) scores,
/// normalizes and accumulates in f32, as flash-attention kernels do; the reduced and full
/// probabilities a press reads stay f32 (its scores accumulate in f32 whatever the cache's dtype).
pub fn in_f32<'a, B: Backend>(a: AttentionArgs<'a, B>, kernel: impl FnOnce(AttentionArgs<'a, B>) -> AttentionOutput<B>) -> AttentionOutput<B> {
    let dtype = a.queries.dtype();
    let up = |t: Tensor<B, 4>| t.cast(DType::F32);
    let out = kernel(AttentionArgs { queries: up(a.queries), keys: up(a.keys), values: up(a.values), ..a });
    AttentionOutput { output: out.output.cast(dtype), ..out }
}

/// A burn backend with kvc's kernels. Every method has a generic default; CPU backends override
/// them with host kernels.
pub trait KvcBackend: Backend {
    /// Attention of a chunk of queries over a KV cache ([`AttentionArgs`]).
    fn kvc_attention(args: AttentionArgs<'_, Self>) -> AttentionOutput<Self> {
        generic_attention(args)
    }

    /// Attention over a quantized layer ([`crate::kvquant`]): `args.keys` / `args.values` hold
    /// the layer's residual window (its newest slots, full precision) and `quant` the slots
    /// before them as codes; `args.valid` covers all `quant.len() + residual` slots. Default:
    /// [`generic_quant_attention`] (codes widened to a full-precision copy, then
    /// [`KvcBackend::kvc_attention`]); CPU backends run [`crate::kvquant::decode_attention`] for
    /// decode steps ([`host_quant_attention_copying`]).
    fn kvc_quant_attention(args: AttentionArgs<'_, Self>, quant: &crate::kvquant::QuantKv) -> AttentionOutput<Self> {
        generic_quant_attention(args, quant)
    }

    /// Writes `slots` (`[b, h, c, d]`) into `buffer` (`[b, h, capacity, d]`) at slot `start`
    /// (the KV cache's preallocated buffer, [`crate::KvCache::append_with`]); in place when the
    /// buffer is not shared.
    fn kvc_write_slots(buffer: Tensor<Self, 4>, start: usize, slots: Tensor<Self, 4>) -> Tensor<Self, 4> {
        write_slots(buffer, start, slots)
    }

    /// The SwiGLU MLP's activation, `silu(gate) * up` elementwise (HF `LlamaMLP`:
    /// `act_fn(gate_proj(x)) * up_proj(x)`); `gate`, `up`: same shape.
    fn kvc_swiglu<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
        silu(gate) * up
    }

    /// RMSNorm over the last dimension (HF `LlamaRMSNorm`, burn's `RmsNorm::forward`):
    /// `x / sqrt(mean(x^2) + epsilon) * gamma`, `x` `[..., d]`, `gamma` `[d]`, same shape and
    /// dtype out. Default: [`rms_norm`] (burn's formula). flex: [`host::rms_norm`], one pass per
    /// row instead of six tensor ops (burn-flex runs half-precision elementwise ops through
    /// strided iterators).
    fn kvc_rms_norm<const D: usize>(x: Tensor<Self, D>, gamma: Tensor<Self, 1>, epsilon: f64) -> Tensor<Self, D> {
        rms_norm(x, gamma, epsilon)
    }

    /// `x [W_1; W_2; ...]^T` for the rows of `x` (`[n, in]`, f32, f16 or bf16: the host kernels
    /// compute in f32 and round the result to `x`'s dtype) with block-quantized matrices
    /// `ws` ([`quant::QuantMatrix`], each `[out_i, in]`): `[n, sum of out_i]`, outputs side by
    /// side (a fused Q/K/V or gate/up projection). Up to 32 rows (decode steps) the
    /// matrix-vector products read 4- to 8-bit codes instead of f32 weights ([`quant::matvec`]);
    /// longer inputs (prefill chunks) multiply dequantized tiles ([`quant::matmul`]). `act`: how
    /// the matrix-vector products take `x` ([`quant::Activations`]). `None` (the default): no
    /// such kernel on this backend (a model then loads dense copies and multiplies by them).
    fn kvc_quant_linear(x: Tensor<Self, 2>, ws: &[&quant::QuantMatrix], act: quant::Activations) -> Option<Tensor<Self, 2>> {
        let _ = (x, ws, act);
        None
    }

    /// `x W` for rows `x` `[n, in]` and a linear layer's weight `W` `[in, out]` (burn's `Linear`
    /// layout), in their shared dtype: `[n, out]`. `None` (the default): no kernel beyond burn's
    /// matmul for this case, and the caller runs `Linear::forward`. flex: bf16 ([`bf16::matmul`]:
    /// `vdpbf16ps` tiles on CPUs where they pay, vectorized widening and an f32 GEMM elsewhere;
    /// burn-flex converts bf16 operands to f32 value by value).
    fn kvc_linear(x: Tensor<Self, 2>, w: &Tensor<Self, 2>) -> Option<Tensor<Self, 2>> {
        let _ = (x, w);
        None
    }

    /// Whether [`KvcBackend::kvc_quant_linear`] has a kernel here (a model keeps quantized
    /// weights only then). `false` by default.
    fn kvc_has_quant_linear() -> bool {
        false
    }
}

/// One attention call of a layer that an observer watches: asks `observer` what it wants
/// (reduced or full probabilities, pre-RoPE queries), runs `attend` (a backend's
/// [`KvcBackend::kvc_attention`], or [`generic_attention`]), shows the chunk to the observer and
/// returns the attention output `[batch, q_heads, chunk, head_dim]`.
///
/// `queries` `[batch, q_heads, chunk, head_dim]` after RoPE; `queries_pre_rope` the same before
/// RoPE (only read when the observer asks); `keys`, `values` and `valid` as returned by
/// [`crate::KvCache::append`] / [`crate::LayerKv::valid`]; `first_position` of the chunk.
#[allow(clippy::too_many_arguments)]
pub fn observed_attention<B: Backend>(
    observer: Option<&mut dyn crate::AttentionObserver<B>>,
    layer: usize,
    first_position: usize,
    queries: Tensor<B, 4>,
    queries_pre_rope: impl FnOnce() -> Tensor<B, 4>,
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    valid: Option<&[bool]>,
    attend: impl FnOnce(AttentionArgs<'_, B>) -> AttentionOutput<B>,
) -> Tensor<B, 4> {
    let reduce = observer.as_ref().and_then(|o| o.reduce_attention(layer));
    let probs = observer.as_ref().is_some_and(|o| o.wants_attention(layer));
    let pre = observer.as_ref().is_some_and(|o| o.wants_pre_rope_queries(layer)).then(queries_pre_rope);
    let att = attend(AttentionArgs { queries: queries.clone(), keys: keys.clone(), values: values.clone(), valid, reduce, probs });
    if let Some(obs) = observer {
        obs.observe(crate::LayerObservation {
            layer,
            first_position,
            queries: &queries,
            queries_pre_rope: pre.as_ref(),
            keys: &keys,
            values: &values,
            attention: att.probs.as_ref(),
            attention_reduced: att.reduced.as_ref(),
        });
    }
    att.output
}

/// burn's `RmsNorm::forward` on a bare `gamma`: the mean of squares in f32, `x / rms` and
/// `* gamma` in `x`'s dtype (the default of [`KvcBackend::kvc_rms_norm`]).
pub fn rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, epsilon: f64) -> Tensor<B, D> {
    let dtype = x.dtype();
    let rms = (x.clone().cast(DType::F32).square().mean_dim(D - 1) + epsilon).sqrt();
    (x / rms.cast(dtype)) * gamma.unsqueeze()
}

/// The generic slot write: `slice_assign` (burn-flex 0.21's copies the whole buffer even when it
/// is not shared, hence [`KvcBackend::kvc_write_slots`]).
pub fn write_slots<B: Backend>(buffer: Tensor<B, 4>, start: usize, slots: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, c, d] = slots.dims();
    buffer.slice_assign([0..b, 0..h, start..start + c, 0..d], slots)
}

/// The generic attention: burn's fused `attention` when only the output is wanted and every slot
/// is real; otherwise `softmax(Q K^T / sqrt(d) + causal mask + padding mask) V` with the masks
/// built on the device (no host upload per call).
pub fn generic_attention<B: Backend>(a: AttentionArgs<'_, B>) -> AttentionOutput<B> {
    if matches!(a.queries.dtype(), DType::F16 | DType::BF16) {
        return in_f32(a, generic_attention);
    }
    let [b, hq, c, d] = a.queries.dims();
    let [_, hkv, len, _] = a.keys.dims();
    let g = hq / hkv;
    let device = a.queries.device();
    if a.valid.is_none() && a.reduce.is_none() && !a.probs {
        let opts = |is_causal| AttentionModuleOptions { scale: None, softcap: None, is_causal };
        let output = if c == 1 {
            // decode: the g query heads of a group attend together, no K/V copies
            attention(a.queries.reshape([b, hkv, g, d]), a.keys, a.values, None, None, opts(false)).reshape([b, hq, 1, d])
        } else {
            let expand = |t: Tensor<B, 4>| t.unsqueeze_dim::<5>(2).expand([b, hkv, g, len, d]).reshape([b, hq, len, d]);
            attention(a.queries, expand(a.keys), expand(a.values), None, None, opts(true))
        };
        return AttentionOutput { output, reduced: None, probs: None };
    }
    // scaling q instead of the scores saves a pass over the scores; for head_dim 64 (or any power
    // of 4) the scale is a power of two and both orders give identical bits
    let scores = (a.queries * (d as f64).powf(-0.5)).reshape([b, hkv, g * c, d]).matmul(a.keys.swap_dims(2, 3));
    let mut scores = scores.reshape([b, hkv, g, c, len]);
    if c > 1 {
        // key slot j is hidden from query i when j > len - c + i
        let keys = Tensor::<B, 1, Int>::arange(0..len as i64, &device).reshape([1, len]);
        let last = Tensor::<B, 1, Int>::arange((len - c) as i64..len as i64, &device).reshape([c, 1]);
        let hidden: Tensor<B, 2, Bool> = keys.greater(last);
        scores = scores.mask_fill(hidden.reshape([1, 1, 1, c, len]).expand([b, hkv, g, c, len]), f32::NEG_INFINITY);
    }
    if let Some(valid) = a.valid {
        let bias: Vec<f32> = valid.iter().map(|&v| if v { 0.0 } else { f32::NEG_INFINITY }).collect();
        scores = scores + Tensor::from_data(TensorData::new(bias, [b, hkv, 1, 1, len]), &device);
    }
    let probs = softmax(scores, 4).reshape([b, hkv, g * c, len]);
    let output = probs.clone().matmul(a.values).reshape([b, hq, c, d]);
    let probs = probs.reshape([b, hq, c, len]);
    let reduced = a.reduce.map(|r| match r {
        QueryReduce::Max => probs.clone().max_dim(2),
        QueryReduce::Sum => probs.clone().sum_dim(2),
    });
    AttentionOutput { output, reduced: reduced.map(|t| t.reshape([b, hq, len])), probs: a.probs.then_some(probs) }
}

/// Attention over a quantized layer on any backend: the codes widened in front of the residual
/// window ([`crate::kvquant::with_codes`]), then the backend's [`KvcBackend::kvc_attention`].
pub fn generic_quant_attention<B: KvcBackend>(a: AttentionArgs<'_, B>, quant: &crate::kvquant::QuantKv) -> AttentionOutput<B> {
    let (keys, values) = crate::kvquant::with_codes(quant, a.keys, a.values);
    B::kvc_attention(AttentionArgs { keys, values, ..a })
}

/// [`crate::kvquant::decode_attention`] on any backend through `into_data` / `from_data` (copies
/// of the queries, the residual window and the output: a few KB) for a decode step (one query per
/// head, output only); other calls (a question's prefill, an observer's probabilities) go to
/// [`generic_quant_attention`].
pub fn host_quant_attention_copying<B: KvcBackend>(a: AttentionArgs<'_, B>, quant: &crate::kvquant::QuantKv) -> AttentionOutput<B> {
    let [b, hq, c, d] = a.queries.dims();
    let [kb, hkv, r, kd] = a.keys.dims();
    if c != 1 || a.reduce.is_some() || a.probs || (kb * hkv, kd) != (quant.rows(), quant.head_dim()) || kb != b || crate::kvquant::widened_attention() {
        return generic_quant_attention(a, quant);
    }
    let dtype = a.queries.dtype();
    let device = a.queries.device();
    let read = |t: Tensor<B, 4>| t.into_data().convert::<f32>().into_vec::<f32>().ok();
    let (Some(q), Some(k), Some(v)) = (read(a.queries.clone()), read(a.keys.clone()), read(a.values.clone())) else {
        return generic_quant_attention(a, quant);
    };
    let out = crate::kvquant::decode_attention(&crate::kvquant::QuantDecode {
        q: &q,
        quant,
        keys: &k,
        values: &v,
        residual: r,
        valid: a.valid,
        batch: b,
        q_heads: hq,
        scale: (d as f32).powf(-0.5),
    });
    let output = Tensor::<B, 4>::from_data(TensorData::new(out, [b, hq, 1, d]), (&device, DType::F32)).cast(dtype);
    AttentionOutput { output, reduced: None, probs: None }
}

/// [`host::attention`] on any backend through `into_data` / `from_data` (copies; for CPU
/// backends whose tensors are not reachable without a copy). Falls back to
/// [`generic_attention`] for non-`f32` tensors.
pub fn host_attention_copying<B: Backend>(a: AttentionArgs<'_, B>) -> AttentionOutput<B> {
    if a.queries.dtype() != burn::tensor::DType::F32 {
        return generic_attention(a);
    }
    let device = a.queries.device();
    let read = |t: Tensor<B, 4>| t.into_data().to_vec::<f32>().expect("f32 tensor reads as f32");
    let req = HostRequest::of(&a);
    let (q, k, v) = (read(a.queries), read(a.keys), read(a.values));
    let kv_stride = req.kv[2] * req.kv[3];
    req.run(&q, &k, &v, kv_stride, |data, shape| Tensor::from_data(TensorData::new(data, shape), &device))
}

/// [`quant::linear`] (with `act`: [`quant::Activations`]) on any backend through `into_data` /
/// `from_data` (copies of `x` and `y`, a few KB for a decode step); `None` unless `x` is a float `[n, cols]` for every matrix (f16 and
/// bf16 rows are widened to f32, the result rounded back to their dtype).
pub fn host_quant_linear_copying<B: Backend>(x: Tensor<B, 2>, ws: &[&quant::QuantMatrix], act: quant::Activations) -> Option<Tensor<B, 2>> {
    let [n, cols] = x.dims();
    let dtype = x.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) || ws.is_empty() || ws.iter().any(|w| w.cols() != cols) {
        return None;
    }
    let device = x.device();
    let data = x.into_data().convert::<f32>().to_vec::<f32>().ok()?;
    let y = quant::linear(&data, n, ws, act);
    let rows = ws.iter().map(|w| w.rows()).sum::<usize>();
    Some(Tensor::<B, 2>::from_data(TensorData::new(y, [n, rows]), &device).cast(dtype))
}

/// What a host attention call needs besides the data: shapes and requests of an
/// [`AttentionArgs`], taken before its tensors are consumed.
struct HostRequest<'a> {
    valid: Option<&'a [bool]>,
    reduce: Option<QueryReduce>,
    probs: bool,
    /// `[batch, q_heads, chunk, head_dim]`.
    q: [usize; 4],
    /// `[batch, kv_heads, len, head_dim]`.
    kv: [usize; 4],
    /// The query values handed over are `[batch, chunk, q_heads, head_dim]`
    /// ([`host::HostAttention::q_token_major`]).
    q_token_major: bool,
}

impl<'a> HostRequest<'a> {
    fn of<B: Backend>(a: &AttentionArgs<'a, B>) -> Self {
        Self { valid: a.valid, reduce: a.reduce, probs: a.probs, q: a.queries.dims(), kv: a.keys.dims(), q_token_major: false }
    }

    /// Runs [`host::attention`] on host slices (`kv_stride`: [`host::HostAttention::kv_stride`])
    /// and wraps the result as tensors built by `make`.
    fn run<B: Backend, T: host::HostFloat>(&self, q: &[f32], k: &[T], v: &[T], kv_stride: usize, make: impl Fn(Vec<f32>, [usize; 4]) -> Tensor<B, 4>) -> AttentionOutput<B> {
        let out = host::attention(&self.host(q, k, v, kv_stride));
        host_output(out, self.q, self.kv[2], make)
    }

    /// As [`HostRequest::run`] for a decode step ([`HostRequest::is_decode`]) on keys and values
    /// of any [`host::HostFloat`] type ([`host::decode_attention`]).
    #[cfg(feature = "flex")] // only flex reads half-precision caches in place
    fn run_decode<B: Backend, T: host::HostFloat>(
        &self,
        q: &[f32],
        k: &[T],
        v: &[T],
        kv_stride: usize,
        make: impl Fn(Vec<f32>, [usize; 4]) -> Tensor<B, 4>,
    ) -> AttentionOutput<B> {
        let out = host::decode_attention(&self.host(q, k, v, kv_stride));
        host_output(out, self.q, self.kv[2], make)
    }

    /// One query per head and only the output wanted: [`HostRequest::run_decode`] applies.
    #[cfg(feature = "flex")]
    fn is_decode(&self) -> bool {
        self.q[2] == 1 && self.reduce.is_none() && !self.probs
    }

    fn host<'b, T>(&'b self, q: &'b [f32], k: &'b [T], v: &'b [T], kv_stride: usize) -> host::HostAttention<'b, T> {
        let ([b, hq, c, d], [_, hkv, len, _]) = (self.q, self.kv);
        host::HostAttention {
            q,
            q_token_major: self.q_token_major,
            k,
            v,
            kv_stride,
            valid: self.valid,
            batch: b,
            q_heads: hq,
            kv_heads: hkv,
            chunk: c,
            len,
            head_dim: d,
            scale: (d as f32).powf(-0.5),
            reduce: self.reduce,
            probs: self.probs,
        }
    }
}

/// Wraps a [`host::HostOutput`] as tensors; `make` builds a tensor from host data.
fn host_output<B: Backend>(
    out: host::HostOutput,
    [b, hq, c, d]: [usize; 4],
    len: usize,
    make: impl Fn(Vec<f32>, [usize; 4]) -> Tensor<B, 4>,
) -> AttentionOutput<B> {
    // the host layout is [b, c, hq, d]: returned as a [b, hq, c, d] view, so the decoder's swap
    // back to [b, c, hq*d] costs nothing
    let output = make(out.out, [b, c, hq, d]).swap_dims(1, 2);
    let reduced = out.reduced.map(|r| make(r, [b, hq, 1, len]).reshape([b, hq, len]));
    let probs = out.probs.map(|p| make(p, [b, hq, c, len]));
    AttentionOutput { output, reduced, probs }
}
