//! [`Gatekeeper::snapshot`]: the stream written.

use std::io::Write;

use super::PrivatePages;
use super::error::SnapshotError;
use super::format::{CHUNK, Header, Kind, PolicyCode, TAG, aad, record_header, write_record};
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
            id,
            regions: frozen.layout(),
            private: private_runs,
        };
        let bytes = header.encode();
        w.write_all(&bytes).map_err(SnapshotError::Write)?;
        let mut report = SnapshotReport {
            stream_bytes: bytes.len() as u64,
            ..SnapshotReport::default()
        };
        let sealer = match private {
            PrivatePages::Seal(key) => {
                let sealer = Sealer::new(key, id);
                let tag = sealer.seal(HEADER_INDEX, &bytes, &mut []);
                w.write_all(&tag).map_err(SnapshotError::Write)?;
                report.stream_bytes += TAG as u64;
                Some(sealer)
            }
            _ => None,
        };
        let mut buf = vec![0u8; CHUNK];
        for run in populated {
            for (part, is_private) in frozen.split(run) {
                let mut gpa = part.start;
                while gpa < part.end {
                    let n = (part.end - gpa).min(CHUNK as u64) as usize;
                    let chunk = &mut buf[..n];
                    if is_private && sealer.is_none() {
                        report.omitted_bytes += n as u64;
                        gpa += n as u64;
                        continue;
                    }
                    frozen.read_raw(gpa, chunk)?;
                    let kind = if is_private {
                        Kind::Sealed
                    } else {
                        Kind::Shared
                    };
                    let head = record_header(kind, n as u32, gpa);
                    let written = match (&sealer, is_private) {
                        (Some(s), true) => {
                            let aad = aad(&head);
                            let tag = s.seal(report.records, &aad, chunk);
                            report.sealed_bytes += n as u64;
                            write_record(w, &head, &[chunk, &tag])?
                        }
                        _ => {
                            report.shared_bytes += n as u64;
                            write_record(w, &head, &[chunk])?
                        }
                    };
                    report.stream_bytes += written;
                    report.records += 1;
                    gpa += n as u64;
                }
            }
        }
        report.records += 1;
        let end = record_header(Kind::End, 16, report.records);
        let mut totals = [0u8; 16];
        totals[..8].copy_from_slice(&report.shared_bytes.to_le_bytes());
        totals[8..].copy_from_slice(&report.sealed_bytes.to_le_bytes());
        report.stream_bytes += write_record(w, &end, &[&totals])?;
        w.flush().map_err(SnapshotError::Write)?;
        Ok(report)
    }
}
