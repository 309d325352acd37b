//! The measurements: one function per metric and side (gmem or raw), each
//! doing one rep's setup untimed and returning the timed figure.
//!
//! The metric families live in submodules; this module lists them as the
//! plan (`plans`), which [`crate::runner`] runs.

mod conversion;
mod file;
mod lazy;
mod migrate;
mod snapshot;
mod vcpu;

use conversion::{
    BULK_PAIRS, attribute_map_gmem, attribute_map_naive, bulk_convert_gmem, bulk_convert_raw,
    round_trips_gmem, round_trips_raw,
};
use file::{
    RawPunch, host_touch_gmem, host_touch_raw, populate_gmem, populate_raw, punch_mapped_gmem,
    punch_mapped_raw, punch_unmapped_gmem, punch_unmapped_raw,
};
use vcpu::{guest_touch_gmem, guest_touch_raw, launch_gmem, launch_raw};

use gmem::{Attribute, AttributeMap, BackingKind};

use crate::plan::{PAGE, Plan, Target, gib_per_s, per_s};
use crate::raw::Subject;
use crate::{BenchOptions, Goal, Row, Sample};

// --- the plan ----------------------------------------------------------------------------

fn thp_note() -> Option<String> {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    mode.contains("[never]")
        .then(|| "THP is disabled on this host: 4 KiB pages".to_owned())
}

pub(crate) fn plans(opts: &BenchOptions, backings: &[BackingKind]) -> Vec<Plan> {
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
        // The raw side is guest memory as any VMM has it (a memslot over one
        // touched host mapping), discarded with the least work for the kind.
        let how = if k == BackingKind::GuestMemfd {
            RawPunch::ZapFirst
        } else {
            RawPunch::Naive
        };
        let p = Plan::new("discard, host-mapped", s, "GiB/s", true)
            .gmem(move || punch_mapped_gmem(k, size))
            .raw(move || punch_mapped_raw(k, size, how))
            .goal(0.9)
            .note(match how {
                RawPunch::ZapFirst => {
                    "raw: memslot + one touched mapping, MADV_DONTNEED then punch"
                }
                RawPunch::Naive => "raw: memslot + one touched mapping, punch",
            });
        plans.push(with_note(p, s));
        if k == BackingKind::GuestMemfd {
            let p = Plan::new("discard, host-mapped, vs naive punch", s, "GiB/s", true)
                .gmem(move || punch_mapped_gmem(k, size))
                .raw(move || punch_mapped_raw(k, size, RawPunch::Naive))
                .note("raw: memslot + one touched mapping, punch with the mapping in place");
            plans.push(with_note(p, s));
        }
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
                .goal(0.9)
                .note(format!(
                    "private and back over the whole region, {BULK_PAIRS} pairs a rep; raw: mprotect NONE and back"
                )),
            s,
        ));
    }
    for &k in backings.iter().filter(|k| **k != BackingKind::GuestMemfd) {
        let s = Subject::Backing(k);
        let size = size_for(s);
        plans.push(with_note(
            Plan::new("snapshot to a file", s, "GiB/s", true)
                .gmem(move || snapshot::snapshot_gmem(k, size))
                .raw(move || snapshot::snapshot_raw(k, size))
                .note("an eighth private, sealed (XChaCha20-Poly1305), CRC-32C per MiB; raw: the same bytes written from the file's mapping"),
            s,
        ));
        plans.push(with_note(
            Plan::new("eager restore", s, "GiB/s", true)
                .gmem(move || snapshot::restore_gmem(k, size))
                .raw(move || snapshot::restore_raw(k, size))
                .note("from a snapshot in memory, every record checked; raw: a memcpy into a fresh file's mapping"),
            s,
        ));
    }
    for &k in backings.iter().filter(|k| **k != BackingKind::GuestMemfd) {
        let s = Subject::Backing(k);
        let size = size_for(s).min(256 << 20).max(k.page_size() * 4);
        plans.push(with_note(
            Plan::new("lazy restore: first touch per 4 KiB page", s, "µs", false)
                .gmem(move || lazy::first_touch_gmem(k, size))
                .raw(move || lazy::first_touch_raw(k, size, lazy::RawMode::Copy))
                .note("gmem: host reads, each 1 MiB block (hugetlb: huge page) filled on its first touch, CRC-checked, sealed ones decrypted, by UFFDIO_COPY; raw: MISSING + UFFDIO_COPY of each page"),
            s,
        ));
        plans.push(with_note(
            Plan::new("userfaultfd: MISSING+COPY against fill+MINOR+CONTINUE", s, "µs", false)
                .gmem(move || lazy::first_touch_raw(k, size, lazy::RawMode::Copy))
                .raw(move || lazy::first_touch_raw(k, size, lazy::RawMode::Continue))
                .note("per page, one fault each; gmem column: the mode gmem uses (MISSING + UFFDIO_COPY); raw column: write the page through a second mapping, then UFFDIO_CONTINUE"),
            s,
        ));
    }
    if backings.contains(&BackingKind::Memfd) {
        let s = Subject::Backing(BackingKind::Memfd);
        for gib in [1u64, 16] {
            plans.push(
                Plan::new(format!("lazy restore: until the VM can run, {gib} GiB guest"), s, "µs", false)
                    .gmem(move || lazy::lazy_start_gmem(gib << 30))
                    .raw(move || lazy::eager_start(gib << 30))
                    .note("64 MiB populated, sealed; header, key, index and end checked, memory discarded, uffd registered, threads started; raw column: gmem's eager restore of the same file"),
            );
        }
        let size = size_for(s).min(256 << 20);
        plans.push(
            Plan::new(
                "lazy restore with prefetch, until every block is in",
                s,
                "ms",
                false,
            )
            .gmem(move || lazy::lazy_complete_gmem(size, true))
            .raw(move || lazy::eager_complete(size))
            .note("raw column: gmem's eager restore of the same file"),
        );
        plans.push(
            Plan::new("lazy restore without prefetch, finished at once", s, "ms", false)
                .gmem(move || lazy::lazy_complete_gmem(size, false))
                .raw(move || lazy::eager_complete(size))
                .note("finish() fills every block in the caller's thread; raw column: gmem's eager restore of the same file"),
        );
        plans.push(
            Plan::new(
                "snapshot: 1 TiB sparse guest, 64 MiB touched",
                s,
                "ms",
                false,
            )
            .gmem(|| lazy::sparse_tib().map(|(_, ms)| ms))
            .raw(lazy::sparse_raw)
            .note("64 runs of 1 MiB, one every 16 GiB; raw: the same 64 MiB written to a file"),
        );
        plans.push(
            Plan::new(
                "snapshot size: 1 TiB sparse guest, 64 MiB touched",
                s,
                "MiB",
                false,
            )
            .gmem(|| lazy::sparse_tib().map(|(mib, _)| mib))
            .raw(|| Ok(64.0))
            .note("raw: the populated bytes alone"),
        );
    }
    if backings.contains(&BackingKind::Memfd) {
        plans.extend(migration_plans());
    }
    plans.extend(crate::virtio_io::plans(backings));
    plans.extend(crate::scale::plans(backings));
    plans.extend(crate::processes::plans(backings, opts.worker.as_deref()));
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

/// Live migration of a 1 GiB memfd guest at each dirty rate: downtime,
/// total time, bytes per guest byte and rounds, from one migration per rep
/// (`metrics/migrate.rs`).
fn migration_plans() -> Vec<Plan> {
    use migrate::{GUEST, Mode, Rate, figures, raw_fetch_time, runs, sendfile_time};
    let s = Subject::Backing(BackingKind::Memfd);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let common = "1 GiB memfd guest, fully populated, an eighth private and sealed; \
                  over a Unix socket pair to a destination gatekeeper in another thread; \
                  the dirtier is a host thread writing 4 KiB pages through Gatekeeper::write, \
                  not a vCPU";
    let mut plans = vec![dirty_log_plan()];
    for mode in [Mode::Precopy, Mode::Postcopy] {
        let m = mode.label();
        let post = mode == Mode::Postcopy;
        for rate in [
            Rate::Idle,
            Rate::BytesPerSec(10 << 20),
            Rate::BytesPerSec(100 << 20),
            Rate::Unthrottled,
        ] {
            let label = rate.label();
            let shared = runs(rate, mode);
            let idle = rate == Rate::Idle;
            // Each row counts its own reps through the shared runs.
            let counter = |shared: &migrate::Shared| {
                let shared = std::rc::Rc::clone(shared);
                let mut i = 0usize;
                move || {
                    let f = figures(&shared, i);
                    i += 1;
                    f
                }
            };
            let mut g = counter(&shared);
            let mut r = counter(&shared);
            // ≤ 10 ms idle; under QEMU's default 300 ms limit otherwise.
            let limit = if idle { 10.0 } else { 300.0 };
            let (pause, raw) = if post {
                (
                    "from the dirtier's stop and switch_to_postcopy()'s start (the vCPUs' pause) to the destination's answer that it runs the guest",
                    "the switch's bytes by sendfile",
                )
            } else {
                (
                    "from the dirtier's stop and complete()'s start (the vCPUs' pause) to the destination's receive() returning",
                    "the stop-and-copy's bytes by sendfile from a memfd over the same kind of socket",
                )
            };
            plans.push(
                Plan::new(format!("migration downtime, {m}, {label}"), s, "ms", false)
                    .gmem(move || Ok(ms(g()?.downtime)))
                    .raw(move || Ok(ms(sendfile_time(r()?.final_bytes.max(1))?)))
                    .target(Target::AtMost(limit))
                    .note(format!("{pause}; {common}; raw: {raw}")),
            );
            let mut g = counter(&shared);
            let mut r = counter(&shared);
            plans.push(
                Plan::new(format!("migration total time, {m}, {label}"), s, "ms", false)
                    .gmem(move || Ok(ms(g()?.total)))
                    .raw(move || Ok(ms(sendfile_time(r()?.stream_bytes)?)))
                    .note(format!(
                        "migrate_to() to the destination holding every page; {common}; raw: the whole stream's bytes by sendfile"
                    )),
            );
            let mut g = counter(&shared);
            let mut bytes = Plan::new(
                format!("migration bytes per guest byte, {m}, {label}"),
                s,
                "×",
                false,
            )
            .gmem(move || Ok(g()?.stream_bytes as f64 / GUEST as f64))
            .raw(|| Ok(1.0))
            .note(format!(
                "stream bytes over guest bytes; {common}; raw: the populated bytes sent once{}",
                if post {
                    "; post-copy sends each dirty page's whole 2 MiB block"
                } else {
                    ""
                }
            ));
            if idle {
                bytes = bytes.target(Target::AtMost(1.1));
            }
            plans.push(bytes);
            if !post {
                let mut g = counter(&shared);
                plans.push(
                    Plan::new(
                        format!("migration pre-copy rounds, {label}"),
                        s,
                        "rounds",
                        false,
                    )
                    .gmem(move || Ok(g()?.rounds as f64))
                    .note(format!(
                        "at most 30, stopped once at most 4 MiB is left (the defaults); {common}"
                    )),
                );
            } else if !idle {
                let mut g = counter(&shared);
                plans.push(
                    Plan::new(
                        format!("post-copy fault latency, {label}"),
                        s,
                        "µs",
                        false,
                    )
                    .gmem(move || {
                        g()?.fault
                            .map(|d| d.as_secs_f64() * 1e6)
                            .ok_or_else(|| crate::BenchError::Invalid("no page was dirtied".into()))
                    })
                    .raw(|| Ok(raw_fetch_time()?.as_secs_f64() * 1e6))
                    .note(format!(
                        "a host read at the destination of the last page dirtied, in a block not yet in: the ask over the back channel, the source's answer (behind the block it is sending) and its 2 MiB; {common}; raw: 8 bytes asked, 2 MiB answered by sendfile over a Unix socket pair"
                    )),
                );
            }
        }
    }
    plans
}

/// Dirty tracking's cost: one `take_dirty` of a 1 GiB memfd gatekeeper
/// with 4,096 pages written, beside a raw `KVM_GET_DIRTY_LOG` of a 1 GiB
/// slot.
fn dirty_log_plan() -> Plan {
    use std::time::Instant;
    const SIZE: u64 = 1 << 30;
    let s = Subject::Backing(BackingKind::Memfd);
    Plan::new("dirty tracking: one take of 1 GiB", s, "µs", false)
        .gmem(|| {
            let b = file::bound(BackingKind::Memfd, SIZE)?;
            let inv = |e: gmem::DirtyError| crate::BenchError::Invalid(e.to_string());
            b.gate.start_dirty_tracking().map_err(inv)?;
            for i in 0..4096u64 {
                b.gate.write(i * 2 * PAGE, &[1])?;
            }
            let t = Instant::now();
            let runs = b.gate.take_dirty().map_err(inv)?;
            let d = t.elapsed();
            if runs.len() != 4096 {
                return Err(crate::BenchError::Invalid(format!(
                    "{} dirty runs, 4096 written",
                    runs.len()
                )));
            }
            Ok(d.as_secs_f64() * 1e6)
        })
        .raw(|| {
            let slot = crate::raw::SlotFile::new(BackingKind::Memfd, SIZE)?;
            slot.log_dirty()?;
            let t = Instant::now();
            let words = slot.dirty_log()?;
            let d = t.elapsed();
            std::hint::black_box(words);
            Ok(d.as_secs_f64() * 1e6)
        })
        .note("KVM's log of the slot (read and cleared) and the host writes' record (4,096 pages, as runs); raw: KVM_GET_DIRTY_LOG of a 1 GiB slot with KVM_MEM_LOG_DIRTY_PAGES, through kvm-ioctls")
}

/// Bookkeeping sizes: computed, not timed.
pub(crate) fn metadata_rows() -> Vec<Row> {
    let row = |metric: &str, unit: &'static str, value: f64, goal: Option<Goal>, note: &str| Row {
        metric: metric.to_owned(),
        subject: "gmem".to_owned(),
        unit,
        higher_is_better: false,
        gmem: Some(Sample::of(&[value])),
        raw: None,
        ratio: None,
        goal,
        targets: Vec::new(),
        limit: None,
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
