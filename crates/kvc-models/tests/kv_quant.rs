//! Quantized KV caches (issue 21; f16 / bf16 storage of an f32 model's cache: issue 22) on the default model (SmolLM2-135M): the decode kernel on the
//! codes against attention over the same cache widened to full precision; every press keeps the
//! tokens it keeps without quantization; real bytes; quantized caches in a batch; a saved
//! quantized cache answers as the one in memory.

mod common;

use common::{Flex, Nd};
use kvc_core::{Budget, KvBits, KvCache, KvQuant, KvcBackend, PressSpec};
use kvc_models::default_model::ensure_default_model;
use kvc_models::generate;
use kvc_models::pipeline::{Pipeline, Request};
use kvc_models::{GenerationConfig, LoadedModel, Logits};

fn text(chars: usize) -> String {
    let t = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/pride_and_prejudice_ch1-2.txt")).unwrap();
    t[..chars].to_string()
}

/// Caches of three layouts: uncompressed, KVCompose per-head (ragged heads: padded, masked
/// slots), StreamingLLM.
fn caches<B: KvcBackend>(m: &LoadedModel<B>, chars: usize) -> Vec<KvCache<B>> {
    let pipeline = Pipeline::new(m);
    let context = m.tokenizer.encode(&text(chars), true).unwrap();
    let presses = [PressSpec::new("kvcompose", Budget::Ratio(0.5)).with_option("structured", false), PressSpec::new("streaming_llm", Budget::Ratio(0.5))];
    let needs = presses.iter().fold(kvc_core::CaptureSpec::default(), |a, p| a.merge(p.needs().unwrap()));
    let prefilled = pipeline.prefill(&context, needs, 128, &mut |_| {}).unwrap();
    let mut out: Vec<KvCache<B>> = presses.iter().map(|p| pipeline.compress(&prefilled, p, &mut |_, _| {}).unwrap().cache).collect();
    out.push(prefilled.cache);
    out
}

/// Greedy steps on a quantized cache; before each, a copy of the cache as it stands takes the
/// same step with the codes widened before attention ([`kvc_core::kvquant::with_widened_attention`]:
/// the same cache operations, the same tokens quantized): the largest logit difference over
/// `steps`. (Two caches decoded apart would drift: a last-bit difference in a new key can round
/// to another code once that key is quantized.)
fn max_logit_gap<B: KvcBackend>(m: &LoadedModel<B>, a: &mut KvCache<B>, question: &[u32], steps: usize) -> f32 {
    logit_gap_and_argmax_agreement(m, a, question, steps).0
}

/// As [`max_logit_gap`], also counting the steps whose greedy token is the same on both paths.
fn logit_gap_and_argmax_agreement<B: KvcBackend>(m: &LoadedModel<B>, a: &mut KvCache<B>, question: &[u32], steps: usize) -> (f32, usize) {
    let argmax = |l: &[f32]| l.iter().enumerate().fold((0, f32::MIN), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0;
    let device = Default::default();
    let mut tokens = question.to_vec();
    let mut worst = 0f32;
    let mut same = 0;
    for _ in 0..steps {
        let mut b = a.clone();
        let la = m.model.forward(generate::token_tensor::<B>(&tokens, &device), a, None, Logits::Last).unwrap();
        let lb = kvc_core::kvquant::with_widened_attention(|| m.model.forward(generate::token_tensor::<B>(&tokens, &device), &mut b, None, Logits::Last).unwrap());
        let (la, lb) = (la.into_data().convert::<f32>().into_vec::<f32>().unwrap(), lb.into_data().convert::<f32>().into_vec::<f32>().unwrap());
        worst = la.iter().zip(&lb).map(|(x, y)| (x - y).abs()).fold(worst, f32::max);
        let next = argmax(&la);
        same += usize::from(next == argmax(&lb));
        tokens = vec![next as u32];
        assert_eq!(a.bytes(), b.bytes());
    }
    (worst, same)
}

#[test]
fn decode_on_codes_equals_decode_on_the_widened_cache() {
    fn check<B: KvcBackend>(m: &LoadedModel<B>, what: &str) {
        let question = m.tokenizer.encode("\nWho has taken Netherfield?\n", false).unwrap();
        for (ci, cache) in caches(m, 1500).into_iter().enumerate() {
            for spec in [KvQuant::int8(), KvQuant::int4(), KvQuant { bits: KvBits::Int4, residual: 0 }, KvQuant::f16(), KvQuant::bf16()] {
                let mut q = cache.clone();
                q.quantize(spec).unwrap();
                assert!(q.bytes() < cache.bytes() * 6 / 10);
                let gap = max_logit_gap(m, &mut q, &question, 12);
                eprintln!("{what} cache {ci} {spec:?}: logits within {gap:e}");
                assert!(gap <= 1e-4, "{what} cache {ci} {spec:?}: logits differ by {gap}");
                assert!(q.layer(0).unwrap().unwrap().quant.as_ref().is_some_and(|c| c.len() > 0));
            }
        }
    }
    let path = ensure_default_model().unwrap();
    check(&kvc_models::load::<Flex>(&path, &Default::default()).unwrap(), "flex");
    check(&kvc_models::load::<Nd>(&path, &Default::default()).unwrap(), "ndarray");
}

/// A bf16 model (`kvc generate --dtype bf16 --kv-dtype ...`): the prefill's bf16 keys and values
/// quantized, the window kept in bf16; decode on the codes against the widened path: logits
/// within bf16's rounding, the same greedy token at every step.
#[test]
fn bf16_models_decode_on_quantized_caches() {
    let m = kvc_models::load_as::<Flex>(&ensure_default_model().unwrap(), &Default::default(), Some(burn::tensor::DType::BF16)).unwrap();
    let question = m.tokenizer.encode("\nWho has taken Netherfield?\n", false).unwrap();
    let cache = caches(&m, 1500).pop().unwrap();
    assert_eq!(cache.layer(0).unwrap().unwrap().keys.dtype(), burn::tensor::DType::BF16);
    for spec in [KvQuant::int8(), KvQuant::int4()] {
        let mut q = cache.clone();
        q.quantize(spec).unwrap();
        assert!(q.bytes() < cache.bytes() * 6 / 10, "{spec:?}: {} of {}", q.bytes(), cache.bytes());
        let (gap, same) = logit_gap_and_argmax_agreement(&m, &mut q, &question, 12);
        eprintln!("bf16 {spec:?}: logits within {gap:e}, greedy token equal on {same} of 12 steps");
        // bf16 activations round every sum to 8 significant bits (a logit near 20 moves in steps of
        // 0.125) and the widened path rounds each dequantized key and value to bf16 too: a few
        // steps of the largest logits apart, never another greedy token
        assert!(gap <= 1.0 && same == 12, "bf16 {spec:?}: logits differ by {gap}, greedy token equal on {same} of 12 steps");
    }
}

/// Through `Pipeline::run`, every press of the registry keeps the same tokens with an int8,
/// int4 or bf16 cache as without (quantization follows the press); the reported bytes are the codes'
/// (int8 <= 0.28x of the f32 cache; int4 below int8: at this short length its 1-64-token residual
/// window in f32 weighs).
#[test]
fn every_press_keeps_its_tokens_and_the_bytes_drop() {
    let m = kvc_models::load::<Flex>(&ensure_default_model().unwrap(), &Default::default()).unwrap();
    let pipeline = Pipeline::new(&m);
    let base = Request {
        context: text(3000),
        questions: vec!["Which estate has been let?".into()],
        generation: GenerationConfig { max_new_tokens: 8, ..Default::default() },
        ..Default::default()
    };
    for name in kvc_core::press::spec::names() {
        let press = Some(PressSpec::new(name, Budget::Ratio(0.5)));
        let float = pipeline.run(&Request { press: press.clone(), ..base.clone() }, &mut |_| {}).unwrap();
        let mut int8_bytes = 0;
        for q in [KvQuant::int8(), KvQuant::int4(), KvQuant::bf16()] {
            let quant = pipeline.run(&Request { press: press.clone(), kv_quant: Some(q), ..base.clone() }, &mut |_| {}).unwrap();
            let (fr, qr) = (float.report.as_ref().unwrap(), quant.report.as_ref().unwrap());
            assert_eq!(fr.kept, qr.kept, "{name} {}: kept sets differ", q.name());
            let ratio = quant.kv_bytes.1 as f64 / float.kv_bytes.1 as f64;
            if q.bits == KvBits::Int8 {
                assert!(ratio <= 0.28, "{name} int8: {ratio:.3} of the float cache's bytes");
                int8_bytes = quant.kv_bytes.1;
            } else if q.is_float() {
                // half of f32's, the newest token of each layer and head in f32, keys padded to
                // whole blocks of 16 tokens
                assert!(ratio <= 0.53, "{name} {}: {ratio:.3} of the float cache's bytes", q.name());
            } else {
                assert!(quant.kv_bytes.1 < int8_bytes, "{name} int4: {} bytes, int8 {int8_bytes}", quant.kv_bytes.1);
            }
        }
    }
}

/// Quantized caches (int8 and bf16 without a residual window: every decoded token is quantized as
/// the next arrives; int4 with KIVI's 128) decoded together in one batch give each sequence the tokens and
/// logits it gets alone, bit for bit; `answer_batch` equals `answer`; a saved quantized cache
/// answers as the one in memory, and is not quantized again in another format.
#[test]
fn quantized_caches_batch_and_save_as_in_memory() {
    let m = kvc_models::load::<Flex>(&ensure_default_model().unwrap(), &Default::default()).unwrap();
    let pipeline = Pipeline::new(&m);
    let mut jobs = Vec::new();
    for cache in caches(&m, 1200) {
        for q in [KvQuant::int8(), KvQuant::int4(), KvQuant::bf16()] {
            let mut c = cache.clone();
            c.quantize(q).unwrap();
            jobs.push(c);
        }
    }
    let questions: Vec<Vec<u32>> = ["\nWho is the author?\n", "\nName one character.\n"].iter().map(|q| m.tokenizer.encode(q, false).unwrap()).collect();
    let config = GenerationConfig { max_new_tokens: 140, stop_at_eos: false, ..Default::default() };
    let pairs: Vec<(&KvCache<Flex>, &[u32])> = jobs.iter().enumerate().map(|(i, c)| (c, questions[i % 2].as_slice())).collect();
    let batched = pipeline.answer_batch(&pairs, &config).unwrap();
    for ((cache, question), b) in pairs.iter().zip(&batched) {
        let alone = pipeline.answer(cache, question, &config, &mut |_| {}).unwrap();
        assert_eq!((&b.ids, b.kv_bytes_final), (&alone.ids, alone.kv_bytes_final));
        assert_eq!(b.ids.len(), 140);
    }
    // int4 past its residual window: 140 new tokens quantize at least one more group
    let dir = std::env::temp_dir().join(format!("kvc-kvquant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (cache, question)) in pairs.iter().enumerate().take(4) {
        let path = dir.join(format!("{i}.kvc"));
        let header = pipeline.cache_header(cache, cache.next_position(), None, false);
        assert_eq!(header.kv_quant, cache.kv_quant());
        pipeline.save_cache(cache, &header, &path).unwrap();
        let (loaded, h) = pipeline.load_cache(&path).unwrap();
        assert_eq!((h.kv_quant, loaded.bytes()), (cache.kv_quant(), cache.bytes()));
        // a quantized file answers in its own format: another one is refused, with the reason
        let other = if h.kv_quant == Some(KvQuant::int8()) { KvQuant::int4() } else { KvQuant::int8() };
        let ask = Request { questions: vec!["Who?".into()], chat: false, kv_quant: Some(other), ..Default::default() };
        let e = pipeline.run_saved(&loaded, &h, &ask, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("cannot be quantized again"), "{e}");
        let short = GenerationConfig { max_new_tokens: 12, ..config.clone() };
        let a = pipeline.answer(&loaded, question, &short, &mut |_| {}).unwrap();
        let b = pipeline.answer(cache, question, &short, &mut |_| {}).unwrap();
        assert_eq!(a.ids, b.ids);
    }
    std::fs::remove_dir_all(dir).unwrap();
}
