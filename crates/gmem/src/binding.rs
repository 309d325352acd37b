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

use kvm_bindings::{KVM_MEM_GUEST_MEMFD, kvm_userspace_memory_region2};
use thiserror::Error;

use crate::backing::{BackingKind, RestrictedMemory};
use crate::kvm::vm::VmInner;
use crate::kvm::{Vm, VmId};
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
    fn of(memory: &Arc<dyn RestrictedMemory>) -> FileFacts {
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

/// Builds the memslot for a binding (size 0 deletes it).
fn region(
    memory: &Arc<dyn RestrictedMemory>,
    slot: Slot,
    gpa: u64,
    offset: u64,
    len: u64,
) -> kvm_userspace_memory_region2 {
    let base = memory.kvm_userspace_addr();
    let is_gmem = memory.kind() == BackingKind::GuestMemfd;
    kvm_userspace_memory_region2 {
        slot: u32::from(slot.0),
        flags: if is_gmem { KVM_MEM_GUEST_MEMFD } else { 0 },
        guest_phys_addr: gpa,
        memory_size: len,
        // KVM's own accesses go through userspace_addr even on gmem slots, so
        // it is the file's own mapping (spec §3.6), or 0 if it has none.
        userspace_addr: if base == 0 { 0 } else { base + offset },
        guest_memfd_offset: if is_gmem { offset } else { 0 },
        guest_memfd: if is_gmem {
            u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&memory.core().fd())).unwrap_or(u32::MAX)
        } else {
            0
        },
        pad1: 0,
        pad2: [0; 14],
    }
}

/// A bound slot. Dropping it deletes the slot.
pub struct Binding {
    vm: Arc<VmInner>,
    memory: Arc<dyn RestrictedMemory>,
    slot: Slot,
    gpa: u64,
    offset: u64,
    len: u64,
}

impl fmt::Debug for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Binding")
            .field("vm", &self.vm.id)
            .field("slot", &self.slot)
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("offset", &format_args!("{:#x}", self.offset))
            .field("len", &format_args!("{:#x}", self.len))
            .field("kind", &self.memory.kind())
            .finish()
    }
}

impl Binding {
    /// The slot id.
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// The guest physical address of the range.
    pub fn guest_phys_addr(&self) -> u64 {
        self.gpa
    }

    /// The file offset of the range.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: bindings are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The VM the slot is in.
    pub fn vm_id(&self) -> VmId {
        self.vm.id
    }

    /// The bound file.
    pub fn memory(&self) -> &Arc<dyn RestrictedMemory> {
        &self.memory
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        let mut table = self.vm.slots.lock().unwrap_or_else(|e| e.into_inner());
        let delete = region(&self.memory, self.slot, self.gpa, self.offset, 0);
        // SAFETY: deleting a slot this Binding created; no memory is handed to
        // KVM by a delete.
        let result = unsafe { self.vm.fd.set_user_memory_region2(delete) };
        if result.is_ok() {
            table.remove(self.slot);
        } else {
            // KVM may still use the file's mapping: keep the file (and so the
            // mapping) alive for the life of the process rather than unmap
            // memory a live slot points at.
            std::mem::forget(Arc::clone(&self.memory));
        }
    }
}

impl Vm {
    /// Binds a range of `memory` into this VM (`KVM_SET_USER_MEMORY_REGION2`,
    /// with `KVM_MEM_GUEST_MEMFD` on guest_memfd).
    ///
    /// A file that belongs to no VM yet (a memfd created without one) belongs
    /// to this VM from its first successful binding on.
    ///
    /// # Errors
    /// In the kernel's order (spec §3.1), each leaving the VM unchanged:
    /// - `EINVAL`: [`BindError::Empty`], [`BindError::Unaligned`],
    ///   [`BindError::OffsetWraps`], [`BindError::InvalidSlot`],
    ///   [`BindError::GpaWraps`], [`BindError::TooLarge`],
    ///   [`BindError::SlotInUse`];
    /// - `EEXIST`: [`BindError::GpaOverlap`];
    /// - `EINVAL`: [`BindError::ForeignVm`], [`BindError::PastEnd`],
    ///   [`BindError::FileRangeOverlap`];
    /// - `ENOSPC`: [`BindError::NoFreeSlot`];
    /// - the kernel's errno: [`BindError::Kvm`].
    pub fn bind(
        &self,
        memory: &Arc<dyn RestrictedMemory>,
        req: SlotRequest,
    ) -> Result<Binding, BindError> {
        let vm = &self.inner;
        let mut table = vm.slots.lock().unwrap_or_else(|e| e.into_inner());
        let file = FileFacts::of(memory);
        let slot = table.check(vm.id, vm.max_slots(), file, req)?;
        let SlotRequest {
            guest_phys_addr: gpa,
            offset,
            len,
            ..
        } = req;
        let create = region(memory, slot, gpa, offset, len);
        // SAFETY: userspace_addr is the file's own mapping (or 0), which the
        // file owns and unmaps only on drop; the Binding returned below holds
        // the file until it has deleted this slot. `check` established that the
        // range is aligned, inside the file, overlaps no other slot's GPA range
        // and no other binding of the file, and that the file is this VM's.
        unsafe { vm.fd.set_user_memory_region2(create) }
            .map_err(|source| BindError::Kvm { slot, source })?;
        if let Err(owner) = memory.claim(vm.id) {
            // Lost a race with another VM's first binding: undo ours.
            let delete = region(memory, slot, gpa, offset, 0);
            // SAFETY: deleting the slot created just above.
            if unsafe { vm.fd.set_user_memory_region2(delete) }.is_err() {
                std::mem::forget(Arc::clone(memory));
            }
            return Err(BindError::ForeignVm { vm: vm.id, owner });
        }
        table.insert(slot, file, req);
        Ok(Binding {
            vm: Arc::clone(vm),
            memory: Arc::clone(memory),
            slot,
            gpa,
            offset,
            len,
        })
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
