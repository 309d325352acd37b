//! The runner: prepares the host (huge page pools, through the test kit),
//! filters the plan (`--only`, `--quick`) and runs it rep by rep, gmem and
//! raw in turn.

use gmem::{BackingKind, Vm};

use crate::metrics::{metadata_rows, plans};
use crate::plan::Plan;
use crate::{BenchError, BenchOptions, BenchReport, Goal, Row, Sample};

/// Runs the plan for `opts` and gathers the report.
pub(crate) fn run_all(
    opts: &BenchOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<BenchReport, BenchError> {
    let host = Host::prepare(opts);
    let mut plans = select(plans(opts, &host.backings), opts);
    let reps_of = |p: &Plan| opts.reps.max(p.min_reps) as usize;
    let total: usize = plans
        .iter()
        .map(|p| (usize::from(p.gmem.is_some()) + usize::from(p.raw.is_some())) * (reps_of(p) + 1))
        .sum();
    let mut done = 0;
    let mut rows = Vec::new();
    for plan in &mut plans {
        let reps = reps_of(plan);
        rows.push(measure(plan, reps, &mut |label| {
            progress(done, total, label);
            done += 1;
        })?);
    }
    progress(total, total, "done");
    rows.extend(metadata_rows());
    let Host {
        skipped,
        host_changes,
        ..
    } = host.restore();
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

/// The backings this host can measure, with their huge page pools raised
/// (and held, through the test kit's guards, until [`Host::restore`]).
struct Host {
    backings: Vec<BackingKind>,
    skipped: Vec<String>,
    host_changes: Vec<String>,
    guards: Vec<gmem_testkit::pool::PoolGuard>,
}

impl Host {
    fn prepare(opts: &BenchOptions) -> Self {
        let mut host = Host {
            backings: Vec::new(),
            skipped: Vec::new(),
            host_changes: Vec::new(),
            guards: Vec::new(),
        };
        for &b in &opts.backings {
            if let Some(why) = unavailable(b) {
                host.skipped.push(format!("{b}: {why}"));
                continue;
            }
            if b.is_hugetlb() && !host.raise_pool(b, opts.size) {
                continue;
            }
            host.backings.push(b);
        }
        if opts.worker.is_none() {
            host.skipped.push(
                "VM processes: no worker command (BenchOptions::worker) to start them with".into(),
            );
        }
        host
    }

    /// Raises `b`'s pool for the largest need at once (a region, or a 1 GiB
    /// launch); false, with the reason recorded, where it cannot.
    fn raise_pool(&mut self, b: BackingKind, size: u64) -> bool {
        let bytes = size.max(1 << 30).next_multiple_of(b.page_size());
        // Measurements hold one region at a time; 2 MiB pools get a
        // little slack for the boot pages of a launch.
        let slack = if b == BackingKind::Hugetlb1G { 0 } else { 4 };
        let pages = bytes / b.page_size() + slack;
        let guard = gmem_testkit::pool::lock(b.page_size());
        let total = || gmem::backing::HugePagePool::read(b.page_size()).map_or(0, |p| p.total);
        let before = total();
        if let Err(why) = gmem_testkit::pool::ensure_free(b.page_size(), pages) {
            self.skipped.push(format!("{b}: {why}"));
            return false;
        }
        let after = total();
        if after != before {
            self.host_changes.push(format!(
                "raised the {} KiB huge page pool from {before} to {after} pages for {b}; it is restored at the end",
                b.page_size() >> 10
            ));
        }
        self.guards.push(guard);
        true
    }

    /// Drops the pool guards and puts the pools back as they were.
    fn restore(mut self) -> Self {
        self.guards.clear();
        gmem_testkit::pool::restore();
        self
    }
}

/// The plans `--only` and `--quick` keep.
fn select(mut plans: Vec<Plan>, opts: &BenchOptions) -> Vec<Plan> {
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
            "virtio-blk sequential read, 1 MiB requests",
            "sparse guest setup, 1 GiB",
            "8 VMs, aggregate round trips",
            "8 VM processes, aggregate round trips",
        ];
        plans.retain(|p| QUICK.contains(&p.metric.as_str()));
    }
    plans
}

/// One warm-up and `reps` reps of `plan`, gmem and raw taking turns rep by
/// rep so that neither always runs on memory the other has just warmed (or
/// cooled). `step(label)` is called before each.
fn measure(plan: &mut Plan, reps: usize, step: &mut dyn FnMut(&str)) -> Result<Row, BenchError> {
    let name = plan.label.unwrap_or(plan.subject.name());
    let mut gmem_values = Vec::with_capacity(reps);
    let mut raw_values = Vec::with_capacity(reps);
    for rep in 0..=reps {
        for (side, f, values) in [
            ("gmem", plan.gmem.as_mut(), &mut gmem_values),
            ("raw", plan.raw.as_mut(), &mut raw_values),
        ] {
            let Some(f) = f else { continue };
            step(&format!(
                "{} · {name} · {side} · rep {rep}/{reps}",
                plan.metric
            ));
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
    Ok(Row {
        metric: plan.metric.clone(),
        subject: name.to_owned(),
        unit: plan.unit,
        higher_is_better: plan.higher_is_better,
        gmem,
        raw,
        ratio,
        goal: plan.goal.zip(ratio).map(|(goal, ratio)| Goal {
            text: format!("≥ {goal}× raw"),
            met: ratio >= goal,
        }),
        targets: gmem.map_or_else(Vec::new, |g| {
            plan.targets
                .iter()
                .map(|t| t.check(g.median, plan.unit))
                .collect()
        }),
        limit: plan.limit.as_ref().and_then(|f| f()),
        note: plan.note.clone(),
    })
}

/// Why `backing` cannot be measured here, if it cannot: every measurement
/// builds VMs, and guest-memfd needs guest_memfd.
fn unavailable(backing: BackingKind) -> Option<String> {
    match Vm::new() {
        Err(e) => Some(format!("needs /dev/kvm: {e}")),
        Ok(vm) if backing == BackingKind::GuestMemfd && !vm.has_guest_memfd() => {
            Some(gmem::BackingError::NoGuestMemfd.to_string())
        }
        Ok(_) => None,
    }
}
