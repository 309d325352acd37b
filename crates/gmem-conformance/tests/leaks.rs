//! Lifetimes and leaks: create and destroy VMs with memory on every backing,
//! dropping the VM handle, the file and the binding in every order, and count
//! open fds (`/proc/self/fd`) and resident memory (`/proc/self/statm`) before
//! and after. Nothing may grow.
//!
//! `cargo test` runs a reduced count; `GMEM_LEAK_CYCLES=10000` runs the full
//! one (run it alone: the counts are process-wide):
//!
//! ```sh
//! GMEM_LEAK_CYCLES=10000 cargo test --release -p gmem-conformance --test leaks -- --nocapture
//! ```

use std::io::Write;

use gmem::{BackingKind, FileRange, MemoryOptions, SlotRequest, Vm, create_memory};
use gmem_testkit::{kvm_or_skip, on_backing};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// One VM with one file bound and a page allocated, dropped in `order`
/// (0..6: the permutations of VM handle, file, binding). On hugetlb-1g a page
/// is allocated one cycle in 50 only: zeroing 1 GiB takes 40 ms.
fn cycle(backing: BackingKind, order: usize) {
    let vm = Vm::new().expect("VM");
    let size = backing.page_size().max(2 << 20);
    let mem = create_memory(MemoryOptions::new(backing, size), Some(&vm)).expect("memory");
    if backing != BackingKind::Hugetlb1G || order.is_multiple_of(50) {
        mem.allocate(FileRange::new(0, 4096).unwrap())
            .expect("allocate");
    }
    let binding = vm.bind(&mem, SlotRequest::new(0, 0, size)).expect("bind");
    let (mut vm, mut mem, mut binding) = (Some(vm), Some(mem), Some(binding));
    const ORDERS: [[u8; 3]; 6] = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for part in ORDERS[order % 6] {
        match part {
            0 => drop(vm.take()),
            1 => drop(mem.take()),
            _ => drop(binding.take()),
        }
    }
}

#[test]
fn no_fd_or_memory_growth_over_many_vms_in_every_drop_order() {
    if !kvm_or_skip("leaks") {
        return;
    }
    let cycles: usize = std::env::var("GMEM_LEAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    for backing in BackingKind::ALL {
        let Some(_pool) = on_backing("leaks", backing, 2) else {
            continue;
        };
        // Warm up: allocator caches, the first VM's one-time kernel work.
        for order in 0..12 {
            cycle(backing, order);
        }
        let (fds, rss) = (open_fds(), rss_bytes());
        let start = std::time::Instant::now();
        for i in 0..cycles {
            cycle(backing, i);
        }
        let (fds_after, rss_after) = (open_fds(), rss_bytes());
        let _ = writeln!(
            std::io::stderr(),
            "leaks: {backing}: {cycles} VMs in {:.1} s; fds {fds} -> {fds_after}; RSS {} KiB -> {} KiB",
            start.elapsed().as_secs_f64(),
            rss >> 10,
            rss_after >> 10
        );
        assert_eq!(fds_after, fds, "{backing}: open fds grew");
        assert!(
            rss_after <= rss + (1 << 20),
            "{backing}: RSS grew from {rss} to {rss_after} bytes over {cycles} VMs"
        );
    }
}
