//! Live migration (pre-copy) of a 1 GiB memfd guest, an eighth of it
//! private and sealed, over a Unix socket pair to a destination gatekeeper
//! in another thread, while a host thread dirties shared memory through
//! `Gatekeeper::write` at a chosen rate (the stand-in for a running guest:
//! it is a host thread, not a vCPU, so KVM's dirty log is not in these
//! figures). Each migration gives four figures:
//!
//! - **downtime**: from the moment the dirtier has stopped and
//!   `MigrationSource::complete` starts (the stand-in for the vCPUs'
//!   pause) to the destination's `Incoming::receive` returning;
//! - **total time**: from `migrate_to` to the destination's return;
//! - **bytes sent per byte of guest memory**;
//! - **pre-copy rounds**.
//!
//! The raw baseline beside each time is the same number of bytes sent with
//! `sendfile(2)` from a populated memfd over the same kind of socket (a
//! `UnixStream::pair()`), to a reader thread that only counts them.
//!
//! One migration per rep serves the four rows of its rate: the rows read a
//! shared cache, so each rep's figures come from one run.
//!
//! **Post-copy** rows migrate the same guest with one pre-copy round, then
//! the switch (`switch_to_postcopy`), the destination answering that it
//! runs the guest (`receive_with_postcopy`, `answer_running`) and the
//! source serving the rest (`PostcopySource::serve`): downtime is the
//! pause to the destination's answer; total time runs until every block is
//! in; the fault latency is a host read at the destination of the last
//! page the dirtier wrote (in a block not yet in: a request over the back
//! channel, and the block's 2 MiB), beside a raw request of 8 bytes
//! answered with 2 MiB over the same kind of socket.

use std::cell::RefCell;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gmem::migrate::{Incoming, MigrationOptions};
use gmem::snapshot::SealKey;
use gmem::{Attribute, BackingKind};

use super::file::bound;
use crate::BenchError;
use crate::plan::PAGE;
use crate::raw;

/// The guest: 1 GiB of memfd, every page populated.
pub(crate) const GUEST: u64 = 1 << 30;
/// The share kept private (sealed in transit): an eighth, at the start.
const PRIVATE_SHARE: u64 = 8;
/// What the source hands over as its vCPU and device state.
const STATE: &[u8] = &[0x5c; 4096];

fn key() -> SealKey {
    SealKey::new([0x3c; 32])
}

fn invalid(e: impl std::fmt::Display) -> BenchError {
    BenchError::Invalid(e.to_string())
}

/// How fast the host thread dirties memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rate {
    /// No dirtier.
    Idle,
    /// At most this many bytes a second.
    BytesPerSec(u64),
    /// As fast as one thread writes: faster than the socket carries.
    Unthrottled,
}

impl Rate {
    /// The rows' name for it.
    pub(crate) fn label(self) -> String {
        match self {
            Rate::Idle => "idle".into(),
            Rate::BytesPerSec(b) => format!("{} MiB/s dirtied", b >> 20),
            Rate::Unthrottled => "dirtied faster than the link".into(),
        }
    }
}

/// Pre-copy, or post-copy after one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Rounds until converged, then the stop-and-copy.
    Precopy,
    /// One round, the switch, then the rest on demand and pushed.
    Postcopy,
}

impl Mode {
    /// The rows' name for it.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Mode::Precopy => "pre-copy",
            Mode::Postcopy => "post-copy",
        }
    }
}

/// What one migration measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Figures {
    pub(crate) downtime: Duration,
    pub(crate) total: Duration,
    /// Bytes of the whole stream.
    pub(crate) stream_bytes: u64,
    /// Bytes of stream the stop-and-copy wrote.
    pub(crate) final_bytes: u64,
    pub(crate) rounds: usize,
    /// Post-copy: a host read at the destination of a page not yet in.
    pub(crate) fault: Option<Duration>,
}

/// The migrations of one rate, rep by rep, shared by its rows.
pub(crate) struct Runs {
    rate: Rate,
    mode: Mode,
    figures: Vec<Figures>,
}

pub(crate) type Shared = Rc<RefCell<Runs>>;

pub(crate) fn runs(rate: Rate, mode: Mode) -> Shared {
    Rc::new(RefCell::new(Runs {
        rate,
        mode,
        figures: Vec::new(),
    }))
}

/// The figures of rep `i` (from 0, the warm-up), migrating once more if no
/// row has asked for that rep yet.
pub(crate) fn figures(shared: &Shared, i: usize) -> Result<Figures, BenchError> {
    let (rate, mode) = (shared.borrow().rate, shared.borrow().mode);
    while shared.borrow().figures.len() <= i {
        let f = match mode {
            Mode::Precopy => migrate_once(rate)?,
            Mode::Postcopy => postcopy_once(rate)?,
        };
        shared.borrow_mut().figures.push(f);
    }
    Ok(shared.borrow().figures[i])
}

/// A small deterministic generator for the dirtier's pages.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Writes 4 KiB pages of the shared part at random until `stop`, at most
/// `rate` bytes a second (checked every millisecond). The bytes written,
/// and the last page written.
fn dirty(
    gate: &gmem::Gatekeeper,
    rate: Rate,
    stop: &AtomicBool,
) -> Result<(u64, Option<u64>), BenchError> {
    let page = [0xa5u8; PAGE as usize];
    let shared_from = GUEST / PRIVATE_SHARE / PAGE;
    let pages = GUEST / PAGE - shared_from;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let start = Instant::now();
    let mut written = 0u64;
    let mut last = None;
    while !stop.load(Ordering::Acquire) {
        let allowed = match rate {
            Rate::Idle => return Ok((0, None)),
            Rate::Unthrottled => u64::MAX,
            Rate::BytesPerSec(b) => (start.elapsed().as_secs_f64() * b as f64) as u64,
        };
        if written >= allowed {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let gpa = (shared_from + xorshift(&mut x) % pages) * PAGE;
        gate.write(gpa, &page)?;
        written += PAGE;
        last = Some(gpa);
    }
    Ok((written, last))
}

/// One migration of a fresh, fully populated guest with the dirtier at
/// `rate`: pre-copy rounds (the defaults: at most 30, converged at 4 MiB
/// left), the dirtier stopped, then the stop-and-copy.
fn migrate_once(rate: Rate) -> Result<Figures, BenchError> {
    let src = bound(BackingKind::Memfd, GUEST)?;
    src.gate.fill(0, GUEST, 0x5a)?;
    src.gate
        .convert(0, GUEST / PRIVATE_SHARE, Attribute::Private)?;
    let dst = bound(BackingKind::Memfd, GUEST)?;
    let (a, b) = UnixStream::pair()?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let dest = s.spawn(|| {
            // Unbuffered on both sides, as a VMM would hand over its
            // socket: a buffer would hold pre-copy bytes back until the
            // stop-and-copy, and count them as downtime.
            let mut r = b;
            let result = Incoming::read_header(&mut r)
                .and_then(|inc| inc.receive(&dst.gate, &mut r, Some(&key())));
            (result, Instant::now())
        });
        let dirtier = s.spawn(|| dirty(&src.gate, rate, &stop));
        let started = Instant::now();
        let sent = (|| {
            let mut m = src
                .gate
                .migrate_to(a, MigrationOptions::new().with_key(key()))?;
            m.precopy()?;
            let precopy_bytes = m.stream_bytes();
            Ok::<_, gmem::migrate::MigrateError>((m, precopy_bytes))
        })();
        // The pause: the dirtier (the guest's stand-in) stops first.
        stop.store(true, Ordering::Release);
        let dirtied = dirtier.join();
        let (m, precopy_bytes) = sent.map_err(invalid)?;
        dirtied.map_err(|_| invalid("the dirtier panicked"))??;
        let paused = Instant::now();
        let (report, _w) = m.complete(STATE).map_err(invalid)?;
        let (received, done) = dest
            .join()
            .map_err(|_| invalid("the destination panicked"))?;
        let received = received.map_err(invalid)?;
        if received.state != STATE {
            return Err(invalid("the destination got another state"));
        }
        Ok(Figures {
            downtime: done.saturating_duration_since(paused),
            total: done.saturating_duration_since(started),
            stream_bytes: report.stream_bytes,
            final_bytes: report.stream_bytes - precopy_bytes,
            rounds: report.rounds.len(),
            fault: None,
        })
    })
}

/// One post-copy migration of a fresh, fully populated guest with the
/// dirtier at `rate`: one pre-copy round, the dirtier stopped, the switch,
/// the destination's answer, then the rest served.
fn postcopy_once(rate: Rate) -> Result<Figures, BenchError> {
    let src = bound(BackingKind::Memfd, GUEST)?;
    src.gate.fill(0, GUEST, 0x5a)?;
    src.gate
        .convert(0, GUEST / PRIVATE_SHARE, Attribute::Private)?;
    let dst = bound(BackingKind::Memfd, GUEST)?;
    let (a, b) = UnixStream::pair()?;
    let back = a.try_clone()?;
    let stop = AtomicBool::new(false);
    let dst_gate = dst.gate.clone();
    let (last_tx, last_rx) = std::sync::mpsc::channel::<(Option<u64>, Instant)>();
    std::thread::scope(|s| {
        // The destination reads from the first byte on (the socket's buffer
        // holds far less than a round).
        let dest = s.spawn(move || -> Result<(Instant, Option<Duration>), BenchError> {
            let mut r = b.try_clone()?;
            let incoming = Incoming::read_header(&mut r).map_err(invalid)?;
            let got = incoming
                .receive_with_postcopy(&dst_gate, r, b, Some(&key()))
                .map_err(invalid)?;
            let post = got
                .postcopy
                .ok_or_else(|| invalid("the source did not switch to post-copy"))?;
            post.answer_running()?;
            let resumed = Instant::now();
            let restore = post.into_restore();
            let (last, _) = last_rx
                .recv()
                .map_err(|_| invalid("the source never switched"))?;
            let fault = match last {
                Some(gpa) => {
                    let t = Instant::now();
                    let mut buf = [0u8; 8];
                    dst_gate.read(gpa, &mut buf)?;
                    if buf != [0xa5; 8] {
                        return Err(invalid("the destination read another page"));
                    }
                    Some(t.elapsed())
                }
                None => None,
            };
            restore.finish().map_err(invalid)?;
            Ok((resumed, fault))
        });
        let dirtier = s.spawn(|| dirty(&src.gate, rate, &stop));
        let started = Instant::now();
        let round = (|| {
            let mut m = src
                .gate
                .migrate_to(a, MigrationOptions::new().with_key(key()))?;
            m.send_round()?;
            Ok::<_, gmem::migrate::MigrateError>(m)
        })();
        stop.store(true, Ordering::Release);
        let (_, last) = dirtier
            .join()
            .map_err(|_| invalid("the dirtier panicked"))??;
        let m = round.map_err(invalid)?;
        let paused = Instant::now();
        let p = m.switch_to_postcopy(STATE).map_err(invalid)?;
        let _ = last_tx.send((last, paused));
        let report = p.serve(back, || {}).map_err(invalid)?;
        let (resumed, fault) = dest
            .join()
            .map_err(|_| invalid("the destination panicked"))??;
        Ok(Figures {
            downtime: resumed.saturating_duration_since(paused),
            total: started.elapsed(),
            stream_bytes: report.stream_bytes,
            final_bytes: report
                .switch
                .stream_bytes
                .saturating_sub(report.switch.rounds.first().map_or(0, |r| r.stream_bytes)),
            rounds: 1,
            fault,
        })
    })
}

/// A raw post-copy fault: 8 bytes asked over a Unix socket pair, answered
/// with 2 MiB by a thread that reads them from a populated memfd with
/// `sendfile`.
pub(crate) fn raw_fetch_time() -> Result<Duration, BenchError> {
    let held = raw_source_cached()?;
    let src: &OwnedFd = &held;
    let (mut a, b) = UnixStream::pair()?;
    std::thread::scope(|s| {
        let server = s.spawn(move || -> Result<(), BenchError> {
            let mut b = b;
            let mut word = [0u8; 8];
            b.read_exact(&mut word)?;
            let mut off = u64::from_le_bytes(word);
            let mut left = 2u64 << 20;
            while left > 0 {
                let sent = rustix::fs::sendfile(&b, src, Some(&mut off), left as usize)?;
                if sent == 0 {
                    return Err(invalid("sendfile sent nothing"));
                }
                left -= sent as u64;
            }
            Ok(())
        });
        let t = Instant::now();
        std::io::Write::write_all(&mut a, &(64u64 << 20).to_le_bytes())?;
        let mut buf = vec![0u8; 2 << 20];
        a.read_exact(&mut buf)?;
        let d = t.elapsed();
        server
            .join()
            .map_err(|_| invalid("the server panicked"))??;
        Ok(d)
    })
}

/// A populated memfd of the guest's size, the raw side's source.
fn raw_source() -> Result<OwnedFd, BenchError> {
    let fd = rustix::fs::memfd_create("gmem-bench-sendfile", rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&fd, GUEST)?;
    raw::populate(fd.as_fd(), GUEST)?;
    Ok(fd)
}

thread_local! {
    static RAW: RefCell<Option<Rc<OwnedFd>>> = const { RefCell::new(None) };
}

/// The raw side's populated memfd, made once.
fn raw_source_cached() -> Result<Rc<OwnedFd>, BenchError> {
    RAW.with(|r| -> Result<Rc<OwnedFd>, BenchError> {
        let mut r = r.borrow_mut();
        if r.is_none() {
            *r = Some(Rc::new(raw_source()?));
        }
        Ok(Rc::clone(
            r.as_ref().ok_or_else(|| invalid("no raw source"))?,
        ))
    })
}

/// `bytes` sent with `sendfile(2)` from a populated memfd (from its start,
/// wrapping at its end) over a Unix socket pair to a reader thread: the
/// time until the reader has them all.
pub(crate) fn sendfile_time(bytes: u64) -> Result<Duration, BenchError> {
    let src = raw_source_cached()?;
    let (a, b) = UnixStream::pair()?;
    std::thread::scope(|s| {
        let reader = s.spawn(move || -> std::io::Result<Instant> {
            let mut b = b;
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            while got < bytes {
                let n = b.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            Ok(Instant::now())
        });
        let start = Instant::now();
        let mut left = bytes;
        let mut off = 0u64;
        while left > 0 {
            if off == GUEST {
                off = 0;
            }
            let n = left.min(GUEST - off) as usize;
            let sent = rustix::fs::sendfile(&a, &*src, Some(&mut off), n)?;
            if sent == 0 {
                return Err(invalid("sendfile sent nothing"));
            }
            left -= sent as u64;
        }
        drop(a);
        let done = reader
            .join()
            .map_err(|_| invalid("the reader panicked"))??;
        Ok(done.saturating_duration_since(start))
    })
}
