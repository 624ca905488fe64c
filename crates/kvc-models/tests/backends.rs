//! The same answers on every backend compiled into the test: flex (the reference), ndarray, and,
//! with the `wgpu` / `cuda` features of kvc-models, the GPU backends (wgpu runs in CI on Mesa's
//! software Vulkan driver, lavapipe; `tools/gpu_check.sh` runs this file with `cuda`).
//!
//! - burn kernel cases that public reports show breaking on some backends: max / argmax / top-k
//!   over values above 32767, around -1e9 and +1e9 and at `f32::MAX`, argmax ties (first index,
//!   as torch and greedy decoding need), reshape -> permute -> full-range slice, reductions and
//!   softmax over transposed and transposed-then-narrowed views.
//! - The tiny Qwen3 / Llama-3 / Qwen2 fixtures: logits within 1e-4 of flex, identical greedy tokens.
//! - SmolLM2 on a ~100-token prompt: logits within 1e-3 of flex, identical greedy tokens, identical
//!   KVCompose kept sets (structured and per-head) at ratios 0.25 and 0.75.

mod common;

use burn::tensor::activation::softmax;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use common::{all_logits, fixture, greedy};
use kvc_core::{Budget, CaptureSpec, KvCache, KvcBackend, PressSpec};
use kvc_models::pipeline::Pipeline;

/// Calls `$f::<B>(name, args...)` for each compiled backend `B` (flex first: the reference) and
/// returns `(name, result)` pairs.
macro_rules! each_backend {
    ($f:ident $(, $arg:expr)*) => {{
        let mut out = Vec::new();
        out.push(("flex", $f::<burn::backend::Flex>("flex" $(, $arg)*)));
        out.push(("ndarray", $f::<burn::backend::NdArray<f32>>("ndarray" $(, $arg)*)));
        #[cfg(feature = "wgpu")]
        out.push(("wgpu", $f::<burn::backend::Wgpu>("wgpu" $(, $arg)*)));
        #[cfg(feature = "cuda")]
        out.push(("cuda", $f::<burn::backend::Cuda>("cuda" $(, $arg)*)));
        out
    }};
}

fn floats<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn ints<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec::<i64>().unwrap()
}

fn tensor<B: Backend, const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

/// The kernel cases on backend `B`; returns nothing, panics naming the backend and the case.
fn kernel_cases<B: Backend>(name: &str) {
    // max / argmax / top-k over large magnitudes, one row per case
    let rows: Vec<(Vec<f32>, usize, &str)> = vec![
        (vec![0.5, 32767.0, 32768.0, 40000.0, 39999.0, 65535.0, 65536.0, 1.0e7], 7, "above 32767"),
        (vec![-1e9, -1e9, -5e8, -1e9, -2e9, -1e9, -1e9, -1e9], 2, "around -1e9"),
        (vec![0.1, 1e9 + 0.3, 0.2, 1e9, 0.9, 1e9, 0.0, -1.0], 1, "+1e9-boosted ties"),
        (vec![f32::MAX, 0.0, f32::MAX, -f32::MAX, 1.0, 2.0, 3.0, 4.0], 0, "f32::MAX ties"),
        (vec![7.0; 8], 0, "all equal"),
    ];
    for (row, want, case) in &rows {
        let t = tensor::<B, 2>(row.clone(), [1, row.len()]);
        assert_eq!(ints(t.clone().argmax(1)), vec![*want as i64], "{name}: argmax {case}");
        assert_eq!(floats(t.clone().max_dim(1)), vec![row[*want]], "{name}: max {case}");
        let (values, indices) = t.topk_with_indices(2, 1);
        let mut sorted: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        assert_eq!(floats(values), vec![sorted[0].1, sorted[1].1], "{name}: top-2 values {case}");
        let idx = ints(indices);
        // ties may come in either order, but must be the tied values
        assert!(idx.iter().all(|&i| row[i as usize] >= sorted[1].1), "{name}: top-2 indices {case}: {idx:?}");
    }
    // argmax ties over a long row (reductions split across work groups): the first index
    let mut long = vec![-3.0f32; 4096];
    long[3000] = 5.0;
    long[300] = 5.0;
    long[3999] = 5.0;
    assert_eq!(ints(tensor::<B, 2>(long, [1, 4096]).argmax(1)), vec![300], "{name}: argmax ties over 4096");
    assert_eq!(ints(tensor::<B, 2>(vec![1.0; 4096], [1, 4096]).argmax(1)), vec![0], "{name}: argmax of a constant row");
    // reshape -> permute -> full-range slice
    let x: Vec<f32> = (0..192).map(|i| i as f32).collect();
    let t = tensor::<B, 1>(x.clone(), [192]).reshape([1, 3, 8, 8]).permute([0, 2, 3, 1]).slice([0..1, 0..8, 0..8, 0..3]);
    let want: Vec<f32> = (0..8).flat_map(|h| (0..8).flat_map(move |w| (0..3).map(move |c| (c * 64 + h * 8 + w) as f32))).collect();
    assert_eq!(t.dims(), [1, 8, 8, 3], "{name}: permuted dims");
    assert_eq!(floats(t), want, "{name}: reshape -> permute -> slice");
    // reductions and softmax over transposed and transposed-then-narrowed views
    let m = tensor::<B, 2>(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]);
    let tr = m.clone().transpose();
    assert_eq!(floats(tr.clone().sum_dim(1)), vec![5.0, 7.0, 9.0], "{name}: sum over a transposed view");
    assert_eq!(floats(tr.clone().mean_dim(1)), vec![2.5, 3.5, 4.5], "{name}: mean over a transposed view");
    assert_eq!(floats(tr.clone().max_dim(1)), vec![4.0, 5.0, 6.0], "{name}: max over a transposed view");
    let narrowed = tr.clone().narrow(0, 1, 2);
    assert_eq!(floats(narrowed.clone().sum_dim(1)), vec![7.0, 9.0], "{name}: sum over a transposed, narrowed view");
    assert_eq!(floats(m.clone().transpose().narrow(1, 1, 1)), vec![4.0, 5.0, 6.0], "{name}: narrowed column");
    let s = floats(softmax(narrowed, 1));
    let e = (3.0f32).exp();
    let want = [1.0 / (1.0 + e), e / (1.0 + e), 1.0 / (1.0 + e), e / (1.0 + e)];
    assert!(s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{name}: softmax over a transposed, narrowed view: {s:?}");
    let s = floats(softmax(tr, 0));
    let col: f32 = (0..3).map(|i| (i as f32).exp()).sum();
    let want = [1.0 / col, 1.0 / col, 1f32.exp() / col, 1f32.exp() / col, 2f32.exp() / col, 2f32.exp() / col];
    assert!(s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{name}: softmax over dim 0 of a transposed view: {s:?}");
}

#[test]
fn kernel_cases_hold_on_every_backend() {
    let _ = each_backend!(kernel_cases);
}

/// Logits at every position and 6 greedy tokens of a tiny fixture model.
fn tiny<B: KvcBackend>(_: &str, model: &str) -> (Vec<Vec<f32>>, Vec<u32>) {
    let m = kvc_models::load_hf_decoder::<B>(&fixture(model), &Default::default()).unwrap();
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 29 + 3) % 97).collect();
    (all_logits(&m, &ids, 16), greedy(&m, &ids, 6))
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn tiny_models_agree_across_backends() {
    for model in ["tiny_qwen3", "tiny_llama3", "tiny_qwen2"] {
        let results = each_backend!(tiny, model);
        let (reference, rest) = results.split_first().unwrap();
        for (name, (logits, tokens)) in rest {
            let d = max_diff(&reference.1 .0, logits);
            println!("{model}: {name} vs flex: logits max |diff| {d:.2e}, greedy {tokens:?}");
            assert!(d <= 1e-4, "{model}: {name} logits differ from flex by {d}");
            assert_eq!(&reference.1 .1, tokens, "{model}: {name} greedy tokens");
        }
    }
}

/// What SmolLM2 gives on one backend for a ~100-token prompt: last logits, 8 greedy tokens, and
/// the kept positions of every head of every layer after KVCompose (structured and per-head, at
/// ratios 0.25 and 0.75).
struct Smol {
    logits: Vec<f32>,
    tokens: Vec<u32>,
    kept: Vec<(String, Vec<Vec<u32>>)>,
}

fn kept_sets<B: Backend>(cache: &KvCache<B>) -> Vec<Vec<u32>> {
    (0..cache.num_layers()).flat_map(|l| cache.layer(l).unwrap().unwrap().kept_positions()).collect()
}

const PROMPT: &str = "The lighthouse keeper, Ada Quill, lived on the island of Varn for twelve years. \
Every evening she climbed the ninety steps, lit the great lamp, and wrote the weather in a green notebook. \
Her brother Tomas kept goats on the mainland and sent letters every spring; she answered each one in \
the same careful hand, and kept his replies in a tin box under the stairs. When the storms came in \
November she slept in the lamp room, listening to the bell buoy. Who kept goats?";

fn smol<B: KvcBackend>(_: &str) -> Smol {
    let device = Default::default();
    let loaded = kvc_models::load::<B>(&kvc_models::default_model::ensure_default_model().unwrap(), &device).unwrap();
    let ids = loaded.tokenizer.encode(PROMPT, true).unwrap();
    assert!((90..=120).contains(&ids.len()), "{} prompt tokens", ids.len());
    let mut cache = loaded.model.new_cache();
    let logits = floats(loaded.model.prefill(&ids, &mut cache, None, 64).unwrap());
    let tokens = greedy(&loaded.model, &ids, 8);
    let pipeline = Pipeline::new(&loaded);
    let prefilled = pipeline.prefill(&ids, CaptureSpec::default(), 64, &mut |_| {}).unwrap();
    let mut kept = Vec::new();
    for structured in [true, false] {
        for ratio in [0.25, 0.75] {
            let spec = PressSpec::new("kvcompose", Budget::Ratio(ratio)).with_option("structured", structured);
            let c = pipeline.compress(&prefilled, &spec, &mut |_, _| {}).unwrap();
            kept.push((spec.label(), kept_sets(&c.cache)));
        }
    }
    Smol { logits, tokens, kept }
}

#[test]
fn smollm2_agrees_across_backends() {
    let results = each_backend!(smol);
    let (reference, rest) = results.split_first().unwrap();
    for (name, r) in rest {
        let d = reference.1.logits.iter().zip(&r.logits).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        println!("SmolLM2: {name} vs flex: last logits max |diff| {d:.2e}");
        assert!(d <= 1e-3, "{name}: SmolLM2 logits differ from flex by {d}");
        assert_eq!(reference.1.tokens, r.tokens, "{name}: greedy tokens");
        for ((label, want), (_, got)) in reference.1.kept.iter().zip(&r.kept) {
            let differ = want.iter().zip(got).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{name}: {label}: {differ} of {} heads keep other tokens than on flex", want.len());
        }
    }
}

/// Last logits, 8 greedy tokens and KV bytes of SmolLM2 on the ~100-token prompt with weights and
/// cache in `dtype`; `None` when the backend does not support it.
fn smol_in<B: KvcBackend>(_: &str, dtype: burn::tensor::DType) -> Option<(Vec<f32>, Vec<u32>, usize)> {
    let device = Default::default();
    if !B::supports_dtype(&device, dtype) {
        return None;
    }
    let loaded = kvc_models::load_as::<B>(&kvc_models::default_model::ensure_default_model().unwrap(), &device, Some(dtype)).unwrap();
    let ids = loaded.tokenizer.encode(PROMPT, true).unwrap();
    let mut cache = loaded.model.new_cache();
    let logits = floats(loaded.model.prefill(&ids, &mut cache, None, 64).unwrap());
    assert_eq!(cache.layer(0).unwrap().unwrap().keys.dtype(), dtype);
    Some((logits, greedy(&loaded.model, &ids, 8), cache.bytes()))
}

#[test]
fn half_precision_halves_the_cache_and_keeps_the_answer() {
    use burn::tensor::DType;
    let reference = smol_in::<burn::backend::Flex>("flex", DType::F32).unwrap();
    let mut checked = 0;
    for dtype in [DType::F16, DType::BF16] {
        for (name, run) in each_backend!(smol_in, dtype) {
            let Some((logits, tokens, bytes)) = run else {
                println!("{name}: {dtype:?} not supported");
                continue;
            };
            let d = reference.0.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            println!("SmolLM2 {name} {dtype:?}: last logits max |diff| to flex f32 {d:.2e}, KV {bytes} bytes");
            assert_eq!(bytes * 2, reference.2, "{name} {dtype:?}: KV cache bytes");
            assert!(d < 1.0, "{name} {dtype:?}: logits differ from f32 by {d}");
            assert_eq!(tokens, reference.1, "{name} {dtype:?}: greedy tokens");
            checked += 1;
        }
    }
    assert!(checked >= 2, "flex runs f16 and bf16: only {checked} backend/dtype pairs checked");
}

/// `KvcBackend::kvc_quant_linear` on f16 / bf16 rows (a half-precision model's decode step): the
/// f32 product of the rows' exact values, rounded to their dtype; `None` where the backend has
/// no kernel or no such dtype.
fn quant_half<B: KvcBackend>(_: &str, dtype: burn::tensor::DType) -> Option<(Vec<f32>, Vec<f32>)> {
    use kvc_core::kernels::quant::{matvec, Activations, QuantMatrix};
    let device = Default::default();
    if !B::kvc_has_quant_linear() || !B::supports_dtype(&device, dtype) {
        return None;
    }
    let (rows, cols, n) = (5, 64, 2);
    let codes: Vec<i8> = (0..rows * cols).map(|i| ((i * 7 + 3) % 16) as i8).collect();
    let blocks = rows * cols / 32;
    let w = QuantMatrix::from_codes(rows, cols, &codes, (0..blocks).map(|b| 0.01 + 0.003 * b as f32).collect(), vec![-0.05; blocks]).unwrap();
    let xs: Vec<f32> = (0..n * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
    let x = tensor::<B, 2>(xs, [n, cols]).cast(dtype);
    let exact = floats(x.clone());
    let y = B::kvc_quant_linear(x, &[&w], Activations::F32).expect("a backend with the kernel takes half-precision rows");
    assert_eq!((y.dims(), y.dtype()), ([n, rows], dtype));
    let want = floats(tensor::<B, 2>(matvec(&exact, n, &[&w], Activations::F32), [n, rows]).cast(dtype));
    Some((floats(y), want))
}

/// Runs `$f` (returning `Option<(got, want)>`) on every backend in f16 and bf16: equal results
/// wherever it ran, and it ran at least on flex in both.
macro_rules! equal_in_half_precision {
    ($f:ident) => {{
        use burn::tensor::DType;
        let mut checked = 0;
        for dtype in [DType::F16, DType::BF16] {
            for (name, run) in each_backend!($f, dtype) {
                if let Some((got, want)) = run {
                    assert_eq!(got, want, "{name} {dtype:?}");
                    checked += 1;
                }
            }
        }
        assert!(checked >= 2, "flex runs f16 and bf16: only {checked} backend/dtype pairs checked");
    }};
}

#[test]
fn quantized_products_take_half_precision_rows() {
    equal_in_half_precision!(quant_half);
}

/// `KvcBackend::kvc_write_slots` on an f16 / bf16 cache buffer (flex writes such buffers in place
/// as it does f32 ones): the same tensor as burn's `slice_assign` (`kernels::write_slots`).
fn write_half<B: KvcBackend>(_: &str, dtype: burn::tensor::DType) -> Option<(Vec<f32>, Vec<f32>)> {
    if !B::supports_dtype(&Default::default(), dtype) {
        return None;
    }
    let buffer = tensor::<B, 4>((0..2 * 3 * 6 * 4).map(|i| i as f32 * 0.25).collect(), [2, 3, 6, 4]).cast(dtype);
    let slots = tensor::<B, 4>((0..2 * 3 * 2 * 4).map(|i| -(i as f32) - 0.5).collect(), [2, 3, 2, 4]).cast(dtype);
    let want = floats(kvc_core::kernels::write_slots(buffer.clone(), 3, slots.clone()));
    let got = B::kvc_write_slots(buffer, 3, slots);
    assert_eq!(got.dtype(), dtype);
    Some((floats(got), want))
}

#[test]
fn cache_writes_keep_half_precision() {
    equal_in_half_precision!(write_half);
}

/// `KvcBackend::kvc_rms_norm` and `kvc_swiglu` against burn's formulas (`kernels::rms_norm`,
/// `silu(gate) * up`) on every backend and float type: (largest difference, tolerance) per op.
/// The host kernels compute in f32 and round half results once, burn's formulas round after
/// each op, so half precision may differ by an ulp or two of the dtype.
fn norm_and_swiglu<B: KvcBackend>(_: &str, dtype: burn::tensor::DType) -> Option<[(f32, f32); 2]> {
    use burn::tensor::DType;
    if !B::supports_dtype(&Default::default(), dtype) {
        return None;
    }
    let (rows, d) = (37, 96);
    let x = tensor::<B, 3>((0..rows * d).map(|i| ((i * 53 % 97) as f32 - 48.0) / 9.0).collect(), [1, rows, d]).cast(dtype);
    let gamma = tensor::<B, 1>((0..d).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect(), [d]).cast(dtype);
    let got = floats(B::kvc_rms_norm(x.clone(), gamma.clone(), 1e-5));
    let want = floats(kvc_core::kernels::rms_norm(x.clone(), gamma, 1e-5));
    let up = tensor::<B, 3>((0..rows * d).map(|i| ((i * 31 % 89) as f32 - 44.0) / 11.0).collect(), [1, rows, d]).cast(dtype);
    let got_s = floats(B::kvc_swiglu(x.clone(), up.clone()));
    let want_s = floats(burn::tensor::activation::silu(x) * up);
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0f32, f32::max);
    // relative to max(|value|, 1): f32 sums in another order; half: two roundings of the dtype
    let tol = match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 4.0 * 2f32.powi(-11),
        _ => 4.0 * 2f32.powi(-8),
    };
    assert_eq!(got.len(), want.len());
    Some([(diff(&got, &want), tol), (diff(&got_s, &want_s), tol)])
}

#[test]
fn rms_norm_and_swiglu_kernels_match_burn() {
    use burn::tensor::DType;
    let mut checked = 0;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (name, run) in each_backend!(norm_and_swiglu, dtype) {
            if let Some([(norm, tol), (swiglu, _)]) = run {
                println!("{name} {dtype:?}: rms_norm {norm:.2e}, swiglu {swiglu:.2e} (tolerance {tol:.1e})");
                assert!(norm <= tol, "{name} {dtype:?}: rms_norm differs by {norm}");
                assert!(swiglu <= tol, "{name} {dtype:?}: swiglu differs by {swiglu}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 4, "flex f32/f16/bf16 and ndarray f32: only {checked} checked");
}

/// `KvcBackend::kvc_linear` on bf16 rows (flex: kvc's bf16 GEMM, `vdpbf16ps` tiles or widened f32)
/// against burn's `matmul` for `m` rows, `x` a transposed (strided) view: `None` where the
/// backend has no such kernel; else (largest difference relative to max(|value|, 1)).
fn linear_bf16<B: KvcBackend>(_: &str, m: usize) -> Option<f32> {
    use burn::tensor::DType;
    if !B::supports_dtype(&Default::default(), DType::BF16) {
        return None;
    }
    let (k, n) = (96, 70);
    let xt = tensor::<B, 2>((0..k * m).map(|i| ((i * 41 % 67) as f32 - 33.0) / 13.0).collect(), [k, m]).cast(DType::BF16);
    let x = xt.transpose();
    let w = tensor::<B, 2>((0..k * n).map(|i| ((i * 29 % 71) as f32 - 35.0) / 50.0).collect(), [k, n]).cast(DType::BF16);
    let got = B::kvc_linear(x.clone(), &w)?;
    assert_eq!((got.dims(), got.dtype()), ([m, n], DType::BF16));
    let (got, want) = (floats(got), floats(x.matmul(w)));
    Some(got.iter().zip(&want).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0f32, f32::max))
}

#[test]
fn bf16_linear_matches_burns_matmul() {
    // one row (decode), a few, and more rows than one task holds
    for m in [1, 3, 5, 60] {
        for (name, run) in each_backend!(linear_bf16, m) {
            match run {
                // the same f32 sums in another order, each rounded once to bf16 (2^-8 relative)
                Some(diff) => assert!(diff <= 2f32.powi(-7), "{name}, {m} rows: {diff}"),
                None if name == "flex" => panic!("flex multiplies bf16 rows on every CPU"),
                None => {}
            }
        }
    }
}

/// Per backend, on the tiny Qwen3 fixture (q/k norm): three sequences of different lengths, one
/// compressed by per-head KVCompose (padded layout), stepped together by `forward_batch` for 4
/// steps: each row's logits within 1e-4 of the same sequence stepped alone by `forward`.
fn batched_vs_alone<B: KvcBackend>(_: &str) -> f32 {
    let m = kvc_models::load_hf_decoder::<B>(&fixture("tiny_qwen3"), &Default::default()).unwrap();
    let device = Default::default();
    let mut caches: Vec<KvCache<B>> = [23usize, 40, 57]
        .iter()
        .map(|&n| {
            let ids: Vec<u32> = (0..n as u32).map(|i| (i * 31 + n as u32) % 97).collect();
            let mut cache = m.new_cache();
            m.feed(&ids, &mut cache, None, 16).unwrap();
            cache
        })
        .collect();
    let press = PressSpec::new("kvcompose", Budget::Ratio(0.5)).with_option("structured", false);
    let mut per_head = m.new_cache();
    let ids: Vec<u32> = (0..48u32).map(|i| (i * 7 + 5) % 97).collect();
    let mut capture = kvc_core::PrefillCapture::new(press.needs().unwrap(), m.config().num_layers);
    m.feed(&ids, &mut per_head, Some(&mut capture), 16).unwrap();
    press.build::<B>().unwrap().compress(&m, &ids, &mut per_head, &capture).unwrap();
    caches[1] = per_head;
    let mut alone = caches.clone();
    let mut worst = 0f32;
    for step in 0..4u32 {
        let tokens: Vec<u32> = (0..3).map(|s| (step * 13 + s * 5 + 1) % 97).collect();
        let batched = {
            let mut refs: Vec<&mut KvCache<B>> = caches.iter_mut().collect();
            floats(m.forward_batch(&tokens, &mut refs).unwrap())
        };
        let vocab = batched.len() / 3;
        for (s, cache) in alone.iter_mut().enumerate() {
            let t = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![tokens[s] as i64], [1, 1]), &device);
            let one = floats(m.forward(t, cache, None, kvc_models::Logits::Last).unwrap());
            let d = one.iter().zip(&batched[s * vocab..(s + 1) * vocab]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            worst = worst.max(d);
        }
    }
    worst
}

#[test]
fn batched_decode_matches_single_steps_on_every_backend() {
    for (name, d) in each_backend!(batched_vs_alone) {
        println!("{name}: batched vs alone, logits max |diff| {d:.2e}");
        assert!(d <= 1e-4, "{name}: a batched step moved logits by {d}");
    }
}
