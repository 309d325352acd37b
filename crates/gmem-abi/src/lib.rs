//! # gmem-abi: the numbers of gmem's guest ABI
//!
//! Port numbers, ABI keys, hypercall numbers and errno values of the guest
//! ABI (`docs/guest-abi.md`, version 3), in one place. The reference VMM
//! (`gmem_vmm::abi`) and the guest SDK (`gmem_guest::abi`) both re-export
//! them, so the two sides cannot drift apart. `no_std` and without
//! dependencies, so a guest links it.
//!
//! ```
//! use gmem_abi::{AbiKey, PORT_ABI, PORT_SERIAL_LSR};
//! assert_eq!(PORT_ABI, 0xf8);
//! assert_eq!(PORT_SERIAL_LSR, 0x3fd);
//! assert_eq!(AbiKey::from_raw(7), Some(AbiKey::MmioBase));
//! assert_eq!(AbiKey::from_raw(8), Some(AbiKey::Snapshots));
//! assert_eq!(AbiKey::from_raw(9), None);
//! ```
#![no_std]
#![warn(missing_docs)]

/// Serial console: a byte written here goes to the run's output.
pub const PORT_SERIAL: u16 = 0x3f8;
/// End the run: the 32-bit value written becomes the exit status.
pub const PORT_EXIT: u16 = 0xf4;
/// Hypercall doorbell: eax = number, rbx/rcx/rdx/rsi = arguments, result in rax.
pub const PORT_HYPERCALL: u16 = 0xf5;
/// Shared-buffer console: rbx = GPA, rcx = length; result in rax.
pub const PORT_SHARED_CONSOLE: u16 = 0xf6;
/// Discard (free page reporting): rbx = GPA, rcx = 4 KiB pages; result in rax.
pub const PORT_DISCARD: u16 = 0xf7;
/// ABI information: `out` a key (32-bit) to select, `in` (32-bit) to read
/// its value ([`AbiKey`]); reads the ABI version until a key is selected.
pub const PORT_ABI: u16 = 0xf8;
/// Snapshot request (32-bit `out`; the value is ignored): the VMM saves the
/// whole machine and the guest continues after the instruction, with rax
/// = [`SNAPSHOT_TAKEN`] in the run that took it and [`SNAPSHOT_RESUMED`] in
/// a run restored from it, or a negative errno (`-ENOSYS`: the VMM was
/// given no snapshot file; `-EINVAL`: more than one vCPU).
pub const PORT_SNAPSHOT: u16 = 0xf9;
/// What [`PORT_SNAPSHOT`] answers in the run that took the snapshot.
pub const SNAPSHOT_TAKEN: i64 = 0;
/// What [`PORT_SNAPSHOT`] answers in a run restored from the snapshot.
pub const SNAPSHOT_RESUMED: i64 = 1;
/// The serial port's line-status register (`in` only): transmitter empty.
pub const PORT_SERIAL_LSR: u16 = PORT_SERIAL + 5;
/// What the line-status register reads: THR empty and transmitter idle
/// (bits 5 and 6), so an 8250 polling driver writes at once.
pub const SERIAL_LSR_IDLE: u8 = 0x60;

/// The guest ABI's version, read from [`PORT_ABI`].
pub const ABI_VERSION: u32 = 3;

/// The keys of [`PORT_ABI`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AbiKey {
    /// [`ABI_VERSION`].
    Version = 0,
    /// The conversion policy: 0 in-place, 1 discard.
    Policy = 1,
    /// RAM's attribute after launch: 0 private, 1 shared.
    Initial = 2,
    /// Whether `vmcall` reaches the VMM (1) or the doorbell must be used (0).
    VmcallTaken = 3,
    /// How many devices the machine has.
    Devices = 4,
    /// RAM size, low 32 bits.
    RamLow = 5,
    /// RAM size, high 32 bits.
    RamHigh = 6,
    /// Where device `i`'s virtio-mmio window is: this plus `i × 0x1000`.
    MmioBase = 7,
    /// Whether the VMM takes snapshots on [`PORT_SNAPSHOT`] (1) or answers
    /// `-ENOSYS` (0). Since version 3.
    Snapshots = 8,
}

impl AbiKey {
    /// Every key, in number order.
    pub const ALL: [AbiKey; 9] = [
        AbiKey::Version,
        AbiKey::Policy,
        AbiKey::Initial,
        AbiKey::VmcallTaken,
        AbiKey::Devices,
        AbiKey::RamLow,
        AbiKey::RamHigh,
        AbiKey::MmioBase,
        AbiKey::Snapshots,
    ];

    /// The key of `raw`, if it is one.
    pub fn from_raw(raw: u32) -> Option<AbiKey> {
        Self::ALL.into_iter().find(|k| *k as u32 == raw)
    }
}

/// `KVM_HC_MAP_GPA_RANGE`: convert a range to private or shared.
pub const HC_MAP_GPA_RANGE: u64 = 12;
/// `KVM_MAP_GPA_RANGE_ENCRYPTED`: bit 4 of the attributes, "make private".
pub const MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
/// The page-size level bits of the attributes (0 = 4K, 1 = 2M, 2 = 1G).
pub const MAP_GPA_RANGE_PAGE_SIZE_MASK: u64 = 0xf;

/// The errno values the ABI returns, negated in rax: a bad address.
pub const EFAULT: i64 = 14;
/// See [`EFAULT`]: a device holds the range; retry.
pub const EAGAIN: i64 = 11;
/// See [`EFAULT`]: bad arguments.
pub const EINVAL: i64 = 22;
/// See [`EFAULT`]: the request is not supported.
pub const ENOSYS: i64 = 38;
/// See [`EFAULT`]: the machine is busy (a snapshot asked for while the
/// other vCPUs cannot be paused: one has ended, or a migration is pausing
/// them).
pub const EBUSY: i64 = 16;
/// `KVM_ENOSYS` (`include/uapi/linux/kvm_para.h`): what KVM's hypercall
/// convention returns, negated, for an unknown hypercall number.
pub const KVM_ENOSYS: i64 = 1000;
