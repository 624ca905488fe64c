//! Weight sources: a GGUF file or a HF safetensors folder, both read as f32 tensors under HF names
//! (`model.layers.{i}.self_attn.q_proj.weight`, ...), in PyTorch layout (`[out, in]` for linear
//! weights).
//!
//! Safetensors are read with the `safetensors` crate (the parser burn-store itself uses) rather than
//! through burn-store's module store: both formats then feed one construction path
//! ([`crate::model::Decoder::from_source`]) that checks every shape against the config, GGUF needs
//! dequantization and llama.cpp's Q/K row permutation undone (which burn-store does not do), and
//! f16/bf16 files are widened to f32 on the host with `half`, so no backend ever sees a half
//! precision parameter it cannot cast.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::Architecture;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// A named f32 tensor in PyTorch layout.
pub type HostTensor = (Vec<f32>, Vec<usize>);

/// Something that yields model weights by HF name.
pub trait WeightSource {
    /// The tensor `name` (HF naming) as f32 with its PyTorch shape.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] when absent, or a format error.
    fn tensor(&self, name: &str) -> Result<HostTensor>;
    /// Whether `name` exists.
    fn contains(&self, name: &str) -> bool;
    /// The 2-D weight `name` (`[out, in]`) kept in its file's blocks of integer codes
    /// ([`kvc_core::QuantMatrix`]: ggml's `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0` and the
    /// K-quants `Q4_K`, `Q5_K`, `Q6_K`); `None` (the default) when the source holds it as floats
    /// or in another format. Its dequantized values are those of [`WeightSource::tensor`].
    fn quantized(&self, name: &str) -> Option<kvc_core::QuantMatrix> {
        let _ = name;
        None
    }
}

/// HF name -> GGUF name (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// Weights from a GGUF file, dequantized on request.
pub struct GgufWeights {
    file: GgufFile,
    architecture: Architecture,
    num_heads: usize,
    num_kv_heads: usize,
}

impl GgufWeights {
    /// Wraps an opened GGUF file. `num_heads`/`num_kv_heads` are needed to undo llama.cpp's Q/K
    /// row permutation for Llama-architecture files.
    pub fn new(file: GgufFile, architecture: Architecture, num_heads: usize, num_kv_heads: usize) -> Self {
        Self { file, architecture, num_heads, num_kv_heads }
    }

    /// The underlying file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

/// Undoes llama.cpp's `permute()` of Q/K rows (convert_hf_to_gguf.py, `LlamaModel.permute`):
/// GGUF row `h*hd + 2i + j` holds HF row `h*hd + j*hd/2 + i`. Works for weights `[out, in]` and
/// biases `[out]` (`cols` = 1).
pub fn unpermute_rows<T: Copy + Default>(data: &[T], rows: usize, cols: usize, heads: usize) -> Vec<T> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

impl GgufWeights {
    /// Heads whose rows llama.cpp permuted in `name` (Llama-architecture Q and K), if any.
    fn permuted_heads(&self, name: &str) -> Option<usize> {
        if self.architecture != Architecture::Llama {
            None
        } else if name.ends_with("q_proj.weight") || name.ends_with("q_proj.bias") {
            Some(self.num_heads)
        } else if name.ends_with("k_proj.weight") || name.ends_with("k_proj.bias") {
            Some(self.num_kv_heads)
        } else {
            None
        }
    }
}

impl WeightSource for GgufWeights {
    fn quantized(&self, name: &str) -> Option<kvc_core::QuantMatrix> {
        let info = self.file.tensor_info(&gguf_name(name)?)?;
        let [rows, cols] = info.shape[..] else { return None };
        let bytes = self.file.tensor_bytes(info)?;
        let matrix = self.codes_of(name, info, rows, cols, bytes);
        self.file.release(info);
        matrix
    }

    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let g = gguf_name(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let out = self.dense(name, &g);
        if let Some(info) = self.file.tensor_info(&g) {
            self.file.release(info);
        }
        out
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.file.tensor_info(&g).is_some())
    }
}

impl GgufWeights {
    /// [`WeightSource::quantized`] of `name` from its bytes.
    fn codes_of(&self, name: &str, info: &crate::gguf::GgufTensorInfo, rows: usize, cols: usize, bytes: &[u8]) -> Option<kvc_core::QuantMatrix> {
        let heads = self.permuted_heads(name);
        if heads.is_some_and(|h| h == 0 || rows % (2 * h) != 0) {
            return None;
        }
        fn unpermute_by<T: Copy + Default>(heads: Option<usize>, v: Vec<T>, rows: usize, per_row: usize) -> Vec<T> {
            match heads {
                Some(h) => unpermute_rows(&v, rows, per_row, h),
                None => v,
            }
        }
        let unpermute_f = |v: Vec<f32>, per_row: usize| unpermute_by(heads, v, rows, per_row);
        let unpermute = |v: Vec<i8>, per_row: usize| unpermute_by(heads, v, rows, per_row);
        if let Some(p) = crate::gguf::k_quant_parts(info.kind, bytes) {
            let (supers, groups) = (cols / kvc_core::kernels::quant::SUPER_BLOCK, cols / p.group.max(1));
            let codes = unpermute(p.codes, cols);
            let (d, sc) = (unpermute_f(p.d, supers), unpermute(p.sc, groups));
            let (dmin, m) = if p.m.is_empty() { (p.dmin, p.m) } else { (unpermute_f(p.dmin, supers), unpermute(p.m, groups)) };
            return kvc_core::QuantMatrix::from_k_quants(rows, cols, &codes, p.group, d, dmin, sc, m).ok();
        }
        let (codes, scale, min) = crate::gguf::quant_codes(info.kind, bytes)?;
        if cols % 32 != 0 {
            return None;
        }
        kvc_core::QuantMatrix::from_codes(rows, cols, &unpermute(codes, cols), unpermute_f(scale, cols / 32), unpermute_f(min, cols / 32)).ok()
    }

    /// [`WeightSource::tensor`] of `name` (GGUF name `g`).
    fn dense(&self, name: &str, g: &str) -> Result<HostTensor> {
        let (data, shape) = self.file.tensor_f32(&g).map_err(|e| match e {
            ModelError::MissingTensor(_) => ModelError::MissingTensor(format!("{name} (GGUF {g})")),
            other => other,
        })?;
        if let Some(heads) = self.permuted_heads(name) {
            let rows = shape[0];
            if heads == 0 || rows % (2 * heads) != 0 {
                return Err(ModelError::ShapeMismatch {
                    name: name.to_string(),
                    expected: vec![heads * 2, 0],
                    actual: shape,
                });
            }
            let cols = data.len() / rows;
            return Ok((unpermute_rows(&data, rows, cols, heads), shape));
        }
        Ok((data, shape))
    }

}

/// Weights from a HF model folder: every `*.safetensors` file in it (sharded or not).
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    index: HashMap<String, usize>,
}

impl SafetensorsWeights {
    /// Maps every `*.safetensors` in `dir` and indexes their tensor names.
    ///
    /// # Errors
    /// [`ModelError::ModelNotFound`] without safetensors files, [`ModelError::InvalidSafetensors`].
    pub fn open(dir: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::ModelNotFound { path: dir.to_path_buf(), reason: "no *.safetensors file".into() });
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let f = std::fs::File::open(&path).map_err(io(&path))?;
            // SAFETY: read-only mapping of a model file (see GgufFile::open).
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io(&path))?;
            let names = safetensors::SafeTensors::deserialize(&map)
                .map_err(|e| ModelError::InvalidSafetensors { path: path.clone(), reason: e.to_string() })?
                .names()
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>();
            for n in names {
                index.insert(n, files.len());
            }
            files.push((path, map));
        }
        Ok(Self { files, index })
    }
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let &i = self.index.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let (path, map) = &self.files[i];
        let st = safetensors::SafeTensors::deserialize(map)
            .map_err(|e| ModelError::InvalidSafetensors { path: path.clone(), reason: e.to_string() })?;
        let view = st.tensor(name).map_err(|e| ModelError::InvalidSafetensors { path: path.clone(), reason: e.to_string() })?;
        let bytes = view.data();
        use safetensors::Dtype;
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(ModelError::UnsupportedTensorType { tensor: name.to_string(), kind: format!("{other:?}") })
            }
        };
        Ok((data, view.shape().to_vec()))
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_gguf() {
        assert_eq!(gguf_name("model.layers.12.self_attn.k_proj.bias").unwrap(), "blk.12.attn_k.bias");
        assert_eq!(gguf_name("model.layers.0.post_attention_layernorm.weight").unwrap(), "blk.0.ffn_norm.weight");
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert!(gguf_name("model.layers.0.foo.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // HF rows 0..8 for 2 heads of dim 4, one column; llama.cpp's permute interleaves halves.
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let permuted = vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0];
        assert_eq!(unpermute_rows(&permuted, 8, 1, 2), hf);
    }
}
