//! The `kvc-bench` binary's speed-side subcommands on small inputs: `backends` (the side-by-side
//! table agrees with itself across CPU backends), `scaling` (table and plot), `speed` with a
//! quantized KV cache and `products` (the decode kernels alone). They run the default model
//! (SmolLM2-135M-Instruct, fetched into ~/.cache/kvc when absent).

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvc-bench"))
}

fn text() -> String {
    format!("{}/../../assets/pride_and_prejudice_ch1-2.txt", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn backends_table_compares_cpu_backends() {
    // the default list: the CPU backends compiled in (flex, ndarray in this build)
    let out = bench().args(["backends", "--text", &text(), "--tokens", "96", "--decode", "4"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("flex") || l.starts_with("ndarray")).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    // KVCompose keeps the same tokens in all 30 layers x 3 KV heads, and greedy decoding agrees
    for r in rows {
        assert!(r.contains("90/90") && r.contains("4/4"), "{r}");
    }
    let bad = bench().args(["backends", "--text", &text(), "--backends", "flex,tpu"]).output().unwrap();
    // a backend not compiled in is a usage error (exit 2, as `kvc --backend`), naming those that are
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(bad.status.code() == Some(2) && err.contains("invalid value 'tpu'") && err.contains("flex"), "{err}");
}

#[test]
fn scaling_writes_a_table_and_a_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("plots");
    let out = bench()
        .args(["scaling", "--text", &text(), "--tokens", "64,128", "--decode", "2", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().filter(|l| l.starts_with("{\"tokens\"")).count(), 2, "{stdout}");
    assert!(stdout.lines().any(|l| l.trim_start().starts_with("128 ")), "{stdout}");
    assert!(out_dir.join("scaling.svg").exists() && out_dir.join("scaling.png").exists());
}

#[test]
fn speed_quantizes_the_cache_when_asked() {
    let line = |kv: &str| -> serde_json::Value {
        let out = bench().args(["speed", "--text", &text(), "--tokens", "96", "--decode", "3", "--backends", "flex", "--kv-dtype", kv, "--int8-prefill"]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
        assert_eq!(lines.len(), 1, "{stdout}");
        serde_json::from_str(lines[0]).unwrap()
    };
    let (float, int8) = (line("float"), line("int8"));
    assert_eq!(float["kv_dtype"], "float");
    assert!(float["quantize_s"].is_null(), "{float}");
    // --int8-prefill: the same prompt again on int8 rows, its last logits near the f32 prefill's
    let diff = float["int8_prefill_logit_diff"].as_f64().unwrap();
    assert!(float["prefill_tok_s_int8"].as_f64().unwrap() > 0.0 && diff > 0.0 && diff < 10.0, "{float}");
    assert_eq!(int8["kv_dtype"], "int8");
    assert!(int8["quantize_s"].as_f64().unwrap() > 0.0 && int8["decode_tokens"] == 3, "{int8}");
    let bytes = |v: &serde_json::Value| v["kv_cache_bytes"].as_f64().unwrap();
    // the same tokens either way: int8 codes + f16 scales against f32 keys and values
    assert!(bytes(&float) > 0.0 && bytes(&int8) < 0.6 * bytes(&float), "{float}\n{int8}");
    let bad = bench().args(["speed", "--text", &text(), "--kv-dtype", "int2"]).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("--kv-dtype") && err.contains("int8, int4"), "{err}");
}

/// `kvc-bench products`: a line per format and activations with a positive time, a table, for
/// one row of activations (a decode step) and for 40 (a prefill chunk's path); a width that is
/// not whole super-blocks, or no tokens, is an error, not a panic.
#[test]
fn products_times_the_decode_kernels() {
    for tokens in ["1", "40"] {
        let out = bench().args(["products", "--rows", "64", "--cols", "512", "--calls", "2", "--tokens", tokens]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<serde_json::Value> = text.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
        let kinds: Vec<(String, String)> = lines.iter().map(|v| (v["format"].as_str().unwrap().into(), v["activations"].as_str().unwrap().into())).collect();
        assert_eq!(kinds, [("Q4_K", "f32"), ("Q4_K", "int8"), ("Q6_K", "f32"), ("Q6_K", "int8")].map(|(a, b)| (a.to_string(), b.to_string())));
        assert!(lines.iter().all(|v| v["best_ms"].as_f64().unwrap() > 0.0 && v["gmac_s"].as_f64().unwrap() > 0.0 && v["tokens"] == serde_json::json!(tokens.parse::<u64>().unwrap())), "{text}");
        assert!(text.contains(&format!("| matrix 64 x 512, {tokens} token(s) |")), "{text}");
    }
    for bad in [["--cols", "300"], ["--tokens", "0"]] {
        let out = bench().arg("products").args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 256"));
    }
}

/// `kvc-bench batch`: a JSON line per batch size with its steps and a positive rate, the table
/// naming the activations (`--int8-activations` on the default model's codes); a batch size of 0
/// is an error, not a panic.
#[test]
fn batch_steps_every_batch_size() {
    for int8 in [false, true] {
        let mut cmd = bench();
        cmd.args(["batch", "--text", &text(), "--tokens", "64", "--batches", "1,3", "--steps", "2"]);
        if int8 {
            cmd.arg("--int8-activations");
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<serde_json::Value> = stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.iter().map(|r| r["batch"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 3], "{stdout}");
        assert!(rows.iter().all(|r| r["steps"] == 2 && r["tokens_per_second"].as_f64().unwrap() > 0.0), "{stdout}");
        let act = if int8 { "flex f32, int8 activations" } else { "flex f32, f32 activations" };
        assert!(stdout.contains(act), "{stdout}");
    }
    let bad = bench().args(["batch", "--text", &text(), "--batches", "0"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("at least 1"));
}
