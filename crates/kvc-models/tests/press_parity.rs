//! The baseline presses against kvpress 0.5.5 on real models: SmolLM2-135M on the two contexts of
//! the KVCompose parity test (~300 and ~1500 tokens of essays), Qwen2.5-Coder-0.5B (its own GQA
//! 14/2, q/k/v biases) on one; ratios 0.25 and 0.75. Per press: scores, kept index sets per layer
//! and KV head (a set may differ only where kvpress's own scores tie at the budget boundary), and
//! 32 greedy tokens of a question fed after compression.
//! Fixtures: `tools/make_press_fixtures.py` (README beside them).
//!
//! One prefill per context serves every press and ratio (the capture records what all of them
//! need), as the evaluation harness does.

mod common;

use common::{Fixture, Flex};
use kvc_core::{Budget, CaptureSpec, KvCache, PressSpec};
use kvc_models::default_model::{ensure_model, QWEN25_CODER_05B, SMOLLM2};
use kvc_models::pipeline::Pipeline;
use kvc_models::{generate, GenerationConfig, LoadedModel, Logits};

type B = Flex;
const RATIOS: [u32; 2] = [25, 75];

/// The fixture's press names and the spec each stands for.
fn spec(name: &str, ratio: f64) -> PressSpec {
    let budget = Budget::Ratio(ratio);
    match name.strip_prefix("adakv_") {
        Some(scorer) => PressSpec::new("adakv", budget).with_option("scorer", scorer),
        None => PressSpec::new(name, budget),
    }
}

/// Kept positions per layer and head.
fn kept_sets(cache: &KvCache<B>) -> Vec<Vec<Vec<u32>>> {
    (0..cache.num_layers()).map(|l| cache.layer(l).unwrap().unwrap().kept_positions()).collect()
}

/// 32 greedy tokens after feeding the whole question in one step; also the first logits.
fn answer(m: &LoadedModel<B>, cache: &KvCache<B>, question: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let device = Default::default();
    let mut cache = cache.clone();
    let logits = m.model.forward(generate::token_tensor::<B>(question, &device), &mut cache, None, Logits::Last).unwrap();
    let first = logits.clone().into_data().to_vec::<f32>().unwrap();
    let cfg = GenerationConfig { max_new_tokens: 32, stop_at_eos: false, ..Default::default() };
    (generate::decode(&m.model, &mut cache, logits, &cfg, &[], |_| true, &device).unwrap().tokens, first)
}

/// The fixture's scores of a press: stored once per press (they do not depend on the ratio);
/// PyramidKV's are SnapKV's; StreamingLLM's are its kept mask (compared through the mask).
fn reference_scores(fx: &Fixture, ctx: &str, name: &str) -> Option<(Vec<f32>, Vec<usize>)> {
    match name {
        "streaming_llm" => None,
        "pyramidkv" => Some(fx.f32(&format!("{ctx}.snapkv.scores"))),
        _ => Some(fx.f32(&format!("{ctx}.{name}.scores"))),
    }
}

fn check(model: &LoadedModel<B>, fx: &Fixture, logits: &Fixture, ctx: &str, presses: &[&str]) {
    let context = fx.ids(&format!("{ctx}.context_ids"));
    let question = fx.ids(&format!("{ctx}.question_ids"));
    let t = context.len();
    let pipeline = Pipeline::new(model);
    let needs = presses.iter().map(|p| spec(p, 0.5).needs().unwrap()).fold(CaptureSpec::default(), CaptureSpec::merge);
    let prefilled = pipeline.prefill(&context, needs, 512, &mut |_| {}).unwrap();
    let mut report = Vec::new();
    for &name in presses {
        for pct in RATIOS {
            let key = |k: &str| format!("{ctx}.{name}.r{pct}.{k}");
            let s = spec(name, pct as f64 / 100.0);
            let mut press = s.build::<B>().unwrap();
            let mut cache = prefilled.cache.clone();
            press.compress(&model.model, &context, &mut cache, &prefilled.capture).unwrap();

            // scores: relative to each head's largest kvpress score
            let (layers, heads) = (model.config.num_layers, model.config.num_kv_heads);
            let ours = press.last_scores().unwrap();
            let mut worst = 0f32;
            if let Some((ref_scores, shape)) = reference_scores(fx, ctx, name) {
                assert_eq!(shape, vec![layers, heads, t]);
                for l in 0..layers {
                    for h in 0..heads {
                        let r = &ref_scores[(l * heads + h) * t..(l * heads + h + 1) * t];
                        let o = &ours[l][h * t..(h + 1) * t];
                        let scale = r.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
                        worst = worst.max(r.iter().zip(o).fold(0f32, |m, (a, b)| m.max((a - b).abs() / scale)));
                    }
                }
            }
            assert!(worst <= 1e-3, "{ctx} {name} r{pct}: scores differ by {worst:.2e} of the head's largest");
            let budgets = fx.ids(&key("budgets"));

            // kept sets: equal, or differing only where kvpress's scores tie at the boundary
            let mask = fx.bytes(&key("kept_mask"));
            let ties = fx.bytes(&key("boundary_tie"));
            let sets = kept_sets(&cache);
            let mut differing = 0;
            for l in 0..layers {
                for h in 0..heads {
                    let want: Vec<u32> = (0..t).filter(|&i| mask[(l * heads + h) * t + i] != 0).map(|i| i as u32).collect();
                    assert_eq!(sets[l][h].len(), budgets[l * heads + h] as usize, "{ctx} {name} r{pct} layer {l} head {h}: budget");
                    if sets[l][h] != want {
                        let tied = ties[l * heads + h] != 0;
                        assert!(tied, "{ctx} {name} r{pct} layer {l} head {h}: kept sets differ without a tie at the boundary");
                        assert_eq!(sets[l][h].len(), want.len(), "{ctx} {name} r{pct} layer {l} head {h}: budgets differ");
                        differing += 1;
                    }
                }
            }

            // the answer after compression
            let (ids, first) = answer(model, &cache, &question);
            let (want_first, _) = logits.f32(&key("first_logits"));
            let d = first.iter().zip(&want_first).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            report.push(format!("{name} r{pct}: scores {worst:.1e}, tied sets differing {differing}, first logits {d:.1e}"));
            if differing == 0 {
                assert!(d <= 1e-3, "{ctx} {name} r{pct}: first-step logits differ by {d}");
                assert_eq!(ids, fx.ids(&key("greedy_ids")), "{ctx} {name} r{pct}: greedy tokens");
            }
        }
    }
    eprintln!("{ctx} ({t} tokens):\n  {}", report.join("\n  "));
}

const SMOLLM2_PRESSES: &[&str] = &[
    "streaming_llm",
    "knorm",
    "snapkv",
    "tova",
    "observed_attention",
    "pyramidkv",
    "expected_attention",
    "adakv_snapkv",
    "adakv_expected_attention",
];

#[test]
fn presses_match_kvpress_on_smollm2() {
    let fx = Fixture::open("presses/smollm2_presses.safetensors");
    let logits = Fixture::open("presses/smollm2_presses_logits.safetensors");
    let model = kvc_models::load::<B>(&ensure_model(&SMOLLM2).unwrap(), &Default::default()).unwrap();
    check(&model, &fx, &logits, "ctx300", SMOLLM2_PRESSES);
    check(&model, &fx, &logits, "ctx1500", SMOLLM2_PRESSES);
}

#[test]
fn presses_match_kvpress_on_qwen25() {
    let fx = Fixture::open("presses/qwen25_presses.safetensors");
    let model = kvc_models::load::<B>(&ensure_model(&QWEN25_CODER_05B).unwrap(), &Default::default()).unwrap();
    // uncompressed first, as a check of the model itself
    let question = fx.ids("qctx.question_ids");
    let pipeline = Pipeline::new(&model);
    let prefilled = pipeline.prefill(&fx.ids("qctx.context_ids"), CaptureSpec::default(), 512, &mut |_| {}).unwrap();
    assert_eq!(answer(&model, &prefilled.cache, &question).0, fx.ids("qctx.none.greedy_ids"));
    check(&model, &fx, &fx, "qctx", &["snapkv", "tova", "adakv_snapkv"]);
}
