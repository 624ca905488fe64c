//! Mutation fuzzing of the model-file parsers, on stable Rust, within a fixed time budget.
//!
//! Targets: the GGUF reader (`GgufFile::open`, every tensor's `tensor_f32`, `ModelConfig::from_gguf`)
//! seeded with a small synthetic GGUF and the all-tensor-types fixture of `gguf_types.rs`; the same
//! plus the tokenizer and chat template built from GGUF metadata (`Tokenizer::from_gguf`, encode,
//! render) seeded with the real SmolLM2 metadata (vocabulary, merges, template; no tensors); and HF folders (`config.json` + `model.safetensors` through
//! `load_hf_decoder`) seeded with the tiny Llama 3 / Qwen2 / Qwen3 fixtures. Mutations: bit flips,
//! truncation, interesting integers (0, 1, -1, 2^31, 2^32-1, 2^63, u64::MAX, the file size) written
//! over aligned words, byte-range duplication and deletion, and for JSON numbers replaced by 0,
//! negative, huge and non-integer values.
//!
//! Property: every call returns `Ok` or an error; no panic, and no single heap allocation larger
//! than `64 x file size + 1 MiB` (counted by this binary's global allocator on the fuzzing thread).
//! A failing input is written to `$CARGO_TARGET_TMPDIR/fuzz-failures/` and the test fails naming
//! it; committed regressions live in `tests/fixtures/fuzz_regressions/` and are replayed first.
//!
//! Budget: `KVC_FUZZ_SECONDS` per seed (default 10: ~50 s in all in CI). Longer runs:
//! `KVC_FUZZ_SECONDS=600 cargo test --release -p kvc-models --test fuzz_parsers -- --nocapture`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{fixture, Nd};
use kvc_models::config::ModelConfig;
use kvc_models::gguf::GgufFile;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Counts the largest single allocation made while the current thread is armed.
struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
}
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn note(size: usize) {
    if ARMED.try_with(Cell::get).unwrap_or(false) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` armed: returns whether it panicked and the largest allocation it made.
fn watched(f: impl FnOnce()) -> (bool, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.with(|a| a.set(true));
    let panicked = catch_unwind(AssertUnwindSafe(f)).is_err();
    ARMED.with(|a| a.set(false));
    (panicked, LARGEST.load(Ordering::Relaxed))
}

fn budget() -> Duration {
    let secs = std::env::var("KVC_FUZZ_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(10.0);
    Duration::from_secs_f64(secs.max(0.0))
}

const INTERESTING: [u64; 10] = [0, 1, 2, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 32, 1 << 62, 1 << 63, u64::MAX];

/// One random mutation of `seed`.
fn mutate(seed: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..=3) {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let n = b.len();
        match rng.random_range(0..6) {
            0 => {
                for _ in 0..rng.random_range(1..=8) {
                    let i = rng.random_range(0..n);
                    b[i] ^= 1 << rng.random_range(0..8);
                }
            }
            1 => b.truncate(rng.random_range(0..n)),
            2 => {
                // an interesting integer over an aligned u64 (counts, lengths, dims, offsets) or u32
                let v = if rng.random_bool(0.2) { n as u64 } else { INTERESTING[rng.random_range(0..INTERESTING.len())] };
                let at = rng.random_range(0..n) & !3;
                let bytes = if rng.random_bool(0.5) { v.to_le_bytes().to_vec() } else { (v as u32).to_le_bytes().to_vec() };
                for (k, x) in bytes.into_iter().enumerate() {
                    if at + k < b.len() {
                        b[at + k] = x;
                    }
                }
            }
            3 => {
                let i = rng.random_range(0..n);
                let len = rng.random_range(1..=64.min(n - i));
                let chunk = b[i..i + len].to_vec();
                let at = rng.random_range(0..=b.len());
                b.splice(at..at, chunk);
            }
            4 => {
                let i = rng.random_range(0..n);
                let len = rng.random_range(1..=64.min(n - i));
                b.drain(i..i + len);
            }
            _ => {
                let i = rng.random_range(0..n);
                b[i] = rng.random();
            }
        }
    }
    b
}

/// Fails the test with the input saved where it can be replayed.
fn fail(what: &str, input: &[u8], why: &str) -> ! {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{what}-{}.bin", input.len()));
    std::fs::write(&path, input).unwrap();
    panic!("{what}: {why}; input saved to {} (add it to tests/fixtures/fuzz_regressions/)", path.display());
}

fn check(what: &str, input: &[u8], size: usize, run: impl FnOnce()) {
    check_with_slack(what, input, size, 1 << 20, run);
}

/// [`check`] with `slack` bytes instead of 1 MiB beside the 64x bound: the tokenizers crate
/// allocates fixed-size tables (~1.5 MB seen for a 6 KB tokenizer.json, depending on hashing)
/// whatever the file says.
fn check_with_slack(what: &str, input: &[u8], size: usize, slack: usize, run: impl FnOnce()) {
    let (panicked, largest) = watched(run);
    if panicked {
        fail(what, input, "panicked");
    }
    let bound = 64 * size + slack;
    if largest > bound {
        fail(what, input, &format!("allocated {largest} bytes at once for a {size}-byte input (bound {bound})"));
    }
}

/// Opens `path` as GGUF and reads everything a loader would (the config, every tensor dequantized
/// and as the block codes decode reads); returns the opened file.
fn gguf_target(path: &Path) -> Option<GgufFile> {
    let file = GgufFile::open(path).ok()?;
    let _ = ModelConfig::from_gguf(&file);
    for info in &file.tensors {
        let _ = file.tensor_f32(&info.name);
        if let Some(bytes) = file.tensor_bytes(info) {
            let _ = kvc_models::gguf::quant_codes(info.kind, bytes);
            let _ = kvc_models::gguf::k_quant_parts(info.kind, bytes);
        }
    }
    Some(file)
}

/// A small valid GGUF: metadata of every value type, tensors of several types.
fn synthetic_gguf() -> Vec<u8> {
    synthetic_gguf_with(&[])
}

/// [`synthetic_gguf`] with `extra` metadata entries `(key, GGUF value type, value bytes)` appended
/// (a key already present is then duplicated).
fn synthetic_gguf_with(extra: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    let s = |x: &str| {
        let mut v = (x.len() as u64).to_le_bytes().to_vec();
        v.extend(x.as_bytes());
        v
    };
    let mut kv: Vec<Vec<u8>> = Vec::new();
    let mut push = |key: &str, kind: u32, value: Vec<u8>| {
        let mut e = s(key);
        e.extend(kind.to_le_bytes());
        e.extend(value);
        kv.push(e);
    };
    push("general.architecture", 8, s("llama"));
    push("llama.block_count", 4, 1u32.to_le_bytes().to_vec());
    push("llama.embedding_length", 4, 64u32.to_le_bytes().to_vec());
    push("llama.feed_forward_length", 4, 128u32.to_le_bytes().to_vec());
    push("llama.attention.head_count", 4, 4u32.to_le_bytes().to_vec());
    push("llama.attention.head_count_kv", 4, 2u32.to_le_bytes().to_vec());
    push("llama.context_length", 4, 256u32.to_le_bytes().to_vec());
    push("llama.rope.freq_base", 6, 10000f32.to_le_bytes().to_vec());
    push("llama.attention.layer_norm_rms_epsilon", 6, 1e-5f32.to_le_bytes().to_vec());
    push("general.flag", 7, vec![1]);
    push("general.big", 10, 7u64.to_le_bytes().to_vec());
    push("general.f64", 12, 0.5f64.to_le_bytes().to_vec());
    let mut arr = 8u32.to_le_bytes().to_vec();
    arr.extend(3u64.to_le_bytes());
    for t in ["<s>", "a", "b"] {
        arr.extend(s(t));
    }
    push("tokenizer.ggml.tokens", 9, arr);
    for (key, kind, value) in extra {
        push(key, *kind, value.clone());
    }
    // (name, dims (ggml order), type, bytes)
    let f32s: Vec<u8> = (0..64).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect();
    let f16s: Vec<u8> = (0..64).flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes()).collect();
    let q8: Vec<u8> = (0..2).flat_map(|_| half::f16::from_f32(0.5).to_le_bytes().into_iter().chain((0..32).map(|i| i as u8))).collect();
    let q4: Vec<u8> = (0..2).flat_map(|_| half::f16::from_f32(0.25).to_le_bytes().into_iter().chain((0..16).map(|i| i as u8 * 17))).collect();
    let tensors: Vec<(&str, Vec<u64>, u32, Vec<u8>)> =
        vec![("a.f32", vec![64], 0, f32s), ("b.f16", vec![32, 2], 1, f16s), ("c.q8_0", vec![64], 8, q8), ("d.q4_0", vec![64], 2, q4)];
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for e in &kv {
        out.extend(e);
    }
    let mut offset = 0u64;
    for (name, dims, kind, data) in &tensors {
        out.extend(s(name));
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(kind.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    for (_, _, _, data) in &tensors {
        out.extend(data);
        while out.len() % 32 != 0 {
            out.push(0);
        }
    }
    out
}

/// A real GGUF's metadata (config, vocabulary, merges, special tokens, chat template)
/// as a GGUF with no tensors: the header up to its tensor directory, tensor count set to 0. It
/// opens, so mutations reach the tokenizer and chat-template readers.
fn metadata_seed(path: &Path) -> Vec<u8> {
    let file = GgufFile::open(path).expect("the real model opens");
    let header_end = file.tensors.iter().map(|t| t.offset).min().unwrap_or(0);
    let bytes = std::fs::read(path).unwrap();
    // the directory starts with the first tensor's name (u64 length + bytes)
    let first = &file.tensors[0].name;
    let mut pattern = (first.len() as u64).to_le_bytes().to_vec();
    pattern.extend(first.as_bytes());
    let dir = bytes[..header_end].windows(pattern.len()).rposition(|w| w == pattern.as_slice()).expect("tensor directory");
    let mut seed = bytes[..dir].to_vec();
    seed[8..16].copy_from_slice(&0u64.to_le_bytes());
    seed
}

/// The GGUF reader, then the config, the tokenizer (vocabulary, merges, special tokens) and the
/// chat template built from its metadata, used once each.
fn gguf_metadata_target(path: &Path) {
    if let Some(file) = gguf_target(path) {
        if let Ok(tok) = kvc_models::Tokenizer::from_gguf(&file) {
            let _ = tok.encode("Hello, world! 12345 ünïcödé", true);
            let _ = tok.apply_chat_template(&[kvc_models::ChatMessage { role: "user".into(), content: "Hi".into() }]);
        }
    }
}

fn regressions(prefix: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fixture("fuzz_regressions");
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                out.push((name, std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Fuzzes a GGUF seed for `budget` through [`gguf_target`]; returns executions.
fn fuzz_gguf(what: &str, seed: &[u8], budget: Duration, rng: &mut StdRng) -> usize {
    fuzz_gguf_with(what, seed, budget, rng, |p| drop(gguf_target(p)))
}

/// Fuzzes a GGUF seed for `budget` through `target`; returns executions.
fn fuzz_gguf_with(what: &str, seed: &[u8], budget: Duration, rng: &mut StdRng, target: fn(&Path)) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let start = Instant::now();
    let mut n = 0;
    while n == 0 || start.elapsed() < budget {
        let input = mutate(seed, rng);
        std::fs::write(&path, &input).unwrap();
        check(what, &input, input.len(), || target(&path));
        n += 1;
    }
    n
}

#[test]
fn gguf_reader_survives_mutations() {
    // the seeds themselves parse (a fuzz run of broken seeds would prove little)
    let synthetic = synthetic_gguf();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.gguf");
    std::fs::write(&path, &synthetic).unwrap();
    let seed = GgufFile::open(&path).expect("synthetic seed parses");
    assert_eq!(seed.tensors.len(), 4);
    for t in ["a.f32", "b.f16", "c.q8_0", "d.q4_0"] {
        seed.tensor_f32(t).expect("seed tensor reads");
    }
    for (name, input) in regressions("gguf") {
        std::fs::write(&path, &input).unwrap();
        check(&name, &input, input.len(), || drop(gguf_target(&path)));
    }
    let mut rng = StdRng::seed_from_u64(0x6767_7566);
    let b = budget();
    let t = Instant::now();
    let n_syn = fuzz_gguf("gguf-synthetic", &synthetic, b, &mut rng);
    let syn_s = t.elapsed().as_secs_f64();
    // every tensor type the reader supports, multi-block (tests/gguf_types.rs's fixture)
    let types = std::fs::read(fixture("gguf_types/types.gguf.bin")).unwrap();
    let t = Instant::now();
    let n_types = fuzz_gguf("gguf-types", &types, b, &mut rng);
    let types_s = t.elapsed().as_secs_f64();
    // the real SmolLM2 and Qwen2.5-Coder metadata, half the budget each
    let mut n_real = 0;
    let mut header_len = 0;
    let t = Instant::now();
    for name in ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"] {
        let model = kvc_models::default_model::resolve(Some(Path::new(name))).expect("the real models (CI fetches them)");
        let header = metadata_seed(&model);
        std::fs::write(&path, &header).unwrap();
        let seed = GgufFile::open(&path).expect("the metadata seed parses");
        // (no config: it reads the vocabulary size from the embedding tensor; the synthetic seeds
        // cover it)
        kvc_models::Tokenizer::from_gguf(&seed).expect("the metadata seed's tokenizer");
        header_len += header.len();
        n_real += fuzz_gguf_with(&format!("gguf-{name}-metadata"), &header, b / 2, &mut rng, gguf_metadata_target);
    }
    let real_s = t.elapsed().as_secs_f64();
    println!(
        "GGUF fuzzing: synthetic seed ({} B) {n_syn} inputs ({:.0}/s); all-types seed ({} B) {n_types} inputs ({:.0}/s); SmolLM2 + Qwen2.5 metadata with tokenizer and chat template ({} B) {n_real} inputs ({:.1}/s)",
        synthetic.len(),
        n_syn as f64 / syn_s,
        types.len(),
        n_types as f64 / types_s,
        header_len,
        n_real as f64 / real_s
    );
}

/// Header cases named by the fuzzing issue, each an error or a model, never a panic: alignment
/// values 0, 3, 2^63 and u64::MAX; duplicated keys with the same or another value type; config
/// keys of the wrong value type (string, array, float, negative, bool); and the synthetic file
/// truncated at every offset (an error every time).
#[test]
fn gguf_header_edge_cases_are_errors_or_models() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.gguf");
    let s = |x: &str| {
        let mut v = (x.len() as u64).to_le_bytes().to_vec();
        v.extend(x.as_bytes());
        v
    };
    let u64v = |x: u64| x.to_le_bytes().to_vec();
    let mut cases: Vec<(String, Vec<(&str, u32, Vec<u8>)>)> = Vec::new();
    for a in [0u64, 3, 1 << 63, u64::MAX] {
        cases.push((format!("alignment {a}"), vec![("general.alignment", 10, u64v(a))]));
    }
    cases.push(("alignment as a string".into(), vec![("general.alignment", 8, s("32"))]));
    cases.push(("duplicate block_count, same type".into(), vec![("llama.block_count", 4, 7u32.to_le_bytes().to_vec())]));
    cases.push(("duplicate block_count, u64 max".into(), vec![("llama.block_count", 10, u64v(u64::MAX))]));
    cases.push(("duplicate architecture, another type".into(), vec![("general.architecture", 4, 1u32.to_le_bytes().to_vec())]));
    cases.push(("head count as a string".into(), vec![("llama.attention.head_count", 8, s("four"))]));
    cases.push(("head count negative".into(), vec![("llama.attention.head_count", 5, (-4i32).to_le_bytes().to_vec())]));
    cases.push(("context length as a float".into(), vec![("llama.context_length", 6, 256.5f32.to_le_bytes().to_vec())]));
    cases.push(("rope base as a bool".into(), vec![("llama.rope.freq_base", 7, vec![1])]));
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend(u64v(u64::MAX));
    cases.push(("tokens: an array claiming u64::MAX entries".into(), vec![("tokenizer.ggml.tokens", 9, arr)]));
    for (what, extra) in cases {
        let input = synthetic_gguf_with(&extra);
        std::fs::write(&path, &input).unwrap();
        check(&what, &input, input.len(), || gguf_metadata_target(&path));
    }
    // truncation at every offset of the synthetic file: an error, unless only the padding after
    // the last tensor is cut (then every tensor reads as in the whole file)
    let whole = synthetic_gguf();
    std::fs::write(&path, &whole).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let names: Vec<String> = file.tensors.iter().map(|t| t.name.clone()).collect();
    let read_all = |f: &GgufFile| names.iter().map(|n| f.tensor_f32(n).map(|t| t.0)).collect::<Result<Vec<_>, _>>();
    let expected = read_all(&file).unwrap();
    let data_end = whole.len() - whole.iter().rev().take_while(|&&b| b == 0).count();
    for cut in 0..whole.len() {
        std::fs::write(&path, &whole[..cut]).unwrap();
        check(&format!("truncated at {cut}"), &whole[..cut], cut, || match GgufFile::open(&path).and_then(|f| read_all(&f)) {
            Ok(all) => assert!(cut >= data_end && all == expected, "a GGUF truncated at {cut} of {} read differently", whole.len()),
            Err(_) => {}
        });
    }
}

/// Mutates a `config.json`: numbers replaced by interesting values, keys dropped, or bytes.
fn mutate_config(text: &str, rng: &mut StdRng) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str::<serde_json::Value>(text) else {
        return mutate(text.as_bytes(), rng);
    };
    match rng.random_range(0..4) {
        0 | 1 => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = &keys[rng.random_range(0..keys.len())];
            let values = [
                serde_json::json!(0),
                serde_json::json!(-1),
                serde_json::json!(1),
                serde_json::json!(3),
                serde_json::json!(1u64 << 40),
                serde_json::json!(u64::MAX),
                serde_json::json!(1.5),
                serde_json::json!(-1e30),
                serde_json::json!("x"),
                serde_json::json!(null),
                serde_json::json!([]),
            ];
            map.insert(key.clone(), values[rng.random_range(0..values.len())].clone());
            serde_json::to_vec(&map).unwrap()
        }
        2 => {
            let keys: Vec<String> = map.keys().cloned().collect();
            map.remove(&keys[rng.random_range(0..keys.len())]);
            serde_json::to_vec(&map).unwrap()
        }
        _ => mutate(text.as_bytes(), rng),
    }
}

#[test]
fn hf_folder_loader_survives_mutations() {
    let mut rng = StdRng::seed_from_u64(0x6866_6c64);
    let seeds: Vec<PathBuf> = ["tiny_llama3", "tiny_qwen2", "tiny_qwen3"].iter().map(|s| fixture(s)).collect();
    let device = Default::default();
    for s in &seeds {
        kvc_models::load_hf_decoder::<Nd>(s, &device).expect("seed folder loads");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // committed regressions: `config-*` with tiny_qwen2's weights, `safetensors-*` with its config
    let base = fixture("tiny_qwen2");
    for (name, input) in regressions("config").into_iter().chain(regressions("safetensors")) {
        let is_config = name.starts_with("config");
        let config = if is_config { input.clone() } else { std::fs::read(base.join("config.json")).unwrap() };
        let weights = if is_config { std::fs::read(base.join("model.safetensors")).unwrap() } else { input.clone() };
        std::fs::write(d.join("config.json"), &config).unwrap();
        std::fs::write(d.join("model.safetensors"), &weights).unwrap();
        check(&name, &input, config.len() + weights.len(), || {
            let _ = kvc_models::load_hf_decoder::<Nd>(d, &device);
        });
    }
    let start = Instant::now();
    let (mut n_config, mut n_weights) = (0, 0);
    while n_config + n_weights == 0 || start.elapsed() < budget() {
        let seed = &seeds[rng.random_range(0..seeds.len())];
        let config = std::fs::read_to_string(seed.join("config.json")).unwrap();
        let weights = std::fs::read(seed.join("model.safetensors")).unwrap();
        let (config, weights, what, input) = if rng.random_bool(0.5) {
            let c = mutate_config(&config, &mut rng);
            n_config += 1;
            (c.clone(), weights, "config", c)
        } else {
            // mostly the header (length prefix + JSON), where the parser lives
            let header_end = (8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize).min(weights.len());
            let mut w = mutate(&weights[..header_end], &mut rng);
            w.extend_from_slice(&weights[header_end..]);
            n_weights += 1;
            (config.into_bytes(), w.clone(), "safetensors", w)
        };
        std::fs::write(d.join("config.json"), &config).unwrap();
        std::fs::write(d.join("model.safetensors"), &weights).unwrap();
        let size = config.len() + weights.len();
        check(what, &input, size, || {
            let _ = kvc_models::load_hf_decoder::<Nd>(d, &device);
        });
    }
    let secs = start.elapsed().as_secs_f64();
    println!("HF folder fuzzing: {n_config} config.json + {n_weights} safetensors inputs ({:.0}/s)", (n_config + n_weights) as f64 / secs);
}

/// One random mutation of a JSON document's tree: a random node (object value or array element,
/// at any depth) replaced by an interesting value, removed, or duplicated; bytes when it does
/// not parse.
fn mutate_json_tree(text: &str, rng: &mut StdRng) -> Vec<u8> {
    let Ok(mut root) = serde_json::from_str::<serde_json::Value>(text) else {
        return mutate(text.as_bytes(), rng);
    };
    // walk down a random path, stopping with probability 1/3 at each level
    let mut node = &mut root;
    loop {
        let len = match node {
            serde_json::Value::Object(m) => m.len(),
            serde_json::Value::Array(a) => a.len(),
            _ => 0,
        };
        if len == 0 || rng.random_range(0..3) == 0 {
            break;
        }
        let i = rng.random_range(0..len);
        let replace = rng.random_range(0..4) == 0;
        let values = [
            serde_json::json!(null),
            serde_json::json!(0),
            serde_json::json!(-1),
            serde_json::json!(u64::MAX),
            serde_json::json!(1e300),
            serde_json::json!(""),
            serde_json::json!("\u{0}<|im_end|>\u{ffff}"),
            serde_json::json!([]),
            serde_json::json!({}),
            serde_json::json!(true),
        ];
        let value = values[rng.random_range(0..values.len())].clone();
        match node {
            serde_json::Value::Object(m) => {
                let key = m.keys().nth(i).cloned().unwrap();
                if replace {
                    match rng.random_range(0..3) {
                        0 => m[&key] = value,
                        1 => {
                            m.remove(&key);
                        }
                        _ => {
                            let copy = m[&key].clone();
                            m.insert(format!("{key}_"), copy);
                        }
                    }
                    break;
                }
                node = m.get_mut(&key).unwrap();
            }
            serde_json::Value::Array(a) => {
                if replace {
                    match rng.random_range(0..3) {
                        0 => a[i] = value,
                        1 => {
                            a.remove(i);
                        }
                        _ => {
                            let copy = a[i].clone();
                            a.insert(i, copy);
                        }
                    }
                    break;
                }
                node = &mut a[i];
            }
            _ => break,
        }
    }
    serde_json::to_vec(&root).unwrap()
}

/// HF tokenizer folders (`tokenizer.json` through the tokenizers crate, `tokenizer_config.json`'s
/// tokens and chat template through ours), seeded with a 400-token BPE fixture
/// (`tools/make_tokenizer_fixture.py`): tree and byte mutations of either file, then an encode,
/// a decode and a chat-template render.
#[test]
fn hf_tokenizer_survives_mutations() {
    let seed = fixture("tiny_tokenizer");
    let tok = kvc_models::Tokenizer::from_hf_dir(&seed).expect("seed tokenizer loads");
    assert!(tok.vocab_size() >= 300 && tok.chat_template().is_some());
    let tokenizer = std::fs::read_to_string(seed.join("tokenizer.json")).unwrap();
    let config = std::fs::read_to_string(seed.join("tokenizer_config.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, input) in regressions("tokenizer") {
        std::fs::write(d.join("tokenizer.json"), &input).unwrap();
        std::fs::write(d.join("tokenizer_config.json"), &config).unwrap();
        check_with_slack(&name, &input, input.len() + config.len(), 8 << 20, || tokenizer_target(d));
    }
    let mut rng = StdRng::seed_from_u64(0x746f_6b65);
    let start = Instant::now();
    let (mut n_tok, mut n_cfg) = (0, 0);
    while n_tok + n_cfg == 0 || start.elapsed() < budget() {
        let (t, c, what) = if rng.random_bool(0.7) {
            n_tok += 1;
            let t = if rng.random_bool(0.7) { mutate_json_tree(&tokenizer, &mut rng) } else { mutate(tokenizer.as_bytes(), &mut rng) };
            (t, config.clone().into_bytes(), "tokenizer")
        } else {
            n_cfg += 1;
            (tokenizer.clone().into_bytes(), mutate_json_tree(&config, &mut rng), "tokenizer-config")
        };
        std::fs::write(d.join("tokenizer.json"), &t).unwrap();
        std::fs::write(d.join("tokenizer_config.json"), &c).unwrap();
        let input = if what == "tokenizer" { &t } else { &c };
        check_with_slack(what, input, t.len() + c.len(), 8 << 20, || tokenizer_target(d));
    }
    let secs = start.elapsed().as_secs_f64();
    println!("HF tokenizer fuzzing: {n_tok} tokenizer.json + {n_cfg} tokenizer_config.json inputs ({:.0}/s)", (n_tok + n_cfg) as f64 / secs);
}

fn tokenizer_target(dir: &Path) {
    if let Ok(tok) = kvc_models::Tokenizer::from_hf_dir(dir) {
        if let Ok(ids) = tok.encode("It is a truth universally acknowledged, 12 ünïcödé <|im_end|>", true) {
            let _ = tok.decode(&ids, false);
        }
        let _ = tok.apply_chat_template(&[kvc_models::ChatMessage { role: "user".into(), content: "Hi".into() }]);
    }
}
