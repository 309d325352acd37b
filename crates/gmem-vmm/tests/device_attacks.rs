//! A guest's input through a device costs its VMM bounded time and memory,
//! and never a crash: the attacks review and attack guests found against
//! the virtio-mmio transport and virtio-blk, played from the host as a
//! hostile driver (items 9 to 16 of the issue "no way in").

mod common;

use common::*;
use gmem::{Attribute, BackingKind};
use gmem_testkit::{kvm_or_skip, on_backing};

const IN: u32 = 0; // VIRTIO_BLK_T_IN

fn here(test: &str) -> bool {
    kvm_or_skip(test) && on_backing(test, BackingKind::Memfd, 0).is_some()
}

/// Item 9: An 8-byte read of a register panicked the vCPU thread; every width but
/// 4 reads zero.
#[test]
fn registers_read_at_any_width() {
    if !here("9: widths") {
        return;
    }
    let disk = Disk::new("widths", 8);
    let d = Driver::ready(&disk.0, false);
    for len in [1usize, 2, 3, 8, 16] {
        let mut b = vec![0xffu8; len];
        d.dev.read(0, &mut b);
        assert!(b.iter().all(|&x| x == 0), "{len}-byte read: {b:?}");
    }
    assert_eq!(d.r(0), 0x7472_6976, "4-byte reads still work");
}

/// Item 14: Queue sizes of 0, past the maximum, not a power of two, or wider
/// than 16 bits were logged and ignored, and the queue went ready anyway.
/// Now the queue does not become ready, and the device needs a reset.
#[test]
fn invalid_queue_sizes_never_go_ready() {
    if !here("14: queue sizes") {
        return;
    }
    let disk = Disk::new("qsize", 8);
    for size in [0u32, 256, 7, 0x1_0008] {
        let mut d = Driver::blk(&disk.0, false);
        d.negotiate();
        d.queue(size);
        assert_eq!(d.r(0x44), 0, "size {size:#x}: QueueReady");
        assert_ne!(d.status() & NEEDS_RESET, 0, "size {size:#x}");
        // A reset and a valid size work.
        d.negotiate();
        d.queue(8);
        assert_eq!(d.r(0x44), 1, "after a reset, size 8");
    }
    // A misaligned ring is refused the same way.
    let mut d = Driver::blk(&disk.0, false);
    d.negotiate();
    d.w(0x38, 8);
    d.w(0x80, (DESC + 8) as u32);
    d.w(0x90, AVAIL as u32);
    d.w(0xa0, USED as u32);
    d.w(0x44, 1);
    assert_eq!(d.r(0x44), 0, "a descriptor table off its 16-byte alignment");
}

/// Item 15: DRIVER_OK without FEATURES_OK was accepted and requests served.
#[test]
fn driver_ok_needs_features_ok() {
    if !here("15: status order") {
        return;
    }
    let disk = Disk::new("status", 8);
    let mut d = Driver::blk(&disk.0, false);
    d.w(0x70, ACKNOWLEDGE | DRIVER);
    d.queue(8);
    d.w(0x70, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    let st = d.status();
    assert_eq!(st & DRIVER_OK, 0, "{st:#x}");
    assert_ne!(st & NEEDS_RESET, 0, "{st:#x}");
    d.header(HDR, IN, 0);
    d.desc(DESC, 0, HDR, 16, NEXT, 1);
    d.desc(DESC, 1, STATUS, 1, WRITE, 0);
    d.publish(0);
    d.notify();
    assert_eq!(d.used_idx(), 0, "a request was served");
}

/// Item 10: The status byte's address was `addr + len - 1` unchecked: a
/// descriptor near 2^64 wrapped to a byte no descriptor names, and the
/// device wrote IOERR there.
#[test]
fn a_status_byte_that_wraps_is_a_device_error() {
    if !here("10: wrapping status") {
        return;
    }
    let disk = Disk::new("wrap", 8);
    let mut d = Driver::ready(&disk.0, false);
    d.gate.write(0xfff, &[0xaa]).unwrap();
    d.header(HDR, IN, 0);
    d.desc(DESC, 0, HDR, 16, NEXT, 1);
    d.desc(DESC, 1, u64::MAX - 0xfff, 0x2000, WRITE, 0);
    d.publish(0);
    d.notify();
    assert_eq!(d.byte(0xfff), 0xaa, "the wrapped address was written");
    assert_ne!(d.status() & NEEDS_RESET, 0);
}

/// Item 13: A chain cut short (a descriptor it names unreadable, a bad `next`)
/// was served as if whole: its last descriptor taken for the status byte,
/// and OK written into what was a data buffer.
#[test]
fn a_chain_cut_short_is_a_device_error() {
    if !here("13: truncated chains") {
        return;
    }
    let disk = Disk::new("cut", 8);
    // A `next` past the queue.
    let mut d = Driver::ready(&disk.0, false);
    d.gate.fill(DATA, 512, 0xee).unwrap();
    d.header(HDR, IN, 0);
    d.desc(DESC, 0, HDR, 16, NEXT, 1);
    d.desc(DESC, 1, DATA, 512, WRITE | NEXT, 9);
    d.publish(0);
    d.notify();
    assert_ne!(d.status() & NEEDS_RESET, 0, "bad next");
    assert_eq!(d.byte(DATA + 511), 0xee, "OK was written into the data");
    // The next descriptor in private memory: an indirect table there.
    let mut d = Driver::ready(&disk.0, false);
    let table = 0x3_0000;
    d.desc(table, 0, HDR, 16, NEXT, 1);
    d.desc(table, 1, DATA, 512, WRITE | NEXT, 2);
    d.desc(table, 2, STATUS, 1, WRITE, 0);
    d.gate.fill(DATA, 512, 0xee).unwrap();
    d.gate.convert(table, 0x1000, Attribute::Private).unwrap();
    d.header(HDR, IN, 0);
    d.desc(DESC, 0, table, 48, INDIRECT, 0);
    d.publish(0);
    d.notify();
    assert_ne!(d.status() & NEEDS_RESET, 0, "private indirect table");
    assert_eq!(d.byte(DATA + 511), 0xee);
    let (_, refused) = d.dev.refusals();
    assert!(refused >= 1, "the refusal was not counted");
}

/// Item 11, 12: One notification with a 65,535-descriptor chain kept the VMM
/// busy for minutes on hugetlb (pins quadratic in live pins), and requests
/// sharing a 1 MiB descriptor table took it to GiBs of RSS (a pin per
/// descriptor read, kept until the notification ended). A request now has
/// at most 1,024 descriptors, pins each page once, and gives its pins back
/// when it ends.
#[test]
fn long_chains_and_shared_tables_cost_bounded_memory() {
    let test = "11, 12: long chains";
    if !kvm_or_skip(test) {
        return;
    }
    for backing in [BackingKind::Memfd, BackingKind::Hugetlb2M] {
        let Some(_on) = on_backing(test, backing, RAM / backing.page_size()) else {
            continue;
        };
        let disk = Disk::new("chains", 64);
        let mut d = Driver::blk_on(backing, &disk.0, false);
        d.start(128);
        // One 1 MiB indirect table of 65,535 descriptors, each the same
        // 512-byte data buffer, chained.
        let table = 0x10_0000;
        let n = 65_535u64;
        let mut raw = Vec::with_capacity(16 * n as usize);
        for i in 0..n {
            let next = if i + 1 < n { (i + 1) as u16 } else { 0 };
            let flags = if i + 1 < n { NEXT } else { 0 } | WRITE;
            raw.extend_from_slice(&DATA.to_le_bytes());
            raw.extend_from_slice(&512u32.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
            raw.extend_from_slice(&next.to_le_bytes());
        }
        d.gate.write(table, &raw).unwrap();
        let rss = rss_kib();
        // 128 requests, every one over the same table.
        for slot in 0..128u64 {
            d.desc(DESC, slot, table, (16 * n) as u32, INDIRECT, 0);
        }
        for slot in 0..128 {
            d.publish(slot);
        }
        d.notify();
        assert_ne!(
            d.status() & NEEDS_RESET,
            0,
            "{backing}: a 65,535-descriptor chain"
        );
        assert_eq!(
            d.gate.view_windows().1,
            0,
            "{backing}: pins outlived the request"
        );
        let grown = rss_kib().saturating_sub(rss);
        assert!(grown < 64 << 10, "{backing}: RSS grew {grown} KiB");
    }
}

/// Item 12: 128 valid requests of 40 scattered pages each ran out of view
/// windows after request 102 (pins held per notification): with pins per
/// request, all 128 are served.
#[test]
fn many_scattered_requests_in_one_notification_are_all_served() {
    if !here("12: many requests") {
        return;
    }
    let disk = Disk::new("many", 64);
    let mut d = Driver::blk(&disk.0, false);
    d.start(128);
    for req in 0..128u64 {
        let table = 0x40_0000 + req * 0x1000;
        d.desc(table, 0, HDR, 16, NEXT, 1);
        for i in 0..40u64 {
            // Every other page: 40 isolated windows a request.
            d.desc(
                table,
                1 + i,
                0x10_0000 + i * 0x2000,
                512,
                WRITE | NEXT,
                (2 + i) as u16,
            );
        }
        d.desc(table, 41, STATUS + req, 1, WRITE, 0);
        d.desc(DESC, req, table, 42 * 16, INDIRECT, 0);
        d.gate.write(STATUS + req, &[0xff]).unwrap();
    }
    d.header(HDR, IN, 0);
    for req in 0..128 {
        d.publish(req);
    }
    d.notify();
    assert_eq!(d.status() & NEEDS_RESET, 0);
    assert_eq!(d.used_idx(), 128);
    for req in 0..128 {
        assert_eq!(d.byte(STATUS + req), 0, "request {req}");
    }
}

/// Item 16: Ranges that overflow were refused but not counted; the ABI counts
/// every refusal.
#[test]
fn overflowing_buffers_are_refused_and_counted() {
    if !here("16: overflow counted") {
        return;
    }
    let disk = Disk::new("overflow", 8);
    let mut d = Driver::ready(&disk.0, false);
    d.header(HDR, IN, 0);
    d.gate.write(STATUS, &[0xff]).unwrap();
    d.desc(DESC, 0, HDR, 16, NEXT, 1);
    d.desc(DESC, 1, u64::MAX - 0xff, 512, WRITE | NEXT, 2);
    d.desc(DESC, 2, STATUS, 1, WRITE, 0);
    d.publish(0);
    d.notify();
    assert_eq!(d.byte(STATUS), 1, "IOERR");
    let (_, refused) = d.dev.refusals();
    assert!(refused >= 1, "the overflow was not counted");
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 4
}
