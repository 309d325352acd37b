//! Whole-machine snapshots with a real guest (`guests/snapshot-demo`), on
//! every backing this host has: a run stopped at its snapshot and
//! restored (eagerly, lazily with and without the prefetcher, lazily with
//! a recorded order) ends exactly as an uninterrupted run, with the same
//! output and status; a sealed snapshot holds no private byte in clear; a
//! flipped byte, a wrong key or no key is refused with a typed error
//! before any guest runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gmem::BackingKind;
use gmem::snapshot::{PrefetchOrder, PrivatePages, RestoreError, SealKey, SnapshotError};
use gmem_testkit::{kvm_or_skip, on_backing};
use gmem_vmm::virtio::blk::VirtioBlk;
use gmem_vmm::virtio::console::VirtioConsole;
use gmem_vmm::{Console, Machine, MachineConfig, RestoreOptions, SnapshotPlan, Then, VmmError};

const RAM: u64 = 32 << 20;

fn ram(backing: BackingKind) -> u64 {
    gmem_testkit::ram_for(backing, RAM)
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("gmem-snapvm-{name}-{}", std::process::id()))
}

fn key() -> SealKey {
    SealKey::new([0x5a; 32])
}

/// A disk for the machine's virtio-blk (the demo leaves it alone: its
/// device is saved and restored all the same).
fn disk(name: &str) -> PathBuf {
    let p = temp(&format!("{name}.img"));
    std::fs::write(&p, vec![0xab; 64 << 10]).unwrap();
    p
}

type Out = Arc<Mutex<Vec<u8>>>;

fn text(out: &Out) -> String {
    String::from_utf8(out.lock().unwrap().clone()).unwrap()
}

/// The demo on `backing`, with virtio-console and virtio-blk, launched.
fn demo(backing: BackingKind, disk: &Path) -> (Machine, Console, Out) {
    let mut m = Machine::new(MachineConfig::new(backing, ram(backing))).unwrap();
    let (console, out) = Console::buffer();
    m.add_device(Box::new(VirtioConsole::new(console.clone(), Vec::new())))
        .unwrap();
    m.add_device(Box::new(VirtioBlk::open(disk, true).unwrap()))
        .unwrap();
    m.load_elf(gmem_guests::SNAPSHOT_DEMO).unwrap();
    (m, console, out)
}

/// The output without the line that says how the snapshot request went
/// (the one line where the runs differ by design).
fn without_marker(s: &str) -> String {
    s.lines()
        .filter(|l| {
            !(l.starts_with("snapshot-demo: no snapshot")
                || l.starts_with("snapshot-demo: snapshot taken")
                || l.starts_with("snapshot-demo: resumed"))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn plan(path: &Path, private: PrivatePages, then: Then) -> Option<SnapshotPlan> {
    Some(SnapshotPlan {
        path: path.to_owned(),
        private,
        then,
    })
}

fn restore(
    snap: &Path,
    key: Option<&SealKey>,
    lazy: bool,
    no_prefetch: bool,
    order: Option<PrefetchOrder>,
) -> Result<(gmem_vmm::RunReport, String), VmmError> {
    let (console, out) = Console::buffer();
    let opts = RestoreOptions {
        lazy,
        no_prefetch,
        prefetch: order,
        ..RestoreOptions::new(console.clone())
    };
    let (m, summary) = Machine::restore(std::fs::File::open(snap).unwrap(), key, opts)?;
    assert_eq!(
        summary.mode,
        if lazy { "lazy" } else { "eager" },
        "{summary:?}"
    );
    let report = m.run_to_end(&console)?;
    Ok((report, text(&out)))
}

#[test]
fn restored_runs_end_as_uninterrupted_ones() {
    for backing in BackingKind::ALL {
        if !kvm_or_skip("snapshot round trip") {
            return;
        }
        if backing == BackingKind::Hugetlb1G {
            // One 1 GiB page is populated whole: a 1 GiB snapshot, sealed
            // and opened five times, is minutes in a debug build (the
            // snapshot-demo's private page makes the whole 1 GiB page
            // private, and the AEAD, monomorphized in gmem, runs unoptimized).
            println!("skipped: hugetlb-1g: a 1 GiB page makes a 1 GiB snapshot, too slow here");
            gmem_testkit::log::skipped(
                "snapshot round trip",
                "hugetlb-1g",
                "a 1 GiB page makes a 1 GiB snapshot: too slow for this test",
            );
            continue;
        }
        let pages = ram(backing) / backing.page_size();
        let Some(_pool) = on_backing("snapshot round trip", backing, pages) else {
            continue;
        };
        let disk = disk(&format!("rt-{backing}"));
        // Uninterrupted: the request answers -ENOSYS and the guest goes on.
        let (m, console, out) = demo(backing, &disk);
        let whole = m.run_to_end(&console).unwrap();
        let whole_text = text(&out);
        assert!(
            whole_text.contains("snapshot-demo: no snapshot (-38)"),
            "{whole_text}"
        );
        assert!(whole_text.contains("result "), "{whole_text}");
        assert_ne!(whole.status, 0);

        // Stopped at the snapshot, sealed.
        let snap = temp(&format!("rt-{backing}.snap"));
        let (mut m, console, out) = demo(backing, &disk);
        m.set_snapshot_plan(plan(&snap, PrivatePages::Seal(key()), Then::Stop));
        let first = m.run_to_end(&console).unwrap();
        let first_text = text(&out);
        assert_eq!(first.status, 0, "{first_text}");
        assert!(first.stopped_for_snapshot);
        assert_eq!(first.snapshots.len(), 1);
        assert!(first.snapshots[0].sealed_bytes > 0, "{:?}", first.snapshots);
        assert!(!first_text.contains("result "), "{first_text}");

        let check = |how: &str, report: &gmem_vmm::RunReport, restored: &str| {
            assert!(
                restored.contains("snapshot-demo: resumed from a snapshot"),
                "{backing} {how}: {restored}"
            );
            assert_eq!(
                without_marker(&format!("{first_text}{restored}")),
                without_marker(&whole_text),
                "{backing} {how}"
            );
            assert_eq!(report.status, whole.status, "{backing} {how}");
            assert!(report.restored);
        };
        let (r, t) = restore(&snap, Some(&key()), false, false, None).unwrap();
        check("eager", &r, &t);
        let (r, t) = restore(&snap, Some(&key()), true, false, None).unwrap();
        check("lazy", &r, &t);
        let (r, t) = restore(&snap, Some(&key()), true, true, None).unwrap();
        check("lazy without prefetch", &r, &t);
        let lazy = r.lazy.clone().expect("a lazy report");
        assert!(lazy.fault_fills > 0, "{lazy:?}");
        let order = PrefetchOrder::decode(&lazy.touch_order).unwrap();
        let (r, t) = restore(&snap, Some(&key()), true, false, Some(order)).unwrap();
        check("lazy with the recorded order", &r, &t);

        // A restored run can take a snapshot of its own (here: none asked),
        // and the continue mode gives the uninterrupted output whole.
        let snap2 = temp(&format!("rt-{backing}-continue.snap"));
        let (mut m, console, out) = demo(backing, &disk);
        m.set_snapshot_plan(plan(&snap2, PrivatePages::Seal(key()), Then::Continue));
        let cont = m.run_to_end(&console).unwrap();
        let cont_text = text(&out);
        assert!(cont_text.contains("snapshot-demo: snapshot taken, continuing"));
        assert_eq!(without_marker(&cont_text), without_marker(&whole_text));
        assert_eq!(cont.status, whole.status);
        assert!(!cont.stopped_for_snapshot);
        let (r, t) = restore(&snap2, Some(&key()), false, false, None).unwrap();
        // The continued run printed everything up to the snapshot too.
        let upto = cont_text
            .split_inclusive('\n')
            .take_while(|l| !l.starts_with("snapshot-demo: snapshot taken"))
            .collect::<String>();
        check("eager, from a continued run", &r, &t);
        assert_eq!(
            without_marker(&format!("{upto}{t}")),
            without_marker(&whole_text)
        );
        for p in [&snap, &snap2, &disk] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The demo's secret, as it derives it (xorshift64* from its seed).
fn secret() -> Vec<u8> {
    let mut s = 0x5eed_cafe_f00d_d00du64;
    let mut out = Vec::new();
    for _ in 0..4 {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out
}

/// The first bytes of the demo's shared pattern.
fn pattern() -> Vec<u8> {
    let mut s = 0x1234_5678_9abc_def1u64;
    let mut out = Vec::new();
    for _ in 0..8 {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A snapshot of the demo on memfd, stopped, under `private`.
fn taken(name: &str, private: PrivatePages) -> Option<(PathBuf, PathBuf)> {
    if !kvm_or_skip(name) || on_backing(name, BackingKind::Memfd, 0).is_none() {
        return None;
    }
    let disk = disk(name);
    let snap = temp(&format!("{name}.snap"));
    let (mut m, console, _out) = demo(BackingKind::Memfd, &disk);
    m.set_snapshot_plan(plan(&snap, private, Then::Stop));
    m.run_to_end(&console).unwrap();
    Some((snap, disk))
}

#[test]
fn a_sealed_snapshot_holds_no_private_byte_in_clear() {
    let Some((snap, disk)) = taken("sealed-secret", PrivatePages::Seal(key())) else {
        return;
    };
    let bytes = std::fs::read(&snap).unwrap();
    let secret = secret();
    // The scan finds what is in clear: the shared pattern is.
    assert!(
        contains(&bytes, &pattern()),
        "the shared pattern is saved in clear"
    );
    assert!(
        !contains(&bytes, &secret),
        "the secret is in the file in clear"
    );
    for half in secret.chunks(16) {
        assert!(!contains(&bytes, half), "half the secret is in clear");
    }
    // Omitted private pages come back as zeroes: the guest's secret is gone
    // (its hash is of zeroes), and everything else continues.
    let omit = temp("sealed-secret-omit.snap");
    let (mut m, console, _) = demo(BackingKind::Memfd, &disk);
    m.set_snapshot_plan(plan(&omit, PrivatePages::Omit, Then::Stop));
    let r = m.run_to_end(&console).unwrap();
    assert!(r.snapshots[0].omitted_bytes > 0, "{:?}", r.snapshots);
    assert!(!contains(&std::fs::read(&omit).unwrap(), &secret));
    for p in [&snap, &omit, &disk] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn private_pages_under_refuse_are_a_typed_error_and_no_file() {
    if !kvm_or_skip("refuse") || on_backing("refuse", BackingKind::Memfd, 0).is_none() {
        return;
    }
    let disk = disk("refuse");
    let snap = temp("refuse.snap");
    let (mut m, console, _) = demo(BackingKind::Memfd, &disk);
    m.set_snapshot_plan(plan(&snap, PrivatePages::Refuse, Then::Stop));
    let e = m.run_to_end(&console).unwrap_err();
    assert!(
        matches!(e, VmmError::Snapshot(SnapshotError::PrivatePages { .. })),
        "{e:?}"
    );
    assert!(!snap.exists(), "a refused snapshot leaves no file");
    let _ = std::fs::remove_file(disk);
}

/// Where the state record starts: after the header (its private runs
/// counted at byte 36) and, sealed, its 16-byte tag.
fn state_record_at(bytes: &[u8]) -> usize {
    let regions = u32::from_le_bytes(bytes[32..36].try_into().unwrap()) as usize;
    let runs = u32::from_le_bytes(bytes[36..40].try_into().unwrap()) as usize;
    40 + 40 * regions + 16 * runs + 4 + 16
}

#[test]
fn a_flipped_byte_a_wrong_key_or_no_key_is_refused_before_any_guest_runs() {
    let Some((snap, disk)) = taken("refusals", PrivatePages::Seal(key())) else {
        return;
    };
    let bytes = std::fs::read(&snap).unwrap();
    let at = state_record_at(&bytes);
    assert_eq!(bytes[at], 3, "the state record's kind");
    for (name, offset) in [("state header", 8), ("state payload", 40)] {
        let mut bad = bytes.clone();
        bad[at + offset] ^= 0x01;
        let p = temp(&format!("refusals-{offset}.snap"));
        std::fs::write(&p, &bad).unwrap();
        for lazy in [false, true] {
            let e = restore(&p, Some(&key()), lazy, false, None).unwrap_err();
            assert!(
                matches!(e, VmmError::Restore(RestoreError::Corrupt { .. })),
                "{name}, lazy {lazy}: {e:?}"
            );
        }
        let _ = std::fs::remove_file(p);
    }
    let e = restore(&snap, Some(&SealKey::new([1; 32])), false, false, None).unwrap_err();
    assert!(
        matches!(e, VmmError::Restore(RestoreError::WrongKey)),
        "{e:?}"
    );
    let e = restore(&snap, None, false, false, None).unwrap_err();
    assert!(
        matches!(e, VmmError::Restore(RestoreError::NeedsKey)),
        "{e:?}"
    );
    // Not a snapshot at all.
    let e = restore(&disk, None, false, false, None).unwrap_err();
    assert!(
        matches!(e, VmmError::Restore(RestoreError::NotASnapshot)),
        "{e:?}"
    );
    // The disk image gone: the device cannot be restored, named.
    let moved = temp("refusals-moved.img");
    std::fs::rename(&disk, &moved).unwrap();
    let e = restore(&snap, Some(&key()), false, false, None).unwrap_err();
    assert!(matches!(e, VmmError::DeviceState { index: 1, .. }), "{e:?}");
    for p in [&snap, &moved] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn a_snapshot_between_any_two_exits_continues_too() {
    // What SIGUSR1 does: a snapshot at an exit the guest did not choose
    // (here, its 30th), through Machine::snapshot.
    if !kvm_or_skip("any exit") || on_backing("any exit", BackingKind::Memfd, 0).is_none() {
        return;
    }
    let disk = disk("any-exit");
    let (m, console, out) = demo(BackingKind::Memfd, &disk);
    let whole = m.run_to_end(&console).unwrap();
    let whole_text = text(&out);

    let (mut m, console, out) = demo(BackingKind::Memfd, &disk);
    for _ in 0..30 {
        let step = m.step(0, &console).unwrap();
        assert!(matches!(step, gmem_vmm::Step::Continue(_)), "{step:?}");
    }
    let snap = temp("any-exit.snap");
    let mut f = std::fs::File::create(&snap).unwrap();
    m.snapshot(&mut f, &PrivatePages::Seal(key())).unwrap();
    drop(f);
    drop(m);
    let first_text = text(&out);
    let (r, t) = restore(&snap, Some(&key()), true, false, None).unwrap();
    assert_eq!(
        without_marker(&format!("{first_text}{t}")),
        without_marker(&whole_text)
    );
    assert!(
        t.contains("no snapshot (-38)"),
        "the restored run has no plan: {t}"
    );
    assert_eq!(r.status, whole.status);
    for p in [&snap, &disk] {
        let _ = std::fs::remove_file(p);
    }
}

/// The demo's pattern word `index` (its 8 bytes).
fn pattern_word(index: usize) -> [u8; 8] {
    let mut s = 0x1234_5678_9abc_def1u64;
    let mut w = 0;
    for _ in 0..=index {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        w = s.wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    w.to_le_bytes()
}

#[test]
fn a_flipped_memory_byte_is_refused_eagerly_and_stops_a_lazy_run() {
    let Some((snap, disk)) = taken("memory-flip", PrivatePages::Seal(key())) else {
        return;
    };
    let mut bytes = std::fs::read(&snap).unwrap();
    // A word of the pattern's second half, which the guest reads after
    // the snapshot.
    let word = pattern_word((3 << 20) / 8);
    let at = bytes
        .windows(8)
        .position(|w| w == word)
        .expect("the pattern is in clear");
    bytes[at] ^= 0x01;
    let bad = temp("memory-flip-bad.snap");
    std::fs::write(&bad, &bytes).unwrap();
    let e = restore(&bad, Some(&key()), false, false, None).unwrap_err();
    assert!(
        matches!(e, VmmError::Restore(RestoreError::Corrupt { .. })),
        "eager: {e:?}"
    );
    for no_prefetch in [true, false] {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = bad.clone();
        std::thread::spawn(move || {
            let _ = tx.send(restore(&p, Some(&key()), true, no_prefetch, None));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("lazy (no prefetch {no_prefetch}): the run hangs"));
        match result {
            Err(VmmError::LazyRestore { reason }) => {
                assert!(!reason.is_empty());
            }
            Err(other) => panic!("lazy (no prefetch {no_prefetch}): {other:?}"),
            Ok((r, t)) => panic!(
                "lazy (no prefetch {no_prefetch}): the guest ran to the end on a corrupt snapshot: status {}, {t}",
                r.status
            ),
        }
    }
    for p in [&snap, &bad, &disk] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn a_machine_restores_with_its_conversion_policy() {
    // The policy is the gatekeeper's from its creation and the snapshot's
    // header does not carry it: the restore reads it from the VMM state.
    if !kvm_or_skip("policy") || on_backing("policy", BackingKind::Memfd, 0).is_none() {
        return;
    }
    let disk = disk("policy");
    let build = || {
        let config = MachineConfig {
            policy: gmem::Policy::Discard,
            ..MachineConfig::new(BackingKind::Memfd, RAM)
        };
        let mut m = Machine::new(config).unwrap();
        let (console, out) = Console::buffer();
        m.add_device(Box::new(VirtioConsole::new(console.clone(), Vec::new())))
            .unwrap();
        m.load_elf(gmem_guests::SNAPSHOT_DEMO).unwrap();
        (m, console, out)
    };
    let (m, console, out) = build();
    let whole = m.run_to_end(&console).unwrap();
    let whole_text = text(&out);
    let snap = temp("policy.snap");
    let (mut m, console, out) = build();
    m.set_snapshot_plan(plan(&snap, PrivatePages::Seal(key()), Then::Stop));
    m.run_to_end(&console).unwrap();
    let first_text = text(&out);
    let (console, out) = Console::buffer();
    let (m, _) = Machine::restore(
        std::fs::File::open(&snap).unwrap(),
        Some(&key()),
        RestoreOptions::new(console.clone()),
    )
    .unwrap();
    assert_eq!(m.config().policy, gmem::Policy::Discard);
    assert_eq!(m.gate().policy(), gmem::Policy::Discard);
    let r = m.run_to_end(&console).unwrap();
    assert_eq!(
        without_marker(&format!("{first_text}{}", text(&out))),
        without_marker(&whole_text)
    );
    assert_eq!(r.status, whole.status);
    for p in [&snap, &disk] {
        let _ = std::fs::remove_file(p);
    }
}

/// A flat guest (CPL0, a few instructions): vCPU 0 reads ABI key 8, asks
/// for a snapshot, and exits with `key8 × 1000 + rax + 100`; other vCPUs
/// spin.
fn port_guest() -> Vec<u8> {
    use gmem_vmm::abi::{AbiKey, PORT_ABI, PORT_EXIT, PORT_SNAPSHOT};
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut spin = a.create_label();
    let mut work = a.create_label();
    a.test(rsi, rsi).unwrap();
    a.jz(work).unwrap();
    a.set_label(&mut spin).unwrap();
    a.pause().unwrap();
    a.jmp(spin).unwrap();
    a.set_label(&mut work).unwrap();
    a.mov(eax, AbiKey::Snapshots as u32).unwrap();
    a.out(u32::from(PORT_ABI), eax).unwrap();
    a.in_(eax, u32::from(PORT_ABI)).unwrap();
    a.imul_3(r12d, eax, 1000).unwrap();
    a.xor(eax, eax).unwrap();
    a.out(u32::from(PORT_SNAPSHOT), eax).unwrap();
    a.add(eax, 100).unwrap();
    a.add(eax, r12d).unwrap();
    a.out(u32::from(PORT_EXIT), eax).unwrap();
    a.assemble(0x10_0000).unwrap()
}

fn run_port_guest(vcpus: u32, plan: Option<SnapshotPlan>) -> gmem_vmm::RunReport {
    let config = MachineConfig {
        vcpus,
        ..MachineConfig::new(BackingKind::Memfd, 4 << 20)
    };
    let mut m = Machine::new(config).unwrap();
    m.load(&port_guest(), 0x10_0000, 0x10_0000).unwrap();
    m.set_snapshot_plan(plan);
    let (console, _) = Console::buffer();
    m.run_to_end(&console).unwrap()
}

#[test]
fn the_snapshot_port_answers_as_the_abi_says() {
    use gmem_vmm::abi::ENOSYS;
    if !kvm_or_skip("snapshot port") || on_backing("snapshot port", BackingKind::Memfd, 0).is_none()
    {
        return;
    }
    // No plan: key 8 reads 0, the request -ENOSYS.
    assert_eq!(run_port_guest(1, None).status, 100 - ENOSYS as i32);
    let snap = temp("port.snap");
    let p = || plan(&snap, PrivatePages::Seal(key()), Then::Continue);
    // One vCPU, then two (the second paused while the machine is saved,
    // and restored spinning): key 8 reads 1, rax 0 in this run, 1 in the
    // restored one.
    for vcpus in [1, 2] {
        let r = run_port_guest(vcpus, p());
        assert_eq!(r.status, 1100, "{vcpus} vCPUs: {:?}", r.snapshot_notes);
        assert_eq!(r.snapshots.len(), 1);
        let (r, _) = restore(&snap, Some(&key()), false, false, None).unwrap();
        assert_eq!(r.status, 1101, "{vcpus} vCPUs");
        assert_eq!(r.vcpus, vcpus);
        let _ = std::fs::remove_file(&snap);
    }
}
