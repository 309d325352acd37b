//! The sealed memfd backing: a shmem memfd whose size is set once and then
//! sealed (`F_SEAL_GROW|F_SEAL_SHRINK|F_SEAL_SEAL`), so the kernel, not gmem,
//! keeps it immutable. It needs neither KVM nor a recent kernel.

use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{MemfdFlags, SealFlags, SeekFrom};
use rustix::io::Errno;

use super::file::{FileCore, cached_runs};
use super::{BackingError, BackingKind, GmemFlags, RestrictedMemory, sealed, validate_create};
use crate::kvm::Vm;
use crate::range::PAGE_SIZE;

/// The creation flags the memfd backings accept: those of a default VM.
pub const SUPPORTED_FLAGS: u64 = GmemFlags::MMAP.bits() | GmemFlags::INIT_SHARED.bits();

/// Creates a memfd of `size` bytes and seals its size.
pub(crate) fn create_sealed(
    name: &str,
    extra: MemfdFlags,
    size: u64,
) -> Result<OwnedFd, BackingError> {
    let fd = rustix::fs::memfd_create(
        name,
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING | extra,
    )
    .map_err(|e| BackingError::syscall(format!("memfd_create({name})"), e))?;
    rustix::fs::ftruncate(&fd, size)
        .map_err(|e| BackingError::syscall(format!("ftruncate({size:#x})"), e))?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::GROW | SealFlags::SHRINK)
        .map_err(|e| BackingError::syscall("fcntl(F_ADD_SEALS, GROW|SHRINK)", e))?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SEAL)
        .map_err(|e| BackingError::syscall("fcntl(F_ADD_SEALS, SEAL)", e))?;
    Ok(fd)
}

/// An empty sealed memfd: mapped in place of a private file, every touch of
/// it raises `SIGBUS` (`BUS_ADRERR`), as a private guest_memfd does.
pub(crate) fn private_placeholder() -> Result<OwnedFd, BackingError> {
    create_sealed("gmem-private", MemfdFlags::empty(), 0)
}

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
