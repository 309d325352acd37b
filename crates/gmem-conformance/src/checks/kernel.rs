//! Checks that need kernel features this host may lack: memory attributes,
//! protected VM types and pre-fault (T17–T20). Each reads the capability and
//! skips with the value it found.

use gmem::VmType;
use gmem::kvm::KvmCaps;

use crate::{Env, Need, Stop, skip};

fn caps(env: &Env) -> Result<KvmCaps, Stop> {
    Ok(KvmCaps::read(env.vm()?.kvm()))
}

fn needs_private_memory(env: &Env, test: &str) -> Result<(), Stop> {
    let caps = caps(env)?;
    let sw_protected = caps
        .vm_types
        .iter()
        .any(|t| t.vm_type == VmType::SwProtected && t.error.is_none());
    let attributes =
        caps.memory_attributes & u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0;
    if !attributes || !sw_protected {
        skip!(
            Need::Host(if attributes {
                gmem_testkit::Need::Capability("sw-protected-vm")
            } else {
                gmem_testkit::Need::MemoryAttributes
            }),
            "{test} needs KVM_X86_SW_PROTECTED_VM and KVM_CAP_MEMORY_ATTRIBUTES with PRIVATE; this host has VM types {:?} and memory attributes {:#x}",
            caps.vm_types
                .iter()
                .map(|t| t.vm_type.name())
                .collect::<Vec<_>>(),
            caps.memory_attributes
        );
    }
    skip!(
        Need::NotApplicable,
        "{test}: the host has private memory, but gmem's kernel-attributes path is not ported yet (issue 3)"
    )
}

pub(crate) fn t17_conversions(env: &Env) -> Result<(), Stop> {
    needs_private_memory(env, "private_mem_conversions")
}

pub(crate) fn t18_exits_gmem_slot(env: &Env) -> Result<(), Stop> {
    needs_private_memory(env, "private_mem_kvm_exits")
}

pub(crate) fn t19_exits_plain_slot(env: &Env) -> Result<(), Stop> {
    needs_private_memory(env, "private_mem_kvm_exits")
}

pub(crate) fn t20_pre_fault(env: &Env) -> Result<(), Stop> {
    let caps = caps(env)?;
    if !caps.pre_fault_memory {
        skip!(
            Need::Host(gmem_testkit::Need::Capability("pre-fault")),
            "pre_fault_memory needs KVM_CAP_PRE_FAULT_MEMORY, which this host reports as 0 (shadow paging)"
        );
    }
    skip!(Need::NotApplicable, "gmem has no pre-fault API yet")
}
