//! The evaluation loop: every row through the library pipeline, one prefill per row serving the
//! uncompressed answer and every press and ratio (each compresses a copy of the prefilled cache),
//! predictions appended and flushed one by one, so an interrupted run resumes where it stopped.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use kvc_core::KvcBackend;
use kvc_core::{CaptureSpec, PressSpec};
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

/// Runs the evaluation (resuming from `out/predictions.jsonl`), writes `out/summary.json` and
/// returns the summary.
///
/// # Errors
/// Data errors (file and line), press specification errors (before any work), I/O errors,
/// model errors. A row longer than the model's window is not an error: it is written as
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
    std::fs::create_dir_all(&cfg.out).map_err(|source| EvalError::Io { path: cfg.out.clone(), source })?;
    let path = cfg.out.join("predictions.jsonl");
    let existing = read_predictions(&path)?;
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
        // the row's answers (uncompressed, then every press x ratio) decoded together, at most
        // BATCH at a time: one pass over the weights per step for all of them
        let mut jobs: Vec<(Prediction, kvc_core::KvCache<B>, f64)> = Vec::new();
        if none_todo {
            jobs.push((Prediction { kv_bytes: prefilled.cache.bytes(), ..blank(NONE, 0.0) }, prefilled.cache.clone(), 0.0));
        }
        let mut specs = todo.into_iter().peekable();
        while !jobs.is_empty() || specs.peek().is_some() {
            while jobs.len() < BATCH {
                let Some((spec, ratio)) = specs.next() else { break };
                let c = pipeline.compress(&prefilled, spec, &mut |_, _| {})?;
                let p = Prediction { kv_bytes: c.report.bytes_after, kept_per_layer: c.report.kept_per_layer(), ..blank(&spec.name, *ratio) };
                jobs.push((p, c.cache, c.seconds));
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
/// or a partial run) and writes `cfg.out/summary.json`.
///
/// # Errors
/// Data errors of the rows or predictions, I/O errors.
pub fn write_summary(cfg: &EvalConfig) -> Result<Summary, EvalError> {
    let rows = load_rows(&cfg.data, cfg.rows_per_task)?;
    let all = read_predictions(&cfg.out.join("predictions.jsonl"))?;
    let wanted: BTreeSet<usize> = rows.iter().map(|r| r.0).collect();
    let names: BTreeSet<&str> = cfg.presses.iter().map(|p| p.name.as_str()).chain([NONE]).collect();
    let ratios: BTreeSet<String> = cfg.ratios.iter().map(|&r| ratio_key(r)).chain([ratio_key(0.0)]).collect();
    let mine: Vec<Prediction> = all
        .into_iter()
        .filter(|p| wanted.contains(&p.row) && names.contains(p.press.as_str()) && ratios.contains(&ratio_key(p.ratio)))
        .collect();
    let mut summary = summarize("kvc", &cfg.model, &cfg.data.display().to_string(), &mine);
    let skipped = mine.iter().filter(|p| p.skipped.is_some() && p.press == NONE).count();
    if skipped > 0 {
        summary.notes.push(format!("{skipped} row(s) skipped (see predictions.jsonl `skipped`)"));
    }
    let text = serde_json::to_string_pretty(&summary).map_err(|e| EvalError::Data { path: cfg.out.clone(), line: 0, message: e.to_string() })?;
    let summary_path = cfg.out.join("summary.json");
    std::fs::write(&summary_path, text).map_err(|source| EvalError::Io { path: summary_path, source })?;
    Ok(summary)
}
