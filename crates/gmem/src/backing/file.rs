//! What the three backings share: the owned fd, the size, the flags, the VM the
//! file belongs to, the bindings' mappings, and the `fallocate` calls.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use rustix::fs::FallocateFlags;
use rustix::mm::Advice;

use super::PunchReport;
use super::mapping::{HostMapping, Mapping, MappingRegistry};
use super::memfd::private_placeholder;
use super::{BackingError, BackingKind, GmemFlags};
use crate::kvm::VmId;
use crate::range::FileRange;
use crate::range_set::RangeSet;

#[derive(Debug)]
pub struct FileCore {
    pub(crate) fd: OwnedFd,
    /// The file's inode in the process-wide registry: one owner per file.
    /// Declared after `fd`, so the inode is released once the fd is closed.
    _registration: super::registry::Registration,
    pub(crate) kind: BackingKind,
    pub(crate) size: u64,
    pub(crate) flags: GmemFlags,
    pub(crate) owner: OnceLock<VmId>,
    pub(crate) host_maps: Arc<MappingRegistry>,
    /// Backing pages populated by `allocate` and not punched since. The
    /// kernel does not reveal these (fallocate leaves pages not uptodate, so
    /// mincore and SEEK_DATA skip them), so gmem remembers them.
    allocated: Mutex<RangeSet>,
    /// File offsets that were private when the last gatekeeper over them was
    /// dropped: the next gatekeeper starts them private, whatever its
    /// initial attribute, so that dropping a gatekeeper never shares a page;
    /// and when the file itself goes, they are punched, so that no other
    /// holder of the inode (an fd the VMM kept) reads them.
    retained_private: Mutex<RangeSet>,
    /// How many regions of live gatekeepers hold this file: while any does,
    /// its content changes only through them.
    gated: AtomicUsize,
    /// How many lazy restores are filling this file: while any is, an
    /// `allocate` would put zero pages where the snapshot's belong, and is
    /// refused.
    filling: AtomicUsize,
    /// Whole huge pages (hugetlb) that were punched and whose reservation
    /// could not be restored (the pool was drained meanwhile): a host access
    /// there must first reserve them again, or be refused, never `SIGBUS`.
    unreserved: Mutex<RangeSet>,
    /// Whether `unreserved` is non-empty (the host access paths' fast check).
    any_unreserved: AtomicBool,
}

impl Drop for FileCore {
    fn drop(&mut self) {
        // Pages a gatekeeper left private never outlive gmem's ownership of
        // the file: whoever else holds the inode reads zeroes there.
        let retained = std::mem::take(
            self.retained_private
                .get_mut()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for run in retained.iter() {
            let _ = rustix::fs::fallocate(
                &self.fd,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                run.start,
                run.end - run.start,
            );
        }
    }
}

impl FileCore {
    /// Wraps a new file. A hugetlb file's huge pages are reserved here.
    pub(crate) fn new(
        fd: OwnedFd,
        kind: BackingKind,
        size: u64,
        flags: GmemFlags,
        owner: Option<VmId>,
    ) -> Result<FileCore, BackingError> {
        FileCore::try_new(fd, kind, size, flags, owner).map_err(|(_, e)| e)
    }

    /// As [`new`](Self::new), but a failure hands the fd back.
    pub(crate) fn try_new(
        fd: OwnedFd,
        kind: BackingKind,
        size: u64,
        flags: GmemFlags,
        owner: Option<VmId>,
    ) -> Result<FileCore, (OwnedFd, BackingError)> {
        // A hugetlb file's pages are reserved now, so that a short pool is
        // refused here and not at a fault: mapping the whole file shared
        // reserves them in the inode's reserve map, which keeps them after
        // the mapping goes (only a punch or the file's end releases them).
        // No file keeps a mapping of its own: each binding maps its range
        // (`host_window`), so an unbound file costs no address space, any
        // size the kernel accepts is accepted, and a punch of an unbound
        // range walks no mapping.
        let registration = match super::registry::register(fd.as_fd()) {
            Ok(r) => r,
            Err(e) => return Err((fd, e)),
        };
        if kind.is_hugetlb()
            && let Err(e) = Mapping::shared(fd.as_fd(), size)
        {
            return Err((fd, e));
        }
        let core = FileCore {
            fd,
            _registration: registration,
            kind,
            size,
            flags,
            owner: OnceLock::new(),
            host_maps: Arc::new(MappingRegistry::new(kind.is_hugetlb())),
            allocated: Mutex::default(),
            retained_private: Mutex::default(),
            gated: AtomicUsize::new(0),
            filling: AtomicUsize::new(0),
            unreserved: Mutex::default(),
            any_unreserved: AtomicBool::new(false),
        };
        if let Some(vm) = owner {
            let _ = core.owner.set(vm);
        }
        Ok(core)
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A read-write host mapping of `[offset, offset + len)` of the file:
    /// KVM's `userspace_addr` for a binding of it, and where the
    /// gatekeeper's copies go (see [`map_pages`](Self::map_pages)).
    pub(crate) fn host_window(&self, offset: u64, len: u64) -> Result<HostWindow, BackingError> {
        self.map_pages(
            offset,
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
        )
    }

    /// Maps the whole backing pages that `[offset, offset + len)` touches
    /// (hugetlb maps only whole huge pages) with `prot`, guarded like every
    /// gmem mapping and registered, so that population queries and punches
    /// see it: the bindings' windows and the gatekeeper's views.
    pub(crate) fn map_pages(
        &self,
        offset: u64,
        len: u64,
        prot: rustix::mm::ProtFlags,
    ) -> Result<HostWindow, BackingError> {
        let page = self.kind.page_size();
        let start = offset / page * page;
        let end = offset
            .checked_add(len)
            .and_then(|end| end.checked_next_multiple_of(page))
            .ok_or_else(|| {
                BackingError::syscall(
                    format!(
                        "mmap of {len:#x} bytes at offset {offset:#x} (the range's end overflows)"
                    ),
                    rustix::io::Errno::NOMEM,
                )
            })?;
        let map = Mapping::new(self.fd(), start, end - start, prot)?;
        guard(&map, self.kind)?;
        let registration = self.host_maps.register(&map, start);
        Ok(HostWindow {
            registration: Mutex::new(Some(registration)),
            start,
            skew: (offset - start) as usize,
            map,
        })
    }

    /// The offsets a dropped gatekeeper left private. A poisoned lock (a
    /// panic while it was held) may hide an update, so it reads as "every
    /// offset private": a page is never shared by mistake.
    pub(crate) fn retained_private(&self) -> MutexGuard<'_, RangeSet> {
        match self.retained_private.lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                let mut guard = poisoned.into_inner();
                guard.insert(0..self.size);
                self.retained_private.clear_poison();
                guard
            }
        }
    }

    /// A region of a gatekeeper now holds the file (until [`ungate`](Self::ungate)).
    pub(crate) fn gate(&self) {
        self.gated.fetch_add(1, Ordering::AcqRel);
    }

    /// A lazy restore starts (`true`) or stops filling the file.
    pub(crate) fn set_filling(&self, on: bool) {
        // Under `allocated`'s lock, which `allocate` holds from its check to
        // its fallocate: an allocate is wholly before or wholly refused.
        let _held = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            self.filling.fetch_add(1, Ordering::AcqRel);
        } else {
            self.filling.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether a lazy restore is filling the file.
    pub(crate) fn is_filling(&self) -> bool {
        self.filling.load(Ordering::Acquire) > 0
    }

    /// A region of a gatekeeper let the file go.
    pub(crate) fn ungate(&self) {
        self.gated.fetch_sub(1, Ordering::AcqRel);
    }

    /// The punch of [`RestrictedMemory::punch_hole`](super::RestrictedMemory::punch_hole):
    /// refused while a gatekeeper holds the file, and over offsets a dropped
    /// gatekeeper left private.
    pub(crate) fn punch_ungated(&self, range: FileRange) -> Result<PunchReport, BackingError> {
        let (offset, len) = (range.offset(), range.len());
        if self.gated.load(Ordering::Acquire) > 0 {
            return Err(BackingError::Gated {
                op: "punch_hole",
                offset,
                len,
            });
        }
        if let Some(run) = self
            .retained_private()
            .overlapping(offset..range.end())
            .next()
        {
            return Err(BackingError::PrivatePages {
                op: "punch_hole",
                offset,
                len,
                private: run.start.max(offset),
            });
        }
        self.punch(range)
    }

    /// Makes sure every huge page of `[offset, offset + len)` has its page or
    /// a reservation, reserving again what a punch could not (hugetlb; a
    /// no-op elsewhere and whenever nothing is missing).
    ///
    /// # Errors
    /// [`BackingError::Unreserved`] (`ENOMEM`) if the pool still has no page
    /// for part of the range.
    pub(crate) fn ensure_reserved(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        if !self.any_unreserved.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut unreserved = self.unreserved.lock().unwrap_or_else(|e| e.into_inner());
        let end = offset.saturating_add(len);
        let missing: Vec<_> = unreserved.overlapping(offset..end).collect();
        for run in missing {
            if self.reserve(run.start, run.end - run.start).is_err() {
                let page_size_kib = self.kind.page_size() >> 10;
                return Err(BackingError::Unreserved {
                    offset: run.start,
                    len: run.end - run.start,
                    page_size_kib,
                    free: super::HugePagePool::read(self.kind.page_size())
                        .map_or(0, |p| p.available()),
                });
            }
            unreserved.remove(run);
        }
        self.any_unreserved
            .store(unreserved.run_count() > 0, Ordering::Release);
        Ok(())
    }

    /// Reserves the huge pages of `[offset, offset + len)` (whole pages) in
    /// the inode's reserve map: a shared mapping of them reserves them, and
    /// the reservation outlives the mapping (only a punch or the file's end
    /// releases it), as at creation.
    fn reserve(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        Mapping::new(self.fd(), offset, len, rustix::mm::ProtFlags::empty()).map(drop)
    }

    pub(crate) fn claim(&self, vm: VmId) -> Result<(), VmId> {
        let owner = *self.owner.get_or_init(|| vm);
        if owner == vm { Ok(()) } else { Err(owner) }
    }

    /// `fallocate(KEEP_SIZE)`: populates every backing page `range` touches.
    ///
    /// # Errors
    /// `EINVAL` past the end; the kernel's errno if fallocate fails.
    pub(crate) fn allocate(&self, range: FileRange) -> Result<(), BackingError> {
        let range = range.within(self.size)?;
        let mut allocated = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_filling() {
            return Err(BackingError::Restoring {
                op: "allocate",
                offset: range.offset(),
                len: range.len(),
            });
        }
        rustix::fs::fallocate(
            &self.fd,
            FallocateFlags::KEEP_SIZE,
            range.offset(),
            range.len(),
        )
        .map_err(|e| {
            BackingError::syscall(format!("fallocate(KEEP_SIZE, {range}) on {}", self.kind), e)
        })?;
        let page = self.kind.page_size();
        allocated.insert(range.offset() / page * page..range.end().next_multiple_of(page));
        Ok(())
    }

    /// `fallocate(PUNCH_HOLE|KEEP_SIZE)` of the part of `range` inside the
    /// file: whole backing pages are freed, partial huge pages zeroed.
    pub(crate) fn punch(&self, range: FileRange) -> Result<PunchReport, BackingError> {
        let Some(range) = range.clamp_to(self.size) else {
            return Ok(PunchReport::default());
        };
        let mut allocated = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        if self.kind == BackingKind::GuestMemfd {
            self.zap_mappings(range);
        }
        rustix::fs::fallocate(
            &self.fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            range.offset(),
            range.len(),
        )
        .map_err(|e| {
            BackingError::syscall(
                format!("fallocate(PUNCH_HOLE, {range}) on {}", self.kind),
                e,
            )
        })?;
        let split = range.split_by_page(self.kind.page_size());
        allocated.remove(split.whole.0..split.whole.1);
        self.host_maps.forget(split.whole.0..split.whole.1);
        if self.kind.is_hugetlb() && split.whole.1 > split.whole.0 {
            // The punch released the pages' reservation with them: reserve
            // them again at once, so that another file (another VM, another
            // tenant) cannot drain the pool under this one and a later
            // fault here find no page (SIGBUS). If the pool is already
            // empty, remember the range: host accesses reserve it first, or
            // are refused.
            let (start, end) = split.whole;
            if self.reserve(start, end - start).is_err() {
                let mut unreserved = self.unreserved.lock().unwrap_or_else(|e| e.into_inner());
                unreserved.insert(start..end);
                self.any_unreserved.store(true, Ordering::Release);
            }
        }
        Ok(PunchReport {
            bytes_freed: split.whole_bytes(),
            bytes_zeroed: split.partial_bytes(),
        })
    }

    /// Drops this process's page-table entries for `range` in every gmem
    /// mapping of the file (`MADV_DONTNEED`; the content stays in the file).
    ///
    /// guest_memfd's punch unmaps still-mapped pages one folio at a time,
    /// which makes punching a host-mapped range several times slower than an
    /// unmapped one; zapping the mappings in bulk first gets most of that
    /// back (`gmem bench`, discard). shmem and hugetlbfs unmap in bulk
    /// themselves, and the memfd mappings are mlocked (where DONTNEED is
    /// refused), so only guest_memfd takes this path.
    fn zap_mappings(&self, range: FileRange) {
        let zap = |addr: usize, len: usize, off: u64| {
            // The punched range in this mapping's offsets, clipped to it.
            let start = range.offset().max(off) - off;
            let end = (range.end() - off.min(range.end())).min(len as u64);
            if end > start {
                // SAFETY: [addr + start, addr + end) lies inside a live
                // mapping of this file, held alive by the registry lock; DONTNEED on a shared file
                // mapping only drops page-table entries, and the punch that
                // follows discards the content anyway.
                let _ = unsafe {
                    rustix::mm::madvise(
                        (addr + start as usize) as *mut std::ffi::c_void,
                        (end - start) as usize,
                        Advice::LinuxDontNeed,
                    )
                };
            }
            Ok::<(), ()>(())
        };
        let _ = self.host_maps.for_each(zap);
    }

    /// The populated ranges: what gmem allocated, plus what `resident` adds
    /// from the kernel's view (pages faulted in by the guest or the host).
    pub(crate) fn populated(
        &self,
        resident: impl FnOnce(&mut RangeSet) -> Result<(), BackingError>,
    ) -> Result<Vec<std::ops::Range<u64>>, BackingError> {
        let mut runs = self
            .allocated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.host_maps.retired_into(&mut runs);
        resident(&mut runs)?;
        Ok(runs.to_vec())
    }

    /// Maps the file for the host. Without `INIT_SHARED` the mapping is made
    /// (as the kernel allows) but private: on guest_memfd the kernel makes
    /// every touch raise `SIGBUS`; on the memfd backings an empty memfd is
    /// mapped in the file's place, so touches fault the same way.
    pub(crate) fn map_host(&self) -> Result<HostMapping, BackingError> {
        if !self.flags.contains(GmemFlags::MMAP) {
            return Err(BackingError::MappingNotAllowed {
                flags: self.flags.bits(),
            });
        }
        let shared = self.flags.contains(GmemFlags::INIT_SHARED);
        let map = if shared || self.kind == BackingKind::GuestMemfd {
            Mapping::shared(self.fd(), self.size)?
        } else {
            Mapping::shared(private_placeholder()?.as_fd(), self.size)?
        };
        guard(&map, self.kind)?;
        Ok(HostMapping::new(
            map,
            self.size,
            shared,
            Some(&self.host_maps),
        ))
    }
}

/// A registered mapping of a range of the file, from
/// [`FileCore::map_pages`].
#[derive(Debug)]
pub(crate) struct HostWindow {
    // Field order is drop order: unregister, then unmap.
    /// The mapping's registry entry (its `Drop` unregisters): taken away
    /// when the range stops being a mapping of the file ([`disown`](Self::disown)).
    registration: Mutex<Option<super::mapping::Registration>>,
    /// The file offset of the mapping's first byte (a backing page
    /// boundary).
    start: u64,
    /// Bytes from the mapping's start to the range's first byte.
    skew: usize,
    /// The mapping of the whole backing pages the range touches.
    map: Mapping,
}

impl HostWindow {
    /// Takes the mapping out of the file's registry: after a failed remap
    /// its range is no mapping of the file any more, and punches and
    /// population queries must not look at it.
    pub(crate) fn disown(&self) {
        self.registration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// The address of the range's first byte.
    pub(crate) fn addr(&self) -> usize {
        self.map.addr() + self.skew
    }

    /// The whole mapping, from [`start`](Self::start).
    pub(crate) fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// The file offset of the mapping's first byte.
    pub(crate) fn start(&self) -> u64 {
        self.start
    }
}

/// `cachestat(2)`'s syscall number: 451 on every architecture (Linux 6.5+).
/// The libc crate does not define it for x86_64-gnu yet.
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// How many pages of `[off, off + len)` are in the file's page cache, by
/// `cachestat(2)`: `Ok(None)` where the kernel has no cachestat (before 6.5)
/// or refuses it for this file (hugetlbfs).
fn cachestat(fd: BorrowedFd<'_>, off: u64, len: u64) -> Result<Option<u64>, BackingError> {
    let range = CachestatRange { off, len };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live and of the
    // kernel's layout; the fd is borrowed and open.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    if rc == 0 {
        return Ok(Some(stat.nr_cache));
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSYS | libc::EOPNOTSUPP) => Ok(None),
        _ => Err(BackingError::syscall(
            format!("cachestat({off:#x}, {len:#x})"),
            err,
        )),
    }
}

/// Whether all of `[off, off + len)` is in the file's page cache:
/// `Ok(None)` where cachestat is unavailable.
pub(crate) fn all_cached(
    fd: BorrowedFd<'_>,
    off: u64,
    len: u64,
) -> Result<Option<bool>, BackingError> {
    Ok(cachestat(fd, off, len)?.map(|pages| pages * 4096 >= len))
}

/// The file's page-cache pages as runs, found by bisecting with cachestat:
/// a range that is all cached or all empty ends the search, so the cost is
/// O(runs × log(size)) calls. `Ok(None)` where cachestat is unavailable.
pub(crate) fn cached_runs(fd: BorrowedFd<'_>, size: u64) -> Result<Option<RangeSet>, BackingError> {
    let mut runs = RangeSet::new();
    let mut stack = vec![(0u64, size)];
    while let Some((off, len)) = stack.pop() {
        let Some(pages) = cachestat(fd, off, len)? else {
            return Ok(None);
        };
        if pages == 0 {
            continue;
        }
        if pages * 4096 >= len || len <= 4096 {
            runs.insert(off..off + len);
            continue;
        }
        let half = (len / 2).next_multiple_of(4096).min(len - 4096);
        stack.push((off + half, len - half));
        stack.push((off, half));
    }
    Ok(Some(runs))
}

/// Keeps a mapping of guest memory from leaving the process: out of core
/// dumps (`MADV_DONTDUMP`), out of forked children (`MADV_DONTFORK`) and, on
/// the shmem memfd whose pages could be swapped, out of swap (`mlock2` on
/// fault). guest_memfd and hugetlb pages are unevictable already.
pub(crate) fn guard(map: &Mapping, kind: BackingKind) -> Result<(), BackingError> {
    map.advise(Advice::LinuxDontDump)?;
    map.advise(Advice::LinuxDontFork)?;
    if kind == BackingKind::Memfd {
        map.lock_on_fault()?;
    }
    Ok(())
}
