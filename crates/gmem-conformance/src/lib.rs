//! # gmem-conformance: the conformance suite
//!
//! The checks of the upstream guest_memfd selftests (`guest_memfd_test.c`,
//! `set_memory_region_test.c`, the private-memory tests and
//! `pre_fault_memory_test.c`; catalogue and T-numbers in
//! `spec/guest_memfd-6.18.md` §6), ported to gmem's API and run on every
//! backing, plus gmem's own checks (G-numbers) for what the issue tracker asks
//! of every backing beyond the selftests.
//!
//! Each check runs for one [`BackingKind`] and creation-flag set, and ends
//! [`Outcome::Pass`], [`Outcome::Fail`], or [`Outcome::Skip`] with the reason
//! (and what was missing, so CI can refuse skips it does not accept). The same
//! checks run under `cargo test` (one test per check, backing and flag set)
//! and under `gmem selftest`.
#![warn(missing_docs)]

mod checks;
mod env;
mod probe_access;
mod raw;

use std::fmt;

use gmem::{BackingKind, GmemFlags};

pub use env::Env;

/// Why a check skipped: something the host lacks (named as the test kit
/// names it, so CI can refuse a skip for what the host has), or nothing at
/// all when the check does not apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Something this host lacks: KVM, guest_memfd or one of its flags,
    /// memory attributes, another capability, huge pages.
    Host(gmem_testkit::Need),
    /// Nothing: the check does not apply to this backing or flag set.
    NotApplicable,
}

impl Need {
    /// The name the test log records: the host need's, or `n/a`.
    pub fn name(&self) -> String {
        match self {
            Need::Host(need) => need.name(),
            Need::NotApplicable => "n/a".to_owned(),
        }
    }
}

/// How a check ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every expectation held.
    Pass,
    /// An expectation failed; the message says which and what was seen.
    Fail(String),
    /// The check could not run here, or does not apply.
    Skip(Need, String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Pass => f.write_str("ok"),
            Outcome::Fail(m) => write!(f, "FAILED: {m}"),
            Outcome::Skip(_, reason) => write!(f, "skipped: {reason}"),
        }
    }
}

/// Which flag sets a check runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variants {
    /// Once, with `MMAP|INIT_SHARED`.
    Once,
    /// With flags 0, `MMAP` and `MMAP|INIT_SHARED`, as upstream runs T2–T12.
    PerFlags,
}

/// The flag sets of [`Variants::PerFlags`].
pub const FLAG_SETS: [GmemFlags; 3] = [
    GmemFlags::empty(),
    GmemFlags::MMAP,
    GmemFlags::MMAP.union(GmemFlags::INIT_SHARED),
];

/// One check of the suite.
#[derive(Clone, Copy)]
pub struct Check {
    /// The catalogue number: `T1`…`T20` upstream, `G1`… gmem's own.
    pub id: &'static str,
    /// A short name (the upstream function's, where there is one).
    pub name: &'static str,
    /// Which flag sets it runs with.
    pub variants: Variants,
    run: fn(&Env) -> Result<(), Stop>,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.id, self.name)
    }
}

/// Why a check stopped early.
#[derive(Debug)]
pub(crate) enum Stop {
    Fail(String),
    Skip(Need, String),
}

impl<E: std::error::Error> From<E> for Stop {
    fn from(e: E) -> Self {
        let mut msg = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        Stop::Fail(format!("unexpected error: {msg}"))
    }
}

/// Fails the check unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::Stop::Fail(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;

/// Skips the check.
macro_rules! skip {
    ($need:expr, $($fmt:tt)+) => {
        return Err($crate::Stop::Skip($need, format!($($fmt)+)))
    };
}
pub(crate) use skip;

/// Every check, in catalogue order.
pub fn checks() -> &'static [Check] {
    checks::ALL
}

/// Finds a check by id (`"T5"`, `"G1"`).
pub fn check(id: &str) -> Option<&'static Check> {
    checks::ALL.iter().find(|c| c.id.eq_ignore_ascii_case(id))
}

/// The flag sets `check` runs with.
pub fn flag_sets(check: &Check) -> &'static [GmemFlags] {
    match check.variants {
        Variants::Once => &FLAG_SETS[2..],
        Variants::PerFlags => &FLAG_SETS,
    }
}

/// Runs one check on one backing with one flag set.
pub fn run(check: &Check, backing: BackingKind, flags: GmemFlags) -> Outcome {
    let env = match Env::new(backing, flags) {
        Ok(env) => env,
        Err(Stop::Skip(need, why)) => return Outcome::Skip(need, why),
        Err(Stop::Fail(why)) => return Outcome::Fail(why),
    };
    match (check.run)(&env) {
        Ok(()) => Outcome::Pass,
        Err(Stop::Fail(why)) => Outcome::Fail(why),
        Err(Stop::Skip(need, why)) => Outcome::Skip(need, why),
    }
}

/// A check's display name for one run: `T5 mmap_supported [memfd, flags 0x3]`.
pub fn label(check: &Check, backing: BackingKind, flags: GmemFlags) -> String {
    format!(
        "{} {} [{backing}, flags {:#x}]",
        check.id,
        check.name,
        flags.bits()
    )
}
