//! Batched decoding (`generate::batch`): a sequence's logits and tokens do not depend on the
//! sequences beside it. Caches of every layout a press leaves (uncompressed, KVCompose structured
//! and per-head, AdaKV, PyramidKV, StreamingLLM), of different lengths, each with its own
//! question, decoded together and each alone; sequences joining mid-way, finishing at different
//! steps, cancelled; greedy and sampled; f32 and bf16; flex and ndarray, on the default model.

mod common;

use std::collections::HashMap;

use burn::tensor::DType;
use common::{Flex, Nd};
use kvc_core::{Budget, KvCache, KvcBackend, PressSpec};
use kvc_models::default_model::ensure_default_model;
use kvc_models::generate::batch::{Batch, SequenceId};
use kvc_models::pipeline::Pipeline;
use kvc_models::{GenerationConfig, LoadedModel, StopReason};

const QUESTIONS: [&str; 4] = [
    "Who is the author?",
    "Summarize the first sentence.",
    "What happens next? Answer in one line.",
    "Name one character.",
];

/// A sequence to decode: its cache, question ids and settings.
struct Case<B: KvcBackend> {
    cache: KvCache<B>,
    question: Vec<u32>,
    config: GenerationConfig,
}

/// Caches of two context lengths, uncompressed and compressed by presses of every layout, each
/// with every question: `4 x (2 + 2 x presses)` cases; `max_new_tokens` varies per case so that
/// sequences finish at different steps; every third case samples.
fn cases<B: KvcBackend>(m: &LoadedModel<B>, max_new: usize) -> Vec<Case<B>> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/pride_and_prejudice_ch1-2.txt")).unwrap();
    let pipeline = Pipeline::new(m);
    let presses = [
        PressSpec::new("kvcompose", Budget::Ratio(0.5)),
        PressSpec::new("kvcompose", Budget::Ratio(0.5)).with_option("structured", false),
        PressSpec::new("adakv", Budget::Ratio(0.25)),
        PressSpec::new("pyramidkv", Budget::Ratio(0.5)).with_option("window_size", 16),
        PressSpec::new("streaming_llm", Budget::Ratio(0.75)),
    ];
    let mut caches = Vec::new();
    for chars in [900, 1500] {
        let context = m.tokenizer.encode(&text[..chars], true).unwrap();
        let mut needs = kvc_core::CaptureSpec::default();
        for p in &presses {
            needs = needs.merge(p.needs().unwrap());
        }
        let prefilled = pipeline.prefill(&context, needs, 128, &mut |_| {}).unwrap();
        for p in &presses {
            caches.push(pipeline.compress(&prefilled, p, &mut |_, _| {}).unwrap().cache);
        }
        caches.push(prefilled.cache);
    }
    let mut out = Vec::new();
    for (i, cache) in caches.into_iter().enumerate() {
        for (j, q) in QUESTIONS.iter().enumerate() {
            let k = i * QUESTIONS.len() + j;
            let config = GenerationConfig {
                max_new_tokens: max_new - k % 4,
                temperature: if k % 3 == 2 { 0.8 } else { 0.0 },
                top_p: 0.9,
                seed: k as u64,
                stop_at_eos: k % 2 == 0,
                ..Default::default()
            };
            out.push(Case { cache: cache.clone(), question: m.tokenizer.encode(&format!("\n{q}\n"), false).unwrap(), config });
        }
    }
    out
}

/// What a sequence produced: its tokens, stop reason, and the logits each step sampled from.
#[derive(Debug)]
struct Trace {
    tokens: Vec<u32>,
    stop: StopReason,
    logits: Vec<Vec<f32>>,
}

/// Decodes `cases` in one batch; `join_at[i]` is the step before which case `i` joins, and
/// `cancel` = (case, step) takes one out before that step.
fn run<B: KvcBackend>(m: &LoadedModel<B>, cases: &[Case<B>], join_at: &[usize], cancel: Option<(usize, usize)>) -> Vec<Trace> {
    let mut batch = Batch::new();
    let mut ids: HashMap<SequenceId, usize> = HashMap::new();
    let mut traces: Vec<Option<Trace>> = (0..cases.len()).map(|_| None).collect();
    let mut logits: Vec<Vec<Vec<f32>>> = vec![Vec::new(); cases.len()];
    let eos = m.tokenizer.eos_ids();
    for step in 0..200 {
        for (i, c) in cases.iter().enumerate().filter(|(i, _)| join_at[*i] == step) {
            let id = batch.add(&m.model, c.cache.clone(), &c.question, c.config.clone(), eos).unwrap();
            ids.insert(id, i);
        }
        if let Some((i, at)) = cancel {
            if at == step {
                let id = *ids.iter().find(|(_, &c)| c == i).unwrap().0;
                let done = batch.cancel(id).expect("the cancelled sequence is active");
                assert_eq!(done.stop, StopReason::Cancelled);
                traces[i] = Some(Trace { tokens: done.tokens, stop: done.stop, logits: std::mem::take(&mut logits[i]) });
            }
        }
        if batch.is_empty() && join_at.iter().all(|&j| j <= step) {
            break;
        }
        for id in batch.ids() {
            logits[ids[&id]].push(batch.logits(id).unwrap().to_vec());
        }
        let steps = batch.step(&m.model).unwrap();
        assert_eq!(steps.len(), batch.len() + steps.iter().filter(|s| s.stop.is_some()).count());
        for done in batch.take_finished() {
            let i = ids[&done.id];
            traces[i] = Some(Trace { tokens: done.tokens, stop: done.stop, logits: std::mem::take(&mut logits[i]) });
        }
    }
    traces.into_iter().map(|t| t.expect("every sequence finished within 200 steps")).collect()
}

/// Each case of `together` against the same case decoded alone: identical tokens and stop
/// reasons, logits within `tol` (a cancelled one: a prefix).
fn check<B: KvcBackend>(m: &LoadedModel<B>, cases: &[Case<B>], together: &[Trace], tol: f32, what: &str) {
    let mut worst = 0f32;
    for (i, (c, t)) in cases.iter().zip(together).enumerate() {
        let alone = run(m, std::slice::from_ref(c), &[0], None).pop().unwrap();
        if t.stop == StopReason::Cancelled {
            assert!(alone.tokens.starts_with(&t.tokens), "{what}: case {i} cancelled: {:?} not a prefix of {:?}", t.tokens, alone.tokens);
        } else {
            assert_eq!((&t.tokens, t.stop), (&alone.tokens, alone.stop), "{what}: case {i}");
        }
        for (a, b) in t.logits.iter().zip(&alone.logits) {
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            worst = worst.max(d);
        }
    }
    assert!(worst <= tol, "{what}: logits moved by {worst} in a batch");
    eprintln!("{what}: {} sequences, logits within {worst:e} of each alone", cases.len());
}

fn load<B: KvcBackend>(dtype: Option<DType>) -> LoadedModel<B> {
    kvc_models::load_as::<B>(&ensure_default_model().unwrap(), &Default::default(), dtype).unwrap()
}

/// 32 sequences over 12 caches (two lengths, six layouts) at once on flex, f32: on the
/// quantized weights a row's products keep their order of sums, so the logits are the bits of
/// the sequence alone.
#[test]
fn thirty_two_sequences_decode_as_each_alone() {
    let m = load::<Flex>(None);
    let mut cases = cases(&m, 10);
    cases.truncate(32);
    let together = run(&m, &cases, &vec![0; cases.len()], None);
    assert!(together.iter().any(|t| t.stop == StopReason::MaxTokens));
    let lens: std::collections::BTreeSet<usize> = together.iter().map(|t| t.tokens.len()).collect();
    assert!(lens.len() > 1, "sequences finish at different steps: {lens:?}");
    check(&m, &cases, &together, 0.0, "flex f32, quantized weights");
}

/// Forty sequences with the weights held only as codes (the default of `kvc`): above the 32 rows
/// one matrix-vector call takes, a step feeds its rows 32 at a time, and every sequence still
/// gets the tokens, stop reasons and logits it gets alone, bit for bit.
#[test]
fn forty_sequences_on_codes_decode_as_each_alone() {
    let m = kvc_models::load_with::<Flex>(&ensure_default_model().unwrap(), &Default::default(), None, kvc_models::WeightStorage::Codes).unwrap();
    assert!(m.model.codes_only());
    let mut cases = cases(&m, 6);
    cases.truncate(40);
    assert_eq!(cases.len(), 40);
    let together = run(&m, &cases, &vec![0; cases.len()], None);
    check(&m, &cases, &together, 0.0, "flex f32, codes only, 40 sequences");
}

/// Sequences join mid-way and one is cancelled; the dense weights (`--dense-weights`: GEMM over
/// the rows, whose sums may group differently) stay within 1e-4.
#[test]
fn joining_mid_way_and_cancelling_on_dense_weights() {
    let mut m = load::<Flex>(None);
    m.model.set_quantized_decode(false);
    let cases: Vec<_> = cases(&m, 8).into_iter().step_by(3).take(10).collect();
    let join: Vec<usize> = (0..cases.len()).map(|i| [0, 0, 2, 3, 5][i % 5]).collect();
    let together = run(&m, &cases, &join, Some((1, 3)));
    assert_eq!(together[1].stop, StopReason::Cancelled);
    assert_eq!(together[1].tokens.len(), 3);
    check(&m, &cases, &together, 1e-4, "flex f32, dense weights, joins and a cancel");
}

/// bf16 weights, activations and caches on flex, and ndarray (f32): the batch changes nothing.
#[test]
fn bf16_on_flex_and_f32_on_ndarray() {
    let m = load::<Flex>(Some(DType::BF16));
    let half: Vec<_> = cases(&m, 6).into_iter().step_by(5).take(8).collect();
    let together = run(&m, &half, &vec![0; half.len()], None);
    check(&m, &half, &together, 1e-4, "flex bf16");

    let m = load::<Nd>(None);
    let nd: Vec<_> = cases(&m, 6).into_iter().step_by(7).take(6).collect();
    let together = run(&m, &nd, &[0, 1, 0, 1, 0, 1], Some((2, 2)));
    check(&m, &nd, &together, 1e-4, "ndarray f32");
}

/// Bad input to a batch is an error, never a panic, and leaves the batch usable.
#[test]
fn bad_sequences_are_refused() {
    let m = load::<Flex>(None);
    let mut batch = Batch::new();
    let eos = m.tokenizer.eos_ids();
    let empty = m.model.new_cache();
    assert!(batch.add(&m.model, empty.clone(), &[], GenerationConfig::default(), eos).is_err(), "empty question");
    let zero = GenerationConfig { max_new_tokens: 0, ..Default::default() };
    assert!(batch.add(&m.model, empty.clone(), &[1], zero, eos).is_err(), "max_new_tokens 0");
    let window = m.model.config().max_position_embeddings;
    let long = GenerationConfig { max_new_tokens: window, ..Default::default() };
    assert!(batch.add(&m.model, empty.clone(), &[1, 2], long, eos).is_err(), "beyond the window");
    assert!(m.model.forward_batch(&[1, 2], &mut [&mut empty.clone()]).is_err(), "tokens and caches differ");
    assert!(batch.is_empty());
    let id = batch.add(&m.model, empty, &[1, 2, 3], GenerationConfig { max_new_tokens: 2, ..Default::default() }, eos).unwrap();
    assert!(batch.cancel(SequenceId(id.0 + 1)).is_none(), "unknown id");
    while !batch.is_empty() {
        batch.step(&m.model).unwrap();
    }
    assert_eq!(batch.take_finished()[0].tokens.len(), 2);
}

/// `Pipeline::answer_batch` (what `kvc-bench eval` and the server run) gives each job the answer
/// `Pipeline::answer` gives it alone: ids, text, stop reason, final cache bytes.
#[test]
fn answer_batch_equals_answer() {
    let m = load::<Flex>(None);
    let pipeline = Pipeline::new(&m);
    let cases: Vec<_> = cases(&m, 12).into_iter().step_by(4).take(6).collect();
    let config = GenerationConfig { max_new_tokens: 12, ..Default::default() };
    let jobs: Vec<_> = cases.iter().map(|c| (&c.cache, c.question.as_slice())).collect();
    let batched = pipeline.answer_batch(&jobs, &config).unwrap();
    assert_eq!(batched.len(), jobs.len());
    for ((cache, question), b) in jobs.iter().zip(&batched) {
        let alone = pipeline.answer(cache, question, &config, &mut |_| {}).unwrap();
        assert_eq!((&b.ids, &b.text, b.stop, b.question_tokens, b.kv_bytes_final), (&alone.ids, &alone.text, alone.stop, alone.question_tokens, alone.kv_bytes_final));
    }
}
