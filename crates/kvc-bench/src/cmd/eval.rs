//! `kvc-bench eval`: the accuracy benchmark's command line. Runs [`kvc_bench::eval`] (every row
//! through the pipeline, uncompressed and with each press at each ratio) on the chosen backend
//! with a progress bar, writes the plots, and prints the per-task table (beside kvpress's summary
//! with `--compare`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::builder::PossibleValuesParser;
use kvc_bench::eval;
use kvc_core::{Budget, KvcBackend, PressSpec};

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
    /// A summary.json of the same rows by tools/kvpress_eval.py: printed beside kvc's.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Evaluate nothing: summarize what --out's predictions.jsonl holds (a finished or partial
    /// run), draw the plots, print the tables (and the comparison with --compare).
    #[arg(long)]
    report_only: bool,
    /// Prefill chunk (tokens).
    #[arg(long, default_value_t = 512)]
    chunk: usize,
}

/// Runs `kvc-bench eval`.
///
/// # Errors
/// Reading --compare, resolving the model, an unknown press, a ratio outside [0, 1); the run's, the summary's and the plots' errors.
pub fn run(a: EvalArgs) -> Result<()> {
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
    let config = eval::runner::EvalConfig {
        data,
        rows_per_task: a.rows_per_task,
        presses,
        ratios: a.ratios.clone(),
        out: a.out.clone(),
        model: model.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(),
        prefill_chunk: a.chunk,
    };
    let summary = if a.report_only {
        let summary = eval::runner::write_summary(&config)?;
        let preds = eval::runner::read_predictions(&config.out.join("predictions.jsonl"))?;
        eval::plots::write_all(&config.out, &summary, &preds)?;
        summary
    } else {
        backend::run(&a.backend, EvalJob { model, config })?
    };
    print_table(&summary);
    if let Some(t) = &theirs {
        print_compare(&summary, t);
    }
    Ok(())
}

struct EvalJob {
    model: PathBuf,
    config: eval::runner::EvalConfig,
}

impl backend::BackendJob for EvalJob {
    type Output = eval::summary::Summary;

    fn run<B: KvcBackend>(self, device: B::Device) -> Result<eval::summary::Summary> {
        let loaded = kvc_models::load::<B>(&self.model, &device)?;
        let bar = indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("eval [{bar:30}] {pos}/{len} (row, press, ratio), {elapsed}, eta {eta} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let summary = eval::runner::run(&loaded, &self.config, &mut |p| match p {
            eval::runner::Progress::Start { total, done } => {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.reset_eta();
            }
            eval::runner::Progress::Done(p) => {
                bar.inc(1);
                bar.set_message(format!("row {} {}@{}: {:.0}", p.row, p.press, p.ratio, p.score));
            }
        })?;
        bar.finish_and_clear();
        let preds = eval::runner::read_predictions(&self.config.out.join("predictions.jsonl"))?;
        let plots = eval::plots::write_all(&self.config.out, &summary, &preds)?;
        eprintln!("wrote {} plots to {}", plots.len(), self.config.out.display());
        Ok(summary)
    }
}

fn read_summary(path: &std::path::Path) -> Result<eval::summary::Summary> {
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

/// kvc and kvpress side by side on the press/ratio pairs both measured.
fn print_compare(ours: &eval::summary::Summary, theirs: &eval::summary::Summary) {
    println!();
    println!("kvc vs {} ({} vs {} rows{})", theirs.tool, ours.rows.len(), theirs.rows.len(), if ours.rows == theirs.rows { ", the same" } else { ", NOT the same rows" });
    println!("{:<28}{:>8}{:>9}{:>8}", "press @ ratio", "kvc", "kvpress", "diff");
    println!("{:<28}{:>8.1}{:>9.1}{:>8.1}", "uncompressed", ours.uncompressed.score, theirs.uncompressed.score, ours.uncompressed.score - theirs.uncompressed.score);
    for (name, p) in &ours.presses {
        for (r, sc) in &p.ratios {
            if let Some(t) = theirs.presses.get(name).and_then(|tp| tp.ratios.get(r)) {
                if t.tasks.keys().eq(sc.tasks.keys()) {
                    println!("{:<28}{:>8.1}{:>9.1}{:>8.1}", format!("{name} @ {r}"), sc.score, t.score, sc.score - t.score);
                } else {
                    println!("{:<28}{:>8.1}{:>9}  (kvpress has {} of {} tasks)", format!("{name} @ {r}"), sc.score, "-", t.tasks.len(), sc.tasks.len());
                }
            }
        }
    }
    println!("seconds per (row, press, ratio): kvc {:.1}, {} {:.1}", ours.seconds_per_run, theirs.tool, theirs.seconds_per_run);
    for n in &theirs.notes {
        println!("note ({}): {n}", theirs.tool);
    }
}
