//! Mappings of restricted memory files: the owned `mmap` every backing uses,
//! and the [`HostMapping`] handed to host code.
//!
//! Guest memory is never a Rust slice: the guest may write it at any time, so
//! every copy in or out is volatile, and no reference into a mapping leaves
//! this module.

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use rustix::mm::{Advice, MapFlags, ProtFlags};
use thiserror::Error;

use super::BackingError;

/// An owned `MAP_SHARED` mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; the raw
// pointer is only a number until someone dereferences it, and every access in
// this crate is a volatile copy that tolerates concurrent writers.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: `&Mapping` gives only volatile copies and addresses.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, `MAP_SHARED`, read-write.
    pub(crate) fn shared(fd: BorrowedFd<'_>, len: u64) -> Result<Mapping, BackingError> {
        let len_usize = usize::try_from(len).map_err(|_| {
            BackingError::syscall(format!("mmap of {len:#x} bytes"), rustix::io::Errno::NOMEM)
        })?;
        // SAFETY: a new mapping at an address the kernel chooses (no MAP_FIXED),
        // so no existing memory is replaced; the fd is borrowed for the call
        // only, and the mapping keeps its own reference to the file.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len_usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }
        .map_err(|e| BackingError::syscall(format!("mmap(MAP_SHARED, {len:#x} bytes)"), e))?;
        let addr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| BackingError::syscall("mmap returned NULL", rustix::io::Errno::INVAL))?;
        Ok(Mapping {
            addr,
            len: len_usize,
        })
    }

    /// The first byte's address.
    pub(crate) fn addr(&self) -> usize {
        self.addr.as_ptr() as usize
    }

    /// The length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The first byte, as a raw pointer.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// `madvise` over the whole mapping.
    pub(crate) fn advise(&self, advice: Advice) -> Result<(), BackingError> {
        // SAFETY: the range is exactly this live mapping; the advice values used
        // here (DONTDUMP, DONTFORK) change no contents.
        unsafe { rustix::mm::madvise(self.addr.as_ptr().cast(), self.len, advice) }
            .map_err(|e| BackingError::syscall(format!("madvise({advice:?})"), e))
    }
}

impl Mapping {
    /// Keeps the mapping's pages out of swap as they are faulted in
    /// (`mlock2(MLOCK_ONFAULT)`).
    pub(crate) fn lock_on_fault(&self) -> Result<(), BackingError> {
        // SAFETY: the range is exactly this live mapping; locking moves no
        // memory and changes no contents.
        unsafe {
            rustix::mm::mlock_with(self.addr.as_ptr().cast(), self.len, rustix::mm::MlockFlags::ONFAULT)
        }
        .map_err(|e| {
            BackingError::syscall(
                format!("mlock2(MLOCK_ONFAULT) of {:#x} bytes of guest memory (is RLIMIT_MEMLOCK too low?)", self.len),
                e,
            )
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: this value owns the mapping, created with exactly this
        // address and length, and nothing borrows it any more.
        let result = unsafe { rustix::mm::munmap(self.addr.as_ptr().cast(), self.len) };
        // A surviving mapping would leave guest memory reachable: be loud.
        assert!(result.is_ok(), "munmap of guest memory failed: {result:?}");
    }
}

/// The live host mappings of one file, so that a backing whose population the
/// kernel reveals only through page tables (hugetlb) can consult all of them.
#[derive(Debug, Default)]
pub(crate) struct MappingRegistry {
    maps: Mutex<Vec<(usize, usize)>>,
}

impl MappingRegistry {
    /// Runs `f` over every live mapping `(addr, len)`, holding the registry
    /// lock so that none of them is unmapped meanwhile.
    pub(crate) fn for_each<E>(
        &self,
        mut f: impl FnMut(usize, usize) -> Result<(), E>,
    ) -> Result<(), E> {
        let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps.iter().try_for_each(|&(addr, len)| f(addr, len))
    }
}

#[derive(Debug)]
struct Registration {
    registry: Arc<MappingRegistry>,
    addr: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut maps = self.registry.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps.retain(|&(addr, _)| addr != self.addr);
    }
}

/// Why a host access was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AccessError {
    /// The access reaches past the mapping.
    #[error("access {offset:#x}+{len:#x} reaches past the mapping's size {size:#x}")]
    OutOfBounds {
        /// File offset of the access.
        offset: u64,
        /// Its length.
        len: u64,
        /// The mapping's size.
        size: u64,
    },
    /// The memory is private: the host may not touch it.
    #[error("file offset {offset:#x} is private memory: the host may not access it")]
    Private {
        /// The first private byte's file offset.
        offset: u64,
    },
}

impl AccessError {
    /// The errno for the same misuse: `EFAULT`.
    pub fn errno(&self) -> i32 {
        libc::EFAULT
    }
}

/// The host's mapping of a whole restricted memory file.
///
/// Copies in and out are volatile and bounds-checked. A file created without
/// `INIT_SHARED` is private: its mapping exists (as the kernel allows) but
/// every touch raises `SIGBUS`, and [`read`](Self::read) and
/// [`write`](Self::write) refuse it.
#[derive(Debug)]
pub struct HostMapping {
    // Field order is drop order: unregister before unmapping.
    _registration: Option<Registration>,
    map: Mapping,
    size: u64,
    shared: bool,
}

impl HostMapping {
    pub(crate) fn new(
        map: Mapping,
        size: u64,
        shared: bool,
        registry: Option<&Arc<MappingRegistry>>,
    ) -> Self {
        let _registration = registry.map(|registry| {
            let addr = map.addr();
            registry
                .maps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((addr, map.len()));
            Registration {
                registry: Arc::clone(registry),
                addr,
            }
        });
        HostMapping {
            _registration,
            map,
            size,
            shared,
        }
    }

    /// The mapped size (the file's size).
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Always false: files are never empty.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Whether host accesses are allowed (the file is `INIT_SHARED`).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The first byte, as a raw pointer. Dereferencing it is the caller's
    /// risk: private memory faults (`SIGBUS`), by design.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, AccessError> {
        let len64 = len as u64;
        match offset.checked_add(len64) {
            Some(end) if end <= self.size => {}
            _ => {
                return Err(AccessError::OutOfBounds {
                    offset,
                    len: len64,
                    size: self.size,
                });
            }
        }
        if !self.shared {
            return Err(AccessError::Private { offset });
        }
        // In bounds of a mapping whose length is a usize: fits.
        Ok(offset as usize)
    }

    /// Copies `buf.len()` bytes at file offset `offset` into `buf`.
    ///
    /// # Errors
    /// [`AccessError::OutOfBounds`] past the end; [`AccessError::Private`] if
    /// the file is private.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let start = self.check(offset, buf.len())?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `check` proved [start, start + len) lies inside the live
            // mapping, and the file is shared, so the page is host-accessible.
            *b = unsafe { self.map.as_ptr().add(start + i).read_volatile() };
        }
        Ok(())
    }

    /// Copies `data` to file offset `offset`.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let start = self.check(offset, data.len())?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: as in `read`: in bounds of a live, host-accessible mapping.
            unsafe { self.map.as_ptr().add(start + i).write_volatile(*b) };
        }
        Ok(())
    }

    /// Fills `len` bytes at `offset` with `byte`.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn fill(&self, offset: u64, len: usize, byte: u8) -> Result<(), AccessError> {
        let start = self.check(offset, len)?;
        // SAFETY: as in `read`: in bounds of a live, host-accessible mapping.
        unsafe { std::ptr::write_bytes(self.map.as_ptr().add(start), byte, len) };
        Ok(())
    }
}
