//! Block-quantized weights for matrix-vector products (decode).
//!
//! A decode step multiplies one token's activations by every weight matrix: it is bound by the
//! bytes of weights read, not by arithmetic (SmolLM2-135M in f32: 540 MB per token). GGUF files
//! keep weights in blocks of 32 integer codes with a scale and a min (ggml's `Q4_0`, `Q4_1`,
//! `Q8_0`, ...); a [`QuantMatrix`] holds those codes (4 bits each when they fit, else 8) and
//! [`matvec`] dequantizes them on the fly, in registers: the weights it multiplies by are exactly
//! the dequantized ones (`code * scale + min`, rounded as ggml's `dequantize_row_*` rounds), only
//! the order of the sums differs from a dense product. Prefill keeps the dense f32 weights (it is
//! bound by arithmetic, where a GEMM on f32 is fastest).

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
        Ok(Self { rows, cols, codes: kind, scale, min, quants })
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
        let per_block = match self.codes {
            QuantCodes::Nibbles => BLOCK / 2,
            QuantCodes::Bytes => BLOCK,
        };
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
/// row-major, the outputs of `ws[0]` first. Each weight block is dequantized once
/// (`code * scale + min`, the same two roundings as ggml's dequantizers) and multiplied into every
/// row of `x`; output rows are split over the rayon pool, one dispatch for all the matrices.
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
    parts.into_par_iter().for_each(|(w, first, out)| rows_into(x, n, w, first, out));
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
fn rows_into(x: &[f32], n: usize, w: &QuantMatrix, first: usize, out: &mut [f32]) {
    let blocks = w.cols / BLOCK;
    let per_block = match w.codes {
        QuantCodes::Nibbles => BLOCK / 2,
        QuantCodes::Bytes => BLOCK,
    };
    for (i, o) in out.chunks_exact_mut(n.max(1)).enumerate() {
        let r = first + i;
        let q = &w.quants[r * blocks * per_block..][..blocks * per_block];
        let (s, m) = (&w.scale[r * blocks..][..blocks], &w.min[r * blocks..][..blocks]);
        for (k, o) in o.iter_mut().enumerate() {
            let xr = &x[k * w.cols..][..w.cols];
            *o = match w.codes {
                QuantCodes::Nibbles => simd::dot_nibbles(q, s, m, xr),
                QuantCodes::Bytes => simd::dot_bytes(q, s, m, xr),
            };
        }
    }
}

mod simd {
    use super::BLOCK;

    macro_rules! dispatch {
        ($name:ident, $body:ident) => {
            pub fn $name(q: &[u8], s: &[f32], m: &[f32], x: &[f32]) -> f32 {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f")]
                    unsafe fn v4(q: &[u8], s: &[f32], m: &[f32], x: &[f32]) -> f32 {
                        $body(q, s, m, x)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn v3(q: &[u8], s: &[f32], m: &[f32], x: &[f32]) -> f32 {
                        $body(q, s, m, x)
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU supports the instructions the function was compiled for.
                        return unsafe { v4(q, s, m, x) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                        // SAFETY: as above.
                        return unsafe { v3(q, s, m, x) };
                    }
                }
                $body(q, s, m, x)
            }
        };
    }

    dispatch!(dot_nibbles, dot_nibbles_body);
    dispatch!(dot_bytes, dot_bytes_body);

    /// One row of nibble codes dotted with `x`: per block, `w = code * scale + min`, then
    /// `acc += w * x` lane by lane (32 lanes, summed once at the end).
    #[inline(always)]
    fn dot_nibbles_body(q: &[u8], s: &[f32], m: &[f32], x: &[f32]) -> f32 {
        let mut acc = [0f32; BLOCK];
        for (((qb, xb), &s), &m) in q.chunks_exact(BLOCK / 2).zip(x.chunks_exact(BLOCK)).zip(s).zip(m) {
            let (qb, xb): (&[u8; 16], &[f32; 32]) = (qb.try_into().unwrap_or(&[0; 16]), xb.try_into().unwrap_or(&[0.0; 32]));
            for j in 0..16 {
                let lo = (qb[j] & 15) as f32 * s + m;
                let hi = (qb[j] >> 4) as f32 * s + m;
                acc[j] = lo.mul_add(xb[j], acc[j]);
                acc[j + 16] = hi.mul_add(xb[j + 16], acc[j + 16]);
            }
        }
        sum_lanes(&acc)
    }

    /// As [`dot_nibbles_body`] for `i8` codes.
    #[inline(always)]
    fn dot_bytes_body(q: &[u8], s: &[f32], m: &[f32], x: &[f32]) -> f32 {
        let mut acc = [0f32; BLOCK];
        for (((qb, xb), &s), &m) in q.chunks_exact(BLOCK).zip(x.chunks_exact(BLOCK)).zip(s).zip(m) {
            let (qb, xb): (&[u8; 32], &[f32; 32]) = (qb.try_into().unwrap_or(&[0; 32]), xb.try_into().unwrap_or(&[0.0; 32]));
            for j in 0..BLOCK {
                let w = qb[j] as i8 as f32 * s + m;
                acc[j] = w.mul_add(xb[j], acc[j]);
            }
        }
        sum_lanes(&acc)
    }

    /// The 32 lanes summed as a tree (vector adds; a sequential sum would be 31 dependent adds).
    #[inline(always)]
    fn sum_lanes(acc: &[f32; BLOCK]) -> f32 {
        let mut v = [0f32; 16];
        for j in 0..16 {
            v[j] = acc[j] + acc[j + 16];
        }
        let mut w = [0f32; 8];
        for j in 0..8 {
            w[j] = v[j] + v[j + 8];
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
        for n in [1, 2, 3] {
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
