//! The VM handle: one KVM VM, its capabilities, its memslot table, and the
//! bindings of restricted memory into its memslots ([`Vm::bind`],
//! [`Binding`]), checked by the pure rules of [`crate::binding`].

use std::fmt;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use kvm_bindings::{KVM_MEM_GUEST_MEMFD, kvm_userspace_memory_region2};
use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;

pub use super::id::VmId;
use super::uapi::KVM_CAP_GUEST_MEMFD_FLAGS;
use crate::backing::file::HostWindow;
use crate::backing::{BackingKind, GmemFlags, RestrictedMemory};
use crate::binding::{BindError, FileFacts, Slot, SlotRequest, SlotTable, VmLimits};

/// The VM types of `KVM_CAP_VM_TYPES` (spec §1.4). On x86-64 they are the
/// kernel's `KVM_X86_*_VM` numbers; other architectures have only the
/// default type here (arm64's VM type encodes the IPA size instead, which
/// gmem does not model yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
#[non_exhaustive]
pub enum VmType {
    /// `KVM_X86_DEFAULT_VM` (0), or type 0 elsewhere.
    Default,
    /// `KVM_X86_SW_PROTECTED_VM` (1).
    #[cfg(target_arch = "x86_64")]
    SwProtected,
    /// `KVM_X86_SEV_VM` (2).
    #[cfg(target_arch = "x86_64")]
    Sev,
    /// `KVM_X86_SEV_ES_VM` (3).
    #[cfg(target_arch = "x86_64")]
    SevEs,
    /// `KVM_X86_SNP_VM` (4).
    #[cfg(target_arch = "x86_64")]
    SevSnp,
    /// `KVM_X86_TDX_VM` (5).
    #[cfg(target_arch = "x86_64")]
    Tdx,
}

impl VmType {
    /// Every type, in the kernel's bit order.
    #[cfg(target_arch = "x86_64")]
    pub const ALL: &'static [VmType] = &[
        VmType::Default,
        VmType::SwProtected,
        VmType::Sev,
        VmType::SevEs,
        VmType::SevSnp,
        VmType::Tdx,
    ];
    /// Every type (only the default one off x86-64).
    #[cfg(not(target_arch = "x86_64"))]
    pub const ALL: &'static [VmType] = &[VmType::Default];

    /// The kernel's number for the type (the bit in `KVM_CAP_VM_TYPES`).
    pub fn raw(self) -> u64 {
        self as u64
    }

    /// The name used in probe output.
    pub fn name(self) -> &'static str {
        match self {
            VmType::Default => "default",
            #[cfg(target_arch = "x86_64")]
            VmType::SwProtected => "sw-protected",
            #[cfg(target_arch = "x86_64")]
            VmType::Sev => "sev",
            #[cfg(target_arch = "x86_64")]
            VmType::SevEs => "sev-es",
            #[cfg(target_arch = "x86_64")]
            VmType::SevSnp => "sev-snp",
            #[cfg(target_arch = "x86_64")]
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
    /// An fd offered as a VM is not one.
    #[error("the fd is {is:?}, not a KVM VM (anon_inode:kvm-vm)")]
    NotAVm {
        /// What `/proc/self/fd` says it is.
        is: String,
    },
    /// An fd offered as a VM is a VM gmem has already, of another type.
    #[error(
        "the fd is {vm}, which gmem has as a {known} VM, not {given}: one kernel VM has one gmem handle (kcmp(2) says the fds are the same open file)"
    )]
    TypeMismatch {
        /// The VM gmem has.
        vm: VmId,
        /// Its type.
        known: &'static str,
        /// The type given now.
        given: &'static str,
    },
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
            KvmError::NotAVm { .. } | KvmError::TypeMismatch { .. } => libc::EINVAL,
        }
    }
}

pub(crate) struct VmInner {
    pub(crate) id: VmId,
    pub(crate) fd: VmFd,
    pub(crate) vm_type: VmType,
    /// Where its capabilities are cached: per type for VMs gmem created (the
    /// type is certain), per VM for adopted ones (the type is the caller's
    /// word, and a wrong one must not poison other VMs of that type).
    caps: CapsCache,
    pub(crate) slots: Mutex<SlotTable>,
    /// Whether a gatekeeper owns this VM's memory now.
    pub(crate) gated: std::sync::atomic::AtomicBool,
    // Kept so the system fd lives as long as the VM: vCPU mmap sizes and caps come from it.
    pub(crate) kvm: Kvm,
}

/// Reads capability `nr` with `check` (`KVM_CHECK_EXTENSION` on the system
/// or a VM fd): the one place capabilities are read, a negative answer
/// being 0.
pub(crate) fn read_cap(check: impl FnOnce(u64) -> i32, nr: u32) -> u64 {
    u64::try_from(check(nr.into())).unwrap_or(0)
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
    address_spaces: OnceLock<u16>,
    sync_regs: OnceLock<bool>,
    exit_hypercall: OnceLock<u64>,
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
    address_spaces: OnceLock::new(),
    sync_regs: OnceLock::new(),
    exit_hypercall: OnceLock::new(),
};

/// Per VM type, in `VmType::raw` order.
static CAPS: [VmCaps; 6] = [NO_CAPS; 6];

/// A VM's capability cache: its type's (process-wide), or its own.
enum CapsCache {
    Type(&'static VmCaps),
    Own(Box<VmCaps>),
}

impl VmInner {
    fn caps(&self) -> &VmCaps {
        match &self.caps {
            CapsCache::Type(caps) => caps,
            CapsCache::Own(caps) => caps,
        }
    }

    fn cap(&self, nr: u32) -> u64 {
        read_cap(|nr| self.fd.check_extension_raw(nr), nr)
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
        let caps = CapsCache::Type(&CAPS[vm_type.raw() as usize]);
        Ok(register_vm(Vm::wrap(kvm, fd, vm_type, caps)))
    }

    /// Adopts a VM the VMM created itself (its own `KVM_CREATE_VM`) of
    /// `vm_type` (the kernel does not reveal a VM's type: pass the one it
    /// was created with; its capabilities are then read from this VM alone,
    /// never from a cache other VMs share). gmem then binds memory into it beside the VMM's
    /// own memslots; declare those with [`Vm::reserve_slot`], so that an id
    /// or GPA clash is refused instead of overwriting them.
    ///
    /// An fd of a VM gmem has already (a `dup` of a [`Vm`]'s fd) gives that
    /// same [`Vm`] back (the fd given is closed): one kernel VM has one gmem
    /// handle, one slot table and one gatekeeper.
    ///
    /// ```
    /// use gmem::{Vm, VmType};
    ///
    /// let Ok(kvm) = kvm_ioctls::Kvm::new() else { return Ok(()) }; // no /dev/kvm
    /// let fd = kvm.create_vm().expect("KVM_CREATE_VM");
    /// let vm = Vm::from_vm_fd(fd, VmType::Default)?;
    /// assert!(vm.max_slots() > 0);
    /// # Ok::<(), gmem::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`KvmError::Open`] if `/dev/kvm` (for the system capabilities) cannot
    /// be opened; [`KvmError::TypeMismatch`] for a VM gmem has with another
    /// type.
    pub fn from_vm_fd(fd: VmFd, vm_type: VmType) -> Result<Vm, KvmError> {
        adopt_vm(fd.as_raw_fd(), vm_type, || {
            let kvm = Kvm::new().map_err(KvmError::Open)?;
            let caps = CapsCache::Own(Box::new(NO_CAPS));
            Ok(Vm::wrap(kvm, fd, vm_type, caps))
        })
    }

    /// This VM, if it has `vm_type`; the error otherwise.
    fn same_type(self, vm_type: VmType) -> Result<Vm, KvmError> {
        if self.vm_type() == vm_type {
            Ok(self)
        } else {
            Err(KvmError::TypeMismatch {
                vm: self.id(),
                known: self.vm_type().name(),
                given: vm_type.name(),
            })
        }
    }

    /// Adopts a VM fd held as an [`OwnedFd`], checking first that it is a
    /// KVM VM (`anon_inode:kvm-vm`).
    ///
    /// # Errors
    /// [`KvmError::NotAVm`] naming what the fd is (the fd is closed then,
    /// nothing else is touched); [`KvmError::Open`] as [`Vm::from_vm_fd`].
    pub fn from_owned_fd(fd: OwnedFd, vm_type: VmType) -> Result<Vm, KvmError> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if link != "anon_inode:kvm-vm" {
            return Err(KvmError::NotAVm { is: link });
        }
        adopt_vm(fd.as_raw_fd(), vm_type, || {
            let kvm = Kvm::new().map_err(KvmError::Open)?;
            // The vCPU mmap size is what create_vmfd_from_rawfd asks first;
            // if it fails there, the fd would leak, so ask here while the fd
            // is owned.
            kvm.get_vcpu_mmap_size().map_err(KvmError::Open)?;
            // SAFETY: the raw fd comes out of an OwnedFd this call owns, so
            // nothing else owns or closes it, and it is a KVM VM fd (checked
            // above); the VmFd owns it from here on.
            let vm_fd =
                unsafe { kvm.create_vmfd_from_rawfd(fd.into_raw_fd()) }.map_err(KvmError::Open)?;
            let caps = CapsCache::Own(Box::new(NO_CAPS));
            Ok(Vm::wrap(kvm, vm_fd, vm_type, caps))
        })
    }

    fn wrap(kvm: Kvm, fd: VmFd, vm_type: VmType, caps: CapsCache) -> Vm {
        Vm {
            inner: Arc::new(VmInner {
                id: VmId::next(),
                fd,
                vm_type,
                caps,
                slots: Mutex::new(SlotTable::default()),
                gated: Default::default(),
                kvm,
            }),
        }
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

    /// The backing a VMM should create this VM's memory on: guest-memfd
    /// where this VM's KVM can create one the host can load a guest into
    /// (`MMAP|INIT_SHARED`, Linux 6.18), the sealed memfd otherwise (kernels
    /// before 6.8, KVMs built without guest_memfd, 6.8–6.17 without `MMAP`).
    ///
    /// ```
    /// use gmem::{BackingKind, MemoryOptions, Vm, create_memory};
    ///
    /// let Ok(vm) = Vm::new() else { return Ok(()) }; // no /dev/kvm here
    /// let kind = vm.preferred_backing();
    /// let mem = create_memory(MemoryOptions::new(kind, 2 << 20), Some(&vm))?;
    /// assert_eq!(mem.kind(), kind);
    /// # Ok::<(), gmem::Error>(())
    /// ```
    pub fn preferred_backing(&self) -> BackingKind {
        let both = (GmemFlags::MMAP | GmemFlags::INIT_SHARED).bits();
        if self.has_guest_memfd() && self.supported_gmem_flags() & both == both {
            BackingKind::GuestMemfd
        } else {
            BackingKind::Memfd
        }
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

    /// How many memslots the VM has per address space (`KVM_CAP_NR_MEMSLOTS`).
    pub fn max_slots(&self) -> u32 {
        self.inner.max_slots()
    }

    /// Whether `KVM_RUN` can return registers through `kvm_run`
    /// (`KVM_CAP_SYNC_REGS`).
    pub fn has_sync_regs(&self) -> bool {
        let inner = &self.inner;
        *inner
            .caps()
            .sync_regs
            .get_or_init(|| inner.cap(kvm_bindings::KVM_CAP_SYNC_REGS) != 0)
    }

    /// The hypercalls that can exit to userspace (`KVM_CAP_EXIT_HYPERCALL`,
    /// a bit per hypercall number).
    pub fn exit_hypercall_mask(&self) -> u64 {
        let inner = &self.inner;
        *inner
            .caps()
            .exit_hypercall
            .get_or_init(|| inner.cap(kvm_bindings::KVM_CAP_EXIT_HYPERCALL))
    }

    /// How many address spaces the VM has (`KVM_CAP_MULTI_ADDRESS_SPACE`;
    /// 2 on x86 with SMM, else 1).
    pub fn address_spaces(&self) -> u16 {
        let inner = &self.inner;
        *inner.caps().address_spaces.get_or_init(|| {
            u16::try_from(inner.cap(kvm_bindings::KVM_CAP_MULTI_ADDRESS_SPACE))
                .unwrap_or(1)
                .max(1)
        })
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

/// Every live VM of this process, so that an fd of a VM gmem has already (a
/// `dup` of its fd, handed back by a VMM) is recognised as that VM: one
/// kernel VM has one gmem handle, one slot table and one gatekeeper.
static VMS: Mutex<Vec<Weak<VmInner>>> = Mutex::new(Vec::new());

fn vms() -> std::sync::MutexGuard<'static, Vec<Weak<VmInner>>> {
    // Only pushes and retains: consistent even after a panic elsewhere.
    VMS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records `vm` among the live VMs (and forgets the dead ones).
fn register_vm(vm: Vm) -> Vm {
    let mut all = vms();
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(&vm.inner));
    vm
}

/// The live gmem VM whose fd is the same open file as `fd`, or else the VM
/// `make` builds, registered: under one hold of the registry's lock, so
/// that two threads adopting dups of one VM at once get one `Vm`.
fn adopt_vm(
    fd: std::os::fd::RawFd,
    vm_type: VmType,
    make: impl FnOnce() -> Result<Vm, KvmError>,
) -> Result<Vm, KvmError> {
    let mut all = vms();
    let known = all
        .iter()
        .filter_map(Weak::upgrade)
        .find(|inner| same_open_file(fd, inner.fd.as_raw_fd()));
    if let Some(inner) = known {
        drop(all);
        return Vm { inner }.same_type(vm_type);
    }
    let vm = make()?;
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(&vm.inner));
    Ok(vm)
}

/// `KCMP_FILE` (`<linux/kcmp.h>`; the libc crate lacks the constant).
const KCMP_FILE: libc::c_int = 0;

/// Whether fds `a` and `b` of this process are the same open file
/// (`kcmp(2)` with `KCMP_FILE`: every KVM VM fd is the one anonymous inode
/// `kvm-vm`, so only the open file tells two VMs apart). A kernel without
/// kcmp (no `CONFIG_KCMP`) cannot tell: the fds count as different, and
/// the threat model says so.
fn same_open_file(a: std::os::fd::RawFd, b: std::os::fd::RawFd) -> bool {
    let pid = std::process::id() as libc::pid_t;
    // SAFETY: kcmp only compares two fd table entries of this process; it
    // reads no memory of ours and changes nothing.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    rc == 0
}

/// How many times `KVM_CREATE_VM` is tried while it fails with `EINTR`.
const CREATE_VM_TRIES: u32 = 64;

/// `KVM_CREATE_VM` can fail with EINTR while the kernel tears down an earlier
/// VM's MMU (QEMU and Firecracker retry it the same way); retry only that,
/// and a bounded number of times.
fn create_vm_retrying(kvm: &Kvm, vm_type: u64) -> Result<VmFd, kvm_ioctls::Error> {
    let mut tries = 1;
    loop {
        match kvm.create_vm_with_type(vm_type) {
            Err(e) if e.errno() == libc::EINTR && tries < CREATE_VM_TRIES => tries += 1,
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

/// The files of a binding: the one whose mapping is KVM's `userspace_addr`
/// (the host side), and the guest_memfd KVM backs private memory with, if
/// it is another file (the two-backing layout of SEV-SNP and TDX VMMs).
#[derive(Clone)]
struct Files {
    host: Arc<dyn RestrictedMemory>,
    private: Option<Arc<dyn RestrictedMemory>>,
}

impl Files {
    /// The guest_memfd of the slot, if any.
    fn guest_memfd(&self) -> Option<&Arc<dyn RestrictedMemory>> {
        self.private
            .as_ref()
            .or(Some(&self.host).filter(|m| m.kind() == BackingKind::GuestMemfd))
    }

    fn facts(&self) -> Vec<FileFacts> {
        match &self.private {
            Some(p) => vec![FileFacts::of(p), FileFacts::of(&self.host)],
            None => vec![FileFacts::of(&self.host)],
        }
    }

    /// Records `vm` as the owner of every file; the owner of one that is
    /// another VM's.
    fn claim(&self, vm: VmId) -> Result<(), VmId> {
        if let Some(p) = &self.private {
            p.claim(vm)?;
        }
        self.host.claim(vm)
    }
}

/// Builds the memslot for a binding (size 0 deletes it); `window` is the
/// host side's mapping of the bound range, if it may be mapped.
fn memslot(
    files: Option<&Files>,
    window: Option<&HostWindow>,
    address_space: u16,
    slot: Slot,
    req: &SlotRequest,
    len: u64,
) -> kvm_userspace_memory_region2 {
    let offset = req.offset;
    let gmem = files.and_then(Files::guest_memfd);
    let flags = req.flags.bits()
        | if gmem.is_some() {
            KVM_MEM_GUEST_MEMFD
        } else {
            0
        };
    kvm_userspace_memory_region2 {
        slot: SlotRequest::kvm_slot(address_space, slot),
        flags,
        guest_phys_addr: req.guest_phys_addr,
        memory_size: len,
        // KVM's own accesses go through userspace_addr even on gmem slots, so
        // it is the host side's own mapping (spec §3.6), or 0 if it has none.
        userspace_addr: window.map_or(0, |w| w.addr() as u64),
        guest_memfd_offset: if gmem.is_some() { offset } else { 0 },
        guest_memfd: gmem.map_or(0, |m| {
            u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&m.core().fd())).unwrap_or(u32::MAX)
        }),
        pad1: 0,
        pad2: [0; 14],
    }
}

/// A bound slot. Dropping it deletes the slot.
pub struct Binding {
    vm: Arc<VmInner>,
    files: Files,
    /// The host side's mapping of the range: KVM's `userspace_addr`. Its
    /// `Drop` runs after the slot is deleted (fields drop after `drop`).
    window: Option<HostWindow>,
    slot: Slot,
    req: SlotRequest,
}

impl fmt::Debug for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Binding")
            .field("vm", &self.vm.id)
            .field("address_space", &self.req.address_space)
            .field("slot", &self.slot)
            .field("gpa", &format_args!("{:#x}", self.req.guest_phys_addr))
            .field("offset", &format_args!("{:#x}", self.req.offset))
            .field("len", &format_args!("{:#x}", self.req.len))
            .field("kind", &self.files.host.kind())
            .field("private_side", &self.files.private.is_some())
            .finish()
    }
}

impl Binding {
    /// The slot id.
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// The address space of the slot.
    pub fn address_space(&self) -> u16 {
        self.req.address_space
    }

    /// The guest physical address of the range.
    pub fn guest_phys_addr(&self) -> u64 {
        self.req.guest_phys_addr
    }

    /// The file offset of the range (in both files of a two-backing slot).
    pub fn offset(&self) -> u64 {
        self.req.offset
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.req.len
    }

    /// Always false: bindings are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memslot flags asked for (gmem adds `KVM_MEM_GUEST_MEMFD`).
    pub fn flags(&self) -> crate::binding::MemslotFlags {
        self.req.flags
    }

    /// The host side's mapping of the bound range (its first byte), for the
    /// gatekeeper's copies; `None` if the file may not be mapped.
    pub(crate) fn host_ptr(&self) -> Option<*mut u8> {
        self.window.as_ref().map(|w| w.addr() as *mut u8)
    }

    /// The VM the slot is in.
    pub fn vm_id(&self) -> VmId {
        self.vm.id
    }

    /// The file at KVM's `userspace_addr`: the bound file, or the shared
    /// side of a two-backing slot.
    pub fn memory(&self) -> &Arc<dyn RestrictedMemory> {
        &self.files.host
    }

    /// The private side of a two-backing slot ([`Vm::bind_two`]): the
    /// guest_memfd KVM backs private memory with.
    pub fn private_memory(&self) -> Option<&Arc<dyn RestrictedMemory>> {
        self.files.private.as_ref()
    }
}

impl Binding {
    /// Turns KVM's dirty log on or off for the slot: the memslot is set
    /// again with `KVM_MEM_LOG_DIRTY_PAGES` added or removed (a flags-only
    /// change, which KVM allows on a live slot). Off leaves the flags the
    /// binding was made with, so a slot the VMM asked to log keeps logging.
    /// Refused (`EINVAL`, before any ioctl) on a guest_memfd slot, where
    /// the kernel does not log dirty pages.
    pub(crate) fn set_dirty_logging(&self, on: bool) -> Result<(), kvm_ioctls::Error> {
        if self.files.guest_memfd().is_some() {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        let mut req = self.req;
        if on {
            req.flags |= crate::binding::MemslotFlags::LOG_DIRTY_PAGES;
        }
        let region = memslot(
            Some(&self.files),
            self.window.as_ref(),
            self.req.address_space,
            self.slot,
            &req,
            req.len,
        );
        // SAFETY: the same slot, GPA, size and userspace_addr this Binding
        // created (its mapping, which it keeps alive until the slot is
        // deleted); only the dirty-logging flag differs.
        unsafe { self.vm.fd.set_user_memory_region2(region) }
    }

    /// Whether the slot is a guest_memfd slot (KVM logs no dirty pages
    /// there).
    pub(crate) fn is_guest_memfd(&self) -> bool {
        self.files.guest_memfd().is_some()
    }

    /// `KVM_GET_DIRTY_LOG` for the slot: one bit per 4 KiB page written
    /// by the guest since the last call (which the call clears).
    pub(crate) fn take_dirty_log(&self) -> Result<Vec<u64>, kvm_ioctls::Error> {
        self.vm.fd.get_dirty_log(
            SlotRequest::kvm_slot(self.req.address_space, self.slot),
            usize::try_from(self.req.len).unwrap_or(usize::MAX),
        )
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        let mut table = self.vm.slots.lock().unwrap_or_else(|e| e.into_inner());
        let delete = memslot(
            Some(&self.files),
            self.window.as_ref(),
            self.req.address_space,
            self.slot,
            &self.req,
            0,
        );
        // SAFETY: deleting a slot this Binding created; no memory is handed to
        // KVM by a delete.
        let result = unsafe { self.vm.fd.set_user_memory_region2(delete) };
        if result.is_ok() {
            table.remove_in(self.req.address_space, self.slot);
        } else {
            // KVM may still use the mapping: keep it and the files alive for
            // the life of the process rather than unmap memory a live slot
            // points at.
            std::mem::forget(self.files.clone());
            std::mem::forget(self.window.take());
        }
    }
}

/// A memslot the VMM created itself, recorded so that gmem's bindings never
/// reuse its id or overlap its GPA range ([`Vm::reserve_slot`]). Dropping it
/// forgets the slot (the VMM deletes its slot itself).
pub struct SlotReservation {
    vm: Arc<VmInner>,
    address_space: u16,
    slot: Slot,
}

impl fmt::Debug for SlotReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotReservation")
            .field("vm", &self.vm.id)
            .field("address_space", &self.address_space)
            .field("slot", &self.slot)
            .finish()
    }
}

impl SlotReservation {
    /// The reserved slot id.
    pub fn slot(&self) -> Slot {
        self.slot
    }
}

impl Drop for SlotReservation {
    fn drop(&mut self) {
        let mut table = self.vm.slots.lock().unwrap_or_else(|e| e.into_inner());
        table.remove_in(self.address_space, self.slot);
    }
}

impl Vm {
    /// The limits the binding rules check against.
    pub fn limits(&self) -> VmLimits {
        VmLimits {
            vm: self.inner.id,
            max_slots: self.inner.max_slots(),
            address_spaces: self.address_spaces(),
        }
    }

    /// Binds a range of `memory` into this VM (`KVM_SET_USER_MEMORY_REGION2`,
    /// with `KVM_MEM_GUEST_MEMFD` on guest_memfd).
    ///
    /// A file that belongs to no VM yet (a memfd created without one) belongs
    /// to this VM from its first successful binding on.
    ///
    /// ```
    /// use gmem::{BackingKind, MemoryOptions, SlotRequest, Vm, create_memory};
    ///
    /// let Ok(vm) = Vm::new() else { return Ok(()) }; // no /dev/kvm here
    /// let mem = create_memory(MemoryOptions::new(BackingKind::Memfd, 4 << 20), Some(&vm))?;
    /// let low = vm.bind(&mem, SlotRequest::new(0, 0, 2 << 20))?;
    /// // The same file range twice is refused, with the kernel's errno.
    /// let e = vm.bind(&mem, SlotRequest::new(1 << 30, 0, 2 << 20)).unwrap_err();
    /// assert_eq!(e.errno(), libc::EINVAL);
    /// drop(low); // deletes the slot
    /// # Ok::<(), gmem::Error>(())
    /// ```
    ///
    /// # Errors
    /// In the kernel's order (spec §3.1), each leaving the VM unchanged:
    /// - `EINVAL`: [`BindError::UnknownFlags`],
    ///   [`BindError::FlagsWithGuestMemfd`], [`BindError::Empty`],
    ///   [`BindError::Unaligned`], [`BindError::OffsetWraps`],
    ///   [`BindError::InvalidAddressSpace`], [`BindError::InvalidSlot`],
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
        self.bind_files(
            Files {
                host: Arc::clone(memory),
                private: None,
            },
            req,
        )
    }

    /// Binds a slot of the two-backing layout that SEV-SNP and TDX VMMs use
    /// (Cloud Hypervisor, QEMU): `private`, a guest_memfd KVM backs private
    /// memory with (created without `MMAP`, never mappable), and `shared`, a
    /// memfd or hugetlb memfd at `userspace_addr` for shared memory, both at
    /// file offset `req.offset`. A [`Gatekeeper`](crate::Gatekeeper) over
    /// the binding frees the side a conversion leaves unused.
    ///
    /// # Errors
    /// As [`bind`](Self::bind), for both files; and [`BindError::NotTwoSided`]
    /// unless `private` is a guest_memfd without `MMAP` and `shared` a
    /// mappable file of another backing.
    pub fn bind_two(
        &self,
        private: &Arc<dyn RestrictedMemory>,
        shared: &Arc<dyn RestrictedMemory>,
        req: SlotRequest,
    ) -> Result<Binding, BindError> {
        let rule = if private.kind() != BackingKind::GuestMemfd {
            Some("the private side must be a guest_memfd")
        } else if private.flags().contains(crate::backing::GmemFlags::MMAP) {
            Some("the private side must be created without MMAP: it is never mapped")
        } else if shared.kind() == BackingKind::GuestMemfd {
            Some("the shared side must be a memfd or hugetlb memfd")
        } else if !shared.flags().contains(crate::backing::GmemFlags::MMAP) {
            Some("the shared side must be mappable (MMAP)")
        } else {
            None
        };
        if let Some(rule) = rule {
            return Err(BindError::NotTwoSided {
                private: private.kind(),
                shared: shared.kind(),
                rule,
            });
        }
        self.bind_files(
            Files {
                host: Arc::clone(shared),
                private: Some(Arc::clone(private)),
            },
            req,
        )
    }

    /// Records a memslot the VMM created itself (`req` as it created it), so
    /// that gmem's bindings neither reuse its id nor overlap its GPA range:
    /// a clash is a typed error, never an overwrite of the VMM's slot.
    ///
    /// # Errors
    /// The binding rules that concern slots: [`BindError::InvalidSlot`],
    /// [`BindError::InvalidAddressSpace`], [`BindError::SlotInUse`],
    /// [`BindError::GpaOverlap`], and the size rules. `req.slot` must be set
    /// (the VMM chose it): [`BindError::InvalidSlot`] otherwise.
    pub fn reserve_slot(&self, req: SlotRequest) -> Result<SlotReservation, BindError> {
        let vm = &self.inner;
        let mut table = vm.slots.lock().unwrap_or_else(|e| e.into_inner());
        let max = vm.max_slots();
        if req.slot.is_none() {
            return Err(BindError::InvalidSlot {
                slot: Slot(u16::MAX),
                max,
            });
        }
        let slot = table.check_files(self.limits(), &[], req)?;
        table.insert_files(slot, &[], req);
        Ok(SlotReservation {
            vm: Arc::clone(vm),
            address_space: req.address_space,
            slot,
        })
    }

    fn bind_files(&self, files: Files, req: SlotRequest) -> Result<Binding, BindError> {
        let vm = &self.inner;
        let limits = self.limits();
        let mut table = vm.slots.lock().unwrap_or_else(|e| e.into_inner());
        let facts = files.facts();
        let slot = table.check_files(limits, &facts, req)?;
        let window = if files.host.flags().contains(GmemFlags::MMAP) {
            Some(
                files
                    .host
                    .core()
                    .host_window(req.offset, req.len)
                    .map_err(|source| BindError::Map { slot, source })?,
            )
        } else {
            None
        };
        let create = memslot(
            Some(&files),
            window.as_ref(),
            req.address_space,
            slot,
            &req,
            req.len,
        );
        // SAFETY: userspace_addr is the host side's mapping of the range (or
        // 0), which the Binding returned below owns and unmaps only after
        // deleting this slot. `check_files`
        // established that the range is aligned, inside every file, overlaps
        // no other slot's GPA range and no other binding of the files, that
        // the flags are allowed, and that the files are this VM's.
        unsafe { vm.fd.set_user_memory_region2(create) }
            .map_err(|source| BindError::Kvm { slot, source })?;
        if let Err(owner) = files.claim(vm.id) {
            // Lost a race with another VM's first binding: undo ours.
            let delete = memslot(
                Some(&files),
                window.as_ref(),
                req.address_space,
                slot,
                &req,
                0,
            );
            // SAFETY: deleting the slot created just above.
            if unsafe { vm.fd.set_user_memory_region2(delete) }.is_err() {
                std::mem::forget(files.clone());
                std::mem::forget(window);
            }
            return Err(BindError::ForeignVm { vm: vm.id, owner });
        }
        table.insert_files(slot, &facts, req);
        Ok(Binding {
            vm: Arc::clone(vm),
            files,
            window,
            slot,
            req: SlotRequest {
                slot: Some(slot),
                ..req
            },
        })
    }
}
