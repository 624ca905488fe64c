//! `kvc-bench scaling`: prefill, compression and decode time against context length, one row
//! per length, and a plot of them (SVG and PNG).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use crate::eval::plots::{color, register_font, DrawResult};
use crate::eval::EvalError;

/// One context length's measurements (one run each; wall seconds, device synchronized).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScalingRow {
    /// Context tokens.
    pub tokens: usize,
    /// Prefill seconds.
    pub prefill_s: f64,
    /// Compression seconds (the press after the prefill).
    pub compress_s: f64,
    /// `(prefill + compression) / prefill`.
    pub total_over_prefill: f64,
    /// Milliseconds per decode step on the uncompressed cache.
    pub decode_step_ms: f64,
    /// Milliseconds per decode step on the compressed cache.
    pub decode_step_ms_compressed: f64,
    /// KV cache bytes before and after compression.
    pub kv_bytes: (usize, usize),
}

/// The rows as a fixed-width text table (one header line, one line per row).
pub fn table(rows: &[ScalingRow]) -> String {
    let mut s = format!(
        "{:>7} {:>10} {:>11} {:>8} {:>15} {:>20} {:>9} {:>9}\n",
        "tokens", "prefill s", "compress s", "total/p", "decode ms/tok", "compressed ms/tok", "KV MB", "after MB"
    );
    for r in rows {
        s.push_str(&format!(
            "{:>7} {:>10.2} {:>11.2} {:>8.2} {:>15.1} {:>20.1} {:>9.1} {:>9.1}\n",
            r.tokens,
            r.prefill_s,
            r.compress_s,
            r.total_over_prefill,
            r.decode_step_ms,
            r.decode_step_ms_compressed,
            r.kv_bytes.0 as f64 / 1e6,
            r.kv_bytes.1 as f64 / 1e6
        ));
    }
    s
}

/// Writes `scaling.svg` and `scaling.png` into `out`: seconds of prefill and compression (left)
/// and milliseconds per decode step, uncompressed and compressed (right), against context length.
///
/// # Errors
/// [`EvalError::Plot`] naming the file.
pub fn write_plot(out: &Path, rows: &[ScalingRow], press: &str) -> Result<Vec<PathBuf>, EvalError> {
    register_font();
    let mut written = Vec::new();
    for ext in ["svg", "png"] {
        let path = out.join(format!("scaling.{ext}"));
        let p = path.display().to_string();
        let res = if ext == "svg" {
            draw(SVGBackend::new(&p, (1000, 420)).into_drawing_area(), rows, press)
        } else {
            draw(BitMapBackend::new(&p, (1000, 420)).into_drawing_area(), rows, press)
        };
        res.map_err(|e| EvalError::Plot { path: path.clone(), message: e.to_string() })?;
        written.push(path);
    }
    Ok(written)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, rows: &[ScalingRow], press: &str) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let max_tokens = rows.iter().map(|r| r.tokens).max().unwrap_or(1) as f64;
    let panel = |area: &DrawingArea<DB, plotters::coord::Shift>, title: &str, y: &str, curves: &[(String, Vec<(f64, f64)>)]| -> DrawResult<()> {
        let max_y = curves.iter().flat_map(|c| c.1.iter().map(|p| p.1)).fold(0.0, f64::max).max(1e-3) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..max_tokens * 1.05, 0.0..max_y)?;
        chart.configure_mesh().x_desc("context tokens").y_desc(y).x_label_formatter(&|x| format!("{}", x.round() as i64)).label_style(("sans-serif", 12)).draw()?;
        for (i, (name, pts)) in curves.iter().enumerate() {
            let c = color(i);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 12)).draw()?;
        Ok(())
    };
    let pts = |f: &dyn Fn(&ScalingRow) -> f64| rows.iter().map(|r| (r.tokens as f64, f(r))).collect::<Vec<_>>();
    panel(
        &left,
        "prefill and compression",
        "seconds",
        &[("prefill".into(), pts(&|r| r.prefill_s)), (format!("{press} compression"), pts(&|r| r.compress_s))],
    )?;
    panel(
        &right,
        "decode step",
        "ms per token",
        &[("uncompressed".into(), pts(&|r| r.decode_step_ms)), (format!("{press}"), pts(&|r| r.decode_step_ms_compressed))],
    )?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(tokens: usize) -> ScalingRow {
        ScalingRow {
            tokens,
            prefill_s: tokens as f64 / 400.0,
            compress_s: tokens as f64 / 300.0,
            total_over_prefill: 1.0 + 4.0 / 3.0,
            decode_step_ms: 30.0 + tokens as f64 / 1000.0,
            decode_step_ms_compressed: 20.0,
            kv_bytes: (tokens * 46080, tokens * 11520),
        }
    }

    #[test]
    fn table_has_a_line_per_row_and_plot_files_are_written() {
        let rows = vec![row(1024), row(2048)];
        let t = table(&rows);
        assert_eq!(t.lines().count(), 3);
        assert!(t.lines().nth(2).unwrap().trim_start().starts_with("2048"));
        let dir = tempfile::tempdir().unwrap();
        let files = write_plot(dir.path(), &rows, "kvcompose").unwrap();
        assert_eq!(files.len(), 2);
        let svg = std::fs::read_to_string(dir.path().join("scaling.svg")).unwrap();
        assert!(svg.contains("kvcompose compression") && svg.contains("context tokens"));
        assert!(std::fs::metadata(dir.path().join("scaling.png")).unwrap().len() > 1000);
    }
}
