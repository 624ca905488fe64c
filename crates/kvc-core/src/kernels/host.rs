//! Attention on host memory (CPU backends): blocked, multi-threaded, GEMM-based, with a
//! vectorized `exp`.
//!
//! Per (batch, KV head, block of [`QUERY_BLOCK`] queries), one task on the rayon pool (the GQA
//! group's query heads stacked into the same GEMMs):
//! `S = scale * Q_blk K^T` over the keys the block can see (GEMM), a row softmax (max, `exp`,
//! sum, normalize; keys after a query's position and padded slots get exactly 0), optional
//! reduction of the probabilities over the block's queries, then `O_blk = P V` (GEMM). When
//! probabilities or reductions are wanted the softmax is the textbook one (`exp(s - max) / sum`,
//! as torch's eager attention) over whole score rows; when only the output is wanted, blocks that
//! see more than [`KEY_TILE`] keys use the online softmax over key tiles, and decode splits the
//! keys over tasks ([`decode_split`]).
//!
//! Keys and values may be f32, f16 or bf16, read where they are. bf16 on a CPU where `vdpbf16ps`
//! pays ([`super::bf16::products_pay`]) multiplies in bf16 ([`super::bf16::Packed`]: keys and values packed once per call
//! and head; f32 sums; the probabilities rounded to bf16 for `P V`, as torch's fused CPU
//! attention (SDPA's flash kernel) in bf16 does; torch's eager path also rounds the scores); f16,
//! and bf16 elsewhere, are widened to f32 once per call and head.
//!
//! Why: burn-flex 0.21's fused attention runs every head on one thread and calls scalar `expf`
//! (41% of a 2048-token prefill in `perf`, issue 10).

use rayon::prelude::*;

use super::QueryReduce;

/// Queries per task.
pub const QUERY_BLOCK: usize = 32;

/// One attention call on host slices (all row-major; queries `f32`, keys and values `T`).
///
/// Query `i` of the chunk sits at cache slot `len - chunk + i` and sees slots `0..=len - chunk + i`
/// (cached keys all visible, the chunk causal; decode is `chunk = 1`). Keys and values are `T`:
/// f32, f16 or bf16 ([`HostFloat`]). With bf16 keys on a CPU with AVX512_BF16 the f32 queries are
/// rounded to bf16 for the products (exact for a bf16 model, whose queries are bf16 already).
#[derive(Clone, Copy, Debug)]
pub struct HostAttention<'a, T = f32> {
    /// Queries `[batch, q_heads, chunk, head_dim]`, or `[batch, chunk, q_heads, head_dim]` (the
    /// projections' layout) when `q_token_major`.
    pub q: &'a [f32],
    /// `q` is laid out `[batch, chunk, q_heads, head_dim]`.
    pub q_token_major: bool,
    /// Keys `[batch, kv_heads, len, head_dim]`, (batch, KV head) rows `kv_stride` apart.
    pub k: &'a [T],
    /// Values, laid out as `k`.
    pub v: &'a [T],
    /// Elements between the starts of consecutive (batch, KV head) rows of `k` and `v`:
    /// `len * head_dim` when contiguous, the capacity times `head_dim` for views of a
    /// preallocated cache buffer.
    pub kv_stride: usize,
    /// Which slots hold a real token, `[batch, kv_heads, len]`; `None` = all.
    pub valid: Option<&'a [bool]>,
    /// Batch size.
    pub batch: usize,
    /// Query heads (a multiple of `kv_heads`: GQA).
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Queries per head.
    pub chunk: usize,
    /// Key/value slots per head (`>= chunk`).
    pub len: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Score scale (`1/sqrt(head_dim)`).
    pub scale: f32,
    /// Also return the probabilities reduced over queries.
    pub reduce: Option<QueryReduce>,
    /// Also return the full probabilities.
    pub probs: bool,
}

/// What [`attention`] returns.
#[derive(Clone, Debug, Default)]
pub struct HostOutput {
    /// Attention output, `[batch, chunk, q_heads, head_dim]` (the layout the output projection
    /// reads).
    pub out: Vec<f32>,
    /// Probabilities reduced over the chunk's queries, `[batch, q_heads, len]`.
    pub reduced: Option<Vec<f32>>,
    /// Probabilities `[batch, q_heads, chunk, len]`.
    pub probs: Option<Vec<f32>>,
}

/// One task's result: `g` query heads (one GQA group) x `rows` queries, stacked head-major.
struct Block {
    b: usize,
    kv: usize,
    r0: usize,
    rows: usize,
    /// Keys visible to the block's last query.
    n: usize,
    /// `[g * rows, head_dim]`.
    out: Vec<f32>,
    /// `[g * rows, n]` (only when probabilities are returned).
    probs: Vec<f32>,
    /// `[g, n]`.
    reduced: Option<Vec<f32>>,
}

/// Runs one attention call. Panics only on inconsistent slice lengths (a caller bug: the burn
/// wrappers derive every length from tensor shapes).
///
/// Tasks are (batch, KV head, block of [`QUERY_BLOCK`] queries): the `g` query heads of a GQA
/// group are stacked into one `g * rows`-row GEMM, so each task packs its keys and values once.
pub fn attention<T: HostFloat>(a: &HostAttention<'_, T>) -> HostOutput {
    attention_with(a, super::bf16::products_pay())
}

/// [`attention`] with bf16 keys and values multiplied by `vdpbf16ps` when `bf16_products` (and
/// the CPU has AVX512_BF16), by f32 FMAs on widened values otherwise; [`attention`] passes
/// [`super::bf16::products_pay`]. Other element types ignore it.
pub fn attention_with<T: HostFloat>(a: &HostAttention<'_, T>, bf16_products: bool) -> HostOutput {
    let (b, hq, hkv, c, len, d) = (a.batch, a.q_heads, a.kv_heads, a.chunk, a.len, a.head_dim);
    assert!(hkv > 0 && hq % hkv == 0 && c <= len && a.q.len() == b * hq * c * d, "host attention: inconsistent shapes");
    let kv_extent = (b * hkv - 1) * a.kv_stride + len * d;
    assert!(a.kv_stride >= len * d && a.k.len() >= kv_extent && a.v.len() >= kv_extent, "host attention: inconsistent key/value lengths");
    assert!(a.valid.is_none_or(|v| v.len() == b * hkv * len), "host attention: inconsistent mask length");
    let g = hq / hkv;
    let past = len - c;
    if c == 1 && a.reduce.is_none() && !a.probs && len > KEY_TILE {
        return decode_split(a);
    }
    blocks(a, g, past, bf16_products)
}

/// Float elements the host kernels read and write: f32 as they are; f16 / bf16 widened to f32
/// (exactly) for the arithmetic and rounded back once (to nearest even).
pub trait HostFloat: Copy + Send + Sync + 'static {
    /// `src` as f32: `src` itself, or its values widened into `buf`.
    fn widen<'a>(src: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32];
    /// `src` rounded into `dst` (same lengths).
    fn narrow(src: &[f32], dst: &mut [Self]);
    /// `src` itself when `Self` is f32.
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }
    /// `src` itself when `Self` is bf16 (products in bf16 where the CPU has them).
    fn as_bf16(_src: &[Self]) -> Option<&[half::bf16]> {
        None
    }
}

impl HostFloat for f32 {
    fn widen<'a>(src: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }

    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
}

impl HostFloat for half::f16 {
    fn widen<'a>(src: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        buf.clear();
        buf.resize(src.len(), 0.0);
        // F16C conversions where the CPU has them, eight per instruction
        widen_f16(src.reinterpret_cast(), buf);
        buf
    }

    fn narrow(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

impl HostFloat for half::bf16 {
    fn widen<'a>(src: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32] {
        // a bf16 is the top half of an f32: a shift, vectorized per instruction set (half's
        // slice conversion goes value by value, 10% of a bf16 decode step; the baseline build's
        // SSE2 shift was still 13%)
        buf.clear();
        buf.resize(src.len(), 0.0);
        simd::widen_bf16(src, buf);
        buf
    }

    fn narrow(src: &[f32], dst: &mut [Self]) {
        super::bf16::narrow(src, dst);
    }

    fn as_bf16(src: &[Self]) -> Option<&[half::bf16]> {
        Some(src)
    }
}

/// f16 bits widened to f32 (exact): eight per F16C instruction where the CPU has it (`half`'s
/// slice conversion calls a function per eight values), else `half`'s conversion.
pub(crate) fn widen_f16(w: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has the instructions the function is compiled for.
        unsafe { widen_f16_f16c(w, out) };
        return;
    }
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    w.reinterpret_cast::<half::f16>().convert_to_f32_slice(&mut out[..w.len()]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16_f16c(w: &[u16], out: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let n = w.len();
    assert!(out.len() >= n, "widen_f16: {} values into {}", n, out.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` words are read and written, both slices hold at least `n`.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i).cast::<__m128i>()))) };
        i += 8;
    }
    for j in i..n {
        out[j] = half::f16::from_bits(w[j]).to_f32();
    }
}

/// RMSNorm over rows of `gamma.len()` values (HF `LlamaRMSNorm`, burn's `RmsNorm`):
/// `x / sqrt(mean(x^2) + eps) * gamma` per row, in f32 (half inputs widened, the result rounded
/// once). Rows split over the rayon pool when there are many (a prefill chunk); one row (a decode
/// step) stays on this thread. Panics only when `gamma` is empty or `x.len()` is not a multiple
/// of `gamma.len()` (a caller bug: the burn wrappers derive both from shapes).
pub fn rms_norm<T: HostFloat>(x: &[T], gamma: &[T], eps: f32) -> Vec<T> {
    let d = gamma.len();
    assert!(d > 0 && x.len().is_multiple_of(d), "rms_norm: rows of {d} values do not tile {} values", x.len());
    let Some(&first) = x.first() else { return Vec::new() };
    let mut gbuf = Vec::new();
    let g = T::widen(gamma, &mut gbuf);
    let mut out = vec![first; x.len()];
    let rows_per_part = (1 << 14) / d + 1;
    let part = |(xs, os): (&[T], &mut [T])| {
        let (mut xbuf, mut ybuf) = (Vec::new(), vec![0f32; d]);
        for (xr, or) in xs.chunks_exact(d).zip(os.chunks_exact_mut(d)) {
            let xr = T::widen(xr, &mut xbuf);
            let rms = (simd::sum_squares(xr) / d as f32 + eps).sqrt();
            for ((y, &v), &w) in ybuf.iter_mut().zip(xr).zip(g) {
                *y = v / rms * w;
            }
            T::narrow(&ybuf, or);
        }
    };
    if x.len() / d <= rows_per_part {
        part((x, &mut out));
    } else {
        x.par_chunks(rows_per_part * d).zip(out.par_chunks_mut(rows_per_part * d)).for_each(part);
    }
    out
}

/// Attention of one query per head (a decode step, no reductions or probabilities) over keys and
/// values of any [`HostFloat`] type: a half-precision cache is read in place, one widened key
/// tile at a time, instead of being cast to f32 whole for every step. Same arithmetic as
/// [`attention`]'s decode (f32 throughout); panics only on inconsistent lengths.
pub fn decode_attention<T: HostFloat>(a: &HostAttention<'_, T>) -> HostOutput {
    let (b, hq, hkv, len, d) = (a.batch, a.q_heads, a.kv_heads, a.len, a.head_dim);
    assert!(a.chunk == 1 && a.reduce.is_none() && !a.probs, "decode attention: one query per head, output only");
    assert!(hkv > 0 && hq % hkv == 0 && len > 0 && a.q.len() == b * hq * d, "decode attention: inconsistent shapes");
    let kv_extent = (b * hkv - 1) * a.kv_stride + len * d;
    assert!(a.kv_stride >= len * d && a.k.len() >= kv_extent && a.v.len() >= kv_extent, "decode attention: inconsistent key/value lengths");
    assert!(a.valid.is_none_or(|v| v.len() == b * hkv * len), "decode attention: inconsistent mask length");
    decode_split(a)
}

/// One (batch, KV head) row of keys and values in the form [`attention`]'s products read.
enum KvRow<'a> {
    /// f32 values: the cache's own, or f16 / bf16 widened (no AVX512_BF16, or it does not pay).
    F32 { k: std::borrow::Cow<'a, [f32]>, v: std::borrow::Cow<'a, [f32]> },
    /// bf16 packed for `vdpbf16ps` products ([`super::bf16::Packed`]).
    Bf16(super::bf16::Packed),
}

impl<'a> KvRow<'a> {
    /// The first `len` keys and values of a row (`len * d` values each); bf16 packed for
    /// `vdpbf16ps` when `bf16_products` and the CPU has it, widened otherwise.
    fn new<T: HostFloat>(k: &'a [T], v: &'a [T], len: usize, d: usize, bf16_products: bool) -> Self {
        let (k, v) = (&k[..len * d], &v[..len * d]);
        if let (Some(k), Some(v)) = (T::as_f32(k), T::as_f32(v)) {
            return Self::F32 { k: k.into(), v: v.into() };
        }
        if let Some(p) = T::as_bf16(k).zip(T::as_bf16(v)).filter(|_| bf16_products).and_then(|(k, v)| super::bf16::Packed::new(k, v, len, d)) {
            return Self::Bf16(p);
        }
        let (mut kb, mut vb) = (Vec::new(), Vec::new());
        T::widen(k, &mut kb);
        T::widen(v, &mut vb);
        Self::F32 { k: kb.into(), v: vb.into() }
    }

    /// `s [m, tn] = scale * Q K[t0..t0 + tn]^T`; `q [m, d]` f32, `qb` the same rows in bf16
    /// (used by [`KvRow::Bf16`]; empty otherwise); `t0` a multiple of 32.
    #[allow(clippy::too_many_arguments)]
    fn scores(&self, q: &[f32], qb: &[half::bf16], m: usize, d: usize, t0: usize, tn: usize, scale: f32, s: &mut [f32]) {
        match self {
            Self::F32 { k, .. } => {
                // lhs Q [m, d] row-major, rhs K^T [d, tn] (K row-major), dst [m, tn]
                // SAFETY: every pointer is valid for the given extents and strides.
                unsafe {
                    gemm::gemm(
                        m, tn, d, s.as_mut_ptr(), 1, tn as isize, false, q.as_ptr(), 1, d as isize, k[t0 * d..].as_ptr(), d as isize, 1, 0.0, scale,
                        false, false, false, gemm::Parallelism::None,
                    );
                }
            }
            Self::Bf16(p) => p.scores(qb, m, t0, tn, scale, s),
        }
    }

    /// `out [m, d] (+)= P V[t0..t0 + tn]`, `p [m, tn]`; `accumulate` adds to `out`.
    #[allow(clippy::too_many_arguments)]
    fn weighted(&self, p: &[f32], m: usize, d: usize, t0: usize, tn: usize, out: &mut [f32], accumulate: bool, buf: &mut Vec<half::bf16>) {
        match self {
            Self::F32 { v, .. } => {
                // lhs P [m, tn], rhs V [tn, d], dst [m, d]
                // SAFETY: as in `scores`.
                unsafe {
                    gemm::gemm(
                        m, d, tn, out.as_mut_ptr(), 1, d as isize, accumulate, p.as_ptr(), 1, tn as isize, v[t0 * d..].as_ptr(), 1, d as isize,
                        if accumulate { 1.0 } else { 0.0 }, 1.0, false, false, false, gemm::Parallelism::None,
                    );
                }
            }
            Self::Bf16(packed) => packed.weighted(p, m, t0, tn, out, accumulate, buf),
        }
    }
}

thread_local! {
    /// Per-thread buffers of [`blocks`]' tasks: scores `[m, n]` (when the probabilities are not
    /// returned) and the bf16 probabilities of [`KvRow::weighted`]; they grow to the largest task
    /// the thread has run (6 MB for SmolLM2's 16k-key scoring pass) and are reused, up to
    /// [`SCRATCH_KEEP`] bytes each: a larger one is freed after its task.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<half::bf16>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Bytes of a [`SCRATCH`] buffer kept between tasks (16 MB: a task of 32 queries of 4 grouped
/// heads over 32k keys); larger buffers (long contexts of wide GQA groups) are freed after use so
/// that idle threads do not hold them.
const SCRATCH_KEEP: usize = 16 << 20;

/// [`attention`]'s tasks: (batch, KV head, block of queries).
fn blocks<T: HostFloat>(a: &HostAttention<'_, T>, g: usize, past: usize, bf16_products: bool) -> HostOutput {
    let (b, hq, hkv, c, len, d) = (a.batch, a.q_heads, a.kv_heads, a.chunk, a.len, a.head_dim);
    // every row's keys and values once (in place for f32; packed or widened for f16 / bf16)
    let kv_rows: Vec<KvRow<'_>> =
        (0..b * hkv).into_par_iter().map(|row| KvRow::new(&a.k[row * a.kv_stride..], &a.v[row * a.kv_stride..], len, d, bf16_products)).collect();
    let mut tasks = Vec::new();
    for bi in 0..b {
        for kv in 0..hkv {
            for r0 in (0..c).step_by(QUERY_BLOCK) {
                tasks.push((bi, kv, r0, QUERY_BLOCK.min(c - r0)));
            }
        }
    }
    let blocks: Vec<Block> = tasks
        .into_par_iter()
        .map(|(bi, kv, r0, rows)| {
            let n = past + r0 + rows;
            let m = g * rows;
            // the group's queries, head-major: row gi * rows + i = head kv * g + gi, query r0 + i
            let mut q = Vec::with_capacity(m * d);
            for h in kv * g..(kv + 1) * g {
                if a.q_token_major {
                    for i in r0..r0 + rows {
                        q.extend_from_slice(&a.q[((bi * c + i) * hq + h) * d..][..d]);
                    }
                } else {
                    q.extend_from_slice(&a.q[((bi * hq + h) * c + r0) * d..][..rows * d]);
                }
            }
            let row = bi * hkv + kv;
            let kv_row = &kv_rows[row];
            let qb: Vec<half::bf16> = match kv_row {
                KvRow::Bf16(_) => q.iter().map(|&x| half::bf16::from_f32(x)).collect(),
                KvRow::F32 { .. } => Vec::new(),
            };
            let valid = a.valid.map(|mask| &mask[row * len..row * len + n]);
            if a.reduce.is_none() && !a.probs && n > KEY_TILE {
                // only the output is wanted: key tiles with an online softmax keep the scores in cache
                let out = online_block(&q, &qb, kv_row, valid, Geometry { rows, m, n, d, first_visible: past + r0 + 1, scale: a.scale });
                return Block { b: bi, kv, r0, rows, n, out, probs: Vec::new(), reduced: None };
            }
            // the probabilities returned: their own buffer; otherwise the thread's scratch (a fresh
            // m x n buffer per task was a memset and page faults: 15% of a bf16 scoring pass)
            let mut probs = if a.probs { vec![0f32; m * n] } else { Vec::new() };
            let (out, reduced) = SCRATCH.with(|cell| {
                let mut scratch = cell.borrow_mut();
                let (scores, buf) = &mut *scratch;
                let s: &mut [f32] = if a.probs {
                    &mut probs
                } else {
                    if scores.len() < m * n {
                        scores.resize(m * n, 0.0);
                    }
                    &mut scores[..m * n]
                };
                // S = scale * Q K^T over the n keys the block sees (every entry written)
                kv_row.scores(&q, &qb, m, d, 0, n, a.scale, s);
                let mut reduced = a.reduce.map(|_| vec![0f32; g * n]);
                let mut inv_sums = vec![0f32; m];
                for (r, row) in s.chunks_exact_mut(n).enumerate() {
                    let visible = past + r0 + r % rows + 1;
                    let (_, inv) = softmax_row(row, visible, valid);
                    inv_sums[r] = inv;
                    if let (Some(red), Some(op)) = (reduced.as_mut(), a.reduce) {
                        reduce_into(op, &mut red[(r / rows) * n..][..visible], &row[..visible], inv);
                    }
                }
                let mut out = vec![0f32; m * d];
                // O = P V with P unnormalized (rows scaled after)
                kv_row.weighted(s, m, d, 0, n, &mut out, false, buf);
                for (row, &inv) in out.chunks_exact_mut(d).zip(&inv_sums) {
                    simd::scale(row, inv);
                }
                if a.probs {
                    for (row, &inv) in s.chunks_exact_mut(n).zip(&inv_sums) {
                        simd::scale(row, inv);
                    }
                }
                if scores.capacity() * 4 > SCRATCH_KEEP {
                    *scores = Vec::new();
                }
                if buf.capacity() * 2 > SCRATCH_KEEP {
                    *buf = Vec::new();
                }
                (out, reduced)
            });
            Block { b: bi, kv, r0, rows, n, out, probs, reduced }
        })
        .collect();
    let mut out = vec![0f32; b * c * hq * d];
    let mut reduced = a.reduce.map(|_| vec![0f32; b * hq * len]);
    let mut probs = a.probs.then(|| vec![0f32; b * hq * c * len]);
    for blk in blocks {
        for gi in 0..g {
            let h = blk.kv * g + gi;
            for i in 0..blk.rows {
                let src = gi * blk.rows + i;
                let dst = ((blk.b * c + blk.r0 + i) * hq + h) * d;
                out[dst..dst + d].copy_from_slice(&blk.out[src * d..(src + 1) * d]);
                if let Some(p) = probs.as_mut() {
                    let dst = ((blk.b * hq + h) * c + blk.r0 + i) * len;
                    p[dst..dst + blk.n].copy_from_slice(&blk.probs[src * blk.n..(src + 1) * blk.n]);
                }
            }
            if let (Some(all), Some(part), Some(op)) = (reduced.as_mut(), blk.reduced.as_ref(), a.reduce) {
                let dst = &mut all[(blk.b * hq + h) * len..][..blk.n];
                reduce_into(op, dst, &part[gi * blk.n..(gi + 1) * blk.n], 1.0);
            }
        }
    }
    HostOutput { out, reduced, probs }
}

/// Folds `x * scale` into `acc` with the reduction `op` (max or sum over queries).
fn reduce_into(op: QueryReduce, acc: &mut [f32], x: &[f32], scale: f32) {
    match op {
        QueryReduce::Max => simd::max_scaled_into(acc, x, scale),
        QueryReduce::Sum => simd::add_scaled_into(acc, x, scale),
    }
}

/// Keys per tile of the online-softmax path (scores of one tile: `g * QUERY_BLOCK x KEY_TILE`
/// floats, well inside L2).
pub const KEY_TILE: usize = 512;

/// Shapes of one task: `m = g * rows` stacked query rows (row `r` is query `r % rows` of the
/// block), `n` visible keys, head dim `d`; row `r` sees keys `0..first_visible + r % rows`.
#[derive(Clone, Copy)]
struct Geometry {
    rows: usize,
    m: usize,
    n: usize,
    d: usize,
    first_visible: usize,
    scale: f32,
}

/// One task's output `[m, d]` with the online softmax (FlashAttention's recurrence: per row a
/// running max `mx` and sum `l`; when a tile raises the max, the accumulated output and sum are
/// scaled by `exp(old - new)`), one key tile at a time.
fn online_block(q: &[f32], qb: &[half::bf16], kv: &KvRow<'_>, valid: Option<&[bool]>, g: Geometry) -> Vec<f32> {
    let Geometry { rows, m, n, d, first_visible, scale } = g;
    let mut acc = vec![0f32; m * d];
    let mut mx = vec![f32::NEG_INFINITY; m];
    let mut l = vec![0f32; m];
    let mut s = vec![0f32; m * KEY_TILE];
    let mut buf = Vec::new();
    for t0 in (0..n).step_by(KEY_TILE) {
        let tn = KEY_TILE.min(n - t0);
        let s = &mut s[..m * tn];
        kv.scores(q, qb, m, d, t0, tn, scale, s);
        for (r, row) in s.chunks_exact_mut(tn).enumerate() {
            let lim = (first_visible + r % rows).saturating_sub(t0).min(tn);
            let (tile_max, inv) = softmax_row(row, lim, valid.map(|m| &m[t0..t0 + tn]));
            if inv == 0.0 {
                continue;
            }
            // bring the tile and the running state to the larger max
            if tile_max > mx[r] {
                let corr = if mx[r] == f32::NEG_INFINITY { 0.0 } else { simd::exp(mx[r] - tile_max) };
                l[r] *= corr;
                simd::scale(&mut acc[r * d..(r + 1) * d], corr);
                mx[r] = tile_max;
                l[r] += 1.0 / inv;
            } else {
                let corr = simd::exp(tile_max - mx[r]);
                simd::scale(&mut row[..lim], corr);
                l[r] += corr / inv;
            }
        }
        // acc += P V_tile
        kv.weighted(s, m, d, t0, tn, &mut acc, true, &mut buf);
    }
    for (row, &sum) in acc.chunks_exact_mut(d).zip(&l) {
        simd::scale(row, if sum > 0.0 { 1.0 / sum } else { 0.0 });
    }
    acc
}

/// Decode (one query per head) over a long cache, split over key tiles so both cores work even
/// with few KV heads (flash-decoding): per (batch, KV head, tile) a partial max, sum and output of
/// the group's `g` query rows, merged with `exp(max_t - max)` weights.
fn decode_split<T: HostFloat>(a: &HostAttention<'_, T>) -> HostOutput {
    let (b, hq, hkv, len, d) = (a.batch, a.q_heads, a.kv_heads, a.len, a.head_dim);
    let g = hq / hkv;
    let tiles = len.div_ceil(KEY_TILE);
    let tasks: Vec<(usize, usize, usize)> = (0..b).flat_map(|bi| (0..hkv).flat_map(move |kv| (0..tiles).map(move |t| (bi, kv, t)))).collect();
    // per task: max [g], sum [g], unnormalized output [g * d]
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(bi, kv, t)| {
            let t0 = t * KEY_TILE;
            let tn = KEY_TILE.min(len - t0);
            let row = bi * hkv + kv;
            // one query per head: both query layouts are [batch, q_heads, head_dim]
            let q = &a.q[(bi * hq + kv * g) * d..][..g * d];
            let (k, v) = (&a.k[row * a.kv_stride + t0 * d..][..tn * d], &a.v[row * a.kv_stride + t0 * d..][..tn * d]);
            let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
            let valid = a.valid.map(|m| &m[row * len + t0..row * len + t0 + tn]);
            // a few query rows against a tile of keys: row kernels read K and V from memory once
            // (a GEMM would first pack them, doubling the memory traffic that bounds decoding;
            // the AVX2 ones read V again from L2 per 32 channels); bf16 widened in registers,
            // f16 into a tile buffer
            let mut s = vec![0f32; g * tn];
            match T::as_bf16(k) {
                Some(kb) => simd::scores_bf16(q, kb, d, a.scale, &mut s),
                None => simd::scores(q, T::widen(k, &mut kbuf), d, a.scale, &mut s),
            }
            let (mx, l) = tile_softmax(&mut s, tn, valid);
            let mut out = vec![0f32; g * d];
            match T::as_bf16(v) {
                Some(vb) => simd::weighted_rows_bf16(&s, vb, d, &mut out),
                None => simd::weighted_rows(&s, T::widen(v, &mut vbuf), d, &mut out),
            }
            (mx, l, out)
        })
        .collect();
    HostOutput { out: merge_tiles(&parts, b, hkv, g, d, tiles), reduced: None, probs: None }
}

/// Softmax of each row of `s` (`[rows, tn]` scores of one key tile) in place, unnormalized, over
/// the slots `valid` allows: per row the max and the sum (0 when every slot is masked).
pub(crate) fn tile_softmax(s: &mut [f32], tn: usize, valid: Option<&[bool]>) -> (Vec<f32>, Vec<f32>) {
    let rows = s.len() / tn;
    let (mut mx, mut l) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
    for (r, srow) in s.chunks_exact_mut(tn).enumerate() {
        let (max, inv) = softmax_row(srow, tn, valid);
        mx[r] = max;
        l[r] = if inv > 0.0 { 1.0 / inv } else { 0.0 };
    }
    (mx, l)
}

/// Merges flash-decoding partials: `parts[(b * hkv + kv) * tiles + t]` = (max `[g]`, sum `[g]`,
/// unnormalized output `[g * d]`) of key tile `t`; returns the output `[b, hkv * g, d]`, each
/// tile weighted by `exp(max_t - max)`.
pub(crate) fn merge_tiles(parts: &[(Vec<f32>, Vec<f32>, Vec<f32>)], b: usize, hkv: usize, g: usize, d: usize, tiles: usize) -> Vec<f32> {
    let hq = hkv * g;
    let mut out = vec![0f32; b * hq * d];
    for bi in 0..b {
        for kv in 0..hkv {
            let parts = &parts[(bi * hkv + kv) * tiles..][..tiles];
            for gi in 0..g {
                let top = parts.iter().map(|p| p.0[gi]).fold(f32::NEG_INFINITY, f32::max);
                let dst = &mut out[(bi * hq + kv * g + gi) * d..][..d];
                let mut total = 0f32;
                for (mx, l, o) in parts {
                    if l[gi] == 0.0 {
                        continue;
                    }
                    let w = simd::exp(mx[gi] - top);
                    total += w * l[gi];
                    dst.iter_mut().zip(&o[gi * d..(gi + 1) * d]).for_each(|(x, &y)| *x += w * y);
                }
                simd::scale(dst, if total > 0.0 { 1.0 / total } else { 0.0 });
            }
        }
    }
    out
}

/// `silu(gate) * up` elementwise (the SwiGLU MLP's activation, HF `LlamaMLP`), split over the
/// rayon pool. Within a few ulp of `x / (1 + exp(-x)) * up` in f32; half inputs are widened and
/// the result rounded once.
pub fn swiglu<T: HostFloat>(gate: &[T], up: &[T]) -> Vec<T> {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up differ in length");
    let Some(&first) = gate.first() else { return Vec::new() };
    let mut out = vec![first; gate.len()];
    const PART: usize = 1 << 15;
    let part = |(i, o): (usize, &mut [T])| {
        let (mut gb, mut ub) = (Vec::new(), Vec::new());
        let g = T::widen(&gate[i * PART..][..o.len()], &mut gb);
        let u = T::widen(&up[i * PART..][..o.len()], &mut ub);
        let mut y = vec![0f32; o.len()];
        simd::swiglu(g, u, &mut y);
        T::narrow(&y, o);
    };
    if gate.len() <= PART {
        // one part (a decode step): on this thread, no hand-off to the pool
        part((0, &mut out));
    } else {
        out.par_chunks_mut(PART).enumerate().for_each(part);
    }
    out
}

/// Unnormalized softmax of `row[..visible]` over the slots `valid` allows, in place:
/// `exp(s - max)`, everything else exactly 0. Returns the max and `1 / sum` (`-inf` and 0 when
/// every slot is masked).
fn softmax_row(row: &mut [f32], visible: usize, valid: Option<&[bool]>) -> (f32, f32) {
    let (live, tail) = row.split_at_mut(visible);
    tail.fill(0.0);
    if let Some(m) = valid {
        live.iter_mut().zip(m).for_each(|(s, &ok)| {
            if !ok {
                *s = f32::NEG_INFINITY;
            }
        });
    }
    let max = simd::max(live);
    if max == f32::NEG_INFINITY {
        // every slot masked (cannot happen with at least one real token per head): no attention
        live.fill(0.0);
        return (max, 0.0);
    }
    let mut sum = simd::exp_sub_sum(live, max);
    if let Some(m) = valid {
        // exp of (-inf - max) is clamped to ~1e-38, not 0: padded slots must weigh nothing
        live.iter_mut().zip(m).for_each(|(p, &ok)| {
            if !ok {
                sum -= *p;
                *p = 0.0;
            }
        });
    }
    (max, 1.0 / sum)
}

/// Row kernels written as plain loops over fixed-width lanes, compiled once per instruction set
/// (AVX-512, AVX2+FMA, baseline) and chosen at run time, so one binary runs everywhere; the
/// decode kernels on token-major caches also have AVX2 intrinsics ([`simd::avx2`]), used on
/// CPUs with AVX2 and without AVX-512. So an f32 decode step rounds differently on the two kinds
/// of CPU (FMA chains there, separate products and sums in the AVX-512 build of the loops).
pub(crate) mod simd {
    const LANES: usize = 16;

    macro_rules! dispatch {
        ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
            pub fn $name($($arg: $ty),*) -> $ret {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f")]
                    unsafe fn v4($($arg: $ty),*) -> $ret {
                        $body($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn v3($($arg: $ty),*) -> $ret {
                        $body($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU supports the instructions the function was compiled for.
                        return unsafe { v4($($arg),*) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                        // SAFETY: as above.
                        return unsafe { v3($($arg),*) };
                    }
                }
                $body($($arg),*)
            }
        };
    }

    /// The quantized row kernels' plain bodies use the same dispatch (`kernels/quant.rs`).
    pub(crate) use dispatch;

    dispatch!(max, max_body, (x: &[f32]) -> f32);
    dispatch!(exp_sub_sum, exp_sub_sum_body, (x: &mut [f32], m: f32) -> f32);
    dispatch!(scale, scale_body, (x: &mut [f32], s: f32) -> ());
    dispatch!(max_scaled_into, max_scaled_into_body, (acc: &mut [f32], x: &[f32], s: f32) -> ());
    dispatch!(add_scaled_into, add_scaled_into_body, (acc: &mut [f32], x: &[f32], s: f32) -> ());
    dispatch!(swiglu, swiglu_body, (gate: &[f32], up: &[f32], out: &mut [f32]) -> ());
    dispatch!(scores_generic, scores_body, (q: &[f32], k: &[f32], d: usize, scale: f32, s: &mut [f32]) -> ());
    dispatch!(weighted_rows_generic, weighted_rows_body, (p: &[f32], v: &[f32], d: usize, out: &mut [f32]) -> ());
    dispatch!(scores_bf16_generic, scores_bf16_body, (q: &[f32], k: &[half::bf16], d: usize, scale: f32, s: &mut [f32]) -> ());
    dispatch!(weighted_rows_bf16_generic, weighted_rows_bf16_body, (p: &[f32], v: &[half::bf16], d: usize, out: &mut [f32]) -> ());

    /// `s[r * n + j] = scale * q_r . k_j` for the `g = q.len() / d` query rows and the
    /// `n = k.len() / d` token-major key rows of a decode tile: [`avx2`]'s kernel where it
    /// applies, else [`scores_body`] compiled per instruction set.
    ///
    /// # Panics
    /// On the AVX2 path when `q.len()` is not `g * d` or `s` holds fewer than `g * n` scores
    /// (the plain loops ignore a partial row); callers derive every length from the same shapes.
    pub fn scores(q: &[f32], k: &[f32], d: usize, scale: f32, s: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2::applies(d, 8) {
            return avx2::scores(q, k, d, scale, s);
        }
        scores_generic(q, k, d, scale, s)
    }

    /// [`scores`] on bf16 keys (widened in registers: exact, so the same bits as [`scores`] on
    /// the widened keys).
    pub fn scores_bf16(q: &[f32], k: &[half::bf16], d: usize, scale: f32, s: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2::applies(d, 8) {
            return avx2::scores_bf16(q, k, d, scale, s);
        }
        scores_bf16_generic(q, k, d, scale, s)
    }

    /// `out[r] += sum_j p[r * n + j] * v_j` for `g = out.len() / d` rows and `n = v.len() / d`
    /// token-major value rows: [`avx2`]'s kernel where it applies, else [`weighted_rows_body`]
    /// compiled per instruction set.
    ///
    /// # Panics
    /// On the AVX2 path when `out.len()` is not `g * d` or `p` holds fewer than `g * n` weights.
    pub fn weighted_rows(p: &[f32], v: &[f32], d: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2::applies(d, 32) {
            return avx2::weighted_rows(p, v, d, out);
        }
        weighted_rows_generic(p, v, d, out)
    }

    /// [`weighted_rows`] on bf16 values (widened in registers).
    pub fn weighted_rows_bf16(p: &[f32], v: &[half::bf16], d: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2::applies(d, 32) {
            return avx2::weighted_rows_bf16(p, v, d, out);
        }
        weighted_rows_bf16_generic(p, v, d, out)
    }

    /// Decode kernels over token-major keys and values (an f32 or bf16 KV cache as the model
    /// writes it) with AVX2 + FMA intrinsics, for CPUs that have AVX2 but not AVX-512 (AMD Zen 2 /
    /// Zen 3, Intel client cores; AVX-512 CPUs keep the plain loops compiled for AVX-512, which no
    /// machine has compared with these). Why: the plain loops do one horizontal sum per (query
    /// row, key) and load and store the output once per (query row, value row); in `perf` of an
    /// f32 decode step at 4096 tokens on a Zen 3 they were 28% (scores) and 17% (weighted sums)
    /// of the step, against 8% and 7% for the 16-bit cache's channel-major kernels
    /// (`kvquant.rs`). Here:
    /// - scores: 4 keys x up to 3 query rows per pass (12 accumulators), each 8 channels of a key
    ///   loaded (bf16: widened) once for the rows; the 4 keys' sums reduced together by three
    ///   `vhaddps` and one add;
    /// - weighted sums: 32 channels x up to 3 query rows held in registers over all the tile's
    ///   value rows, each value vector loaded once for the rows;
    /// - bf16 rows prefetched [`avx2::PREFETCH`] bytes ahead (f32 rows are not: no gain).
    ///
    /// Every (query row, key) and (query row, channel) gets the same operations in the same order
    /// whatever the number of rows and keys around it (a missing key of a short pass sums zeros
    /// in the same tree), so a batch row decodes as when alone and bf16 keys give the bits of f32
    /// keys holding the same values.
    #[cfg(target_arch = "x86_64")]
    pub(crate) mod avx2 {
        use std::arch::x86_64::*;

        /// Keys per pass of [`scores`].
        const KEYS: usize = 4;
        /// Query rows per pass.
        const ROWS: usize = 3;

        /// The CPU has AVX2 and FMA but not AVX-512F, and `d` is a positive multiple of `multiple`.
        pub fn applies(d: usize, multiple: usize) -> bool {
            d > 0 && d % multiple == 0 && !is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }

        /// [`super::scores`]; the caller checked [`applies`]`(d, 8)`.
        pub fn scores(q: &[f32], k: &[f32], d: usize, scale: f32, s: &mut [f32]) {
            assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && d % 8 == 0);
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { scores_f32(q, k, d, scale, s) }
        }

        /// [`super::scores_bf16`]; the caller checked [`applies`]`(d, 8)`.
        pub fn scores_bf16(q: &[f32], k: &[half::bf16], d: usize, scale: f32, s: &mut [f32]) {
            assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && d % 8 == 0);
            // SAFETY: as in `scores`.
            unsafe { scores_b16(q, k, d, scale, s) }
        }

        /// [`super::weighted_rows`]; the caller checked [`applies`]`(d, 32)`.
        pub fn weighted_rows(p: &[f32], v: &[f32], d: usize, out: &mut [f32]) {
            assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && d % 32 == 0);
            // SAFETY: as in `scores`.
            unsafe { weighted_f32(p, v, d, out) }
        }

        /// [`super::weighted_rows_bf16`]; the caller checked [`applies`]`(d, 32)`.
        pub fn weighted_rows_bf16(p: &[f32], v: &[half::bf16], d: usize, out: &mut [f32]) {
            assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && d % 32 == 0);
            // SAFETY: as in `scores`.
            unsafe { weighted_b16(p, v, d, out) }
        }

        /// Bytes ahead of a bf16 key or value being read that [`ahead`] asks the cache for. On
        /// the Zen 3 VM the hardware prefetcher alone left bf16 rows read at half the bandwidth
        /// f32 rows reach; with this hint a bf16 decode step at 4096 tokens went 1.16x faster
        /// (58.4 -> 68.2 tokens/s, two rounds). f32 rows go without: the same hint at 2, 4 or
        /// 8 KB gained nothing there (their reads are bound by the bandwidth), nor did it on the
        /// 16-bit and int8 caches' channel-major blocks (`kvquant.rs`, three rounds).
        pub(crate) const PREFETCH: usize = 4096;

        /// A hint to fetch the cache line [`PREFETCH`] bytes after `p` (an address past the
        /// cache's end is fine: a prefetch never faults).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn ahead(p: *const i8) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH))
        }

        /// 8 bf16 at `p` widened to f32 (the bits shifted up: exact).
        ///
        /// # Safety
        /// 8 values readable at `p`.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn load_bf16(p: *const half::bf16) -> __m256 {
            // SAFETY: the caller's 8 values (16 bytes).
            let w = unsafe { _mm_loadu_si128(p.cast::<__m128i>()) };
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(w)))
        }

        #[target_feature(enable = "avx2,fma")]
        fn scores_f32(q: &[f32], k: &[f32], d: usize, scale: f32, s: &mut [f32]) {
            let n = k.len() / d;
            // SAFETY: `scores_with` asks for 8 values at `e` with `e + 8 <= n * d <= k.len()`.
            scores_with(q, n, d, scale, s, |e| unsafe { _mm256_loadu_ps(k.as_ptr().add(e)) }, |_| ());
        }

        #[target_feature(enable = "avx2,fma")]
        fn scores_b16(q: &[f32], k: &[half::bf16], d: usize, scale: f32, s: &mut [f32]) {
            let n = k.len() / d;
            // SAFETY: as in `scores_f32`.
            scores_with(q, n, d, scale, s, |e| unsafe { load_bf16(k.as_ptr().add(e)) }, |e| ahead(k.as_ptr().wrapping_add(e).cast()));
        }

        #[target_feature(enable = "avx2,fma")]
        fn weighted_f32(p: &[f32], v: &[f32], d: usize, out: &mut [f32]) {
            let n = v.len() / d;
            // SAFETY: `weighted_with` asks for 8 values at `e` with `e + 8 <= n * d <= v.len()`.
            weighted_with(p, n, d, out, |e| unsafe { _mm256_loadu_ps(v.as_ptr().add(e)) }, |_| ());
        }

        #[target_feature(enable = "avx2,fma")]
        fn weighted_b16(p: &[f32], v: &[half::bf16], d: usize, out: &mut [f32]) {
            let n = v.len() / d;
            // SAFETY: as in `weighted_f32`.
            weighted_with(p, n, d, out, |e| unsafe { load_bf16(v.as_ptr().add(e)) }, |e| ahead(v.as_ptr().wrapping_add(e).cast()));
        }

        /// Scores of `n` keys (`load(e)`: the 8 key values at element `e` of the token-major
        /// `[n, d]` keys; `fetch(e)`: a prefetch hint ahead of element `e`, or nothing) against
        /// the `q.len() / d` query rows, passes of [`ROWS`] x [`KEYS`].
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn scores_with(q: &[f32], n: usize, d: usize, scale: f32, s: &mut [f32], load: impl Fn(usize) -> __m256 + Copy, fetch: impl Fn(usize) + Copy) {
            let g = q.len() / d;
            assert!(q.len() == g * d && s.len() >= g * n, "scores: {} query values, {} scores for {g} x {n}", q.len(), s.len());
            let mut r0 = 0;
            while r0 < g {
                let rows = (g - r0).min(ROWS);
                let mut j = 0;
                while j < n {
                    let keys = (n - j).min(KEYS);
                    let at = Pass { r0, j, n, d, scale };
                    match (rows, keys) {
                        (3, 4) => score_pass::<3, 4>(q, at, s, load, fetch),
                        (3, 3) => score_pass::<3, 3>(q, at, s, load, fetch),
                        (3, 2) => score_pass::<3, 2>(q, at, s, load, fetch),
                        (3, _) => score_pass::<3, 1>(q, at, s, load, fetch),
                        (2, 4) => score_pass::<2, 4>(q, at, s, load, fetch),
                        (2, 3) => score_pass::<2, 3>(q, at, s, load, fetch),
                        (2, 2) => score_pass::<2, 2>(q, at, s, load, fetch),
                        (2, _) => score_pass::<2, 1>(q, at, s, load, fetch),
                        (_, 4) => score_pass::<1, 4>(q, at, s, load, fetch),
                        (_, 3) => score_pass::<1, 3>(q, at, s, load, fetch),
                        (_, 2) => score_pass::<1, 2>(q, at, s, load, fetch),
                        (_, _) => score_pass::<1, 1>(q, at, s, load, fetch),
                    }
                    j += keys;
                }
                r0 += rows;
            }
        }

        /// Where a pass of [`scores_with`] works: query rows from `r0`, keys from `j`.
        #[derive(Clone, Copy)]
        struct Pass {
            r0: usize,
            j: usize,
            n: usize,
            d: usize,
            scale: f32,
        }

        /// The 8-lane sums of four vectors, lane `i` of the result vector `i`'s sum, by three
        /// `vhaddps` and one add (5 instructions): `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 +
        /// l7))` for each vector, whatever the other three hold. Also the int8 products' row sums
        /// (`quant/int8.rs`).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub(crate) fn hsum4(v: [__m256; 4]) -> __m128 {
            let t = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
            _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t))
        }

        /// `R` query rows x `K` keys: per (row, key) one accumulator over the channels (8 at a
        /// time), then per row the [`KEYS`] accumulators (zeros past `K`) summed by [`hsum4`].
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn score_pass<const R: usize, const K: usize>(q: &[f32], at: Pass, s: &mut [f32], load: impl Fn(usize) -> __m256, fetch: impl Fn(usize)) {
            let Pass { r0, j, n, d, scale } = at;
            assert!((r0 + R) * d <= q.len() && (r0 + R - 1) * n + j + K <= s.len());
            let mut acc = [[_mm256_setzero_ps(); KEYS]; R];
            for c in (0..d).step_by(8) {
                let mut kv = [_mm256_setzero_ps(); K];
                for (kk, x) in kv.iter_mut().enumerate() {
                    *x = load((j + kk) * d + c);
                }
                if c % 32 == 0 {
                    // one hint per 64-byte line of a bf16 key (f32 keys pass no hint)
                    for kk in 0..K {
                        fetch((j + kk) * d + c);
                    }
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    // SAFETY: (r0 + r) * d + c + 8 <= (r0 + R) * d <= q.len() (asserted).
                    let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add((r0 + r) * d + c)) };
                    for kk in 0..K {
                        a[kk] = _mm256_fmadd_ps(kv[kk], qv, a[kk]);
                    }
                }
            }
            let sc = _mm_set1_ps(scale);
            for (r, a) in acc.iter().enumerate() {
                let sum = _mm_mul_ps(hsum4(*a), sc);
                let mut lanes = [0f32; KEYS];
                // SAFETY: `lanes` holds 4 floats.
                unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), sum) };
                s[(r0 + r) * n + j..][..K].copy_from_slice(&lanes[..K]);
            }
        }

        /// `out[r] += sum_t p[r * n + t] * v_t` over `n` value rows (`load(e)`: the 8 values at
        /// element `e` of the token-major `[n, d]` values; `fetch` as in [`scores_with`]),
        /// passes of up to [`ROWS`] rows.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn weighted_with(p: &[f32], n: usize, d: usize, out: &mut [f32], load: impl Fn(usize) -> __m256 + Copy, fetch: impl Fn(usize) + Copy) {
            let g = out.len() / d;
            assert!(out.len() == g * d && p.len() >= g * n, "weighted sums: {} weights, {} outputs for {g} x {n}", p.len(), out.len());
            let mut r0 = 0;
            while r0 < g {
                let rows = (g - r0).min(ROWS);
                match rows {
                    3 => weighted_pass::<3>(p, r0, n, d, out, load, fetch),
                    2 => weighted_pass::<2>(p, r0, n, d, out, load, fetch),
                    _ => weighted_pass::<1>(p, r0, n, d, out, load, fetch),
                }
                r0 += rows;
            }
        }

        /// `R` rows from `r0`: per block of 32 channels, `R x 4` accumulators summed over the
        /// value rows in order, then added to `out`.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn weighted_pass<const R: usize>(p: &[f32], r0: usize, n: usize, d: usize, out: &mut [f32], load: impl Fn(usize) -> __m256, fetch: impl Fn(usize)) {
            let w: [&[f32]; R] = std::array::from_fn(|r| &p[(r0 + r) * n..][..n]);
            for c in (0..d).step_by(32) {
                let mut acc = [[_mm256_setzero_ps(); 4]; R];
                for t in 0..n {
                    let wt: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(w[r][t]));
                    if c == 0 {
                        for e in (0..d).step_by(32) {
                            fetch(t * d + e);
                        }
                    }
                    for x in 0..4 {
                        let v = load(t * d + c + 8 * x);
                        for r in 0..R {
                            acc[r][x] = _mm256_fmadd_ps(wt[r], v, acc[r][x]);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    let o = &mut out[(r0 + r) * d + c..][..32];
                    for (x, &ax) in a.iter().enumerate() {
                        // SAFETY: 8 floats at 8 x within the 32 of `o`.
                        unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * x), _mm256_add_ps(_mm256_loadu_ps(o.as_ptr().add(8 * x)), ax)) };
                    }
                }
            }
        }
    }
    dispatch!(sum_squares, sum_squares_body, (x: &[f32]) -> f32);
    dispatch!(axpy_bf16, axpy_bf16_body, (acc: &mut [f32], w: &[half::bf16], x: f32) -> ());
    dispatch!(widen_bf16, widen_bf16_body, (src: &[half::bf16], dst: &mut [f32]) -> ());

    /// `dst_j = src_j` as f32 (the bits shifted up: exact).
    #[inline(always)]
    fn widen_bf16_body(src: &[half::bf16], dst: &mut [f32]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = bf16_to_f32(x);
        }
    }

    /// `acc_j += x * w_j` with `w` widened from bf16 (a shift of its bits).
    #[inline(always)]
    fn axpy_bf16_body(acc: &mut [f32], w: &[half::bf16], x: f32) {
        for (a, &w) in acc.iter_mut().zip(w) {
            *a += x * bf16_to_f32(w);
        }
    }

    /// `sum x_j^2` on `LANES` accumulators, then over lanes.
    #[inline(always)]
    fn sum_squares_body(x: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                acc[l] += c[l] * c[l];
            }
        }
        acc.iter().sum::<f32>() + chunks.remainder().iter().map(|v| v * v).sum::<f32>()
    }

    /// `s[r * n + j] = scale * q_r . k_j` for the `g = q.len() / d` rows of `q` and the
    /// `n = k.len() / d` rows of `k` (row-major), each key row read once.
    #[inline(always)]
    fn scores_body(q: &[f32], k: &[f32], d: usize, scale: f32, s: &mut [f32]) {
        scores_of(q, k, d, scale, s, |x| x);
    }

    /// [`scores_body`] on bf16 keys, widened in registers (a shift of the bits: exact).
    #[inline(always)]
    fn scores_bf16_body(q: &[f32], k: &[half::bf16], d: usize, scale: f32, s: &mut [f32]) {
        scores_of(q, k, d, scale, s, bf16_to_f32);
    }

    #[inline(always)]
    fn scores_of<K: Copy>(q: &[f32], k: &[K], d: usize, scale: f32, s: &mut [f32], wide: impl Fn(K) -> f32) {
        let (g, n) = (q.len() / d, k.len() / d);
        for (j, kj) in k.chunks_exact(d).enumerate() {
            for r in 0..g {
                let qr = &q[r * d..(r + 1) * d];
                let mut acc = [0f32; LANES];
                let mut qc = qr.chunks_exact(LANES);
                let mut kc = kj.chunks_exact(LANES);
                for (a, b) in (&mut qc).zip(&mut kc) {
                    for l in 0..LANES {
                        acc[l] += a[l] * wide(b[l]);
                    }
                }
                let mut dot: f32 = acc.iter().sum();
                for (a, &b) in qc.remainder().iter().zip(kc.remainder()) {
                    dot += a * wide(b);
                }
                s[r * n + j] = scale * dot;
            }
        }
    }

    /// `out[r] += sum_j p[r * n + j] * v_j` for `g = out.len() / d` rows, `n = v.len() / d` value
    /// rows (row-major), each value row read once.
    #[inline(always)]
    fn weighted_rows_body(p: &[f32], v: &[f32], d: usize, out: &mut [f32]) {
        weighted_rows_of(p, v, d, out, |x| x);
    }

    /// [`weighted_rows_body`] on bf16 values, widened in registers.
    #[inline(always)]
    fn weighted_rows_bf16_body(p: &[f32], v: &[half::bf16], d: usize, out: &mut [f32]) {
        weighted_rows_of(p, v, d, out, bf16_to_f32);
    }

    #[inline(always)]
    fn weighted_rows_of<V: Copy>(p: &[f32], v: &[V], d: usize, out: &mut [f32], wide: impl Fn(V) -> f32) {
        let n = v.len() / d;
        for (j, vj) in v.chunks_exact(d).enumerate() {
            for (r, o) in out.chunks_exact_mut(d).enumerate() {
                let w = p[r * n + j];
                o.iter_mut().zip(vj).for_each(|(x, &y)| *x += w * wide(y));
            }
        }
    }

    /// A bf16 as f32: its bits shifted into the top half (exact).
    #[inline(always)]
    fn bf16_to_f32(x: half::bf16) -> f32 {
        f32::from_bits(u32::from(x.to_bits()) << 16)
    }

    /// `acc[j] = max(acc[j], x[j] * s)`.
    #[inline(always)]
    fn max_scaled_into_body(acc: &mut [f32], x: &[f32], s: f32) {
        acc.iter_mut().zip(x).for_each(|(a, &v)| {
            let p = v * s;
            *a = if p > *a { p } else { *a };
        });
    }

    /// `acc[j] += x[j] * s`.
    #[inline(always)]
    fn add_scaled_into_body(acc: &mut [f32], x: &[f32], s: f32) {
        acc.iter_mut().zip(x).for_each(|(a, &v)| *a += v * s);
    }

    /// `out = silu(gate) * up`, `silu(x) = x * sigmoid(x)`, with `sigmoid` from `e = exp(-|x|)`
    /// (never overflows): `1 / (1 + e)` for `x >= 0`, `e / (1 + e)` below.
    #[inline(always)]
    fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            let e = exp(if g > 0.0 { -g } else { g });
            let sig = if g >= 0.0 { 1.0 } else { e } / (1.0 + e);
            *o = g * sig * u;
        }
    }

    #[inline(always)]
    fn max_body(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
            }
        }
        let mut m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        for &v in chunks.remainder() {
            m = if v > m { v } else { m };
        }
        m
    }

    #[inline(always)]
    fn exp_sub_sum_body(x: &mut [f32], m: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                let e = exp(c[l] - m);
                c[l] = e;
                acc[l] += e;
            }
        }
        let mut s: f32 = acc.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp(*v - m);
            s += *v;
        }
        s
    }

    #[inline(always)]
    fn scale_body(x: &mut [f32], s: f32) {
        x.iter_mut().for_each(|v| *v *= s);
    }

    /// `e^x` for `x <= 0` (a shifted score), within ~2 ulp of libm's `expf` over `[-87, 0]`;
    /// inputs below -87.3 give ~1e-38 instead of underflowing (callers zero masked slots).
    /// Cephes' `expf`: `x = n ln2 + r`, `|r| <= ln2/2`, degree-6 polynomial, `2^n` from the
    /// exponent bits. Branch-free, so the lane loops above vectorize.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
        const MAGIC: f32 = 12_582_912.0;
        let x = if x < -87.3 { -87.3 } else { x };
        let t = x * LOG2E + MAGIC;
        let n = t - MAGIC;
        let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
        let r = x - n * LN2_HI - n * LN2_LO;
        let r2 = r * r;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
        let y = p * r2 + r + 1.0;
        y * f32::from_bits(((ni + 127) << 23) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (simd::exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 3.0 * f32::EPSILON, "relative error {worst}");
        assert_eq!(simd::exp(0.0), 1.0);
        assert!(simd::exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn row_kernels_match_scalar_on_every_length() {
        for n in [1, 7, 16, 17, 100] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(simd::max(&x), m);
            let mut e = x.clone();
            let s = simd::exp_sub_sum(&mut e, m);
            let want: f32 = x.iter().map(|v| (v - m).exp()).sum();
            assert!((s - want).abs() <= 1e-5 * want, "{n}: {s} vs {want}");
            // bf16 widening is exact
            let b: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let mut buf = Vec::new();
            let wide = half::bf16::widen(&b, &mut buf);
            assert!(wide.iter().zip(&b).all(|(w, v)| *w == v.to_f32()) && wide.len() == n, "{n}");
        }
    }

    /// The AVX2 decode kernels against f64 sums and against the plain loops, on tiles of every
    /// remainder of the 4-key and 3-row passes; a (row, key) score and a row's weighted sum have
    /// the same bits whatever the rows and keys beside them (a batch row decodes as when alone),
    /// and bf16 keys / values the bits of f32 ones holding the same values. Runs on any CPU with
    /// AVX2 + FMA (AVX-512 ones too, which do not route decode through these kernels); the entry
    /// points are checked to use them exactly where [`simd::avx2::applies`].
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_decode_kernels_match_f64_and_plain_loops() {
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5) * 3.0).collect()
        };
        if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
            eprintln!("no AVX2 + FMA on this CPU: the AVX2 decode kernels cannot run here");
            return;
        }
        // f32 sums of m terms, each rounding at most one ulp of the running magnitude
        let bound = |m: usize, size: f64| (m as f64 + 4.0) * f32::EPSILON as f64 * size;
        for d in [8, 32, 40, 48, 64, 96, 128] {
            for g in 1..=7 {
                for n in [1, 2, 3, 4, 5, 7, 13, 64, 515] {
                    let q = vals(g * d, 1);
                    // bf16-exact keys and values, so the bf16 kernels see the same numbers
                    let k: Vec<f32> = vals(n * d, 2).iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
                    let v: Vec<f32> = vals(n * d, 3).iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
                    let (kb, vb): (Vec<half::bf16>, Vec<half::bf16>) = (k.iter().map(|&x| half::bf16::from_f32(x)).collect(), v.iter().map(|&x| half::bf16::from_f32(x)).collect());
                    let scale = 0.125;
                    let mut plain = vec![f32::NAN; g * n];
                    simd::scores_generic(&q, &k, d, scale, &mut plain);
                    let p: Vec<f32> = vals(g * n, 4).iter().map(|x| x.abs()).collect();
                    let start = vals(g * d, 5);
                    let mut plain_out = start.clone();
                    simd::weighted_rows_generic(&p, &v, d, &mut plain_out);
                    // the entry points: the AVX2 kernels exactly where they apply
                    let mut entry = vec![f32::NAN; g * n];
                    simd::scores(&q, &k, d, scale, &mut entry);
                    let mut entry_out = start.clone();
                    simd::weighted_rows(&p, &v, d, &mut entry_out);
                    if !simd::avx2::applies(d, 8) {
                        assert_eq!(entry, plain, "scores: plain loops expected for d {d}");
                    }
                    if !simd::avx2::applies(d, 32) {
                        assert_eq!(entry_out, plain_out, "weighted sums: plain loops expected for d {d}");
                    }
                    let mut s = vec![f32::NAN; g * n];
                    simd::avx2::scores(&q, &k, d, scale, &mut s);
                    if simd::avx2::applies(d, 8) {
                        assert_eq!(entry, s, "scores: the AVX2 kernel expected for d {d}");
                    }
                    for r in 0..g {
                        for j in 0..n {
                            let terms = (0..d).map(|c| q[r * d + c] as f64 * k[j * d + c] as f64 * scale as f64);
                            let (want, size) = (terms.clone().sum::<f64>(), terms.map(f64::abs).sum::<f64>());
                            let (got, old) = (s[r * n + j] as f64, plain[r * n + j] as f64);
                            assert!((got - want).abs() <= bound(d / 8, size), "scores d {d} g {g} n {n} ({r}, {j}): {got} vs {want}");
                            assert!((got - old).abs() <= 2.0 * bound(d, size), "scores vs plain loops d {d} g {g} n {n} ({r}, {j}): {got} vs {old}");
                        }
                    }
                    let mut sb = vec![f32::NAN; g * n];
                    simd::avx2::scores_bf16(&q, &kb, d, scale, &mut sb);
                    assert_eq!(s, sb, "bf16 keys: d {d} g {g} n {n}");
                    // one row alone, the first n - 1 keys alone: the same bits
                    for r in 0..g {
                        let mut one = vec![0f32; n];
                        simd::avx2::scores(&q[r * d..(r + 1) * d], &k, d, scale, &mut one);
                        assert_eq!(one, s[r * n..(r + 1) * n], "row {r} alone: d {d} g {g} n {n}");
                    }
                    if n > 1 {
                        let mut fewer = vec![0f32; g * (n - 1)];
                        simd::avx2::scores(&q, &k[..(n - 1) * d], d, scale, &mut fewer);
                        for r in 0..g {
                            assert_eq!(fewer[r * (n - 1)..(r + 1) * (n - 1)], s[r * n..r * n + n - 1], "fewer keys: d {d} g {g} n {n}");
                        }
                    }
                    if d % 32 != 0 {
                        continue;
                    }
                    let mut out = start.clone();
                    simd::avx2::weighted_rows(&p, &v, d, &mut out);
                    if simd::avx2::applies(d, 32) {
                        assert_eq!(entry_out, out, "weighted sums: the AVX2 kernel expected for d {d}");
                    }
                    for r in 0..g {
                        for c in 0..d {
                            let terms = (0..n).map(|t| p[r * n + t] as f64 * v[t * d + c] as f64);
                            let want = start[r * d + c] as f64 + terms.clone().sum::<f64>();
                            let size = start[r * d + c].abs() as f64 + terms.map(f64::abs).sum::<f64>();
                            let (got, old) = (out[r * d + c] as f64, plain_out[r * d + c] as f64);
                            assert!((got - want).abs() <= bound(n, size), "weighted d {d} g {g} n {n} ({r}, {c}): {got} vs {want}");
                            assert!((got - old).abs() <= 2.0 * bound(n, size), "weighted vs plain loops d {d} g {g} n {n} ({r}, {c}): {got} vs {old}");
                        }
                    }
                    let mut outb = start.clone();
                    simd::avx2::weighted_rows_bf16(&p, &vb, d, &mut outb);
                    assert_eq!(out, outb, "bf16 values: d {d} g {g} n {n}");
                    for r in 0..g {
                        let mut one = start[r * d..(r + 1) * d].to_vec();
                        simd::avx2::weighted_rows(&p[r * n..(r + 1) * n], &v, d, &mut one);
                        assert_eq!(one, out[r * d..(r + 1) * d], "row {r} alone: d {d} g {g} n {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn swiglu_matches_scalar() {
        let gate: Vec<f32> = (0..70_001).map(|i| (i as f32 - 35_000.0) * 0.003).collect();
        let up: Vec<f32> = (0..70_001).map(|i| ((i % 13) as f32 - 6.0) * 0.5).collect();
        let got = swiglu(&gate, &up);
        for ((&o, &g), &u) in got.iter().zip(&gate).zip(&up) {
            let want = (g as f64 / (1.0 + (-g as f64).exp())) * u as f64;
            assert!((o as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3), "silu({g}) * {u}: {o} vs {want}");
        }
    }

    /// Naive attention in f64 over the same inputs.
    fn naive(a: &HostAttention<'_>) -> (Vec<f64>, Vec<f64>) {
        let (b, hq, hkv, c, len, d) = (a.batch, a.q_heads, a.kv_heads, a.chunk, a.len, a.head_dim);
        assert_eq!(a.kv_stride, len * d);
        let g = hq / hkv;
        let mut out = vec![0f64; b * c * hq * d];
        let mut probs = vec![0f64; b * hq * c * len];
        for bi in 0..b {
            for h in 0..hq {
                let kv = bi * hkv + h / g;
                for i in 0..c {
                    let q = &a.q[((bi * hq + h) * c + i) * d..][..d];
                    let vis = len - c + i + 1;
                    let ok = |j: usize| j < vis && a.valid.is_none_or(|m| m[kv * len + j]);
                    let s: Vec<f64> = (0..len)
                        .map(|j| (0..d).map(|x| q[x] as f64 * a.k[(kv * len + j) * d + x] as f64).sum::<f64>() * a.scale as f64)
                        .collect();
                    let m = (0..len).filter(|&j| ok(j)).map(|j| s[j]).fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = (0..len).filter(|&j| ok(j)).map(|j| (s[j] - m).exp()).sum();
                    for j in (0..len).filter(|&j| ok(j)) {
                        let p = (s[j] - m).exp() / z;
                        probs[((bi * hq + h) * c + i) * len + j] = p;
                        for x in 0..d {
                            out[((bi * c + i) * hq + h) * d + x] += p * a.v[(kv * len + j) * d + x] as f64;
                        }
                    }
                }
            }
        }
        (out, probs)
    }

    #[test]
    fn matches_naive_attention() {
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5) * 3.0).collect()
        };
        // (batch, q_heads, kv_heads, chunk, len, head_dim, masked)
        for (b, hq, hkv, c, len, d, masked) in
            [(1, 4, 2, 1, 9, 8, false), (1, 6, 2, 40, 70, 16, false), (2, 3, 3, 33, 33, 4, true), (1, 2, 1, 5, 90, 64, true), (1, 6, 2, 40, 1300, 8, true), (1, 3, 1, 1, 1100, 8, false), (2, 4, 2, 1, 1500, 8, true)]
        {
            let q = vals(b * hq * c * d, 1);
            let k = vals(b * hkv * len * d, 2);
            let v = vals(b * hkv * len * d, 3);
            let mask: Vec<bool> = (0..b * hkv * len).map(|i| !masked || i % 5 != 3).collect();
            let a = args(&q, &k, &v, len * d, masked.then_some(&mask[..]), [b, hq, hkv, c, len, d]);
            let (want_out, want_p) = naive(&a);
            let got = attention(&a);
            let err = |x: &[f32], y: &[f64]| x.iter().zip(y).map(|(&a, &b)| (a as f64 - b).abs()).fold(0f64, f64::max);
            assert!(err(&got.out, &want_out) < 2e-6, "out {:?}", (b, hq, c, len));
            let p = got.probs.unwrap();
            assert!(err(&p, &want_p) < 1e-6, "probs");
            let red = got.reduced.unwrap();
            for bi in 0..b {
                for h in 0..hq {
                    for j in 0..len {
                        let m = (0..c).map(|i| want_p[((bi * hq + h) * c + i) * len + j]).fold(0f64, f64::max);
                        assert!((red[(bi * hq + h) * len + j] as f64 - m).abs() < 1e-6);
                    }
                }
            }
            let sum = attention(&HostAttention { reduce: Some(QueryReduce::Sum), probs: false, ..a });
            let s = sum.reduced.unwrap();
            let want: f64 = (0..c).map(|i| want_p[i * len]).sum();
            assert!((s[0] as f64 - want).abs() < 1e-5);
            assert_eq!(sum.out, got.out, "reduction must not change the output");
            // output only: key tiles with the online softmax once more than one tile is visible
            let plain = attention(&HostAttention { reduce: None, probs: false, ..a });
            assert!(err(&plain.out, &want_out) < 2e-6, "online softmax {:?}", (b, hq, c, len));
            // the same keys/values as views of a buffer with 3 spare slots per row
            let pad = |x: &[f32]| -> Vec<f32> { x.chunks(len * d).flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(f32::NAN, 3 * d))).collect() };
            let (kp, vp) = (pad(&k), pad(&v));
            let strided = attention(&HostAttention { k: &kp, v: &vp, kv_stride: (len + 3) * d, ..a });
            assert_eq!(strided.out, got.out, "strided rows");
            // the same queries token-major ([b, c, hq, d], the projections' layout)
            let mut qt = vec![0f32; q.len()];
            for bi in 0..b {
                for h in 0..hq {
                    for i in 0..c {
                        qt[((bi * c + i) * hq + h) * d..][..d].copy_from_slice(&q[((bi * hq + h) * c + i) * d..][..d]);
                    }
                }
            }
            let tm = attention(&HostAttention { q: &qt, q_token_major: true, ..a });
            assert_eq!((&tm.out, tm.reduced.as_ref(), tm.probs.as_ref()), (&got.out, Some(&red), Some(&p)), "token-major queries");
        }
    }

    /// The per-thread score scratch: a NaN-poisoned buffer from an earlier, larger task does not
    /// leak into a later one (every entry is written before it is read), and a buffer over
    /// [`SCRATCH_KEEP`] is freed after its task. One pool thread, so every task meets the poison.
    #[test]
    fn scratch_is_rewritten_and_large_buffers_freed() {
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5) * 3.0).collect()
        };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        pool.install(|| {
            let (b, hq, hkv, c, len, d) = (1, 4, 1, 40, 300, 8);
            let (q, k, v) = (vals(b * hq * c * d, 1), vals(b * hkv * len * d, 2), vals(b * hkv * len * d, 3));
            let a = args(&q, &k, &v, len * d, None, [b, hq, hkv, c, len, d]);
            // with probabilities returned: their own fresh buffer, the reference
            let want = attention(&a);
            rayon::broadcast(|_| SCRATCH.with(|cell| cell.borrow_mut().0 = vec![f32::NAN; 1 << 20]));
            let got = attention(&HostAttention { probs: false, ..a });
            assert_eq!((&got.out, &got.reduced), (&want.out, &want.reduced), "scores from a poisoned scratch");
            // a task whose scores exceed SCRATCH_KEEP: 4 heads x 32 queries x 33,000 keys
            let (c, len) = (32, 33_000);
            let (q, k, v) = (vals(b * hq * c * d, 4), vals(b * hkv * len * d, 5), vals(b * hkv * len * d, 6));
            let big = args(&q, &k, &v, len * d, None, [b, hq, hkv, c, len, d]);
            assert!(hq * c * len * 4 > SCRATCH_KEEP);
            let out = attention(&HostAttention { probs: false, ..big });
            assert!(out.out.iter().all(|x| x.is_finite()));
            let kept = rayon::broadcast(|_| SCRATCH.with(|cell| cell.borrow().0.capacity()));
            assert!(kept.iter().all(|&cap| cap * 4 <= SCRATCH_KEEP), "{kept:?}");
        });
    }

    /// Prefill / scoring attention on f16 / bf16 caches read in place: f16 (and bf16 on a CPU
    /// without AVX512_BF16, or with `vdpbf16ps` products off) widened = the f32 kernel on the
    /// widened values, bit for bit; bf16 with
    /// `vdpbf16ps`: the same scores and probabilities (exact products, f32 sums in another
    /// order), the output within the rounding of the probabilities to bf16 before `P V`.
    #[test]
    fn prefill_reads_half_precision_keys_and_values() {
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5) * 3.0).collect()
        };
        let bf = |x: &[f32]| -> Vec<half::bf16> { x.iter().map(|&x| half::bf16::from_f32(x)).collect() };
        let fh = |x: &[f32]| -> Vec<half::f16> { x.iter().map(|&x| half::f16::from_f32(x)).collect() };
        let max_diff = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if !super::super::bf16::available() {
            println!("no AVX512_BF16 on this CPU: bf16 checked on the widened path only (the vdpbf16ps path needs such a CPU)");
        }
        // (batch, q_heads, kv_heads, chunk, len, head_dim, masked): one block and several, an odd
        // number of visible keys, partial panels, the online path (len > KEY_TILE), an odd head_dim
        for (b, hq, hkv, c, len, d, masked) in
            [(1, 4, 2, 3, 9, 8, false), (1, 6, 2, 40, 71, 64, true), (2, 3, 3, 33, 33, 4, false), (1, 6, 2, 40, 1300, 64, true), (1, 2, 1, 7, 20, 5, false)]
        {
            // queries as a bf16 model makes them (bf16 values), keys/values with 3 spare slots per row
            let q: Vec<f32> = bf(&vals(b * hq * c * d, 1)).iter().map(|x| x.to_f32()).collect();
            let stride = (len + 3) * d;
            let (k32, v32) = (vals(b * hkv * stride, 2), vals(b * hkv * stride, 3));
            let mask: Vec<bool> = (0..b * hkv * len).map(|i| !masked || i % 5 != 3).collect();
            let base = args(&q, &k32, &v32, stride, masked.then_some(&mask[..]), [b, hq, hkv, c, len, d]);
            let (kb, vb, kh, vh) = (bf(&k32), bf(&v32), fh(&k32), fh(&v32));
            let widen = |x: &[half::bf16]| -> Vec<f32> { x.iter().map(|x| x.to_f32()).collect() };
            let widen_h = |x: &[half::f16]| -> Vec<f32> { x.iter().map(|x| x.to_f32()).collect() };
            let (kbw, vbw) = (widen(&kb), widen(&vb));
            let (khw, vhw) = (widen_h(&kh), widen_h(&vh));
            for reduce in [Some(QueryReduce::Max), None] {
                let a = HostAttention { reduce, probs: reduce.is_some(), ..base };
                let f16 = attention(&with_kv(&a, &kh, &vh));
                let want = attention(&HostAttention { k: &khw, v: &vhw, ..a });
                assert_eq!((f16.out, f16.reduced, f16.probs), (want.out, want.reduced, want.probs), "f16 {:?}", (c, len, d));
                let want = attention(&HostAttention { k: &kbw, v: &vbw, ..a });
                let widened = attention_with(&with_kv(&a, &kb, &vb), false);
                assert_eq!((&widened.out, &widened.reduced, &widened.probs), (&want.out, &want.reduced, &want.probs), "bf16 widened {:?}", (c, len, d));
                let got = attention_with(&with_kv(&a, &kb, &vb), true);
                if !super::super::bf16::available() || d % 2 == 1 {
                    assert_eq!((got.out, got.reduced, got.probs), (want.out, want.reduced, want.probs), "bf16 widened {:?}", (c, len, d));
                    continue;
                }
                // |v| <= 1.5: the output moves by at most 1.5 x 2^-8 (probabilities rounded once)
                let out_err = max_diff(&got.out, &want.out);
                assert!(out_err <= 1.5 / 256.0, "bf16 out {:?}: {out_err}", (c, len, d));
                assert!(out_err > 0.0 || len < 3, "bf16 products were not used {:?}", (c, len, d));
                if let (Some(x), Some(y)) = (&got.reduced, &want.reduced) {
                    assert!(max_diff(x, y) < 1e-5, "bf16 reduced {:?}", (c, len, d));
                    assert!(max_diff(got.probs.as_ref().unwrap(), want.probs.as_ref().unwrap()) < 1e-5, "bf16 probs");
                }
            }
        }
    }

    /// Attention arguments with every output (probabilities reduced by max, and whole),
    /// heads-first queries, scale `1/sqrt(d)`.
    fn args<'a, T>(q: &'a [f32], k: &'a [T], v: &'a [T], kv_stride: usize, valid: Option<&'a [bool]>, [b, hq, hkv, c, len, d]: [usize; 6]) -> HostAttention<'a, T> {
        let scale = 1.0 / (d as f32).sqrt();
        HostAttention { q, q_token_major: false, k, v, kv_stride, valid, batch: b, q_heads: hq, kv_heads: hkv, chunk: c, len, head_dim: d, scale, reduce: Some(QueryReduce::Max), probs: true }
    }

    fn with_kv<'a, T>(a: &HostAttention<'a>, k: &'a [T], v: &'a [T]) -> HostAttention<'a, T> {
        let HostAttention { q, q_token_major, kv_stride, valid, batch, q_heads, kv_heads, chunk, len, head_dim, scale, reduce, probs, .. } = *a;
        HostAttention { q, q_token_major, k, v, kv_stride, valid, batch, q_heads, kv_heads, chunk, len, head_dim, scale, reduce, probs }
    }

    #[test]
    fn decode_reads_half_precision_keys_and_values() {
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5) * 3.0).collect()
        };
        // (batch, q_heads, kv_heads, len, head_dim, masked): one tile and several, with a mask
        for (b, hq, hkv, len, d, masked) in [(1, 4, 2, 9, 8, false), (1, 3, 1, 1100, 64, false), (2, 4, 2, 1500, 8, true)] {
            let q = vals(b * hq * d, 1);
            let (k32, v32) = (vals(b * hkv * len * d, 2), vals(b * hkv * len * d, 3));
            let mask: Vec<bool> = (0..b * hkv * len).map(|i| !masked || i % 5 != 3).collect();
            let (kb, vb): (Vec<half::bf16>, Vec<half::bf16>) = (k32.iter().map(|&x| half::bf16::from_f32(x)).collect(), v32.iter().map(|&x| half::bf16::from_f32(x)).collect());
            let (kh, vh): (Vec<half::f16>, Vec<half::f16>) = (k32.iter().map(|&x| half::f16::from_f32(x)).collect(), v32.iter().map(|&x| half::f16::from_f32(x)).collect());
            let a = HostAttention { reduce: None, probs: false, ..args(&q, &k32, &v32, len * d, masked.then_some(&mask[..]), [b, hq, hkv, 1, len, d]) };
            // the f32 kernel on the rounded values (widening is exact)
            let widened = |x: &[f32], f: fn(f32) -> f32| -> Vec<f32> { x.iter().map(|&y| f(y)).collect() };
            for (name, got, k, v) in [
                ("bf16", decode_attention(&with_kv(&a, &kb, &vb)), widened(&k32, |x| half::bf16::from_f32(x).to_f32()), widened(&v32, |x| half::bf16::from_f32(x).to_f32())),
                ("f16", decode_attention(&with_kv(&a, &kh, &vh)), widened(&k32, |x| half::f16::from_f32(x).to_f32()), widened(&v32, |x| half::f16::from_f32(x).to_f32())),
            ] {
                let want = attention(&HostAttention { k: &k, v: &v, ..a });
                let err = got.out.iter().zip(&want.out).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(err < 1e-6, "{name} {:?}: {err}", (b, hq, len));
                if len > KEY_TILE {
                    assert_eq!(got.out, want.out, "{name}: the same split kernel");
                }
                assert!(got.reduced.is_none() && got.probs.is_none());
            }
            let f32_decode = decode_attention(&a);
            assert!(f32_decode.out.iter().zip(&attention(&a).out).all(|(x, y)| (x - y).abs() < 1e-6), "f32 through decode_attention");
        }
    }
}
