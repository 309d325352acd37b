//! # gmem-testkit: what gmem's tests share
//!
//! - [`pool`]: raising the huge page pools a test needs, restored at exit;
//! - [`skip`]: the skip rule. A test that lacks KVM or huge pages prints
//!   `skipped: <reason>` and passes, unless `GMEM_REQUIRE_KVM=1` (or
//!   `GMEM_REQUIRE_HUGETLB=hugetlb-2m,...`) says the host must have them, in
//!   which case it fails.
#![warn(missing_docs)]

pub mod pool;

use std::io::Write;

use gmem::BackingKind;

/// What a skipped test lacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lack {
    /// `/dev/kvm` or guest_memfd.
    Kvm,
    /// Free huge pages of this backing.
    HugePages(BackingKind),
}

/// Whether the environment says this host must have what `lack` names.
pub fn required(lack: Lack) -> bool {
    let (var, name) = match lack {
        Lack::Kvm => ("GMEM_REQUIRE_KVM", "kvm"),
        Lack::HugePages(b) => ("GMEM_REQUIRE_HUGETLB", b.name()),
    };
    std::env::var(var).is_ok_and(|v| v == "1" || v.split(',').any(|x| x.trim() == name))
}

/// Prints `skipped: <reason>` for `test` on stderr (past the test harness's
/// capture), or panics if the host is required to have what was missing.
pub fn skip(test: &str, lack: Lack, reason: &str) {
    assert!(
        !required(lack),
        "{test}: required by the environment, but {reason}"
    );
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {reason}");
}

/// Whether KVM with guest_memfd is here; prints the skip otherwise.
pub fn kvm_or_skip(test: &str) -> bool {
    match gmem::Vm::new() {
        Ok(vm) if vm.has_guest_memfd() => true,
        Ok(_) => {
            skip(test, Lack::Kvm, "this kernel's KVM has no guest_memfd");
            false
        }
        Err(e) => {
            skip(test, Lack::Kvm, &format!("no KVM: {e}"));
            false
        }
    }
}

/// A test machine's RAM on `backing`: `bytes` rounded up to the backing's
/// page size (so one 1 GiB page on hugetlb-1g).
pub fn ram_for(backing: BackingKind, bytes: u64) -> u64 {
    bytes.next_multiple_of(backing.page_size())
}

/// Makes `pages` huge pages of `backing` free (raising the pool as root) and
/// holds that pool's lock; `None`, with the skip printed, if that fails.
/// Returns `Some(None)` for backings without a pool.
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
            skip(test, Lack::HugePages(backing), &why);
            None
        }
    }
}
