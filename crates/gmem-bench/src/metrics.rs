//! The measurements: one function per metric and side (gmem or raw), each
//! doing one rep's setup untimed and returning the timed figure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gmem::{
    Attribute, AttributeMap, BackingKind, FileRange, GateOptions, Gatekeeper, GmemFlags,
    MemoryOptions, RestrictedMemory, SlotRequest, Vm, create_memory,
};
use gmem_vmm::abi::PORT_EXIT;
use gmem_vmm::{Console, Exit, Machine, MachineConfig, Step};
use rustix::mm::{Advice, MprotectFlags};

use crate::guest::{self, LOAD, MARK_PORT};
use crate::plan::{Plan, gib_per_s, micros, per_s, timed};
use crate::raw::{self, Map, RawVm, Subject};
use crate::{BenchError, BenchOptions, BenchReport, Goal, Row, Sample};

const PAGE: u64 = 4096;
/// Doorbell round trips per conversion measurement.
const ROUND_TRIPS: u32 = 200;
/// Where the round-trip guest converts its page.
const ROUND_TRIP_GPA: u64 = 0x20_0000;
/// Attribute-map operations per measurement.
const MAP_OPS: u64 = 100_000;

fn memory(kind: BackingKind, size: u64, vm: &Vm) -> Result<Arc<dyn RestrictedMemory>, BenchError> {
    let opts = MemoryOptions::new(kind, size).with_flags(GmemFlags::MMAP | GmemFlags::INIT_SHARED);
    Ok(create_memory(opts, Some(vm))?)
}

fn whole(size: u64) -> Result<FileRange, BenchError> {
    Ok(FileRange::new(0, size)?)
}

/// A VM, a file bound at GPA 0 and a shared gatekeeper over it.
struct Bound {
    gate: Gatekeeper,
    memory: Arc<dyn RestrictedMemory>,
    _vm: Vm,
}

fn bound(kind: BackingKind, size: u64) -> Result<Bound, BenchError> {
    let vm = Vm::new()?;
    let memory = memory(kind, size, &vm)?;
    let binding = vm.bind(&memory, SlotRequest::new(0, 0, size))?;
    let gate = Gatekeeper::new(&vm, vec![binding], GateOptions::default())?;
    Ok(Bound {
        gate,
        memory,
        _vm: vm,
    })
}

/// A raw file of `kind` (created on a fresh VM for guest-memfd; the VM is
/// returned too, since the file is its).
fn raw_file(kind: BackingKind, size: u64) -> Result<(std::os::fd::OwnedFd, Vm), BenchError> {
    let vm = Vm::new()?;
    let fd = raw::file(kind, size, vm.fd())?;
    Ok((fd, vm))
}

// --- populate -------------------------------------------------------------

fn populate_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let vm = Vm::new()?;
    let mem = memory(kind, size, &vm)?;
    let range = whole(size)?;
    Ok(gib_per_s(size, timed(|| Ok(mem.allocate(range)?))?))
}

fn populate_raw(subject: Subject, size: u64) -> Result<f64, BenchError> {
    match subject.backing() {
        Some(kind) => {
            let (fd, _vm) = raw_file(kind, size)?;
            Ok(gib_per_s(
                size,
                timed(|| raw::populate(std::os::fd::AsFd::as_fd(&fd), size))?,
            ))
        }
        None => {
            let map = Map::anon(size, subject == Subject::AnonThp)?;
            Ok(gib_per_s(
                size,
                timed(|| map.advise(Advice::LinuxPopulateWrite))?,
            ))
        }
    }
}

// --- host fault-in ----------------------------------------------------------

/// Touches every 4 KiB page through a device's pin of the whole region (the
/// view, opened once outside the timing); returns the time.
fn host_touch_gmem(kind: BackingKind, size: u64) -> Result<Duration, BenchError> {
    let b = bound(kind, size)?;
    let pin = b.gate.pin(0, size)?;
    let ptr = pin.as_ptr();
    timed(|| {
        // SAFETY: the pin holds all `size` bytes shared and read-write in the
        // view, and no reference points into it.
        unsafe { raw::touch(ptr, size) };
        Ok(())
    })
}

fn host_touch_raw(subject: Subject, size: u64) -> Result<Duration, BenchError> {
    let (map, _fd) = match subject.backing() {
        Some(kind) => {
            let (fd, vm) = raw_file(kind, size)?;
            (
                Map::shared(std::os::fd::AsFd::as_fd(&fd), size)?,
                Some((fd, vm)),
            )
        }
        None => (Map::anon(size, subject == Subject::AnonThp)?, None),
    };
    timed(|| {
        // SAFETY: the mapping is live, read-write, `size` bytes, unreferenced.
        unsafe { raw::touch(map.as_ptr(), size) };
        Ok(())
    })
}

// --- discard ------------------------------------------------------------------

fn punch_unmapped_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let vm = Vm::new()?;
    let mem = memory(kind, size, &vm)?;
    mem.allocate(whole(size)?)?;
    let range = whole(size)?;
    Ok(gib_per_s(size, timed(|| Ok(mem.punch_hole(range)?))?))
}

fn punch_unmapped_raw(subject: Subject, size: u64) -> Result<f64, BenchError> {
    match subject.backing() {
        Some(kind) => {
            let (fd, _vm) = raw_file(kind, size)?;
            let fd = std::os::fd::AsFd::as_fd(&fd);
            raw::populate(fd, size)?;
            Ok(gib_per_s(size, timed(|| raw::punch(fd, size))?))
        }
        None => {
            let map = Map::anon(size, subject == Subject::AnonThp)?;
            map.advise(Advice::LinuxPopulateWrite)?;
            Ok(gib_per_s(
                size,
                timed(|| map.advise(Advice::LinuxDontNeed))?,
            ))
        }
    }
}

fn punch_mapped_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let b = bound(kind, size)?;
    let pin = b.gate.pin(0, size)?;
    // SAFETY: the pin holds all `size` bytes shared and read-write.
    unsafe { raw::touch(pin.as_ptr(), size) };
    let range = whole(size)?;
    let d = timed(|| Ok(b.memory.punch_hole(range)?))?;
    drop(pin);
    Ok(gib_per_s(size, d))
}

fn punch_mapped_raw(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let (fd, _vm) = raw_file(kind, size)?;
    let map = Map::shared(std::os::fd::AsFd::as_fd(&fd), size)?;
    // SAFETY: the mapping is live, read-write, `size` bytes, unreferenced.
    unsafe { raw::touch(map.as_ptr(), size) };
    let fd = std::os::fd::AsFd::as_fd(&fd);
    Ok(gib_per_s(size, timed(|| raw::punch(fd, size))?))
}

// --- guest fault-in -------------------------------------------------------------

/// The range the touch loop walks: from 2 MiB to below the vCPU stack.
fn touched(size: u64) -> (u64, u64) {
    (0x20_0000, size - (64 << 10))
}

fn expect_mark(exit: Exit, value: u32) -> Result<(), BenchError> {
    match exit {
        Exit::IoOut { port, value: v, .. } if port == MARK_PORT && v == value => Ok(()),
        other => Err(BenchError::Guest(format!(
            "expected mark {value}, got {other}"
        ))),
    }
}

fn guest_touch_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let (start, end) = touched(size);
    let mut m = Machine::new(MachineConfig::new(kind, size))?;
    m.load(&guest::touch_pages(start, end)?, LOAD, LOAD)?;
    expect_mark(m.run(0)?, 1)?;
    let d = timed(|| expect_mark(m.run(0)?, 2))?;
    Ok(per_s((end - start) / PAGE, d))
}

fn guest_touch_raw(subject: Subject, size: u64) -> Result<f64, BenchError> {
    let (start, end) = touched(size);
    let mut vm = RawVm::new(subject, size, &guest::touch_pages(start, end)?, LOAD)?;
    vm.run_until_out(MARK_PORT)?;
    let d = timed(|| vm.run_until_out(MARK_PORT).map(drop))?;
    Ok(per_s((end - start) / PAGE, d))
}

// --- launch ------------------------------------------------------------------------

fn launch_gmem(kind: BackingKind, ram: u64) -> Result<f64, BenchError> {
    let code = guest::first_exit()?;
    // The machine leaves the timed part alive: teardown is not launch.
    let start = Instant::now();
    let mut m = Machine::new(MachineConfig::new(kind, ram))?;
    m.load(&code, LOAD, LOAD)?;
    expect_mark(m.run(0)?, 1)?;
    let d = start.elapsed();
    drop(m);
    Ok(micros(d))
}

fn launch_raw(subject: Subject, ram: u64) -> Result<f64, BenchError> {
    let code = guest::first_exit()?;
    let start = Instant::now();
    let mut vm = RawVm::new(subject, ram, &code, LOAD)?;
    vm.run_until_out(MARK_PORT)?;
    let d = start.elapsed();
    drop(vm);
    Ok(micros(d))
}

// --- conversion ----------------------------------------------------------------------

fn round_trips_gmem(kind: BackingKind, ram: u64) -> Result<f64, BenchError> {
    let mut m = Machine::new(MachineConfig::new(kind, ram))?;
    m.load(
        &guest::round_trips(ROUND_TRIP_GPA, ROUND_TRIPS)?,
        LOAD,
        LOAD,
    )?;
    let (console, _) = Console::buffer();
    let d = timed(|| {
        loop {
            match m.step(0, &console)? {
                Step::Exit(0) => return Ok(()),
                Step::Exit(s) => {
                    return Err(BenchError::Guest(format!(
                        "round trips ended with status {s}"
                    )));
                }
                Step::Halted => {
                    return Err(BenchError::Guest("round-trip guest halted early".into()));
                }
                Step::Continue(_) | Step::Interrupted => {}
            }
        }
    })?;
    Ok(per_s(u64::from(ROUND_TRIPS), d))
}

fn round_trips_raw(subject: Subject, ram: u64) -> Result<f64, BenchError> {
    let mut vm = RawVm::new(
        subject,
        ram,
        &guest::round_trips(ROUND_TRIP_GPA, ROUND_TRIPS)?,
        LOAD,
    )?;
    let d = timed(|| vm.run_until_out(PORT_EXIT).map(drop))?;
    Ok(per_s(u64::from(ROUND_TRIPS), d))
}

fn bulk_convert_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let b = bound(kind, size)?;
    {
        // A device touched all of it (its window stays open once released).
        let pin = b.gate.pin(0, size)?;
        // SAFETY: the pin holds all `size` bytes shared and read-write.
        unsafe { raw::touch(pin.as_ptr(), size) };
    }
    let d = timed(|| {
        b.gate.convert(0, size, Attribute::Private)?;
        b.gate.convert(0, size, Attribute::Shared)?;
        Ok(())
    })?;
    drop(b);
    Ok(gib_per_s(2 * size, d))
}

fn bulk_convert_raw(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let (fd, _vm) = raw_file(kind, size)?;
    let map = Map::shared(std::os::fd::AsFd::as_fd(&fd), size)?;
    // SAFETY: the mapping is live, read-write, `size` bytes, unreferenced.
    unsafe { raw::touch(map.as_ptr(), size) };
    let d = timed(|| {
        map.protect(MprotectFlags::empty())?;
        map.protect(MprotectFlags::READ | MprotectFlags::WRITE)
    })?;
    Ok(gib_per_s(2 * size, d))
}

/// A deterministic stream of (first page, pages, private?) over `pages`.
fn map_ops(pages: u64) -> impl Iterator<Item = (u64, u64, bool)> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..MAP_OPS).map(move |i| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1 + (x >> 40) % 16;
        ((x % (pages - len)), len, i % 2 == 0)
    })
}

fn attribute_map_gmem() -> Result<f64, BenchError> {
    const PAGES: u64 = 1 << 20;
    let mut map = AttributeMap::new();
    let d = timed(|| {
        for (first, len, private) in map_ops(PAGES) {
            let attr = if private {
                Attribute::Private
            } else {
                Attribute::Shared
            };
            map.set(first * PAGE..(first + len) * PAGE, attr);
        }
        Ok(())
    })?;
    std::hint::black_box(&map);
    Ok(per_s(MAP_OPS, d))
}

fn attribute_map_naive() -> Result<f64, BenchError> {
    const PAGES: u64 = 1 << 20;
    let mut pages = vec![false; PAGES as usize];
    let d = timed(|| {
        for (first, len, private) in map_ops(PAGES) {
            pages[first as usize..(first + len) as usize].fill(private);
        }
        Ok(())
    })?;
    std::hint::black_box(&pages);
    Ok(per_s(MAP_OPS, d))
}

// --- the plan ----------------------------------------------------------------------------

fn thp_note() -> Option<String> {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    mode.contains("[never]")
        .then(|| "THP is disabled on this host: 4 KiB pages".to_owned())
}

fn plans(opts: &BenchOptions, backings: &[BackingKind]) -> Vec<Plan> {
    let mut subjects: Vec<Subject> = backings.iter().map(|&b| Subject::Backing(b)).collect();
    subjects.extend([Subject::Anon, Subject::AnonThp]);
    let size_for = |s: Subject| opts.size.next_multiple_of(s.page_size().max(2 << 20));
    let thp = thp_note();
    let mut plans = Vec::new();
    let note_for = |s: Subject| match s {
        Subject::AnonThp => thp.clone(),
        Subject::Backing(BackingKind::Hugetlb1G) if !opts.size.is_multiple_of(1 << 30) => {
            Some("size rounded up to 1 GiB".to_owned())
        }
        _ => None,
    };
    let with_note = |p: Plan, s: Subject| match note_for(s) {
        Some(n) => p.note(n),
        None => p,
    };
    for &s in &subjects {
        let size = size_for(s);
        let mut p = Plan::new("populate", s, "GiB/s", true).raw(move || populate_raw(s, size));
        if let Some(k) = s.backing() {
            p = p.gmem(move || populate_gmem(k, size)).goal(0.95);
        }
        plans.push(with_note(p, s));
    }
    for &s in &subjects {
        let size = size_for(s);
        let mut p = Plan::new("host fault-in", s, "GiB/s", true)
            .raw(move || Ok(gib_per_s(size, host_touch_raw(s, size)?)));
        if let Some(k) = s.backing() {
            p = p
                .gmem(move || Ok(gib_per_s(size, host_touch_gmem(k, size)?)))
                .goal(0.95);
            if k == BackingKind::Memfd {
                p = p.note(
                    "gmem mlocks memfd mappings on fault (out of swap): that is the difference",
                );
            }
        }
        plans.push(with_note(p, s));
        let faults = size / s.page_size();
        let mut p = Plan::new("host fault-in (faults)", s, "faults/s", true)
            .raw(move || Ok(per_s(faults, host_touch_raw(s, size)?)));
        if let Some(k) = s.backing() {
            p = p.gmem(move || Ok(per_s(faults, host_touch_gmem(k, size)?)));
        }
        plans.push(with_note(p, s));
    }
    for &s in &subjects {
        let size = size_for(s);
        let mut p = Plan::new("discard, unmapped", s, "GiB/s", true)
            .raw(move || punch_unmapped_raw(s, size));
        if let Some(k) = s.backing() {
            p = p.gmem(move || punch_unmapped_gmem(k, size));
        } else {
            p = p.note("raw: MADV_DONTNEED, which frees anonymous memory");
        }
        plans.push(with_note(p, s));
    }
    for &k in backings {
        let s = Subject::Backing(k);
        let size = size_for(s);
        let mut p = Plan::new("discard, host-mapped", s, "GiB/s", true)
            .gmem(move || punch_mapped_gmem(k, size))
            .raw(move || punch_mapped_raw(k, size));
        if k == BackingKind::GuestMemfd {
            p = p
                .goal(4.0)
                .note("raw: a naive punch with the mapping in place; gmem zaps its mappings first");
        }
        plans.push(with_note(p, s));
    }
    for &s in &subjects {
        let size = size_for(s);
        let mut p = Plan::new("guest fault-in (CPL3)", s, "pages/s", true)
            .raw(move || guest_touch_raw(s, size));
        if let Some(k) = s.backing() {
            p = p.gmem(move || guest_touch_gmem(k, size)).goal(0.95);
        }
        plans.push(with_note(p, s));
    }
    for ram in [2u64 << 20, 1 << 30] {
        let label = if ram == 2 << 20 {
            "launch, 2 MiB"
        } else {
            "launch, 1 GiB"
        };
        for &s in subjects.iter().filter(|s| **s != Subject::AnonThp) {
            if !ram.is_multiple_of(s.page_size()) {
                continue;
            }
            // A launch takes about a millisecond and varies by ±20 %: more reps.
            let mut p = Plan::new(label, s, "µs", false)
                .raw(move || launch_raw(s, ram))
                .min_reps(15);
            if let Some(k) = s.backing() {
                p = p.gmem(move || launch_gmem(k, ram)).goal(0.95);
            }
            plans.push(p);
        }
    }
    for &k in backings {
        let s = Subject::Backing(k);
        let ram = size_for(s).min(if k == BackingKind::Hugetlb1G {
            1 << 30
        } else {
            4 << 20
        });
        plans.push(
            Plan::new(
                "conversion round trips (doorbell)",
                s,
                "round trips/s",
                true,
            )
            .gmem(move || round_trips_gmem(k, ram))
            .raw(move || round_trips_raw(s, ram))
            .goal(0.9)
            .note("raw: a KVM loop taking the same exits and doing no work"),
        );
        let size = size_for(s);
        plans.push(with_note(
            Plan::new("bulk conversion", s, "GiB/s", true)
                .gmem(move || bulk_convert_gmem(k, size))
                .raw(move || bulk_convert_raw(k, size))
                .note("private and back over the whole region; raw: mprotect NONE and back"),
            s,
        ));
    }
    plans.extend(crate::virtio_io::plans(backings));
    plans.extend(crate::scale::plans(backings));
    plans.extend(crate::host_access::plans(backings, |k| {
        size_for(Subject::Backing(k))
    }));
    plans.push(
        Plan::new("attribute-map updates", Subject::Anon, "ops/s", true)
            .gmem(attribute_map_gmem)
            .raw(attribute_map_naive)
            .label("bookkeeping")
            .note("1-16 pages each over 4 GiB; raw: a naive byte per page"),
    );
    plans
}

/// Bookkeeping sizes: computed, not timed.
fn metadata_rows() -> Vec<Row> {
    let row = |metric: &str, unit: &'static str, value: f64, goal: Option<Goal>, note: &str| Row {
        metric: metric.to_owned(),
        subject: "gmem".to_owned(),
        unit,
        higher_is_better: false,
        gmem: Some(Sample::of(&[value])),
        raw: None,
        ratio: None,
        goal,
        note: Some(note.to_owned()),
    };
    let mut tib = AttributeMap::new();
    tib.set(0..1 << 40, Attribute::Private);
    for i in 0..1000u64 {
        let at = i * (1 << 30);
        tib.set(at..at + PAGE, Attribute::Shared);
    }
    let kib = tib.heap_bytes() as f64 / 1024.0;
    let mut gib = AttributeMap::new();
    gib.set(0..1 << 30, Attribute::Private);
    vec![
        row(
            "metadata: attribute map, 1 TiB guest, 1000 runs",
            "KiB",
            kib,
            Some(Goal {
                text: "< 100 KiB".into(),
                met: kib < 100.0,
            }),
            "the map stores private runs only",
        ),
        row(
            "metadata: per conversion run",
            "bytes",
            tib.heap_bytes() as f64 / tib.run_count() as f64,
            None,
            "one B-tree entry",
        ),
        row(
            "metadata: per GiB of guest memory",
            "bytes",
            gib.heap_bytes() as f64,
            None,
            "O(runs), not O(size): a private 1 TiB guest costs the same",
        ),
    ]
}

pub(crate) fn run_all(
    opts: &BenchOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<BenchReport, BenchError> {
    let mut skipped = Vec::new();
    let mut host_changes = Vec::new();
    let mut guards = Vec::new();
    let mut backings = Vec::new();
    for &b in &opts.backings {
        if let Some(why) = unavailable(b) {
            skipped.push(format!("{b}: {why}"));
            continue;
        }
        if b.is_hugetlb() {
            // The largest need at once: a region, or a 1 GiB launch.
            let bytes = opts.size.max(1 << 30).next_multiple_of(b.page_size());
            // Measurements hold one region at a time; 2 MiB pools get a
            // little slack for the boot pages of a launch.
            let slack = if b == BackingKind::Hugetlb1G { 0 } else { 4 };
            let pages = bytes / b.page_size() + slack;
            let guard = gmem_testkit::pool::lock(b.page_size());
            let before = gmem::backing::HugePagePool::read(b.page_size()).map_or(0, |p| p.total);
            if let Err(why) = gmem_testkit::pool::ensure_free(b.page_size(), pages) {
                skipped.push(format!("{b}: {why}"));
                continue;
            }
            let after = gmem::backing::HugePagePool::read(b.page_size()).map_or(0, |p| p.total);
            if after != before {
                host_changes.push(format!(
                    "raised the {} KiB huge page pool from {before} to {after} pages for {b}; it is restored at the end",
                    b.page_size() >> 10
                ));
            }
            guards.push(guard);
        }
        backings.push(b);
    }
    let mut plans = plans(opts, &backings);
    if !opts.only.is_empty() {
        plans.retain(|p| opts.only.iter().any(|o| p.metric.contains(o.as_str())));
    }
    if opts.quick {
        const QUICK: &[&str] = &[
            "populate",
            "host fault-in",
            "conversion round trips (doorbell)",
            "host read, 64 KiB copies",
            "view VMAs at 1000 islands",
            "virtio-blk sequential read (guest)",
            "sparse guest setup, 1 GiB",
            "8 VMs, aggregate round trips",
        ];
        plans.retain(|p| QUICK.contains(&p.metric.as_str()));
    }
    let reps_of = |p: &Plan| opts.reps.max(p.min_reps) as usize;
    let total: usize = plans
        .iter()
        .map(|p| (usize::from(p.gmem.is_some()) + usize::from(p.raw.is_some())) * (reps_of(p) + 1))
        .sum();
    let mut done = 0;
    let mut rows = Vec::new();
    for plan in &mut plans {
        let reps = reps_of(plan);
        // gmem and raw take turns rep by rep, so that neither always runs on
        // memory the other has just warmed (or cooled).
        let name = plan.label.unwrap_or(plan.subject.name());
        let mut gmem_values = Vec::with_capacity(reps);
        let mut raw_values = Vec::with_capacity(reps);
        for rep in 0..=reps {
            for (side, f, values) in [
                ("gmem", plan.gmem.as_mut(), &mut gmem_values),
                ("raw", plan.raw.as_mut(), &mut raw_values),
            ] {
                let Some(f) = f else { continue };
                progress(
                    done,
                    total,
                    &format!("{} · {name} · {side} · rep {rep}/{reps}", plan.metric),
                );
                done += 1;
                let v = f()?;
                if rep > 0 {
                    values.push(v);
                }
            }
        }
        let gmem = (!gmem_values.is_empty()).then(|| Sample::of(&gmem_values));
        let raw = (!raw_values.is_empty()).then(|| Sample::of(&raw_values));
        let ratio = match (gmem, raw) {
            (Some(g), Some(r)) if plan.higher_is_better => Some(g.median / r.median),
            (Some(g), Some(r)) => Some(r.median / g.median),
            _ => None,
        };
        rows.push(Row {
            metric: plan.metric.clone(),
            subject: plan.label.unwrap_or(plan.subject.name()).to_owned(),
            unit: plan.unit,
            higher_is_better: plan.higher_is_better,
            gmem,
            raw,
            ratio,
            goal: plan.goal.zip(ratio).map(|(goal, ratio)| Goal {
                text: format!("≥ {goal}× raw"),
                met: ratio >= goal,
            }),
            note: plan.note.clone(),
        });
    }
    progress(total, total, "done");
    rows.extend(metadata_rows());
    drop(guards);
    gmem_testkit::pool::restore();
    Ok(BenchReport {
        size: opts.size,
        reps: opts.reps,
        kernel: rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned(),
        rows,
        skipped,
        host_changes,
    })
}

/// Why `backing` cannot be measured here, if it cannot: every measurement
/// builds VMs, and guest-memfd needs guest_memfd.
fn unavailable(backing: BackingKind) -> Option<String> {
    match Vm::new() {
        Err(e) => Some(format!("needs /dev/kvm: {e}")),
        Ok(vm) if backing == BackingKind::GuestMemfd && !vm.has_guest_memfd() => {
            Some("this kernel's KVM has no guest_memfd".into())
        }
        Ok(_) => None,
    }
}
