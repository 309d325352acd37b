//! The capability probe: what this kernel's KVM offers for restricted memory.

use kvm_bindings::{
    KVM_CAP_EXIT_HYPERCALL, KVM_CAP_GUEST_MEMFD, KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MEMORY_FAULT_INFO, KVM_CAP_PRE_FAULT_MEMORY, KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES,
};
use kvm_ioctls::Kvm;

use super::uapi::KVM_CAP_GUEST_MEMFD_FLAGS;
use super::vm::{Vm, VmType};

/// What one VM type offers, read on a VM of that type.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct VmTypeCaps {
    /// The VM type.
    pub vm_type: VmType,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` on a VM of this type, or `None` if no such VM
    /// could be created.
    pub guest_memfd_flags: Option<u64>,
    /// `KVM_CAP_MEMORY_ATTRIBUTES` on a VM of this type.
    pub memory_attributes: Option<u64>,
    /// Why no VM of this type could be created, if none could.
    pub error: Option<String>,
}

/// What `/dev/kvm` offers, as `gmem probe` reports it.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct KvmCaps {
    /// `KVM_GET_API_VERSION` (12 on every kernel since 2.6.22).
    pub api_version: i32,
    /// `KVM_CAP_GUEST_MEMFD`.
    pub guest_memfd: bool,
    /// `KVM_CAP_USER_MEMORY2`.
    pub user_memory2: bool,
    /// `KVM_CAP_MEMORY_FAULT_INFO`.
    pub memory_fault_info: bool,
    /// `KVM_CAP_MEMORY_ATTRIBUTES` at system scope (bit 3 = PRIVATE).
    pub memory_attributes: u64,
    /// `KVM_CAP_PRE_FAULT_MEMORY`.
    pub pre_fault_memory: bool,
    /// `KVM_CAP_EXIT_HYPERCALL`: the hypercalls that can exit to userspace.
    pub exit_hypercall_mask: u64,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` at system scope.
    pub guest_memfd_flags: u64,
    /// The VM types of `KVM_CAP_VM_TYPES` (the default type if it reads 0).
    pub vm_types: Vec<VmTypeCaps>,
}

fn cap(kvm: &Kvm, nr: u32) -> u64 {
    super::vm::read_cap(|nr| kvm.check_extension_raw(nr), nr)
}

impl KvmCaps {
    /// Reads the capabilities from `kvm`, creating one VM of every advertised
    /// type to read the per-VM values.
    pub fn read(kvm: &Kvm) -> KvmCaps {
        let type_mask = match cap(kvm, KVM_CAP_VM_TYPES) {
            0 => 1,
            mask => mask,
        };
        let vm_types = VmType::ALL
            .iter()
            .copied()
            .filter(|t| type_mask & (1 << t.raw()) != 0)
            .map(|vm_type| match Vm::with_type(vm_type) {
                Ok(vm) => VmTypeCaps {
                    vm_type,
                    guest_memfd_flags: Some(vm.supported_gmem_flags()),
                    memory_attributes: Some(vm.memory_attributes()),
                    error: None,
                },
                Err(e) => VmTypeCaps {
                    vm_type,
                    guest_memfd_flags: None,
                    memory_attributes: None,
                    error: Some(format!(
                        "{e}: {}",
                        std::io::Error::from_raw_os_error(e.errno())
                    )),
                },
            })
            .collect();
        KvmCaps {
            api_version: kvm.get_api_version(),
            guest_memfd: cap(kvm, KVM_CAP_GUEST_MEMFD) != 0,
            user_memory2: cap(kvm, KVM_CAP_USER_MEMORY2) != 0,
            memory_fault_info: cap(kvm, KVM_CAP_MEMORY_FAULT_INFO) != 0,
            memory_attributes: cap(kvm, KVM_CAP_MEMORY_ATTRIBUTES),
            pre_fault_memory: cap(kvm, KVM_CAP_PRE_FAULT_MEMORY) != 0,
            exit_hypercall_mask: cap(kvm, KVM_CAP_EXIT_HYPERCALL),
            guest_memfd_flags: cap(kvm, KVM_CAP_GUEST_MEMFD_FLAGS),
            vm_types,
        }
    }
}
