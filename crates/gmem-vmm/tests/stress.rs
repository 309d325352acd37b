//! Concurrency stress: two vCPUs keep patterned pages and check them after
//! every step while the host, at the same time, converts and discards ranges
//! and reads guest memory through the host view.
//!
//! Each vCPU owns 8 pages and keeps, in a private bookkeeping page, each
//! page's attribute and a counter. A step picks a page and writes it anew,
//! converts it (private → shared after scrubbing it, shared → private before
//! writing its secret), or discards it (and checks that it reads zeroes);
//! then it verifies all 8 pages. Private pages hold qwords tagged `0x5ec7`
//! (the secret), shared ones `0x0b1c`. Meanwhile a host thread converts and
//! discards ranges of a scratch region, another reads random pages of the
//! owned and scratch regions through the gatekeeper's safe API, and a
//! device pins random pages and reads (scratch: writes) them through the pin:
//! every read that succeeds must hold no secret tag, the guests retry the
//! conversions and discards a pin refuses (`-EAGAIN`), and they must never
//! see a page that differs from what they wrote (zero corruption).
//!
//! `GMEM_STRESS_STEPS` sets the steps per vCPU; the default, 20,000, makes
//! well over 100,000 operations per backing and policy in a few seconds, so CI
//! runs the full size. The run prints the operation counts.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use gmem::{Attribute, BackingKind, Policy};
use gmem_testkit::{kvm_or_skip, on_backing};
use gmem_vmm::abi::{
    EAGAIN, HC_MAP_GPA_RANGE, MAP_GPA_RANGE_ENCRYPTED, PORT_DISCARD, PORT_EXIT, PORT_HYPERCALL,
};
use gmem_vmm::boot::{USER_CODE_SELECTOR, USER_DATA_SELECTOR};
use gmem_vmm::{Console, Machine, MachineConfig};
use iced_x86::code_asm::*;

const LOAD: u64 = 0x10_0000;
const PAGE: u64 = 4096;
/// Pages each vCPU owns.
const OWNED: u64 = 8;
/// vCPU i's bookkeeping page: attribute (0 private, 1 shared) then counter, a qword per page.
const BOOK: u64 = 0x30_0000;
/// vCPU i's owned pages start at OWN + i × 1 MiB.
const OWN: u64 = 0x40_0000;
/// The host's scratch region, converted and discarded by a host thread.
const SCRATCH: u64 = 0x60_0000;
const SCRATCH_PAGES: u64 = 256;
const RAM: u64 = 8 << 20;
/// The count of vCPUs done (in the guest's own memory).
const DONE: u64 = BOOK + 0x2000;
const TAG_SECRET: u64 = 0x5ec7;
const TAG_PUBLIC: u64 = 0x0b1c;

/// The guest's failure statuses.
const FAIL_VERIFY: u32 = 101;
const FAIL_DOORBELL: u32 = 102;
const FAIL_NOT_ZERO: u32 = 103;

/// `KVM_HC_MAP_GPA_RANGE` of page r8 with `attrs` through the doorbell,
/// retried while a device holds the page (`-EAGAIN`); jumps to `fail` unless
/// it returns 0.
fn convert_page(
    a: &mut CodeAssembler,
    page_addr: CodeLabel,
    attrs: u64,
    fail: CodeLabel,
) -> Result<(), IcedError> {
    let mut again = a.create_label();
    // A label per instruction: the caller's may sit on the next one.
    a.nop()?;
    a.set_label(&mut again)?;
    a.call(page_addr)?;
    a.mov(rbx, rdi)?;
    a.mov(eax, HC_MAP_GPA_RANGE as u32)?;
    a.mov(ecx, 1)?;
    a.mov(edx, attrs as u32)?;
    a.out(u32::from(PORT_HYPERCALL), eax)?;
    retry_on_eagain(a, again)?;
    a.test(rax, rax)?;
    a.jnz(fail)
}

/// Jumps back to `again` if rax is `-EAGAIN` (a device held the page).
fn retry_on_eagain(a: &mut CodeAssembler, again: CodeLabel) -> Result<(), IcedError> {
    a.cmp(rax, -(EAGAIN as i32))?;
    a.je(again)
}

fn guest(steps: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut user = a.create_label();
    let mut value = a.create_label();
    let mut page_addr = a.create_label();
    let mut fill = a.create_label();
    let mut verify = a.create_label();
    let mut verify_all = a.create_label();
    let mut fail_verify = a.create_label();
    let mut fail_door = a.create_label();
    let mut fail_zero = a.create_label();

    // CPL0: drop to CPL3 with IOPL 3 (user code runs natively on this host).
    a.mov(rax, u64::from(USER_DATA_SELECTOR))?;
    a.push(rax)?;
    a.mov(rax, rsp)?;
    a.sub(rax, 0x200)?;
    a.push(rax)?;
    a.push(0x3002)?;
    a.mov(rax, u64::from(USER_CODE_SELECTOR))?;
    a.push(rax)?;
    a.lea(rax, ptr(user))?;
    a.push(rax)?;
    a.iretq()?;

    // value(r8 = page) -> rax: tag | vcpu << 40 | page << 32 | counter.
    a.set_label(&mut value)?;
    let mut secret = a.create_label();
    a.mov(rax, qword_ptr(r13 + r8 * 8))?;
    a.test(rax, rax)?;
    a.mov(rax, TAG_SECRET << 48)?;
    a.jz(secret)?;
    a.mov(rax, TAG_PUBLIC << 48)?;
    a.set_label(&mut secret)?;
    a.mov(rdx, r15)?;
    a.shl(rdx, 40)?;
    a.or(rax, rdx)?;
    a.mov(rdx, r8)?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(edx, dword_ptr(r13 + r8 * 8 + 64))?;
    a.or(rax, rdx)?;
    a.ret()?;

    // page_addr(r8) -> rdi.
    a.set_label(&mut page_addr)?;
    a.mov(rdi, r8)?;
    a.shl(rdi, 12)?;
    a.add(rdi, r14)?;
    a.ret()?;

    // fill(r8): qword j = value + j.
    a.set_label(&mut fill)?;
    let mut fill_next = a.create_label();
    a.call(value)?;
    a.call(page_addr)?;
    a.mov(ecx, 512)?;
    a.set_label(&mut fill_next)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.add(rax, 1)?;
    a.add(rdi, 8)?;
    a.dec(ecx)?;
    a.jnz(fill_next)?;
    a.ret()?;

    // verify(r8).
    a.set_label(&mut verify)?;
    let mut verify_next = a.create_label();
    a.call(value)?;
    a.call(page_addr)?;
    a.mov(ecx, 512)?;
    a.set_label(&mut verify_next)?;
    a.cmp(qword_ptr(rdi), rax)?;
    a.jne(fail_verify)?;
    a.add(rax, 1)?;
    a.add(rdi, 8)?;
    a.dec(ecx)?;
    a.jnz(verify_next)?;
    a.ret()?;

    // verify_all: every owned page.
    a.set_label(&mut verify_all)?;
    let mut all_next = a.create_label();
    a.xor(r8, r8)?;
    a.set_label(&mut all_next)?;
    a.call(verify)?;
    a.inc(r8)?;
    a.cmp(r8, OWNED as i32)?;
    a.jb(all_next)?;
    a.ret()?;

    // CPL3 main: r15 = vCPU, r14 = owned pages, r13 = bookkeeping, r12 = step.
    a.set_label(&mut user)?;
    a.mov(r15, rsi)?;
    a.mov(r14, rsi)?;
    a.shl(r14, 20)?;
    a.mov(rax, OWN)?;
    a.add(r14, rax)?;
    a.mov(r13, rsi)?;
    a.shl(r13, 12)?;
    a.mov(rax, BOOK)?;
    a.add(r13, rax)?;
    // Start: every page private with its secret.
    let mut init_next = a.create_label();
    a.xor(r8, r8)?;
    a.set_label(&mut init_next)?;
    a.call(fill)?;
    a.inc(r8)?;
    a.cmp(r8, OWNED as i32)?;
    a.jb(init_next)?;

    let mut step = a.create_label();
    let mut write = a.create_label();
    let mut convert = a.create_label();
    let mut to_shared = a.create_label();
    let mut discard = a.create_label();
    let mut zero_next = a.create_label();
    let mut stepped = a.create_label();
    let mut done = a.create_label();
    a.xor(r12, r12)?;
    a.set_label(&mut step)?;
    a.mov(r8, r12)?;
    a.and(r8, (OWNED - 1) as i32)?;
    a.inc(dword_ptr(r13 + r8 * 8 + 64))?; // a new counter: new content
    a.mov(rax, r12)?;
    a.shr(rax, 3)?;
    a.and(eax, 3)?;
    a.cmp(eax, 1)?;
    a.je(convert)?;
    a.cmp(eax, 2)?;
    a.je(discard)?;
    a.set_label(&mut write)?;
    a.call(fill)?;
    a.jmp(stepped)?;

    a.set_label(&mut convert)?;
    a.cmp(qword_ptr(r13 + r8 * 8), 0)?;
    a.je(to_shared)?;
    // shared -> private, then the secret.
    convert_page(&mut a, page_addr, MAP_GPA_RANGE_ENCRYPTED, fail_door)?;
    a.mov(qword_ptr(r13 + r8 * 8), 0)?;
    a.call(fill)?;
    a.jmp(stepped)?;
    // private -> shared: scrub to the public pattern first, then convert.
    a.set_label(&mut to_shared)?;
    a.mov(qword_ptr(r13 + r8 * 8), 1)?;
    a.call(fill)?;
    convert_page(&mut a, page_addr, 0, fail_door)?;
    a.call(fill)?; // the discard policy zeroed it
    a.jmp(stepped)?;

    a.set_label(&mut discard)?;
    let mut discard_again = a.create_label();
    a.nop()?;
    a.set_label(&mut discard_again)?;
    a.call(page_addr)?;
    a.mov(rbx, rdi)?;
    a.mov(ecx, 1)?;
    a.out(u32::from(PORT_DISCARD), eax)?;
    retry_on_eagain(&mut a, discard_again)?;
    a.test(rax, rax)?;
    a.jnz(fail_door)?;
    a.call(page_addr)?;
    a.mov(ecx, 512)?;
    a.set_label(&mut zero_next)?;
    a.cmp(qword_ptr(rdi), 0)?;
    a.jne(fail_zero)?;
    a.add(rdi, 8)?;
    a.dec(ecx)?;
    a.jnz(zero_next)?;
    a.call(fill)?;

    a.set_label(&mut stepped)?;
    a.call(verify_all)?;
    a.inc(r12)?;
    a.mov(rax, steps)?;
    a.cmp(r12, rax)?;
    a.jb(step)?;
    // CPL3 cannot hlt: count the vCPUs done; the last one ends the run with
    // status 0 (the others spin without exits until it does).
    a.set_label(&mut done)?;
    let mut spin = a.create_label();
    a.mov(rax, DONE)?;
    a.lock().inc(qword_ptr(rax))?;
    a.cmp(qword_ptr(rax), 2)?;
    a.jne(spin)?;
    a.xor(eax, eax)?;
    a.out(u32::from(PORT_EXIT), eax)?;
    a.set_label(&mut spin)?;
    a.pause()?;
    a.jmp(spin)?;

    for (label, status) in [
        (&mut fail_verify, FAIL_VERIFY),
        (&mut fail_door, FAIL_DOORBELL),
        (&mut fail_zero, FAIL_NOT_ZERO),
    ] {
        a.set_label(label)?;
        a.mov(eax, status)?;
        a.out(u32::from(PORT_EXIT), eax)?;
        a.jmp(*label)?;
    }
    a.assemble(LOAD)
}

/// A small xorshift for the host threads' choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    refused: AtomicU64,
    conversions: AtomicU64,
    discards: AtomicU64,
    /// Host conversions and discards refused because the device held a page.
    busy: AtomicU64,
    pins: AtomicU64,
    pins_refused: AtomicU64,
    secrets_seen: AtomicU64,
}

fn stress(backing: BackingKind, policy: Policy, steps: u64) {
    let test = format!("stress {backing} {policy}");
    let Some(_pool) = on_backing(&test, backing, RAM / backing.page_size().min(RAM) + 1) else {
        return;
    };
    let ram = RAM.max(backing.page_size());
    let config = MachineConfig {
        vcpus: 2,
        policy,
        ..MachineConfig::new(backing, ram)
    };
    let mut machine = Machine::new(config).expect("machine");
    machine
        .load(&guest(steps).expect("assemble"), LOAD, LOAD)
        .expect("load");
    let memory = machine.memory_handle();
    let stop = AtomicBool::new(false);
    let counts = Arc::new(Counts::default());
    let start = std::time::Instant::now();
    let report = std::thread::scope(|s| {
        // Reader: random owned or scratch pages through the safe API.
        s.spawn(|| {
            let mut rng = Rng(0x1234_5678_9abc_def1);
            let mut buf = vec![0u8; PAGE as usize];
            while !stop.load(Ordering::Relaxed) {
                let r = rng.next();
                let gpa = match r % 3 {
                    0 => OWN + (r >> 8) % OWNED * PAGE,
                    1 => OWN + (1 << 20) + (r >> 8) % OWNED * PAGE,
                    _ => SCRATCH + (r >> 8) % SCRATCH_PAGES * PAGE,
                };
                match memory.gate().read(gpa, &mut buf) {
                    Ok(()) => {
                        counts.reads.fetch_add(1, Ordering::Relaxed);
                        let leaked = buf
                            .chunks_exact(8)
                            .any(|q| u64::from_le_bytes(q.try_into().unwrap()) >> 48 == TAG_SECRET);
                        if leaked {
                            counts.secrets_seen.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        counts.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        // Converter: ranges of the scratch region, back and forth, and discards.
        s.spawn(|| {
            let mut rng = Rng(0x0fed_cba9_8765_4321);
            while !stop.load(Ordering::Relaxed) {
                let r = rng.next();
                let pages = 1 + r % 16;
                let first = (r >> 8) % (SCRATCH_PAGES - pages);
                let gpa = SCRATCH + first * PAGE;
                let converter = memory.gate();
                let (result, count) = if r >> 60 == 0 {
                    (
                        converter.discard(gpa, pages * PAGE).map(drop),
                        &counts.discards,
                    )
                } else {
                    let to = if r >> 63 == 0 {
                        Attribute::Private
                    } else {
                        Attribute::Shared
                    };
                    (
                        converter.convert(gpa, pages * PAGE, to).map(drop),
                        &counts.conversions,
                    )
                };
                match result {
                    Ok(()) => count.fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.errno() == libc::EAGAIN => {
                        counts.busy.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => panic!("host conversion at {gpa:#x}: {e}"),
                };
            }
        });
        // Device: pins random owned or scratch pages, reads them through the
        // pin (and writes scratch ones), holds them a moment, releases.
        s.spawn(|| {
            let mut rng = Rng(0x5555_aaaa_1234_4321);
            let mut buf = vec![0u8; PAGE as usize];
            while !stop.load(Ordering::Relaxed) {
                let r = rng.next();
                let (gpa, scratch) = match r % 3 {
                    0 => (OWN + (r >> 8) % OWNED * PAGE, false),
                    1 => (OWN + (1 << 20) + (r >> 8) % OWNED * PAGE, false),
                    _ => (SCRATCH + (r >> 8) % SCRATCH_PAGES * PAGE, true),
                };
                let Ok(pin) = memory.gate().pin(gpa, PAGE) else {
                    counts.pins_refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                counts.pins.fetch_add(1, Ordering::Relaxed);
                for _ in 0..4 {
                    pin.read(0, &mut buf).expect("a pinned page reads");
                    let leaked = buf
                        .chunks_exact(8)
                        .any(|q| u64::from_le_bytes(q.try_into().unwrap()) >> 48 == TAG_SECRET);
                    if leaked {
                        counts.secrets_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    if scratch {
                        pin.write(8, &r.to_le_bytes())
                            .expect("a pinned page writes");
                    }
                }
            }
        });
        let (console, _) = Console::buffer();
        let report = machine.run_to_end(&console);
        stop.store(true, Ordering::Relaxed);
        report
    });
    let report = report.unwrap_or_else(|e| panic!("{test}: {e}"));
    let guest_ops = 2 * steps;
    let c = &counts;
    let total = guest_ops
        + c.reads.load(Ordering::Relaxed)
        + c.refused.load(Ordering::Relaxed)
        + c.conversions.load(Ordering::Relaxed)
        + c.discards.load(Ordering::Relaxed)
        + c.busy.load(Ordering::Relaxed)
        + c.pins.load(Ordering::Relaxed)
        + c.pins_refused.load(Ordering::Relaxed);
    let _ = writeln!(
        std::io::stderr(),
        "{test}: {total} operations in {:.1} s: {guest_ops} guest steps (each verifying its 8 pages), conversions to private {} and to shared {} (guest and host), host reads {} ok / {} refused, host conversions {}, host discards {}, refused for a pin {}; device pins {} held / {} refused; secrets seen {}",
        start.elapsed().as_secs_f64(),
        report.conversions.to_private,
        report.conversions.to_shared,
        c.reads.load(Ordering::Relaxed),
        c.refused.load(Ordering::Relaxed),
        c.conversions.load(Ordering::Relaxed),
        c.discards.load(Ordering::Relaxed),
        c.busy.load(Ordering::Relaxed),
        c.pins.load(Ordering::Relaxed),
        c.pins_refused.load(Ordering::Relaxed),
        c.secrets_seen.load(Ordering::Relaxed),
    );
    assert_eq!(
        report.status, 0,
        "{test}: the guest found corruption (status {})",
        report.status
    );
    assert_eq!(
        c.secrets_seen.load(Ordering::Relaxed),
        0,
        "{test}: a secret was visible through the host view"
    );
}

#[test]
fn two_vcpus_and_the_host_convert_discard_and_read_at_once() {
    if !kvm_or_skip("stress") {
        return;
    }
    let steps: u64 = std::env::var("GMEM_STRESS_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    for backing in [
        BackingKind::GuestMemfd,
        BackingKind::Memfd,
        BackingKind::Hugetlb2M,
    ] {
        for policy in [Policy::InPlace, Policy::Discard] {
            stress(backing, policy, steps);
        }
    }
}
