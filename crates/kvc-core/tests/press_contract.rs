//! The contract every registered press keeps, on a fake model (no weights needed): run over
//! `spec::names()`, so a new press is checked the moment it is registered.

use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use kvc_core::kernels::{generic_attention, observed_attention};
use kvc_core::press::scorer::window_attention;
use kvc_core::press::spec;
use kvc_core::press::{pyramidkv, Budget, ForwardModel, PressReport, PressSpec};
use kvc_core::{AttentionObserver, CaptureSpec, CoreError, KvCache, PrefillCapture};

type B = NdArray<f32>;

/// A deterministic stand-in for a decoder: keys, values and queries are smooth functions of
/// (token, layer, head, position, dim); attention is computed exactly (causal, GQA `h / g`).
struct Fake {
    layers: usize,
    q_heads: usize,
    kv_heads: usize,
    d: usize,
    /// Every key and value the same: every attention-based score ties.
    constant: bool,
}

impl Fake {
    fn new(layers: usize) -> Self {
        Self { layers, q_heads: 4, kv_heads: 2, d: 8, constant: false }
    }

    fn values<Bk: Backend>(&self, heads: usize, part: &[u32], first: usize, l: usize, salt: f32) -> Tensor<Bk, 4> {
        let c = part.len();
        let mut v = Vec::with_capacity(heads * c * self.d);
        for h in 0..heads {
            for (j, &tok) in part.iter().enumerate() {
                for i in 0..self.d {
                    v.push(if self.constant {
                        0.5
                    } else {
                        let p = (first + j) as f32;
                        (tok as f32 * 0.37 + l as f32 * 1.3 + h as f32 * 0.71 + i as f32 * 0.11 + p * 0.05 + salt).sin() * (1.0 + 0.1 * i as f32)
                    });
                }
            }
        }
        Tensor::from_data(TensorData::new(v, [1, heads, c, self.d]), &Default::default())
    }
}

impl<Bk: Backend> ForwardModel<Bk> for Fake {
    fn num_layers(&self) -> usize {
        self.layers
    }
    fn num_heads(&self) -> usize {
        self.q_heads
    }
    fn num_kv_heads(&self) -> usize {
        self.kv_heads
    }
    fn rope_inv_freq(&self) -> Vec<f32> {
        (0..self.d / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / self.d as f32)).collect()
    }
    fn feed(&self, tokens: &[u32], cache: &mut KvCache<Bk>, observer: &mut dyn AttentionObserver<Bk>, chunk: usize) -> Result<(), CoreError> {
        for part in tokens.chunks(chunk.max(1)) {
            let first = cache.next_position();
            let c = part.len();
            for l in 0..self.layers {
                let q = self.values::<Bk>(self.q_heads, part, first, l, 0.3);
                let (keys, values) = cache.append(l, first, self.values(self.kv_heads, part, first, l, 1.9), self.values(self.kv_heads, part, first, l, 4.2))?;
                // the generic attention kernel: probabilities and reductions as a decoder passes them
                observed_attention(Some(&mut *observer), l, first, q.clone(), || q.clone(), keys, values, None, generic_attention);
            }
            cache.advance(c);
        }
        Ok(())
    }
}

fn tokens(t: usize) -> Vec<u32> {
    (0..t as u32).map(|i| (i * 7919 + 13) % 997).collect()
}

/// Prefills `ids` with a capture for `spec`, compresses, returns the cache before and after and
/// the report.
fn run(fake: &Fake, spec: &PressSpec, ids: &[u32], chunk: usize) -> (KvCache<B>, KvCache<B>, PressReport) {
    let mut press = spec.build::<B>().unwrap();
    assert_eq!(press.needs(), spec.needs().unwrap(), "{}", spec.label());
    let mut cache = KvCache::new(fake.layers);
    let mut capture = PrefillCapture::new(press.needs(), fake.layers);
    fake.feed(ids, &mut cache, &mut capture, chunk).unwrap();
    let before = cache.clone();
    let report = press.compress(fake, ids, &mut cache, &capture).unwrap_or_else(|e| panic!("{} on {} tokens: {e}", spec.label(), ids.len()));
    (before, cache, report)
}

fn positions(cache: &KvCache<B>) -> Vec<Vec<Vec<u32>>> {
    (0..cache.num_layers())
        .map(|l| {
            let kv = cache.layer(l).unwrap().unwrap();
            let [_, h, len, _] = kv.keys.dims();
            (0..h)
                .map(|hi| (0..len).filter(|&i| kv.valid.as_ref().is_none_or(|v| v[hi * len + i])).map(|i| kv.positions[hi * len + i]).collect())
                .collect()
        })
        .collect()
}

fn host(t: &Tensor<B, 4>) -> Vec<f32> {
    t.clone().into_data().to_vec::<f32>().unwrap()
}

#[test]
fn every_press_keeps_the_contract() {
    let fake = Fake::new(3);
    for name in spec::names() {
        for ratio in [0.0, 0.5, 0.9, 0.95] {
            for t in (2..=8).chain([300]) {
                let spec = PressSpec::new(name, Budget::Ratio(ratio));
                let ids = tokens(t);
                let (before, after, report) = run(&fake, &spec, &ids, 128);
                let what = format!("{} on {t} tokens", spec.label());
                // at least one token per layer and head
                assert!(report.kept.iter().flatten().all(|&k| k >= 1), "{what}: {:?}", report.kept);
                assert_eq!(report.kept.len(), fake.layers, "{what}");
                // the report is the cache's
                let kept_in_cache: Vec<Vec<usize>> = positions(&after).iter().map(|l| l.iter().map(Vec::len).collect()).collect();
                assert_eq!(report.kept, kept_in_cache, "{what}");
                assert_eq!(report.bytes_before, before.bytes(), "{what}");
                assert_eq!(report.bytes_after, after.bytes(), "{what}");
                assert_eq!(report.context_len, t);
                assert_eq!(after.next_position(), t, "{what}");
                // kept positions are real context positions, ascending, no duplicates
                for heads in positions(&after) {
                    for p in heads {
                        assert!(p.windows(2).all(|w| w[0] < w[1]) && p.iter().all(|&x| (x as usize) < t), "{what}: {p:?}");
                    }
                }
                if ratio == 0.0 {
                    // a bit-exact no-op
                    for l in 0..fake.layers {
                        let (a, b) = (before.layer(l).unwrap().unwrap(), after.layer(l).unwrap().unwrap());
                        assert_eq!(host(&a.keys), host(&b.keys), "{what}");
                        assert_eq!(host(&a.values), host(&b.values), "{what}");
                        assert_eq!((&a.positions, &a.valid), (&b.positions, &b.valid), "{what}");
                    }
                } else if t == 300 {
                    assert!(report.bytes_after < report.bytes_before, "{what}");
                }
                // the same input gives the same kept set
                let (_, again, _) = run(&fake, &spec, &ids, 128);
                assert_eq!(positions(&after), positions(&again), "{what}: not deterministic");
            }
        }
    }
}

#[test]
fn prefill_chunking_does_not_change_what_is_kept() {
    // SnapKV's 64-query window crosses chunks of 7 tokens; attention sums and query statistics
    // are accumulated over chunks
    let fake = Fake::new(2);
    for name in spec::names() {
        let spec = PressSpec::new(name, Budget::Ratio(0.5));
        let ids = tokens(150);
        let (_, one, _) = run(&fake, &spec, &ids, 150);
        let (_, chunked, _) = run(&fake, &spec, &ids, 7);
        assert_eq!(positions(&one), positions(&chunked), "{}", spec.label());
    }
}

#[test]
fn uniform_presses_keep_kvpress_counts() {
    let fake = Fake::new(2);
    for name in ["streaming_llm", "knorm", "random", "snapkv", "tova", "observed_attention", "expected_attention"] {
        for (t, ratio) in [(300, 0.25), (300, 0.75), (5, 0.5), (7, 0.95)] {
            let (_, _, report) = run(&fake, &PressSpec::new(name, Budget::Ratio(ratio)), &tokens(t), 64);
            // kvpress: int(T * (1 - r)); kvc keeps at least one
            let n = ((t as f64 * (1.0 - ratio)) as usize).max(1);
            assert!(report.kept.iter().flatten().all(|&k| k == n), "{name} {t} {ratio}: {:?}", report.kept);
        }
        let (_, _, report) = run(&fake, &PressSpec::new(name, Budget::Tokens(17)), &tokens(100), 64);
        assert!(report.kept.iter().flatten().all(|&k| k == 17), "{name}: {:?}", report.kept);
    }
}

#[test]
fn protected_tokens_survive_when_every_score_ties() {
    // constant keys and values: every attention and norm score ties exactly
    let mut fake = Fake::new(2);
    fake.constant = true;
    let t = 100;
    let ids = tokens(t);
    let kept = |name: &str, spec: PressSpec| -> Vec<Vec<Vec<u32>>> {
        let (_, after, _) = run(&fake, &spec, &ids, 32);
        let _ = name;
        positions(&after)
    };
    let all_heads_have = |sets: &[Vec<Vec<u32>>], want: &[u32], what: &str| {
        for heads in sets {
            for p in heads {
                assert!(want.iter().all(|w| p.contains(w)), "{what}: {p:?} lacks {want:?}");
            }
        }
    };
    let window: Vec<u32> = (t as u32 - 8..t as u32).collect();
    all_heads_have(&kept("snapkv", PressSpec::new("snapkv", Budget::Ratio(0.5)).with_option("window_size", 8)), &window, "snapkv window");
    all_heads_have(&kept("pyramidkv", PressSpec::new("pyramidkv", Budget::Ratio(0.5)).with_option("window_size", 8)), &window, "pyramidkv window");
    all_heads_have(&kept("tova", PressSpec::new("tova", Budget::Ratio(0.9))), &[t as u32 - 1], "tova last token");
    all_heads_have(&kept("streaming_llm", PressSpec::new("streaming_llm", Budget::Ratio(0.9))), &[0, 1, 2, 3], "streaming sinks");
    all_heads_have(&kept("expected_attention", PressSpec::new("expected_attention", Budget::Ratio(0.9))), &[0, 1, 2, 3], "expected_attention sinks");
    all_heads_have(&kept("adakv", PressSpec::new("adakv", Budget::Ratio(0.5)).with_option("window_size", 8)), &window, "adakv(snapkv) window");
}

#[test]
fn pyramid_budgets_never_empty_a_layer() {
    // 10 tokens at ratio 0.96: kvpress's formula gives round(0.4) = 0
    let fake = Fake::new(30);
    let (_, _, report) = run(&fake, &PressSpec::new("pyramidkv", Budget::Ratio(0.96)), &tokens(10), 8);
    assert!(report.kept.iter().flatten().all(|&k| k >= 1), "{:?}", report.kept);
    // a 1-layer model: no division by zero
    let fake = Fake::new(1);
    let (_, _, report) = run(&fake, &PressSpec::new("pyramidkv", Budget::Ratio(0.5)), &tokens(300), 64);
    assert_eq!(report.kept_per_layer(), vec![pyramidkv::layer_budget(0, 1, 300, 0.5, 64, 20.0)]);
    // the budgets of a real-sized pyramid sum to the layers' budgets, heads equal within a layer
    let fake = Fake::new(30);
    let (_, _, report) = run(&fake, &PressSpec::new("pyramidkv", Budget::Ratio(0.5)), &tokens(1000), 256);
    let want: Vec<usize> = (0..30).map(|l| pyramidkv::layer_budget(l, 30, 1000, 0.5, 64, 20.0)).collect();
    assert_eq!(report.kept_per_layer(), want);
    assert!(report.kept.iter().all(|h| h.iter().all(|&k| k == h[0])));
    assert_eq!(report.kept_entries(), 2 * want.iter().sum::<usize>());
}

#[test]
fn adakv_spreads_the_layer_budget_over_heads() {
    let fake = Fake::new(2);
    let (_, after, report) = run(&fake, &PressSpec::new("adakv", Budget::Ratio(0.75)).with_option("scorer", "knorm"), &tokens(200), 64);
    let n = 50;
    for heads in &report.kept {
        assert_eq!(heads.iter().sum::<usize>(), 2 * n, "{:?}", report.kept);
        assert!(heads.iter().all(|&k| k >= n / 5), "safeguard: {:?}", report.kept);
    }
    // padded layout: each layer as long as its largest head, padding masked
    assert_eq!(after.lens(), report.kept_per_layer());
    // unknown inner scorers and options are errors
    assert!(PressSpec::new("adakv", Budget::Ratio(0.5)).with_option("scorer", "kvcompose").check().is_err());
    assert!(PressSpec::new("adakv", Budget::Ratio(0.5)).with_option("colour", "blue").check().is_err());
    assert!(PressSpec::new("adakv", Budget::Ratio(0.5)).with_option("alpha_safeguard", 2).check().is_err());
    PressSpec::new("adakv", Budget::Ratio(0.5)).with_option("scorer", "tova").check().unwrap();
}

#[test]
fn query_head_h_reads_kv_head_h_over_g() {
    // 4 query heads, 2 KV heads: kv head 0 matches token 0, kv head 1 matches token 1
    let d = 2;
    let keys: Tensor<B, 4> = Tensor::from_data(TensorData::new(vec![9.0f32, 0.0, 0.0, 9.0, 0.0, 9.0, 9.0, 0.0], [1, 2, 2, d]), &Default::default());
    let q: Tensor<B, 4> = Tensor::from_data(TensorData::new(vec![1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0], [1, 4, 1, d]), &Default::default());
    let att = window_attention(&q, &keys, 1).into_data().to_vec::<f32>().unwrap(); // [4 heads x 2 keys]
    // heads 0 and 1 (group of kv head 0) favour token 0; heads 2 and 3 (kv head 1) token 1
    assert!(att[0] > 0.9 && att[2] > 0.9 && att[5] > 0.9 && att[7] > 0.9, "{att:?}");
}

#[test]
fn knorm_orders_half_precision_keys_by_their_f32_norm() {
    // ||[1, 2^-5]|| = sqrt(1 + 2^-10) = 1.000488 rounds to 1.0 in f16 (half a step above 1), so a
    // norm computed in f16 ties with ||[1, 0]|| and the lower position would win; in f32 the
    // later key has the smaller norm and must be the one kept
    type F = burn::backend::Flex;
    let keys = vec![1.0f32, 0.03125, 1.0, 0.0];
    let k: Tensor<F, 4> = Tensor::from_data(TensorData::new(keys, [1, 1, 2, 2]), &Default::default());
    let cached = k.cast(DType::F16);
    assert_eq!(cached.dtype(), DType::F16);
    let half_norms: Vec<f32> = cached.clone().square().sum_dim(3).sqrt().cast(DType::F32).into_data().to_vec().unwrap();
    assert_eq!(half_norms[0], half_norms[1], "the f16 norms must tie for this test to mean anything");
    let mut cache = KvCache::<F>::new(1);
    cache.append(0, 0, cached.clone(), cached).unwrap();
    cache.advance(2);
    let fake = Fake { layers: 1, q_heads: 1, kv_heads: 1, d: 2, constant: false };
    let capture = PrefillCapture::new(CaptureSpec::default(), 1);
    let mut press = PressSpec::new("knorm", Budget::Tokens(1)).build::<F>().unwrap();
    press.compress(&fake, &[0, 1], &mut cache, &capture).unwrap();
    assert_eq!(cache.layer(0).unwrap().unwrap().positions, vec![1]);
}

#[test]
fn specs_round_trip_through_json_and_reject_bad_input() {
    let s = PressSpec::new("snapkv", Budget::Ratio(0.25)).with_option("window_size", 32);
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<PressSpec>(&json).unwrap(), s);
    let from_config: PressSpec = serde_json::from_str(r#"{"name": "snapkv", "ratio": 0.5, "options": {"window_size": 16, "kernel_size": 3}}"#).unwrap();
    from_config.check().unwrap();
    assert!(serde_json::from_str::<PressSpec>(r#"{"name": "snapkv", "ratio": 0.5, "colour": 1}"#).is_err());
    let cases = [
        (PressSpec::new("nope", Budget::Ratio(0.5)), "unknown press"),
        (PressSpec::new("snapkv", Budget::Ratio(1.0)), "outside [0, 1)"),
        (PressSpec::new("snapkv", Budget::Ratio(0.5)).with_option("kernel_size", 4), "must be odd"),
        (PressSpec::new("snapkv", Budget::Ratio(0.5)).with_option("window_size", 0), "at least 1"),
        (PressSpec::new("snapkv", Budget::Ratio(0.5)).with_option("window", 8), "unknown option \"window\" (known: window_size, kernel_size)"),
        (PressSpec::new("knorm", Budget::Ratio(0.5)).with_option("x", 1), "known: none"),
        (PressSpec::new("pyramidkv", Budget::Ratio(0.5)).with_option("beta", 0.5), "beta"),
        (PressSpec::new("expected_attention", Budget::Ratio(0.5)).with_option("use_vnorm", "maybe"), "true or false"),
        (PressSpec { name: "knorm".into(), ratio: Some(0.5), tokens: Some(3), options: Default::default() }, "exactly one budget"),
    ];
    for (spec, want) in cases {
        let e = spec.check().unwrap_err().to_string();
        assert!(e.contains(want), "{}: {e}", spec.label());
    }
    // every documented press builds with its defaults
    for d in spec::docs() {
        PressSpec::new(d.name, Budget::Ratio(0.5)).build::<B>().unwrap();
    }
}

#[test]
fn random_is_deterministic_per_seed() {
    let fake = Fake::new(2);
    let ids = tokens(300);
    let kept = |seed: u64| positions(&run(&fake, &PressSpec::new("random", Budget::Ratio(0.5)).with_option("seed", seed), &ids, 64).1);
    assert_eq!(kept(7), kept(7));
    assert_ne!(kept(7), kept(8));
    // layers draw different scores
    let k = kept(7);
    assert_ne!(k[0], k[1]);
}
