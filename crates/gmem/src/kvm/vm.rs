//! The VM handle: one KVM VM, its capabilities and its memslot table.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;

use super::uapi::KVM_CAP_GUEST_MEMFD_FLAGS;
use crate::binding::SlotTable;

/// A process-unique identifier of a [`Vm`]; files remember the VM they were
/// created for by this id ("one VM per file", spec §3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(u64);

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm#{}", self.0)
    }
}

impl VmId {
    /// An id from a number, for models and tests of the binding rules
    /// ([`crate::binding::SlotTable`]); real VMs get theirs from [`Vm::new`].
    pub fn from_raw(id: u64) -> VmId {
        VmId(id)
    }

    pub(crate) fn next() -> VmId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        VmId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// The x86 VM types of `KVM_CAP_VM_TYPES` (spec §1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
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
