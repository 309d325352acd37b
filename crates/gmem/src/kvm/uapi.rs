//! What kvm-bindings 0.14 lacks of the Linux 6.18 uAPI, and nothing else.
//!
//! kvm-bindings 0.14.2 is generated from 6.15 headers, so the guest_memfd
//! creation flags and `KVM_CAP_GUEST_MEMFD_FLAGS`, both added in Linux 6.18, are
//! missing (rust-vmm/kvm#361). Delete each constant once the bindings have it.

/// `GUEST_MEMFD_FLAG_MMAP` (Linux 6.18): the file may be `mmap()`ed by the host.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;

/// `GUEST_MEMFD_FLAG_INIT_SHARED` (Linux 6.18): the file's memory starts shared,
/// so host faults through an `mmap()` are allowed.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux 6.18): on a VM fd, the bitmask of
/// creation flags `KVM_CREATE_GUEST_MEMFD` accepts for that VM.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
