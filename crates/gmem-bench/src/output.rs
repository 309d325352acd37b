//! Presenting a [`BenchReport`]: the table for stdout and the SVG chart.

use std::fmt::Write;

use crate::{BenchReport, Row, Sample};

fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2e}", v)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn sample(s: Option<Sample>) -> String {
    match s {
        Some(s) if s.min == s.max => num(s.median),
        Some(s) => format!("{} [{}–{}]", num(s.median), num(s.min), num(s.max)),
        None => "—".into(),
    }
}

/// The results as a Markdown table (also readable as plain text).
pub fn table(report: &BenchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gmem bench: region {} MiB, median [min–max] of {} reps after one warm-up, kernel {}\n",
        report.size >> 20,
        report.reps,
        report.kernel
    );
    let _ = writeln!(
        out,
        "| metric | subject | unit | gmem | raw | ratio | goal | note |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for r in &report.rows {
        let goal = r.goal.as_ref().map_or(String::new(), |g| {
            format!("{} {}", g.text, if g.met { "✓" } else { "✗ missed" })
        });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.metric,
            r.subject,
            r.unit,
            sample(r.gmem),
            sample(r.raw),
            r.ratio.map_or(String::new(), |x| format!("{x:.2}×")),
            goal,
            r.note.as_deref().unwrap_or("")
        );
    }
    for s in &report.skipped {
        let _ = writeln!(out, "\nnot measured: {s}");
    }
    for c in &report.host_changes {
        let _ = writeln!(out, "\nhost: {c}");
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The results as an SVG chart: one panel per metric, a pair of bars per
/// subject (gmem, and the raw baseline beside it), each panel on its own
/// scale.
pub fn svg(report: &BenchReport) -> String {
    let mut metrics: Vec<&str> = Vec::new();
    for r in report
        .rows
        .iter()
        .filter(|r| r.raw.is_some() || r.gmem.is_some())
    {
        if !metrics.contains(&r.metric.as_str()) && !r.metric.starts_with("metadata") {
            metrics.push(&r.metric);
        }
    }
    const PANEL_W: f64 = 460.0;
    const PANEL_H: f64 = 220.0;
    const COLS: usize = 2;
    let rows_n = metrics.len().div_ceil(COLS);
    let width = PANEL_W * COLS as f64 + 20.0;
    let height = PANEL_H * rows_n as f64 + 60.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="15" font-weight="bold">gmem bench: gmem (blue) beside the raw baseline (grey), region {} MiB, median of {} reps, log scale</text>
"##,
        report.size >> 20,
        report.reps
    );
    for (i, metric) in metrics.iter().enumerate() {
        let x0 = 10.0 + PANEL_W * (i % COLS) as f64;
        let y0 = 40.0 + PANEL_H * (i / COLS) as f64;
        let rows: Vec<&Row> = report.rows.iter().filter(|r| r.metric == *metric).collect();
        let unit = rows.first().map_or("", |r| r.unit);
        let better = if rows.first().is_some_and(|r| r.higher_is_better) {
            "higher is better"
        } else {
            "lower is better"
        };
        // Log scale: the baselines can be 100× the others.
        let values: Vec<f64> = rows
            .iter()
            .flat_map(|r| [r.gmem, r.raw])
            .flatten()
            .map(|s| s.median)
            .filter(|v| *v > 0.0)
            .collect();
        let hi = values.iter().copied().fold(f64::MIN_POSITIVE, f64::max);
        let lo = values.iter().copied().fold(hi, f64::min) / 2.0;
        let span = (hi / lo).ln().max(1e-9);
        let _ = writeln!(
            svg,
            r#"<text x="{x0}" y="{}" font-weight="bold">{} ({}, {better})</text>"#,
            y0 + 12.0,
            escape(metric),
            escape(unit)
        );
        let plot_h = PANEL_H - 70.0;
        let base = y0 + 20.0 + plot_h;
        let slot = (PANEL_W - 30.0) / rows.len().max(1) as f64;
        let bar = (slot / 2.0 - 4.0).min(28.0);
        for (j, r) in rows.iter().enumerate() {
            let sx = x0 + 10.0 + slot * j as f64;
            for (k, (s, color)) in [(r.gmem, "#3b6fd4"), (r.raw, "#9a9a9a")]
                .into_iter()
                .enumerate()
            {
                if let Some(s) = s {
                    let h = plot_h * (s.median.max(lo) / lo).ln() / span;
                    let bx = sx + k as f64 * (bar + 2.0);
                    let _ = writeln!(
                        svg,
                        r#"<rect x="{bx:.1}" y="{:.1}" width="{bar:.1}" height="{h:.1}" fill="{color}"><title>{} {}: {}</title></rect>"#,
                        base - h,
                        escape(&r.subject),
                        if k == 0 { "gmem" } else { "raw" },
                        num(s.median)
                    );
                    let _ = writeln!(
                        svg,
                        r#"<text x="{:.1}" y="{:.1}" font-size="8" text-anchor="middle">{}</text>"#,
                        bx + bar / 2.0,
                        base - h - 2.0,
                        num(s.median)
                    );
                }
            }
            let ratio = r.ratio.map_or(String::new(), |x| format!(" {x:.2}×"));
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}{ratio}</text>"#,
                sx + bar,
                base + 12.0,
                escape(&r.subject)
            );
        }
        let _ = writeln!(
            svg,
            r#"<line x1="{x0}" y1="{base}" x2="{}" y2="{base}" stroke="black"/>"#,
            x0 + PANEL_W - 20.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> BenchReport {
        let s = Sample::of(&[1.0, 2.0, 3.0]);
        BenchReport {
            size: 256 << 20,
            reps: 3,
            kernel: "test".into(),
            rows: vec![Row {
                metric: "populate".into(),
                subject: "memfd".into(),
                unit: "GiB/s",
                higher_is_better: true,
                gmem: Some(s),
                raw: Some(s),
                ratio: Some(1.0),
                goal: None,
                note: Some("a <note>".into()),
            }],
            skipped: vec!["hugetlb-1g: no pages".into()],
            host_changes: Vec::new(),
        }
    }

    #[test]
    fn the_table_has_a_row_per_measurement() {
        let t = table(&report());
        assert!(
            t.contains(
                "| populate | memfd | GiB/s | 2.00 [1.00–3.00] | 2.00 [1.00–3.00] | 1.00× |"
            ),
            "{t}"
        );
        assert!(t.contains("not measured: hugetlb-1g"));
    }

    #[test]
    fn the_svg_is_well_formed_enough() {
        let s = svg(&report());
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<rect").count(), 3, "background and two bars");
        assert!(!s.contains("<note>"));
    }

    #[test]
    fn samples_take_the_median() {
        assert_eq!(Sample::of(&[3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Sample::of(&[4.0, 1.0]).median, 2.5);
    }
}
