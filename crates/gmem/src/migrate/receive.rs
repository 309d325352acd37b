//! The destination side: [`Incoming`] reads the header, builds nothing,
//! and [`Incoming::receive`] applies the stream to a new gatekeeper.

use std::io::Read;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

use super::error::MigrateError;
use super::{MAGIC, MAX_ROUNDS, VERSION};
use crate::gate::Gatekeeper;
use crate::range::PAGE_SIZE;
use crate::snapshot::format::{
    CHUNK, Header, Kind, MAX_RUNS, PolicyCode, TAG, corrupt, read_exact,
};
use crate::snapshot::lazy::{LazyRestore, REMOTE_BLOCK, RemoteFill, start_remote};
use crate::snapshot::restore::{open_record, read_record};
use crate::snapshot::seal::{HEADER_INDEX, Sealer};
use crate::snapshot::{RestoreError, SealKey};

/// A migration stream's header, read before the destination VM exists:
/// what the VMM needs to build it. Nothing is authenticated yet:
/// [`receive`](Self::receive) checks the header's tag under the key
/// before it applies a record.
#[derive(Debug)]
pub struct Incoming {
    header: Header,
    bytes: Vec<u8>,
    tag: Option<[u8; TAG]>,
}

/// What a migration delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IncomingReport {
    /// The VMM state the source sent (its vCPUs and devices).
    pub state: Vec<u8>,
    /// Guest bytes received in clear.
    pub shared_bytes: u64,
    /// Guest bytes received sealed.
    pub sealed_bytes: u64,
    /// Guest bytes the source sent as holes.
    pub zeroed_bytes: u64,
    /// Pre-copy rounds.
    pub rounds: u64,
    /// Records, the end included.
    pub records: u64,
    /// Bytes of stream read.
    pub stream_bytes: u64,
}

impl Incoming {
    /// Reads and checks a migration stream's header (its magic, version,
    /// CRC, counts and bounds) and, if sealed, its tag.
    ///
    /// # Errors
    /// [`MigrateError::Stream`] with [`RestoreError::NotASnapshot`] (not a
    /// migration stream), [`RestoreError::Version`],
    /// [`RestoreError::Corrupt`], [`RestoreError::Truncated`] or
    /// [`RestoreError::Read`].
    pub fn read_header(r: &mut impl Read) -> Result<Incoming, MigrateError> {
        let (header, bytes) = Header::decode_as(r, MAGIC, VERSION)?;
        if !header.private.is_empty() || header.policy == PolicyCode::Omit {
            return Err(corrupt(
                12,
                "a migration header carries no attribute map and never omits private pages".into(),
            )
            .into());
        }
        let tag = if header.policy == PolicyCode::Seal {
            let mut t = [0u8; TAG];
            read_exact(r, &mut t, bytes.len() as u64)?;
            Some(t)
        } else {
            None
        };
        Ok(Incoming { header, bytes, tag })
    }

    /// The regions: GPA, length and backing, in GPA order.
    pub fn regions(&self) -> Vec<(u64, u64, crate::BackingKind)> {
        self.header
            .regions
            .iter()
            .map(|r| (r.gpa, r.len, r.kind))
            .collect()
    }

    /// The source gatekeeper's conversion policy.
    pub fn conversion(&self) -> crate::Policy {
        self.header.conversion
    }

    /// Whether private pages and the state are sealed (receiving needs
    /// the key).
    pub fn sealed(&self) -> bool {
        self.tag.is_some()
    }

    /// Receives the rest of the stream into `gate`, a new gatekeeper (in
    /// its launch phase, no pin live) of the header's layout on any
    /// backing: every record is checked (CRC, place, tag) before it is
    /// applied; data is written, holes discarded, and the attribute map set
    /// at the end. Returns once the end record has been checked: the VM
    /// holds what the source held when it paused. The caller then answers
    /// the source ([`ACK_RUNNING`](super::ACK_RUNNING)), and runs the VM
    /// only once the source's [`GO_AHEAD`](super::GO_AHEAD) has come.
    ///
    /// # Errors
    /// Before a record is applied, nothing changed: [`RestoreError::Layout`],
    /// [`RestoreError::NeedsKey`], [`RestoreError::NotSealed`],
    /// [`RestoreError::WrongKey`], [`RestoreError::Gate`]. Afterwards
    /// ([`RestoreError::Corrupt`], [`RestoreError::Truncated`] when the
    /// connection drops, [`RestoreError::Read`]): the gatekeeper is
    /// poisoned, so the half-received VM can never run.
    pub fn receive(
        self,
        gate: &Gatekeeper,
        r: &mut impl Read,
        key: Option<&SealKey>,
    ) -> Result<IncomingReport, MigrateError> {
        self.receive_impl(gate, r, key, None)
            .map(|(report, _)| report)
    }

    /// [`receive`](Self::receive), for a stream that may switch to
    /// post-copy: if it does, the guest can run as soon as this returns,
    /// and what the source still sends comes in behind it: `r` (the
    /// connection) moves to a receiver thread, and `back` (its other half)
    /// carries the blocks a fault or a host access asks for, and the words
    /// the destination tells the source ([`Postcopy::answer_running`]).
    /// A stream without post-copy is received whole, as by `receive`.
    ///
    /// # Errors
    /// As [`receive`](Self::receive); [`RestoreError::Lazy`] if the
    /// destination's backing cannot be filled on fault (guest_memfd,
    /// hugetlb-1g).
    pub fn receive_with_postcopy<R, W>(
        self,
        gate: &Gatekeeper,
        mut r: R,
        back: W,
        key: Option<&SealKey>,
    ) -> Result<Received, MigrateError>
    where
        R: Read + Send + 'static,
        W: std::io::Write + Send + 'static,
    {
        let sealer = match (&self.tag, key) {
            (Some(_), Some(k)) => Some(Sealer::new(k, self.header.id)),
            _ => None,
        };
        let regions = self.header.regions.clone();
        let (report, started) = self.receive_impl(gate, &mut r, key, Some(Box::new(back)))?;
        let Some((restore, fill, at, private)) = started else {
            return Ok(Received {
                report,
                postcopy: None,
            });
        };
        let go = Arc::new(GoAhead::default());
        let tail = Tail {
            fill: fill.clone(),
            go: Arc::clone(&go),
            sealer,
            regions,
            private,
            at,
            records: report.records,
            shared: report.shared_bytes,
            sealed: report.sealed_bytes,
            zeroed: report.zeroed_bytes,
        };
        let spawned = std::thread::Builder::new()
            .name("gmem-postcopy".into())
            .spawn(move || tail.run(r));
        if let Err(e) = spawned {
            fill.fail(format!("the post-copy receiver thread: {e}"));
            go.set(false);
        }
        Ok(Received {
            report,
            postcopy: Some(Postcopy { restore, fill, go }),
        })
    }

    #[allow(clippy::type_complexity)]
    fn receive_impl(
        self,
        gate: &Gatekeeper,
        r: &mut impl Read,
        key: Option<&SealKey>,
        back: Option<Box<dyn std::io::Write + Send>>,
    ) -> Result<
        (
            IncomingReport,
            Option<(LazyRestore, RemoteFill, u64, Vec<Range<u64>>)>,
        ),
        MigrateError,
    > {
        let mut frozen = gate.freeze().map_err(RestoreError::Gate)?;
        frozen.check_restorable().map_err(RestoreError::Gate)?;
        let here = frozen.layout();
        let same = here.len() == self.header.regions.len()
            && here
                .iter()
                .zip(&self.header.regions)
                .all(|(a, b)| a.gpa == b.gpa && a.len == b.len);
        if !same {
            let text = |v: Vec<(u64, u64)>| {
                v.iter()
                    .map(|(g, l)| format!("[{g:#x}, +{l:#x})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(RestoreError::Layout {
                snapshot: self.header.regions.len(),
                snapshot_layout: text(self.header.regions.iter().map(|r| (r.gpa, r.len)).collect()),
                here: here.len(),
                here_layout: text(here.iter().map(|r| (r.gpa, r.len)).collect()),
            }
            .into());
        }
        let sealer = match (&self.tag, key) {
            (Some(_), None) => return Err(RestoreError::NeedsKey.into()),
            (None, Some(_)) => return Err(RestoreError::NotSealed.into()),
            (None, None) => None,
            (Some(tag), Some(key)) => {
                let s = Sealer::new(key, self.header.id);
                if !s.open(HEADER_INDEX, &self.bytes, &mut [], tag) {
                    return Err(RestoreError::WrongKey.into());
                }
                Some(s)
            }
        };
        let start = (self.bytes.len() + self.tag.map_or(0, |t| t.len())) as u64;
        if let Err(e) = frozen.begin_restore() {
            frozen.poison(format!(
                "an incoming migration could not discard the memory first ({e})"
            ));
            return Err(RestoreError::Gate(e).into());
        }
        let mut apply = Apply {
            header: &self.header,
            sealer: sealer.as_ref(),
            report: IncomingReport::default(),
            private: Vec::new(),
            guest_bytes: self.header.regions.iter().map(|r| r.len).sum(),
            round_bytes: 0,
            round_zeroed: 0,
            postcopy: Vec::new(),
            switched: false,
        };
        let result = apply.stream(r, start, &mut |op| match op {
            Op::Write(gpa, data) => frozen.write_raw(gpa, data),
            Op::Zero(range) => frozen.discard_raw(range),
        });
        let result = result.and_then(|()| {
            if !apply.switched {
                return frozen
                    .finish_restore(&apply.private)
                    .map(|()| None)
                    .map_err(|e| {
                        corrupt(
                            apply.report.stream_bytes,
                            format!("the attribute map could not be set ({e})"),
                        )
                    });
            }
            let Some(back) = back else {
                return Err(corrupt(
                    apply.report.stream_bytes,
                    "the stream switches to post-copy: receive it with receive_with_postcopy"
                        .into(),
                ));
            };
            let blocks = std::mem::take(&mut apply.postcopy);
            let state = apply.report.state.clone();
            start_remote(
                gate,
                &mut frozen,
                blocks,
                &apply.private,
                back,
                super::POSTCOPY_TIMEOUT,
                state,
            )
            .map(|(restore, fill)| {
                Some((
                    restore,
                    fill,
                    apply.report.stream_bytes,
                    apply.private.clone(),
                ))
            })
        });
        match result {
            Ok(started) => Ok((apply.report, started)),
            Err(e) => {
                frozen.poison(format!(
                    "an incoming migration stopped part-way ({e}): the VM's memory is not the source's"
                ));
                Err(e.into())
            }
        }
    }
}

/// What applying a record does to the destination's memory.
enum Op<'a> {
    Write(u64, &'a [u8]),
    Zero(Range<u64>),
}

/// The stream being applied: what the header says and what was counted.
struct Apply<'h> {
    header: &'h Header,
    sealer: Option<&'h Sealer>,
    report: IncomingReport,
    private: Vec<Range<u64>>,
    guest_bytes: u64,
    /// The round's data bytes, and its zeroed bytes (together at most the
    /// guest's memory).
    round_bytes: u64,
    round_zeroed: u64,
    /// The blocks a post-copy source still sends.
    postcopy: Vec<Range<u64>>,
    /// Whether the source switched to post-copy (even with no block left).
    switched: bool,
}

impl Apply<'_> {
    /// `[gpa, gpa + len)` if it is page-aligned, non-empty and inside one
    /// region.
    fn placed(&self, gpa: u64, len: u64, at: u64) -> Result<Range<u64>, RestoreError> {
        let end = gpa
            .checked_add(len)
            .filter(|_| len > 0 && gpa.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE));
        match end {
            Some(end)
                if self
                    .header
                    .regions
                    .iter()
                    .any(|r| r.gpa <= gpa && end <= r.gpa + r.len) =>
            {
                Ok(gpa..end)
            }
            _ => Err(corrupt(
                at + 8,
                format!("a record at [{gpa:#x}, +{len:#x}) is not whole pages inside one region"),
            )),
        }
    }

    /// Reads and applies records from `at` to the end record.
    fn stream(
        &mut self,
        r: &mut impl Read,
        mut at: u64,
        apply: &mut dyn FnMut(Op<'_>) -> Result<(), crate::GateError>,
    ) -> Result<(), RestoreError> {
        let mut buf = vec![0u8; CHUNK + TAG];
        let sealed = self.sealer.is_some();
        let mut state_seen = false;
        loop {
            let rec = read_record(r, at, &mut buf, sealed)?;
            let ordinal = self.report.records;
            self.report.records += 1;
            if let Some(s) = self.sealer {
                open_record(s, &rec, ordinal, &mut buf, at)?;
            }
            if state_seen && !matches!(rec.kind, Kind::End | Kind::Postcopy) {
                return Err(corrupt(
                    at,
                    format!("a {:?} record after the state", rec.kind),
                ));
            }
            let gate_err = |e: crate::GateError| RestoreError::Gate(e);
            match rec.kind {
                Kind::Shared | Kind::Sealed => {
                    let range = self.placed(rec.aux, rec.len as u64, at)?;
                    if range.start / CHUNK as u64 != (range.end - 1) / CHUNK as u64 {
                        return Err(corrupt(at + 8, "a record crosses a 1 MiB boundary".into()));
                    }
                    if rec.kind == Kind::Sealed && !sealed {
                        return Err(corrupt(
                            at,
                            "a sealed record in a stream without a key".into(),
                        ));
                    }
                    self.round_bytes += rec.len as u64;
                    if self.round_bytes + self.round_zeroed > self.guest_bytes {
                        return Err(corrupt(
                            at,
                            "a round sends more data than the guest has memory".into(),
                        ));
                    }
                    if rec.kind == Kind::Sealed {
                        self.report.sealed_bytes += rec.len as u64;
                    } else {
                        self.report.shared_bytes += rec.len as u64;
                    }
                    apply(Op::Write(range.start, &buf[..rec.len])).map_err(gate_err)?;
                }
                Kind::Zero => {
                    let len = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
                    let range = self.placed(rec.aux, len, at)?;
                    self.round_zeroed = self.round_zeroed.saturating_add(len);
                    if self.round_bytes + self.round_zeroed > self.guest_bytes {
                        return Err(corrupt(
                            at,
                            "a round sends more holes and data than the guest has memory".into(),
                        ));
                    }
                    self.report.zeroed_bytes += len;
                    apply(Op::Zero(range)).map_err(gate_err)?;
                }
                Kind::Round => {
                    let u =
                        |a: usize| u64::from_le_bytes(buf[a..a + 8].try_into().unwrap_or_default());
                    if rec.aux != self.report.rounds + 1 || rec.aux > u64::from(MAX_ROUNDS) {
                        return Err(corrupt(
                            at + 8,
                            format!(
                                "round {} after round {} (at most {MAX_ROUNDS})",
                                rec.aux, self.report.rounds
                            ),
                        ));
                    }
                    if u(0) != self.round_bytes || u(8) != self.round_zeroed {
                        return Err(corrupt(
                            at,
                            format!(
                                "round {} says {:#x} bytes of data and {:#x} of holes, the stream held {:#x} and {:#x}",
                                rec.aux,
                                u(0),
                                u(8),
                                self.round_bytes,
                                self.round_zeroed
                            ),
                        ));
                    }
                    self.report.rounds = rec.aux;
                    self.round_bytes = 0;
                    self.round_zeroed = 0;
                }
                Kind::Attributes => {
                    let last = self.private.last().map_or(0, |p| p.end);
                    for (i, e) in buf[..rec.len].chunks_exact(16).enumerate() {
                        let s = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
                        let end = u64::from_le_bytes(e[8..].try_into().unwrap_or_default());
                        let range = self.placed(s, end.wrapping_sub(s), at)?;
                        if range.start < last.max(self.private.last().map_or(0, |p| p.end))
                            || self.private.len() >= MAX_RUNS as usize
                        {
                            return Err(corrupt(
                                at + 16 + 16 * i as u64,
                                format!(
                                    "private run [{s:#x}, {end:#x}) out of order, overlapping, or past {MAX_RUNS} runs"
                                ),
                            ));
                        }
                        self.private.push(range);
                    }
                }
                Kind::State => {
                    self.report.state = buf[..rec.len].to_vec();
                    state_seen = true;
                }
                Kind::End => {
                    let u =
                        |a: usize| u64::from_le_bytes(buf[a..a + 8].try_into().unwrap_or_default());
                    let counted = (
                        self.report.shared_bytes,
                        self.report.sealed_bytes,
                        self.report.zeroed_bytes,
                        self.report.rounds,
                    );
                    if !state_seen
                        || rec.aux != self.report.records
                        || (u(0), u(8), u(16), u(24)) != counted
                    {
                        return Err(corrupt(
                            at,
                            format!(
                                "the end record ({} records, {:?}) disagrees with the stream ({} records, {counted:?}, state {})",
                                rec.aux,
                                (u(0), u(8), u(16), u(24)),
                                self.report.records,
                                if state_seen { "seen" } else { "missing" }
                            ),
                        ));
                    }
                    self.report.stream_bytes = rec.next;
                    return Ok(());
                }
                Kind::Postcopy => {
                    if !state_seen {
                        return Err(corrupt(at, "post-copy blocks before the state".into()));
                    }
                    if self.switched && (rec.aux == 0 || self.postcopy.is_empty()) {
                        return Err(corrupt(at, "an empty blocks record among others".into()));
                    }
                    self.switched = true;
                    for (i, e) in buf[..rec.len].chunks_exact(16).enumerate() {
                        let s = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
                        let end = u64::from_le_bytes(e[8..].try_into().unwrap_or_default());
                        let range = self.placed(s, end.wrapping_sub(s), at)?;
                        let last = self.postcopy.last().map_or(0, |p| p.end);
                        if range.start < last
                            || range.end - range.start > REMOTE_BLOCK
                            || range.start / REMOTE_BLOCK != (range.end - 1) / REMOTE_BLOCK
                        {
                            return Err(corrupt(
                                at + 16 + 16 * i as u64,
                                format!(
                                    "post-copy block [{s:#x}, {end:#x}) is out of order, or crosses a 2 MiB boundary"
                                ),
                            ));
                        }
                        self.postcopy.push(range);
                    }
                }
                Kind::Index => {
                    return Err(corrupt(
                        at,
                        "an index record, which only a snapshot has".into(),
                    ));
                }
                Kind::Go => {
                    return Err(corrupt(
                        at,
                        "a go-ahead before the switch to post-copy".into(),
                    ));
                }
            }
            at = rec.next;
            self.report.stream_bytes = at;
        }
    }
}

/// What [`Incoming::receive_with_postcopy`] delivered.
#[derive(Debug)]
#[non_exhaustive]
pub struct Received {
    /// What came before the guest could run (everything, without
    /// post-copy).
    pub report: IncomingReport,
    /// The post-copy phase under way, if the source switched to it.
    pub postcopy: Option<Postcopy>,
}

/// A post-copy phase under way at the destination: the guest may run;
/// blocks come in behind it, and a touch of one not yet in waits for it.
pub struct Postcopy {
    restore: LazyRestore,
    fill: RemoteFill,
    go: Arc<GoAhead>,
}

/// The source's go-ahead, as the post-copy receiver saw it.
#[derive(Default)]
struct GoAhead {
    /// `Some(true)`: it came; `Some(false)`: the receiver ended without it.
    seen: Mutex<Option<bool>>,
    cv: Condvar,
}

impl GoAhead {
    fn set(&self, seen: bool) {
        let mut g = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(seen);
        }
        drop(g);
        self.cv.notify_all();
    }

    /// Waits for the go-ahead, at most `timeout`.
    fn wait(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // The deadline first: a go-ahead that comes late may be the
            // rest of one the source gave up on (and resumed after).
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            if let Some(seen) = *g {
                return seen;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl std::fmt::Debug for Postcopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postcopy")
            .field("restore", &self.restore)
            .finish_non_exhaustive()
    }
}

impl Postcopy {
    /// Tells the source the destination is ready to run the guest
    /// ([`POSTCOPY_RUNNING`](super::POSTCOPY_RUNNING)), and waits (at most
    /// [`POSTCOPY_TIMEOUT`](super::POSTCOPY_TIMEOUT)) for its go-ahead in
    /// the stream: once that has come, the source never resumes the guest,
    /// and the caller runs it. Without it the guest must not run here:
    /// the source may have resumed it (split brain is what this exchange
    /// rules out: the source commits before the destination runs).
    ///
    /// # Errors
    /// The connection's, or `TimedOut` / `ConnectionAborted` when no
    /// go-ahead came: then do not run the guest, and call
    /// [`answer_failed`](Self::answer_failed).
    pub fn answer_running(&self) -> std::io::Result<()> {
        let gone = *self.go.seen.lock().unwrap_or_else(|e| e.into_inner()) == Some(false);
        if gone {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the post-copy receiver has ended: no go-ahead can come, and the guest is not run here",
            ));
        }
        self.fill.tell(super::POSTCOPY_RUNNING)?;
        if self.go.wait(super::POSTCOPY_TIMEOUT) {
            return Ok(());
        }
        let ended = self
            .go
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        Err(std::io::Error::new(
            if ended {
                std::io::ErrorKind::ConnectionAborted
            } else {
                std::io::ErrorKind::TimedOut
            },
            "the source sent no go-ahead: the guest is not run here",
        ))
    }

    /// Tells the source the destination will not run the guest
    /// ([`POSTCOPY_FAILED`](super::POSTCOPY_FAILED)); the source may
    /// resume it. The restore is abandoned.
    pub fn answer_failed(self) {
        let _ = self.fill.tell(super::POSTCOPY_FAILED);
        self.restore.abandon();
    }

    /// The restore filling the memory, for the VMM to keep while the
    /// guest runs (and to watch: [`LazyRestore::failure`]).
    pub fn into_restore(self) -> LazyRestore {
        self.restore
    }
}

/// The post-copy receiver: the stream after the switch.
struct Tail {
    fill: RemoteFill,
    /// Set when the source's go-ahead comes (or the receiver ends).
    go: Arc<GoAhead>,
    sealer: Option<Sealer>,
    regions: Vec<crate::gate::frozen::RegionLayout>,
    private: Vec<Range<u64>>,
    at: u64,
    records: u64,
    shared: u64,
    sealed: u64,
    zeroed: u64,
}

impl Tail {
    fn run(mut self, mut r: impl Read) {
        if let Err(e) = self.receive(&mut r) {
            self.fill.fail(e.to_string());
        }
        self.go.set(false);
    }

    fn receive(&mut self, r: &mut impl Read) -> Result<(), RestoreError> {
        let mut buf = vec![0u8; CHUNK + TAG];
        let sealed = self.sealer.is_some();
        let mut blocks_data = 0u64;
        // The end came before the go-ahead: only the go-ahead may follow.
        let mut ended = false;
        loop {
            if self.fill.stopped() {
                return Ok(());
            }
            let at = self.at;
            let rec = read_record(r, at, &mut buf, sealed)?;
            let ordinal = self.records;
            self.records += 1;
            if let Some(s) = &self.sealer {
                open_record(s, &rec, ordinal, &mut buf, at)?;
            }
            let placed = |gpa: u64, len: u64| -> Result<Range<u64>, RestoreError> {
                let end = gpa.checked_add(len).filter(|_| {
                    len > 0 && gpa.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE)
                });
                match end {
                    Some(end)
                        if self
                            .regions
                            .iter()
                            .any(|r| r.gpa <= gpa && end <= r.gpa + r.len) =>
                    {
                        Ok(gpa..end)
                    }
                    _ => Err(corrupt(
                        at + 8,
                        format!(
                            "a record at [{gpa:#x}, +{len:#x}) is not whole pages inside one region"
                        ),
                    )),
                }
            };
            if ended && rec.kind != Kind::Go {
                return Err(corrupt(
                    at,
                    format!("a {:?} record after the end", rec.kind),
                ));
            }
            match rec.kind {
                Kind::Go => {
                    let seen = *self.go.seen.lock().unwrap_or_else(|e| e.into_inner());
                    if seen.is_some() {
                        return Err(corrupt(at, "a second go-ahead".into()));
                    }
                    self.go.set(true);
                    if ended {
                        // Every block and the go-ahead: the source may
                        // report the migration done.
                        self.fill
                            .tell(super::POSTCOPY_DONE)
                            .map_err(RestoreError::Read)?;
                        return Ok(());
                    }
                }
                Kind::Shared | Kind::Sealed => {
                    let range = placed(rec.aux, rec.len as u64)?;
                    let private: u64 = self
                        .private
                        .iter()
                        .map(|p| {
                            p.end
                                .min(range.end)
                                .saturating_sub(p.start.max(range.start))
                        })
                        .sum();
                    let want = if rec.kind == Kind::Sealed {
                        rec.len as u64
                    } else {
                        0
                    };
                    if private != want || (rec.kind == Kind::Sealed && !sealed) {
                        return Err(corrupt(
                            at,
                            format!(
                                "a {:?} record at {:#x} disagrees with the attribute map",
                                rec.kind, rec.aux
                            ),
                        ));
                    }
                    if rec.kind == Kind::Sealed {
                        self.sealed += rec.len as u64;
                    } else {
                        self.shared += rec.len as u64;
                    }
                    blocks_data += rec.len as u64;
                    self.fill
                        .deliver(range.start, Some(&buf[..rec.len]), rec.len as u64)
                        .map_err(|e| corrupt(at, e))?;
                }
                Kind::Zero => {
                    let len = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
                    let range = placed(rec.aux, len)?;
                    self.zeroed += len;
                    self.fill
                        .deliver(range.start, None, len)
                        .map_err(|e| corrupt(at, e))?;
                }
                Kind::End => {
                    let u =
                        |a: usize| u64::from_le_bytes(buf[a..a + 8].try_into().unwrap_or_default());
                    let counted = (self.shared, self.sealed, self.zeroed);
                    if rec.aux != self.records || (u(0), u(8), u(16)) != counted {
                        return Err(corrupt(
                            at,
                            format!(
                                "the post-copy end ({} records, {:?}) disagrees with the stream ({} records, {counted:?})",
                                rec.aux,
                                (u(0), u(8), u(16)),
                                self.records
                            ),
                        ));
                    }
                    if !self.fill.is_complete() {
                        return Err(corrupt(
                            at,
                            format!(
                                "the post-copy end came before every block ({blocks_data:#x} bytes of data)"
                            ),
                        ));
                    }
                    // DONE says every block *and* the go-ahead are in:
                    // without the go-ahead the guest does not run here,
                    // and the source must not report success.
                    let seen = *self.go.seen.lock().unwrap_or_else(|e| e.into_inner());
                    if seen.is_some() {
                        self.fill
                            .tell(super::POSTCOPY_DONE)
                            .map_err(RestoreError::Read)?;
                        return Ok(());
                    }
                    ended = true;
                }
                other => {
                    return Err(corrupt(
                        at,
                        format!("a {other:?} record after the switch to post-copy"),
                    ));
                }
            }
            self.at = rec.next;
        }
    }
}
