//! Training metrics: one row per step, written as CSV, and the loss curve as a PNG.

use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// File name of the metrics table in a run directory.
pub const METRICS_FILE: &str = "metrics.csv";
/// File name of the loss plot in a run directory.
pub const PLOT_FILE: &str = "loss.png";

/// What one training step measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    /// Update number (1-based).
    pub step: usize,
    /// Learning rate of the update.
    pub lr: f64,
    /// Training cross-entropy of the batch, nats/token (before the update).
    pub train_loss: f64,
    /// Validation cross-entropy after the update, when it was evaluated.
    pub val_loss: Option<f64>,
    /// Training throughput since the run (or the resume) started.
    pub tokens_per_s: f64,
    /// Training time so far, seconds.
    pub elapsed_s: f64,
}

/// Writes `rows` as CSV, atomically.
///
/// # Errors
/// [`TrainError::Model`] wrapping the I/O error.
pub fn write_csv(path: &Path, rows: &[MetricRow]) -> Result<(), TrainError> {
    let mut out = String::from("step,lr,train_loss,val_loss,tokens_per_s,elapsed_s\n");
    for r in rows {
        let val = r.val_loss.map(|v| format!("{v:.6}")).unwrap_or_default();
        out.push_str(&format!(
            "{},{:.6e},{:.6},{},{:.1},{:.2}\n",
            r.step, r.lr, r.train_loss, val, r.tokens_per_s, r.elapsed_s
        ));
    }
    bit_ttt_burn::files::write_atomic(path, out.as_bytes())?;
    Ok(())
}

/// Horizontal reference lines on the plot (label, nats/token).
pub type Reference = (String, f64);

/// Registers a sans-serif font for plot labels from the usual system places (DejaVu, Liberation,
/// Noto); returns whether one was found. Plots are still drawn without one, just unlabelled.
fn ensure_font() -> bool {
    use std::sync::OnceLock;
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        const CANDIDATES: &[&str] = &[
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
            "/Library/Fonts/Arial.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
            "C:\\Windows\\Fonts\\arial.ttf",
        ];
        for path in CANDIDATES {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Draws the training loss (raw and smoothed), the validation loss (legend `val_label`) and
/// `references` against the step, as a PNG.
///
/// # Errors
/// [`TrainError::Io`] if drawing or writing fails.
pub fn plot_loss(
    path: &Path,
    rows: &[MetricRow],
    references: &[Reference],
    title: &str,
    val_label: &str,
) -> Result<(), TrainError> {
    let err = |e: String| TrainError::io(path, std::io::Error::other(e));
    if rows.is_empty() {
        return Ok(());
    }
    let labels = ensure_font();
    // Draw into a temporary file beside the target and rename, like every other output.
    let tmp = path.with_extension(format!("tmp-{}.png", std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, (960, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let max_step = rows.last().map_or(1, |r| r.step).max(2) as f64;
        let mut values: Vec<f64> = rows
            .iter()
            .flat_map(|r| std::iter::once(r.train_loss).chain(r.val_loss))
            .chain(references.iter().map(|r| r.1))
            .filter(|v| v.is_finite())
            .collect();
        values.sort_by(f64::total_cmp);
        let lo = values.first().copied().unwrap_or(0.0);
        // Skip the first steps' very high losses so the interesting part is readable.
        let hi = values[(values.len() as f64 * 0.98) as usize - usize::from(values.len() > 1)]
            .max(references.iter().map(|r| r.1).fold(lo, f64::max));
        let (lo, hi) = (lo - 0.1 * (hi - lo).max(0.1), hi + 0.1 * (hi - lo).max(0.1));

        let mut builder = ChartBuilder::on(&root);
        builder.margin(20);
        if labels {
            builder
                .caption(title, ("sans-serif", 24))
                .x_label_area_size(45)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d(0f64..max_step, lo..hi)
            .map_err(|e| err(e.to_string()))?;
        if labels {
            chart
                .configure_mesh()
                .x_desc("step")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.1}"))
                .y_desc("cross-entropy (nats/token)")
                .draw()
                .map_err(|e| err(e.to_string()))?;
        }

        let raw = RGBColor(170, 200, 235);
        chart
            .draw_series(LineSeries::new(
                rows.iter()
                    .map(|r| (r.step as f64, r.train_loss.clamp(lo, hi))),
                raw,
            ))
            .map_err(|e| err(e.to_string()))?;
        // Trailing mean of the training loss over the last 25 steps.
        let smooth: Vec<(f64, f64)> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let window = &rows[i.saturating_sub(24)..=i];
                let mean = window.iter().map(|w| w.train_loss).sum::<f64>() / window.len() as f64;
                (r.step as f64, mean.clamp(lo, hi))
            })
            .collect();
        let series = chart
            .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?;
        if labels {
            series
                .label("train (mean of the last 25 steps)")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        }
        let val: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| r.val_loss.map(|v| (r.step as f64, v.clamp(lo, hi))))
            .collect();
        if !val.is_empty() {
            chart
                .draw_series(val.iter().map(|&p| Circle::new(p, 3, RED.filled())))
                .map_err(|e| err(e.to_string()))?;
            let series = chart
                .draw_series(LineSeries::new(val, RED.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?;
            if labels {
                series.label(val_label).legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2))
                });
            }
        }
        let colors = [RGBColor(120, 120, 120), RGBColor(0, 140, 0), MAGENTA];
        for (i, (name, value)) in references.iter().enumerate() {
            let color = colors[i % colors.len()];
            let series = chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.0, *value), (max_step, *value)],
                    8,
                    5,
                    color.stroke_width(2),
                ))
                .map_err(|e| err(e.to_string()))?;
            if labels {
                series
                    .label(format!("{name} ({value:.3})"))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
        }
        if labels {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 16))
                .draw()
                .map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// Draws named lines of (x, y) points as a PNG, x on a log scale if `log_x` (points with
/// x ≤ 0 are then left out).
///
/// # Errors
/// [`TrainError::Io`] if drawing or writing fails.
pub fn plot_lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    log_x: bool,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), TrainError> {
    let err = |e: String| TrainError::io(path, std::io::Error::other(e));
    let points = || {
        series
            .iter()
            .flat_map(|(_, p)| p.iter().copied())
            .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!log_x || x > 0.0))
    };
    if points().next().is_none() {
        return Ok(());
    }
    let (x_lo, x_hi) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (x, _)| {
        (lo.min(x), hi.max(x))
    });
    let (y_lo, y_hi) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (_, y)| {
        (lo.min(y), hi.max(y))
    });
    let pad = 0.05 * (y_hi - y_lo).max(0.05);
    let (y_lo, y_hi) = (y_lo - pad, y_hi + pad);
    let x_hi = if x_hi > x_lo { x_hi } else { x_lo + 1.0 };
    let labels = ensure_font();
    let tmp = path.with_extension(format!("tmp-{}.png", std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, (960, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(20);
        if labels {
            builder
                .caption(title, ("sans-serif", 24))
                .x_label_area_size(45)
                .y_label_area_size(60);
        }
        let colors = [
            RGBColor(31, 119, 180),
            RGBColor(174, 199, 232),
            RGBColor(214, 39, 40),
            RGBColor(255, 152, 150),
            RGBColor(44, 160, 44),
            RGBColor(152, 223, 138),
            RGBColor(148, 103, 189),
            RGBColor(140, 86, 75),
        ];
        // One drawing routine for both x scales.
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                if labels {
                    chart
                        .configure_mesh()
                        .x_desc(x_desc)
                        .y_desc(y_desc)
                        .x_label_formatter(&|x| format!("{x:.0}"))
                        .y_label_formatter(&|y| format!("{y:.2}"))
                        .draw()
                        .map_err(|e| err(e.to_string()))?;
                }
                for (i, (name, pts)) in series.iter().enumerate() {
                    let color = colors[i % colors.len()];
                    let pts: Vec<(f64, f64)> = pts
                        .iter()
                        .copied()
                        .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!log_x || x > 0.0))
                        .collect();
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                        .map_err(|e| err(e.to_string()))?;
                    let line = chart
                        .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                        .map_err(|e| err(e.to_string()))?;
                    if labels {
                        line.label(name.as_str()).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                        });
                    }
                }
                if labels {
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.85))
                        .border_style(BLACK)
                        .label_font(("sans-serif", 16))
                        .draw()
                        .map_err(|e| err(e.to_string()))?;
                }
            }};
        }
        if log_x {
            draw!(builder
                .build_cartesian_2d((x_lo..x_hi).log_scale(), y_lo..y_hi)
                .map_err(|e| err(e.to_string()))?);
        } else {
            draw!(builder
                .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
                .map_err(|e| err(e.to_string()))?);
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<MetricRow> = (1..=50)
            .map(|s| MetricRow {
                step: s,
                lr: 1e-3,
                train_loss: 6.0 / (s as f64).sqrt(),
                val_loss: (s % 10 == 0).then_some(5.0 / (s as f64).sqrt()),
                tokens_per_s: 100.0,
                elapsed_s: s as f64,
            })
            .collect();
        let csv = dir.path().join(METRICS_FILE);
        write_csv(&csv, &rows).unwrap();
        let text = std::fs::read_to_string(&csv).unwrap();
        assert_eq!(text.lines().count(), 51);
        assert!(text.lines().nth(10).unwrap().starts_with("10,1.000000e-3,"));
        let png = dir.path().join(PLOT_FILE);
        plot_loss(&png, &rows, &[("bigram".into(), 1.5)], "test", "validation").unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn line_plots_on_linear_and_log_scales() {
        let dir = tempfile::tempdir().unwrap();
        let series = vec![
            ("a".to_string(), vec![(1.0, 5.0), (16.0, 4.5), (256.0, 4.2)]),
            (
                "b".to_string(),
                vec![(0.0, 5.1), (16.0, 4.6), (256.0, f64::NAN)],
            ),
        ];
        for log_x in [false, true] {
            let png = dir.path().join(format!("lines-{log_x}.png"));
            plot_lines(&png, "t", "x", "y", log_x, &series).unwrap();
            assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
        }
        // Nothing to draw: no file.
        let empty = dir.path().join("empty.png");
        plot_lines(
            &empty,
            "t",
            "x",
            "y",
            true,
            &[("c".into(), vec![(0.0, 1.0)])],
        )
        .unwrap();
        assert!(!empty.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
