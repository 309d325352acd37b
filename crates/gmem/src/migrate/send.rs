//! The source side: [`Gatekeeper::migrate_to`] and [`MigrationSource`].

use std::io::Write;
use std::ops::Range;
use std::time::{Duration, Instant};

use super::error::MigrateError;
use super::{
    DEFAULT_CONVERGE_BYTES, DEFAULT_MAX_ROUNDS, MAGIC, MAX_ROUNDS, POSTCOPY_DONE, POSTCOPY_FAILED,
    POSTCOPY_RUNNING, POSTCOPY_TIMEOUT, VERSION,
};
use crate::gate::{GateError, Gatekeeper};
use crate::range_set::RangeSet;
use crate::snapshot::SealKey;
use crate::snapshot::format::{
    CHUNK, Header, Kind, MAX_STATE, PolicyCode, TAG, aad, record_header, tagged_aad, write_record,
};
use crate::snapshot::seal::{HEADER_INDEX, Sealer};

/// How a migration runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MigrationOptions {
    /// The key both sides hold: private pages and the VMM state are
    /// sealed under it, and every other record is authenticated. Without
    /// one, a VM with private pages is refused
    /// ([`MigrateError::PrivateWithoutKey`]).
    pub key: Option<SealKey>,
    /// The most pre-copy rounds [`MigrationSource::precopy`] sends (never
    /// more than [`MAX_ROUNDS`](super::MAX_ROUNDS), what a destination
    /// takes).
    pub max_rounds: u32,
    /// Pre-copy stops once what is left to send is at most this many
    /// bytes: the stop-and-copy sends it, with the vCPUs paused.
    pub converge_bytes: u64,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            key: None,
            max_rounds: DEFAULT_MAX_ROUNDS,
            converge_bytes: DEFAULT_CONVERGE_BYTES,
        }
    }
}

impl MigrationOptions {
    /// No key, [`DEFAULT_MAX_ROUNDS`] rounds, converged at
    /// [`DEFAULT_CONVERGE_BYTES`].
    pub fn new() -> MigrationOptions {
        MigrationOptions::default()
    }

    /// Seals private pages and the state under `key`.
    pub fn with_key(mut self, key: SealKey) -> MigrationOptions {
        self.key = Some(key);
        self
    }

    /// At most `rounds` pre-copy rounds (0: the stop-and-copy sends
    /// everything).
    pub fn with_max_rounds(mut self, rounds: u32) -> MigrationOptions {
        self.max_rounds = rounds;
        self
    }

    /// Pre-copy converges at `bytes` left to send.
    pub fn with_converge_bytes(mut self, bytes: u64) -> MigrationOptions {
        self.converge_bytes = bytes;
        self
    }
}

/// One pre-copy round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoundReport {
    /// Its number, from 1.
    pub round: u32,
    /// Guest bytes sent (populated pages).
    pub data_bytes: u64,
    /// Guest bytes sent as holes (a zero record each run).
    pub zeroed_bytes: u64,
    /// Stream bytes the round wrote.
    pub stream_bytes: u64,
    /// Bytes dirtied while it ran: the next round's (or the
    /// stop-and-copy's) to send.
    pub dirty_after: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// What a whole migration sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationReport {
    /// The pre-copy rounds.
    pub rounds: Vec<RoundReport>,
    /// Guest bytes the stop-and-copy sent (with the vCPUs paused).
    pub final_data_bytes: u64,
    /// Bytes of the whole stream.
    pub stream_bytes: u64,
    /// Guest bytes sent in clear (shared pages), in all rounds.
    pub shared_bytes: u64,
    /// Guest bytes sent sealed (private pages).
    pub sealed_bytes: u64,
    /// Guest bytes sent as holes.
    pub zeroed_bytes: u64,
    /// Records written, the end included.
    pub records: u64,
    /// How long the stop-and-copy took (until the stream was flushed).
    pub stop_and_copy: Duration,
}

/// Dirty tracking, stopped when the migration ends whichever way.
struct Tracking(Gatekeeper);

impl Drop for Tracking {
    fn drop(&mut self) {
        if self.0.is_tracking_dirty() {
            // Nothing to report to: the source goes on either way, and a
            // slot left logging only costs KVM its bitmap.
            let _ = self.0.stop_tracking();
        }
    }
}

/// The stream being written: the writer, the sealer and the counts.
struct Out<W: Write> {
    w: W,
    sealer: Option<Sealer>,
    records: u64,
    stream_bytes: u64,
    shared: u64,
    sealed: u64,
    zeroed: u64,
    buf: Vec<u8>,
    parts: Vec<(Range<u64>, bool)>,
    /// Where each region ends, in GPA order: a zero record never crosses
    /// one (two adjacent regions' dirty runs merge, and the destination
    /// takes a record inside one region only).
    region_ends: Vec<u64>,
}

/// A live migration's source, from [`Gatekeeper::migrate_to`]: the header
/// is sent and dirty tracking is on. Send pre-copy rounds while the guest
/// runs ([`precopy`](Self::precopy) or [`send_round`](Self::send_round)),
/// pause the vCPUs, then [`complete`](Self::complete) with their state.
/// Dropping it abandons the migration (dirty tracking stops); the VM is
/// never changed by any of it.
pub struct MigrationSource<W: Write> {
    gate: Gatekeeper,
    out: Out<W>,
    /// Dirty, not yet sent (the first round: everything populated).
    pending: Vec<Range<u64>>,
    rounds: Vec<RoundReport>,
    opts: MigrationOptions,
    tracking: Tracking,
    failed: bool,
}

impl<W: Write> std::fmt::Debug for MigrationSource<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationSource")
            .field("rounds", &self.rounds.len())
            .field("pending_bytes", &self.pending_bytes())
            .field("stream_bytes", &self.out.stream_bytes)
            .finish()
    }
}

fn bytes_of(runs: &[Range<u64>]) -> u64 {
    runs.iter().map(|r| r.end - r.start).sum()
}

/// The parts of `run`, in order, each with whether `populated` (sorted,
/// disjoint) holds it.
fn pieces(run: &Range<u64>, populated: &[Range<u64>]) -> Vec<(Range<u64>, bool)> {
    let mut out = Vec::new();
    let mut pos = run.start;
    let first = populated.partition_point(|p| p.end <= run.start);
    for p in &populated[first..] {
        if p.start >= run.end {
            break;
        }
        let (s, e) = (p.start.max(run.start), p.end.min(run.end));
        if s > pos {
            out.push((pos..s, false));
        }
        out.push((s..e, true));
        pos = e;
    }
    if pos < run.end {
        out.push((pos..run.end, false));
    }
    out
}

impl Gatekeeper {
    /// Starts migrating this VM's memory to `w` (a connection to the
    /// destination): dirty tracking starts
    /// ([`start_dirty_tracking`](Self::start_dirty_tracking)), then the
    /// header (the layout and the policies) is written. The stream is
    /// `docs/migration-stream.md`; the destination reads it with
    /// [`Incoming`](super::Incoming).
    ///
    /// Tracking is the migration's until it completes or is dropped: the
    /// public [`take_dirty`](Self::take_dirty) and
    /// [`stop_dirty_tracking`](Self::stop_dirty_tracking) are refused
    /// meanwhile ([`DirtyError::Migrating`](crate::DirtyError::Migrating)),
    /// since a set anyone else took would never be resent.
    ///
    /// A lazily restored VM is filled first. The guest may run meanwhile
    /// and afterwards: the source reads memory a chunk at a time.
    ///
    /// # Errors
    /// [`MigrateError::PrivateWithoutKey`] (`EPERM`) without a key if any
    /// page is private now; [`MigrateError::Gate`] (poisoned, two
    /// backings); [`MigrateError::Dirty`] (a guest_memfd binding, KVM's
    /// refusal, tracking already on); [`MigrateError::Populated`];
    /// [`MigrateError::Send`]. Dirty tracking is off again then.
    pub fn migrate_to<W: Write>(
        &self,
        w: W,
        opts: MigrationOptions,
    ) -> Result<MigrationSource<W>, MigrateError> {
        if let Some(lazy) = self.lazy_fill() {
            lazy.fill_all()?;
        }
        self.check_readable()?;
        if opts.key.is_none() {
            let private = self.private_runs_now();
            if let Some(first) = private.first() {
                return Err(MigrateError::PrivateWithoutKey {
                    bytes: bytes_of(&private),
                    first_gpa: first.start,
                });
            }
        }
        self.start_tracking(true)?;
        let tracking = Tracking(self.clone());
        // Tracking is on before the population is read: a page written
        // after this is in the first take, whatever the first round read.
        let pending = self.populated_runs().map_err(MigrateError::Populated)?;
        let mut id = [0u8; 16];
        rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty())
            .map_err(|e| MigrateError::Send(crate::snapshot::SnapshotError::Random(e.into())))?;
        let header = Header {
            policy: if opts.key.is_some() {
                PolicyCode::Seal
            } else {
                PolicyCode::Refuse
            },
            conversion: self.policy(),
            id,
            regions: self.layout(),
            private: Vec::new(),
        };
        let bytes = header.encode_as(MAGIC, VERSION);
        let mut out = Out {
            w,
            sealer: opts.key.as_ref().map(|k| Sealer::new(k, id)),
            records: 0,
            stream_bytes: 0,
            shared: 0,
            sealed: 0,
            zeroed: 0,
            buf: vec![0u8; CHUNK + TAG],
            parts: Vec::new(),
            region_ends: self.layout().iter().map(|r| r.gpa + r.len).collect(),
        };
        out.raw(&bytes)?;
        if let Some(s) = &out.sealer {
            let tag = s.seal(HEADER_INDEX, &bytes, &mut []);
            out.raw(&tag)?;
        }
        Ok(MigrationSource {
            gate: self.clone(),
            out,
            pending,
            rounds: Vec::new(),
            opts,
            tracking,
            failed: false,
        })
    }
}

impl<W: Write> MigrationSource<W> {
    /// What the stop-and-copy and the switch refuse before the freeze.
    fn check_pause(&self, state: &[u8]) -> Result<(), MigrateError> {
        if self.failed {
            return Err(MigrateError::Finished);
        }
        if state.len() > MAX_STATE {
            return Err(MigrateError::StateTooLarge {
                len: state.len(),
                max: MAX_STATE,
            });
        }
        Ok(())
    }

    /// With the gatekeeper frozen (the vCPUs paused): what is left to send,
    /// the attribute map, and the population.
    fn last(&mut self, frozen: &crate::gate::frozen::Frozen<'_>) -> Result<Last, MigrateError> {
        let mut runs = RangeSet::new();
        for r in self.pending.drain(..).chain(self.gate.take_tracked()?) {
            runs.insert(r);
        }
        let private = frozen.private_runs();
        if let (None, Some(first)) = (&self.out.sealer, private.first()) {
            return Err(MigrateError::PrivateWithoutKey {
                bytes: bytes_of(&private),
                first_gpa: first.start,
            });
        }
        let populated = frozen.populated().map_err(MigrateError::Populated)?;
        Ok(Last {
            runs: runs.to_vec(),
            private,
            populated,
        })
    }

    /// Bytes dirty and not yet sent: what the next round (or the
    /// stop-and-copy) sends, as of the last round.
    pub fn pending_bytes(&self) -> u64 {
        bytes_of(&self.pending)
    }

    /// The rounds sent so far.
    pub fn rounds(&self) -> &[RoundReport] {
        &self.rounds
    }

    /// Bytes of stream written so far.
    pub fn stream_bytes(&self) -> u64 {
        self.out.stream_bytes
    }

    /// Sends one pre-copy round while the guest runs: every page pending
    /// (the first round: every populated page; later ones: what was
    /// dirtied since the round before), read a chunk at a time under the
    /// gatekeeper's read lock, holes as zero records; then takes what was
    /// dirtied meanwhile as the next round's.
    ///
    /// # Errors
    /// [`MigrateError::Finished`] after a failure; as
    /// [`migrate_to`](Gatekeeper::migrate_to), and
    /// [`MigrateError::PrivateWithoutKey`] if a page became private
    /// without a key. The migration cannot go on after an error (the
    /// stream is cut part-way); the VM is unchanged. But
    /// [`MigrateError::TooManyRounds`] once [`MAX_ROUNDS`](super::MAX_ROUNDS)
    /// rounds are sent (a destination takes no more) sends nothing: the
    /// migration can still complete.
    pub fn send_round(&mut self) -> Result<RoundReport, MigrateError> {
        if self.failed {
            return Err(MigrateError::Finished);
        }
        if self.rounds.len() >= MAX_ROUNDS as usize {
            return Err(MigrateError::TooManyRounds { max: MAX_ROUNDS });
        }
        self.failed = true;
        let started = Instant::now();
        let before = self.out.stream_bytes;
        let runs = std::mem::take(&mut self.pending);
        let populated = self
            .gate
            .populated_runs()
            .map_err(MigrateError::Populated)?;
        let gate = &self.gate;
        let (data, zeroed) = self
            .out
            .send_runs(&runs, &populated, &mut |gpa, buf, parts| {
                gate.read_live(gpa, buf, parts)
            })?;
        let round = self.rounds.len() as u32 + 1;
        let mut counts = [0u8; 16];
        counts[..8].copy_from_slice(&data.to_le_bytes());
        counts[8..].copy_from_slice(&zeroed.to_le_bytes());
        self.out
            .authenticated(Kind::Round, u64::from(round), &counts)?;
        // A buffered writer's rest goes now, not in the stop-and-copy's
        // pause.
        self.out.w.flush().map_err(Out::<W>::send_err)?;
        self.pending = self.gate.take_tracked()?;
        let report = RoundReport {
            round,
            data_bytes: data,
            zeroed_bytes: zeroed,
            stream_bytes: self.out.stream_bytes - before,
            dirty_after: bytes_of(&self.pending),
            elapsed: started.elapsed(),
        };
        self.rounds.push(report);
        self.failed = false;
        Ok(report)
    }

    /// Whether pre-copy is over: what is left is at most
    /// [`MigrationOptions::converge_bytes`], the round budget
    /// ([`MigrationOptions::max_rounds`]) is spent, or it stopped
    /// converging (the last two rounds each left at least 90% of what they
    /// started with: the guest dirties memory as fast as it is sent, and
    /// more rounds would only cost bandwidth).
    pub fn precopy_done(&self) -> bool {
        let n = self.rounds.len();
        // The budget, and never past what a destination takes.
        if n as u32 >= self.opts.max_rounds.min(MAX_ROUNDS) {
            return true;
        }
        if n > 0 && self.pending_bytes() <= self.opts.converge_bytes {
            return true;
        }
        // A round's share left: what it dirtied over what it sent.
        let stalled = |r: &RoundReport| {
            let sent = r.data_bytes + r.zeroed_bytes;
            r.dirty_after.saturating_mul(10) >= sent.saturating_mul(9)
        };
        n >= 3 && self.rounds[n - 2..].iter().all(stalled)
    }

    /// Sends pre-copy rounds until [`precopy_done`](Self::precopy_done).
    /// The rounds so far.
    ///
    /// # Errors
    /// As [`send_round`](Self::send_round).
    pub fn precopy(&mut self) -> Result<&[RoundReport], MigrateError> {
        while !self.precopy_done() {
            self.send_round()?;
        }
        Ok(&self.rounds)
    }

    /// The stop-and-copy, once the caller has paused every vCPU (and no
    /// device holds a pin): with the gatekeeper frozen, sends what is
    /// dirty, the attribute map, `state` (the VMM's vCPUs and devices, at
    /// most [`MAX_STATE`] bytes, sealed under the key) and the end; flushes
    /// the stream and stops dirty tracking. The writer is handed back, for
    /// the destination's answer ([`ACK_RUNNING`](super::ACK_RUNNING)).
    ///
    /// The VM is not changed: if the destination does not take over, the
    /// caller resumes the vCPUs.
    ///
    /// # Errors
    /// [`MigrateError::StateTooLarge`] before anything is sent;
    /// [`MigrateError::Gate`] with [`GateError::Pinned`] while a pin is
    /// live; [`MigrateError::PrivateWithoutKey`]; as
    /// [`send_round`](Self::send_round).
    pub fn complete(mut self, state: &[u8]) -> Result<(MigrationReport, W), MigrateError> {
        self.check_pause(state)?;
        let started = Instant::now();
        let gate = self.gate.clone();
        let frozen = gate.freeze()?;
        let Last {
            runs,
            private,
            populated,
        } = self.last(&frozen)?;
        let (data, _) = self
            .out
            .send_runs(&runs, &populated, &mut |gpa, buf, parts| {
                *parts = frozen.split(gpa..gpa + buf.len() as u64);
                frozen.read_raw(gpa, buf)
            })?;
        self.out.map_and_state(&private, state)?;
        self.out.end(self.rounds.len() as u64)?;
        drop(frozen);
        let MigrationSource {
            out,
            rounds,
            tracking,
            ..
        } = self;
        drop(tracking);
        let report = MigrationReport {
            rounds,
            final_data_bytes: data,
            stream_bytes: out.stream_bytes,
            shared_bytes: out.shared,
            sealed_bytes: out.sealed,
            zeroed_bytes: out.zeroed,
            records: out.records,
            stop_and_copy: started.elapsed(),
        };
        Ok((report, out.w))
    }
}

impl<W: Write> MigrationSource<W> {
    /// The switch to post-copy, once the caller has paused every vCPU (as
    /// for [`complete`](Self::complete)): with the gatekeeper frozen, sends
    /// the attribute map, `state`, the blocks still to send (the dirty
    /// pages, in the source's page size: see `docs/migration-stream.md`)
    /// and the end of this phase, then stops dirty tracking. The destination can run the guest from here; the
    /// [`PostcopySource`] sends it the blocks, those it faults on first.
    ///
    /// # Errors
    /// As [`complete`](Self::complete). The VM is unchanged: if the
    /// destination does not take over, the caller resumes the vCPUs.
    pub fn switch_to_postcopy(mut self, state: &[u8]) -> Result<PostcopySource<W>, MigrateError> {
        self.check_pause(state)?;
        let started = Instant::now();
        let gate = self.gate.clone();
        let frozen = gate.freeze()?;
        let Last {
            runs,
            private,
            populated,
        } = self.last(&frozen)?;
        let regions: Vec<(u64, u64)> = frozen.layout().iter().map(|r| (r.gpa, r.len)).collect();
        // The source's own page size: what a block is made of.
        let unit = frozen
            .layout()
            .iter()
            .map(|r| r.kind.page_size())
            .max()
            .unwrap_or(crate::range::PAGE_SIZE);
        if unit > crate::snapshot::lazy::REMOTE_BLOCK {
            return Err(MigrateError::PostcopyUnsupported {
                why: format!(
                    "the source's pages are {unit:#x} bytes: post-copy moves at most 2 MiB a fault; migrate pre-copy"
                ),
            });
        }
        let blocks = crate::snapshot::lazy::remote_blocks(&runs, &regions, unit);
        self.out.map_and_state(&private, state)?;
        for part in blocks.chunks(CHUNK / 16) {
            self.out
                .authenticated(Kind::Postcopy, part.len() as u64, &runs_payload(part))?;
        }
        if blocks.is_empty() {
            // Nothing left to send: the switch still says it is one.
            self.out.authenticated(Kind::Postcopy, 0, &[])?;
        }
        self.out.end(self.rounds.len() as u64)?;
        drop(frozen);
        let MigrationSource {
            gate,
            out,
            rounds,
            tracking,
            ..
        } = self;
        drop(tracking);
        let report = MigrationReport {
            rounds,
            final_data_bytes: 0,
            stream_bytes: out.stream_bytes,
            shared_bytes: out.shared,
            sealed_bytes: out.sealed,
            zeroed_bytes: out.zeroed,
            records: out.records,
            stop_and_copy: started.elapsed(),
        };
        Ok(PostcopySource {
            gate,
            out,
            blocks,
            populated,
            report,
        })
    }
}

/// What is left at the pause (see [`MigrationSource::last`]).
struct Last {
    runs: Vec<Range<u64>>,
    private: Vec<Range<u64>>,
    populated: Vec<Range<u64>>,
}

/// Runs as 16-byte `[start, end)` pairs.
fn runs_payload(runs: &[Range<u64>]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(runs.len() * 16);
    for run in runs {
        payload.extend_from_slice(&run.start.to_le_bytes());
        payload.extend_from_slice(&run.end.to_le_bytes());
    }
    payload
}

/// What a post-copy phase did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostcopyReport {
    /// The pre-copy phase: its rounds and the switch (`stop_and_copy` is
    /// the switch's time, with the vCPUs paused).
    pub switch: MigrationReport,
    /// Blocks sent after the switch.
    pub blocks: usize,
    /// Of those, sent because the destination asked (a fault or a host
    /// access there).
    pub requested: usize,
    /// Guest bytes sent after the switch.
    pub data_bytes: u64,
    /// Bytes of the whole stream, both phases.
    pub stream_bytes: u64,
    /// From the switch's end to the go-ahead written (the destination had
    /// said it is ready; it runs the guest on the go-ahead).
    pub until_running: Duration,
    /// From the switch's end to the destination's word that it holds every
    /// block.
    pub elapsed: Duration,
}

/// A post-copy migration's source after the switch
/// ([`MigrationSource::switch_to_postcopy`]): the guest is paused here and
/// [`serve`](Self::serve) sends what the destination does not hold yet.
pub struct PostcopySource<W: Write> {
    gate: Gatekeeper,
    out: Out<W>,
    blocks: Vec<Range<u64>>,
    populated: Vec<Range<u64>>,
    report: MigrationReport,
}

impl<W: Write> std::fmt::Debug for PostcopySource<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopySource")
            .field("blocks", &self.blocks.len())
            .finish_non_exhaustive()
    }
}

/// What the destination said on the back channel.
#[derive(Default)]
struct Back {
    asked: std::collections::VecDeque<u64>,
    running: bool,
    done: bool,
    failed: bool,
    closed: Option<String>,
}

impl<W: Write> PostcopySource<W> {
    /// Blocks to send.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Sends every block, the ones the destination asks for (8-byte GPAs
    /// on `back`, the connection's other half) first, then the end, and
    /// waits for the destination's word that it holds them all. When the
    /// destination says it is ready to run the guest, the go-ahead record
    /// goes out at once (before the blocks still to push); once it is
    /// written, `running` is called: from then on the source must never
    /// resume the guest. The destination runs it only after the
    /// go-ahead, so the two never both run it.
    ///
    /// # Errors
    /// [`MigrateError::Postcopy`]: the destination refused the stream, or
    /// the connection failed; `took_over` says whether the destination had
    /// started the guest (then the VM is lost with the connection: the
    /// risk post-copy takes), or not (the caller may resume it here).
    pub fn serve<R: std::io::Read + Send + 'static>(
        mut self,
        back: R,
        mut running: impl FnMut(),
    ) -> Result<PostcopyReport, MigrateError> {
        let started = Instant::now();
        let n = self.blocks.len();
        let state = std::sync::Arc::new((
            std::sync::Mutex::new(Back::default()),
            std::sync::Condvar::new(),
        ));
        let st = std::sync::Arc::clone(&state);
        // Detached: it ends when the connection does.
        let reader = std::thread::Builder::new()
            .name("gmem-postcopy".into())
            .spawn(move || read_back(back, &st, n))
            .map_err(|e| MigrateError::Postcopy {
                took_over: false,
                why: format!("the back channel's thread: {e}"),
            })?;
        drop(reader);
        let mut sent = vec![false; n];
        let (mut next, mut requested, mut data) = (0usize, 0usize, 0u64);
        let mut until_running = None;
        let fail = |took_over: bool, why: String| MigrateError::Postcopy { took_over, why };
        loop {
            let asked = {
                let mut b = lock_back(&state);
                // A destination that gave up (FAILED, or gone) gets no
                // go-ahead, whatever else it said: the guest runs on here.
                if until_running.is_none() && b.running && !b.failed && b.closed.is_none() {
                    drop(b);
                    self.go_ahead()?;
                    until_running = Some(started.elapsed());
                    running();
                    b = lock_back(&state);
                }
                if b.failed {
                    return Err(fail(
                        until_running.is_some(),
                        "the destination refused the stream".into(),
                    ));
                }
                if let Some(why) = b.closed.as_ref().filter(|_| !b.done) {
                    return Err(fail(until_running.is_some(), why.clone()));
                }
                let mut pick = None;
                while let Some(gpa) = b.asked.pop_front() {
                    let i = self.blocks.partition_point(|r| r.end <= gpa);
                    if i < n && self.blocks[i].start <= gpa && !sent[i] {
                        pick = Some(i);
                        break;
                    }
                }
                pick
            };
            let bi = match asked {
                Some(i) => {
                    requested += 1;
                    i
                }
                None => {
                    while next < n && sent[next] {
                        next += 1;
                    }
                    if next == n {
                        break;
                    }
                    next
                }
            };
            let gate = &self.gate;
            let block = self.blocks[bi].clone();
            let (d, _) = self
                .out
                .send_runs(
                    std::slice::from_ref(&block),
                    &self.populated,
                    &mut |gpa, buf, parts| gate.read_live(gpa, buf, parts),
                )
                .map_err(|e| fail(until_running.is_some(), e.to_string()))?;
            // A block asked for goes out at once; pushed ones ride the
            // buffer.
            if asked.is_some() {
                self.out
                    .w
                    .flush()
                    .map_err(|e| fail(until_running.is_some(), e.to_string()))?;
            }
            sent[bi] = true;
            data += d;
        }
        self.out
            .end(n as u64)
            .map_err(|e| fail(until_running.is_some(), e.to_string()))?;
        self.out
            .w
            .flush()
            .map_err(|e| fail(until_running.is_some(), e.to_string()))?;
        let deadline = Instant::now() + POSTCOPY_TIMEOUT;
        loop {
            let mut b = lock_back(&state);
            if until_running.is_none() && b.running && !b.failed && b.closed.is_none() {
                drop(b);
                self.go_ahead()?;
                until_running = Some(started.elapsed());
                running();
                b = lock_back(&state);
            }
            if b.done && until_running.is_some() && !b.failed {
                break;
            }
            if b.failed || b.closed.is_some() || Instant::now() >= deadline {
                let why = b
                    .closed
                    .clone()
                    .unwrap_or_else(|| "the destination did not confirm every block".into());
                return Err(fail(until_running.is_some(), why));
            }
            let _ = state.1.wait_timeout(b, Duration::from_millis(50));
        }
        Ok(PostcopyReport {
            switch: self.report,
            blocks: n,
            requested,
            data_bytes: data,
            stream_bytes: self.out.stream_bytes,
            until_running: until_running.unwrap_or_default(),
            elapsed: started.elapsed(),
        })
    }
}

impl<W: Write> PostcopySource<W> {
    /// Writes and flushes the go-ahead record. A failure means the
    /// destination cannot have it whole, so it never runs the guest: the
    /// caller may resume it (`took_over` false).
    fn go_ahead(&mut self) -> Result<(), MigrateError> {
        let fail = |e: MigrateError| MigrateError::Postcopy {
            took_over: false,
            why: format!("sending the go-ahead: {e}"),
        };
        self.out.authenticated(Kind::Go, 0, &[]).map_err(fail)?;
        self.out.w.flush().map_err(|e| fail(Out::<W>::send_err(e)))
    }
}

/// Reads one 8-byte word. A read timeout on the connection is not the end
/// of it (a quiet destination is not a gone one: `serve` has its own
/// deadline), and the bytes of a word read before one are kept.
fn read_word<R: std::io::Read>(back: &mut R, word: &mut [u8; 8]) -> std::io::Result<()> {
    let mut got = 0;
    while got < word.len() {
        match back.read(&mut word[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn lock_back(s: &(std::sync::Mutex<Back>, std::sync::Condvar)) -> std::sync::MutexGuard<'_, Back> {
    s.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// The back channel's reader: 8-byte words (a GPA asked for, or one of
/// the `POSTCOPY_*` words) until the connection ends. At most two asks a
/// block are queued: a destination that asks more is ignored, not
/// buffered.
fn read_back<R: std::io::Read>(
    mut back: R,
    state: &(std::sync::Mutex<Back>, std::sync::Condvar),
    blocks: usize,
) {
    let mut word = [0u8; 8];
    loop {
        let r = read_word(&mut back, &mut word);
        let mut b = state.0.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Err(e) => {
                b.closed = Some(format!("the back channel: {e}"));
                state.1.notify_all();
                return;
            }
            Ok(()) => match u64::from_le_bytes(word) {
                POSTCOPY_DONE => b.done = true,
                POSTCOPY_RUNNING => b.running = true,
                POSTCOPY_FAILED => b.failed = true,
                gpa if b.asked.len() < 2 * blocks + 16 => b.asked.push_back(gpa),
                _ => {}
            },
        }
        state.1.notify_all();
    }
}

/// Reads one chunk of guest memory at a GPA into a buffer, with its
/// attribute split.
type ReadChunk<'a> =
    dyn FnMut(u64, &mut [u8], &mut Vec<(Range<u64>, bool)>) -> Result<(), GateError> + 'a;

impl<W: Write> Out<W> {
    fn send_err(e: std::io::Error) -> MigrateError {
        MigrateError::Send(crate::snapshot::SnapshotError::Write(e))
    }

    /// Writes the end record: the stream's totals and `count` (rounds, or
    /// post-copy blocks).
    fn end(&mut self, count: u64) -> Result<(), MigrateError> {
        let mut end = [0u8; 32];
        end[..8].copy_from_slice(&self.shared.to_le_bytes());
        end[8..16].copy_from_slice(&self.sealed.to_le_bytes());
        end[16..24].copy_from_slice(&self.zeroed.to_le_bytes());
        end[24..].copy_from_slice(&count.to_le_bytes());
        let records = self.records + 1;
        self.authenticated(Kind::End, records, &end)?;
        self.w.flush().map_err(Self::send_err)
    }

    /// The attribute map's records, then the state record (sealed under a
    /// key).
    fn map_and_state(&mut self, private: &[Range<u64>], state: &[u8]) -> Result<(), MigrateError> {
        for part in private.chunks(CHUNK / 16) {
            self.authenticated(Kind::Attributes, part.len() as u64, &runs_payload(part))?;
        }
        let n = state.len();
        let mut buf = std::mem::take(&mut self.buf);
        buf[..n].copy_from_slice(state);
        let sealed = self.sealer.is_some();
        let result = self.record(Kind::State, 0, &mut buf[..n], sealed);
        self.buf = buf;
        result
    }

    /// Writes bytes outside any record (the header and its tag).
    fn raw(&mut self, b: &[u8]) -> Result<(), MigrateError> {
        self.w.write_all(b).map_err(Self::send_err)?;
        self.stream_bytes += b.len() as u64;
        Ok(())
    }

    /// Sends `runs`: their populated parts as data records (never across
    /// a 1 MiB-aligned boundary, private parts sealed), their holes as
    /// zero records. The data and zeroed bytes.
    fn send_runs(
        &mut self,
        runs: &[Range<u64>],
        populated: &[Range<u64>],
        read: &mut ReadChunk<'_>,
    ) -> Result<(u64, u64), MigrateError> {
        let (mut data, mut zeroed) = (0, 0);
        for run in runs {
            for (piece, held) in pieces(run, populated) {
                if !held {
                    // One zero record per region the hole lies in.
                    let mut at = piece.start;
                    while at < piece.end {
                        let end = self
                            .region_ends
                            .iter()
                            .copied()
                            .find(|&e| e > at)
                            .map_or(piece.end, |e| e.min(piece.end));
                        let len = end - at;
                        self.authenticated(Kind::Zero, at, &len.to_le_bytes())?;
                        zeroed += len;
                        self.zeroed += len;
                        at = end;
                    }
                    continue;
                }
                let mut gpa = piece.start;
                while gpa < piece.end {
                    let boundary = (gpa / CHUNK as u64 + 1) * CHUNK as u64;
                    let n = (piece.end.min(boundary) - gpa) as usize;
                    let mut buf = std::mem::take(&mut self.buf);
                    let mut parts = std::mem::take(&mut self.parts);
                    let result = read(gpa, &mut buf[..n], &mut parts)
                        .map_err(MigrateError::Gate)
                        .and_then(|()| {
                            for (part, private) in &parts {
                                let at = (part.start - gpa) as usize;
                                let len = (part.end - part.start) as usize;
                                self.data(part.start, &mut buf[at..at + len], *private)?;
                            }
                            Ok(())
                        });
                    self.buf = buf;
                    self.parts = parts;
                    result?;
                    data += n as u64;
                    gpa += n as u64;
                }
            }
        }
        Ok((data, zeroed))
    }

    /// One data record: sealed if `private` (refused without a key).
    fn data(&mut self, gpa: u64, bytes: &mut [u8], private: bool) -> Result<(), MigrateError> {
        if private && self.sealer.is_none() {
            return Err(MigrateError::PrivateWithoutKey {
                bytes: bytes.len() as u64,
                first_gpa: gpa,
            });
        }
        if private {
            self.sealed += bytes.len() as u64;
            self.record(Kind::Sealed, gpa, bytes, true)
        } else {
            self.shared += bytes.len() as u64;
            self.record(Kind::Shared, gpa, bytes, false)
        }
    }

    /// Writes one record: encrypted in place and tagged if `encrypt` (and
    /// sealed), tagged in clear under a key otherwise; the record's
    /// ordinal is the nonce.
    fn record(
        &mut self,
        kind: Kind,
        aux: u64,
        data: &mut [u8],
        encrypt: bool,
    ) -> Result<(), MigrateError> {
        let head = record_header(kind, data.len() as u32, aux);
        let written = match &self.sealer {
            Some(s) if encrypt => {
                let tag = s.seal(self.records, &aad(&head), data);
                write_record(&mut self.w, &head, &[data, &tag])
            }
            Some(_) => return self.authenticated(kind, aux, data),
            None => write_record(&mut self.w, &head, &[data]),
        }
        .map_err(MigrateError::Send)?;
        self.stream_bytes += written;
        self.records += 1;
        Ok(())
    }

    /// Writes a record in clear, tagged under a key (its header and
    /// payload the associated data).
    fn authenticated(&mut self, kind: Kind, aux: u64, payload: &[u8]) -> Result<(), MigrateError> {
        let head = record_header(kind, payload.len() as u32, aux);
        let written = match &self.sealer {
            Some(s) => {
                let tag = s.seal(self.records, &tagged_aad(&head, payload), &mut []);
                write_record(&mut self.w, &head, &[payload, &tag])
            }
            None => write_record(&mut self.w, &head, &[payload]),
        }
        .map_err(MigrateError::Send)?;
        self.stream_bytes += written;
        self.records += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::pieces;

    #[test]
    fn pieces_split_a_run_by_the_population() {
        let pop = [0x1000..0x3000, 0x5000..0x6000];
        assert_eq!(
            pieces(&(0..0x7000), &pop),
            vec![
                (0..0x1000, false),
                (0x1000..0x3000, true),
                (0x3000..0x5000, false),
                (0x5000..0x6000, true),
                (0x6000..0x7000, false)
            ]
        );
        assert_eq!(
            pieces(&(0x2000..0x2800), &pop),
            vec![(0x2000..0x2800, true)]
        );
        assert_eq!(
            pieces(&(0x8000..0x9000), &pop),
            vec![(0x8000..0x9000, false)]
        );
    }
}
