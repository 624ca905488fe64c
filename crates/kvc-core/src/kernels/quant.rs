//! Block-quantized weights for matrix-vector products (decode).
//!
//! A decode step multiplies one token's activations by every weight matrix: it is bound by the
//! bytes of weights read, not by arithmetic (SmolLM2-135M in f32: 540 MB per token). GGUF files
//! keep weights in blocks of 32 integer codes with a scale and a min (ggml's `Q4_0`, `Q4_1`,
//! `Q8_0`, ...); a [`QuantMatrix`] holds those codes (4 bits each when they fit, else 8) and
//! [`matvec`] multiplies by them in registers, with each block's scale and min factored out:
//! `w . x = sum_b scale_b (codes_b . x_b) + sum_b min_b (sum of x_b)`, the product by the
//! dequantized weights (`code * scale + min`, as ggml's `dequantize_row_*`) up to f32 rounding
//! of the sums. Chunks of more than a few tokens keep the dense f32 weights (they are bound by
//! arithmetic, where a GEMM on f32 is fastest).

use rayon::prelude::*;

use crate::error::CoreError;

/// Elements per block along the input dimension (ggml's `QK4_0`/`QK8_0`).
pub const BLOCK: usize = 32;

/// How a [`QuantMatrix`] stores its codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantCodes {
    /// Codes `0..=15`, two per byte in ggml's `Q4_0`/`Q4_1` order: byte `j` of a block holds
    /// element `j` in its low nibble and element `j + 16` in its high nibble (16 bytes a block).
    Nibbles,
    /// Codes `-128..=127`, one `i8` per element (32 bytes a block).
    Bytes,
}

impl QuantCodes {
    /// Bytes of codes in a block of [`BLOCK`] elements.
    pub fn bytes_per_block(self) -> usize {
        match self {
            QuantCodes::Nibbles => BLOCK / 2,
            QuantCodes::Bytes => BLOCK,
        }
    }
}

/// A weight matrix `[rows, cols]` (PyTorch layout `[out, in]`: `y = W x`) in blocks of
/// [`BLOCK`] consecutive elements of a row; element `c` of block `b` of row `r` is
/// `code * scale[r * blocks + b] + min[r * blocks + b]`.
#[derive(Clone, Debug)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    codes: QuantCodes,
    scale: Vec<f32>,
    min: Vec<f32>,
    /// Whether any min is nonzero (`Q8_0`, `Q5_0`: none, and the kernels skip their term).
    has_min: bool,
    quants: Vec<u8>,
}

impl QuantMatrix {
    /// Builds a matrix from its blocks' integer codes, row-major (`codes.len() = rows * cols`),
    /// and one `(scale, min)` per block (`rows * cols / 32` of each). Codes all within `0..=15`
    /// are stored as nibbles, others as bytes.
    ///
    /// # Errors
    /// [`CoreError::Shape`] when `cols` is not a multiple of 32 or the lengths disagree.
    pub fn from_codes(rows: usize, cols: usize, codes: &[i8], scale: Vec<f32>, min: Vec<f32>) -> Result<Self, CoreError> {
        let blocks = rows.checked_mul(cols / BLOCK);
        if cols % BLOCK != 0 || rows.checked_mul(cols) != Some(codes.len()) || blocks != Some(scale.len()) || blocks != Some(min.len()) {
            return Err(CoreError::Shape(format!(
                "quantized matrix [{rows}, {cols}] (columns a multiple of {BLOCK}) with {} codes, {} scales, {} mins",
                codes.len(),
                scale.len(),
                min.len()
            )));
        }
        let (kind, quants) = if codes.iter().all(|&c| (0..16).contains(&c)) {
            let packed = codes.chunks_exact(BLOCK).flat_map(|b| (0..16).map(move |j| b[j] as u8 | (b[j + 16] as u8) << 4)).collect();
            (QuantCodes::Nibbles, packed)
        } else {
            (QuantCodes::Bytes, codes.iter().map(|&c| c as u8).collect())
        };
        let has_min = min.iter().any(|&m| m != 0.0);
        Ok(Self { rows, cols, codes: kind, scale, min, has_min, quants })
    }

    /// Output features (rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// How the codes are stored.
    pub fn codes(&self) -> QuantCodes {
        self.codes
    }

    /// Bytes held (codes, scales and mins).
    pub fn bytes(&self) -> usize {
        self.quants.len() + 4 * (self.scale.len() + self.min.len())
    }

    /// The matrix dequantized, row-major `[rows, cols]` (tests and references).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let per_block = self.codes.bytes_per_block();
        for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
            let q = &self.quants[b * per_block..][..per_block];
            let (s, m) = (self.scale[b], self.min[b]);
            for (j, o) in o.iter_mut().enumerate() {
                let code = match self.codes {
                    QuantCodes::Nibbles if j < 16 => (q[j] & 15) as f32,
                    QuantCodes::Nibbles => (q[j - 16] >> 4) as f32,
                    QuantCodes::Bytes => q[j] as i8 as f32,
                };
                *o = code * s + m;
            }
        }
        out
    }
}

/// Output rows per rayon task.
const ROWS_PER_TASK: usize = 64;

/// `y = x [W_1; W_2; ...]^T` for `n` rows of `x` (row-major `[n, cols]`) and matrices that all
/// have `cols` columns (a fused Q/K/V or gate/up projection): returns `[n, sum of rows]`
/// row-major, the outputs of `ws[0]` first: `sum_b scale_b (codes_b . x_b) + sum_b min_b xsum_b`
/// per output, the product by the dequantized weights up to f32 rounding. Output rows are split
/// over the rayon pool, one dispatch for all the matrices.
///
/// # Panics
/// When `x.len() != n * cols` of some matrix (a caller's shape bug, not user input).
pub fn matvec(x: &[f32], n: usize, ws: &[&QuantMatrix]) -> Vec<f32> {
    for w in ws {
        assert_eq!(x.len(), n * w.cols, "x is [n, cols]");
    }
    let total: usize = ws.iter().map(|w| w.rows).sum();
    // tasks: (matrix, first row, rows) over every matrix
    let tasks: Vec<(usize, usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(i, w)| (0..w.rows).step_by(ROWS_PER_TASK).map(move |r| (i, r, ROWS_PER_TASK.min(w.rows - r))))
        .collect();
    // output transposed ([rows, n]) so that a task owns a contiguous range
    let mut out_t = vec![0f32; total * n];
    let mut parts = Vec::with_capacity(tasks.len());
    let mut rest = out_t.as_mut_slice();
    for &(i, r, len) in &tasks {
        let (part, tail) = rest.split_at_mut(len * n);
        parts.push((ws[i], r, part));
        rest = tail;
    }
    // per row of x, the sum of each block of 32 (the mins' term: `sum_b min_b * xsum_b`)
    let xsum: Vec<f32> = x.chunks_exact(BLOCK).map(|b| b.iter().sum()).collect();
    parts.into_par_iter().for_each(|(w, first, out)| rows_into(x, &xsum, n, w, first, out));
    if n == 1 {
        return out_t;
    }
    let mut out = vec![0f32; total * n];
    for r in 0..total {
        for k in 0..n {
            out[k * total + r] = out_t[r * n + k];
        }
    }
    out
}

/// Rows `first..first + out.len() / n` of `w` times the `n` rows of `x`, into `out` (`[rows, n]`).
fn rows_into(x: &[f32], xsum: &[f32], n: usize, w: &QuantMatrix, first: usize, out: &mut [f32]) {
    let blocks = w.cols / BLOCK;
    let per_block = w.codes.bytes_per_block();
    for (i, o) in out.chunks_exact_mut(n.max(1)).enumerate() {
        let r = first + i;
        let q = &w.quants[r * blocks * per_block..][..blocks * per_block];
        let s = &w.scale[r * blocks..][..blocks];
        let m = if w.has_min { &w.min[r * blocks..][..blocks] } else { &[][..] };
        // rows of `x` four at a time: each block's codes widened once for the four (a batched
        // decode step); every row's sums in the order of the one-row kernel, so a row's product
        // does not depend on the rows beside it
        let mut k = 0;
        while k + ROWS_AT_ONCE <= o.len() {
            let xr: [&[f32]; ROWS_AT_ONCE] = std::array::from_fn(|j| &x[(k + j) * w.cols..][..w.cols]);
            let xs: [&[f32]; ROWS_AT_ONCE] = std::array::from_fn(|j| &xsum[(k + j) * blocks..][..blocks]);
            let dots = match w.codes {
                QuantCodes::Nibbles => simd::dot_nibbles_rows(q, s, m, xs, xr),
                QuantCodes::Bytes => simd::dot_bytes_rows(q, s, m, xs, xr),
            };
            o[k..k + ROWS_AT_ONCE].copy_from_slice(&dots);
            k += ROWS_AT_ONCE;
        }
        for (k, o) in o.iter_mut().enumerate().skip(k) {
            let (xr, xs) = (&x[k * w.cols..][..w.cols], &xsum[k * blocks..][..blocks]);
            *o = match w.codes {
                QuantCodes::Nibbles => simd::dot_nibbles(q, s, m, xs, xr),
                QuantCodes::Bytes => simd::dot_bytes(q, s, m, xs, xr),
            };
        }
    }
}

/// Rows of `x` multiplied together by one weight row ([`simd::dot_nibbles_rows`]).
const ROWS_AT_ONCE: usize = 8;

mod simd {
    use super::BLOCK;

    /// `sum_b scale_b (codes_b . x_b) + sum_b min_b xsum_b` over one row of nibble codes (low
    /// nibbles pair with `x_b[0..16]`, high with `x_b[16..32]`); `m` empty = no mins.
    pub fn dot_nibbles(q: &[u8], s: &[f32], m: &[f32], xs: &[f32], x: &[f32]) -> f32 {
        let n = s.len();
        assert!(q.len() >= n * 16 && x.len() >= n * 32 && xs.len() >= n && (m.is_empty() || m.len() >= n), "nibble row lengths");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the lengths are checked above.
            return unsafe { avx512::dot_nibbles(q, s, x) } + mins(m, xs);
        }
        plain_nibbles(q, s, x) + mins(m, xs)
    }

    // the plain bodies compiled for AVX2+FMA too and chosen at run time (an AVX2-only Zen 3,
    // decode @1024: 12.3 -> 14.1 tok/s; still below dense weights' 24.4: AVX2 kernels owed)
    super::super::host::simd::dispatch!(plain_nibbles, generic_nibbles, (q: &[u8], s: &[f32], x: &[f32]) -> f32);
    super::super::host::simd::dispatch!(plain_bytes, generic_bytes, (q: &[u8], s: &[f32], x: &[f32]) -> f32);

    /// [`dot_nibbles`] without the mins and explicit SIMD (CPUs without AVX-512; in tests).
    #[inline(always)]
    pub(super) fn generic_nibbles(q: &[u8], s: &[f32], x: &[f32]) -> f32 {
        generic(q, s, x, 16, |q, j| if j < 16 { (q[j] & 15) as f32 } else { (q[j - 16] >> 4) as f32 })
    }

    /// As [`dot_nibbles`] for `i8` codes (32 bytes a block).
    pub fn dot_bytes(q: &[u8], s: &[f32], m: &[f32], xs: &[f32], x: &[f32]) -> f32 {
        let n = s.len();
        assert!(q.len() >= n * 32 && x.len() >= n * 32 && xs.len() >= n && (m.is_empty() || m.len() >= n), "byte row lengths");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: as above.
            return unsafe { avx512::dot_bytes(q, s, x) } + mins(m, xs);
        }
        plain_bytes(q, s, x) + mins(m, xs)
    }

    /// [`dot_nibbles`] of one weight row with `R` rows of `x` (`xs`: their block sums): each
    /// block's codes are widened once for all `R`; each result is the one-row kernel's, bit for
    /// bit (the same operations in the same order per row).
    pub fn dot_nibbles_rows<const R: usize>(q: &[u8], s: &[f32], m: &[f32], xs: [&[f32]; R], x: [&[f32]; R]) -> [f32; R] {
        let n = s.len();
        assert!(q.len() >= n * 16 && x.iter().all(|x| x.len() >= n * 32) && xs.iter().all(|xs| xs.len() >= n), "nibble row lengths");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the lengths are checked above.
            let dots = unsafe { avx512::dot_nibbles_rows(q, s, x) };
            return std::array::from_fn(|r| dots[r] + mins(m, xs[r]));
        }
        std::array::from_fn(|r| plain_nibbles(q, s, x[r]) + mins(m, xs[r]))
    }

    /// [`dot_nibbles_rows`] for `i8` codes.
    pub fn dot_bytes_rows<const R: usize>(q: &[u8], s: &[f32], m: &[f32], xs: [&[f32]; R], x: [&[f32]; R]) -> [f32; R] {
        let n = s.len();
        assert!(q.len() >= n * 32 && x.iter().all(|x| x.len() >= n * 32) && xs.iter().all(|xs| xs.len() >= n), "byte row lengths");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: as above.
            let dots = unsafe { avx512::dot_bytes_rows(q, s, x) };
            return std::array::from_fn(|r| dots[r] + mins(m, xs[r]));
        }
        std::array::from_fn(|r| plain_bytes(q, s, x[r]) + mins(m, xs[r]))
    }

    /// [`dot_bytes`] without the mins and explicit SIMD.
    #[inline(always)]
    pub(super) fn generic_bytes(q: &[u8], s: &[f32], x: &[f32]) -> f32 {
        generic(q, s, x, 32, |q, j| q[j] as i8 as f32)
    }

    /// `sum_b m_b xs_b` on four independent accumulators (0 for no mins).
    #[inline(always)]
    fn mins(m: &[f32], xs: &[f32]) -> f32 {
        let mut acc = [0f32; 4];
        let (mc, xc) = (m.chunks_exact(4), xs.chunks_exact(4));
        let (mr, xr) = (mc.remainder(), &xs[m.len() / 4 * 4..m.len()]);
        for (a, b) in mc.zip(xc) {
            for j in 0..4 {
                acc[j] += a[j] * b[j];
            }
        }
        let tail: f32 = mr.iter().zip(xr).map(|(a, b)| a * b).sum();
        (acc[0] + acc[2]) + (acc[1] + acc[3]) + tail
    }

    /// Any CPU: per block, `scale * code(j) * x_j` accumulated over 32 lanes.
    #[inline(always)]
    fn generic(q: &[u8], s: &[f32], x: &[f32], per_block: usize, code: impl Fn(&[u8], usize) -> f32) -> f32 {
        let mut acc = [0f32; BLOCK];
        for ((qb, xb), &s) in q.chunks_exact(per_block).zip(x.chunks_exact(BLOCK)).zip(s) {
            for j in 0..BLOCK {
                acc[j] += code(qb, j) * s * xb[j];
            }
        }
        let mut half = [0f32; 16];
        for j in 0..16 {
            half[j] = acc[j] + acc[j + 16];
        }
        sum_lanes(&half)
    }

    /// Explicit AVX-512 kernels: two blocks per iteration on two accumulators (an FMA's latency
    /// would otherwise bound the loop), codes widened and converted in registers.
    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use std::arch::x86_64::*;

        /// `sum_b s_b * block(b)` lane-wise, then over lanes: two blocks per iteration on two
        /// accumulators.
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn scaled_sum(s: &[f32], block: impl Fn(usize) -> __m512) -> f32 {
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let n = s.len();
            let mut b = 0;
            while b + 1 < n {
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(s[b]), block(b), a0);
                a1 = _mm512_fmadd_ps(_mm512_set1_ps(s[b + 1]), block(b + 1), a1);
                b += 2;
            }
            if b < n {
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(s[b]), block(b), a0);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
        }

        /// # Safety
        /// AVX-512F; `q.len() >= 16 s.len()`, `x.len() >= 32 s.len()`.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn dot_nibbles(q: &[u8], s: &[f32], x: &[f32]) -> f32 {
            let mask = _mm512_set1_epi32(15);
            let (qp, xp) = (q.as_ptr(), x.as_ptr());
            let block = |b: usize| {
                // SAFETY: b < s.len(), so 16 bytes at 16 b and 32 floats at 32 b are in bounds.
                unsafe {
                    let w = _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(16 * b) as *const __m128i));
                    let lo = _mm512_cvtepi32_ps(_mm512_and_si512(w, mask));
                    let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(w));
                    _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(32 * b + 16)), _mm512_mul_ps(lo, _mm512_loadu_ps(xp.add(32 * b))))
                }
            };
            scaled_sum(s, block)
        }

        /// # Safety
        /// AVX-512F; `q.len() >= 32 s.len()`, `x.len() >= 32 s.len()`.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn dot_bytes(q: &[u8], s: &[f32], x: &[f32]) -> f32 {
            let (qp, xp) = (q.as_ptr(), x.as_ptr());
            let block = |b: usize| {
                // SAFETY: b < s.len(), so 32 bytes and 32 floats at 32 b are in bounds.
                unsafe {
                    let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(32 * b) as *const __m128i)));
                    let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(32 * b + 16) as *const __m128i)));
                    _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(32 * b + 16)), _mm512_mul_ps(lo, _mm512_loadu_ps(xp.add(32 * b))))
                }
            };
            scaled_sum(s, block)
        }

        /// [`scaled_sum`] for `R` rows of `x` at once: `widen(b)` gives block `b`'s codes as
        /// floats (low and high 16), read once for every row; per row the operations and their
        /// order are [`scaled_sum`]'s.
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn scaled_sum_rows<const R: usize>(s: &[f32], x: [&[f32]; R], widen: impl Fn(usize) -> (__m512, __m512)) -> [f32; R] {
            let (mut a0, mut a1) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
            let n = s.len();
            let block = |lo: __m512, hi: __m512, x: &[f32], b: usize| {
                // SAFETY: b < s.len() and x.len() >= 32 s.len() (the callers' contract).
                unsafe { _mm512_fmadd_ps(hi, _mm512_loadu_ps(x.as_ptr().add(32 * b + 16)), _mm512_mul_ps(lo, _mm512_loadu_ps(x.as_ptr().add(32 * b)))) }
            };
            let mut b = 0;
            while b + 1 < n {
                let ((lo0, hi0), (lo1, hi1)) = (widen(b), widen(b + 1));
                let (s0, s1) = (_mm512_set1_ps(s[b]), _mm512_set1_ps(s[b + 1]));
                for r in 0..R {
                    a0[r] = _mm512_fmadd_ps(s0, block(lo0, hi0, x[r], b), a0[r]);
                    a1[r] = _mm512_fmadd_ps(s1, block(lo1, hi1, x[r], b + 1), a1[r]);
                }
                b += 2;
            }
            if b < n {
                let (lo, hi) = widen(b);
                let s0 = _mm512_set1_ps(s[b]);
                for r in 0..R {
                    a0[r] = _mm512_fmadd_ps(s0, block(lo, hi, x[r], b), a0[r]);
                }
            }
            std::array::from_fn(|r| _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r])))
        }

        /// [`dot_nibbles`] for `R` rows of `x`.
        ///
        /// # Safety
        /// AVX-512F; `q.len() >= 16 s.len()`, every `x[r].len() >= 32 s.len()`.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn dot_nibbles_rows<const R: usize>(q: &[u8], s: &[f32], x: [&[f32]; R]) -> [f32; R] {
            let mask = _mm512_set1_epi32(15);
            let qp = q.as_ptr();
            scaled_sum_rows(s, x, |b| {
                // SAFETY: b < s.len(), so 16 bytes at 16 b are in bounds.
                let w = unsafe { _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(16 * b) as *const __m128i)) };
                (_mm512_cvtepi32_ps(_mm512_and_si512(w, mask)), _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(w)))
            })
        }

        /// [`dot_bytes`] for `R` rows of `x`.
        ///
        /// # Safety
        /// AVX-512F; `q.len() >= 32 s.len()`, every `x[r].len() >= 32 s.len()`.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn dot_bytes_rows<const R: usize>(q: &[u8], s: &[f32], x: [&[f32]; R]) -> [f32; R] {
            let qp = q.as_ptr();
            scaled_sum_rows(s, x, |b| {
                // SAFETY: b < s.len(), so 32 bytes at 32 b are in bounds.
                unsafe {
                    (
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(32 * b) as *const __m128i))),
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(32 * b + 16) as *const __m128i))),
                    )
                }
            })
        }
    }

    /// The 16 lanes summed as a tree (vector adds; a sequential sum would be 15 dependent adds).
    #[inline(always)]
    fn sum_lanes(acc: &[f32; 16]) -> f32 {
        let mut w = [0f32; 8];
        for j in 0..8 {
            w[j] = acc[j] + acc[j + 8];
        }
        let mut u = [0f32; 4];
        for j in 0..4 {
            u[j] = w[j] + w[j + 4];
        }
        (u[0] + u[2]) + (u[1] + u[3])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(n: usize, lo: i32, hi: i32, seed: u32) -> Vec<i8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (lo + (s >> 8) as i32 % (hi - lo + 1)) as i8
            })
            .collect()
    }

    fn check(rows: usize, cols: usize, lo: i32, hi: i32, want: QuantCodes) {
        let blocks = rows * cols / BLOCK;
        let scale: Vec<f32> = (0..blocks).map(|b| 0.01 + (b % 7) as f32 * 0.003).collect();
        let min: Vec<f32> = (0..blocks).map(|b| -0.05 + (b % 5) as f32 * 0.01).collect();
        let c = codes(rows * cols, lo, hi, rows as u32 * 31 + cols as u32);
        let w = QuantMatrix::from_codes(rows, cols, &c, scale.clone(), min.clone()).unwrap();
        assert_eq!(w.codes(), want);
        let dense = w.dequantize();
        // the dequantized weights are exactly `code * scale + min`
        for (i, (&d, &code)) in dense.iter().zip(&c).enumerate() {
            assert_eq!(d, code as f32 * scale[i / BLOCK] + min[i / BLOCK]);
        }
        for n in [1, 2, 3, 4, 7] {
            let x: Vec<f32> = (0..n * cols).map(|i| ((i * 7919) % 113) as f32 / 56.0 - 1.0).collect();
            let y = matvec(&x, n, &[&w]);
            assert_eq!(y.len(), n * rows);
            for k in 0..n {
                for r in 0..rows {
                    let exact: f64 = (0..cols).map(|j| dense[r * cols + j] as f64 * x[k * cols + j] as f64).sum();
                    let scale: f64 = (0..cols).map(|j| (dense[r * cols + j] as f64 * x[k * cols + j] as f64).abs()).sum();
                    let got = y[k * rows + r] as f64;
                    assert!((got - exact).abs() <= 1e-6 * scale + 1e-9, "n {n} row {r} of x {k}: {got} vs {exact}");
                }
            }
        }
    }

    /// Nibble and byte codes, row counts around the task size, one and several rows of `x`:
    /// within f32 rounding of the f64 product of the dequantized matrix.
    #[test]
    fn matvec_matches_dequantized_product() {
        check(5, 64, 0, 15, QuantCodes::Nibbles);
        check(130, 96, 0, 15, QuantCodes::Nibbles);
        check(65, 32, -128, 127, QuantCodes::Bytes);
        check(7, 160, -16, 15, QuantCodes::Bytes);
    }

    /// The explicit-SIMD row kernels (where the CPU has them) and the plain ones agree, on
    /// even and odd block counts.
    #[test]
    fn row_kernels_agree() {
        for blocks in [1, 2, 3, 18, 19] {
            let q: Vec<u8> = (0..blocks * 32).map(|i| (i * 37 % 256) as u8).collect();
            let s: Vec<f32> = (0..blocks).map(|b| 0.01 * (b as f32 + 1.0)).collect();
            let x: Vec<f32> = (0..blocks * 32).map(|i| (i as f32 * 0.7).cos()).collect();
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
            let (n, gn) = (simd::dot_nibbles(&q[..blocks * 16], &s, &[], &s, &x), simd::generic_nibbles(&q[..blocks * 16], &s, &x));
            assert!(close(n, gn), "{blocks} blocks: nibbles {n} vs {gn}");
            let (b, gb) = (simd::dot_bytes(&q, &s, &[], &s, &x), simd::generic_bytes(&q, &s, &x));
            assert!(close(b, gb), "{blocks} blocks: bytes {b} vs {gb}");
        }
    }

    /// A row of `x` multiplied with others (a batched decode step) gives the bits it gives alone.
    #[test]
    fn rows_of_a_batch_match_a_row_alone() {
        for (lo, hi) in [(0, 15), (-128, 127)] {
            for blocks in [1, 2, 3, 18] {
                let (rows, cols) = (3, blocks * BLOCK);
                let c = codes(rows * cols, lo, hi, blocks as u32);
                let scale: Vec<f32> = (0..rows * blocks).map(|b| 0.01 + (b % 7) as f32 * 0.003).collect();
                let min: Vec<f32> = (0..rows * blocks).map(|b| if lo == 0 { -0.05 + (b % 5) as f32 * 0.01 } else { 0.0 }).collect();
                let w = QuantMatrix::from_codes(rows, cols, &c, scale, min).unwrap();
                for n in [5, 9, 13] {
                    let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.61).sin() * 3.0).collect();
                    let batch = matvec(&x, n, &[&w]);
                    for k in 0..n {
                        let alone = matvec(&x[k * cols..(k + 1) * cols], 1, &[&w]);
                        let ours: Vec<u32> = batch[k * rows..(k + 1) * rows].iter().map(|v| v.to_bits()).collect();
                        assert_eq!(ours, alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "codes {lo}..{hi}, {blocks} blocks, row {k} of {n}");
                    }
                }
            }
        }
    }

    /// Several matrices in one call give their outputs side by side, as separate calls do.
    #[test]
    fn fused_matrices_concatenate_outputs() {
        let make = |rows: usize, lo: i8| {
            let c: Vec<i8> = (0..rows * 64).map(|i| lo + (i % 13) as i8).collect();
            QuantMatrix::from_codes(rows, 64, &c, vec![0.02; rows * 2], vec![0.01; rows * 2]).unwrap()
        };
        let (a, b, c) = (make(70, 0), make(3, -5), make(129, 2));
        for n in [1, 2] {
            let x: Vec<f32> = (0..n * 64).map(|i| (i as f32 * 0.37).sin()).collect();
            let fused = matvec(&x, n, &[&a, &b, &c]);
            let parts = [matvec(&x, n, &[&a]), matvec(&x, n, &[&b]), matvec(&x, n, &[&c])];
            for k in 0..n {
                let row: Vec<f32> = [(&parts[0], 70), (&parts[1], 3), (&parts[2], 129)].iter().flat_map(|(p, r)| p[k * r..(k + 1) * r].to_vec()).collect();
                assert_eq!(&fused[k * 202..(k + 1) * 202], &row[..]);
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(QuantMatrix::from_codes(2, 48, &[0; 96], vec![0.0; 3], vec![0.0; 3]).is_err());
        assert!(QuantMatrix::from_codes(2, 32, &[0; 63], vec![0.0; 2], vec![0.0; 2]).is_err());
        assert!(QuantMatrix::from_codes(2, 32, &[0; 64], vec![0.0; 1], vec![0.0; 2]).is_err());
    }
}
