//! The sealed memfd backing: a shmem memfd whose size is set once and then
//! sealed (`F_SEAL_GROW|F_SEAL_SHRINK|F_SEAL_SEAL`), so the kernel, not gmem,
//! keeps it immutable. It needs neither KVM nor a recent kernel.

use std::ops::Range;
use std::os::fd::AsFd;

use rustix::fs::{MemfdFlags, SeekFrom};
use rustix::io::Errno;

use super::file::{FileCore, cached_runs};
use super::memfd::create_sealed;
use super::{BackingError, BackingKind, GmemFlags, RestrictedMemory, sealed, validate_create};
use crate::kvm::Vm;
use crate::range::PAGE_SIZE;

pub use super::memfd::SUPPORTED_FLAGS;

/// A sealed shmem memfd.
#[derive(Debug)]
pub struct SealedMemfd {
    core: FileCore,
}

impl SealedMemfd {
    /// Creates a sealed memfd of `size` bytes, mapped for KVM.
    ///
    /// `vm` records the file's VM; without one, the first VM that binds the
    /// file owns it.
    ///
    /// # Errors
    /// [`BackingError::UnsupportedFlags`] and [`BackingError::InvalidSize`]
    /// (`EINVAL`) as on guest_memfd; [`BackingError::Syscall`] if a call fails.
    pub fn create(
        size: u64,
        flags: GmemFlags,
        vm: Option<&Vm>,
    ) -> Result<SealedMemfd, BackingError> {
        validate_create(size, flags, SUPPORTED_FLAGS, PAGE_SIZE)?;
        let fd = create_sealed("gmem", MemfdFlags::empty(), size)?;
        Ok(SealedMemfd {
            core: FileCore::new(fd, BackingKind::Memfd, size, flags, vm.map(Vm::id))?,
        })
    }
}

impl SealedMemfd {
    pub(crate) fn from_core(core: FileCore) -> SealedMemfd {
        SealedMemfd { core }
    }
}

impl sealed::Sealed for SealedMemfd {
    fn core(&self) -> &FileCore {
        &self.core
    }
}

impl RestrictedMemory for SealedMemfd {
    fn populated(&self) -> Result<Vec<Range<u64>>, BackingError> {
        if let Some(runs) = cached_runs(self.core.fd(), self.core.size)? {
            return Ok(runs.to_vec());
        }
        // Before Linux 6.5: shmem answers SEEK_DATA/SEEK_HOLE for pages that hold data, mapped
        // or not (fallocated pages count as holes until first use).
        self.core.populated(|runs| {
            let fd = self.core.fd.as_fd();
            let mut pos = 0;
            while pos < self.core.size {
                let data = match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
                    Ok(data) => data,
                    Err(Errno::NXIO) => break,
                    Err(e) => {
                        return Err(BackingError::syscall(
                            format!("lseek(SEEK_DATA, {pos:#x})"),
                            e,
                        ));
                    }
                };
                let hole = rustix::fs::seek(fd, SeekFrom::Hole(data)).map_err(|e| {
                    BackingError::syscall(format!("lseek(SEEK_HOLE, {data:#x})"), e)
                })?;
                runs.insert(data..hole.min(self.core.size));
                pos = hole;
            }
            Ok(())
        })
    }
}
