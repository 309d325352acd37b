//! memfd creation and sealing, shared by the memfd and hugetlb backings:
//! the size is set, then sealed (`F_SEAL_GROW|F_SEAL_SHRINK`), then the seals
//! are sealed (`F_SEAL_SEAL`), so the kernel, not gmem, keeps the size.

use std::os::fd::OwnedFd;

use rustix::fs::{MemfdFlags, SealFlags};

use super::{BackingError, GmemFlags};

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
