//! One bound range as the gatekeeper sees it: its file, the file's own
//! mapping (where safe copies go), and its view (`PROT_NONE` except the
//! windows pins open).

use std::ops::Range;
use std::sync::Arc;

use rustix::mm::{MprotectFlags, ProtFlags};

use super::error::GateError;
use crate::backing::file::HostWindow;
use crate::backing::mapping::Mapping;
use crate::backing::{GmemFlags, RestrictedMemory};
use crate::kvm::vm::Binding;
use crate::kvm::vm::Vm;

/// One bound range, as the gatekeeper sees it.
pub(super) struct Region {
    // Field order is drop order: the view, then the binding.
    /// The view: the whole backing pages of the region, `PROT_NONE` except
    /// where a window is open; registered with the file, so population
    /// queries and punches see its page tables too.
    view: HostWindow,
    pub(super) gpa: u64,
    pub(super) len: u64,
    /// The file offset of `gpa`.
    pub(super) offset: u64,
    /// The backing's page size: what a window opens at once.
    pub(super) granule: u64,
    /// The binding's host mapping of the region (KVM's `userspace_addr`):
    /// where safe copies go.
    pub(super) host: *mut u8,
    /// The file host code reaches (the shared side of a two-backing slot).
    pub(super) memory: Arc<dyn RestrictedMemory>,
    /// The private side of a two-backing slot: never mapped by gmem.
    pub(super) private: Option<Arc<dyn RestrictedMemory>>,
    pub(super) binding: Binding,
}

// SAFETY: `host` points into the binding's mapping of the region, which the
// region keeps alive through `binding`; it is only used for
// volatile-tolerant copies under the gatekeeper's lock, from any thread.
unsafe impl Send for Region {}
// SAFETY: as for Send: shared references give copies and addresses only.
unsafe impl Sync for Region {}

impl Region {
    pub(super) fn end(&self) -> u64 {
        self.gpa + self.len
    }

    pub(super) fn file_off(&self, gpa: u64) -> u64 {
        self.offset + (gpa - self.gpa)
    }

    pub(super) fn to_gpa(&self, off: u64) -> u64 {
        self.gpa + (off - self.offset)
    }

    /// The binding's host mapping at `gpa`, which must lie in the region.
    pub(super) fn file_ptr(&self, gpa: u64) -> *mut u8 {
        // In bounds: the mapping covers the region.
        self.host.wrapping_add((gpa - self.gpa) as usize)
    }

    /// The file a punch of pages becoming `to` frees: the one file of a
    /// one-file slot. On a two-backing slot, where KVM routes private
    /// accesses to the guest_memfd (`kernel_routes_private`: the VM has
    /// memory attributes), the side that becomes unused (the guest_memfd
    /// going shared, the shared file going private). Where it does not, KVM
    /// runs the guest from the shared file whatever the attribute, so that
    /// file holds the guest's private bytes too, and is the one punched
    /// either way: punching the unused guest_memfd would leave the old
    /// private content readable once the pages are shared.
    pub(super) fn unused_side(
        &self,
        to: crate::attributes::Attribute,
        kernel_routes_private: bool,
    ) -> &Arc<dyn RestrictedMemory> {
        match (&self.private, to) {
            (Some(private), crate::attributes::Attribute::Shared) if kernel_routes_private => {
                private
            }
            _ => &self.memory,
        }
    }

    /// The view's window cache, closed: its bounds in GPA (whole backing
    /// pages), sticky on hugetlb.
    pub(super) fn view_state(&self) -> super::view::ViewState {
        let start = self.view.start();
        let end = start + self.view().len() as u64;
        let lo = self.gpa.saturating_sub(self.offset - start);
        let hi = self.gpa.saturating_add(end - self.offset);
        super::view::ViewState::new(lo, hi, self.memory.kind().is_hugetlb())
    }

    /// Maps the view afresh, `PROT_NONE`, over its own address range: one
    /// VMA again (a hugetlb view split by `mprotect` never merges back). The
    /// caller holds the state lock and has checked that no pin is held in
    /// the region.
    pub(super) fn remap_view(&self) -> Result<(), crate::backing::BackingError> {
        let core = self.memory.core();
        if let Err(e) = self.view().remap_none(core.fd(), self.view.start()) {
            // The range is no mapping of the file now (an anonymous
            // placeholder, or given up): out of the file's registry.
            self.view.disown();
            return Err(e);
        }
        crate::backing::file::guard(self.view(), self.memory.kind())
    }

    /// The view's mapping (from the file offset `view.start()`).
    pub(super) fn view(&self) -> &Mapping {
        self.view.mapping()
    }

    /// The view at `gpa`, which must lie in the region.
    pub(super) fn view_ptr(&self, gpa: u64) -> *mut u8 {
        self.view()
            .as_ptr()
            .wrapping_add((self.file_off(gpa) - self.view.start()) as usize)
    }

    /// The backing pages that `gpas` (inside the region) touches, in GPA;
    /// `None` if one of them is not wholly inside the region.
    pub(super) fn window(&self, gpas: &Range<u64>) -> Option<Range<u64>> {
        let g = self.granule;
        let start = self.file_off(gpas.start) / g * g;
        let end = self.file_off(gpas.end).next_multiple_of(g);
        (start >= self.offset && end <= self.offset + self.len)
            .then(|| self.to_gpa(start)..self.to_gpa(end))
    }

    /// The backing pages that `gpas` touches, clipped to the region.
    pub(super) fn window_clipped(&self, gpas: &Range<u64>) -> Range<u64> {
        let g = self.granule;
        let start = (self.file_off(gpas.start) / g * g).max(self.offset);
        let end = self
            .file_off(gpas.end)
            .next_multiple_of(g)
            .min(self.offset + self.len);
        self.to_gpa(start)..self.to_gpa(end)
    }

    pub(super) fn protect(&self, gpas: &Range<u64>, open: bool) -> Result<(), GateError> {
        let prot = if open {
            MprotectFlags::READ | MprotectFlags::WRITE
        } else {
            MprotectFlags::empty()
        };
        let start = (self.file_off(gpas.start) - self.view.start()) as usize;
        let len = (gpas.end - gpas.start) as usize;
        self.view()
            .protect(start, len, prot)
            .map_err(|e| GateError::Protect {
                gpa: gpas.start,
                len: len as u64,
                source: e.into(),
            })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.memory.core().ungate();
    }
}

impl Region {
    /// Builds the region of `binding`, checking it belongs to `vm` and may be
    /// shared with the host, and maps its view `PROT_NONE`.
    pub(super) fn new(vm: &Vm, binding: Binding) -> Result<Region, GateError> {
        let gpa = binding.guest_phys_addr();
        if binding.vm_id() != vm.id() {
            return Err(GateError::ForeignBinding {
                gpa,
                owner: binding.vm_id(),
                vm: vm.id(),
            });
        }
        let memory = Arc::clone(binding.memory());
        let private = binding.private_memory().cloned();
        let flags = memory.flags();
        let core = memory.core();
        let host = match binding.host_ptr() {
            Some(ptr) if flags.contains(GmemFlags::MMAP | GmemFlags::INIT_SHARED) => ptr,
            _ => {
                return Err(GateError::NotShareable {
                    gpa,
                    flags: flags.bits(),
                });
            }
        };
        let granule = memory.page_size();
        let (offset, len) = (binding.offset(), binding.len());
        let view = core
            .map_pages(offset, len, ProtFlags::empty())
            .map_err(|source| GateError::Map { gpa, source })?;
        // From here on the file's content changes only through the
        // gatekeeper (until the region is dropped).
        core.gate();
        Ok(Region {
            view,
            gpa,
            len,
            offset,
            granule,
            host,
            memory,
            private,
            binding,
        })
    }
}
