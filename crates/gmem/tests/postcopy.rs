//! Post-copy migration through the library, over a real Unix socket pair:
//! the destination runs (host reads here) before the source has sent the
//! pages dirtied since its last round, and every read waits for its block;
//! pushed blocks, asked-for blocks, holes and private pages arrive right;
//! and a source that dies after the switch fails the destination (its
//! gatekeeper poisoned, never a zero page served to the host).

use std::os::unix::net::UnixStream;

use gmem::migrate::{Incoming, MigrateError, MigrationOptions, POSTCOPY_RUNNING};
use gmem::{Attribute, BackingKind, GateOptions, Gatekeeper, Policy, Vm};
use gmem_testkit::{kvm_or_skip, on_backing};

mod common;
use common::{gate_on, key, read};

const MIB: u64 = 1 << 20;

fn gate(kind: BackingKind, size: u64) -> (Vm, Gatekeeper) {
    let (vm, _mem, gate) = gate_on(
        kind,
        size,
        GateOptions::new(Attribute::Shared, Policy::InPlace),
    );
    (vm, gate)
}

fn pattern(gpa: u64, len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((gpa as usize + i) as u8).wrapping_mul(31) ^ salt)
        .collect()
}

fn round_trip(kind: BackingKind, test: &str) {
    if !kvm_or_skip(test) {
        return;
    }
    let size = 16 * MIB;
    let Some(_pool) = on_backing(test, kind, 2 * size / kind.page_size() + 2) else {
        return;
    };
    let (_vm, src) = gate(kind, size);
    for gpa in (0..size).step_by(MIB as usize) {
        src.write(gpa, &pattern(gpa, 4096, 1)).unwrap();
    }
    src.write(5 * MIB, &pattern(5 * MIB, 8192, 2)).unwrap();
    src.convert(5 * MIB, 8192, Attribute::Private).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let k = key();
    let source = {
        let src = src.clone();
        let k = k.clone();
        let a2 = a.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut m = src
                .migrate_to(a, MigrationOptions::new().with_key(k))
                .unwrap();
            m.send_round().unwrap();
            // Dirtied after the round: sent only after the switch.
            src.write(3 * MIB + 4096, &pattern(3 * MIB, 4096, 3))
                .unwrap();
            src.discard(7 * MIB, 4096).unwrap();
            src.write(12 * MIB, &pattern(12 * MIB, MIB as usize, 4))
                .unwrap();
            let p = m.switch_to_postcopy(b"vcpus").unwrap();
            assert!(p.blocks() >= 3, "{p:?}");
            let mut ran = false;
            let report = p.serve(a2, || ran = true).unwrap();
            assert!(ran);
            report
        })
    };
    let (_vm2, dst) = gate(kind, size);
    let mut r = b.try_clone().unwrap();
    let incoming = Incoming::read_header(&mut r).unwrap();
    let got = incoming
        .receive_with_postcopy(&dst, r, b, Some(&k))
        .unwrap();
    assert_eq!(got.report.state, b"vcpus");
    let post = got.postcopy.expect("the source switched to post-copy");
    post.answer_running().unwrap();
    let restore = post.into_restore();
    // Host reads wait for their blocks.
    assert_eq!(
        read(&dst, 12 * MIB, MIB as usize),
        pattern(12 * MIB, MIB as usize, 4)
    );
    assert_eq!(read(&dst, 3 * MIB + 4096, 4096), pattern(3 * MIB, 4096, 3));
    assert_eq!(read(&dst, 7 * MIB, 4096), vec![0; 4096]);
    assert_eq!(read(&dst, 9 * MIB, 4096), pattern(9 * MIB, 4096, 1));
    assert_eq!(dst.attribute(5 * MIB), Some(Attribute::Private));
    let progress = restore.finish().unwrap();
    assert_eq!(progress.pending, 0);
    let report = source.join().unwrap();
    assert!(report.blocks >= 3);
    // Private bytes stay out of the host's reach there too.
    assert!(dst.read(5 * MIB, &mut [0u8; 16]).is_err());
}

#[test]
fn post_copy_delivers_what_was_dirtied_after_the_switch_on_memfd() {
    round_trip(BackingKind::Memfd, "postcopy_memfd");
}

#[test]
fn post_copy_delivers_what_was_dirtied_after_the_switch_on_hugetlb_2m() {
    round_trip(BackingKind::Hugetlb2M, "postcopy_hugetlb_2m");
}

#[test]
fn a_source_lost_after_the_switch_fails_the_destination_cleanly() {
    let test = "postcopy_source_lost";
    if !kvm_or_skip(test) {
        return;
    }
    let size = 8 * MIB;
    let (_vm, src) = gate(BackingKind::Memfd, size);
    src.write(0, &pattern(0, 4096, 1)).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let source = {
        let src = src.clone();
        std::thread::spawn(move || {
            let mut m = src.migrate_to(a, MigrationOptions::new()).unwrap();
            m.send_round().unwrap();
            src.write(2 * MIB, &pattern(2 * MIB, 4096, 5)).unwrap();
            // Switch, then die without serving: the connection closes.
            drop(m.switch_to_postcopy(b"x").unwrap());
        })
    };
    let (_vm2, dst) = gate(BackingKind::Memfd, size);
    let mut r = b.try_clone().unwrap();
    let incoming = Incoming::read_header(&mut r).unwrap();
    let got = incoming.receive_with_postcopy(&dst, r, b, None).unwrap();
    source.join().unwrap();
    let post = got.postcopy.unwrap();
    // The source is gone (the answer cannot be told, or no go-ahead
    // comes): the destination must not run the guest.
    assert!(post.answer_running().is_err());
    let restore = post.into_restore();
    // The block never comes: the read is refused, never zero.
    let e = dst.read(2 * MIB, &mut [0u8; 8]).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(restore.failure().is_some());
    assert!(dst.poisoned().is_some());
    drop(restore);
    // The source is untouched and can migrate again.
    assert_eq!(read(&src, 2 * MIB, 4096), pattern(2 * MIB, 4096, 5));
    let again = src.migrate_to(Vec::new(), MigrationOptions::new());
    assert!(
        again.is_ok(),
        "{:?}",
        again.err().map(|e: MigrateError| e.to_string())
    );
}

#[test]
fn a_switch_with_nothing_left_to_send_is_still_post_copy() {
    let test = "postcopy_nothing_left";
    if !kvm_or_skip(test) {
        return;
    }
    let (_vm, src) = gate(BackingKind::Memfd, 4 * MIB);
    src.write(0, &pattern(0, 4096, 1)).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let source = {
        let src = src.clone();
        let a2 = a.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut m = src.migrate_to(a, MigrationOptions::new()).unwrap();
            m.send_round().unwrap();
            let p = m.switch_to_postcopy(b"idle").unwrap();
            assert_eq!(p.blocks(), 0);
            let mut ran = false;
            p.serve(a2, || ran = true).unwrap();
            assert!(ran, "the destination's answer was not heard");
        })
    };
    let (_vm2, dst) = gate(BackingKind::Memfd, 4 * MIB);
    let mut r = b.try_clone().unwrap();
    let incoming = Incoming::read_header(&mut r).unwrap();
    let got = incoming.receive_with_postcopy(&dst, r, b, None).unwrap();
    let post = got.postcopy.expect("a post-copy switch, with no block");
    post.answer_running().unwrap();
    post.into_restore().finish().unwrap();
    source.join().unwrap();
    assert_eq!(read(&dst, 0, 4096), pattern(0, 4096, 1));
}

#[test]
fn post_copy_onto_larger_pages_than_the_sources_is_refused_and_the_source_resumes() {
    let test = "postcopy_larger_pages";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(_pool) = on_backing(test, BackingKind::Hugetlb2M, 4) else {
        return;
    };
    let (_vm, src) = gate(BackingKind::Memfd, 4 * MIB);
    src.write(0, &pattern(0, 4096, 1)).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let source = {
        let src = src.clone();
        let a2 = a.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut m = src.migrate_to(a, MigrationOptions::new()).unwrap();
            m.send_round().unwrap();
            src.write(MIB, &pattern(MIB, 4096, 2)).unwrap();
            let p = m.switch_to_postcopy(b"x").unwrap();
            let mut ran = false;
            let e = p.serve(a2, || ran = true).unwrap_err();
            assert!(!ran);
            assert!(
                matches!(
                    e,
                    MigrateError::Postcopy {
                        took_over: false,
                        ..
                    }
                ),
                "{e}"
            );
        })
    };
    let (_vm2, dst) = gate(BackingKind::Hugetlb2M, 4 * MIB);
    let mut r = b.try_clone().unwrap();
    let incoming = Incoming::read_header(&mut r).unwrap();
    let e = incoming
        .receive_with_postcopy(&dst, r, b, None)
        .unwrap_err();
    assert!(e.to_string().contains("pages no larger"), "{e}");
    assert!(dst.poisoned().is_some());
    source.join().unwrap();
    // The source is whole: it resumes.
    assert_eq!(read(&src, MIB, 4096), pattern(MIB, 4096, 2));
}

#[test]
fn a_destination_runs_only_after_the_source_s_go_ahead() {
    // The source hears the destination is ready and is gone before its
    // go-ahead: the destination must not run the guest (the source may
    // have resumed it; two copies must never run).
    let test = "postcopy_no_go_ahead";
    if !kvm_or_skip(test) {
        return;
    }
    let size = 8 * MIB;
    let (_vm, src) = gate(BackingKind::Memfd, size);
    src.write(0, &pattern(0, 4096, 1)).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let source = {
        let src = src.clone();
        let mut back = a.try_clone().unwrap();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut m = src.migrate_to(a, MigrationOptions::new()).unwrap();
            m.send_round().unwrap();
            src.write(2 * MIB, &pattern(2 * MIB, 4096, 5)).unwrap();
            let p = m.switch_to_postcopy(b"x").unwrap();
            let mut word = [0u8; 8];
            back.read_exact(&mut word).unwrap();
            assert_eq!(u64::from_le_bytes(word), POSTCOPY_RUNNING);
            drop(p);
        })
    };
    let (_vm2, dst) = gate(BackingKind::Memfd, size);
    let mut r = b.try_clone().unwrap();
    let incoming = Incoming::read_header(&mut r).unwrap();
    let got = incoming.receive_with_postcopy(&dst, r, b, None).unwrap();
    let post = got.postcopy.unwrap();
    let e = post.answer_running().unwrap_err();
    assert!(e.to_string().contains("go-ahead"), "{e}");
    source.join().unwrap();
    post.answer_failed();
}
