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
//! A [`Binding`](crate::Binding) owns its slot: dropping it deletes the slot, and until then it
//! keeps both the file (whose mapping KVM uses) and the VM alive, so the VM
//! handle, the file and the bindings may be dropped in any order.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use thiserror::Error;

use crate::backing::{BackingKind, RestrictedMemory};
use crate::kvm::VmId;
use crate::range::{PAGE_SIZE, is_page_aligned};

/// `KVM_MEM_MAX_NR_PAGES` (generic KVM, every architecture): the most pages
/// one memslot may hold.
pub const MAX_SLOT_PAGES: u64 = (1 << 31) - 1;

/// A memslot id (within its address space, [`SlotRequest::address_space`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(pub u16);

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

bitflags::bitflags! {
    /// The memslot flags a caller may ask for (`KVM_MEM_*`). gmem adds
    /// `KVM_MEM_GUEST_MEMFD` itself on guest_memfd bindings, where the kernel
    /// refuses both of these (spec §3.1).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct MemslotFlags: u32 {
        /// `KVM_MEM_LOG_DIRTY_PAGES`: dirty logging.
        const LOG_DIRTY_PAGES = kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
        /// `KVM_MEM_READONLY`: guest writes exit as MMIO.
        const READONLY = kvm_bindings::KVM_MEM_READONLY;
    }
}

/// What to bind: `len` bytes of the file from `offset`, at guest physical
/// address `guest_phys_addr`, in slot `slot` (or the lowest free one) of
/// address space `address_space`, with memslot `flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotRequest {
    /// The slot id; `None` takes the lowest free slot.
    pub slot: Option<Slot>,
    /// The address space (`as_id`, bits 16–31 of KVM's slot field): 0, or
    /// 1 for x86's SMM address space where KVM has it.
    pub address_space: u16,
    /// Where the range appears in the guest.
    pub guest_phys_addr: u64,
    /// The file offset of the range (`guest_memfd_offset`).
    pub offset: u64,
    /// The length in bytes (`memory_size`).
    pub len: u64,
    /// Memslot flags.
    pub flags: MemslotFlags,
}

impl SlotRequest {
    /// Binds `[offset, offset + len)` at `guest_phys_addr`, in any free slot
    /// of address space 0, without flags.
    pub fn new(guest_phys_addr: u64, offset: u64, len: u64) -> Self {
        SlotRequest {
            slot: None,
            address_space: 0,
            guest_phys_addr,
            offset,
            len,
            flags: MemslotFlags::empty(),
        }
    }

    /// The same request for a given slot id.
    pub fn in_slot(self, slot: Slot) -> Self {
        SlotRequest {
            slot: Some(slot),
            ..self
        }
    }

    /// The same request in another address space.
    pub fn in_address_space(self, address_space: u16) -> Self {
        SlotRequest {
            address_space,
            ..self
        }
    }

    /// The same request with memslot flags.
    pub fn with_flags(self, flags: MemslotFlags) -> Self {
        SlotRequest { flags, ..self }
    }

    /// KVM's slot field: the address space in bits 16–31, the id below.
    pub fn kvm_slot(address_space: u16, slot: Slot) -> u32 {
        u32::from(address_space) << 16 | u32::from(slot.0)
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
    /// Memslot flags the kernel refuses on a guest_memfd binding.
    #[error(
        "memslot flags {flags:#x} are refused with KVM_MEM_GUEST_MEMFD: guest_memfd slots take neither LOG_DIRTY_PAGES (0x1) nor READONLY (0x2)"
    )]
    FlagsWithGuestMemfd {
        /// The flags asked for.
        flags: u32,
    },
    /// Memslot flags that do not exist.
    #[error(
        "memslot flags {flags:#x} include unknown bits (known: LOG_DIRTY_PAGES = 0x1, READONLY = 0x2)"
    )]
    UnknownFlags {
        /// The flags asked for.
        flags: u32,
    },
    /// The address space does not exist.
    #[error(
        "address space {address_space} does not exist: the VM has {max} (KVM_CAP_MULTI_ADDRESS_SPACE)"
    )]
    InvalidAddressSpace {
        /// The address space asked for.
        address_space: u16,
        /// How many the VM has.
        max: u16,
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
    /// The files of a two-backing slot are not a private and a shared side.
    #[error(
        "a two-backing slot of private side {private} and shared side {shared} is refused: {rule}"
    )]
    NotTwoSided {
        /// The private side's backing.
        private: BackingKind,
        /// The shared side's backing.
        shared: BackingKind,
        /// The rule broken.
        rule: &'static str,
    },
    /// Every memslot is in use.
    #[error("all {max} memslots are in use")]
    NoFreeSlot {
        /// How many the VM has.
        max: u32,
    },
    /// The bound range could not be mapped for KVM.
    #[error("mapping the range for slot {slot} (userspace_addr)")]
    Map {
        /// The slot.
        slot: Slot,
        /// The backing's error.
        #[source]
        source: crate::backing::BackingError,
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
            BindError::Map { source, .. } => source.errno(),
            _ => libc::EINVAL,
        }
    }
}

/// One bound slot, as the VM's slot table records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SlotEntry {
    gpa: u64,
    len: u64,
    /// The identities of the files bound (0: none, a slot the VMM owns).
    files: [usize; 2],
    offset: u64,
}

/// What the binding rules need to know of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileFacts {
    /// The file's identity (gmem uses the address of its shared allocation);
    /// never 0.
    pub id: usize,
    /// The VM the file belongs to, if any.
    pub owner: Option<VmId>,
    /// Its size in bytes.
    pub size: u64,
    /// Whether it is a guest_memfd (bound with `KVM_MEM_GUEST_MEMFD`).
    pub guest_memfd: bool,
}

impl FileFacts {
    /// The facts of a file that is not a guest_memfd.
    pub fn new(id: usize, owner: Option<VmId>, size: u64) -> FileFacts {
        FileFacts {
            id,
            owner,
            size,
            guest_memfd: false,
        }
    }

    /// The same facts for a guest_memfd.
    pub fn guest_memfd(self) -> FileFacts {
        FileFacts {
            guest_memfd: true,
            ..self
        }
    }

    /// The facts of `memory`.
    pub fn of(memory: &Arc<dyn RestrictedMemory>) -> FileFacts {
        FileFacts {
            id: Arc::as_ptr(memory).cast::<()>() as usize,
            owner: memory.owner(),
            size: memory.size(),
            guest_memfd: memory.kind() == BackingKind::GuestMemfd,
        }
    }
}

/// Limits of the VM the rules are checked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmLimits {
    /// The VM's id (files of other VMs are refused).
    pub vm: VmId,
    /// Memslots per address space (`KVM_CAP_NR_MEMSLOTS`).
    pub max_slots: u32,
    /// Address spaces (`KVM_CAP_MULTI_ADDRESS_SPACE`, at least 1).
    pub address_spaces: u16,
}

/// A VM's memslots, keyed by address space and slot id, and the binding
/// rules over them as a pure function: what [`Vm::bind`](crate::Vm::bind)
/// checks before it issues any ioctl. Public so that models and fuzzers can
/// drive the rules without KVM.
#[derive(Debug, Default)]
pub struct SlotTable {
    slots: BTreeMap<(u16, u16), SlotEntry>,
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b + b_len && b < a + a_len
}

impl SlotTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many slots are bound or reserved.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no slot is bound or reserved.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Records a binding of `file` that [`check`](Self::check) accepted.
    pub fn insert(&mut self, slot: Slot, file: FileFacts, req: SlotRequest) {
        self.insert_files(slot, &[file], req);
    }

    /// Records a binding of `files` (none for a slot the VMM owns, two for
    /// a private and a shared side) that [`check_files`](Self::check_files)
    /// accepted.
    pub fn insert_files(&mut self, slot: Slot, files: &[FileFacts], req: SlotRequest) {
        let mut ids = [0; 2];
        for (id, f) in ids.iter_mut().zip(files) {
            *id = f.id;
        }
        self.slots.insert(
            (req.address_space, slot.0),
            SlotEntry {
                gpa: req.guest_phys_addr,
                len: req.len,
                files: ids,
                offset: req.offset,
            },
        );
    }

    /// Forgets a deleted slot of address space 0; whether it was there.
    pub fn remove(&mut self, slot: Slot) -> bool {
        self.remove_in(0, slot)
    }

    /// Forgets a deleted slot; whether it was there.
    pub fn remove_in(&mut self, address_space: u16, slot: Slot) -> bool {
        self.slots.remove(&(address_space, slot.0)).is_some()
    }

    /// Applies the rules for `vm` (which has `max_slots` memslots and one
    /// address space) binding `file`; returns the slot to use.
    ///
    /// # Errors
    /// As [`check_files`](Self::check_files).
    pub fn check(
        &self,
        vm: VmId,
        max_slots: u32,
        file: FileFacts,
        req: SlotRequest,
    ) -> Result<Slot, BindError> {
        let limits = VmLimits {
            vm,
            max_slots,
            address_spaces: 1,
        };
        self.check_files(limits, &[file], req)
    }

    /// Applies the rules in the kernel's order (spec §3.1) for a VM with
    /// `limits` binding `files` (none: a slot the VMM owns; one; or a
    /// guest_memfd private side and a shared side, both at `req.offset`);
    /// returns the slot to use.
    ///
    /// # Errors
    /// As [`Vm::bind`](crate::Vm::bind), but for [`BindError::Kvm`].
    pub fn check_files(
        &self,
        limits: VmLimits,
        files: &[FileFacts],
        req: SlotRequest,
    ) -> Result<Slot, BindError> {
        let SlotRequest {
            slot,
            address_space,
            guest_phys_addr: gpa,
            offset,
            len,
            flags,
        } = req;
        // Step 1: flags.
        if flags.bits() & !MemslotFlags::all().bits() != 0 {
            return Err(BindError::UnknownFlags {
                flags: flags.bits(),
            });
        }
        if files.first().is_some_and(|f| f.guest_memfd) && !flags.is_empty() {
            return Err(BindError::FlagsWithGuestMemfd {
                flags: flags.bits(),
            });
        }
        // Step 2 of kvm_set_memory_region: size, then GPA.
        if len == 0 {
            return Err(BindError::Empty);
        }
        for (field, value) in [("memory_size", len), ("guest_phys_addr", gpa)] {
            if !is_page_aligned(value) {
                return Err(BindError::Unaligned { field, value });
            }
        }
        // Step 3: the file offset.
        if !is_page_aligned(offset) {
            return Err(BindError::Unaligned {
                field: "guest_memfd_offset",
                value: offset,
            });
        }
        if offset.checked_add(len).is_none() {
            return Err(BindError::OffsetWraps { offset, len });
        }
        // Step 4: address space, slot id, GPA wrap, slot size.
        if address_space >= limits.address_spaces {
            return Err(BindError::InvalidAddressSpace {
                address_space,
                max: limits.address_spaces,
            });
        }
        let max_slots = limits.max_slots;
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
                .find(|&id| !self.slots.contains_key(&(address_space, id)))
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
        if self.slots.contains_key(&(address_space, slot.0)) {
            return Err(BindError::SlotInUse { slot });
        }
        // Step 7: GPA overlap within the address space.
        if let Some((&(_, other), e)) = self
            .slots
            .iter()
            .find(|(key, e)| key.0 == address_space && overlaps(gpa, len, e.gpa, e.len))
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
        for file in files {
            if let Some(owner) = file.owner.filter(|&o| o != limits.vm) {
                return Err(BindError::ForeignVm {
                    vm: limits.vm,
                    owner,
                });
            }
            let size = file.size;
            if offset + len > size {
                return Err(BindError::PastEnd { offset, len, size });
            }
            if let Some((&(_, other), e)) = self
                .slots
                .iter()
                .find(|(_, e)| e.files.contains(&file.id) && overlaps(offset, len, e.offset, e.len))
            {
                return Err(BindError::FileRangeOverlap {
                    offset,
                    len,
                    other: Slot(other),
                    other_offset: e.offset,
                    other_len: e.len,
                });
            }
        }
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn file(id: usize, owner: Option<u64>) -> FileFacts {
        FileFacts::new(id, owner.map(VmId::from_raw), 16 * P)
    }

    fn limits(address_spaces: u16) -> VmLimits {
        VmLimits {
            vm: VmId::from_raw(1),
            max_slots: 8,
            address_spaces,
        }
    }

    #[test]
    fn memslot_flags_pass_through_but_not_with_guest_memfd() {
        let table = SlotTable::new();
        let req = SlotRequest::new(0, 0, P).with_flags(MemslotFlags::READONLY);
        assert!(table.check_files(limits(1), &[file(1, None)], req).is_ok());
        for flags in [MemslotFlags::READONLY, MemslotFlags::LOG_DIRTY_PAGES] {
            let req = SlotRequest::new(0, 0, P).with_flags(flags);
            let e = table
                .check_files(limits(1), &[file(1, None).guest_memfd()], req)
                .unwrap_err();
            assert!(matches!(e, BindError::FlagsWithGuestMemfd { .. }), "{e}");
            assert_eq!(e.errno(), libc::EINVAL);
        }
        let req = SlotRequest::new(0, 0, P).with_flags(MemslotFlags::from_bits_retain(1 << 7));
        let e = table
            .check_files(limits(1), &[file(1, None)], req)
            .unwrap_err();
        assert!(matches!(e, BindError::UnknownFlags { flags: 0x80 }), "{e}");
    }

    #[test]
    fn address_spaces_are_checked_and_separate() {
        let mut table = SlotTable::new();
        let req = SlotRequest::new(0, 0, P).in_slot(Slot(0));
        table.insert(Slot(0), file(1, None), req);
        // The same id and GPA in address space 1 is another slot.
        let smm = SlotRequest::new(0, P, P)
            .in_slot(Slot(0))
            .in_address_space(1);
        assert_eq!(
            table.check_files(limits(2), &[file(1, None)], smm).unwrap(),
            Slot(0)
        );
        let e = table
            .check_files(limits(1), &[file(1, None)], smm)
            .unwrap_err();
        assert!(
            matches!(
                e,
                BindError::InvalidAddressSpace {
                    address_space: 1,
                    max: 1
                }
            ),
            "{e}"
        );
        assert_eq!(SlotRequest::kvm_slot(1, Slot(3)), 0x1_0003);
    }

    #[test]
    fn a_reserved_slot_clashes_by_id_and_gpa() {
        let mut table = SlotTable::new();
        let vmm = SlotRequest::new(0x10_0000, 0, 0x10_0000).in_slot(Slot(2));
        let slot = table.check_files(limits(1), &[], vmm).unwrap();
        table.insert_files(slot, &[], vmm);
        let e = table
            .check_files(
                limits(1),
                &[file(1, None)],
                SlotRequest::new(0, 0, P).in_slot(Slot(2)),
            )
            .unwrap_err();
        assert!(matches!(e, BindError::SlotInUse { slot: Slot(2) }), "{e}");
        let e = table
            .check_files(
                limits(1),
                &[file(1, None)],
                SlotRequest::new(0x10_0000, 0, P),
            )
            .unwrap_err();
        assert!(
            matches!(e, BindError::GpaOverlap { other: Slot(2), .. }),
            "{e}"
        );
        // A free id is taken around it.
        let s = table
            .check_files(limits(1), &[file(1, None)], SlotRequest::new(0, 0, P))
            .unwrap();
        assert_eq!(s, Slot(0));
    }

    #[test]
    fn both_sides_of_a_two_backing_slot_are_checked() {
        let mut table = SlotTable::new();
        let private = file(1, None).guest_memfd();
        let shared = file(2, None);
        let req = SlotRequest::new(0, 0, 4 * P);
        let slot = table
            .check_files(limits(1), &[private, shared], req)
            .unwrap();
        table.insert_files(slot, &[private, shared], req);
        // The shared file's range is taken too.
        let e = table
            .check_files(limits(1), &[shared], SlotRequest::new(1 << 30, 2 * P, P))
            .unwrap_err();
        assert!(matches!(e, BindError::FileRangeOverlap { .. }), "{e}");
        let other = FileFacts::new(3, Some(VmId::from_raw(9)), 16 * P);
        let e = table
            .check_files(
                limits(1),
                &[private, other],
                SlotRequest::new(1 << 30, 8 * P, P),
            )
            .unwrap_err();
        assert!(matches!(e, BindError::ForeignVm { .. }), "{e}");
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
