//! The snapshot stream's bytes: the header (layout, attribute map, policy)
//! and the records, each with its CRC-32C; `docs/snapshot-format.md` is
//! the same in prose. Pure encoding and decoding: no system call.

use std::io::{Read, Write};
use std::ops::Range;

use super::error::{RestoreError, SnapshotError};
use crate::backing::BackingKind;
use crate::gate::frozen::RegionLayout;

/// The file's first 8 bytes.
pub const MAGIC: &[u8; 8] = b"GMEMSNAP";
/// The format version this gmem writes and reads.
pub const VERSION: u32 = 2;
/// The most plaintext bytes one record carries: what a snapshot or restore
/// holds in memory at once.
pub const CHUNK: usize = 1 << 20;
/// A record's header: kind, 3 bytes zero, length, GPA.
pub(crate) const RECORD_HEADER: usize = 16;
/// The AEAD tag of a sealed record.
pub(crate) const TAG: usize = 16;
/// The most regions a snapshot may describe (a reader allocates no more).
pub(crate) const MAX_REGIONS: u32 = 4096;
/// The most private runs a snapshot may describe: 16 Mi runs (256 MiB of
/// map), bounded further by the layout's pages.
pub(crate) const MAX_RUNS: u32 = 1 << 24;

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Shared pages, in clear.
    Shared = 1,
    /// Private pages, sealed (ciphertext and tag).
    Sealed = 2,
    /// The caller's state (a VMM's vCPUs and devices): sealed under
    /// `Seal`, in clear otherwise.
    State = 3,
    /// Part of the index: where each data record lies in the stream.
    Index = 4,
    /// Migration only: a range the destination discards (a hole in the
    /// source). Its payload is the length (8 bytes), its GPA the start.
    Zero = 5,
    /// Migration only: the end of a pre-copy round (its number the GPA
    /// field); payload: the round's data and zeroed bytes (16 bytes).
    Round = 6,
    /// Migration only: private runs of the attribute map (their count the
    /// GPA field), 16 bytes each.
    Attributes = 7,
    /// Migration only: the blocks the source sends after the switch to
    /// post-copy (their count the GPA field), 16 bytes each.
    Postcopy = 8,
    /// Migration only, post-copy: the source's go-ahead, sent once the
    /// destination has said it is ready to run the guest; from then on the
    /// source never resumes it. No payload; authenticated.
    Go = 9,
    /// The end: the record count and the bytes of data.
    End = 0xff,
}

/// What the private pages became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PolicyCode {
    Refuse = 0,
    Seal = 1,
    Omit = 2,
}

/// The header, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) policy: PolicyCode,
    /// The gatekeeper's conversion policy.
    pub(crate) conversion: crate::Policy,
    pub(crate) id: [u8; 16],
    pub(crate) regions: Vec<RegionLayout>,
    pub(crate) private: Vec<Range<u64>>,
}

fn kind_code(k: BackingKind) -> u8 {
    match k {
        BackingKind::GuestMemfd => 0,
        BackingKind::Memfd => 1,
        BackingKind::Hugetlb2M => 2,
        BackingKind::Hugetlb1G => 3,
    }
}

fn kind_of(c: u8) -> Option<BackingKind> {
    Some(match c {
        0 => BackingKind::GuestMemfd,
        1 => BackingKind::Memfd,
        2 => BackingKind::Hugetlb2M,
        3 => BackingKind::Hugetlb1G,
        _ => return None,
    })
}

impl Header {
    /// The header's bytes, its CRC-32C last.
    pub(crate) fn encode(&self) -> Vec<u8> {
        self.encode_as(MAGIC, VERSION)
    }

    /// The header's bytes under another stream's magic and version (a
    /// migration stream's).
    pub(crate) fn encode_as(&self, magic: &[u8; 8], version: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(48 + 40 * self.regions.len() + 16 * self.private.len());
        b.extend_from_slice(magic);
        b.extend_from_slice(&version.to_le_bytes());
        let conversion = match self.conversion {
            crate::Policy::Discard => 1,
            _ => 0,
        };
        b.extend_from_slice(&[self.policy as u8, conversion, 0, 0]);
        b.extend_from_slice(&self.id);
        b.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.private.len() as u32).to_le_bytes());
        for r in &self.regions {
            b.extend_from_slice(&r.gpa.to_le_bytes());
            b.extend_from_slice(&r.len.to_le_bytes());
            b.extend_from_slice(&r.offset.to_le_bytes());
            b.extend_from_slice(&r.kind.page_size().to_le_bytes());
            b.extend_from_slice(&[kind_code(r.kind), 0, 0, 0]);
            b.extend_from_slice(&(r.flags as u32).to_le_bytes());
        }
        for run in &self.private {
            b.extend_from_slice(&run.start.to_le_bytes());
            b.extend_from_slice(&run.end.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads and checks a header; its bytes too (a sealed snapshot
    /// authenticates them).
    pub(crate) fn decode(r: &mut impl Read) -> Result<(Header, Vec<u8>), RestoreError> {
        Header::decode_as(r, MAGIC, VERSION)
    }

    /// [`decode`](Self::decode) for another stream's magic and version.
    pub(crate) fn decode_as(
        r: &mut impl Read,
        magic: &[u8; 8],
        want: u32,
    ) -> Result<(Header, Vec<u8>), RestoreError> {
        let mut fixed = [0u8; 40];
        read_exact(r, &mut fixed[..8], 0)?;
        if &fixed[..8] != magic {
            return Err(RestoreError::NotASnapshot);
        }
        read_exact(r, &mut fixed[8..], 8)?;
        let version = u32::from_le_bytes(fixed[8..12].try_into().unwrap_or_default());
        if version != want {
            return Err(RestoreError::Version { found: version });
        }
        let policy = match fixed[12] {
            0 => PolicyCode::Refuse,
            1 => PolicyCode::Seal,
            2 => PolicyCode::Omit,
            other => return Err(corrupt(12, format!("unknown private-page policy {other}"))),
        };
        let conversion = match fixed[13] {
            0 => crate::Policy::InPlace,
            1 => crate::Policy::Discard,
            other => return Err(corrupt(13, format!("unknown conversion policy {other}"))),
        };
        if fixed[14..16] != [0, 0] {
            return Err(corrupt(14, "the header's padding is not zero".into()));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&fixed[16..32]);
        let nregions = u32::from_le_bytes(fixed[32..36].try_into().unwrap_or_default());
        let nruns = u32::from_le_bytes(fixed[36..40].try_into().unwrap_or_default());
        if nregions == 0 || nregions > MAX_REGIONS {
            return Err(corrupt(
                32,
                format!("{nregions} regions (1 to {MAX_REGIONS})"),
            ));
        }
        if nruns > MAX_RUNS {
            return Err(corrupt(
                36,
                format!("{nruns} private runs (at most {MAX_RUNS})"),
            ));
        }
        let mut bytes = fixed.to_vec();
        let mut regions = Vec::with_capacity(nregions as usize);
        for i in 0..nregions as usize {
            let mut e = [0u8; 40];
            read_exact(r, &mut e, bytes.len() as u64)?;
            bytes.extend_from_slice(&e);
            let u = |a: usize| u64::from_le_bytes(e[a..a + 8].try_into().unwrap_or_default());
            let kind = kind_of(e[32]).ok_or_else(|| {
                corrupt(
                    40 + 40 * i as u64,
                    format!("region {i}: unknown backing {}", e[32]),
                )
            })?;
            let (gpa, len, offset, page) = (u(0), u(8), u(16), u(24));
            if page != kind.page_size()
                || len == 0
                || !len.is_multiple_of(crate::range::PAGE_SIZE)
                || !gpa.is_multiple_of(crate::range::PAGE_SIZE)
                || gpa.checked_add(len).is_none()
            {
                return Err(corrupt(
                    40 + 40 * i as u64,
                    format!("region {i}: [{gpa:#x}, +{len:#x}) of {kind} is not a binding"),
                ));
            }
            let flags = u64::from(u32::from_le_bytes(e[36..40].try_into().unwrap_or_default()));
            regions.push(RegionLayout {
                gpa,
                len,
                offset,
                kind,
                flags,
            });
        }
        if regions.windows(2).any(|w| w[0].gpa + w[0].len > w[1].gpa) {
            return Err(corrupt(40, "regions out of order or overlapping".into()));
        }
        let pages: u64 = regions
            .iter()
            .map(|r| r.len / crate::range::PAGE_SIZE)
            .sum();
        if u64::from(nruns) > pages {
            return Err(corrupt(
                36,
                format!("{nruns} private runs in {pages} pages"),
            ));
        }
        let mut private = Vec::with_capacity(nruns as usize);
        let mut last = 0;
        for i in 0..nruns as usize {
            let mut e = [0u8; 16];
            read_exact(r, &mut e, bytes.len() as u64)?;
            bytes.extend_from_slice(&e);
            let (s, end) = (
                u64::from_le_bytes(e[..8].try_into().unwrap_or_default()),
                u64::from_le_bytes(e[8..].try_into().unwrap_or_default()),
            );
            let inside = regions.iter().any(|r| r.gpa <= s && end <= r.gpa + r.len);
            let aligned = s.is_multiple_of(crate::range::PAGE_SIZE)
                && end.is_multiple_of(crate::range::PAGE_SIZE);
            if s >= end || s < last || !inside || !aligned {
                return Err(corrupt(
                    bytes.len() as u64 - 16,
                    format!("private run {i} [{s:#x}, {end:#x}) is not a run of the layout"),
                ));
            }
            last = end;
            private.push(s..end);
        }
        let mut crc = [0u8; 4];
        read_exact(r, &mut crc, bytes.len() as u64)?;
        if u32::from_le_bytes(crc) != crc32c::crc32c(&bytes) {
            return Err(corrupt(
                bytes.len() as u64,
                "the header's CRC-32C does not match".into(),
            ));
        }
        bytes.extend_from_slice(&crc);
        Ok((
            Header {
                policy,
                conversion,
                id,
                regions,
                private,
            },
            bytes,
        ))
    }
}

/// The most bytes of caller state a snapshot carries.
pub const MAX_STATE: usize = CHUNK;
/// One index entry's bytes: GPA, stream offset, length, kind, 3 zero.
pub(crate) const ENTRY: usize = 24;
/// The most entries one index record holds.
pub(crate) const ENTRIES_PER_RECORD: usize = CHUNK / ENTRY;
/// The end record's payload: clear bytes, sealed bytes, the first index
/// record's offset, the index records' count.
pub(crate) const END_PAYLOAD: usize = 32;

/// Where one data record lies: what the index holds, and what a lazy
/// restore looks records up by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) gpa: u64,
    /// The record's first byte in the stream.
    pub(crate) offset: u64,
    /// Its guest bytes.
    pub(crate) len: u32,
    pub(crate) kind: Kind,
}

impl IndexEntry {
    pub(crate) fn encode(&self) -> [u8; ENTRY] {
        let mut e = [0u8; ENTRY];
        e[..8].copy_from_slice(&self.gpa.to_le_bytes());
        e[8..16].copy_from_slice(&self.offset.to_le_bytes());
        e[16..20].copy_from_slice(&self.len.to_le_bytes());
        e[20] = self.kind as u8;
        e
    }

    /// An entry from its bytes; `None` if its kind is not a data record's or
    /// its padding is not zero.
    pub(crate) fn decode(e: &[u8]) -> Option<IndexEntry> {
        let kind = match e.get(20)? {
            1 => Kind::Shared,
            2 => Kind::Sealed,
            _ => return None,
        };
        if e.get(21..24)? != [0, 0, 0] {
            return None;
        }
        Some(IndexEntry {
            gpa: u64::from_le_bytes(e.get(..8)?.try_into().ok()?),
            offset: u64::from_le_bytes(e.get(8..16)?.try_into().ok()?),
            len: u32::from_le_bytes(e.get(16..20)?.try_into().ok()?),
            kind,
        })
    }

    /// The guest range the record covers.
    pub(crate) fn range(&self) -> Range<u64> {
        self.gpa..self.gpa + u64::from(self.len)
    }

    /// The record's bytes in the stream: header, payload, tag (every data
    /// record of a sealed snapshot has one), CRC.
    pub(crate) fn stream_len(&self, sealed: bool) -> u64 {
        let tag = if sealed { TAG } else { 0 };
        (RECORD_HEADER + self.len as usize + tag + 4) as u64
    }
}

/// The end record's payload, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct End {
    pub(crate) shared: u64,
    pub(crate) sealed: u64,
    pub(crate) index_at: u64,
    pub(crate) index_records: u64,
}

impl End {
    pub(crate) fn encode(&self) -> [u8; END_PAYLOAD] {
        let mut b = [0u8; END_PAYLOAD];
        b[..8].copy_from_slice(&self.shared.to_le_bytes());
        b[8..16].copy_from_slice(&self.sealed.to_le_bytes());
        b[16..24].copy_from_slice(&self.index_at.to_le_bytes());
        b[24..32].copy_from_slice(&self.index_records.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> End {
        let u = |a: usize| {
            b.get(a..a + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or_default()
        };
        End {
            shared: u(0),
            sealed: u(8),
            index_at: u(16),
            index_records: u(24),
        }
    }

    /// The end record's bytes in the stream, under a policy.
    pub(crate) fn stream_len(sealed: bool) -> u64 {
        (RECORD_HEADER + END_PAYLOAD + if sealed { TAG } else { 0 } + 4) as u64
    }
}

/// A record's kind from its code.
pub(crate) fn kind_from(code: u8) -> Option<Kind> {
    Some(match code {
        1 => Kind::Shared,
        2 => Kind::Sealed,
        3 => Kind::State,
        4 => Kind::Index,
        5 => Kind::Zero,
        6 => Kind::Round,
        7 => Kind::Attributes,
        8 => Kind::Postcopy,
        9 => Kind::Go,
        0xff => Kind::End,
        _ => return None,
    })
}

/// A record's 16-byte header.
pub(crate) fn record_header(kind: Kind, len: u32, gpa: u64) -> [u8; RECORD_HEADER] {
    let mut h = [0u8; RECORD_HEADER];
    h[0] = kind as u8;
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..16].copy_from_slice(&gpa.to_le_bytes());
    h
}

/// A sealed record's associated data: its header (kind, length, GPA).
pub(crate) fn aad(head: &[u8; RECORD_HEADER]) -> [u8; RECORD_HEADER] {
    *head
}

/// An authenticated clear record's associated data: its header, then its
/// payload.
pub(crate) fn tagged_aad(head: &[u8; RECORD_HEADER], payload: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(RECORD_HEADER + payload.len());
    a.extend_from_slice(head);
    a.extend_from_slice(payload);
    a
}

/// Writes one record: header, payload, CRC-32C of both.
pub(crate) fn write_record(
    w: &mut impl Write,
    header: &[u8; RECORD_HEADER],
    payload: &[&[u8]],
) -> Result<u64, SnapshotError> {
    let mut crc = crc32c::crc32c(header);
    w.write_all(header).map_err(SnapshotError::Write)?;
    let mut n = RECORD_HEADER as u64 + 4;
    for p in payload {
        crc = crc32c::crc32c_append(crc, p);
        w.write_all(p).map_err(SnapshotError::Write)?;
        n += p.len() as u64;
    }
    w.write_all(&crc.to_le_bytes())
        .map_err(SnapshotError::Write)?;
    Ok(n)
}

/// `read_exact`, where the end of the stream is a truncated snapshot at
/// byte `at`.
pub(crate) fn read_exact(r: &mut impl Read, buf: &mut [u8], at: u64) -> Result<(), RestoreError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            RestoreError::Truncated { at }
        } else {
            RestoreError::Read(e)
        }
    })
}

pub(crate) fn corrupt(at: u64, what: String) -> RestoreError {
    RestoreError::Corrupt { at, what }
}
