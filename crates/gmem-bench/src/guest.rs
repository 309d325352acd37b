//! The guest payloads the measurements run, identical for gmem and the raw
//! baseline. Loops that must run fast run at CPL3: on this project's hosts
//! only user-mode guest code runs natively (CPL0 code is emulated).

use gmem::BackingKind;
use gmem_vmm::abi::{HC_MAP_GPA_RANGE, MAP_GPA_RANGE_ENCRYPTED, PORT_EXIT, PORT_HYPERCALL};
use gmem_vmm::boot::{USER_CODE_SELECTOR, USER_DATA_SELECTOR};
use gmem_vmm::{Console, Machine, MachineConfig, Step};
use iced_x86::IcedError;
use iced_x86::code_asm::{
    CodeAssembler, al, byte_ptr, eax, ecx, edx, ptr, r8, rax, rbx, rcx, rdi, rsp,
};

use crate::BenchError;

/// Where a round-trip guest converts its page.
pub(crate) const ROUND_TRIP_GPA: u64 = 0x20_0000;

/// A gmem machine of `ram` bytes of `kind` with the round-trip guest
/// ([`round_trips`], `trips` of them) loaded.
pub(crate) fn round_trip_machine(
    kind: BackingKind,
    ram: u64,
    trips: u32,
) -> Result<Machine, BenchError> {
    let mut m = Machine::new(MachineConfig::new(kind, ram))?;
    m.load(&round_trips(ROUND_TRIP_GPA, trips)?, LOAD, LOAD)?;
    Ok(m)
}

/// Runs vCPU 0 of `m` until the guest exits; an exit status other than 0
/// or a halt is an error.
pub(crate) fn run_to_exit(m: &mut Machine) -> Result<(), BenchError> {
    let (console, _) = Console::buffer();
    loop {
        match m.step(0, &console)? {
            Step::Exit(0) => return Ok(()),
            Step::Exit(s) => {
                return Err(BenchError::Guest(format!(
                    "the guest exited with status {s}"
                )));
            }
            Step::Halted => return Err(BenchError::Guest("the guest halted early".into())),
            Step::Continue(_) | Step::Interrupted => {}
        }
    }
}

/// Where payloads are loaded (and entered).
pub const LOAD: u64 = 0x10_0000;
/// The port the measured guests report on; not part of the guest ABI, so
/// gmem's machine returns it undecoded (`Machine::run`).
pub const MARK_PORT: u16 = 0x10;

/// Drops to CPL3 (IOPL 3, so `out` still works there) and continues at the
/// label `user`.
fn enter_user_mode(
    a: &mut CodeAssembler,
    user: iced_x86::code_asm::CodeLabel,
) -> Result<(), IcedError> {
    a.mov(rax, u64::from(USER_DATA_SELECTOR))?;
    a.push(rax)?; // ss
    a.mov(rax, rsp)?;
    a.sub(rax, 0x100)?;
    a.push(rax)?; // rsp
    a.push(0x3002)?; // rflags: IOPL 3, reserved bit 1
    a.mov(rax, u64::from(USER_CODE_SELECTOR))?;
    a.push(rax)?; // cs
    a.lea(rax, ptr(user))?;
    a.push(rax)?; // rip
    a.iretq()
}

/// Touches one byte of every 4 KiB page of `[start, end)` at CPL3: reports
/// 1 on [`MARK_PORT`] before the loop and 2 after it.
pub fn touch_pages(start: u64, end: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut user = a.create_label();
    let mut next = a.create_label();
    enter_user_mode(&mut a, user)?;
    a.set_label(&mut user)?;
    a.mov(eax, 1)?;
    a.out(u32::from(MARK_PORT), eax)?;
    a.mov(rdi, start)?;
    a.mov(rcx, end)?;
    a.set_label(&mut next)?;
    a.mov(byte_ptr(rdi), 1)?;
    a.add(rdi, 4096)?;
    a.cmp(rdi, rcx)?;
    a.jb(next)?;
    a.mov(eax, 2)?;
    a.out(u32::from(MARK_PORT), eax)?;
    a.hlt()?;
    a.assemble(LOAD)
}

/// Reports on [`MARK_PORT`] at once: the first exit of a launch.
pub fn first_exit() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.mov(al, 1)?;
    a.out(u32::from(MARK_PORT), al)?;
    a.hlt()?;
    a.assemble(LOAD)
}

/// `rounds` private → shared → private round trips of the page at `gpa`
/// through the doorbell, then an exit with status 0 (port 0xf4).
pub fn round_trips(gpa: u64, rounds: u32) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut next = a.create_label();
    a.mov(r8, u64::from(rounds))?;
    a.set_label(&mut next)?;
    for attrs in [0, MAP_GPA_RANGE_ENCRYPTED] {
        a.mov(eax, HC_MAP_GPA_RANGE as u32)?;
        a.mov(rbx, gpa)?;
        a.mov(ecx, 1)?;
        a.mov(edx, attrs as u32)?;
        a.out(u32::from(PORT_HYPERCALL), eax)?;
    }
    a.dec(r8)?;
    a.jnz(next)?;
    a.xor(eax, eax)?;
    a.out(u32::from(PORT_EXIT), eax)?;
    a.hlt()?;
    a.assemble(LOAD)
}
