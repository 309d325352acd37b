//! Lazy restores over userfaultfd, through the library: what host code
//! sees before, while and after blocks are filled (never a restored page as
//! zero), holes and discards of pending blocks, prefetch and recorded
//! orders, and tampering found at open time or at fill time (the
//! gatekeeper poisoned, never a zero page served to the host). Guest
//! (vCPU) faults are tried by the VMM's tests (`gmem-vmm/tests`).

use std::time::Duration;

use gmem::snapshot::{LazyOptions, PrivatePages, SealKey};
use gmem::{
    Attribute, BackingKind, GateError, GateOptions, Gatekeeper, MemoryOptions, Policy, SlotRequest,
    Vm, create_memory,
};
use gmem_testkit::{kvm_or_skip, on_backing};

mod common;
use common::{file_of, key, read};

const P: u64 = 4096;
const MIB: u64 = 1 << 20;
const SECRET: &[u8] = b"TOPSECRET: the guest's own key";

struct Guest {
    gate: Gatekeeper,
    _vm: Vm,
}

fn guest(kind: BackingKind, size: u64) -> Guest {
    let opts = GateOptions::new(Attribute::Shared, Policy::InPlace);
    let (vm, _memory, gate) = common::gate_on(kind, size, opts);
    Guest { gate, _vm: vm }
}

/// A snapshot file of a guest with `mib` MiB of patterned shared memory
/// from 1 MiB on, and a secret in a private page at 0x2000.
fn snapshot_file(kind: BackingKind, size: u64, mib: u64) -> (std::fs::File, Vec<u8>) {
    let src = guest(kind, size);
    for i in 0..mib * MIB / P {
        src.gate.fill(MIB + i * P, P, (i % 251) as u8 + 1).unwrap();
    }
    src.gate.write(0x2000, SECRET).unwrap();
    src.gate.convert(0x2000, P, Attribute::Private).unwrap();
    let mut stream = Vec::new();
    src.gate
        .snapshot_with_state(&mut stream, &PrivatePages::Seal(key()), b"vcpu state")
        .unwrap();
    (file_of(&stream), stream)
}

#[test]
fn host_code_reads_what_the_snapshot_held_before_any_fill() {
    let test = "lazy restore: host access";
    if !kvm_or_skip(test) {
        return;
    }
    for kind in [BackingKind::Memfd, BackingKind::Hugetlb2M] {
        let Some(_hold) = on_backing(test, kind, 8) else {
            continue;
        };
        let (file, _) = snapshot_file(kind, 4 * MIB, 2);
        let dst = guest(kind, 4 * MIB);
        let lazy = dst
            .gate
            .restore_lazy(file, Some(&key()), LazyOptions::new().without_prefetch())
            .unwrap();
        assert_eq!(lazy.state(), b"vcpu state");
        assert!(dst.gate.is_launched());
        let before = lazy.progress();
        assert!(
            before.pending > 0 && before.pending == before.blocks,
            "{kind}: {before:?}"
        );
        // Host reads fill first: never zero where the snapshot held bytes.
        for i in [0, 1, 255, 256, 511] {
            let b = read(&dst.gate, MIB + i * P, P as usize);
            assert!(
                b.iter().all(|&x| x == (i % 251) as u8 + 1),
                "{kind}: page {i}"
            );
        }
        assert!(lazy.progress().host_fills > 0, "{kind}");
        // A hole (never written) read through the host mapping: the fault
        // thread serves a zero page.
        assert_eq!(read(&dst.gate, 3 * MIB + 5 * P, 8), vec![0; 8], "{kind}");
        // Private stays private; converted, it holds the secret.
        assert!(dst.gate.read(0x2000, &mut [0; 4]).is_err());
        dst.gate.convert(0x2000, P, Attribute::Shared).unwrap();
        assert_eq!(&read(&dst.gate, 0x2000, SECRET.len())[..], SECRET, "{kind}");
        // The record order starts with what host code touched.
        assert!(!lazy.touch_order().0.is_empty());
        let done = lazy.finish().unwrap();
        assert_eq!(done.pending, 0, "{kind}");
        let b = read(&dst.gate, MIB + 300 * P, P as usize);
        assert!(b.iter().all(|&x| x == (300 % 251) as u8 + 1), "{kind}");
    }
}

#[test]
fn a_discarded_pending_block_reads_zero_and_the_prefetcher_fills_the_rest() {
    let test = "lazy restore: discard and prefetch";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let (file, _) = snapshot_file(BackingKind::Memfd, 4 * MIB, 2);
    let dst = guest(BackingKind::Memfd, 4 * MIB);
    let lazy = dst
        .gate
        .restore_lazy(file, Some(&key()), LazyOptions::new().without_prefetch())
        .unwrap();
    // Populating the file would put zeroes where the snapshot's pages
    // belong: refused while the restore fills it.
    let mem = dst.gate.bindings().next().unwrap().memory().clone();
    let e = mem
        .allocate(gmem::FileRange::new(MIB, P).unwrap())
        .unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    // The first 1 MiB record of shared data: discarded before it was filled.
    dst.gate.discard(MIB, MIB).unwrap();
    assert_eq!(read(&dst.gate, MIB, 16), vec![0; 16]);
    assert_eq!(lazy.progress().forgotten, 1);
    // Part of the next record: it is filled first, then that part punched.
    dst.gate.discard(2 * MIB, P).unwrap();
    assert_eq!(read(&dst.gate, 2 * MIB, 16), vec![0; 16]);
    assert_eq!(read(&dst.gate, 2 * MIB + P, 1), vec![(257 % 251) as u8 + 1]);
    drop(lazy); // fills the rest
    mem.allocate(gmem::FileRange::new(MIB, P).unwrap()).unwrap();
    assert_eq!(
        read(&dst.gate, 2 * MIB + 200 * P, 1),
        vec![(456 % 251) as u8 + 1]
    );

    // With the prefetcher, and a recorded order, everything comes in alone.
    let (file, _) = snapshot_file(BackingKind::Memfd, 4 * MIB, 2);
    let dst = guest(BackingKind::Memfd, 4 * MIB);
    let order = gmem::snapshot::PrefetchOrder(vec![2 * MIB, 0x2000]);
    let lazy = dst
        .gate
        .restore_lazy(file, Some(&key()), LazyOptions::new().with_order(order))
        .unwrap();
    assert!(
        lazy.wait(Duration::from_secs(30)),
        "the prefetcher finishes"
    );
    let p = lazy.progress();
    assert_eq!(p.pending, 0);
    assert!(p.prefetch_fills > 0, "{p:?}");
    assert!(lazy.failure().is_none());
    assert_eq!(read(&dst.gate, MIB + 3 * P, 1), vec![4]);
}

#[test]
fn tampering_is_refused_at_open_or_poisons_at_fill_never_served_as_zero() {
    let test = "lazy restore: tampering";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    // A small snapshot: one shared page and one private page.
    let src = guest(BackingKind::Memfd, 2 * MIB);
    src.gate.write(0x1000, b"shared").unwrap();
    src.gate.write(0x3000, SECRET).unwrap();
    src.gate.convert(0x3000, P, Attribute::Private).unwrap();
    let mut stream = Vec::new();
    src.gate
        .snapshot_with_state(&mut stream, &PrivatePages::Seal(key()), b"state")
        .unwrap();
    let vm = Vm::new().unwrap();
    let mem = create_memory(MemoryOptions::new(BackingKind::Memfd, 2 * MIB), Some(&vm)).unwrap();
    let (mut at_open, mut at_fill) = (0, 0);
    for i in 0..stream.len() {
        let mut bad = stream.clone();
        bad[i] ^= 0x08;
        let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 * MIB)).unwrap();
        let gate = Gatekeeper::new(&vm, vec![b], GateOptions::default()).unwrap();
        match gate.restore_lazy(
            file_of(&bad),
            Some(&key()),
            LazyOptions::new().without_prefetch(),
        ) {
            Err(_) => {
                assert!(
                    !gate.is_launched(),
                    "byte {i}: a refused restore changed the VM"
                );
                at_open += 1;
            }
            Ok(lazy) => {
                // The flip is in a data record: the host's read of it fails
                // and the gatekeeper is poisoned.
                let r1 = gate.read(0x1000, &mut [0; 6]);
                let r2 = gate.convert(0x3000, P, Attribute::Shared).map(drop);
                let failed = r1.is_err() || r2.is_err() || lazy.finish().is_err();
                assert!(failed, "byte {i} of {} flipped, unnoticed", stream.len());
                assert!(gate.poisoned().is_some(), "byte {i}: not poisoned");
                assert!(
                    matches!(
                        gate.read(0x1000, &mut [0; 1]),
                        Err(GateError::Poisoned { .. })
                    ),
                    "byte {i}"
                );
                at_fill += 1;
            }
        }
    }
    assert!(
        at_open > 0 && at_fill > 0,
        "{at_open} at open, {at_fill} at fill"
    );
    // A cut anywhere is refused at open.
    for cut in (0..stream.len()).step_by(5) {
        let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 * MIB)).unwrap();
        let gate = Gatekeeper::new(&vm, vec![b], GateOptions::default()).unwrap();
        assert!(
            gate.restore_lazy(file_of(&stream[..cut]), Some(&key()), LazyOptions::new())
                .is_err(),
            "cut at {cut}"
        );
    }
    // A wrong key: refused before anything changes.
    let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 * MIB)).unwrap();
    let gate = Gatekeeper::new(&vm, vec![b], GateOptions::default()).unwrap();
    let e = gate
        .restore_lazy(
            file_of(&stream),
            Some(&SealKey::new([9; 32])),
            LazyOptions::new(),
        )
        .unwrap_err();
    assert_eq!(e.errno(), libc::EKEYREJECTED, "{e}");
    assert!(!gate.is_launched());
}
