//! Snapshots through the gatekeeper and eager restores: round trips on
//! every backing this host has (restored onto another backing too), the
//! three private-page policies, sparse guests, and every kind of bad input
//! (each byte flipped, each length cut, wrong keys, other layouts, a full
//! disk), each refused with a typed error and never a half-restored VM
//! that runs.

use std::sync::Arc;

use gmem::snapshot::{PrivatePages, RestoreError, SealKey, SnapshotError};
use gmem::{
    Attribute, BackingKind, GateError, GateOptions, Gatekeeper, MemoryOptions, Policy,
    RestrictedMemory, SlotRequest, Vm, create_memory,
};
use gmem_testkit::{kvm_or_skip, on_backing};

const P: u64 = 4096;
const MIB: u64 = 1 << 20;
const SECRET: &[u8] = b"TOPSECRET: the guest's own key";

struct Guest {
    gate: Gatekeeper,
    memory: Arc<dyn RestrictedMemory>,
    _vm: Vm,
}

fn guest(kind: BackingKind, size: u64) -> Guest {
    let vm = Vm::new().unwrap();
    let memory = create_memory(MemoryOptions::new(kind, size), Some(&vm)).unwrap();
    let b = vm.bind(&memory, SlotRequest::new(0, 0, size)).unwrap();
    let gate = Gatekeeper::new(
        &vm,
        vec![b],
        GateOptions::new(Attribute::Shared, Policy::InPlace),
    )
    .unwrap();
    Guest {
        gate,
        memory,
        _vm: vm,
    }
}

/// A guest with a pattern in shared memory and a secret in private memory.
fn source(kind: BackingKind, size: u64) -> Guest {
    let g = guest(kind, size);
    g.gate.fill(0x10_0000, 3 * P, 0x5a).unwrap();
    g.gate.write(0x10_0000 + P + 7, b"shared data").unwrap();
    g.gate.write(0x2000, SECRET).unwrap();
    g.gate.convert(0x2000, P, Attribute::Private).unwrap();
    g
}

fn read(gate: &Gatekeeper, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    gate.read(gpa, &mut b).unwrap();
    b
}

fn key() -> SealKey {
    SealKey::new(*b"0123456789abcdef0123456789abcdef")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn sealed_round_trips_on_every_backing_and_across_them() {
    let test = "snapshot round trip";
    if !kvm_or_skip(test) {
        return;
    }
    let kinds = [
        BackingKind::Memfd,
        BackingKind::Hugetlb2M,
        BackingKind::GuestMemfd,
    ];
    for from in kinds {
        for to in kinds {
            // One hold per pool: both guests on hugetlb-2m share it.
            let Some(_a) = on_backing(test, from, 4) else {
                continue;
            };
            let _b = if to == from {
                None
            } else {
                match on_backing(test, to, 2) {
                    Some(b) => Some(b),
                    None => continue,
                }
            };
            let src = source(from, 2 * MIB);
            let mut stream = Vec::new();
            let rep = src
                .gate
                .snapshot(&mut stream, &PrivatePages::Seal(key()))
                .unwrap();
            assert!(!contains(&stream, SECRET), "{from}: the secret is in clear");
            assert_eq!(rep.stream_bytes, stream.len() as u64);
            let dst = guest(to, 2 * MIB);
            dst.gate
                .restore(&mut stream.as_slice(), Some(&key()))
                .unwrap();
            assert!(dst.gate.is_launched());
            assert_eq!(
                read(&dst.gate, 0x10_0000, 3 * P as usize),
                read(&src.gate, 0x10_0000, 3 * P as usize),
                "{from} -> {to}: shared pages"
            );
            assert_eq!(dst.gate.private_runs(), vec![0x2000..0x3000]);
            assert!(dst.gate.read(0x2000, &mut [0; 4]).is_err(), "still private");
            dst.gate.convert(0x2000, P, Attribute::Shared).unwrap();
            assert_eq!(
                &read(&dst.gate, 0x2000, SECRET.len())[..],
                SECRET,
                "{from} -> {to}"
            );
            // Holes stay holes: the restored file holds what the source did.
            let held = |m: &Arc<dyn RestrictedMemory>| -> u64 {
                m.populated().unwrap().iter().map(|r| r.end - r.start).sum()
            };
            if from == to {
                assert_eq!(held(&dst.memory), held(&src.memory), "{from}: population");
            }
        }
    }
}

#[test]
fn refuse_and_omit_do_what_they_say() {
    let test = "snapshot policies";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let src = source(BackingKind::Memfd, 2 * MIB);
    let mut stream = Vec::new();
    let e = src
        .gate
        .snapshot(&mut stream, &PrivatePages::Refuse)
        .unwrap_err();
    assert!(
        matches!(
            e,
            SnapshotError::PrivatePages {
                first_gpa: 0x2000,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EPERM);
    assert!(
        stream.is_empty(),
        "a refused snapshot wrote {} bytes",
        stream.len()
    );
    let rep = src.gate.snapshot(&mut stream, &PrivatePages::Omit).unwrap();
    assert_eq!(rep.omitted_bytes, P);
    assert!(!contains(&stream, SECRET));
    let dst = guest(BackingKind::Memfd, 2 * MIB);
    dst.gate.restore(&mut stream.as_slice(), None).unwrap();
    assert_eq!(
        dst.gate.private_runs(),
        vec![0x2000..0x3000],
        "restored private"
    );
    dst.gate.convert(0x2000, P, Attribute::Shared).unwrap();
    assert_eq!(read(&dst.gate, 0x2000, 16), vec![0; 16], "and zero");
    // A VM with no private page snapshots under Refuse.
    let plain = guest(BackingKind::Memfd, 2 * MIB);
    plain.gate.write(0, b"x").unwrap();
    plain
        .gate
        .snapshot(&mut Vec::new(), &PrivatePages::Refuse)
        .unwrap();
}

/// Flipping any byte of a sealed snapshot is detected, cutting it at any
/// length too; a refusal before the memory was touched leaves the VM as it
/// was, one after poisons it (it never runs).
#[test]
fn every_flipped_byte_and_every_cut_is_refused() {
    let test = "snapshot tampering";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let src = guest(BackingKind::Memfd, 2 * MIB);
    src.gate.write(0x1000, b"shared").unwrap();
    src.gate.write(0x3000, SECRET).unwrap();
    src.gate.convert(0x3000, P, Attribute::Private).unwrap();
    let mut stream = Vec::new();
    src.gate
        .snapshot(&mut stream, &PrivatePages::Seal(key()))
        .unwrap();
    let vm = Vm::new().unwrap();
    let mem = create_memory(MemoryOptions::new(BackingKind::Memfd, 2 * MIB), Some(&vm)).unwrap();
    let try_restore = |bytes: &[u8]| {
        let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 * MIB)).unwrap();
        let gate = Gatekeeper::new(&vm, vec![b], GateOptions::default()).unwrap();
        let r = gate.restore(&mut &bytes[..], Some(&key()));
        if r.is_err() {
            let touched = gate.poisoned().is_some();
            assert!(
                touched || !gate.is_launched(),
                "a refused restore left a runnable VM"
            );
        }
        r.map(drop)
    };
    try_restore(&stream).unwrap();
    for i in 0..stream.len() {
        let mut bad = stream.clone();
        bad[i] ^= 0x40;
        assert!(
            try_restore(&bad).is_err(),
            "byte {i} of {} flipped",
            stream.len()
        );
    }
    for cut in (0..stream.len()).step_by(7) {
        let e = try_restore(&stream[..cut]).unwrap_err();
        assert!(
            matches!(e, RestoreError::Truncated { .. }),
            "cut at {cut}: {e}"
        );
    }
}

#[test]
fn keys_layouts_pins_and_full_disks_are_refused_by_name() {
    let test = "snapshot refusals";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let src = source(BackingKind::Memfd, 2 * MIB);
    let mut stream = Vec::new();
    src.gate
        .snapshot(&mut stream, &PrivatePages::Seal(key()))
        .unwrap();
    let dst = guest(BackingKind::Memfd, 2 * MIB);
    let e = dst.gate.restore(&mut stream.as_slice(), None).unwrap_err();
    assert!(matches!(e, RestoreError::NeedsKey), "{e}");
    let e = dst
        .gate
        .restore(&mut stream.as_slice(), Some(&SealKey::new([9; 32])))
        .unwrap_err();
    assert!(matches!(e, RestoreError::WrongKey), "{e}");
    assert_eq!(e.errno(), libc::EKEYREJECTED);
    assert!(
        dst.gate.poisoned().is_none(),
        "refused before touching memory"
    );
    dst.gate
        .restore(&mut stream.as_slice(), Some(&key()))
        .unwrap();
    // A VM too small, or laid out otherwise.
    for size in [4 * MIB, MIB] {
        let other = guest(BackingKind::Memfd, size);
        let e = other
            .gate
            .restore(&mut stream.as_slice(), Some(&key()))
            .unwrap_err();
        assert!(matches!(e, RestoreError::Layout { .. }), "{e}");
        assert!(e.to_string().contains("[0x0, +0x200000)"), "{e}");
    }
    // A restored (running) VM takes no second restore.
    let e = dst
        .gate
        .restore(&mut stream.as_slice(), Some(&key()))
        .unwrap_err();
    assert!(
        matches!(e, RestoreError::Gate(GateError::NotRestorable { .. })),
        "{e}"
    );
    // Not a snapshot, another version.
    let e = guest(BackingKind::Memfd, 2 * MIB)
        .gate
        .restore(&mut &b"not a snapshot at all, really not"[..], None)
        .unwrap_err();
    assert!(matches!(e, RestoreError::NotASnapshot), "{e}");
    let mut v2 = stream.clone();
    v2[8] = 1;
    let e = guest(BackingKind::Memfd, 2 * MIB)
        .gate
        .restore(&mut v2.as_slice(), Some(&key()))
        .unwrap_err();
    assert!(matches!(e, RestoreError::Version { found: 1 }), "{e}");
    // Pins live: refused, EAGAIN.
    let pin = src.gate.pin(0x10_0000, 8).unwrap();
    let e = src
        .gate
        .snapshot(&mut Vec::new(), &PrivatePages::Omit)
        .unwrap_err();
    assert_eq!(e.errno(), libc::EAGAIN, "{e}");
    drop(pin);
    // A full disk: the error is the writer's, and the VM goes on untouched.
    struct Full(usize);
    impl std::io::Write for Full {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.0 < b.len() {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.0 -= b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let before = src.gate.attributes();
    let e = src
        .gate
        .snapshot(&mut Full(5000), &PrivatePages::Seal(key()))
        .unwrap_err();
    assert!(matches!(e, SnapshotError::Write(_)), "{e}");
    assert_eq!(e.errno(), libc::ENOSPC);
    assert_eq!(src.gate.attributes(), before);
    src.gate.write(0x10_0000, b"still running").unwrap();
}

/// A 1 TiB guest that touched 16 MiB writes a snapshot of about 16 MiB:
/// holes are not written, and a restore allocates none.
#[test]
fn a_sparse_guest_writes_what_it_touched() {
    let test = "sparse snapshot";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let size = 1u64 << 40;
    let src = guest(BackingKind::Memfd, size);
    for i in 0..16u64 {
        src.gate.fill(i * (size / 16), MIB, i as u8 + 1).unwrap();
    }
    let mut stream = Vec::new();
    let rep = src
        .gate
        .snapshot(&mut stream, &PrivatePages::Refuse)
        .unwrap();
    assert_eq!(rep.shared_bytes, 16 * MIB);
    assert!(
        stream.len() as u64 <= 16 * MIB + 16 * 64 + 4096,
        "{} bytes",
        stream.len()
    );
    let dst = guest(BackingKind::Memfd, size);
    dst.gate.restore(&mut stream.as_slice(), None).unwrap();
    let held: u64 = dst
        .memory
        .populated()
        .unwrap()
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    assert_eq!(held, 16 * MIB, "the restore allocated holes");
    assert_eq!(read(&dst.gate, 5 * (size / 16) + 100, 4), vec![6; 4]);
}
