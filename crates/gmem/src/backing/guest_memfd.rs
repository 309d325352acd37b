//! The kernel's guest_memfd (`KVM_CREATE_GUEST_MEMFD`, Linux 6.8+; `MMAP` and
//! `INIT_SHARED` since 6.18). The kernel enforces everything here; gmem checks
//! the same rules first so that errors name their values, and reports the
//! kernel's errno for anything it refuses on top.

use std::ops::Range;
use std::os::fd::{FromRawFd, OwnedFd};

use kvm_bindings::kvm_create_guest_memfd;

use super::file::{FileCore, cached_runs};
use super::{BackingError, BackingKind, GmemFlags, RestrictedMemory, sealed, validate_create};
use crate::kvm::Vm;
use crate::range::PAGE_SIZE;

/// A guest_memfd file. It belongs to the VM it was created on, and keeps
/// that VM alive in the kernel (spec §2.8).
#[derive(Debug)]
pub struct GuestMemfd {
    core: FileCore,
}

impl GuestMemfd {
    /// `KVM_CREATE_GUEST_MEMFD` on `vm` (spec §2.1).
    ///
    /// With `MMAP` the file is also mapped for KVM's `userspace_addr`.
    ///
    /// # Errors
    /// - [`BackingError::NoGuestMemfd`] (`ENOTTY`) if KVM lacks guest_memfd;
    /// - [`BackingError::UnsupportedFlags`] (`EINVAL`) for flags outside the
    ///   VM's `KVM_CAP_GUEST_MEMFD_FLAGS`, naming both;
    /// - [`BackingError::InvalidSize`] (`EINVAL`) for a size that is 0,
    ///   unaligned or above `i64::MAX`;
    /// - [`BackingError::Syscall`] with the kernel's errno otherwise.
    pub fn create(vm: &Vm, size: u64, flags: GmemFlags) -> Result<GuestMemfd, BackingError> {
        GuestMemfd::check_create(vm, size, flags)?;
        let request = kvm_create_guest_memfd {
            size,
            flags: flags.bits(),
            reserved: [0; 6],
        };
        let fd = vm
            .fd()
            .create_guest_memfd(request)
            // SAFETY: on success the ioctl returned a new fd that nothing else
            // owns; it is owned from this expression on.
            .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) })
            .map_err(|e| GuestMemfd::create_error(vm, &request, e))?;
        // The kernel installs the fd without O_CLOEXEC (spec §2); gmem's fds
        // do not leak into exec'd programs.
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)
            .map_err(|e| BackingError::syscall("fcntl(F_SETFD, FD_CLOEXEC)", e))?;
        Ok(GuestMemfd {
            core: FileCore::new(fd, BackingKind::GuestMemfd, size, flags, Some(vm.id()))?,
        })
    }

    /// The rules `KVM_CREATE_GUEST_MEMFD` checks, in the kernel's order:
    /// that the VM has guest_memfd at all, then flags, then size.
    fn check_create(vm: &Vm, size: u64, flags: GmemFlags) -> Result<(), BackingError> {
        if !vm.has_guest_memfd() {
            return Err(BackingError::NoGuestMemfd);
        }
        validate_create(size, flags, vm.supported_gmem_flags(), PAGE_SIZE)
    }

    /// The typed error for a `KVM_CREATE_GUEST_MEMFD` that failed with
    /// `err`, for a VMM that makes the ioctl itself and then adopts the fd
    /// ([`GuestMemfd::adopt`]): on a kernel without guest_memfd the ioctl
    /// answers a bare `ENOTTY`, and this names it
    /// ([`BackingError::NoGuestMemfd`]); a bad size or flags gets the error
    /// [`create`](Self::create) gives; anything else is
    /// [`BackingError::Syscall`] with the kernel's errno.
    ///
    /// ```
    /// use gmem::backing::GuestMemfd;
    /// use gmem::{BackingError, Vm};
    ///
    /// let Ok(vm) = Vm::new() else { return }; // no /dev/kvm here
    /// let request = kvm_bindings::kvm_create_guest_memfd { size: 2 << 20, flags: 0, reserved: [0; 6] };
    /// if let Err(e) = vm.fd().create_guest_memfd(request) {
    ///     let e = GuestMemfd::create_error(&vm, &request, e);
    ///     assert!(!vm.has_guest_memfd() || !matches!(e, BackingError::NoGuestMemfd));
    ///     println!("{e}"); // "this kernel's KVM has no guest_memfd ..." on such a host
    /// }
    /// ```
    pub fn create_error(
        vm: &Vm,
        request: &kvm_create_guest_memfd,
        err: kvm_ioctls::Error,
    ) -> BackingError {
        let flags = GmemFlags::from_bits_retain(request.flags);
        if let Err(e) = GuestMemfd::check_create(vm, request.size, flags) {
            return e;
        }
        if err.errno() == libc::ENOTTY {
            return BackingError::NoGuestMemfd;
        }
        BackingError::syscall(
            format!(
                "KVM_CREATE_GUEST_MEMFD(size {:#x}, flags {:#x})",
                request.size, request.flags
            ),
            std::io::Error::from_raw_os_error(err.errno()),
        )
    }
}

impl GuestMemfd {
    pub(crate) fn from_core(core: FileCore) -> GuestMemfd {
        GuestMemfd { core }
    }
}

impl sealed::Sealed for GuestMemfd {
    fn core(&self) -> &FileCore {
        &self.core
    }
}

impl RestrictedMemory for GuestMemfd {
    fn populated(&self) -> Result<Vec<Range<u64>>, BackingError> {
        // cachestat counts every page-cache folio, fallocated ones included,
        // mapped or not: exact, with or without MMAP.
        if let Some(runs) = cached_runs(self.core.fd(), self.core.size)? {
            return Ok(runs.to_vec());
        }
        if !self.core.flags.contains(GmemFlags::MMAP) {
            return Err(BackingError::Unsupported {
                op: "the populated-range query",
                kind: BackingKind::GuestMemfd,
                reason: "this kernel has no cachestat, and without MMAP there is neither SEEK_DATA (ESPIPE) nor a mapping for mincore",
            });
        }
        // mincore on a shared file mapping looks the page cache up, so pages
        // the guest or the host faulted in show even where unmapped: through
        // every gmem mapping of the file (each binding's window).
        self.core.populated(|runs| {
            self.core
                .host_maps
                .for_each(|addr, len, off| super::mapping::resident_into(addr, len, off, runs))
        })
    }
}
