//! The `kvc` binary end to end: a real generation on the default model, and bad input that must
//! end with a clear message and a non-zero exit (never a panic).

use std::process::{Command, Output};

fn kvc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvc")).args(args).output().expect("run kvc")
}

fn fails_with(args: &[&str], needle: &str) {
    let out = kvc(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert_eq!(out.status.code(), Some(if needle.starts_with("usage:") { 2 } else { 1 }), "{args:?}: {stderr}");
    assert!(stderr.contains(needle.trim_start_matches("usage:")), "{args:?}: stderr was {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
}

#[test]
fn generate_on_the_default_model() {
    let out = kvc(&["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_tokens"], 5);
    assert_eq!(v["new_tokens"], 8);
    assert!(v["completion"].as_str().unwrap().contains("Paris"), "{v}");
    // 30 layers x 2 (K, V) x 3 KV heads x 64 dims x 4 bytes per token
    let per_token = 30 * 2 * 3 * 64 * 4;
    // the last prompt token is fed after the (here: uncompressed) context, like a question
    assert_eq!(v["context_tokens"], 4);
    assert_eq!(v["kv_cache_bytes_context"], 4 * per_token);
    assert_eq!(v["kv_cache_bytes_final"], 12 * per_token); // 5 + 7 fed tokens (the 8th is not fed back)
    // decode steps read the GGUF's quantized blocks unless --dense-weights: the same answer
    assert_eq!(v["quantized_decode"], true);
    let dense = kvc(&["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--json", "--dense-weights"]);
    assert!(dense.status.success(), "{}", String::from_utf8_lossy(&dense.stderr));
    let d: serde_json::Value = serde_json::from_slice(&dense.stdout).unwrap();
    assert_eq!(d["quantized_decode"], false);
    assert_eq!(d["completion_ids"], v["completion_ids"]);
    // --int8-activations: decode on int8 rows (said in the JSON); the default is f32
    assert_eq!(v["activations"], "f32");
    let int8 = kvc(&["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--json", "--int8-activations"]);
    assert!(int8.status.success(), "{}", String::from_utf8_lossy(&int8.stderr));
    let i: serde_json::Value = serde_json::from_slice(&int8.stdout).unwrap();
    assert_eq!((&i["activations"], &i["new_tokens"], &i["quantized_decode"]), (&serde_json::json!("int8"), &serde_json::json!(8), &serde_json::json!(true)), "{i}");
    // the summary says which activations decoded
    let out = kvc(&["generate", "--prompt", "Hello", "--max-new-tokens", "2", "--int8-activations"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("tokens/s, int8 activations"), "{text}");
    // text mode prints the summary
    let out = kvc(&["generate", "--prompt", "Hello", "--max-new-tokens", "2", "--backend", "ndarray"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("prefill") && text.contains("KV cache"), "{text}");
}

#[test]
fn inspect_prints_config_and_tensors() {
    let out = kvc(&["inspect", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["config"]["num_layers"], 30);
    assert_eq!(v["file"]["tensor_count"], 272);
    assert_eq!(v["file"]["dtypes"]["Q4_1"], 210);
}

#[test]
fn bad_input_exits_non_zero_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"not a gguf file").unwrap();
    let bad = bad.to_str().unwrap();
    fails_with(&["generate", "--model", "/no/such/model.gguf", "--prompt", "hi"], "no model at /no/such/model.gguf");
    fails_with(&["generate", "--model", bad, "--prompt", "hi"], "bad magic");
    fails_with(&["inspect", "--model", bad], "bad magic");
    fails_with(&["generate", "--prompt", ""], "the prompt is empty");
    fails_with(&["generate", "--prompt-file", "/no/such/prompt.txt"], "reading prompt file");
    fails_with(&["generate", "--prompt", "hi", "--max-new-tokens", "9000"], "more than the model's context");
    fails_with(&["generate", "--prompt", "hi", "--temperature", "-1"], "temperature");
    fails_with(&["generate", "--model", "no-such-model", "--prompt", "hi"], "one of: smollm2-135m-instruct");
    fails_with(&["generate", "--prompt", "hi", "--top-p", "2"], "top_p");
    fails_with(&["generate", "--prompt", "hi", "--int8-activations", "--dense-weights"], "usage:cannot be used with");
    // the error names every way to give the context
    fails_with(&["generate"], "usage:--prompt <PROMPT>|--prompt-file <PROMPT_FILE>|--load-cache");
    fails_with(&["generate", "--prompt", "hi", "--backend", "tpu"], "usage:invalid value 'tpu'");
    let long = "word ".repeat(9000);
    fails_with(&["generate", "--prompt", &long, "--max-new-tokens", "1"], "more than the model's context");
}

const CONTEXT: &str = "The lighthouse keeper, Ada Quill, lived on the island of Varn for twelve years. \
Every evening she climbed the ninety steps, lit the great lamp, and wrote the weather in a green notebook.";

#[test]
fn kvcompose_press_compresses_and_answers() {
    let out = kvc(&[
        "generate", "--prompt", CONTEXT, "--question", "\nQuestion: What is the keeper's name?\nAnswer:",
        "--press", "kvcompose", "--ratio", "0.5", "--compare", "--max-new-tokens", "6", "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = v["context_tokens"].as_u64().unwrap() as usize;
    let kept: Vec<usize> = v["press"]["kept_per_layer"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    assert_eq!(kept.len(), 30);
    // n = floor(30 * T * 0.5) slots over layers; every layer keeps at least one token
    assert!(kept.iter().sum::<usize>() >= 30 * t / 2 && kept.iter().all(|&k| (1..=t).contains(&k)), "{kept:?}");
    assert_eq!(kept[0], *kept.iter().max().unwrap(), "layer 0 carries the max composite scores");
    let (before, after) = (v["press"]["kv_bytes_before"].as_u64().unwrap(), v["press"]["kv_bytes_after"].as_u64().unwrap());
    let per_token = 2 * 3 * 64 * 4;
    assert_eq!(before as usize, 30 * t * per_token);
    assert_eq!(after as usize, kept.iter().sum::<usize>() * per_token);
    assert!(v["baseline_completion"].is_string());
    assert_eq!(v["new_tokens"], 6);
    // text mode: budget chart and bytes saved
    let out = kvc(&["generate", "--prompt", CONTEXT, "--press", "kvcompose", "--budget", "8", "--max-new-tokens", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("kept tokens per layer") && text.contains("L29") && text.contains("saved"), "{text}");
}

#[test]
fn press_bad_input_exits_non_zero() {
    let p = ["generate", "--prompt", CONTEXT, "--press", "kvcompose"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { p.iter().copied().chain(extra.iter().copied()).collect() };
    fails_with(&with(&["--ratio", "1.0"]), "outside [0, 1)");
    fails_with(&with(&["--ratio", "-0.5"]), "outside [0, 1)");
    fails_with(&with(&["--budget", "0"]), "--budget 0: the token budget must be at least 1");
    fails_with(&with(&["--budget", "100000"]), "between 1 and the context length");
    fails_with(&with(&[]), "needs --ratio");
    fails_with(&with(&["--ratio", "0.5", "--press-option", "agg_task=median"]), "not one of max, mean");
    fails_with(&with(&["--ratio", "0.5", "--press-option", "colour=blue"]), "unknown option");
    fails_with(&with(&["--ratio", "0.5", "--press-option", "structured"]), "press kvcompose: option \"structured\" is not key=value");
    fails_with(&["generate", "--prompt", "hello", "--press", "kvcompose", "--ratio", "0.5"], "the prompt is too short");
    fails_with(&["generate", "--prompt", CONTEXT, "--press", "h2o", "--ratio", "0.5"], "unknown press \"h2o\" (known: kvcompose, streaming_llm");
    fails_with(&["generate", "--prompt", CONTEXT, "--press", "snapkv", "--ratio", "0.5", "--press-option", "kernel_size=4"], "kernel_size=4: must be odd");
    fails_with(&["generate", "--prompt", CONTEXT, "--press", "adakv", "--ratio", "0.5", "--press-option", "scorer=kvcompose"], "not a scorer press");
    fails_with(&["generate", "--prompt", CONTEXT, "--max-new-tokens", "0"], "max_new_tokens must be at least 1");
    fails_with(&["generate", "--prompt", CONTEXT, "--answer-prefix", "A:"], "--answer-prefix needs --question");
    fails_with(&["generate", "--prompt", CONTEXT, "--ratio", "0.5"], "need --press");
    fails_with(&["generate", "--prompt", "Hi", "--question", " there", "--press", "kvcompose", "--ratio", "0.5"], "context of 1 token");
}

#[test]
fn every_registered_press_runs_from_the_command_line() {
    let out = kvc(&["presses", "--json"]);
    assert!(out.status.success());
    let docs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = docs.as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    for want in ["kvcompose", "streaming_llm", "knorm", "random", "snapkv", "tova", "observed_attention", "expected_attention", "pyramidkv", "adakv"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let text = String::from_utf8_lossy(&kvc(&["presses"]).stdout).to_string();
    assert!(text.contains("--press-option window_size=64") && text.contains("alpha_safeguard=0.2"), "{text}");
    for name in names {
        let out = kvc(&[
            "generate", "--prompt", CONTEXT, "--chat", "--question", "What is the keeper's name?", "--press", name, "--ratio", "0.5",
            "--max-new-tokens", "4", "--json",
        ]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (before, after) = (v["press"]["kv_bytes_before"].as_u64().unwrap(), v["press"]["kv_bytes_after"].as_u64().unwrap());
        assert!(after < before, "{name}: {before} -> {after}");
        assert_eq!(v["press"]["spec"]["name"], name);
        assert_eq!(v["new_tokens"], 4, "{name}");
    }
}

#[test]
fn several_questions_share_one_compressed_cache() {
    let out = kvc(&[
        "generate", "--prompt", CONTEXT, "--chat", "--question", "What is the keeper's name?", "--question", "How many steps does she climb?",
        "--press", "tova", "--ratio", "0.25", "--max-new-tokens", "8", "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["answers"].as_array().unwrap().len(), 2);
    // plain generation says nothing of a question
    let out = kvc(&["generate", "--prompt", "Hello there", "--max-new-tokens", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("prompt tokens     2\n"), "{text}");
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // the same command gives the same kept sets and tokens with 1 or 2 worker threads
    for backend in ["flex", "ndarray"] {
        for press in ["kvcompose", "snapkv"] {
            let run = |threads: &str| -> serde_json::Value {
                let out = Command::new(env!("CARGO_BIN_EXE_kvc"))
                    .env("RAYON_NUM_THREADS", threads)
                    .args(["generate", "--prompt", CONTEXT, "--chat", "--question", "What is the keeper's name?", "--press", press])
                    .args(["--ratio", "0.5", "--max-new-tokens", "8", "--json", "--backend", backend])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                serde_json::from_slice(&out.stdout).unwrap()
            };
            let (one, two) = (run("1"), run("2"));
            assert_eq!(one["completion_ids"], two["completion_ids"], "{backend} {press}");
            assert_eq!(one["press"]["kept_per_head"], two["press"]["kept_per_head"], "{backend} {press}");
            assert_eq!(one["kv_cache_bytes_compressed"], two["kv_cache_bytes_compressed"], "{backend} {press}");
        }
    }
}

#[test]
fn a_saved_cache_answers_in_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ctx.kvc");
    let file = file.to_str().unwrap();
    let q = "Where does her brother live?";
    let run = |args: &[&str]| -> serde_json::Value {
        let out = kvc(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let common = ["--chat", "--question", q, "--max-new-tokens", "8", "--json"];
    let saved = run(&[&["generate", "--prompt", CONTEXT, "--press", "kvcompose", "--ratio", "0.5", "--save-cache", file][..], &common].concat());
    let loaded = run(&[&["generate", "--load-cache", file][..], &common].concat());
    assert_eq!(saved["completion_ids"], loaded["completion_ids"]);
    assert_eq!(saved["kv_cache_bytes_compressed"], loaded["kv_cache_bytes_compressed"]);
    assert_eq!(loaded["loaded_cache"]["press"]["name"], "kvcompose");
    // on another backend: the same fingerprint and answer
    let other = run(&[&["generate", "--load-cache", file, "--backend", "ndarray"][..], &common].concat());
    assert_eq!(saved["completion_ids"], other["completion_ids"]);
    // text mode names the file
    let out = kvc(&["generate", "--load-cache", file, "--chat", "--question", q, "--max-new-tokens", "2"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("saved cache"), "{}", String::from_utf8_lossy(&out.stdout));
    // refused: another model, no question, a context beside it, a missing file, another chat setting
    fails_with(&["generate", "--model", "qwen2.5-coder-0.5b-instruct", "--load-cache", file, "--chat", "--question", q], "does not fit this model");
    fails_with(&["generate", "--load-cache", file], "usage:--question");
    fails_with(&["generate", "--prompt", "x", "--question", q, "--save-cache", "/nonexistent/dir/ctx.kvc"], "folder /nonexistent/dir does not exist");
    // without a question the last prompt token would be held back: nothing later could follow it
    fails_with(&["generate", "--prompt", "x", "--save-cache", file], "usage:--question");
    fails_with(&["generate", "--load-cache", file, "--prompt", "x", "--question", q], "usage:cannot be used with");
    fails_with(&["generate", "--load-cache", "/nonexistent/ctx.kvc", "--question", q], "/nonexistent/ctx.kvc");
    fails_with(&["generate", "--load-cache", file, "--question", q], "chat template");
    // another dtype than the saving run's: told which one to give
    fails_with(&["generate", "--load-cache", file, "--dtype", "bf16", "--chat", "--question", q], "it holds f32 keys and values, the model runs in bf16");
}

#[test]
fn a_context_too_large_for_the_kv_memory_fails_before_the_prefill() {
    let start = std::time::Instant::now();
    // ~2.4k tokens of context: 30 layers x 3 KV heads x 64 x 2 x 4 bytes = 46 KB per token
    fails_with(
        &["generate", "--prompt-file", "../../assets/pride_and_prejudice_ch1-2.txt", "--question", "Who?", "--max-kv-memory", "20M"],
        "bytes of KV cache",
    );
    fails_with(&["generate", "--prompt", "x", "--max-kv-memory", "12Q"], "usage:is not a size");
    fails_with(&["generate", "--prompt", "x", "--max-kv-memory", "0"], "usage:is 0 or too large");
    // KVCompose's second pass over the context grows the prefilled cache itself (compressed in
    // place, no copy): it fits where a plain run fits, and both are refused under that
    for press in [&[][..], &["--press", "kvcompose", "--ratio", "0.5"][..]] {
        let args = |limit: &'static str| [&["generate", "--prompt", CONTEXT, "--question", "Who?", "--max-new-tokens", "2", "--max-kv-memory", limit][..], press].concat();
        let run = kvc(&args("4800K"));
        assert!(run.status.success(), "{press:?}: {}", String::from_utf8_lossy(&run.stderr));
        fails_with(&args("3000K"), "bytes of KV cache");
    }
    assert!(start.elapsed().as_secs() < 60);
}
