//! [`Gatekeeper::restore`]: a stream read back into a new VM's memory,
//! eagerly: every record checked (its CRC-32C, its place in the layout and
//! the attribute map, its tag) before its bytes are written, holes left
//! holes, and the attributes set last.

use std::io::Read;

use super::error::RestoreError;
use super::format::{
    CHUNK, END_PAYLOAD, ENTRIES_PER_RECORD, ENTRY, End, Header, IndexEntry, Kind, MAX_STATE,
    PolicyCode, RECORD_HEADER, TAG, aad, corrupt, kind_from, read_exact, tagged_aad,
};
use super::seal::{HEADER_INDEX, SealKey, Sealer};
use crate::gate::{GateError, Gatekeeper};
use crate::range::PAGE_SIZE;

/// What a restore read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreReport {
    /// The caller's state the snapshot carried
    /// ([`snapshot_with_state`](Gatekeeper::snapshot_with_state)); empty if
    /// none.
    pub state: Vec<u8>,
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
        frozen.check_restorable()?;
        let (header, sealer, start) = open_header(r, &frozen.layout(), key)?;
        let mut buf = vec![0u8; CHUNK + TAG];
        let (state, first) = read_state(r, start, &mut buf, sealer.as_ref())?;
        drop(buf);
        if let Err(e) = frozen.begin_restore() {
            frozen.poison(format!(
                "a restore could not discard the memory first ({e})"
            ));
            return Err(e.into());
        }
        let mut writer = |gpa: u64, data: &[u8]| frozen.write_raw(gpa, data);
        let result = read_records(r, &header, sealer.as_ref(), first, &mut writer);
        match result {
            Ok(mut report) => {
                if let Err(e) = frozen.finish_restore(&header.private) {
                    frozen.poison(format!(
                        "a restore wrote every record but could not set the attributes ({e})"
                    ));
                    return Err(e.into());
                }
                report.state = state;
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

/// Reads the header (and its tag under `Seal`) and checks it against the
/// VM's layout and the key: the header, the sealer, and where the state
/// record starts.
pub(crate) fn open_header(
    r: &mut impl Read,
    here: &[crate::gate::frozen::RegionLayout],
    key: Option<&SealKey>,
) -> Result<(Header, Option<Sealer>, u64), RestoreError> {
    let (header, bytes) = Header::decode(r)?;
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
    if key.is_some() && header.policy != PolicyCode::Seal {
        // A caller with a key expects a sealed snapshot: an unsealed one is
        // authenticated by nothing, and anyone could have written it.
        return Err(RestoreError::NotSealed);
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
    Ok((header, sealer, start))
}

/// Where a restore writes a record's bytes: `(gpa, bytes)`.
type WriteFn<'a> = dyn FnMut(u64, &[u8]) -> Result<(), GateError> + 'a;

/// One record, read and checked against its CRC-32C: its payload is in
/// the caller's buffer.
pub(crate) struct RawRecord {
    pub(crate) head: [u8; RECORD_HEADER],
    pub(crate) kind: Kind,
    /// The header's length field: guest bytes, state bytes, index bytes.
    pub(crate) len: usize,
    /// The header's last field: a GPA, an entry count, a record count.
    pub(crate) aux: u64,
    /// The payload's bytes read (a sealed or authenticated record's tag
    /// included).
    pub(crate) payload: usize,
    /// Where the next record starts.
    pub(crate) next: u64,
}

impl RawRecord {
    /// The tag at the end of the payload (a sealed or authenticated record).
    pub(crate) fn tag(&self, buf: &[u8]) -> [u8; TAG] {
        let mut t = [0u8; TAG];
        if let Some(s) = buf.get(self.payload.saturating_sub(TAG)..self.payload) {
            t.copy_from_slice(s);
        }
        t
    }
}

/// Reads the record at `at` into `buf` (at least [`CHUNK`] + [`TAG`]
/// bytes) and checks its kind, padding, length and CRC; `sealed` says
/// whether the snapshot's policy is `Seal` (its state, index and end carry
/// tags).
pub(crate) fn read_record(
    r: &mut impl Read,
    at: u64,
    buf: &mut [u8],
    sealed: bool,
) -> Result<RawRecord, RestoreError> {
    let mut head = [0u8; RECORD_HEADER];
    read_exact(r, &mut head, at)?;
    let len = u32::from_le_bytes(head[4..8].try_into().unwrap_or_default()) as usize;
    let aux = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
    let kind = kind_from(head[0])
        .ok_or_else(|| corrupt(at, format!("unknown record kind {:#x}", head[0])))?;
    if head[1..4] != [0, 0, 0] {
        return Err(corrupt(
            at + 1,
            "a record header's padding is not zero".into(),
        ));
    }
    let tag = if sealed { TAG } else { 0 };
    let bad_len = |what: &str| {
        corrupt(
            at + 4,
            format!("a {kind:?} record of {len:#x} bytes ({what})"),
        )
    };
    let payload = match kind {
        Kind::Shared | Kind::Sealed
            if len == 0 || len > CHUNK || !len.is_multiple_of(PAGE_SIZE as usize) =>
        {
            return Err(bad_len("whole pages, at most one chunk"));
        }
        Kind::Sealed => len + TAG,
        Kind::Shared => len + tag,
        Kind::State if len > MAX_STATE => return Err(bad_len("at most one chunk")),
        Kind::State => len + tag,
        Kind::Index
            if aux == 0 || aux > ENTRIES_PER_RECORD as u64 || len as u64 != aux * ENTRY as u64 =>
        {
            return Err(bad_len("its entries' bytes"));
        }
        Kind::Index => len + tag,
        Kind::End if len != END_PAYLOAD => return Err(bad_len("the end's")),
        Kind::End => len + tag,
        Kind::Zero if len != 8 => return Err(bad_len("a length")),
        Kind::Round if len != 16 => return Err(bad_len("two counts")),
        // A post-copy switch with nothing left to send says so with an
        // empty blocks record.
        Kind::Postcopy if aux == 0 && len == 0 => tag,
        Kind::Go if aux != 0 || len != 0 => return Err(bad_len("none")),
        Kind::Go => tag,
        Kind::Attributes | Kind::Postcopy
            if aux == 0 || aux > (CHUNK / 16) as u64 || len as u64 != aux * 16 =>
        {
            return Err(bad_len("its runs' bytes"));
        }
        Kind::Zero | Kind::Round | Kind::Attributes | Kind::Postcopy => len + tag,
    };
    let body = buf
        .get_mut(..payload)
        .ok_or_else(|| bad_len("larger than a reader holds"))?;
    read_exact(r, body, at + RECORD_HEADER as u64)?;
    let mut crc = [0u8; 4];
    read_exact(r, &mut crc, at + (RECORD_HEADER + payload) as u64)?;
    let want = crc32c::crc32c_append(crc32c::crc32c(&head), body);
    if u32::from_le_bytes(crc) != want {
        return Err(corrupt(at, "a record's CRC-32C does not match".into()));
    }
    Ok(RawRecord {
        head,
        kind,
        len,
        aux,
        payload,
        next: at + (RECORD_HEADER + payload + 4) as u64,
    })
}

/// Checks a sealed or authenticated record's tag (the record at `ordinal`);
/// decrypts a sealed data or state record's bytes in place.
pub(crate) fn open_record(
    sealer: &Sealer,
    rec: &RawRecord,
    ordinal: u64,
    buf: &mut [u8],
    at: u64,
) -> Result<(), RestoreError> {
    let tag = rec.tag(buf);
    let ok = match rec.kind {
        Kind::Sealed | Kind::State => {
            sealer.open(ordinal, &aad(&rec.head), &mut buf[..rec.len], &tag)
        }
        Kind::Shared
        | Kind::Index
        | Kind::End
        | Kind::Zero
        | Kind::Round
        | Kind::Attributes
        | Kind::Postcopy
        | Kind::Go => sealer.open(
            ordinal,
            &tagged_aad(&rec.head, &buf[..rec.len]),
            &mut [],
            &tag,
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(corrupt(
            at,
            format!("a {:?} record does not authenticate", rec.kind),
        ))
    }
}

/// Checks a data record's place: page-aligned, after `last_end`, inside
/// one region, and of the attribute its kind says.
pub(crate) fn check_place(
    header: &Header,
    kind: Kind,
    gpa: u64,
    len: u64,
    last_end: u64,
    at: u64,
    sealed: bool,
) -> Result<u64, RestoreError> {
    let end = gpa.checked_add(len).filter(|_| len > 0).ok_or_else(|| {
        corrupt(
            at + 8,
            format!("a record at {gpa:#x} wraps around or is empty"),
        )
    })?;
    if gpa < last_end
        || !gpa.is_multiple_of(PAGE_SIZE)
        || gpa / CHUNK as u64 != (end - 1) / CHUNK as u64
    {
        return Err(corrupt(
            at + 8,
            format!("a record at {gpa:#x} is out of order, or crosses a 1 MiB boundary"),
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
        private_bytes == len
    } else {
        private_bytes == 0
    };
    if !consistent || (want_private && !sealed) {
        return Err(corrupt(
            at,
            format!("a {kind:?} record at [{gpa:#x}, {end:#x}) disagrees with the attribute map"),
        ));
    }
    Ok(end)
}

/// Reads the state record (the stream's first, at `at`): its bytes, and
/// where the data records start.
pub(crate) fn read_state(
    r: &mut impl Read,
    at: u64,
    buf: &mut [u8],
    sealer: Option<&Sealer>,
) -> Result<(Vec<u8>, u64), RestoreError> {
    let rec = read_record(r, at, buf, sealer.is_some())?;
    if rec.kind != Kind::State || rec.aux != 0 {
        return Err(corrupt(
            at,
            format!("the first record is a {:?} record, not the state", rec.kind),
        ));
    }
    if let Some(s) = sealer {
        open_record(s, &rec, 0, buf, at)?;
    }
    Ok((buf[..rec.len].to_vec(), rec.next))
}

/// Reads, checks and writes every record after the state, up to and
/// including the end; the eager restore's loop.
fn read_records(
    r: &mut impl Read,
    header: &Header,
    sealer: Option<&Sealer>,
    mut at: u64,
    write: &mut WriteFn<'_>,
) -> Result<RestoreReport, RestoreError> {
    let mut report = RestoreReport {
        records: 1,
        ..RestoreReport::default()
    };
    let mut buf = vec![0u8; CHUNK + TAG];
    let mut last_end = 0u64;
    // The index the data records imply, and the one the stream holds, as
    // running CRCs: equal at the end, in constant memory.
    let (mut seen, mut listed) = (0u32, 0u32);
    let mut index_at = None;
    let mut index_records = 0u64;
    loop {
        let rec = read_record(r, at, &mut buf, sealer.is_some())?;
        let ordinal = report.records;
        report.records += 1;
        match rec.kind {
            Kind::State => return Err(corrupt(at, "a second state record".into())),
            Kind::Zero | Kind::Round | Kind::Attributes | Kind::Postcopy | Kind::Go => {
                return Err(corrupt(
                    at,
                    format!("a {:?} record, which only a migration stream has", rec.kind),
                ));
            }
            Kind::Shared | Kind::Sealed => {
                if index_at.is_some() {
                    return Err(corrupt(at, "a data record after the index".into()));
                }
                let gpa = rec.aux;
                last_end = check_place(
                    header,
                    rec.kind,
                    gpa,
                    rec.len as u64,
                    last_end,
                    at,
                    sealer.is_some(),
                )?;
                if let Some(s) = sealer {
                    open_record(s, &rec, ordinal, &mut buf, at)?;
                }
                if rec.kind == Kind::Sealed {
                    report.sealed_bytes += rec.len as u64;
                } else {
                    report.shared_bytes += rec.len as u64;
                }
                let entry = IndexEntry {
                    gpa,
                    offset: at,
                    len: rec.len as u32,
                    kind: rec.kind,
                };
                seen = crc32c::crc32c_append(seen, &entry.encode());
                write(gpa, &buf[..rec.len])?;
            }
            Kind::Index => {
                if let Some(s) = sealer {
                    open_record(s, &rec, ordinal, &mut buf, at)?;
                }
                index_at.get_or_insert(at);
                index_records += 1;
                listed = crc32c::crc32c_append(listed, &buf[..rec.len]);
            }
            Kind::End => {
                if let Some(s) = sealer {
                    open_record(s, &rec, ordinal, &mut buf, at)?;
                }
                let end = End::decode(&buf[..END_PAYLOAD]);
                let want = End {
                    shared: report.shared_bytes,
                    sealed: report.sealed_bytes,
                    index_at: index_at.unwrap_or(at),
                    index_records,
                };
                if rec.aux != report.records || end != want || seen != listed {
                    return Err(corrupt(
                        at,
                        format!(
                            "the end record ({} records, {end:?}) or the index disagrees with the stream ({} records, {want:?})",
                            rec.aux, report.records
                        ),
                    ));
                }
                return Ok(report);
            }
        }
        at = rec.next;
    }
}

/// What a snapshot's header says, read without a key and before any VM
/// exists: what a VMM needs to build the machine it restores into. Nothing
/// here is authenticated yet: a restore checks it all again (under `Seal`,
/// against the header's tag).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// The format version (this gmem's, or reading fails).
    pub version: u32,
    /// Whether the private pages are sealed (restoring needs the key).
    pub sealed: bool,
    /// Whether private pages were omitted.
    pub omitted: bool,
    /// The source gatekeeper's conversion policy.
    pub conversion: crate::Policy,
    /// The regions: GPA, length and backing, in GPA order.
    pub regions: Vec<(u64, u64, crate::BackingKind)>,
    /// Private bytes in the attribute map.
    pub private_bytes: u64,
}

impl SnapshotInfo {
    /// Reads and checks a snapshot's header (its CRC, counts and bounds).
    ///
    /// # Errors
    /// [`RestoreError::NotASnapshot`], [`RestoreError::Version`],
    /// [`RestoreError::Corrupt`], [`RestoreError::Truncated`],
    /// [`RestoreError::Read`].
    pub fn read(r: &mut impl Read) -> Result<SnapshotInfo, RestoreError> {
        let (h, _) = Header::decode(r)?;
        Ok(SnapshotInfo {
            version: super::VERSION,
            sealed: h.policy == PolicyCode::Seal,
            omitted: h.policy == PolicyCode::Omit,
            conversion: h.conversion,
            regions: h.regions.iter().map(|r| (r.gpa, r.len, r.kind)).collect(),
            private_bytes: h.private.iter().map(|p| p.end - p.start).sum(),
        })
    }
}
