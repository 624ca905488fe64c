//! GGUF reader and dequantization to f32.
//!
//! Format: llama.cpp's `docs/gguf.md` (v2 and v3, little-endian). Block layouts and the
//! dequantization formulas follow ggml's reference `dequantize_row_*` (ggml-quants.c); they are
//! checked end to end against transformers, which dequantizes the same files with the `gguf`
//! Python package (see `tools/make_model_fixtures.py`).
//!
//! Why our own reader: the file layout is small and stable, and what this project needs beyond it
//! (dequantizing K-quants into plain f32 for burn, undoing llama.cpp's Q/K row permutation) is not
//! in the small GGUF crates; candle's reader would bring a second tensor framework.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::f16;

use crate::error::{ModelError, Result};

/// A metadata value of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// Any unsigned or signed integer type, widened.
    Int(i64),
    /// Unsigned 64-bit (kept apart: may exceed i64).
    U64(u64),
    /// f32 or f64, widened.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// As an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::Int(v) if v >= 0 => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            _ => None,
        }
    }
    /// As a float (integers convert).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::Float(v) => Some(v),
            GgufValue::Int(v) => Some(v as f64),
            GgufValue::U64(v) => Some(v as f64),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    /// As a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types this reader knows (the numbers are ggml's `enum ggml_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
    /// Any other type number (readable metadata, but cannot be dequantized).
    Other(u32),
}

impl GgmlType {
    fn from_u32(v: u32) -> Self {
        match v {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => Self::Other(other),
        }
    }

    /// (elements per block, bytes per block); None for unknown types.
    pub fn block(&self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            Self::Other(_) => return None,
        })
    }

    /// ggml's name of the type.
    pub fn name(&self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::BF16 => "BF16".into(),
            Self::Q4_0 => "Q4_0".into(),
            Self::Q4_1 => "Q4_1".into(),
            Self::Q5_0 => "Q5_0".into(),
            Self::Q5_1 => "Q5_1".into(),
            Self::Q8_0 => "Q8_0".into(),
            Self::Q4K => "Q4_K".into(),
            Self::Q5K => "Q5_K".into(),
            Self::Q6K => "Q6_K".into(),
            Self::Other(n) => format!("ggml type {n}"),
        }
    }
}

/// One tensor's entry in the GGUF header.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    /// Name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Shape in PyTorch order (slowest dimension first): ggml's `ne` reversed.
    pub shape: Vec<usize>,
    /// Element type.
    pub kind: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Byte size of the data.
    pub size: usize,
}

/// A memory-mapped GGUF file: metadata, tensor directory, and on-demand dequantization.
pub struct GgufFile {
    path: PathBuf,
    data: memmap2::Mmap,
    /// Metadata key/values.
    pub metadata: HashMap<String, GgufValue>,
    /// Tensors in file order.
    pub tensors: Vec<GgufTensorInfo>,
    index: HashMap<String, usize>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!("truncated header: needed {n} bytes at offset {}, file has {}", self.pos, self.buf.len())
        })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn count(&mut self, what: &str) -> std::result::Result<usize, String> {
        let n = self.u64()?;
        // every element takes at least one byte: larger counts cannot be honest
        if n > (self.buf.len() - self.pos.min(self.buf.len())) as u64 {
            return Err(format!("{what} count {n} exceeds the file size"));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.count("string length")?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("non-UTF-8 string at offset {}", self.pos - n))
    }
    fn value(&mut self, kind: u32, depth: usize) -> std::result::Result<GgufValue, String> {
        Ok(match kind {
            0 => GgufValue::Int(self.take(1)?[0] as i64),
            1 => GgufValue::Int(self.take(1)?[0] as i8 as i64),
            2 => GgufValue::Int(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            3 => GgufValue::Int(i16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            4 => GgufValue::Int(self.u32()? as i64),
            5 => GgufValue::Int(self.u32()? as i32 as i64),
            6 => GgufValue::Float(f32::from_le_bytes(self.take(4)?.try_into().unwrap()) as f64),
            7 => GgufValue::Bool(self.take(1)?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err("arrays nested too deep".into());
                }
                let inner = self.u32()?;
                let n = self.count("array")?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::Int(self.u64()? as i64),
            12 => GgufValue::Float(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file: magic, version, metadata, tensor directory, and that every
    /// tensor's data lies inside the file.
    ///
    /// # Errors
    /// [`ModelError::Io`] if unreadable, [`ModelError::InvalidGguf`] for anything malformed.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the file is opened read-only; kvc does not modify model files while they are
        // mapped (a concurrent writer could, which is the usual caveat of memory mapping).
        let data = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let invalid = |reason: String| ModelError::InvalidGguf { path: path.to_path_buf(), reason };
        let mut c = Cursor { buf: &data, pos: 0 };
        let magic = c.take(4).map_err(|_| invalid("file shorter than the GGUF magic".into()))?;
        if magic != b"GGUF" {
            return Err(invalid(format!("bad magic {magic:02x?}, expected \"GGUF\"")));
        }
        let version = c.u32().map_err(invalid)?;
        if !(2..=3).contains(&version) {
            return Err(invalid(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = c.count("tensor").map_err(invalid)?;
        let n_kv = c.count("metadata").map_err(invalid)?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string().map_err(invalid)?;
            let kind = c.u32().map_err(invalid)?;
            let value = c.value(kind, 0).map_err(|e| invalid(format!("metadata {key}: {e}")))?;
            metadata.insert(key, value);
        }
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string().map_err(invalid)?;
            let n_dims = c.u32().map_err(invalid)? as usize;
            if n_dims > 4 {
                return Err(invalid(format!("tensor {name} has {n_dims} dimensions")));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(c.u64().map_err(invalid)? as usize);
            }
            let kind = GgmlType::from_u32(c.u32().map_err(invalid)?);
            let offset = c.u64().map_err(invalid)? as usize;
            raw.push((name, ne, kind, offset));
        }
        let alignment = metadata.get("general.alignment").and_then(GgufValue::as_u64).unwrap_or(32) as usize;
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(invalid(format!("alignment {alignment} is not a power of two")));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = HashMap::new();
        for (name, ne, kind, rel) in raw {
            let elems = ne.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let elems = elems.ok_or_else(|| invalid(format!("tensor {name}: shape overflows")))?;
            // unknown types keep size 0: listed, readable metadata, error only when loaded
            let size = match kind.block() {
                Some((per_block, bytes)) => {
                    if ne.first().is_some_and(|&d| d % per_block != 0) {
                        return Err(invalid(format!("tensor {name}: row of {} not a multiple of {per_block}", ne[0])));
                    }
                    (elems / per_block)
                        .checked_mul(bytes)
                        .ok_or_else(|| invalid(format!("tensor {name}: {elems} elements overflow the data size")))?
                }
                None => 0,
            };
            let offset = data_start
                .checked_add(rel)
                .filter(|o| o.checked_add(size).is_some_and(|end| end <= data.len()))
                .ok_or_else(|| {
                    invalid(format!(
                        "tensor {name}: data at {}..{} lies outside the file ({} bytes): truncated?",
                        data_start.saturating_add(rel),
                        data_start.saturating_add(rel).saturating_add(size),
                        data.len()
                    ))
                })?;
            index.insert(name.clone(), tensors.len());
            tensors.push(GgufTensorInfo { name, shape: ne.iter().rev().copied().collect(), kind, offset, size });
        }
        Ok(Self { path: path.to_path_buf(), data, metadata, tensors, index })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// Tensor directory entry by name.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor's data (`None` if the directory entry points outside the
    /// file; [`GgufFile::open`] checks that it does not).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Option<&[u8]> {
        self.data.get(info.offset..info.offset.checked_add(info.size)?)
    }

    /// Hands a tensor's pages back to the OS once it has been read (`madvise(MADV_DONTNEED)` on
    /// its range of the read-only mapping): a later read pages it in again from the file. Keeps
    /// the load's peak memory at what the model holds rather than that plus the whole file.
    /// A no-op where unsupported.
    pub fn release(&self, info: &GgufTensorInfo) {
        #[cfg(unix)]
        if info.size > 0 && info.offset.checked_add(info.size).is_some_and(|end| end <= self.data.len()) {
            // SAFETY: a read-only shared mapping of a file kvc does not modify: dropped pages
            // (madvise rounds the start down to a page, so a neighbouring tensor's first bytes
            // may go too) read back the same bytes from the file on the next access, so no
            // reference ever sees them change.
            let _ = unsafe { self.data.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, info.offset, info.size) };
        }
        #[cfg(not(unix))]
        let _ = info;
    }

    /// Dequantizes a tensor to f32; returns (data, shape in PyTorch order).
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`], [`ModelError::UnsupportedTensorType`].
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.tensor_info(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let bytes = &self.data[info.offset..info.offset + info.size];
        let out = dequantize(info.kind, bytes)
            .ok_or_else(|| ModelError::UnsupportedTensorType { tensor: name.to_string(), kind: info.kind.name() })?;
        Ok((out, info.shape.clone()))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes a whole buffer of `kind` blocks to f32 (ggml's `dequantize_row_*`). None for a type
/// without a dequantizer. `bytes` must be a whole number of blocks.
pub fn dequantize(kind: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    let (per_block, block_bytes) = kind.block()?;
    let mut out = Vec::with_capacity(bytes.len() / block_bytes * per_block);
    for b in bytes.chunks_exact(block_bytes) {
        match kind {
            GgmlType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => out.push(f16_at(b, 0)),
            GgmlType::BF16 => out.push(half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            // the _1 types add the min m; the _0 types must not add a zero in its place, which
            // would turn ggml's -0.0 (a zero quant times a negative d) into +0.0
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let d = f16_at(b, 0);
                let (m, qs) = if kind == GgmlType::Q4_1 { (Some(f16_at(b, 2)), &b[4..20]) } else { (None, &b[2..18]) };
                let off = if kind == GgmlType::Q4_1 { 0 } else { 8 };
                let lo = qs.iter().map(|&q| affine((q & 0xF) as i32 - off, d, m));
                let hi = qs.iter().map(|&q| affine((q >> 4) as i32 - off, d, m));
                out.extend(lo);
                out.extend(hi);
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let d = f16_at(b, 0);
                let (m, rest, off) =
                    if kind == GgmlType::Q5_1 { (Some(f16_at(b, 2)), &b[4..], 0) } else { (None, &b[2..], 16) };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                let mut hi = [0f32; 16];
                for j in 0..16 {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    let x0 = ((qs[j] as u32 & 0xF) | h0) as i32 - off;
                    let x1 = ((qs[j] as u32 >> 4) | h1) as i32 - off;
                    out.push(affine(x0, d, m));
                    hi[j] = affine(x1, d, m);
                }
                out.extend_from_slice(&hi);
            }
            GgmlType::Q8_0 => {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let (qh, qs) = if kind == GgmlType::Q5K { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
                for (j, q) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * j, scales);
                    let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                    for l in 0..32 {
                        let h = if !qh.is_empty() && qh[l] & u1 != 0 { 16 } else { 0 };
                        out.push(d1 * ((q[l] & 0xF) + h) as f32 - m1);
                    }
                    for l in 0..32 {
                        let h = if !qh.is_empty() && qh[l] & u2 != 0 { 16 } else { 0 };
                        out.push(d2 * ((q[l] >> 4) + h) as f32 - m2);
                    }
                }
            }
            GgmlType::Q6K => {
                let (ql_all, qh_all, sc_all) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for half_i in 0..2 {
                    let ql = &ql_all[64 * half_i..];
                    let qh = &qh_all[32 * half_i..];
                    let sc = &sc_all[8 * half_i..];
                    let mut y = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                    out.extend_from_slice(&y);
                }
            }
            GgmlType::Other(_) => return None,
        }
    }
    Some(out)
}

/// The integer codes of a quantized tensor, for a [`kvc_core::QuantMatrix`]: `(codes, scale,
/// min)` with one code per element (in [`dequantize`]'s order) and one `(scale, min)` per 32
/// consecutive elements, such that `code * scale + min` is the dequantized weight: bit for bit
/// (zeros' signs included; types without a min get `-0.0`, which adds nothing)
/// for `Q4_0` (codes `q - 8`, so `-8..=7`), `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`. `None` for the
/// K-quants (their two-level scales: [`k_quant_parts`]), types without codes (`F32`, `F16`,
/// `BF16`, unknown) or a buffer that is not whole blocks.
pub fn quant_codes(kind: GgmlType, bytes: &[u8]) -> Option<(Vec<i8>, Vec<f32>, Vec<f32>)> {
    let (per_block, block_bytes) = kind.block()?;
    if per_block < 32 || bytes.len() % block_bytes != 0 || matches!(kind, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) {
        return None;
    }
    let n = bytes.len() / block_bytes * per_block;
    let (mut codes, mut scale, mut min) = (Vec::with_capacity(n), Vec::with_capacity(n / 32), Vec::with_capacity(n / 32));
    for b in bytes.chunks_exact(block_bytes) {
        match kind {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let d = f16_at(b, 0);
                // Q4_0: `(q - 8) * d` as ggml computes it, so the codes are `q - 8` (held as
                // bytes: the exact value beats the 4-bit storage for this legacy type)
                let (m, qs, off) = if kind == GgmlType::Q4_1 { (f16_at(b, 2), &b[4..20], 0) } else { (-0.0, &b[2..18], 8) };
                codes.extend(qs.iter().map(|&q| (q & 0xF) as i8 - off));
                codes.extend(qs.iter().map(|&q| (q >> 4) as i8 - off));
                scale.push(d);
                min.push(m);
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let d = f16_at(b, 0);
                let (m, rest, off) = if kind == GgmlType::Q5_1 { (f16_at(b, 2), &b[4..], 0) } else { (-0.0, &b[2..], 16) };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                let mut hi = [0i8; 16];
                for j in 0..16 {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    codes.push((((qs[j] as u32 & 0xF) | h0) as i32 - off) as i8);
                    hi[j] = (((qs[j] as u32 >> 4) | h1) as i32 - off) as i8;
                }
                codes.extend_from_slice(&hi);
                scale.push(d);
                min.push(m);
            }
            GgmlType::Q8_0 => {
                codes.extend(b[2..34].iter().map(|&q| q as i8));
                scale.push(f16_at(b, 0));
                // -0.0 adds nothing, not even the sign of a zero product
                min.push(-0.0);
            }
            _ => return None,
        }
    }
    Some((codes, scale, min))
}

/// A K-quant tensor's integer codes and two-level scales, for
/// [`kvc_core::QuantMatrix::from_k_quants`]: the weight is `code * (d * sc) - dmin * m`, bit for
/// bit [`dequantize`]'s value (ggml's `dequantize_row_q4_K` / `_q5_K` / `_q6_K`).
#[derive(Clone, Debug, Default)]
pub struct KQuantParts {
    /// One code per element in [`dequantize`]'s order (`Q4_K`: 0..=15, `Q5_K`: 0..=31, `Q6_K`:
    /// -32..=31).
    pub codes: Vec<i8>,
    /// Elements per scale: 32 (`Q4_K`, `Q5_K`) or 16 (`Q6_K`).
    pub group: usize,
    /// Per 256-element super-block.
    pub d: Vec<f32>,
    /// Per super-block (empty for `Q6_K`).
    pub dmin: Vec<f32>,
    /// Per group: the 6-bit (`Q4_K`, `Q5_K`) or signed 8-bit (`Q6_K`) scale.
    pub sc: Vec<i8>,
    /// Per group: the 6-bit min (empty for `Q6_K`).
    pub m: Vec<i8>,
}

/// [`KQuantParts`] of a `Q4_K`, `Q5_K` or `Q6_K` tensor; `None` for other types or a buffer that
/// is not whole super-blocks.
pub fn k_quant_parts(kind: GgmlType, bytes: &[u8]) -> Option<KQuantParts> {
    let (per_block, block_bytes) = kind.block()?;
    if !matches!(kind, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) || bytes.len() % block_bytes != 0 {
        return None;
    }
    let supers = bytes.len() / block_bytes;
    let group = if kind == GgmlType::Q6K { 16 } else { 32 };
    let mut p = KQuantParts { codes: Vec::with_capacity(supers * per_block), group, ..Default::default() };
    for b in bytes.chunks_exact(block_bytes) {
        if kind == GgmlType::Q6K {
            let (ql_all, qh_all, sc_all) = (&b[0..128], &b[128..192], &b[192..208]);
            p.d.push(f16_at(b, 208));
            for half_i in 0..2 {
                let (ql, qh, sc) = (&ql_all[64 * half_i..], &qh_all[32 * half_i..], &sc_all[8 * half_i..]);
                let mut y = [0i8; 128];
                for l in 0..32 {
                    y[l] = (((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32) as i8;
                    y[l + 32] = (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32) as i8;
                    y[l + 64] = (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32) as i8;
                    y[l + 96] = (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32) as i8;
                }
                p.codes.extend_from_slice(&y);
                // element l of each 32 uses sc[l / 16 + 2 k] for its quarter k: groups of 16 in order
                for k in 0..4 {
                    p.sc.extend([sc[2 * k] as i8, sc[2 * k + 1] as i8]);
                }
            }
        } else {
            let (d, dmin, scales) = (f16_at(b, 0), f16_at(b, 2), &b[4..16]);
            p.d.push(d);
            p.dmin.push(dmin);
            let (qh, qs) = if kind == GgmlType::Q5K { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
            for (j, q) in qs.chunks_exact(32).enumerate() {
                for (sub, shift) in [(2 * j, 0), (2 * j + 1, 4)] {
                    let (sc, m) = scale_min_k4(sub, scales);
                    let bit = 1u8 << sub;
                    p.codes.extend(q.iter().enumerate().map(|(l, &x)| (((x >> shift) & 0xF) + if !qh.is_empty() && qh[l] & bit != 0 { 16 } else { 0 }) as i8));
                    p.sc.push(sc as i8);
                    p.m.push(m as i8);
                }
            }
        }
    }
    Some(p)
}

/// `x * d + m` (ggml's `_1` types), or just `x * d` without a min (the `_0` types).
fn affine(x: i32, d: f32, m: Option<f32>) -> f32 {
    match m {
        Some(m) => x as f32 * d + m,
        None => x as f32 * d,
    }
}

/// 6-bit scale and min of sub-block `j` of a K-quant super-block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_and_q4_0_blocks() {
        // Q8_0: d = 0.5, values -3..29
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 3) as u8));
        let y = dequantize(GgmlType::Q8_0, &b).unwrap();
        assert_eq!(y[0], -1.5);
        assert_eq!(y[31], 14.0);
        // Q4_0: d = 2, nibbles lo=j, hi=15-j -> (j-8)*2 and (7-j)*2
        let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_0, &b).unwrap();
        assert_eq!(y[0], -16.0);
        assert_eq!(y[15], 14.0);
        assert_eq!(y[16], 14.0);
        assert_eq!(y[31], -16.0);
    }

    #[test]
    fn q5_0_high_bits() {
        let mut b = f16::from_f32(1.0).to_le_bytes().to_vec();
        b.extend(0x0001_0001u32.to_le_bytes()); // high bit for elements 0 and 16
        b.extend([0u8; 16]);
        let y = dequantize(GgmlType::Q5_0, &b).unwrap();
        assert_eq!(y[0], 0.0); // 16 - 16
        assert_eq!(y[1], -16.0);
        assert_eq!(y[16], 0.0);
        assert_eq!(y[17], -16.0);
    }

    #[test]
    fn scale_min_k4_unpacks_high_bits() {
        let mut q = [0u8; 12];
        q[0] = 0b1100_0001; // scale 1 for j=0, high bits (3) for scale of j=4
        q[8] = 0x21; // j=4: low nibble 1 -> scale 1 | 3<<4 = 49, min 2
        assert_eq!(scale_min_k4(0, &q), (1, 0));
        assert_eq!(scale_min_k4(4, &q), (49, 2));
    }
}
