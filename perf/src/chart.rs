//! One SVG bar chart per scenario: median IOPS per (storage, subject) with a
//! min–max whisker (plotters, SVG backend only: no font or system dependencies).

use std::path::Path;

use plotters::prelude::*;

use crate::report::SummaryRow;

/// Errors drawing a chart.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct ChartError {
    /// Output path.
    pub path: String,
    /// What plotters said.
    pub message: String,
}

fn colour(subject: &str) -> RGBColor {
    match subject {
        "plexvm-blk" => RGBColor(31, 119, 180),
        "plexvm-blk-direct" => RGBColor(114, 170, 214),
        "qsd" => RGBColor(214, 39, 40),
        "qsd-direct" => RGBColor(240, 128, 128),
        "host" => RGBColor(90, 90, 90),
        _ => RGBColor(170, 170, 170),
    }
}

/// Draws `rows` (one scenario's summaries) to `path`.
pub fn draw(path: &Path, title: &str, rows: &[SummaryRow]) -> Result<(), ChartError> {
    let err = |e: &dyn std::fmt::Display| ChartError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let bars: Vec<&SummaryRow> = rows.iter().filter(|r| r.summary.reps > 0).collect();
    let labels: Vec<String> = bars
        .iter()
        .map(|r| format!("{} {}", r.storage, r.subject))
        .collect();
    let top = bars
        .iter()
        .map(|r| r.summary.iops.max)
        .fold(1.0f64, f64::max)
        * 1.15;
    let width = 160 + 110 * bars.len().max(1) as u32;
    let root = SVGBackend::new(path, (width, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = bars.len().max(1) as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..top)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len().max(1))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => usize::try_from(*i)
                .ok()
                .and_then(|i| labels.get(i).cloned())
                .unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc("IOPS (median, min–max)")
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, row) in (0..n).zip(&bars) {
        let s = &row.summary.iops;
        let c = colour(row.subject.name());
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), s.median),
            ],
            c.filled(),
        );
        bar.set_margin(0, 0, 12, 12);
        chart
            .draw_series(std::iter::once(bar))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(std::iter::once(ErrorBar::new_vertical(
                SegmentValue::CenterOf(i),
                s.min,
                s.median,
                s.max,
                BLACK.stroke_width(1),
                10,
            )))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Storage, Subject};
    use crate::sample::{Spread, Summary};

    #[test]
    fn draws_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.svg");
        let row = |subject, median| SummaryRow {
            scenario: "x",
            storage: Storage::Tmpfs,
            subject,
            summary: Summary {
                reps: 2,
                iops: Spread {
                    median,
                    min: median * 0.9,
                    max: median * 1.1,
                },
                ..Summary::default()
            },
            vs_qsd: None,
            vs_ceiling: None,
        };
        draw(
            &path,
            "randread",
            &[
                row(Subject::PlexvmBlk, 300_000.0),
                row(Subject::Qsd, 100_000.0),
            ],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("tmpfs plexvm-blk"));
        assert!(svg.contains("<rect"));
    }
}
