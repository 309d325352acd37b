//! The environment one check runs in: the backing, the flags, a VM when KVM
//! is here, and the huge page pool lock for hugetlb backings.

use std::sync::Arc;

use gmem::{
    BackingError, BackingKind, GmemFlags, MemoryOptions, RestrictedMemory, Vm, create_memory,
};

use crate::{Need, Stop, skip};
use gmem_testkit::pool::{self, PoolGuard};
use gmem_testkit::{Need as HostNeed, host_lacks};

/// Where a check runs.
pub struct Env {
    /// The backing under test.
    pub backing: BackingKind,
    /// The creation flags under test.
    pub flags: GmemFlags,
    vm: Option<Vm>,
    _pool: Option<PoolGuard>,
}

/// Errors that carry the kernel's errno for the same misuse.
pub(crate) trait Errno {
    fn errno(&self) -> i32;
}

impl Errno for BackingError {
    fn errno(&self) -> i32 {
        BackingError::errno(self)
    }
}

impl Errno for gmem::BindError {
    fn errno(&self) -> i32 {
        gmem::BindError::errno(self)
    }
}

impl Errno for gmem::Error {
    fn errno(&self) -> i32 {
        gmem::Error::errno(self)
    }
}

impl Errno for gmem::RangeError {
    fn errno(&self) -> i32 {
        gmem::RangeError::errno(self)
    }
}

/// Expects `result` to fail with `errno`; `what` names the call.
pub(crate) fn expect_errno<T, E: Errno + std::fmt::Display>(
    result: Result<T, E>,
    errno: i32,
    what: &str,
) -> Result<(), Stop> {
    match result {
        Ok(_) => Err(Stop::Fail(format!(
            "{what}: succeeded, expected errno {errno}"
        ))),
        Err(e) if e.errno() == errno => Ok(()),
        Err(e) => Err(Stop::Fail(format!(
            "{what}: errno {} ({e}), expected {errno}",
            e.errno()
        ))),
    }
}

impl Env {
    /// Sets up `backing` with `flags`: a VM if KVM is here (required for
    /// guest-memfd), the pool lock and a few free pages for hugetlb.
    pub(crate) fn new(backing: BackingKind, flags: GmemFlags) -> Result<Env, Stop> {
        // What the backing needs, and each flag under test on guest_memfd:
        // a skip names exactly what this host lacks.
        let mut needs = gmem_testkit::Need::of_backing(backing);
        if backing == BackingKind::GuestMemfd {
            needs.retain(|n| !matches!(n, HostNeed::GuestMemfdFlag(_)));
            needs.extend(flags.iter().map(HostNeed::GuestMemfdFlag));
        }
        for need in needs {
            if matches!(need, HostNeed::HugePages(_)) {
                continue; // counted below, with the pages this check needs
            }
            if let Some(why) = host_lacks(need) {
                skip!(Need::Host(need), "{why}");
            }
        }
        let _pool = if backing.is_hugetlb() {
            let guard = pool::lock(backing.page_size());
            let pages = if backing == BackingKind::Hugetlb1G {
                1
            } else {
                4
            };
            if let Err(why) = pool::ensure_free(backing.page_size(), pages) {
                skip!(Need::Host(HostNeed::HugePages(backing)), "{backing}: {why}");
            }
            Some(guard)
        } else {
            None
        };
        Ok(Env {
            backing,
            flags,
            vm: Vm::new().ok(),
            _pool,
        })
    }

    /// The backing's page size.
    pub(crate) fn unit(&self) -> u64 {
        self.backing.page_size()
    }

    /// The size of the suite's standard file: 4 backing pages (upstream's
    /// `page_size * 4`), 1 page on hugetlb-1g, where 4 GiB is too much to ask.
    pub(crate) fn file_size(&self) -> u64 {
        if self.backing == BackingKind::Hugetlb1G {
            self.unit()
        } else {
            4 * self.unit()
        }
    }

    /// Asks for `pages` free huge pages (no-op on other backings).
    pub(crate) fn need_pages(&self, pages: u64) -> Result<(), Stop> {
        if self.backing.is_hugetlb()
            && let Err(why) = pool::ensure_free(self.unit(), pages)
        {
            skip!(
                Need::Host(HostNeed::HugePages(self.backing)),
                "{}: {why}",
                self.backing
            );
        }
        Ok(())
    }

    pub(crate) fn is_gmem(&self) -> bool {
        self.backing == BackingKind::GuestMemfd
    }

    /// The env's VM; skips without KVM.
    pub(crate) fn vm(&self) -> Result<&Vm, Stop> {
        match &self.vm {
            Some(vm) => Ok(vm),
            None => skip!(
                Need::Host(HostNeed::Kvm),
                "{}",
                host_lacks(HostNeed::Kvm).unwrap_or_else(|| "needs /dev/kvm".into())
            ),
        }
    }

    /// A second VM; skips without KVM.
    pub(crate) fn new_vm(&self) -> Result<Vm, Stop> {
        match Vm::new() {
            Ok(vm) => Ok(vm),
            Err(e) => skip!(Need::Host(HostNeed::Kvm), "needs /dev/kvm: {e}"),
        }
    }

    /// Skips unless the env's flags contain `flags`, or (with `exact`) equal them.
    pub(crate) fn require_flags(&self, flags: GmemFlags, exact: bool) -> Result<(), Stop> {
        let ok = if exact {
            self.flags == flags
        } else {
            self.flags.contains(flags)
        };
        if !ok {
            skip!(
                Need::NotApplicable,
                "runs with flags {}{:#x}, not {:#x}",
                if exact { "" } else { "containing " },
                flags.bits(),
                self.flags.bits()
            );
        }
        Ok(())
    }

    /// Creates a file of `size` bytes with the env's flags, for the env's VM.
    pub(crate) fn create(&self, size: u64) -> Result<Arc<dyn RestrictedMemory>, BackingError> {
        self.create_with(size, self.flags)
    }

    /// Creates a file of `size` bytes with `flags`, for the env's VM.
    pub(crate) fn create_with(
        &self,
        size: u64,
        flags: GmemFlags,
    ) -> Result<Arc<dyn RestrictedMemory>, BackingError> {
        create_memory(
            MemoryOptions::new(self.backing, size).with_flags(flags),
            self.vm.as_ref(),
        )
    }

    /// Creates a file for `vm`.
    pub(crate) fn create_for(
        &self,
        vm: &Vm,
        size: u64,
    ) -> Result<Arc<dyn RestrictedMemory>, BackingError> {
        create_memory(
            MemoryOptions::new(self.backing, size).with_flags(self.flags),
            Some(vm),
        )
    }
}
