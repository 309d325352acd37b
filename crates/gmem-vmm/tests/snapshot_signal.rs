//! `SIGUSR1` asks a running VMM for a snapshot. A test binary of its own:
//! the signal goes to the whole process, and another test's run must not
//! take it (the tests here run one at a time).

use gmem::BackingKind;
use gmem::snapshot::{PrivatePages, SealKey};
use gmem_testkit::{kvm_or_skip, on_backing};
use gmem_vmm::virtio::console::VirtioConsole;
use gmem_vmm::{Console, Machine, MachineConfig, RestoreOptions, SnapshotPlan, Then};

fn demo() -> (Machine, Console, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let mut m = Machine::new(MachineConfig::new(BackingKind::Memfd, 32 << 20)).unwrap();
    let (console, out) = Console::buffer();
    m.add_device(Box::new(VirtioConsole::new(console.clone(), Vec::new())))
        .unwrap();
    m.load_elf(gmem_guests::SNAPSHOT_DEMO).unwrap();
    (m, console, out)
}

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn text(out: &std::sync::Arc<std::sync::Mutex<Vec<u8>>>) -> String {
    String::from_utf8(out.lock().unwrap().clone()).unwrap()
}

#[test]
fn sigusr1_takes_a_snapshot_and_the_restore_runs_the_guest_whole() {
    if !kvm_or_skip("sigusr1") || on_backing("sigusr1", BackingKind::Memfd, 0).is_none() {
        return;
    }
    let _serial = serial();
    let (m, console, out) = demo();
    let whole = m.run_to_end(&console).unwrap();
    let whole_text = text(&out);

    let key = SealKey::new([3; 32]);
    let snap = std::env::temp_dir().join(format!("gmem-sigusr1-{}.snap", std::process::id()));
    let (mut m, console, out) = demo();
    m.set_snapshot_plan(Some(SnapshotPlan {
        path: snap.clone(),
        private: PrivatePages::Seal(key.clone()),
        then: Then::Stop,
    }));
    // Before the run: taken at its start, before the guest's first
    // instruction (deterministic, unlike a signal in flight).
    // SAFETY: kill(2) of this process with a signal whose handler
    // set_snapshot_plan installed.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) }, 0);
    let first = m.run_to_end(&console).unwrap();
    assert!(first.stopped_for_snapshot);
    assert_eq!(first.snapshots.len(), 1);
    assert_eq!(first.snapshots[0].by, "signal");
    assert_eq!(text(&out), "", "the guest had not run");

    let (console, out) = Console::buffer();
    let (m, _) = Machine::restore(
        std::fs::File::open(&snap).unwrap(),
        Some(&key),
        RestoreOptions {
            lazy: true,
            ..RestoreOptions::new(console.clone())
        },
    )
    .unwrap();
    let r = m.run_to_end(&console).unwrap();
    assert_eq!(text(&out), whole_text);
    assert_eq!(r.status, whole.status);
    let _ = std::fs::remove_file(snap);
}

/// `migrate-demo` on two vCPUs, both computing (no devices: its lines go
/// to the serial port).
fn two_vcpus() -> (Machine, Console, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let config = MachineConfig {
        vcpus: 2,
        ..MachineConfig::new(BackingKind::Memfd, 64 << 20)
    };
    let mut m = Machine::new(config).unwrap();
    let (console, out) = Console::buffer();
    m.load_elf(gmem_guests::MIGRATE_DEMO).unwrap();
    (m, console, out)
}

#[test]
fn sigusr1_mid_run_pauses_every_vcpu_and_the_restore_ends_as_the_whole_run() {
    if !kvm_or_skip("sigusr1 two vcpus")
        || on_backing("sigusr1 two vcpus", BackingKind::Memfd, 0).is_none()
    {
        return;
    }
    let _serial = serial();
    let (m, console, out) = two_vcpus();
    let whole = m.run_to_end(&console).unwrap();
    let whole_text = text(&out);
    assert!(whole_text.contains("vcpu 1 checksum"), "{whole_text}");

    let key = SealKey::new([5; 32]);
    let snap = std::env::temp_dir().join(format!("gmem-sigusr1-2-{}.snap", std::process::id()));
    let (mut m, console, out) = two_vcpus();
    m.set_snapshot_plan(Some(SnapshotPlan {
        path: snap.clone(),
        private: PrivatePages::Seal(key.clone()),
        then: Then::Stop,
    }));
    // Mid-run: both vCPUs are computing (vCPU 1 for about 2 s).
    let signaller = std::thread::spawn(|| {
        std::thread::sleep(std::time::Duration::from_millis(500));
        // SAFETY: kill(2) of this process with a signal whose handler
        // set_snapshot_plan installed.
        unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
    });
    let first = m.run_to_end(&console).unwrap();
    signaller.join().unwrap();
    assert!(first.stopped_for_snapshot, "{:?}", first.snapshot_notes);
    assert_eq!(first.snapshots.len(), 1);
    let before = text(&out);
    assert!(
        !before.contains("checksum"),
        "the run ended first: {before}"
    );

    let (console, out) = Console::buffer();
    let (m, _) = Machine::restore(
        std::fs::File::open(&snap).unwrap(),
        Some(&key),
        RestoreOptions::new(console.clone()),
    )
    .unwrap();
    let r = m.run_to_end(&console).unwrap();
    assert_eq!(r.vcpus, 2);
    assert_eq!(format!("{before}{}", text(&out)), whole_text);
    assert_eq!(r.status, whole.status);
    let _ = std::fs::remove_file(snap);
}
