//! The confidential-VM I/O path measured against itself without
//! confidentiality: `guests/blk-bench` runs virtio-blk requests through
//! `virtio-drivers`, on the same reference VMM, twice:
//!
//! - **gmem** (the confidential run): guest RAM private after launch, the
//!   rings and request headers in the guest's shared pool, every byte the
//!   device touches pinned and checked shared by the gatekeeper; the data
//!   either in a `SharedBuffer` of the pool (the rows without a suffix: the
//!   device must see the blocks anyway, so nothing is copied) or in the
//!   guest's private memory, bounced through the pool (the rows ending
//!   "bounced", as SWIOTLB does);
//! - **raw** (the plain run): guest RAM all shared, the driver given the
//!   guest's own buffers (no bounce pool).
//!
//! The ratio gmem ÷ raw is what confidentiality costs. Beside each row,
//! its **limit**: the figure the path would reach if it cost nothing but
//! its exits, from the exits the run took and the cost of one exit, which
//! the same guest measures in the same run (a loop of MMIO register reads
//! after the requests, an exit each). The guest reports on port `0x10`
//! around its requests and its exit loop; the bench's exit loop
//! timestamps those and counts the exits between them.

use std::cell::RefCell;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use gmem::{Attribute, BackingKind};
use gmem_vmm::virtio::blk::VirtioBlk;
use gmem_vmm::{Console, Exit, Machine, MachineConfig, Step, VmmError};

use crate::plan::{Plan, Target};
use crate::raw::Subject;
use crate::{BenchError, Limit, Sample};

const MIB: f64 = (1u64 << 20) as f64;
const KIB: u32 = 1 << 10;
/// Where the data starts on the disks: sector 2048 (1 MiB), after the plan.
const DATA_START: u64 = 2048;
/// The data's size: what the largest sequential row moves.
const DATA: u64 = 64 << 20;
/// MMIO reads in the exit loop (about 25 ms here).
const EXIT_LOOPS: u32 = 1000;
/// The port `guests/blk-bench` reports on.
const MARK_PORT: u16 = 0x10;
/// Requests in flight per notification in the batched rows.
const DEPTH: u32 = 16;

/// What the guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    SequentialRead = 1,
    SequentialWrite = 2,
    RandomRead = 3,
}

/// One run of the guest: `requests` requests of `request` bytes.
#[derive(Clone, Copy, Debug)]
struct Job {
    mode: Mode,
    request: u32,
    requests: u32,
    /// Whether the confidential run's buffer is a `SharedBuffer` in the
    /// pool (handed to the device as it is) rather than the guest's own
    /// private memory (bounced). The plain run always uses its own.
    zero_copy: bool,
    /// Requests in flight per notification (1: `VirtIOBlk`, one at a time).
    depth: u32,
}

impl Job {
    fn bytes(&self) -> u64 {
        u64::from(self.request) * u64::from(self.requests)
    }

    /// Sector 0 of the disk: the plan `guests/blk-bench` reads, for the
    /// plain run or the confidential one.
    fn plan(&self, plain: bool) -> [u8; 512] {
        let mut s = [0u8; 512];
        s[..8].copy_from_slice(b"GMEMBLK1");
        s[8..12].copy_from_slice(&(self.mode as u32).to_le_bytes());
        s[12..16].copy_from_slice(&self.request.to_le_bytes());
        s[16..20].copy_from_slice(&self.requests.to_le_bytes());
        s[20..24].copy_from_slice(&EXIT_LOOPS.to_le_bytes());
        s[24..32].copy_from_slice(&DATA_START.to_le_bytes());
        s[32..40].copy_from_slice(&(DATA / 512).to_le_bytes());
        s[40..48].copy_from_slice(&0x9e37_79b9_7f4a_7c15u64.to_le_bytes());
        s[48..52].copy_from_slice(&u32::from(self.zero_copy && !plain).to_le_bytes());
        s[52..56].copy_from_slice(&self.depth.to_le_bytes());
        s
    }
}

/// The two disk images, made on first use and removed when the plans go:
/// one holding the pattern the guest checks (reads), one the writes go to.
#[derive(Default)]
struct Disks {
    paths: RefCell<Option<(PathBuf, PathBuf)>>,
}

impl Disks {
    fn path(&self, mode: Mode) -> Result<PathBuf, BenchError> {
        let mut paths = self.paths.borrow_mut();
        if paths.is_none() {
            let dir = std::env::temp_dir();
            let pid = std::process::id();
            let read = dir.join(format!("gmem-bench-blk-read-{pid}.img"));
            let write = dir.join(format!("gmem-bench-blk-write-{pid}.img"));
            // Every 8-byte word of the data holds its own disk offset.
            let mut bytes = vec![0u8; (DATA_START * 512 + DATA) as usize];
            for (i, w) in bytes.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&(i as u64 * 8).to_le_bytes());
            }
            std::fs::write(&read, &bytes)?;
            std::fs::write(&write, &bytes)?;
            *paths = Some((read, write));
        }
        let (read, write) = paths
            .as_ref()
            .ok_or_else(|| BenchError::Invalid("the bench's disk images were not made".into()))?;
        Ok(if mode == Mode::SequentialWrite {
            write.clone()
        } else {
            read.clone()
        })
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        if let Some((read, write)) = self.paths.get_mut().take() {
            let _ = std::fs::remove_file(read);
            let _ = std::fs::remove_file(write);
        }
    }
}

/// What one run measured.
#[derive(Clone, Copy, Debug)]
struct Run {
    /// The requests' wall time, from the guest's first mark to its second.
    io: Duration,
    /// Exits between those marks (the marks' own not counted).
    exits: u64,
    /// One exit's cost: the exit loop's time over its reads.
    exit_cost: Duration,
}

/// Runs `guests/blk-bench` for `job` on `kind`: confidential (RAM private
/// after launch, the bounce pool) unless `plain` (RAM all shared, the
/// guest's own buffers).
fn run(kind: BackingKind, plain: bool, job: Job, disks: &Disks) -> Result<Run, BenchError> {
    let path = disks.path(job.mode)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    file.write_all_at(&job.plan(plain), 0)?;
    let ram = if kind == BackingKind::Hugetlb1G {
        1 << 30
    } else {
        64 << 20
    };
    let mut config = MachineConfig::new(kind, ram);
    if plain {
        config.initial = Attribute::Shared;
    }
    let mut m = Machine::new(config)?;
    m.add_device(Box::new(VirtioBlk::new(file, false)?))?;
    m.load_elf(gmem_guests::BLK_BENCH)?;
    let (console, out) = Console::buffer();
    let mut exits = 0u64;
    let mut marks: [Option<(Instant, u64)>; 5] = [None; 5];
    loop {
        match m.step(0, &console) {
            Ok(Step::Continue(_)) => exits += 1,
            Ok(Step::Interrupted) => {}
            Ok(Step::Exit(0)) => break,
            Ok(Step::Exit(status)) => {
                return Err(BenchError::Guest(format!(
                    "blk-bench ended with status {status}: {}",
                    String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner()))
                )));
            }
            Ok(Step::Halted) => {
                return Err(BenchError::Guest("blk-bench halted early".into()));
            }
            // The mark port is no port of the guest ABI: the machine
            // refuses it as unknown, the `out` is done, and the vCPU runs on.
            Err(VmmError::UnknownPort {
                port: MARK_PORT,
                exit: Exit::IoOut { value, .. },
                ..
            }) => {
                let at = marks.get_mut(value as usize).ok_or_else(|| {
                    BenchError::Guest(format!("blk-bench marked {value}, not 1 to 4"))
                })?;
                *at = Some((Instant::now(), exits));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let span = |a: usize, b: usize| match (marks[a], marks[b]) {
        (Some((t0, e0)), Some((t1, e1))) => Ok((t1 - t0, e1 - e0)),
        _ => Err(BenchError::Guest(format!(
            "blk-bench did not mark {a} and {b}"
        ))),
    };
    let (io, exits) = span(1, 2)?;
    let (exit_loop, loop_exits) = span(3, 4)?;
    Ok(Run {
        io,
        exits,
        exit_cost: exit_loop / u32::try_from(loop_exits.max(1)).unwrap_or(u32::MAX),
    })
}

/// What a row reports of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Figure {
    /// MiB/s.
    Throughput,
    /// Requests per second.
    Iops,
    /// Exits per MiB moved.
    ExitsPerMib,
}

impl Figure {
    fn unit(self) -> &'static str {
        match self {
            Figure::Throughput => "MiB/s",
            Figure::Iops => "IOPS",
            Figure::ExitsPerMib => "exits/MiB",
        }
    }

    fn of(self, job: Job, r: &Run) -> f64 {
        let mib = job.bytes() as f64 / MIB;
        let secs = r.io.as_secs_f64().max(1e-9);
        match self {
            Figure::Throughput => mib / secs,
            Figure::Iops => f64::from(job.requests) / secs,
            Figure::ExitsPerMib => r.exits as f64 / mib,
        }
    }

    /// The figure if the run had cost only its exits (for exits per MiB:
    /// the exits' time per MiB, in µs).
    fn limit(self, job: Job, r: &Run) -> Option<f64> {
        let exit_time = r.exits as f64 * r.exit_cost.as_secs_f64();
        if exit_time <= 0.0 {
            return None;
        }
        match self {
            Figure::Throughput => Some(job.bytes() as f64 / MIB / exit_time),
            Figure::Iops => Some(f64::from(job.requests) / exit_time),
            // The exits' time per MiB moved, in µs.
            Figure::ExitsPerMib => Some(exit_time * 1e6 / (job.bytes() as f64 / MIB)),
        }
    }
}

/// The runs of one row, per side, warm-up first.
#[derive(Default)]
struct Runs {
    gmem: Vec<Run>,
    raw: Vec<Run>,
}

fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.collect();
    (!v.is_empty()).then(|| Sample::of(&v).median)
}

/// The limit of a row from its runs (the warm-up of each side left out).
fn limit_of(figure: Figure, job: Job, runs: &Runs) -> Option<Limit> {
    let measured = |v: &[Run]| v.iter().skip(1).copied().collect::<Vec<Run>>();
    let (g, r) = (measured(&runs.gmem), measured(&runs.raw));
    let lim = |v: &[Run]| median(v.iter().filter_map(|x| figure.limit(job, x)));
    let per_mib = |v: &[Run]| median(v.iter().map(|x| Figure::ExitsPerMib.of(job, x)));
    let exit_us = |v: &[Run]| median(v.iter().map(|x| x.exit_cost.as_secs_f64() * 1e6));
    let text = match figure {
        Figure::ExitsPerMib => "µs of exits per MiB: exits per MiB × one exit's measured cost",
        _ => "if only the exits cost: exits per MiB × one exit's measured cost",
    };
    Some(Limit {
        text: text.into(),
        gmem: lim(&g),
        raw: lim(&r),
        gmem_exits_per_mib: per_mib(&g),
        raw_exits_per_mib: per_mib(&r),
        gmem_exit_us: exit_us(&g),
        raw_exit_us: exit_us(&r),
    })
}

fn size_name(request: u32) -> String {
    if request >= KIB * KIB {
        format!("{} MiB", request / (KIB * KIB))
    } else {
        format!("{} KiB", request / KIB)
    }
}

/// One row: `job` on `kind`, confidential (gmem) beside plain (raw).
fn row(kind: BackingKind, metric: String, figure: Figure, job: Job, disks: &Rc<Disks>) -> Plan {
    let runs = Rc::new(RefCell::new(Runs::default()));
    let side = |plain: bool| {
        let (runs, disks) = (runs.clone(), disks.clone());
        move || {
            let r = run(kind, plain, job, &disks)?;
            let mut all = runs.borrow_mut();
            if plain { &mut all.raw } else { &mut all.gmem }.push(r);
            Ok(figure.of(job, &r))
        }
    };
    let limit_runs = runs.clone();
    Plan::new(
        metric,
        Subject::Backing(kind),
        figure.unit(),
        figure != Figure::ExitsPerMib,
    )
    .gmem(side(false))
    .raw(side(true))
    .limit(move || limit_of(figure, job, &limit_runs.borrow()))
    .note(format!(
        "guests/blk-bench, {} requests of {}, {}; gmem: RAM private, {}; raw: RAM all shared, the guest's own buffer; same VMM",
        job.requests,
        size_name(job.request),
        if job.depth > 1 {
            format!("{} in flight per notification (gmem_guest::blk::BatchBlk)", job.depth)
        } else {
            "one at a time (virtio-drivers' VirtIOBlk)".to_owned()
        },
        if job.zero_copy {
            "the data in a SharedBuffer of the shared pool (no bounce copy)"
        } else {
            "the data bounced between private memory and the shared pool"
        }
    ))
}

/// The rows, for `backings`.
pub(crate) fn plans(backings: &[BackingKind]) -> Vec<Plan> {
    let disks = Rc::new(Disks::default());
    let mut plans = Vec::new();
    // Requests per size: about 8, 32 and 64 MiB moved.
    let sizes = [(4 * KIB, 2048), (64 * KIB, 512), (KIB * KIB, 64)];
    for &k in backings {
        // The data in the pool (no copy), then bounced through it.
        for (zero_copy, tail) in [(true, ""), (false, ", bounced")] {
            for (mode, what) in [
                (Mode::SequentialRead, "sequential read"),
                (Mode::SequentialWrite, "sequential write"),
            ] {
                for (request, requests) in sizes {
                    let job = Job {
                        mode,
                        request,
                        requests,
                        zero_copy,
                        depth: 1,
                    };
                    let metric =
                        format!("virtio-blk {what}, {} requests{tail}", size_name(request));
                    let mut p = row(k, metric, Figure::Throughput, job, &disks);
                    if request >= 64 * KIB {
                        p = p.goal(0.8);
                    }
                    if mode == Mode::SequentialRead && request == KIB * KIB {
                        p = p.target(Target::AtLeast(1024.0));
                    }
                    plans.push(p);
                }
            }
            let random = Job {
                mode: Mode::RandomRead,
                request: 4 * KIB,
                requests: 2048,
                zero_copy,
                depth: 1,
            };
            plans.push(row(
                k,
                format!("virtio-blk random read, 4 KiB requests{tail}"),
                Figure::Iops,
                random,
                &disks,
            ));
        }
        // Several requests in flight per notification.
        for (mode, what, figure, request, requests) in [
            (
                Mode::SequentialRead,
                "sequential read",
                Figure::Throughput,
                4 * KIB,
                2048,
            ),
            (
                Mode::SequentialRead,
                "sequential read",
                Figure::Throughput,
                64 * KIB,
                512,
            ),
            (
                Mode::SequentialWrite,
                "sequential write",
                Figure::Throughput,
                4 * KIB,
                2048,
            ),
            (
                Mode::SequentialWrite,
                "sequential write",
                Figure::Throughput,
                64 * KIB,
                512,
            ),
            (Mode::RandomRead, "random read", Figure::Iops, 4 * KIB, 2048),
        ] {
            let job = Job {
                mode,
                request,
                requests,
                zero_copy: true,
                depth: DEPTH,
            };
            let metric = format!(
                "virtio-blk {what}, {} requests, {DEPTH} in flight",
                size_name(request)
            );
            let mut p = row(k, metric, figure, job, &disks);
            if request >= 64 * KIB {
                p = p.goal(0.8);
            }
            plans.push(p);
        }
        for (request, requests, depth) in [
            (4 * KIB, 2048, 1),
            (64 * KIB, 512, 1),
            (KIB * KIB, 64, 1),
            (4 * KIB, 2048, DEPTH),
        ] {
            let job = Job {
                mode: Mode::SequentialRead,
                request,
                requests,
                zero_copy: true,
                depth,
            };
            let metric = if depth > 1 {
                format!(
                    "virtio-blk exits per MiB, {} sequential reads, {depth} in flight",
                    size_name(request)
                )
            } else {
                format!(
                    "virtio-blk exits per MiB, {} sequential reads",
                    size_name(request)
                )
            };
            let mut p = row(k, metric, Figure::ExitsPerMib, job, &disks);
            if request == KIB * KIB {
                p = p.target(Target::AtMost(2.0));
            }
            plans.push(p);
        }
    }
    plans
}
