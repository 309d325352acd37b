//! [`Gatekeeper::restore`]: a stream read back into a new VM's memory,
//! eagerly: every record checked (its CRC-32C, its place in the layout and
//! the attribute map, its tag) before its bytes are written, holes left
//! holes, and the attributes set last.

use std::io::Read;

use super::error::RestoreError;
use super::format::{
    CHUNK, Header, Kind, PolicyCode, RECORD_HEADER, TAG, aad, corrupt, read_exact,
};
use super::seal::{HEADER_INDEX, SealKey, Sealer};
use crate::gate::{GateError, Gatekeeper};
use crate::range::PAGE_SIZE;

/// What a restore read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreReport {
    /// Guest bytes restored from clear records.
    pub shared_bytes: u64,
    /// Guest bytes restored from sealed records.
    pub sealed_bytes: u64,
    /// Records read, the end record included.
    pub records: u64,
}

fn layout_text(regions: impl Iterator<Item = (u64, u64)>) -> String {
    regions
        .map(|(gpa, len)| format!("[{gpa:#x}, +{len:#x})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Gatekeeper {
    /// Restores a snapshot written by [`snapshot`](Self::snapshot) into this
    /// gatekeeper's memory, eagerly: every region is discarded first, each
    /// record's bytes are written where they were (holes stay holes, so no
    /// page is allocated for one), and the attribute map (KVM's too, where
    /// it has them) becomes the snapshot's at the end. The gatekeeper must
    /// be new (in its launch phase, no pin live); its regions must be at the
    /// snapshot's GPAs with its lengths, on any backing. A restored
    /// gatekeeper has left its launch phase.
    ///
    /// # Errors
    /// Before the memory is touched, nothing changed:
    /// [`RestoreError::NotASnapshot`], [`RestoreError::Version`],
    /// [`RestoreError::Corrupt`] or [`RestoreError::Truncated`] in the
    /// header, [`RestoreError::Layout`], [`RestoreError::NeedsKey`],
    /// [`RestoreError::WrongKey`], [`RestoreError::Gate`]. In a record
    /// ([`RestoreError::Corrupt`], [`RestoreError::Truncated`],
    /// [`RestoreError::Read`]): the gatekeeper is poisoned, so the half
    /// restored VM can never run.
    pub fn restore(
        &self,
        r: &mut impl Read,
        key: Option<&SealKey>,
    ) -> Result<RestoreReport, RestoreError> {
        let mut frozen = self.freeze()?;
        let (header, bytes) = Header::decode(r)?;
        let here = frozen.layout();
        let same = here.len() == header.regions.len()
            && here
                .iter()
                .zip(&header.regions)
                .all(|(a, b)| a.gpa == b.gpa && a.len == b.len);
        if !same {
            return Err(RestoreError::Layout {
                snapshot: header.regions.len(),
                snapshot_layout: layout_text(header.regions.iter().map(|r| (r.gpa, r.len))),
                here: here.len(),
                here_layout: layout_text(here.iter().map(|r| (r.gpa, r.len))),
            });
        }
        let sealer = if header.policy == PolicyCode::Seal {
            let key = key.ok_or(RestoreError::NeedsKey)?;
            let sealer = Sealer::new(key, header.id);
            let mut tag = [0u8; TAG];
            read_exact(r, &mut tag, bytes.len() as u64)?;
            if !sealer.open(HEADER_INDEX, &bytes, &mut [], &tag) {
                return Err(RestoreError::WrongKey);
            }
            Some(sealer)
        } else {
            None
        };
        let start = bytes.len() as u64 + if sealer.is_some() { TAG as u64 } else { 0 };
        frozen.begin_restore()?;
        let mut writer = |gpa: u64, data: &[u8]| frozen.write_raw(gpa, data);
        let result = read_records(r, &header, sealer.as_ref(), start, &mut writer);
        match result {
            Ok(report) => {
                frozen.finish_restore(&header.private)?;
                Ok(report)
            }
            Err(e) => {
                frozen.poison(format!(
                    "a restore stopped part-way ({e}): the VM's memory is not the snapshot's"
                ));
                Err(e)
            }
        }
    }
}

/// Where a restore writes a record's bytes: `(gpa, bytes)`.
type WriteFn<'a> = dyn FnMut(u64, &[u8]) -> Result<(), GateError> + 'a;

/// Reads, checks and writes every record up to and including the end.
fn read_records(
    r: &mut impl Read,
    header: &Header,
    sealer: Option<&Sealer>,
    mut at: u64,
    write: &mut WriteFn<'_>,
) -> Result<RestoreReport, RestoreError> {
    let mut report = RestoreReport::default();
    let mut buf = vec![0u8; CHUNK + TAG];
    let mut last_end = 0u64;
    loop {
        let mut head = [0u8; RECORD_HEADER];
        read_exact(r, &mut head, at)?;
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap_or_default()) as usize;
        let gpa = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
        let kind = match head[0] {
            1 => Kind::Shared,
            2 => Kind::Sealed,
            0xff => Kind::End,
            other => return Err(corrupt(at, format!("unknown record kind {other:#x}"))),
        };
        if head[1..4] != [0, 0, 0] {
            return Err(corrupt(
                at + 1,
                "a record header's padding is not zero".into(),
            ));
        }
        let payload = match kind {
            Kind::End if len == 16 => 16,
            Kind::End => return Err(corrupt(at + 4, format!("an end record of {len} bytes"))),
            _ if len == 0 || len > CHUNK || !len.is_multiple_of(PAGE_SIZE as usize) => {
                return Err(corrupt(
                    at + 4,
                    format!("a record of {len:#x} bytes (whole pages, at most {CHUNK:#x})"),
                ));
            }
            Kind::Sealed => len + TAG,
            Kind::Shared => len,
        };
        read_exact(r, &mut buf[..payload], at + RECORD_HEADER as u64)?;
        let mut crc = [0u8; 4];
        read_exact(r, &mut crc, at + (RECORD_HEADER + payload) as u64)?;
        let want = crc32c::crc32c_append(crc32c::crc32c(&head), &buf[..payload]);
        if u32::from_le_bytes(crc) != want {
            return Err(corrupt(at, "a record's CRC-32C does not match".into()));
        }
        let next = at + (RECORD_HEADER + payload + 4) as u64;
        report.records += 1;
        if kind == Kind::End {
            let shared = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
            let sealed = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
            if gpa != report.records
                || shared != report.shared_bytes
                || sealed != report.sealed_bytes
            {
                return Err(corrupt(
                    at,
                    format!(
                        "the end record counts {gpa} records, {shared:#x} clear and {sealed:#x} sealed bytes; the stream held {}, {:#x} and {:#x}",
                        report.records, report.shared_bytes, report.sealed_bytes
                    ),
                ));
            }
            return Ok(report);
        }
        // The record's place: in order, inside one region, of the attribute
        // its kind says.
        let end = gpa
            .checked_add(len as u64)
            .ok_or_else(|| corrupt(at + 8, format!("a record at {gpa:#x} wraps around")))?;
        if gpa < last_end || !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(corrupt(
                at + 8,
                format!("a record at {gpa:#x} is out of order"),
            ));
        }
        if !header
            .regions
            .iter()
            .any(|r| r.gpa <= gpa && end <= r.gpa + r.len)
        {
            return Err(corrupt(
                at + 8,
                format!("a record at [{gpa:#x}, {end:#x}) lies outside the layout"),
            ));
        }
        let private_bytes: u64 = header
            .private
            .iter()
            .map(|p| p.end.min(end).saturating_sub(p.start.max(gpa)))
            .sum();
        let want_private = kind == Kind::Sealed;
        let consistent = if want_private {
            private_bytes == len as u64
        } else {
            private_bytes == 0
        };
        if !consistent || (want_private && sealer.is_none()) {
            return Err(corrupt(
                at,
                format!(
                    "a {kind:?} record at [{gpa:#x}, {end:#x}) disagrees with the attribute map"
                ),
            ));
        }
        if let (Kind::Sealed, Some(s)) = (kind, sealer) {
            let mut tag = [0u8; TAG];
            tag.copy_from_slice(&buf[len..len + TAG]);
            if !s.open(report.records - 1, &aad(&head), &mut buf[..len], &tag) {
                return Err(corrupt(at, "a sealed record does not authenticate".into()));
            }
            report.sealed_bytes += len as u64;
        } else {
            report.shared_bytes += len as u64;
        }
        write(gpa, &buf[..len])?;
        last_end = end;
        at = next;
    }
}
