//! Running a launched machine to the end: one thread per vCPU, the run's
//! status, and the report.

use std::collections::BTreeMap;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gmem::{Attribute, BackingKind, ConversionStats, Policy};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::console::Console;
use crate::error::VmmError;
use crate::machine::Machine;
use crate::vcpu::{ExitCounts, Step, run_once};

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
    /// Wall time from the first `KVM_RUN` to the last vCPU's end, in µs.
    pub wall_time_us: u64,
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An empty handler: its only effect is that KVM_RUN returns EINTR.
        let _ = register_signal_handler(kick_signal(), on_kick);
    });
}

type VcpuResult = (ExitCounts, Result<Option<i32>, VmmError>);

impl Machine {
    /// Runs every vCPU on a thread of its own until the guest ends the run
    /// (port 0xf4), every vCPU has halted, or one fails; then reports.
    ///
    /// # Errors
    /// The first vCPU's failure: a guest crash (with its registers), an
    /// unknown port, a failed ioctl.
    pub fn run_to_end(self, console: &Console) -> Result<RunReport, VmmError> {
        install_kick_handler();
        let Machine {
            vcpus,
            shared,
            mut counts,
            ..
        } = self;
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let mut handles: Vec<JoinHandle<VcpuResult>> = Vec::new();
        for mut vcpu in vcpus {
            let (shared, console, vcpu_stop) =
                (Arc::clone(&shared), console.clone(), Arc::clone(&stop));
            let index = vcpu.index;
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let mut counts = ExitCounts::default();
                    let result = loop {
                        if vcpu_stop.load(Ordering::Acquire) {
                            break Ok(None);
                        }
                        match run_once(&mut vcpu, &shared, &console, &mut counts) {
                            Ok(Step::Continue(_) | Step::Interrupted) => {}
                            Ok(Step::Halted) => break Ok(None),
                            Ok(Step::Exit(status)) => {
                                vcpu_stop.store(true, Ordering::Release);
                                break Ok(Some(status));
                            }
                            Err(e) => {
                                vcpu_stop.store(true, Ordering::Release);
                                break Err(e);
                            }
                        }
                    };
                    (counts, result)
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
        // Wait; once one vCPU ends the run, kick the others out of KVM_RUN
        // until they notice.
        while handles.iter().any(|h| !h.is_finished()) {
            if stop.load(Ordering::Acquire) {
                kick_all(&handles);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let wall_time = start.elapsed();
        let mut status = 0;
        let mut first_error = None;
        for h in handles {
            let (vcpu_counts, result) = h.join().unwrap_or_else(|_| {
                (ExitCounts::default(), Ok(None)) // a vCPU thread never panics on guest input
            });
            counts.merge(&vcpu_counts);
            match result {
                Ok(Some(s)) if status == 0 => status = s,
                Ok(_) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let populated_bytes = shared
            .memory
            .populated()
            .map(|runs| runs.iter().map(|r| r.end - r.start).sum())
            .unwrap_or(0);
        let config = shared.config;
        Ok(RunReport {
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
        })
    }
}

fn kick_all(handles: &[JoinHandle<VcpuResult>]) {
    for h in handles.iter().filter(|h| !h.is_finished()) {
        // SAFETY: the thread is alive (not finished, and not joined while we
        // hold its handle); the signal has a handler that does nothing.
        unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
    }
}
