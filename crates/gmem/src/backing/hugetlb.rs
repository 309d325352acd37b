//! The hugetlb backing: a sealed `MFD_HUGETLB` memfd with 2 MiB or 1 GiB pages.
//!
//! Ranges are 4 KiB-aligned as on the other backings, and follow hugetlbfs:
//! allocate populates every huge page the range touches; punch frees the
//! whole huge pages inside the range and zeroes the partial ones in place
//! (spec §8.8), and its [`PunchReport`](super::PunchReport) says which is which.
//!
//! The huge pages are reserved at creation (a whole-file shared mapping,
//! made and dropped: the reservation stays with the file), so a short pool
//! is refused then, and no mapping stays behind for a punch to walk.
//!
//! The kernel reveals which huge pages are populated only through page tables
//! (mincore reports mapped pages only, and hugetlbfs has no SEEK_DATA): pages
//! faulted in show in the page tables of gmem's mappings (the bindings'
//! windows, which KVM uses, views and host mappings), dropped mappings leave
//! what they had behind, and gmem remembers what it allocated.

use std::ops::Range;

use rustix::fs::MemfdFlags;

use super::file::FileCore;
use super::mapping::resident_into;
use super::memfd::{SUPPORTED_FLAGS, create_sealed};
use super::{BackingError, BackingKind, GmemFlags, RestrictedMemory, sealed, validate_create};
use crate::kvm::Vm;

/// One size's huge page pool, from `/sys/kernel/mm/hugepages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct HugePagePool {
    /// The page size in bytes.
    pub page_size: u64,
    /// `nr_hugepages`: pages in the pool.
    pub total: u64,
    /// `free_hugepages`: pages not in use.
    pub free: u64,
    /// `resv_hugepages`: free pages promised to existing mappings.
    pub reserved: u64,
}

impl HugePagePool {
    /// The sysfs directory of the pool of `page_size`-byte pages.
    pub fn sysfs_dir(page_size: u64) -> String {
        format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page_size >> 10)
    }

    /// Reads the pool of `page_size`-byte pages; `None` if the kernel has no
    /// such pool.
    pub fn read(page_size: u64) -> Option<HugePagePool> {
        let dir = Self::sysfs_dir(page_size);
        let field = |name: &str| -> Option<u64> {
            std::fs::read_to_string(format!("{dir}/{name}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some(HugePagePool {
            page_size,
            total: field("nr_hugepages")?,
            free: field("free_hugepages")?,
            reserved: field("resv_hugepages")?,
        })
    }

    /// Pages a new mapping can still reserve.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

/// A sealed hugetlb memfd.
#[derive(Debug)]
pub struct HugetlbMemfd {
    core: FileCore,
}

impl HugetlbMemfd {
    /// Creates a sealed hugetlb memfd of `size` bytes and reserves its pages
    /// (a whole-file mapping, made and dropped: the reservation stays).
    ///
    /// # Errors
    /// - [`BackingError::UnsupportedFlags`] (`EINVAL`) for unknown flags;
    /// - [`BackingError::InvalidSize`] (`EINVAL`) unless `size` is whole huge pages;
    /// - [`BackingError::Unsupported`] if `kind` is not a hugetlb kind or the
    ///   kernel has no pool of that page size;
    /// - [`BackingError::HugePagesExhausted`] (`ENOMEM`) if the pool has too
    ///   few free pages, with how many are needed and free.
    pub fn create(
        kind: BackingKind,
        size: u64,
        flags: GmemFlags,
        vm: Option<&Vm>,
    ) -> Result<HugetlbMemfd, BackingError> {
        let page_flag = match kind {
            BackingKind::Hugetlb2M => MemfdFlags::HUGE_2MB,
            BackingKind::Hugetlb1G => MemfdFlags::HUGE_1GB,
            _ => {
                return Err(BackingError::Unsupported {
                    op: "HugetlbMemfd::create",
                    kind,
                    reason: "not a hugetlb backing",
                });
            }
        };
        let page = kind.page_size();
        validate_create(size, flags, SUPPORTED_FLAGS, page)?;
        let exhausted = || {
            let pool = HugePagePool::read(page);
            BackingError::HugePagesExhausted {
                page_size_kib: page >> 10,
                needed: size / page,
                free: pool.map_or(0, |p| p.available()),
            }
        };
        // The pool is read only on failure: the mapping below reserves the
        // pages, and its ENOMEM is the authoritative "too few free".
        let fd =
            create_sealed("gmem-hugetlb", MemfdFlags::HUGETLB | page_flag, size).map_err(|e| {
                if HugePagePool::read(page).is_none() {
                    BackingError::Unsupported {
                        op: "create",
                        kind,
                        reason: "the kernel has no huge page pool of this size",
                    }
                } else {
                    e
                }
            })?;
        let core = FileCore::new(fd, kind, size, flags, vm.map(Vm::id)).map_err(|e| {
            // Another process may have taken the pages between the check and mmap.
            if e.errno() == libc::ENOMEM {
                exhausted()
            } else {
                e
            }
        })?;
        Ok(HugetlbMemfd { core })
    }
}

impl HugetlbMemfd {
    pub(crate) fn from_core(core: FileCore) -> HugetlbMemfd {
        HugetlbMemfd { core }
    }
}

impl sealed::Sealed for HugetlbMemfd {
    fn core(&self) -> &FileCore {
        &self.core
    }
}

impl RestrictedMemory for HugetlbMemfd {
    fn populated(&self) -> Result<Vec<Range<u64>>, BackingError> {
        // Faulted-in huge pages show only in page tables: the bindings'
        // windows (KVM's) and the other host mappings, all of them gmem's.
        let runs = self.core.populated(|runs| {
            self.core
                .host_maps
                .for_each(|addr, len, off| resident_into(addr, len, off, runs))
        })?;
        // hugetlbfs counts its pages in i_blocks: never report less than that.
        let populated = rustix::fs::fstat(self.core.fd())
            .map_err(|e| BackingError::syscall("fstat", e))?
            .st_blocks as u64
            * 512;
        let located: u64 = runs.iter().map(|r| r.end - r.start).sum();
        if located < populated {
            return Err(BackingError::Unlocatable { located, populated });
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::FileRange;

    /// A shared hugetlb-2m file of two pages, and the test kit's hold on
    /// the pool; `None` (and the test kit's skip) where the pool cannot give
    /// them.
    fn two_shared_pages() -> Option<(HugetlbMemfd, gmem_testkit::OnBacking)> {
        let test = std::thread::current()
            .name()
            .unwrap_or("hugetlb")
            .to_owned();
        let on = gmem_testkit::on_backing(&test, "hugetlb-2m".parse().ok()?, 2)?;
        let mem = HugetlbMemfd::create(
            BackingKind::Hugetlb2M,
            4 << 20,
            GmemFlags::MMAP | GmemFlags::INIT_SHARED,
            None,
        )
        .unwrap();
        Some((mem, on))
    }

    /// The lines of /proc/self/maps that map the file `fd`, by inode.
    fn maps_of(fd: std::os::fd::BorrowedFd<'_>) -> usize {
        let ino = rustix::fs::fstat(fd).unwrap().st_ino.to_string();
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.split_whitespace().nth(4) == Some(ino.as_str()))
            .count()
    }

    /// An unbound hugetlb file keeps no mapping (a punch walks none), yet
    /// its pages stay reserved: a binding's window faults them in.
    #[test]
    fn reserved_at_creation_without_a_mapping() {
        let page = 2u64 << 20;
        let Some((mem, _on)) = two_shared_pages() else {
            return;
        };
        assert_eq!(maps_of(mem.core.fd()), 0, "no mapping after creation");
        // A window of a range inside the second huge page maps that page.
        let window = mem.core.host_window(page + 4096, 4096).unwrap();
        assert_eq!(maps_of(mem.core.fd()), 1);
        // SAFETY: the window maps [page + 4096, page + 8192) of this test's
        // own file, read-write; nothing else refers to it.
        unsafe { (window.addr() as *mut u8).write_volatile(7) };
        drop(window);
        assert_eq!(maps_of(mem.core.fd()), 0);
        assert_eq!(mem.populated().unwrap(), vec![page..2 * page]);
    }

    /// Found by a user: after a gmem-owned mapping that wrote pages was
    /// dropped, `populated()` refused to answer ("the file holds 0x200000
    /// populated bytes but only 0x0 can be located"). Dropped mappings now
    /// leave what they had resident behind, until it is punched.
    #[test]
    fn population_survives_dropped_mappings() {
        let page = 2u64 << 20;
        let Some((mem, _on)) = two_shared_pages() else {
            return;
        };
        {
            // SAFETY: a file of this test's own, shared, under no gatekeeper.
            let host = unsafe { mem.map_host() }.unwrap();
            host.write(page + 5, b"x").unwrap();
        }
        assert_eq!(mem.populated().unwrap(), vec![page..2 * page]);
        mem.punch_hole(FileRange::new(page, page).unwrap()).unwrap();
        assert_eq!(mem.populated().unwrap(), Vec::<Range<u64>>::new());
    }
}
