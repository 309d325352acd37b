//! Attacks on the vCPU rendezvous (`gmem-vmm/src/pause.rs`), from an
//! independent review of it: a guest whose instruction keeps exiting while
//! a pause is asked for (`rep movsd` from a device's registers: KVM hands
//! the next element's exit out of the completion of the last), and a
//! guest that asks for snapshots without end while none can be taken.
//! Both broke the first version: the read came back stale, and every
//! refusal grew the report.

use gmem::BackingKind;
use gmem::snapshot::PrivatePages;
use gmem_testkit::{kvm_or_skip, on_backing};
use gmem_vmm::virtio::console::VirtioConsole;
use gmem_vmm::{Console, Machine, MachineConfig, SnapshotPlan, Then};

fn snap(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("gmem-pause-attack-{name}-{}", std::process::id()))
}

fn machine(code: &[u8], device: bool) -> (Machine, Console) {
    let config = MachineConfig {
        vcpus: 2,
        ..MachineConfig::new(BackingKind::Memfd, 8 << 20)
    };
    let mut m = Machine::new(config).unwrap();
    let (console, _) = Console::buffer();
    if device {
        m.add_device(Box::new(VirtioConsole::new(console.clone(), Vec::new())))
            .unwrap();
    }
    m.load(code, 0x10_0000, 0x10_0000).unwrap();
    (m, console)
}

/// vCPU 0 asks for K snapshots then exits 7; vCPU 1 copies the device's
/// first four registers with `rep movsd` (one MMIO exit per dword, the
/// later ones handed out from inside KVM_RUN's completion) and exits 1 if
/// the copy differs from the registers read one at a time.
#[test]
fn a_pause_mid_rep_movs_from_mmio_leaves_the_guests_read_whole() {
    use gmem_vmm::abi::{PORT_EXIT, PORT_SNAPSHOT};
    use iced_x86::code_asm::*;
    if !kvm_or_skip("pause attack") || on_backing("pause attack", BackingKind::Memfd, 0).is_none() {
        return;
    }
    let mut a = CodeAssembler::new(64).unwrap();
    let mut cpu1 = a.create_label();
    let mut l0 = a.create_label();
    let mut d = a.create_label();
    let mut l1 = a.create_label();
    let mut bad = a.create_label();
    a.test(rsi, rsi).unwrap();
    a.jnz(cpu1).unwrap();
    a.mov(r15d, 30).unwrap();
    a.set_label(&mut l0).unwrap();
    a.xor(eax, eax).unwrap();
    a.out(u32::from(PORT_SNAPSHOT), eax).unwrap();
    a.mov(ecx, 20000).unwrap();
    a.set_label(&mut d).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(d).unwrap();
    a.dec(r15d).unwrap();
    a.jnz(l0).unwrap();
    a.mov(eax, 7).unwrap();
    a.out(u32::from(PORT_EXIT), eax).unwrap();
    a.set_label(&mut cpu1).unwrap();
    a.mov(rbx, 0xd000_0000u64).unwrap();
    a.mov(r8d, dword_ptr(rbx)).unwrap();
    a.mov(r9d, dword_ptr(rbx + 4)).unwrap();
    a.mov(r10d, dword_ptr(rbx + 8)).unwrap();
    a.mov(r11d, dword_ptr(rbx + 12)).unwrap();
    a.mov(r14, 0x18_0000u64).unwrap();
    a.cld().unwrap();
    a.set_label(&mut l1).unwrap();
    a.mov(rsi, rbx).unwrap();
    a.mov(rdi, r14).unwrap();
    a.mov(ecx, 4).unwrap();
    a.rep().movsd().unwrap();
    a.cmp(dword_ptr(r14), r8d).unwrap();
    a.jne(bad).unwrap();
    a.cmp(dword_ptr(r14 + 4), r9d).unwrap();
    a.jne(bad).unwrap();
    a.cmp(dword_ptr(r14 + 8), r10d).unwrap();
    a.jne(bad).unwrap();
    a.cmp(dword_ptr(r14 + 12), r11d).unwrap();
    a.jne(bad).unwrap();
    a.jmp(l1).unwrap();
    a.set_label(&mut bad).unwrap();
    a.mov(eax, 1).unwrap();
    a.out(u32::from(PORT_EXIT), eax).unwrap();
    let code = a.assemble(0x10_0000).unwrap();

    let path = snap("mmio");
    let (mut m, console) = machine(&code, true);
    m.set_snapshot_plan(Some(SnapshotPlan {
        path: path.clone(),
        private: PrivatePages::Omit,
        then: Then::Continue,
    }));
    let r = m.run_to_end(&console).unwrap();
    let _ = std::fs::remove_file(&path);
    println!(
        "status {} snapshots {} notes {:?}",
        r.status,
        r.snapshots.len(),
        r.snapshot_notes
    );
    assert_eq!(
        r.status,
        7,
        "vCPU 1 read a wrong MMIO value after a pause ({} snapshots taken)",
        r.snapshots.len()
    );
}

/// vCPU 1 halts; vCPU 0 asks for N snapshots, each refused (-EBUSY): the
/// report keeps a bounded number of notes, and counts the rest.
#[test]
fn refused_guest_requests_keep_the_notes_bounded() {
    use gmem_vmm::abi::{PORT_EXIT, PORT_SNAPSHOT};
    use iced_x86::code_asm::*;
    if !kvm_or_skip("pause attack") || on_backing("pause attack", BackingKind::Memfd, 0).is_none() {
        return;
    }
    const N: u32 = 3000;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut cpu1 = a.create_label();
    let mut l0 = a.create_label();
    a.test(rsi, rsi).unwrap();
    a.jnz(cpu1).unwrap();
    a.mov(r15d, N).unwrap();
    a.set_label(&mut l0).unwrap();
    a.xor(eax, eax).unwrap();
    a.out(u32::from(PORT_SNAPSHOT), eax).unwrap();
    a.dec(r15d).unwrap();
    a.jnz(l0).unwrap();
    a.mov(eax, 7).unwrap();
    a.out(u32::from(PORT_EXIT), eax).unwrap();
    a.set_label(&mut cpu1).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x10_0000).unwrap();

    let path = snap("notes");
    let (mut m, console) = machine(&code, false);
    m.set_snapshot_plan(Some(SnapshotPlan {
        path: path.clone(),
        private: PrivatePages::Omit,
        then: Then::Continue,
    }));
    let t = std::time::Instant::now();
    let r = m.run_to_end(&console).unwrap();
    let _ = std::fs::remove_file(&path);
    let bytes: usize = r.snapshot_notes.iter().map(String::len).sum();
    println!(
        "status {} snapshots {} notes {} ({bytes} bytes) in {:?}; first {:?}",
        r.status,
        r.snapshots.len(),
        r.snapshot_notes.len(),
        t.elapsed(),
        r.snapshot_notes.first()
    );
    assert_eq!(r.status, 7);
    assert!(
        r.snapshot_notes
            .last()
            .is_some_and(|n| n.contains("more refused snapshot(s)")),
        "{:?}",
        r.snapshot_notes.last()
    );
    assert!(
        r.snapshot_notes.len() < 100,
        "{} notes kept for {N} refused requests",
        r.snapshot_notes.len()
    );
}
