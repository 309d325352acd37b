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
use crate::range_set::RangeSet;

/// How many bytes of a mapping one `mincore` call covers (16 K pages).
const MINCORE_CHUNK: usize = 64 << 20;

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
        Mapping::new(fd, 0, len, ProtFlags::READ | ProtFlags::WRITE)
    }

    /// Maps `len` bytes of `fd` from file offset `offset`, `MAP_SHARED`,
    /// with protection `prot`.
    pub(crate) fn new(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        prot: ProtFlags,
    ) -> Result<Mapping, BackingError> {
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
                prot,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }
        .map_err(|e| {
            BackingError::syscall(
                format!("mmap(MAP_SHARED, {len:#x} bytes at offset {offset:#x})"),
                e,
            )
        })?;
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
    /// Sets the protection of `[start, start + len)` (offsets in the mapping).
    pub(crate) fn protect(
        &self,
        start: usize,
        len: usize,
        prot: rustix::mm::MprotectFlags,
    ) -> Result<(), rustix::io::Errno> {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(rustix::io::Errno::INVAL);
        }
        // SAFETY: the range was just checked to lie inside this live mapping;
        // changing protections moves or frees no memory, and no Rust reference
        // points into guest memory (copies are raw and volatile).
        unsafe { rustix::mm::mprotect(self.addr.as_ptr().add(start).cast(), len, prot) }
    }

    /// Maps `fd` from `offset` afresh over this mapping's own range,
    /// `PROT_NONE` (`MAP_FIXED`): one VMA again, whatever `mprotect` split it
    /// into. hugetlb mappings never merge back after a split; this is how a
    /// view of them shrinks again. The caller re-applies its advice.
    pub(crate) fn remap_none(&self, fd: BorrowedFd<'_>, offset: u64) -> Result<(), BackingError> {
        // SAFETY: MAP_FIXED replaces exactly this value's own mapping, which
        // it owns and keeps the same address and length of; no Rust reference
        // points into it (copies are raw and volatile), and the caller
        // guarantees no pin hands out pointers into it meanwhile.
        let ptr = unsafe {
            rustix::mm::mmap(
                self.addr.as_ptr().cast(),
                self.len,
                ProtFlags::empty(),
                MapFlags::SHARED | MapFlags::FIXED,
                fd,
                offset,
            )
        }
        .map_err(|e| {
            BackingError::syscall(
                format!(
                    "mmap(MAP_FIXED, {:#x} bytes at offset {offset:#x})",
                    self.len
                ),
                e,
            )
        })?;
        debug_assert_eq!(ptr.cast::<u8>(), self.addr.as_ptr());
        Ok(())
    }

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

/// The live mappings of one file other than KVM's (host mappings and
/// gatekeeper views), so that a backing whose population the kernel reveals
/// only through page tables (hugetlb) can consult all of them, and a punch
/// can zap them in bulk.
#[derive(Debug, Default)]
pub(crate) struct MappingRegistry {
    /// `(addr, len, file offset of addr)` of each live mapping.
    maps: Mutex<Vec<(usize, usize, u64)>>,
    /// Whether dropped mappings leave their resident pages here (hugetlb,
    /// whose population only page tables reveal).
    remember: bool,
    /// File offsets that dropped mappings had resident, until punched.
    retired: Mutex<RangeSet>,
}

impl MappingRegistry {
    /// A registry whose dropped mappings leave their resident pages behind
    /// for [`retired_into`](Self::retired_into) iff `remember`.
    pub(crate) fn new(remember: bool) -> MappingRegistry {
        MappingRegistry {
            remember,
            ..MappingRegistry::default()
        }
    }

    /// Runs `f` over every live mapping `(addr, len, file offset)`, holding
    /// the registry lock so that none of them is unmapped meanwhile.
    pub(crate) fn for_each<E>(
        &self,
        mut f: impl FnMut(usize, usize, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps.iter()
            .try_for_each(|&(addr, len, off)| f(addr, len, off))
    }

    /// Records `map`, which maps the file from offset `off`, until the
    /// returned registration is dropped (before the mapping).
    pub(crate) fn register(self: &Arc<Self>, map: &Mapping, off: u64) -> Registration {
        let addr = map.addr();
        self.maps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((addr, map.len(), off));
        Registration {
            registry: Arc::clone(self),
            addr,
        }
    }

    /// Adds what dropped mappings had resident to `runs`.
    pub(crate) fn retired_into(&self, runs: &mut RangeSet) {
        for r in self
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            runs.insert(r);
        }
    }

    /// Forgets retired pages in `offsets` (they were punched).
    pub(crate) fn forget(&self, offsets: std::ops::Range<u64>) {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(offsets);
    }
}

/// A mapping's entry in a [`MappingRegistry`]; dropping it removes the entry.
#[derive(Debug)]
pub(crate) struct Registration {
    registry: Arc<MappingRegistry>,
    addr: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut maps = self.registry.maps.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = maps.iter().position(|&(addr, _, _)| addr == self.addr) else {
            return;
        };
        let (addr, len, off) = maps.swap_remove(i);
        if self.registry.remember {
            // The mapping is still alive (it is unmapped after this): what it
            // faulted in stays populated, and must stay locatable.
            let mut retired = self
                .registry
                .retired
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let _ = resident_into(addr, len, off, &mut retired);
        }
    }
}

/// Why a host access was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
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
        let _registration = registry.map(|registry| registry.register(&map, 0));
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
        // SAFETY: `check` proved [start, start + len) lies inside the live
        // mapping, and the file is shared, so the page is host-accessible;
        // `buf` is a distinct Rust buffer of that length.
        unsafe { copy_from_guest(buf, self.map.as_ptr().add(start)) };
        Ok(())
    }

    /// Copies `data` to file offset `offset`.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let start = self.check(offset, data.len())?;
        // SAFETY: as in `read`: in bounds of a live, host-accessible mapping,
        // and `data` is a distinct Rust buffer.
        unsafe { copy_to_guest(self.map.as_ptr().add(start), data) };
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

/// Copies guest memory at `src` into `buf`, as vm-memory's `copy_slice`
/// does: accesses of up to 8 bytes are single aligned volatile loads (so a
/// guest-shared word is read whole), longer ones one `memcpy`, which the
/// guest's concurrent writes can tear but not make unsound for plain bytes.
///
/// # Safety
/// - `[src, src + buf.len())` is mapped, readable, and stays so for the call;
/// - it does not overlap `buf`.
pub(crate) unsafe fn copy_from_guest(buf: &mut [u8], src: *const u8) {
    // SAFETY: the caller's contract covers both pointers for `buf.len()` bytes.
    unsafe { copy_slice(buf.as_mut_ptr(), src, buf.len()) }
}

/// Copies `data` into guest memory at `dst`, as [`copy_from_guest`].
///
/// # Safety
/// - `[dst, dst + data.len())` is mapped, writable, and stays so for the call;
/// - it does not overlap `data`.
pub(crate) unsafe fn copy_to_guest(dst: *mut u8, data: &[u8]) {
    // SAFETY: the caller's contract covers both pointers for `data.len()` bytes.
    unsafe { copy_slice(dst, data.as_ptr(), data.len()) }
}

/// # Safety
/// Both ranges are valid for `len` bytes and do not overlap.
unsafe fn copy_slice(dst: *mut u8, src: *const u8, len: usize) {
    let align = (dst as usize | src as usize | len).trailing_zeros();
    match len {
        8 if align >= 3 => {
            // SAFETY: 8 valid bytes at both pointers (the caller's contract),
            // both 8-aligned (`align`).
            unsafe {
                dst.cast::<u64>()
                    .write_volatile(src.cast::<u64>().read_volatile())
            }
        }
        4 if align >= 2 => {
            // SAFETY: as above, 4 bytes, 4-aligned.
            unsafe {
                dst.cast::<u32>()
                    .write_volatile(src.cast::<u32>().read_volatile())
            }
        }
        2 if align >= 1 => {
            // SAFETY: as above, 2 bytes, 2-aligned.
            unsafe {
                dst.cast::<u16>()
                    .write_volatile(src.cast::<u16>().read_volatile())
            }
        }
        0..=8 => {
            for i in 0..len {
                // SAFETY: `i < len`, inside both ranges.
                unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
            }
        }
        // SAFETY: the caller's contract: valid, non-overlapping, `len` bytes.
        _ => unsafe { std::ptr::copy_nonoverlapping(src, dst, len) },
    }
}

/// Adds the pages of the mapping `[addr, addr + len)` (which maps the file
/// from offset `base`) that `mincore(2)` reports resident to `runs`, as file
/// offsets.
pub(crate) fn resident_into(
    addr: usize,
    len: usize,
    base: u64,
    runs: &mut RangeSet,
) -> Result<(), BackingError> {
    let mut vec = vec![0u8; MINCORE_CHUNK / 4096];
    let mut start = 0;
    while start < len {
        let chunk = MINCORE_CHUNK.min(len - start);
        // SAFETY: mincore only reads page tables; the kernel validates the
        // address range (ENOMEM if unmapped) and writes one byte per page of
        // `chunk` into `vec`, which holds MINCORE_CHUNK / 4096 bytes.
        let rc =
            unsafe { libc::mincore((addr + start) as *mut libc::c_void, chunk, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(BackingError::syscall(
                "mincore",
                std::io::Error::last_os_error(),
            ));
        }
        for (i, b) in vec[..chunk.div_ceil(4096)].iter().enumerate() {
            if b & 1 != 0 {
                let off = base + (start + i * 4096) as u64;
                runs.insert(off..off + 4096);
            }
        }
        start += chunk;
    }
    Ok(())
}
