//! The ABI's numbers (`docs/guest-abi.md`, version 2). The host's copy is
//! `gmem_vmm::abi`; a guest cannot link the host crate, so they are
//! repeated here.

use crate::io;

/// Serial console (byte `out`).
pub const PORT_SERIAL: u16 = 0x3f8;
/// Serial line status (byte `in`): `0x60` when the transmitter is idle.
pub const PORT_SERIAL_LSR: u16 = 0x3fd;
/// End the run (32-bit `out`).
pub const PORT_EXIT: u16 = 0xf4;
/// Hypercall doorbell (32-bit `out`): eax = number, rbx, rcx, rdx, rsi.
pub const PORT_HYPERCALL: u16 = 0xf5;
/// Shared-buffer console (32-bit `out`): rbx = GPA, rcx = length.
pub const PORT_SHARED_CONSOLE: u16 = 0xf6;
/// Discard (32-bit `out`): rbx = GPA, rcx = 4 KiB pages.
pub const PORT_DISCARD: u16 = 0xf7;
/// ABI information (32-bit `out` selects a key, `in` reads it).
pub const PORT_ABI: u16 = 0xf8;
/// The version this crate speaks.
pub const ABI_VERSION: u32 = 2;
/// `KVM_HC_MAP_GPA_RANGE`.
pub const HC_MAP_GPA_RANGE: u64 = 12;
/// Attribute bit: make private.
pub const MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
/// The user-mode selectors of the VMM's GDT (entry state).
pub const USER_CODE_SELECTOR: u16 = 0x30 | 3;
/// See [`USER_CODE_SELECTOR`].
pub const USER_DATA_SELECTOR: u16 = 0x28 | 3;

/// The keys of [`PORT_ABI`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Key {
    /// The ABI version.
    Version = 0,
    /// 0 in-place, 1 discard.
    Policy = 1,
    /// RAM's attribute after launch: 0 private, 1 shared.
    Initial = 2,
    /// Whether `vmcall` reaches the VMM.
    VmcallTaken = 3,
    /// How many devices there are.
    Devices = 4,
    /// RAM size, low 32 bits.
    RamLow = 5,
    /// RAM size, high 32 bits.
    RamHigh = 6,
    /// Device `i`'s virtio-mmio window is at this plus `i × 0x1000`.
    MmioBase = 7,
}

/// Reads `key` from the ABI port.
pub fn query(key: Key) -> u32 {
    // SAFETY: `out`/`in` on the ABI port only select and read a value.
    unsafe {
        io::outl(PORT_ABI, key as u32);
        io::inl(PORT_ABI)
    }
}
