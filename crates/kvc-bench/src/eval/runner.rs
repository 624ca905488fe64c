//! The evaluation loop: every row through the library pipeline, one prefill per row serving the
//! uncompressed answer and every press and ratio (each compresses a copy of the prefilled cache),
//! predictions appended and flushed one by one, so an interrupted run resumes where it stopped.
//! With [`EvalConfig::kv_quant`] every cache an answer is decoded on (the uncompressed one and
//! each press's) is quantized just before its answer; [`run_all`] runs several KV cache storages
//! on one prefill and one compression per row.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use kvc_core::Activations;
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
    /// Store every answered cache (uncompressed and compressed) as int8 / int4 codes (or f16 /
    /// bf16 copies), quantized
    /// after the press ([`kvc_core::KvCache::quantize`]); `None`: the model's float dtype.
    pub kv_quant: Option<KvQuant>,
}

/// The name of a KV cache storage: `float` for `None`, else [`KvQuant::name`].
pub fn kv_dtype_name(q: Option<KvQuant>) -> &'static str {
    q.map_or("float", |q| q.name())
}

/// Progress of [`run`] and [`run_all`].
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
                "holds predictions on {} KV cache, this run's is {}: pass the same kv dtype or another output folder",
                match p.kv_dtype.as_deref() {
                    Some(name) => format!("an {name}"),
                    None => "a float".to_string(),
                },
                kv_dtype_name(cfg.kv_quant)
            ),
        });
    }
    Ok(preds)
}

/// Runs the evaluation (resuming from `out/predictions.jsonl`), writes `out/summary.json` and
/// returns the summary ([`run_all`] with one config).
///
/// # Errors
/// As [`run_all`].
pub fn run<B: KvcBackend>(loaded: &LoadedModel<B>, cfg: &EvalConfig, progress: &mut dyn FnMut(Progress)) -> Result<Summary, EvalError> {
    let mut summaries = run_all(loaded, std::slice::from_ref(cfg), progress)?;
    Ok(summaries.remove(0))
}

/// One config's output while [`run_all`] runs: its predictions file, and the keys it holds.
struct Output<'a> {
    cfg: &'a EvalConfig,
    path: PathBuf,
    file: std::fs::File,
    done: BTreeSet<(usize, String, String)>,
}

impl Output<'_> {
    /// Appends `p` (flushed), records its key and reports it.
    fn write(&mut self, p: Prediction, progress: &mut dyn FnMut(Progress)) -> Result<(), EvalError> {
        let line = serde_json::to_string(&p).map_err(|e| EvalError::Data { path: self.path.clone(), line: 0, message: e.to_string() })?;
        writeln!(self.file, "{line}").and_then(|_| self.file.flush()).map_err(|source| EvalError::Io { path: self.path.clone(), source })?;
        self.done.insert(key(p.row, &p.press, p.ratio));
        progress(Progress::Done(Box::new(p)));
        Ok(())
    }
}

/// Runs the evaluations of `cfgs`, which differ only in [`EvalConfig::kv_quant`] and
/// [`EvalConfig::out`] (one per KV cache storage: `kvc-bench eval --kv-dtypes`), row by row: each
/// row is tokenized, prefilled and compressed by every press and ratio once (KVCompose's scoring
/// pass once per row), and each config quantizes its own copy of every cache right before its
/// answer. The predictions equal separate [`run`]s' (the presses score the same full-precision
/// prefill). Resumes from each `out/predictions.jsonl`, writes each `out/summary.json`, returns
/// the summaries in `cfgs`' order. Progress counts the predictions of all configs.
///
/// # Errors
/// Data errors (file and line), press specification errors and a KV cache format the model's
/// heads cannot hold (before any work), predictions of another kv dtype or other activations
/// ([`kvc_models::Decoder::set_activations`]) in an output folder,
/// configs that differ in more than `kv_quant` and `out` or name the same output folder (as
/// written: `a` and `./a` are not compared) ([`EvalError::Data`], line 0), I/O errors, model
/// errors. A row longer than the model's window is
/// not an error: it is written as skipped, with the reason, and the run goes on.
pub fn run_all<B: KvcBackend>(loaded: &LoadedModel<B>, cfgs: &[EvalConfig], progress: &mut dyn FnMut(Progress)) -> Result<Vec<Summary>, EvalError> {
    let Some(cfg) = cfgs.first() else { return Ok(Vec::new()) };
    for (i, c) in cfgs.iter().enumerate() {
        let same = c.data == cfg.data && c.rows_per_task == cfg.rows_per_task && c.presses == cfg.presses && c.ratios == cfg.ratios && c.prefill_chunk == cfg.prefill_chunk;
        if !same || cfgs[..i].iter().any(|o| o.out == c.out) {
            let message = if same { "two evaluations run together write into the same folder" } else { "evaluations run together must differ only in their KV cache dtype and output folder" };
            return Err(EvalError::Data { path: c.out.clone(), line: 0, message: message.to_string() });
        }
    }
    let rows = load_rows(&cfg.data, cfg.rows_per_task)?;
    let specs: Vec<(PressSpec, f64)> = cfg
        .presses
        .iter()
        .flat_map(|p| cfg.ratios.iter().map(move |&r| (PressSpec { ratio: Some(r), tokens: None, ..p.clone() }, r)))
        .collect();
    for (s, _) in &specs {
        s.check()?;
    }
    for q in cfgs.iter().filter_map(|c| c.kv_quant) {
        q.check(loaded.config.head_dim)?;
    }
    // every output folder's predictions read and checked before any folder or file is made
    let act = (loaded.model.activations() == Activations::Int8).then_some("int8");
    let dones = cfgs
        .iter()
        .map(|c| {
            let preds = read_own_predictions(c)?;
            if let Some(p) = preds.iter().find(|p| p.activations.as_deref() != act) {
                let name = |a: Option<&str>| a.unwrap_or("f32").to_string();
                let message = format!("holds predictions decoded with {} activations, this run's are {}: pass the same setting or another output folder", name(p.activations.as_deref()), name(act));
                return Err(EvalError::Data { path: c.out.join("predictions.jsonl"), line: 0, message });
            }
            Ok(preds.iter().map(|p| key(p.row, &p.press, p.ratio)).collect::<BTreeSet<_>>())
        })
        .collect::<Result<Vec<_>, EvalError>>()?;
    let mut outputs = Vec::with_capacity(cfgs.len());
    let (mut total, mut already) = (0, 0);
    for (c, done) in cfgs.iter().zip(dones) {
        std::fs::create_dir_all(&c.out).map_err(|source| EvalError::Io { path: c.out.clone(), source })?;
        let path = c.out.join("predictions.jsonl");
        total += rows.len() * (1 + specs.len());
        already += rows
            .iter()
            .map(|(i, _)| std::iter::once(key(*i, NONE, 0.0)).chain(specs.iter().map(|(s, r)| key(*i, &s.name, *r))).filter(|k| done.contains(k)).count())
            .sum::<usize>();
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|source| EvalError::Io { path: path.clone(), source })?;
        outputs.push(Output { cfg: c, path, file, done });
    }
    progress(Progress::Start { total, done: already });
    let pipeline = Pipeline::new(loaded);
    let chat = loaded.tokenizer.chat_template().is_some();
    for (index, row) in &rows {
        // what each output still lacks of this row: the uncompressed answer, and indices into `specs`
        let none_todo: Vec<bool> = outputs.iter().map(|o| !o.done.contains(&key(*index, NONE, 0.0))).collect();
        let todo: Vec<BTreeSet<usize>> =
            outputs.iter().map(|o| specs.iter().enumerate().filter(|(_, (s, r))| !o.done.contains(&key(*index, &s.name, *r))).map(|(i, _)| i).collect()).collect();
        if todo.iter().all(BTreeSet::is_empty) && !none_todo.contains(&true) {
            continue;
        }
        let blank = |press: &str, ratio: f64, kv_quant: Option<KvQuant>| Prediction {
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
            kv_dtype: kv_quant.map(|q| q.name().to_string()),
            activations: act.map(str::to_string),
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
                for (o, out) in outputs.iter_mut().enumerate() {
                    let skipped = std::iter::once((NONE, 0.0)).filter(|_| none_todo[o]).chain(todo[o].iter().map(|&i| (specs[i].0.name.as_str(), specs[i].1)));
                    for (press, ratio) in skipped.collect::<Vec<_>>() {
                        out.write(Prediction { skipped: Some(reason.clone()), ..blank(press, ratio, out.cfg.kv_quant) }, progress)?;
                    }
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let union: BTreeSet<usize> = todo.iter().flatten().copied().collect();
        let needs = union.iter().map(|&i| specs[i].0.needs()).try_fold(CaptureSpec::default(), |a, n| n.map(|n| a.merge(n)))?;
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
        let quantized = |mut cache: kvc_core::KvCache<B>, q: Option<KvQuant>| -> Result<(kvc_core::KvCache<B>, f64), EvalError> {
            let start = std::time::Instant::now();
            if let Some(q) = q {
                cache.quantize(q)?;
            }
            Ok((cache, start.elapsed().as_secs_f64()))
        };
        // the row's caches (uncompressed, then every press x ratio some output lacks) made BATCH at
        // a time, each once; every output then decodes the answers it lacks on its own copies
        // together: one pass over the weights per step for all of them
        let items: Vec<Option<usize>> = std::iter::once(None).filter(|_| none_todo.contains(&true)).chain(union.iter().map(|&i| Some(i))).collect();
        // KVCompose's scoring pass runs once per row, shared by its ratios
        let mut memo = kvc_models::pipeline::ScoreMemo::default();
        let wants = |o: usize, item: Option<usize>| item.map_or(none_todo[o], |i| todo[o].contains(&i));
        for chunk in items.chunks(BATCH) {
            let mut made = Vec::with_capacity(chunk.len());
            for &item in chunk {
                made.push(match item {
                    None => (item, Some(prefilled.cache.clone()), Vec::new(), 0.0),
                    Some(i) => {
                        let c = pipeline.compress_reusing(&prefilled, &specs[i].0, &mut memo, &mut |_, _| {})?;
                        (item, Some(c.cache), c.report.kept_per_layer(), c.seconds)
                    }
                });
            }
            for (o, out) in outputs.iter_mut().enumerate() {
                let mut jobs: Vec<(Prediction, kvc_core::KvCache<B>, f64)> = Vec::new();
                for (item, cache, kept, compress_seconds) in &mut made {
                    if !wants(o, *item) {
                        continue;
                    }
                    let (press, ratio) = item.map_or((NONE, 0.0), |i| (specs[i].0.name.as_str(), specs[i].1));
                    // the last output that answers on this cache takes it; earlier ones copy it
                    let last = !(o + 1..cfgs.len()).any(|later| wants(later, *item));
                    let cache = if last { cache.take() } else { cache.clone() };
                    let cache = cache.expect("only the last output that answers on a cache takes it");
                    let (cache, seconds) = quantized(cache, out.cfg.kv_quant)?;
                    let p = Prediction { kv_bytes: cache.bytes(), kept_per_layer: kept.clone(), ..blank(press, ratio, out.cfg.kv_quant) };
                    jobs.push((p, cache, *compress_seconds + seconds));
                }
                if jobs.is_empty() {
                    continue;
                }
                let answers = pipeline.answer_batch(&jobs.iter().map(|(_, c, _)| (c, question.as_slice())).collect::<Vec<_>>(), &gen)?;
                for ((p, _, seconds), a) in jobs.drain(..).zip(answers) {
                    out.write(scored(p, a.text, seconds + a.seconds, row), progress)?;
                }
            }
        }
    }
    drop(outputs);
    cfgs.iter().map(write_summary).collect()
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
