//! Bad input gives a clear error, never a panic: missing paths, corrupt or truncated GGUF files,
//! unsupported tensor types, config/tensor mismatches, missing tokenizers, empty or too long
//! prompts, invalid generation settings.

mod common;

use std::path::Path;

use common::{fixture, Nd};
use kvc_models::generate::check_prompt;
use kvc_models::gguf::GgufFile;
use kvc_models::{load, load_hf_decoder, GenerationConfig, ModelError};

/// A minimal GGUF v3 writer: string metadata, tensors of any type number with raw data.
struct GgufWriter {
    kv: Vec<(String, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend(s.as_bytes());
    v
}

impl GgufWriter {
    fn new() -> Self {
        Self { kv: vec![], tensors: vec![] }
    }
    fn string(mut self, k: &str, v: &str) -> Self {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend(gstr(v));
        self.kv.push((k.into(), b));
        self
    }
    fn u32(mut self, k: &str, v: u32) -> Self {
        let mut b = 4u32.to_le_bytes().to_vec();
        b.extend(v.to_le_bytes());
        self.kv.push((k.into(), b));
        self
    }
    fn tensor(mut self, name: &str, ne: &[u64], kind: u32, data: Vec<u8>) -> Self {
        self.tensors.push((name.into(), ne.to_vec(), kind, data));
        self
    }
    /// Bytes; `offset_bump` is added to the last tensor's offset (to point outside the file).
    fn bytes(&self, offset_bump: u64) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            out.extend(gstr(k));
            out.extend(v);
        }
        let mut offset = 0u64;
        let n = self.tensors.len();
        for (i, (name, ne, kind, data)) in self.tensors.iter().enumerate() {
            out.extend(gstr(name));
            out.extend((ne.len() as u32).to_le_bytes());
            for d in ne {
                out.extend(d.to_le_bytes());
            }
            out.extend(kind.to_le_bytes());
            out.extend((offset + if i + 1 == n { offset_bump } else { 0 }).to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            while out.len() % 32 != 0 {
                out.push(0);
            }
        }
        out
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn err_of<T>(r: Result<T, ModelError>) -> ModelError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn missing_path_and_empty_folder() {
    let e = err_of(load::<Nd>(Path::new("/nonexistent/model.gguf"), &Default::default()));
    assert!(matches!(e, ModelError::ModelNotFound { .. }), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = err_of(load::<Nd>(dir.path(), &Default::default()));
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn corrupt_gguf_files() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.gguf", vec![], "shorter than the GGUF magic"),
        ("magic.gguf", b"GGML\x03\0\0\0".to_vec(), "bad magic"),
        ("version.gguf", b"GGUF\x09\0\0\0".to_vec(), "unsupported GGUF version 9"),
        ("header.gguf", b"GGUF\x03\0\0\0\x01\0".to_vec(), "truncated header"),
        // claims 2^40 metadata entries in a 24-byte file
        ("count.gguf", [b"GGUF\x03\0\0\0".as_slice(), &0u64.to_le_bytes(), &(1u64 << 40).to_le_bytes()].concat(), "exceeds the file size"),
    ];
    for (name, bytes, msg) in cases {
        let e = err_of(GgufFile::open(&write(dir.path(), name, &bytes)));
        assert!(matches!(e, ModelError::InvalidGguf { .. }) && e.to_string().contains(msg), "{name}: {e}");
    }
    // tensor data past the end: short data, and an offset out of range
    let w = GgufWriter::new().string("general.architecture", "llama").tensor("a", &[32], 0, vec![0u8; 128]);
    let mut short = w.bytes(0);
    short.truncate(short.len() - 64);
    let e = err_of(GgufFile::open(&write(dir.path(), "short.gguf", &short)));
    assert!(e.to_string().contains("outside the file"), "{e}");
    let e = err_of(GgufFile::open(&write(dir.path(), "offset.gguf", &w.bytes(1 << 50))));
    assert!(e.to_string().contains("outside the file"), "{e}");
    // the real default model cut in half
    let real = kvc_models::default_model::ensure_default_model().unwrap();
    let bytes = std::fs::read(&real).unwrap();
    let e = err_of(load::<Nd>(&write(dir.path(), "half.gguf", &bytes[..bytes.len() / 2]), &Default::default()));
    assert!(e.to_string().contains("truncated?"), "{e}");
}

#[test]
fn unsupported_tensor_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // ggml type 10 = Q2_K: listed, but not dequantizable
    let w = GgufWriter::new().tensor("q2k", &[256], 10, vec![0u8; 84]).tensor("ok", &[2], 0, vec![0u8; 8]);
    let f = GgufFile::open(&write(dir.path(), "q2k.gguf", &w.bytes(0))).unwrap();
    assert_eq!(f.tensor_f32("ok").unwrap().0, vec![0.0, 0.0]);
    let e = err_of(f.tensor_f32("q2k"));
    assert!(matches!(e, ModelError::UnsupportedTensorType { .. }) && e.to_string().contains("ggml type 10"), "{e}");
    assert!(matches!(err_of(f.tensor_f32("nope")), ModelError::MissingTensor(_)));
}

#[test]
fn gguf_without_architecture_or_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let w = GgufWriter::new().u32("general.alignment", 32);
    let e = err_of(load::<Nd>(&write(dir.path(), "noarch.gguf", &w.bytes(0)), &Default::default()));
    assert!(e.to_string().contains("general.architecture"), "{e}");
    let w = GgufWriter::new().string("general.architecture", "mamba");
    let e = err_of(load::<Nd>(&write(dir.path(), "mamba.gguf", &w.bytes(0)), &Default::default()));
    assert!(matches!(e, ModelError::UnsupportedArchitecture(_)), "{e}");
    let w = GgufWriter::new()
        .string("general.architecture", "llama")
        .u32("llama.embedding_length", 4)
        .u32("llama.attention.head_count", 1)
        .u32("llama.feed_forward_length", 8)
        .u32("llama.block_count", 1)
        .tensor("token_embd.weight", &[4, 8], 0, vec![0u8; 128]);
    let e = err_of(load::<Nd>(&write(dir.path(), "notok.gguf", &w.bytes(0)), &Default::default()));
    assert!(matches!(e, ModelError::Tokenizer(_)), "{e}");
}

fn copy_dir(src: &Path, dst: &Path) {
    // the model's own files, not the reference logits stored beside them
    for e in std::fs::read_dir(src).unwrap().flatten().filter(|e| e.file_name() != "logits.safetensors") {
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A NaN block scale in a GGUF is the same error when the weights are held as codes (the
/// default): the codes are refused and the dense reader names the tensor and the element.
#[test]
fn non_finite_block_scales_in_a_gguf_are_errors_with_codes_too() {
    let real = kvc_models::default_model::ensure_default_model().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    let mut bytes = std::fs::read(&real).unwrap();
    let info = GgufFile::open(&real).unwrap().tensor_info("blk.0.ffn_down.weight").unwrap().clone();
    // block 1's f16 scale (Q4_1: 20 bytes a block, `d` first) -> NaN
    bytes[info.offset + 20..info.offset + 22].copy_from_slice(&half::f16::NAN.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = err_of(kvc_models::load_with::<common::Flex>(&path, &Default::default(), None, kvc_models::WeightStorage::Codes));
    assert!(matches!(e, ModelError::NonFiniteWeight { index: 32, .. }), "{e}");
    assert!(e.to_string().contains("model.layers.0.mlp.down_proj.weight"), "{e}");
}

/// A NaN or infinite weight is an error naming the tensor and the element, not silent garbage;
/// absurd config sizes are rejected before anything is allocated for them.
#[test]
fn non_finite_weights_and_absurd_sizes() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny_llama3"), dir.path());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let name = "model.layers.0.mlp.down_proj.weight";
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    assert_eq!(header[name]["dtype"], "F32", "the fixture stores f32");
    for (value, shown) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
        let mut b = bytes.clone();
        let at = 8 + header_len + start + 4 * 5;
        b[at..at + 4].copy_from_slice(&value.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        let e = err_of(load_hf_decoder::<Nd>(dir.path(), &Default::default()));
        assert!(matches!(e, ModelError::NonFiniteWeight { index: 5, .. }), "{e}");
        assert!(e.to_string().contains(name) && e.to_string().contains(shown), "{e}");
    }
    std::fs::write(&path, &bytes).unwrap();
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["num_hidden_layers"] = u64::MAX.into();
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    let e = err_of(load_hf_decoder::<Nd>(dir.path(), &Default::default()));
    assert!(matches!(e, ModelError::Config(_)) && e.to_string().contains("num_hidden_layers"), "{e}");
}

/// Chat templates come with model files: one that loops for ever, recurses, raises or does not
/// parse is a clear error in bounded time.
#[test]
fn hostile_chat_templates() {
    let file = GgufFile::open(&kvc_models::default_model::ensure_default_model().unwrap()).unwrap();
    let tok = kvc_models::Tokenizer::from_gguf(&file).unwrap();
    let messages = vec![kvc_models::ChatMessage { role: "user".into(), content: "hi".into() }];
    let render = |template: &str| {
        let tok = tok.clone().with_chat_template(Some(template.into()));
        let start = std::time::Instant::now();
        let r = tok.apply_chat_template(&messages);
        (r, start.elapsed())
    };
    let (ok, _) = render("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}");
    assert_eq!(ok.unwrap(), "<user>hi");
    for (template, says) in [
        ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "fuel"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
        ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant roles"),
        ("{% for m in messages %}", "chat template"),
    ] {
        let (r, took) = render(template);
        let e = err_of(r);
        assert!(matches!(e, ModelError::Tokenizer(_)) && e.to_string().contains(says), "{template}: {e}");
        assert!(took.as_secs_f64() < 10.0, "{template}: {took:?}");
    }
}

#[test]
fn config_tensor_mismatch_and_missing_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny_qwen3"), dir.path());
    // the tiny fixtures ship no tokenizer: the decoder loads, the full model does not
    assert!(load_hf_decoder::<Nd>(dir.path(), &Default::default()).is_ok());
    let e = err_of(load::<Nd>(dir.path(), &Default::default()));
    assert!(matches!(e, ModelError::Tokenizer(_)) && e.to_string().contains("tokenizer.json"), "{e}");
    // intermediate_size that the tensors do not have
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["intermediate_size"] = 96.into();
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    let e = err_of(load_hf_decoder::<Nd>(dir.path(), &Default::default()));
    assert!(matches!(e, ModelError::ShapeMismatch { .. }) && e.to_string().contains("mlp"), "{e}");
    // heads that do not divide
    v["intermediate_size"] = 128.into();
    v["num_key_value_heads"] = 3.into();
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    let e = err_of(load_hf_decoder::<Nd>(dir.path(), &Default::default()));
    assert!(matches!(e, ModelError::Config(_)), "{e}");
    // malformed JSON, and a missing weight file
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    assert!(matches!(err_of(load_hf_decoder::<Nd>(dir.path(), &Default::default())), ModelError::Config(_)));
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = err_of(load_hf_decoder::<Nd>(dir.path(), &Default::default()));
    assert!(e.to_string().contains("safetensors"), "{e}");
    // a corrupt weight file
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let e = err_of(load_hf_decoder::<Nd>(dir.path(), &Default::default()));
    assert!(matches!(e, ModelError::InvalidSafetensors { .. }), "{e}");
}

#[test]
fn prompt_and_generation_settings() {
    assert!(matches!(check_prompt(0, 8192, 16), Err(ModelError::EmptyPrompt)));
    assert!(matches!(check_prompt(8190, 8192, 16), Err(ModelError::PromptTooLong { .. })));
    assert!(check_prompt(100, 8192, 16).is_ok());
    for cfg in [
        GenerationConfig { temperature: -1.0, ..Default::default() },
        GenerationConfig { temperature: f32::NAN, ..Default::default() },
        GenerationConfig { top_p: 0.0, ..Default::default() },
        GenerationConfig { top_p: 1.5, ..Default::default() },
        GenerationConfig { prefill_chunk: 0, ..Default::default() },
    ] {
        assert!(matches!(cfg.validate(), Err(ModelError::Generation(_))), "{cfg:?}");
    }
    let model = load_hf_decoder::<Nd>(&fixture("tiny_qwen3"), &Default::default()).unwrap();
    let mut cache = model.new_cache();
    let e = err_of(model.prefill(&[], &mut cache, None, 8));
    assert!(matches!(e, ModelError::EmptyPrompt));
}

#[test]
fn sampling_is_seeded_and_respects_top_p() {
    use rand::SeedableRng;
    let logits = vec![0.0f32, 3.0, 2.9, -1.0];
    let cfg = GenerationConfig { temperature: 1.0, top_p: 0.6, seed: 7, ..Default::default() };
    let draw = |seed| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..200).map(|_| kvc_models::generate::sample(&logits, &cfg, &mut rng)).collect::<Vec<_>>()
    };
    let a = draw(7);
    assert_eq!(a, draw(7));
    // top-p 0.6 keeps only ids 1 and 2 (each ~0.45 of the mass), both drawn
    assert!(a.iter().all(|&t| t == 1 || t == 2));
    assert!(a.contains(&1) && a.contains(&2));
    let greedy = GenerationConfig::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    assert_eq!(kvc_models::generate::sample(&[1.0, 5.0, 5.0], &greedy, &mut rng), 1, "ties go to the lowest id");
}
