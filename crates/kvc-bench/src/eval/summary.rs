//! Predictions (one JSON line per row, press and ratio) and their summary: per press and ratio
//! the mean score (mean over tasks of per-task means, as RULER/kvpress), the area under the
//! score-vs-ratio curve and the largest ratio that keeps 90% of the uncompressed score.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The press name of uncompressed predictions.
pub const NONE: &str = "none";

/// One prediction, as written to `predictions.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// 0-based line of the row in the data file.
    pub row: usize,
    /// The row's task.
    pub task: String,
    /// Press name ([`NONE`] for the uncompressed cache).
    pub press: String,
    /// Compression ratio (0 for [`NONE`]).
    pub ratio: f64,
    /// The decoded answer (from the generated ids only).
    pub prediction: String,
    /// 0..100.
    pub score: f64,
    /// Reference answers.
    pub answer: Vec<String>,
    /// Context tokens.
    pub context_tokens: usize,
    /// Wall seconds of this prediction (compression and quantization + answer, the answer
    /// decoded in one batch with the row's other answers, so its decode time is shared; the
    /// shared prefill is in `prefill_seconds`).
    pub seconds: f64,
    /// Wall seconds of the row's prefill (shared by every press and ratio of the row).
    #[serde(default)]
    pub prefill_seconds: f64,
    /// KV cache bytes after compression and quantization (the context only; codes, scales and
    /// the full-precision residual window of a quantized cache).
    #[serde(default)]
    pub kv_bytes: usize,
    /// Kept tokens per layer (the largest head's count).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_per_layer: Vec<usize>,
    /// Set when the row could not be run (e.g. longer than the model's window): the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// How the answer was decoded (the kvpress reference script says where it needed its
    /// single-query workaround).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<String>,
    /// The KV cache's storage when quantized after the press (`int8`, `int4`:
    /// [`kvc_core::KvQuant::name`]); absent for a cache in the model's float dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_dtype: Option<String>,
    /// `int8` when decoded with int8 activations (`kvc-bench eval --int8-activations`:
    /// [`kvc_models::Decoder::set_activations`]); absent for f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<String>,
}

/// Mean score overall (mean of per-task means) and per task.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Mean over tasks of the per-task means.
    pub score: f64,
    /// Per-task means.
    pub tasks: BTreeMap<String, f64>,
}

/// One press over ratios.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PressSummary {
    /// Scores by ratio (keys formatted as in the predictions, e.g. `"0.25"`).
    pub ratios: BTreeMap<String, Score>,
    /// Trapezoid area under score(ratio) over `[0, max ratio]`, the uncompressed score at ratio
    /// 0, divided by the max ratio: a mean score in points.
    pub auc: f64,
    /// The largest measured ratio whose score is at least 90% of the uncompressed score (0 when
    /// none is).
    pub max_ratio_within_10pct: f64,
}

/// `summary.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Which tool wrote it (`kvc` or `kvpress 0.5.5`).
    pub tool: String,
    /// Model file or name.
    pub model: String,
    /// Data file.
    pub data: String,
    /// Row indices scored.
    pub rows: Vec<usize>,
    /// The uncompressed cache.
    pub uncompressed: Score,
    /// Per press.
    pub presses: BTreeMap<String, PressSummary>,
    /// Mean wall seconds per (row, press, ratio) prediction, prefill shares included.
    #[serde(default)]
    pub seconds_per_run: f64,
    /// Anything a reader must know.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A ratio as a map key: `0.25`, `0.5`.
pub fn ratio_key(r: f64) -> String {
    format!("{r}")
}

/// Mean of per-task means of `preds` (skipped rows left out).
pub fn mean_score<'a>(preds: impl IntoIterator<Item = &'a Prediction>) -> Score {
    let mut by_task: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for p in preds.into_iter().filter(|p| p.skipped.is_none()) {
        let e = by_task.entry(p.task.clone()).or_default();
        e.0 += p.score;
        e.1 += 1;
    }
    let tasks: BTreeMap<String, f64> = by_task.into_iter().map(|(t, (s, n))| (t, s / n as f64)).collect();
    let score = if tasks.is_empty() { 0.0 } else { tasks.values().sum::<f64>() / tasks.len() as f64 };
    Score { score, tasks }
}

/// Area under `(ratio, score)` points (any order) with `(0, uncompressed)` prepended, by the
/// trapezoid rule, divided by the largest ratio; the uncompressed score when there is no point.
pub fn auc(uncompressed: f64, points: &[(f64, f64)]) -> f64 {
    let mut pts: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.0 > 0.0).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let Some(&(max, _)) = pts.last() else { return uncompressed };
    let mut area = 0.0;
    let mut prev = (0.0, uncompressed);
    for p in pts {
        area += (p.0 - prev.0) * (p.1 + prev.1) / 2.0;
        prev = p;
    }
    area / max
}

/// The largest ratio whose score is at least `0.9 x uncompressed` (0 when none).
pub fn max_ratio_within_10pct(uncompressed: f64, points: &[(f64, f64)]) -> f64 {
    points.iter().filter(|p| p.1 >= 0.9 * uncompressed).map(|p| p.0).fold(0.0, f64::max)
}

/// The summary of a set of predictions.
pub fn summarize(tool: &str, model: &str, data: &str, preds: &[Prediction]) -> Summary {
    let mut rows: Vec<usize> = preds.iter().map(|p| p.row).collect();
    rows.sort_unstable();
    rows.dedup();
    let uncompressed = mean_score(preds.iter().filter(|p| p.press == NONE));
    let mut by_press: BTreeMap<String, BTreeMap<String, Vec<&Prediction>>> = BTreeMap::new();
    for p in preds.iter().filter(|p| p.press != NONE) {
        by_press.entry(p.press.clone()).or_default().entry(ratio_key(p.ratio)).or_default().push(p);
    }
    let presses = by_press
        .into_iter()
        .map(|(press, by_ratio)| {
            let ratios: BTreeMap<String, Score> = by_ratio.into_iter().map(|(r, ps)| (r, mean_score(ps))).collect();
            let points: Vec<(f64, f64)> = ratios.iter().filter_map(|(r, s)| r.parse::<f64>().ok().map(|r| (r, s.score))).collect();
            let summary = PressSummary {
                auc: auc(uncompressed.score, &points),
                max_ratio_within_10pct: max_ratio_within_10pct(uncompressed.score, &points),
                ratios,
            };
            (press, summary)
        })
        .collect();
    let run: Vec<&Prediction> = preds.iter().filter(|p| p.skipped.is_none()).collect();
    let mut prefills: BTreeMap<usize, f64> = BTreeMap::new();
    for p in &run {
        prefills.insert(p.row, p.prefill_seconds);
    }
    let total: f64 = run.iter().map(|p| p.seconds).sum::<f64>() + prefills.values().sum::<f64>();
    Summary {
        tool: tool.into(),
        model: model.into(),
        data: data.into(),
        rows,
        uncompressed,
        presses,
        seconds_per_run: total / run.len().max(1) as f64,
        notes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(row: usize, task: &str, press: &str, ratio: f64, score: f64) -> Prediction {
        Prediction {
            row,
            task: task.into(),
            press: press.into(),
            ratio,
            prediction: String::new(),
            score,
            answer: vec![],
            context_tokens: 10,
            seconds: 1.0,
            prefill_seconds: 2.0,
            kv_bytes: 0,
            kept_per_layer: vec![],
            skipped: None,
            decode: None,
            kv_dtype: None,
            activations: None,
        }
    }

    #[test]
    fn auc_and_tolerance_on_synthetic_curves() {
        // flat curve: the AUC is the score itself
        assert!((auc(80.0, &[(0.25, 80.0), (0.5, 80.0), (0.9, 80.0)]) - 80.0).abs() < 1e-12);
        // linear from 100 at 0 to 0 at 1: mean 50
        assert!((auc(100.0, &[(0.5, 50.0), (1.0, 0.0)]) - 50.0).abs() < 1e-12);
        // order does not matter; (0.5 * (100 + 60) / 2 + 0.5 * (60 + 20) / 2) / 1
        assert!((auc(100.0, &[(1.0, 20.0), (0.5, 60.0)]) - 60.0).abs() < 1e-12);
        assert_eq!(auc(70.0, &[]), 70.0);
        assert_eq!(max_ratio_within_10pct(100.0, &[(0.25, 95.0), (0.5, 90.0), (0.75, 89.9), (0.9, 10.0)]), 0.5);
        assert_eq!(max_ratio_within_10pct(100.0, &[(0.25, 50.0)]), 0.0);
    }

    #[test]
    fn means_are_per_task_then_over_tasks() {
        let preds = vec![
            pred(0, "qa_1", NONE, 0.0, 100.0),
            pred(1, "qa_1", NONE, 0.0, 0.0),
            pred(2, "vt", NONE, 0.0, 100.0),
            pred(0, "qa_1", "snapkv", 0.5, 0.0),
            pred(1, "qa_1", "snapkv", 0.5, 0.0),
            pred(2, "vt", "snapkv", 0.5, 100.0),
        ];
        let s = summarize("kvc", "m", "d", &preds);
        // (50 + 100) / 2, not 200 / 3
        assert_eq!(s.uncompressed.score, 75.0);
        assert_eq!(s.presses["snapkv"].ratios["0.5"].score, 50.0);
        assert_eq!(s.presses["snapkv"].ratios["0.5"].tasks["vt"], 100.0);
        assert_eq!(s.rows, vec![0, 1, 2]);
        // 6 predictions of 1 s + 3 prefills of 2 s
        assert_eq!(s.seconds_per_run, 2.0);
    }
}
