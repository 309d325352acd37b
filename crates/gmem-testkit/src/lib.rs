//! # gmem-testkit: what gmem's tests share
//!
//! - [`Need`]: each thing a test may need of the host, named separately
//!   (KVM, guest_memfd, each guest_memfd flag, memory attributes, another
//!   KVM capability, huge pages of a size, root), with what the host lacks;
//! - the skip rule ([`skip`], [`needs`], [`on_backing`]): a test that lacks
//!   something prints `<test>: skipped: <reason>` and passes, unless the
//!   environment says the host must have it ([`required`]), in which case it
//!   fails;
//! - [`log`]: a record of what ran on which backing and what skipped why,
//!   for CI's summary (`GMEM_TEST_LOG`);
//! - [`pool`]: raising the huge page pools a test needs, restored at exit.
//!
//! A test skips only for what it needs: a VMM test on memfd needs KVM and
//! nothing else, so it runs on a host whose KVM has no guest_memfd.
//!
//! ```
//! use gmem::BackingKind;
//! use gmem_testkit::{Need, needs, on_backing};
//!
//! if !needs("doc example", &[Need::Kvm]) {
//!     return; // printed "doc example: skipped: ..." (or failed, if required)
//! }
//! for backing in BackingKind::ALL {
//!     let Some(_held) = on_backing("doc example", backing, 1) else {
//!         continue; // this backing lacks something here; said so
//!     };
//!     // ... the test body on `backing` ...
//! }
//! ```
#![warn(missing_docs)]

pub mod log;
mod need;
pub mod pool;

use std::io::Write;

use gmem::BackingKind;

pub use need::{Need, host_lacks};

/// Whether the environment says this host must have `need`, so that a skip
/// for want of it is a failure.
///
/// `GMEM_REQUIRE` is a comma-separated list of [`Need::name`]s (CI derives
/// it from `gmem probe --json`). The older variables still count:
/// `GMEM_REQUIRE_KVM=1` requires `kvm`, and `GMEM_REQUIRE_HUGETLB=hugetlb-2m[,hugetlb-1g]`
/// those pools. A [`Need::Capability`] or flag is required when its own
/// name is listed.
pub fn required(need: Need) -> bool {
    let listed = |var: &str, name: &str| {
        std::env::var(var).is_ok_and(|v| v.split(',').any(|x| x.trim() == name))
    };
    let name = need.name();
    listed("GMEM_REQUIRE", &name)
        || match need {
            Need::Kvm => std::env::var("GMEM_REQUIRE_KVM").is_ok_and(|v| v == "1"),
            Need::HugePages(_) => listed("GMEM_REQUIRE_HUGETLB", &name),
            _ => false,
        }
}

/// Prints `<test>: skipped: <reason>` on stderr (past the test harness's
/// capture) and records it, or panics if the host is required to have
/// `need` ([`required`]).
pub fn skip(test: &str, need: Need, reason: &str) {
    assert!(
        !required(need),
        "{test}: skipped for want of {}, which the environment requires this host to have: {reason}",
        need.name()
    );
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {reason}");
    log::skipped(test, &need.name(), reason);
}

/// Whether the host has every need of `list`; prints and records the skip
/// for the first it lacks otherwise (a failure if that one is required).
pub fn needs(test: &str, list: &[Need]) -> bool {
    for &need in list {
        if let Some(reason) = host_lacks(need) {
            skip(test, need, &reason);
            return false;
        }
    }
    true
}

/// Whether KVM is here; prints the skip otherwise. Only KVM: a test that
/// needs guest_memfd too says so with [`on_backing`] or [`needs`].
pub fn kvm_or_skip(test: &str) -> bool {
    needs(test, &[Need::Kvm])
}

/// What [`on_backing`] holds while a test runs on a backing: the huge page
/// pool's lock on hugetlb backings.
#[derive(Debug)]
pub struct OnBacking {
    /// The backing.
    pub backing: BackingKind,
    _pool: Option<pool::PoolGuard>,
}

/// Whether `test` can run on `backing` here, with `pages` free pages of it
/// (huge pages are raised as root): checks the backing's needs
/// ([`Need::of_backing`]), records the run, and holds the pool's lock on
/// hugetlb. `None`, with the skip printed, if the host lacks something.
///
/// It checks only the backing: a test that runs guests checks
/// [`Need::Kvm`] too (every backing but guest-memfd is made without KVM).
pub fn on_backing(test: &str, backing: BackingKind, pages: u64) -> Option<OnBacking> {
    if !needs(test, &Need::of_backing(backing)) {
        return None;
    }
    let _pool = if backing.is_hugetlb() {
        let guard = pool::lock(backing.page_size());
        if let Err(why) = pool::ensure_free(backing.page_size(), pages) {
            skip(test, Need::HugePages(backing), &why);
            return None;
        }
        Some(guard)
    } else {
        None
    };
    log::ran(test, backing);
    Some(OnBacking { backing, _pool })
}

/// Makes `pages` huge pages of `backing` free (raising the pool as root) and
/// holds that pool's lock; `None`, with the skip printed, if that fails.
/// Returns `Some(None)` for backings without a pool. Prefer [`on_backing`],
/// which checks every need of the backing and records the run.
pub fn hugepages_or_skip(
    test: &str,
    backing: BackingKind,
    pages: u64,
) -> Option<Option<pool::PoolGuard>> {
    if !backing.is_hugetlb() {
        return Some(None);
    }
    let guard = pool::lock(backing.page_size());
    match pool::ensure_free(backing.page_size(), pages) {
        Ok(()) => Some(Some(guard)),
        Err(why) => {
            skip(test, Need::HugePages(backing), &why);
            None
        }
    }
}

/// A test machine's RAM on `backing`: `bytes` rounded up to the backing's
/// page size (so one 1 GiB page on hugetlb-1g).
pub fn ram_for(backing: BackingKind, bytes: u64) -> u64 {
    bytes.next_multiple_of(backing.page_size())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_names_are_the_ones_ci_lists() {
        assert_eq!(Need::Kvm.name(), "kvm");
        assert_eq!(Need::GuestMemfd.name(), "guest-memfd");
        assert_eq!(
            Need::GuestMemfdFlag(gmem::GmemFlags::MMAP).name(),
            "guest-memfd-mmap"
        );
        assert_eq!(
            Need::GuestMemfdFlag(gmem::GmemFlags::INIT_SHARED).name(),
            "guest-memfd-init-shared"
        );
        assert_eq!(Need::MemoryAttributes.name(), "memory-attributes");
        assert_eq!(Need::HugePages(BackingKind::Hugetlb2M).name(), "hugetlb-2m");
        assert_eq!(Need::Root.name(), "root");
        assert_eq!(Need::Capability("pre-fault").name(), "pre-fault");
    }

    #[test]
    fn a_backing_needs_only_its_own_things() {
        assert!(Need::of_backing(BackingKind::Memfd).is_empty());
        assert_eq!(
            Need::of_backing(BackingKind::Hugetlb1G),
            vec![Need::HugePages(BackingKind::Hugetlb1G)]
        );
        let gmem = Need::of_backing(BackingKind::GuestMemfd);
        assert_eq!(gmem[..2], [Need::Kvm, Need::GuestMemfd]);
        assert_eq!(gmem.len(), 4, "{gmem:?}");
    }
}
