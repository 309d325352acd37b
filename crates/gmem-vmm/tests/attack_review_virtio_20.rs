//! Attack review of issue #20's virtio-blk fast path (the device reads and
//! writes pinned guest slices directly, one walk of each chain, fewer pins:
//! the status byte under the request's own pins or after their release,
//! the avail index read with the first request's memory): a hostile driver
//! played from the host, other threads standing in for the guest's other
//! vCPUs. Every attack checks that no private byte moved (the private page
//! read back after converting it shared again: the rig's policy keeps
//! content), that the refusal was counted, and that the device serves a
//! clean request afterwards.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use gmem::{Attribute, BackingKind};
use gmem_testkit::{kvm_or_skip, on_backing};

const IN: u32 = 0;
const OUT: u32 = 1;
const OK: u8 = 0;
const IOERR: u8 = 1;

/// A private page of the rig, filled with [`SECRET`] before it went private.
const PRIV: u64 = 0x5_0000;
const SECRET: u8 = 0x5e;
/// The disk's content, for reads.
const DISK_BYTE: u8 = 0xd1;

fn here(test: &str) -> bool {
    kvm_or_skip(test) && on_backing(test, BackingKind::Memfd, 0).is_some()
}

/// Runs `body` on memfd and on hugetlb-2m (the pool raised for the rig's
/// RAM and put back), where this host has them.
fn on_each_backing(test: &str, body: fn(BackingKind)) {
    if !kvm_or_skip(test) {
        return;
    }
    for backing in [BackingKind::Memfd, BackingKind::Hugetlb2M] {
        let Some(_on) = on_backing(test, backing, RAM / backing.page_size()) else {
            continue;
        };
        body(backing);
    }
}

/// A disk of `sectors` sectors of `byte`.
fn disk_of(name: &str, sectors: usize, byte: u8) -> Disk {
    let d = Disk::new(name, sectors);
    std::fs::write(&d.0, vec![byte; sectors * 512]).unwrap();
    d
}

/// Makes `[PRIV, PRIV + 4 KiB)` private, holding [`SECRET`].
fn make_private(d: &Driver) {
    d.gate.fill(PRIV, 0x1000, SECRET).unwrap();
    d.gate.convert(PRIV, 0x1000, Attribute::Private).unwrap();
}

/// The private page's content is still [`SECRET`] (converted shared to
/// read it, then private again).
fn secret_intact(d: &Driver) -> bool {
    d.gate.convert(PRIV, 0x1000, Attribute::Shared).unwrap();
    let mut page = vec![0u8; 0x1000];
    d.gate.read(PRIV, &mut page).unwrap();
    d.gate.convert(PRIV, 0x1000, Attribute::Private).unwrap();
    page.iter().all(|&b| b == SECRET)
}

fn refused(d: &Driver) -> u64 {
    d.dev.refusals().1
}

/// A clean read of sector 0 into DATA is served OK (the device lives on).
fn clean_read_works(d: &mut Driver) -> bool {
    if d.status() & NEEDS_RESET != 0 {
        let q = u32::from(d.qsize);
        d.start(q);
        d.gate.write(AVAIL + 2, &0u16.to_le_bytes()).unwrap();
        d.gate.write(USED + 2, &0u16.to_le_bytes()).unwrap();
    }
    d.header(HDR, IN, 0);
    d.gate.write(STATUS, &[0xff]).unwrap();
    d.desc(DESC, 0, HDR, 16, NEXT, 1);
    d.desc(DESC, 1, DATA, 512, WRITE | NEXT, 2);
    d.desc(DESC, 2, STATUS, 1, WRITE, 0);
    let used = d.used_idx();
    d.publish(0);
    d.notify();
    d.used_idx() == used.wrapping_add(1) && d.byte(STATUS) == OK
}

/// A buffer in private memory, whole or in part, at each edge of the
/// private page (the first byte, the last byte, straddling either way,
/// around 2^64), as the data of a read (the device would write it) and of
/// a write (it would read it onto the disk), and the header there: each is
/// IOERR, counted, and no byte of the private page moves either way.
#[test]
fn private_buffers_at_every_edge_are_refused_whole() {
    on_each_backing("#20 private edges", private_edges);
}

fn private_edges(backing: BackingKind) {
    let disk = disk_of(&format!("edges20-{backing}"), 64, DISK_BYTE);
    let mut d = Driver::blk_on(backing, &disk.0, false);
    d.start(8);
    make_private(&d);
    let cases: [(&str, u64, u32); 7] = [
        ("wholly private", PRIV, 512),
        ("the whole page", PRIV, 0x1000),
        ("shared into its first byte", PRIV - 511, 512),
        ("shared into its first 256 bytes", PRIV - 256, 512),
        ("its last byte onward", PRIV + 0xfff, 512),
        ("its last 256 bytes onward", PRIV + 0xf00, 512),
        ("over the whole page and past it", PRIV - 0x1000, 0x3000),
    ];
    for (kind, what) in [(IN, "read"), (OUT, "write")] {
        for (name, addr, len) in cases {
            let before = refused(&d);
            d.header(HDR, kind, 0);
            d.gate.write(STATUS, &[0xff]).unwrap();
            let flags = if kind == IN { WRITE } else { 0 };
            d.desc(DESC, 0, HDR, 16, NEXT, 1);
            d.desc(DESC, 1, addr, len, flags | NEXT, 2);
            d.desc(DESC, 2, STATUS, 1, WRITE, 0);
            d.publish(0);
            d.notify();
            assert_eq!(d.status() & NEEDS_RESET, 0, "{what}, {name}");
            assert_eq!(d.byte(STATUS), IOERR, "{what}, {name}");
            assert!(refused(&d) > before, "{what}, {name}: not counted");
            assert!(secret_intact(&d), "{what}, {name}: a private byte changed");
        }
    }
    // The header private (and straddling into private).
    for (name, at) in [("private header", PRIV), ("header into private", PRIV - 8)] {
        let before = refused(&d);
        d.gate.write(STATUS, &[0xff]).unwrap();
        d.desc(DESC, 0, at, 16, NEXT, 1);
        d.desc(DESC, 1, DATA, 512, WRITE | NEXT, 2);
        d.desc(DESC, 2, STATUS, 1, WRITE, 0);
        d.publish(0);
        d.notify();
        assert_eq!(d.byte(STATUS), IOERR, "{name}");
        assert!(refused(&d) > before, "{name}: not counted");
    }
    // A wrapping data buffer (2^64 - 256, 512 bytes).
    let before = refused(&d);
    d.header(HDR, IN, 0);
    d.gate.write(STATUS, &[0xff]).unwrap();
    d.desc(DESC, 0, HDR, 16, NEXT, 1);
    d.desc(DESC, 1, u64::MAX - 255, 512, WRITE | NEXT, 2);
    d.desc(DESC, 2, STATUS, 1, WRITE, 0);
    d.publish(0);
    d.notify();
    assert_eq!(d.byte(STATUS), IOERR, "wrapping data");
    assert!(refused(&d) > before, "wrapping data: not counted");
    // The status byte private, or its descriptor straddling into private
    // (the last byte private): nothing to answer with, so a device error;
    // the private byte unchanged.
    for (name, at, len) in [
        ("private status", PRIV + 7, 1u32),
        ("status into private", PRIV - 4, 8),
    ] {
        let before = refused(&d);
        d.header(HDR, IN, 0);
        d.desc(DESC, 0, HDR, 16, NEXT, 1);
        d.desc(DESC, 1, DATA, 512, WRITE | NEXT, 2);
        d.desc(DESC, 2, at, len, WRITE, 0);
        d.publish(0);
        d.notify();
        assert_ne!(d.status() & NEEDS_RESET, 0, "{name}");
        assert!(refused(&d) > before, "{name}: not counted");
        assert!(secret_intact(&d), "{name}: a private byte changed");
        assert!(clean_read_works(&mut d), "after {name}");
    }
    // Nothing private reached the disk (it holds only DISK_BYTE).
    let image = std::fs::read(&disk.0).unwrap();
    assert!(
        image.iter().all(|&b| b == DISK_BYTE),
        "a private byte reached the disk"
    );
    assert!(clean_read_works(&mut d));
    assert!(d.gate.pins().is_empty(), "pins outlived the requests");
}

/// Descriptors of length 0 (one at a private address) move nothing; a
/// status descriptor of length 0 or device-readable, and a buffer of
/// u32::MAX bytes, are device errors; nothing is written.
#[test]
fn degenerate_lengths_and_a_read_only_status() {
    if !here("#20 lengths") {
        return;
    }
    let disk = disk_of("len20", 64, DISK_BYTE);
    let mut d = Driver::ready(&disk.0, false);
    make_private(&d);
    // A zero-length data descriptor into private memory between two real
    // ones: the read is served from the others, the private page untouched.
    d.header(HDR, IN, 0);
    d.gate.fill(DATA, 1024, 0).unwrap();
    d.gate.write(STATUS, &[0xff]).unwrap();
    d.desc(DESC, 0, HDR, 16, NEXT, 1);
    d.desc(DESC, 1, DATA, 512, WRITE | NEXT, 2);
    d.desc(DESC, 2, PRIV, 0, WRITE | NEXT, 3);
    d.desc(DESC, 3, DATA + 512, 512, WRITE | NEXT, 4);
    d.desc(DESC, 4, STATUS, 1, WRITE, 0);
    d.publish(0);
    d.notify();
    let st = d.byte(STATUS);
    println!("zero-length private descriptor: status {st}");
    assert!(st == OK || st == IOERR);
    assert!(secret_intact(&d));
    // The status descriptor of length 0, device-readable, u32::MAX long.
    for (name, len, flags) in [
        ("status of length 0", 0u32, WRITE),
        ("read-only status", 1, 0),
        ("status of u32::MAX bytes", u32::MAX, WRITE),
    ] {
        d.header(HDR, IN, 0);
        d.gate.write(STATUS, &[0xff]).unwrap();
        d.desc(DESC, 0, HDR, 16, NEXT, 1);
        d.desc(DESC, 1, STATUS, len, flags, 0);
        d.publish(0);
        d.notify();
        assert_ne!(d.status() & NEEDS_RESET, 0, "{name}");
        assert_eq!(d.byte(STATUS), 0xff, "{name}: written");
        assert!(clean_read_works(&mut d), "after {name}");
    }
    // A data buffer of u32::MAX bytes.
    d.header(HDR, IN, 0);
    d.gate.write(STATUS, &[0xff]).unwrap();
    d.desc(DESC, 0, HDR, 16, NEXT, 1);
    d.desc(DESC, 1, DATA, u32::MAX, WRITE | NEXT, 2);
    d.desc(DESC, 2, STATUS, 1, WRITE, 0);
    d.publish(0);
    d.notify();
    assert_ne!(d.status() & NEEDS_RESET, 0, "u32::MAX data");
    assert_eq!(d.byte(STATUS), 0xff);
    assert!(clean_read_works(&mut d));
}

/// Chains that loop, heads past the queue, avail indexes that jump: device
/// errors, bounded, and the device serves again after a reset.
#[test]
fn loops_and_jumping_avail_indexes() {
    if !here("#20 loops") {
        return;
    }
    let disk = disk_of("loop20", 64, DISK_BYTE);
    let mut d = Driver::ready(&disk.0, false);
    // 0 -> 1 -> 0.
    d.header(HDR, IN, 0);
    d.desc(DESC, 0, HDR, 16, NEXT, 1);
    d.desc(DESC, 1, DATA, 512, WRITE | NEXT, 0);
    d.publish(0);
    d.notify();
    assert_ne!(d.status() & NEEDS_RESET, 0, "a loop");
    assert!(clean_read_works(&mut d));
    // A descriptor naming itself.
    d.desc(DESC, 0, HDR, 16, NEXT, 0);
    d.publish(0);
    d.notify();
    assert_ne!(d.status() & NEEDS_RESET, 0, "a self loop");
    assert!(clean_read_works(&mut d));
    // A head past the queue.
    d.publish(200);
    d.notify();
    assert_ne!(d.status() & NEEDS_RESET, 0, "head 200 of 8");
    assert!(clean_read_works(&mut d));
    // Avail index jumps: by 2^16 - 1, by a queue and one; by exactly a
    // queue (served: eight chains over whatever the ring holds).
    for jump in [u16::MAX, 9, 8] {
        d.desc(DESC, 0, HDR, 16, NEXT, 1);
        d.desc(DESC, 1, DATA, 512, WRITE | NEXT, 2);
        d.desc(DESC, 2, STATUS, 1, WRITE, 0);
        for slot in 0..8u64 {
            d.gate
                .write(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes())
                .unwrap();
        }
        let idx = d.next.wrapping_add(jump);
        d.gate.write(AVAIL + 2, &idx.to_le_bytes()).unwrap();
        let t = Instant::now();
        d.notify();
        println!(
            "avail index + {jump}: {:?}, status {:#x}",
            t.elapsed(),
            d.status()
        );
        if jump > 8 {
            assert_ne!(d.status() & NEEDS_RESET, 0, "+{jump}");
            d.gate.write(AVAIL + 2, &d.next.to_le_bytes()).unwrap();
        } else {
            assert_eq!(d.status() & NEEDS_RESET, 0, "+{jump}");
            d.next = idx;
        }
        assert!(clean_read_works(&mut d), "after +{jump}");
    }
}

/// Requests past the disk's end, sectors whose byte offset overflows, a
/// write to a read-only disk, a read shorter than a sector, and two
/// requests in flight writing the same page: the spec's statuses, the disk
/// neither grown nor written where it may not be.
#[test]
fn disk_edges_and_overlapping_requests() {
    if !here("#20 disk edges") {
        return;
    }
    let disk = disk_of("disk20", 8, DISK_BYTE);
    let mut d = Driver::ready(&disk.0, false);
    let one = |d: &mut Driver, kind: u32, sector: u64, len: u32| -> u8 {
        d.header(HDR, kind, sector);
        d.gate.write(STATUS, &[0xff]).unwrap();
        let flags = if kind == IN { WRITE } else { 0 };
        d.desc(DESC, 0, HDR, 16, NEXT, 1);
        d.desc(DESC, 1, DATA, len, flags | NEXT, 2);
        d.desc(DESC, 2, STATUS, 1, WRITE, 0);
        d.publish(0);
        d.notify();
        assert_eq!(d.status() & NEEDS_RESET, 0);
        d.byte(STATUS)
    };
    for kind in [IN, OUT] {
        assert_eq!(one(&mut d, kind, 8, 512), IOERR, "{kind}: at the end");
        assert_eq!(one(&mut d, kind, 7, 1024), IOERR, "{kind}: across the end");
        assert_eq!(
            one(&mut d, kind, u64::MAX / 512 + 1, 512),
            IOERR,
            "{kind}: overflow"
        );
        assert_eq!(
            one(&mut d, kind, u64::MAX, 512),
            IOERR,
            "{kind}: sector 2^64-1"
        );
        assert_eq!(
            one(&mut d, kind, (i64::MAX as u64) / 512, 512),
            IOERR,
            "{kind}: past off_t"
        );
    }
    assert_eq!(std::fs::metadata(&disk.0).unwrap().len(), 8 * 512, "grown");
    // A read of 100 bytes: served, 100 bytes.
    d.gate.fill(DATA, 512, 0).unwrap();
    assert_eq!(one(&mut d, IN, 0, 100), OK);
    let mut got = [0u8; 101];
    d.gate.read(DATA, &mut got).unwrap();
    assert!(got[..100].iter().all(|&b| b == DISK_BYTE) && got[100] == 0);
    // Read-only: a write is IOERR and the disk unchanged.
    let mut ro = Driver::ready(&disk.0, true);
    d.gate.fill(DATA, 512, 0x77).unwrap();
    ro.gate.fill(DATA, 512, 0x77).unwrap();
    assert_eq!(one(&mut ro, OUT, 0, 512), IOERR, "read-only");
    let image = std::fs::read(&disk.0).unwrap();
    assert!(
        image.iter().all(|&b| b == DISK_BYTE),
        "a read-only disk was written"
    );
    // Two requests in flight reading into the same page, and a third
    // writing from it: served in order, all OK.
    d.header(HDR, IN, 0);
    d.header(HDR + 16, OUT, 0);
    for (slot, hdr, flags, status) in [
        (0u64, HDR, WRITE, STATUS),
        (3, HDR, WRITE, STATUS + 1),
        (6, HDR + 16, 0, STATUS + 2),
    ] {
        d.desc(DESC, slot, hdr, 16, NEXT, (slot + 1) as u16);
        d.desc(DESC, slot + 1, DATA, 4096, flags | NEXT, (slot + 2) as u16);
        d.desc(DESC, slot + 2, status, 1, WRITE, 0);
        d.gate.write(status, &[0xff]).unwrap();
    }
    d.start(16);
    for head in [0, 3, 6] {
        d.publish(head);
    }
    d.notify();
    assert_eq!(d.used_idx(), 3);
    for s in 0..3 {
        assert_eq!(d.byte(STATUS + s), OK, "request {s}");
    }
}

/// VIRTQ_DESC_F_INDIRECT, which this device does not offer
/// (`VIRTIO_F_INDIRECT_DESC`, bit 28, and a driver that accepts it does not
/// get `FEATURES_OK`): the device follows the table anyway (virtio-queue
/// walks indirect tables whatever was negotiated), as the guest ABI says
/// ("at most 1,024 descriptors, direct or indirect"). What holds: a table
/// in private memory, or one straddling into it, is a device error with
/// nothing served; a table nested in a table is too; the buffers a shared
/// table names are checked like any others.
#[test]
fn indirect_descriptors_are_followed_though_not_offered() {
    if !here("#20 indirect") {
        return;
    }
    let disk = disk_of("ind20", 64, DISK_BYTE);
    let mut d = Driver::ready(&disk.0, false);
    d.w(0x14, 0);
    assert_eq!(d.r(0x10) & (1 << 28), 0, "INDIRECT_DESC is offered");
    // A driver that accepts it is refused FEATURES_OK.
    let mut n = Driver::blk(&disk.0, false);
    n.w(0x70, ACKNOWLEDGE | DRIVER);
    n.w(0x24, 1);
    n.w(0x20, 1);
    n.w(0x24, 0);
    n.w(0x20, 1 << 28);
    n.w(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(n.status() & FEATURES_OK, 0, "INDIRECT_DESC accepted");
    make_private(&d);
    let table = 0x10_0000;
    let chain = |d: &Driver, table: u64, data: u64| {
        d.desc(table, 0, HDR, 16, NEXT, 1);
        d.desc(table, 1, data, 512, WRITE | NEXT, 2);
        d.desc(table, 2, STATUS, 1, WRITE, 0);
    };
    d.header(HDR, IN, 0);
    // Followed: a shared table, shared buffers.
    chain(&d, table, DATA);
    d.gate.fill(DATA, 512, 0).unwrap();
    d.gate.write(STATUS, &[0xff]).unwrap();
    d.desc(DESC, 0, table, 48, INDIRECT, 0);
    d.publish(0);
    d.notify();
    println!(
        "a shared indirect table: device status {:#x}, used {}, status byte {}, data[0] {:#x}",
        d.status(),
        d.used_idx(),
        d.byte(STATUS),
        d.byte(DATA)
    );
    assert_eq!((d.byte(STATUS), d.byte(DATA)), (OK, DISK_BYTE));
    // A shared table naming a private buffer: IOERR, counted.
    let before = refused(&d);
    chain(&d, table, PRIV + 0x100);
    d.desc(DESC, 0, table, 48, INDIRECT, 0);
    d.publish(0);
    d.notify();
    assert_eq!(d.byte(STATUS), IOERR, "a private buffer through a table");
    assert!(refused(&d) > before);
    assert!(secret_intact(&d));
    // The table private, or straddling into private (its last descriptor
    // there): a device error, nothing served.
    for (name, at) in [("private table", PRIV), ("table into private", PRIV - 32)] {
        d.gate.convert(PRIV, 0x1000, Attribute::Shared).unwrap();
        chain(&d, at, DATA);
        d.gate.convert(PRIV, 0x1000, Attribute::Private).unwrap();
        d.gate.fill(DATA, 512, 0).unwrap();
        d.gate.write(STATUS, &[0xff]).unwrap();
        let before = refused(&d);
        d.desc(DESC, 0, at, 48, INDIRECT, 0);
        d.publish(0);
        d.notify();
        assert_ne!(d.status() & NEEDS_RESET, 0, "{name}");
        assert_eq!((d.byte(STATUS), d.byte(DATA)), (0xff, 0), "{name}: served");
        assert!(refused(&d) > before, "{name}: not counted");
        assert!(clean_read_works(&mut d), "after {name}");
    }
    d.gate.convert(PRIV, 0x1000, Attribute::Shared).unwrap();
    d.gate.fill(PRIV, 0x1000, SECRET).unwrap();
    d.gate.convert(PRIV, 0x1000, Attribute::Private).unwrap();
    // A table in a table, and a table whose length is not whole
    // descriptors: device errors.
    for (name, len, nested) in [("nested", 48u32, true), ("ragged", 40, false)] {
        chain(&d, table, DATA);
        if nested {
            d.desc(table, 1, table + 0x1000, 48, INDIRECT | NEXT, 2);
        }
        d.gate.write(STATUS, &[0xff]).unwrap();
        d.desc(DESC, 0, table, len, INDIRECT, 0);
        d.publish(0);
        d.notify();
        assert_ne!(d.status() & NEEDS_RESET, 0, "{name}");
        assert_eq!(d.byte(STATUS), 0xff, "{name}: answered");
        assert!(clean_read_works(&mut d), "after {name}");
    }
}

/// Another vCPU flips the data page (and, in the second half, the status
/// page) between private and shared while the device serves reads into
/// it and writes from it, request after request. A device access to the
/// page while private would fault (the view is closed there) or show as a
/// pin on a private page; the conversions that succeed are the ones no
/// request held off. Also the status byte written after the pins' release
/// (a request refused for a private buffer): the guest converts the status
/// page between release and write.
#[test]
fn conversions_racing_requests_never_reach_a_private_byte() {
    on_each_backing("#20 conversion race", conversion_race);
}

fn conversion_race(backing: BackingKind) {
    let disk = disk_of(&format!("race20-{backing}"), 64, DISK_BYTE);
    let mut d = Driver::blk_on(backing, &disk.0, false);
    d.start(8);
    make_private(&d);
    let stop = Arc::new(AtomicBool::new(false));
    let privs = Arc::new(AtomicU64::new(0));
    let held_off = Arc::new(AtomicU64::new(0));
    for (round, target) in [(0, DATA), (1, STATUS & !0xfff)] {
        stop.store(false, Ordering::Relaxed);
        privs.store(0, Ordering::Relaxed);
        held_off.store(0, Ordering::Relaxed);
        let flipper = {
            let gate = d.gate.clone();
            let (stop, privs, held_off) = (stop.clone(), privs.clone(), held_off.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match gate.convert(target, 0x1000, Attribute::Private) {
                        Ok(_) => {
                            privs.fetch_add(1, Ordering::Relaxed);
                            for _ in 0..200 {
                                std::hint::spin_loop();
                            }
                            gate.convert(target, 0x1000, Attribute::Shared).unwrap();
                        }
                        Err(e) => {
                            assert_eq!(e.errno(), libc::EAGAIN, "{e}");
                            held_off.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        let (mut ok, mut ioerr, mut resets) = (0u64, 0u64, 0u64);
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < Duration::from_secs(3) {
            if d.status() & NEEDS_RESET != 0 {
                resets += 1;
                d.start(8);
            }
            let kind = if n.is_multiple_of(2) { IN } else { OUT };
            // Every third request also names the private page: refused
            // before anything moves, and its status written after release.
            let data2 = if n.is_multiple_of(3) {
                PRIV
            } else {
                DATA + 2048
            };
            let flags = if kind == IN { WRITE } else { 0 };
            d.header(HDR, kind, 0);
            if d.gate.write(STATUS, &[0xff]).is_err() {
                // The flipper has the status page private just now.
            }
            d.desc(DESC, 0, HDR, 16, NEXT, 1);
            d.desc(DESC, 1, DATA, 2048, flags | NEXT, 2);
            d.desc(DESC, 2, data2, 512, flags | NEXT, 3);
            d.desc(DESC, 3, STATUS, 1, WRITE, 0);
            d.publish(0);
            d.notify();
            let mut s = [0u8];
            match d.gate.read(STATUS, &mut s).map(|()| s[0]) {
                Ok(OK) => ok += 1,
                Ok(IOERR) => ioerr += 1,
                _ => {}
            }
            n += 1;
        }
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        println!(
            "{backing} round {round}: {n} requests ({ok} OK, {ioerr} IOERR, {resets} resets); {} conversions to private, {} held off by pins",
            privs.load(Ordering::Relaxed),
            held_off.load(Ordering::Relaxed)
        );
        assert!(privs.load(Ordering::Relaxed) > 0, "the race never happened");
        assert!(secret_intact(&d), "a private byte changed");
        assert!(d.gate.pins().is_empty(), "pins outlived the requests");
    }
    // The disk holds only its own bytes and what DATA held (zeros or the
    // disk's bytes read into it): never the secret.
    let image = std::fs::read(&disk.0).unwrap();
    assert!(!image.contains(&SECRET), "a private byte reached the disk");
    assert!(clean_read_works(&mut d));
}

fn hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// A full queue of the largest requests one notification takes: 128 reads
/// of 64 MiB each (1,022 descriptors over one 64 KiB buffer, so one pin a
/// request), and 128 requests of 1,024 descriptors on as many scattered
/// pages (the pin bound). What one exit costs the VMM.
#[test]
fn a_full_queue_of_the_largest_requests() {
    if !here("#20 one notification's work") {
        return;
    }
    // A sparse 64 MiB disk (holes read as zeroes: no disk I/O).
    let path = std::env::temp_dir().join(format!("gmem-big20-{}.img", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let mut d = Driver::blk(&path, false);
    d.start(128);
    let buf = 0x40_0000u64;
    let n = 1022u64;
    for req in 0..128u64 {
        let table = 0x10_0000 + req * 0x4000;
        d.desc(table, 0, HDR, 16, NEXT, 1);
        for i in 1..=n {
            d.desc(table, i, buf, 64 << 10, WRITE | NEXT, (i + 1) as u16);
        }
        d.desc(table, n + 1, STATUS + req, 1, WRITE, 0);
        d.desc(DESC, req, table, (16 * (n + 2)) as u32, INDIRECT, 0);
        d.gate.write(STATUS + req, &[0xff]).unwrap();
    }
    d.header(HDR, IN, 0);
    for req in 0..128 {
        d.publish(req);
    }
    let hwm = hwm_kib();
    let t = Instant::now();
    d.notify();
    let big = t.elapsed();
    let served = d.used_idx();
    let oks = (0..128).filter(|&r| d.byte(STATUS + r) == OK).count();
    println!(
        "128 x 64 MiB reads: {big:?} in one notification, {served} used, {oks} OK, peak RSS +{} KiB",
        hwm_kib().saturating_sub(hwm)
    );
    assert!(d.gate.pins().is_empty());
    // 128 requests of 1,024 descriptors over 511 isolated pages (every
    // other page of 4 MiB: no two touch), past the view budget.
    let mut d = Driver::blk(&path, false);
    d.start(128);
    let scattered = 1022u64;
    for req in 0..128u64 {
        let table = 0x10_0000 + req * 0x4000;
        d.desc(table, 0, HDR, 16, NEXT, 1);
        for i in 1..=scattered {
            d.desc(
                table,
                i,
                0x40_0000 + (i % 511) * 0x2000,
                512,
                WRITE | NEXT,
                (i + 1) as u16,
            );
        }
        d.desc(table, scattered + 1, STATUS + req, 1, WRITE, 0);
        d.desc(DESC, req, table, (16 * (scattered + 2)) as u32, INDIRECT, 0);
        d.gate.write(STATUS + req, &[0xff]).unwrap();
    }
    d.header(HDR, IN, 0);
    for req in 0..128 {
        d.publish(req);
    }
    // Another thread samples the live pins while the notification runs:
    // pins live for one request (at most DeviceMemory's 1,024).
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (gate, stop) = (d.gate.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(Ordering::Relaxed) {
                most = most.max(gate.view_windows().1);
                std::thread::yield_now();
            }
            most
        })
    };
    let t = Instant::now();
    d.notify();
    let pins = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let most_pins = sampler.join().unwrap();
    let oks = (0..128).filter(|&r| d.byte(STATUS + r) == OK).count();
    println!(
        "128 x 1,022 descriptors on 511 isolated pages: {pins:?}, {} used, {oks} OK, refusals {}, at most {most_pins} pins live",
        d.used_idx(),
        refused(&d)
    );
    assert!(
        most_pins <= 1024,
        "{most_pins} pins live in one notification"
    );
    let _ = std::fs::remove_file(&path);
    assert!(d.gate.pins().is_empty());
    assert!(
        big < Duration::from_secs(20),
        "one notification took {big:?}"
    );
    assert!(
        pins < Duration::from_secs(20),
        "one notification took {pins:?}"
    );
}
