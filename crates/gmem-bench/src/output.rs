//! Presenting a [`BenchReport`] as text: the table for stdout (the charts are
//! in [`crate::charts`]).

use std::fmt::Write;

use crate::{BenchReport, Sample};

pub(crate) fn num(v: f64) -> String {
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
        "| metric | subject | unit | gmem | raw | ratio | goal | limit | note |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for r in &report.rows {
        let goal = r
            .goal
            .iter()
            .chain(&r.targets)
            .map(|g| format!("{} {}", g.text, if g.met { "✓" } else { "✗ missed" }))
            .collect::<Vec<_>>()
            .join("; ");
        let limit = r.limit.as_ref().map_or(String::new(), |l| {
            let side = |v: Option<f64>| v.map_or("—".to_owned(), num);
            format!("{} / {} ({})", side(l.gmem), side(l.raw), l.text)
        });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.metric,
            r.subject,
            r.unit,
            sample(r.gmem),
            sample(r.raw),
            r.ratio.map_or(String::new(), |x| format!("{x:.2}×")),
            goal,
            limit,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Row;

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
                targets: Vec::new(),
                limit: None,
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
    fn samples_take_the_median() {
        assert_eq!(Sample::of(&[3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Sample::of(&[4.0, 1.0]).median, 2.5);
    }
}
