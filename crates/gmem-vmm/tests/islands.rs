//! A guest fragments all of its RAM: it shares every other 4 KiB page of
//! 1 GiB (131,072 islands, one hypercall each), then converts them all
//! back. Every conversion succeeds on every backing, and the VMM process's
//! VMA count stays within a constant of its count at the start (sampled
//! while the guest runs). One test in its own binary, so that no other
//! test's mappings come and go meanwhile.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use gmem::{Attribute, BackingKind};
use gmem_testkit::{kvm_or_skip, on_backing};
use gmem_vmm::abi::{HC_MAP_GPA_RANGE, MAP_GPA_RANGE_ENCRYPTED, PORT_EXIT, PORT_HYPERCALL};
use gmem_vmm::{Console, Machine, MachineConfig};
use iced_x86::code_asm::*;

const LOAD: u64 = 0x10_0000;
const RAM: u64 = 1 << 30;
const ISLANDS: u64 = RAM / 4096 / 2;

fn vmas() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

/// One pass over every other page with `attrs`; exits with `status` on the
/// first failed conversion.
fn pass(a: &mut CodeAssembler, attrs: u64, status: u32) -> Result<(), IcedError> {
    let (mut top, mut ok) = (a.create_label(), a.create_label());
    a.xor(r12, r12)?;
    a.mov(r13, ISLANDS)?;
    a.set_label(&mut top)?;
    a.mov(eax, HC_MAP_GPA_RANGE as u32)?;
    a.mov(rbx, r12)?;
    a.mov(ecx, 1)?;
    a.mov(rdx, attrs)?;
    a.out(u32::from(PORT_HYPERCALL), eax)?;
    a.test(rax, rax)?;
    a.jz(ok)?;
    a.mov(eax, status)?;
    a.out(u32::from(PORT_EXIT), eax)?;
    a.set_label(&mut ok)?;
    a.add(r12, 0x2000)?;
    a.dec(r13)?;
    a.jnz(top)
}

#[test]
fn a_guest_fragmenting_all_its_ram_costs_the_vmm_no_address_space() {
    let mut a = CodeAssembler::new(64).unwrap();
    pass(&mut a, 0, 1).unwrap();
    pass(&mut a, MAP_GPA_RANGE_ENCRYPTED, 2).unwrap();
    a.mov(eax, 0).unwrap();
    a.out(u32::from(PORT_EXIT), eax).unwrap();
    let code = a.assemble(LOAD).unwrap();
    for backing in BackingKind::ALL {
        let test = "islands";
        if !kvm_or_skip(test) {
            return;
        }
        let Some(_pool) = on_backing(test, backing, RAM / backing.page_size()) else {
            continue;
        };
        let mut machine = Machine::new(MachineConfig::new(backing, RAM)).unwrap();
        machine.load(&code, LOAD, LOAD).unwrap();
        let handle = machine.memory_handle();
        let start = vmas();
        let peak = AtomicUsize::new(start);
        let done = AtomicBool::new(false);
        let (console, _) = Console::buffer();
        let report = std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    peak.fetch_max(vmas(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            let r = machine.run_to_end(&console);
            done.store(true, Ordering::Release);
            r
        })
        .unwrap_or_else(|e| panic!("{backing}: {e}"));
        assert_eq!(report.status, 0, "{backing}: a conversion failed");
        let c = report.conversions;
        assert_eq!((c.to_shared, c.to_private), (ISLANDS, ISLANDS), "{backing}");
        assert_eq!(handle.gate().private_runs(), vec![0..RAM], "{backing}");
        assert_eq!(handle.gate().attribute(0), Some(Attribute::Private));
        let peak = peak.load(Ordering::Relaxed);
        // The vCPU thread's stack and guard, the sampler's, allocator arenas.
        assert!(
            peak <= start + 16,
            "{backing}: {start} VMAs at the start, {peak} at the peak"
        );
        println!("{backing}: {ISLANDS} islands; VMAs {start} at the start, {peak} at the peak");
    }
}
