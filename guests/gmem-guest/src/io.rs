//! Port I/O: the guest's only way to the VMM here (IOPL 3 lets CPL3 code
//! use it).

/// `out` of a byte.
///
/// # Safety
/// The port must be one the ABI defines for byte writes; the VMM acts on it.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller's contract; `out` touches no memory.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// `out` of 32 bits.
///
/// # Safety
/// As [`outb`], for a 32-bit port.
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller's contract; `out` touches no memory.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// `in` of a byte.
///
/// # Safety
/// The port must be one the ABI defines for byte reads.
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: the caller's contract; `in` touches no memory.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// `in` of 32 bits.
///
/// # Safety
/// As [`inb`], for a 32-bit port.
pub unsafe fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: the caller's contract; `in` touches no memory.
    unsafe {
        core::arch::asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// A doorbell request (`out` of eax to port `PORT`, below `0x100`, with
/// rbx, rcx, rdx as arguments); the VMM's answer comes back in rax.
///
/// # Safety
/// `PORT` must be a doorbell port of the ABI, and the request one whose
/// effect (a conversion, a discard) the caller is ready for.
pub unsafe fn doorbell<const PORT: u8>(nr: u64, rbx: u64, rcx: u64, rdx: u64) -> i64 {
    let ret: i64;
    // rbx is reserved by LLVM: swap the argument in and out around `out`.
    // SAFETY: the caller's contract; the VMM changes only rax.
    unsafe {
        core::arch::asm!(
            "xchg {b}, rbx",
            "out {port}, eax",
            "xchg {b}, rbx",
            b = inout(reg) rbx => _,
            port = const PORT,
            inout("rax") nr as i64 => ret,
            in("rcx") rcx,
            in("rdx") rdx,
            options(nostack),
        )
    };
    ret
}
