//! Live migration of a whole machine between processes (or hosts), pre-copy:
//! guest memory through the library's stream (`gmem::migrate`), and at the
//! stop-and-copy the VMM state beside it ([`crate::state`], the snapshot's).
//!
//! **Source** ([`Machine::set_migration_plan`]): the plan's signal starts a
//! migration thread, which connects to the destination and sends pre-copy
//! rounds while the guest runs; then it asks every vCPU to pause
//! (the rendezvous in `pause.rs`: the runner kicks them out of `KVM_RUN`), each hands
//! over its state and waits, and the thread sends the last dirty pages,
//! the attribute map and the state.
//! If the destination answers [`ACK_RUNNING`] (and the go-ahead reaches
//! it: [`gmem::migrate::GO_AHEAD`]; without it the destination never runs
//! the guest),
//! the run ends there (status 0); on any failure (the connection drops,
//! the destination refuses or dies, a timeout) the vCPUs resume the guest
//! as if nothing had happened, and the run's report says why.
//!
//! **Destination** ([`Machine::incoming`]): reads the header, builds a
//! machine of its layout, receives every record, and only then sets the
//! vCPUs and devices: a machine is never run on a stream it has not wholly
//! received.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gmem::BackingKind;
use gmem::migrate::{ACK_RUNNING, GO_AHEAD, Incoming, MigrationOptions};
use gmem::snapshot::SealKey;

use crate::config::MachineConfig;
use crate::console::Console;
use crate::error::VmmError;
use crate::machine::Machine;
pub use crate::migrate_plan::{Endpoint, MigrationPlan, MigrationTaken, PostcopyTaken, RoundTaken};
use crate::pause::{AllPaused, Verdict};
use crate::shared::Shared;
use crate::state::VmmState;

/// How long either side waits on the connection before it gives up (a
/// destination that stalls cannot hold the source's guest paused longer).
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest the source holds its vCPUs paused for a stop-and-copy or a
/// post-copy switch, however slowly the destination reads (each read and
/// write has [`IO_TIMEOUT`]; this bounds them all): then the connection is
/// shut down, the destination gets a cut stream (and never runs the
/// guest), and the guest runs on here. (Should the watch fire just as a
/// post-copy go-ahead went out, the guest is lost instead: never run
/// twice.)
pub const MAX_PAUSE: Duration = Duration::from_secs(60);

/// Shuts `conn` down unless dropped within [`MAX_PAUSE`]: the bound on a
/// pause (see there).
struct PauseWatch(Option<mpsc::Sender<()>>);

impl PauseWatch {
    fn start(conn: Connection) -> PauseWatch {
        let (tx, rx) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("gmem-pause-watch".into())
            .spawn(move || {
                if rx.recv_timeout(MAX_PAUSE) == Err(mpsc::RecvTimeoutError::Timeout) {
                    conn.shutdown();
                }
            });
        // Without its thread there is no bound beyond IO_TIMEOUT per call.
        PauseWatch(spawned.ok().map(|_| tx))
    }

    /// The pause is over: the watch stands down.
    fn stand_down(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for PauseWatch {
    fn drop(&mut self) {
        self.stand_down();
    }
}

/// A migration connection: a Unix or TCP stream.
#[derive(Debug)]
pub enum Connection {
    /// A Unix stream socket.
    Unix(UnixStream),
    /// A TCP stream.
    Tcp(TcpStream),
}

impl Connection {
    /// A second handle on the same connection (one reads, one writes).
    ///
    /// # Errors
    /// `dup`'s.
    pub fn try_clone(&self) -> std::io::Result<Connection> {
        Ok(match self {
            Connection::Unix(s) => Connection::Unix(s.try_clone()?),
            Connection::Tcp(s) => Connection::Tcp(s.try_clone()?),
        })
    }

    /// Shuts both directions down: a read or write blocked on it (in any
    /// handle) fails at once.
    pub fn shutdown(&self) {
        let _ = match self {
            Connection::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Connection::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Sets both timeouts.
    ///
    /// # Errors
    /// `setsockopt`'s.
    pub fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Connection::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Connection::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Connection::Unix(s) => s.read(buf),
            Connection::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Connection::Unix(s) => s.write(buf),
            Connection::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Connection::Unix(s) => s.flush(),
            Connection::Tcp(s) => s.flush(),
        }
    }
}

impl Endpoint {
    /// Connects to a listening destination.
    ///
    /// # Errors
    /// [`VmmError::MigrationIo`].
    pub fn connect(&self) -> Result<Connection, VmmError> {
        let io = |source| VmmError::MigrationIo {
            what: format!("connecting to {self}"),
            source,
        };
        Ok(match self {
            Endpoint::Unix(p) => Connection::Unix(UnixStream::connect(p).map_err(io)?),
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, IO_TIMEOUT).map_err(io)?;
                // Records are written whole through a buffer: no Nagle delay.
                s.set_nodelay(true).map_err(io)?;
                Connection::Tcp(s)
            }
        })
    }

    /// Listens here (a stale Unix socket file is replaced) and accepts one
    /// connection.
    ///
    /// # Errors
    /// [`VmmError::MigrationIo`].
    pub fn accept_one(&self) -> Result<Connection, VmmError> {
        let io = |what: &str| {
            let what = format!("{what} {self}");
            move |source| VmmError::MigrationIo { what, source }
        };
        Ok(match self {
            Endpoint::Unix(p) => {
                if std::fs::symlink_metadata(p)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    std::fs::remove_file(p).map_err(io("removing the old socket"))?;
                }
                let l = UnixListener::bind(p).map_err(io("listening on"))?;
                let (s, _) = l.accept().map_err(io("accepting on"))?;
                drop(l);
                let _ = std::fs::remove_file(p);
                Connection::Unix(s)
            }
            Endpoint::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(io("listening on"))?;
                let (s, _) = l.accept().map_err(io("accepting on"))?;
                s.set_nodelay(true).map_err(io("configuring"))?;
                Connection::Tcp(s)
            }
        })
    }
}

/// `CLOCK_MONOTONIC` in ns: the same clock in every process of a host.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Starts the migration thread for the run's plan, unless one is running
/// (a second signal meanwhile is ignored).
pub(crate) fn start(shared: &Arc<Shared>) {
    let Some(plan) = shared.migration_plan() else {
        return;
    };
    if shared.migrating.swap(true, Ordering::AcqRel) {
        return;
    }
    let s = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("gmem-migrate".into())
        .spawn(move || {
            let result = run_source(&s, &plan);
            match result {
                Ok(taken) => s.lock_migrated().0 = Some(taken),
                Err(why) => s.lock_migrated().1.push(format!(
                    "the migration to {} failed, and the guest ran on: {why}",
                    plan.to
                )),
            }
            s.migrating.store(false, Ordering::Release);
        });
    match spawned {
        Ok(h) => {
            *shared
                .migration_thread
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(h)
        }
        Err(e) => {
            shared.migrating.store(false, Ordering::Release);
            shared
                .lock_migrated()
                .1
                .push(format!("no migration: its thread could not start ({e})"));
        }
    }
}

/// The source's migration thread: pre-copy, the pause, the stop-and-copy,
/// the destination's answer. `Err` with why if the guest is to run on.
fn run_source(shared: &Shared, plan: &MigrationPlan) -> Result<MigrationTaken, String> {
    let started = Instant::now();
    if shared.pause.any_ended() {
        return Err("a vCPU has ended: a migration needs every vCPU running".into());
    }
    let conn = plan.to.connect().map_err(|e| error_text(&e))?;
    conn.set_timeouts(Some(IO_TIMEOUT))
        .map_err(|e| format!("configuring the connection: {e}"))?;
    let mut reader = conn
        .try_clone()
        .map_err(|e| format!("duplicating the connection: {e}"))?;
    let mut opts = MigrationOptions::new()
        .with_max_rounds(plan.max_rounds)
        .with_converge_bytes(plan.converge_bytes);
    if let Some(k) = &plan.key {
        opts = opts.with_key(k.clone());
    }
    let w = BufWriter::with_capacity(1 << 20, conn);
    let mut source = shared
        .gate
        .migrate_to(w, opts)
        .map_err(|e| error_text(&e))?;
    let mut rounds = Vec::new();
    // Post-copy moves the guest after one round.
    while !source.precopy_done() && (!plan.postcopy || rounds.is_empty()) {
        if shared.run_over.load(Ordering::Acquire) {
            return Err("the guest ended during pre-copy".into());
        }
        let r = source.send_round().map_err(|e| error_text(&e))?;
        rounds.push(RoundTaken {
            data_bytes: r.data_bytes,
            dirty_after: r.dirty_after,
            us: micros(r.elapsed),
        });
    }
    let precopy = started.elapsed();
    // The pause: every vCPU takes the request at its next exit.
    // A guest's snapshot may be pausing them: wait for it, within the
    // pause's own deadline.
    let asked = Instant::now();
    let mut all = loop {
        match shared.pause.pause_all(
            shared.config.vcpus as usize,
            || shared.kick_now.store(true, Ordering::Release),
            || shared.run_over.load(Ordering::Acquire),
        ) {
            Ok(all) => break all,
            Err(r) if r.busy && asked.elapsed() < crate::pause::PAUSE_TIMEOUT => {
                std::thread::sleep(crate::snapshot::POLL);
            }
            Err(r) => return Err(r.why),
        }
    };
    let mut watch = PauseWatch::start(
        reader
            .try_clone()
            .map_err(|e| format!("duplicating the connection: {e}"))?,
    );
    let state = crate::snapshot::encode_state(
        shared,
        std::mem::take(&mut all.vcpus)
            .into_iter()
            .map(|(_, v)| v)
            .collect(),
    )
    .map_err(|e| format!("the machine's state could not be saved: {}", error_text(&e)))?;
    // The vCPUs wait for the verdict from here on: `all` gives one on
    // every path (its drop resumes them).
    if plan.postcopy {
        return postcopy(
            shared, plan, source, state, &all, &mut watch, rounds, reader, started, precopy,
        );
    }
    let outcome = source
        .complete(&state)
        .map_err(|e| error_text(&e))
        .and_then(|(report, mut w)| {
            let mut ack = [0u8; 1];
            match reader.read_exact(&mut ack) {
                Ok(()) if ack[0] == ACK_RUNNING => {}
                Ok(()) => {
                    return Err(format!(
                        "the destination refused the stream (answer {:#x})",
                        ack[0]
                    ));
                }
                Err(e) => return Err(format!("no answer from the destination: {e}")),
            }
            // The commit: once the go-ahead is out, this side never
            // resumes the guest. If it cannot be sent, the destination
            // never runs it, and the guest runs on here.
            w.write_all(&[GO_AHEAD])
                .and_then(|()| w.flush())
                .map_err(|e| format!("sending the go-ahead: {e}"))?;
            Ok(report)
        });
    watch.stand_down();
    let downtime = all.at.elapsed();
    match outcome {
        Ok(report) => {
            all.decide(Verdict::End);
            let guest_bytes = shared.config.mem_size;
            Ok(MigrationTaken {
                to: plan.to.to_string(),
                rounds,
                final_data_bytes: report.final_data_bytes,
                stream_bytes: report.stream_bytes,
                guest_bytes,
                bytes_per_guest_byte: report.stream_bytes as f64 / guest_bytes as f64,
                sealed_bytes: report.sealed_bytes,
                precopy_us: micros(precopy),
                downtime_us: micros(downtime),
                total_us: micros(started.elapsed()),
                paused_at_ns: all.at_ns,
                postcopy: None,
            })
        }
        Err(why) => {
            all.decide(Verdict::Resume);
            Err(why)
        }
    }
}

/// The switch to post-copy and the post-copy phase: the vCPUs end once
/// the destination runs the guest; a failure before that resumes them
/// here, one after it loses the guest (the run ends with the error).
#[allow(clippy::too_many_arguments)]
fn postcopy(
    shared: &Shared,
    plan: &MigrationPlan,
    source: gmem::migrate::MigrationSource<BufWriter<Connection>>,
    state: Vec<u8>,
    all: &AllPaused<'_>,
    watch: &mut PauseWatch,
    rounds: Vec<RoundTaken>,
    reader: Connection,
    started: Instant,
    precopy: Duration,
) -> Result<MigrationTaken, String> {
    let ps = match source.switch_to_postcopy(&state) {
        Ok(ps) => ps,
        Err(e) => {
            all.decide(Verdict::Resume);
            return Err(error_text(&e));
        }
    };
    let mut downtime = None;
    let result = ps.serve(reader, || {
        // The pause ends here: the rest is served while the guest runs
        // there.
        watch.stand_down();
        downtime = Some(all.at.elapsed());
        all.decide(Verdict::End);
    });
    let took_over = downtime.is_some();
    match result {
        Ok(report) => {
            let guest_bytes = shared.config.mem_size;
            Ok(MigrationTaken {
                to: plan.to.to_string(),
                rounds,
                final_data_bytes: report.data_bytes,
                stream_bytes: report.stream_bytes,
                guest_bytes,
                bytes_per_guest_byte: report.stream_bytes as f64 / guest_bytes as f64,
                sealed_bytes: report.switch.sealed_bytes,
                precopy_us: micros(precopy),
                downtime_us: micros(downtime.unwrap_or_default()),
                total_us: micros(started.elapsed()),
                paused_at_ns: all.at_ns,
                postcopy: Some(PostcopyTaken {
                    blocks: report.blocks,
                    requested: report.requested,
                    data_bytes: report.data_bytes,
                    elapsed_us: micros(report.elapsed),
                }),
            })
        }
        Err(e) if took_over => {
            let why = error_text(&e);
            *shared
                .migration_lost
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
            Err(why)
        }
        Err(e) => {
            all.decide(Verdict::Resume);
            Err(error_text(&e))
        }
    }
}

/// An error with its sources, on one line.
fn error_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How [`Machine::incoming`] builds the machine.
#[derive(Clone)]
pub struct IncomingOptions {
    /// Guest RAM's backing [default: the source's].
    pub backing: Option<BackingKind>,
    /// Where the console devices write.
    pub console: Console,
    /// Replaces the source's disk image path (the image must hold what the
    /// source's did).
    pub disk: Option<std::path::PathBuf>,
}

/// How an incoming migration went.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IncomingSummary {
    /// Where it came from.
    pub from: String,
    /// From the first byte to the machine built, in µs.
    pub receive_us: u64,
    /// Bytes of stream.
    pub stream_bytes: u64,
    /// Pre-copy rounds.
    pub rounds: u64,
    /// Bytes of VMM state.
    pub state_bytes: usize,
    /// The backing of guest RAM.
    pub backing: BackingKind,
    /// Whether the source switched to post-copy (the rest comes in while
    /// the guest runs).
    pub postcopy: bool,
    /// `CLOCK_MONOTONIC` when the guest resumed here, in ns (set by the
    /// caller when it runs the machine).
    pub resumed_at_ns: u64,
}

impl Machine {
    /// Migrates the machine to `plan.to` when the process gets
    /// `plan.signal` during [`run_to_end`](Self::run_to_end): the signal's
    /// handler is installed at once. A run that migrated ends with status 0
    /// and its report's `migration`; a failed migration is in its
    /// `migration_notes`, and the guest runs on.
    pub fn set_migration_plan(&mut self, plan: Option<MigrationPlan>) {
        if let Some(p) = &plan {
            crate::runner::install_migrate_handler(p.signal);
        }
        *self
            .shared
            .migration
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = plan;
    }

    /// Builds a machine from the migration stream on `conn`: reads the
    /// header, builds a machine of its layout (on `opts.backing`, or the
    /// source's), receives every record (checked, under `key` if the
    /// stream is sealed), then sets the vCPUs and devices from the state.
    /// The caller answers the source
    /// ([`answer_running`](Self::answer_running): [`ACK_RUNNING`], then
    /// the source's go-ahead) and only then runs it.
    ///
    /// # Errors
    /// [`VmmError::Migrate`] for a stream the library refuses (cut, flipped,
    /// forged, a wrong or missing key), [`VmmError::MigrationStream`] for
    /// a layout this VMM does not build, [`VmmError::State`],
    /// [`VmmError::DeviceState`], [`VmmError::RestoreVcpu`]; nothing runs
    /// on any error.
    pub fn incoming(
        conn: &Connection,
        from: &Endpoint,
        key: Option<&SealKey>,
        opts: &IncomingOptions,
    ) -> Result<(Machine, IncomingSummary, Answer), VmmError> {
        let started = Instant::now();
        let dup = conn.try_clone().map_err(|source| VmmError::MigrationIo {
            what: "duplicating the connection".into(),
            source,
        })?;
        let back = conn.try_clone().map_err(|source| VmmError::MigrationIo {
            what: "duplicating the connection".into(),
            source,
        })?;
        let mut r = BufReader::with_capacity(1 << 20, dup);
        let incoming = Incoming::read_header(&mut r).map_err(VmmError::Migrate)?;
        let (mem_size, source_backing) = match incoming.regions().as_slice() {
            [(0, len, backing)] => (*len, *backing),
            regions => {
                return Err(VmmError::MigrationStream {
                    what: format!(
                        "it has {} regions, the first at {:#x}; this VMM's machines have one, at GPA 0",
                        regions.len(),
                        regions.first().map_or(0, |r| r.0)
                    ),
                });
            }
        };
        let backing = opts.backing.unwrap_or(source_backing);
        let policy = incoming.conversion();
        let config = MachineConfig {
            policy,
            ..MachineConfig::new(backing, mem_size)
        };
        let mut machine = Machine::bare(config)?;
        let received = incoming
            .receive_with_postcopy(&machine.shared.gate, r, back, key)
            .map_err(VmmError::Migrate)?;
        let report = received.report;
        let answer = Answer {
            postcopy: received.postcopy,
        };
        match Self::incoming_state(&mut machine, &report, mem_size, policy, backing, opts) {
            Ok(()) => {}
            Err(e) => {
                // Dropping the answer refuses a post-copy source.
                drop(answer);
                return Err(e);
            }
        }
        let summary = IncomingSummary {
            from: from.to_string(),
            receive_us: micros(started.elapsed()),
            stream_bytes: report.stream_bytes,
            rounds: report.rounds,
            state_bytes: report.state.len(),
            backing,
            postcopy: answer.postcopy.is_some(),
            resumed_at_ns: 0,
        };
        Ok((machine, summary, answer))
    }

    /// The vCPUs and devices of an incoming machine, from its state.
    fn incoming_state(
        machine: &mut Machine,
        report: &gmem::migrate::IncomingReport,
        mem_size: u64,
        policy: gmem::Policy,
        backing: BackingKind,
        opts: &IncomingOptions,
    ) -> Result<(), VmmError> {
        let state = VmmState::decode(&report.state)?;
        if state.config.mem_size != mem_size || state.config.policy != policy {
            return Err(VmmError::MigrationStream {
                what: format!(
                    "its state says {:#x} bytes of RAM and the {} policy, its header {mem_size:#x} and {policy}",
                    state.config.mem_size, state.config.policy
                ),
            });
        }
        machine.take_state(&state, backing, &opts.console, opts.disk.as_deref())?;
        machine.launched = true;
        machine.shared.restored.store(true, Ordering::Release);
        Ok(())
    }

    /// Tells the source this machine is ready to run the guest (the
    /// answer of [`incoming`](Self::incoming)) and waits for its go-ahead
    /// (at most the connection's timeout): after it, the source never
    /// resumes the guest, and the caller runs it. Under post-copy, the
    /// restore that fills the rest is kept with the machine. Without the
    /// go-ahead, do not run the guest (the source may resume it).
    ///
    /// # Errors
    /// [`VmmError::MigrationIo`]: the source could not be told, or sent no
    /// go-ahead.
    pub fn answer_running(
        &mut self,
        conn: &mut Connection,
        mut answer: Answer,
    ) -> Result<(), VmmError> {
        let io = |source| VmmError::MigrationIo {
            what: "answering the source".into(),
            source,
        };
        match answer.postcopy.take() {
            None => {
                conn.write_all(&[ACK_RUNNING])
                    .and_then(|()| conn.flush())
                    .map_err(io)?;
                let mut go = [0u8; 1];
                match conn.read_exact(&mut go) {
                    Ok(()) if go[0] == GO_AHEAD => Ok(()),
                    Ok(()) => Err(VmmError::MigrationStream {
                        what: format!(
                            "the source answered {:#x}, not the go-ahead: the guest is not run here",
                            go[0]
                        ),
                    }),
                    Err(source) => Err(VmmError::MigrationIo {
                        what: "waiting for the source's go-ahead".into(),
                        source,
                    }),
                }
            }
            Some(p) => match p.answer_running() {
                Ok(()) => {
                    *self.shared.lock_lazy() = Some(p.into_restore());
                    Ok(())
                }
                Err(e) => {
                    // The source may resume the guest if it has not
                    // committed yet.
                    p.answer_failed();
                    Err(io(e))
                }
            },
        }
    }
}

/// What the destination answers the source with, once it has built the
/// machine ([`Machine::answer_running`]). Dropped unanswered, it tells a
/// post-copy source the guest is not run here (so the source resumes it);
/// a pre-copy source resumes on the caller's refusal or on no answer.
#[derive(Debug)]
pub struct Answer {
    postcopy: Option<gmem::migrate::Postcopy>,
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(p) = self.postcopy.take() {
            p.answer_failed();
        }
    }
}
