//! The results as SVG charts, drawn with `plotters`:
//! - [`bars`]: one panel per metric, gmem's bar beside the raw baseline's
//!   for each subject, on a log scale;
//! - [`curves`]: the scale curves as line charts: setup time against guest
//!   size, conversions and view VMAs against the number of islands, the
//!   aggregate round-trip rate against the number of VMs (in one process
//!   and a process each), and virtio-blk throughput and exits per MiB
//!   against the request size (these rows keep their bars too, with their
//!   ratios and their limits in red).
//!
//! Both are read back from the report's rows (the curves' metric names
//! carry the x value), so a chart always shows the run its table shows.

use plotters::prelude::*;

use crate::{BenchReport, Row};

/// One chart of curves.
struct Curve {
    /// The file name's tail: `<stem>-<name>.svg`.
    name: &'static str,
    title: &'static str,
    /// The row families drawn, one line (per subject and side) each.
    lines: &'static [Line],
    x_desc: &'static str,
    /// Parses the x value out of the metric's middle.
    parse: fn(&str) -> Option<f64>,
    /// Whether its rows keep their bar panels too (with their ratios and
    /// limits), rather than appearing here alone.
    bars_too: bool,
}

/// One row family: the rows whose metric is `prefix` + x + `suffix`,
/// labelled with `tag` after the subject.
struct Line {
    prefix: &'static str,
    suffix: &'static str,
    tag: &'static str,
}

impl Line {
    const fn new(prefix: &'static str, suffix: &'static str) -> Line {
        Line {
            prefix,
            suffix,
            tag: "",
        }
    }

    /// The x text of `metric` if it belongs to this family.
    fn x_of<'m>(&self, metric: &'m str) -> Option<&'m str> {
        metric.strip_prefix(self.prefix)?.strip_suffix(self.suffix)
    }
}

const CURVES: &[Curve] = &[
    Curve {
        name: "sparse-setup",
        title: "sparse guest setup against guest size (flat is the goal)",
        lines: &[Line::new("sparse guest setup, ", "")],
        x_desc: "guest size (GiB)",
        parse: gib,
        bars_too: false,
    },
    Curve {
        name: "fragmentation",
        title: "conversions against islands",
        lines: &[Line::new("conversions at ", " islands")],
        x_desc: "islands",
        parse: count,
        bars_too: false,
    },
    Curve {
        name: "view-vmas",
        title: "host-view VMAs against islands",
        lines: &[Line::new("view VMAs at ", " islands")],
        x_desc: "islands",
        parse: count,
        bars_too: false,
    },
    Curve {
        name: "many-vms",
        title: "aggregate conversion round trips against VMs",
        lines: &[
            Line {
                prefix: "",
                suffix: " VMs, aggregate round trips",
                tag: ", one process",
            },
            Line {
                prefix: "",
                suffix: " VM processes, aggregate round trips",
                tag: ", a process per VM",
            },
        ],
        x_desc: "VMs",
        parse: count,
        bars_too: false,
    },
    Curve {
        name: "virtio-read",
        title: "virtio-blk sequential reads against request size",
        lines: &[
            Line::new("virtio-blk sequential read, ", " requests"),
            Line {
                prefix: "virtio-blk sequential read, ",
                suffix: " requests, bounced",
                tag: ", bounced",
            },
            Line {
                prefix: "virtio-blk sequential read, ",
                suffix: " requests, 16 in flight",
                tag: ", 16 in flight",
            },
        ],
        x_desc: "request size (KiB)",
        parse: kib,
        bars_too: true,
    },
    Curve {
        name: "virtio-write",
        title: "virtio-blk sequential writes against request size",
        lines: &[
            Line::new("virtio-blk sequential write, ", " requests"),
            Line {
                prefix: "virtio-blk sequential write, ",
                suffix: " requests, bounced",
                tag: ", bounced",
            },
            Line {
                prefix: "virtio-blk sequential write, ",
                suffix: " requests, 16 in flight",
                tag: ", 16 in flight",
            },
        ],
        x_desc: "request size (KiB)",
        parse: kib,
        bars_too: true,
    },
    Curve {
        name: "virtio-exits",
        title: "virtio-blk exits per MiB against request size",
        lines: &[Line::new("virtio-blk exits per MiB, ", " sequential reads")],
        x_desc: "request size (KiB)",
        parse: kib,
        bars_too: true,
    },
];

/// `"4 KiB"` or `"1 MiB"` in KiB.
fn kib(s: &str) -> Option<f64> {
    let (n, unit) = s.split_once(' ')?;
    let n: f64 = n.parse().ok()?;
    match unit {
        "KiB" => Some(n),
        "MiB" => Some(n * 1024.0),
        _ => None,
    }
}

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
    let mut subjects: Vec<String> = Vec::new();
    for r in rows {
        let Some((line, mid)) = curve
            .lines
            .iter()
            .find_map(|l| l.x_of(&r.metric).map(|mid| (l, mid)))
        else {
            continue;
        };
        let Some(x) = (curve.parse)(mid) else {
            continue;
        };
        unit = r.unit;
        // One colour per subject and family; raw lines share it, thinner.
        let key = format!("{}{}", r.subject, line.tag);
        let colour = match subjects.iter().position(|s| *s == key) {
            Some(i) => COLOURS[i % COLOURS.len()],
            None => {
                subjects.push(key);
                COLOURS[(subjects.len() - 1) % COLOURS.len()]
            }
        };
        for (raw, sample) in [(false, r.gmem), (true, r.raw)] {
            let Some(sample) = sample.filter(|s| s.median > 0.0) else {
                continue;
            };
            let label = format!(
                "{}{}{}",
                r.subject,
                line.tag,
                if raw { " (raw)" } else { "" }
            );
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

/// gmem's bars and the raw baseline's.
const GMEM_BAR: RGBColor = RGBColor(0x3b, 0x6f, 0xd4);
const RAW_BAR: RGBColor = RGBColor(0x9a, 0x9a, 0x9a);
/// A row's limit, drawn over its bars.
const LIMIT_LINE: RGBColor = RGBColor(0xc0, 0x39, 0x2b);

/// The metrics the bar chart shows: every measured one except the
/// metadata rows and the rows the curves draw.
fn bar_metrics(rows: &[Row]) -> Vec<&str> {
    let mut metrics: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.raw.is_some() || r.gmem.is_some()) {
        let in_curve = CURVES
            .iter()
            .filter(|c| !c.bars_too)
            .flat_map(|c| c.lines)
            .any(|l| l.x_of(&r.metric).is_some());
        if !in_curve && !r.metric.starts_with("metadata") && !metrics.contains(&r.metric.as_str()) {
            metrics.push(&r.metric);
        }
    }
    metrics
}

/// The results as one SVG: a panel per metric (two columns), a pair of bars
/// per subject (gmem, then the raw baseline), each panel on its own log
/// scale, the ratio under each subject.
///
/// # Errors
/// The drawing library's error, as text.
pub fn bars(report: &BenchReport) -> Result<String, String> {
    draw_bars(report).map_err(|e| e.to_string())
}

fn draw_bars(report: &BenchReport) -> Result<String, Box<dyn std::error::Error>> {
    const PANEL: (u32, u32) = (480, 230);
    const COLS: usize = 2;
    const HEADER: u32 = 36;
    let metrics = bar_metrics(&report.rows);
    let grid_rows = metrics.len().div_ceil(COLS).max(1);
    let size = (PANEL.0 * COLS as u32, PANEL.1 * grid_rows as u32 + HEADER);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        let (header, body) = root.split_vertically(HEADER);
        header.draw(&Text::new(
            format!(
                "gmem bench: gmem (blue) beside the raw baseline (grey), limits in red, region {} MiB, median of {} reps, log scales",
                report.size >> 20,
                report.reps
            ),
            (10, 10),
            ("sans-serif", 15).into_font().style(FontStyle::Bold),
        ))?;
        let panels = body.split_evenly((grid_rows, COLS));
        for (metric, area) in metrics.iter().zip(panels.iter()) {
            let rows: Vec<&Row> = report.rows.iter().filter(|r| r.metric == *metric).collect();
            bar_panel(area, metric, &rows)?;
        }
        root.present()?;
    }
    Ok(svg)
}

fn bar_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    metric: &str,
    rows: &[&Row],
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let unit = rows.first().map_or("", |r| r.unit);
    let better = if rows.first().is_some_and(|r| r.higher_is_better) {
        "higher is better"
    } else {
        "lower is better"
    };
    let limits = |r: &Row| r.limit.as_ref().map_or([None, None], |l| [l.gmem, l.raw]);
    let values: Vec<f64> = rows
        .iter()
        .flat_map(|r| [r.gmem, r.raw])
        .flatten()
        .map(|s| s.median)
        .chain(rows.iter().flat_map(|r| limits(r)).flatten())
        .filter(|v| *v > 0.0)
        .collect();
    let hi = values.iter().copied().fold(f64::MIN_POSITIVE, f64::max) * 1.5;
    let lo = values.iter().copied().fold(hi, f64::min) / 2.0;
    let n = rows.len().max(1) as u32;
    let labels: Vec<String> = rows
        .iter()
        .map(|r| match r.ratio {
            Some(x) => format!("{} {x:.2}×", r.subject),
            None => r.subject.clone(),
        })
        .collect();
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{metric} ({unit}, {better})"),
            ("sans-serif", 12).into_font().style(FontStyle::Bold),
        )
        .margin(8)
        .x_label_area_size(22)
        .y_label_area_size(52)
        // Segments 0..=n-1: one per subject.
        // (At least two segments: a range of one point maps nothing.)
        .build_cartesian_2d(
            (0u32..(n - 1).max(1)).into_segmented(),
            (lo..hi).log_scale(),
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_labels(6)
        .y_label_formatter(&|v| crate::output::num(*v))
        .label_style(("sans-serif", 8))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    for (j, r) in rows.iter().enumerate() {
        let j = j as u32;
        let halves = [
            (
                r.gmem,
                GMEM_BAR,
                SegmentValue::Exact(j),
                SegmentValue::CenterOf(j),
            ),
            (
                r.raw,
                RAW_BAR,
                SegmentValue::CenterOf(j),
                SegmentValue::Exact(j + 1),
            ),
        ];
        // The limit (where the row has one): a red line over each bar.
        let [gmem_limit, raw_limit] = limits(r);
        for (limit, left, right) in [
            (
                gmem_limit,
                SegmentValue::Exact(j),
                SegmentValue::CenterOf(j),
            ),
            (
                raw_limit,
                SegmentValue::CenterOf(j),
                SegmentValue::Exact(j + 1),
            ),
        ] {
            let Some(l) = limit.filter(|l| *l > 0.0) else {
                continue;
            };
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(left.clone(), l), (right, l)],
                LIMIT_LINE.stroke_width(2),
            )))?;
            let label = EmptyElement::at((left, l))
                + Text::new(
                    format!("limit {}", crate::output::num(l)),
                    (4, -10),
                    ("sans-serif", 8).into_font().color(&LIMIT_LINE),
                );
            chart.draw_series(std::iter::once(label))?;
        }
        for (sample, colour, left, right) in halves {
            let Some(s) = sample.filter(|s| s.median > 0.0) else {
                continue;
            };
            let mut bar = Rectangle::new([(left.clone(), lo), (right, s.median)], colour.filled());
            bar.set_margin(0, 0, 3, 3);
            chart.draw_series(std::iter::once(bar))?;
            // The value just above the bar's left edge.
            let value = EmptyElement::at((left, s.median))
                + Text::new(crate::output::num(s.median), (4, -10), ("sans-serif", 8));
            chart.draw_series(std::iter::once(value))?;
        }
    }
    Ok(())
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
            targets: Vec::new(),
            limit: None,
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
        let chart = bars(&report).unwrap();
        assert!(chart.contains("<svg") && chart.contains("populate"));
        assert!(
            !chart.contains("sparse guest setup"),
            "curve rows are in the curves, not the bars"
        );
        assert_eq!(gib("3 PiB"), None);
    }

    #[test]
    fn virtio_rows_have_their_curves_and_keep_their_bars_and_limits() {
        let read = |metric: &str, v: f64| {
            let mut r = row(metric, "memfd", v, Some(v * 1.1));
            r.limit = Some(crate::Limit {
                text: "exits".into(),
                gmem: Some(v * 3.0),
                raw: Some(v * 3.0),
                gmem_exits_per_mib: Some(1.0),
                raw_exits_per_mib: Some(1.0),
                gmem_exit_us: Some(17.0),
                raw_exit_us: Some(17.0),
            });
            r
        };
        let report = BenchReport {
            size: 64 << 20,
            reps: 1,
            kernel: "test".into(),
            rows: vec![
                read("virtio-blk sequential read, 4 KiB requests", 100.0),
                read("virtio-blk sequential read, 1 MiB requests", 8000.0),
                read("virtio-blk sequential read, 4 KiB requests, bounced", 90.0),
                read(
                    "virtio-blk sequential read, 1 MiB requests, bounced",
                    4000.0,
                ),
            ],
            skipped: vec![],
            host_changes: vec![],
        };
        let charts = curves(&report).unwrap();
        let names: Vec<_> = charts.iter().map(|c| c.0).collect();
        assert_eq!(names, ["virtio-read"]);
        assert!(charts[0].1.contains("memfd, bounced (raw)"), "both lines");
        let bars = bars(&report).unwrap();
        assert!(bars.contains("virtio-blk sequential read, 1 MiB requests, bounced"));
        assert!(
            bars.contains("#C0392B") || bars.contains("#c0392b"),
            "limit lines"
        );
        assert_eq!(kib("1 MiB"), Some(1024.0));
        assert_eq!(kib("64 KiB"), Some(64.0));
    }
}
