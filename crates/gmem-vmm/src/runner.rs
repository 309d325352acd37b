//! Running a launched machine to the end: one thread per vCPU, the run's
//! status, and the report.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gmem::{Attribute, BackingKind, ConversionStats, Policy};
use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::console::Console;
use crate::error::VmmError;
use crate::machine::Machine;
use crate::shared::Shared;
use crate::vcpu::{ExitCounts, Step, VcpuState, run_once};

/// What a run did, as `gmem run` reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunReport {
    /// The run's exit status: the guest's (port 0xf4), or 0 when every vCPU halted.
    pub status: i32,
    /// The backing of guest RAM.
    pub backing: BackingKind,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The conversion policy.
    pub policy: Policy,
    /// The attribute RAM had after launch.
    pub initial: Attribute,
    /// Bytes of guest RAM populated at the end.
    pub populated_bytes: u64,
    /// The same in 4 KiB pages.
    pub populated_pages: u64,
    /// Conversions by direction, discards, bytes freed and zeroed.
    pub conversions: ConversionStats,
    /// Exits by reason.
    pub exits: BTreeMap<String, u64>,
    /// The devices, and what they refused to touch.
    pub devices: Vec<DeviceReport>,
    /// Wall time the guest ran: from the first vCPU's first `KVM_RUN` to
    /// the last vCPU's end, in µs (not the VMM's waiting).
    pub wall_time_us: u64,
    /// The snapshots the run took.
    pub snapshots: Vec<crate::snapshot::SnapshotTaken>,
    /// Snapshots asked for and not taken, and why.
    pub snapshot_notes: Vec<String>,
    /// Whether the run ended after a snapshot (`Then::Stop`) rather than
    /// by the guest.
    pub stopped_for_snapshot: bool,
    /// Whether the machine was restored from a snapshot.
    pub restored: bool,
    /// The lazy restore the run started on, if any.
    pub lazy: Option<LazyReport>,
    /// The migration the run ended with (the destination runs the guest).
    pub migration: Option<crate::migrate::MigrationTaken>,
    /// Migrations asked for that failed or were not started, and why (the
    /// guest ran on).
    pub migration_notes: Vec<String>,
}

/// What a lazy restore did while the guest ran.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LazyReport {
    /// Blocks the snapshot holds.
    pub blocks: usize,
    /// Blocks still pending when the guest ended.
    pub pending_at_end: usize,
    /// Blocks filled on a guest fault.
    pub fault_fills: u64,
    /// Holes a fault found, filled with zeroes.
    pub zero_fills: u64,
    /// Blocks filled for host accesses (devices).
    pub host_fills: u64,
    /// Blocks the prefetcher filled.
    pub prefetch_fills: u64,
    /// The blocks touched, in first-touch order
    /// ([`PrefetchOrder::encode`](gmem::snapshot::PrefetchOrder::encode)), for
    /// the next restore's prefetcher.
    #[serde(skip)]
    pub touch_order: Vec<u8>,
}

/// One device in the run report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceReport {
    /// The device.
    pub name: &'static str,
    /// Its status register at the end (`0x40`: it needed a reset).
    pub status: u32,
    /// How many accesses it refused (private or unbound memory).
    pub refused: u64,
    /// The first refusals.
    pub refusals: Vec<crate::virtio::Refusal>,
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's vCPU's `kvm_run`, for the kick handler (null when the
    /// thread runs no vCPU).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick: sets `immediate_exit` on this thread's vCPU, so that a kick
/// that lands anywhere (in the guest, in the VMM between two `KVM_RUN`s)
/// makes the next or current `KVM_RUN` return `EINTR`, as Firecracker does.
/// It is never lost, and never needs repeating.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's vCPU's kvm_run mapping, set
        // while the VcpuFd lives and cleared before it is dropped; a byte
        // store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = register_signal_handler(kick_signal(), on_kick);
    });
}

/// `SIGUSR1` arrived: a snapshot is asked for. The handler only sets it;
/// the runner's waiting thread hands it to the vCPU and kicks it.
static SIGUSR1_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // An atomic store is async-signal-safe.
    SIGUSR1_SEEN.store(true, Ordering::Release);
}

pub(crate) fn install_sigusr1_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = register_signal_handler(libc::SIGUSR1, on_sigusr1);
    });
}

/// The migration plan's signal arrived. The handler only sets it; the
/// runner's waiting thread starts the migration.
static MIGRATE_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_migrate_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // An atomic store is async-signal-safe.
    MIGRATE_SEEN.store(true, Ordering::Release);
}

/// Installs the handler of the migration plan's signal.
pub(crate) fn install_migrate_handler(signal: i32) {
    let _ = register_signal_handler(signal, on_migrate_signal);
}

/// What a vCPU thread hands back: its exits, how it ended, and when it ran.
struct VcpuEnd {
    counts: ExitCounts,
    result: Result<Option<i32>, VmmError>,
    ran: Option<(Instant, Instant)>,
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_owned())
}

/// Lets KVM finish the last exit's instruction before the vCPU is saved:
/// `KVM_RUN` with `immediate_exit` completes its I/O without entering the
/// guest. `None`: done, the vCPU's state is the guest's. `Some(step)`:
/// completing it was a new exit (the next element of a `rep movs` on a
/// device, another MMIO fragment), handled here as any other; the vCPU
/// comes back after it (bounded: each time the guest's instruction moves
/// on, and a pause gives up after its deadline).
fn settle(
    vcpu: &mut VcpuState,
    shared: &Shared,
    console: &Console,
    counts: &mut ExitCounts,
) -> Result<Option<Step>, VmmError> {
    vcpu.fd.set_kvm_immediate_exit(1);
    match run_once(vcpu, shared, console, counts) {
        // EINTR: nothing was pending (and `immediate_exit` is clear again).
        Ok(Step::Interrupted) => Ok(None),
        other => {
            vcpu.fd.set_kvm_immediate_exit(0);
            other.map(Some)
        }
    }
}

/// A vCPU's side of a pause (a migration's or another vCPU's snapshot),
/// once [`settle`]d: parks with its state at the rendezvous, and waits for
/// the verdict. True if the run ends.
fn pause_here(vcpu: &mut VcpuState, shared: &Shared, console: &Console) -> bool {
    let at = (Instant::now(), crate::migrate::monotonic_ns());
    vcpu.flush_serial(console);
    let saved = vcpu.capture(&shared.vm).map_err(|e| e.to_string());
    // Bounded: the pausing thread decides on every path, within its I/O
    // timeout.
    shared.pause.park(vcpu.index, saved, at) == Some(crate::pause::Verdict::End)
}

/// One vCPU's loop, on its thread.
fn vcpu_thread(
    mut vcpu: VcpuState,
    shared: &Shared,
    console: &Console,
    stop: &AtomicBool,
) -> VcpuEnd {
    KVM_RUN.with(|r| r.set(vcpu.kvm_run()));
    let index = vcpu.index;
    let mut counts = ExitCounts::default();
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        loop {
            if stop.load(Ordering::Acquire) {
                break Ok(None);
            }
            let asked = shared.snapshot_now.load(Ordering::Acquire) || shared.pause.wanted();
            let step = if asked {
                settle(&mut vcpu, shared, console, &mut counts)
            } else {
                run_once(&mut vcpu, shared, console, &mut counts).map(Some)
            };
            let step = match step {
                Ok(Some(step)) => step,
                // Settled: the snapshot or the pause, between two exits.
                Ok(None) => {
                    if shared.snapshot_now.swap(false, Ordering::AcqRel) {
                        match crate::snapshot::host_request(&mut vcpu, shared, console) {
                            Ok(Some(crate::snapshot::Then::Stop)) => {
                                shared.stop_for_snapshot();
                                break Ok(None);
                            }
                            Ok(_) => {}
                            Err(e) => break Err(e),
                        }
                    }
                    if shared.pause.wanted() && pause_here(&mut vcpu, shared, console) {
                        break Ok(None);
                    }
                    continue;
                }
                Err(e) => break Err(e),
            };
            match step {
                Step::Continue(_) | Step::Interrupted => {}
                Step::Halted => break Ok(None),
                Step::Exit(status) => break Ok(Some(status)),
            }
        }
    }));
    let ended = Instant::now();
    vcpu.flush_serial(console);
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    let result = outcome.unwrap_or_else(|payload| {
        Err(VmmError::VcpuPanicked {
            vcpu: index,
            message: panic_message(&*payload),
        })
    });
    VcpuEnd {
        counts,
        result,
        ran: Some((started, ended)),
    }
}

impl Machine {
    /// Runs every vCPU on a thread of its own until the guest ends the run
    /// (port 0xf4), every vCPU has halted, or one fails; then reports.
    ///
    /// # Errors
    /// The first vCPU's failure: a guest crash (with its registers), an
    /// unknown port, a failed ioctl, a vCPU thread that panicked.
    pub fn run_to_end(self, console: &Console) -> Result<RunReport, VmmError> {
        install_kick_handler();
        if self.shared.plan().is_some() {
            install_sigusr1_handler();
            // A SIGUSR1 that came before the run is taken at its start.
            if SIGUSR1_SEEN.swap(false, Ordering::AcqRel) {
                self.shared.snapshot_now.store(true, Ordering::Release);
            }
        }
        let Machine {
            vcpus,
            shared,
            mut counts,
            ..
        } = self;
        if shared.migration_plan().is_some() && MIGRATE_SEEN.swap(false, Ordering::AcqRel) {
            // The signal came before the run: the migration starts with it.
            crate::migrate::start(&shared);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = mpsc::channel::<usize>();
        let mut handles: Vec<JoinHandle<VcpuEnd>> = Vec::new();
        for vcpu in vcpus {
            let (shared, console, vcpu_stop, done) = (
                Arc::clone(&shared),
                console.clone(),
                Arc::clone(&stop),
                done_tx.clone(),
            );
            let index = vcpu.index;
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let end = vcpu_thread(vcpu, &shared, &console, &vcpu_stop);
                    shared.pause.vcpu_ended();
                    if !matches!(end.result, Ok(None)) {
                        // An exit status or a failure ends the whole run.
                        vcpu_stop.store(true, Ordering::Release);
                    }
                    let _ = done.send(index);
                    end
                })
                .map_err(|source| VmmError::Thread {
                    vcpu: index,
                    source,
                });
            match handle {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop.store(true, Ordering::Release);
                    kick_all(&handles);
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        drop(done_tx);
        // Wait for each vCPU to end; the first that ends the run has every
        // other one kicked once.
        // Meanwhile, hand SIGUSR1 to the vCPU (kicked out of KVM_RUN to take
        // the snapshot), and watch a lazy restore: if it fails, the vCPUs
        // are stopped.
        let mut kicked = false;
        let mut lazy_failure = None;
        loop {
            match done_rx.recv_timeout(crate::snapshot::POLL) {
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if SIGUSR1_SEEN.swap(false, Ordering::AcqRel) && shared.plan().is_some() {
                        shared.snapshot_now.store(true, Ordering::Release);
                        kick_all(&handles);
                    }
                    if MIGRATE_SEEN.swap(false, Ordering::AcqRel) {
                        crate::migrate::start(&shared);
                    }
                    if shared.kick_now.swap(false, Ordering::AcqRel) {
                        kick_all(&handles);
                    }
                    if lazy_failure.is_none() {
                        lazy_failure = shared.lock_lazy().as_ref().and_then(|l| l.failure());
                        if lazy_failure.is_some() {
                            stop.store(true, Ordering::Release);
                        }
                    }
                }
            }
            if !kicked && stop.load(Ordering::Acquire) {
                kicked = true;
                kick_all(&handles);
            }
        }
        let mut status = 0;
        let mut first_error = None;
        let mut window: Option<(Instant, Instant)> = None;
        for (index, h) in handles.into_iter().enumerate() {
            let end = h.join().unwrap_or_else(|payload| VcpuEnd {
                counts: ExitCounts::default(),
                result: Err(VmmError::VcpuPanicked {
                    vcpu: index,
                    message: panic_message(&*payload),
                }),
                ran: None,
            });
            counts.merge(&end.counts);
            if let Some((a, b)) = end.ran {
                window = Some(window.map_or((a, b), |(s, e)| (s.min(a), e.max(b))));
            }
            match end.result {
                Ok(Some(s)) if status == 0 => status = s,
                Ok(_) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        shared.run_over.store(true, Ordering::Release);
        let migration_thread = shared
            .migration_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = migration_thread {
            let _ = h.join();
        }
        let (migration, migration_notes) = std::mem::take(&mut *shared.lock_migrated());
        let lost = shared
            .migration_lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(why) = lost {
            return Err(VmmError::MigrationLost { why });
        }
        let lazy = shared.lock_lazy().take();
        let lazy_failure = lazy_failure.or_else(|| lazy.as_ref().and_then(|l| l.failure()));
        if let Some(reason) = lazy_failure {
            return Err(VmmError::LazyRestore { reason });
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let lazy = lazy.map(|l| {
            let p = l.progress();
            let report = LazyReport {
                blocks: p.blocks,
                pending_at_end: p.pending,
                fault_fills: p.fault_fills,
                zero_fills: p.zero_fills,
                host_fills: p.host_fills,
                prefetch_fills: p.prefetch_fills,
                touch_order: l.touch_order().encode(),
            };
            // Dropping it fills what is left (the library's rule), and ends
            // its threads before the gatekeeper goes.
            drop(l);
            report
        });
        let (snapshots, snapshot_notes) =
            std::mem::take(&mut *shared.taken.lock().unwrap_or_else(|e| e.into_inner()));
        let wall_time = window.map_or(Duration::ZERO, |(s, e)| e - s);
        let populated_bytes = shared
            .memory
            .populated()
            .map(|runs| runs.iter().map(|r| r.end - r.start).sum())
            .unwrap_or(0);
        let config = shared.config;
        let devices = shared
            .lock_devices()
            .iter()
            .map(|d| {
                let (first, total) = d.refusals();
                DeviceReport {
                    name: d.name(),
                    status: d.status(),
                    refused: total,
                    refusals: first.to_vec(),
                }
            })
            .collect();
        Ok(RunReport {
            devices,
            status,
            backing: config.backing,
            mem_size: config.mem_size,
            vcpus: config.vcpus,
            policy: config.policy,
            initial: config.initial,
            populated_bytes,
            populated_pages: populated_bytes / gmem::PAGE_SIZE,
            conversions: shared.gate.stats(),
            exits: counts
                .0
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            wall_time_us: u64::try_from(wall_time.as_micros()).unwrap_or(u64::MAX),
            snapshots,
            snapshot_notes,
            stopped_for_snapshot: shared.stopped.load(Ordering::Acquire),
            restored: shared.restored.load(Ordering::Acquire),
            lazy,
            migration,
            migration_notes,
        })
    }
}

fn kick_all(handles: &[JoinHandle<VcpuEnd>]) {
    for h in handles.iter().filter(|h| !h.is_finished()) {
        // SAFETY: the thread is alive (not finished, and not joined while we
        // hold its handle); the signal has a handler that does nothing.
        unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
    }
}
