//! How gmem's cost grows: with guest size (sparse guests of 1 GiB to
//! 1 TiB, nothing touched), and with the number of VMs in one process (each
//! with 1 GiB of sparse memory and a vCPU converting a page back and forth;
//! [`crate::processes`] has the same across processes).

use std::time::Instant;

use gmem::{
    Attribute, BackingKind, GateOptions, Gatekeeper, MemoryOptions, Policy, SlotRequest, Vm,
    create_memory,
};
use gmem_vmm::{Machine, MachineConfig};

use crate::BenchError;
use crate::guest;
use crate::plan::{Plan, micros, per_s};
use crate::raw::Subject;

/// Sparse guest sizes.
const SIZES: [(u64, &str); 4] = [
    (1 << 30, "1 GiB"),
    (16 << 30, "16 GiB"),
    (256 << 30, "256 GiB"),
    (1 << 40, "1 TiB"),
];
/// VM counts.
pub(crate) const VMS: [usize; 4] = [1, 8, 32, 64];
/// Round trips per VM in the many-VM rows.
pub(crate) const VM_ROUND_TRIPS: u32 = 100;

/// `field` (in kB) of /proc/self/status.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn vmas() -> u64 {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count() as u64)
}

fn fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// What a process costs now: RSS, page tables, VMAs, fds.
#[derive(Clone, Copy)]
pub(crate) struct Cost {
    pub(crate) rss_kib: u64,
    pub(crate) pte_kib: u64,
    pub(crate) vmas: u64,
    pub(crate) fds: u64,
}

pub(crate) fn cost() -> Cost {
    Cost {
        rss_kib: status_kib("VmRSS:"),
        pte_kib: status_kib("VmPTE:"),
        vmas: vmas(),
        fds: fds(),
    }
}

/// A sparse guest: VM, file, binding, gatekeeper, launch (all private).
struct Sparse {
    _gate: Gatekeeper,
    heap_bytes: usize,
}

fn sparse(kind: BackingKind, size: u64) -> Result<Sparse, BenchError> {
    let vm = Vm::new()?;
    let mem = create_memory(MemoryOptions::new(kind, size), Some(&vm))?;
    // One memslot holds at most 2^31 - 1 pages (8 TiB - 4 KiB): enough.
    let b = vm.bind(&mem, SlotRequest::new(0, 0, size))?;
    let gate = Gatekeeper::new(
        &vm,
        vec![b],
        GateOptions::new(Attribute::Shared, Policy::InPlace),
    )?;
    gate.launch(Attribute::Private)?;
    let heap_bytes = gate.attributes().heap_bytes();
    Ok(Sparse {
        _gate: gate,
        heap_bytes,
    })
}

fn setup_us(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let start = Instant::now();
    let s = sparse(kind, size)?;
    let d = start.elapsed();
    drop(s);
    Ok(micros(d))
}

/// The raw baseline of a sparse guest's setup: `KVM_CREATE_VM`, the file,
/// one `MAP_SHARED` mapping and the memslot, by hand.
fn setup_raw_us(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let start = Instant::now();
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let fd = crate::raw::file(kind, size, &vm)?;
    let map = crate::raw::Map::shared(std::os::fd::AsFd::as_fd(&fd), size)?;
    let gmem = kind == BackingKind::GuestMemfd;
    let region = kvm_bindings::kvm_userspace_memory_region2 {
        slot: 0,
        flags: if gmem {
            kvm_bindings::KVM_MEM_GUEST_MEMFD
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: map.as_ptr() as u64,
        guest_memfd_offset: 0,
        guest_memfd: if gmem {
            std::os::fd::AsRawFd::as_raw_fd(&fd) as u32
        } else {
            0
        },
        pad1: 0,
        pad2: [0; 14],
    };
    // SAFETY: the mapping and the file outlive the VM (dropped after it,
    // below), and the slot is the VM's only one.
    unsafe { vm.set_user_memory_region2(region) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let d = start.elapsed();
    drop(vm);
    drop((map, fd));
    Ok(micros(d))
}

/// One of a sparse guest's host costs, by `what`.
fn host_cost(kind: BackingKind, size: u64, what: &'static str) -> Result<f64, BenchError> {
    let before = cost();
    let s = sparse(kind, size)?;
    let after = cost();
    let v = match what {
        "RSS" => after.rss_kib.saturating_sub(before.rss_kib) as f64,
        "page tables" => after.pte_kib.saturating_sub(before.pte_kib) as f64,
        "VMAs" => after.vmas.saturating_sub(before.vmas) as f64,
        _ => s.heap_bytes as f64,
    };
    drop(s);
    Ok(v)
}

/// `n` machines of 1 GiB sparse memfd RAM, each converting a page back and
/// forth; the aggregate round trips per second.
fn many_vms_rate(n: usize) -> Result<f64, BenchError> {
    let mut machines = Vec::with_capacity(n);
    for _ in 0..n {
        machines.push(guest::round_trip_machine(
            BackingKind::Memfd,
            1 << 30,
            VM_ROUND_TRIPS,
        )?);
    }
    let start = Instant::now();
    let results: Vec<Result<(), BenchError>> = std::thread::scope(|s| {
        let handles: Vec<_> = machines
            .iter_mut()
            .map(|m| s.spawn(move || guest::run_to_exit(m)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BenchError::Guest("a VM thread panicked".into())))
            })
            .collect()
    });
    let d = start.elapsed();
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(per_s(n as u64 * u64::from(VM_ROUND_TRIPS), d))
}

/// The host cost per VM of `n` machines of 1 GiB sparse RAM, by `what`.
fn many_vms_cost(n: usize, what: &'static str) -> Result<f64, BenchError> {
    let before = cost();
    let mut machines = Vec::with_capacity(n);
    for _ in 0..n {
        machines.push(Machine::new(MachineConfig::new(
            BackingKind::Memfd,
            1 << 30,
        ))?);
    }
    let after = cost();
    drop(machines);
    let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / n as f64;
    Ok(match what {
        "fds" => per(after.fds, before.fds),
        "VMAs" => per(after.vmas, before.vmas),
        _ => per(after.rss_kib, before.rss_kib),
    })
}

/// The rows, for `backings` (sparse guests on the 4 KiB backings, which
/// need no memory until touched).
pub(crate) fn plans(backings: &[BackingKind]) -> Vec<Plan> {
    let mut plans = Vec::new();
    for &k in backings.iter().filter(|k| !k.is_hugetlb()) {
        for (size, name) in SIZES {
            let s = Subject::Backing(k);
            plans.push(
                Plan::new(format!("sparse guest setup, {name}"), s, "µs", false)
                    .gmem(move || setup_us(k, size))
                    .raw(move || setup_raw_us(k, size))
                    .note("create + bind + gatekeeper + launch (all private), nothing touched; raw: VM, file, one mapping, the memslot"),
            );
            for (what, unit) in [
                ("RSS", "KiB"),
                ("page tables", "KiB"),
                ("VMAs", "VMAs"),
                ("attribute map", "bytes"),
            ] {
                plans.push(
                    Plan::new(format!("sparse guest {what}, {name}"), s, unit, false)
                        .gmem(move || host_cost(k, size, what))
                        .note("what the host pays before the guest touches anything"),
                );
            }
        }
    }
    if backings.contains(&BackingKind::Memfd) {
        for n in VMS {
            let s = Subject::Backing(BackingKind::Memfd);
            plans.push(
                Plan::new(format!("{n} VMs, aggregate round trips"), s, "round trips/s", true)
                    .gmem(move || many_vms_rate(n))
                    .note("1 GiB sparse RAM each, one vCPU thread each converting a page back and forth, all at once"),
            );
            for (what, unit) in [("fds", "fds"), ("VMAs", "VMAs"), ("RSS", "KiB")] {
                plans.push(
                    Plan::new(format!("{n} VMs, {what} per VM"), s, unit, false)
                        .gmem(move || many_vms_cost(n, what))
                        .note("a machine of 1 GiB sparse RAM and one vCPU, before it runs"),
                );
            }
        }
    }
    plans
}
