//! The scale curves as SVG line charts, drawn with `plotters`: setup time
//! against guest size, conversions and view VMAs against the number of
//! islands, and the aggregate round-trip rate against the number of VMs.
//!
//! Each curve is read back from the report's rows (the metric names carry
//! the x value), so a chart always shows the run its table shows.

use plotters::prelude::*;

use crate::{BenchReport, Row};

/// One curve family: the rows whose metric is `prefix` + x + `suffix`.
struct Curve {
    /// The file name's tail: `<stem>-<name>.svg`.
    name: &'static str,
    title: &'static str,
    prefix: &'static str,
    suffix: &'static str,
    x_desc: &'static str,
    /// Parses the x value out of the metric's middle.
    parse: fn(&str) -> Option<f64>,
}

const CURVES: &[Curve] = &[
    Curve {
        name: "sparse-setup",
        title: "sparse guest setup against guest size (flat is the goal)",
        prefix: "sparse guest setup, ",
        suffix: "",
        x_desc: "guest size (GiB)",
        parse: gib,
    },
    Curve {
        name: "fragmentation",
        title: "conversions against islands",
        prefix: "conversions at ",
        suffix: " islands",
        x_desc: "islands",
        parse: count,
    },
    Curve {
        name: "view-vmas",
        title: "host-view VMAs against islands",
        prefix: "view VMAs at ",
        suffix: " islands",
        x_desc: "islands",
        parse: count,
    },
    Curve {
        name: "many-vms",
        title: "aggregate conversion round trips against VMs in one process",
        prefix: "",
        suffix: " VMs, aggregate round trips",
        x_desc: "VMs",
        parse: count,
    },
];

/// `"16 GiB"` or `"1 TiB"` in GiB.
fn gib(s: &str) -> Option<f64> {
    let (n, unit) = s.split_once(' ')?;
    let n: f64 = n.parse().ok()?;
    match unit {
        "GiB" => Some(n),
        "TiB" => Some(n * 1024.0),
        _ => None,
    }
}

/// A plain count, such as `"100000"`.
fn count(s: &str) -> Option<f64> {
    s.parse().ok()
}

/// Series colours, one per subject (gmem solid, raw the same colour, thin).
const COLOURS: [RGBColor; 6] = [
    RGBColor(0x3b, 0x6f, 0xd4),
    RGBColor(0xd4, 0x6a, 0x3b),
    RGBColor(0x2f, 0x9e, 0x44),
    RGBColor(0x8e, 0x44, 0xad),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xc0, 0x39, 0x2b),
];

/// A named line: (x, y) points in x order.
struct Series {
    label: String,
    colour: RGBColor,
    raw: bool,
    points: Vec<(f64, f64)>,
}

fn series_of(curve: &Curve, rows: &[Row]) -> (Vec<Series>, &'static str) {
    let mut out: Vec<Series> = Vec::new();
    let mut unit = "";
    let mut subjects: Vec<&str> = Vec::new();
    for r in rows {
        let Some(mid) = r
            .metric
            .strip_prefix(curve.prefix)
            .and_then(|m| m.strip_suffix(curve.suffix))
        else {
            continue;
        };
        let Some(x) = (curve.parse)(mid) else {
            continue;
        };
        unit = r.unit;
        if !subjects.contains(&r.subject.as_str()) {
            subjects.push(&r.subject);
        }
        let colour = COLOURS[subjects.iter().position(|s| *s == r.subject).unwrap_or(0) % 6];
        for (raw, sample) in [(false, r.gmem), (true, r.raw)] {
            let Some(sample) = sample.filter(|s| s.median > 0.0) else {
                continue;
            };
            let label = format!("{}{}", r.subject, if raw { " (raw)" } else { "" });
            match out.iter_mut().find(|s| s.label == label) {
                Some(s) => s.points.push((x, sample.median)),
                None => out.push(Series {
                    label,
                    colour,
                    raw,
                    points: vec![(x, sample.median)],
                }),
            }
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    (out, unit)
}

/// The curves the report has, as `(name, svg)`; a curve with fewer than two
/// x values is left out.
///
/// # Errors
/// The drawing library's error, as text.
pub fn curves(report: &BenchReport) -> Result<Vec<(&'static str, String)>, String> {
    let mut out = Vec::new();
    for curve in CURVES {
        let (series, unit) = series_of(curve, &report.rows);
        let xs: Vec<f64> = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .collect();
        let ys: Vec<f64> = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .collect();
        let distinct = {
            let mut v = xs.clone();
            v.sort_by(f64::total_cmp);
            v.dedup();
            v.len()
        };
        if distinct < 2 {
            continue;
        }
        out.push((
            curve.name,
            draw(curve, unit, &series, &xs, &ys).map_err(|e| e.to_string())?,
        ));
    }
    Ok(out)
}

fn draw(
    curve: &Curve,
    unit: &str,
    series: &[Series],
    xs: &[f64],
    ys: &[f64],
) -> Result<String, Box<dyn std::error::Error>> {
    let lo = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    let hi = |v: &[f64]| v.iter().copied().fold(f64::MIN, f64::max);
    // Log axes: sizes, islands and VM counts span decades. Padding keeps the
    // end points off the frame.
    let (x0, x1) = (lo(xs).max(0.5) / 1.5, hi(xs) * 1.5);
    let (y0, y1) = (lo(ys).max(1e-3) / 2.0, hi(ys) * 2.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(curve.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(72)
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?;
        chart
            .configure_mesh()
            .x_desc(curve.x_desc)
            .y_desc(unit)
            .draw()?;
        for s in series {
            let width = if s.raw { 1 } else { 2 };
            let style = s.colour.stroke_width(width);
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))?
                .label(&s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            let marker = if s.raw {
                s.colour.stroke_width(1)
            } else {
                s.colour.filled()
            };
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, marker)))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Sample;

    fn row(metric: &str, subject: &str, gmem: f64, raw: Option<f64>) -> Row {
        let s = |v: f64| Sample {
            median: v,
            min: v,
            max: v,
        };
        Row {
            metric: metric.into(),
            subject: subject.into(),
            unit: "µs",
            higher_is_better: false,
            gmem: Some(s(gmem)),
            raw: raw.map(s),
            ratio: None,
            goal: None,
            note: None,
        }
    }

    #[test]
    fn a_curve_is_drawn_from_rows_named_by_their_x() {
        let report = BenchReport {
            size: 64 << 20,
            reps: 1,
            kernel: "test".into(),
            rows: vec![
                row("sparse guest setup, 1 GiB", "memfd", 500.0, Some(600.0)),
                row("sparse guest setup, 1 TiB", "memfd", 900.0, Some(1000.0)),
                row("populate", "memfd", 1.0, None),
            ],
            skipped: vec![],
            host_changes: vec![],
        };
        let charts = curves(&report).unwrap();
        assert_eq!(charts.len(), 1, "only the setup curve has two x values");
        let (name, svg) = &charts[0];
        assert_eq!(*name, "sparse-setup");
        assert!(svg.contains("<svg") && svg.contains("memfd (raw)"));
        assert_eq!(gib("1 TiB"), Some(1024.0));
        assert_eq!(gib("3 PiB"), None);
    }
}
