//! Many VMs across processes, the usual VMM layout: one process per VM,
//! each with 1 GiB of sparse memfd RAM and a vCPU converting a page back and
//! forth. The parent starts the workers (its caller says how: the CLI runs
//! `gmem bench-worker`), waits until every VM is built, then releases them
//! all at once and times them to the last `done`.
//!
//! The protocol, one line each way on the worker's stdio:
//! - worker → parent: `ready <rss KiB> <fds> <VMAs> <machine RSS KiB>
//!   <machine fds> <machine VMAs>` once the VM is built (the whole process,
//!   then the part the machine added);
//! - parent → worker: any line, to start;
//! - worker → parent: `done` when its guest exits 0 (or `error <text>`).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use gmem::BackingKind;

use crate::BenchError;
use crate::guest;
use crate::plan::{Plan, per_s};
use crate::raw::Subject;
use crate::scale::{VM_ROUND_TRIPS, VMS, cost};

/// How many worker processes the per-process cost rows start.
const COST_PROCESSES: usize = 8;

/// Runs one worker: builds the VM, reports `ready` and its costs on stdout,
/// waits for a line on stdin, runs `round_trips` round trips and reports
/// `done`. The CLI's hidden `gmem bench-worker` calls this.
///
/// # Errors
/// A failure to build or run the VM (also reported as `error <text>`), or
/// of the stdio pipes.
pub fn worker(round_trips: u32) -> Result<(), BenchError> {
    let mut out = std::io::stdout().lock();
    let result = worker_inner(round_trips, &mut out);
    if let Err(e) = &result {
        let _ = writeln!(out, "error {e}");
    }
    result
}

fn worker_inner(round_trips: u32, out: &mut impl Write) -> Result<(), BenchError> {
    let before = cost();
    let mut m = guest::round_trip_machine(BackingKind::Memfd, 1 << 30, round_trips)?;
    let after = cost();
    writeln!(
        out,
        "ready {} {} {} {} {} {}",
        after.rss_kib,
        after.fds,
        after.vmas,
        after.rss_kib.saturating_sub(before.rss_kib),
        after.fds.saturating_sub(before.fds),
        after.vmas.saturating_sub(before.vmas),
    )?;
    out.flush()?;
    let mut go = String::new();
    if std::io::stdin().lock().read_line(&mut go)? == 0 {
        return Err(BenchError::Guest(
            "the parent closed stdin before starting the worker".into(),
        ));
    }
    guest::run_to_exit(&mut m)?;
    writeln!(out, "done")?;
    out.flush()?;
    Ok(())
}

/// One started worker; killed and reaped on drop unless it finished.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    fn spawn(command: &[OsString]) -> Result<Worker, BenchError> {
        let (program, args) = command
            .split_first()
            .ok_or_else(|| BenchError::Invalid("an empty worker command".into()))?;
        let mut child = Command::new(program)
            .args(args)
            .arg(VM_ROUND_TRIPS.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(BenchError::Guest("a worker without pipes".into()));
        };
        Ok(Worker {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
        })
    }

    /// The worker's next line, which must start with `want`; its words after.
    fn expect(&mut self, want: &str) -> Result<Vec<u64>, BenchError> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some(w) if w == want => words
                .map(|w| {
                    w.parse()
                        .map_err(|_| BenchError::Guest(format!("worker sent {line:?}")))
                })
                .collect(),
            _ => Err(BenchError::Guest(format!(
                "worker {} sent {:?}, not {want}",
                self.child.id(),
                line.trim_end()
            ))),
        }
    }

    fn start(&mut self) -> Result<(), BenchError> {
        let mut stdin = self
            .stdin
            .take()
            .ok_or_else(|| BenchError::Guest("worker started twice".into()))?;
        writeln!(stdin, "go")?;
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A worker that finished exits by itself; one that did not is
        // killed (before its stdin closes, so that it does not report the
        // parent gone). Either way it is reaped here.
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// `n` workers, each built and reported ready; with their `ready` words.
fn start_workers(
    command: &[OsString],
    n: usize,
) -> Result<(Vec<Worker>, Vec<Vec<u64>>), BenchError> {
    let mut workers = Vec::with_capacity(n);
    for _ in 0..n {
        workers.push(Worker::spawn(command)?);
    }
    let ready = workers
        .iter_mut()
        .map(|w| w.expect("ready"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((workers, ready))
}

/// The aggregate round trips per second of `n` worker processes.
fn rate(command: &[OsString], n: usize) -> Result<f64, BenchError> {
    let (mut workers, _) = start_workers(command, n)?;
    let start = Instant::now();
    for w in &mut workers {
        w.start()?;
    }
    for w in &mut workers {
        w.expect("done")?;
    }
    let d = start.elapsed();
    for w in &mut workers {
        let status = w.child.wait()?;
        if !status.success() {
            return Err(BenchError::Guest(format!("a worker exited {status}")));
        }
    }
    Ok(per_s(n as u64 * u64::from(VM_ROUND_TRIPS), d))
}

/// The mean over [`COST_PROCESSES`] workers of word `index` of `ready`.
fn process_cost(command: &[OsString], index: usize) -> Result<f64, BenchError> {
    let (workers, ready) = start_workers(command, COST_PROCESSES)?;
    drop(workers);
    let sum: u64 = ready
        .iter()
        .map(|words| words.get(index).copied().unwrap_or(0))
        .sum();
    Ok(sum as f64 / COST_PROCESSES as f64)
}

/// The rows, if the caller gave a worker command; memfd only, like the
/// in-process rows they sit beside.
pub(crate) fn plans(backings: &[BackingKind], command: Option<&[OsString]>) -> Vec<Plan> {
    let Some(command) = command else {
        return Vec::new();
    };
    if !backings.contains(&BackingKind::Memfd) {
        return Vec::new();
    }
    let s = Subject::Backing(BackingKind::Memfd);
    let mut plans = Vec::new();
    for n in VMS {
        let command = command.to_vec();
        plans.push(
            Plan::new(
                format!("{n} VM processes, aggregate round trips"),
                s,
                "round trips/s",
                true,
            )
            .gmem(move || rate(&command, n))
            .note("one gmem process per VM (1 GiB sparse RAM, one vCPU converting a page back and forth), all at once"),
        );
    }
    for (index, what, unit, note) in [
        (0, "RSS", "KiB", "the whole process"),
        (1, "fds", "fds", "the whole process"),
        (2, "VMAs", "VMAs", "the whole process"),
        (3, "machine RSS", "KiB", "what the VM added to its process"),
    ] {
        let command = command.to_vec();
        plans.push(
            Plan::new(format!("VM process, {what}"), s, unit, false)
                .gmem(move || process_cost(&command, index))
                .note(format!(
                    "{note}, before it runs; mean of {COST_PROCESSES} processes"
                )),
        );
    }
    plans
}
