//! `_start`: the CPL0 entry that drops to CPL3 and calls the guest's main.

/// Defines the guest's entry point: `gmem_guest::entry!(main)` with
/// `fn main(boot: gmem_guest::Boot) -> i32`; the run ends with its status.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        extern "C" fn __gmem_guest_start(ram_size: u64, vcpu: u64) -> ! {
            let f: fn($crate::Boot) -> i32 = $main;
            $crate::exit(f($crate::Boot { ram_size, vcpu }))
        }
    };
}

// At entry (CPL0, long mode, rdi = RAM size, rsi = vCPU index, rsp = the
// top of this vCPU's stack): an iretq frame to CPL3 with IOPL 3 and a
// 16-byte-aligned stack, then a call, so Rust code starts with
// rsp ≡ 8 (mod 16). iretq leaves rdi and rsi alone. Only integer
// instructions run at CPL0 (the emulator rejects SSE).
core::arch::global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "mov rax, rsp",
    "and rax, -16",
    "push {ss}",
    "push rax",
    "push 0x3002",
    "push {cs}",
    "lea rax, [rip + 2f]",
    "push rax",
    "iretq",
    "2:",
    "call __gmem_guest_start",
    "3:",
    "jmp 3b",
    ss = const crate::abi::USER_DATA_SELECTOR as u64,
    cs = const crate::abi::USER_CODE_SELECTOR as u64,
);
