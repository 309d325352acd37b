//! Host access through the gatekeeper: its safe copies beside `memcpy` over
//! the same pages, and what fragmentation costs (conversions per second and
//! the view's VMAs against the number of islands) beside `mprotect` islands,
//! the mechanism a per-island host view would need.

use std::sync::Arc;

use gmem::{
    Attribute, BackingKind, GateOptions, Gatekeeper, GmemFlags, MemoryOptions, RestrictedMemory,
    SlotRequest, Vm, create_memory,
};
use rustix::mm::MprotectFlags;

use crate::BenchError;
use crate::plan::{PAGE, Plan, gib_per_s, per_s, timed};
use crate::raw::{self, Map, Subject};

/// The smallest region the fragmentation rows convert in: sparse, never
/// populated; larger island counts get the region they need.
const FRAG_REGION: u64 = 1 << 30;

/// The region for `islands` shared pages every other page.
fn frag_region(islands: u64) -> u64 {
    FRAG_REGION.max((2 * islands * PAGE).next_multiple_of(2 << 20))
}
/// Conversions per fragmentation measurement.
const FRAG_CONVERSIONS: u64 = 20_000;
/// Island counts of the fragmentation rows.
const ISLANDS: [u64; 4] = [1, 1_000, 100_000, 1_000_000];

struct Gated {
    gate: Gatekeeper,
    _memory: Arc<dyn RestrictedMemory>,
    _vm: Vm,
}

fn gated(kind: BackingKind, size: u64) -> Result<Gated, BenchError> {
    let vm = Vm::new()?;
    let opts = MemoryOptions::new(kind, size).with_flags(GmemFlags::MMAP | GmemFlags::INIT_SHARED);
    let memory = create_memory(opts, Some(&vm))?;
    let binding = vm.bind(&memory, SlotRequest::new(0, 0, size))?;
    let gate = Gatekeeper::new(&vm, vec![binding], GateOptions::default())?;
    Ok(Gated {
        gate,
        _memory: memory,
        _vm: vm,
    })
}

// --- copies -------------------------------------------------------------------

/// Copies the whole region through the gatekeeper, `chunk` bytes per call.
fn copy_gmem(kind: BackingKind, size: u64, chunk: usize, write: bool) -> Result<f64, BenchError> {
    let g = gated(kind, size)?;
    g.gate.fill(0, size, 1)?;
    let mut buf = vec![7u8; chunk];
    let d = timed(|| {
        for gpa in (0..size).step_by(chunk) {
            if write {
                g.gate.write(gpa, &buf)?;
            } else {
                g.gate.read(gpa, &mut buf)?;
            }
        }
        Ok(())
    })?;
    std::hint::black_box(&buf);
    Ok(gib_per_s(size, d))
}

/// How copies through a device's pin are made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PinCopy {
    /// `Pin::read` / `Pin::write`: bounds-checked, no lock (the pin holds
    /// the pages shared); the device path.
    Checked,
    /// `memcpy` at the pin's address: the raw baseline.
    Memcpy,
}

/// The same copies through a device's pin of the same pages, made as `how`
/// says.
fn copy_pinned(
    kind: BackingKind,
    size: u64,
    chunk: usize,
    write: bool,
    how: PinCopy,
) -> Result<f64, BenchError> {
    let g = gated(kind, size)?;
    g.gate.fill(0, size, 1)?;
    let pin = g.gate.pin(0, size)?;
    let base = pin.as_ptr();
    // Fault the window in first: the safe API's copies go through the
    // file's own mapping, which `fill` has faulted in.
    // SAFETY: the pin holds all `size` bytes mapped read-write, unreferenced.
    unsafe { raw::touch(base, size) };
    let mut buf = vec![7u8; chunk];
    // One loop per way, so that neither pays for the other's branch.
    let d = timed(|| {
        match how {
            PinCopy::Checked => {
                for off in (0..size).step_by(chunk) {
                    if write {
                        pin.write(off, &buf)?;
                    } else {
                        pin.read(off, &mut buf)?;
                    }
                }
            }
            PinCopy::Memcpy => {
                for off in (0..size as usize).step_by(chunk) {
                    // SAFETY: the pin holds all `size` bytes mapped
                    // read-write; `buf` is a separate buffer of `chunk`
                    // bytes and `size` is a multiple of `chunk`.
                    unsafe {
                        if write {
                            std::ptr::copy_nonoverlapping(buf.as_ptr(), base.add(off), chunk);
                        } else {
                            std::ptr::copy_nonoverlapping(base.add(off), buf.as_mut_ptr(), chunk);
                        }
                    }
                }
            }
        }
        Ok(())
    })?;
    std::hint::black_box(&buf);
    Ok(gib_per_s(size, d))
}

// --- fragmentation ---------------------------------------------------------------

/// VMAs of this process that overlap `[start, start + len)`.
fn vmas_in(start: usize, len: usize) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .filter(|&(a, b)| a < start + len && start < b)
        .count()
}

/// A gatekeeper over a sparse region, all private but for `islands` shared
/// pages, every other page from 0.
fn fragmented_gmem(kind: BackingKind, islands: u64) -> Result<Gated, BenchError> {
    let region = frag_region(islands);
    let g = gated(kind, region)?;
    g.gate.convert(0, region, Attribute::Private)?;
    for i in 0..islands {
        g.gate.convert(2 * i * PAGE, PAGE, Attribute::Shared)?;
    }
    Ok(g)
}

/// Conversions per second at `islands` islands: shared islands made private
/// and shared again, so the count stays.
fn frag_convert_gmem(kind: BackingKind, islands: u64) -> Result<f64, BenchError> {
    let g = fragmented_gmem(kind, islands)?;
    let d = timed(|| {
        for j in 0..FRAG_CONVERSIONS / 2 {
            let gpa = 2 * (j % islands) * PAGE;
            g.gate.convert(gpa, PAGE, Attribute::Private)?;
            g.gate.convert(gpa, PAGE, Attribute::Shared)?;
        }
        Ok(())
    })?;
    Ok(per_s(FRAG_CONVERSIONS, d))
}

/// The view's VMAs at `islands` islands.
fn frag_vmas_gmem(kind: BackingKind, islands: u64) -> Result<f64, BenchError> {
    let g = fragmented_gmem(kind, islands)?;
    let addr = g.gate.view_addr(0).map_or(0, |p| p as usize);
    Ok(vmas_in(addr, frag_region(islands) as usize) as f64)
}

/// A raw shared mapping of a file of `kind` with `islands` read-write pages
/// in a `PROT_NONE` sea: what a host view with one protection per island is.
fn fragmented_raw(
    kind: BackingKind,
    islands: u64,
) -> Result<(Map, std::os::fd::OwnedFd, Vm), BenchError> {
    let vm = Vm::new()?;
    let fd = raw::file(kind, FRAG_REGION, vm.fd())?;
    let map = Map::shared(std::os::fd::AsFd::as_fd(&fd), FRAG_REGION)?;
    map.protect(MprotectFlags::empty())?;
    for i in 0..islands {
        map.protect_range(
            2 * i * PAGE,
            PAGE,
            MprotectFlags::READ | MprotectFlags::WRITE,
        )?;
    }
    Ok((map, fd, vm))
}

fn frag_convert_raw(kind: BackingKind, islands: u64) -> Result<f64, BenchError> {
    let (map, _fd, _vm) = fragmented_raw(kind, islands)?;
    let d = timed(|| {
        for j in 0..FRAG_CONVERSIONS / 2 {
            let off = 2 * (j % islands) * PAGE;
            map.protect_range(off, PAGE, MprotectFlags::empty())?;
            map.protect_range(off, PAGE, MprotectFlags::READ | MprotectFlags::WRITE)?;
        }
        Ok(())
    })?;
    Ok(per_s(FRAG_CONVERSIONS, d))
}

fn frag_vmas_raw(kind: BackingKind, islands: u64) -> Result<f64, BenchError> {
    let (map, _fd, _vm) = fragmented_raw(kind, islands)?;
    Ok(vmas_in(map.as_ptr() as usize, map.len()) as f64)
}

/// Whether `islands` mprotect islands fit under `vm.max_map_count`, with
/// room for the rest of the process.
fn raw_islands_fit(islands: u64) -> bool {
    let max: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65_530);
    2 * islands + 1 + 1_000 < max
}

/// The rows, for `backings` (those with 4 KiB pages get the fragmentation
/// rows), over regions of `size` bytes.
pub(crate) fn plans(backings: &[BackingKind], size_for: impl Fn(BackingKind) -> u64) -> Vec<Plan> {
    let mut plans = Vec::new();
    // The safe API at two sizes, and the device path (a pin, no lock per
    // call) at the small one.
    for (chunk, label, pinned) in [
        (64usize << 10, "64 KiB", false),
        (4 << 10, "4 KiB", false),
        (4 << 10, "4 KiB", true),
    ] {
        for write in [false, true] {
            let op = if write { "write" } else { "read" };
            let (how, note) = if pinned {
                (
                    " through a pin",
                    "gmem: Pin::read/write, bounds-checked, no lock; raw: memcpy through the same pin",
                )
            } else {
                (
                    "",
                    "gmem: the safe API, checked per call; raw: memcpy through a pin of the same pages",
                )
            };
            for &k in backings {
                let size = size_for(k);
                let gmem = move || {
                    if pinned {
                        copy_pinned(k, size, chunk, write, PinCopy::Checked)
                    } else {
                        copy_gmem(k, size, chunk, write)
                    }
                };
                plans.push(
                    Plan::new(
                        format!("host {op}, {label} copies{how}"),
                        Subject::Backing(k),
                        "GiB/s",
                        true,
                    )
                    .gmem(gmem)
                    .raw(move || copy_pinned(k, size, chunk, write, PinCopy::Memcpy))
                    .goal(0.9)
                    .note(note),
                );
            }
        }
    }
    for &k in backings.iter().filter(|k| k.page_size() == PAGE) {
        for islands in ISLANDS {
            let fits = raw_islands_fit(islands);
            let mut p = Plan::new(
                format!("conversions at {islands} islands"),
                Subject::Backing(k),
                "conversions/s",
                true,
            )
            .gmem(move || frag_convert_gmem(k, islands));
            let mut v = Plan::new(
                format!("view VMAs at {islands} islands"),
                Subject::Backing(k),
                "VMAs",
                false,
            )
            .gmem(move || frag_vmas_gmem(k, islands));
            if fits {
                p = p
                    .raw(move || frag_convert_raw(k, islands))
                    .note("a sparse region (1 GiB, 8 GiB for 1M islands); raw: mprotect of one page among mprotect islands");
                v = v
                    .raw(move || frag_vmas_raw(k, islands))
                    .note("raw: one mprotect island per shared page");
            } else {
                let why = format!(
                    "raw: {islands} mprotect islands need {} VMAs, past vm.max_map_count",
                    2 * islands + 1
                );
                p = p.note(why.clone());
                v = v.note(why);
            }
            plans.push(p);
            plans.push(v);
        }
    }
    plans
}
