//! The evaluation loop: every row through the library pipeline, one prefill per row serving the
//! uncompressed answer and every press and ratio (each compresses a copy of the prefilled cache),
//! predictions appended and flushed one by one, so an interrupted run resumes where it stopped.
//! With [`EvalConfig::kv_quant`] every cache an answer is decoded on (the uncompressed one and
//! each press's) is quantized just before its answer.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use kvc_core::KvcBackend;
use kvc_core::{CaptureSpec, KvQuant, PressSpec};
use kvc_models::pipeline::{Pipeline, Request};
use kvc_models::{GenerationConfig, LoadedModel};

use super::data::{load_rows, Row};
use super::metrics;
use super::summary::{ratio_key, summarize, Prediction, Summary, NONE};
use super::EvalError;

/// What to evaluate.
#[derive(Clone, Debug)]
pub struct EvalConfig {
    /// JSONL rows (kvpress's RULER columns).
    pub data: PathBuf,
    /// Keep the first `k` rows of each task (all when `None`).
    pub rows_per_task: Option<usize>,
    /// Presses by registry name, with options (`ratio`/`tokens` are set per run).
    pub presses: Vec<PressSpec>,
    /// Compression ratios.
    pub ratios: Vec<f64>,
    /// Output folder: `predictions.jsonl`, `summary.json`, plots.
    pub out: PathBuf,
    /// Model label for the summary.
    pub model: String,
    /// Prefill chunk (tokens).
    pub prefill_chunk: usize,
    /// Store every answered cache (uncompressed and compressed) as int8 / int4 codes, quantized
    /// after the press ([`kvc_core::KvCache::quantize`]); `None`: the model's float dtype.
    pub kv_quant: Option<KvQuant>,
}

/// The name of a KV cache storage: `float` for `None`, else [`KvQuant::name`].
pub fn kv_dtype_name(q: Option<KvQuant>) -> &'static str {
    q.map_or("float", |q| q.name())
}

/// Progress of [`run`].
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// The run starts: predictions in all, and how many the output folder already holds.
    Start {
        /// (row, press, ratio) triples, uncompressed included.
        total: usize,
        /// Already in `predictions.jsonl`.
        done: usize,
    },
    /// One prediction was written.
    Done(Box<Prediction>),
}

/// Answers of a row decoded together at most (each holds its own compressed cache).
const BATCH: usize = 16;

/// The (row, press, ratio) key of a prediction.
fn key(row: usize, press: &str, ratio: f64) -> (usize, String, String) {
    (row, press.to_string(), ratio_key(ratio))
}

/// Reads `predictions.jsonl`; a last line cut short by a killed run is dropped (and the file
/// rewritten without it).
///
/// # Errors
/// [`EvalError::Io`]; [`EvalError::Data`] for an invalid line before the last.
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>, EvalError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(EvalError::Io { path: path.to_path_buf(), source }),
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut preds = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Prediction>(line) {
            Ok(p) => preds.push(p),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {
                // the row in flight when the run was killed: computed again
                let kept: String = lines[..i].iter().map(|l| format!("{l}\n")).collect();
                std::fs::write(path, kept).map_err(|source| EvalError::Io { path: path.to_path_buf(), source })?;
            }
            Err(e) => return Err(EvalError::Data { path: path.to_path_buf(), line: i + 1, message: e.to_string() }),
        }
    }
    Ok(preds)
}

/// Reads `cfg.out/predictions.jsonl` ([`read_predictions`]) and checks that every prediction was
/// made on `cfg`'s KV cache storage (a folder holds one kv dtype's predictions).
///
/// # Errors
/// As [`read_predictions`]; [`EvalError::Data`] (line 0) naming both storages when a prediction
/// is of another one.
pub fn read_own_predictions(cfg: &EvalConfig) -> Result<Vec<Prediction>, EvalError> {
    let path = cfg.out.join("predictions.jsonl");
    let preds = read_predictions(&path)?;
    let want = cfg.kv_quant.map(|q| q.name());
    if let Some(p) = preds.iter().find(|p| p.kv_dtype.as_deref() != want) {
        return Err(EvalError::Data {
            path,
            line: 0,
            message: format!(
                "holds predictions on a {} KV cache, this run's is {}: pass the same kv dtype or another output folder",
                p.kv_dtype.as_deref().unwrap_or("float"),
                kv_dtype_name(cfg.kv_quant)
            ),
        });
    }
    Ok(preds)
}

/// Runs the evaluation (resuming from `out/predictions.jsonl`), writes `out/summary.json` and
/// returns the summary.
///
/// # Errors
/// Data errors (file and line), press specification errors and a KV cache format the model's
/// heads cannot hold (before any work), predictions of another kv dtype in the output folder,
/// I/O errors, model errors. A row longer than the model's window is not an error: it is written as
/// skipped, with the reason, and the run goes on.
pub fn run<B: KvcBackend>(loaded: &LoadedModel<B>, cfg: &EvalConfig, progress: &mut dyn FnMut(Progress)) -> Result<Summary, EvalError> {
    let rows = load_rows(&cfg.data, cfg.rows_per_task)?;
    let specs: Vec<(PressSpec, f64)> = cfg
        .presses
        .iter()
        .flat_map(|p| cfg.ratios.iter().map(move |&r| (PressSpec { ratio: Some(r), tokens: None, ..p.clone() }, r)))
        .collect();
    for (s, _) in &specs {
        s.check()?;
    }
    if let Some(q) = cfg.kv_quant {
        q.check(loaded.config.head_dim)?;
    }
    std::fs::create_dir_all(&cfg.out).map_err(|source| EvalError::Io { path: cfg.out.clone(), source })?;
    let path = cfg.out.join("predictions.jsonl");
    let existing = read_own_predictions(cfg)?;
    let mut done: BTreeSet<(usize, String, String)> = existing.iter().map(|p| key(p.row, &p.press, p.ratio)).collect();
    let total = rows.len() * (1 + specs.len());
    let already = rows
        .iter()
        .map(|(i, _)| std::iter::once(key(*i, NONE, 0.0)).chain(specs.iter().map(|(s, r)| key(*i, &s.name, *r))).filter(|k| done.contains(k)).count())
        .sum();
    progress(Progress::Start { total, done: already });
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| EvalError::Io { path: path.clone(), source })?;
    let pipeline = Pipeline::new(loaded);
    let chat = loaded.tokenizer.chat_template().is_some();
    for (index, row) in &rows {
        let todo: Vec<&(PressSpec, f64)> = specs.iter().filter(|(s, r)| !done.contains(&key(*index, &s.name, *r))).collect();
        let none_todo = !done.contains(&key(*index, NONE, 0.0));
        if todo.is_empty() && !none_todo {
            continue;
        }
        let mut write = |p: Prediction, done: &mut BTreeSet<_>| -> Result<(), EvalError> {
            let line = serde_json::to_string(&p).map_err(|e| EvalError::Data { path: path.clone(), line: 0, message: e.to_string() })?;
            writeln!(file, "{line}").and_then(|_| file.flush()).map_err(|source| EvalError::Io { path: path.clone(), source })?;
            done.insert(key(p.row, &p.press, p.ratio));
            progress(Progress::Done(Box::new(p)));
            Ok(())
        };
        let blank = |press: &str, ratio: f64| Prediction {
            row: *index,
            task: row.task.clone(),
            press: press.to_string(),
            ratio,
            prediction: String::new(),
            score: 0.0,
            answer: row.answer.clone(),
            context_tokens: 0,
            seconds: 0.0,
            prefill_seconds: 0.0,
            kv_bytes: 0,
            kept_per_layer: Vec::new(),
            skipped: None,
            decode: None,
            kv_dtype: cfg.kv_quant.map(|q| q.name().to_string()),
        };
        let request = Request { context: row.context.clone(), questions: vec![row.question.clone()], chat, answer_prefix: row.answer_prefix.clone(), ..Default::default() };
        let prepared = pipeline.tokenize(&request).map_err(EvalError::from).and_then(|t| {
            let window = loaded.config.max_position_embeddings;
            let need = t.context.len() + t.questions[0].len() + row.max_new_tokens;
            if need > window {
                return Err(EvalError::Skip(format!(
                    "context {} + question {} + max_new_tokens {} = {need} tokens, more than the model's window of {window}",
                    t.context.len(),
                    t.questions[0].len(),
                    row.max_new_tokens
                )));
            }
            if t.context.len() < 2 {
                // every press needs two context tokens; the row is skipped as a whole
                return Err(EvalError::Skip(kvc_core::CoreError::ContextTooShort(t.context.len()).to_string()));
            }
            Ok(t)
        });
        let tokens = match prepared {
            Ok(t) => t,
            Err(EvalError::Skip(reason)) => {
                let skipped = std::iter::once((NONE.to_string(), 0.0)).filter(|_| none_todo).chain(todo.iter().map(|(s, r)| (s.name.clone(), *r)));
                for (press, ratio) in skipped.collect::<Vec<_>>() {
                    write(Prediction { skipped: Some(reason.clone()), ..blank(&press, ratio) }, &mut done)?;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let needs = todo.iter().map(|(s, _)| s.needs()).try_fold(CaptureSpec::default(), |a, n| n.map(|n| a.merge(n)))?;
        let prefilled = pipeline.prefill(&tokens.context, needs, cfg.prefill_chunk, &mut |_| {})?;
        let gen = GenerationConfig { max_new_tokens: row.max_new_tokens, prefill_chunk: cfg.prefill_chunk, ..Default::default() };
        let question = &tokens.questions[0];
        let scored = |mut p: Prediction, text: String, seconds: f64, row: &Row| {
            p.score = metrics::score(&row.task, &text, &row.answer);
            p.prediction = text;
            p.seconds = seconds;
            p.prefill_seconds = prefilled.seconds;
            p.context_tokens = tokens.context.len();
            p
        };
        // each answered cache quantized (when asked) right before it is queued; its quantization
        // time counts in the prediction's seconds, and `kv_bytes` are the bytes it then holds
        let quantized = |mut cache: kvc_core::KvCache<B>| -> Result<(kvc_core::KvCache<B>, f64), EvalError> {
            let start = std::time::Instant::now();
            if let Some(q) = cfg.kv_quant {
                cache.quantize(q)?;
            }
            Ok((cache, start.elapsed().as_secs_f64()))
        };
        // the row's answers (uncompressed, then every press x ratio) decoded together, at most
        // BATCH at a time: one pass over the weights per step for all of them
        let mut jobs: Vec<(Prediction, kvc_core::KvCache<B>, f64)> = Vec::new();
        if none_todo {
            let (cache, seconds) = quantized(prefilled.cache.clone())?;
            jobs.push((Prediction { kv_bytes: cache.bytes(), ..blank(NONE, 0.0) }, cache, seconds));
        }
        // KVCompose's scoring pass runs once per row, shared by its ratios
        let mut memo = kvc_models::pipeline::ScoreMemo::default();
        let mut specs = todo.into_iter().peekable();
        while !jobs.is_empty() || specs.peek().is_some() {
            while jobs.len() < BATCH {
                let Some((spec, ratio)) = specs.next() else { break };
                let c = pipeline.compress_reusing(&prefilled, spec, &mut memo, &mut |_, _| {})?;
                let (cache, seconds) = quantized(c.cache)?;
                let p = Prediction { kv_bytes: cache.bytes(), kept_per_layer: c.report.kept_per_layer(), ..blank(&spec.name, *ratio) };
                jobs.push((p, cache, c.seconds + seconds));
            }
            let answers = pipeline.answer_batch(&jobs.iter().map(|(_, c, _)| (c, question.as_slice())).collect::<Vec<_>>(), &gen)?;
            for ((p, _, compress_seconds), a) in jobs.drain(..).zip(answers) {
                write(scored(p, a.text, compress_seconds + a.seconds, row), &mut done)?;
            }
        }
    }
    drop(file);
    write_summary(cfg)
}

/// Summarizes what `cfg.out/predictions.jsonl` holds for `cfg`'s rows and presses (a finished
/// or a partial run) and writes `cfg.out/summary.json` (with a note naming a quantized KV cache).
///
/// # Errors
/// Data errors of the rows or predictions, predictions of another kv dtype, I/O errors.
pub fn write_summary(cfg: &EvalConfig) -> Result<Summary, EvalError> {
    let rows = load_rows(&cfg.data, cfg.rows_per_task)?;
    let all = read_own_predictions(cfg)?;
    let wanted: BTreeSet<usize> = rows.iter().map(|r| r.0).collect();
    let names: BTreeSet<&str> = cfg.presses.iter().map(|p| p.name.as_str()).chain([NONE]).collect();
    let ratios: BTreeSet<String> = cfg.ratios.iter().map(|&r| ratio_key(r)).chain([ratio_key(0.0)]).collect();
    let mine: Vec<Prediction> = all
        .into_iter()
        .filter(|p| wanted.contains(&p.row) && names.contains(p.press.as_str()) && ratios.contains(&ratio_key(p.ratio)))
        .collect();
    let mut summary = summarize("kvc", &cfg.model, &cfg.data.display().to_string(), &mine);
    if let Some(q) = cfg.kv_quant {
        summary.notes.push(format!("KV cache stored as {} after the press (kvc_core::kvquant; residual window {} tokens)", q.name(), q.residual));
    }
    let skipped = mine.iter().filter(|p| p.skipped.is_some() && p.press == NONE).count();
    if skipped > 0 {
        summary.notes.push(format!("{skipped} row(s) skipped (see predictions.jsonl `skipped`)"));
    }
    let text = serde_json::to_string_pretty(&summary).map_err(|e| EvalError::Data { path: cfg.out.clone(), line: 0, message: e.to_string() })?;
    let summary_path = cfg.out.join("summary.json");
    std::fs::write(&summary_path, text).map_err(|source| EvalError::Io { path: summary_path, source })?;
    Ok(summary)
}
