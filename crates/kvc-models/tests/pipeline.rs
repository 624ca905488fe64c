//! The library pipeline on the default model: presses never touch the prefill they score from,
//! and questions on one compressed cache do not interfere.

mod common;

use common::{fixture, Flex};
use kvc_core::press::spec;
use kvc_core::{Budget, PrefillCapture, PressSpec};
use kvc_models::default_model::ensure_default_model;
use kvc_models::pipeline::{Event, Pipeline, Request};
use kvc_models::GenerationConfig;

type B = Flex;

const CONTEXT: &str = "The lighthouse keeper, Ada Quill, lived on the island of Varn for twelve years. \
Every evening she climbed the ninety steps, lit the great lamp, and wrote the weather in a green notebook. \
Her brother Tomas kept goats on the mainland and sent letters every spring.";

#[test]
fn scoring_from_the_prefill_leaves_the_prefill_untouched() {
    // tiny random Qwen3 (q/k norm) from the reference fixtures: 200 tokens in chunks of 64
    let model = kvc_models::load_hf_decoder::<B>(&fixture("tiny_qwen3"), &Default::default()).unwrap();
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 37 + 11) % 97).collect();
    let plain = model.prefill(&ids, &mut model.new_cache(), None, 64).unwrap().into_data().to_vec::<f32>().unwrap();
    for name in spec::names() {
        let needs = PressSpec::new(name, Budget::Ratio(0.5)).needs().unwrap();
        let mut capture = PrefillCapture::new(needs, model.config().num_layers);
        let mut cache = model.new_cache();
        let observed = model.prefill(&ids, &mut cache, Some(&mut capture), 64).unwrap().into_data().to_vec::<f32>().unwrap();
        let d = plain.iter().zip(&observed).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if needs.attention_sums {
            // attention reduced inside the kernel takes its untiled path: same math, other order
            assert!(d <= 1e-5, "{name}: last logits moved by {d}");
        } else {
            assert_eq!(plain, observed, "{name}: recording changed the prefill");
        }
        assert_eq!(capture.tokens(), 200, "{name}");
    }
}

#[test]
fn questions_on_one_compressed_cache_do_not_interfere() {
    let loaded = kvc_models::load::<B>(&ensure_default_model().unwrap(), &Default::default()).unwrap();
    let pipeline = Pipeline::new(&loaded);
    let (q1, q2) = ("What is the keeper's name?".to_string(), "Where does her brother live?".to_string());
    let ask = |questions: Vec<String>| -> Vec<String> {
        let request = Request {
            context: CONTEXT.into(),
            questions,
            chat: true,
            press: Some(PressSpec::new("snapkv", Budget::Ratio(0.5)).with_option("window_size", 8)),
            generation: GenerationConfig { max_new_tokens: 12, ..Default::default() },
            ..Default::default()
        };
        let mut events = Vec::new();
        let r = pipeline.run(&request, &mut |e| events.push(e)).unwrap();
        assert!(events.iter().any(|e| matches!(e, Event::Prefill { .. })) && events.iter().any(|e| matches!(e, Event::Compress { .. })));
        assert!(r.report.as_ref().unwrap().bytes_after < r.report.as_ref().unwrap().bytes_before);
        r.answers.into_iter().map(|a| a.text).collect()
    };
    let both = ask(vec![q1.clone(), q2.clone()]);
    let swapped = ask(vec![q2.clone(), q1.clone()]);
    let alone = (ask(vec![q1]), ask(vec![q2]));
    assert_eq!(both, vec![alone.0[0].clone(), alone.1[0].clone()]);
    assert_eq!(swapped, vec![alone.1[0].clone(), alone.0[0].clone()]);
    assert!(!both[0].is_empty() && both[0] != both[1], "{both:?}");
}

#[test]
fn bad_requests_are_errors() {
    let loaded = kvc_models::load::<B>(&ensure_default_model().unwrap(), &Default::default()).unwrap();
    let pipeline = Pipeline::new(&loaded);
    let run = |request: Request| pipeline.run(&request, &mut |_| {}).map(|_| ()).unwrap_err().to_string();
    let base = || Request { context: CONTEXT.into(), questions: vec!["Who?".into()], ..Default::default() };
    assert!(run(Request { context: String::new(), ..base() }).contains("empty"));
    let e = run(Request { press: Some(PressSpec::new("snapkv", Budget::Tokens(10_000))), ..base() });
    assert!(e.contains("token budget 10000"), "{e}");
    let e = run(Request { generation: GenerationConfig { max_new_tokens: 0, ..Default::default() }, ..base() });
    assert!(e.contains("max_new_tokens"), "{e}");
    let e = run(Request { questions: vec!["word ".repeat(9000)], ..base() });
    assert!(e.contains("more than the model's context"), "{e}");
}

/// A compressed cache written to a file and read back answers exactly as the cache it was
/// written from (several questions, per-head masks); a cache is refused by another model, with
/// another chat setting, or damaged.
#[test]
fn saved_caches_answer_as_the_original_and_refuse_other_models() {
    let mut loaded = kvc_models::load::<B>(&ensure_default_model().unwrap(), &Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctx.kvc");
    let questions = vec!["What is the keeper's name?".to_string(), "Where does her brother live?".to_string()];
    let generation = GenerationConfig { max_new_tokens: 12, ..Default::default() };
    for press in [PressSpec::new("kvcompose", Budget::Ratio(0.5)).with_option("structured", false), PressSpec::new("snapkv", Budget::Ratio(0.25))] {
        let pipeline = Pipeline::new(&loaded);
        let request = Request {
            context: CONTEXT.into(),
            questions: questions.clone(),
            press: Some(press.clone()),
            generation: generation.clone(),
            save_cache: Some(path.clone()),
            ..Default::default()
        };
        let direct = pipeline.run(&request, &mut |_| {}).unwrap();
        let (cache, header) = pipeline.load_cache(&path).unwrap();
        assert_eq!(header.press.as_ref(), Some(&press));
        assert_eq!(header.context_tokens, direct.context_tokens);
        assert_eq!(cache.bytes(), direct.kv_bytes.1, "{}", press.label());
        let ask = Request { questions: questions.clone(), generation: generation.clone(), ..Default::default() };
        let again = pipeline.run_saved(&cache, &header, &ask, &mut |_| {}).unwrap();
        let ids = |r: &kvc_models::pipeline::Response| r.answers.iter().map(|a| a.ids.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&direct), ids(&again), "{}", press.label());
        assert_eq!(again.kv_bytes.0, direct.kv_bytes.0);
        // the chat setting is part of the cache; a request with a context or a press is refused
        let e = pipeline.run_saved(&cache, &header, &Request { chat: false, ..ask.clone() }, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("chat template"), "{e}");
        let e = pipeline.run_saved(&cache, &header, &Request { context: "x".into(), ..ask.clone() }, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("no context"), "{e}");
    }
    // a damaged file
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.path().join("bad.kvc");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let e = Pipeline::new(&loaded).load_cache(&bad).unwrap_err().to_string();
    assert!(e.contains("not a valid kvc KV-cache file"), "{e}");
    // the same architecture with one weight changed (a fine-tune): refused by fingerprint
    let k = &mut loaded.model.layers[0].self_attn.k_proj.weight;
    let changed = k.as_ref().expect("a dense model").val().mul_scalar(1.001);
    *k = Some(burn::module::Param::from_tensor(changed));
    let e = Pipeline::new(&loaded).load_cache(&path).unwrap_err().to_string();
    assert!(e.contains("does not fit this model") && e.contains("written by model"), "{e}");
}

/// `compress_reusing` runs KVCompose's scoring pass once per prefilled context and options, and
/// keeps exactly the tokens (and cache contents) that a fresh `compress` keeps at every budget;
/// other presses and another context go through as `compress`.
#[test]
fn kvcompose_scores_shared_between_budgets_keep_what_fresh_runs_keep() {
    let loaded = kvc_models::load::<B>(&ensure_default_model().unwrap(), &Default::default()).unwrap();
    let pipeline = Pipeline::new(&loaded);
    let mut memo = kvc_models::pipeline::ScoreMemo::default();
    let snapshot = |c: &kvc_models::pipeline::Compressed<B>| -> (Vec<Vec<usize>>, Vec<Vec<f32>>) {
        let layers = (0..c.cache.lens().len())
            .map(|l| {
                let (k, v) = c.cache.layer(l).unwrap().unwrap().full();
                let mut x = k.into_data().to_vec::<f32>().unwrap();
                x.extend(v.into_data().to_vec::<f32>().unwrap());
                x
            })
            .collect();
        (c.report.kept.clone(), layers)
    };
    let texts = [CONTEXT, "Seven ships left the harbour of Ostend at dawn, carrying wool, salt and forty letters for the king."];
    for text in texts {
        let ids = loaded.tokenizer.encode(text, true).unwrap();
        let prefilled = pipeline.prefill(&ids, Default::default(), 16, &mut |_| {}).unwrap();
        let specs = [
            PressSpec::new("kvcompose", Budget::Ratio(0.25)),
            PressSpec::new("kvcompose", Budget::Ratio(0.75)),
            PressSpec::new("kvcompose", Budget::Tokens(9)),
            PressSpec::new("kvcompose", Budget::Ratio(0.5)).with_option("structured", false),
            PressSpec::new("kvcompose", Budget::Ratio(0.0)),
            PressSpec::new("knorm", Budget::Ratio(0.5)),
            PressSpec::new("kvcompose", Budget::Ratio(0.5)),
        ];
        let mut kept = Vec::new();
        let mut passes = Vec::new();
        for spec in &specs {
            let mut fed = 0;
            let shared = pipeline.compress_reusing(&prefilled, spec, &mut memo, &mut |_, _| fed += 1).unwrap();
            passes.push(fed > 0);
            let fresh = pipeline.compress(&prefilled, spec, &mut |_, _| {}).unwrap();
            let (a, b) = (snapshot(&shared), snapshot(&fresh));
            assert_eq!(a, b, "{spec:?}");
            assert_eq!((shared.report.bytes_before, shared.report.bytes_after), (fresh.report.bytes_before, fresh.report.bytes_after), "{spec:?}");
            kept.push(a.0.iter().flatten().sum::<usize>());
        }
        // a scoring pass for the first KVCompose spec of each context (the memo starts over on the
        // second) and for other options; none for another budget, ratio 0 or another press
        assert_eq!(passes, [true, false, false, true, false, false, false]);
        // the budgets did differ
        assert!(kept[0] > kept[6] && kept[6] > kept[1], "{kept:?}");
        // a budget beyond the context is refused on a memo hit as by a fresh run
        let too_many = PressSpec::new("kvcompose", Budget::Tokens(ids.len() + 1));
        assert!(pipeline.compress(&prefilled, &too_many, &mut |_, _| {}).is_err());
        assert!(pipeline.compress_reusing(&prefilled, &too_many, &mut memo, &mut |_, _| {}).is_err());
    }
}
