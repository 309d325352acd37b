//! # gmem-bench: gmem measured against the raw kernel and plain memory
//!
//! Every metric runs for every backing available and for two plain-memory
//! baselines (anonymous memory, and anonymous memory with `MADV_HUGEPAGE`),
//! and every gmem measurement has a **raw baseline** in the same run: the
//! same work with direct system calls and KVM ioctls, no gmem layer
//! ([`raw`]). Each measurement runs one warm-up rep that is thrown away (this
//! machine returns idle memory to its host, so first touches are slow), then
//! `reps` reps, reported as median, min and max.
//!
//! Ratios are "gmem relative to raw, higher is better": for throughputs
//! gmem ÷ raw, for latencies raw ÷ gmem.
#![warn(missing_docs)]

pub mod charts;
mod guest;
mod host_access;
mod metrics;
pub mod output;
mod plan;
pub mod processes;
pub mod raw;
mod runner;
mod scale;
mod virtio_io;

use gmem::BackingKind;
use thiserror::Error;

pub use raw::Subject;

/// Why a benchmark could not run.
#[derive(Debug, Error)]
pub enum BenchError {
    /// gmem refused something.
    #[error(transparent)]
    Gmem(#[from] gmem::Error),
    /// The VMM failed.
    #[error(transparent)]
    Vmm(#[from] gmem_vmm::VmmError),
    /// A system call failed.
    #[error("system call failed")]
    Os(#[from] std::io::Error),
    /// A guest did something unexpected.
    #[error("guest: {0}")]
    Guest(String),
    /// A payload did not assemble.
    #[error("assembling a payload")]
    Asm(#[from] iced_x86::IcedError),
    /// The options break a rule.
    #[error("{0}")]
    Invalid(String),
}

impl From<rustix::io::Errno> for BenchError {
    fn from(e: rustix::io::Errno) -> Self {
        BenchError::Os(e.into())
    }
}

macro_rules! from_gmem {
    ($($t:ty),*) => {
        $(impl From<$t> for BenchError {
            fn from(e: $t) -> Self {
                BenchError::Gmem(e.into())
            }
        })*
    };
}
from_gmem!(
    gmem::BackingError,
    gmem::BindError,
    gmem::RangeError,
    gmem::KvmError,
    gmem::GateError,
    gmem::ConvertError
);

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// The backings to measure (the baselines always run).
    pub backings: Vec<BackingKind>,
    /// The region size in bytes (rounded up to 1 GiB on hugetlb-1g).
    pub size: u64,
    /// Measured reps per measurement, after one warm-up rep.
    pub reps: u32,
    /// Only the rows whose metric contains one of these (all if empty).
    pub only: Vec<String>,
    /// A quick subset: one row of each family (about a minute).
    pub quick: bool,
    /// How to start one VM worker process ([`processes::worker`]): the
    /// program and its arguments, to which the round-trip count is
    /// appended. Without it the across-processes rows are skipped.
    pub worker: Option<Vec<std::ffi::OsString>>,
}

impl BenchOptions {
    /// Checks the options.
    ///
    /// # Errors
    /// [`BenchError::Invalid`] for a size that is not a positive multiple of
    /// 2 MiB or below 4 MiB, or zero reps.
    pub fn validate(&self) -> Result<(), BenchError> {
        if self.size < 4 << 20 || !self.size.is_multiple_of(2 << 20) {
            return Err(BenchError::Invalid(format!(
                "--size {:#x} must be a multiple of 2 MiB and at least 4 MiB",
                self.size
            )));
        }
        if self.reps == 0 {
            return Err(BenchError::Invalid("--reps must be at least 1".into()));
        }
        Ok(())
    }
}

/// Median, min and max of the reps, in the row's unit.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Sample {
    /// The median.
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

impl Sample {
    /// Summarises `values` (at least one).
    pub fn of(values: &[f64]) -> Sample {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Sample {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// A goal a row is held to.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Goal {
    /// The goal, in words ("≥ 0.95× raw").
    pub text: String,
    /// Whether this run met it.
    pub met: bool,
}

/// One line of the results.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Row {
    /// The metric.
    pub metric: String,
    /// The backing or baseline.
    pub subject: String,
    /// The unit of the samples.
    pub unit: &'static str,
    /// Whether more is better.
    pub higher_is_better: bool,
    /// gmem's figures (absent for the plain-memory baselines).
    pub gmem: Option<Sample>,
    /// The raw baseline's figures.
    pub raw: Option<Sample>,
    /// gmem relative to raw (higher is better).
    pub ratio: Option<f64>,
    /// The goal, where the issue tracker set one.
    pub goal: Option<Goal>,
    /// Goals on gmem's own figure rather than on the ratio ("≥ 1024
    /// MiB/s"), where the issue tracker set them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<Goal>,
    /// What bounds the row, where the bench measures it (the virtio rows:
    /// their exits at the measured cost of one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    /// What to know when reading the row.
    pub note: Option<String>,
}

/// The most a row could reach when one cost alone were paid, measured in
/// the same run: for the virtio rows, the figure if the path cost nothing
/// but its exits (exits per MiB × the cost of one exit).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Limit {
    /// What the limit counts, in words.
    pub text: String,
    /// gmem's limit, in the row's unit (median over the reps).
    pub gmem: Option<f64>,
    /// The raw baseline's limit, in the row's unit.
    pub raw: Option<f64>,
    /// gmem's side: exits per MiB moved (median).
    pub gmem_exits_per_mib: Option<f64>,
    /// The raw side: exits per MiB moved.
    pub raw_exits_per_mib: Option<f64>,
    /// gmem's side: the measured cost of one exit, in µs (median).
    pub gmem_exit_us: Option<f64>,
    /// The raw side: the measured cost of one exit, in µs.
    pub raw_exit_us: Option<f64>,
}

/// A whole run's results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    /// The region size used.
    pub size: u64,
    /// Measured reps per measurement.
    pub reps: u32,
    /// The kernel release.
    pub kernel: String,
    /// The rows, by metric then subject.
    pub rows: Vec<Row>,
    /// Subjects or metrics not measured, and why.
    pub skipped: Vec<String>,
    /// What the run did to the host, such as raising a huge page pool.
    pub host_changes: Vec<String>,
}

/// Runs every measurement. `progress(done, total, label)` is called before
/// each rep.
///
/// # Errors
/// [`BenchError::Invalid`] for bad options; the first failure of a
/// measurement otherwise.
pub fn run(
    opts: &BenchOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<BenchReport, BenchError> {
    opts.validate()?;
    runner::run_all(opts, progress)
}
