//! The ABI's numbers (`docs/guest-abi.md`, version 3), from `gmem-abi`, the
//! crate the host's `gmem_vmm::abi` re-exports too; and the queries on them.

use crate::io;

pub use gmem_abi::AbiKey as Key;
pub use gmem_abi::{
    ABI_VERSION, HC_MAP_GPA_RANGE, MAP_GPA_RANGE_ENCRYPTED, PORT_ABI, PORT_DISCARD, PORT_EXIT,
    PORT_HYPERCALL, PORT_SERIAL, PORT_SERIAL_LSR, PORT_SHARED_CONSOLE, PORT_SNAPSHOT,
    SNAPSHOT_RESUMED, SNAPSHOT_TAKEN,
};

/// The user-mode selectors of the VMM's GDT (entry state).
pub const USER_CODE_SELECTOR: u16 = 0x30 | 3;
/// See [`USER_CODE_SELECTOR`].
pub const USER_DATA_SELECTOR: u16 = 0x28 | 3;

/// Reads `key` from the ABI port.
pub fn query(key: Key) -> u32 {
    // SAFETY: `out`/`in` on the ABI port only select and read a value.
    unsafe {
        io::outl(PORT_ABI, key as u32);
        io::inl(PORT_ABI)
    }
}
