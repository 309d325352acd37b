//! The host view: the only way the VMM and its device emulation reach guest
//! memory, addressed by guest physical address.
//!
//! It owns the attribute map (which guest pages are private) and keeps the
//! host's mappings in step with it: private memory is `PROT_NONE` in the view,
//! so a stray pointer into it faults instead of reading a secret, and the safe
//! [`read`](HostView::read)/[`write`](HostView::write) refuse it with an error
//! naming the GPA. KVM's own mapping (`userspace_addr`) is separate and never
//! handed out.
//!
//! # Huge pages
//!
//! `mprotect` works on whole pages of the mapping, so on hugetlb backings the
//! view protects at huge-page granularity: a huge page is inaccessible only
//! while **all** of it is private. A huge page that also holds shared 4 KiB
//! pages stays mapped, so those stay readable and writable by devices; the
//! safe API still refuses its private part, and no page is ever copied.
//!
//! ```text
//!   2 MiB huge page:  [ P P P S P P ... P ]  -> mapped RW, API refuses the P pages
//!   2 MiB huge page:  [ P P P P P P ... P ]  -> PROT_NONE
//! ```
//!
//! # Concurrency
//!
//! Readers take a read lock for the length of a copy; conversions take the
//! write lock and change the attributes and the protections together, so a
//! reader sees the state before or after a conversion, never a mix.

use std::ops::Range;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rustix::mm::MprotectFlags;
use thiserror::Error;

use crate::attributes::{Attribute, AttributeMap};
use crate::backing::{BackingError, HostMapping, RestrictedMemory};
use crate::binding::Binding;

/// Why the host view refused an access or could not be built.
#[derive(Debug, Error)]
pub enum ViewError {
    /// Some byte of the access lies in private memory.
    #[error("guest physical address {gpa:#x} is private memory: the host may not access it")]
    Private {
        /// The first private byte.
        gpa: u64,
    },
    /// Some byte of the access lies outside every bound region.
    #[error("guest range [{gpa:#x}, +{len:#x}) is not all guest memory")]
    OutsideMemory {
        /// The start of the access.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// The file cannot be shared with the host in place.
    #[error(
        "the file bound at GPA {gpa:#x} was created without MMAP|INIT_SHARED; the host cannot map it, and this kernel cannot convert its pages in place"
    )]
    NotShareable {
        /// The region's GPA.
        gpa: u64,
    },
    /// Two bindings overlap in guest physical space.
    #[error("bindings at GPA {gpa:#x} overlap")]
    Overlap {
        /// Where.
        gpa: u64,
    },
    /// A mapping could not be made.
    #[error("mapping the file bound at GPA {gpa:#x}")]
    Map {
        /// The region's GPA.
        gpa: u64,
        /// The backing's error.
        #[source]
        source: BackingError,
    },
    /// `mprotect` failed.
    #[error("mprotect of [{gpa:#x}, +{len:#x}) failed")]
    Protect {
        /// The start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
}

impl ViewError {
    /// The errno for the same misuse: `EFAULT` for refused accesses.
    pub fn errno(&self) -> i32 {
        match self {
            ViewError::Private { .. } | ViewError::OutsideMemory { .. } => libc::EFAULT,
            ViewError::NotShareable { .. } => libc::EOPNOTSUPP,
            ViewError::Overlap { .. } => libc::EEXIST,
            ViewError::Map { source, .. } => source.errno(),
            ViewError::Protect { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// One bound range, as the host sees it.
#[derive(Debug)]
pub(crate) struct ViewRegion {
    pub(crate) gpa: u64,
    pub(crate) len: u64,
    /// The file offset of `gpa`.
    pub(crate) offset: u64,
    pub(crate) memory: Arc<dyn RestrictedMemory>,
    map: HostMapping,
    /// The protection granularity: the backing's page size.
    granule: u64,
}

impl ViewRegion {
    fn end(&self) -> u64 {
        self.gpa + self.len
    }

    /// The host address of `gpa`, which must lie in the region.
    fn host_addr(&self, gpa: u64) -> *mut u8 {
        // In bounds: the mapping covers the whole file, and offset + len does.
        self.map
            .as_ptr()
            .wrapping_add((self.offset + (gpa - self.gpa)) as usize)
    }
}

/// A part of a guest range that lies in one region.
#[derive(Clone, Debug)]
pub(crate) struct Part {
    /// Index of the region.
    pub(crate) region: usize,
    /// The guest range of the part.
    pub(crate) gpa: Range<u64>,
}

/// The host's view of a VM's guest memory. See the module docs.
#[derive(Debug)]
pub struct HostView {
    regions: Vec<ViewRegion>,
    attributes: RwLock<AttributeMap>,
}

impl HostView {
    /// Builds the view over `bindings`, every page starting as `initial`.
    ///
    /// Each bound file must have been created with `MMAP|INIT_SHARED`: gmem
    /// itself keeps private pages out of reach.
    ///
    /// # Errors
    /// [`ViewError::NotShareable`] for a file without `INIT_SHARED`;
    /// [`ViewError::Overlap`] for overlapping bindings; [`ViewError::Map`] and
    /// [`ViewError::Protect`] if the kernel refuses a mapping.
    pub fn new(bindings: &[&Binding], initial: Attribute) -> Result<HostView, ViewError> {
        let mut regions = Vec::with_capacity(bindings.len());
        for b in bindings {
            let map = b.memory().map_host().map_err(|source| ViewError::Map {
                gpa: b.guest_phys_addr(),
                source,
            })?;
            if !map.is_shared() {
                return Err(ViewError::NotShareable {
                    gpa: b.guest_phys_addr(),
                });
            }
            regions.push(ViewRegion {
                gpa: b.guest_phys_addr(),
                len: b.len(),
                offset: b.offset(),
                memory: Arc::clone(b.memory()),
                granule: b.memory().page_size(),
                map,
            });
        }
        regions.sort_by_key(|r| r.gpa);
        if let Some(w) = regions.windows(2).find(|w| w[0].end() > w[1].gpa) {
            return Err(ViewError::Overlap { gpa: w[1].gpa });
        }
        let mut attributes = AttributeMap::new();
        for r in &regions {
            attributes.set(r.gpa..r.end(), initial);
        }
        let view = HostView {
            regions,
            attributes: RwLock::new(attributes),
        };
        // A fresh mapping is read-write: only private memory needs protecting.
        if initial == Attribute::Private {
            let attrs = view.read_attributes();
            for i in 0..view.regions.len() {
                let r = &view.regions[i];
                view.reprotect(
                    &attrs,
                    &Part {
                        region: i,
                        gpa: r.gpa..r.end(),
                    },
                )?;
            }
        }
        Ok(view)
    }

    /// The attribute of the page at `gpa` (shared outside guest memory).
    pub fn attribute(&self, gpa: u64) -> Attribute {
        self.read_attributes().get(gpa)
    }

    /// A copy of the attribute map.
    pub fn attributes(&self) -> AttributeMap {
        self.read_attributes().clone()
    }

    /// The guest memory ranges, in GPA order.
    pub fn regions(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.regions.iter().map(|r| r.gpa..r.end())
    }

    /// The bound files, in GPA order, with the GPA each starts at.
    pub fn memories(&self) -> impl Iterator<Item = (u64, &Arc<dyn RestrictedMemory>)> + '_ {
        self.regions.iter().map(|r| (r.gpa, &r.memory))
    }

    /// The host address of `gpa` in the view, for code that needs a pointer
    /// (a device's DMA engine, a test). Dereferencing it is the caller's
    /// risk: private pages fault (`SIGSEGV`), by design.
    pub fn as_ptr(&self, gpa: u64) -> Option<*mut u8> {
        self.regions
            .iter()
            .find(|r| (r.gpa..r.end()).contains(&gpa))
            .map(|r| r.host_addr(gpa))
    }

    /// Copies guest memory at `gpa` into `buf`.
    ///
    /// # Errors
    /// [`ViewError::OutsideMemory`] unless all of it is guest memory;
    /// [`ViewError::Private`], naming the first private GPA, if any of it is
    /// private. Nothing is copied then.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ViewError> {
        let attrs = self.read_attributes();
        let mut done = 0;
        for part in self.shared_parts(&attrs, gpa, buf.len() as u64)? {
            let r = &self.regions[part.region];
            let n = (part.gpa.end - part.gpa.start) as usize;
            for (i, b) in buf[done..done + n].iter_mut().enumerate() {
                // SAFETY: the part lies inside the region's live mapping and
                // holds no private byte, so it is mapped readable; the read
                // lock keeps a conversion from protecting it meanwhile.
                *b = unsafe { r.host_addr(part.gpa.start).add(i).read_volatile() };
            }
            done += n;
        }
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`.
    ///
    /// # Errors
    /// As [`read`](Self::read); nothing is written then.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), ViewError> {
        let attrs = self.read_attributes();
        let mut done = 0;
        for part in self.shared_parts(&attrs, gpa, data.len() as u64)? {
            let r = &self.regions[part.region];
            let n = (part.gpa.end - part.gpa.start) as usize;
            for (i, b) in data[done..done + n].iter().enumerate() {
                // SAFETY: as in `read`: inside a live mapping, all shared, and
                // the read lock holds conversions off.
                unsafe { r.host_addr(part.gpa.start).add(i).write_volatile(*b) };
            }
            done += n;
        }
        Ok(())
    }

    /// Fills `len` bytes of guest memory at `gpa` with `byte`.
    ///
    /// # Errors
    /// As [`read`](Self::read); nothing is written then.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<(), ViewError> {
        let attrs = self.read_attributes();
        for part in self.shared_parts(&attrs, gpa, len)? {
            let r = &self.regions[part.region];
            // SAFETY: as in `write`: inside a live mapping, all shared, and
            // the read lock holds conversions off.
            unsafe {
                std::ptr::write_bytes(
                    r.host_addr(part.gpa.start),
                    byte,
                    (part.gpa.end - part.gpa.start) as usize,
                );
            }
        }
        Ok(())
    }

    /// Splits `[gpa, gpa + len)` into per-region parts, refusing it unless
    /// all of it is guest memory and shared.
    fn shared_parts(
        &self,
        attrs: &AttributeMap,
        gpa: u64,
        len: u64,
    ) -> Result<Vec<Part>, ViewError> {
        let parts = self.parts(gpa, len)?;
        if let Some(private) = attrs.first_private(gpa..gpa + len) {
            return Err(ViewError::Private { gpa: private });
        }
        Ok(parts)
    }

    /// Splits `[gpa, gpa + len)` into per-region parts; every byte must lie in
    /// some region. An empty range has no parts.
    pub(crate) fn parts(&self, gpa: u64, len: u64) -> Result<Vec<Part>, ViewError> {
        let outside = ViewError::OutsideMemory { gpa, len };
        let end = gpa
            .checked_add(len)
            .ok_or(ViewError::OutsideMemory { gpa, len })?;
        let mut parts = Vec::new();
        let mut pos = gpa;
        while pos < end {
            let region = self
                .regions
                .iter()
                .position(|r| (r.gpa..r.end()).contains(&pos))
                .ok_or(ViewError::OutsideMemory { gpa, len })?;
            let stop = end.min(self.regions[region].end());
            parts.push(Part {
                region,
                gpa: pos..stop,
            });
            pos = stop;
        }
        if parts.is_empty() && len > 0 {
            return Err(outside);
        }
        Ok(parts)
    }

    pub(crate) fn region(&self, index: usize) -> &ViewRegion {
        &self.regions[index]
    }

    pub(crate) fn read_attributes(&self) -> RwLockReadGuard<'_, AttributeMap> {
        self.attributes.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write_attributes(&self) -> RwLockWriteGuard<'_, AttributeMap> {
        self.attributes.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the protections of `part`'s granules in line with `attrs`: a
    /// granule is inaccessible iff all of it (inside the region) is private.
    /// Each page is set straight to its final protection, so no private page
    /// is ever readable in between.
    pub(crate) fn reprotect(&self, attrs: &AttributeMap, part: &Part) -> Result<(), ViewError> {
        let r = &self.regions[part.region];
        let g = r.granule;
        // Granule-aligned window in file offsets, clipped to the region.
        let off_start = r.offset + (part.gpa.start - r.gpa);
        let off_end = r.offset + (part.gpa.end - r.gpa);
        let win_start = (off_start / g * g).max(r.offset);
        let win_end = off_end.next_multiple_of(g).min(r.offset + r.len);
        let to_gpa = |off: u64| r.gpa + (off - r.offset);
        // Fully private granules inside the window.
        let mut private: Vec<Range<u64>> = Vec::new();
        for run in attrs.private_runs_in(to_gpa(win_start)..to_gpa(win_end)) {
            let (s, e) = (r.offset + (run.start - r.gpa), r.offset + (run.end - r.gpa));
            // A granule cut by the region's edge counts as whole if all of
            // its part inside the region is private.
            let s = if s == win_start {
                s
            } else {
                s.next_multiple_of(g)
            };
            let e = if e == win_end { e } else { e / g * g };
            if e > s {
                private.push(s..e);
            }
        }
        let mut pos = win_start;
        for p in private.iter().chain(std::iter::once(&(win_end..win_end))) {
            if p.start > pos {
                self.protect(r, pos..p.start, true)?;
            }
            if p.end > p.start {
                self.protect(r, p.clone(), false)?;
            }
            pos = pos.max(p.end);
        }
        Ok(())
    }

    fn protect(
        &self,
        r: &ViewRegion,
        offsets: Range<u64>,
        accessible: bool,
    ) -> Result<(), ViewError> {
        let flags = if accessible {
            MprotectFlags::READ | MprotectFlags::WRITE
        } else {
            MprotectFlags::empty()
        };
        let len = (offsets.end - offsets.start) as usize;
        let addr = r.map.as_ptr().wrapping_add(offsets.start as usize);
        // SAFETY: the range lies inside the region's live mapping (clipped to
        // the region, which lies inside the file) and starts on a granule
        // boundary of a mapping aligned to the granule; changing protections
        // moves or frees no memory, and no Rust reference points into it.
        unsafe { rustix::mm::mprotect(addr.cast(), len, flags) }.map_err(|e| ViewError::Protect {
            gpa: r.gpa + (offsets.start - r.offset),
            len: len as u64,
            source: e.into(),
        })
    }
}
