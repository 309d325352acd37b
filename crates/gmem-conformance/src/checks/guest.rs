//! Checks with a running guest (64-bit long mode, built by gmem-vmm): the
//! guest sees the host's writes and the host the guest's (T13), and a punch
//! invalidates the guest's view so it reads zeroes (G8).

use gmem::{BackingKind, GmemFlags, PAGE_SIZE};
use gmem_vmm::{Exit, Machine, MachineConfig, VmmError};
use iced_x86::code_asm::{CodeAssembler, al, byte_ptr, rbx, rcx};

use crate::{Env, Need, Stop, ensure, skip};

/// Where the payload is loaded.
const LOAD: u64 = 0x10_0000;
/// The data page the guest reads: the second 2 MiB of RAM.
const DATA: u64 = 0x20_0000;
/// The port the guests report on.
const REPORT_PORT: u32 = 0x10;

fn machine(env: &Env) -> Result<Machine, Stop> {
    env.require_flags(GmemFlags::MMAP | GmemFlags::INIT_SHARED, true)?;
    env.vm()?;
    // RAM of 4 MiB, or one page of a 1 GiB backing.
    let ram = if env.backing == BackingKind::Hugetlb1G {
        1 << 30
    } else {
        4 << 20
    };
    env.need_pages(ram / env.unit())?;
    // RAM stays shared after launch: the host writes and reads it here.
    let config = MachineConfig {
        initial: gmem::Attribute::Shared,
        ..MachineConfig::new(env.backing, ram)
    };
    match Machine::new(config) {
        Ok(m) => Ok(m),
        Err(VmmError::Kvm(e)) => skip!(Need::Host(gmem_testkit::Need::Kvm), "needs /dev/kvm: {e}"),
        Err(e) => Err(e.into()),
    }
}

fn assemble(
    build: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> Result<Vec<u8>, Stop> {
    let mut a = CodeAssembler::new(64)?;
    build(&mut a)?;
    Ok(a.assemble(LOAD)?)
}

/// Runs until an `out` to the report port; fails on any other exit.
fn next_report(m: &mut Machine) -> Result<u32, Stop> {
    match m.run(0)? {
        Exit::IoOut { port, value, .. } if u32::from(port) == REPORT_PORT => Ok(value),
        other => Err(Stop::Fail(format!("guest exit: {other}"))),
    }
}

pub(crate) fn t13_guest(env: &Env) -> Result<(), Stop> {
    let mut m = machine(env)?;
    // The guest checks that every byte of the data page is 0xaa, fills it with
    // 0xff and reports 0, or reports 1 at the first other byte.
    let code = assemble(|a| {
        let mut next = a.create_label();
        let mut bad = a.create_label();
        a.mov(rbx, DATA)?;
        a.mov(rcx, PAGE_SIZE)?;
        a.set_label(&mut next)?;
        a.cmp(byte_ptr(rbx), 0xaa)?;
        a.jne(bad)?;
        a.mov(byte_ptr(rbx), 0xff)?;
        a.inc(rbx)?;
        a.dec(rcx)?;
        a.jnz(next)?;
        a.mov(al, 0)?;
        a.out(REPORT_PORT, al)?;
        a.hlt()?;
        a.set_label(&mut bad)?;
        a.mov(al, 1)?;
        a.out(REPORT_PORT, al)?;
        a.hlt()
    })?;
    m.load(&code, LOAD, LOAD)?;
    m.gate().fill(DATA, PAGE_SIZE, 0xaa)?;
    let report = next_report(&mut m)?;
    ensure!(report == 0, "the guest did not see the host's 0xaa bytes");
    verify_view(m.gate(), DATA, PAGE_SIZE, 0xff)
}

pub(crate) fn g8_punch_invalidates(env: &Env) -> Result<(), Stop> {
    let mut m = machine(env)?;
    // The guest reads the data byte and reports it, forever.
    let code = assemble(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(al, byte_ptr(DATA))?;
        a.out(REPORT_PORT, al)?;
        a.jmp(top)
    })?;
    m.load(&code, LOAD, LOAD)?;
    let code_end = LOAD + code.len() as u64;
    m.gate().write(DATA, &[0x5a])?;
    ensure!(
        next_report(&mut m)? == 0x5a,
        "the guest does not see the host's byte"
    );
    // A 4 KiB punch: freed on 4 KiB backings, zeroed in place on hugetlb.
    // RAM is bound at GPA 0 from file offset 0: the GPA is the offset. A
    // gated file is discarded through its gatekeeper.
    let report = m.gate().discard(DATA, PAGE_SIZE)?;
    ensure!(
        report.bytes_freed + report.bytes_zeroed == PAGE_SIZE,
        "punch report {report:?}"
    );
    let seen = next_report(&mut m)?;
    ensure!(
        seen == 0,
        "after a 4 KiB punch the guest reads {seen:#x}, not 0"
    );
    m.gate().write(DATA, &[0x77])?;
    ensure!(
        next_report(&mut m)? == 0x77,
        "the guest does not see the host's new byte"
    );
    // A whole backing page, where it holds only data (not code or page tables).
    let unit = env.unit();
    let page = DATA / unit * unit;
    if page >= code_end {
        let report = m.gate().discard(page, unit)?;
        ensure!(
            report.bytes_freed == unit,
            "whole-page punch report {report:?}"
        );
        let seen = next_report(&mut m)?;
        ensure!(
            seen == 0,
            "after a whole-page punch the guest reads {seen:#x}, not 0"
        );
    }
    Ok(())
}

fn verify_view(view: &gmem::Gatekeeper, gpa: u64, len: u64, byte: u8) -> Result<(), Stop> {
    let mut buf = vec![0u8; len as usize];
    view.read(gpa, &mut buf)?;
    match buf.iter().position(|&b| b != byte) {
        Some(i) => Err(Stop::Fail(format!(
            "GPA {:#x} reads {:#x}, expected {byte:#x}",
            gpa + i as u64,
            buf[i]
        ))),
        None => Ok(()),
    }
}
