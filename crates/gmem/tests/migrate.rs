//! Dirty tracking and live migration (`gmem::migrate`), tested from the
//! outside by someone who did not write them:
//!
//! - every host write path marks its pages dirty (`write`, `fill`, a pin
//!   released, a `DeviceMemory` slice, `convert` both ways, `discard`),
//!   `take_dirty` clears, nothing is marked with tracking off, and misuse is
//!   a typed refusal;
//! - a VM migrates between two threads over a real Unix socket pair on
//!   memfd and hugetlb-2m, with pages dirtied, discarded and made private
//!   between rounds, and private content never crosses the socket in clear;
//! - attacks on the stream (flipped bytes, truncation, records replayed,
//!   dropped, reordered or spliced from another migration, the wrong key,
//!   streams forged by a source that holds the key) are typed errors; once
//!   the destination applied anything it is poisoned, and the source is
//!   unchanged and can migrate again;
//! - a destination that goes away mid-stream fails the source's round or
//!   its stop-and-copy, and the source keeps running and migrates again.
//!
//! Tests skip (saying why) for what the host lacks: KVM, huge pages,
//! guest_memfd.

mod common;

use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use common::{gate_on, key, read};
use gmem::migrate::{
    ACK_FAILED, ACK_RUNNING, Incoming, IncomingReport, MAX_ROUNDS, MigrateError, MigrationOptions,
    MigrationReport,
};
use gmem::snapshot::{PrivatePages, RestoreError, SealKey};
use gmem::{
    Attribute, BackingKind, DirtyError, GateError, GateOptions, Gatekeeper, Policy,
    RestrictedMemory, Vm,
};
use gmem_testkit::{Need, kvm_or_skip, needs, on_backing};

const P: u64 = 4096;
const MIB: u64 = 1 << 20;
/// The attack tests' guest: small, so that each mutation gets a fresh
/// destination cheaply.
const SMALL: u64 = 2 * MIB;
/// What the private pages hold: it must never be on the wire in clear.
const PRIVATE_MARK: &[u8; 16] = b"PRIVATE-MARKER-#";
/// What a page made private between rounds holds.
const LATE_MARK: &[u8; 16] = b"LATE-PRIVATE-##!";
/// What shared pages hold: it must be on the wire (the scan's control).
const SHARED_MARK: &[u8; 16] = b"shared-content-.";
const STATE: &[u8] = b"the vCPUs and devices";

// --- helpers ---------------------------------------------------------------------------

struct Guest {
    gate: Gatekeeper,
    _mem: Arc<dyn RestrictedMemory>,
    _vm: Vm,
}

fn guest(kind: BackingKind, size: u64) -> Guest {
    let (vm, mem, gate) = gate_on(
        kind,
        size,
        GateOptions::new(Attribute::Shared, Policy::InPlace),
    );
    Guest {
        gate,
        _mem: mem,
        _vm: vm,
    }
}

/// A page of `mark` repeated.
fn page_of(mark: &[u8; 16]) -> Vec<u8> {
    mark.iter().copied().cycle().take(P as usize).collect()
}

/// Whether `hay` holds any 16-byte window of `mark` repeated (every
/// rotation), so a page of it cut anywhere is still found.
fn holds(hay: &[u8], mark: &[u8; 16]) -> bool {
    let twice: Vec<u8> = mark.iter().chain(mark.iter()).copied().collect();
    (0..16).any(|r| hay.windows(16).any(|w| w == &twice[r..r + 16]))
}

/// The guest's content as the test knows it: every shared byte, the
/// private runs.
#[derive(PartialEq, Eq)]
struct Content {
    shared: Vec<(Range<u64>, Vec<u8>)>,
    private: Vec<Range<u64>>,
}

impl std::fmt::Debug for Content {
    /// The runs and a checksum of each, not megabytes of bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared: Vec<_> = self
            .shared
            .iter()
            .map(|(r, b)| (r.clone(), crc32c::crc32c(b)))
            .collect();
        f.debug_struct("Content")
            .field("shared (runs, CRC-32C)", &shared)
            .field("private", &self.private)
            .finish()
    }
}

fn content(gate: &Gatekeeper) -> Content {
    let size: u64 = gate.regions().map(|r| r.end - r.start).sum();
    let shared = gate
        .runs(0, size)
        .unwrap()
        .into_iter()
        .filter(|(_, a)| *a == Attribute::Shared)
        .map(|(r, _)| (r.clone(), read(gate, r.start, (r.end - r.start) as usize)))
        .collect();
    Content {
        shared,
        private: gate.private_runs(),
    }
}

/// The source guest of the migration tests, `size` bytes of `kind`:
/// - shared pages at 0 (16 pages) and 1 MiB (3 pages), a pattern;
/// - with `private`, a private page at 1.5 MiB holding [`PRIVATE_MARK`];
/// - a shared page at 2 MiB (`size` ≥ 4 MiB) that the tests discard
///   between rounds, and one at 3 MiB they rewrite;
/// - everything else a hole.
fn source(kind: BackingKind, size: u64, private: bool) -> Guest {
    let g = guest(kind, size);
    let mut pattern: Vec<u8> = (0..16 * P).map(|i| (i * 7 + i / 4096) as u8).collect();
    pattern[..16].copy_from_slice(SHARED_MARK);
    g.gate.write(0, &pattern).unwrap();
    g.gate.write(MIB, &pattern[..3 * P as usize]).unwrap();
    if private {
        g.gate.write(MIB + MIB / 2, &page_of(PRIVATE_MARK)).unwrap();
        g.gate
            .convert(MIB + MIB / 2, P, Attribute::Private)
            .unwrap();
    }
    if size >= 4 * MIB {
        g.gate.fill(2 * MIB, P, 0xdd).unwrap();
        g.gate.fill(3 * MIB, 2 * P, 0x33).unwrap();
    }
    g
}

/// What the tests do to the source between pre-copy rounds (guest at least
/// 4 MiB): the page at 2 MiB discarded, the one at 3 MiB rewritten, a page
/// at 2.5 MiB written with [`LATE_MARK`] and (with `private`) made private,
/// a page written through a pin.
fn between_rounds(gate: &Gatekeeper, private: bool) {
    gate.discard(2 * MIB, P).unwrap();
    gate.write(3 * MIB + 0x10, b"the second version").unwrap();
    let late = 2 * MIB + MIB / 2;
    gate.write(late, &page_of(LATE_MARK)).unwrap();
    if private {
        gate.convert(late, P, Attribute::Private).unwrap();
    }
    let pin = gate.pin(3 * MIB + P, P).unwrap();
    pin.write(8, b"by a device").unwrap();
    drop(pin);
}

/// A writer that keeps a copy of every byte it writes: the wire, to scan.
struct Tee<W> {
    w: W,
    seen: Vec<u8>,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// What one migration over a socket pair gave each side.
struct Migrated {
    source: Result<MigrationReport, MigrateError>,
    /// The destination's answer as the source read it.
    ack: Option<u8>,
    wire: Vec<u8>,
    dest: Result<IncomingReport, MigrateError>,
}

/// Migrates `src` to `dst` over a `UnixStream::pair()`, the source in one
/// thread and the destination in another: two pre-copy rounds with
/// `between` run between them, then the stop-and-copy with [`STATE`]. The
/// destination answers [`ACK_RUNNING`] or [`ACK_FAILED`].
fn migrate_over_socket(
    src: &Gatekeeper,
    dst: &Gatekeeper,
    key: Option<SealKey>,
    between: &(dyn Fn(&Gatekeeper) + Sync),
) -> Migrated {
    let (a, b) = UnixStream::pair().unwrap();
    let dest_key = key.clone();
    std::thread::scope(|s| {
        let source = s.spawn(move || {
            let mut opts = MigrationOptions::new();
            if let Some(k) = key {
                opts = opts.with_key(k);
            }
            let tee = Tee {
                w: a,
                seen: Vec::new(),
            };
            let mut m = match src.migrate_to(tee, opts) {
                Ok(m) => m,
                Err(e) => return (Err(e), None, Vec::new()),
            };
            let sent = m.send_round().and_then(|_| {
                between(src);
                m.send_round()
            });
            if let Err(e) = sent {
                return (Err(e), None, Vec::new());
            }
            match m.complete(STATE) {
                Ok((report, mut tee)) => {
                    let mut ack = [0u8];
                    let ack = tee.w.read_exact(&mut ack).ok().map(|()| ack[0]);
                    (Ok(report), ack, std::mem::take(&mut tee.seen))
                }
                Err(e) => (Err(e), None, Vec::new()),
            }
        });
        let dest = s.spawn(move || {
            let mut r = b;
            let result = Incoming::read_header(&mut r)
                .and_then(|inc| inc.receive(dst, &mut r, dest_key.as_ref()));
            let answer = if result.is_ok() {
                ACK_RUNNING
            } else {
                ACK_FAILED
            };
            let _ = r.write_all(&[answer]);
            result
        });
        let (source, ack, wire) = source.join().unwrap();
        Migrated {
            source,
            ack,
            wire,
            dest: dest.join().unwrap(),
        }
    })
}

/// Every access to a poisoned gatekeeper is refused.
fn assert_poisoned(gate: &Gatekeeper, what: &str) {
    assert!(gate.poisoned().is_some(), "{what}: not poisoned");
    let poisoned = |e: &GateError| matches!(e, GateError::Poisoned { .. });
    let mut b = [0u8; 8];
    assert!(poisoned(&gate.read(0, &mut b).unwrap_err()), "{what}: read");
    assert!(poisoned(&gate.write(0, &b).unwrap_err()), "{what}: write");
    assert!(poisoned(&gate.fill(0, P, 1).unwrap_err()), "{what}: fill");
    assert!(poisoned(&gate.pin(0, P).unwrap_err()), "{what}: pin");
    assert!(
        gate.convert(0, P, Attribute::Private).is_err(),
        "{what}: convert"
    );
    assert!(gate.discard(0, P).is_err(), "{what}: discard");
    assert!(
        matches!(
            gate.start_dirty_tracking(),
            Err(DirtyError::Gate(GateError::Poisoned { .. }))
        ),
        "{what}: dirty tracking"
    );
    assert!(
        matches!(
            gate.migrate_to(Vec::new(), MigrationOptions::new().with_key(key())),
            Err(MigrateError::Gate(GateError::Poisoned { .. }))
        ),
        "{what}: migrate_to"
    );
    assert!(
        gate.snapshot(&mut Vec::new(), &PrivatePages::Seal(key()))
            .is_err(),
        "{what}: snapshot"
    );
    #[cfg(feature = "vm-memory")]
    {
        use vm_memory::{Bytes, GuestAddress};
        let dm = gmem::DeviceMemory::new(gate);
        assert!(
            dm.read_slice(&mut b, GuestAddress(0)).is_err(),
            "{what}: DeviceMemory"
        );
    }
}

// --- dirty tracking --------------------------------------------------------------------

#[test]
fn every_host_write_path_marks_its_pages() {
    let test = "dirty tracking: every host write path";
    if !kvm_or_skip(test) {
        return;
    }
    for kind in [BackingKind::Memfd, BackingKind::Hugetlb2M] {
        let Some(_held) = on_backing(test, kind, 1) else {
            continue;
        };
        let g = guest(kind, 2 * MIB);
        let gate = &g.gate;
        gate.write(0x1000, b"before tracking").unwrap();
        assert!(!gate.is_tracking_dirty());
        gate.start_dirty_tracking().unwrap();
        assert!(gate.is_tracking_dirty());
        assert_eq!(
            gate.take_dirty().unwrap(),
            Vec::<Range<u64>>::new(),
            "{kind}: a write before the start is not dirty"
        );

        gate.write(0x3010, b"changed").unwrap();
        assert_eq!(gate.take_dirty().unwrap(), vec![0x3000..0x4000], "{kind}");
        assert!(gate.take_dirty().unwrap().is_empty(), "{kind}: taken");

        // Across a page boundary, and two writes merged into one run.
        gate.write(0x1ffe, b"span").unwrap();
        gate.write(0x3000, b"next").unwrap();
        assert_eq!(gate.take_dirty().unwrap(), vec![0x1000..0x4000], "{kind}");

        gate.fill(0x5000, 0x2000, 0xab).unwrap();
        assert_eq!(gate.take_dirty().unwrap(), vec![0x5000..0x7000], "{kind}");

        // Reads mark nothing.
        let _ = read(gate, 0, 0x8000);
        assert!(gate.take_dirty().unwrap().is_empty(), "{kind}: a read");

        // A pin marks when it is released, not before.
        let pin = gate.pin(0x8000, P).unwrap();
        pin.write(100, b"device").unwrap();
        assert!(
            gate.take_dirty().unwrap().is_empty(),
            "{kind}: a live pin is not taken yet"
        );
        drop(pin);
        assert_eq!(gate.take_dirty().unwrap(), vec![0x8000..0x9000], "{kind}");

        #[cfg(feature = "vm-memory")]
        {
            use vm_memory::{Bytes, GuestAddress};
            let dm = gmem::DeviceMemory::new(gate);
            dm.write_slice(b"virtio", GuestAddress(0xa010)).unwrap();
            assert!(
                gate.take_dirty().unwrap().is_empty(),
                "{kind}: the request holds its pin"
            );
            drop(dm);
            assert_eq!(
                gate.take_dirty().unwrap(),
                vec![0xa000..0xb000],
                "{kind}: a DeviceMemory slice"
            );
        }

        gate.convert(0xc000, P, Attribute::Private).unwrap();
        assert_eq!(
            gate.take_dirty().unwrap(),
            vec![0xc000..0xd000],
            "{kind}: to private"
        );
        // A refused write (private) marks nothing.
        assert!(gate.write(0xc000, b"no").is_err());
        assert!(gate.take_dirty().unwrap().is_empty(), "{kind}: refused");
        gate.convert(0xc000, P, Attribute::Shared).unwrap();
        assert_eq!(
            gate.take_dirty().unwrap(),
            vec![0xc000..0xd000],
            "{kind}: to shared"
        );

        gate.discard(0xe000, 2 * P).unwrap();
        assert_eq!(
            gate.take_dirty().unwrap(),
            vec![0xe000..0x10000],
            "{kind}: discard"
        );

        // Typed refusals.
        let e = gate.start_dirty_tracking().unwrap_err();
        assert!(matches!(e, DirtyError::AlreadyTracking), "{kind}: {e}");
        assert_eq!(e.errno(), libc::EBUSY);
        gate.stop_dirty_tracking().unwrap();
        assert!(!gate.is_tracking_dirty());
        gate.write(0x3000, b"after the stop").unwrap();
        let e = gate.take_dirty().unwrap_err();
        assert!(matches!(e, DirtyError::NotTracking), "{kind}: {e}");
        assert_eq!(e.errno(), libc::EINVAL);
        let e = gate.stop_dirty_tracking().unwrap_err();
        assert!(matches!(e, DirtyError::NotTracking), "{kind}: {e}");
        // Nothing written while off is remembered by the next start.
        gate.start_dirty_tracking().unwrap();
        assert!(gate.take_dirty().unwrap().is_empty(), "{kind}: restart");
        gate.stop_dirty_tracking().unwrap();
    }
}

/// Runs a real-mode vCPU of `vm` from `code` at 0x1000 until it halts:
/// the guest's own writes, which only KVM's dirty log sees.
fn run_guest(vm: &Vm, gate: &Gatekeeper, code: &[u8]) {
    gate.write(0x1000, code).unwrap();
    let mut vcpu = vm.fd().create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    match vcpu.run().unwrap() {
        kvm_ioctls::VcpuExit::Hlt => {}
        other => panic!("the guest exited with {other:?}"),
    }
}

/// `mov byte [0x5000], 0x42; mov byte [0x9ff0], 0x43; hlt` in real mode.
const GUEST_WRITES: &[u8] = &[
    0xc6, 0x06, 0x00, 0x50, 0x42, 0xc6, 0x06, 0xf0, 0x9f, 0x43, 0xf4,
];

#[test]
fn the_guests_writes_are_in_kvms_dirty_log() {
    let test = "dirty tracking: the guest's writes";
    if !kvm_or_skip(test) {
        return;
    }
    for kind in [BackingKind::Memfd, BackingKind::Hugetlb2M] {
        let Some(_held) = on_backing(test, kind, 4) else {
            continue;
        };
        let (vm, _mem, gate) = gate_on(kind, 2 * MIB, GateOptions::default());
        gate.start_dirty_tracking().unwrap();
        run_guest(&vm, &gate, GUEST_WRITES);
        // The code page (written by the host) and the guest's two pages.
        assert_eq!(
            gate.take_dirty().unwrap(),
            vec![0x1000..0x2000, 0x5000..0x6000, 0x9000..0xa000],
            "{kind}"
        );
        assert!(gate.take_dirty().unwrap().is_empty(), "{kind}: taken");
        gate.stop_dirty_tracking().unwrap();

        // Between pre-copy rounds: the destination gets what the guest wrote.
        let src = guest(kind, 2 * MIB);
        let dst = guest(kind, 2 * MIB);
        let m = migrate_over_socket(&src.gate, &dst.gate, Some(key()), &|g| {
            run_guest(&src._vm, g, GUEST_WRITES)
        });
        m.source.unwrap();
        m.dest.unwrap();
        assert_eq!(read(&dst.gate, 0x5000, 1), [0x42], "{kind}");
        assert_eq!(read(&dst.gate, 0x9ff0, 1), [0x43], "{kind}");
        assert_eq!(content(&dst.gate), content(&src.gate), "{kind}");
    }
}

#[test]
fn dirty_tracking_refuses_a_poisoned_gatekeeper_and_guest_memfd() {
    let test = "dirty tracking refusals";
    if !kvm_or_skip(test) {
        return;
    }
    // Poisoned: by a stream cut after its header.
    let src = source(BackingKind::Memfd, SMALL, false);
    let mut wire = Vec::new();
    let m = src
        .gate
        .migrate_to(&mut wire, MigrationOptions::new())
        .unwrap();
    drop(m);
    let dst = guest(BackingKind::Memfd, SMALL);
    let mut r = wire.as_slice();
    let inc = Incoming::read_header(&mut r).unwrap();
    assert!(inc.receive(&dst.gate, &mut r, None).is_err());
    let e = dst.gate.start_dirty_tracking().unwrap_err();
    assert!(
        matches!(e, DirtyError::Gate(GateError::Poisoned { .. })),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EIO);

    if needs(test, &Need::of_backing(BackingKind::GuestMemfd)) {
        let g = guest(BackingKind::GuestMemfd, SMALL);
        let e = g.gate.start_dirty_tracking().unwrap_err();
        assert!(matches!(e, DirtyError::GuestMemfd { .. }), "{e}");
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(!g.gate.is_tracking_dirty());
    }
}

// --- round trips -----------------------------------------------------------------------

#[test]
fn a_vm_migrates_over_a_socket_between_threads() {
    let test = "migration round trip over a socket";
    if !kvm_or_skip(test) {
        return;
    }
    for kind in [BackingKind::Memfd, BackingKind::Hugetlb2M] {
        // Both guests on one pool: 2 × 4 MiB.
        let Some(_held) = on_backing(test, kind, 4) else {
            continue;
        };
        let size = 4 * MIB;
        let src = source(kind, size, true);
        let dst = guest(kind, size);
        let m = migrate_over_socket(&src.gate, &dst.gate, Some(key()), &|g| {
            between_rounds(g, true)
        });
        let report = m.source.unwrap();
        let incoming = m.dest.unwrap();
        assert_eq!(m.ack, Some(ACK_RUNNING), "{kind}");
        assert_eq!(incoming.state, STATE, "{kind}");
        assert_eq!(incoming.rounds, 2, "{kind}");
        assert_eq!(report.rounds.len(), 2, "{kind}");
        assert_eq!(report.stream_bytes, m.wire.len() as u64, "{kind}");
        assert_eq!(incoming.stream_bytes, m.wire.len() as u64, "{kind}");
        assert_eq!(incoming.records, report.records, "{kind}");
        assert_eq!(incoming.sealed_bytes, report.sealed_bytes, "{kind}");
        assert_eq!(incoming.shared_bytes, report.shared_bytes, "{kind}");
        assert!(report.sealed_bytes >= 2 * P, "{kind}: {report:?}");
        if kind == BackingKind::Memfd {
            // (On hugetlb the discarded 4 KiB is zeroed inside a huge page
            // that stays populated: it goes as data.)
            assert!(
                report.zeroed_bytes >= P,
                "{kind}: the discard went as a hole"
            );
        }

        // Private content never on the wire in clear; shared content is.
        assert!(!holds(&m.wire, PRIVATE_MARK), "{kind}: private in clear");
        assert!(!holds(&m.wire, LATE_MARK), "{kind}: late private in clear");
        assert!(holds(&m.wire, SHARED_MARK), "{kind}: the scan's control");

        // The destination holds what the source holds.
        let late = 2 * MIB + MIB / 2;
        assert_eq!(content(&dst.gate), content(&src.gate), "{kind}");
        assert_eq!(
            dst.gate.private_runs(),
            vec![MIB + MIB / 2..MIB + MIB / 2 + P, late..late + P],
            "{kind}: the attribute map"
        );
        assert!(
            dst.gate.read(late, &mut [0u8; 4]).is_err(),
            "{kind}: sealed"
        );
        assert_eq!(read(&dst.gate, 2 * MIB, P as usize), vec![0u8; P as usize]);
        assert_eq!(&read(&dst.gate, 3 * MIB + 0x10, 18), b"the second version");
        assert_eq!(&read(&dst.gate, 3 * MIB + P + 8, 11), b"by a device");
        // Holes arrived as holes: nothing was sent for them.
        assert!(
            report.shared_bytes + report.sealed_bytes < 2 * size,
            "{kind}: {report:?}"
        );
        // The private pages hold what the source put there.
        for (gpa, mark) in [(MIB + MIB / 2, PRIVATE_MARK), (late, LATE_MARK)] {
            dst.gate.convert(gpa, P, Attribute::Shared).unwrap();
            assert_eq!(read(&dst.gate, gpa, P as usize), page_of(mark), "{kind}");
        }
        // The source is unchanged and can migrate again.
        assert!(!src.gate.is_tracking_dirty());
        assert!(src.gate.poisoned().is_none());
        assert_eq!(
            src.gate.private_runs(),
            vec![MIB + MIB / 2..MIB + MIB / 2 + P, late..late + P]
        );
    }
}

/// A tiny deterministic generator for the dirtier.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Dirties `gate` until `stop` (or 20 000 operations, so that a debug
/// build's sealing keeps up): writes, fills, pin writes, discards and
/// conversions both ways on random pages, as a busy guest and its devices
/// would (a host thread stands in for the vCPUs).
fn dirtier(gate: &Gatekeeper, size: u64, seed: u64, stop: &std::sync::atomic::AtomicBool) -> u64 {
    let mut x = seed;
    let mut ops = 0u64;
    // At least one op, even if the migration's rounds ended before this
    // thread first ran (a busy host): it still lands before the
    // stop-and-copy.
    while ops == 0 || (!stop.load(std::sync::atomic::Ordering::Acquire) && ops < 20_000) {
        let r = xorshift(&mut x);
        let page = (r % (size / P)) * P;
        let _ = match r >> 60 {
            0 => gate.discard(page, P).map(drop).map_err(drop),
            1 => gate
                .convert(page, P, Attribute::Private)
                .map(drop)
                .map_err(drop),
            2 => gate
                .convert(page, P, Attribute::Shared)
                .map(drop)
                .map_err(drop),
            3 => gate.fill(page, P, r as u8).map_err(drop),
            4 => gate
                .pin(page, P)
                .and_then(|pin| pin.write(r % 4000, &r.to_le_bytes()))
                .map_err(drop),
            _ => gate
                .write(page + (r >> 8) % (P - 8), &ops.to_le_bytes())
                .map_err(drop),
        };
        ops += 1;
    }
    ops
}

#[test]
fn a_vm_dirtied_while_it_migrates_arrives_as_it_stopped() {
    let test = "migration under a dirtier";
    if !kvm_or_skip(test) {
        return;
    }
    for kind in [BackingKind::Memfd, BackingKind::Hugetlb2M] {
        let Some(_held) = on_backing(test, kind, 4) else {
            continue;
        };
        for seed in [1u64, 0x9e37_79b9_7f4a_7c15] {
            let size = 4 * MIB;
            let src = source(kind, size, true);
            src.gate.fill(MIB + MIB / 2 + P, MIB / 2, 0x5a).unwrap();
            let dst = guest(kind, size);
            let stop = std::sync::atomic::AtomicBool::new(false);
            let (a, b) = UnixStream::pair().unwrap();
            let (report, incoming, ops) = std::thread::scope(|s| {
                let d = s.spawn(|| {
                    let mut r = b;
                    Incoming::read_header(&mut r)
                        .and_then(|inc| inc.receive(&dst.gate, &mut r, Some(&key())))
                });
                let busy = s.spawn(|| dirtier(&src.gate, size, seed, &stop));
                let mut m = src
                    .gate
                    .migrate_to(
                        a,
                        MigrationOptions::new()
                            .with_key(key())
                            .with_max_rounds(3)
                            .with_converge_bytes(0),
                    )
                    .unwrap();
                m.precopy().unwrap();
                // The pause: the dirtier stops, then the stop-and-copy.
                stop.store(true, std::sync::atomic::Ordering::Release);
                let ops = busy.join().unwrap();
                let (report, _) = m.complete(STATE).unwrap();
                (report, d.join().unwrap(), ops)
            });
            let incoming = incoming.unwrap();
            assert_eq!(incoming.state, STATE);
            assert_eq!(incoming.rounds, report.rounds.len() as u64);
            assert!(ops > 0);
            let what = format!(
                "{kind}, seed {seed:#x}, {ops} ops, {} rounds",
                report.rounds.len()
            );
            eprintln!("{test}: {what}");
            assert_eq!(content(&dst.gate), content(&src.gate), "{what}");
            // The private pages too: shared again on both sides, compared.
            for run in src.gate.private_runs() {
                let len = run.end - run.start;
                src.gate.convert(run.start, len, Attribute::Shared).unwrap();
                dst.gate.convert(run.start, len, Attribute::Shared).unwrap();
                assert_eq!(
                    read(&dst.gate, run.start, len as usize),
                    read(&src.gate, run.start, len as usize),
                    "{what}: private {run:x?}"
                );
            }
        }
    }
}

#[test]
fn without_a_key_shared_memory_migrates_and_private_memory_is_refused() {
    let test = "migration without a key";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let size = 4 * MIB;
    // All shared: migrates in clear.
    let src = source(BackingKind::Memfd, size, false);
    let dst = guest(BackingKind::Memfd, size);
    let m = migrate_over_socket(&src.gate, &dst.gate, None, &|g| between_rounds(g, false));
    m.source.unwrap();
    assert_eq!(m.dest.unwrap().state, STATE);
    assert_eq!(m.ack, Some(ACK_RUNNING));
    assert_eq!(content(&dst.gate), content(&src.gate));

    // A private page and no key: refused before anything is sent.
    let src = source(BackingKind::Memfd, size, true);
    let before = content(&src.gate);
    let e = src
        .gate
        .migrate_to(Vec::new(), MigrationOptions::new())
        .unwrap_err();
    assert!(
        matches!(e, MigrateError::PrivateWithoutKey { first_gpa, .. } if first_gpa == MIB + MIB / 2),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EPERM);
    assert!(!src.gate.is_tracking_dirty());
    assert_eq!(content(&src.gate), before, "the source is unchanged");

    // A page made private between rounds, no key: the round is refused,
    // the destination never runs, the source is unchanged.
    let src = source(BackingKind::Memfd, size, false);
    let dst = guest(BackingKind::Memfd, size);
    let m = migrate_over_socket(&src.gate, &dst.gate, None, &|g| between_rounds(g, true));
    let e = m.source.unwrap_err();
    assert!(matches!(e, MigrateError::PrivateWithoutKey { .. }), "{e}");
    assert!(m.dest.is_err());
    assert_poisoned(&dst.gate, "a destination of a refused round");
    assert!(!src.gate.is_tracking_dirty());
    let late = 2 * MIB + MIB / 2;
    assert_eq!(src.gate.private_runs(), vec![late..late + P]);
    // ... and migrates with a key.
    let dst = guest(BackingKind::Memfd, size);
    let m = migrate_over_socket(&src.gate, &dst.gate, Some(key()), &|_| ());
    m.source.unwrap();
    m.dest.unwrap();
    assert_eq!(content(&dst.gate), content(&src.gate));
}

// --- the stream, record by record ------------------------------------------------------

const KIND_SHARED: u8 = 1;
const KIND_SEALED: u8 = 2;
const KIND_STATE: u8 = 3;
const KIND_INDEX: u8 = 4;
const KIND_ZERO: u8 = 5;
const KIND_ROUND: u8 = 6;
const KIND_ATTRIBUTES: u8 = 7;
const KIND_END: u8 = 0xff;
const TAG: usize = 16;

/// A stream cut into its header and records (each whole: head, payload,
/// tag, CRC), as `docs/migration-stream.md` lays them out.
#[derive(Clone)]
struct Wire {
    header: Vec<u8>,
    records: Vec<Vec<u8>>,
}

impl Wire {
    fn parse(stream: &[u8], sealed: bool) -> Wire {
        let regions = u32::from_le_bytes(stream[32..36].try_into().unwrap()) as usize;
        let private = u32::from_le_bytes(stream[36..40].try_into().unwrap()) as usize;
        let mut at = 40 + 40 * regions + 16 * private + 4 + if sealed { TAG } else { 0 };
        let header = stream[..at].to_vec();
        let mut records = Vec::new();
        while at < stream.len() {
            let len = u32::from_le_bytes(stream[at + 4..at + 8].try_into().unwrap()) as usize;
            let tag = if sealed || stream[at] == KIND_SEALED {
                TAG
            } else {
                0
            };
            let end = at + 16 + len + tag + 4;
            records.push(stream[at..end].to_vec());
            at = end;
        }
        Wire { header, records }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = self.header.clone();
        for r in &self.records {
            b.extend_from_slice(r);
        }
        b
    }

    fn kinds(&self) -> Vec<u8> {
        self.records.iter().map(|r| r[0]).collect()
    }

    /// Where each record starts in [`bytes`](Self::bytes).
    fn offsets(&self) -> Vec<usize> {
        let mut at = self.header.len();
        self.records
            .iter()
            .map(|r| {
                let o = at;
                at += r.len();
                o
            })
            .collect()
    }
}

/// Writes records as a source holding the stream's key would (or in clear
/// without one): a hostile source, or a tool, forging well-formed records.
struct Forge {
    out: Vec<u8>,
    sealer: Option<(XChaCha20Poly1305, [u8; 16])>,
    ordinal: u64,
}

impl Forge {
    /// Records after `header` (a real one, with its tag if sealed).
    fn after(header: &[u8], key: Option<&[u8; 32]>) -> Forge {
        let id: [u8; 16] = header[16..32].try_into().unwrap();
        Forge {
            out: header.to_vec(),
            sealer: key.map(|k| (XChaCha20Poly1305::new(&(*k).into()), id)),
            ordinal: 0,
        }
    }

    fn nonce(id: &[u8; 16], ordinal: u64) -> chacha20poly1305::XNonce {
        let mut n = [0u8; 24];
        n[..16].copy_from_slice(id);
        n[16..].copy_from_slice(&ordinal.to_le_bytes());
        n.into()
    }

    /// One record of `kind`: sealed (Sealed, State) or authenticated under
    /// the key, or in clear; its CRC right.
    fn rec(mut self, kind: u8, aux: u64, payload: &[u8]) -> Forge {
        let mut head = [0u8; 16];
        head[0] = kind;
        head[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        head[8..].copy_from_slice(&aux.to_le_bytes());
        let mut body = payload.to_vec();
        if let Some((cipher, id)) = &self.sealer {
            let nonce = Forge::nonce(id, self.ordinal);
            let tag = if kind == KIND_SEALED || kind == KIND_STATE {
                cipher
                    .encrypt_inout_detached(&nonce, &head, body.as_mut_slice().into())
                    .unwrap()
            } else {
                let mut aad = head.to_vec();
                aad.extend_from_slice(payload);
                cipher
                    .encrypt_inout_detached(&nonce, &aad, (&mut [][..]).into())
                    .unwrap()
            };
            body.extend_from_slice(&tag);
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), &body);
        self.out.extend_from_slice(&head);
        self.out.extend_from_slice(&body);
        self.out.extend_from_slice(&crc.to_le_bytes());
        self.ordinal += 1;
        self
    }

    /// A record in clear with the length field `len` whatever `body` holds
    /// (a payload and a tag, say); its CRC right.
    fn raw_rec(mut self, kind: u8, len: u32, aux: u64, body: &[u8]) -> Forge {
        let mut head = [0u8; 16];
        head[0] = kind;
        head[4..8].copy_from_slice(&len.to_le_bytes());
        head[8..].copy_from_slice(&aux.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), body);
        self.out.extend_from_slice(&head);
        self.out.extend_from_slice(body);
        self.out.extend_from_slice(&crc.to_le_bytes());
        self.ordinal += 1;
        self
    }

    /// A record header alone, claiming `len` bytes (and nothing after it).
    fn head_only(mut self, kind: u8, len: u32, aux: u64) -> Forge {
        let mut head = [0u8; 16];
        head[0] = kind;
        head[4..8].copy_from_slice(&len.to_le_bytes());
        head[8..].copy_from_slice(&aux.to_le_bytes());
        self.out.extend_from_slice(&head);
        self
    }

    fn zero(self, gpa: u64, len: u64) -> Forge {
        self.rec(KIND_ZERO, gpa, &len.to_le_bytes())
    }

    fn round(self, n: u64, data: u64, zeroed: u64) -> Forge {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&data.to_le_bytes());
        c[8..].copy_from_slice(&zeroed.to_le_bytes());
        self.rec(KIND_ROUND, n, &c)
    }

    fn attributes(self, runs: &[(u64, u64)]) -> Forge {
        let mut p = Vec::new();
        for (s, e) in runs {
            p.extend_from_slice(&s.to_le_bytes());
            p.extend_from_slice(&e.to_le_bytes());
        }
        self.rec(KIND_ATTRIBUTES, runs.len() as u64, &p)
    }

    fn state(self) -> Forge {
        self.rec(KIND_STATE, 0, STATE)
    }

    /// The end, with the counts given (shared, sealed, zeroed, rounds) and
    /// the record count right unless `records` says otherwise.
    fn end(self, counts: [u64; 4], records: Option<u64>) -> Forge {
        let mut p = [0u8; 32];
        for (i, c) in counts.iter().enumerate() {
            p[i * 8..i * 8 + 8].copy_from_slice(&c.to_le_bytes());
        }
        let n = records.unwrap_or(self.ordinal + 1);
        self.rec(KIND_END, n, &p)
    }
}

/// The attack tests' streams: a sealed two-round migration of a guest
/// with shared, private, discarded and converted pages (every record kind),
/// and an unsealed one of an all-shared guest; each with its source.
struct Streams {
    sealed: Vec<u8>,
    clear: Vec<u8>,
    sealed_src: Guest,
    clear_src: Guest,
}

/// Migrates `g` into a buffer: two rounds, `between` run between them.
fn stream_of(g: &Gatekeeper, key: Option<SealKey>, between: impl Fn(&Gatekeeper)) -> Vec<u8> {
    let mut wire = Vec::new();
    let mut opts = MigrationOptions::new();
    if let Some(k) = key {
        opts = opts.with_key(k);
    }
    let mut m = g.migrate_to(&mut wire, opts).unwrap();
    m.send_round().unwrap();
    between(g);
    m.send_round().unwrap();
    m.complete(STATE).unwrap();
    wire
}

/// Small-guest versions of [`between_rounds`] (2 MiB guests).
fn small_between(g: &Gatekeeper, private: bool) {
    g.discard(0x2000, P).unwrap();
    g.write(MIB + 0x10, b"round two").unwrap();
    if private {
        g.write(MIB + 0x8000, &page_of(LATE_MARK)).unwrap();
        g.convert(MIB + 0x8000, P, Attribute::Private).unwrap();
    }
}

fn streams() -> Streams {
    let sealed_src = source(BackingKind::Memfd, SMALL, true);
    let sealed = stream_of(&sealed_src.gate, Some(key()), |g| small_between(g, true));
    let clear_src = source(BackingKind::Memfd, SMALL, false);
    let clear = stream_of(&clear_src.gate, None, |g| small_between(g, false));
    Streams {
        sealed,
        clear,
        sealed_src,
        clear_src,
    }
}

/// What feeding a stream to a fresh destination did.
#[derive(Debug)]
enum Fed {
    /// Taken whole.
    Ok(Content, IncomingReport),
    /// Refused before the destination changed: it is untouched.
    RefusedBefore(MigrateError),
    /// Refused after the destination began applying: it is poisoned.
    RefusedAfter(MigrateError),
}

fn key_bytes() -> [u8; 32] {
    *b"0123456789abcdef0123456789abcdef"
}

/// Feeds `stream` to a fresh small destination with `key`, and checks
/// what each outcome promises: a refusal before anything was applied left
/// the destination as it was (a good stream still restores onto it); any
/// later refusal poisoned it (every access refused). Errors are typed.
fn feed(stream: &[u8], key: Option<&SealKey>, good: &[u8], good_key: Option<&SealKey>) -> Fed {
    let dst = guest(BackingKind::Memfd, SMALL);
    let mut r = stream;
    let result = Incoming::read_header(&mut r).and_then(|inc| inc.receive(&dst.gate, &mut r, key));
    match result {
        Ok(report) => Fed::Ok(content(&dst.gate), report),
        Err(e) => {
            assert_ne!(e.errno(), 0, "{e}");
            assert!(!e.to_string().is_empty());
            assert!(
                matches!(e, MigrateError::Stream(_)),
                "a stream's refusal is a stream error: {e:?}"
            );
            if dst.gate.poisoned().is_some() {
                assert_poisoned(&dst.gate, &e.to_string());
                Fed::RefusedAfter(e)
            } else {
                // Untouched: still a fresh VM a good stream migrates onto.
                let mut r = good;
                Incoming::read_header(&mut r)
                    .and_then(|inc| inc.receive(&dst.gate, &mut r, good_key))
                    .unwrap_or_else(|e2| panic!("after `{e}`, the good stream: {e2}"));
                Fed::RefusedBefore(e)
            }
        }
    }
}

fn refused(fed: &Fed) -> bool {
    !matches!(fed, Fed::Ok(..))
}

/// The error of a refusal.
fn error_of(fed: &Fed) -> &MigrateError {
    match fed {
        Fed::RefusedBefore(e) | Fed::RefusedAfter(e) => e,
        Fed::Ok(..) => panic!("taken: {fed:?}"),
    }
}

fn is_corrupt(fed: &Fed) -> bool {
    matches!(
        error_of(fed),
        MigrateError::Stream(RestoreError::Corrupt { .. })
    )
}

/// The source of an attacked stream is unchanged, not tracking, and
/// migrates again.
fn source_still_migrates(src: &Gatekeeper, key: Option<SealKey>) {
    assert!(!src.is_tracking_dirty());
    assert!(src.poisoned().is_none());
    let before = content(src);
    let dst = guest(BackingKind::Memfd, SMALL);
    let m = migrate_over_socket(src, &dst.gate, key, &|_| ());
    m.source.unwrap();
    m.dest.unwrap();
    assert_eq!(content(src), before);
    assert_eq!(content(&dst.gate), before);
}

#[test]
fn the_streams_hold_every_record_kind_and_no_private_byte_in_clear() {
    let test = "migration stream layout";
    if !kvm_or_skip(test) {
        return;
    }
    let s = streams();
    let w = Wire::parse(&s.sealed, true);
    assert_eq!(w.bytes(), s.sealed, "the parser splits the stream whole");
    let kinds = w.kinds();
    for k in [
        KIND_SHARED,
        KIND_SEALED,
        KIND_ZERO,
        KIND_ROUND,
        KIND_ATTRIBUTES,
        KIND_STATE,
        KIND_END,
    ] {
        assert!(kinds.contains(&k), "kind {k:#x} missing: {kinds:x?}");
    }
    assert!(!holds(&s.sealed, PRIVATE_MARK));
    assert!(!holds(&s.sealed, LATE_MARK));
    assert!(holds(&s.sealed, SHARED_MARK));
    assert!(
        !holds(&s.sealed, b"the vCPUs and de"),
        "the state is sealed"
    );
    let c = Wire::parse(&s.clear, false);
    assert_eq!(c.bytes(), s.clear);
    assert!(matches!(
        feed(&s.sealed, Some(&key()), &s.sealed, Some(&key())),
        Fed::Ok(..)
    ));
    assert!(matches!(feed(&s.clear, None, &s.clear, None), Fed::Ok(..)));
}

#[test]
fn flipped_bytes_are_refused_everywhere() {
    let test = "migration: flipped bytes";
    if !kvm_or_skip(test) {
        return;
    }
    let s = streams();
    for (stream, sealed) in [(&s.sealed, true), (&s.clear, false)] {
        let k = sealed.then(key);
        let w = Wire::parse(stream, sealed);
        // Every header byte; each record's head, CRC, tag and the ends of its
        // payload; inside payloads every 509th byte.
        let mut at: Vec<usize> = (0..w.header.len()).collect();
        for (o, r) in w.offsets().into_iter().zip(&w.records) {
            let n = r.len();
            at.extend((o..o + 16.min(n)).chain(o + n.saturating_sub(24)..o + n));
            at.extend((o + 16..o + n).step_by(509));
        }
        at.sort_unstable();
        at.dedup();
        for &i in &at {
            let bit = if i % 2 == 0 { 0x01u8 } else { 0x80 };
            let mut bad = stream.clone();
            bad[i] ^= bit;
            let fed = feed(&bad, k.as_ref(), stream, k.as_ref());
            assert!(refused(&fed), "sealed {sealed}: byte {i} ^ {bit:#x} taken");
        }
        eprintln!("{test}: sealed {sealed}: {} flips refused", at.len());
    }
    source_still_migrates(&s.sealed_src.gate, Some(key()));
    source_still_migrates(&s.clear_src.gate, None);
}

#[test]
fn truncation_anywhere_is_refused() {
    let test = "migration: truncation";
    if !kvm_or_skip(test) {
        return;
    }
    let s = streams();
    for (stream, sealed) in [(&s.sealed, true), (&s.clear, false)] {
        let k = sealed.then(key);
        let w = Wire::parse(stream, sealed);
        let mut cuts: Vec<usize> = (0..=w.header.len()).collect();
        for (o, r) in w.offsets().into_iter().zip(&w.records) {
            for d in [0usize, 1, 15, 16, 17, r.len() / 2, r.len() - 4, r.len() - 1] {
                cuts.push(o + d);
            }
        }
        cuts.retain(|&c| c < stream.len());
        cuts.sort_unstable();
        cuts.dedup();
        for &c in &cuts {
            let fed = feed(&stream[..c], k.as_ref(), stream, k.as_ref());
            assert!(
                matches!(
                    error_of(&fed),
                    MigrateError::Stream(RestoreError::Truncated { .. })
                ),
                "sealed {sealed}: cut at {c}: {fed:?}"
            );
            if c >= w.header.len() {
                assert!(
                    matches!(fed, Fed::RefusedAfter(_)),
                    "cut at {c}: the destination must not run: {fed:?}"
                );
            }
        }
    }
}

#[test]
fn records_replayed_dropped_reordered_or_spliced_are_refused() {
    let test = "migration: replay, drop, reorder, splice";
    if !kvm_or_skip(test) {
        return;
    }
    let s = streams();
    // A second migration of the same source under the same key: another id.
    let other = stream_of(&s.sealed_src.gate, Some(key()), |_| ());
    let ow = Wire::parse(&other, true);
    for (stream, sealed) in [(&s.sealed, true), (&s.clear, false)] {
        let k = sealed.then(key);
        let w = Wire::parse(stream, sealed);
        let Fed::Ok(want, _) = feed(stream, k.as_ref(), stream, k.as_ref()) else {
            panic!("the good stream")
        };
        let n = w.records.len();
        for i in 0..n {
            let name = format!("sealed {sealed}, record {i} ({:#x})", w.records[i][0]);
            // Replayed right after itself (the end: trailing bytes, not read).
            if i + 1 < n {
                let mut bad = w.clone();
                bad.records.insert(i + 1, w.records[i].clone());
                let fed = feed(&bad.bytes(), k.as_ref(), stream, k.as_ref());
                assert!(is_corrupt(&fed), "{name} replayed: {fed:?}");
                // Replayed at the end, before the end record.
                let mut bad = w.clone();
                bad.records.insert(n - 1, w.records[i].clone());
                let fed = feed(&bad.bytes(), k.as_ref(), stream, k.as_ref());
                assert!(is_corrupt(&fed), "{name} replayed late: {fed:?}");
            }
            // Dropped.
            let mut bad = w.clone();
            bad.records.remove(i);
            let fed = feed(&bad.bytes(), k.as_ref(), stream, k.as_ref());
            assert!(refused(&fed), "{name} dropped: {fed:?}");
            // Swapped with the next. Sealed: refused. In clear (CRC, counts
            // and order only, no authentication) a swap inside one round
            // changes nothing; any other is refused.
            if i + 1 < n {
                let mut bad = w.clone();
                bad.records.swap(i, i + 1);
                let fed = feed(&bad.bytes(), k.as_ref(), stream, k.as_ref());
                match &fed {
                    Fed::Ok(got, _) => {
                        assert!(!sealed, "{name} swapped: taken");
                        assert_eq!(got, &want, "{name} swapped: taken, and different");
                    }
                    _ => assert!(refused(&fed)),
                }
            }
            // Spliced from the other migration (same key, same position).
            if sealed && i < ow.records.len() && ow.records[i] != w.records[i] {
                let mut bad = w.clone();
                bad.records[i] = ow.records[i].clone();
                let fed = feed(&bad.bytes(), k.as_ref(), stream, k.as_ref());
                assert!(is_corrupt(&fed), "{name} spliced: {fed:?}");
            }
        }
        // The other migration's header on this one's records.
        if sealed {
            let mut bad = w.clone();
            bad.header = ow.header.clone();
            let fed = feed(&bad.bytes(), k.as_ref(), stream, k.as_ref());
            assert!(is_corrupt(&fed), "another header: {fed:?}");
        }
    }
}

#[test]
fn keys_and_foreign_streams_are_refused_before_anything_changes() {
    let test = "migration: keys and foreign streams";
    if !kvm_or_skip(test) {
        return;
    }
    let s = streams();
    let wrong = SealKey::new([7; 32]);
    let before = |fed: &Fed| matches!(fed, Fed::RefusedBefore(_));
    let fed = feed(&s.sealed, Some(&wrong), &s.sealed, Some(&key()));
    assert!(
        before(&fed) && matches!(error_of(&fed), MigrateError::Stream(RestoreError::WrongKey)),
        "{fed:?}"
    );
    let fed = feed(&s.sealed, None, &s.sealed, Some(&key()));
    assert!(
        before(&fed) && matches!(error_of(&fed), MigrateError::Stream(RestoreError::NeedsKey)),
        "{fed:?}"
    );
    let fed = feed(&s.clear, Some(&key()), &s.clear, None);
    assert!(
        before(&fed)
            && matches!(
                error_of(&fed),
                MigrateError::Stream(RestoreError::NotSealed)
            ),
        "{fed:?}"
    );

    // A snapshot is not a migration stream, nor the other way round.
    let mut snap = Vec::new();
    s.sealed_src
        .gate
        .snapshot(&mut snap, &PrivatePages::Seal(key()))
        .unwrap();
    let fed = feed(&snap, Some(&key()), &s.sealed, Some(&key()));
    assert!(
        before(&fed)
            && matches!(
                error_of(&fed),
                MigrateError::Stream(RestoreError::NotASnapshot)
            ),
        "{fed:?}"
    );
    let dst = guest(BackingKind::Memfd, SMALL);
    let e = dst
        .gate
        .restore(&mut s.sealed.as_slice(), Some(&key()))
        .unwrap_err();
    assert!(matches!(e, RestoreError::NotASnapshot), "{e}");
    assert!(dst.gate.poisoned().is_none());

    // Another layout.
    let big = guest(BackingKind::Memfd, 2 * SMALL);
    let mut r = s.sealed.as_slice();
    let e = Incoming::read_header(&mut r)
        .unwrap()
        .receive(&big.gate, &mut r, Some(&key()))
        .unwrap_err();
    assert!(
        matches!(e, MigrateError::Stream(RestoreError::Layout { .. })),
        "{e}"
    );
    assert!(big.gate.poisoned().is_none());

    // A destination that has run is no destination.
    let ran = guest(BackingKind::Memfd, SMALL);
    ran.gate.convert(0, P, Attribute::Private).unwrap();
    let mut r = s.sealed.as_slice();
    let e = Incoming::read_header(&mut r)
        .unwrap()
        .receive(&ran.gate, &mut r, Some(&key()))
        .unwrap_err();
    assert!(
        matches!(
            e,
            MigrateError::Stream(RestoreError::Gate(GateError::NotRestorable { .. }))
        ),
        "{e}"
    );
    assert_eq!(ran.gate.private_runs(), vec![0..P], "untouched");
}

/// Streams forged by a source that holds the key (and in clear): each
/// breaks one rule of the stream, and each is refused as corrupt, after
/// which the destination is poisoned.
#[test]
fn forged_streams_are_refused() {
    let test = "migration: forged streams";
    if !kvm_or_skip(test) {
        return;
    }
    let s = streams();
    let kb = key_bytes();
    let sealed_head = Wire::parse(&s.sealed, true).header;
    let clear_head = Wire::parse(&s.clear, false).header;
    type Case = (&'static str, fn(Forge) -> Forge);
    let cases: Vec<Case> = vec![
        ("round 2 first", |f| f.round(2, 0, 0)),
        ("round 1 twice", |f| f.round(1, 0, 0).round(1, 0, 0)),
        ("round 0", |f| f.round(0, 0, 0)),
        ("a round's data count wrong", |f| {
            f.rec(KIND_SHARED, 0, &[1; P as usize]).round(1, 0, 0)
        }),
        ("a round's zeroed count wrong", |f| {
            f.zero(0, P).round(1, 0, 7 * P)
        }),
        ("past MAX_ROUNDS", |f| {
            let mut f = f;
            for n in 1..=u64::from(MAX_ROUNDS) + 1 {
                f = f.round(n, 0, 0);
            }
            f.state().end([0, 0, 0, u64::from(MAX_ROUNDS) + 1], None)
        }),
        ("zero outside the layout", |f| f.zero(SMALL, P)),
        ("zero across the layout's end", |f| f.zero(SMALL - P, 2 * P)),
        ("zero at an unaligned GPA", |f| f.zero(0x800, P)),
        ("zero of an unaligned length", |f| f.zero(0, 0x800)),
        ("zero of nothing", |f| f.zero(0, 0)),
        ("zero wrapping", |f| f.zero(u64::MAX - P + 1, 2 * P)),
        ("zero with a huge length", |f| f.zero(0, !(P - 1))),
        ("zero with a short payload", |f| {
            f.rec(KIND_ZERO, 0, &P.to_le_bytes()[..4])
        }),
        ("every page zeroed twice in a round", |f| {
            f.zero(0, SMALL)
                .zero(0, SMALL)
                .zero(0, P)
                .round(1, 0, 2 * SMALL + P)
        }),
        ("zeroes past the guest's size after the last round", |f| {
            f.zero(0, SMALL)
                .zero(0, SMALL)
                .zero(0, P)
                .state()
                .end([0, 0, 2 * SMALL + P, 0], None)
        }),
        ("attributes overlapping", |f| {
            f.attributes(&[(P, 3 * P), (2 * P, 4 * P)])
        }),
        ("attributes unsorted", |f| {
            f.attributes(&[(3 * P, 4 * P), (P, 2 * P)])
        }),
        ("attributes unsorted across records", |f| {
            f.attributes(&[(3 * P, 4 * P)]).attributes(&[(P, 2 * P)])
        }),
        ("attributes overlapping across records", |f| {
            f.attributes(&[(P, 4 * P)]).attributes(&[(3 * P, 5 * P)])
        }),
        ("an attribute run backwards", |f| {
            f.attributes(&[(2 * P, P)])
        }),
        ("an empty attribute run", |f| f.attributes(&[(P, P)])),
        ("an attribute run outside", |f| {
            f.attributes(&[(SMALL - P, SMALL + P)])
        }),
        ("an attribute run unaligned", |f| {
            f.attributes(&[(0x800, P)])
        }),
        ("attributes counting wrong", |f| {
            f.rec(KIND_ATTRIBUTES, 2, &[0; 16])
        }),
        ("attributes of no runs", |f| f.rec(KIND_ATTRIBUTES, 0, &[])),
        ("a shared record crossing 1 MiB", |f| {
            f.rec(KIND_SHARED, MIB - P, &[1; 2 * P as usize])
        }),
        ("a shared record outside", |f| {
            f.rec(KIND_SHARED, SMALL, &[1; P as usize])
        }),
        ("a shared record unaligned", |f| {
            f.rec(KIND_SHARED, 0x800, &[1; P as usize])
        }),
        ("a shared record of part of a page", |f| {
            f.rec(KIND_SHARED, 0, &[1; 100])
        }),
        ("a huge shared length", |f| {
            f.head_only(KIND_SHARED, 0xffff_f000, 0)
        }),
        ("a huge state length", |f| {
            f.head_only(KIND_STATE, u32::MAX, 0)
        }),
        ("a huge attributes length", |f| {
            f.head_only(KIND_ATTRIBUTES, 0xffff_fff0, 0x0fff_ffff)
        }),
        ("a huge end length", |f| f.head_only(KIND_END, u32::MAX, 1)),
        ("a record after the state", |f| {
            f.state().rec(KIND_SHARED, 0, &[1; P as usize])
        }),
        ("a second state", |f| f.state().state()),
        ("a zero after the state", |f| f.state().zero(0, P)),
        ("a round after the state", |f| f.state().round(1, 0, 0)),
        ("attributes after the state", |f| {
            f.state().attributes(&[(0, P)])
        }),
        ("an end without a state", |f| f.end([0, 0, 0, 0], None)),
        ("an end counting shared bytes wrong", |f| {
            f.rec(KIND_SHARED, 0, &[1; P as usize])
                .state()
                .end([0, 0, 0, 0], None)
        }),
        ("an end counting zeroed bytes wrong", |f| {
            f.zero(0, P).state().end([0, 0, 0, 0], None)
        }),
        ("an end counting sealed bytes wrong", |f| {
            f.state().end([0, P, 0, 0], None)
        }),
        ("an end counting rounds wrong", |f| {
            f.round(1, 0, 0).state().end([0, 0, 0, 0], None)
        }),
        ("an end counting records wrong", |f| {
            f.state().end([0, 0, 0, 0], Some(1))
        }),
        ("an index record", |f| f.rec(KIND_INDEX, 1, &[0; 24])),
        ("an unknown kind", |f| f.rec(9, 0, &[0; 8])),
    ];
    let mut taken = Vec::new();
    for (name, case) in &cases {
        for sealed in [true, false] {
            let (head, k) = if sealed {
                (&sealed_head, Some(&kb))
            } else {
                (&clear_head, None)
            };
            let stream = case(Forge::after(head, k)).out;
            let sk = sealed.then(key);
            let good = if sealed { &s.sealed } else { &s.clear };
            let fed = feed(&stream, sk.as_ref(), good, sk.as_ref());
            // Refused as corrupt where the rule is broken (not a stream
            // read on to its cut end), and the destination poisoned.
            if !matches!(fed, Fed::RefusedAfter(_)) || !is_corrupt(&fed) {
                taken.push(format!("{name} (sealed {sealed}): {fed:?}"));
            }
        }
    }
    assert!(
        taken.is_empty(),
        "not refused as corrupt:\n{}",
        taken.join("\n")
    );
    // A sealed record in a stream without a key.
    let stream = Forge::after(&clear_head, None)
        .raw_rec(KIND_SEALED, P as u32, 0, &[0; P as usize + TAG])
        .out;
    let fed = feed(&stream, None, &s.clear, None);
    assert!(matches!(fed, Fed::RefusedAfter(_)), "{fed:?}");
    // A nonzero padding byte.
    let mut stream = Forge::after(&clear_head, None).state().out;
    let at = clear_head.len() + 1;
    stream[at] = 1;
    let fed = feed(&stream, None, &s.clear, None);
    assert!(is_corrupt(&fed), "{fed:?}");

    // The rules' edges hold in the other direction: a forged stream that
    // keeps them is taken (1024 empty rounds, adjacent runs, the whole guest
    // zeroed once a round).
    for sealed in [true, false] {
        let (head, k) = if sealed {
            (&sealed_head, Some(&kb))
        } else {
            (&clear_head, None)
        };
        let mut f = Forge::after(head, k);
        for n in 1..=u64::from(MAX_ROUNDS) {
            f = f.zero(0, SMALL).round(n, 0, SMALL);
        }
        let stream = f
            .rec(KIND_SHARED, 0, &[0x11; P as usize])
            .attributes(&[(P, 2 * P), (2 * P, 3 * P)])
            .state()
            .end(
                [P, 0, SMALL * u64::from(MAX_ROUNDS), u64::from(MAX_ROUNDS)],
                None,
            )
            .out;
        let sk = sealed.then(key);
        let good = if sealed { &s.sealed } else { &s.clear };
        match feed(&stream, sk.as_ref(), good, sk.as_ref()) {
            Fed::Ok(c, report) => {
                assert_eq!(report.rounds, u64::from(MAX_ROUNDS));
                assert_eq!(c.private, vec![P..3 * P]);
                assert_eq!(c.shared[0].1[..P as usize], [0x11; P as usize]);
            }
            other => panic!("sealed {sealed}: a stream within the rules: {other:?}"),
        }
    }
    source_still_migrates(&s.sealed_src.gate, Some(key()));
}

#[test]
fn bytes_after_the_end_are_not_read() {
    let test = "migration: after the end";
    if !kvm_or_skip(test) {
        return;
    }
    let s = streams();
    let mut stream = s.sealed.clone();
    stream.extend_from_slice(b"trailing: the source's next message");
    let dst = guest(BackingKind::Memfd, SMALL);
    let mut r = std::io::Cursor::new(stream);
    let inc = Incoming::read_header(&mut r).unwrap();
    let report = inc.receive(&dst.gate, &mut r, Some(&key())).unwrap();
    assert_eq!(r.position(), s.sealed.len() as u64, "read past the end");
    assert_eq!(report.stream_bytes, s.sealed.len() as u64);
}

// --- the source, when the destination goes away ----------------------------------------

/// A destination that reads `limit` bytes of the stream, then is killed
/// (its end of the socket closed).
fn dying_destination(mut r: UnixStream, limit: usize) {
    let mut buf = vec![0u8; limit];
    let _ = r.read_exact(&mut buf);
    drop(r);
}

#[test]
fn a_destination_killed_mid_stream_fails_the_source_which_runs_on() {
    let test = "migration: the destination killed mid-stream";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    // 8 MiB populated: far more than the socket buffers, so a round blocks
    // on the destination and sees it go.
    let size = 16 * MIB;
    let src = source(BackingKind::Memfd, size, true);
    src.gate.fill(4 * MIB, 8 * MIB, 0x77).unwrap();
    let before = content(&src.gate);
    for limit in [0usize, 1, 100, 64 << 10, 1 << 20, 6 << 20] {
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            s.spawn(move || dying_destination(b, limit));
            let failed = match src
                .gate
                .migrate_to(a, MigrationOptions::new().with_key(key()))
            {
                Err(e) => Some(e),
                Ok(mut m) => match m.send_round() {
                    Err(e) => {
                        // Once failed, the migration stays failed.
                        assert!(matches!(m.send_round(), Err(MigrateError::Finished)));
                        assert!(matches!(m.complete(STATE), Err(MigrateError::Finished)));
                        Some(e)
                    }
                    Ok(_) => m.complete(STATE).err(),
                },
            };
            let e = failed.unwrap_or_else(|| panic!("limit {limit}: the source did not notice"));
            assert!(matches!(e, MigrateError::Send(_)), "limit {limit}: {e}");
            assert_ne!(e.errno(), 0);
        });
        // The source runs on, unchanged, and can migrate again.
        assert!(!src.gate.is_tracking_dirty(), "limit {limit}");
        assert!(src.gate.poisoned().is_none());
        assert_eq!(content(&src.gate), before, "limit {limit}");
        src.gate.write(0x100, b"still running").unwrap();
        src.gate
            .write(0x100, &before.shared[0].1[0x100..0x10d])
            .unwrap();
    }
    let dst = guest(BackingKind::Memfd, size);
    let m = migrate_over_socket(&src.gate, &dst.gate, Some(key()), &|_| ());
    m.source.unwrap();
    m.dest.unwrap();
    assert_eq!(content(&dst.gate), before);

    // Killed during the stop-and-copy: the rounds went, then it goes.
    let (a, b) = UnixStream::pair().unwrap();
    let mut m = src
        .gate
        .migrate_to(a, MigrationOptions::new().with_key(key()))
        .unwrap();
    let round_sent = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            // Reads everything the round sends, then dies.
            let mut r = b;
            r.set_read_timeout(Some(std::time::Duration::from_millis(50)))
                .unwrap();
            let mut sink = vec![0u8; 1 << 20];
            loop {
                match r.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) if round_sent.load(std::sync::atomic::Ordering::Acquire) => break,
                    Err(_) => {}
                }
            }
            drop(r);
        });
        m.send_round().unwrap();
        round_sent.store(true, std::sync::atomic::Ordering::Release);
        reader.join().unwrap();
        // Dirty the whole guest, so the stop-and-copy must write.
        src.gate.fill(4 * MIB, 8 * MIB, 0x78).unwrap();
        let e = m.complete(STATE).unwrap_err();
        assert!(matches!(e, MigrateError::Send(_)), "{e}");
    });
    assert!(!src.gate.is_tracking_dirty());
    src.gate.fill(4 * MIB, 8 * MIB, 0x77).unwrap();
    assert_eq!(content(&src.gate), before);

    // A live pin at the stop-and-copy: refused, typed, nothing else lost.
    let pin = src.gate.pin(0, P).unwrap();
    let mut m = src
        .gate
        .migrate_to(Vec::new(), MigrationOptions::new().with_key(key()))
        .unwrap();
    m.send_round().unwrap();
    let e = m.complete(STATE).unwrap_err();
    assert!(
        matches!(e, MigrateError::Gate(GateError::Pinned { .. })),
        "{e}"
    );
    drop(pin);
    assert!(!src.gate.is_tracking_dirty());
}

/// The migration owns the dirty log while it runs: another component
/// taking or stopping it would lose pages the migration must resend.
#[test]
fn the_dirty_log_belongs_to_the_migration_while_it_runs() {
    let test = "migration: one owner of the dirty log";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let src = source(BackingKind::Memfd, SMALL, true);
    let dst = guest(BackingKind::Memfd, SMALL);
    let mut wire = Vec::new();
    let mut m = src
        .gate
        .migrate_to(&mut wire, MigrationOptions::new().with_key(key()))
        .unwrap();
    m.send_round().unwrap();
    src.gate.write(0x4000, b"written after round 1").unwrap();
    // Someone else (a VMM's own dirty bitmap user) would take the log, or
    // stop and restart it: refused, typed, while the migration owns it.
    let e = src.gate.take_dirty().unwrap_err();
    assert!(matches!(e, DirtyError::Migrating), "{e}");
    assert_eq!(e.errno(), libc::EBUSY);
    let e = src.gate.stop_dirty_tracking().unwrap_err();
    assert!(matches!(e, DirtyError::Migrating), "{e}");
    let e = src.gate.start_dirty_tracking().unwrap_err();
    assert!(matches!(e, DirtyError::AlreadyTracking), "{e}");
    assert!(src.gate.is_tracking_dirty());
    m.complete(STATE).unwrap();
    let mut r = wire.as_slice();
    Incoming::read_header(&mut r)
        .unwrap()
        .receive(&dst.gate, &mut r, Some(&key()))
        .unwrap();
    assert_eq!(&read(&dst.gate, 0x4000, 21), b"written after round 1");
    // Once it completed (or is dropped), tracking is anyone's again.
    assert!(!src.gate.is_tracking_dirty());
    src.gate.start_dirty_tracking().unwrap();
    src.gate.take_dirty().unwrap();
    src.gate.stop_dirty_tracking().unwrap();
    let m = src
        .gate
        .migrate_to(Vec::new(), MigrationOptions::new().with_key(key()))
        .unwrap();
    drop(m);
    src.gate.start_dirty_tracking().unwrap();
    src.gate.stop_dirty_tracking().unwrap();
}

/// A VM of two adjacent regions (two files, one after the other in GPA)
/// whose boundary is not 1 MiB-aligned: a dirty run across it, over
/// holes and data, must go as records inside one region each.
#[test]
fn a_dirty_run_across_two_adjacent_regions_migrates() {
    let test = "migration: two adjacent regions";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let two = |vm: &Vm| {
        let a = gmem::create_memory(
            gmem::MemoryOptions::new(BackingKind::Memfd, MIB + 8 * P),
            Some(vm),
        )
        .unwrap();
        let b = gmem::create_memory(gmem::MemoryOptions::new(BackingKind::Memfd, MIB), Some(vm))
            .unwrap();
        let ba = vm
            .bind(&a, gmem::SlotRequest::new(0, 0, MIB + 8 * P))
            .unwrap();
        let bb = vm
            .bind(&b, gmem::SlotRequest::new(MIB + 8 * P, 0, MIB))
            .unwrap();
        let gate = Gatekeeper::new(vm, vec![ba, bb], GateOptions::default()).unwrap();
        (gate, a, b)
    };
    let (vm_s, vm_d) = (Vm::new().unwrap(), Vm::new().unwrap());
    let (src, _a, _b) = two(&vm_s);
    let (dst, _c, _d) = two(&vm_d);
    let edge = MIB + 8 * P;
    src.fill(0, 2 * MIB, 0x61).unwrap();
    let m = migrate_over_socket(&src, &dst, Some(key()), &|g| {
        // Across the boundary: holes on both sides, then data across it.
        g.discard(edge - 2 * P, 4 * P).unwrap();
        g.write(edge - 0x10, b"across the edge of two regions")
            .unwrap();
        g.discard(edge + 4 * P, 2 * P).unwrap();
        g.discard(edge - 6 * P, 2 * P).unwrap();
        g.write(edge - 6 * P, &[0x62; 3 * P as usize]).unwrap();
        g.discard(edge + P, P).unwrap();
        // A hole across the boundary.
        g.discard(edge - P, 2 * P).unwrap();
    });
    let dest = m.dest.map_err(|e| e.to_string());
    assert!(dest.is_ok(), "the destination refused: {dest:?}");
    m.source.unwrap();
    assert_eq!(content(&dst), content(&src));
}

/// The source never sends more rounds than a destination takes
/// (`MAX_ROUNDS`): a round past it is refused before anything is sent, the
/// migration stays usable, and `precopy` stops there whatever
/// `max_rounds` says.
#[test]
fn the_source_keeps_to_the_destinations_round_limit() {
    let test = "migration: MAX_ROUNDS at the source";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let src = source(BackingKind::Memfd, SMALL, true);
    // Rounds one at a time, each with a page dirtied.
    let mut wire = Vec::new();
    let mut m = src
        .gate
        .migrate_to(&mut wire, MigrationOptions::new().with_key(key()))
        .unwrap();
    for n in 0..MAX_ROUNDS {
        src.gate
            .write(u64::from(n % 8) * P, &n.to_le_bytes())
            .unwrap();
        m.send_round().unwrap();
    }
    let before = m.stream_bytes();
    let e = m.send_round().unwrap_err();
    assert!(
        matches!(e, MigrateError::TooManyRounds { max } if max == MAX_ROUNDS),
        "{e}"
    );
    assert_ne!(e.errno(), 0);
    assert_eq!(m.stream_bytes(), before, "nothing sent");
    m.complete(STATE).unwrap();
    let dst = guest(BackingKind::Memfd, SMALL);
    let mut r = wire.as_slice();
    let report = Incoming::read_header(&mut r)
        .unwrap()
        .receive(&dst.gate, &mut r, Some(&key()))
        .unwrap();
    assert_eq!(report.rounds, u64::from(MAX_ROUNDS));
    assert_eq!(content(&dst.gate), content(&src.gate));

    // precopy_done() with a budget past the limit stops at it. The pages
    // written before each round (taken at its end, sent in the next)
    // alternate 10 and 8, so no two rounds in a row leave 90% of what
    // they sent (no stall) and none converges.
    let mut wire = Vec::new();
    let mut m = src
        .gate
        .migrate_to(
            &mut wire,
            MigrationOptions::new()
                .with_key(key())
                .with_max_rounds(MAX_ROUNDS + 100)
                .with_converge_bytes(0),
        )
        .unwrap();
    let mut n = 0u32;
    while !m.precopy_done() {
        for page in 0..if n.is_multiple_of(2) { 10 } else { 8 } {
            src.gate.write(page * P, &n.to_le_bytes()).unwrap();
        }
        m.send_round().unwrap();
        n += 1;
        assert!(n <= MAX_ROUNDS, "precopy_done past MAX_ROUNDS");
    }
    assert_eq!(m.rounds().len() as u32, MAX_ROUNDS);
    m.complete(STATE).unwrap();
    let dst = guest(BackingKind::Memfd, SMALL);
    let mut r = wire.as_slice();
    Incoming::read_header(&mut r)
        .unwrap()
        .receive(&dst.gate, &mut r, Some(&key()))
        .unwrap();
}
