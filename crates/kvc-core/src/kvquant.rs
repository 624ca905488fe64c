//! A quantized KV cache: the older slots of a layer held as int8 or int4 codes (or as 16-bit
//! floats for a model that runs in f32), the newest in the cache's float dtype (issue 21).
//! Eviction (a press) and quantization multiply: a press keeps fewer tokens, quantization stores
//! each in fewer bytes.
//!
//! Formats (per KV head; `d` = head_dim, channel groups of [`CHANNEL_GROUP`] = 64 channels, or the
//! whole head when `d` is not a multiple of 64):
//! - **int8**: per token, symmetric: one f16 scale `max|x| / 127` per channel group, codes
//!   `round(x / scale)` in `-127..=127` (as llama.cpp's `q8_0`, with groups of 64). Keys and values
//!   alike: `d + 2 d / 64` bytes each per token (0.52x of f16).
//! - **int4** (KIVI: Liu et al. 2024, arXiv 2402.02750, §3-4; its `residual_length` and group
//!   size): keys per channel over groups of [`TOKEN_GROUP`] = 64 tokens (keys have outlier
//!   channels; one f16 min and scale per channel and group), values per token over channel groups
//!   (f16 min and scale per group); asymmetric, `x ~= min + scale * code`, code `0..=15`, two codes
//!   per byte (low nibble = even channel). `d / 2 + 4 d / 64` bytes for keys and values each per
//!   token (0.28x of f16).
//! - **f16 / bf16** (for a model that runs in f32; issue 22): every key and value rounded to a
//!   16-bit float (IEEE half, saturated at its largest finite magnitude, or bfloat16), no scales:
//!   `2 d` bytes each per token (1.0x of f16, the default KV cache type of llama.cpp), half the
//!   f32 cache's bytes, while activations and products stay f32. Keys in the int8 keys'
//!   channel-major blocks of 16 tokens, values token-major; decode widens a block at a time into
//!   a buffer that stays in L1 (bf16: a shift; f16: F16C where the CPU has it).
//! - **Residual window** (KIVI): the newest tokens stay in full precision. When a layer holds more
//!   than [`KvQuant::residual`] of them, its oldest are quantized in whole groups (1 token for
//!   int8, 64 for int4) and at least the newest token stays ([`KvQuant::flush_count`]). Defaults:
//!   none for int8 (each token is quantized as the next arrives), 128 for int4 (KIVI's).
//!
//! Quantization happens after compression ([`crate::KvCache::quantize`]): presses score on the
//! full-precision prefill, so their kept sets are those of the unquantized run. Decode reads the
//! codes where they lie ([`decode_attention`]: each key tile widened into a buffer that stays in
//! cache, so the bytes a step reads from memory are the codes').

use std::borrow::Cow;

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::kernels::host::{merge_tiles, simd, tile_softmax, KEY_TILE};
use crate::CoreError;

/// Channels per scale of int8 keys/values and int4 values (the whole head when `head_dim` is not
/// a multiple of it).
pub const CHANNEL_GROUP: usize = 64;
/// Tokens per scale of int4 keys (KIVI's group size along tokens).
pub const TOKEN_GROUP: usize = 64;

/// Bits per stored key or value element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvBits {
    /// 8-bit codes, per token.
    Int8,
    /// 4-bit codes, KIVI's layout.
    Int4,
    /// IEEE half-precision floats, one per element.
    F16,
    /// bfloat16 floats, one per element.
    Bf16,
}

/// How a KV cache holds keys and values once quantized (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvQuant {
    /// Code width.
    pub bits: KvBits,
    /// Newest tokens kept in full precision before they are quantized (KIVI's `residual_length`).
    pub residual: usize,
}

impl KvQuant {
    /// int8 codes, no residual window.
    pub fn int8() -> Self {
        Self { bits: KvBits::Int8, residual: 0 }
    }

    /// int4 codes (KIVI) with a 128-token residual window.
    pub fn int4() -> Self {
        Self { bits: KvBits::Int4, residual: 128 }
    }

    /// f16 copies of keys and values (for an f32 model), no residual window.
    pub fn f16() -> Self {
        Self { bits: KvBits::F16, residual: 0 }
    }

    /// bf16 copies of keys and values (for an f32 model), no residual window.
    pub fn bf16() -> Self {
        Self { bits: KvBits::Bf16, residual: 0 }
    }

    /// Whether the format holds 16-bit floats (no scales) rather than integer codes.
    pub fn is_float(&self) -> bool {
        matches!(self.bits, KvBits::F16 | KvBits::Bf16)
    }

    /// Parses a `--kv-dtype` value: `int8`, `int4`, `f16`, `bf16` (16-bit copies of an f32
    /// model's cache), or `float` / `f32` (no quantization, the cache keeps the model's float
    /// dtype) -> `None`.
    ///
    /// # Errors
    /// [`CoreError::Unsupported`] naming the accepted values.
    pub fn parse(name: &str) -> Result<Option<Self>, CoreError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "float" | "f32" => Ok(None),
            "int8" => Ok(Some(Self::int8())),
            "int4" => Ok(Some(Self::int4())),
            "f16" => Ok(Some(Self::f16())),
            "bf16" => Ok(Some(Self::bf16())),
            other => Err(CoreError::Unsupported(format!("unknown KV cache dtype {other:?} (accepted: float, f16, bf16, int8, int4)"))),
        }
    }

    /// Parses a KV cache format named for a model running in `model_dtype` (`kvc generate
    /// --kv-dtype`, `kvc serve`'s per-document `kv_dtype`): `float` or the model's own dtype name
    /// (`f32`, `f16`, `bf16`) -> `None` (the cache stays in the model's dtype); `int8` / `int4`;
    /// `f16` / `bf16` for a model in f32 (16-bit copies: half the cache's bytes, f32 arithmetic).
    ///
    /// # Errors
    /// [`CoreError::Unsupported`] for a float dtype that is neither the model's nor a 16-bit
    /// one of an f32 model, or an unknown name, naming the accepted values.
    pub fn parse_for(name: &str, model_dtype: burn::tensor::DType) -> Result<Option<Self>, CoreError> {
        let model = format!("{model_dtype:?}").to_lowercase();
        match name {
            "float" | "int8" | "int4" => Self::parse(name),
            n if n == model => Ok(None),
            "f16" | "bf16" if model_dtype == burn::tensor::DType::F32 => Self::parse(name),
            "f32" | "f16" | "bf16" => Err(CoreError::Unsupported(format!(
                "KV cache dtype {name:?}: the model runs in {model}, whose float KV cache is {model}; give float (or {model}), int8 or int4 (f16 / bf16 storage is for a model in f32)"
            ))),
            _ => Err(CoreError::Unsupported(format!("unknown KV cache dtype {name:?} (accepted: float, f16, bf16, int8, int4)"))),
        }
    }

    /// `int8`, `int4`, `f16` or `bf16`.
    pub fn name(&self) -> &'static str {
        match self.bits {
            KvBits::Int8 => "int8",
            KvBits::Int4 => "int4",
            KvBits::F16 => "f16",
            KvBits::Bf16 => "bf16",
        }
    }

    /// Tokens quantized together: 1 (int8, f16, bf16) or [`TOKEN_GROUP`] (int4 keys share
    /// scales over them).
    pub fn granularity(&self) -> usize {
        match self.bits {
            KvBits::Int8 | KvBits::F16 | KvBits::Bf16 => 1,
            KvBits::Int4 => TOKEN_GROUP,
        }
    }

    /// Of `held` full-precision tokens (the residual window), how many of the oldest are
    /// quantized now: none while `held <= residual`, else whole groups, keeping at least the
    /// newest token.
    pub fn flush_count(&self, held: usize) -> usize {
        if held <= self.residual {
            return 0;
        }
        let g = self.granularity();
        (held.saturating_sub(1) / g) * g
    }

    /// Bytes of codes and scales per token and KV head (keys + values) for `head_dim` channels
    /// (int4 keys' per-group scales spread over the group's tokens).
    pub fn bytes_per_token(&self, head_dim: usize) -> f64 {
        let groups = head_dim.div_ceil(channel_group(head_dim)) as f64;
        let d = head_dim as f64;
        match self.bits {
            KvBits::Int8 => 2.0 * (d + 2.0 * groups),
            KvBits::Int4 => (d / 2.0 + 4.0 * d / TOKEN_GROUP as f64) + (d / 2.0 + 4.0 * groups),
            KvBits::F16 | KvBits::Bf16 => 4.0 * d,
        }
    }

    /// Checks that a head of `head_dim` channels can be stored.
    ///
    /// # Errors
    /// [`CoreError::Unsupported`] for an odd `head_dim` with int4 (two codes per byte) or 0.
    pub fn check(&self, head_dim: usize) -> Result<(), CoreError> {
        if head_dim == 0 || (self.bits == KvBits::Int4 && head_dim % 2 != 0) {
            return Err(CoreError::Unsupported(format!("an {} KV cache needs an even head_dim (the model has {head_dim})", self.name())));
        }
        Ok(())
    }
}

/// Channels per scale for a head of `d` channels.
fn channel_group(d: usize) -> usize {
    if d % CHANNEL_GROUP == 0 {
        CHANNEL_GROUP
    } else {
        d
    }
}

/// Tokens per block of the channel-major key layouts: a decode step scores a block's 16 keys in
/// one 512-bit vector of f32 (no horizontal sums).
pub const KEY_BLOCK: usize = 16;

/// Tokens of 16-bit values a decode step widens at once (8 / 16 KB of f32 at head_dim 64 / 128).
const VALUE_CHUNK: usize = 32;

// decode_attention's key tiles start on whole blocks of channel-major keys
const _: () = assert!(KEY_TILE % KEY_BLOCK == 0);

/// Codes of keys or values of one (batch, KV head) row.
///
/// Layouts (`d` = head_dim, `cg` = channels per group, `groups = d / cg`, token `t`, channel
/// `c = gi * cg + j` of group `gi`):
/// - keys, blocks of [`KEY_BLOCK`] tokens, channel-major: int8 byte `t / 16 * 16 d + c * 16 +
///   t % 16` (the last block padded with zero codes); int4 byte `t / 16 * 8 d + c * 8 + t % 8`,
///   low nibble for `t % 16 < 8`, high otherwise; f16 / bf16 the int8 layout in 16-bit words
///   (little-endian byte pairs).
/// - values, token-major: int8 byte `t * d + c` (f16 / bf16: word); int4 byte `t * d / 2 + gi * cg / 2 + j % (cg /
///   2)`, low nibble for `j < cg / 2` (so both halves widen to contiguous channels).
/// - scales (int4: and mins), f16: per token and group, `[t * groups + gi]`; int4 keys: per
///   64-token group and channel, `[t / 64 * d + c]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantRows {
    /// Codes (int8: i8 bits), laid out as above.
    pub codes: Vec<u8>,
    /// Scales.
    pub scales: Vec<f16>,
    /// int4 only, shaped as `scales`; empty for int8.
    pub mins: Vec<f16>,
}

impl QuantRows {
    fn bytes(&self) -> usize {
        self.codes.len() + 2 * (self.scales.len() + self.mins.len())
    }
}

/// The quantized slots of one layer: `rows = batch * kv_heads` rows of `len` tokens each, keys
/// and values as [`QuantRows`]. Slot order is the layer's: these are its first `len` slots, the
/// residual window follows ([`crate::LayerKv::quant`]).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantKv {
    spec: KvQuant,
    head_dim: usize,
    len: usize,
    keys: Vec<QuantRows>,
    values: Vec<QuantRows>,
}

impl QuantKv {
    /// Empty storage for `rows` (batch x KV heads) rows of `head_dim` channels.
    ///
    /// # Errors
    /// [`KvQuant::check`].
    pub fn new(spec: KvQuant, rows: usize, head_dim: usize) -> Result<Self, CoreError> {
        spec.check(head_dim)?;
        Ok(Self { spec, head_dim, len: 0, keys: vec![QuantRows::default(); rows], values: vec![QuantRows::default(); rows] })
    }

    /// Storage from its parts (a saved cache), every length checked against `spec`, `head_dim`
    /// and `len`.
    ///
    /// # Errors
    /// [`CoreError::Shape`] naming what does not fit.
    pub fn from_parts(spec: KvQuant, head_dim: usize, len: usize, keys: Vec<QuantRows>, values: Vec<QuantRows>) -> Result<Self, CoreError> {
        spec.check(head_dim)?;
        if keys.len() != values.len() {
            return Err(CoreError::Shape(format!("{} key rows, {} value rows", keys.len(), values.len())));
        }
        let q = Self { spec, head_dim, len, keys, values };
        if spec.bits == KvBits::Int4 && len % TOKEN_GROUP != 0 {
            return Err(CoreError::Shape(format!("{len} int4 tokens: not whole groups of {TOKEN_GROUP}")));
        }
        for (is_keys, rows) in [(true, &q.keys), (false, &q.values)] {
            let (codes, scales, mins) = q.row_sizes(is_keys, len);
            for r in rows {
                if (r.codes.len(), r.scales.len(), r.mins.len()) != (codes, scales, mins) {
                    return Err(CoreError::Shape(format!(
                        "{} codes of {len} tokens: {} / {} / {} bytes, codes / scales / mins, expected {codes} / {scales} / {mins}",
                        if is_keys { "key" } else { "value" },
                        r.codes.len(),
                        r.scales.len(),
                        r.mins.len()
                    )));
                }
                if r.scales.iter().chain(&r.mins).any(|s| !s.is_finite()) {
                    return Err(CoreError::Shape("a non-finite scale or min".into()));
                }
            }
        }
        Ok(q)
    }

    /// Lengths of codes, scales and mins of one row of `len` tokens.
    fn row_sizes(&self, keys: bool, len: usize) -> (usize, usize, usize) {
        let d = self.head_dim;
        let groups = d / channel_group(d);
        match (self.spec.bits, keys) {
            (KvBits::Int8, true) => (len.div_ceil(KEY_BLOCK) * KEY_BLOCK * d, len * groups, 0),
            (KvBits::Int8, false) => (len * d, len * groups, 0),
            (KvBits::Int4, true) => (len * d / 2, len / TOKEN_GROUP * d, len / TOKEN_GROUP * d),
            (KvBits::Int4, false) => (len * d / 2, len * groups, len * groups),
            (KvBits::F16 | KvBits::Bf16, true) => (len.div_ceil(KEY_BLOCK) * KEY_BLOCK * 2 * d, 0, 0),
            (KvBits::F16 | KvBits::Bf16, false) => (len * 2 * d, 0, 0),
        }
    }

    /// Tokens per row a saved row of value codes holds (values are token-major, unpadded).
    pub fn tokens_of_value_codes(spec: KvQuant, head_dim: usize, bytes: usize) -> Option<usize> {
        let per = match spec.bits {
            KvBits::Int8 => head_dim,
            KvBits::Int4 => head_dim / 2,
            KvBits::F16 | KvBits::Bf16 => 2 * head_dim,
        };
        (per > 0 && bytes % per == 0).then(|| bytes / per)
    }

    /// The format.
    pub fn spec(&self) -> KvQuant {
        self.spec
    }

    /// Quantized tokens per row.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no token is quantized yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows (batch x KV heads).
    pub fn rows(&self) -> usize {
        self.keys.len()
    }

    /// Channels per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Keys' codes per row.
    pub fn keys(&self) -> &[QuantRows] {
        &self.keys
    }

    /// Values' codes per row.
    pub fn values(&self) -> &[QuantRows] {
        &self.values
    }

    /// Bytes of codes, scales and mins.
    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(QuantRows::bytes).sum()
    }

    /// Quantizes `n` more tokens per row: `keys`, `values` `[rows, n, head_dim]` f32, row-major;
    /// `n` a multiple of [`KvQuant::granularity`].
    ///
    /// # Panics
    /// On lengths that do not match (a caller bug: the cache derives them from tensor shapes).
    pub fn push(&mut self, keys: &[f32], values: &[f32], n: usize) {
        let d = self.head_dim;
        let rows = self.rows();
        assert!(keys.len() == rows * n * d && values.len() == keys.len(), "quantized KV push: inconsistent lengths");
        assert!(n % self.spec.granularity() == 0, "quantized KV push: not whole groups");
        let cg = channel_group(d);
        for r in 0..rows {
            let (k, v) = (&keys[r * n * d..][..n * d], &values[r * n * d..][..n * d]);
            match self.spec.bits {
                KvBits::Int8 => {
                    let mut codes = Vec::with_capacity(d);
                    for (i, tok) in k.chunks_exact(d).enumerate() {
                        let kr = &mut self.keys[r];
                        codes.clear();
                        quantize_i8(tok, cg, &mut codes, &mut kr.scales);
                        scatter_key(&mut kr.codes, self.len + i, &codes, 1);
                    }
                    let vr = &mut self.values[r];
                    for tok in v.chunks_exact(d) {
                        quantize_i8(tok, cg, &mut vr.codes, &mut vr.scales);
                    }
                }
                KvBits::Int4 => {
                    for group in k.chunks_exact(TOKEN_GROUP * d) {
                        quantize_u4_keys(group, d, &mut self.keys[r]);
                    }
                    for tok in v.chunks_exact(d) {
                        quantize_u4_values(tok, cg, &mut self.values[r]);
                    }
                }
                KvBits::F16 | KvBits::Bf16 => {
                    // keys into channel-major blocks of 16 tokens (zero words pad the last)
                    let mut words = Vec::new();
                    push_halves(self.spec.bits, k, &mut words);
                    for (i, tok) in words.chunks_exact(2 * d).enumerate() {
                        scatter_key(&mut self.keys[r].codes, self.len + i, tok, 2);
                    }
                    push_halves(self.spec.bits, v, &mut self.values[r].codes);
                }
            }
        }
        self.len += n;
    }

    /// Tokens `t0..t0 + tn` of row `row`, keys (`keys`) or values, widened to f32 into `out`
    /// (`[tn, head_dim]`, token-major).
    pub fn dequantize(&self, keys: bool, row: usize, t0: usize, tn: usize, out: &mut [f32]) {
        let d = self.head_dim;
        let cg = channel_group(d);
        let groups = d / cg;
        let q = if keys { &self.keys[row] } else { &self.values[row] };
        if self.spec.is_float() && !keys {
            widen_halves(self.spec.bits, &words(&q.codes[t0 * 2 * d..(t0 + tn) * 2 * d]), &mut out[..tn * d]);
            return;
        }
        if self.spec.is_float() {
            // keys: each token's words gathered from its block, then widened
            let all = words(&q.codes);
            let mut tok = vec![0u16; d];
            for (i, o) in out[..tn * d].chunks_exact_mut(d).enumerate() {
                tok.iter_mut().enumerate().for_each(|(c, w)| *w = all[key_slot(t0 + i, c, d)]);
                widen_halves(self.spec.bits, &tok, o);
            }
            return;
        }
        // one match per token (not per element); scales widened once per group
        for (i, o) in out[..tn * d].chunks_exact_mut(d).enumerate() {
            let t = t0 + i;
            let (bk, lane) = (t / KEY_BLOCK, t % KEY_BLOCK);
            match (self.spec.bits, keys) {
                (KvBits::Int8, true) => {
                    for (gi, og) in o.chunks_exact_mut(cg).enumerate() {
                        let sc = q.scales[t * groups + gi].to_f32();
                        for (j, x) in og.iter_mut().enumerate() {
                            *x = (q.codes[key_slot(t, gi * cg + j, d)] as i8) as f32 * sc;
                        }
                    }
                }
                (KvBits::Int8, false) => {
                    for (gi, (og, cs)) in o.chunks_exact_mut(cg).zip(q.codes[t * d..(t + 1) * d].chunks_exact(cg)).enumerate() {
                        let sc = q.scales[t * groups + gi].to_f32();
                        og.iter_mut().zip(cs).for_each(|(x, &c)| *x = (c as i8) as f32 * sc);
                    }
                }
                (KvBits::Int4, true) => {
                    let p = t / TOKEN_GROUP * d;
                    let (h, shift) = (KEY_BLOCK / 2, if lane < KEY_BLOCK / 2 { 0 } else { 4 });
                    for (c, x) in o.iter_mut().enumerate() {
                        let code = (q.codes[bk * h * d + c * h + lane % h] >> shift) & 15;
                        *x = q.mins[p + c].to_f32() + code as f32 * q.scales[p + c].to_f32();
                    }
                }
                (KvBits::Int4, false) => {
                    let half = cg / 2;
                    for (gi, (og, bytes)) in o.chunks_exact_mut(cg).zip(q.codes[t * d / 2..(t + 1) * d / 2].chunks_exact(half)).enumerate() {
                        let (sc, mn) = (q.scales[t * groups + gi].to_f32(), q.mins[t * groups + gi].to_f32());
                        let (lo, hi) = og.split_at_mut(half);
                        for ((a, b), &c) in lo.iter_mut().zip(hi.iter_mut()).zip(bytes) {
                            *a = mn + (c & 15) as f32 * sc;
                            *b = mn + (c >> 4) as f32 * sc;
                        }
                    }
                }
                (KvBits::F16 | KvBits::Bf16, _) => unreachable!("16-bit rows are widened above"),
            }
        }
    }

    /// Every quantized token widened: keys and values `[rows, len, head_dim]` f32.
    pub fn to_f32(&self) -> (Vec<f32>, Vec<f32>) {
        let (n, d) = (self.len, self.head_dim);
        let mut k = vec![0f32; self.rows() * n * d];
        let mut v = vec![0f32; self.rows() * n * d];
        for r in 0..self.rows() {
            self.dequantize(true, r, 0, n, &mut k[r * n * d..]);
            self.dequantize(false, r, 0, n, &mut v[r * n * d..]);
        }
        (k, v)
    }
}

/// Every slot of a quantized layer in full precision, `[batch, kv_heads, quant.len() + residual,
/// head_dim]`: the codes widened (in `keys`' dtype) in front of the residual window `keys` /
/// `values` (`[batch, kv_heads, residual, head_dim]`); the residual itself when nothing is
/// quantized yet.
pub fn with_codes<B: Backend>(quant: &QuantKv, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
    if quant.is_empty() {
        return (keys, values);
    }
    let [b, h, _, d] = keys.dims();
    let (k, v) = quant.to_f32();
    let device = keys.device();
    let wide = |x: Vec<f32>, like: Tensor<B, 4>| {
        let t = Tensor::<B, 4>::from_data(TensorData::new(x, [b, h, quant.len(), d]), (&device, DType::F32)).cast(like.dtype());
        Tensor::cat(vec![t, like], 2)
    };
    (wide(k, keys), wide(v, values))
}

/// f16 of a scale or min, kept finite (beyond f16's range: its largest magnitude; NaN: 0).
fn f16_scale(x: f32) -> f16 {
    let s = f16::from_f32(x);
    if s.is_finite() {
        s
    } else if x.is_nan() {
        f16::ZERO
    } else if x < 0.0 {
        f16::MIN
    } else {
        f16::MAX
    }
}

/// int8, one token: every `cg` values one scale `max|x| / 127`; codes appended to `codes`.
fn quantize_i8(x: &[f32], cg: usize, codes: &mut Vec<u8>, scales: &mut Vec<f16>) {
    for grp in x.chunks(cg) {
        let amax = grp.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = f16_scale(amax / 127.0);
        let inv = if s.to_f32() > 0.0 { 1.0 / s.to_f32() } else { 0.0 };
        codes.extend(grp.iter().map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8));
        scales.push(s);
    }
}

/// int4 min and scale of values in `lo..=hi`, and the encoder's `1 / scale`.
fn u4_params(lo: f32, hi: f32) -> (f16, f16, f32) {
    let m = f16_scale(lo);
    let s = f16_scale((hi - m.to_f32()) / 15.0);
    (m, s, if s.to_f32() > 0.0 { 1.0 / s.to_f32() } else { 0.0 })
}

fn u4_code(x: f32, m: f32, inv: f32) -> u8 {
    ((x - m) * inv).round().clamp(0.0, 15.0) as u8
}

/// int4 values, one token: every `cg` channels one min and scale; channel `j` and `j + cg / 2`
/// of a group share a byte.
fn quantize_u4_values(x: &[f32], cg: usize, out: &mut QuantRows) {
    for grp in x.chunks(cg) {
        let (lo, hi) = grp.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let (m, s, inv) = u4_params(lo, hi);
        let mf = m.to_f32();
        let half = grp.len() / 2;
        out.codes.extend((0..half).map(|j| u4_code(grp[j], mf, inv) | (u4_code(grp[j + half], mf, inv) << 4)));
        out.scales.push(s);
        out.mins.push(m);
    }
}

/// int4 keys: one group of [`TOKEN_GROUP`] tokens `[64, d]`, per channel one min and scale,
/// codes in channel-major blocks of [`KEY_BLOCK`] tokens (token `l` and `l + 8` of a block share
/// a byte).
fn quantize_u4_keys(group: &[f32], d: usize, out: &mut QuantRows) {
    let mut lo = vec![f32::INFINITY; d];
    let mut hi = vec![f32::NEG_INFINITY; d];
    for tok in group.chunks_exact(d) {
        for (c, &v) in tok.iter().enumerate() {
            lo[c] = lo[c].min(v);
            hi[c] = hi[c].max(v);
        }
    }
    let params: Vec<(f16, f16, f32)> = lo.iter().zip(&hi).map(|(&l, &h)| u4_params(l, h)).collect();
    let half = KEY_BLOCK / 2;
    for block in group.chunks_exact(KEY_BLOCK * d) {
        for (c, &(m, _, inv)) in params.iter().enumerate() {
            let mf = m.to_f32();
            out.codes.extend((0..half).map(|l| u4_code(block[l * d + c], mf, inv) | (u4_code(block[(l + half) * d + c], mf, inv) << 4)));
        }
    }
    out.mins.extend(params.iter().map(|p| p.0));
    out.scales.extend(params.iter().map(|p| p.1));
}

/// Where channel `c` of token `t` sits in channel-major key blocks of [`KEY_BLOCK`] tokens
/// (`[blocks, d, KEY_BLOCK]`, the int8 and 16-bit keys' layout), in elements (bytes of int8,
/// 16-bit words).
fn key_slot(t: usize, c: usize, d: usize) -> usize {
    t / KEY_BLOCK * KEY_BLOCK * d + c * KEY_BLOCK + t % KEY_BLOCK
}

/// Writes token `t`'s `d` elements of `width` bytes (`tok`, channel order) into the
/// channel-major key blocks `codes` ([`key_slot`]), first growing `codes` by zeros to the end of
/// `t`'s block (the padding of a partial last block).
fn scatter_key(codes: &mut Vec<u8>, t: usize, tok: &[u8], width: usize) {
    let d = tok.len() / width;
    let end = width * (t / KEY_BLOCK + 1) * KEY_BLOCK * d;
    if codes.len() < end {
        codes.resize(end, 0);
    }
    for (c, e) in tok.chunks_exact(width).enumerate() {
        let at = width * key_slot(t, c, d);
        codes[at..at + width].copy_from_slice(e);
    }
}

/// f16 / bf16: `x` rounded to 16-bit floats (f16 saturated at +-65504, so a large key stays
/// finite), appended to `codes` as little-endian bytes.
fn push_halves(bits: KvBits, x: &[f32], codes: &mut Vec<u8>) {
    let mut w = vec![0u16; x.len()];
    if bits == KvBits::F16 {
        let lim = f16::MAX.to_f32();
        let clamped: Vec<f32> = x.iter().map(|v| v.clamp(-lim, lim)).collect();
        w.reinterpret_cast_mut::<f16>().convert_from_f32_slice(&clamped);
    } else {
        w.reinterpret_cast_mut::<bf16>().convert_from_f32_slice(x);
    }
    codes.reserve(2 * w.len());
    codes.extend(w.iter().flat_map(|b| b.to_le_bytes()));
}

/// 16-bit floats stored as little-endian bytes, as `u16` bits: borrowed where the bytes are
/// 2-aligned (a `Vec<u8>` from the allocator is), copied otherwise.
fn words(bytes: &[u8]) -> Cow<'_, [u16]> {
    #[cfg(target_endian = "little")]
    if let Ok(w) = bytemuck::try_cast_slice::<u8, u16>(bytes) {
        return Cow::Borrowed(w);
    }
    Cow::Owned(bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect())
}

/// `out = w` widened to f32 (`w` the bits of f16 or bf16 values; exact).
fn widen_halves(bits: KvBits, w: &[u16], out: &mut [f32]) {
    if bits == KvBits::F16 {
        crate::kernels::host::widen_f16(w, out);
    } else {
        simd::widen_bf16(w.reinterpret_cast::<bf16>(), out);
    }
}

/// The decode kernel's inner loops, compiled per instruction set ([`simd`]'s dispatch): scores of
/// a block of 16 keys against a few query rows, and values accumulated from their codes.
mod simd_q {
    use super::KEY_BLOCK;
    use crate::kernels::host::simd::dispatch;

    dispatch!(scores_i8, scores_i8_body, (q: &[f32], block: &[u8], scales: &[f32], cg: usize, out: &mut [f32]) -> ());
    dispatch!(scores_u4, scores_u4_body, (q: &[f32], bias: &[f32], block: &[u8], out: &mut [f32]) -> ());
    dispatch!(weighted_i8, weighted_i8_body, (p: &[f32], stride: usize, codes: &[u8], scales: &[f32], d: usize, cg: usize, out: &mut [f32]) -> ());
    dispatch!(weighted_u4, weighted_u4_body, (p: &[f32], stride: usize, codes: &[u8], scales: &[f32], mins: &[f32], d: usize, cg: usize, out: &mut [f32]) -> ());
    dispatch!(scores_f32, scores_f32_body, (q: &[f32], block: &[f32], out: &mut [f32]) -> ());
    dispatch!(weighted_f32, weighted_f32_body, (p: &[f32], stride: usize, rows: &[f32], d: usize, out: &mut [f32]) -> ());

    /// `out[r][l] = sum_c q[r][c] * block[c][l]` for the `g = out.len() / 16` query rows `q`
    /// (`[g, d]`) and a widened key block (`[d, 16]`, channel-major); even and odd channels on
    /// two accumulators.
    #[inline(always)]
    fn scores_f32_body(q: &[f32], block: &[f32], out: &mut [f32]) {
        let d = block.len() / KEY_BLOCK;
        for (qr, o) in q.chunks_exact(d).zip(out.chunks_exact_mut(KEY_BLOCK)) {
            let (mut s0, mut s1) = ([0f32; KEY_BLOCK], [0f32; KEY_BLOCK]);
            let mut pairs = qr.chunks_exact(2).zip(block.chunks_exact(2 * KEY_BLOCK));
            for (qc, kc) in &mut pairs {
                for l in 0..KEY_BLOCK {
                    s0[l] += qc[0] * kc[l];
                    s1[l] += qc[1] * kc[KEY_BLOCK + l];
                }
            }
            if d % 2 == 1 {
                let (qc, kc) = (qr[d - 1], &block[(d - 1) * KEY_BLOCK..]);
                for l in 0..KEY_BLOCK {
                    s0[l] += qc * kc[l];
                }
            }
            for l in 0..KEY_BLOCK {
                o[l] = s0[l] + s1[l];
            }
        }
    }

    /// `out[r] += sum_t p[r * stride + t] * rows[t]` over `n = rows.len() / d` value rows
    /// (`[n, d]`); per query row and 64-channel group the sums stay in registers over the rows.
    #[inline(always)]
    fn weighted_f32_body(p: &[f32], stride: usize, rows: &[f32], d: usize, out: &mut [f32]) {
        let n = rows.len() / d;
        for (r, o) in out.chunks_exact_mut(d).enumerate() {
            let w = &p[r * stride..r * stride + n];
            if d % 64 == 0 {
                for (gi, og) in o.chunks_exact_mut(64).enumerate() {
                    let mut acc = [0f32; 64];
                    for (t, &wt) in w.iter().enumerate() {
                        let v: &[f32; 64] = rows[t * d + gi * 64..][..64].try_into().expect("64 values");
                        for j in 0..64 {
                            acc[j] += wt * v[j];
                        }
                    }
                    og.iter_mut().zip(acc).for_each(|(x, a)| *x += a);
                }
            } else {
                for (t, &wt) in w.iter().enumerate() {
                    o.iter_mut().zip(&rows[t * d..(t + 1) * d]).for_each(|(x, &v)| *x += wt * v);
                }
            }
        }
    }

    /// `out[r][l] = sum_c q[r][c] * code[c][l] * scale[group(c)][l]` for the `g = out.len() / 16`
    /// query rows `q` (`[g, d]`) and an int8 key block (`[d, 16]`, channel-major); `scales`
    /// `[groups, 16]`.
    #[inline(always)]
    fn scores_i8_body(q: &[f32], block: &[u8], scales: &[f32], cg: usize, out: &mut [f32]) {
        let d = block.len() / KEY_BLOCK;
        for (qr, o) in q.chunks_exact(d).zip(out.chunks_exact_mut(KEY_BLOCK)) {
            let mut s = [0f32; KEY_BLOCK];
            for ((qg, bg), sc) in qr.chunks_exact(cg).zip(block.chunks_exact(cg * KEY_BLOCK)).zip(scales.chunks_exact(KEY_BLOCK)) {
                let mut acc = [0f32; KEY_BLOCK];
                for (&qc, codes) in qg.iter().zip(bg.chunks_exact(KEY_BLOCK)) {
                    for l in 0..KEY_BLOCK {
                        acc[l] += qc * (codes[l] as i8) as f32;
                    }
                }
                for l in 0..KEY_BLOCK {
                    s[l] += acc[l] * sc[l];
                }
            }
            o.copy_from_slice(&s);
        }
    }

    /// `out[r][l] = bias[r] + sum_c q[r][c] * code[c][l]` for an int4 key block (`[d, 8]` bytes,
    /// token `l` and `l + 8` in a byte's low and high nibble); `q` already carries the channels'
    /// scales, `bias` their mins.
    #[inline(always)]
    fn scores_u4_body(q: &[f32], bias: &[f32], block: &[u8], out: &mut [f32]) {
        const H: usize = KEY_BLOCK / 2;
        let d = block.len() / H;
        for ((qr, o), &b) in q.chunks_exact(d).zip(out.chunks_exact_mut(KEY_BLOCK)).zip(bias) {
            let mut s = [b; KEY_BLOCK];
            for (&qc, bytes) in qr.iter().zip(block.chunks_exact(H)) {
                for l in 0..H {
                    s[l] += qc * (bytes[l] & 15) as f32;
                    s[l + H] += qc * (bytes[l] >> 4) as f32;
                }
            }
            o.copy_from_slice(&s);
        }
    }

    /// `out[r] += sum_t p[r][t] * scale[t][group] * code[t]` over int8 value rows `codes`
    /// (`[n, d]`); `p[r * stride + t]`; `scales` `[n, groups]`. Per query row and channel group
    /// the sums stay in registers over all tokens (64-channel groups: four 16-lane vectors).
    #[inline(always)]
    fn weighted_i8_body(p: &[f32], stride: usize, codes: &[u8], scales: &[f32], d: usize, cg: usize, out: &mut [f32]) {
        let groups = d / cg;
        let n = codes.len() / d;
        for (r, o) in out.chunks_exact_mut(d).enumerate() {
            let w = &p[r * stride..r * stride + n];
            for (gi, og) in o.chunks_exact_mut(cg).enumerate() {
                if cg == 64 {
                    let mut acc = [0f32; 64];
                    for (t, &wt) in w.iter().enumerate() {
                        let ws = wt * scales[t * groups + gi];
                        let c: &[u8; 64] = codes[t * d + gi * 64..][..64].try_into().expect("64 codes");
                        for j in 0..64 {
                            acc[j] += ws * (c[j] as i8) as f32;
                        }
                    }
                    og.iter_mut().zip(acc).for_each(|(x, a)| *x += a);
                } else {
                    for (t, &wt) in w.iter().enumerate() {
                        let ws = wt * scales[t * groups + gi];
                        for (x, &c) in og.iter_mut().zip(&codes[t * d + gi * cg..][..cg]) {
                            *x += ws * (c as i8) as f32;
                        }
                    }
                }
            }
        }
    }

    /// As [`weighted_i8_body`] for int4 value rows (`[n, d / 2]` bytes, channel `j` and
    /// `j + cg / 2` of a group in one byte): `x = min + scale * code`.
    #[inline(always)]
    fn weighted_u4_body(p: &[f32], stride: usize, codes: &[u8], scales: &[f32], mins: &[f32], d: usize, cg: usize, out: &mut [f32]) {
        let (groups, half) = (d / cg, cg / 2);
        let n = codes.len() / (d / 2);
        for (r, o) in out.chunks_exact_mut(d).enumerate() {
            let w = &p[r * stride..r * stride + n];
            for (gi, og) in o.chunks_exact_mut(cg).enumerate() {
                let (lo, hi) = og.split_at_mut(half);
                if cg == 64 {
                    let (mut al, mut ah, mut am) = ([0f32; 32], [0f32; 32], 0f32);
                    for (t, &wt) in w.iter().enumerate() {
                        let (ws, wm) = (wt * scales[t * groups + gi], wt * mins[t * groups + gi]);
                        let c: &[u8; 32] = codes[t * d / 2 + gi * 32..][..32].try_into().expect("32 bytes");
                        for j in 0..32 {
                            al[j] += ws * (c[j] & 15) as f32;
                            ah[j] += ws * (c[j] >> 4) as f32;
                        }
                        am += wm;
                    }
                    lo.iter_mut().zip(al).for_each(|(x, a)| *x += a + am);
                    hi.iter_mut().zip(ah).for_each(|(x, a)| *x += a + am);
                } else {
                    for (t, &wt) in w.iter().enumerate() {
                        let (ws, wm) = (wt * scales[t * groups + gi], wt * mins[t * groups + gi]);
                        let bytes = &codes[t * d / 2 + gi * half..][..half];
                        for ((a, b), &c) in lo.iter_mut().zip(hi.iter_mut()).zip(bytes) {
                            *a += ws * (c & 15) as f32 + wm;
                            *b += ws * (c >> 4) as f32 + wm;
                        }
                    }
                }
            }
        }
    }
}

thread_local! {
    /// Set by [`with_widened_attention`] on the calling thread.
    static WIDENED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with attention over quantized layers taking the generic path on this thread (codes
/// widened to a full-precision copy of the layer, then the backend's attention) instead of
/// [`decode_attention`]: the reference the kernel is tested against, step for step, on the same
/// cache operations.
pub fn with_widened_attention<R>(f: impl FnOnce() -> R) -> R {
    let before = WIDENED.replace(true);
    let out = f();
    WIDENED.set(before);
    out
}

/// Whether [`with_widened_attention`] is in force on this thread.
pub fn widened_attention() -> bool {
    WIDENED.get()
}

/// One decode step's attention over a quantized layer (one query per head, output only).
#[derive(Clone, Copy, Debug)]
pub struct QuantDecode<'a> {
    /// Queries `[batch, q_heads, head_dim]` f32 (after RoPE).
    pub q: &'a [f32],
    /// The layer's first slots as codes.
    pub quant: &'a QuantKv,
    /// The residual window's keys and values `[batch * kv_heads, residual, head_dim]` f32.
    pub keys: &'a [f32],
    /// As `keys`.
    pub values: &'a [f32],
    /// Tokens in the residual window (>= 1).
    pub residual: usize,
    /// Real slots `[batch, kv_heads, quant.len() + residual]`; `None` = all.
    pub valid: Option<&'a [bool]>,
    /// Batch.
    pub batch: usize,
    /// Query heads (a multiple of the KV heads).
    pub q_heads: usize,
    /// Score scale (`1/sqrt(head_dim)`).
    pub scale: f32,
}

/// Attention of one query per head over `quant.len()` quantized slots then `residual`
/// full-precision ones: flash-decoding over key tiles ([`KEY_TILE`]; tasks per batch, KV head and
/// tile on the rayon pool). Scores come from the key codes 16 tokens at a time (channel-major
/// blocks: the query's channels broadcast against 16 keys' codes, each group's dot product scaled
/// once), values accumulate from their codes row by row; nothing is widened into memory, so a
/// step reads the codes and scales and nothing else. Output `[batch, q_heads, head_dim]`.
///
/// # Panics
/// On inconsistent lengths (a caller bug: the burn wrapper derives them from tensor shapes).
pub fn decode_attention(a: &QuantDecode<'_>) -> Vec<f32> {
    let (d, ql, r) = (a.quant.head_dim, a.quant.len, a.residual);
    let rows = a.quant.rows();
    let hkv = rows / a.batch.max(1);
    let len = ql + r;
    assert!(hkv > 0 && a.q_heads % hkv == 0 && a.q.len() == a.batch * a.q_heads * d, "quantized decode attention: inconsistent shapes");
    assert!(a.keys.len() == rows * r * d && a.values.len() == a.keys.len(), "quantized decode attention: inconsistent residual");
    assert!(a.valid.is_none_or(|v| v.len() == rows * len), "quantized decode attention: inconsistent mask");
    let g = a.q_heads / hkv;
    let (cg, bits) = (channel_group(d), a.quant.spec.bits);
    let groups = d / cg;
    let tiles = len.div_ceil(KEY_TILE);
    let tasks: Vec<(usize, usize)> = (0..rows).flat_map(|row| (0..tiles).map(move |t| (row, t))).collect();
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(row, t)| {
            let (t0, tn) = (t * KEY_TILE, KEY_TILE.min(len - t * KEY_TILE));
            let qn = ql.saturating_sub(t0).min(tn);
            let rn = tn - qn;
            let (bi, kv) = (row / hkv, row % hkv);
            let q: Vec<f32> = a.q[(bi * a.q_heads + kv * g) * d..][..g * d].iter().map(|x| x * a.scale).collect();
            let (kq, vq) = (&a.quant.keys[row], &a.quant.values[row]);
            let widen = |x: &[f16]| {
                let mut out = vec![0f32; x.len()];
                x.convert_to_f32_slice(&mut out);
                out
            };
            // scores: quantized slots block by block, then the residual window's
            let mut s = vec![0f32; g * tn];
            let mut blk = vec![0f32; g * KEY_BLOCK];
            let mut sc = vec![0f32; groups * KEY_BLOCK];
            let (mut qs, mut bias) = (vec![0f32; g * d], vec![0f32; g]);
            // 16-bit keys: the tile's words, each block widened into a buffer that stays in L1
            let (kw, mut kbuf) = if a.quant.spec.is_float() && qn > 0 {
                (words(&kq.codes[t0 * 2 * d..(t0 + qn).div_ceil(KEY_BLOCK) * KEY_BLOCK * 2 * d]), vec![0f32; KEY_BLOCK * d])
            } else {
                (Cow::Borrowed(&[][..]), Vec::new())
            };
            for b0 in (0..qn).step_by(KEY_BLOCK) {
                let t = t0 + b0;
                match bits {
                    KvBits::Int8 => {
                        let nb = KEY_BLOCK.min(ql - t);
                        if groups == 1 {
                            kq.scales[t..t + nb].convert_to_f32_slice(&mut sc[..nb]);
                        } else {
                            let token_major = widen(&kq.scales[t * groups..(t + nb) * groups]);
                            for (l, tok) in token_major.chunks_exact(groups).enumerate() {
                                for (gi, &x) in tok.iter().enumerate() {
                                    sc[gi * KEY_BLOCK + l] = x;
                                }
                            }
                        }
                        simd_q::scores_i8(&q, &kq.codes[t * d..][..KEY_BLOCK * d], &sc, cg, &mut blk);
                    }
                    KvBits::F16 | KvBits::Bf16 => {
                        widen_halves(bits, &kw[b0 * d..][..KEY_BLOCK * d], &mut kbuf);
                        simd_q::scores_f32(&q, &kbuf, &mut blk);
                    }
                    KvBits::Int4 => {
                        if t % TOKEN_GROUP == 0 {
                            // a new token group: its channel scales folded into the query, its
                            // mins into a bias per query row
                            let p = t / TOKEN_GROUP * d;
                            let (gs, gm) = (widen(&kq.scales[p..p + d]), widen(&kq.mins[p..p + d]));
                            for ((qr, qsr), b) in q.chunks_exact(d).zip(qs.chunks_exact_mut(d)).zip(bias.iter_mut()) {
                                qsr.iter_mut().zip(qr).zip(&gs).for_each(|((o, x), s)| *o = x * s);
                                *b = qr.iter().zip(&gm).map(|(x, m)| x * m).sum();
                            }
                        }
                        simd_q::scores_u4(&qs, &bias, &kq.codes[t * d / 2..][..KEY_BLOCK * d / 2], &mut blk);
                    }
                }
                let n = KEY_BLOCK.min(qn - b0);
                for (dst, src) in s.chunks_exact_mut(tn).zip(blk.chunks_exact(KEY_BLOCK)) {
                    dst[b0..b0 + n].copy_from_slice(&src[..n]);
                }
            }
            let r0 = (t0 + qn).saturating_sub(ql);
            let (rk, rv) = (&a.keys[(row * r + r0) * d..][..rn * d], &a.values[(row * r + r0) * d..][..rn * d]);
            if rn > 0 {
                let mut sr = vec![0f32; g * rn];
                simd::scores(&q, rk, d, 1.0, &mut sr);
                for (dst, src) in s.chunks_exact_mut(tn).zip(sr.chunks_exact(rn)) {
                    dst[qn..].copy_from_slice(src);
                }
            }
            let (mx, l) = tile_softmax(&mut s, tn, a.valid.map(|m| &m[row * len + t0..row * len + t0 + tn]));
            // values: the codes' rows weighted in place, then the residual window's
            let mut out = vec![0f32; g * d];
            if qn > 0 && a.quant.spec.is_float() {
                // 16-bit values: widened VALUE_CHUNK tokens at a time (a buffer that stays in L1),
                // the output sums kept in registers over each chunk
                let w = words(&vq.codes[t0 * 2 * d..(t0 + qn) * 2 * d]);
                let mut vbuf = vec![0f32; VALUE_CHUNK * d];
                for c0 in (0..qn).step_by(VALUE_CHUNK) {
                    let cn = VALUE_CHUNK.min(qn - c0);
                    widen_halves(bits, &w[c0 * d..(c0 + cn) * d], &mut vbuf[..cn * d]);
                    simd_q::weighted_f32(&s[c0..], tn, &vbuf[..cn * d], d, &mut out);
                }
            } else if qn > 0 {
                let sc = widen(&vq.scales[t0 * groups..(t0 + qn) * groups]);
                match bits {
                    KvBits::Int8 => simd_q::weighted_i8(&s, tn, &vq.codes[t0 * d..(t0 + qn) * d], &sc, d, cg, &mut out),
                    KvBits::Int4 => {
                        let mn = widen(&vq.mins[t0 * groups..(t0 + qn) * groups]);
                        simd_q::weighted_u4(&s, tn, &vq.codes[t0 * d / 2..(t0 + qn) * d / 2], &sc, &mn, d, cg, &mut out)
                    }
                    KvBits::F16 | KvBits::Bf16 => unreachable!("16-bit values are weighted above"),
                }
            }
            if rn > 0 {
                let pr: Vec<f32> = s.chunks_exact(tn).flat_map(|row| row[qn..].iter().copied()).collect();
                simd::weighted_rows(&pr, rv, d, &mut out);
            }
            (mx, l, out)
        })
        .collect();
    merge_tiles(&parts, a.batch, hkv, g, d, tiles)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values with a few outlier channels (as keys have).
    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let u = (x as f32 / u32::MAX as f32) * 2.0 - 1.0;
                if i % 64 == 3 { u * 20.0 } else { u }
            })
            .collect()
    }

    /// Every format round-trips within half a step of its scale, per element, and the storage
    /// holds the bytes the format says.
    #[test]
    fn round_trip_within_half_a_step() {
        for (spec, d) in [(KvQuant::int8(), 64), (KvQuant::int8(), 128), (KvQuant::int8(), 48), (KvQuant::int4(), 64), (KvQuant::int4(), 128), (KvQuant::int4(), 6), (KvQuant::f16(), 64), (KvQuant::bf16(), 48)] {
            let (rows, n) = (3, 2 * TOKEN_GROUP);
            let (k, v) = (data(rows * n * d, 1), data(rows * n * d, 2));
            let mut q = QuantKv::new(spec, rows, d).unwrap();
            q.push(&k[..], &v[..], n);
            assert_eq!(q.len(), n);
            let (dk, dv) = q.to_f32();
            for (name, x, y) in [("keys", &k, &dk), ("values", &v, &dv)] {
                for r in 0..rows {
                    for t in 0..n {
                        let i = (r * n + t) * d;
                        let (xs, ys) = (&x[i..i + d], &y[i..i + d]);
                        for c in 0..d {
                            // the step of the element's group: per token (int8, int4 values) or per
                            // channel over the token group (int4 keys)
                            let step = match (spec.bits, name) {
                                // a 16-bit float's step: 2^-10 (f16) or 2^-7 (bf16) of the
                                // element's power of two
                                (KvBits::F16, _) => xs[c].abs() * 2f32.powi(-10),
                                (KvBits::Bf16, _) => xs[c].abs() * 2f32.powi(-7),
                                (KvBits::Int8, _) => {
                                    let cg = channel_group(d);
                                    xs[c / cg * cg..][..cg].iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0
                                }
                                (KvBits::Int4, "values") => {
                                    let cg = channel_group(d);
                                    let g = &xs[c / cg * cg..][..cg];
                                    (g.iter().fold(f32::MIN, |m, &v| m.max(v)) - g.iter().fold(f32::MAX, |m, &v| m.min(v))) / 15.0
                                }
                                _ => {
                                    let g0 = (r * n + t / TOKEN_GROUP * TOKEN_GROUP) * d;
                                    let col: Vec<f32> = (0..TOKEN_GROUP).map(|j| x[g0 + j * d + c]).collect();
                                    (col.iter().fold(f32::MIN, |m, &v| m.max(v)) - col.iter().fold(f32::MAX, |m, &v| m.min(v))) / 15.0
                                }
                            };
                            let err = (xs[c] - ys[c]).abs();
                            // integer codes: their f16 scales' rounding too; f16: its subnormals' step
                            let slack = if spec.is_float() { 3e-8 } else { 2e-3 * xs[c].abs().max(step) };
                            assert!(err <= 0.5 * step * 1.01 + slack, "{spec:?} d {d} {name} r {r} t {t} c {c}: {} vs {}", xs[c], ys[c]);
                        }
                    }
                }
            }
            let per_token = spec.bytes_per_token(d);
            assert_eq!(q.bytes() as f64, per_token * (rows * n) as f64, "{spec:?} d {d}");
        }
        // the goals, against f16's 4 bytes per channel (keys + values)
        assert!(KvQuant::int8().bytes_per_token(64) / 256.0 <= 0.53 && KvQuant::int8().bytes_per_token(128) / 512.0 <= 0.53);
        assert!(KvQuant::int4().bytes_per_token(64) / 256.0 <= 0.30 && KvQuant::int4().bytes_per_token(128) / 512.0 <= 0.30);
    }

    /// The f16 widening (F16C where the CPU has it) equals the format's definition on every bit
    /// pattern (sign, 5-bit exponent biased by 15, subnormals, infinities; NaNs as NaN),
    /// including a tail shorter than eight.
    #[test]
    fn f16_widening_is_exact_for_every_pattern() {
        let defined = |h: u16| {
            let sign = if h & 0x8000 != 0 { -1f32 } else { 1.0 };
            let (e, m) = (i32::from((h >> 10) & 0x1f), f32::from(h & 0x3ff));
            match e {
                0 => sign * m * 2f32.powi(-24),
                31 if m == 0.0 => sign * f32::INFINITY,
                31 => f32::NAN,
                _ => sign * (1.0 + m / 1024.0) * 2f32.powi(e - 15),
            }
        };
        let all: Vec<u16> = (0..=u16::MAX).chain(0..5).collect();
        let mut out = vec![0f32; all.len()];
        crate::kernels::host::widen_f16(&all, &mut out);
        for (&w, &x) in all.iter().zip(&out) {
            let want = defined(w);
            assert!(x.to_bits() == want.to_bits() || (x.is_nan() && want.is_nan()), "{w:#06x}: {x} vs {want}");
        }
    }

    /// Stored 16-bit words read back the same from any byte offset (borrowed when aligned, copied
    /// when not).
    #[test]
    fn words_read_little_endian_at_any_alignment() {
        let b = [1u8, 2, 3, 4, 5];
        assert_eq!((&*words(&b[..4]), &*words(&b[1..])), (&[0x0201u16, 0x0403][..], &[0x0302u16, 0x0504][..]));
    }

    #[test]
    fn flush_keeps_the_newest_token_and_whole_groups() {
        let (i8q, i4q) = (KvQuant::int8(), KvQuant::int4());
        assert_eq!((i8q.flush_count(1), i8q.flush_count(2), i8q.flush_count(100)), (0, 1, 99));
        assert_eq!((i4q.flush_count(128), i4q.flush_count(129), i4q.flush_count(1000)), (0, 128, 960));
        let small = KvQuant { bits: KvBits::Int4, residual: 0 };
        assert_eq!((small.flush_count(64), small.flush_count(65)), (0, 64));
        assert!(KvQuant::parse("int3").is_err());
        assert_eq!(KvQuant::parse("F32").unwrap(), None);
        assert_eq!((KvQuant::parse("f16").unwrap(), KvQuant::parse("bf16").unwrap()), (Some(KvQuant::f16()), Some(KvQuant::bf16())));
        // 16-bit storage is for a model in f32; a half-precision model's float cache is its own
        use burn::tensor::DType;
        assert_eq!(KvQuant::parse_for("bf16", DType::F32).unwrap(), Some(KvQuant::bf16()));
        assert_eq!(KvQuant::parse_for("bf16", DType::BF16).unwrap(), None);
        assert!(KvQuant::parse_for("f16", DType::BF16).is_err() && KvQuant::parse_for("f32", DType::F16).is_err());
        assert_eq!((KvQuant::f16().flush_count(1), KvQuant::bf16().flush_count(10)), (0, 9));
        assert!(KvQuant::int4().check(7).is_err() && KvQuant::int8().check(7).is_ok());
    }

    /// Values beyond f16's range, zeros and NaN neither panic nor leave a non-finite scale (nor,
    /// in f16 storage, an infinite key: it saturates).
    #[test]
    fn extreme_values_stay_finite() {
        for spec in [KvQuant::int8(), KvQuant::int4(), KvQuant::f16(), KvQuant::bf16()] {
            let mut x = vec![0f32; 64 * 64];
            x[5] = 1e30;
            x[6] = f32::NAN;
            x[7] = -1e30;
            let mut q = QuantKv::new(spec, 1, 64).unwrap();
            q.push(&x, &x, 64);
            assert!(q.keys()[0].scales.iter().chain(&q.values()[0].scales).chain(&q.keys()[0].mins).all(|s| s.is_finite()));
            let (k, _) = q.to_f32();
            assert_eq!(k[64], 0.0);
            if spec.is_float() {
                assert!(k[5].is_finite() && k[7].is_finite() && k[5] > 6e4 && k[7] < -6e4, "{spec:?}: {} {}", k[5], k[7]);
            }
        }
    }

    /// The decode kernel equals attention over the widened codes, computed in f64.
    #[test]
    fn decode_matches_f64_over_the_widened_codes() {
        // head_dim 64, and for 16-bit storage 48 (not whole 64-channel groups) and 7 (odd)
        for (spec, ql, r, d) in [(KvQuant::int8(), 1000, 1, 64), (KvQuant::int4(), 1024, 77, 64), (KvQuant::int4(), 0, 5, 64), (KvQuant::int8(), 64, 600, 64), (KvQuant::bf16(), 1000, 1, 64), (KvQuant::f16(), 300, 300, 64), (KvQuant::bf16(), 300, 5, 48), (KvQuant::f16(), 40, 3, 7)] {
            let (b, hkv, g) = (2, 3, 2);
            let rows = b * hkv;
            let mut quant = QuantKv::new(spec, rows, d).unwrap();
            if ql > 0 {
                quant.push(&data(rows * ql * d, 3), &data(rows * ql * d, 4), ql);
            }
            let (rk, rv) = (data(rows * r * d, 5), data(rows * r * d, 6));
            let q = data(b * hkv * g * d, 7);
            let len = ql + r;
            let valid: Vec<bool> = (0..rows * len).map(|i| i % 7 != 2 || i % len == len - 1).collect();
            let out = decode_attention(&QuantDecode {
                q: &q,
                quant: &quant,
                keys: &rk,
                values: &rv,
                residual: r,
                valid: Some(&valid),
                batch: b,
                q_heads: hkv * g,
                scale: 0.125,
            });
            let (qk, qv) = quant.to_f32();
            for row in 0..rows {
                let key = |t: usize| if t < ql { &qk[(row * ql + t) * d..][..d] } else { &rk[(row * r + t - ql) * d..][..d] };
                let val = |t: usize| if t < ql { &qv[(row * ql + t) * d..][..d] } else { &rv[(row * r + t - ql) * d..][..d] };
                for gi in 0..g {
                    let h = (row % hkv) * g + gi;
                    let qh = &q[((row / hkv) * hkv * g + h) * d..][..d];
                    let s: Vec<f64> = (0..len)
                        .map(|t| if valid[row * len + t] { 0.125 * key(t).iter().zip(qh).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() } else { f64::NEG_INFINITY })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = w.iter().sum();
                    let got = &out[((row / hkv) * hkv * g + h) * d..][..d];
                    for c in 0..d {
                        let want = (0..len).map(|t| w[t] * val(t)[c] as f64).sum::<f64>() / z;
                        assert!((got[c] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "{spec:?} row {row} head {gi} c {c}: {} vs {want}", got[c]);
                    }
                }
            }
        }
    }
}
