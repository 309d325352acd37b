//! Independent attack review of the virtio devices: a hostile driver played
//! from the host (one thread the "device's vCPU", others the guest's other
//! vCPUs).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use gmem::BackingKind;
use gmem_testkit::{kvm_or_skip, on_backing};

const IN: u32 = 0;

fn here(test: &str) -> bool {
    kvm_or_skip(test) && on_backing(test, BackingKind::Memfd, 0).is_some()
}

/// The descriptor chain is read three times by virtio-blk (`whole_chain`,
/// then the reader, then the writer), from guest memory another vCPU may
/// write meanwhile. If the status descriptor is device-writable on the first
/// read and not on the third, the writer has no room: `room - 1` underflows
/// (a panic with overflow checks, in the thread holding the devices' lock).
#[test]
fn the_status_descriptor_flipped_between_reads_panics_the_device() {
    if !here("status TOCTOU") {
        return;
    }
    let disk = Disk::new("toctou", 64);
    let mut d = Driver::ready(&disk.0, false);
    // A long readable chain in an indirect table, so that the reader pass
    // between the two reads of the last descriptor takes a while.
    let table = 0x3_0000u64;
    let n = 1000u64;
    for i in 0..n {
        d.desc(table, i, HDR, 16, NEXT, (i + 1) as u16);
    }
    d.desc(table, n, STATUS, 1, WRITE, 0);
    d.header(HDR, IN, 0);
    d.desc(DESC, 0, table, (16 * (n + 1)) as u32, INDIRECT, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let gate = d.gate.clone();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let at = table + 16 * n + 12;
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                gate.write(at, &WRITE.to_le_bytes()).unwrap();
                for _ in 0..50 {
                    std::hint::spin_loop();
                }
                gate.write(at, &0u16.to_le_bytes()).unwrap();
                flips += 1;
            }
            flips
        })
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for round in 0..2_000u32 {
            if d.status() & NEEDS_RESET != 0 {
                d.start(8);
                d.desc(DESC, 0, table, (16 * (n + 1)) as u32, INDIRECT, 0);
            }
            d.publish(0);
            d.notify();
            if round % 1_000 == 0 {
                println!("round {round}");
            }
        }
    }));
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    if let Err(p) = &result {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        println!("the device panicked after {flips} flips: {msg:?}");
    }
    assert!(
        result.is_ok(),
        "a guest's descriptor write panicked the device"
    );
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

/// `DeviceMemory` bounds what a request *pins* (64 MiB), and reuses pages
/// it pinned already: 1,022 descriptors over the same 4 MiB buffer pin it
/// once, but the writer has 4 GiB of room, and virtio-blk allocates a
/// buffer of that size for an IN request (and reads the disk into it).
#[test]
fn descriptors_over_one_buffer_make_the_device_allocate_4_gib() {
    if !here("4 GiB request") {
        return;
    }
    let path = std::env::temp_dir().join(format!("gmem-big-{}.img", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(5 << 30).unwrap(); // sparse
    drop(f);
    let mut d = Driver::ready(&path, false);
    let table = 0x3_0000u64;
    let buf = 0x40_0000u64;
    let n = 1022u64;
    d.desc(table, 0, HDR, 16, NEXT, 1);
    for i in 1..=n {
        d.desc(table, i, buf, 4 << 20, WRITE | NEXT, (i + 1) as u16);
    }
    d.desc(table, n + 1, STATUS, 1, WRITE, 0);
    d.header(HDR, IN, 0);
    d.gate.write(STATUS, &[0xff]).unwrap();
    d.desc(DESC, 0, table, (16 * (n + 2)) as u32, INDIRECT, 0);
    let before = hwm_kib();
    let t = std::time::Instant::now();
    d.publish(0);
    d.notify();
    let after = hwm_kib();
    let _ = std::fs::remove_file(&path);
    println!(
        "status {}, used {}, peak RSS {} MiB -> {} MiB in {:?}",
        d.byte(STATUS),
        d.used_idx(),
        before >> 10,
        after >> 10,
        t.elapsed()
    );
    assert!(
        after - before < 256 << 10,
        "one request grew the VMM by {} MiB",
        (after - before) >> 10
    );
}

/// The view budget, as a guest reaches it: one virtio-blk read into a 4 MiB
/// buffer leaves its window open (the cache), then the guest's
/// MAP_GPA_RANGE hypercalls (what `Shared::hypercall` does: one
/// `Gatekeeper::convert` each) make every other page of it private, and each
/// conversion cuts the open window: two VMAs more each, past the budget.
#[test]
fn a_guest_splits_a_cached_window_past_the_budget() {
    if !here("guest budget") {
        return;
    }
    let disk = Disk::new("split", 8192 + 8);
    let mut d = Driver::ready(&disk.0, false);
    let buf = 0x40_0000u64;
    d.header(HDR, IN, 0);
    d.desc(DESC, 0, HDR, 16, NEXT, 1);
    d.desc(DESC, 1, buf, 4 << 20, WRITE | NEXT, 2);
    d.desc(DESC, 2, STATUS, 1, WRITE, 0);
    d.publish(0);
    d.notify();
    assert_eq!(d.byte(STATUS), 0, "the read was served");
    let before = d.gate.view_vmas();
    for i in 0..512u64 {
        d.gate
            .convert(buf + i * 0x2000 + 0x1000, 0x1000, gmem::Attribute::Private)
            .unwrap();
    }
    let (used, max) = d.gate.view_vmas();
    println!("view VMAs {before:?} -> ({used}, {max})");
    assert!(
        used <= max,
        "the guest's view costs {used} VMAs, budget {max}"
    );
}

/// `MmioTransport::read` is public: a config-space offset near 2^64 with a
/// long buffer overflows `offset as usize + i` in virtio-blk's read_config.
#[test]
fn config_read_at_a_huge_offset() {
    if !here("config offset") {
        return;
    }
    let disk = Disk::new("cfg", 8);
    let d = Driver::ready(&disk.0, false);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut buf = vec![0u8; 0x200];
        d.dev.read(u64::MAX, &mut buf);
    }));
    assert!(r.is_ok(), "a config read panicked");
}
