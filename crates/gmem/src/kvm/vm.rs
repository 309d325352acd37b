//! The VM handle: one KVM VM, its capabilities, its memslot table, and the
//! bindings of restricted memory into its memslots ([`Vm::bind`],
//! [`Binding`]), checked by the pure rules of [`crate::binding`].

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use kvm_bindings::{KVM_MEM_GUEST_MEMFD, kvm_userspace_memory_region2};
use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;

pub use super::id::VmId;
use super::uapi::KVM_CAP_GUEST_MEMFD_FLAGS;
use crate::backing::{BackingKind, RestrictedMemory};
use crate::binding::{BindError, FileFacts, Slot, SlotRequest, SlotTable};

/// The x86 VM types of `KVM_CAP_VM_TYPES` (spec §1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
#[non_exhaustive]
pub enum VmType {
    /// `KVM_X86_DEFAULT_VM` (0).
    Default,
    /// `KVM_X86_SW_PROTECTED_VM` (1).
    SwProtected,
    /// `KVM_X86_SEV_VM` (2).
    Sev,
    /// `KVM_X86_SEV_ES_VM` (3).
    SevEs,
    /// `KVM_X86_SNP_VM` (4).
    SevSnp,
    /// `KVM_X86_TDX_VM` (5).
    Tdx,
}

impl VmType {
    /// Every type, in the kernel's bit order.
    pub const ALL: [VmType; 6] = [
        VmType::Default,
        VmType::SwProtected,
        VmType::Sev,
        VmType::SevEs,
        VmType::SevSnp,
        VmType::Tdx,
    ];

    /// The kernel's number for the type (the bit in `KVM_CAP_VM_TYPES`).
    pub fn raw(self) -> u64 {
        self as u64
    }

    /// The name used in probe output.
    pub fn name(self) -> &'static str {
        match self {
            VmType::Default => "default",
            VmType::SwProtected => "sw-protected",
            VmType::Sev => "sev",
            VmType::SevEs => "sev-es",
            VmType::SevSnp => "sev-snp",
            VmType::Tdx => "tdx",
        }
    }
}

/// Why a VM could not be had.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open /dev/kvm (is the kvm module loaded, and may this user read and write /dev/kvm?)"
    )]
    Open(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM for VM type {vm_type} failed")]
    CreateVm {
        /// The VM type asked for.
        vm_type: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl KvmError {
    /// The errno the kernel gave.
    pub fn errno(&self) -> i32 {
        match self {
            KvmError::Open(e) | KvmError::CreateVm { source: e, .. } => e.errno(),
        }
    }
}

pub(crate) struct VmInner {
    pub(crate) id: VmId,
    pub(crate) fd: VmFd,
    pub(crate) vm_type: VmType,
    pub(crate) slots: Mutex<SlotTable>,
    /// Whether a gatekeeper owns this VM's memory now.
    pub(crate) gated: std::sync::atomic::AtomicBool,
    // Kept so the system fd lives as long as the VM: vCPU mmap sizes and caps come from it.
    pub(crate) kvm: Kvm,
}

/// The capabilities of one VM type, read once per process on the first VM
/// that needs them: they are properties of the kernel and the VM type, and
/// each ioctl costs microseconds on nested hosts, which a launch should not
/// pay again and again.
struct VmCaps {
    gmem_flags: OnceLock<u64>,
    guest_memfd: OnceLock<bool>,
    memory_attributes: OnceLock<u64>,
    max_slots: OnceLock<u32>,
}

#[expect(
    clippy::declare_interior_mutable_const,
    reason = "only used to initialise CAPS, each element its own OnceLocks"
)]
const NO_CAPS: VmCaps = VmCaps {
    gmem_flags: OnceLock::new(),
    guest_memfd: OnceLock::new(),
    memory_attributes: OnceLock::new(),
    max_slots: OnceLock::new(),
};

/// Per VM type, in `VmType::raw` order.
static CAPS: [VmCaps; 6] = [NO_CAPS; 6];

impl VmInner {
    fn caps(&self) -> &'static VmCaps {
        &CAPS[self.vm_type.raw() as usize]
    }

    fn cap(&self, nr: u32) -> u64 {
        u64::try_from(self.fd.check_extension_raw(nr.into())).unwrap_or(0)
    }

    /// `KVM_CAP_NR_MEMSLOTS`.
    pub(crate) fn max_slots(&self) -> u32 {
        *self
            .caps()
            .max_slots
            .get_or_init(|| u32::try_from(self.kvm.get_nr_memslots()).unwrap_or(u32::MAX))
    }
}

/// A KVM VM. Cheap to clone: clones share the VM, and a binding keeps the VM
/// alive until it is dropped, so the handle, the memory and the bindings may be
/// dropped in any order.
#[derive(Clone)]
pub struct Vm {
    pub(crate) inner: Arc<VmInner>,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.inner.id)
            .field("vm_type", &self.inner.vm_type)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates a default VM (`KVM_CREATE_VM` type 0) on `/dev/kvm`.
    ///
    /// # Errors
    /// [`KvmError::Open`] without a usable `/dev/kvm`; [`KvmError::CreateVm`]
    /// if the kernel refuses the VM.
    pub fn new() -> Result<Vm, KvmError> {
        Vm::with_type(VmType::Default)
    }

    /// Creates a VM of the given type.
    ///
    /// # Errors
    /// As [`Vm::new`]; an unsupported type gives `CreateVm` with `EINVAL`.
    pub fn with_type(vm_type: VmType) -> Result<Vm, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let fd = create_vm_retrying(&kvm, vm_type.raw()).map_err(|source| KvmError::CreateVm {
            vm_type: vm_type.name(),
            source,
        })?;
        Ok(Vm {
            inner: Arc::new(VmInner {
                id: VmId::next(),
                fd,
                vm_type,
                slots: Mutex::new(SlotTable::default()),
                gated: Default::default(),
                kvm,
            }),
        })
    }

    /// This VM's process-unique id.
    pub fn id(&self) -> VmId {
        self.inner.id
    }

    /// The VM type it was created with.
    pub fn vm_type(&self) -> VmType {
        self.inner.vm_type
    }

    /// The guest_memfd creation flags this VM accepts
    /// (`KVM_CAP_GUEST_MEMFD_FLAGS` on the VM fd; 0 on kernels before 6.18).
    pub fn supported_gmem_flags(&self) -> u64 {
        let inner = &self.inner;
        *inner
            .caps()
            .gmem_flags
            .get_or_init(|| inner.cap(KVM_CAP_GUEST_MEMFD_FLAGS))
    }

    /// Whether `KVM_CREATE_GUEST_MEMFD` exists (`KVM_CAP_GUEST_MEMFD`).
    pub fn has_guest_memfd(&self) -> bool {
        let inner = &self.inner;
        *inner
            .caps()
            .guest_memfd
            .get_or_init(|| inner.fd.check_extension(Cap::GuestMemfd))
    }

    /// `KVM_CAP_MEMORY_ATTRIBUTES` on the VM fd: the attributes
    /// `KVM_SET_MEMORY_ATTRIBUTES` accepts for this VM (bit 3 = PRIVATE; 0
    /// where the kernel has no memory attributes).
    pub fn memory_attributes(&self) -> u64 {
        let inner = &self.inner;
        *inner
            .caps()
            .memory_attributes
            .get_or_init(|| inner.cap(kvm_bindings::KVM_CAP_MEMORY_ATTRIBUTES))
    }

    /// How many memslots the VM has (`KVM_CAP_NR_MEMSLOTS`).
    pub fn max_slots(&self) -> u32 {
        self.inner.max_slots()
    }

    /// The VM fd, for ioctls gmem does not wrap (vCPU creation, for example).
    pub fn fd(&self) -> &VmFd {
        &self.inner.fd
    }

    /// A handle that does not keep the VM alive: to find out whether it is
    /// gone (every handle, binding and vCPU of gmem's dropped).
    pub fn downgrade(&self) -> WeakVm {
        WeakVm(Arc::downgrade(&self.inner))
    }

    /// The `/dev/kvm` handle the VM was created from.
    pub fn kvm(&self) -> &Kvm {
        &self.inner.kvm
    }
}

/// `KVM_CREATE_VM` can fail with EINTR while the kernel tears down an earlier
/// VM's MMU (QEMU and Firecracker retry it the same way); retry only that.
fn create_vm_retrying(kvm: &Kvm, vm_type: u64) -> Result<VmFd, kvm_ioctls::Error> {
    loop {
        match kvm.create_vm_with_type(vm_type) {
            Err(e) if e.errno() == libc::EINTR => continue,
            other => return other,
        }
    }
}

/// A [`Vm`] handle that does not keep the VM alive.
#[derive(Clone, Debug)]
pub struct WeakVm(Weak<VmInner>);

impl WeakVm {
    /// The VM, if anything still keeps it alive.
    pub fn upgrade(&self) -> Option<Vm> {
        self.0.upgrade().map(|inner| Vm { inner })
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
