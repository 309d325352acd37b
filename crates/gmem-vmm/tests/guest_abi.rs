//! The guest ABI with real guests: every port, every backing, both policies,
//! several vCPUs, and the ways a guest can end a run badly.
//!
//! Guests are a few 64-bit instructions (CPL0 code is emulated on this
//! project's hosts, about 1 µs per instruction).

use gmem::{Attribute, BackingKind, Policy};
use gmem_testkit::{kvm_or_skip, on_backing};
use gmem_vmm::abi::{
    ABI_VERSION, EFAULT, EINVAL, HC_MAP_GPA_RANGE, KVM_ENOSYS, MAP_GPA_RANGE_ENCRYPTED, PORT_ABI,
    PORT_DISCARD, PORT_EXIT, PORT_HYPERCALL, PORT_SERIAL, PORT_SERIAL_LSR, PORT_SHARED_CONSOLE,
};
use gmem_vmm::{Console, Exit, Machine, MachineConfig, RunReport, VmmError, demo};
use iced_x86::code_asm::*;

const LOAD: u64 = 0x10_0000;
/// A page for the tests' data, well above the payload.
const DATA: u64 = 0x20_0000;

/// RAM for `backing`: 4 MiB, or one 1 GiB page.
fn ram(backing: BackingKind) -> u64 {
    gmem_testkit::ram_for(backing, 4 << 20)
}

/// Runs `code` on a fresh machine; `None` if the test must skip here.
fn run_guest(
    test: &str,
    backing: BackingKind,
    policy: Policy,
    vcpus: u32,
    code: &[u8],
) -> Option<(Result<RunReport, VmmError>, Vec<u8>)> {
    if !kvm_or_skip(test) {
        return None;
    }
    let _pool = on_backing(test, backing, ram(backing) / backing.page_size())?;
    let config = MachineConfig {
        vcpus,
        policy,
        ..MachineConfig::new(backing, ram(backing))
    };
    let mut machine = Machine::new(config).expect("machine");
    machine.load(code, LOAD, LOAD).expect("load");
    let (console, buf) = Console::buffer();
    let result = machine.run_to_end(&console);
    let out = buf.lock().unwrap().clone();
    Some((result, out))
}

fn assemble(build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    build(&mut a).unwrap();
    a.assemble(LOAD).unwrap()
}

/// `cmp rax, value; jne` to an exit with `status`.
fn expect_rax(a: &mut CodeAssembler, value: i64, status: u32) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    a.mov(rdx, value)?;
    a.cmp(rax, rdx)?;
    a.je(ok)?;
    a.mov(eax, status)?;
    a.out(u32::from(PORT_EXIT), eax)?;
    a.set_label(&mut ok)?;
    a.nop()
}

/// The doorbell: eax = nr, rbx/rcx/rdx = arguments.
fn hypercall(
    a: &mut CodeAssembler,
    nr: u64,
    gpa: u64,
    pages: u64,
    attrs: u64,
) -> Result<(), IcedError> {
    a.mov(eax, nr as u32)?;
    a.mov(rbx, gpa)?;
    a.mov(rcx, pages)?;
    a.mov(rdx, attrs)?;
    a.out(u32::from(PORT_HYPERCALL), eax)
}

const POLICIES: [Policy; 2] = [Policy::InPlace, Policy::Discard];

#[test]
fn serial_console_and_exit_port_on_every_backing() {
    let code = assemble(|a| {
        a.mov(dx, PORT_SERIAL as u32)?;
        for b in b"hi\n" {
            a.mov(al, *b as u32)?;
            a.out(dx, al)?;
        }
        a.mov(eax, 7)?;
        a.out(u32::from(PORT_EXIT), eax)?;
        a.hlt()
    });
    for backing in BackingKind::ALL {
        let Some((result, out)) = run_guest("serial", backing, Policy::InPlace, 1, &code) else {
            continue;
        };
        let report = result.unwrap_or_else(|e| panic!("{backing}: {e}"));
        assert_eq!(report.status, 7, "{backing}");
        assert_eq!(out, b"hi\n", "{backing}");
        assert_eq!(report.exits.get("io"), Some(&4), "{backing}");
    }
}

#[test]
fn hypercall_converts_and_the_policy_decides_the_content() {
    // Write a marker to private memory, share the page, print its first 4
    // bytes, make it private again, and check the device is refused.
    let code = assemble(|a| {
        a.mov(eax, u32::from_le_bytes(*b"MARK"))?;
        a.mov(dword_ptr(DATA), eax)?;
        hypercall(a, HC_MAP_GPA_RANGE, DATA, 1, 0)?;
        expect_rax(a, 0, 11)?;
        a.mov(rbx, DATA)?;
        a.mov(ecx, 4)?;
        a.out(u32::from(PORT_SHARED_CONSOLE), eax)?;
        expect_rax(a, 0, 12)?;
        hypercall(a, HC_MAP_GPA_RANGE, DATA, 1, MAP_GPA_RANGE_ENCRYPTED)?;
        expect_rax(a, 0, 13)?;
        a.mov(rbx, DATA)?;
        a.mov(ecx, 4)?;
        a.out(u32::from(PORT_SHARED_CONSOLE), eax)?;
        expect_rax(a, -EFAULT, 14)?;
        a.hlt()
    });
    for backing in BackingKind::ALL {
        for policy in POLICIES {
            let Some((result, out)) = run_guest("hypercall", backing, policy, 1, &code) else {
                continue;
            };
            let report = result.unwrap_or_else(|e| panic!("{backing} {policy}: {e}"));
            assert_eq!(report.status, 0, "{backing} {policy}");
            let expected: &[u8] = if policy == Policy::Discard {
                &[0, 0, 0, 0]
            } else {
                b"MARK"
            };
            assert_eq!(out, expected, "{backing} {policy}");
            let c = report.conversions;
            assert_eq!((c.to_shared, c.to_private), (1, 1), "{backing} {policy}");
            assert_eq!(
                (c.pages_to_shared, c.pages_to_private),
                (1, 1),
                "{backing} {policy}"
            );
            if policy == Policy::Discard {
                assert_eq!(
                    c.bytes_freed + c.bytes_zeroed,
                    2 * 4096,
                    "{backing} {policy}: {c:?}"
                );
            } else {
                assert_eq!(
                    c.bytes_freed + c.bytes_zeroed,
                    0,
                    "{backing} {policy}: {c:?}"
                );
            }
        }
    }
}

#[test]
fn bad_hypercall_arguments_return_errors_and_the_vm_lives() {
    let ram = 4u64 << 20;
    let code = assemble(|a| {
        hypercall(a, 99, DATA, 1, 0)?;
        expect_rax(a, -KVM_ENOSYS, 21)?;
        hypercall(a, HC_MAP_GPA_RANGE, DATA + 1, 1, 0)?;
        expect_rax(a, -EINVAL, 22)?;
        hypercall(a, HC_MAP_GPA_RANGE, ram - 4096, 2, 0)?;
        expect_rax(a, -EINVAL, 23)?;
        hypercall(a, HC_MAP_GPA_RANGE, DATA, u64::MAX / 2, 0)?;
        expect_rax(a, -EINVAL, 24)?;
        hypercall(a, HC_MAP_GPA_RANGE, DATA, 0, 0)?;
        expect_rax(a, -EINVAL, 25)?;
        hypercall(a, HC_MAP_GPA_RANGE, DATA, 1, 1 << 7)?;
        expect_rax(a, -EINVAL, 26)?;
        a.mov(rbx, u64::MAX - 1)?;
        a.mov(ecx, 4)?;
        a.out(u32::from(PORT_SHARED_CONSOLE), eax)?;
        expect_rax(a, -EFAULT, 27)?;
        a.mov(rbx, DATA + 1)?;
        a.mov(ecx, 1)?;
        a.out(u32::from(PORT_DISCARD), eax)?;
        expect_rax(a, -EINVAL, 28)?;
        a.mov(rbx, ram)?;
        a.mov(ecx, 1)?;
        a.out(u32::from(PORT_DISCARD), eax)?;
        expect_rax(a, -EINVAL, 29)?;
        a.hlt()
    });
    let Some((result, out)) = run_guest(
        "bad hypercalls",
        BackingKind::Memfd,
        Policy::InPlace,
        1,
        &code,
    ) else {
        return;
    };
    let report = result.expect("run");
    assert_eq!(
        report.status, 0,
        "the guest saw a wrong error (status = the failing step)"
    );
    assert!(out.is_empty());
    assert_eq!(
        report.conversions,
        gmem::ConversionStats::default(),
        "a refused request counted"
    );
}

#[test]
fn discard_zeroes_on_every_backing() {
    let code = assemble(|a| {
        a.mov(rax, -1i64)?;
        a.mov(qword_ptr(DATA), rax)?;
        a.mov(rbx, DATA)?;
        a.mov(ecx, 1)?;
        a.out(u32::from(PORT_DISCARD), eax)?;
        expect_rax(a, 0, 31)?;
        a.cmp(qword_ptr(DATA), 0)?;
        let mut ok = a.create_label();
        a.je(ok)?;
        a.mov(eax, 32)?;
        a.out(u32::from(PORT_EXIT), eax)?;
        a.set_label(&mut ok)?;
        a.hlt()
    });
    for backing in BackingKind::ALL {
        for policy in POLICIES {
            let Some((result, _)) = run_guest("discard", backing, policy, 1, &code) else {
                continue;
            };
            let report = result.unwrap_or_else(|e| panic!("{backing}: {e}"));
            assert_eq!(report.status, 0, "{backing} {policy}");
            let c = report.conversions;
            assert_eq!(c.discards, 1);
            if backing.is_hugetlb() {
                assert_eq!((c.bytes_freed, c.bytes_zeroed), (0, 4096), "{backing}");
            } else {
                assert_eq!((c.bytes_freed, c.bytes_zeroed), (4096, 0), "{backing}");
            }
        }
    }
}

#[test]
fn several_vcpus_each_run_on_their_own_thread() {
    // Each vCPU prints its index (rsi) as a digit and halts.
    let code = assemble(|a| {
        a.mov(rax, rsi)?;
        a.add(al, i32::from(b'0'))?;
        a.mov(dx, PORT_SERIAL as u32)?;
        a.out(dx, al)?;
        a.hlt()
    });
    let Some((result, out)) = run_guest("vcpus", BackingKind::Memfd, Policy::InPlace, 4, &code)
    else {
        return;
    };
    let report = result.expect("run");
    assert_eq!(report.status, 0);
    let mut digits = out.clone();
    digits.sort_unstable();
    assert_eq!(
        digits,
        b"0123",
        "output {:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(report.exits.get("hlt"), Some(&4));
}

#[test]
fn the_exit_port_stops_every_vcpu() {
    // vCPU 0 ends the run with status 3; the others spin without exits.
    let code = assemble(|a| {
        let mut spin = a.create_label();
        a.test(rsi, rsi)?;
        a.jnz(spin)?;
        a.mov(eax, 3)?;
        a.out(u32::from(PORT_EXIT), eax)?;
        a.set_label(&mut spin)?;
        a.jmp(spin)
    });
    let Some((result, _)) = run_guest("exit port", BackingKind::Memfd, Policy::InPlace, 3, &code)
    else {
        return;
    };
    assert_eq!(result.expect("run").status, 3);
}

#[test]
fn a_triple_fault_is_a_clear_error() {
    // No IDT: the first exception becomes a triple fault.
    let code = assemble(|a| a.ud2());
    let Some((result, _)) = run_guest(
        "triple fault",
        BackingKind::Memfd,
        Policy::InPlace,
        1,
        &code,
    ) else {
        return;
    };
    let e = result.expect_err("a triple fault must end the run with an error");
    assert!(
        matches!(
            e,
            VmmError::Guest {
                exit: Exit::Shutdown,
                ..
            }
        ),
        "{e}"
    );
    let text = e.to_string();
    assert!(text.contains("shutdown") && text.contains("rip"), "{text}");
}

#[test]
fn an_unknown_port_is_a_clear_error() {
    let code = assemble(|a| {
        a.mov(al, 1)?;
        a.out(0x80u32, al)?;
        a.hlt()
    });
    let Some((result, _)) = run_guest(
        "unknown port",
        BackingKind::Memfd,
        Policy::InPlace,
        1,
        &code,
    ) else {
        return;
    };
    let e = result.expect_err("an unknown port must end the run");
    assert!(matches!(e, VmmError::UnknownPort { port: 0x80, .. }), "{e}");
    assert!(e.to_string().contains("0x80"), "{e}");
}

#[test]
fn the_demo_guest_runs_on_every_backing_and_policy() {
    for backing in BackingKind::ALL {
        for policy in POLICIES {
            let code = demo::payload(LOAD).unwrap();
            let Some((result, out)) = run_guest("demo", backing, policy, 2, &code) else {
                continue;
            };
            let report = result.unwrap_or_else(|e| panic!("{backing} {policy}: {e}"));
            assert_eq!(report.status, demo::STATUS_OK, "{backing} {policy}");
            let text = String::from_utf8_lossy(&out);
            for vcpu in ["00", "01"] {
                for line in [
                    "converted to shared",
                    "refused the private page",
                    "reads zeroes",
                ] {
                    assert!(
                        text.lines()
                            .any(|l| l.starts_with(&format!("vcpu {vcpu}:")) && l.contains(line)),
                        "{backing} {policy}: no {line:?} line from vcpu {vcpu} in\n{text}"
                    );
                }
            }
            assert_eq!(report.conversions.to_shared, 2);
            assert_eq!(report.conversions.discards, 2);
        }
    }
}

#[test]
fn host_writes_end_at_launch() {
    if !kvm_or_skip("launch") || on_backing("launch", BackingKind::Memfd, 0).is_none() {
        return;
    }
    let mut machine = Machine::new(MachineConfig::new(BackingKind::Memfd, 4 << 20)).unwrap();
    machine.load(&[0xf4], LOAD, LOAD).unwrap();
    assert_eq!(machine.gate().attribute(LOAD), Some(Attribute::Private));
    assert!(matches!(
        machine.gate().write(LOAD, &[0]),
        Err(gmem::GateError::Private { private: LOAD, .. })
    ));
    assert!(matches!(
        machine.load(&[0xf4], LOAD, LOAD),
        Err(VmmError::AlreadyLaunched)
    ));
}

#[test]
fn bad_configs_and_payloads_are_refused() {
    let too_small = MachineConfig::new(BackingKind::Memfd, 1 << 20);
    assert!(matches!(
        too_small.validate(),
        Err(VmmError::InvalidRam { .. })
    ));
    let unaligned = MachineConfig::new(BackingKind::Hugetlb2M, 3 << 20);
    let e = unaligned.validate().unwrap_err();
    assert!(e.to_string().contains("hugetlb-2m page size"), "{e}");
    let no_vcpus = MachineConfig {
        vcpus: 0,
        ..MachineConfig::new(BackingKind::Memfd, 4 << 20)
    };
    assert!(matches!(
        no_vcpus.validate(),
        Err(VmmError::InvalidVcpus { .. })
    ));
    if !kvm_or_skip("bad payloads") || on_backing("bad payloads", BackingKind::Memfd, 0).is_none() {
        return;
    }
    let mut machine = Machine::new(MachineConfig::new(BackingKind::Memfd, 4 << 20)).unwrap();
    let big = vec![0x90; 4 << 20];
    let e = machine.load(&big, LOAD, LOAD).unwrap_err();
    assert!(matches!(e, VmmError::PayloadOutsideRam { .. }), "{e}");
    assert!(matches!(
        machine.load(&[0xf4], 0x1000, 0x1000),
        Err(VmmError::PayloadOutsideRam { .. })
    ));
    assert!(matches!(
        machine.load(&[0xf4], 8 << 20, 8 << 20),
        Err(VmmError::PayloadOutsideRam { .. })
    ));
    assert!(matches!(
        machine.load(&[0xf4], LOAD, 8 << 20),
        Err(VmmError::PayloadOutsideRam { .. })
    ));
    assert!(matches!(
        machine.load(&[], LOAD, LOAD),
        Err(VmmError::EmptyPayload)
    ));
    // Nothing was launched by the refusals.
    machine
        .load(&[0xf4], LOAD, LOAD)
        .expect("a good payload still loads");
}

/// The ABI's version and what the guest can discover, read with `in` on
/// the ABI port after selecting a key with `out`; and the serial port's
/// line status, which an 8250 polling driver reads before each byte.
#[test]
fn the_guest_reads_the_abi_version_and_its_setup() {
    let code = assemble(|a| {
        // Unselected, the port reads the version.
        a.in_(eax, u32::from(PORT_ABI))?;
        a.cmp(eax, ABI_VERSION)?;
        let mut ok = a.create_label();
        a.je(ok)?;
        a.mov(eax, 31)?;
        a.out(u32::from(PORT_EXIT), eax)?;
        a.set_label(&mut ok)?;
        // Key 1: the policy (1 = discard); key 2: the initial attribute.
        let mut status = 0u32;
        for (key, want) in [
            (1u32, 1u32),
            (2, 0),
            (4, 0),
            (5, 4 << 20),
            (6, 0),
            (99, u32::MAX),
        ] {
            status += 1;
            a.mov(eax, key)?;
            a.out(u32::from(PORT_ABI), eax)?;
            a.in_(eax, u32::from(PORT_ABI))?;
            a.cmp(eax, want as i32)?;
            let mut next = a.create_label();
            a.je(next)?;
            a.mov(eax, 40 + status)?;
            a.out(u32::from(PORT_EXIT), eax)?;
            a.set_label(&mut next)?;
        }
        a.mov(dx, PORT_SERIAL_LSR as u32)?;
        a.in_(al, dx)?;
        a.cmp(al, 0x60)?;
        let mut lsr = a.create_label();
        a.je(lsr)?;
        a.mov(eax, 50)?;
        a.out(u32::from(PORT_EXIT), eax)?;
        a.set_label(&mut lsr)?;
        a.hlt()
    });
    let Some((result, _)) = run_guest("abi port", BackingKind::Memfd, Policy::Discard, 1, &code)
    else {
        return;
    };
    assert_eq!(result.expect("run").status, 0, "status = the failing step");
}

/// Widths are checked: a 1-byte `out` to the 32-bit doorbell is an error
/// naming both widths, not a silent truncation.
#[test]
fn an_access_of_the_wrong_width_is_a_clear_error() {
    let code = assemble(|a| {
        a.mov(al, 12)?;
        a.out(u32::from(PORT_HYPERCALL), al)?;
        a.hlt()
    });
    let Some((result, _)) = run_guest("widths", BackingKind::Memfd, Policy::InPlace, 1, &code)
    else {
        return;
    };
    let e = result.unwrap_err();
    assert!(
        matches!(
            e,
            VmmError::BadWidth {
                size: 1,
                expected: 4,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("1-byte") && e.to_string().contains("4-byte"),
        "{e}"
    );
}
