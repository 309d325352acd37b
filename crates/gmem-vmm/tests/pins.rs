//! A running guest meets a device's pin: its conversion of the pinned page
//! to private gets `-EAGAIN`, and its retry after the release succeeds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gmem::{BackingKind, Policy};
use gmem_testkit::{kvm_or_skip, on_backing};
use gmem_vmm::abi::{EAGAIN, HC_MAP_GPA_RANGE, MAP_GPA_RANGE_ENCRYPTED, PORT_EXIT, PORT_HYPERCALL};
use gmem_vmm::{Console, Machine, MachineConfig};
use iced_x86::code_asm::*;

const LOAD: u64 = 0x10_0000;
/// The shared buffer: a flag the host sets at +8, the guest's EAGAIN count at +16.
const DATA: u64 = 0x20_0000;

fn ram(backing: BackingKind) -> u64 {
    gmem_testkit::ram_for(backing, 4 << 20)
}

fn exit_with(a: &mut CodeAssembler, status: u32) -> Result<(), IcedError> {
    a.mov(eax, status)?;
    a.out(u32::from(PORT_EXIT), eax)?;
    a.hlt()
}

fn map_gpa_range(a: &mut CodeAssembler, attrs: u64) -> Result<(), IcedError> {
    a.mov(eax, HC_MAP_GPA_RANGE as u32)?;
    a.mov(rbx, DATA)?;
    a.mov(ecx, 1)?;
    a.mov(rdx, attrs)?;
    a.out(u32::from(PORT_HYPERCALL), eax)
}

/// Shares DATA, waits for the host's flag, then converts DATA back to
/// private until that succeeds, counting the `-EAGAIN`s at DATA+16. Exits 0
/// if it saw at least one `-EAGAIN` and then succeeded.
fn guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let build = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        let (mut fail_share, mut spin, mut retry, mut done, mut fail_other, mut fail_none) = (
            a.create_label(),
            a.create_label(),
            a.create_label(),
            a.create_label(),
            a.create_label(),
            a.create_label(),
        );
        map_gpa_range(a, 0)?;
        a.test(rax, rax)?;
        a.jnz(fail_share)?;
        a.set_label(&mut spin)?;
        a.mov(al, byte_ptr(DATA + 8))?;
        a.cmp(al, 1)?;
        a.jne(spin)?;
        a.xor(r12, r12)?;
        a.set_label(&mut retry)?;
        map_gpa_range(a, MAP_GPA_RANGE_ENCRYPTED)?;
        a.test(rax, rax)?;
        a.jz(done)?;
        a.mov(rdx, -EAGAIN)?;
        a.cmp(rax, rdx)?;
        a.jne(fail_other)?;
        a.inc(r12)?;
        a.mov(qword_ptr(DATA + 16), r12)?;
        a.jmp(retry)?;
        a.set_label(&mut done)?;
        a.test(r12, r12)?;
        a.jz(fail_none)?;
        exit_with(a, 0)?;
        a.set_label(&mut fail_share)?;
        exit_with(a, 11)?;
        a.set_label(&mut fail_other)?;
        exit_with(a, 12)?;
        a.set_label(&mut fail_none)?;
        exit_with(a, 13)
    };
    build(&mut a).unwrap();
    a.assemble(LOAD).unwrap()
}

#[test]
fn a_pinned_page_answers_eagain_until_the_device_releases_it() {
    let code = guest();
    for backing in BackingKind::ALL {
        for policy in [Policy::InPlace, Policy::Discard] {
            let test = "pins";
            if !kvm_or_skip(test) {
                return;
            }
            let Some(_pool) = on_backing(test, backing, ram(backing) / backing.page_size()) else {
                continue;
            };
            let config = MachineConfig {
                policy,
                ..MachineConfig::new(backing, ram(backing))
            };
            let mut machine = Machine::new(config).unwrap();
            machine.load(&code, LOAD, LOAD).unwrap();
            let gate = machine.memory_handle();
            let device_done = AtomicBool::new(false);
            let (console, _) = Console::buffer();
            let report = std::thread::scope(|s| {
                s.spawn(|| {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    // Wait for the guest to share its buffer, then hold it.
                    while !gate.gate().is_shared(DATA, 4096) {
                        assert!(Instant::now() < deadline, "the guest never shared");
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    let pin = gate.gate().pin(DATA, 4096).expect("pin");
                    pin.write(8, &[1]).unwrap();
                    // Hold it until the guest has been refused at least once.
                    let mut count = [0u8; 8];
                    while u64::from_le_bytes(count) == 0 {
                        assert!(Instant::now() < deadline, "the guest was never refused");
                        std::thread::sleep(Duration::from_micros(200));
                        pin.read(16, &mut count).unwrap();
                    }
                    drop(pin);
                    device_done.store(true, Ordering::Release);
                });
                machine.run_to_end(&console)
            })
            .unwrap_or_else(|e| panic!("{backing} {policy}: {e}"));
            assert!(device_done.load(Ordering::Acquire));
            assert_eq!(report.status, 0, "{backing} {policy}");
            assert_eq!(report.conversions.to_private, 1, "{backing} {policy}");
            assert_eq!(gate.gate().attribute(DATA), Some(gmem::Attribute::Private));
        }
    }
}
