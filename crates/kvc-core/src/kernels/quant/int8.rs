//! Matrix-vector products with int8 activations ([`super::Activations::Int8`]): a row of `x`
//! is rounded to 8-bit codes per block of 32 with one f32 scale (ggml's `quantize_row_q8_0`:
//! `dx = max|x| / 127`, codes `round(x / dx)`), and a K-quant weight row's codes are multiplied
//! by them in integer arithmetic, `u8 x i8` products summed four at a time into 32-bit lanes
//! (AVX-512 VNNI `vpdpbusd`; on CPUs without it AVX2's `vpmaddubsw` into 16-bit pairs, then
//! `vpmaddwd` by ones, as ggml's AVX2 kernels), then scaled in f32 by `d * sc * dx` per group
//! (module `avx2`: the same integer sums as `avx512` but for `Q4_K` and `Q6_K`, whose integer
//! `sc` enters the sum by `vpmaddwd` as in ggml's AVX2 kernels, `Q6_K` read from its AVX2 packing
//! and its `+ 32` taken off once a super-block; f32 sums in another order; 4 rows of `x` per weight
//! row at once, [`rows_with`]). llama.cpp's CPU
//! backend does the same for its K-quants (`ggml_vec_dot_q4_K_q8_K`, with one scale per 256
//! values of `x` where this keeps one per 32); the f32 kernels of [`super`] instead multiply the
//! dequantized weights by `x` in f32, about 2x the instructions for the same bytes of codes.
//!
//! Formats: `Q4_K` (4-bit codes, 6-bit `sc` and `m` per 32, `d` and `dmin` per 256) and `Q6_K`
//! (6-bit codes, 8-bit `sc` per 16, `d` per 256) with their integer scales in the kernels; the
//! formats with f32 scales per block of 32 (`Q4_0`, `Q4_1`: 4-bit codes; `Q5_0`, `Q5_1`, `Q8_0`,
//! and `Q5_K` with its scales expanded: 8-bit codes, signed ones multiplied as `|code|` times `x`
//! with the code's sign) with each row's scales as the f32 kernels expand them. [`supports`] says
//! which matrices. The mins' term uses the exact f32 sums of `x` (it does not need the codes).

use super::{QuantCodes, QuantMatrix, Scales, BLOCK, SUPER_BLOCK};

/// Which kernels [`rows_into`] runs: the best this CPU has ([`Kernels::best`]), or in tests each
/// one the CPU can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Kernels {
    /// AVX-512 VNNI (`vpdpbusd`; 6-bit codes are packed for its kernel only with VBMI too, else
    /// for AVX2's: [`avx512_sixes`]).
    Avx512,
    /// AVX2 (`vpmaddubsw` + `vpmaddwd`, ggml's AVX2 way): CPUs without AVX-512 VNNI (AMD Zen 2 /
    /// Zen 3, Intel desktop cores, Xeons before Cascade Lake).
    Avx2,
    /// Plain loops (any CPU; the kernels' reference).
    Plain,
}

impl Kernels {
    /// The fastest this CPU runs.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512::has_vnni() {
                return Kernels::Avx512;
            }
            if avx2::has() {
                return Kernels::Avx2;
            }
        }
        Kernels::Plain
    }

    /// Whether this CPU can run them.
    #[cfg(test)]
    fn runs(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 => avx512::has_vnni(),
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => avx2::has(),
            #[cfg(not(target_arch = "x86_64"))]
            Kernels::Avx512 | Kernels::Avx2 => false,
            Kernels::Plain => true,
        }
    }
}

/// Whether this CPU runs the AVX-512 kernels of [`QuantCodes::Sixes`] (int8: VNNI and VBMI; the
/// f32 one needs AVX-512F, which they imply): 6-bit matrices are packed so here, else as
/// [`QuantCodes::SixPairs`] for the AVX2 kernels.
pub(super) fn avx512_sixes() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx512::has_vbmi();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether explicit SIMD kernels run for every format here (AVX-512 VNNI or AVX2;
/// [`super::int8_kernels_native`]).
pub(super) fn native() -> bool {
    Kernels::best() != Kernels::Plain
}

/// Whether [`rows_into`] multiplies this matrix: every format kvc reads (K-quants in whole
/// super-blocks of 256 columns, as their files hold them).
pub(super) fn supports(w: &QuantMatrix) -> bool {
    match (&w.scales, w.codes) {
        (Scales::Super { .. }, _) => w.cols % SUPER_BLOCK == 0,
        (Scales::Flat { .. }, QuantCodes::Nibbles | QuantCodes::Bytes) => true,
        (Scales::Flat { .. }, QuantCodes::Sixes | QuantCodes::SixPairs) => false,
    }
}

/// One row of `x` (`cols` values, a multiple of 32) rounded to int8 per block of 32, laid out
/// for the kernels. (One scale per super-block of 256, ggml's `Q8_K`, would let the K-quant
/// kernels sum a super-block in integers, but Qwen2.5's outlying channels then round the other
/// 255 values coarsely: the 1.5B model's int8 logits moved by 7.5 instead of 1.3.)
pub(super) struct Row {
    /// Values (columns of the matrices).
    cols: usize,
    /// Codes in order, zeros after the last up to a multiple of 64 (the 8-bit kernel's step).
    q: Vec<i8>,
    /// The same codes per 4 blocks as nibble matrices pair them with their bytes: the first 16
    /// of each of the 4 blocks, then the last 16 of each (a last group of fewer than 4 blocks
    /// padded with zeros).
    q4: Vec<i8>,
    /// Per block of 32: `dx`, repeated for each of the kernels' 32-bit lanes over it (4 for
    /// nibble matrices: `dx4`, 8 for 6- and 8-bit ones: `dx8`); zeros after the last block up to
    /// 16 lanes (as for the sums below).
    dx4: Vec<f32>,
    /// `dx` over 8 lanes a block (6- and 8-bit codes).
    dx8: Vec<f32>,
    /// `dx` once a block (zeros after the last up to a multiple of 8: a super-block's 8 blocks in
    /// one vector).
    dx1: Vec<f32>,
    /// Per block: the f32 sum of `x` over it, a quarter per lane (4 lanes), for the mins.
    xsum4: Vec<f32>,
    /// The same, one value a block (zeros after the last up to a multiple of 8).
    xsum: Vec<f32>,
    /// The same, an eighth per lane (8 lanes: 8-bit codes).
    xsum8: Vec<f32>,
    /// Per 4 consecutive codes: 32 times their sum (6-bit codes are stored as `code + 32`).
    bias: Vec<i32>,
    /// Per 16 consecutive codes: their sum (at most `16 * 127`; the AVX2 6-bit kernel's bias,
    /// times the groups' scales once a super-block).
    sum16: Vec<i16>,
}

impl Row {
    /// `x` (length a multiple of 32) rounded as ggml's `quantize_row_q8_0`.
    pub(super) fn new(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut r = Row {
            cols: x.len(),
            q: vec![0; x.len().next_multiple_of(2 * BLOCK)],
            q4: vec![0; x.len().next_multiple_of(4 * BLOCK)],
            dx4: Vec::with_capacity(4 * blocks),
            dx8: Vec::with_capacity(8 * blocks),
            dx1: Vec::with_capacity(blocks.next_multiple_of(8)),
            xsum4: Vec::with_capacity(4 * blocks),
            xsum: Vec::with_capacity(blocks.next_multiple_of(8)),
            xsum8: Vec::with_capacity(8 * blocks),
            bias: Vec::with_capacity(x.len() / 4),
            sum16: Vec::with_capacity(x.len() / 16),
        };
        for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let dx = amax / 127.0;
            let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
            let (four, k) = (b / 4, b % 4);
            for (j, &v) in xb.iter().enumerate() {
                let c = (v * inv).round() as i8;
                r.q[BLOCK * b + j] = c;
                r.q4[128 * four + 64 * (j / 16) + 16 * k + j % 16] = c;
            }
            r.dx4.extend([dx; 4]);
            r.dx8.extend([dx; 8]);
            r.dx1.push(dx);
            let sum = xb.iter().sum::<f32>();
            r.xsum4.extend([sum / 4.0; 4]);
            r.xsum.push(sum);
            r.xsum8.extend([sum / 8.0; 8]);
        }
        r.xsum.resize(blocks.next_multiple_of(8), 0.0);
        r.dx1.resize(blocks.next_multiple_of(8), 0.0);
        for lanes in [&mut r.dx4, &mut r.dx8, &mut r.xsum4, &mut r.xsum8] {
            lanes.resize(lanes.len().next_multiple_of(16), 0.0);
        }
        r.bias.extend(r.q[..x.len()].chunks_exact(4).map(|c| 32 * c.iter().map(|&v| v as i32).sum::<i32>()));
        r.sum16.extend(r.q[..x.len()].chunks_exact(16).map(|c| c.iter().map(|&v| v as i16).sum::<i16>()));
        r
    }
}

/// Rows `first..first + out.len() / xs.len()` of `w` (a matrix [`supports`] takes) times each
/// row of `xs`, into `out` (`[rows, xs.len()]`): per row `sum_g scale_g * dx_g * (codes_g .
/// xq_g)` plus the mins' `sum_g min_g * sum(x_g)` (`scale = d * sc`, `min = -(dmin * m)` for the
/// K-quants). The kernels are picked once for all the rows (per row it cost 5% of a decode step).
/// Many rows of `xs` (a prefill chunk, a batched decode step) go through [`rows_with`]: every
/// row of `xs` gets the sums it gets alone, in the same order.
pub(super) fn rows_into(w: &QuantMatrix, first: usize, xs: &[Row], out: &mut [f32]) {
    let n = xs.len();
    rows_with(w, first, out.len() / n.max(1), xs, |i, k, v| out[i * n + k] = v);
}

/// [`rows_into`] for `rows` weight rows from `first`, handing each result to `put(row - first,
/// row of xs, value)` (a prefill's product writes `[tokens, outputs]` directly). Rows of `xs` go
/// [`COLUMNS`] at a time over all the weight rows (their codes stay in L1 while the weight rows'
/// stream from L2; the other way round each x byte was read once per 4 products from L2, which
/// bound the kernels at a quarter of their arithmetic).
pub(super) fn rows_with(w: &QuantMatrix, first: usize, rows: usize, xs: &[Row], mut put: impl FnMut(usize, usize, f32)) {
    let k = Kernels::best();
    // room for a row's expanded scales (formats with f32 scales per block)
    let mut buf = (Vec::new(), Vec::new());
    for (chunk, cols) in xs.chunks(COLUMNS).enumerate() {
        let c0 = chunk * COLUMNS;
        for i in 0..rows {
            let r = first + i;
            if let Ok(xc) = <&[Row; COLUMNS]>::try_from(cols) {
                if let Some(y) = dots_with(w, r, xc.each_ref(), k) {
                    for (j, v) in y.into_iter().enumerate() {
                        put(i, c0 + j, v);
                    }
                    continue;
                }
            }
            for (j, x) in cols.iter().enumerate() {
                put(i, c0 + j, dot_with(w, r, x, &mut buf, k));
            }
        }
    }
}

/// Rows of `x` multiplied by one weight row's unpacked codes ([`rows_with`]).
const COLUMNS: usize = 4;

/// Row `r` of `w` times the `C` rows `xs` on kernels that unpack the codes once for all of them
/// (AVX2 `Q4_K` and `Q6_K`, whose matrices hold whole super-blocks): each result is [`dot_with`]'s for that row
/// alone, bit for bit; `None` where no such kernel runs (then [`dot_with`] row by row).
fn dots_with<const C: usize>(w: &QuantMatrix, r: usize, xs: [&Row; C], k: Kernels) -> Option<[f32; C]> {
    #[cfg(target_arch = "x86_64")]
    if k == Kernels::Avx2 && w.cols % SUPER_BLOCK == 0 && xs.iter().all(|x| x.cols == w.cols) {
        let (q, (d, sc, dmin, m)) = (w.row_codes(r), k_quant_scales(w, r)?);
        match w.codes {
            // SAFETY: AVX2 and FMA (`k`); the lengths follow from the shape, rows per super-block.
            QuantCodes::Nibbles => return Some(unsafe { avx2::nibbles(q, d, sc, dmin, m, xs) }),
            // SAFETY: as above.
            QuantCodes::SixPairs => return Some(unsafe { avx2::six_pairs(q, d, sc, xs) }),
            _ => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, r, xs, k);
    None
}

/// Row `r`'s K-quant scales `(d, sc, dmin, m)` (`dmin` and `m` empty without mins; `None`: f32
/// scales per block, or 8-bit codes, which [`scaled`] multiplies with their scales expanded).
fn k_quant_scales(w: &QuantMatrix, r: usize) -> Option<(&[f32], &[i8], &[f32], &[i8])> {
    let Scales::Super { d, dmin, sc, m } = &w.scales else { return None };
    if w.codes == QuantCodes::Bytes {
        return None;
    }
    let (supers, groups) = (w.cols / SUPER_BLOCK, w.cols / w.codes.group());
    let (dmin, m) = if w.has_min { (&dmin[r * supers..][..supers], &m[r * groups..][..groups]) } else { (&[][..], &[][..]) };
    Some((&d[r * supers..][..supers], &sc[r * groups..][..groups], dmin, m))
}

/// Row `r` of `w` times `x` ([`rows_into`]) on kernels `k` (which the CPU must run:
/// [`Kernels::best`] or one it allows below). `buf`: room for a row's expanded scales.
fn dot_with(w: &QuantMatrix, r: usize, x: &Row, buf: &mut (Vec<f32>, Vec<f32>), k: Kernels) -> f32 {
    assert!(x.cols == w.cols, "x has the matrix's columns");
    let q = w.row_codes(r);
    let Some((d, sc, dmin, m)) = k_quant_scales(w, r) else { return scaled(w, r, q, x, buf, k) };
    match w.codes {
        QuantCodes::Nibbles => {
            #[cfg(target_arch = "x86_64")]
            match k {
                // SAFETY: the CPU has the features (`k`); the lengths follow from the shape.
                Kernels::Avx512 => return unsafe { avx512::nibbles(q, d, sc, dmin, m, x) },
                // SAFETY: as above.
                Kernels::Avx2 => return unsafe { avx2::nibbles(q, d, sc, dmin, m, [x])[0] },
                Kernels::Plain => {}
            }
            generic_nibbles(q, d, sc, dmin, m, x)
        }
        QuantCodes::Sixes | QuantCodes::SixPairs => {
            #[cfg(target_arch = "x86_64")]
            match (k, w.codes) {
                // SAFETY: as above (VBMI checked here: matrices are packed as `Sixes` only where
                // it runs, see `super::six_packing`).
                (Kernels::Avx512, QuantCodes::Sixes) if avx512::has_vbmi() => return unsafe { avx512::sixes(q, d, sc, x) },
                // AVX-512 CPUs without VBMI take the AVX2 kernel.
                // SAFETY: AVX2 and FMA checked here; the lengths as above.
                (Kernels::Avx512 | Kernels::Avx2, QuantCodes::SixPairs) if avx2::has() => return unsafe { avx2::six_pairs(q, d, sc, [x])[0] },
                _ => {}
            }
            generic_sixes(w.codes, q, d, sc, x)
        }
        QuantCodes::Bytes => unreachable!("8-bit codes go through `scaled`"),
    }
}

/// [`dot_with`] for the formats multiplied with f32 scales and mins per block of 32 (the row's, as
/// the f32 kernels expand them).
fn scaled(w: &QuantMatrix, r: usize, q: &[u8], x: &Row, buf: &mut (Vec<f32>, Vec<f32>), k: Kernels) -> f32 {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = k;
    let (s, m) = w.row_scales(r, buf);
    match w.codes {
        QuantCodes::Nibbles => {
            #[cfg(target_arch = "x86_64")]
            match k {
                // SAFETY: the CPU has the features (`k`); the lengths follow from the shape.
                Kernels::Avx512 => return unsafe { avx512::nibbles_scaled(q, s, m, x) },
                // SAFETY: as above.
                Kernels::Avx2 => return unsafe { avx2::nibbles_scaled(q, s, m, x) },
                Kernels::Plain => {}
            }
            generic_scaled(q, s, m, x, nibble)
        }
        QuantCodes::Bytes => {
            #[cfg(target_arch = "x86_64")]
            match k {
                // SAFETY: as above.
                Kernels::Avx512 => return unsafe { avx512::bytes_scaled(q, s, m, x) },
                // SAFETY: as above.
                Kernels::Avx2 => return unsafe { avx2::bytes_scaled(q, s, m, x) },
                Kernels::Plain => {}
            }
            generic_scaled(q, s, m, x, byte)
        }
        QuantCodes::Sixes | QuantCodes::SixPairs => unreachable!("int8::supports keeps 6-bit codes to the K-quant kernel"),
    }
}

/// [`scaled`] on any CPU (and the SIMD kernels' reference): per block of 32 the integer sum
/// `codes . xq` times `scale * dx`, plus `min * sum(x)`; `m` empty: no mins.
fn generic_scaled(q: &[u8], s: &[f32], m: &[f32], x: &Row, code: impl Fn(&[u8], usize) -> i32) -> f32 {
    let per_block = q.len() / s.len().max(1);
    let (mut acc, mut accm) = (0f32, 0f32);
    for b in 0..s.len() {
        let (qb, xq) = (&q[per_block * b..][..per_block], &x.q[BLOCK * b..][..BLOCK]);
        let isum: i32 = (0..BLOCK).map(|j| code(qb, j) * xq[j] as i32).sum();
        acc += isum as f32 * (s[b] * x.dx8[8 * b]);
        if !m.is_empty() {
            accm += m[b] * (8.0 * x.xsum8[8 * b]);
        }
    }
    acc + accm
}

/// Code `j` of a 4-bit block (low nibbles: the first 16, high: the last 16).
fn nibble(q: &[u8], j: usize) -> i32 {
    if j < 16 {
        (q[j] & 15) as i32
    } else {
        (q[j - 16] >> 4) as i32
    }
}

/// Code `j` of an 8-bit block.
fn byte(q: &[u8], j: usize) -> i32 {
    q[j] as i8 as i32
}

/// [`dot_with`] of a `Q4_K` row on any CPU (and the SIMD kernels' reference): per group of
/// 32 the integer sum `codes . xq`, scaled by `sc * dx`, per super-block by `d`; `m` empty: no
/// mins.
fn generic_nibbles(q: &[u8], d: &[f32], sc: &[i8], dmin: &[f32], m: &[i8], x: &Row) -> f32 {
    let (mut acc, mut accm) = (0f32, 0f32);
    for (s, &ds) in d.iter().enumerate() {
        let (mut a, mut am) = (0f32, 0f32);
        for g in 8 * s..8 * s + 8 {
            let (qb, xq) = (&q[16 * g..][..16], &x.q[BLOCK * g..][..BLOCK]);
            let mut isum = 0i32;
            for j in 0..16 {
                isum += (qb[j] & 15) as i32 * xq[j] as i32 + (qb[j] >> 4) as i32 * xq[j + 16] as i32;
            }
            a += isum as f32 * (sc[g] as f32 * x.dx4[4 * g]);
            if !m.is_empty() {
                am += m[g] as f32 * (4.0 * x.xsum4[4 * g]);
            }
        }
        acc += a * ds;
        if !m.is_empty() {
            accm += am * dmin[s];
        }
    }
    acc - accm
}

/// [`dot_with`] of a `Q6_K` row packed as `kind` on any CPU (and the SIMD kernels' reference): per
/// group of 16 the integer sum `(code + 32) . xq - 32 sum(xq)`, scaled by `sc * dx`, per
/// super-block by `d`.
fn generic_sixes(kind: QuantCodes, q: &[u8], d: &[f32], sc: &[i8], x: &Row) -> f32 {
    let mut acc = 0f32;
    for (s, &ds) in d.iter().enumerate() {
        let mut a = 0f32;
        // 64 codes (48 bytes in either packing) unpacked at a time, 4 groups of 16
        for p in 4 * s..4 * s + 4 {
            let u = super::six_biased_64(kind, &q[48 * p..][..48]);
            for (k, u) in u.chunks_exact(16).enumerate() {
                let g = 4 * p + k;
                let mut isum: i32 = u.iter().zip(&x.q[16 * g..16 * g + 16]).map(|(&u, &xq)| u as i32 * xq as i32).sum();
                isum -= x.bias[4 * g..4 * g + 4].iter().sum::<i32>();
                a += isum as f32 * (sc[g] as f32 * x.dx8[8 * (g / 2)]);
            }
        }
        acc += a * ds;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Row;
    use std::arch::x86_64::*;

    /// AVX-512 (F, BW, VL) with VNNI: the kernels but the 6-bit one.
    pub fn has_vnni() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512vnni")
    }

    /// [`has_vnni`] and VBMI (`vpmultishiftqb`: the 6-bit kernel's high bits).
    pub fn has_vbmi() -> bool {
        has_vnni() && is_x86_feature_detected!("avx512vbmi")
    }

    /// Bytes of codes ahead that are prefetched (as the f32 kernels: `super::super::simd`).
    const PREFETCH: usize = 4096;

    /// 4 bytes (4 groups' integer scales) widened to 16 f32 lanes, each repeated 4 times.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn four_scales(p: *const i8) -> __m512 {
        let pat = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        // SAFETY: the caller's 4 bytes at p.
        let four = unsafe { _mm_cvtsi32_si128((p as *const i32).read_unaligned()) };
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(four, pat)))
    }

    /// [`super::generic_nibbles`]: 4 blocks (128 codes, 64 bytes) an iteration, their low
    /// nibbles and high nibbles each one `vpdpbusd` against [`Row::q4`]; per lane `sc * dx` in
    /// f32, per super-block `d` (and `dmin` for the mins, from [`Row::xsum4`]).
    ///
    /// # Safety
    /// [`has_vnni`]; `q.len() = 128 d.len()`, `sc` (and `m` unless empty) `8 d.len()`, `dmin`
    /// `d.len()` unless `m` is empty, `x` of `256 d.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn nibbles(q: &[u8], d: &[f32], sc: &[i8], dmin: &[f32], m: &[i8], x: &Row) -> f32 {
        let (mut acc, mut accm) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for s in 0..d.len() {
            let (mut a, mut am) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for i in 2 * s..2 * s + 2 {
                // SAFETY: i < 2 d.len(): 64 bytes of codes, 128 of x's codes, 16 lanes of dx and
                // 4 scales (and mins) at i are in bounds.
                unsafe {
                    let p = nibble_products(q, x, i, 4);
                    let f = _mm512_mul_ps(four_scales(sc.as_ptr().add(4 * i)), _mm512_loadu_ps(x.dx4.as_ptr().add(16 * i)));
                    a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), f, a);
                    if !m.is_empty() {
                        am = _mm512_fmadd_ps(four_scales(m.as_ptr().add(4 * i)), _mm512_loadu_ps(x.xsum4.as_ptr().add(16 * i)), am);
                    }
                }
            }
            acc = _mm512_fmadd_ps(a, _mm512_set1_ps(d[s]), acc);
            if !m.is_empty() {
                accm = _mm512_fmadd_ps(am, _mm512_set1_ps(dmin[s]), accm);
            }
        }
        _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(accm)
    }

    /// `n` (at most `16 / P`) per-block f32 values at `v` spread over 16 lanes, `P` lanes each
    /// (`P` 4 or 8); lanes past them 0. Only the `n` values are read (a masked load).
    #[target_feature(enable = "avx512f,avx512vl")]
    #[inline]
    unsafe fn spread<const P: usize>(v: *const f32, n: usize) -> __m512 {
        let idx = if P == 4 { _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3) } else { _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1) };
        // SAFETY: the caller's n values at v; the masked-off ones are not read.
        let vals = unsafe { _mm_maskz_loadu_ps(((1u32 << n) - 1) as u8, v) };
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(vals))
    }

    /// The mask of the first `n` bytes of 64 (`n <= 64`).
    #[inline]
    fn first_bytes(n: usize) -> u64 {
        if n >= 64 {
            u64::MAX
        } else {
            (1u64 << n) - 1
        }
    }

    /// Group `i` of 4 blocks of 4-bit codes (`n` of them there, the rest read as zeros) times
    /// [`Row::q4`]: per block 4 lanes of integer sums (low nibbles and high nibbles each one
    /// `vpdpbusd`); the codes 4 KB ahead prefetched.
    ///
    /// # Safety
    /// [`has_vnni`]; `q` holds `16 n` bytes and `x.q4` 128 codes at group `i`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn nibble_products(q: &[u8], x: &Row, i: usize, n: usize) -> __m512i {
        let mask = _mm512_set1_epi8(15);
        let (qp, xp) = (q.as_ptr(), x.q4.as_ptr());
        // SAFETY: the caller's bounds; the masked-off bytes are not read.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(qp.wrapping_add(64 * i + PREFETCH) as *const i8);
            let w = _mm512_maskz_loadu_epi8(first_bytes(16 * n), qp.add(64 * i) as *const i8);
            let lo = _mm512_and_si512(w, mask);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), mask);
            let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xp.add(128 * i) as *const _));
            _mm512_dpbusd_epi32(p, hi, _mm512_loadu_si512(xp.add(128 * i + 64) as *const _))
        }
    }

    /// The loop both kernels with f32 scales share, over the `s.len()` blocks `16 / P` at a time
    /// (16 lanes, `P` per block; the last step may hold fewer): the lanes' integer products
    /// `products(i, n)` (step `i`, `n` blocks there) times the blocks' scales spread over their
    /// lanes and `dx`; the blocks' mins times their sums of `x` (`xsum`, per lane). Returns both
    /// sums.
    ///
    /// # Safety
    /// [`has_vnni`]; `m` empty or as long as `s`; `dx` and `xsum` padded to whole steps of 16
    /// lanes; `products(i, n)` safe for every step.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn scaled_steps<const P: usize>(s: &[f32], m: &[f32], dx: &[f32], xsum: &[f32], products: impl Fn(usize, usize) -> __m512i) -> (f32, f32) {
        let per = 16 / P;
        let (mut acc, mut accm) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for i in 0..s.len().div_ceil(per) {
            let n = per.min(s.len() - per * i);
            // SAFETY: n scales (and mins) and 16 lanes of dx and xsum at step i are in bounds
            // (the caller's contract).
            unsafe {
                let f = _mm512_mul_ps(spread::<P>(s.as_ptr().add(per * i), n), _mm512_loadu_ps(dx.as_ptr().add(16 * i)));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(products(i, n)), f, acc);
                if !m.is_empty() {
                    accm = _mm512_fmadd_ps(spread::<P>(m.as_ptr().add(per * i), n), _mm512_loadu_ps(xsum.as_ptr().add(16 * i)), accm);
                }
            }
        }
        (_mm512_reduce_add_ps(acc), _mm512_reduce_add_ps(accm))
    }

    /// [`super::generic_scaled`] for 4-bit codes: 4 blocks an iteration as [`nibbles`] (a last
    /// group of fewer read with a mask), each block's f32 scale (and min) spread over its 4 lanes.
    ///
    /// # Safety
    /// [`has_vnni`]; `q.len() = 16 s.len()`, `m` empty or `s.len()`, `x` of `32 s.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn nibbles_scaled(q: &[u8], s: &[f32], m: &[f32], x: &Row) -> f32 {
        // SAFETY: 16 n bytes of codes at step i (n blocks there) and the padded x codes.
        let products = |i: usize, n: usize| unsafe { nibble_products(q, x, i, n) };
        // SAFETY: the lengths are the caller's contract; x's lanes are padded to whole steps.
        let (acc, accm) = unsafe { scaled_steps::<4>(s, m, &x.dx4, &x.xsum4, products) };
        acc + accm
    }

    /// [`super::generic_scaled`] for 8-bit codes: 2 blocks (64 codes) an iteration (a last odd
    /// block read with a mask), `|code|` (unsigned) times `x`'s codes negated where the code is
    /// negative, one `vpdpbusd`; each block's f32 scale (and min) spread over its 8 lanes.
    ///
    /// # Safety
    /// [`has_vnni`]; `q.len() = 32 s.len()`, `m` empty or `s.len()`, `x` of `32 s.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn bytes_scaled(q: &[u8], s: &[f32], m: &[f32], x: &Row) -> f32 {
        let (qp, xp) = (q.as_ptr(), x.q.as_ptr());
        let products = |i: usize, n: usize| {
            // SAFETY: 32 n bytes of codes at step i (n blocks there; the rest not read), 64 of
            // x's padded codes.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(qp.wrapping_add(64 * i + PREFETCH) as *const i8);
                let c = _mm512_maskz_loadu_epi8(first_bytes(32 * n), qp.add(64 * i) as *const i8);
                let xv = _mm512_loadu_si512(xp.add(64 * i) as *const _);
                let xs = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(c), _mm512_setzero_si512(), xv);
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(c), xs)
            }
        };
        // SAFETY: the lengths are the caller's contract; x's lanes are padded to whole steps.
        let (acc, accm) = unsafe { scaled_steps::<8>(s, m, &x.dx8, &x.xsum8, products) };
        acc + accm
    }

    /// [`super::generic_sixes`]: 2 blocks (64 codes, 48 bytes) an iteration: low nibbles and
    /// high nibbles of each block's 16 bytes in their 128-bit lanes, the two high bits of each
    /// code picked out of the block's 8 bytes by `vpmultishiftqb` (code `j`'s at bit `2 j`,
    /// rotated to bit 4), one `vpdpbusd` against [`Row::q`], minus [`Row::bias`].
    ///
    /// # Safety
    /// [`has_vbmi`]; `q.len() = 192 d.len()`, `sc` `16 d.len()`, `x` of `256 d.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    pub unsafe fn sixes(q: &[u8], d: &[f32], sc: &[i8], x: &Row) -> f32 {
        let mask = _mm512_set1_epi8(15);
        let high = _mm512_set1_epi8(0x30);
        // 16-bit shifts per 128-bit lane: low nibbles, high nibbles, of each block
        let shifts = _mm512_setr_epi64(0, 0, 0x0004_0004_0004_0004, 0x0004_0004_0004_0004, 0, 0, 0x0004_0004_0004_0004, 0x0004_0004_0004_0004);
        let ctrl: [u8; 64] = std::array::from_fn(|k| ((2 * (k % 32) + 60) % 64) as u8);
        // SAFETY: 64 bytes.
        let ctrl = unsafe { _mm512_loadu_si512(ctrl.as_ptr() as *const _) };
        let (qp, xp) = (q.as_ptr(), x.q.as_ptr());
        let mut acc = _mm512_setzero_ps();
        for s in 0..d.len() {
            let mut a = _mm512_setzero_ps();
            for i in 4 * s..4 * s + 4 {
                // SAFETY: i < 4 d.len(): 48 bytes of codes, 64 of x's codes, 16 lanes of dx and
                // bias and 4 scales at i are in bounds.
                unsafe {
                    let p = qp.add(48 * i);
                    if i % 2 == 0 {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
                    }
                    let (qa, qb) = (_mm_loadu_si128(p as *const __m128i), _mm_loadu_si128(p.add(24) as *const __m128i));
                    let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_broadcastsi128_si256(qa)), _mm256_broadcastsi128_si256(qb));
                    let nib = _mm512_and_si512(_mm512_srlv_epi16(v, shifts), mask);
                    let (ha, hb) = ((p.add(16) as *const i64).read_unaligned(), (p.add(40) as *const i64).read_unaligned());
                    let h = _mm512_inserti64x4::<1>(_mm512_set1_epi64(ha), _mm256_set1_epi64x(hb));
                    let u = _mm512_or_si512(nib, _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, h), high));
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(xp.add(64 * i) as *const _));
                    let dot = _mm512_sub_epi32(dot, _mm512_loadu_si512(x.bias.as_ptr().add(16 * i) as *const _));
                    let f = _mm512_mul_ps(four_scales(sc.as_ptr().add(4 * i)), _mm512_loadu_ps(x.dx8.as_ptr().add(16 * i)));
                    a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), f, a);
                }
            }
            acc = _mm512_fmadd_ps(a, _mm512_set1_ps(d[s]), acc);
        }
        _mm512_reduce_add_ps(acc)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The kernels for CPUs without AVX-512 VNNI (and the 6-bit one without VBMI); [`has`]:
    //! the f32 kernels' AVX2 test, with their prefetch distance and lane sum.
    use super::super::simd::avx2::{hsum, PREFETCH};
    use crate::kernels::host::simd::avx2::hsum4;
    pub use super::super::simd::avx2::has;
    use super::Row;
    use std::arch::x86_64::*;

    /// Two f32 values at `v` (the second 0 unless `two`) over 8 lanes, 4 each.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn two_spread(v: *const f32, two: bool) -> __m256 {
        // SAFETY: the caller's value(s) at v.
        let (a, b) = unsafe { (*v, if two { *v.add(1) } else { 0.0 }) };
        _mm256_setr_m128(_mm_set1_ps(a), _mm_set1_ps(b))
    }

    /// `u8` codes times `i8` codes summed 4 at a time into 8 lanes of 32 bits (`vpmaddubsw`,
    /// pairs into 16 bits, then `vpmaddwd` by ones): the AVX2 form of VNNI's `vpdpbusd`. A pair
    /// stays within 16 bits for codes up to 128 times `|x| <= 127`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn products(u: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1))
    }

    /// Two blocks of 4-bit codes (32 bytes at `q`) times their x codes in [`Row::q4`]'s order
    /// (`lo`: the first 16 of each block, `hi`: the last 16): 4 lanes per block. The low and
    /// high nibbles' 16-bit pair sums (each <= 2 * 15 * 127) are added before widening.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn nibble_pair(w: __m256i, lo: __m256i, hi: __m256i) -> __m256i {
        let mask = _mm256_set1_epi8(15);
        let l = _mm256_maddubs_epi16(_mm256_and_si256(w, mask), lo);
        let h = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16::<4>(w), mask), hi);
        _mm256_madd_epi16(_mm256_add_epi16(l, h), _mm256_set1_epi16(1))
    }

    /// The sums of the 8 lanes of each of `C` vectors, 4 at a time by
    /// [`crate::kernels::host::simd::avx2::hsum4`] (zeros past `C`): each vector's sum in the
    /// same order whatever `C` and its place.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsums<const C: usize>(v: [__m256; C]) -> [f32; C] {
        let mut out = [0f32; C];
        for c0 in (0..C).step_by(4) {
            let mut four = [_mm256_setzero_ps(); 4];
            for (j, x) in four.iter_mut().enumerate().take(C - c0) {
                *x = v[c0 + j];
            }
            let mut t = [0f32; 4];
            // SAFETY: 4 floats.
            unsafe { _mm_storeu_ps(t.as_mut_ptr(), hsum4(four)) };
            out[c0..].iter_mut().zip(t).for_each(|(o, t)| *o = t);
        }
        out
    }

    /// [`super::generic_nibbles`] for `C` rows of `x`: 4 blocks (128 codes, 64 bytes) an
    /// iteration, unpacked once for the `C` rows, two blocks at a time against [`Row::q4`]. The
    /// low and high nibbles' 16-bit pair sums are multiplied by the blocks' integer `sc` in the
    /// widening `vpmaddwd` (ggml's way; the super-block's 8 scales widened to 16 bits once, each
    /// pair of blocks' two spread over the 128-bit halves by one `vpshufb`), then by `dx` per
    /// lane in f32, per super-block by `d`; the mins once per super-block: its 8 `m` times the
    /// blocks' sums of `x` ([`Row::xsum`]), times `dmin`. Each row's result does not depend on
    /// the others (the same operations in the same order for any `C`).
    ///
    /// # Safety
    /// [`has`]; `q.len() = 128 d.len()`, `sc` (and `m` unless empty) `8 d.len()`, `dmin`
    /// `d.len()` unless `m` is empty, every `x` of `256 d.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn nibbles<const C: usize>(q: &[u8], d: &[f32], sc: &[i8], dmin: &[f32], m: &[i8], xs: [&Row; C]) -> [f32; C] {
        let qp = q.as_ptr();
        let xq: [*const i8; C] = std::array::from_fn(|c| xs[c].q4.as_ptr());
        let dx: [*const f32; C] = std::array::from_fn(|c| xs[c].dx4.as_ptr());
        let mut acc = [_mm256_setzero_ps(); C];
        let mask = _mm256_set1_epi8(15);
        for s in 0..d.len() {
            // SAFETY: s < d.len(): 8 scales at 8 s.
            let scales = unsafe { _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64(sc.as_ptr().add(8 * s) as *const __m128i))) };
            let mut a = [_mm256_setzero_ps(); C];
            for i in 2 * s..2 * s + 2 {
                // SAFETY: i < 2 d.len(): 64 bytes of codes, 128 of each x's codes and 16 lanes
                // of its dx at i; the spread table's 4 entries.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(qp.wrapping_add(64 * i + PREFETCH) as *const i8);
                    let (w0, w1) = (_mm256_loadu_si256(qp.add(64 * i) as *const _), _mm256_loadu_si256(qp.add(64 * i + 32) as *const _));
                    let (l0, h0) = (_mm256_and_si256(w0, mask), _mm256_and_si256(_mm256_srli_epi16::<4>(w0), mask));
                    let (l1, h1) = (_mm256_and_si256(w1, mask), _mm256_and_si256(_mm256_srli_epi16::<4>(w1), mask));
                    let k = 2 * (i - 2 * s);
                    let spread = NIBBLE_SCALE_SPREAD.as_ptr() as *const __m256i;
                    let (s0, s1) = (_mm256_shuffle_epi8(scales, _mm256_loadu_si256(spread.add(k))), _mm256_shuffle_epi8(scales, _mm256_loadu_si256(spread.add(k + 1))));
                    for c in 0..C {
                        let x = xq[c].add(128 * i);
                        let ld = |o: usize| _mm256_loadu_si256(x.add(o) as *const _);
                        let p0 = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(l0, ld(0)), _mm256_maddubs_epi16(h0, ld(64))), s0);
                        let p1 = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(l1, ld(32)), _mm256_maddubs_epi16(h1, ld(96))), s1);
                        let f = dx[c].add(16 * i);
                        a[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_loadu_ps(f), a[c]);
                        a[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_loadu_ps(f.add(8)), a[c]);
                    }
                }
            }
            // the mins: the super-block's 8 `m` times the blocks' sums of x, times `dmin`
            // SAFETY: s < d.len(): 8 mins at 8 s (when there are mins).
            let m8 = if m.is_empty() { _mm256_setzero_ps() } else { unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(m.as_ptr().add(8 * s) as *const __m128i))) } };
            for c in 0..C {
                acc[c] = _mm256_fmadd_ps(a[c], _mm256_set1_ps(d[s]), acc[c]);
                if !m.is_empty() {
                    // SAFETY: 8 block sums of x at 8 s.
                    let xsum = unsafe { _mm256_loadu_ps(xs[c].xsum.as_ptr().add(8 * s)) };
                    acc[c] = _mm256_fnmadd_ps(_mm256_mul_ps(m8, xsum), _mm256_set1_ps(dmin[s]), acc[c]);
                }
            }
        }
        hsums(acc)
    }

    /// Pair `k` of a super-block's blocks in [`nibbles`]: `vpshufb` indices putting 16-bit scale
    /// `2 k` over the first 128-bit half, `2 k + 1` over the second.
    static NIBBLE_SCALE_SPREAD: [[i8; 32]; 4] = {
        let mut t = [[0i8; 32]; 4];
        let mut k = 0;
        while k < 4 {
            let mut j = 0;
            while j < 32 {
                t[k][j] = 4 * k as i8 + 2 * (j / 16) as i8 + (j % 2) as i8;
                j += 1;
            }
            k += 1;
        }
        t
    };

    /// [`super::generic_scaled`] for 4-bit codes: 2 blocks (32 bytes) an iteration against
    /// [`Row::q4`] (a last odd block read alone), each block's f32 scale (and min) over its 4
    /// lanes.
    ///
    /// # Safety
    /// [`has`]; `q.len() = 16 s.len()`, `m` empty or `s.len()`, `x` of `32 s.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn nibbles_scaled(q: &[u8], s: &[f32], m: &[f32], x: &Row) -> f32 {
        let (qp, xp) = (q.as_ptr(), x.q4.as_ptr());
        let (mut acc, mut accm) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for p in 0..s.len().div_ceil(2) {
            let two = 2 * p + 1 < s.len();
            // SAFETY: blocks 2p (and 2p + 1 when `two`) are in q, s and m; x's codes are padded
            // to whole groups of 4 blocks and its lanes to 16 per pair of pairs.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(qp.wrapping_add(32 * p + PREFETCH) as *const i8);
                let w = if two { _mm256_loadu_si256(qp.add(32 * p) as *const _) } else { _mm256_zextsi128_si256(_mm_loadu_si128(qp.add(32 * p) as *const _)) };
                let base = xp.add(128 * (p / 2) + 32 * (p % 2));
                let prod = nibble_pair(w, _mm256_loadu_si256(base as *const _), _mm256_loadu_si256(base.add(64) as *const _));
                let f = _mm256_mul_ps(two_spread(s.as_ptr().add(2 * p), two), _mm256_loadu_ps(x.dx4.as_ptr().add(8 * p)));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), f, acc);
                if !m.is_empty() {
                    accm = _mm256_fmadd_ps(two_spread(m.as_ptr().add(2 * p), two), _mm256_loadu_ps(x.xsum4.as_ptr().add(8 * p)), accm);
                }
            }
        }
        hsum(acc) + hsum(accm)
    }

    /// [`super::generic_scaled`] for 8-bit codes: a block (32 codes) an iteration, `|code|`
    /// (unsigned) times `x`'s codes with the code's sign (`vpsignb`, ggml's way), each block's
    /// f32 scale and min over 8 lanes.
    ///
    /// # Safety
    /// [`has`]; `q.len() = 32 s.len()`, `m` empty or `s.len()`, `x` of `32 s.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bytes_scaled(q: &[u8], s: &[f32], m: &[f32], x: &Row) -> f32 {
        let (qp, xp) = (q.as_ptr(), x.q.as_ptr());
        let (mut acc, mut accm) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for b in 0..s.len() {
            // SAFETY: block b is in q, s, m (unless empty) and x's codes and lanes.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(qp.wrapping_add(32 * b + PREFETCH) as *const i8);
                let c = _mm256_loadu_si256(qp.add(32 * b) as *const _);
                let xv = _mm256_loadu_si256(xp.add(32 * b) as *const _);
                let prod = products(_mm256_abs_epi8(c), _mm256_sign_epi8(xv, c));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), _mm256_set1_ps(s[b] * x.dx8[8 * b]), acc);
                if !m.is_empty() {
                    accm = _mm256_fmadd_ps(_mm256_set1_ps(m[b]), _mm256_loadu_ps(x.xsum8.as_ptr().add(8 * b)), accm);
                }
            }
        }
        hsum(acc) + hsum(accm)
    }

    /// [`super::generic_sixes`] for [`QuantCodes::SixPairs`] and `C` rows of `x`: a pair of
    /// blocks (64 codes, 48 bytes) an iteration, unpacked as bytes (`code + 32`) by the f32
    /// kernels' `six_pair_codes` (11 instructions) once for the `C` rows; per block one
    /// `vpmaddubsw` against [`Row::q`] (pairs within 16 bits: `2 * 63 * 127`), widened by
    /// `vpmaddwd` with its two groups' integer `sc` (spread by one `vpshufb`), then times the
    /// block's `dx` in f32. The `+ 32` comes off once a super-block: per block `32 sum_g sc_g
    /// sum(xq_g)` from [`Row::sum16`] (one `vpmaddwd` for the 8 blocks) times its `dx`
    /// ([`Row::dx1`]). Then per super-block by `d`.
    ///
    /// # Safety
    /// [`has`]; `q.len() = 192 d.len()`, `sc` `16 d.len()`, every `x` of `256 d.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn six_pairs<const C: usize>(q: &[u8], d: &[f32], sc: &[i8], xs: [&Row; C]) -> [f32; C] {
        let qp = q.as_ptr();
        let xq: [*const i8; C] = std::array::from_fn(|c| xs[c].q.as_ptr());
        let dx: [*const f32; C] = std::array::from_fn(|c| xs[c].dx8.as_ptr());
        let mut acc = [_mm256_setzero_ps(); C];
        // block k of a super-block: scale 2 k over the first 8 16-bit lanes, 2 k + 1 the last 8
        let spread = |k: usize| {
            let (a, b) = (2 * k as i8, 2 * k as i8 + 1);
            _mm_setr_epi8(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
        };
        for s in 0..d.len() {
            // SAFETY: s < d.len(): 16 scales at 16 s.
            let scales = unsafe { _mm_loadu_si128(sc.as_ptr().add(16 * s) as *const __m128i) };
            let mut a = [_mm256_setzero_ps(); C];
            for j in 0..4 {
                let p = 4 * s + j;
                // SAFETY: p < 4 d.len(): 48 bytes of codes; 64 of each x's codes and 16 lanes
                // of its dx at 2 p.
                unsafe {
                    let base = qp.add(48 * p);
                    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH) as *const i8);
                    for (h, u) in super::super::simd::avx2::six_pair_codes(base).into_iter().enumerate() {
                        let b = 2 * p + h;
                        let f = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, spread(2 * j + h)));
                        for c in 0..C {
                            let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256(xq[c].add(32 * b) as *const _)), f);
                            a[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_loadu_ps(dx[c].add(8 * b)), a[c]);
                        }
                    }
                }
            }
            let sc16 = _mm256_cvtepi8_epi16(scales);
            for c in 0..C {
                // SAFETY: 16 sums of 16 codes and 8 blocks' dx at s.
                let (sums, dx1) = unsafe { (_mm256_loadu_si256(xs[c].sum16.as_ptr().add(16 * s) as *const _), _mm256_loadu_ps(xs[c].dx1.as_ptr().add(8 * s))) };
                // lane k: block k's 32 (sc_2k sum_2k + sc_2k+1 sum_2k+1)
                let bias = _mm256_cvtepi32_ps(_mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, sums)));
                a[c] = _mm256_fnmadd_ps(bias, dx1, a[c]);
                acc[c] = _mm256_fmadd_ps(a[c], _mm256_set1_ps(d[s]), acc[c]);
            }
        }
        hsums(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    /// The formats the kernels take, as test matrices are made.
    #[derive(Clone, Copy, Debug)]
    enum Kind {
        /// `Q4_K`: 4-bit codes, integer scales and mins per 32, `d`/`dmin` per 256.
        Q4K,
        /// `Q6_K`: 6-bit codes, integer scales per 16, packed in pairs of blocks
        /// ([`QuantCodes::SixPairs`]: CPUs without the AVX-512 6-bit kernels).
        Q6K,
        /// `Q6_K` packed per block ([`QuantCodes::Sixes`]: CPUs with AVX-512 VNNI and VBMI).
        Q6KBlocks,
        /// `Q5_K`: 5-bit codes (held as bytes), integer scales and mins.
        Q5K,
        /// `Q4_1`: 4-bit codes, f32 scale and min per 32.
        Q41,
        /// `Q8_0`: signed 8-bit codes, f32 scale per 32, no mins.
        Q80,
    }

    const KINDS: [Kind; 6] = [Kind::Q4K, Kind::Q6K, Kind::Q6KBlocks, Kind::Q5K, Kind::Q41, Kind::Q80];

    /// A matrix `[rows, cols]` of `kind` with random codes and scales.
    fn matrix(rows: usize, cols: usize, kind: Kind, seed: &mut u64) -> QuantMatrix {
        let mut rnd = |n: u32, lo: i32| (lcg(seed) % n) as i32 + lo;
        let (span, lo) = match kind {
            Kind::Q4K | Kind::Q41 => (16, 0),
            Kind::Q6K | Kind::Q6KBlocks => (64, -32),
            Kind::Q5K => (32, 0),
            Kind::Q80 => (255, -127),
        };
        let codes: Vec<i8> = (0..rows * cols).map(|_| rnd(span, lo) as i8).collect();
        let supers = rows * cols / SUPER_BLOCK;
        let blocks = rows * cols / BLOCK;
        let w = match kind {
            Kind::Q41 | Kind::Q80 => {
                let scale = (0..blocks).map(|_| rnd(1000, 1) as f32 * 1e-4).collect();
                let min = (0..blocks).map(|_| if matches!(kind, Kind::Q41) { -(rnd(1000, 0) as f32) * 1e-4 } else { 0.0 }).collect();
                QuantMatrix::from_codes(rows, cols, &codes, scale, min)
            }
            Kind::Q6K | Kind::Q6KBlocks => {
                let d = (0..supers).map(|_| rnd(1000, 10) as f32 * 1e-5).collect();
                let sc = (0..rows * cols / 16).map(|_| rnd(255, -127) as i8).collect();
                let sixes = if matches!(kind, Kind::Q6K) { QuantCodes::SixPairs } else { QuantCodes::Sixes };
                QuantMatrix::k_quants_packed(rows, cols, &codes, 16, d, Vec::new(), sc, Vec::new(), sixes)
            }
            Kind::Q4K | Kind::Q5K => {
                let d = (0..supers).map(|_| rnd(1000, 10) as f32 * 1e-5).collect();
                let dmin = (0..supers).map(|_| rnd(1000, 0) as f32 * 1e-5).collect();
                let sc = (0..blocks).map(|_| rnd(64, 0) as i8).collect();
                let m = (0..blocks).map(|_| rnd(64, 0) as i8).collect();
                QuantMatrix::from_k_quants(rows, cols, &codes, BLOCK, d, dmin, sc, m)
            }
        };
        w.unwrap()
    }

    /// `x`'s values as the kernels see them (each block's codes times its scale).
    fn rounded(x: &Row) -> Vec<f64> {
        x.q.iter().enumerate().map(|(i, &c)| c as f64 * x.dx8[8 * (i / BLOCK)] as f64).collect()
    }

    /// Every kernel the CPU runs, AVX-512, AVX2 and plain, against the f64 product of the dequantized weights with
    /// the rounded `x` (the mins with the exact `x`), on random rows of every format; and the
    /// rounding itself (at most half a step; a block of zeros stays zero).
    #[test]
    fn kernels_match_the_dequantized_product_of_rounded_x() {
        let mut seed = 7u64;
        for kind in KINDS {
            // the formats with f32 scales also on a width of 19 blocks (a last partial group)
            let (rows, cols) = (6, if matches!(kind, Kind::Q41 | Kind::Q80) { 608 } else { 768 });
            let w = matrix(rows, cols, kind, &mut seed);
            assert!(supports(&w), "{kind:?}");
            let dense = w.dequantize();
            let x: Vec<f32> = (0..cols).map(|i| if i % 97 == 5 || (256..288).contains(&i) { 0.0 } else { (lcg(&mut seed) % 20001) as f32 / 10000.0 - 1.0 }).collect();
            let row = Row::new(&x);
            let xr = rounded(&row);
            for (a, b) in x.iter().zip(&xr) {
                assert!((*a as f64 - b).abs() <= 1.0 / 254.0 + 1e-6, "{a} rounds to {b}");
            }
            let mut buf = (Vec::new(), Vec::new());
            let mut zero = (Vec::new(), Vec::new());
            for r in 0..rows {
                // each block's min (the row's, as the f32 kernels expand them; none: 0)
                let mins = w.row_scales(r, &mut zero).1.to_vec();
                let min = |c: usize| mins.get(c / BLOCK).map_or(0.0, |&m| m as f64);
                let (mut want, mut scale) = (0f64, 0f64);
                for c in 0..cols {
                    let (wv, mn) = (dense[r * cols + c] as f64, min(c));
                    want += (wv - mn) * xr[c] + mn * x[c] as f64;
                    scale += (wv * xr[c]).abs() + (mn * x[c] as f64).abs();
                }
                for k in [Kernels::Avx512, Kernels::Avx2, Kernels::Plain].into_iter().filter(|k| k.runs()) {
                    let got = dot_with(&w, r, &row, &mut buf, k);
                    assert!((got as f64 - want).abs() <= 1e-5 * scale + 1e-6, "{kind:?} row {r} {k:?}: {got} vs {want} (scale {scale})");
                }
            }
        }
    }

    /// The AVX2 kernels on 4 rows of `x` at once give each row what they give it alone, bit for
    /// bit, on every K-quant they take (also on CPUs whose [`Kernels::best`] is AVX-512, where
    /// [`rows_with`] does not call them).
    #[test]
    fn four_rows_at_once_are_each_row_alone() {
        #[cfg(target_arch = "x86_64")]
        if avx2::has() {
            let mut seed = 13u64;
            for kind in [Kind::Q4K, Kind::Q6K] {
                let w = matrix(5, 768, kind, &mut seed);
                let xs: Vec<Row> = (0..4).map(|_| Row::new(&(0..768).map(|_| (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0).collect::<Vec<_>>())).collect();
                let mut buf = (Vec::new(), Vec::new());
                for r in 0..5 {
                    let four = dots_with(&w, r, [&xs[0], &xs[1], &xs[2], &xs[3]], Kernels::Avx2).expect("an AVX2 kernel");
                    let alone: Vec<f32> = xs.iter().map(|x| dot_with(&w, r, x, &mut buf, Kernels::Avx2)).collect();
                    assert_eq!(&four[..], &alone[..], "{kind:?} row {r}");
                }
            }
        }
    }

    /// Through [`super::super::matvec`] and [`super::super::linear`]: a batch of rows (a decode
    /// step's 9: two chunks of [`COLUMNS`] and one more; a prefill chunk's 40, more than
    /// [`super::super::MATVEC_MAX_ROWS`]) gives each row what it gets alone, bit for bit, and the
    /// product stays within the rounding of `x` of the f32 product, for every format (each
    /// format alone, and all in one call).
    #[test]
    fn int8_matvec_is_close_to_f32_and_rows_are_independent() {
        use super::super::{linear, matvec, Activations};
        let mut seed = 11u64;
        // 72 rows: two tasks of `matvec` per matrix, the second partial
        let (rows, cols) = (72, 512);
        let ws: Vec<QuantMatrix> = KINDS.iter().map(|&k| matrix(rows, cols, k, &mut seed)).collect();
        let mut calls: Vec<Vec<&QuantMatrix>> = ws.iter().map(|w| vec![w]).collect();
        calls.push(ws.iter().collect());
        for refs in calls {
            let out: usize = refs.iter().map(|w| w.rows).sum();
            for n in [9, 40] {
                let x: Vec<f32> = (0..n * cols).map(|_| (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0).collect();
                let y = linear(&x, n, &refs, Activations::Int8);
                assert_eq!(y, matvec(&x, n, &refs, Activations::Int8));
                let exact = matvec(&x, n, &refs, Activations::F32);
                for k in 0..n {
                    let alone = matvec(&x[k * cols..(k + 1) * cols], 1, &refs, Activations::Int8);
                    assert_eq!(&y[k * out..(k + 1) * out], &alone[..], "row {k} of {n}");
                }
                let dense: Vec<f32> = refs.iter().flat_map(|w| w.dequantize()).collect();
                for k in 0..n {
                    // half a step of each value's block
                    let err: Vec<f32> = x[k * cols..(k + 1) * cols].chunks_exact(BLOCK).flat_map(|b| [b.iter().fold(0f32, |m, v| m.max(v.abs())) / 254.0; BLOCK]).collect();
                    for (r, row) in dense.chunks_exact(cols).enumerate() {
                        // |w . (x - xq)| <= sum |w| * max rounding error
                        let bound: f32 = row.iter().zip(&err).map(|(w, e)| w.abs() * e).sum();
                        let (got, want) = (y[k * out + r], exact[k * out + r]);
                        assert!((got - want).abs() <= bound * 1.01 + 1e-5, "{:?} row {r}: {got} vs {want} (bound {bound})", refs[r / rows].codes());
                    }
                }
                assert_ne!(y, exact, "int8 activations change the products");
            }
        }
    }
}
