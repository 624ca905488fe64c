//! [`KvcBackend`] for burn's backends, each behind the cargo feature of the same name (the
//! binaries turn on the ones they compile in). GPU backends keep the generic default.

#[allow(unused_imports)]
use super::{AttentionArgs, AttentionOutput, KvcBackend};

#[cfg(feature = "flex")]
impl KvcBackend for burn::backend::Flex {
    /// The host kernel on flex's own buffers: no copy of queries, keys or values when they are
    /// contiguous (the cache's are).
    fn kvc_attention(a: AttentionArgs<'_, Self>) -> AttentionOutput<Self> {
        use burn::tensor::DType;
        let mut req = super::HostRequest::of(&a);
        match a.queries.dtype() {
            DType::F32 => {}
            dtype @ (DType::F16 | DType::BF16) if a.keys.dtype() == dtype && a.values.dtype() == dtype => {
                return flex_half(a, req, dtype);
            }
            DType::F16 | DType::BF16 => return super::in_f32(a, Self::kvc_attention),
            _ => return super::generic_attention(a),
        }
        let q;
        (q, req.q_token_major) = flex_queries::<f32>(a.queries);
        // contiguous from offset 0: `as_slice` is the whole tensor
        let qs = q.as_slice::<f32>().unwrap_or(&[]);
        let ((k, k_off), (v, v_off), kv_stride) = flex_kv(a.keys, a.values);
        req.run(qs, &k.storage::<f32>()[k_off..], &v.storage::<f32>()[v_off..], kv_stride, flex_tensor::<f32, 4>)
    }

    /// [`super::host_quant_attention_copying`]: decode steps on the codes.
    fn kvc_quant_attention(a: AttentionArgs<'_, Self>, quant: &crate::kvquant::QuantKv) -> AttentionOutput<Self> {
        super::host_quant_attention_copying(a, quant)
    }

    /// A row copy into the buffer's own storage when it is contiguous, f32 / f16 / bf16 (the
    /// same as `slots`) and not shared.
    fn kvc_write_slots(buffer: burn::tensor::Tensor<Self, 4>, start: usize, slots: burn::tensor::Tensor<Self, 4>) -> burn::tensor::Tensor<Self, 4> {
        use burn::tensor::{DType, Tensor, TensorPrimitive};
        let ([b, h, cap, d], [sb, sh, c, sd]) = (buffer.dims(), slots.dims());
        let dtype = buffer.dtype();
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) || slots.dtype() != dtype || (sb, sh, sd) != (b, h, d) || start + c > cap {
            return super::write_slots(buffer, start, slots);
        }
        let mut buf = buffer.into_primitive().tensor();
        let src = slots.into_primitive().tensor();
        // rows of `d` values read where they are (the decoder's keys and values are heads-first
        // views of its projections); other layouts made contiguous first
        let strides = src.layout().strides();
        let src = if strides[3] == 1 && strides.iter().all(|&x| x >= 0) { src } else { src.to_contiguous() };
        let done = match dtype {
            DType::F16 => write_rows::<half::f16>(&mut buf, &src, [b, h, cap, c, d], start),
            DType::BF16 => write_rows::<half::bf16>(&mut buf, &src, [b, h, cap, c, d], start),
            _ => write_rows::<f32>(&mut buf, &src, [b, h, cap, c, d], start),
        };
        if done {
            return Tensor::from_primitive(TensorPrimitive::Float(buf));
        }
        // shared (copy on write) or strided buffer: burn's own slice_assign
        super::write_slots(Tensor::from_primitive(TensorPrimitive::Float(buf)), start, Tensor::from_primitive(TensorPrimitive::Float(src)))
    }

    /// [`super::host::swiglu`]: vectorized `exp`, both cores; f16 / bf16 widened and rounded once.
    fn kvc_swiglu<const D: usize>(gate: burn::tensor::Tensor<Self, D>, up: burn::tensor::Tensor<Self, D>) -> burn::tensor::Tensor<Self, D> {
        use burn::tensor::DType;
        if gate.dtype() != up.dtype() || gate.dims() != up.dims() {
            return burn::tensor::activation::silu(gate) * up;
        }
        match gate.dtype() {
            DType::F32 => flex_swiglu::<f32, D>(gate, up),
            DType::F16 => flex_swiglu::<half::f16, D>(gate, up),
            DType::BF16 => flex_swiglu::<half::bf16, D>(gate, up),
            _ => burn::tensor::activation::silu(gate) * up,
        }
    }

    /// [`super::host::rms_norm`] on flex's buffers (f32, f16, bf16; `gamma` in `x`'s dtype).
    fn kvc_rms_norm<const D: usize>(x: burn::tensor::Tensor<Self, D>, gamma: burn::tensor::Tensor<Self, 1>, epsilon: f64) -> burn::tensor::Tensor<Self, D> {
        use burn::tensor::DType;
        if gamma.dtype() != x.dtype() || gamma.dims()[0] != x.dims()[D - 1] || gamma.dims()[0] == 0 {
            return super::rms_norm(x, gamma, epsilon);
        }
        match x.dtype() {
            DType::F32 => flex_rms_norm::<f32, D>(x, gamma, epsilon),
            DType::F16 => flex_rms_norm::<half::f16, D>(x, gamma, epsilon),
            DType::BF16 => flex_rms_norm::<half::bf16, D>(x, gamma, epsilon),
            _ => super::rms_norm(x, gamma, epsilon),
        }
    }

    /// [`super::bf16::matmul`] on flex's bf16 buffers (`x` made contiguous if it is not; the weight
    /// read in place): `vdpbf16ps` tiles where they pay, widened f32 products otherwise.
    fn kvc_linear(x: burn::tensor::Tensor<Self, 2>, w: &burn::tensor::Tensor<Self, 2>) -> Option<burn::tensor::Tensor<Self, 2>> {
        use burn::tensor::DType;
        let ([n, k], [wk, out]) = (x.dims(), w.dims());
        if x.dtype() != DType::BF16 || w.dtype() != DType::BF16 || k != wk {
            return None;
        }
        let xp = flex_contiguous::<half::bf16, 2>(x);
        let wp = w.clone().into_primitive().tensor();
        let y = super::bf16::matmul(xp.as_slice::<half::bf16>()?, wp.as_slice::<half::bf16>()?, n, k, out)?;
        Some(flex_tensor(y, [n, out]))
    }

    fn kvc_has_quant_linear() -> bool {
        true
    }

    /// [`super::quant::linear`] (matrix-vector kernels for decode, dequantized tiles + GEMM for prefill chunks) on flex's buffer of `x` (no copy when contiguous and f32; f16 and
    /// bf16 rows are widened to f32 first and the result rounded back to their dtype, by the host
    /// kernels' vectorized conversions: burn's casts went value by value, 13% of a bf16 prefill;
    /// `vcvtneps2bf16` rounds subnormal results to zero where burn's cast kept them).
    fn kvc_quant_linear(x: burn::tensor::Tensor<Self, 2>, ws: &[&super::quant::QuantMatrix], act: super::quant::Activations) -> Option<burn::tensor::Tensor<Self, 2>> {
        use burn::tensor::DType;
        let [n, cols] = x.dims();
        if ws.is_empty() || ws.iter().any(|w| w.cols() != cols) {
            return None;
        }
        let rows = ws.iter().map(|w| w.rows()).sum::<usize>();
        match x.dtype() {
            DType::F32 => {
                let p = flex_contiguous::<f32, _>(x);
                Some(flex_tensor(super::quant::linear(p.as_slice::<f32>()?, n, ws, act), [n, rows]))
            }
            DType::F16 => flex_half_quant_linear::<half::f16>(x, [n, rows], ws, act),
            DType::BF16 => flex_half_quant_linear::<half::bf16>(x, [n, rows], ws, act),
            _ => None,
        }
    }
}

/// Attention on a half-precision cache: flex's f16 / bf16 buffers of keys and values read in
/// place, by [`super::host::decode_attention`] for a decode step (a cast of the whole cache to f32
/// per step was most of a bf16 decode step) and by [`super::host::attention`] otherwise (bf16 with
/// `vdpbf16ps` products where the CPU has AVX512_BF16; f16, or bf16 without it, widened once per
/// call). The queries are widened and the output rounded back to `dtype`.
#[cfg(feature = "flex")]
fn flex_half(a: super::AttentionArgs<'_, burn::backend::Flex>, mut req: super::HostRequest<'_>, dtype: burn::tensor::DType) -> super::AttentionOutput<burn::backend::Flex> {
    use super::host::HostFloat;
    use burn::tensor::DType;
    let (q, token_major) = if dtype == DType::F16 { flex_queries::<half::f16>(a.queries) } else { flex_queries::<half::bf16>(a.queries) };
    req.q_token_major = token_major;
    let mut qbuf = Vec::new();
    let qs: &[f32] = if dtype == DType::F16 {
        half::f16::widen(q.as_slice::<half::f16>().unwrap_or(&[]), &mut qbuf)
    } else {
        half::bf16::widen(q.as_slice::<half::bf16>().unwrap_or(&[]), &mut qbuf)
    };
    let ((k, k_off), (v, v_off), kv_stride) = flex_kv(a.keys, a.values);
    fn run<T: super::host::HostFloat + burn::tensor::Element + bytemuck::Pod>(
        req: &super::HostRequest<'_>,
        q: &[f32],
        (k, k_off): (&burn::backend::flex::FlexTensor, usize),
        (v, v_off): (&burn::backend::flex::FlexTensor, usize),
        kv_stride: usize,
    ) -> super::AttentionOutput<burn::backend::Flex> {
        let (k, v) = (&k.storage::<T>()[k_off..], &v.storage::<T>()[v_off..]);
        if req.is_decode() { req.run_decode(q, k, v, kv_stride, flex_tensor::<f32, 4>) } else { req.run(q, k, v, kv_stride, flex_tensor::<f32, 4>) }
    }
    let out = if dtype == DType::F16 {
        run::<half::f16>(&req, qs, (&k, k_off), (&v, v_off), kv_stride)
    } else {
        run::<half::bf16>(&req, qs, (&k, k_off), (&v, v_off), kv_stride)
    };
    // the output is a [b, hq, c, d] view of a contiguous [b, c, hq, d] tensor: rounded in that
    // layout (one contiguous pass), then viewed again
    super::AttentionOutput { output: out.output.swap_dims(1, 2).cast(dtype).swap_dims(1, 2), ..out }
}

/// Copies `src`'s `[b, h, c, d]` values (any non-negative strides, rows of `d` contiguous) into
/// rows of `c` slots at slot `start` of `buf`'s `[b, h, cap, d]` storage when `buf` is contiguous
/// from the start of its storage and not shared; `false` (nothing written) otherwise.
#[cfg(feature = "flex")]
fn write_rows<E: burn::tensor::Element + bytemuck::Pod>(
    buf: &mut burn::backend::flex::FlexTensor,
    src: &burn::backend::flex::FlexTensor,
    [b, h, cap, c, d]: [usize; 5],
    start: usize,
) -> bool {
    // the view must cover the storage from element 0: `try_storage_mut` is the whole storage
    let whole = buf.layout().start_offset() == 0 && buf.as_slice::<E>().is_some_and(|s| s.len() == b * h * cap * d);
    if !whole {
        return false;
    }
    let (off, st) = (src.layout().start_offset(), src.layout().strides());
    let st = [0, 1, 2].map(|i| st[i] as usize);
    let s = src.storage::<E>();
    let Some(dst) = buf.try_storage_mut::<E>() else { return false };
    for (bi, hi) in (0..b).flat_map(|bi| (0..h).map(move |hi| (bi, hi))) {
        let row = &mut dst[((bi * h + hi) * cap + start) * d..][..c * d];
        for (i, slot) in row.chunks_exact_mut(d).enumerate() {
            slot.copy_from_slice(&s[off + bi * st[0] + hi * st[1] + i * st[2]..][..d]);
        }
    }
    true
}

/// `t`'s buffer with its values contiguous as `E` (a copy only for strided views).
#[cfg(feature = "flex")]
fn flex_contiguous<E: burn::tensor::Element + bytemuck::Pod, const D: usize>(t: burn::tensor::Tensor<burn::backend::Flex, D>) -> burn::backend::flex::FlexTensor {
    let p = t.into_primitive().tensor();
    if p.as_slice::<E>().is_some() {
        p
    } else {
        p.to_contiguous()
    }
}

/// The queries' values (`[b, hq, c, d]`) and whether they are laid out token-major (`[b, c, hq,
/// d]`): the decoder's queries are a heads-first view of its projections, read in place; any
/// other layout is made contiguous heads-first.
#[cfg(feature = "flex")]
fn flex_queries<E: burn::tensor::Element + bytemuck::Pod>(q: burn::tensor::Tensor<burn::backend::Flex, 4>) -> (burn::backend::flex::FlexTensor, bool) {
    let token_major = q.clone().swap_dims(1, 2).into_primitive().tensor();
    if token_major.as_slice::<E>().is_some() {
        (token_major, true)
    } else {
        (flex_contiguous::<E, 4>(q), false)
    }
}

/// A host result as a flex tensor.
#[cfg(feature = "flex")]
fn flex_tensor<E: burn::tensor::Element, const D: usize>(data: Vec<E>, shape: [usize; D]) -> burn::tensor::Tensor<burn::backend::Flex, D> {
    use burn::tensor::{Tensor, TensorData, TensorPrimitive};
    Tensor::from_primitive(TensorPrimitive::Float(burn::backend::flex::FlexTensor::from_data(TensorData::new(data, shape))))
}

/// [`super::quant::linear`] on half-precision rows `x [n, cols]`: widened to f32, the result
/// `[n, rows]` rounded back to `E`.
#[cfg(feature = "flex")]
fn flex_half_quant_linear<E>(x: burn::tensor::Tensor<burn::backend::Flex, 2>, [n, rows]: [usize; 2], ws: &[&super::quant::QuantMatrix], act: super::quant::Activations) -> Option<burn::tensor::Tensor<burn::backend::Flex, 2>>
where
    E: super::host::HostFloat + burn::tensor::Element + bytemuck::Pod,
{
    let p = flex_contiguous::<E, 2>(x);
    let mut buf = Vec::new();
    let y = super::quant::linear(E::widen(p.as_slice::<E>()?, &mut buf), n, ws, act);
    let mut out = bytemuck::zeroed_vec::<E>(y.len());
    E::narrow(&y, &mut out);
    Some(flex_tensor(out, [n, rows]))
}

#[cfg(feature = "flex")]
fn flex_swiglu<E, const D: usize>(gate: burn::tensor::Tensor<burn::backend::Flex, D>, up: burn::tensor::Tensor<burn::backend::Flex, D>) -> burn::tensor::Tensor<burn::backend::Flex, D>
where
    E: super::host::HostFloat + burn::tensor::Element + bytemuck::Pod,
{
    let shape = gate.dims();
    let (g, u) = (flex_contiguous::<E, D>(gate), flex_contiguous::<E, D>(up));
    let out = super::host::swiglu(g.as_slice::<E>().unwrap_or(&[]), u.as_slice::<E>().unwrap_or(&[]));
    flex_tensor(out, shape)
}

#[cfg(feature = "flex")]
fn flex_rms_norm<E, const D: usize>(x: burn::tensor::Tensor<burn::backend::Flex, D>, gamma: burn::tensor::Tensor<burn::backend::Flex, 1>, epsilon: f64) -> burn::tensor::Tensor<burn::backend::Flex, D>
where
    E: super::host::HostFloat + burn::tensor::Element + bytemuck::Pod,
{
    let shape = x.dims();
    let (xs, g) = (flex_contiguous::<E, D>(x), flex_contiguous::<E, 1>(gamma));
    let out = super::host::rms_norm(xs.as_slice::<E>().unwrap_or(&[]), g.as_slice::<E>().unwrap_or(&[]), epsilon as f32);
    flex_tensor(out, shape)
}


/// A `[batch, heads, len, head_dim]` tensor (any dtype) whose (batch, head) rows are each contiguous and
/// evenly spaced (the cache's views of its preallocated buffer): the tensor, the offset of its
/// first element and the row stride, without copying. Anything else is made contiguous.
#[cfg(feature = "flex")]
fn flex_rows(t: burn::tensor::Tensor<burn::backend::Flex, 4>) -> (burn::backend::flex::FlexTensor, usize, usize) {
    let [b, h, len, d] = t.dims();
    let p = t.into_primitive().tensor();
    let l = p.layout();
    let st = l.strides();
    let row = st[1];
    let even = st[3] == 1 && st[2] == d as isize && row >= (len * d) as isize && (b == 1 || st[0] == h as isize * row);
    if even && (h > 1 || b == 1) {
        let off = l.start_offset();
        (p, off, row as usize)
    } else {
        let p = p.to_contiguous();
        (p, 0, len * d)
    }
}

/// Keys and values (`[batch, kv_heads, len, head_dim]`) as [`flex_rows`] with one row stride for
/// both: (keys, offset), (values, offset), stride; both made contiguous when their strides differ.
#[cfg(feature = "flex")]
#[allow(clippy::type_complexity)]
fn flex_kv(
    keys: burn::tensor::Tensor<burn::backend::Flex, 4>,
    values: burn::tensor::Tensor<burn::backend::Flex, 4>,
) -> ((burn::backend::flex::FlexTensor, usize), (burn::backend::flex::FlexTensor, usize), usize) {
    let [_, _, len, d] = keys.dims();
    let ((k, k_off, k_stride), (v, v_off, v_stride)) = (flex_rows(keys), flex_rows(values));
    if k_stride == v_stride {
        ((k, k_off), (v, v_off), k_stride)
    } else {
        ((k.to_contiguous(), 0), (v.to_contiguous(), 0), len * d)
    }
}

#[cfg(feature = "ndarray")]
impl KvcBackend for burn::backend::NdArray<f32> {
    /// The host kernel through copies (ndarray's arrays are not reachable without one) for
    /// chunks of queries; decode keeps the generic path (copying the whole cache out for one
    /// query costs more than it saves).
    fn kvc_attention(a: AttentionArgs<'_, Self>) -> AttentionOutput<Self> {
        if a.queries.dims()[2] == 1 && a.reduce.is_none() && !a.probs {
            super::generic_attention(a)
        } else {
            super::host_attention_copying(a)
        }
    }

    /// [`super::host_quant_attention_copying`]: decode steps on the codes.
    fn kvc_quant_attention(a: AttentionArgs<'_, Self>, quant: &crate::kvquant::QuantKv) -> AttentionOutput<Self> {
        super::host_quant_attention_copying(a, quant)
    }

    fn kvc_has_quant_linear() -> bool {
        true
    }

    /// [`super::quant::linear`] through copies of `x` and `y`.
    fn kvc_quant_linear(x: burn::tensor::Tensor<Self, 2>, ws: &[&super::quant::QuantMatrix], act: super::quant::Activations) -> Option<burn::tensor::Tensor<Self, 2>> {
        super::host_quant_linear_copying(x, ws, act)
    }
}

#[cfg(feature = "wgpu")]
impl KvcBackend for burn::backend::Wgpu {}

#[cfg(feature = "cuda")]
impl KvcBackend for burn::backend::Cuda {}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Tensor, TensorData};

    use super::KvcBackend;

    fn t(v: Vec<f32>, shape: [usize; 4]) -> Tensor<Flex, 4> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn host(x: Tensor<Flex, 4>) -> Vec<f32> {
        x.into_data().to_vec::<f32>().unwrap()
    }

    /// Slots land where `slice_assign` puts them, in place when the buffer is not shared, and a
    /// shared buffer's other holder never sees the write.
    #[test]
    fn flex_slot_writes_match_slice_assign_and_copy_on_write() {
        let buf = t((0..2 * 3 * 5 * 2).map(|i| i as f32).collect(), [2, 3, 5, 2]);
        let slots = t((0..2 * 3 * 2 * 2).map(|i| -(i as f32) - 1.0).collect(), [2, 3, 2, 2]);
        let want = host(super::super::write_slots(buf.clone(), 2, slots.clone()));
        let kept = buf.clone();
        let shared = Flex::kvc_write_slots(buf, 2, slots.clone());
        assert_eq!(host(shared), want);
        assert_eq!(host(kept.clone()), (0..60).map(|i| i as f32).collect::<Vec<_>>(), "the other holder changed");
        let unique = Flex::kvc_write_slots(kept, 2, slots.clone().swap_dims(0, 1).swap_dims(0, 1));
        assert_eq!(host(unique), want);
        // a view starting past element 0 of its storage (the second batch row), not shared
        let big = t((0..3 * 3 * 5 * 2).map(|i| i as f32).collect(), [3, 3, 5, 2]);
        let view = big.narrow(0, 1, 2);
        let want = host(super::super::write_slots(view.clone(), 2, slots.clone()));
        assert_eq!(host(Flex::kvc_write_slots(view, 2, slots.clone())), want, "offset view");
        // slots that are a heads-first view of token-major values (the decoder's keys), and a
        // narrowed one (offset and gaps), read in place
        let buf = t((0..60).map(|i| i as f32).collect(), [2, 3, 5, 2]);
        let token_major = t((0..2 * 2 * 3 * 2).map(|i| -(i as f32) - 1.0).collect(), [2, 2, 3, 2]).swap_dims(1, 2);
        let want = host(super::super::write_slots(buf.clone(), 1, token_major.clone()));
        assert_eq!(host(Flex::kvc_write_slots(buf, 1, token_major)), want, "strided slots");
        let buf = t((0..60).map(|i| i as f32).collect(), [2, 3, 5, 2]);
        let wide = t((0..2 * 3 * 4 * 3).map(|i| -(i as f32) - 1.0).collect(), [2, 3, 4, 3]).narrow(2, 1, 3).narrow(3, 1, 2);
        let want = host(super::super::write_slots(buf.clone(), 2, wide.clone()));
        assert_eq!(host(Flex::kvc_write_slots(buf, 2, wide)), want, "narrowed slots");
    }

    /// Attention reads the cache's strided views of its buffer without copying them first and
    /// gives what it gives on contiguous copies.
    #[test]
    fn flex_attention_on_buffer_views_matches_contiguous() {
        use crate::kernels::{AttentionArgs, QueryReduce};
        let v = |n: usize, s: f32| (0..n).map(|i| (i as f32 * 0.37 + s).sin()).collect::<Vec<f32>>();
        let buf_k = t(v(2 * 9 * 4, 0.1), [1, 2, 9, 4]);
        let buf_v = t(v(2 * 9 * 4, 0.7), [1, 2, 9, 4]);
        let q = t(v(4 * 3 * 4, 0.3), [1, 4, 3, 4]);
        let (k, vv) = (buf_k.narrow(2, 0, 6), buf_v.narrow(2, 0, 6));
        let args = |k: Tensor<Flex, 4>, vv: Tensor<Flex, 4>| AttentionArgs { queries: q.clone(), keys: k, values: vv, valid: None, reduce: Some(QueryReduce::Max), probs: false };
        let a = Flex::kvc_attention(args(k.clone(), vv.clone()));
        let contiguous = |x: Tensor<Flex, 4>| t(host(x), [1, 2, 6, 4]);
        let b = Flex::kvc_attention(args(contiguous(k), contiguous(vv)));
        assert_eq!(host(a.output), host(b.output));
        assert_eq!(a.reduced.unwrap().into_data().to_vec::<f32>().unwrap(), b.reduced.unwrap().into_data().to_vec::<f32>().unwrap());
    }
}
