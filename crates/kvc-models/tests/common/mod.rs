//! Shared helpers of the reference tests: fixture reading and model locations.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::Tensor;
use kvc_core::KvcBackend;
use kvc_core::KvCache;
use kvc_models::{generate, Decoder, GenerationConfig, Logits};

pub type Nd = burn::backend::NdArray<f32>;
pub type Flex = burn::backend::Flex;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Tensors of a safetensors fixture (f32 and i64 read as f64 for simplicity).
pub struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    pub fn open(name: &str) -> Self {
        let path = fixture(name);
        Self { bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display())) }
    }
    fn view(&self, key: &str) -> (Vec<u8>, safetensors::Dtype, Vec<usize>) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).expect("valid safetensors fixture");
        let v = st.tensor(key).unwrap_or_else(|_| panic!("fixture key {key}"));
        (v.data().to_vec(), v.dtype(), v.shape().to_vec())
    }
    pub fn f32(&self, key: &str) -> (Vec<f32>, Vec<usize>) {
        let (b, dt, shape) = self.view(key);
        assert_eq!(dt, safetensors::Dtype::F32, "{key}");
        (b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(), shape)
    }
    pub fn bytes(&self, key: &str) -> Vec<u8> {
        let (b, dt, _) = self.view(key);
        assert_eq!(dt, safetensors::Dtype::U8, "{key}");
        b
    }
    pub fn ids(&self, key: &str) -> Vec<u32> {
        let (b, dt, _) = self.view(key);
        assert_eq!(dt, safetensors::Dtype::I64, "{key}");
        b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
    }
    pub fn ids2(&self, key: &str) -> (Vec<u32>, Vec<usize>) {
        let (_, _, shape) = self.view(key);
        (self.ids(key), shape)
    }
}

/// Logits `[tokens, vocab]` at every position of `ids`, fed in chunks of `chunk` tokens (so the
/// chunked prefill path is what is checked).
pub fn all_logits<B: KvcBackend>(model: &Decoder<B>, ids: &[u32], chunk: usize) -> Vec<Vec<f32>> {
    let device = Default::default();
    let mut cache: KvCache<B> = model.new_cache();
    let mut rows = Vec::new();
    for part in ids.chunks(chunk) {
        let data: Vec<i64> = part.iter().map(|&t| t as i64).collect();
        let tokens = Tensor::from_data(burn::tensor::TensorData::new(data, [1, part.len()]), &device);
        let out = model.forward(tokens, &mut cache, None, Logits::All).expect("forward");
        let [_, n, v] = out.dims();
        let flat = out.into_data().to_vec::<f32>().unwrap();
        for i in 0..n {
            rows.push(flat[i * v..(i + 1) * v].to_vec());
        }
    }
    rows
}

/// Pure argmax continuation of `n` tokens (no EOS stop), as the fixtures' reference loop.
pub fn greedy<B: KvcBackend>(model: &Decoder<B>, ids: &[u32], n: usize) -> Vec<u32> {
    let device = Default::default();
    let mut cache = model.new_cache();
    let logits = model.prefill(ids, &mut cache, None, 512).expect("prefill");
    let cfg = GenerationConfig { max_new_tokens: n, stop_at_eos: false, ..Default::default() };
    generate::decode(model, &mut cache, logits, &cfg, &[], |_| true, &device).expect("decode").tokens
}

fn logsumexp(row: &[f32]) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

/// Compares our logits at every position with a fixture prefix `p` (`p.logits_sample`,
/// `p.top_ids`/`p.top_logits`, `p.logsumexp`, `p.last_logits`); returns the max abs difference.
pub fn compare_logits(fx: &Fixture, p: &str, ours: &[Vec<f32>]) -> f32 {
    let sample_ids = fx.ids(&format!("{p}.logits_sample_ids"));
    let (sample, shape) = fx.f32(&format!("{p}.logits_sample"));
    assert_eq!(ours.len(), shape[0], "positions");
    let (top_ids, tshape) = fx.ids2(&format!("{p}.top_ids"));
    let (top, _) = fx.f32(&format!("{p}.top_logits"));
    let (lse, _) = fx.f32(&format!("{p}.logsumexp"));
    let (last, _) = fx.f32(&format!("{p}.last_logits"));
    let mut max_diff = 0f32;
    let mut upd = |a: f32, b: f32| max_diff = max_diff.max((a - b).abs());
    for (t, row) in ours.iter().enumerate() {
        for (j, &id) in sample_ids.iter().enumerate() {
            upd(row[id as usize], sample[t * shape[1] + j]);
        }
        for j in 0..tshape[1] {
            upd(row[top_ids[t * tshape[1] + j] as usize], top[t * tshape[1] + j]);
        }
        upd(logsumexp(row) as f32, lse[t]);
    }
    for (a, b) in ours.last().unwrap().iter().zip(&last) {
        upd(*a, *b);
    }
    max_diff
}

#[derive(serde::Deserialize)]
struct TokRecord {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

/// Token ids and decoded text of every record of a tokenizer fixture.
pub fn check_tokenizer(tok: &kvc_models::Tokenizer, fixture_name: &str) {
    let records: Vec<TokRecord> = serde_json::from_str(&std::fs::read_to_string(fixture(fixture_name)).unwrap()).unwrap();
    assert!(records.len() >= 20);
    for r in &records {
        assert_eq!(tok.encode(&r.text, false).unwrap(), r.ids, "encode {:?}", r.text);
        assert_eq!(tok.decode(&r.ids, false).unwrap(), r.decoded, "decode {:?}", r.text);
    }
}

#[derive(serde::Deserialize)]
struct ChatRecord {
    messages: Vec<Msg>,
    text: String,
    ids: Vec<u32>,
}
#[derive(serde::Deserialize)]
struct Msg {
    role: String,
    content: String,
}

/// Chat template rendering and its ids.
pub fn check_chat(tok: &kvc_models::Tokenizer, fixture_name: &str) {
    let r: ChatRecord = serde_json::from_str(&std::fs::read_to_string(fixture(fixture_name)).unwrap()).unwrap();
    let msgs: Vec<kvc_models::ChatMessage> = r.messages.into_iter().map(|m| kvc_models::ChatMessage { role: m.role, content: m.content }).collect();
    let text = tok.apply_chat_template(&msgs).unwrap();
    assert_eq!(text, r.text);
    assert_eq!(tok.encode(&text, false).unwrap(), r.ids);
}

