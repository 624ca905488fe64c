//! bf16 matrix products for CPUs with AVX512_BF16 (`vdpbf16ps`: 32 bf16 products summed pairwise
//! into 16 f32 lanes per instruction, twice the f32 FMA's multiply-adds).
//!
//! Why: burn-flex 0.21 multiplies bf16 matrices by converting both operands to f32 value by value
//! and running its f32 GEMM (`ops/matmul.rs`, `matmul_bf16`): a `--dtype bf16` prefill ran at 0.57x
//! of f32's on the AMD EPYC VM of README Speed, while torch's bf16 GEMM (oneDNN, the same
//! instruction) runs at ~2x its f32 one. The semantics are torch's CPU bf16 matmul's: bf16
//! operands, products and sums in f32, the result rounded once to bf16 (round to nearest even;
//! `vdpbf16ps` treats subnormal inputs and outputs as zero, as oneDNN's kernels do).
//!
//! Layout: `C [m, n] = A [m, k] B [k, n]`, all row-major (`B` is a linear layer's `[in, out]`
//! weight). `B` is packed per call into panels of 32 columns whose rows are interleaved in pairs
//! (`vdpbf16ps` multiplies adjacent pairs: lane `j` of a panel row-pair holds `B[2p, j]` and
//! `B[2p + 1, j]`); `A`'s pairs `A[i, 2p..2p + 2]` are read in place as one 32-bit broadcast.
//! Tasks on rayon: blocks of [`ROWS_PER_TASK`] rows of `C`, each over every panel, [`MR`] rows x 32
//! columns of accumulators (24 of the 32 vector registers) per micro-tile.

use half::bf16;
use rayon::prelude::*;

/// Rows of a micro-tile (2 x `MR` accumulators of 16 lanes).
pub const MR: usize = 12;
/// Columns of a packed panel of `B`.
pub const NR: usize = 32;
/// Rows of `C` per rayon task (a multiple of [`MR`]).
pub const ROWS_PER_TASK: usize = 4 * MR;
/// Up to this many rows (decode steps on dense bf16 weights), [`matmul`] streams `B` once, split
/// by columns over rayon, instead of packing it.
pub const MATVEC_ROWS: usize = 4;
/// Columns of `B` per rayon task of the matrix-vector path.
const MATVEC_COLS: usize = 512;

/// Whether this CPU runs [`matmul`] (AVX512_BF16 with AVX-512F/BW/VL, as every CPU with
/// AVX512_BF16 has; checked once per call, cached by std).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether bf16 products run on `vdpbf16ps` (attention's [`Packed`] keys and values, [`matmul`]'s
/// micro-tiles) rather than on f32 FMAs over values widened once per call (exact products either
/// way; the sums differ in order, and the `vdpbf16ps` attention rounds the probabilities to bf16
/// before `P V`). `KVC_BF16_PRODUCTS=on` / `off` (also `1` / `0`, `true` / `false`) decides when
/// set (read once per process; `on` still needs AVX512_BF16; another value is reported on stderr
/// and ignored); otherwise it is the CPUs with AVX512_BF16 that are not Intel's. Why: on Intel's
/// cores with AVX512_BF16 (Cooper Lake, Sapphire / Emerald / Granite Rapids) `vdpbf16ps` issues
/// once per cycle (32 multiply-adds) where the two 512-bit FMA ports do as many in f32, so the
/// packing is pure cost: on a 2-core Emerald Rapids VM bf16 prefill ran at 0.67-0.74x f32's with
/// them (docs/speed.md, item 18); on AMD Zen 4 they made it 1.3-1.5x f32's (items 13, 15).
pub fn products_pay() -> bool {
    static PAY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAY.get_or_init(|| {
        let auto = available() && !intel();
        match std::env::var("KVC_BF16_PRODUCTS").map(|v| v.to_ascii_lowercase()).as_deref() {
            Ok("on" | "1" | "true") => available(),
            Ok("off" | "0" | "false") => false,
            Ok(other) => {
                eprintln!("KVC_BF16_PRODUCTS={other:?} is not on/off (1/0, true/false): ignored (bf16 products on vdpbf16ps: {auto})");
                auto
            }
            Err(_) => auto,
        }
    })
}

/// Whether the CPU's vendor is Intel (`cpuid` leaf 0: "GenuineIntel").
fn intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        [r.ebx, r.edx, r.ecx].iter().flat_map(|w| w.to_le_bytes()).eq(*b"GenuineIntel")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `A [m, k] B [k, n]` in bf16 with f32 sums, rounded to bf16: [`matmul_with`] with
/// `vdpbf16ps` micro-tiles where they pay ([`products_pay`]).
pub fn matmul(a: &[bf16], b: &[bf16], m: usize, k: usize, n: usize) -> Option<Vec<bf16>> {
    matmul_with(a, b, m, k, n, products_pay())
}

/// `A [m, k] B [k, n]` in bf16 (exact products, f32 sums, the result rounded once to bf16);
/// row-major slices of exactly `m * k` and `k * n` values. Up to [`MATVEC_ROWS`] rows:
/// [`matvec`], streaming `B`; more: packed panels and `vdpbf16ps` micro-tiles when `products`,
/// the CPU has AVX512_BF16 and `k` is even (the pairs of `A` are read in place), else both
/// operands widened to f32 (vectorized) and the gemm crate's f32 GEMM on rayon (burn-flex widens
/// value by value). `None` for an empty product. Panics only when the slice lengths disagree with
/// the shape (a caller bug).
pub fn matmul_with(a: &[bf16], b: &[bf16], m: usize, k: usize, n: usize, products: bool) -> Option<Vec<bf16>> {
    assert!(a.len() == m * k && b.len() == k * n, "bf16 matmul: slice lengths disagree with the shape");
    if m == 0 || n == 0 || k == 0 {
        return None;
    }
    if m <= MATVEC_ROWS {
        return Some(matvec(a, b, m, k, n));
    }
    if !(products && available() && k.is_multiple_of(2)) {
        return Some(widened(a, b, m, k, n));
    }
    let packed = pack(b, k, n);
    let mut c = vec![bf16::ZERO; m * n];
    c.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(t, out)| {
        let r0 = t * ROWS_PER_TASK;
        let rows = out.len() / n;
        let mut tile = vec![0f32; MR * NR];
        for (p, panel) in packed.chunks_exact(k * NR).enumerate() {
            let (c0, cols) = (p * NR, NR.min(n - p * NR));
            for i0 in (0..rows).step_by(MR) {
                let mr = MR.min(rows - i0);
                let a_rows = &a[(r0 + i0) * k..(r0 + i0 + mr) * k];
                // SAFETY: AVX512_BF16 checked above; `a_rows` holds `mr` rows of `k` (even) values,
                // `panel` `k / 2` pair rows of `NR` pairs, `tile` `MR x NR` floats.
                unsafe { avx512::tile(a_rows, k, mr, panel, &mut tile) };
                for i in 0..mr {
                    narrow(&tile[i * NR..i * NR + cols], &mut out[(i0 + i) * n + c0..][..cols]);
                }
            }
        }
    });
    Some(c)
}

/// [`matmul_with`] on f32 FMAs: `A` and `B` widened (exact), one f32 GEMM over rayon's threads,
/// the result rounded to bf16.
fn widened(a: &[bf16], b: &[bf16], m: usize, k: usize, n: usize) -> Vec<bf16> {
    let (mut aw, mut bw) = (vec![0f32; m * k], vec![0f32; k * n]);
    super::host::simd::widen_bf16(a, &mut aw);
    super::host::simd::widen_bf16(b, &mut bw);
    let mut c = vec![0f32; m * n];
    // dst C [m, n], lhs A [m, k], rhs B [k, n], all row-major (column stride 1)
    // SAFETY: every pointer is valid for the given extents and strides.
    unsafe {
        gemm::gemm(
            m, n, k, c.as_mut_ptr(), 1, n as isize, false, aw.as_ptr(), 1, k as isize, bw.as_ptr(), 1, n as isize, 0.0, 1.0, false, false, false,
            gemm::Parallelism::Rayon(0),
        );
    }
    let mut out = vec![bf16::ZERO; m * n];
    narrow(&c, &mut out);
    out
}

/// `src` rounded to bf16 into `dst` (same lengths; round to nearest even): 16 values per
/// `vcvtneps2bf16` where the CPU has AVX512_BF16 (subnormal values become zeros, as in the
/// products), `half`'s conversion otherwise. Panics when the lengths differ (a caller bug).
pub fn narrow(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "bf16 narrow: lengths differ");
    if available() {
        // SAFETY: AVX512_BF16 checked; equal lengths.
        unsafe { avx512::narrow(src, dst) }
    } else {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(x);
        }
    }
}

/// [`matmul`] for a few rows: each task streams its columns of every row of `B` once
/// (`acc_i += A[i, p] * B[p, cols]`, widened in registers), so the product reads the weights once,
/// at memory speed, on every core.
fn matvec(a: &[bf16], b: &[bf16], m: usize, k: usize, n: usize) -> Vec<bf16> {
    let x: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(MATVEC_COLS))
        .into_par_iter()
        .map(|t| {
            let (c0, cols) = (t * MATVEC_COLS, MATVEC_COLS.min(n - t * MATVEC_COLS));
            let mut acc = vec![0f32; m * cols];
            for p in 0..k {
                let row = &b[p * n + c0..][..cols];
                for (i, acc) in acc.chunks_exact_mut(cols).enumerate() {
                    super::host::simd::axpy_bf16(acc, row, x[i * k + p]);
                }
            }
            acc
        })
        .collect();
    let mut c = vec![bf16::ZERO; m * n];
    for (t, part) in parts.iter().enumerate() {
        let (c0, cols) = (t * MATVEC_COLS, MATVEC_COLS.min(n - t * MATVEC_COLS));
        for i in 0..m {
            // the same rounding as the micro-tiles' (vcvtneps2bf16 where available)
            narrow(&part[i * cols..][..cols], &mut c[i * n + c0..][..cols]);
        }
    }
    c
}

/// `B [k, n]` as `ceil(n / NR)` panels of `k / 2` pair rows of `NR` (column, pair) entries:
/// panel `p`, pair row `q`, column `j`: `[B[2q, p NR + j], B[2q + 1, p NR + j]]`, zeros past `n`.
fn pack(b: &[bf16], k: usize, n: usize) -> Vec<bf16> {
    let mut packed = vec![bf16::ZERO; n.div_ceil(NR) * k * NR];
    packed.par_chunks_mut(k * NR).enumerate().for_each(|(p, panel)| pack_panel(panel, p, n, |r, c| b[r * n + c]));
    packed
}

/// Fills panel `p` (`k * NR` values, [`pack`]'s layout) of a `[k, n]` matrix given by element
/// (`at(row, column)`); columns past `n` stay as they are (zeros).
fn pack_panel(panel: &mut [bf16], p: usize, n: usize, at: impl Fn(usize, usize) -> bf16) {
    let (c0, cols) = (p * NR, NR.min(n - p * NR));
    for (q, pair_row) in panel.chunks_exact_mut(2 * NR).enumerate() {
        for j in 0..cols {
            pair_row[2 * j] = at(2 * q, c0 + j);
            pair_row[2 * j + 1] = at(2 * q + 1, c0 + j);
        }
    }
}

/// Keys and values of one attention head, packed once for [`Packed::scores`] and
/// [`Packed::weighted`] (on this thread: callers run heads in parallel).
///
/// `k`: `K^T [d, n]` in [`pack`]'s panels (32 keys per panel, so key tiles starting at multiples
/// of 32 are whole panels); `v`: `V [n2, d]` (`n2` = `n` rounded up to even, a zero key added)
/// in panels over `d`, so the keys `t0..t0 + 2j` of every panel are one contiguous range.
pub struct Packed {
    k: Vec<bf16>,
    v: Vec<bf16>,
    n: usize,
    n2: usize,
    d: usize,
}

impl Packed {
    /// Packs `n` keys and values, row-major `[n, d]`. `None` when the CPU lacks AVX512_BF16, `d`
    /// is odd, or `n` or `d` is 0 (the caller widens instead). Panics only when the slices are
    /// shorter than `n * d`.
    pub fn new(k: &[bf16], v: &[bf16], n: usize, d: usize) -> Option<Self> {
        if !available() || !d.is_multiple_of(2) || n == 0 || d == 0 {
            return None;
        }
        let (k, v) = (&k[..n * d], &v[..n * d]);
        let n2 = n.next_multiple_of(2);
        let mut kp = vec![bf16::ZERO; n.div_ceil(NR) * d * NR];
        for (p, panel) in kp.chunks_exact_mut(d * NR).enumerate() {
            pack_panel(panel, p, n, |r, c| k[c * d + r]);
        }
        let mut vp = vec![bf16::ZERO; d.div_ceil(NR) * n2 * NR];
        for (p, panel) in vp.chunks_exact_mut(n2 * NR).enumerate() {
            pack_panel(panel, p, d, |r, c| if r < n { v[r * d + c] } else { bf16::ZERO });
        }
        Some(Self { k: kp, v: vp, n, n2, d })
    }

    /// `s [m, tn] = scale * Q K[t0..t0 + tn]^T` (f32, row-major), `q [m, d]` row-major bf16;
    /// `t0` a multiple of 32. Panics on a key range past `n` or an unaligned `t0` (caller bugs).
    pub fn scores(&self, q: &[bf16], m: usize, t0: usize, tn: usize, scale: f32, s: &mut [f32]) {
        assert!(t0.is_multiple_of(NR) && t0 + tn <= self.n && q.len() == m * self.d && s.len() >= m * tn, "bf16 scores: bad range");
        let d = self.d;
        products(q, d, m, &self.k[(t0 / NR) * d * NR..], d * NR, tn, s, tn, scale, false);
    }

    /// `out [m, d] (+)= P V[t0..t0 + tn]`, `p [m, tn]` f32 row-major (rounded to bf16 for the
    /// product, as torch's CPU attention in bf16 does), `t0` even; `accumulate` adds to `out`
    /// instead of overwriting it. `buf` is scratch. Panics on a key range past `n`.
    #[allow(clippy::too_many_arguments)]
    pub fn weighted(&self, p: &[f32], m: usize, t0: usize, tn: usize, out: &mut [f32], accumulate: bool, buf: &mut Vec<bf16>) {
        assert!(t0.is_multiple_of(2) && t0 + tn <= self.n && p.len() >= m * tn && out.len() >= m * self.d, "bf16 weighted: bad range");
        let tn2 = tn.next_multiple_of(2);
        buf.clear();
        buf.resize(m * tn2, bf16::ZERO);
        for (dst, src) in buf.chunks_exact_mut(tn2).zip(p.chunks_exact(tn)) {
            narrow(src, &mut dst[..tn]);
        }
        products(buf, tn2, m, &self.v[t0 * NR..], self.n2 * NR, self.d, out, self.d, 1.0, accumulate);
    }
}

/// `out [m, n] (+)= scale * A [m, k] B [k, n]` on this thread, `B` given as panels `panel_stride`
/// values apart whose first `k * NR` values are the ones used (`k` even).
#[allow(clippy::too_many_arguments)]
fn products(a: &[bf16], k: usize, m: usize, panels: &[bf16], panel_stride: usize, n: usize, out: &mut [f32], ldo: usize, scale: f32, accumulate: bool) {
    let mut tile = [0f32; MR * NR];
    for p in 0..n.div_ceil(NR) {
        let (c0, cols) = (p * NR, NR.min(n - p * NR));
        let panel = &panels[p * panel_stride..][..k * NR];
        for i0 in (0..m).step_by(MR) {
            let mr = MR.min(m - i0);
            // SAFETY: `available()` held when the panels were packed; `a` holds `mr` rows of `k`
            // (even) values from row `i0`, `panel` `k / 2` pair rows of `NR` pairs.
            unsafe { avx512::tile(&a[i0 * k..(i0 + mr) * k], k, mr, panel, &mut tile) };
            for i in 0..mr {
                let dst = &mut out[(i0 + i) * ldo + c0..][..cols];
                let src = &tile[i * NR..i * NR + cols];
                if accumulate {
                    dst.iter_mut().zip(src).for_each(|(d, &x)| *d += scale * x);
                } else {
                    dst.iter_mut().zip(src).for_each(|(d, &x)| *d = scale * x);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use half::bf16;
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// `tile[i, 0..NR] = sum_q A[i, 2q..2q+2] . panel[q, 0..NR]` for the `mr <= MR` rows of `a`.
    ///
    /// # Safety
    /// AVX512_BF16 and AVX-512F; `a.len() == mr * k`, `k` even, `panel.len() == k * NR`,
    /// `tile.len() == MR * NR`.
    #[target_feature(enable = "avx512bf16,avx512f")]
    pub unsafe fn tile(a: &[bf16], k: usize, mr: usize, panel: &[bf16], tile: &mut [f32]) {
        debug_assert!(a.len() == mr * k && panel.len() == k * NR && tile.len() == MR * NR && mr <= MR);
        // one instantiation per row count keeps every accumulator in a register
        macro_rules! rows {
            ($($r:literal)*) => {
                match mr {
                    $($r => unsafe { kernel::<$r>(a, k, panel, tile) },)*
                    _ => unreachable!("micro-tile rows"),
                }
            };
        }
        rows!(1 2 3 4 5 6 7 8 9 10 11 12);
    }

    /// `dst[i] = src[i]` rounded to bf16 (`vcvtneps2bf16`, 16 at a time; a masked tail).
    ///
    /// # Safety
    /// AVX512_BF16, AVX-512F/BW/VL; `src.len() == dst.len()`.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    pub unsafe fn narrow(src: &[f32], dst: &mut [bf16]) {
        let n = src.len();
        let mut i = 0;
        while i < n {
            let left = (n - i).min(16);
            let mask: u16 = if left == 16 { u16::MAX } else { (1u16 << left) - 1 };
            // SAFETY: lanes below `left` are inside both slices; masked lanes are not touched.
            unsafe {
                let x = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(i));
                let y: __m256i = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x));
                _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, mask, y);
            }
            i += 16;
        }
    }

    #[target_feature(enable = "avx512bf16,avx512f")]
    #[inline]
    unsafe fn kernel<const R: usize>(a: &[bf16], k: usize, panel: &[bf16], tile: &mut [f32]) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (ap, bp) = (a.as_ptr(), panel.as_ptr());
        for q in 0..k / 2 {
            // SAFETY: pair row q of the panel is 2 NR values at 2 NR q; A's pair (i, q) is 2 values
            // at i k + 2q, inside row i (k even). Unaligned 32-bit reads.
            unsafe {
                let b0 = _mm512_loadu_si512(bp.add(2 * NR * q) as *const __m512i);
                let b1 = _mm512_loadu_si512(bp.add(2 * NR * q + NR) as *const __m512i);
                // same 512 bits, bf16 view (std has no cast intrinsic for __m512bh)
                let (b0, b1) = (std::mem::transmute::<__m512i, __m512bh>(b0), std::mem::transmute::<__m512i, __m512bh>(b1));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let pair = (ap.add(i * k + 2 * q) as *const i32).read_unaligned();
                    let x = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: row i of the tile is NR floats at i NR (R <= MR rows).
            unsafe {
                _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR), acc[0]);
                _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR + 16), acc[1]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    use half::bf16;

    /// Never called: [`super::available`] is false off x86-64.
    pub unsafe fn narrow(_: &[f32], _: &mut [bf16]) {
        unreachable!("AVX512_BF16 off x86-64")
    }

    /// Never called: [`super::available`] is false off x86-64.
    pub unsafe fn tile(_: &[bf16], _: usize, _: usize, _: &[bf16], _: &mut [f32]) {
        unreachable!("AVX512_BF16 off x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u32) -> Vec<bf16> {
        (0..n).map(|i| bf16::from_f32((((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5) * 4.0)).collect()
    }

    #[test]
    fn matches_f64_products_rounded_to_bf16() {
        if !available() {
            println!("no AVX512_BF16 on this CPU: the widened f32 path checked only (vdpbf16ps tiles need such a CPU)");
        }
        // shapes around every edge: one row, partial micro-tiles and tasks, partial panels, odd k
        // (m <= MATVEC_ROWS takes the matrix-vector path; 49 and 100 rows span several tasks)
        for products in [true, false] {
            for (m, k, n) in [(1, 2, 1), (3, 40, 1100), (4, 6, 513), (5, 8, 7), (12, 64, 32), (13, 66, 33), (49, 576, 70), (100, 130, 200), (7, 5, 9)] {
                let (a, b) = (vals(m * k, 1), vals(k * n, 2));
                let c = matmul_with(&a, &b, m, k, n, products).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|p| a[i * k + p].to_f64() * b[p * n + j].to_f64()).sum();
                        let mag: f64 = (0..k).map(|p| (a[i * k + p].to_f64() * b[p * n + j].to_f64()).abs()).sum();
                        let got = c[i * n + j].to_f64();
                        // one bf16 rounding of the result (2^-8 relative) plus f32 sums
                        assert!((got - want).abs() <= want.abs() / 256.0 + mag * 1e-6, "{products} ({m}, {k}, {n}) [{i}, {j}]: {got} vs {want}");
                    }
                }
            }
        }
        // the two paths differ only in the order of the f32 sums (and vdpbf16ps's subnormals);
        // without AVX512_BF16 both calls take the widened path and this compares it with itself
        let (m, k, n) = (30, 64, 40);
        let (a, b) = (vals(m * k, 3), vals(k * n, 4));
        let (tiles, wide) = (matmul_with(&a, &b, m, k, n, true).unwrap(), matmul_with(&a, &b, m, k, n, false).unwrap());
        let close = tiles.iter().zip(&wide).filter(|(x, y)| (x.to_f32() - y.to_f32()).abs() <= x.to_f32().abs() / 128.0 + 1e-3).count();
        assert_eq!(close, m * n);
        assert!(matmul(&[], &vals(6, 1), 0, 3, 2).is_none(), "an empty product declines");
    }

    #[test]
    fn narrow_rounds_to_nearest_even() {
        if !available() {
            println!("no AVX512_BF16 on this CPU: narrow takes half's conversion (checked against the bit rule below)");
        }
        // round to nearest even on the bits (finite values; no subnormals below)
        let rne = |x: f32| -> u16 {
            let b = x.to_bits();
            ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
        };
        // exact ties with an even and an odd kept bit (i & 1), values just above a tie
        // ((i >> 1) & 1), every tail length, signs, zeros, infinities, the largest finite
        let mut src: Vec<f32> = (0..37).map(|i| f32::from_bits(0x3f80_8000 + (i << 16) + ((i >> 1) & 1)) * if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        assert_eq!(rne(src[1]), 0x3f82, "a tie with an odd kept bit rounds up");
        assert_eq!(rne(src[4]), 0x3f84, "a tie with an even kept bit rounds down");
        src.extend([0.0, -0.0, 1.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 3.1e38, 1e-30]);
        for len in 0..src.len() {
            let mut got = vec![bf16::ZERO; len];
            narrow(&src[..len], &mut got);
            for (g, &x) in got.iter().zip(&src) {
                assert_eq!(g.to_bits(), rne(x), "{x:e}");
            }
        }
        let mut nan = [bf16::ZERO];
        narrow(&[f32::NAN], &mut nan);
        assert!(nan[0].is_nan());
    }
}
