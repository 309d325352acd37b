//! [`Gatekeeper::snapshot`]: the stream written.

use std::io::Write;

use super::PrivatePages;
use super::error::SnapshotError;
use super::format::{
    CHUNK, ENTRIES_PER_RECORD, ENTRY, End, Header, IndexEntry, Kind, MAX_STATE, PolicyCode, TAG,
    aad, record_header, tagged_aad, write_record,
};
use super::seal::{HEADER_INDEX, Sealer};
use crate::gate::Gatekeeper;

/// What a snapshot wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotReport {
    /// Bytes written to the stream in all.
    pub stream_bytes: u64,
    /// Guest bytes saved in clear (shared pages).
    pub shared_bytes: u64,
    /// Guest bytes saved sealed (private pages).
    pub sealed_bytes: u64,
    /// Private bytes not saved ([`PrivatePages::Omit`]).
    pub omitted_bytes: u64,
    /// Records written, the end record included.
    pub records: u64,
}

impl Gatekeeper {
    /// Writes a snapshot of the VM's memory to `w`: the layout, the
    /// attribute map and every populated run, private runs as `private`
    /// says. See [`crate::snapshot`] and `docs/snapshot-format.md`.
    ///
    /// The gatekeeper is frozen for the call: conversions, discards, copies
    /// and new pins wait. The VMM pauses its vCPUs first. The VM is not
    /// changed, whether the snapshot succeeds or not.
    ///
    /// # Errors
    /// [`SnapshotError::Gate`] with [`GateError::Pinned`](crate::GateError::Pinned)
    /// (`EAGAIN`) while a device holds pins, `Poisoned`, or `TwoBackings`;
    /// [`SnapshotError::PrivatePages`] (`EPERM`) under
    /// [`PrivatePages::Refuse`] if any page is private, before a byte is
    /// written; [`SnapshotError::Write`] with the writer's error (a full
    /// disk); [`SnapshotError::Populated`] if the population cannot be read.
    pub fn snapshot(
        &self,
        w: &mut impl Write,
        private: &PrivatePages,
    ) -> Result<SnapshotReport, SnapshotError> {
        self.snapshot_with_state(w, private, &[])
    }

    /// [`snapshot`](Self::snapshot), with `state` (a VMM's vCPU and device
    /// state, at most [`MAX_STATE`] bytes) carried in the stream: sealed
    /// with the private pages under [`PrivatePages::Seal`] (registers can
    /// hold private data), in clear otherwise. A restore hands it back
    /// ([`RestoreReport::state`](super::RestoreReport::state)).
    ///
    /// # Errors
    /// As [`snapshot`](Self::snapshot), and [`SnapshotError::StateTooLarge`]
    /// before a byte is written.
    pub fn snapshot_with_state(
        &self,
        w: &mut impl Write,
        private: &PrivatePages,
        state: &[u8],
    ) -> Result<SnapshotReport, SnapshotError> {
        if state.len() > MAX_STATE {
            return Err(SnapshotError::StateTooLarge {
                len: state.len(),
                max: MAX_STATE,
            });
        }
        if let Some(lazy) = self.lazy_fill() {
            // A lazily restored VM is snapshotted once every page is in.
            lazy.fill_all().map_err(SnapshotError::Gate)?;
        }
        let frozen = self.freeze()?;
        let private_runs = frozen.private_runs();
        let private_bytes: u64 = private_runs.iter().map(|r| r.end - r.start).sum();
        if let (PrivatePages::Refuse, Some(first)) = (private, private_runs.first()) {
            return Err(SnapshotError::PrivatePages {
                bytes: private_bytes,
                first_gpa: first.start,
                first_len: first.end - first.start,
            });
        }
        let populated = frozen.populated().map_err(SnapshotError::Populated)?;
        let mut id = [0u8; 16];
        rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty())
            .map_err(|e| SnapshotError::Random(e.into()))?;
        let header = Header {
            policy: match private {
                PrivatePages::Refuse => PolicyCode::Refuse,
                PrivatePages::Seal(_) => PolicyCode::Seal,
                PrivatePages::Omit => PolicyCode::Omit,
            },
            conversion: self.policy(),
            id,
            regions: frozen.layout(),
            private: private_runs,
        };
        let bytes = header.encode();
        w.write_all(&bytes).map_err(SnapshotError::Write)?;
        let mut out = Out {
            w,
            sealer: match private {
                PrivatePages::Seal(key) => Some(Sealer::new(key, id)),
                _ => None,
            },
            report: SnapshotReport {
                stream_bytes: bytes.len() as u64,
                ..SnapshotReport::default()
            },
        };
        if let Some(s) = &out.sealer {
            let tag = s.seal(HEADER_INDEX, &bytes, &mut []);
            out.w.write_all(&tag).map_err(SnapshotError::Write)?;
            out.report.stream_bytes += TAG as u64;
        }
        let mut buf = vec![0u8; CHUNK];
        buf[..state.len()].copy_from_slice(state);
        let sealed = out.sealer.is_some();
        out.record(Kind::State, 0, &mut buf[..state.len()], sealed)?;
        let mut index = Vec::new();
        for run in populated {
            for (part, is_private) in frozen.split(run) {
                let mut gpa = part.start;
                while gpa < part.end {
                    // A record never crosses a 1 MiB-aligned boundary, so
                    // a 2 MiB huge page holds whole records (a lazy
                    // restore's block is one huge page).
                    let boundary = (gpa / CHUNK as u64 + 1) * CHUNK as u64;
                    let n = (part.end.min(boundary) - gpa) as usize;
                    if is_private && !sealed {
                        out.report.omitted_bytes += n as u64;
                        gpa += n as u64;
                        continue;
                    }
                    let chunk = &mut buf[..n];
                    frozen.read_raw(gpa, chunk)?;
                    let kind = if is_private {
                        Kind::Sealed
                    } else {
                        Kind::Shared
                    };
                    index.push(IndexEntry {
                        gpa,
                        offset: out.report.stream_bytes,
                        len: n as u32,
                        kind,
                    });
                    if is_private {
                        out.report.sealed_bytes += n as u64;
                    } else {
                        out.report.shared_bytes += n as u64;
                    }
                    out.record(kind, gpa, chunk, is_private)?;
                    gpa += n as u64;
                }
            }
        }
        drop(frozen);
        let index_at = out.report.stream_bytes;
        let mut index_records = 0;
        for part in index.chunks(ENTRIES_PER_RECORD) {
            let mut payload = Vec::with_capacity(part.len() * ENTRY);
            for e in part {
                payload.extend_from_slice(&e.encode());
            }
            out.authenticated(Kind::Index, part.len() as u64, &payload)?;
            index_records += 1;
        }
        let end = End {
            shared: out.report.shared_bytes,
            sealed: out.report.sealed_bytes,
            index_at,
            index_records,
        };
        let records = out.report.records + 1;
        out.authenticated(Kind::End, records, &end.encode())?;
        out.w.flush().map_err(SnapshotError::Write)?;
        Ok(out.report)
    }
}

/// The stream being written: the writer, the sealer and the counts.
struct Out<'w, W: Write> {
    w: &'w mut W,
    sealer: Option<Sealer>,
    report: SnapshotReport,
}

impl<W: Write> Out<'_, W> {
    /// Writes one record whose payload is `data`. Under `Seal`: encrypted
    /// in place and tagged if `encrypt` (the record's header the associated
    /// data), tagged in clear otherwise; the record's ordinal is the nonce.
    fn record(
        &mut self,
        kind: Kind,
        aux: u64,
        data: &mut [u8],
        encrypt: bool,
    ) -> Result<(), SnapshotError> {
        let head = record_header(kind, data.len() as u32, aux);
        let written = match &self.sealer {
            Some(s) if encrypt => {
                let tag = s.seal(self.report.records, &aad(&head), data);
                write_record(self.w, &head, &[data, &tag])?
            }
            Some(_) => return self.authenticated(kind, aux, data),
            None => write_record(self.w, &head, &[data])?,
        };
        self.report.stream_bytes += written;
        self.report.records += 1;
        Ok(())
    }

    /// Writes a record in clear, tagged under `Seal` (its header and
    /// payload the associated data), so that shared memory, the index and
    /// the end cannot be edited under a sealed snapshot.
    fn authenticated(&mut self, kind: Kind, aux: u64, payload: &[u8]) -> Result<(), SnapshotError> {
        let head = record_header(kind, payload.len() as u32, aux);
        let written = match &self.sealer {
            Some(s) => {
                let tag = s.seal(self.report.records, &tagged_aad(&head, payload), &mut []);
                write_record(self.w, &head, &[payload, &tag])?
            }
            None => write_record(self.w, &head, &[payload])?,
        };
        self.report.stream_bytes += written;
        self.report.records += 1;
        Ok(())
    }
}
