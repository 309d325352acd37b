//! Bindings: a range of a restricted memory file mapped into a VM's guest
//! physical address space as a KVM memslot (`KVM_SET_USER_MEMORY_REGION2`).
//!
//! The kernel's binding rules (spec §3) hold on every backing, checked here in
//! the kernel's order so that each refusal gets the kernel's errno:
//!
//! 1. the GPA, size and file offset are 4 KiB-aligned; the size is not 0 and
//!    the offset range does not wrap (`EINVAL`);
//! 2. the slot id exists, the GPA range does not wrap and is not too large
//!    (`EINVAL`);
//! 3. a bound slot is immutable: it can only be deleted (`EINVAL`);
//! 4. the GPA range overlaps no other slot (`EEXIST`);
//! 5. the file belongs to this VM, the range lies inside it, and no other
//!    binding covers any of its pages (`EINVAL`).
//!
//! A [`Binding`] owns its slot: dropping it deletes the slot, and until then it
//! keeps both the file (whose mapping KVM uses) and the VM alive, so the VM
//! handle, the file and the bindings may be dropped in any order.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use thiserror::Error;

use crate::backing::RestrictedMemory;
use crate::kvm::VmId;
use crate::range::PAGE_SIZE;

/// `KVM_MEM_MAX_NR_PAGES` on x86-64: the most pages one memslot may hold.
pub const MAX_SLOT_PAGES: u64 = (1 << 31) - 1;

/// A memslot id in address space 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(pub u16);

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What to bind: `len` bytes of the file from `offset`, at guest physical
/// address `guest_phys_addr`, in slot `slot` (or the lowest free one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRequest {
    /// The slot id; `None` takes the lowest free slot.
    pub slot: Option<Slot>,
    /// Where the range appears in the guest.
    pub guest_phys_addr: u64,
    /// The file offset of the range (`guest_memfd_offset`).
    pub offset: u64,
    /// The length in bytes (`memory_size`).
    pub len: u64,
}

impl SlotRequest {
    /// Binds `[offset, offset + len)` at `guest_phys_addr`, in any free slot.
    pub fn new(guest_phys_addr: u64, offset: u64, len: u64) -> Self {
        SlotRequest {
            slot: None,
            guest_phys_addr,
            offset,
            len,
        }
    }

    /// The same request for a given slot id.
    pub fn in_slot(self, slot: Slot) -> Self {
        SlotRequest {
            slot: Some(slot),
            ..self
        }
    }
}

/// Why a binding was refused. Each names the values and the rule.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BindError {
    /// An address, size or offset is not 4 KiB-aligned.
    #[error("{field} {value:#x} is not a multiple of the page size 0x1000")]
    Unaligned {
        /// Which field: guest_phys_addr, memory_size or guest_memfd_offset.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The size is 0, which in KVM would delete the slot.
    #[error(
        "memory_size is 0; a binding needs at least one page (drop a Binding to delete its slot)"
    )]
    Empty,
    /// `offset + len` wraps around.
    #[error("guest_memfd_offset {offset:#x} + memory_size {len:#x} wraps around")]
    OffsetWraps {
        /// The file offset.
        offset: u64,
        /// The length.
        len: u64,
    },
    /// The slot id is beyond the VM's memslots.
    #[error("slot {slot} does not exist: the VM has {max} memslots")]
    InvalidSlot {
        /// The slot asked for.
        slot: Slot,
        /// How many the VM has.
        max: u32,
    },
    /// `guest_phys_addr + len` wraps around.
    #[error("guest_phys_addr {gpa:#x} + memory_size {len:#x} wraps around")]
    GpaWraps {
        /// The GPA.
        gpa: u64,
        /// The length.
        len: u64,
    },
    /// More pages than one memslot may hold.
    #[error("memory_size {len:#x} exceeds the {MAX_SLOT_PAGES:#x} pages one memslot may hold")]
    TooLarge {
        /// The length.
        len: u64,
    },
    /// The slot is bound; memslots of restricted memory are immutable.
    #[error("slot {slot} is already bound; a bound slot cannot be changed, only deleted")]
    SlotInUse {
        /// The slot.
        slot: Slot,
    },
    /// The GPA range overlaps another slot.
    #[error(
        "guest range [{gpa:#x}, +{len:#x}) overlaps slot {other} at [{other_gpa:#x}, +{other_len:#x})"
    )]
    GpaOverlap {
        /// The GPA asked for.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The slot in the way.
        other: Slot,
        /// That slot's GPA.
        other_gpa: u64,
        /// That slot's length.
        other_len: u64,
    },
    /// The file belongs to another VM.
    #[error("the file belongs to {owner}; it cannot be bound in {vm}")]
    ForeignVm {
        /// The VM binding.
        vm: VmId,
        /// The file's VM.
        owner: VmId,
    },
    /// The range reaches past the end of the file.
    #[error("file range [{offset:#x}, +{len:#x}) reaches past the file size {size:#x}")]
    PastEnd {
        /// The file offset.
        offset: u64,
        /// The length.
        len: u64,
        /// The file's size.
        size: u64,
    },
    /// Another binding already covers part of the file range.
    #[error(
        "file range [{offset:#x}, +{len:#x}) overlaps the range [{other_offset:#x}, +{other_len:#x}) bound in slot {other}"
    )]
    FileRangeOverlap {
        /// The file offset.
        offset: u64,
        /// The length.
        len: u64,
        /// The slot holding the overlapping binding.
        other: Slot,
        /// Its offset.
        other_offset: u64,
        /// Its length.
        other_len: u64,
    },
    /// Every memslot is in use.
    #[error("all {max} memslots are in use")]
    NoFreeSlot {
        /// How many the VM has.
        max: u32,
    },
    /// KVM refused the memslot.
    #[error("KVM_SET_USER_MEMORY_REGION2 for slot {slot} failed")]
    Kvm {
        /// The slot.
        slot: Slot,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl BindError {
    /// The errno the kernel gives for the same binding.
    pub fn errno(&self) -> i32 {
        match self {
            BindError::GpaOverlap { .. } => libc::EEXIST,
            BindError::NoFreeSlot { .. } => libc::ENOSPC,
            BindError::Kvm { source, .. } => source.errno(),
            _ => libc::EINVAL,
        }
    }
}

/// One bound slot, as the VM's slot table records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SlotEntry {
    gpa: u64,
    len: u64,
    /// The file's identity.
    file: usize,
    offset: u64,
}

/// What the binding rules need to know of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileFacts {
    /// The file's identity (gmem uses the address of its shared allocation).
    pub id: usize,
    /// The VM the file belongs to, if any.
    pub owner: Option<VmId>,
    /// Its size in bytes.
    pub size: u64,
}

impl FileFacts {
    /// The facts of `memory`.
    pub fn of(memory: &Arc<dyn RestrictedMemory>) -> FileFacts {
        FileFacts {
            id: Arc::as_ptr(memory).cast::<()>() as usize,
            owner: memory.owner(),
            size: memory.size(),
        }
    }
}

/// A VM's memslots, keyed by slot id, and the binding rules over them as a
/// pure function: what [`Vm::bind`] checks before it issues any ioctl.
/// Public so that models and fuzzers can drive the rules without KVM.
#[derive(Debug, Default)]
pub struct SlotTable {
    slots: BTreeMap<u16, SlotEntry>,
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b + b_len && b < a + a_len
}

impl SlotTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many slots are bound.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no slot is bound.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Records a binding that [`check`](Self::check) accepted.
    pub fn insert(&mut self, slot: Slot, file: FileFacts, req: SlotRequest) {
        self.slots.insert(
            slot.0,
            SlotEntry {
                gpa: req.guest_phys_addr,
                len: req.len,
                file: file.id,
                offset: req.offset,
            },
        );
    }

    /// Forgets a deleted slot; whether it was bound.
    pub fn remove(&mut self, slot: Slot) -> bool {
        self.slots.remove(&slot.0).is_some()
    }

    /// Applies the rules in the kernel's order for `vm` (which has
    /// `max_slots` memslots) binding `file`; returns the slot to use.
    ///
    /// # Errors
    /// As [`Vm::bind`], but for [`BindError::Kvm`].
    pub fn check(
        &self,
        vm: VmId,
        max_slots: u32,
        file: FileFacts,
        req: SlotRequest,
    ) -> Result<Slot, BindError> {
        let SlotRequest {
            slot,
            guest_phys_addr: gpa,
            offset,
            len,
        } = req;
        // Step 2 of kvm_set_memory_region: size, then GPA.
        if len == 0 {
            return Err(BindError::Empty);
        }
        for (field, value) in [("memory_size", len), ("guest_phys_addr", gpa)] {
            if !value.is_multiple_of(PAGE_SIZE) {
                return Err(BindError::Unaligned { field, value });
            }
        }
        // Step 3: the file offset.
        if !offset.is_multiple_of(PAGE_SIZE) {
            return Err(BindError::Unaligned {
                field: "guest_memfd_offset",
                value: offset,
            });
        }
        if offset.checked_add(len).is_none() {
            return Err(BindError::OffsetWraps { offset, len });
        }
        // Step 4: slot id, GPA wrap, slot size.
        let slot = match slot {
            Some(slot) if u32::from(slot.0) >= max_slots => {
                return Err(BindError::InvalidSlot {
                    slot,
                    max: max_slots,
                });
            }
            Some(slot) => slot,
            None => (0..max_slots)
                .filter_map(|id| u16::try_from(id).ok())
                .find(|id| !self.slots.contains_key(id))
                .map(Slot)
                .ok_or(BindError::NoFreeSlot { max: max_slots })?,
        };
        if gpa.checked_add(len).is_none() {
            return Err(BindError::GpaWraps { gpa, len });
        }
        if len / PAGE_SIZE > MAX_SLOT_PAGES {
            return Err(BindError::TooLarge { len });
        }
        // Step 6: bound slots are immutable.
        if self.slots.contains_key(&slot.0) {
            return Err(BindError::SlotInUse { slot });
        }
        // Step 7: GPA overlap.
        if let Some((&other, e)) = self
            .slots
            .iter()
            .find(|(_, e)| overlaps(gpa, len, e.gpa, e.len))
        {
            return Err(BindError::GpaOverlap {
                gpa,
                len,
                other: Slot(other),
                other_gpa: e.gpa,
                other_len: e.len,
            });
        }
        // Step 8 (kvm_gmem_bind): owner, bounds, file-range overlap.
        if let Some(owner) = file.owner.filter(|&o| o != vm) {
            return Err(BindError::ForeignVm { vm, owner });
        }
        let size = file.size;
        if offset + len > size {
            return Err(BindError::PastEnd { offset, len, size });
        }
        if let Some((&other, e)) = self
            .slots
            .iter()
            .find(|(_, e)| e.file == file.id && overlaps(offset, len, e.offset, e.len))
        {
            return Err(BindError::FileRangeOverlap {
                offset,
                len,
                other: Slot(other),
                other_offset: e.offset,
                other_len: e.len,
            });
        }
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn file(id: usize, owner: Option<u64>) -> FileFacts {
        FileFacts {
            id,
            owner: owner.map(VmId::from_raw),
            size: 16 * P,
        }
    }

    #[test]
    fn a_full_table_is_enospc_and_names_the_slot_count() {
        let vm = VmId::from_raw(1);
        let mut table = SlotTable::new();
        for i in 0..2 {
            let req = SlotRequest::new(i * P, i * P, P);
            let slot = table.check(vm, 2, file(1, Some(1)), req).unwrap();
            table.insert(slot, file(1, Some(1)), req);
        }
        let e = table
            .check(vm, 2, file(1, Some(1)), SlotRequest::new(8 * P, 8 * P, P))
            .unwrap_err();
        assert!(matches!(e, BindError::NoFreeSlot { max: 2 }), "{e}");
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(e.to_string(), "all 2 memslots are in use");
        assert_eq!(table.len(), 2, "a refusal changes nothing");
    }

    #[test]
    fn deleting_a_slot_frees_its_ranges_and_only_once() {
        let vm = VmId::from_raw(1);
        let mut table = SlotTable::new();
        let req = SlotRequest::new(0, 0, P);
        let slot = table.check(vm, 8, file(1, None), req).unwrap();
        table.insert(slot, file(1, None), req);
        assert!(table.remove(slot));
        assert!(!table.remove(slot), "a deleted slot is not bound");
        assert!(table.check(vm, 8, file(1, None), req).is_ok());
    }

    #[test]
    fn messages_name_the_values() {
        let vm = VmId::from_raw(1);
        let table = SlotTable::new();
        let e = table
            .check(vm, 8, file(1, Some(2)), SlotRequest::new(0, 0, P))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the file belongs to vm#2; it cannot be bound in vm#1"
        );
        let e = table
            .check(vm, 8, file(1, None), SlotRequest::new(0x1001, 0, P))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "guest_phys_addr 0x1001 is not a multiple of the page size 0x1000"
        );
    }
}
