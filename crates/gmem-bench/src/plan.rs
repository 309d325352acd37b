//! The plan of one benchmark row (what to measure on the gmem side and the
//! raw side, its goal and note), and the timing helpers every measurement
//! uses.

use std::time::{Duration, Instant};

use crate::raw::Subject;
use crate::{BenchError, Goal, Limit};

pub(crate) type Rep = Box<dyn FnMut() -> Result<f64, BenchError>>;

/// Computes a row's [`Limit`] once its reps are done.
pub(crate) type LimitFn = Box<dyn Fn() -> Option<Limit>>;

/// A goal on gmem's own figure (the median), in the row's unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Target {
    /// At least this much.
    AtLeast(f64),
    /// At most this much.
    AtMost(f64),
}

impl Target {
    /// The goal in words, and whether `value` meets it.
    pub(crate) fn check(self, value: f64, unit: &str) -> Goal {
        match self {
            Target::AtLeast(t) => Goal {
                text: format!("≥ {t} {unit}"),
                met: value >= t,
            },
            Target::AtMost(t) => Goal {
                text: format!("≤ {t} {unit}"),
                met: value <= t,
            },
        }
    }
}

/// The base page size the metrics count in.
pub(crate) const PAGE: u64 = 4096;

const GIB: f64 = (1u64 << 30) as f64;

/// One row to measure.
pub(crate) struct Plan {
    pub(crate) metric: String,
    pub(crate) subject: Subject,
    pub(crate) unit: &'static str,
    pub(crate) higher_is_better: bool,
    pub(crate) gmem: Option<Rep>,
    pub(crate) raw: Option<Rep>,
    /// The least ratio the issue tracker asks for.
    pub(crate) goal: Option<f64>,
    /// Goals on gmem's own figure.
    pub(crate) targets: Vec<Target>,
    /// What bounds the row, computed after the reps.
    pub(crate) limit: Option<LimitFn>,
    pub(crate) note: Option<String>,
    /// The least reps, for measurements short and noisy enough to need more.
    pub(crate) min_reps: u32,
    /// The subject's name in the results, where it is not a memory kind.
    pub(crate) label: Option<&'static str>,
}

impl Plan {
    pub(crate) fn new(
        metric: impl Into<String>,
        subject: Subject,
        unit: &'static str,
        higher_is_better: bool,
    ) -> Plan {
        Plan {
            metric: metric.into(),
            subject,
            unit,
            higher_is_better,
            gmem: None,
            raw: None,
            goal: None,
            targets: Vec::new(),
            limit: None,
            note: None,
            min_reps: 0,
            label: None,
        }
    }

    pub(crate) fn label(mut self, label: &'static str) -> Plan {
        self.label = Some(label);
        self
    }

    pub(crate) fn min_reps(mut self, reps: u32) -> Plan {
        self.min_reps = reps;
        self
    }

    pub(crate) fn gmem(mut self, f: impl FnMut() -> Result<f64, BenchError> + 'static) -> Plan {
        self.gmem = Some(Box::new(f));
        self
    }

    pub(crate) fn raw(mut self, f: impl FnMut() -> Result<f64, BenchError> + 'static) -> Plan {
        self.raw = Some(Box::new(f));
        self
    }

    pub(crate) fn goal(mut self, ratio: f64) -> Plan {
        self.goal = Some(ratio);
        self
    }

    pub(crate) fn target(mut self, target: Target) -> Plan {
        self.targets.push(target);
        self
    }

    pub(crate) fn limit(mut self, f: impl Fn() -> Option<Limit> + 'static) -> Plan {
        self.limit = Some(Box::new(f));
        self
    }

    pub(crate) fn note(mut self, note: impl Into<String>) -> Plan {
        let note = note.into();
        self.note = Some(match self.note.take() {
            Some(before) => format!("{before}; {note}"),
            None => note,
        });
        self
    }
}

pub(crate) fn gib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / GIB / d.as_secs_f64().max(1e-9)
}

pub(crate) fn per_s(count: u64, d: Duration) -> f64 {
    count as f64 / d.as_secs_f64().max(1e-9)
}

pub(crate) fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub(crate) fn timed<T>(f: impl FnOnce() -> Result<T, BenchError>) -> Result<Duration, BenchError> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed())
}
