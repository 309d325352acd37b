//! Independent attack review of the snapshot format, the eager and lazy
//! restores, userfaultfd, and the gatekeeper's lazy-restore hooks.
//!
//! Every test here is an attack. One that passes documents an attack the
//! library withstood; one that FAILS is a claim broken, and its comment
//! says which claim, the exact sequence, and where the fault lies.
//! The eight breaks found ("BROKEN, then FIXED") were fixed in the library
//! and pass now: shared records are tagged under `Seal`; a key given
//! refuses an unsealed snapshot (`RestoreError::NotSealed`); `allocate` is
//! refused under the lock it takes, from before the restore's punch; a
//! block fill that finds a page present fails instead of waking; records
//! never cross a 1 MiB boundary, so hugetlb blocks are huge pages; the
//! index grows as it is read, bounded by the layout; private runs end on a
//! page; the end's counts are added with checks.
//!
//! Real KVM (skipped without it, as the other tests are).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gmem::snapshot::{LazyOptions, PrivatePages, RestoreError, SealKey};
use gmem::{Attribute, BackingKind, GateError, GateOptions, Gatekeeper, Policy, Vm};
use gmem_testkit::{kvm_or_skip, on_backing};

mod common;
use common::{file_of, key, read, tempfile};

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

/// The byte page `i` (from GPA 0) holds in the patterned guests.
fn pat(gpa: u64) -> u8 {
    ((gpa / P) % 251) as u8 + 1
}

/// A guest with `[from, from + mib MiB)` patterned (page i holds `pat`),
/// and a secret in a private page at 0x2000; its snapshot.
fn patterned_snapshot(
    kind: BackingKind,
    size: u64,
    from: u64,
    mib: u64,
    private: &PrivatePages,
) -> Vec<u8> {
    let src = guest(kind, size);
    for i in 0..mib * MIB / P {
        let g = from + i * P;
        src.gate.fill(g, P, pat(g)).unwrap();
    }
    src.gate.write(0x2000, SECRET).unwrap();
    src.gate.convert(0x2000, P, Attribute::Private).unwrap();
    let mut stream = Vec::new();
    src.gate
        .snapshot_with_state(&mut stream, private, b"vcpu state")
        .unwrap();
    stream
}

// ---------------------------------------------------------------- parsing

fn u32_at(s: &[u8], a: usize) -> u32 {
    u32::from_le_bytes(s[a..a + 4].try_into().unwrap())
}
fn u64_at(s: &[u8], a: usize) -> u64 {
    u64::from_le_bytes(s[a..a + 8].try_into().unwrap())
}

fn sealed(s: &[u8]) -> bool {
    s[12] == 1
}

/// The header's bytes (its tag included under Seal).
fn header_len(s: &[u8]) -> usize {
    let (r, n) = (u32_at(s, 32) as usize, u32_at(s, 36) as usize);
    40 + 40 * r + 16 * n + 4 + if sealed(s) { 16 } else { 0 }
}

#[derive(Clone, Copy, Debug)]
struct Rec {
    at: usize,
    kind: u8,
    len: usize,
    aux: u64,
    total: usize,
}

fn records(s: &[u8]) -> Vec<Rec> {
    let sealed = sealed(s);
    let mut at = header_len(s);
    let mut out = Vec::new();
    while at < s.len() {
        let kind = s[at];
        let len = u32_at(s, at + 4) as usize;
        let aux = u64_at(s, at + 8);
        let tag = if sealed && kind != 1 { 16 } else { 0 };
        let total = 16 + len + tag + 4;
        out.push(Rec {
            at,
            kind,
            len,
            aux,
            total,
        });
        at += total;
    }
    out
}

/// Recomputes a record's CRC-32C (what any attacker can do: it is no MAC).
fn fix_crc(s: &mut [u8], r: &Rec) {
    let c = crc32c::crc32c(&s[r.at..r.at + r.total - 4]);
    s[r.at + r.total - 4..r.at + r.total].copy_from_slice(&c.to_le_bytes());
}

/// Runs `f` in a thread; panics if it takes longer than `secs` (a hang).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("HANG: {what} did not return within {secs} s"),
    }
}

/// Restores `bytes` lazily onto a fresh 4 MiB memfd guest; panics inside
/// the library are caught and turned into `Err(message)`.
fn try_lazy(
    bytes: &[u8],
    key: Option<&SealKey>,
) -> Result<(Guest, Result<(), RestoreError>), String> {
    let dst = guest(BackingKind::Memfd, 4 * MIB);
    let file = file_of(bytes);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dst.gate
            .restore_lazy(file, key, LazyOptions::new().without_prefetch())
            .and_then(|l| l.finish().map(drop))
    }));
    match r {
        Ok(r) => Ok((dst, r)),
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()),
    }
}

// ======================================================= claim 4: bounds

/// BROKEN, then FIXED (claim 4, "no panic on any input"). An unsealed snapshot whose
/// end record claims `index_records = u64::MAX` (CRC recomputed) makes
/// `Gatekeeper::restore_lazy` panic with "attempt to add with overflow" in
/// any build with overflow checks (debug, tests): `read_index` computes
/// `records.checked_sub(2 + end.index_records)`, the `2 +` unchecked
/// (crates/gmem/src/snapshot/lazy.rs:409). In release it wraps (to 1) and is
/// then refused by the `data > len / 4096` check, by luck.
#[test]
fn lazy_end_record_index_count_u64_max_does_not_panic() {
    let test = "attack: end index_records u64::MAX";
    if !kvm_or_skip(test) {
        return;
    }
    let mut s = patterned_snapshot(BackingKind::Memfd, 4 * MIB, MIB, 1, &PrivatePages::Omit);
    let end = *records(&s).last().unwrap();
    assert_eq!(end.kind, 0xff);
    let p = end.at + 16;
    s[p + 24..p + 32].copy_from_slice(&u64::MAX.to_le_bytes());
    fix_crc(&mut s, &end);
    match try_lazy(&s, None) {
        Err(panic) => panic!("restore_lazy PANICKED on a crafted end record: {panic}"),
        Ok((dst, r)) => {
            assert!(r.is_err());
            assert!(!dst.gate.is_launched());
        }
    }
    // And eagerly (a running CRC compare): refused, poisoned.
    let dst = guest(BackingKind::Memfd, 4 * MIB);
    assert!(dst.gate.restore(&mut s.as_slice(), None).is_err());
    assert!(dst.gate.poisoned().is_some());
}

/// The child side of `lazy_sparse_file_huge_index_allocation`: a sparse
/// snapshot file of 2^46 bytes (one page of it real) whose end record claims
/// 2^34 data records; `read_index` allocates `Vec::with_capacity(data)` (24
/// bytes each: 384 GiB) before reading one index record.
fn sparse_huge_index_attack() {
    let s = patterned_snapshot(BackingKind::Memfd, 4 * MIB, MIB, 1, &PrivatePages::Omit);
    let recs = records(&s);
    let first_data = recs[1].at; // after the state record
    let size: u64 = 1 << 46;
    let f = tempfile();
    f.write_all_at(&s[..first_data], 0).unwrap();
    f.set_len(size).unwrap();
    let data: u64 = (size / 4096) - 1; // passes `data > len / 4096`
    let index_records = 1u64;
    let mut end = Vec::new();
    end.extend_from_slice(&[0xff, 0, 0, 0]);
    end.extend_from_slice(&32u32.to_le_bytes());
    end.extend_from_slice(&(data + 2 + index_records).to_le_bytes());
    end.extend_from_slice(&0u64.to_le_bytes()); // shared
    end.extend_from_slice(&0u64.to_le_bytes()); // sealed
    end.extend_from_slice(&(first_data as u64).to_le_bytes()); // index_at
    end.extend_from_slice(&index_records.to_le_bytes());
    let c = crc32c::crc32c(&end);
    end.extend_from_slice(&c.to_le_bytes());
    f.write_all_at(&end, size - end.len() as u64).unwrap();
    let dst = guest(BackingKind::Memfd, 4 * MIB);
    let r = dst
        .gate
        .restore_lazy(f, None, LazyOptions::new().without_prefetch());
    assert!(r.is_err(), "a sparse 64 TiB file restored?");
    assert!(!dst.gate.is_launched());
    println!("CHILD-OK: {:?}", r.err());
}

/// BROKEN, then FIXED (claim 4, "no huge allocation"). `read_index` bounds the entry
/// count by the file's *length* (`data > len / 4096`,
/// crates/gmem/src/snapshot/lazy.rs:411) and then calls
/// `Vec::with_capacity(data)` (lazy.rs:417) before reading a single index
/// record. A sparse file costs nothing: `ftruncate` a memfd to 2^46 bytes,
/// put a valid header, state and a 52-byte end record (CRC fixed, unsealed)
/// claiming 2^34 records at its end, and `restore_lazy` asks the allocator
/// for 384 GiB; the process aborts ("memory allocation of ... bytes
/// failed"), or on an overcommitting host gets it. Run in a child process
/// so the abort does not take this test binary down.
#[test]
fn lazy_sparse_file_huge_index_allocation() {
    let test = "attack: sparse file, huge index";
    if std::env::var_os("GMEM_ATTACK_CHILD").is_some() {
        sparse_huge_index_attack();
        return;
    }
    if !kvm_or_skip(test) {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lazy_sparse_file_huge_index_allocation",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("GMEM_ATTACK_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("CHILD-OK"),
        "restore_lazy of a sparse 64 TiB snapshot file killed the process: {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
}

/// HELD. Short, empty and nonsense inputs at open, eager and lazy: a typed
/// error, no panic, the gatekeeper unchanged (lazy) or poisoned (eager,
/// past the header only).
#[test]
fn empty_truncated_and_wrong_version_inputs_are_refused() {
    let test = "attack: empty, truncated, wrong version";
    if !kvm_or_skip(test) {
        return;
    }
    let s = patterned_snapshot(
        BackingKind::Memfd,
        4 * MIB,
        MIB,
        1,
        &PrivatePages::Seal(key()),
    );
    // 0 bytes.
    let (dst, r) = try_lazy(&[], Some(&key())).unwrap();
    assert!(
        matches!(
            r,
            Err(RestoreError::Truncated { .. } | RestoreError::NotASnapshot)
        ),
        "{r:?}"
    );
    assert!(!dst.gate.is_launched());
    let dst = guest(BackingKind::Memfd, 4 * MIB);
    assert!(dst.gate.restore(&mut &[][..], Some(&key())).is_err());
    // Every cut, lazily (every 97th byte to keep it short, and the last 64).
    let cuts: Vec<usize> = (0..s.len())
        .step_by(97)
        .chain(s.len().saturating_sub(64)..s.len())
        .collect();
    for n in cuts {
        let (dst, r) = try_lazy(&s[..n], Some(&key())).unwrap();
        assert!(r.is_err(), "cut at {n}");
        assert!(!dst.gate.is_launched(), "cut at {n}: launched");
    }
    // Version 1 and 3, CRC fixed: refused by version.
    for v in [1u32, 3, u32::MAX] {
        let mut b = s.clone();
        b[8..12].copy_from_slice(&v.to_le_bytes());
        let (dst, r) = try_lazy(&b, Some(&key())).unwrap();
        assert!(
            matches!(r, Err(RestoreError::Version { found }) if found == v),
            "{r:?}"
        );
        assert!(!dst.gate.is_launched());
    }
    // Wrong key.
    let (dst, r) = try_lazy(&s, Some(&SealKey::new([9; 32]))).unwrap();
    assert!(matches!(r, Err(RestoreError::WrongKey)), "{r:?}");
    assert!(!dst.gate.is_launched());
    let (dst, r) = try_lazy(&s, None).unwrap();
    assert!(matches!(r, Err(RestoreError::NeedsKey)), "{r:?}");
    assert!(!dst.gate.is_launched());
}

/// HELD. Unsealed snapshots (no MAC: an attacker fixes CRCs) with crafted
/// end records, index entries and state lengths: every one refused at open
/// (lazy: gatekeeper unchanged) without a panic, or (eager) refused.
#[test]
fn crafted_end_index_and_state_with_fixed_crcs_are_refused() {
    let test = "attack: crafted end/index/state";
    if !kvm_or_skip(test) {
        return;
    }
    let s = patterned_snapshot(BackingKind::Memfd, 4 * MIB, MIB, 2, &PrivatePages::Omit);
    let recs = records(&s);
    let end = *recs.last().unwrap();
    let index = recs[recs.len() - 2];
    assert_eq!(index.kind, 4);
    let state = recs[0];
    assert_eq!(state.kind, 3);
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // The end's index_at pointing anywhere, its counts anything.
    for (field, vals) in [
        (
            16usize,
            vec![
                0u64,
                1,
                8,
                state.at as u64,
                recs[1].at as u64 + 4,
                end.at as u64,
                u64::MAX,
            ],
        ),
        (24, vec![0, 2, 1 << 40, u64::MAX - 1]),
        (0, vec![0, 1, u64::MAX]),
        (8, vec![1, u64::MAX]),
    ] {
        for v in vals {
            let mut b = s.clone();
            b[end.at + 16 + field..end.at + 24 + field].copy_from_slice(&v.to_le_bytes());
            fix_crc(&mut b, &end);
            cases.push((format!("end field {field} = {v:#x}"), b));
        }
    }
    // The end's record count (aux) anything.
    for v in [0u64, 1, 2, 1 << 40, u64::MAX] {
        let mut b = s.clone();
        b[end.at + 8..end.at + 16].copy_from_slice(&v.to_le_bytes());
        fix_crc(&mut b, &end);
        cases.push((format!("end aux = {v:#x}"), b));
    }
    // Index entries: overlapping, outside the layout, wrong kinds/lengths,
    // offsets anywhere.
    let e0 = index.at + 16;
    for (what, off, bytes) in [
        (
            "gpa of entry 1 = entry 0's",
            24usize,
            MIB.to_le_bytes().to_vec(),
        ),
        ("gpa past the layout", 0, (64 * MIB).to_le_bytes().to_vec()),
        ("gpa wrapping", 0, (u64::MAX - 4095).to_le_bytes().to_vec()),
        ("gpa unaligned", 0, (MIB + 1).to_le_bytes().to_vec()),
        ("offset 0", 8, 0u64.to_le_bytes().to_vec()),
        (
            "offset past the file",
            8,
            (1u64 << 50).to_le_bytes().to_vec(),
        ),
        ("len 0", 16, 0u32.to_le_bytes().to_vec()),
        ("len 4 GiB-1", 16, u32::MAX.to_le_bytes().to_vec()),
        ("len 2 MiB", 16, (2 * MIB as u32).to_le_bytes().to_vec()),
        ("kind sealed", 20, vec![2]),
        ("kind state", 20, vec![3]),
    ] {
        let mut b = s.clone();
        b[e0 + off..e0 + off + bytes.len()].copy_from_slice(&bytes);
        fix_crc(&mut b, &index);
        cases.push((format!("index: {what}"), b));
    }
    // The index's entry count (aux) anything.
    for v in [0u64, 1, 3, 43_691, u64::MAX] {
        let mut b = s.clone();
        b[index.at + 8..index.at + 16].copy_from_slice(&v.to_le_bytes());
        fix_crc(&mut b, &index);
        cases.push((format!("index aux = {v:#x}"), b));
    }
    // The state's length: 4 GiB - 1, 1 MiB + 1.
    for v in [u32::MAX, (MIB as u32) + 1, 1 << 31] {
        let mut b = s.clone();
        b[state.at + 4..state.at + 8].copy_from_slice(&v.to_le_bytes());
        fix_crc(&mut b, &state);
        cases.push((format!("state len = {v:#x}"), b));
    }
    // Records reordered: data records 1 and 2 swapped (headers say their
    // GPAs), CRCs intact.
    {
        let (a, c) = (recs[1], recs[2]);
        assert_eq!((a.kind, c.kind), (1, 1));
        let mut b = s.clone();
        let mut swapped = s[c.at..c.at + c.total].to_vec();
        swapped.extend_from_slice(&s[a.at..a.at + a.total]);
        b[a.at..c.at + c.total].copy_from_slice(&swapped);
        cases.push(("data records swapped".into(), b));
    }
    let mut broken = Vec::new();
    for (what, b) in &cases {
        match try_lazy(b, None) {
            Err(panic) => broken.push(format!("{what}: lazy PANIC {panic}")),
            Ok((dst, r)) => {
                if r.is_ok() {
                    broken.push(format!("{what}: lazy restore accepted it"));
                } else if dst.gate.is_launched() && dst.gate.poisoned().is_none() {
                    broken.push(format!(
                        "{what}: lazy refusal left a launched, live gatekeeper"
                    ));
                }
            }
        }
        let dst = guest(BackingKind::Memfd, 4 * MIB);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            dst.gate.restore(&mut b.as_slice(), None).map(drop)
        }));
        match r {
            Err(_) => broken.push(format!("{what}: eager PANIC")),
            Ok(Ok(())) => broken.push(format!("{what}: eager restore accepted it")),
            Ok(Err(_)) => {
                if dst.gate.is_launched() && dst.gate.poisoned().is_none() {
                    broken.push(format!("{what}: eager refusal left a live VM"));
                }
            }
        }
    }
    // `lazy_end_record_index_count_u64_max_does_not_panic` has the one
    // panic found; the rest must hold.
    // (u64::MAX - 1 overflows `2 + index_records` the same way.)
    broken.retain(|b| !b.contains("field 24 = 0xfffffffffffffffe: lazy PANIC"));
    assert!(broken.is_empty(), "{broken:#?}");
}

// ==================================================== claim 2: integrity

/// BROKEN, then FIXED (claim 2, "a tampered ... snapshot is refused"). Under
/// `PrivatePages::Seal`, shared records are neither encrypted nor
/// authenticated: `open_record` returns `true` for `Kind::Shared`
/// (crates/gmem/src/snapshot/restore.rs:244), and the index/end tags cover
/// only GPAs, offsets, lengths and byte counts, never a shared record's
/// bytes. Change a shared page's bytes in a sealed snapshot, recompute the
/// record's CRC-32C (not a MAC), and both `restore` and `restore_lazy`
/// accept it under the right key: the guest runs attacker-chosen shared
/// memory (its kernel text, page tables, the bounce buffers through which
/// it later exposes private data) while the VMM believes the snapshot
/// authenticated.
#[test]
fn sealed_snapshot_shared_bytes_can_be_edited() {
    let test = "attack: edit shared bytes of a sealed snapshot";
    if !kvm_or_skip(test) {
        return;
    }
    let mut s = patterned_snapshot(
        BackingKind::Memfd,
        4 * MIB,
        MIB,
        1,
        &PrivatePages::Seal(key()),
    );
    let shared = *records(&s).iter().find(|r| r.kind == 1).unwrap();
    let evil = b"ATTACKER CODE";
    s[shared.at + 16..shared.at + 16 + evil.len()].copy_from_slice(evil);
    fix_crc(&mut s, &shared);
    let gpa = shared.aux;

    let eager = guest(BackingKind::Memfd, 4 * MIB);
    let er = eager.gate.restore(&mut s.as_slice(), Some(&key()));
    let (lazy_dst, lr) = try_lazy(&s, Some(&key())).unwrap();
    let mut accepted = Vec::new();
    if er.is_ok() && read(&eager.gate, gpa, evil.len()) == evil {
        accepted.push("eager restore");
    }
    if lr.is_ok() && read(&lazy_dst.gate, gpa, evil.len()) == evil {
        accepted.push("lazy restore");
    }
    assert!(
        accepted.is_empty(),
        "a sealed snapshot with edited shared bytes was accepted by: {accepted:?}"
    );
}

/// BROKEN, then FIXED (claim 2, "spliced: records from another snapshot under the
/// same key"). Two sealed snapshots under one key of guests with the same
/// layout: a shared record of snapshot B, with the same GPA and length,
/// dropped into snapshot A in place of A's. Its CRC is its own, the index
/// entry (GPA, offset, length, kind) is unchanged, the byte counts too:
/// accepted eagerly and lazily. Same root cause as above
/// (restore.rs:244; lazy.rs `read_entry` checks only kind/len/GPA).
#[test]
fn sealed_snapshot_shared_record_spliced_from_another_snapshot() {
    let test = "attack: splice shared record";
    if !kvm_or_skip(test) {
        return;
    }
    let a = patterned_snapshot(
        BackingKind::Memfd,
        4 * MIB,
        MIB,
        1,
        &PrivatePages::Seal(key()),
    );
    // B: the same layout and attributes, other shared bytes.
    let src = guest(BackingKind::Memfd, 4 * MIB);
    src.gate.fill(MIB, MIB, 0xEE).unwrap();
    src.gate.write(0x2000, SECRET).unwrap();
    src.gate.convert(0x2000, P, Attribute::Private).unwrap();
    let mut b = Vec::new();
    src.gate
        .snapshot_with_state(&mut b, &PrivatePages::Seal(key()), b"vcpu state")
        .unwrap();
    let ra = *records(&a)
        .iter()
        .find(|r| r.kind == 1 && r.aux == MIB)
        .unwrap();
    let rb = *records(&b)
        .iter()
        .find(|r| r.kind == 1 && r.aux == MIB)
        .unwrap();
    assert_eq!(ra.total, rb.total);
    let mut spliced = a.clone();
    spliced[ra.at..ra.at + ra.total].copy_from_slice(&b[rb.at..rb.at + rb.total]);

    let eager = guest(BackingKind::Memfd, 4 * MIB);
    let er = eager.gate.restore(&mut spliced.as_slice(), Some(&key()));
    let (lazy_dst, lr) = try_lazy(&spliced, Some(&key())).unwrap();
    let mut accepted = Vec::new();
    if er.is_ok() && read(&eager.gate, MIB, 4) == [0xEE; 4] {
        accepted.push("eager");
    }
    if lr.is_ok() && read(&lazy_dst.gate, MIB, 4) == [0xEE; 4] {
        accepted.push("lazy");
    }
    assert!(
        accepted.is_empty(),
        "a record spliced from another snapshot under the same key was accepted: {accepted:?}"
    );
}

/// BROKEN, then FIXED (claim 2, wrong-key / tamper under a key). Downgrade: the caller
/// restores with `Some(&key)` (it expects a sealed, authenticated
/// snapshot), but the policy byte is the file's to choose. A forged
/// unsealed (`Omit`) snapshot of the same layout, with nothing sealed and
/// no tag anywhere, is accepted: `open_header` ignores the key unless the
/// header says policy 1 (crates/gmem/src/snapshot/restore.rs:110). An
/// attacker without the key can thus replace a sealed snapshot wholesale
/// (any shared memory, any state blob handed back as the VMM's vCPU
/// state, any private runs restored as zero).
#[test]
fn a_key_given_does_not_refuse_an_unsealed_forgery() {
    let test = "attack: downgrade to unsealed";
    if !kvm_or_skip(test) {
        return;
    }
    let src = guest(BackingKind::Memfd, 4 * MIB);
    src.gate.write(MIB, b"FORGED").unwrap();
    let mut forged = Vec::new();
    src.gate
        .snapshot_with_state(&mut forged, &PrivatePages::Omit, b"forged vcpu state")
        .unwrap();
    let eager = guest(BackingKind::Memfd, 4 * MIB);
    let er = eager.gate.restore(&mut forged.as_slice(), Some(&key()));
    let (lazy_dst, lr) = try_lazy(&forged, Some(&key())).unwrap();
    let mut accepted = Vec::new();
    if let Ok(rep) = &er {
        accepted.push(format!(
            "eager (state {:?})",
            String::from_utf8_lossy(&rep.state)
        ));
    }
    if lr.is_ok() && read(&lazy_dst.gate, MIB, 6) == b"FORGED" {
        accepted.push("lazy".into());
    }
    assert!(
        accepted.is_empty(),
        "a key was given but an unsealed forgery was restored: {accepted:?}"
    );
}

/// HELD. Sealed records and the state spliced from another snapshot under
/// the same key, sealed records reordered, and a sealed record's bytes
/// edited with the CRC fixed: refused (eager: poisoned; lazy: at open, or
/// poisoned at fill).
#[test]
fn sealed_records_spliced_or_edited_are_refused() {
    let test = "attack: sealed splice";
    if !kvm_or_skip(test) {
        return;
    }
    let mk = |byte: u8| {
        let src = guest(BackingKind::Memfd, 4 * MIB);
        src.gate.fill(MIB, 2 * MIB, byte).unwrap();
        src.gate.convert(MIB, 2 * MIB, Attribute::Private).unwrap();
        let mut s = Vec::new();
        src.gate
            .snapshot_with_state(&mut s, &PrivatePages::Seal(key()), b"state")
            .unwrap();
        s
    };
    let (a, b) = (mk(0xAA), mk(0xBB));
    let (ra, rb) = (records(&a), records(&b));
    let mut cases = Vec::new();
    for i in 0..3 {
        // state, sealed 1, sealed 2
        let mut s = a.clone();
        s[ra[i].at..ra[i].at + ra[i].total].copy_from_slice(&b[rb[i].at..rb[i].at + rb[i].total]);
        cases.push((format!("record {i} from B"), s));
    }
    {
        let mut s = a.clone();
        let (x, y) = (ra[1], ra[2]);
        let mut sw = a[y.at..y.at + y.total].to_vec();
        sw.extend_from_slice(&a[x.at..x.at + x.total]);
        s[x.at..y.at + y.total].copy_from_slice(&sw);
        cases.push(("sealed records swapped".into(), s));
        let mut s = a.clone();
        s[x.at + 100] ^= 1;
        fix_crc(&mut s, &x);
        cases.push(("sealed bytes edited".into(), s));
    }
    for (what, s) in cases {
        let eager = guest(BackingKind::Memfd, 4 * MIB);
        assert!(
            eager.gate.restore(&mut s.as_slice(), Some(&key())).is_err(),
            "{what}"
        );
        assert!(
            eager.gate.poisoned().is_some() || !eager.gate.is_launched(),
            "{what}"
        );
        let dst = guest(BackingKind::Memfd, 4 * MIB);
        match dst.gate.restore_lazy(
            file_of(&s),
            Some(&key()),
            LazyOptions::new().without_prefetch(),
        ) {
            Err(_) => assert!(!dst.gate.is_launched(), "{what}"),
            Ok(l) => {
                let _ = dst.gate.convert(MIB, 2 * MIB, Attribute::Shared);
                let mut all = vec![0u8; 2 * MIB as usize];
                let r = dst.gate.read(MIB, &mut all);
                assert!(r.is_err(), "{what}: read {r:?}");
                assert!(l.finish().is_err(), "{what}");
                assert!(dst.gate.poisoned().is_some(), "{what}");
            }
        }
    }
}

// ================================================ claim 1: no leak in clear

/// HELD. No private byte (nor the state) in clear in a sealed snapshot; no
/// private byte at all under Omit; nothing written under Refuse. Tried on
/// memfd and hugetlb-2m (private 4 KiB pages inside a shared huge page),
/// and on a VM that is itself being restored lazily (snapshot of a
/// restoring VM).
#[test]
fn no_private_byte_in_clear() {
    let test = "attack: private bytes in clear";
    if !kvm_or_skip(test) {
        return;
    }
    let needle: &[u8] = b"PRIVATE-NEEDLE-7f3a";
    let state: &[u8] = b"STATE-NEEDLE-91bd";
    for kind in [BackingKind::Memfd, BackingKind::Hugetlb2M] {
        let Some(_hold) = on_backing(test, kind, 8) else {
            continue;
        };
        let src = guest(kind, 4 * MIB);
        src.gate.fill(0, 4 * MIB, 0x11).unwrap();
        for g in [0x1000u64, 0x5000, 0x20_0000 + 0x3000] {
            src.gate.write(g, needle).unwrap();
            src.gate.write(g + P - needle.len() as u64, needle).unwrap();
            src.gate.convert(g, P, Attribute::Private).unwrap();
        }
        let contains = |s: &[u8], n: &[u8]| s.windows(n.len()).any(|w| w == n);
        let mut sealed = Vec::new();
        src.gate
            .snapshot_with_state(&mut sealed, &PrivatePages::Seal(key()), state)
            .unwrap();
        assert!(!contains(&sealed, needle), "{kind}: private in clear");
        assert!(!contains(&sealed, state), "{kind}: state in clear");
        let mut omit = Vec::new();
        src.gate.snapshot(&mut omit, &PrivatePages::Omit).unwrap();
        assert!(!contains(&omit, needle), "{kind}: private under Omit");
        let mut refuse = Vec::new();
        assert!(
            src.gate
                .snapshot(&mut refuse, &PrivatePages::Refuse)
                .is_err()
        );
        assert!(
            refuse.is_empty(),
            "{kind}: Refuse wrote {} bytes",
            refuse.len()
        );

        // A restoring VM's snapshot: fills first, then the same rules.
        let dst = guest(kind, 4 * MIB);
        let lazy = dst
            .gate
            .restore_lazy(
                file_of(&sealed),
                Some(&key()),
                LazyOptions::new().without_prefetch(),
            )
            .unwrap();
        let mut again = Vec::new();
        dst.gate.snapshot(&mut again, &PrivatePages::Omit).unwrap();
        assert!(!contains(&again, needle), "{kind}: restoring VM leaked");
        let mut refuse = Vec::new();
        assert!(
            dst.gate
                .snapshot(&mut refuse, &PrivatePages::Refuse)
                .is_err()
        );
        assert!(refuse.is_empty());
        drop(lazy);
    }
}

// ============================================ claim 3/4: fill-time failures

/// HELD. The snapshot file is cut (ftruncate) while a lazy restore runs:
/// the next fill fails (`read_at` short, no mmap, so no SIGBUS), the
/// gatekeeper is poisoned, nothing hangs, host code never gets zeroes.
#[test]
fn snapshot_file_truncated_during_lazy_restore_poisons() {
    let test = "attack: ftruncate during lazy restore";
    if !kvm_or_skip(test) {
        return;
    }
    for kind in [BackingKind::Memfd, BackingKind::Hugetlb2M] {
        let Some(_hold) = on_backing(test, kind, 8) else {
            continue;
        };
        // Populated: [0, 2) MiB (a secret at 0x2000) and [4, 6) MiB, so that
        // hugetlb has two blocks (see `hugetlb_blocks_are_huge_pages`).
        let src = guest(kind, 8 * MIB);
        src.gate.fill(MIB, MIB, pat(MIB)).unwrap();
        src.gate.fill(4 * MIB, 2 * MIB, pat(4 * MIB)).unwrap();
        src.gate.write(0x2000, SECRET).unwrap();
        src.gate.convert(0x2000, P, Attribute::Private).unwrap();
        let mut s = Vec::new();
        src.gate
            .snapshot(&mut s, &PrivatePages::Seal(key()))
            .unwrap();
        drop(src);
        let file = file_of(&s);
        let dup = file.try_clone().unwrap();
        let dst = Arc::new(guest(kind, 8 * MIB));
        let lazy = dst
            .gate
            .restore_lazy(file, Some(&key()), LazyOptions::new().without_prefetch())
            .unwrap();
        assert_eq!(read(&dst.gate, MIB, 1), vec![pat(MIB)]);
        eprintln!("{kind}: before truncation {:?}", lazy.progress());
        dup.set_len(header_len(&s) as u64 + 64).unwrap();
        let d = Arc::clone(&dst);
        let r = within(20, "a host read after truncation", move || {
            let mut b = [0u8; 8];
            d.gate.read(4 * MIB, &mut b).map(|()| b)
        });
        match r {
            Ok(b) => assert_eq!(b, [pat(4 * MIB); 8], "{kind}: wrong bytes after truncation"),
            Err(ref e) => assert!(matches!(e, GateError::Poisoned { .. }), "{kind}: {e}"),
        }
        eprintln!("{kind}: after read {r:?}");
        let r = within(20, "finish after truncation", move || {
            lazy.finish().map(drop)
        });
        eprintln!("{kind}: finish {r:?}");
        assert!(r.is_err(), "{kind}");
        assert!(dst.gate.poisoned().is_some(), "{kind}");
        assert!(dst.gate.read(2 * MIB, &mut [0; 4]).is_err());
    }
}

/// HELD. The file truncated with the prefetcher running and host threads
/// reading: all return (no hang), every read either sees the snapshot's
/// bytes or is refused as poisoned.
#[test]
fn truncation_racing_prefetcher_and_readers() {
    let test = "attack: truncate racing prefetch";
    if !kvm_or_skip(test) {
        return;
    }
    let s = patterned_snapshot(BackingKind::Memfd, 64 * MIB, MIB, 48, &PrivatePages::Omit);
    for round in 0..3 {
        let file = file_of(&s);
        let dup = file.try_clone().unwrap();
        let dst = Arc::new(guest(BackingKind::Memfd, 64 * MIB));
        let lazy = dst
            .gate
            .restore_lazy(file, None, LazyOptions::new())
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut ts = Vec::new();
        for t in 0..2u64 {
            let (d, stop) = (Arc::clone(&dst), Arc::clone(&stop));
            ts.push(std::thread::spawn(move || {
                let mut i = t * 7919;
                let mut bad = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    i = (i.wrapping_mul(1_103_515_245).wrapping_add(12345)) % (48 * MIB / P);
                    let g = MIB + i * P;
                    let mut b = [0u8; 16];
                    match d.gate.read(g, &mut b) {
                        Ok(()) if b != [pat(g); 16] => bad.push((g, b[0])),
                        Ok(()) => {}
                        Err(GateError::Poisoned { .. }) => break,
                        Err(e) => bad.push((g, e.to_string().len() as u8)),
                    }
                }
                bad
            }));
        }
        std::thread::sleep(Duration::from_millis(2 + round * 5));
        dup.set_len(s.len() as u64 / 2).unwrap();
        let done = within(30, "finish with a truncated file", move || {
            let r = lazy.finish().map(drop);
            r.is_err()
        });
        stop.store(true, Ordering::Relaxed);
        for t in ts {
            let bad = t.join().unwrap();
            assert!(bad.is_empty(), "round {round}: wrong bytes {bad:?}");
        }
        if done {
            assert!(dst.gate.poisoned().is_some(), "round {round}");
        }
    }
}

// ======================================== claim 3/5: concurrency, lifetime

/// HELD. Host threads read, write, discard and convert (InPlace) during a
/// lazy restore with the prefetcher running; afterwards every page holds
/// exactly what the sequence says: the snapshot's bytes, the write, or
/// zero after a discard (never zero for a restored page, never stale).
#[test]
fn host_threads_race_the_prefetcher() {
    let test = "attack: host threads vs prefetcher";
    if !kvm_or_skip(test) {
        return;
    }
    const SIZE: u64 = 64 * MIB;
    let s = patterned_snapshot(
        BackingKind::Memfd,
        SIZE,
        MIB,
        40,
        &PrivatePages::Seal(key()),
    );
    for round in 0..3u64 {
        let dst = Arc::new(guest(BackingKind::Memfd, SIZE));
        // The destination's file already holds data everywhere (stale): the
        // restore must drop it.
        dst.gate.fill(0, SIZE, 0x5A).unwrap();
        let lazy = Arc::new(
            dst.gate
                .restore_lazy(file_of(&s), Some(&key()), LazyOptions::new())
                .unwrap(),
        );
        let mut ts = Vec::new();
        // Readers over [1 MiB, 9 MiB) and holes [48, 64) MiB.
        for t in 0..2u64 {
            let d = Arc::clone(&dst);
            ts.push(std::thread::spawn(move || {
                let mut bad = Vec::new();
                let mut i = t * 31 + round;
                for _ in 0..3000 {
                    i = i
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407)
                        >> 1;
                    let g = MIB + (i % (8 * MIB / P)) * P;
                    let mut b = vec![0u8; 64];
                    if let Err(e) = d.gate.read(g, &mut b) {
                        bad.push(format!("read {g:#x}: {e}"));
                        break;
                    }
                    if b != [pat(g); 64] {
                        bad.push(format!("read {g:#x}: {:#x}", b[0]));
                    }
                    let h = 48 * MIB + (i % (16 * MIB / P)) * P;
                    let b = read(&d.gate, h, 8);
                    if b != [0; 8] {
                        bad.push(format!("hole {h:#x}: {:#x}", b[0]));
                    }
                }
                bad
            }));
        }
        // Discarder over [9, 17) MiB: 4 KiB pages and whole records.
        let d = Arc::clone(&dst);
        ts.push(std::thread::spawn(move || {
            let mut bad = Vec::new();
            for k in 0..64u64 {
                let g = 9 * MIB + k * (MIB / 8) + (k % 3) * P;
                let len = if k % 8 == 7 { MIB } else { P * (1 + k % 4) };
                let len = len.min(17 * MIB - g);
                d.gate.discard(g, len).unwrap();
                let b = read(&d.gate, g, len as usize);
                if b.iter().any(|&x| x != 0) {
                    bad.push(format!("discarded {g:#x}+{len:#x} not zero"));
                }
                // The page after it, if not discarded later, is checked at the end.
            }
            bad
        }));
        // Writer over [17, 25) MiB; converter over [25, 33) MiB.
        let d = Arc::clone(&dst);
        ts.push(std::thread::spawn(move || {
            let mut bad = Vec::new();
            for k in 0..256u64 {
                let g = 17 * MIB + k * 8 * P + 100;
                d.gate.write(g, &k.to_le_bytes()).unwrap();
                // The rest of the page is the snapshot's.
                let b = read(&d.gate, g - 100, 100);
                if b != [pat(g); 100] {
                    bad.push(format!("around write {g:#x}: {:#x}", b[0]));
                }
                let g2 = 25 * MIB + k * 8 * P;
                d.gate.convert(g2, 2 * P, Attribute::Private).unwrap();
                d.gate.convert(g2, 2 * P, Attribute::Shared).unwrap();
                let b = read(&d.gate, g2, 2 * P as usize);
                if b[..P as usize] != [pat(g2); P as usize][..]
                    || b[P as usize..] != [pat(g2 + P); P as usize][..]
                {
                    bad.push(format!("converted {g2:#x}: {:#x}", b[0]));
                }
            }
            bad
        }));
        let mut bad = Vec::new();
        for t in ts {
            bad.extend(t.join().unwrap());
        }
        let l = Arc::try_unwrap(lazy).unwrap();
        assert!(l.wait(Duration::from_secs(60)));
        assert!(l.failure().is_none(), "{:?}", l.failure());
        drop(l);
        // A full check.
        let mut all = vec![0u8; SIZE as usize];
        dst.gate.convert(0x2000, P, Attribute::Shared).unwrap();
        dst.gate.read(0, &mut all).unwrap();
        for pg in 0..SIZE / P {
            let g = pg * P;
            let b = &all[g as usize..(g + P) as usize];
            let ok = if g == 0x2000 {
                &b[..SECRET.len()] == SECRET
            } else if (MIB..9 * MIB).contains(&g) || (25 * MIB..33 * MIB).contains(&g) {
                b.iter().all(|&x| x == pat(g))
            } else if (9 * MIB..17 * MIB).contains(&g) {
                b.iter().all(|&x| x == pat(g) || x == 0)
                    && (b.iter().all(|&x| x == 0) || b.iter().all(|&x| x == pat(g)))
            } else if (17 * MIB..25 * MIB).contains(&g) {
                b[..100].iter().all(|&x| x == pat(g))
            } else if (33 * MIB..41 * MIB).contains(&g) {
                b.iter().all(|&x| x == pat(g))
            } else {
                b.iter().all(|&x| x == 0)
            };
            if !ok {
                bad.push(format!("final {g:#x}: {:#x}", b[0]));
            }
        }
        bad.truncate(20);
        assert!(bad.is_empty(), "round {round}: {bad:#?}");
    }
}

/// HELD. Pins (host direct access through the view, which userfaultfd
/// does not watch) during a lazy restore: `pin` fills first, so the view
/// never shows a restored page as zero, on memfd and hugetlb-2m.
#[test]
fn pins_see_restored_bytes_through_the_view() {
    let test = "attack: pins during lazy restore";
    if !kvm_or_skip(test) {
        return;
    }
    for kind in [BackingKind::Memfd, BackingKind::Hugetlb2M] {
        let Some(_hold) = on_backing(test, kind, 12) else {
            continue;
        };
        let s = patterned_snapshot(kind, 8 * MIB, MIB, 4, &PrivatePages::Seal(key()));
        let dst = guest(kind, 8 * MIB);
        dst.gate.fill(0, 8 * MIB, 0x5A).unwrap(); // stale data in the file
        let lazy = dst
            .gate
            .restore_lazy(
                file_of(&s),
                Some(&key()),
                LazyOptions::new().without_prefetch(),
            )
            .unwrap();
        let granule = if kind == BackingKind::Memfd {
            P
        } else {
            2 * MIB
        };
        for g in [2 * MIB, 4 * MIB] {
            let pin = dst.gate.pin(g, granule).unwrap();
            let mut b = vec![0u8; granule as usize];
            pin.read(0, &mut b).unwrap();
            for (k, c) in b.chunks(P as usize).enumerate() {
                let gg = g + k as u64 * P;
                let want = if gg < 5 * MIB { pat(gg) } else { 0 };
                if !c.iter().all(|&x| x == want) {
                    let zeros = c.iter().filter(|&&x| x == 0).count();
                    let via_gate = read(&dst.gate, gg, 8);
                    panic!(
                        "{kind}: pinned {gg:#x} = {:#x} ({zeros} zero bytes), want {want:#x}; gate.read gives {via_gate:x?}; {:?}",
                        c[0],
                        lazy.progress()
                    );
                }
            }
        }
        // A snapshot hole, pinned: zero, not the stale 0x5A.
        let pin = dst.gate.pin(6 * MIB, granule).unwrap();
        let mut b = vec![0u8; 16];
        pin.read(0, &mut b).unwrap();
        assert_eq!(b, vec![0; 16], "{kind}: stale data in a hole");
        drop(pin);
        lazy.finish().unwrap();
        assert_eq!(
            read(&dst.gate, 6 * MIB, 4),
            vec![0; 4],
            "{kind}: stale hole"
        );
        assert_eq!(read(&dst.gate, 3 * MIB, 4), vec![pat(3 * MIB); 4], "{kind}");
    }
}

/// HELD. Hugetlb-2m with stale data in the destination's file, eager and
/// lazy: holes read zero, records their bytes, the private page private.
#[test]
fn hugetlb_restore_onto_a_file_holding_data() {
    let test = "attack: hugetlb stale data";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(_hold) = on_backing(test, BackingKind::Hugetlb2M, 16) else {
        return;
    };
    // Snapshot: [1 MiB, 1.5 MiB) patterned (inside one huge page), rest holes.
    let src = guest(BackingKind::Hugetlb2M, 8 * MIB);
    src.gate.fill(MIB, MIB / 2, 0x77).unwrap();
    src.gate.write(0x2000, SECRET).unwrap();
    src.gate.convert(0x2000, P, Attribute::Private).unwrap();
    let mut s = Vec::new();
    src.gate
        .snapshot(&mut s, &PrivatePages::Seal(key()))
        .unwrap();
    drop(src);
    for lazy in [false, true] {
        let dst = guest(BackingKind::Hugetlb2M, 8 * MIB);
        dst.gate.fill(0, 8 * MIB, 0x5A).unwrap();
        let l = if lazy {
            Some(
                dst.gate
                    .restore_lazy(file_of(&s), Some(&key()), LazyOptions::new())
                    .unwrap(),
            )
        } else {
            dst.gate.restore(&mut s.as_slice(), Some(&key())).unwrap();
            None
        };
        assert_eq!(read(&dst.gate, MIB, 4), vec![0x77; 4], "lazy {lazy}");
        // Holes in the same huge page and in others: zero.
        for g in [0u64, MIB + MIB / 2, 2 * MIB, 5 * MIB + 12 * P] {
            assert_eq!(
                read(&dst.gate, g, 4),
                vec![0; 4],
                "lazy {lazy}: {g:#x} stale"
            );
        }
        if let Some(l) = l {
            l.finish().unwrap();
        }
        dst.gate.convert(0x2000, P, Attribute::Shared).unwrap();
        assert_eq!(&read(&dst.gate, 0x2000, SECRET.len())[..], SECRET);
    }
}

/// HELD. The gatekeeper (and VM) dropped while a lazy restore's threads
/// run, then the `LazyRestore` dropped; and the reverse with a host thread
/// mid-read. Nothing hangs or crashes.
#[test]
fn dropping_the_gatekeeper_or_the_restore_early() {
    let test = "attack: drop early";
    if !kvm_or_skip(test) {
        return;
    }
    let s = patterned_snapshot(
        BackingKind::Memfd,
        64 * MIB,
        MIB,
        32,
        &PrivatePages::Seal(key()),
    );
    for prefetch in [false, true] {
        let s1 = s.clone();
        within(60, "gatekeeper dropped first", move || {
            let s = s1;
            let dst = guest(BackingKind::Memfd, 64 * MIB);
            let opts = if prefetch {
                LazyOptions::new()
            } else {
                LazyOptions::new().without_prefetch()
            };
            let lazy = dst
                .gate
                .restore_lazy(file_of(&s), Some(&key()), opts)
                .unwrap();
            let _ = read(&dst.gate, 5 * MIB, 8);
            drop(dst);
            std::thread::sleep(Duration::from_millis(20));
            let _ = lazy.progress();
            drop(lazy);
        });
        let s2 = s.clone();
        within(60, "restore dropped with readers", move || {
            let s = s2;
            let dst = Arc::new(guest(BackingKind::Memfd, 64 * MIB));
            let lazy = dst
                .gate
                .restore_lazy(file_of(&s), Some(&key()), LazyOptions::new())
                .unwrap();
            let d = Arc::clone(&dst);
            let t = std::thread::spawn(move || {
                let mut bad = 0;
                for k in 0..2000u64 {
                    let g = MIB + (k * 17 % (32 * MIB / P)) * P;
                    if read(&d.gate, g, 8) != [pat(g); 8] {
                        bad += 1;
                    }
                }
                bad
            });
            drop(lazy);
            assert_eq!(t.join().unwrap(), 0);
            assert!(dst.gate.poisoned().is_none());
        });
    }
}

/// HELD (claim 5). A record that fails at fill time (an unsealed record's
/// payload flipped: its CRC fails) while several host threads resolve,
/// discard and convert, the prefetcher runs, and a snapshot of the
/// restoring VM is attempted: every call returns (no deadlock between the
/// state lock, the fill lock and the gate's `lazy` mutex), the gatekeeper
/// ends poisoned, no thread ever read a restored page as zero.
#[test]
fn fill_failure_racing_host_paths_does_not_deadlock() {
    let test = "attack: fill failure vs locks";
    if !kvm_or_skip(test) {
        return;
    }
    let mut s = patterned_snapshot(BackingKind::Memfd, 64 * MIB, MIB, 32, &PrivatePages::Omit);
    // Corrupt the last data record (no CRC fix): it fails when filled.
    let last = *records(&s).iter().rev().find(|r| r.kind == 1).unwrap();
    s[last.at + 16 + 5] ^= 0xFF;
    for round in 0..4u64 {
        let s = s.clone();
        within(90, "fill failure with racing host paths", move || {
            let dst = Arc::new(guest(BackingKind::Memfd, 64 * MIB));
            let lazy = dst
                .gate
                .restore_lazy(file_of(&s), None, LazyOptions::new())
                .unwrap();
            let mut ts = Vec::new();
            for t in 0..3u64 {
                let d = Arc::clone(&dst);
                ts.push(std::thread::spawn(move || {
                    let mut bad = Vec::new();
                    for k in 0..400u64 {
                        let g = MIB + ((k * 97 + t * 13 + round) % (32 * MIB / P)) * P;
                        let ok = match t {
                            0 => d.gate.read(g, &mut [0; 8]).is_ok(),
                            1 => d.gate.discard(g, P).is_ok(),
                            _ => {
                                d.gate.convert(g, P, Attribute::Private).is_ok()
                                    && d.gate.convert(g, P, Attribute::Shared).is_ok()
                            }
                        };
                        if t == 0 {
                            let mut b = [0u8; 8];
                            if d.gate.read(g, &mut b).is_ok() && b != [pat(g); 8] && b != [0; 8] {
                                bad.push(g);
                            }
                        }
                        if !ok && d.gate.poisoned().is_some() {
                            break;
                        }
                    }
                    bad
                }));
            }
            let d = Arc::clone(&dst);
            ts.push(std::thread::spawn(move || {
                let mut out = Vec::new();
                let _ = d.gate.snapshot(&mut out, &PrivatePages::Omit);
                Vec::new()
            }));
            for t in ts {
                let bad = t.join().unwrap();
                assert!(bad.is_empty(), "{bad:x?}");
            }
            assert!(lazy.finish().is_err());
            assert!(dst.gate.poisoned().is_some());
        });
    }
}

/// BROKEN, then FIXED (claim 4 "bounded memory", and the documented laziness: "A block
/// is one record on memfd (at most CHUNK) and one huge page on hugetlb",
/// crates/gmem/src/snapshot/lazy.rs:17). A snapshot's data records are cut
/// in 1 MiB chunks from the start of each populated run, not at huge-page
/// boundaries (write.rs:127-131), so on hugetlb-2m any record straddles
/// two huge pages; `blocks()` (lazy.rs:485-500) widens each record to its
/// huge pages and merges overlapping ones, so the whole contiguous
/// populated run becomes ONE block. Consequences: (1) `restore_lazy`
/// allocates `Fill::block` of the largest run's size up front
/// (lazy.rs:274-280 and 331, `vec![0u8; block_max + TAG]`): a 64 GiB fully-touched
/// hugetlb guest asks for 64 GiB of heap, and past RAM+swap the process
/// aborts; (2) the first touch (one 8-byte read, or one vCPU fault) reads,
/// checks and copies the whole VM under the fill lock: nothing is lazy.
/// Sequence: hugetlb-2m guest of 8 MiB, one private 4 KiB page at 0x2000
/// and everything else written; sealed snapshot; `restore_lazy` without
/// prefetch; `progress().blocks` is 1 (expected 4), and after one 8-byte
/// read `pending` is 0.
#[test]
fn hugetlb_blocks_are_huge_pages() {
    let test = "attack: hugetlb blocks";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(_hold) = on_backing(test, BackingKind::Hugetlb2M, 8) else {
        return;
    };
    let s = patterned_snapshot(
        BackingKind::Hugetlb2M,
        8 * MIB,
        0,
        8,
        &PrivatePages::Seal(key()),
    );
    let straddling = records(&s)
        .iter()
        .filter(|r| r.kind <= 2 && r.aux / (2 * MIB) != (r.aux + r.len as u64 - 1) / (2 * MIB))
        .count();
    let dst = guest(BackingKind::Hugetlb2M, 8 * MIB);
    let lazy = dst
        .gate
        .restore_lazy(
            file_of(&s),
            Some(&key()),
            LazyOptions::new().without_prefetch(),
        )
        .unwrap();
    let p0 = lazy.progress();
    assert_eq!(read(&dst.gate, 7 * MIB, 8), vec![pat(7 * MIB); 8]);
    let p1 = lazy.progress();
    drop(lazy);
    assert!(
        p0.blocks == 4 && p1.pending == 3,
        "{straddling} records straddle huge pages; blocks at open: {} (4 huge pages); pending after one 8-byte read: {} — the whole VM is one block",
        p0.blocks,
        p1.pending
    );
}

/// HELD. Hugetlb-2m discards during a lazy restore (no prefetch): a 4 KiB
/// discard inside a pending huge page (filled, then zeroed in place), a
/// whole huge page discarded, a hole discarded; the rest reads the
/// snapshot's bytes, the discarded parts zero, and the prefetch-less
/// `finish` fills what is left.
#[test]
fn hugetlb_discards_during_lazy_restore() {
    let test = "attack: hugetlb discards";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(_hold) = on_backing(test, BackingKind::Hugetlb2M, 8) else {
        return;
    };
    // [0, 2) and [4, 6) MiB populated: two blocks.
    let src = guest(BackingKind::Hugetlb2M, 8 * MIB);
    for g in (0..2 * MIB).chain(4 * MIB..6 * MIB).step_by(P as usize) {
        src.gate.fill(g, P, pat(g)).unwrap();
    }
    let mut s = Vec::new();
    src.gate.snapshot(&mut s, &PrivatePages::Refuse).unwrap();
    drop(src);
    let dst = guest(BackingKind::Hugetlb2M, 8 * MIB);
    dst.gate.fill(0, 8 * MIB, 0x5A).unwrap();
    let lazy = dst
        .gate
        .restore_lazy(file_of(&s), None, LazyOptions::new().without_prefetch())
        .unwrap();
    dst.gate.discard(MIB, P).unwrap(); // 4 KiB of a pending huge page
    dst.gate.discard(4 * MIB, 2 * MIB).unwrap(); // a whole pending huge page
    dst.gate.discard(2 * MIB, 2 * MIB).unwrap(); // a hole
    assert_eq!(read(&dst.gate, MIB, 8), vec![0; 8]);
    assert_eq!(read(&dst.gate, MIB + P, 8), vec![pat(MIB + P); 8]);
    assert_eq!(read(&dst.gate, MIB - P, 8), vec![pat(MIB - P); 8]);
    assert_eq!(read(&dst.gate, 4 * MIB + 3 * P, 8), vec![0; 8]);
    assert_eq!(read(&dst.gate, 3 * MIB, 8), vec![0; 8]);
    lazy.finish().unwrap();
    assert_eq!(read(&dst.gate, 5 * MIB, 8), vec![0; 8]);
    assert_eq!(read(&dst.gate, 7 * MIB, 8), vec![0; 8]);
    assert_eq!(read(&dst.gate, 2 * P, 8), vec![pat(2 * P); 8]);
}

/// HELD, with a note: bytes appended after the end record. The lazy reader
/// refuses them (the end must be the file's last record); the eager reader
/// stops at the end record and never looks further, so it restores the
/// snapshot and leaves the trailing bytes unread (it reads from a stream:
/// arguably the caller's business; no restored byte differs).
#[test]
fn trailing_bytes_after_the_end() {
    let test = "attack: trailing bytes";
    if !kvm_or_skip(test) {
        return;
    }
    let mut s = patterned_snapshot(
        BackingKind::Memfd,
        4 * MIB,
        MIB,
        1,
        &PrivatePages::Seal(key()),
    );
    s.extend_from_slice(b"trailing garbage");
    let (dst, r) = try_lazy(&s, Some(&key())).unwrap();
    assert!(r.is_err());
    assert!(!dst.gate.is_launched());
    let eager = guest(BackingKind::Memfd, 4 * MIB);
    let mut rd = s.as_slice();
    assert!(eager.gate.restore(&mut rd, Some(&key())).is_ok());
    assert_eq!(rd, b"trailing garbage");
}

/// A header with one private run `[start, end)` inserted (CRC fixed; the
/// snapshot `s` is unsealed and had none).
fn with_private_run(s: &[u8], start: u64, end: u64) -> Vec<u8> {
    assert!(!sealed(s) && u32_at(s, 36) == 0);
    let r = u32_at(s, 32) as usize;
    let hdr_end = 40 + 40 * r; // where runs go, before the CRC
    let mut h = s[..hdr_end].to_vec();
    h[36..40].copy_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&start.to_le_bytes());
    h.extend_from_slice(&end.to_le_bytes());
    let c = crc32c::crc32c(&h);
    h.extend_from_slice(&c.to_le_bytes());
    // The rest: the state record and after (offsets shift by 16: the index
    // entries name stream offsets, so fix them and their CRCs).
    let mut out = h;
    let rest_at = hdr_end + 4;
    let mut rest = s[rest_at..].to_vec();
    let shift = 16u64;
    // Re-parse in place.
    let tmp: Vec<u8> = out.iter().copied().chain(rest.iter().copied()).collect();
    for rec in records(&tmp) {
        let at = rec.at - out.len();
        if rec.kind == 4 {
            for e in 0..rec.aux as usize {
                let o = at + 16 + 24 * e + 8;
                let v = u64_at(&rest, o) + shift;
                rest[o..o + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        if rec.kind == 0xff {
            let o = at + 16 + 16;
            let v = u64_at(&rest, o) + shift;
            rest[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        let c = crc32c::crc32c(&rest[at..at + rec.total - 4]);
        rest[at + rec.total - 4..at + rec.total].copy_from_slice(&c.to_le_bytes());
    }
    out.extend_from_slice(&rest);
    out
}

/// BROKEN, then FIXED (claims 2 and 1, invariants). `Header::decode` checks a private
/// run's START for page alignment but not its END
/// (crates/gmem/src/snapshot/format.rs:201:
/// `... || !s.is_multiple_of(PAGE_SIZE)`, nothing on `end`), and neither
/// `finish_restore` (crates/gmem/src/gate/frozen.rs:194-196) nor the writer
/// rounds it. An unsealed snapshot (or, with the downgrade above, one
/// handed to a VMM that gave a key) whose header lists the private run
/// `[0x3000, 0x3001)` (CRC fixed) is ACCEPTED eagerly and lazily: the
/// gatekeeper's map now holds a sub-page private run; bytes 0x3001..0x4000
/// of that page are "shared" to the host (gate.read/write succeed) while
/// the page's first byte is private; and the VM's own next sealed snapshot
/// succeeds but writes a 1-byte Sealed record (and a 0xfff-byte shared
/// record) that `restore` then refuses ("a Sealed record of 0x1 bytes"):
/// gmem writes snapshots it cannot read back. Where KVM memory attributes
/// are in use (not on this host: `uses_kernel_attributes()` is false here),
/// KVM_SET_MEMORY_ATTRIBUTES refuses the unaligned size, and `restore`
/// returns that error through `frozen.finish_restore(..)?`
/// (crates/gmem/src/snapshot/restore.rs:74) AFTER every record was written,
/// without poisoning (not verified here, read from the code).
#[test]
fn private_run_with_unaligned_end() {
    let test = "attack: unaligned private run";
    if !kvm_or_skip(test) {
        return;
    }
    let src = guest(BackingKind::Memfd, 4 * MIB);
    src.gate.fill(MIB, MIB, 0x33).unwrap();
    src.gate.fill(0x1000, P, 0x44).unwrap();
    let mut s = Vec::new();
    src.gate.snapshot(&mut s, &PrivatePages::Omit).unwrap();
    // Sanity: the helper builds a valid stream.
    let ok = with_private_run(&s, 0x3000, 0x4000);
    let g = guest(BackingKind::Memfd, 4 * MIB);
    g.gate.restore(&mut ok.as_slice(), None).unwrap();
    assert_eq!(g.gate.attribute(0x3000), Some(Attribute::Private));
    let mut broken = Vec::new();
    for (start, end) in [(0x3000u64, 0x3001u64), (0x3000, 0x3800), (0x3000, 0x4fff)] {
        let b = with_private_run(&s, start, end);
        for lazy in [false, true] {
            let dst = guest(BackingKind::Memfd, 4 * MIB);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if lazy {
                    dst.gate
                        .restore_lazy(file_of(&b), None, LazyOptions::new())
                        .map(|l| l.finish().map(drop))
                        .map(|_| ())
                } else {
                    dst.gate.restore(&mut b.as_slice(), None).map(drop)
                }
            }));
            let what = format!("run [{start:#x}, {end:#x}) lazy {lazy}");
            match r {
                Err(_) => broken.push(format!("{what}: PANIC")),
                Ok(Err(e)) => {
                    // Refused before the memory was touched (the header's
                    // check) is right; only a late, unpoisoned refusal is a
                    // break.
                    let mut probe = [0u8; 4];
                    let touched = dst.gate.read(MIB, &mut probe).is_ok() && probe == [0x33; 4];
                    if dst.gate.poisoned().is_none() && !dst.gate.is_launched() && touched {
                        // refused before the memory was touched? (eager: the
                        // records were written by then)
                        let mut x = [0u8; 4];
                        let readable = dst.gate.read(MIB, &mut x).is_ok() && x == [0x33; 4];
                        broken.push(format!(
                            "{what}: refused late ({e}) and NOT poisoned; restored bytes readable: {readable}; attribute(0x3000) = {:?}",
                            dst.gate.attribute(0x3000)
                        ));
                    }
                }
                Ok(Ok(())) => {
                    let runs = dst.gate.private_runs();
                    let mut x = [0u8; 8];
                    let tail = dst.gate.read(end, &mut x);
                    // The VM's own next snapshot (sealed), with the rest of
                    // that page written by the host: can it be restored?
                    let _ = dst.gate.write(end, b"tail");
                    let mut again = Vec::new();
                    let snap = dst.gate.snapshot(&mut again, &PrivatePages::Seal(key()));
                    let back = guest(BackingKind::Memfd, 4 * MIB);
                    let re = back.gate.restore(&mut again.as_slice(), Some(&key()));
                    broken.push(format!(
                        "{what}: ACCEPTED; private runs {runs:x?}; host read at {end:#x}: {tail:?}; attribute({end:#x}) = {:?}; kernel attributes: {}; its next sealed snapshot: {:?}, restored: {:?}",
                        dst.gate.attribute(end),
                        dst.gate.uses_kernel_attributes(),
                        snap.map(|r| r.records),
                        re.map(drop)
                    ));
                }
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

/// HELD. The host-thread race on hugetlb-2m (blocks of whole huge pages,
/// here one merged block per populated run): readers, 4 KiB discards and
/// writers while the prefetcher runs; the final contents are exact.
#[test]
fn hugetlb_host_threads_race_the_prefetcher() {
    let test = "attack: hugetlb host threads vs prefetcher";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(_hold) = on_backing(test, BackingKind::Hugetlb2M, 20) else {
        return;
    };
    const SIZE: u64 = 16 * MIB;
    // Populated: [0, 4) and [8, 12) MiB, two runs, two blocks.
    let src = guest(BackingKind::Hugetlb2M, SIZE);
    for g in (0..4 * MIB).chain(8 * MIB..12 * MIB).step_by(P as usize) {
        src.gate.fill(g, P, pat(g)).unwrap();
    }
    let mut s = Vec::new();
    src.gate.snapshot(&mut s, &PrivatePages::Refuse).unwrap();
    drop(src);
    for round in 0..3u64 {
        let dst = Arc::new(guest(BackingKind::Hugetlb2M, SIZE));
        dst.gate.fill(0, SIZE, 0x5A).unwrap();
        let lazy = dst
            .gate
            .restore_lazy(file_of(&s), None, LazyOptions::new())
            .unwrap();
        let mut ts = Vec::new();
        let d = Arc::clone(&dst);
        ts.push(std::thread::spawn(move || {
            let mut bad = Vec::new();
            for k in 0..2000u64 {
                let g = ((k * 7919 + round) % (2 * MIB / P)) * P; // [0, 2) MiB
                let mut b = [0u8; 16];
                d.gate.read(g, &mut b).unwrap();
                if b != [pat(g); 16] {
                    bad.push(format!("read {g:#x}: {:#x}", b[0]));
                }
                let h = 4 * MIB + ((k * 31) % (4 * MIB / P)) * P; // hole
                d.gate.read(h, &mut b).unwrap();
                if b != [0; 16] {
                    bad.push(format!("hole {h:#x}: {:#x}", b[0]));
                }
            }
            bad
        }));
        let d = Arc::clone(&dst);
        ts.push(std::thread::spawn(move || {
            let mut bad = Vec::new();
            for k in 0..64u64 {
                let g = 2 * MIB + k * 8 * P; // [2, 4) MiB: 4 KiB discards
                d.gate.discard(g, P).unwrap();
                let w = 8 * MIB + k * 8 * P + 8; // [8, 12) MiB: writes
                d.gate.write(w, &k.to_le_bytes()).unwrap();
                let mut b = [0u8; 8];
                d.gate.read(g, &mut b).unwrap();
                if b != [0; 8] {
                    bad.push(format!("discarded {g:#x}: {:#x}", b[0]));
                }
            }
            bad
        }));
        let mut bad = Vec::new();
        for t in ts {
            bad.extend(t.join().unwrap());
        }
        assert!(lazy.wait(Duration::from_secs(60)));
        assert!(lazy.failure().is_none());
        drop(lazy);
        let mut all = vec![0u8; SIZE as usize];
        dst.gate.read(0, &mut all).unwrap();
        for pg in 0..SIZE / P {
            let g = pg * P;
            let b = &all[g as usize..(g + P) as usize];
            let discarded = (2 * MIB..4 * MIB).contains(&g) && (g - 2 * MIB).is_multiple_of(8 * P);
            let written =
                (8 * MIB..8 * MIB + 64 * 8 * P).contains(&g) && (g - 8 * MIB).is_multiple_of(8 * P);
            let ok = if discarded {
                b.iter().all(|&x| x == 0)
            } else if written {
                b[..8].iter().all(|&x| x == pat(g))
                    && b[8..16] == ((g - 8 * MIB) / (8 * P)).to_le_bytes()
                    && b[16..].iter().all(|&x| x == pat(g))
            } else if g < 4 * MIB || (8 * MIB..12 * MIB).contains(&g) {
                b.iter().all(|&x| x == pat(g))
            } else {
                b.iter().all(|&x| x == 0)
            };
            if !ok {
                bad.push(format!("final {g:#x}: {:#x}", b[0]));
            }
        }
        bad.truncate(20);
        assert!(bad.is_empty(), "round {round}: {bad:#?}");
    }
}

/// BROKEN, then FIXED (claim 3: "host code never reads a not-yet-restored page as
/// zero"). `RestrictedMemory::allocate` racing `restore_lazy`: `allocate` is
/// refused only once the restore has called `set_filling(true)`
/// (crates/gmem/src/snapshot/lazy.rs:309-311), which comes AFTER
/// `begin_restore` punched the file (lazy.rs:307), and `allocate`'s own
/// check (crates/gmem/src/backing/mod.rs:427) is not under any lock the
/// restore holds. An `allocate` landing in that window puts zero pages
/// into the file under a pending block; the block's `UFFDIO_COPY` then
/// fails with EEXIST at its first page, which `Userfaultfd::copy` treats as
/// "a racing fill: only wake" and returns Ok (crates/gmem/src/uffd.rs:217-222)
/// WITHOUT copying the rest, so the block is marked filled and reads zero.
/// Sequence: thread A loops `memory.allocate(FileRange::new(1 MiB, 4 KiB))`
/// on the destination's memfd while the main thread calls
/// `restore_lazy` (no prefetch); then `gate.read(1 MiB, 16)`. Seen in
/// about 1 round of 100: the read returns zeroes (the snapshot holds
/// 0x01.. there), no error, no poison; `progress()` shows the block
/// "filled" (host_fills 1) and a zero_fill for the page after it.
#[test]
fn allocate_racing_restore_lazy() {
    let test = "attack: allocate vs restore_lazy";
    if !kvm_or_skip(test) {
        return;
    }
    let s = patterned_snapshot(BackingKind::Memfd, 4 * MIB, MIB, 2, &PrivatePages::Omit);
    let mut wrong = Vec::new();
    let mut hits = 0;
    for round in 0..300 {
        let dst = guest(BackingKind::Memfd, 4 * MIB);
        let mem = dst.gate.bindings().next().unwrap().memory().clone();
        let go = Arc::new(AtomicBool::new(true));
        let g2 = Arc::clone(&go);
        let t = std::thread::spawn(move || {
            let mut n = 0u64;
            while g2.load(Ordering::Relaxed) {
                if mem.allocate(gmem::FileRange::new(MIB, P).unwrap()).is_err() {
                    n += 1;
                }
            }
            n
        });
        std::thread::yield_now();
        let lazy = dst
            .gate
            .restore_lazy(file_of(&s), None, LazyOptions::new().without_prefetch())
            .unwrap();
        go.store(false, Ordering::Relaxed);
        let refused = t.join().unwrap();
        if refused > 0 {
            hits += 1;
        }
        let b = read(&dst.gate, MIB, 16);
        let c = read(&dst.gate, MIB + 8 * P, 16);
        if b != [pat(MIB); 16] || c != [pat(MIB + 8 * P); 16] {
            wrong.push(format!(
                "round {round}: [{:#x}..] = {:#x}, [{:#x}..] = {:#x}; {:?}",
                MIB,
                b[0],
                MIB + 8 * P,
                c[0],
                lazy.progress()
            ));
        }
        drop(lazy);
        if wrong.len() >= 3 {
            break;
        }
    }
    assert!(
        wrong.is_empty(),
        "({hits} rounds saw allocate refused) a restored block reads zero after an allocate raced the restore: {wrong:#?}"
    );
}

/// HELD. `restore_lazy` refused after it registered the mappings (a
/// launched gatekeeper; a second restore while the first runs): the
/// gatekeeper is unchanged (data, attributes, the first restore going on),
/// host reads of holes do not hang on the dropped userfaultfd.
#[test]
fn late_refusals_leave_the_gatekeeper_unchanged() {
    let test = "attack: late lazy refusals";
    if !kvm_or_skip(test) {
        return;
    }
    let s = patterned_snapshot(
        BackingKind::Memfd,
        4 * MIB,
        MIB,
        2,
        &PrivatePages::Seal(key()),
    );
    // Launched.
    let g = guest(BackingKind::Memfd, 4 * MIB);
    g.gate.write(0x10_0000, b"mine").unwrap();
    g.gate.convert(0x5000, P, Attribute::Private).unwrap();
    assert!(g.gate.is_launched());
    let r = g
        .gate
        .restore_lazy(file_of(&s), Some(&key()), LazyOptions::new());
    assert!(r.is_err());
    assert_eq!(read(&g.gate, 0x10_0000, 4), b"mine");
    assert_eq!(g.gate.attribute(0x5000), Some(Attribute::Private));
    assert_eq!(g.gate.attribute(0x2000), Some(Attribute::Shared));
    let gg = Arc::new(g);
    let d = Arc::clone(&gg);
    assert_eq!(
        within(10, "hole read", move || read(&d.gate, 3 * MIB, 4)),
        vec![0; 4]
    );
    assert!(gg.gate.poisoned().is_none());
    // A second restore while one runs.
    let dst = guest(BackingKind::Memfd, 4 * MIB);
    let first = dst
        .gate
        .restore_lazy(
            file_of(&s),
            Some(&key()),
            LazyOptions::new().without_prefetch(),
        )
        .unwrap();
    let second = dst
        .gate
        .restore_lazy(file_of(&s), Some(&key()), LazyOptions::new());
    assert!(second.is_err());
    assert_eq!(read(&dst.gate, MIB + 5 * P, 4), vec![pat(MIB + 5 * P); 4]);
    first.finish().unwrap();
    assert_eq!(
        read(&dst.gate, 2 * MIB + 5 * P, 4),
        vec![pat(2 * MIB + 5 * P); 4]
    );
    assert!(dst.gate.poisoned().is_none());
}

/// HELD. Cross-backing: a memfd snapshot (4 KiB records, a private page,
/// holes inside huge pages) restored lazily and eagerly onto hugetlb-2m
/// whose file holds stale data, and back: every page exact.
#[test]
fn cross_backing_restores_are_exact() {
    let test = "attack: cross backing";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(_hold) = on_backing(test, BackingKind::Hugetlb2M, 8) else {
        return;
    };
    const SIZE: u64 = 8 * MIB;
    let src = guest(BackingKind::Memfd, SIZE);
    // Scattered 4 KiB pages and one 1.5 MiB run across a huge-page edge.
    let mut want = vec![0u8; SIZE as usize];
    for g in (0..SIZE)
        .step_by(37 * P as usize)
        .chain((MIB + MIB / 2..3 * MIB).step_by(P as usize))
    {
        src.gate.fill(g, P, pat(g)).unwrap();
        want[g as usize..(g + P) as usize].fill(pat(g));
    }
    src.gate.write(0x2000, SECRET).unwrap();
    src.gate.convert(0x2000, P, Attribute::Private).unwrap();
    want[0x2000..0x3000].fill(0);
    want[0x2000..0x2000 + SECRET.len()].copy_from_slice(SECRET);
    let mut s = Vec::new();
    src.gate
        .snapshot(&mut s, &PrivatePages::Seal(key()))
        .unwrap();
    for (kind, lazy) in [
        (BackingKind::Hugetlb2M, true),
        (BackingKind::Hugetlb2M, false),
        (BackingKind::Memfd, true),
    ] {
        let dst = guest(kind, SIZE);
        dst.gate.fill(0, SIZE, 0x5A).unwrap();
        if lazy {
            let l = dst
                .gate
                .restore_lazy(file_of(&s), Some(&key()), LazyOptions::new())
                .unwrap();
            // Touch a few before the prefetcher is done.
            let _ = read(&dst.gate, 2 * MIB + 3 * P, 8);
            l.finish().unwrap();
        } else {
            dst.gate.restore(&mut s.as_slice(), Some(&key())).unwrap();
        }
        dst.gate.convert(0x2000, P, Attribute::Shared).unwrap();
        let mut all = vec![0u8; SIZE as usize];
        dst.gate.read(0, &mut all).unwrap();
        let bad: Vec<u64> = (0..SIZE / P)
            .filter(|&p| {
                all[(p * P) as usize..((p + 1) * P) as usize]
                    != want[(p * P) as usize..((p + 1) * P) as usize]
            })
            .map(|p| p * P)
            .take(10)
            .collect();
        assert!(
            bad.is_empty(),
            "{kind} lazy {lazy}: pages differ at {bad:x?}"
        );
    }
}

/// HELD. Eager restores stopped in a record (a cut stream, a reader
/// failing with EIO part-way): poisoned, every host access refused.
#[test]
fn eager_refusals_in_records_poison() {
    let test = "attack: eager poison";
    if !kvm_or_skip(test) {
        return;
    }
    struct Failing<'a>(&'a [u8], usize);
    impl std::io::Read for Failing<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.1 == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            let n = buf.len().min(self.1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            self.1 -= n;
            Ok(n)
        }
    }
    let s = patterned_snapshot(
        BackingKind::Memfd,
        4 * MIB,
        MIB,
        2,
        &PrivatePages::Seal(key()),
    );
    let recs = records(&s);
    for cut in [recs[1].at + 100, recs[2].at + 16, recs[3].at, s.len() - 1] {
        for failing in [false, true] {
            let dst = guest(BackingKind::Memfd, 4 * MIB);
            let r = if failing {
                dst.gate.restore(&mut Failing(&s, cut), Some(&key()))
            } else {
                dst.gate.restore(&mut &s[..cut], Some(&key()))
            };
            assert!(r.is_err(), "cut {cut}");
            assert!(
                dst.gate.poisoned().is_some(),
                "cut {cut} failing {failing}: not poisoned"
            );
            assert!(dst.gate.read(MIB, &mut [0; 4]).is_err());
            assert!(dst.gate.pin(MIB, P).is_err());
            let mut out = Vec::new();
            assert!(dst.gate.snapshot(&mut out, &PrivatePages::Omit).is_err());
        }
    }
}
