//! Plots of an evaluation (plotters; each as SVG and PNG): score vs compression ratio per press
//! (overall, and one panel per task), and the tokens per layer that KVCompose keeps at each ratio.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::summary::{Prediction, Summary, NONE};
use super::EvalError;

/// DejaVu Sans (assets/fonts, see assets/SOURCES.md): PNG text needs the font's bytes.
static FONT: &[u8] = include_bytes!("../../../../assets/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

pub(crate) fn register_font() {
    REGISTER.call_once(|| {
        // the font is compiled in and valid; a failure would only lose PNG text
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

pub(crate) type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Line colors (matplotlib's tab10: distinguishable, readable on white).
const TAB10: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

pub(crate) fn color(i: usize) -> RGBAColor {
    TAB10[i % TAB10.len()].to_rgba()
}

/// One series: a press's (ratio, score) points, the uncompressed score at ratio 0.
fn series(summary: &Summary, task: Option<&str>) -> Vec<(String, Vec<(f64, f64)>)> {
    let pick = |s: &super::summary::Score| match task {
        None => Some(s.score),
        Some(t) => s.tasks.get(t).copied(),
    };
    let base = pick(&summary.uncompressed);
    summary
        .presses
        .iter()
        .map(|(name, p)| {
            let mut pts: Vec<(f64, f64)> = base.map(|b| (0.0, b)).into_iter().collect();
            pts.extend(p.ratios.iter().filter_map(|(r, s)| Some((r.parse::<f64>().ok()?, pick(s)?))));
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (name.clone(), pts)
        })
        .collect()
}

fn draw_curves<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, curves: &[(String, Vec<(f64, f64)>)], legend: bool) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    let max_ratio = curves.iter().flat_map(|c| c.1.iter().map(|p| p.0)).fold(0.0, f64::max).max(0.1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(40)
        .build_cartesian_2d(0.0..max_ratio, 0.0..105.0)?;
    chart.configure_mesh().x_desc("compression ratio").y_desc("score").label_style(("sans-serif", 12)).draw()?;
    for (i, (name, pts)) in curves.iter().enumerate() {
        let color = color(i);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    if legend {
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 12)).draw()?;
    }
    Ok(())
}

fn draw_scores<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, summary: &Summary) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    draw_curves(&root, &format!("{} — score vs compression ratio", summary.model), &series(summary, None), true)?;
    root.present()?;
    Ok(())
}

fn draw_tasks<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, summary: &Summary, tasks: &[String]) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let cols = 4;
    let rows = tasks.len().div_ceil(cols).max(1);
    for (i, area) in root.split_evenly((rows, cols)).iter().enumerate() {
        if let Some(task) = tasks.get(i) {
            draw_curves(area, task, &series(summary, Some(task)), i == 0)?;
        }
    }
    root.present()?;
    Ok(())
}

/// Mean kept tokens per layer of `press` at each ratio, over rows.
fn kept_per_layer(preds: &[Prediction], press: &str) -> BTreeMap<String, Vec<f64>> {
    let mut acc: BTreeMap<String, (Vec<f64>, usize)> = BTreeMap::new();
    for p in preds.iter().filter(|p| p.press == press && p.skipped.is_none() && !p.kept_per_layer.is_empty()) {
        let e = acc.entry(super::summary::ratio_key(p.ratio)).or_insert_with(|| (vec![0.0; p.kept_per_layer.len()], 0));
        if e.0.len() == p.kept_per_layer.len() {
            // as a fraction of the row's context
            e.0.iter_mut().zip(&p.kept_per_layer).for_each(|(a, &k)| *a += k as f64 / p.context_tokens.max(1) as f64);
            e.1 += 1;
        }
    }
    acc.into_iter().map(|(r, (v, n))| (r, v.into_iter().map(|x| x / n.max(1) as f64).collect())).collect()
}

fn draw_layers<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, press: &str, kept: &BTreeMap<String, Vec<f64>>) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let layers = kept.values().map(Vec::len).max().unwrap_or(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{press}: kept fraction of the context per layer"), ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(40)
        .build_cartesian_2d(0.0..(layers.max(2) - 1) as f64, 0.0..1.05)?;
    chart
        .configure_mesh()
        .x_desc("layer")
        .y_desc("kept / context")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 12))
        .draw()?;
    for (i, (ratio, v)) in kept.iter().enumerate() {
        let color = color(i);
        chart
            .draw_series(LineSeries::new(v.iter().enumerate().map(|(l, &x)| (l as f64, x)), color.stroke_width(2)))?
            .label(format!("ratio {ratio}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 12)).draw()?;
    root.present()?;
    Ok(())
}

/// Needle scores: `(label, ratio) -> (length, depth) -> mean score`.
type NeedleGrid = BTreeMap<(usize, u32), f64>;

fn needle_grids(preds: &[Prediction]) -> BTreeMap<String, BTreeMap<String, NeedleGrid>> {
    let mut acc: BTreeMap<String, BTreeMap<String, BTreeMap<(usize, u32), (f64, usize)>>> = BTreeMap::new();
    for p in preds.iter().filter(|p| p.skipped.is_none()) {
        if let Some(cell) = super::needle::parse_task(&p.task) {
            let e = acc.entry(p.press.clone()).or_default().entry(super::summary::ratio_key(p.ratio)).or_default().entry(cell).or_default();
            e.0 += p.score;
            e.1 += 1;
        }
    }
    acc.into_iter()
        .map(|(press, by_ratio)| (press, by_ratio.into_iter().map(|(r, g)| (r, g.into_iter().map(|(k, (s, n))| (k, s / n as f64)).collect())).collect()))
        .collect()
}

/// The label of the cell centred on `v` (cells sit at integer coordinates; no label between them).
fn cell_label<T: ToString>(v: f64, labels: &[T]) -> String {
    let i = v.round();
    if (v - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    labels.get(i as usize).map_or(String::new(), ToString::to_string)
}

fn draw_needle<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, press: &str, grids: &BTreeMap<String, NeedleGrid>) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, grids.len().max(1)));
    for (area, (ratio, grid)) in panels.iter().zip(grids) {
        let lengths: Vec<usize> = grid.keys().map(|k| k.0).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let depths: Vec<u32> = grid.keys().map(|k| k.1).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let title = if press == NONE { "uncompressed".to_string() } else { format!("{press} @ {ratio}") };
        let (nl, nd) = (lengths.len(), depths.len());
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(6)
            .x_label_area_size(30)
            .y_label_area_size(46)
            .build_cartesian_2d(-0.5..nd as f64 - 0.5, -0.5..nl as f64 - 0.5)?;
        let (dl, ll) = (depths.clone(), lengths.clone());
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(nd)
            .y_labels(nl)
            .x_desc("depth %")
            .y_desc("tokens")
            .x_label_formatter(&move |x| cell_label(*x, &dl))
            .y_label_formatter(&move |y| cell_label(*y, &ll))
            .label_style(("sans-serif", 11))
            .draw()?;
        chart.draw_series(grid.iter().map(|(&(l, d), &score)| {
            let x = depths.iter().position(|&v| v == d).unwrap_or(0) as f64;
            let y = lengths.iter().position(|&v| v == l).unwrap_or(0) as f64;
            let t = (score / 100.0).clamp(0.0, 1.0);
            let color = RGBColor((220.0 * (1.0 - t)) as u8 + 20, (180.0 * t) as u8 + 40, 60);
            Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], color.filled())
        }))?;
    }
    root.present()?;
    Ok(())
}

/// Writes every plot of an evaluation into `out` and returns their paths: `scores.{svg,png}`,
/// `scores_by_task.{svg,png}`, `kept_per_layer_<press>.{svg,png}` for presses whose layers keep
/// different counts (KVCompose, PyramidKV), and for needle rows `needle_<press>.{svg,png}`: a
/// heatmap (context length x depth, red 0 to green 100) per ratio.
///
/// # Errors
/// [`EvalError::Plot`] naming the file.
pub fn write_all(out: &Path, summary: &Summary, preds: &[Prediction]) -> Result<Vec<PathBuf>, EvalError> {
    register_font();
    let mut written = Vec::new();
    let tasks: Vec<String> = summary.uncompressed.tasks.keys().cloned().collect();
    let per_layer: Vec<(String, BTreeMap<String, Vec<f64>>)> = summary
        .presses
        .keys()
        .filter(|p| p.as_str() != NONE)
        .map(|p| (p.clone(), kept_per_layer(preds, p)))
        .filter(|(_, k)| k.values().any(|v| v.windows(2).any(|w| (w[0] - w[1]).abs() > 1e-12)))
        .collect();
    let mut figure = |stem: String, f: &dyn Fn(&str) -> DrawResult<()>| -> Result<(), EvalError> {
        for ext in ["svg", "png"] {
            let path = out.join(format!("{stem}.{ext}"));
            let p = path.display().to_string();
            f(&p).map_err(|e| EvalError::Plot { path: path.clone(), message: e.to_string() })?;
            written.push(path);
        }
        Ok(())
    };
    figure("scores".into(), &|p| {
        if p.ends_with(".svg") {
            draw_scores(SVGBackend::new(p, (900, 600)).into_drawing_area(), summary)
        } else {
            draw_scores(BitMapBackend::new(p, (900, 600)).into_drawing_area(), summary)
        }
    })?;
    let h = 300 * tasks.len().div_ceil(4).max(1) as u32;
    figure("scores_by_task".into(), &|p| {
        if p.ends_with(".svg") {
            draw_tasks(SVGBackend::new(p, (1400, h)).into_drawing_area(), summary, &tasks)
        } else {
            draw_tasks(BitMapBackend::new(p, (1400, h)).into_drawing_area(), summary, &tasks)
        }
    })?;
    for (press, kept) in &per_layer {
        figure(format!("kept_per_layer_{press}"), &|p| {
            if p.ends_with(".svg") {
                draw_layers(SVGBackend::new(p, (900, 500)).into_drawing_area(), press, kept)
            } else {
                draw_layers(BitMapBackend::new(p, (900, 500)).into_drawing_area(), press, kept)
            }
        })?;
    }
    for (press, grids) in &needle_grids(preds) {
        let w = 320 * grids.len().max(1) as u32;
        figure(format!("needle_{press}"), &|p| {
            if p.ends_with(".svg") {
                draw_needle(SVGBackend::new(p, (w, 320)).into_drawing_area(), press, grids)
            } else {
                draw_needle(BitMapBackend::new(p, (w, 320)).into_drawing_area(), press, grids)
            }
        })?;
    }
    Ok(written)
}
