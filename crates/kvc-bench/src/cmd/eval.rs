//! `kvc-bench eval`: the accuracy benchmark's command line. Runs [`kvc_bench::eval`] (every row
//! through the pipeline, uncompressed and with each press at each ratio) on the chosen backend
//! with a progress bar, writes the plots, and prints the per-task table (beside kvpress's summary
//! with `--compare`). With several `--kv-dtypes` every row is prefilled and compressed once and
//! answered on each KV cache storage, each into `<out>/kv-<name>/`; then a table of them side by
//! side.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::builder::PossibleValuesParser;
use kvc_bench::eval;
use kvc_bench::eval::runner::{kv_dtype_name, EvalConfig};
use kvc_bench::eval::summary::{ratio_key, Prediction, Summary, NONE};
use kvc_core::{Budget, KvQuant, KvcBackend, PressSpec};

use super::backend;

/// The arguments of `kvc-bench eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// JSONL rows with kvpress's RULER columns (context, question, answer_prefix, answer, task,
    /// max_new_tokens).
    #[arg(long)]
    data: PathBuf,
    /// Presses (registry names; `kvc presses` lists them).
    #[arg(long, value_delimiter = ',', default_value = "kvcompose,snapkv,tova,pyramidkv,streaming_llm,knorm,expected_attention")]
    presses: Vec<String>,
    /// Compression ratios.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.25,0.5,0.75,0.9")]
    ratios: Vec<f64>,
    /// Keep the first K rows of each task (file order).
    #[arg(long)]
    rows_per_task: Option<usize>,
    /// Model path or known name (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backend, among those compiled in.
    #[arg(long, value_parser = PossibleValuesParser::new(backend::COMPILED), default_value = backend::default_backend())]
    backend: String,
    /// Output folder (predictions.jsonl is resumed from when present).
    #[arg(long)]
    out: PathBuf,
    /// A summary.json of the same rows by tools/kvpress_eval.py (kvpress) or tools/llamacpp_eval.py (llama.cpp): printed beside kvc's.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Evaluate nothing: summarize what --out's predictions.jsonl holds (a finished or partial
    /// run), draw the plots, print the tables (and the comparison with --compare).
    #[arg(long)]
    report_only: bool,
    /// Prefill chunk (tokens).
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// KV cache storages: `float` (the eval model's f32 cache; also `f32`), `f16`, `bf16`
    /// (16-bit copies of it), `int8`, `int4` (stored after the press, uncompressed cache
    /// included). Several:
    /// one prefill and one compression per row serve them all, each answers into
    /// `<out>/kv-<name>/`, then one table of them side by side; one: into `<out>` itself.
    #[arg(long, value_delimiter = ',', default_value = "float")]
    kv_dtypes: Vec<String>,
    /// Prefill on dense f32 copies of a GGUF's matrices (`WeightStorage::Dense`: the codes kept
    /// beside them for decode steps); by default the model holds only the file's blocks of codes
    /// on flex and ndarray (other backends load dense), as `kvc generate` does, so the answers are
    /// the ones a user of `kvc generate` gets.
    #[arg(long)]
    dense_weights: bool,
    /// Decode answers with int8 activations (`kvc generate --int8-activations`); recorded in
    /// each prediction, and a folder of the other setting is refused.
    #[arg(long)]
    int8_activations: bool,
}

/// `--kv-dtypes` parsed, in the order given.
///
/// # Errors
/// An unknown name, or one storage named twice (`float` and its synonyms count as one).
fn parse_kv_dtypes(names: &[String]) -> Result<Vec<Option<KvQuant>>> {
    let mut out: Vec<Option<KvQuant>> = Vec::with_capacity(names.len());
    for n in names {
        // the eval runs the model in f32: `f32` names its float cache, f16 / bf16 16-bit copies
        let q = KvQuant::parse_for(n, burn::tensor::DType::F32).context("--kv-dtypes")?;
        if out.contains(&q) {
            bail!("--kv-dtypes: {} is given twice (float and f32 both mean the model's f32 cache)", kv_dtype_name(q));
        }
        out.push(q);
    }
    if out.is_empty() {
        bail!("--kv-dtypes: no KV cache dtype given (accepted: float, f16, bf16, int8, int4)");
    }
    Ok(out)
}

/// Runs `kvc-bench eval`.
///
/// # Errors
/// Reading --compare, resolving the model, an unknown press, a ratio outside [0, 1), an unknown or
/// repeated kv dtype; the runs', the summaries' and the plots' errors.
pub fn run(a: EvalArgs) -> Result<()> {
    let kv = parse_kv_dtypes(&a.kv_dtypes)?;
    let data = a.data.clone();
    let theirs = a.compare.as_deref().map(read_summary).transpose()?;
    let model = match (&a.model, a.report_only) {
        (Some(m), true) => m.clone(),
        (None, true) => PathBuf::from(kvc_models::default_model::SMOLLM2.file),
        _ => kvc_models::default_model::resolve(a.model.as_deref())?,
    };
    let presses = a.presses.iter().map(|p| PressSpec::new(p, Budget::Ratio(0.5))).collect::<Vec<_>>();
    for p in &presses {
        p.check()?;
    }
    if let Some(r) = a.ratios.iter().find(|r| !(0.0..1.0).contains(*r)) {
        bail!("compression ratio {r} is outside [0, 1)");
    }
    let several = kv.len() > 1;
    let configs: Vec<EvalConfig> = kv
        .iter()
        .map(|&q| EvalConfig {
            data: data.clone(),
            rows_per_task: a.rows_per_task,
            presses: presses.clone(),
            ratios: a.ratios.clone(),
            out: if several { a.out.join(format!("kv-{}", kv_dtype_name(q))) } else { a.out.clone() },
            model: model.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(),
            prefill_chunk: a.chunk,
            kv_quant: q,
        })
        .collect();
    let results: Vec<(Summary, Vec<Prediction>)> = if a.report_only {
        let mut results = Vec::with_capacity(configs.len());
        for config in &configs {
            let summary = eval::runner::write_summary(config)?;
            let preds = eval::runner::read_own_predictions(config)?;
            eval::plots::write_all(&config.out, &summary, &preds)?;
            results.push((summary, preds));
        }
        results
    } else {
        let storage = kvc_models::WeightStorage::dense_if(a.dense_weights);
        backend::run(&a.backend, EvalJob { model, configs: configs.clone(), storage, int8_activations: a.int8_activations })?
    };
    for (config, (summary, _)) in configs.iter().zip(&results) {
        if several {
            println!("KV cache {} ({}):", kv_dtype_name(config.kv_quant), config.out.display());
        }
        print_table(summary);
        if let Some(t) = &theirs {
            print_compare(summary, t);
        }
        if several {
            println!();
        }
    }
    if several {
        print_kv_table(&configs, &results);
    }
    Ok(())
}

/// The runs of one `kvc-bench eval` (one per kv dtype) on one loaded model.
struct EvalJob {
    model: PathBuf,
    configs: Vec<EvalConfig>,
    storage: kvc_models::WeightStorage,
    int8_activations: bool,
}

impl backend::BackendJob for EvalJob {
    type Output = Vec<(Summary, Vec<Prediction>)>;

    fn run<B: KvcBackend>(self, device: B::Device) -> Result<Vec<(Summary, Vec<Prediction>)>> {
        let mut loaded = kvc_models::load_with::<B>(&self.model, &device, None, self.storage)?;
        if self.int8_activations && !loaded.model.enable_int8_activations().with_context(|| format!("model {}", self.model.display()))? {
            eprintln!("warning: {}", kvc_models::INT8_PLAIN_LOOPS_WARNING);
        }
        let several = self.configs.len() > 1;
        let bar = indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("eval [{bar:30}] {pos}/{len} (row, press, ratio{prefix}), {elapsed}, eta {eta} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        if several {
            bar.set_prefix(", kv dtype");
        }
        // one prefill and one compression per row serve every kv dtype
        let summaries = eval::runner::run_all(&loaded, &self.configs, &mut |p| match p {
            eval::runner::Progress::Start { total, done } => {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.reset_eta();
            }
            eval::runner::Progress::Done(p) => {
                bar.inc(1);
                let kv = if several { format!(" {}", p.kv_dtype.as_deref().unwrap_or("float")) } else { String::new() };
                bar.set_message(format!("row {} {}@{}{kv}: {:.0}", p.row, p.press, p.ratio, p.score));
            }
        })?;
        bar.finish_and_clear();
        let mut results = Vec::with_capacity(self.configs.len());
        for (config, summary) in self.configs.iter().zip(summaries) {
            let preds = eval::runner::read_own_predictions(config)?;
            let plots = eval::plots::write_all(&config.out, &summary, &preds)?;
            eprintln!("wrote {} plots to {}", plots.len(), config.out.display());
            results.push((summary, preds));
        }
        Ok(results)
    }
}

/// Mean KV bytes of the (non-skipped) predictions of `press` at `ratio` on `summary`'s rows.
fn mean_kv_bytes(summary: &Summary, preds: &[Prediction], press: &str, ratio: &str) -> Option<f64> {
    let bytes: Vec<f64> = preds
        .iter()
        .filter(|p| p.skipped.is_none() && p.press == press && ratio_key(p.ratio) == ratio && summary.rows.contains(&p.row))
        .map(|p| p.kv_bytes as f64)
        .collect();
    (!bytes.is_empty()).then(|| bytes.iter().sum::<f64>() / bytes.len() as f64)
}

/// The kv dtypes side by side: one row per press and ratio (and uncompressed), the mean score of
/// each kv dtype, then each one's mean KV bytes relative to the float uncompressed cache's (in MB
/// when float is not among them).
fn print_kv_table(configs: &[EvalConfig], results: &[(Summary, Vec<Prediction>)]) {
    let names: Vec<&str> = configs.iter().map(|c| kv_dtype_name(c.kv_quant)).collect();
    let base = configs
        .iter()
        .zip(results)
        .find(|(c, _)| c.kv_quant.is_none())
        .and_then(|(_, (s, p))| mean_kv_bytes(s, p, NONE, &ratio_key(0.0)))
        .filter(|b| *b > 0.0);
    let mut rows: Vec<(String, String)> = vec![(NONE.to_string(), ratio_key(0.0))];
    let mut pairs = std::collections::BTreeSet::new();
    for (s, _) in results {
        for (name, p) in &s.presses {
            for r in p.ratios.keys() {
                pairs.insert((name.clone(), r.clone()));
            }
        }
    }
    rows.extend(pairs);
    let w = names.iter().map(|n| n.len() + 2).max().unwrap_or(0).max(9);
    println!("KV cache dtypes: mean score (x100) | mean KV bytes {}", if base.is_some() { "/ float uncompressed" } else { "(MB)" });
    print!("{:<28}", "press @ ratio");
    for n in &names {
        print!("{n:>w$}");
    }
    print!(" |");
    for n in &names {
        print!("{n:>w$}");
    }
    println!();
    for (press, ratio) in &rows {
        let label = if press == NONE { "uncompressed".to_string() } else { format!("{press} @ {ratio}") };
        print!("{label:<28}");
        for (s, _) in results {
            let score = if press == NONE { Some(s.uncompressed.score) } else { s.presses.get(press).and_then(|p| p.ratios.get(ratio)).map(|sc| sc.score) };
            match score {
                Some(v) => print!("{v:>w$.1}"),
                None => print!("{:>w$}", "-"),
            }
        }
        print!(" |");
        for (s, p) in results {
            match (mean_kv_bytes(s, p, press, ratio), base) {
                (Some(b), Some(base)) => print!("{:>w$.3}", b / base),
                (Some(b), None) => print!("{:>w$.2}", b / 1e6),
                (None, _) => print!("{:>w$}", "-"),
            }
        }
        println!();
    }
}

fn read_summary(path: &std::path::Path) -> Result<Summary> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a summary.json", path.display()))
}

/// The per-task table: one row per press and ratio, one column per task, the mean last.
fn print_table(s: &eval::summary::Summary) {
    let tasks: Vec<&String> = s.uncompressed.tasks.keys().collect();
    let short = |t: &str| {
        t.replace("needle_L", "")
            .replace("_d", "/")
            .replace("niah_", "")
            .replace("single_", "s")
            .replace("multikey_", "mk")
            .replace("multivalue", "mv")
            .replace("multiquery", "mq")
    };
    let widths: Vec<usize> = tasks.iter().map(|t| short(t).len().max(6) + 1).collect();
    print!("{:<28}", "press @ ratio");
    for (t, w) in tasks.iter().zip(widths.iter().copied()) {
        print!("{:>w$}", short(t));
    }
    println!("{:>8}", "mean");
    let line = |label: String, sc: &eval::summary::Score| {
        print!("{label:<28}");
        for (t, w) in tasks.iter().zip(widths.iter().copied()) {
            match sc.tasks.get(*t) {
                Some(v) => print!("{v:>w$.1}"),
                None => print!("{:>w$}", "-"),
            }
        }
        println!("{:>8.1}", sc.score);
    };
    line("uncompressed".into(), &s.uncompressed);
    for (name, p) in &s.presses {
        for (r, sc) in &p.ratios {
            line(format!("{name} @ {r}"), sc);
        }
    }
    println!();
    println!("{:<22}{:>8}{:>24}", "press", "AUC", "max ratio within 10%");
    for (name, p) in &s.presses {
        println!("{name:<22}{:>8.1}{:>24}", p.auc, p.max_ratio_within_10pct);
    }
}

/// kvc and another tool (kvpress, `tools/kvpress_eval.py`; llama.cpp, `tools/llamacpp_eval.py`)
/// side by side on the press/ratio pairs both measured; the column is named by the first word of
/// the other summary's `tool`.
fn print_compare(ours: &eval::summary::Summary, theirs: &eval::summary::Summary) {
    let who = theirs.tool.split_whitespace().next().unwrap_or("theirs");
    println!();
    println!("kvc vs {} ({} vs {} rows{})", theirs.tool, ours.rows.len(), theirs.rows.len(), if ours.rows == theirs.rows { ", the same" } else { ", NOT the same rows" });
    println!("{:<28}{:>8}{:>10}{:>8}", "press @ ratio", "kvc", who, "diff");
    println!("{:<28}{:>8.1}{:>10.1}{:>8.1}", "uncompressed", ours.uncompressed.score, theirs.uncompressed.score, ours.uncompressed.score - theirs.uncompressed.score);
    for (name, p) in &ours.presses {
        for (r, sc) in &p.ratios {
            if let Some(t) = theirs.presses.get(name).and_then(|tp| tp.ratios.get(r)) {
                if t.tasks.keys().eq(sc.tasks.keys()) {
                    println!("{:<28}{:>8.1}{:>10.1}{:>8.1}", format!("{name} @ {r}"), sc.score, t.score, sc.score - t.score);
                } else {
                    println!("{:<28}{:>8.1}{:>10}  ({who} has {} of {} tasks)", format!("{name} @ {r}"), sc.score, "-", t.tasks.len(), sc.tasks.len());
                }
            }
        }
    }
    println!("seconds per (row, press, ratio): kvc {:.1}, {} {:.1}", ours.seconds_per_run, theirs.tool, theirs.seconds_per_run);
    for n in &theirs.notes {
        println!("note ({}): {n}", theirs.tool);
    }
}
