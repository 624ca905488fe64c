//! Block-quantized weights and the products on them (decode and prefill).
//!
//! A decode step multiplies one token's activations by every weight matrix: it is bound by the
//! bytes of weights read, not by arithmetic (SmolLM2-135M in f32: 540 MB per token). GGUF files
//! keep weights in blocks of 32 integer codes with a scale and a min (ggml's `Q4_0`, `Q4_1`,
//! `Q8_0`, ...), or in 256-element super-blocks with two levels of scales (`Q4_K`, `Q5_K`,
//! `Q6_K`); a [`QuantMatrix`] holds those codes (4 bits each when they fit, 6 for `Q6_K`, else 8)
//! and [`matvec`] multiplies by them in registers, with each group's scale and min factored out:
//! `w . x = sum_b scale_b (codes_b . x_b) + sum_b min_b (sum of x_b)`, the product by the
//! dequantized weights (`code * scale + min`, as ggml's `dequantize_row_*`) up to f32 rounding
//! of the sums. Chunks of more than 32 rows (prefill) go through [`matmul`]: tiles of the
//! dequantized weights multiplied by a GEMM. [`linear`] picks one. With
//! [`Activations::Int8`], [`matvec`] rounds `x` to int8 and multiplies the codes in integer
//! arithmetic instead (`int8`: llama.cpp's way, about twice as fast on AVX-512 VNNI and on AVX2,
//! not the dequantized product), for any number of rows when every matrix has int8 kernels.

use rayon::prelude::*;

mod int8;

/// How [`linear`] multiplies the rows of `x` by a matrix's codes: decode steps (at most
/// [`MATVEC_MAX_ROWS`] rows, [`matvec`]) either way; longer inputs (prefill chunks) through
/// [`matmul`]'s f32 GEMM, or with `Int8` through [`matvec`]'s int8 kernels over all the rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activations {
    /// `x` as it is, times each group's codes widened to f32: the product by the dequantized
    /// weights up to f32 rounding of the sums (logits as the dense path's).
    #[default]
    F32,
    /// `x` rounded to int8 per block of 32 values with one f32 scale (ggml's `quantize_row_q8_0`:
    /// each value moves by at most half a step, `max|x_block| / 254`), multiplied by the codes in
    /// integer arithmetic (AVX-512 VNNI `vpdpbusd` where the CPU has it, else AVX2
    /// `vpmaddubsw` + `vpmaddwd`, plain loops on CPUs with neither),
    /// as llama.cpp's CPU backend does (with one scale per 256 values for its K-quants): about
    /// half the instructions per weight, so decode is faster where it is bound by arithmetic
    /// rather than memory (a 2-core Xeon). Every format kvc reads (the K-quants in whole
    /// super-blocks of 256 columns, as their files hold them). Without AVX2 the plain loops
    /// give the same numbers (up to the order of f32 sums), slower: [`int8_kernels_native`].
    Int8,
}

use crate::error::CoreError;

/// Whether this CPU runs [`Activations::Int8`]'s explicit SIMD kernels for every format
/// (AVX-512 F, BW, VL and VNNI, `Q6_K` with VBMI too or else on AVX2's; or AVX2 and FMA). Where
/// it does not, the plain loops run: the same numbers up to the order of f32 sums, likely slower
/// than [`Activations::F32`] (a front end can say so).
pub fn int8_kernels_native() -> bool {
    int8::native()
}

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
    /// 6-bit codes `-32..=31` with one scale per 16 elements and no min (ggml's `Q6_K`), 24
    /// bytes a block in kvc's own packing (6.6 bits a weight with the scales; the file's layout
    /// interleaves a super-block's codes differently): the low 4 bits of `code + 32` as
    /// [`QuantCodes::Nibbles`], then the high 2 bits as two little-endian `u32`, element `i` of
    /// each half in bits `2i..2i + 2`.
    Sixes,
    /// The codes of [`QuantCodes::Sixes`] packed per pair of blocks (64 elements, 48 bytes) in
    /// ggml's `Q6_K` arrangement, which AVX2 unpacks with fewer instructions: byte `j` of the
    /// first 32 holds the low 4 bits of `code + 32` of element `j` (low nibble) and of element
    /// `j + 32` (high nibble); byte `32 + t` of the last 16 holds the high 2 bits of elements
    /// `t`, `t + 16`, `t + 32`, `t + 48` in bits `0..2`, `2..4`, `4..6`, `6..8`. Matrices are
    /// packed so on CPUs without the AVX-512 kernels of `Sixes` (VNNI and VBMI).
    SixPairs,
}

impl QuantCodes {
    /// Bytes of codes in a block of [`BLOCK`] elements.
    pub fn bytes_per_block(self) -> usize {
        match self {
            QuantCodes::Nibbles => BLOCK / 2,
            QuantCodes::Bytes => BLOCK,
            QuantCodes::Sixes | QuantCodes::SixPairs => 24,
        }
    }

    /// Elements that share one scale (and min).
    pub fn group(self) -> usize {
        match self {
            QuantCodes::Sixes | QuantCodes::SixPairs => 16,
            _ => BLOCK,
        }
    }
}

/// Elements of a K-quant super-block (ggml's `QK_K`).
pub const SUPER_BLOCK: usize = 256;

/// The scales and mins of a [`QuantMatrix`], one pair per group of [`QuantCodes::group`]
/// elements of a row.
#[derive(Clone, Debug)]
enum Scales {
    /// f32 values per group ([`QuantMatrix::from_codes`]).
    Flat { scale: Vec<f32>, min: Vec<f32> },
    /// ggml's K-quants as the file stores them: per [`SUPER_BLOCK`] elements an f32 `d` and
    /// `dmin`, per group 6- or 8-bit integers `sc` and `m`: `scale = d * sc`, `min = -(dmin * m)`
    /// (as `dequantize_row_q4_K` / `_q6_K` compute them); `m` and `dmin` empty without mins.
    Super { d: Vec<f32>, dmin: Vec<f32>, sc: Vec<i8>, m: Vec<i8> },
}

/// A weight matrix `[rows, cols]` (PyTorch layout `[out, in]`: `y = W x`) in blocks of
/// [`BLOCK`] consecutive elements of a row; element `c` of group `g` (of
/// [`QuantCodes::group`] elements) of row `r` is `code * scale + min` with that group's scale
/// and min.
#[derive(Clone, Debug)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    codes: QuantCodes,
    scales: Scales,
    /// Whether any min is nonzero (`Q8_0`, `Q5_0`, `Q6_K`: none, and the kernels skip their
    /// term).
    has_min: bool,
    quants: Vec<u8>,
}

impl QuantMatrix {
    /// Builds a matrix from its blocks' integer codes, row-major (`codes.len() = rows * cols`),
    /// and one `(scale, min)` per block (`rows * cols / 32` of each). Codes all within `0..=15`
    /// are stored as nibbles, others as bytes.
    ///
    /// # Errors
    /// [`CoreError::Shape`] when `cols` is not a multiple of 32, the lengths disagree, or a
    /// scale or min is not finite (a damaged file: the dense loader then names the weight).
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
        if scale.iter().chain(&min).any(|v| !v.is_finite()) {
            return Err(CoreError::Shape("a scale or min that is not finite".into()));
        }
        let has_min = min.iter().any(|&m| m != 0.0);
        let (kind, quants) = pack(codes, false);
        Ok(Self { rows, cols, codes: kind, scales: Scales::Flat { scale, min }, has_min, quants })
    }

    /// Builds a matrix from a K-quant's codes (row-major, `rows * cols`) and its two-level
    /// scales (ggml-common.h `block_q4_K`, `block_q5_K`, `block_q6_K`): per [`SUPER_BLOCK`]
    /// elements `d` (and `dmin`), per group of `group` elements (32 for `Q4_K`/`Q5_K`, 16 for
    /// `Q6_K`) an integer `sc` (and `m`): the weight is `code * (d * sc) - dmin * m`. `dmin` and
    /// `m` empty: no mins. Held with both levels (`d`, `dmin` as f32; `sc`, `m` a byte each):
    /// 4.75 bits a weight for `Q4_K` (the file: 4.5), 6.63 for `Q6_K` (codes packed as
    /// [`QuantCodes::Sixes`] or [`QuantCodes::SixPairs`], whichever this CPU's kernels read
    /// faster; the file: 6.56), instead of 6 and 10 with f32 scales per group.
    ///
    /// # Errors
    /// [`CoreError::Shape`] when `cols` is not a multiple of 256, `group` not 16 or 32 (16 only
    /// without mins), the lengths disagree, a code of a 16-element group lies outside `-32..=31`,
    /// or a `d` / `dmin` is not finite.
    #[allow(clippy::too_many_arguments)]
    pub fn from_k_quants(rows: usize, cols: usize, codes: &[i8], group: usize, d: Vec<f32>, dmin: Vec<f32>, sc: Vec<i8>, m: Vec<i8>) -> Result<Self, CoreError> {
        Self::k_quants_packed(rows, cols, codes, group, d, dmin, sc, m, six_packing())
    }

    /// [`Self::from_k_quants`] with 6-bit codes packed as `sixes` ([`QuantCodes::Sixes`] or
    /// [`QuantCodes::SixPairs`]; tests pack both on any CPU).
    #[allow(clippy::too_many_arguments)]
    fn k_quants_packed(rows: usize, cols: usize, codes: &[i8], group: usize, d: Vec<f32>, dmin: Vec<f32>, sc: Vec<i8>, m: Vec<i8>, sixes: QuantCodes) -> Result<Self, CoreError> {
        let supers = rows.checked_mul(cols / SUPER_BLOCK);
        let groups = rows.checked_mul(cols / group.max(1));
        let mins_ok = (dmin.is_empty() && m.is_empty()) || (group == BLOCK && Some(dmin.len()) == supers && Some(m.len()) == groups);
        if cols % SUPER_BLOCK != 0 || !(group == 16 || group == BLOCK) || rows.checked_mul(cols) != Some(codes.len()) || Some(d.len()) != supers || Some(sc.len()) != groups || !mins_ok {
            return Err(CoreError::Shape(format!(
                "K-quant matrix [{rows}, {cols}] (columns a multiple of {SUPER_BLOCK}), groups of {group}: {} codes, {} d, {} dmin, {} sc, {} m",
                codes.len(),
                d.len(),
                dmin.len(),
                sc.len(),
                m.len()
            )));
        }
        if d.iter().chain(&dmin).any(|v| !v.is_finite()) {
            return Err(CoreError::Shape("a super-block scale that is not finite".into()));
        }
        let has_min = m.iter().enumerate().any(|(g, &m)| m != 0 && dmin[g * group / SUPER_BLOCK] != 0.0);
        let (kind, quants) = if group == 16 {
            if let Some(bad) = codes.iter().find(|c| !(-32..32).contains(*c)) {
                return Err(CoreError::Shape(format!("a code of {bad} in a matrix of 6-bit codes (-32..=31)")));
            }
            (sixes, if sixes == QuantCodes::SixPairs { pack_six_pairs(codes) } else { pack_sixes(codes) })
        } else {
            pack(codes, false)
        };
        Ok(Self { rows, cols, codes: kind, scales: Scales::Super { d, dmin, sc, m }, has_min, quants })
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
        self.quants.len()
            + match &self.scales {
                Scales::Flat { scale, min } => 4 * (scale.len() + min.len()),
                Scales::Super { d, dmin, sc, m } => 4 * (d.len() + dmin.len()) + sc.len() + m.len(),
            }
    }

    /// Row `r`'s codes (`cols / 32` blocks of [`QuantCodes::bytes_per_block`] bytes).
    fn row_codes(&self, r: usize) -> &[u8] {
        let per_row = (self.cols / BLOCK) * self.codes.bytes_per_block();
        &self.quants[r * per_row..][..per_row]
    }

    /// Row `r`'s scales and mins, one per group (`m` empty without mins): slices of the
    /// matrix, or of `buf` where they are computed from a K-quant's two levels.
    fn row_scales<'a>(&'a self, r: usize, buf: &'a mut (Vec<f32>, Vec<f32>)) -> (&'a [f32], &'a [f32]) {
        let groups = self.cols / self.codes.group();
        let rg = r * groups..(r + 1) * groups;
        match &self.scales {
            Scales::Flat { scale, min } => {
                let m = if self.has_min { &min[rg.clone()] } else { &[][..] };
                (&scale[rg], m)
            }
            Scales::Super { d, dmin, sc, m } => {
                let supers = self.cols / SUPER_BLOCK;
                let (s_out, m_out) = buf;
                // per super-block, its groups: no division per group (this runs for every row
                // of every decode step; one call per row measured faster than one per task of
                // 64 rows, whose larger buffers compete with the streamed codes)
                let rs = r * supers..(r + 1) * supers;
                s_out.resize(groups, 0.0);
                simd::expand_scales(s_out, &d[rs.clone()], &sc[rg.clone()], 1.0);
                if self.has_min {
                    m_out.resize(groups, 0.0);
                    simd::expand_scales(m_out, &dmin[rs], &m[rg], -1.0);
                } else {
                    m_out.clear();
                }
                (&s_out[..], &m_out[..])
            }
        }
    }

    /// Rows `first..first + count` dequantized into `out` (row-major `[count, cols]`):
    /// `code * scale + min` per element, bit for bit ggml's `dequantize_row_*` for the formats
    /// kept exactly (see the file readers).
    ///
    /// # Panics
    /// When the rows are out of range or `out` is shorter than `count * cols` (callers' bugs).
    pub fn dequantize_rows_into(&self, first: usize, count: usize, out: &mut [f32]) {
        assert!(first + count <= self.rows && out.len() >= count * self.cols, "rows {first}+{count} of {}", self.rows);
        let blocks = self.cols / BLOCK;
        let mut buf = (Vec::new(), Vec::new());
        for (i, row) in out.chunks_exact_mut(self.cols).take(count).enumerate() {
            let r = first + i;
            let (s, m) = match &self.scales {
                // the file's zero mins as they are (their signs)
                Scales::Flat { scale, min } => (&scale[r * blocks..][..blocks], &min[r * blocks..][..blocks]),
                Scales::Super { .. } => self.row_scales(r, &mut buf),
            };
            simd::dequantize_row(self.codes, self.row_codes(r), s, m, row);
        }
    }

    /// The rows `ids` dequantized, row-major `[ids.len(), cols]` (an embedding lookup on the
    /// codes). `None` when an id is out of range.
    pub fn gather_rows(&self, ids: &[usize]) -> Option<Vec<f32>> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(self.cols.max(1))) {
            if id >= self.rows {
                return None;
            }
            self.dequantize_rows_into(id, 1, o);
        }
        Some(out)
    }

    /// The matrix dequantized, row-major `[rows, cols]` (tests and references).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows_into(0, self.rows, &mut out);
        out
    }
}

/// The 6-bit packing this CPU's kernels read faster: [`QuantCodes::Sixes`] where the AVX-512
/// kernels for it run (VNNI and VBMI for int8 activations; F for f32), [`QuantCodes::SixPairs`]
/// elsewhere (AVX2 kernels, or plain loops).
fn six_packing() -> QuantCodes {
    if int8::avx512_sixes() {
        QuantCodes::Sixes
    } else {
        QuantCodes::SixPairs
    }
}

/// Element `i` of a row of 6-bit codes `q` packed as `kind` ([`QuantCodes::Sixes`] or
/// [`QuantCodes::SixPairs`]), as stored: `code + 32` (`0..=63`). The tests' reference, bit by
/// bit from each packing's description.
#[cfg(test)]
fn six_biased(kind: QuantCodes, q: &[u8], i: usize) -> i32 {
    if kind == QuantCodes::SixPairs {
        let (p, j) = (&q[48 * (i / 64)..][..48], i % 64);
        let lo = if j < 32 { p[j] & 15 } else { p[j - 32] >> 4 };
        (lo | ((p[32 + j % 16] >> (2 * (j / 16))) & 3) << 4) as i32
    } else {
        let (b, j) = (&q[24 * (i / 32)..][..24], i % 32);
        let lo = if j < 16 { b[j] & 15 } else { b[j - 16] >> 4 } as i32;
        let w = 16 + 4 * (j / 16);
        let word = u32::from_le_bytes([b[w], b[w + 1], b[w + 2], b[w + 3]]);
        lo | (((word >> (2 * (j % 16))) & 3) as i32) << 4
    }
}

/// The 64 codes of 48 bytes of a row of 6-bit codes packed as `kind` (two blocks of
/// [`QuantCodes::Sixes`], one pair of [`QuantCodes::SixPairs`]), as stored (`code + 32`): the
/// plain int8 loops unpack them so, once per 64.
#[inline(always)]
fn six_biased_64(kind: QuantCodes, q: &[u8]) -> [u8; 64] {
    let mut u = [0u8; 64];
    if kind == QuantCodes::SixPairs {
        for k in 0..4 {
            for t in 0..16 {
                let n = q[16 * (k % 2) + t];
                u[16 * k + t] = if k < 2 { n & 15 } else { n >> 4 } | ((q[32 + t] >> (2 * k)) & 3) << 4;
            }
        }
    } else {
        for (b, q) in q.chunks_exact(24).enumerate() {
            for half in 0..2 {
                let word = u32::from_le_bytes([q[16 + 4 * half], q[17 + 4 * half], q[18 + 4 * half], q[19 + 4 * half]]);
                for i in 0..16 {
                    let lo = if half == 0 { q[i] & 15 } else { q[i] >> 4 };
                    u[32 * b + 16 * half + i] = lo | (((word >> (2 * i)) & 3) as u8) << 4;
                }
            }
        }
    }
    u
}

/// Codes `-32..=31` in the [`QuantCodes::SixPairs`] layout (a multiple of 64 of them).
fn pack_six_pairs(codes: &[i8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(codes.len() / 64 * 48);
    for p in codes.chunks_exact(2 * BLOCK) {
        let u: [u8; 64] = std::array::from_fn(|j| (p[j] as i32 + 32) as u8);
        out.extend((0..32).map(|j| u[j] & 15 | (u[j + 32] & 15) << 4));
        out.extend((0..16).map(|t| (0..4).fold(0u8, |h, k| h | (u[t + 16 * k] >> 4) << (2 * k))));
    }
    out
}

/// Codes `-32..=31` in the [`QuantCodes::Sixes`] layout.
fn pack_sixes(codes: &[i8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(codes.len() / BLOCK * 24);
    for b in codes.chunks_exact(BLOCK) {
        let u: [u32; BLOCK] = std::array::from_fn(|j| (b[j] as i32 + 32) as u32);
        out.extend((0..16).map(|j| (u[j] & 15 | (u[j + 16] & 15) << 4) as u8));
        for half in 0..2 {
            let word = (0..16).fold(0u32, |w, i| w | (u[16 * half + i] >> 4) << (2 * i));
            out.extend_from_slice(&word.to_le_bytes());
        }
    }
    out
}

/// Codes as nibbles when all lie in `0..=15` (and `bytes` is false), else as bytes.
fn pack(codes: &[i8], bytes: bool) -> (QuantCodes, Vec<u8>) {
    if !bytes && codes.iter().all(|&c| (0..16).contains(&c)) {
        let packed = codes.chunks_exact(BLOCK).flat_map(|b| (0..16).map(move |j| b[j] as u8 | (b[j + 16] as u8) << 4)).collect();
        (QuantCodes::Nibbles, packed)
    } else {
        (QuantCodes::Bytes, codes.iter().map(|&c| c as u8).collect())
    }
}

/// Output rows per rayon task.
const ROWS_PER_TASK: usize = 64;

/// `y = x [W_1; W_2; ...]^T` for `n` rows of `x` (row-major `[n, cols]`) and matrices that all
/// have `cols` columns (a fused Q/K/V or gate/up projection): returns `[n, sum of rows]`
/// row-major, the outputs of `ws[0]` first: `sum_b scale_b (codes_b . x_b) + sum_b min_b xsum_b`
/// per output, the product by the dequantized weights up to f32 rounding ([`Activations::F32`];
/// with [`Activations::Int8`] the products of `x` rounded to int8). Output rows
/// are split over the rayon pool, one dispatch for all the matrices. With int8 activations and
/// several rows of `x` (a batched decode step, an int8 prefill chunk) the AVX2 `Q4_K` / `Q6_K`
/// kernels unpack each weight row's codes once for 4 rows of `x` (`int8::rows_with`).
///
/// # Panics
/// When `x.len() != n * cols` of some matrix (a caller's shape bug, not user input).
pub fn matvec(x: &[f32], n: usize, ws: &[&QuantMatrix], act: Activations) -> Vec<f32> {
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
    // the rows of x rounded to int8, once for every matrix that takes them
    let cols = ws.first().map_or(0, |w| w.cols);
    let rounded: Vec<int8::Row> = if act == Activations::Int8 && ws.iter().any(|w| int8::supports(w)) {
        // (rows of a prefill chunk in parallel; a decode step's few alone)
        if n > MATVEC_MAX_ROWS { x.par_chunks_exact(cols).map(int8::Row::new).collect() } else { x.chunks_exact(cols).map(int8::Row::new).collect() }
    } else {
        Vec::new()
    };
    if n > 1 && !rounded.is_empty() && ws.iter().all(|w| int8::supports(w)) {
        // many rows (a prefill chunk): each task writes its outputs of every row in place
        let mut out = vec![0f32; total * n];
        let dst = SharedOut(out.as_mut_ptr());
        let dst = &dst;
        // each matrix's first output
        let starts: Vec<usize> = ws.iter().scan(0, |next, w| Some(std::mem::replace(next, *next + w.rows))).collect();
        tasks.into_par_iter().for_each(|(i, first, len)| {
            let col = starts[i] + first;
            int8::rows_with(ws[i], first, len, &rounded, |r, k, v| {
                assert!(r < len && k < n, "rows_with hands out its own rows and columns");
                // SAFETY: r < len and k < n (checked): inside `out`, in this task's columns.
                unsafe { *dst.0.add(k * total + col + r) = v }
            });
        });
        return out;
    }
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
    parts.into_par_iter().for_each(|(w, first, out)| {
        if !rounded.is_empty() && int8::supports(w) {
            int8::rows_into(w, first, &rounded, out)
        } else {
            rows_into(x, &xsum, n, w, first, out)
        }
    });
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

/// Products of at most this many rows of `x` go through [`matvec`] (a decode step, a batched
/// decode step of up to 32 sequences: every row's result is then the one it gets alone), longer
/// ones (prefill chunks) through [`matmul`] (with [`Activations::Int8`] and int8 kernels for every
/// matrix, [`matvec`] too: [`linear`]).
pub const MATVEC_MAX_ROWS: usize = 32;

/// `x [W_1; W_2; ...]^T` for `n` rows of `x`: [`matvec`] up to [`MATVEC_MAX_ROWS`] rows (with
/// `act`), [`matmul`] above; with [`Activations::Int8`] [`matvec`] for any number of rows when
/// every matrix has int8 kernels (each row's products then those it gets alone).
///
/// # Panics
/// As [`matvec`].
pub fn linear(x: &[f32], n: usize, ws: &[&QuantMatrix], act: Activations) -> Vec<f32> {
    if n <= MATVEC_MAX_ROWS || (act == Activations::Int8 && ws.iter().all(|w| int8::supports(w))) {
        matvec(x, n, ws, act)
    } else {
        matmul(x, n, ws)
    }
}

/// Weight rows dequantized per task of [`matmul`].
const TILE_ROWS: usize = 256;

/// `y = x [W_1; W_2; ...]^T` as [`matvec`], for many rows of `x` (a prefill chunk, bound by
/// arithmetic rather than by the bytes of weights): each task dequantizes a tile of
/// [`TILE_ROWS`] weight rows into f32 (the values of [`QuantMatrix::dequantize`], exactly) and
/// multiplies the `n` rows of `x` by it with the `gemm` crate's f32 kernel (its packing and
/// register blocking), writing its columns of `y`; tiles are split over the rayon pool. The
/// process never holds more than one tile per thread of dense weights (llama.cpp instead
/// quantizes `x` to 8 bits and multiplies codes by codes, which changes the numbers; this keeps
/// the f32 product of the dequantized weights, so logits match the dense path's up to the
/// GEMM's order of sums).
///
/// # Panics
/// As [`matvec`].
pub fn matmul(x: &[f32], n: usize, ws: &[&QuantMatrix]) -> Vec<f32> {
    for w in ws {
        assert_eq!(x.len(), n * w.cols, "x is [n, cols]");
    }
    let total: usize = ws.iter().map(|w| w.rows).sum();
    if n == 0 || total == 0 {
        return vec![0f32; n * total];
    }
    let mut tasks = Vec::new();
    let mut col = 0;
    for w in ws {
        for r in (0..w.rows).step_by(TILE_ROWS) {
            tasks.push((*w, r, TILE_ROWS.min(w.rows - r), col + r));
        }
        col += w.rows;
    }
    let mut out = vec![0f32; n * total];
    let dst = SharedOut(out.as_mut_ptr());
    let dst = &dst;
    tasks.into_par_iter().for_each(|(w, first, len, col)| {
        TILE.with_borrow_mut(|tile| {
            tile.resize(len * w.cols, 0.0);
            w.dequantize_rows_into(first, len, tile);
            // lhs x [n, cols] row-major; rhs tile^T [cols, len] (tile row-major [len, cols]);
            // dst y[:, col..col + len] with row stride `total`
            // SAFETY: the pointers are valid for these extents and strides; columns
            // `col..col + len` of every row are this task's alone.
            unsafe {
                gemm::gemm(
                    n,
                    len,
                    w.cols,
                    dst.0.add(col),
                    1,
                    total as isize,
                    false,
                    x.as_ptr(),
                    1,
                    w.cols as isize,
                    tile.as_ptr(),
                    w.cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            // a model with very wide rows: do not keep more than TILE_KEEP per thread
            if tile.capacity() * 4 > TILE_KEEP {
                *tile = Vec::new();
            }
        });
    });
    out
}

/// An output's base pointer, shared by the tasks of [`matmul`] and [`matvec`], each of which
/// writes only its own outputs (columns of `[tokens, outputs]`).
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint elements (above); the buffer outlives them (a rayon scope).
unsafe impl Sync for SharedOut {}

/// Bytes of a [`matmul`] tile kept per thread between calls (larger ones are freed after use).
const TILE_KEEP: usize = 32 << 20;

thread_local! {
    /// [`matmul`]'s dequantized tile per thread (at most [`TILE_ROWS`] x the widest row: 9.2 MB
    /// for an 8,960-wide down projection), reused across calls.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows `first..first + out.len() / n` of `w` times the `n` rows of `x`, into `out` (`[rows, n]`).
fn rows_into(x: &[f32], xsum: &[f32], n: usize, w: &QuantMatrix, first: usize, out: &mut [f32]) {
    let blocks = w.cols / BLOCK;
    let mut buf = (Vec::new(), Vec::new());
    for (i, o) in out.chunks_exact_mut(n.max(1)).enumerate() {
        let r = first + i;
        let q = w.row_codes(r);
        let (s, m) = w.row_scales(r, &mut buf);
        // rows of `x` eight at a time: each block's codes widened once for the eight (a batched
        // decode step); every row's sums in the order of the one-row kernel, so a row's product
        // does not depend on the rows beside it
        let mut k = 0;
        while k + ROWS_AT_ONCE <= o.len() {
            let xr: [&[f32]; ROWS_AT_ONCE] = std::array::from_fn(|j| &x[(k + j) * w.cols..][..w.cols]);
            let xs: [&[f32]; ROWS_AT_ONCE] = std::array::from_fn(|j| &xsum[(k + j) * blocks..][..blocks]);
            let dots = match w.codes {
                QuantCodes::Nibbles => simd::dot_nibbles_rows(q, s, m, xs, xr),
                QuantCodes::Bytes => simd::dot_bytes_rows(q, s, m, xs, xr),
                QuantCodes::Sixes | QuantCodes::SixPairs => simd::dot_sixes_rows(w.codes, q, s, xr),
            };
            o[k..k + ROWS_AT_ONCE].copy_from_slice(&dots);
            k += ROWS_AT_ONCE;
        }
        for (k, o) in o.iter_mut().enumerate().skip(k) {
            let (xr, xs) = (&x[k * w.cols..][..w.cols], &xsum[k * blocks..][..blocks]);
            *o = match w.codes {
                QuantCodes::Nibbles => simd::dot_nibbles(q, s, m, xs, xr),
                QuantCodes::Bytes => simd::dot_bytes(q, s, m, xs, xr),
                QuantCodes::Sixes | QuantCodes::SixPairs => simd::dot_sixes_rows(w.codes, q, s, [xr])[0],
            };
        }
    }
}

/// Rows of `x` multiplied together by one weight row ([`simd::dot_nibbles_rows`]).
const ROWS_AT_ONCE: usize = 8;

mod simd {
    use super::{QuantCodes, BLOCK};

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
        #[cfg(target_arch = "x86_64")]
        if avx2::has() {
            // SAFETY: the CPU has AVX2 and FMA; the lengths are checked above.
            return unsafe { avx2::dot_nibbles_rows(q, s, [x]) }[0] + mins(m, xs);
        }
        generic_nibbles(q, s, x) + mins(m, xs)
    }

    // CPUs without AVX2 run the plain bodies (`generic_*`); they were also compiled for AVX2 and
    // chosen at run time until the explicit `avx2` kernels (the compiler did not vectorize the
    // nibbles well: Qwen2.5-Coder-1.5B decoded at 0.95 tokens/s on a 2-core Zen 3, 6.60 with them)

    super::super::host::simd::dispatch!(expand_scales, expand_scales_body, (out: &mut [f32], d: &[f32], q: &[i8], sign: f32) -> ());

    /// A K-quant row's group scales (or mins): `out[g] = sign * d[s] * q[g]` for group `g` of
    /// super-block `s` (`q.len() / d.len()` groups each: 8 for `Q4_K`, 16 for `Q6_K`);
    /// `sign` 1 or -1 (exactly ggml's `-(dmin * m)`: a sign flip is exact).
    #[inline(always)]
    fn expand_scales_body(out: &mut [f32], d: &[f32], q: &[i8], sign: f32) {
        #[inline(always)]
        fn per<const P: usize>(out: &mut [f32], d: &[f32], q: &[i8], sign: f32) {
            for ((o, q), &d) in out.chunks_exact_mut(P).zip(q.chunks_exact(P)).zip(d) {
                let ds = sign * d;
                for j in 0..P {
                    o[j] = ds * q[j] as f32;
                }
            }
        }
        match q.len() / d.len().max(1) {
            8 => per::<8>(out, d, q, sign),
            16 => per::<16>(out, d, q, sign),
            p => {
                for (g, (o, &q)) in out.iter_mut().zip(q).enumerate() {
                    *o = sign * d[g / p.max(1)] * q as f32;
                }
            }
        }
    }

    super::super::host::simd::dispatch!(dequantize_row, dequantize_row_body, (kind: QuantCodes, q: &[u8], s: &[f32], m: &[f32], out: &mut [f32]) -> ());

    /// One row of codes `q` dequantized into `out` (`cols` values): `code * scale + min` per
    /// element with its group's scale `s` and min `m` (empty: no mins, `-0.0` added, which
    /// changes nothing). Each block's loop has a fixed length, so the compiler vectorizes it
    /// (prefill dequantizes every weight once per chunk: [`super::matmul`]).
    #[inline(always)]
    fn dequantize_row_body(kind: QuantCodes, q: &[u8], s: &[f32], m: &[f32], out: &mut [f32]) {
        if kind == QuantCodes::SixPairs {
            for (p, (o, q)) in out.chunks_exact_mut(2 * BLOCK).zip(q.chunks_exact(48)).enumerate() {
                let u = super::six_biased_64(kind, q);
                // group 4 p + k: elements 16 k .. 16 k + 16
                for (k, (o, u)) in o.chunks_exact_mut(16).zip(u.chunks_exact(16)).enumerate() {
                    let sk = s[4 * p + k];
                    for t in 0..16 {
                        o[t] = (u[t] as i32 - 32) as f32 * sk + -0.0;
                    }
                }
            }
            return;
        }
        let per_block = kind.bytes_per_block();
        for (b, (o, q)) in out.chunks_exact_mut(BLOCK).zip(q.chunks_exact(per_block)).enumerate() {
            let o: &mut [f32; BLOCK] = o.try_into().expect("blocks of 32");
            match kind {
                QuantCodes::Nibbles | QuantCodes::Bytes => {
                    let (sb, mb) = (s[b], if m.is_empty() { -0.0 } else { m[b] });
                    if kind == QuantCodes::Nibbles {
                        for j in 0..16 {
                            o[j] = (q[j] & 15) as f32 * sb + mb;
                            o[j + 16] = (q[j] >> 4) as f32 * sb + mb;
                        }
                    } else {
                        for j in 0..BLOCK {
                            o[j] = q[j] as i8 as f32 * sb + mb;
                        }
                    }
                }
                QuantCodes::SixPairs => unreachable!("pairs of blocks above"),
                QuantCodes::Sixes => {
                    let words = [u32::from_le_bytes([q[16], q[17], q[18], q[19]]), u32::from_le_bytes([q[20], q[21], q[22], q[23]])];
                    for half in 0..2 {
                        let sh = s[2 * b + half];
                        for i in 0..16 {
                            let lo = if half == 0 { q[i] & 15 } else { q[i] >> 4 } as i32;
                            let code = (lo | (((words[half] >> (2 * i)) & 3) as i32) << 4) - 32;
                            o[16 * half + i] = code as f32 * sh + -0.0;
                        }
                    }
                }
            }
        }
    }

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
        #[cfg(target_arch = "x86_64")]
        if avx2::has() {
            // SAFETY: as above.
            return unsafe { avx2::dot_bytes_rows(q, s, [x]) }[0] + mins(m, xs);
        }
        generic_bytes(q, s, x) + mins(m, xs)
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
        #[cfg(target_arch = "x86_64")]
        if avx2::has() {
            // SAFETY: the CPU has AVX2 and FMA; the lengths are checked above.
            let dots = unsafe { avx2::dot_nibbles_rows(q, s, x) };
            return std::array::from_fn(|r| dots[r] + mins(m, xs[r]));
        }
        std::array::from_fn(|r| generic_nibbles(q, s, x[r]) + mins(m, xs[r]))
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
        #[cfg(target_arch = "x86_64")]
        if avx2::has() {
            // SAFETY: as above.
            let dots = unsafe { avx2::dot_bytes_rows(q, s, x) };
            return std::array::from_fn(|r| dots[r] + mins(m, xs[r]));
        }
        std::array::from_fn(|r| generic_bytes(q, s, x[r]) + mins(m, xs[r]))
    }

    /// One row of 6-bit codes packed as `kind` ([`QuantCodes::Sixes`] or
    /// [`QuantCodes::SixPairs`]; one scale per 16 elements: `s` has two a block, no mins) times
    /// `R` rows of `x`: `sum_g s_g (codes_g . x_g)`, each code unpacked once for all `R` (and by
    /// the `Sixes` and plain kernels scaled to the dequantized weight, exactly; the AVX2
    /// `SixPairs` kernel scales each group's product); a row's result does not depend on the
    /// others.
    pub fn dot_sixes_rows<const R: usize>(kind: QuantCodes, q: &[u8], s: &[f32], x: [&[f32]; R]) -> [f32; R] {
        let n = s.len() / 2;
        let pairs = kind == QuantCodes::SixPairs;
        assert!(s.len() % if pairs { 4 } else { 2 } == 0 && q.len() >= n * 24 && x.iter().all(|x| x.len() >= n * 32), "6-bit row lengths");
        #[cfg(target_arch = "x86_64")]
        if !pairs && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the lengths are checked above.
            return unsafe { avx512_6::dot_sixes_rows(q, s, x) };
        }
        #[cfg(target_arch = "x86_64")]
        if pairs && avx2::has() {
            // SAFETY: the CPU has AVX2 and FMA; the lengths are checked above.
            return unsafe { avx2::dot_six_pairs_rows(q, s, x) };
        }
        std::array::from_fn(|r| generic_sixes(kind, q, s, x[r]))
    }

    /// [`dot_sixes_rows`] for one row without explicit SIMD (CPUs without AVX2, and packings
    /// the CPU has no kernel for: tests): each block (`Sixes`) or pair of blocks (`SixPairs`)
    /// unpacked into weights with fixed-length loops (the compiler vectorizes them), then
    /// multiplied into 16 lanes.
    #[inline(always)]
    pub(super) fn generic_sixes(kind: QuantCodes, q: &[u8], s: &[f32], x: &[f32]) -> f32 {
        let blocks = if kind == QuantCodes::SixPairs { 2 } else { 1 };
        let mut acc = [0f32; 16];
        let mut w = [0f32; 2 * BLOCK];
        let w = &mut w[..BLOCK * blocks];
        for (b, (qb, xb)) in q.chunks_exact(24 * blocks).zip(x.chunks_exact(BLOCK * blocks)).take(s.len() / (2 * blocks)).enumerate() {
            dequantize_row_body(kind, qb, &s[2 * blocks * b..][..2 * blocks], &[], w);
            for (w, xb) in w.chunks_exact(BLOCK).zip(xb.chunks_exact(BLOCK)) {
                for j in 0..16 {
                    acc[j] += w[j] * xb[j] + w[j + 16] * xb[j + 16];
                }
            }
        }
        sum_lanes(&acc)
    }

    /// [`dot_bytes`] without the mins and explicit SIMD.
    #[inline(always)]
    pub(super) fn generic_bytes(q: &[u8], s: &[f32], x: &[f32]) -> f32 {
        generic(q, s, x, 32, |q, j| q[j] as i8 as f32)
    }

    super::super::host::simd::dispatch!(mins, mins_body, (m: &[f32], xs: &[f32]) -> f32);

    /// `sum_b m_b xs_b` on 16 lanes (vectorized where the CPU allows: a `Q4_K` row of 1,536
    /// weights has 48 of them, a tenth of its kernel's work when summed one by one); 0 for no
    /// mins.
    #[inline(always)]
    fn mins_body(m: &[f32], xs: &[f32]) -> f32 {
        let n = m.len().min(xs.len());
        let (mc, xc) = (m[..n].chunks_exact(16), xs[..n].chunks_exact(16));
        let tail: f32 = mc.remainder().iter().zip(xc.remainder()).map(|(a, b)| a * b).sum();
        let mut acc = [0f32; 16];
        for (a, b) in mc.zip(xc) {
            for j in 0..16 {
                acc[j] += a[j] * b[j];
            }
        }
        sum_lanes(&acc) + tail
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

        /// Bytes ahead of the codes being read that [`prefetch`] asks for: a core alone keeps
        /// too few cache misses in flight to stream the codes at the memory's bandwidth (decode
        /// stalled on the loads of codes without it). Qwen2.5-Coder-1.5B Q4_K_M decode on a
        /// 2-core Intel Xeon (model 207): 10.4 tokens/s without, 10.9-11.4 at 512 bytes,
        /// 11.7-12.2 at 1 KB, 11.7-12.5 at 2 KB, 12.4-12.8 at 4 KB.
        pub(super) const PREFETCH: usize = 4096;

        /// Asks for the cache line at `p` (a hint: never faults, even past the end).
        #[inline(always)]
        pub(super) fn prefetch(p: *const u8) {
            // SAFETY: prefetching is a hint without architectural effect on any address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
        }

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
                    if b % 4 == 0 {
                        prefetch(qp.wrapping_add(16 * b + PREFETCH));
                    }
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
                    if b % 2 == 0 {
                        prefetch(qp.wrapping_add(32 * b + PREFETCH));
                    }
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
                if b % 4 == 0 {
                    prefetch(qp.wrapping_add(16 * b + PREFETCH));
                }
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
                if b % 2 == 0 {
                    prefetch(qp.wrapping_add(32 * b + PREFETCH));
                }
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

    /// Explicit AVX2 + FMA kernels (CPUs without AVX-512: AMD Zen 2 / Zen 3, Intel desktop
    /// cores): a block's 32 codes widened to four vectors of 8 f32, multiplied by `x` in one
    /// chain per block, the blocks' sums scaled into two accumulators per row. The plain loops
    /// compiled for AVX2 (`plain_nibbles` then) ran a 2-core AMD EPYC (Zen 3) decode of
    /// Qwen2.5-Coder-1.5B at 0.95 tokens/s (these kernels: 6.60, back to back): the per-element
    /// code closure did not vectorize.
    #[cfg(target_arch = "x86_64")]
    pub(super) mod avx2 {
        use std::arch::x86_64::*;

        /// AVX2 and FMA (every x86-64 CPU of the last decade: AMD Zen, Intel since Haswell);
        /// also what the int8 kernels' AVX2 variants need.
        pub fn has() -> bool {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }

        /// Bytes of codes prefetched ahead (as [`super::avx512::PREFETCH`]; also the int8
        /// kernels').
        pub(in crate::kernels::quant) const PREFETCH: usize = 4096;

        /// The sum of 8 f32 lanes.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub(in crate::kernels::quant) fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }

        /// 8 bytes at `p` zero- (`signed` false) or sign-extended to 8 i32 lanes.
        ///
        /// # Safety
        /// 8 bytes at `p`.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn widen8(p: *const u8, signed: bool) -> __m256i {
            // SAFETY: the caller's 8 bytes.
            let v = unsafe { _mm_loadl_epi64(p as *const __m128i) };
            if signed {
                _mm256_cvtepi8_epi32(v)
            } else {
                _mm256_cvtepu8_epi32(v)
            }
        }

        /// `R` rows of `x` times one weight row: `widen(b)` gives block `b`'s 32 codes as four
        /// vectors of 8 f32 (elements `8 k..8 k + 8` in vector `k`), read once for every row;
        /// per row the block's product `c . x_b` is scaled by `s_b` into one of two accumulators
        /// (even and odd blocks), so every row gets the same operations in the same order as
        /// when alone (`R = 1`).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn scaled_sum_rows<const R: usize>(s: &[f32], x: [&[f32]; R], widen: impl Fn(usize) -> [__m256; 4]) -> [f32; R] {
            let (mut a0, mut a1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
            let block = |c: &[__m256; 4], x: &[f32], b: usize| {
                // SAFETY: b < s.len() and x.len() >= 32 s.len() (the callers' contract).
                unsafe {
                    let p = x.as_ptr().add(32 * b);
                    let t = _mm256_mul_ps(c[0], _mm256_loadu_ps(p));
                    let t = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(p.add(8)), t);
                    let t = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(p.add(16)), t);
                    _mm256_fmadd_ps(c[3], _mm256_loadu_ps(p.add(24)), t)
                }
            };
            for b in 0..s.len() {
                let c = widen(b);
                let sb = _mm256_set1_ps(s[b]);
                for r in 0..R {
                    if b % 2 == 0 {
                        a0[r] = _mm256_fmadd_ps(sb, block(&c, x[r], b), a0[r]);
                    } else {
                        a1[r] = _mm256_fmadd_ps(sb, block(&c, x[r], b), a1[r]);
                    }
                }
            }
            std::array::from_fn(|r| hsum(_mm256_add_ps(a0[r], a1[r])))
        }

        /// [`super::dot_nibbles_rows`] without the mins.
        ///
        /// # Safety
        /// [`has`]; `q.len() >= 16 s.len()`, every `x[r].len() >= 32 s.len()`.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn dot_nibbles_rows<const R: usize>(q: &[u8], s: &[f32], x: [&[f32]; R]) -> [f32; R] {
            let mask = _mm256_set1_epi32(15);
            let qp = q.as_ptr();
            scaled_sum_rows(s, x, |b| {
                if b % 4 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(qp.wrapping_add(16 * b + PREFETCH) as *const i8);
                }
                // SAFETY: b < s.len(), so 16 bytes at 16 b are in bounds.
                let (w0, w1) = unsafe { (widen8(qp.add(16 * b), false), widen8(qp.add(16 * b + 8), false)) };
                [
                    _mm256_cvtepi32_ps(_mm256_and_si256(w0, mask)),
                    _mm256_cvtepi32_ps(_mm256_and_si256(w1, mask)),
                    _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(w0)),
                    _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(w1)),
                ]
            })
        }

        /// [`super::dot_bytes_rows`] without the mins.
        ///
        /// # Safety
        /// [`has`]; `q.len() >= 32 s.len()`, every `x[r].len() >= 32 s.len()`.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn dot_bytes_rows<const R: usize>(q: &[u8], s: &[f32], x: [&[f32]; R]) -> [f32; R] {
            let qp = q.as_ptr();
            scaled_sum_rows(s, x, |b| {
                if b % 2 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(qp.wrapping_add(32 * b + PREFETCH) as *const i8);
                }
                // SAFETY: b < s.len(), so 32 bytes at 32 b are in bounds.
                std::array::from_fn(|k| _mm256_cvtepi32_ps(unsafe { widen8(qp.add(32 * b + 8 * k), true) }))
            })
        }

        /// A [`crate::kernels::quant::QuantCodes::SixPairs`] pair's 64 codes plus 32 (`0..=63`) as bytes in order,
        /// elements `0..32` in the first vector and `32..64` in the second: the nibbles masked
        /// (or shifted and masked), the high bits' 16 bytes in both 128-bit lanes, the second
        /// lane's 64-bit halves shifted right by 2 (elements `t + 16`, `t + 48` there), each
        /// field moved to bits 4..6 and masked. 11 instructions for 64 codes.
        ///
        /// # Safety
        /// [`has`]; 48 bytes at `p`.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub(in crate::kernels::quant) unsafe fn six_pair_codes(p: *const u8) -> [__m256i; 2] {
            let (mask, high) = (_mm256_set1_epi8(15), _mm256_set1_epi8(48));
            // SAFETY: the caller's 48 bytes.
            let (n, h) = unsafe { (_mm256_loadu_si256(p as *const __m256i), _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(32) as *const __m128i))) };
            // bits a byte's right neighbour shifts in (and any the 16-bit shifts move across a
            // byte) land outside bits 4..6 and are masked off
            let h = _mm256_srlv_epi64(h, _mm256_setr_epi64x(0, 0, 2, 2));
            let first = _mm256_or_si256(_mm256_and_si256(n, mask), _mm256_and_si256(_mm256_slli_epi16::<4>(h), high));
            let last = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(n), mask), _mm256_and_si256(h, high));
            [first, last]
        }

        /// [`super::dot_sixes_rows`] for [`crate::kernels::quant::QuantCodes::SixPairs`]: per pair
        /// of blocks the 64 codes unpacked as bytes ([`six_pair_codes`]), 32 subtracted, widened
        /// 8 at a time to f32; per row each group of 16 codes multiplied by `x` in one chain,
        /// then scaled by the group's scale into one of two accumulators (first and last 16 of
        /// each block), as the 4-bit kernels scale per block (the `Sixes` kernels scale every
        /// code: 4 FMAs more a block).
        ///
        /// # Safety
        /// [`has`]; `s.len()` a multiple of 4, `q.len() >= 12 s.len()`, every
        /// `x[r].len() >= 16 s.len()`.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn dot_six_pairs_rows<const R: usize>(q: &[u8], s: &[f32], x: [&[f32]; R]) -> [f32; R] {
            let (mut a0, mut a1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
            let (qp, bias) = (q.as_ptr(), _mm256_set1_epi8(32));
            for p in 0..s.len() / 4 {
                // SAFETY: p < s.len() / 4: 48 bytes of codes and 64 floats of each row at p.
                unsafe {
                    let base = qp.add(48 * p);
                    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH) as *const i8);
                    for (h, c) in six_pair_codes(base).into_iter().enumerate() {
                        let b = 2 * p + h;
                        let c = _mm256_sub_epi8(c, bias);
                        let (lo, hi) = (_mm256_castsi256_si128(c), _mm256_extracti128_si256::<1>(c));
                        let w = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                        let c = [w(lo), w(_mm_srli_si128::<8>(lo)), w(hi), w(_mm_srli_si128::<8>(hi))];
                        let (s0, s1) = (_mm256_set1_ps(s[2 * b]), _mm256_set1_ps(s[2 * b + 1]));
                        for r in 0..R {
                            let xp = x[r].as_ptr().add(32 * b);
                            let d0 = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(xp.add(8)), _mm256_mul_ps(c[0], _mm256_loadu_ps(xp)));
                            let d1 = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(xp.add(24)), _mm256_mul_ps(c[2], _mm256_loadu_ps(xp.add(16))));
                            a0[r] = _mm256_fmadd_ps(d0, s0, a0[r]);
                            a1[r] = _mm256_fmadd_ps(d1, s1, a1[r]);
                        }
                    }
                }
            }
            std::array::from_fn(|r| hsum(_mm256_add_ps(a0[r], a1[r])))
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx512_6 {
        use std::arch::x86_64::*;

        /// [`super::dot_sixes_rows`] on AVX-512: per block the 32 codes unpacked (low nibbles
        /// widened, high 2-bit fields shifted out of their broadcast word lane by lane), scaled
        /// once, then multiplied into two accumulators per row.
        ///
        /// # Safety
        /// AVX-512F; `s.len()` even, `q.len() >= 12 s.len()`, every `x[r].len() >= 16 s.len()`.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn dot_sixes_rows<const R: usize>(q: &[u8], s: &[f32], x: [&[f32]; R]) -> [f32; R] {
            let (mut a0, mut a1) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
            let qp = q.as_ptr();
            let (fifteen, three, bias) = (_mm512_set1_epi32(15), _mm512_set1_epi32(3), _mm512_set1_epi32(32));
            let shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            for b in 0..s.len() / 2 {
                // SAFETY: b < s.len() / 2: 24 bytes of codes and 32 floats of each row at b.
                unsafe {
                    let p = qp.add(24 * b);
                    if b % 2 == 0 {
                        super::avx512::prefetch(p.wrapping_add(super::avx512::PREFETCH));
                    }
                    let w = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                    let h0 = _mm512_set1_epi32((p.add(16) as *const i32).read_unaligned());
                    let h1 = _mm512_set1_epi32((p.add(20) as *const i32).read_unaligned());
                    let hi_bits = |h: __m512i| _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srlv_epi32(h, shifts), three));
                    let c0 = _mm512_sub_epi32(_mm512_or_si512(_mm512_and_si512(w, fifteen), hi_bits(h0)), bias);
                    let c1 = _mm512_sub_epi32(_mm512_or_si512(_mm512_srli_epi32::<4>(w), hi_bits(h1)), bias);
                    let lo = _mm512_mul_ps(_mm512_cvtepi32_ps(c0), _mm512_set1_ps(s[2 * b]));
                    let hi = _mm512_mul_ps(_mm512_cvtepi32_ps(c1), _mm512_set1_ps(s[2 * b + 1]));
                    for r in 0..R {
                        let xp = x[r].as_ptr();
                        a0[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp.add(32 * b)), a0[r]);
                        a1[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(32 * b + 16)), a1[r]);
                    }
                }
            }
            std::array::from_fn(|r| _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r])))
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
            let y = matvec(&x, n, &[&w], Activations::F32);
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
                    let batch = matvec(&x, n, &[&w], Activations::F32);
                    for k in 0..n {
                        let alone = matvec(&x[k * cols..(k + 1) * cols], 1, &[&w], Activations::F32);
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
            let fused = matvec(&x, n, &[&a, &b, &c], Activations::F32);
            let parts = [matvec(&x, n, &[&a], Activations::F32), matvec(&x, n, &[&b], Activations::F32), matvec(&x, n, &[&c], Activations::F32)];
            for k in 0..n {
                let row: Vec<f32> = [(&parts[0], 70), (&parts[1], 3), (&parts[2], 129)].iter().flat_map(|(p, r)| p[k * r..(k + 1) * r].to_vec()).collect();
                assert_eq!(&fused[k * 202..(k + 1) * 202], &row[..]);
            }
        }
    }

    /// A K-quant matrix (`[rows, 512]`, two super-blocks a row): `Q4_K`-like (nibbles, groups
    /// of 32 with mins) or `Q6_K`-like (6-bit codes, groups of 16, no mins).
    fn k_quant(rows: usize, q6: bool, sixes: QuantCodes) -> QuantMatrix {
        let cols = 512;
        let group = if q6 { 16 } else { 32 };
        let (lo, hi) = if q6 { (-32, 31) } else { (0, 15) };
        let c = codes(rows * cols, lo, hi, rows as u32 + 7);
        let supers = rows * cols / SUPER_BLOCK;
        let groups = rows * cols / group;
        let d: Vec<f32> = (0..supers).map(|i| 0.001 + (i % 5) as f32 * 0.0007).collect();
        let sc: Vec<i8> = (0..groups).map(|g| if q6 { (g % 200) as i8 } else { (g % 64) as i8 }).collect();
        let (dmin, m) = if q6 { (vec![], vec![]) } else { ((0..supers).map(|i| 0.002 + (i % 3) as f32 * 0.001).collect(), (0..groups).map(|g| (g * 7 % 64) as i8).collect()) };
        let w = QuantMatrix::k_quants_packed(rows, cols, &c, group, d.clone(), dmin.clone(), sc.clone(), m.clone(), sixes).unwrap();
        assert_eq!(w.codes(), if q6 { sixes } else { QuantCodes::Nibbles });
        // exactly ggml's `d * sc * q - dmin * m` per element
        let dense = w.dequantize();
        for (i, (&v, &code)) in dense.iter().zip(&c).enumerate() {
            let (g, sb) = (i / group, i / SUPER_BLOCK);
            let want = if q6 { d[sb] * sc[g] as f32 * code as f32 } else { d[sb] * sc[g] as f32 * code as f32 - dmin[sb] * m[g] as f32 };
            assert_eq!(v.to_bits(), want.to_bits(), "element {i}");
        }
        w
    }

    /// `y` within f32 rounding of the f64 product of the dequantized matrices.
    fn assert_product(y: &[f32], x: &[f32], n: usize, ws: &[&QuantMatrix]) {
        let total: usize = ws.iter().map(|w| w.rows()).sum();
        assert_eq!(y.len(), n * total);
        let mut col = 0;
        for w in ws {
            let (dense, cols) = (w.dequantize(), w.cols());
            for k in 0..n {
                for r in 0..w.rows() {
                    let exact: f64 = (0..cols).map(|j| dense[r * cols + j] as f64 * x[k * cols + j] as f64).sum();
                    let scale: f64 = (0..cols).map(|j| (dense[r * cols + j] as f64 * x[k * cols + j] as f64).abs()).sum();
                    let got = y[k * total + col + r] as f64;
                    assert!((got - exact).abs() <= 1e-6 * scale + 1e-9, "row {r} of x {k}: {got} vs {exact}");
                }
            }
            col += w.rows();
        }
    }

    /// K-quant matrices held in their two-level scales: decode kernels (one row, a batch of
    /// rows bit for bit the row alone) and the dequantized-tile GEMM of prefill chunks, beside
    /// flat-scale matrices in one fused call.
    #[test]
    fn k_quants_and_prefill_products_match_the_dequantized_product() {
        for sixes in [QuantCodes::Sixes, QuantCodes::SixPairs] {
            k_quants_and_prefill_products(sixes);
        }
        // the public constructor packs as this CPU's kernels read: the same weights either way
        let c = codes(2 * 512, -32, 31, 5);
        let sc: Vec<i8> = (0..2 * 512 / 16).map(|g| (g % 90) as i8 - 45).collect();
        let made = |sixes| QuantMatrix::k_quants_packed(2, 512, &c, 16, vec![0.01, 0.02, 0.03, 0.04], vec![], sc.clone(), vec![], sixes).unwrap().dequantize();
        let public = QuantMatrix::from_k_quants(2, 512, &c, 16, vec![0.01, 0.02, 0.03, 0.04], vec![], sc.clone(), vec![]).unwrap();
        assert_eq!(public.codes(), six_packing());
        assert_eq!(public.dequantize(), made(QuantCodes::Sixes));
        assert_eq!(public.dequantize(), made(QuantCodes::SixPairs));
    }

    /// [`k_quants_and_prefill_products_match_the_dequantized_product`] with 6-bit codes packed
    /// as `sixes`.
    fn k_quants_and_prefill_products(sixes: QuantCodes) {
        let (q4, q6) = (k_quant(70, false, sixes), k_quant(131, true, sixes));
        let flat = {
            let c = codes(9 * 512, -128, 127, 3);
            QuantMatrix::from_codes(9, 512, &c, vec![0.003; 9 * 16], vec![0.0; 9 * 16]).unwrap()
        };
        let ws = [&q4, &q6, &flat];
        for n in [1, 3, 8, 9, 33, 100] {
            let x: Vec<f32> = (0..n * 512).map(|i| ((i * 7919) % 113) as f32 / 56.0 - 1.0).collect();
            let y = linear(&x, n, &ws, Activations::F32);
            assert_product(&y, &x, n, &ws);
            assert_product(&matmul(&x, n, &ws), &x, n, &ws);
            if n <= MATVEC_MAX_ROWS {
                for k in 0..n {
                    let alone = matvec(&x[k * 512..(k + 1) * 512], 1, &ws, Activations::F32);
                    assert_eq!(&y[k * alone.len()..(k + 1) * alone.len()], &alone[..], "row {k} of {n}");
                }
            }
        }
        // an embedding lookup on the codes
        let rows = q6.gather_rows(&[5, 0, 130]).unwrap();
        let dense = q6.dequantize();
        assert_eq!(&rows[..512], &dense[5 * 512..6 * 512]);
        assert_eq!(&rows[1024..], &dense[130 * 512..131 * 512]);
        assert!(q6.gather_rows(&[131]).is_none());
        // the file's bytes: 4 bits + 8 / 32 + 8 / 256 a weight for Q4_K-like, 6 + 8 / 16 + 4 / 256 for Q6_K-like
        assert_eq!(q4.bytes(), 70 * 512 / 2 + 2 * 70 * 16 + 8 * 70 * 2);
        assert_eq!(q6.bytes(), 131 * 512 * 6 / 8 + 131 * 32 + 4 * 131 * 2);
        // codes outside 6 bits are refused
        assert!(QuantMatrix::from_k_quants(1, 256, &[32; 256], 16, vec![1.0], vec![], vec![1; 16], vec![]).is_err());
    }

    /// The 6-bit kernels with explicit SIMD (where the CPU has them) and the plain ones agree, for
    /// both packings, and the packings round-trip every code (`Sixes` against its own bit
    /// formula, `SixPairs` against ggml's `Q6_K` arrangement of a pair of blocks).
    #[test]
    fn sixes_kernels_agree() {
        for blocks in [2, 4, 10, 16] {
            // codes that differ from pair to pair (37 i alone repeats every 64)
            let c: Vec<i8> = (0..blocks * 32).map(|i| ((i * 37 + i / 64 * 11) % 64) as i8 - 32).collect();
            let s: Vec<f32> = (0..2 * blocks).map(|g| 0.01 * (g as f32 + 1.0)).collect();
            let x: Vec<f32> = (0..blocks * 32).map(|i| (i as f32 * 0.7).cos()).collect();
            for (kind, q) in [(QuantCodes::Sixes, pack_sixes(&c)), (QuantCodes::SixPairs, pack_six_pairs(&c))] {
                assert_eq!(q.len(), 24 * blocks);
                assert_eq!((0..c.len()).map(|i| (six_biased(kind, &q, i) - 32) as i8).collect::<Vec<_>>(), c, "{kind:?}");
                let unpacked: Vec<i8> = q.chunks_exact(48).flat_map(|p| six_biased_64(kind, p)).map(|u| u as i8 - 32).collect();
                assert_eq!(unpacked, c, "{kind:?}, 64 at a time");
                let [v] = simd::dot_sixes_rows(kind, &q, &s, [&x]);
                let g = simd::generic_sixes(kind, &q, &s, &x);
                let exact: f64 = c.iter().enumerate().map(|(i, &c)| c as f64 * s[i / 16] as f64 * x[i] as f64).sum();
                assert!((v - g).abs() <= 1e-5 * (1.0 + g.abs()) && (v as f64 - exact).abs() <= 1e-4, "{kind:?}, {blocks} blocks: {v} vs {g} vs {exact}");
            }
            // ggml's `Q6_K` (dequantize_row_q6_K) per 128 elements: ql[l] low nibbles for l and
            // l + 64 ... ; per pair of blocks here: byte j = elements j, j + 32; byte 32 + t =
            // the high bits of t + 16 k at bits 2 k
            let q = pack_six_pairs(&c);
            for (p, pair) in q.chunks_exact(48).enumerate() {
                for j in 0..64 {
                    let u = (c[64 * p + j] as i32 + 32) as u8;
                    let nib = if j < 32 { pair[j] & 15 } else { pair[j - 32] >> 4 };
                    assert_eq!((nib, (pair[32 + j % 16] >> (2 * (j / 16))) & 3), (u & 15, u >> 4), "pair {p} element {j}");
                }
            }
        }
    }

    /// The AVX2 kernels called directly (on an AVX-512 CPU the dispatch would not pick them)
    /// against the plain ones, one row and 8 rows at once (each of the 8 the bits of its row
    /// alone), on even and odd block counts, for 4-, 8- and 6-bit codes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_agree_with_the_plain_ones() {
        if !simd::avx2::has() {
            eprintln!("skipped: this CPU lacks AVX2/FMA");
            return;
        }
        for blocks in [1, 2, 3, 18, 19] {
            let q: Vec<u8> = (0..blocks * 32).map(|i| (i * 37 % 256) as u8).collect();
            let s: Vec<f32> = (0..blocks).map(|b| 0.01 * (b as f32 + 1.0)).collect();
            let xs: Vec<Vec<f32>> = (0..8).map(|r| (0..blocks * 32).map(|i| (i as f32 * 0.7 + r as f32).cos()).collect()).collect();
            let x8: [&[f32]; 8] = std::array::from_fn(|r| &xs[r][..]);
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
            let q4 = &q[..blocks * 16];
            // SAFETY: AVX2 and FMA checked above; the lengths are the kernels' contract.
            let (n8, b8) = unsafe { (simd::avx2::dot_nibbles_rows(q4, &s, x8), simd::avx2::dot_bytes_rows(&q, &s, x8)) };
            for r in 0..8 {
                // SAFETY: as above.
                let (n1, b1) = unsafe { (simd::avx2::dot_nibbles_rows(q4, &s, [x8[r]]), simd::avx2::dot_bytes_rows(&q, &s, [x8[r]])) };
                assert_eq!((n1[0].to_bits(), b1[0].to_bits()), (n8[r].to_bits(), b8[r].to_bits()), "{blocks} blocks, row {r}");
                let (gn, gb) = (simd::generic_nibbles(q4, &s, x8[r]), simd::generic_bytes(&q, &s, x8[r]));
                assert!(close(n1[0], gn) && close(b1[0], gb), "{blocks} blocks: nibbles {n1:?} vs {gn}, bytes {b1:?} vs {gb}");
            }
            // 6-bit codes in pairs of blocks (an even count)
            let even = blocks / 2 * 2;
            let c: Vec<i8> = (0..even * 32).map(|i| ((i * 53 + 7) % 64) as i8 - 32).collect();
            let q6 = pack_six_pairs(&c);
            let s6: Vec<f32> = (0..2 * even).map(|g| 0.01 * (g as f32 + 1.0) * if g % 3 == 1 { -1.0 } else { 1.0 }).collect();
            // SAFETY: as above.
            let v8 = unsafe { simd::avx2::dot_six_pairs_rows(&q6, &s6, x8) };
            for r in 0..8 {
                // SAFETY: as above.
                let [v] = unsafe { simd::avx2::dot_six_pairs_rows(&q6, &s6, [x8[r]]) };
                assert_eq!(v.to_bits(), v8[r].to_bits(), "{blocks} blocks, row {r}");
                let exact: f64 = c.iter().enumerate().map(|(i, &c)| c as f64 * s6[i / 16] as f64 * x8[r][i] as f64).sum();
                assert!((v as f64 - exact).abs() <= 1e-4, "{even} blocks, 6-bit: {v} vs {exact}");
                assert!((v - simd::generic_sixes(QuantCodes::SixPairs, &q6, &s6, x8[r])).abs() <= 1e-5 * (1.0 + v.abs()));
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(QuantMatrix::from_codes(2, 48, &[0; 96], vec![0.0; 3], vec![0.0; 3]).is_err());
        assert!(QuantMatrix::from_codes(2, 32, &[0; 63], vec![0.0; 2], vec![0.0; 2]).is_err());
        assert!(QuantMatrix::from_codes(2, 32, &[0; 64], vec![0.0; 1], vec![0.0; 2]).is_err());
        assert!(QuantMatrix::from_k_quants(1, 256, &[0; 256], 16, vec![1.0], vec![1.0], vec![0; 16], vec![0; 16]).is_err(), "mins need groups of 32");
        assert!(QuantMatrix::from_k_quants(1, 128, &[0; 128], 32, vec![1.0], vec![], vec![0; 4], vec![]).is_err(), "a partial super-block");
        assert!(QuantMatrix::from_k_quants(1, 256, &[0; 256], 32, vec![1.0], vec![], vec![0; 7], vec![]).is_err());
    }
}
