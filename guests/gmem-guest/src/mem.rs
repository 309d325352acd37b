//! Conversions and discard, through the VMM's doorbell ports.

use crate::{abi, io};

/// What a range becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// Only the guest may access it.
    Private,
    /// The host (devices) may too.
    Shared,
}

/// A negative errno from the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i64);

impl Errno {
    /// A device holds the range: retry.
    pub const EAGAIN: Errno = Errno(-11);
}

fn result(ret: i64) -> Result<(), Errno> {
    if ret == 0 { Ok(()) } else { Err(Errno(ret)) }
}

/// Converts `pages` 4 KiB pages at `gpa` to `to` (`KVM_HC_MAP_GPA_RANGE`),
/// retrying while a device holds them (`-EAGAIN`).
///
/// Always through the doorbell: guest Rust code runs at CPL3, where KVM
/// refuses `vmcall` (`-KVM_EPERM`, measured here even where the VMM takes
/// `KVM_HC_MAP_GPA_RANGE` exits), and at CPL0 `vmcall` hangs the vCPU on
/// this project's hosts.
pub fn convert(gpa: u64, pages: u64, to: Attribute) -> Result<(), Errno> {
    let attrs = match to {
        Attribute::Private => abi::MAP_GPA_RANGE_ENCRYPTED,
        Attribute::Shared => 0,
    };
    loop {
        // SAFETY: the ABI's doorbell with a conversion request the caller
        // asked for.
        let ret = unsafe {
            io::doorbell::<{ abi::PORT_HYPERCALL as u8 }>(abi::HC_MAP_GPA_RANGE, gpa, pages, attrs)
        };
        match result(ret) {
            Err(Errno::EAGAIN) => core::hint::spin_loop(),
            other => return other,
        }
    }
}

/// Discards `pages` 4 KiB pages at `gpa`: they read as zero afterwards.
pub fn discard(gpa: u64, pages: u64) -> Result<(), Errno> {
    // SAFETY: the ABI's discard port, with a range the caller gives up.
    result(unsafe { io::doorbell::<{ abi::PORT_DISCARD as u8 }>(0, gpa, pages, 0) })
}

/// Prints `len` bytes at `gpa` through the shared-buffer console; they must
/// be shared.
pub fn print_shared(gpa: u64, len: u64) -> Result<(), Errno> {
    // SAFETY: the ABI's shared-buffer console; the VMM only reads.
    result(unsafe { io::doorbell::<{ abi::PORT_SHARED_CONSOLE as u8 }>(0, gpa, len, 0) })
}
