//! The built-in demo guest, assembled with iced-x86. On every vCPU it:
//!
//! 1. makes its secret page private (`KVM_HC_MAP_GPA_RANGE`; a no-op unless
//!    RAM started shared) and writes a secret to it;
//! 2. converts its message page to shared (`KVM_HC_MAP_GPA_RANGE` through the
//!    doorbell) and prints a line through the shared-buffer console;
//! 3. asks the device to print its private page, is refused with `-EFAULT`,
//!    and says so;
//! 4. writes a private page, discards it (port 0xf7) and checks that it reads
//!    zeroes;
//! 5. halts. When every vCPU has halted the run ends with status 0; any
//!    failed step ends it with status 10 + the step number.
//!
//! Each vCPU works in its own three pages at `AREA_BASE + index * AREA_STRIDE`:
//! the secret, the message page and the discarded page.

use iced_x86::IcedError;
use iced_x86::code_asm::{
    CodeAssembler, CodeLabel, al, eax, ecx, edx, ptr, qword_ptr, r14, r15, r15d, rax, rbx, rdi, rsi,
};

use crate::abi::{
    EFAULT, HC_MAP_GPA_RANGE, MAP_GPA_RANGE_ENCRYPTED, PORT_DISCARD, PORT_EXIT, PORT_HYPERCALL,
    PORT_SHARED_CONSOLE,
};

/// Where the first vCPU's pages start.
pub const AREA_BASE: u64 = 0x11_0000;
/// The distance between two vCPUs' pages.
pub const AREA_STRIDE: u64 = 0x4000;
/// The demo's status when every step passed.
pub const STATUS_OK: i32 = 0;

/// Offsets of the three pages in a vCPU's area.
const SECRET: u64 = 0;
const MESSAGE: u64 = 0x1000;
const DISCARDED: u64 = 0x2000;

/// One past the last byte of the vCPUs' pages for `vcpus` vCPUs.
pub fn area_end(vcpus: u32) -> u64 {
    AREA_BASE + u64::from(vcpus) * AREA_STRIDE
}

/// The lines the demo prints; `NN` is replaced by the vCPU index.
const LINES: [&str; 3] = [
    "vcpu NN: a secret is in private memory; this line comes from a page converted to shared\n",
    "vcpu NN: the device was refused the private page: -EFAULT (-14)\n",
    "vcpu NN: discarded a page; it reads zeroes\n",
];
/// Where the two index digits sit in every line.
const DIGITS: u64 = 5;

/// Assembles the demo for loading at `load_addr`.
///
/// # Errors
/// Only if iced-x86 fails to encode, which would be a bug here.
pub fn payload(load_addr: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut lines: Vec<CodeLabel> = LINES.iter().map(|_| a.create_label()).collect();
    let mut fail: Vec<CodeLabel> = (0..6).map(|_| a.create_label()).collect();

    // r15 = vCPU index, r14 = this vCPU's pages.
    a.mov(r15, rsi)?;
    a.mov(rax, r15)?;
    a.shl(rax, AREA_STRIDE.trailing_zeros())?;
    a.mov(r14, AREA_BASE)?;
    a.add(r14, rax)?;

    // 1. A secret in private memory: make sure the page is private (it is
    //    already, unless the run started with --initial shared), then write
    //    "SECRET-" and the index.
    a.mov(eax, HC_MAP_GPA_RANGE as u32)?;
    a.mov(rbx, r14)?;
    a.mov(ecx, 1)?;
    a.mov(edx, MAP_GPA_RANGE_ENCRYPTED as u32)?;
    a.out(u32::from(PORT_HYPERCALL), eax)?;
    a.test(rax, rax)?;
    a.jnz(fail[1])?;
    a.mov(rax, u64::from_le_bytes(*b"SECRET-\0"))?;
    a.mov(rbx, r15)?;
    a.add(rbx, i32::from(b'0'))?;
    a.shl(rbx, 56)?;
    a.or(rax, rbx)?;
    a.mov(qword_ptr(r14 + SECRET), rax)?;

    // 2. Convert the message page to shared, then print through it.
    a.mov(eax, HC_MAP_GPA_RANGE as u32)?;
    a.lea(rbx, ptr(r14 + MESSAGE))?;
    a.mov(ecx, 1)?;
    a.xor(edx, edx)?;
    a.out(u32::from(PORT_HYPERCALL), eax)?;
    a.test(rax, rax)?;
    a.jnz(fail[1])?;
    print_line(&mut a, lines[0], LINES[0].len(), fail[2])?;

    // 3. The device may not read the private secret.
    a.mov(rbx, r14)?;
    a.mov(ecx, 8)?;
    a.out(u32::from(PORT_SHARED_CONSOLE), eax)?;
    a.cmp(rax, -EFAULT as i32)?;
    a.jne(fail[3])?;
    print_line(&mut a, lines[1], LINES[1].len(), fail[3])?;

    // 4. Discard a written private page; it must read zeroes.
    a.mov(rax, -1i64)?;
    a.mov(qword_ptr(r14 + DISCARDED), rax)?;
    a.mov(qword_ptr(r14 + DISCARDED + 0xff8), rax)?;
    a.lea(rbx, ptr(r14 + DISCARDED))?;
    a.mov(ecx, 1)?;
    a.out(u32::from(PORT_DISCARD), eax)?;
    a.test(rax, rax)?;
    a.jnz(fail[4])?;
    a.cmp(qword_ptr(r14 + DISCARDED), 0)?;
    a.jne(fail[4])?;
    a.cmp(qword_ptr(r14 + DISCARDED + 0xff8), 0)?;
    a.jne(fail[4])?;
    print_line(&mut a, lines[2], LINES[2].len(), fail[4])?;

    // 5. Done.
    a.hlt()?;

    for (step, label) in fail.iter_mut().enumerate() {
        a.set_label(label)?;
        a.mov(eax, 10 + step as u32)?;
        a.out(u32::from(PORT_EXIT), eax)?;
        a.hlt()?;
    }
    for (label, text) in lines.iter_mut().zip(LINES) {
        a.set_label(label)?;
        a.db(text.as_bytes())?;
    }
    a.assemble(load_addr)
}

/// Copies the line at `line` into the message page, puts the vCPU index in
/// its digits, and prints it through the shared-buffer console.
fn print_line(
    a: &mut CodeAssembler,
    line: CodeLabel,
    len: usize,
    fail: CodeLabel,
) -> Result<(), IcedError> {
    a.lea(rsi, ptr(line))?;
    a.lea(rdi, ptr(r14 + MESSAGE))?;
    a.mov(ecx, len as u32)?;
    a.rep().movsb()?;
    // Two decimal digits of the index.
    a.mov(eax, r15d)?;
    a.xor(edx, edx)?;
    a.mov(ecx, 10)?;
    a.div(ecx)?;
    a.add(al, i32::from(b'0'))?;
    a.mov(iced_x86::code_asm::byte_ptr(r14 + MESSAGE + DIGITS), al)?;
    a.add(edx, i32::from(b'0'))?;
    a.mov(
        iced_x86::code_asm::byte_ptr(r14 + MESSAGE + DIGITS + 1),
        iced_x86::code_asm::dl,
    )?;
    a.lea(rbx, ptr(r14 + MESSAGE))?;
    a.mov(ecx, len as u32)?;
    a.out(u32::from(PORT_SHARED_CONSOLE), eax)?;
    a.test(rax, rax)?;
    a.jnz(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_and_carries_its_lines() {
        let code = payload(0x10_0000).unwrap();
        assert!(code.len() < 0x1000, "{} bytes", code.len());
        for line in LINES {
            assert!(code.windows(line.len()).any(|w| w == line.as_bytes()));
        }
        assert_eq!(&LINES[0][DIGITS as usize..DIGITS as usize + 2], "NN");
    }
}
