//! A KV cache saved to a file and loaded back (compress a document once, answer questions on it
//! later, in another process, without prefilling it again).
//!
//! The file is safetensors (the `safetensors` crate: the format's own reader bounds every offset
//! and length): per layer `layers.{i}.keys` and `layers.{i}.values` (`[batch, kv_heads, len,
//! head_dim]`, the cache's float dtype: F32, F16 or BF16), `layers.{i}.positions` (U32 `[batch,
//! kv_heads, len]`, original token positions) and, for layers whose heads keep different numbers
//! of tokens, `layers.{i}.valid` (U8 0/1 `[batch, kv_heads, len]`, the per-head masks). The
//! safetensors metadata holds `format` = [`FORMAT`] and `kvc` = the [`CacheHeader`] as JSON (model
//! fingerprint, next position, context tokens, the press that compressed it, the KV format).
//!
//! A quantized cache (format 2, [`CacheHeader::kv_quant`] set): `keys` / `values` hold each
//! layer's residual window (`[batch, kv_heads, residual, head_dim]`), positions and masks cover
//! all `len` slots, and the codes of the slots before the window are
//! `layers.{i}.{key,value}_{codes,scales,mins}` (U8 `[batch * kv_heads, bytes]`, F16 `[batch *
//! kv_heads, n]`; mins for int4 only; absent while a layer has no code yet), laid out as
//! [`crate::kvquant::QuantRows`]. Format 1 files (float caches, before quantization existed) still
//! load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::kvquant::{QuantKv, QuantRows};
use crate::{KvCache, KvQuant, LayerKv, PressSpec};

/// The `format` metadata value written; a file with another value than this or [`FORMAT_V1`] is
/// refused.
pub const FORMAT: &str = "kvc-kv-cache/2";
/// The format of float caches written before quantized ones existed (read, not written).
pub const FORMAT_V1: &str = "kvc-kv-cache/1";

/// What a saved cache says about itself (the `kvc` metadata entry, JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheHeader {
    /// Fingerprint of the model (and weight dtype) that filled the cache; a cache only makes sense
    /// to the model that wrote it. kvc-models computes it (`Decoder::fingerprint`).
    pub model: String,
    /// Layers, KV heads and head size of that model (for error messages and shape checks).
    pub num_layers: usize,
    /// KV heads per layer.
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Original position of the next token fed after the cache (the context's length).
    pub next_position: usize,
    /// Context tokens prefilled into the cache (before compression).
    pub context_tokens: usize,
    /// The press that compressed the cache; `None` for an uncompressed one.
    pub press: Option<PressSpec>,
    /// Whether the context was wrapped in the model's chat template (questions must be too).
    pub chat: bool,
    /// The codes keys and values are stored as ([`KvCache::quantize`]); `None` (and absent from
    /// format 1 files): the float dtype of the tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_quant: Option<KvQuant>,
}

/// A cache file that cannot be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum CacheFileError {
    /// Reading or writing the file failed.
    #[error("cannot read or write the KV-cache file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a kvc cache or is damaged.
    #[error("{path}: not a valid kvc KV-cache file: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The cache cannot be saved (an empty layer, an unsupported dtype).
    #[error("cannot save the KV cache: {0}")]
    Unsavable(String),
}

fn st_dtype(dtype: DType) -> Option<Dtype> {
    match dtype {
        DType::F32 => Some(Dtype::F32),
        DType::F16 => Some(Dtype::F16),
        DType::BF16 => Some(Dtype::BF16),
        _ => None,
    }
}

fn burn_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

impl<B: Backend> KvCache<B> {
    /// Writes the cache to `path` (safetensors, see the module docs), through a temporary file
    /// renamed into place, so a crash never leaves half a file under the name.
    ///
    /// Keys and values are read back from the device (a copy of the cache in host memory while
    /// it is written).
    ///
    /// # Errors
    /// [`CacheFileError::Unsavable`] for an empty layer or a dtype other than F32/F16/BF16,
    /// [`CacheFileError::Io`].
    pub fn save(&self, path: &Path, header: &CacheHeader) -> Result<(), CacheFileError> {
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for layer in 0..self.num_layers() {
            let Ok(Some(kv)) = self.layer(layer) else {
                return Err(CacheFileError::Unsavable(format!("layer {layer} is empty (nothing was prefilled)")));
            };
            let shape = kv.keys.dims().to_vec();
            for (name, t) in [("keys", &kv.keys), ("values", &kv.values)] {
                let data = t.clone().into_data();
                let dtype = st_dtype(data.dtype).ok_or_else(|| CacheFileError::Unsavable(format!("{:?} tensors", data.dtype)))?;
                owned.push((format!("layers.{layer}.{name}"), dtype, shape.clone(), data.as_bytes().to_vec()));
            }
            let slots = vec![shape[0], shape[1], kv.len()];
            let positions = kv.positions.iter().flat_map(|p| p.to_le_bytes()).collect();
            owned.push((format!("layers.{layer}.positions"), Dtype::U32, slots.clone(), positions));
            if let Some(valid) = &kv.valid {
                owned.push((format!("layers.{layer}.valid"), Dtype::U8, slots, valid.iter().map(|&v| v as u8).collect()));
            }
            if kv.quant.as_ref().map(|q| q.spec()) != header.kv_quant {
                return Err(CacheFileError::Unsavable(format!("layer {layer}'s storage differs from the header's KV format {:?}", header.kv_quant)));
            }
            if let Some(q) = kv.quant.as_ref().filter(|q| !q.is_empty()) {
                for (name, rows) in [("key", q.keys()), ("value", q.values())] {
                    let n = rows.len();
                    let cat = |f: &dyn Fn(&QuantRows) -> Vec<u8>| rows.iter().flat_map(f).collect::<Vec<u8>>();
                    let halves = |x: &[half::f16]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
                    owned.push((format!("layers.{layer}.{name}_codes"), Dtype::U8, vec![n, rows[0].codes.len()], cat(&|r| r.codes.clone())));
                    owned.push((format!("layers.{layer}.{name}_scales"), Dtype::F16, vec![n, rows[0].scales.len()], cat(&|r| halves(&r.scales))));
                    if !rows[0].mins.is_empty() {
                        owned.push((format!("layers.{layer}.{name}_mins"), Dtype::F16, vec![n, rows[0].mins.len()], cat(&|r| halves(&r.mins))));
                    }
                }
            }
        }
        let mut views = Vec::with_capacity(owned.len());
        for (name, dtype, shape, bytes) in &owned {
            let view = TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| CacheFileError::Unsavable(e.to_string()))?;
            views.push((name.clone(), view));
        }
        let header_json = serde_json::to_string(header).map_err(|e| CacheFileError::Unsavable(e.to_string()))?;
        let meta = HashMap::from([("format".to_string(), FORMAT.to_string()), ("kvc".to_string(), header_json)]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| CacheFileError::Unsavable(e.to_string()))?;
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        let tmp = path.with_file_name(name);
        let io = |source| CacheFileError::Io { path: path.to_path_buf(), source };
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads a cache written by [`KvCache::save`] onto `device`, checking everything it can
    /// without the model: the format tag, the header, every layer present with keys, values and
    /// positions of one shape (`[1, num_kv_heads, len, head_dim]` as the header says), a float
    /// dtype, positions below `next_position`, masks that leave every head at least one token.
    /// The caller checks the header's model fingerprint against its model.
    ///
    /// # Errors
    /// [`CacheFileError::Io`], [`CacheFileError::Invalid`] naming what is wrong.
    pub fn load(path: &Path, device: &B::Device) -> Result<(Self, CacheHeader), CacheFileError> {
        let bytes = std::fs::read(path).map_err(|source| CacheFileError::Io { path: path.to_path_buf(), source })?;
        let invalid = |reason: String| CacheFileError::Invalid { path: path.to_path_buf(), reason };
        let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| invalid(format!("damaged or truncated, or not safetensors ({e})")))?;
        let meta = metadata.metadata().clone().unwrap_or_default();
        match meta.get("format") {
            Some(f) if f == FORMAT || f == FORMAT_V1 => {}
            Some(f) => return Err(invalid(format!("format {f:?}, expected {FORMAT:?} (or {FORMAT_V1:?})"))),
            None => return Err(invalid("no kvc format tag (a safetensors file, but not a saved KV cache)".into())),
        }
        let header: CacheHeader = serde_json::from_str(meta.get("kvc").ok_or_else(|| invalid("no kvc header".into()))?)
            .map_err(|e| invalid(format!("header: {e}")))?;
        let (layers, heads, dim) = (header.num_layers, header.num_kv_heads, header.head_dim);
        if layers == 0 || heads == 0 || dim == 0 {
            return Err(invalid("a header with 0 layers, heads or head size".into()));
        }
        if header.context_tokens != header.next_position {
            return Err(invalid(format!("{} context tokens but next position {}", header.context_tokens, header.next_position)));
        }
        if meta.get("format").is_some_and(|f| f == FORMAT_V1) && header.kv_quant.is_some() {
            return Err(invalid("a format 1 file with a KV format (quantized caches are format 2)".into()));
        }
        if let Some(q) = header.kv_quant {
            q.check(dim).map_err(|e| invalid(e.to_string()))?;
        }
        let st = SafeTensors::deserialize(&bytes).map_err(|e| invalid(format!("damaged or truncated ({e})")))?;
        let expected = layers.checked_mul(3).ok_or_else(|| invalid("layer count overflows".into()))?;
        if st.len() < expected {
            return Err(invalid(format!("{} tensors for {layers} layers (at least {expected} needed)", st.len())));
        }
        let mut cache = KvCache::new(layers);
        for layer in 0..layers {
            let get = |name: &str| st.tensor(&format!("layers.{layer}.{name}")).map_err(|e| invalid(format!("layer {layer}: {e}")));
            let (keys, values, positions) = (get("keys")?, get("values")?, get("positions")?);
            let shape = keys.shape().to_vec();
            if shape.len() != 4 || shape[0] != 1 || shape[1] != heads || shape[3] != dim || shape[2] == 0 {
                return Err(invalid(format!("layer {layer}: keys of shape {shape:?}, expected [1, {heads}, len >= 1, {dim}]")));
            }
            if values.shape() != shape.as_slice() || values.dtype() != keys.dtype() {
                return Err(invalid(format!("layer {layer}: values {:?} {:?} differ from keys {shape:?} {:?}", values.shape(), values.dtype(), keys.dtype())));
            }
            let dtype = burn_dtype(keys.dtype()).ok_or_else(|| invalid(format!("layer {layer}: {:?} keys (F32, F16 or BF16 expected)", keys.dtype())))?;
            if !B::supports_dtype(device, dtype) {
                return Err(invalid(format!("{dtype:?} keys and values, which this backend does not support (load it on one that does, e.g. flex)")));
            }
            let quant = match header.kv_quant {
                Some(spec) => Some(read_codes(&st, layer, spec, heads, dim).map_err(|e| invalid(format!("layer {layer}: {e}")))?),
                None => None,
            };
            let total = shape[2] + quant.as_ref().map_or(0, QuantKv::len);
            let slots = vec![1, heads, total];
            if positions.shape() != slots.as_slice() || positions.dtype() != Dtype::U32 {
                return Err(invalid(format!("layer {layer}: positions {:?} {:?}, expected U32 {slots:?}", positions.dtype(), positions.shape())));
            }
            let pos: Vec<u32> = positions.data().chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            if let Some(p) = pos.iter().find(|&&p| p as usize >= header.next_position) {
                return Err(invalid(format!("layer {layer}: position {p} at or after the next position {}", header.next_position)));
            }
            let valid = match st.tensor(&format!("layers.{layer}.valid")) {
                Ok(v) => {
                    if v.shape() != slots.as_slice() || v.dtype() != Dtype::U8 || v.data().iter().any(|&x| x > 1) {
                        return Err(invalid(format!("layer {layer}: masks must be U8 0/1 of shape {slots:?}")));
                    }
                    let valid: Vec<bool> = v.data().iter().map(|&x| x == 1).collect();
                    if valid.chunks(total).any(|head| !head.contains(&true)) {
                        return Err(invalid(format!("layer {layer}: a head whose mask keeps no token")));
                    }
                    Some(valid)
                }
                Err(_) => None,
            };
            let tensor = |view: &TensorView| {
                Tensor::<B, 4>::from_data(TensorData::from_bytes_vec(view.data().to_vec(), shape.clone(), dtype), (device, dtype))
            };
            let mut kv = LayerKv::new(tensor(&keys), tensor(&values), pos, valid);
            kv.quant = quant.map(std::sync::Arc::new);
            cache.replace_layer(layer, kv).map_err(|e| invalid(e.to_string()))?;
        }
        cache.set_next_position(header.next_position);
        Ok((cache, header))
    }
}

/// A layer's codes ([`KvCache::save`]'s `{key,value}_{codes,scales,mins}`), every size checked
/// ([`QuantKv::from_parts`]); none stored = no token quantized yet.
fn read_codes(st: &SafeTensors<'_>, layer: usize, spec: KvQuant, heads: usize, dim: usize) -> Result<QuantKv, String> {
    let get = |name: &str, dtype: Dtype| -> Result<Option<Vec<Vec<u8>>>, String> {
        let Ok(t) = st.tensor(&format!("layers.{layer}.{name}")) else { return Ok(None) };
        let shape = t.shape();
        if t.dtype() != dtype || shape.len() != 2 || shape[0] != heads {
            return Err(format!("{name}: {:?} {shape:?}, expected {dtype:?} [{heads}, n]", t.dtype()));
        }
        let width = t.data().len() / heads;
        if width == 0 {
            return Ok(Some(vec![Vec::new(); heads]));
        }
        Ok(Some(t.data().chunks(width).map(<[u8]>::to_vec).collect()))
    };
    let halves = |rows: Vec<Vec<u8>>| rows.into_iter().map(|r| r.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect::<Vec<_>>()).collect::<Vec<_>>();
    let mut parts = Vec::new();
    for name in ["key", "value"] {
        let codes = get(&format!("{name}_codes"), Dtype::U8)?;
        let scales = get(&format!("{name}_scales"), Dtype::F16)?.map(halves);
        let mins = get(&format!("{name}_mins"), Dtype::F16)?.map(halves);
        parts.push((codes, scales, mins));
    }
    if parts.iter().all(|p| p.0.is_none() && p.1.is_none() && p.2.is_none()) {
        return QuantKv::new(spec, heads, dim).map_err(|e| e.to_string());
    }
    let mut rows = Vec::new();
    for (codes, scales, mins) in parts {
        let codes = codes.ok_or("codes missing beside their scales")?;
        let scales = scales.ok_or("scales missing beside their codes")?;
        let mins = mins.unwrap_or_else(|| vec![Vec::new(); heads]);
        rows.push(codes.into_iter().zip(scales).zip(mins).map(|((codes, scales), mins)| QuantRows { codes, scales, mins }).collect::<Vec<_>>());
    }
    let values = rows.pop().unwrap_or_default();
    let keys = rows.pop().unwrap_or_default();
    // the token count from the values' codes (token-major, unpadded); from_parts checks the rest
    let bytes = values.first().map_or(0, |r| r.codes.len());
    let len = QuantKv::tokens_of_value_codes(spec, dim, bytes).ok_or_else(|| format!("{bytes} value code bytes per head: not whole tokens"))?;
    QuantKv::from_parts(spec, dim, len, keys, values).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    fn header(next_position: usize) -> CacheHeader {
        CacheHeader {
            model: "0123456789abcdef".into(),
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 3,
            next_position,
            context_tokens: 6,
            press: Some(PressSpec::new("kvcompose", crate::Budget::Ratio(0.5)).with_option("structured", false)),
            chat: true,
            kv_quant: None,
        }
    }

    /// Two layers of different lengths, the second with ragged heads (per-head masks).
    fn cache() -> KvCache<B> {
        let device = Default::default();
        let mut cache = KvCache::<B>::new(2);
        let ramp = |len: usize, offset: f32| {
            let v: Vec<f32> = (0..2 * len * 3).map(|i| i as f32 * 0.5 + offset).collect();
            Tensor::<B, 4>::from_data(TensorData::new(v, [1, 2, len, 3]), &device)
        };
        let kv0 = LayerKv::new(ramp(4, 0.0), ramp(4, 100.0), vec![0, 1, 4, 5, 0, 2, 3, 5], None);
        let kv1 = LayerKv::new(ramp(3, -7.0), ramp(3, 9.0), vec![1, 2, 5, 0, 3, 3], Some(vec![true, true, true, true, true, false]));
        cache.replace_layer(0, kv0).unwrap();
        cache.replace_layer(1, kv1).unwrap();
        cache.set_next_position(6);
        cache
    }

    fn floats(t: &Tensor<B, 4>) -> Vec<f32> {
        t.clone().into_data().to_vec::<f32>().unwrap()
    }

    #[test]
    fn save_then_load_gives_back_every_layer() {
        let dir = tempfile_dir();
        let path = dir.join("c.kvc");
        let original = cache();
        original.save(&path, &header(6)).unwrap();
        let (loaded, h) = KvCache::<B>::load(&path, &Default::default()).unwrap();
        assert_eq!(h, header(6));
        assert_eq!(loaded.next_position(), 6);
        assert_eq!(loaded.lens(), vec![4, 3]);
        for l in 0..2 {
            let (a, b) = (original.layer(l).unwrap().unwrap(), loaded.layer(l).unwrap().unwrap());
            assert_eq!(floats(&a.keys), floats(&b.keys));
            assert_eq!(floats(&a.values), floats(&b.values));
            assert_eq!(a.positions, b.positions);
            assert_eq!(a.valid, b.valid);
        }
        assert_eq!(original.bytes(), loaded.bytes());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Every truncation and many byte flips of a valid file: an error or a cache that passes the
    /// checks, never a panic.
    #[test]
    fn damaged_files_are_errors() {
        let dir = tempfile_dir();
        let path = dir.join("c.kvc");
        cache().save(&path, &header(6)).unwrap();
        let good = std::fs::read(&path).unwrap();
        let bad = dir.join("bad.kvc");
        let load = |bytes: &[u8]| {
            std::fs::write(&bad, bytes).unwrap();
            KvCache::<B>::load(&bad, &Default::default())
        };
        for cut in 0..good.len() {
            assert!(load(&good[..cut]).is_err(), "truncated at {cut} loaded");
        }
        for i in 0..good.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = good.clone();
                b[i] ^= flip;
                let _ = load(&b);
            }
        }
        // a positions entry at or past the next position
        let mut h = header(6);
        (h.next_position, h.context_tokens) = (5, 5);
        cache().save(&path, &h).unwrap();
        let e = KvCache::<B>::load(&path, &Default::default()).unwrap_err().to_string();
        assert!(e.contains("next position"), "{e}");
        // another file format, a missing file
        let plain = safetensors::serialize([("x", TensorView::new(Dtype::F32, vec![1], &[0u8; 4]).unwrap())], None).unwrap();
        let e = load(&plain).unwrap_err().to_string();
        assert!(e.contains("not a saved KV cache"), "{e}");
        assert!(matches!(KvCache::<B>::load(&dir.join("none"), &Default::default()), Err(CacheFileError::Io { .. })));
        // an empty cache cannot be saved
        assert!(matches!(KvCache::<B>::new(2).save(&path, &header(6)), Err(CacheFileError::Unsavable(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A quantized cache (int8, int4, f16 and bf16, the second layer with ragged heads) comes back with the
    /// same codes, residual window, positions and masks; damaged copies are errors, never panics;
    /// a format 1 file (a float cache) still loads.
    #[test]
    fn quantized_caches_round_trip_and_format_1_still_loads() {
        let dir = tempfile_dir();
        let path = dir.join("q.kvc");
        let device = Default::default();
        for (spec, len) in [(KvQuant::int8(), 9), (KvQuant::int4(), 150), (KvQuant::f16(), 9), (KvQuant::bf16(), 20)] {
            let d = 4;
            let ramp = |offset: f32| {
                let v: Vec<f32> = (0..2 * len * d).map(|i| ((i * 7919) % 113) as f32 * 0.1 - 5.0 + offset).collect();
                Tensor::<B, 4>::from_data(TensorData::new(v, [1, 2, len, d]), &device)
            };
            let mut cache = KvCache::<B>::new(2);
            let pos: Vec<u32> = (0..2 * len as u32).map(|i| i % len as u32).collect();
            let mut valid = vec![true; 2 * len];
            valid[len + 3] = false;
            cache.replace_layer(0, LayerKv::new(ramp(0.0), ramp(1.0), pos.clone(), None)).unwrap();
            cache.replace_layer(1, LayerKv::new(ramp(2.0), ramp(3.0), pos, Some(valid))).unwrap();
            cache.set_next_position(len);
            cache.quantize(spec).unwrap();
            let h = CacheHeader { head_dim: d, next_position: len, context_tokens: len, kv_quant: Some(spec), ..header(len) };
            // the header must say how the layers are stored
            assert!(matches!(cache.save(&path, &header(len)), Err(CacheFileError::Unsavable(_))));
            cache.save(&path, &h).unwrap();
            let (loaded, got) = KvCache::<B>::load(&path, &device).unwrap();
            assert_eq!(got, h);
            assert_eq!(loaded.bytes(), cache.bytes());
            for l in 0..2 {
                let (a, b) = (cache.layer(l).unwrap().unwrap(), loaded.layer(l).unwrap().unwrap());
                assert!(a.quant.as_ref().is_some_and(|q| q.len() > 0), "{spec:?}: nothing quantized");
                assert_eq!(a.quant, b.quant);
                assert_eq!((floats(&a.keys), floats(&a.values)), (floats(&b.keys), floats(&b.values)));
                assert_eq!((&a.positions, &a.valid), (&b.positions, &b.valid));
            }
            let good = std::fs::read(&path).unwrap();
            let bad = dir.join("bad.kvc");
            for i in (0..good.len()).step_by(3) {
                let mut b = good.clone();
                b[i] ^= 0x5a;
                std::fs::write(&bad, &b).unwrap();
                let _ = KvCache::<B>::load(&bad, &device);
                std::fs::write(&bad, &good[..i]).unwrap();
                assert!(KvCache::<B>::load(&bad, &device).is_err());
            }
        }
        // format 1: a float cache with the old tag
        cache().save(&path, &header(6)).unwrap();
        let v2 = std::fs::read(&path).unwrap();
        let at = v2.windows(FORMAT.len()).position(|w| w == FORMAT.as_bytes()).unwrap();
        let mut v1 = v2.clone();
        v1[at..at + FORMAT.len()].copy_from_slice(FORMAT_V1.as_bytes());
        std::fs::write(&path, &v1).unwrap();
        let (loaded, _) = KvCache::<B>::load(&path, &device).unwrap();
        assert_eq!(loaded.lens(), vec![4, 3]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Half-precision caches keep their dtype and bits through the file.
    #[test]
    fn half_precision_caches_round_trip() {
        type F = burn::backend::Flex;
        let dir = tempfile_dir();
        let path = dir.join("half.kvc");
        for dtype in [DType::F16, DType::BF16] {
            let device = Default::default();
            let v: Vec<f32> = (0..2 * 4 * 3).map(|i| i as f32 * 0.37 - 3.0).collect();
            let t = || Tensor::<F, 4>::from_data(TensorData::new(v.clone(), [1, 2, 4, 3]), (&device, dtype));
            let mut cache = KvCache::<F>::new(2);
            for l in 0..2 {
                let kv = LayerKv { keys: t(), values: t().neg(), positions: vec![0, 1, 2, 3, 0, 1, 2, 3], valid: None, quant: None };
                cache.replace_layer(l, kv).unwrap();
            }
            cache.set_next_position(6);
            cache.save(&path, &header(6)).unwrap();
            let (loaded, _) = KvCache::<F>::load(&path, &device).unwrap();
            let (a, b) = (cache.layer(1).unwrap().unwrap(), loaded.layer(1).unwrap().unwrap());
            assert_eq!(b.keys.dtype(), dtype);
            assert_eq!(a.values.to_data().as_bytes(), b.values.to_data().as_bytes(), "{dtype:?}");
            assert_eq!(loaded.bytes(), cache.bytes());
            // a backend without the dtype: an error, not a panic in the backend
            let e = KvCache::<B>::load(&path, &Default::default()).unwrap_err().to_string();
            assert!(e.contains("does not support"), "{e}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kvc-saved-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
