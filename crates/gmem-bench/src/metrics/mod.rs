//! The measurements: one function per metric and side (gmem or raw), each
//! doing one rep's setup untimed and returning the timed figure.
//!
//! The metric families live in submodules; this module turns them into the
//! plan (`plans`) and runs it (`run_all`).

mod conversion;
mod file;
mod vcpu;

use conversion::{
    attribute_map_gmem, attribute_map_naive, bulk_convert_gmem, bulk_convert_raw, round_trips_gmem,
    round_trips_raw,
};
use file::{
    host_touch_gmem, host_touch_raw, populate_gmem, populate_raw, punch_mapped_gmem,
    punch_mapped_raw, punch_unmapped_gmem, punch_unmapped_raw,
};
use vcpu::{guest_touch_gmem, guest_touch_raw, launch_gmem, launch_raw};

use gmem::{Attribute, AttributeMap, BackingKind, Vm};

use crate::plan::{PAGE, Plan, gib_per_s, per_s};
use crate::raw::Subject;
use crate::{BenchError, BenchOptions, BenchReport, Goal, Row, Sample};

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
