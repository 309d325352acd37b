//! [`Gatekeeper::restore_lazy`]: a snapshot file restored on first touch.
//!
//! The header, the layout, the key, the index and the end are checked
//! before anything changes; the memory is discarded, the attributes set,
//! and each region's host mapping (the one KVM runs the guest from) is
//! registered with userfaultfd in `MISSING` mode. Then:
//! - a **fault thread** fills each block the guest (or host code through
//!   that mapping) first touches: it reads the block's records, checks each
//!   one's CRC-32C and (sealed) tag, decrypts it, and places it with
//!   `UFFDIO_COPY`;
//! - **host paths** (copies, pins, `DeviceMemory`) fill what they touch
//!   before touching it ([`LazyFill::resolve`]), and discards forget what
//!   they drop, so a host access never reads a page the snapshot holds as
//!   zero;
//! - a **prefetcher** fills the rest, the blocks of a recorded
//!   [`PrefetchOrder`] first.
//!
//! A block is one record on memfd (at most [`CHUNK`]) and one huge page on
//! hugetlb. When every block is in, the mappings are unregistered and both
//! threads end. A record that does not check out poisons the gatekeeper:
//! the VM must be stopped ([`LazyRestore::failure`]).

use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::error::RestoreError;
use super::format::{CHUNK, End, Header, IndexEntry, Kind, TAG, corrupt};
use super::restore::{check_place, open_header, open_record, read_record, read_state};
use super::seal::{SealKey, Sealer};
use crate::gate::frozen::{LazyRegion, WeakGate};
use crate::gate::{GateError, Gatekeeper, LazyFill};
use crate::uffd::{FEATURE_MISSING_HUGETLBFS, FEATURE_MISSING_SHMEM, MODE_MISSING, Userfaultfd};

/// How a lazy restore fills what the guest does not touch.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct LazyOptions {
    /// Whether a background thread fills every block the guest has not
    /// touched (on by default). Without it, blocks are filled on touch
    /// only, until [`LazyRestore::finish`].
    pub no_prefetch: bool,
    /// The blocks to fill first: a previous restore's first touches
    /// ([`LazyRestore::touch_order`]).
    pub order: Option<PrefetchOrder>,
}

impl LazyOptions {
    /// Prefetching on, no recorded order.
    pub fn new() -> LazyOptions {
        LazyOptions::default()
    }

    /// Fills on touch only.
    pub fn without_prefetch(mut self) -> LazyOptions {
        self.no_prefetch = true;
        self
    }

    /// Prefetches `order`'s blocks first.
    pub fn with_order(mut self, order: PrefetchOrder) -> LazyOptions {
        self.order = Some(order);
        self
    }
}

/// The GPAs of the blocks a restore filled on touch, in the order they
/// were first touched: what the next restore of the same snapshot
/// prefetches first (REAP's record-and-prefetch). Its file format:
/// `GMEMORDR`, a u32 version (1), a u32 count (at most 2^24), the GPAs
/// (u64 each), and the CRC-32C of all before it; little-endian.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefetchOrder(pub Vec<u64>);

const ORDER_MAGIC: &[u8; 8] = b"GMEMORDR";
const MAX_ORDER: usize = 1 << 24;

impl PrefetchOrder {
    /// The order's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(20 + 8 * self.0.len());
        b.extend_from_slice(ORDER_MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&(self.0.len().min(MAX_ORDER) as u32).to_le_bytes());
        for g in self.0.iter().take(MAX_ORDER) {
            b.extend_from_slice(&g.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// An order from its bytes.
    ///
    /// # Errors
    /// [`RestoreError::Corrupt`] naming the byte: another magic or version,
    /// a count past 2^24 or not the length's, a CRC that does not match.
    pub fn decode(b: &[u8]) -> Result<PrefetchOrder, RestoreError> {
        if b.len() < 20 || &b[..8] != ORDER_MAGIC {
            return Err(corrupt(0, "not a gmem prefetch order (GMEMORDR)".into()));
        }
        let u32_at = |a: usize| u32::from_le_bytes(b[a..a + 4].try_into().unwrap_or_default());
        if u32_at(8) != 1 {
            return Err(corrupt(8, format!("prefetch order version {}", u32_at(8))));
        }
        let n = u32_at(12) as usize;
        if n > MAX_ORDER || b.len() != 20 + 8 * n {
            return Err(corrupt(
                12,
                format!("{n} GPAs in a prefetch order of {} bytes", b.len()),
            ));
        }
        let body = b.len() - 4;
        if u32_at(body) != crc32c::crc32c(&b[..body]) {
            return Err(corrupt(body as u64, "the prefetch order's CRC-32C".into()));
        }
        Ok(PrefetchOrder(
            b[16..body]
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        ))
    }
}

/// How far a lazy restore has come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LazyProgress {
    /// Blocks the snapshot holds.
    pub blocks: usize,
    /// Blocks not yet filled.
    pub pending: usize,
    /// Page faults served (blocks filled, holes zeroed, races woken).
    pub faults: u64,
    /// Blocks filled on a fault.
    pub fault_fills: u64,
    /// Holes a fault found, filled with zeroes.
    pub zero_fills: u64,
    /// Blocks filled for a host access.
    pub host_fills: u64,
    /// Blocks the prefetcher filled.
    pub prefetch_fills: u64,
    /// Blocks a discard dropped before they were filled.
    pub forgotten: u64,
    /// Time the fault thread spent filling faulted blocks, in nanoseconds.
    pub fault_fill_ns: u64,
}

/// Why a block is filled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    Fault,
    Host,
    Prefetch,
}

/// What the fill lock guards.
struct Fill {
    pending: Vec<bool>,
    remaining: usize,
    progress: LazyProgress,
    /// Blocks filled on touch, in order (at most one entry per block).
    touched: Vec<u64>,
    /// One block's bytes, and one record's (hugetlb blocks hold several).
    block: Vec<u8>,
    record: Vec<u8>,
    /// Remote: the blocks asked for.
    requested: Vec<bool>,
    /// Remote: the block being delivered, and its bytes so far.
    assembling: Option<(usize, u64)>,
    /// Remote: the blocks delivered whole (each is sent once).
    delivered: Vec<bool>,
    /// The mappings are unregistered: nothing more is filled.
    done: bool,
}

/// Where a lazy restore's blocks come from.
enum Source {
    /// A snapshot file, read by position: any thread fills a block itself.
    File {
        file: File,
        sealer: Option<Sealer>,
        entries: Vec<IndexEntry>,
    },
    /// A post-copy migration's source, over a connection: a block is asked
    /// for (its GPA, 8 bytes, on `requests`) and the migration's receiver
    /// thread delivers it ([`RemoteFill`]); whoever needs it waits.
    Remote {
        requests: Mutex<Box<dyn std::io::Write + Send>>,
        /// How long a host path waits for a block before the restore fails.
        timeout: Duration,
    },
}

/// The shared state of one lazy restore.
struct Lazy {
    source: Source,
    /// The fill units, in GPA order, disjoint.
    blocks: Vec<Range<u64>>,
    regions: Vec<LazyRegion>,
    uffd: Userfaultfd,
    /// Zeroes for a hole's page (one backing page, the largest).
    zeroes: Vec<u8>,
    fill: Mutex<Fill>,
    filled: Condvar,
    stop: AtomicBool,
    /// Why a block could not be filled, once one could not.
    failure: std::sync::OnceLock<String>,
    gate: WeakGate,
}

/// A positional reader over the snapshot file.
struct At<'f> {
    file: &'f File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn at(file: &File, pos: u64) -> At<'_> {
    At { file, pos }
}

/// A lazy restore under way: dropping it (or [`finish`](Self::finish))
/// fills what is left and ends its threads.
pub struct LazyRestore {
    lazy: Arc<Lazy>,
    state: Vec<u8>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

impl std::fmt::Debug for LazyRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRestore")
            .field("progress", &self.progress())
            .finish_non_exhaustive()
    }
}

impl Gatekeeper {
    /// Restores the snapshot in `file` lazily: checks its header, layout,
    /// key, index and end, discards the memory, sets the attributes, and
    /// returns at once; each block is filled when first touched, by the
    /// guest or by host code, and a prefetcher fills the rest (see
    /// [`crate::snapshot`]'s lazy section and `LazyOptions`). The
    /// gatekeeper must be new, as for [`restore`](Self::restore).
    ///
    /// On guest_memfd, whose mappings this kernel's userfaultfd refuses,
    /// and wherever registering fails before anything was changed, use the
    /// eager [`restore`](Self::restore): the error says why.
    ///
    /// # Errors
    /// As [`restore`](Self::restore) before the memory is touched (nothing
    /// changes); [`RestoreError::Lazy`] if userfaultfd is not available
    /// for these mappings (nothing changes: the memory is discarded only
    /// after registration succeeded).
    pub fn restore_lazy(
        &self,
        file: File,
        key: Option<&SealKey>,
        opts: LazyOptions,
    ) -> Result<LazyRestore, RestoreError> {
        let started = Instant::now();
        let mut frozen = self.freeze()?;
        frozen.check_restorable()?;
        let (header, sealer, start) = open_header(&mut at(&file, 0), &frozen.layout(), key)?;
        let mut buf = vec![0u8; CHUNK + TAG];
        let (state, first) = read_state(&mut at(&file, start), start, &mut buf, sealer.as_ref())?;
        let entries = read_index(&file, &header, sealer.as_ref(), first, &mut buf)?;
        let regions = frozen.lazy_regions();
        if let Some(r) = regions
            .iter()
            .find(|r| r.memory.kind() == crate::BackingKind::GuestMemfd)
        {
            return Err(RestoreError::Lazy {
                why: format!(
                    "the region at {:#x} is guest_memfd, whose mappings this kernel's userfaultfd refuses: restore eagerly",
                    r.gpa
                ),
            });
        }
        let blocks = blocks(&entries, &regions);
        let largest = regions.iter().map(|r| r.granule).max().unwrap_or(4096);
        let block_max = blocks
            .iter()
            .map(|b| b.end - b.start)
            .max()
            .unwrap_or(0)
            .max(CHUNK as u64);
        let uffd =
            Userfaultfd::new(FEATURE_MISSING_SHMEM | FEATURE_MISSING_HUGETLBFS).map_err(|e| {
                RestoreError::Lazy {
                    why: format!("userfaultfd: {e}"),
                }
            })?;
        for (i, r) in regions.iter().enumerate() {
            // SAFETY: the range is the region's binding mapping (a shared
            // mapping of the file, which the region keeps for the
            // gatekeeper's life, and the gatekeeper outlives this restore's
            // registration: `finish` and `Drop` unregister, and the mapping's
            // unmapping ends it too); host code reaches it only through the
            // gatekeeper's copies, never a Rust reference.
            let reg = unsafe { uffd.register(r.host, r.len as usize, MODE_MISSING) };
            if let Err(e) = reg {
                for r in &regions[..i] {
                    let _ = uffd.unregister(r.host, r.len as usize);
                }
                return Err(RestoreError::Lazy {
                    why: format!(
                        "registering the region at {:#x} ({}): {e}",
                        r.gpa,
                        r.memory.kind()
                    ),
                });
            }
        }
        // From here no `allocate` reaches the files (one that raced is done,
        // and its pages are what `begin_restore` punches), until the last
        // block is in.
        for r in &regions {
            r.memory.core().set_filling(true);
        }
        let begun = frozen
            .begin_restore()
            .and_then(|()| frozen.finish_restore(&header.private));
        if let Err(e) = begun {
            for r in &regions {
                r.memory.core().set_filling(false);
            }
            frozen.poison(format!(
                "a lazy restore could not discard or set attributes ({e})"
            ));
            return Err(e.into());
        }
        let n = blocks.len();
        let lazy = Arc::new(Lazy {
            source: Source::File {
                file,
                sealer,
                entries,
            },
            blocks,
            regions,
            uffd,
            zeroes: vec![0u8; largest as usize],
            fill: Mutex::new(Fill {
                pending: vec![true; n],
                remaining: n,
                progress: LazyProgress {
                    blocks: n,
                    pending: n,
                    ..LazyProgress::default()
                },
                touched: Vec::new(),
                block: vec![0u8; block_max as usize + TAG],
                record: vec![0u8; CHUNK + TAG],
                requested: Vec::new(),
                assembling: None,
                delivered: Vec::new(),
                done: false,
            }),
            filled: Condvar::new(),
            stop: AtomicBool::new(false),
            failure: std::sync::OnceLock::new(),
            gate: self.downgrade(),
        });
        self.set_lazy_fill(Some(Arc::clone(&lazy) as Arc<dyn LazyFill>));
        drop(frozen);
        {
            let mut f = lazy.lock();
            if f.remaining == 0 {
                lazy.complete(&mut f);
            }
        }
        let mut threads = Vec::new();
        let l = Arc::clone(&lazy);
        match std::thread::Builder::new()
            .name("gmem-uffd".into())
            .spawn(move || l.serve_faults())
        {
            Ok(t) => threads.push(t),
            Err(_) => {
                // No fault thread: a fault would wait forever. Fill it all
                // now, in this thread (an eager restore, late).
                lazy.fill_all()?;
            }
        }
        if !opts.no_prefetch {
            let l = Arc::clone(&lazy);
            let order = opts.order.unwrap_or_default();
            if let Ok(t) = std::thread::Builder::new()
                .name("gmem-prefetch".into())
                .spawn(move || l.prefetch(&order.0))
            {
                threads.push(t);
            }
        }
        Ok(LazyRestore {
            lazy,
            state,
            threads,
            started,
        })
    }
}

/// Reads and checks the end and the index: the data records' entries, in
/// order, contiguous from `first`, each in the layout and of the attribute
/// its kind says, their totals the end's.
fn read_index(
    file: &File,
    header: &Header,
    sealer: Option<&Sealer>,
    first: u64,
    buf: &mut [u8],
) -> Result<Vec<IndexEntry>, RestoreError> {
    let len = file.metadata().map_err(RestoreError::Read)?.len();
    let sealed = sealer.is_some();
    let end_at = len
        .checked_sub(End::stream_len(sealed))
        .filter(|&e| e >= first)
        .ok_or(RestoreError::Truncated { at: len })?;
    let rec = read_record(&mut at(file, end_at), end_at, buf, sealed)?;
    if rec.kind != Kind::End || rec.next != len {
        return Err(corrupt(
            end_at,
            "the stream does not end with its end record".into(),
        ));
    }
    let records = rec.aux;
    if let Some(s) = sealer {
        open_record(s, &rec, records.wrapping_sub(1), buf, end_at)?;
    }
    let end = End::decode(&buf[..rec.len]);
    let data = end
        .index_records
        .checked_add(2)
        .and_then(|n| records.checked_sub(n))
        .ok_or_else(|| corrupt(end_at + 8, format!("{records} records")))?;
    if data > len / 4096 || end.index_at < first || end.index_at > end_at {
        return Err(corrupt(
            end_at,
            format!("an index of {data} entries at {:#x}", end.index_at),
        ));
    }
    // Grown as entries are read, never to a count the end claims: a sparse
    // file claiming 2^40 records fails at its first zero entry.
    let layout_pages: u64 = header.regions.iter().map(|r| r.len / 4096).sum();
    if data > layout_pages {
        return Err(corrupt(
            end_at,
            format!("{data} records for {layout_pages} pages"),
        ));
    }
    let mut entries = Vec::with_capacity((data as usize).min(super::format::ENTRIES_PER_RECORD));
    let mut pos = end.index_at;
    for j in 0..end.index_records {
        let rec = read_record(&mut at(file, pos), pos, buf, sealed)?;
        if rec.kind != Kind::Index {
            return Err(corrupt(
                pos,
                format!("a {:?} record in the index", rec.kind),
            ));
        }
        if let Some(s) = sealer {
            open_record(s, &rec, 1 + data + j, buf, pos)?;
        }
        for e in buf[..rec.len].chunks_exact(super::format::ENTRY) {
            entries
                .push(IndexEntry::decode(e).ok_or_else(|| corrupt(pos, "an index entry".into()))?);
            if entries.len() as u64 > data {
                return Err(corrupt(pos, "more index entries than records".into()));
            }
        }
        pos = rec.next;
    }
    if pos != end_at || entries.len() as u64 != data {
        return Err(corrupt(
            end_at,
            format!("the index lists {} of {data} records", entries.len()),
        ));
    }
    let (mut next, mut last_end, mut shared, mut sealed_bytes) = (first, 0, 0, 0);
    for e in &entries {
        if e.offset != next {
            return Err(corrupt(
                e.offset,
                format!("an index entry at {:#x}, the record at {next:#x}", e.offset),
            ));
        }
        if e.len == 0 || e.len as usize > CHUNK || e.len % 4096 != 0 {
            return Err(corrupt(
                e.offset,
                format!("an index entry of {:#x} bytes", e.len),
            ));
        }
        last_end = check_place(
            header,
            e.kind,
            e.gpa,
            u64::from(e.len),
            last_end,
            e.offset,
            sealed,
        )?;
        match e.kind {
            Kind::Sealed => sealed_bytes += u64::from(e.len),
            _ => shared += u64::from(e.len),
        }
        next = e
            .offset
            .checked_add(e.stream_len(sealed))
            .ok_or_else(|| corrupt(e.offset, "an index entry past any file".into()))?;
    }
    if next != end.index_at || shared != end.shared || sealed_bytes != end.sealed {
        return Err(corrupt(
            end_at,
            "the index disagrees with the end record".into(),
        ));
    }
    Ok(entries)
}

/// The fill units: each record's range widened to its region's backing
/// pages, overlapping ones merged (a huge page holds several records).
fn blocks(entries: &[IndexEntry], regions: &[LazyRegion]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for e in entries {
        let g = regions
            .iter()
            .find(|r| r.gpa <= e.gpa && e.gpa < r.gpa + r.len)
            .map_or(4096, |r| r.granule);
        let (s, t) = (e.gpa / g * g, e.range().end.div_ceil(g) * g);
        match out.last_mut() {
            Some(last) if last.end > s => last.end = last.end.max(t),
            _ => out.push(s..t),
        }
    }
    out
}

impl Lazy {
    fn lock(&self) -> MutexGuard<'_, Fill> {
        self.fill.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn block_of(&self, gpa: u64) -> Option<usize> {
        let i = self.blocks.partition_point(|b| b.end <= gpa);
        (i < self.blocks.len() && self.blocks[i].start <= gpa).then_some(i)
    }

    fn region_of(&self, gpa: u64) -> Option<&LazyRegion> {
        self.regions
            .iter()
            .find(|r| r.gpa <= gpa && gpa < r.gpa + r.len)
    }

    /// Fills block `bi` (pending) and marks it filled: read from the file,
    /// or (remote) asked for, and waited for unless `why` is a fault (the
    /// faulting thread waits in the kernel until the block is placed).
    fn fill_block(&self, f: &mut Fill, bi: usize, why: Why) -> Result<(), String> {
        let Source::File { entries, .. } = &self.source else {
            return self.request(f, bi);
        };
        let b = self.blocks[bi].clone();
        let r = self
            .region_of(b.start)
            .ok_or_else(|| format!("block {:#x} outside the layout", b.start))?;
        let n = (b.end - b.start) as usize;
        let lo = entries.partition_point(|e| e.range().end <= b.start);
        let hi = entries.partition_point(|e| e.gpa < b.end);
        let Fill { block, record, .. } = f;
        let single = hi == lo + 1 && entries[lo].range() == b;
        if !single {
            block[..n].fill(0);
        }
        for (i, &e) in entries.iter().enumerate().take(hi).skip(lo) {
            let buf = if single {
                &mut block[..]
            } else {
                &mut record[..]
            };
            self.read_entry(i, &e, buf).map_err(|err| err.to_string())?;
            if !single {
                let off = (e.gpa - b.start) as usize;
                block[off..off + e.len as usize].copy_from_slice(&record[..e.len as usize]);
            }
        }
        self.uffd
            .copy(r.host + (b.start - r.gpa) as usize, &block[..n], false)
            .map_err(|e| format!("UFFDIO_COPY of [{:#x}, {:#x}): {e}", b.start, b.end))?;
        self.filled_block(f, bi, why);
        Ok(())
    }

    /// Marks block `bi` filled.
    fn filled_block(&self, f: &mut Fill, bi: usize, why: Why) {
        let b = self.blocks[bi].clone();
        f.pending[bi] = false;
        f.remaining -= 1;
        f.progress.pending = f.remaining;
        match why {
            Why::Fault => f.progress.fault_fills += 1,
            Why::Host => f.progress.host_fills += 1,
            Why::Prefetch => f.progress.prefetch_fills += 1,
        }
        if why != Why::Prefetch {
            f.touched.push(b.start);
        }
        if f.remaining == 0 {
            self.complete(f);
        }
        self.filled.notify_all();
    }

    /// Remote: asks for block `bi`, once.
    fn request(&self, f: &mut Fill, bi: usize) -> Result<(), String> {
        let Source::Remote { requests, .. } = &self.source else {
            return Ok(());
        };
        if f.requested[bi] {
            return Ok(());
        }
        f.requested[bi] = true;
        let gpa = self.blocks[bi].start;
        let mut w = requests.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(&gpa.to_le_bytes())
            .and_then(|()| w.flush())
            .map_err(|e| format!("asking the migration source for [{gpa:#x}, ..): {e}"))
    }

    /// Remote: waits until no block in `lo..hi` is pending, or the restore
    /// fails, or the wait times out (which fails it).
    fn wait_filled<'a>(
        &'a self,
        mut f: MutexGuard<'a, Fill>,
        lo: usize,
        hi: usize,
    ) -> (MutexGuard<'a, Fill>, Result<(), String>) {
        let Source::Remote { timeout, .. } = &self.source else {
            return (f, Ok(()));
        };
        let deadline = Instant::now() + *timeout;
        loop {
            if let Some(reason) = self.failure.get() {
                return (f, Err(reason.clone()));
            }
            if f.done || !f.pending[lo..hi].iter().any(|&p| p) {
                return (f, Ok(()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (
                    f,
                    Err(format!(
                        "the migration source sent no block of [{:#x}, {:#x}) in {timeout:?}",
                        self.blocks[lo].start,
                        self.blocks[hi - 1].end
                    )),
                );
            }
            f = self
                .filled
                .wait_timeout(f, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Reads entry `i`'s record into `buf` and checks it: its CRC, that it
    /// is the record the index says, and (sealed) its tag, decrypting it.
    fn read_entry(&self, i: usize, e: &IndexEntry, buf: &mut [u8]) -> Result<(), RestoreError> {
        let Source::File { file, sealer, .. } = &self.source else {
            return Err(corrupt(0, "a remote restore reads no file".into()));
        };
        let sealed = sealer.is_some();
        let rec = read_record(&mut at(file, e.offset), e.offset, buf, sealed)?;
        if rec.kind != e.kind || rec.len != e.len as usize || rec.aux != e.gpa {
            return Err(corrupt(
                e.offset,
                "the record is not the one its index entry names".into(),
            ));
        }
        if let Some(s) = sealer {
            open_record(s, &rec, 1 + i as u64, buf, e.offset)?;
        }
        Ok(())
    }

    /// Every block is in (or the restore failed): the mappings are
    /// unregistered (waking any fault left) and the threads stop; on
    /// success the gatekeeper's hold ends (on failure it stays, so that the
    /// gatekeeper sees the failure and refuses everything).
    fn complete(&self, f: &mut Fill) {
        if f.done {
            return;
        }
        f.done = true;
        for r in &self.regions {
            let _ = self.uffd.unregister(r.host, r.len as usize);
            r.memory.core().set_filling(false);
        }
        self.stop.store(true, Ordering::Release);
        f.block = Vec::new();
        f.record = Vec::new();
        if self.failure.get().is_none() {
            self.gate.clear_lazy();
        }
        self.filled.notify_all();
    }

    /// A block did not check out: the restore fails and the VM must stop.
    /// The mappings are unregistered so that no thread waits forever (a
    /// vCPU may then read the block as zero until the VMM stops it; host
    /// code never does: the gatekeeper refuses everything from now on). The
    /// caller poisons the gatekeeper ([`poison_gate`](Self::poison_gate))
    /// once it holds no lock.
    fn fail(&self, f: &mut Fill, why: String) {
        let _ = self
            .failure
            .set(format!("a lazy restore could not fill guest memory: {why}"));
        if matches!(self.source, Source::Remote { .. }) {
            // The source is gone: what is pending can never come. The
            // mappings stay registered, so that a vCPU waits in its fault
            // (a kick interrupts it) rather than run on zeroes, until the
            // VMM, which sees the failure, stops it and drops the restore.
            self.stop.store(true, Ordering::Release);
            self.filled.notify_all();
            return;
        }
        self.complete(f);
    }

    /// Poisons the gatekeeper if the restore failed; called with no lock
    /// held (the gatekeeper's state lock comes before the fill lock).
    fn poison_gate(&self) {
        if let Some(reason) = self.failure.get() {
            self.gate.poison(reason.clone());
        }
    }

    /// The fault thread: serves faults until every block is in.
    fn serve_faults(&self) {
        let mut faults = Vec::with_capacity(64);
        while !self.stop.load(Ordering::Acquire) {
            let mut pfd = [rustix::event::PollFd::new(
                &self.uffd,
                rustix::event::PollFlags::IN,
            )];
            let timeout = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            match rustix::event::poll(&mut pfd, Some(&timeout)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => {}
                Err(_) => break,
            }
            faults.clear();
            if self.uffd.read_faults(&mut faults).is_err() {
                break;
            }
            for &addr in &faults {
                self.serve_fault(addr as usize);
            }
            self.poison_gate();
        }
    }

    fn serve_fault(&self, addr: usize) {
        let t = Instant::now();
        let mut f = self.lock();
        f.progress.faults += 1;
        if f.done {
            return;
        }
        let Some(r) = self
            .regions
            .iter()
            .find(|r| r.host <= addr && addr < r.host + r.len as usize)
        else {
            return;
        };
        let gpa = r.gpa + (addr - r.host) as u64;
        match self.block_of(gpa) {
            Some(bi) if f.pending[bi] => {
                if let Err(e) = self.fill_block(&mut f, bi, Why::Fault) {
                    self.fail(&mut f, e);
                }
                f.progress.fault_fill_ns += t.elapsed().as_nanos() as u64;
            }
            _ => {
                // A hole (or a block filled or dropped meanwhile): a page of
                // zeroes, as a fault would have had without userfaultfd.
                let g = r.granule as usize;
                let page = (addr - r.host) / g * g + r.host;
                match self.uffd.copy(page, &self.zeroes[..g], true) {
                    Ok(()) => f.progress.zero_fills += 1,
                    Err(e) => self.fail(&mut f, format!("zeroing a hole at {gpa:#x}: {e}")),
                }
            }
        }
    }

    /// The prefetcher: the recorded order's blocks, then all, one at a time
    /// (faults go between).
    fn prefetch(&self, order: &[u64]) {
        let recorded = order.iter().filter_map(|&g| self.block_of(g));
        for bi in recorded.chain(0..self.blocks.len()) {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let mut f = self.lock();
            if f.done {
                return;
            }
            if !f.pending[bi] {
                continue;
            }
            if let Err(e) = self.fill_block(&mut f, bi, Why::Prefetch) {
                self.fail(&mut f, e);
                drop(f);
                self.poison_gate();
                return;
            }
        }
    }

    /// Fills every pending block overlapping `range`.
    fn resolve_range(&self, range: Range<u64>, why: Why) -> Result<(), GateError> {
        let mut f = self.lock();
        if let Some(reason) = self.failure.get() {
            return Err(GateError::Poisoned {
                reason: reason.clone(),
            });
        }
        if f.done || range.is_empty() {
            return Ok(());
        }
        let lo = self.blocks.partition_point(|b| b.end <= range.start);
        let mut bi = lo;
        while bi < self.blocks.len() && self.blocks[bi].start < range.end {
            if f.pending[bi] {
                if let Err(e) = self.fill_block(&mut f, bi, why) {
                    self.fail(&mut f, e.clone());
                    return Err(GateError::Poisoned { reason: e });
                }
                if f.done {
                    break;
                }
            }
            bi += 1;
        }
        if bi > lo {
            let (mut f, waited) = self.wait_filled(f, lo, bi);
            if let Err(e) = waited {
                self.fail(&mut f, e.clone());
                drop(f);
                self.poison_gate();
                return Err(GateError::Poisoned { reason: e });
            }
        }
        Ok(())
    }
}

impl LazyFill for Lazy {
    fn resolve(&self, range: Range<u64>) -> Result<(), GateError> {
        self.resolve_range(range, Why::Host)
    }

    fn forget(&self, range: Range<u64>) {
        if matches!(self.source, Source::Remote { .. }) {
            // A block that stays in part is delivered first (the punch then
            // drops the rest); whole ones are dropped below.
            for edge in [range.start, range.end.saturating_sub(1)] {
                if let Some(bi) = self.block_of(edge) {
                    let b = self.blocks[bi].clone();
                    if !(range.start <= b.start && b.end <= range.end) {
                        let _ = self.resolve_range(b, Why::Host);
                    }
                }
            }
        }
        let mut f = self.lock();
        if f.done {
            return;
        }
        let lo = self.blocks.partition_point(|b| b.end <= range.start);
        let mut bi = lo;
        while bi < self.blocks.len() && self.blocks[bi].start < range.end {
            let b = self.blocks[bi].clone();
            if f.pending[bi] {
                if range.start <= b.start && b.end <= range.end {
                    // All of it goes: it reads zero, nothing to fill.
                    f.pending[bi] = false;
                    f.remaining -= 1;
                    f.progress.pending = f.remaining;
                    f.progress.forgotten += 1;
                    if f.remaining == 0 {
                        self.complete(&mut f);
                    }
                } else if let Err(e) = self.fill_block(&mut f, bi, Why::Host) {
                    // Part of it stays: fill it, and the punch drops the rest.
                    self.fail(&mut f, e);
                }
                if f.done {
                    break;
                }
            }
            bi += 1;
        }
    }

    fn failure(&self) -> Option<String> {
        self.failure.get().cloned()
    }

    fn fill_all(&self) -> Result<(), GateError> {
        let all = self.blocks.first().map(|b| b.start).unwrap_or(0)
            ..self.blocks.last().map_or(0, |b| b.end);
        self.resolve_range(all, Why::Prefetch)
    }
}

impl LazyRestore {
    /// The caller's state the snapshot carried (a VMM's vCPUs and devices).
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// How far the restore has come.
    pub fn progress(&self) -> LazyProgress {
        self.lazy.lock().progress
    }

    /// Why the restore failed (a record that did not check out), if it
    /// did: the gatekeeper is poisoned, and the VMM must stop the VM.
    pub fn failure(&self) -> Option<String> {
        self.lazy.failure.get().cloned()
    }

    /// Whether every block is in (or the restore failed).
    pub fn is_complete(&self) -> bool {
        self.lazy.lock().done
    }

    /// The blocks filled on touch so far, in first-touch order: save it
    /// ([`PrefetchOrder::encode`]) and give it to the next restore.
    pub fn touch_order(&self) -> PrefetchOrder {
        PrefetchOrder(self.lazy.lock().touched.clone())
    }

    /// The time since [`Gatekeeper::restore_lazy`] was called.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until every block is in, or `timeout` passes; whether it is.
    pub fn wait(&self, timeout: Duration) -> bool {
        let f = self.lazy.lock();
        let (f, _) = self
            .lazy
            .filled
            .wait_timeout_while(f, timeout, |f| !f.done)
            .unwrap_or_else(|e| e.into_inner());
        f.done
    }

    /// Fills everything left, now, in this thread, and ends the restore.
    ///
    /// # Errors
    /// [`RestoreError::Gate`] with the poisoning reason if a record did not
    /// check out (now or before).
    pub fn finish(mut self) -> Result<LazyProgress, RestoreError> {
        let result = self.lazy.fill_all();
        self.stop_threads();
        let failure = self.failure();
        match (result, failure) {
            (Ok(()), None) => Ok(self.progress()),
            (Err(e), _) => Err(RestoreError::Gate(e)),
            (_, Some(reason)) => Err(RestoreError::Gate(GateError::Poisoned { reason })),
        }
    }

    /// Ends the restore without filling what is left, for a VM that is
    /// ending anyway: the gatekeeper is poisoned (its memory is not the
    /// snapshot's), so nothing can use it after.
    pub fn abandon(mut self) {
        {
            let mut f = self.lazy.lock();
            if !f.done {
                self.lazy
                    .fail(&mut f, "abandoned before every block was in".into());
            }
        }
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        if !self.lazy.lock().done && self.lazy.failure.get().is_none() {
            // Called from Drop with blocks left: fill them (a failure is
            // recorded by the fill).
            let _ = self.lazy.fill_all();
        }
        {
            // A failed remote restore kept its registration (see `fail`):
            // end it now that the VMM is done with the VM.
            let mut f = self.lazy.lock();
            self.lazy.complete(&mut f);
        }
        self.lazy.poison_gate();
        self.lazy.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for LazyRestore {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// The largest post-copy block: 2 MiB (a whole huge page on hugetlb-2m).
/// A block is what the source's backing pages make of a dirty run: runs of
/// 4 KiB pages on memfd, split at 1 MiB-aligned boundaries (one record
/// each); whole 2 MiB pages on hugetlb-2m. The destination places each
/// with one `UFFDIO_COPY`, so its own pages must not be larger.
pub(crate) const REMOTE_BLOCK: u64 = 2 << 20;

/// What a post-copy migration's receiver thread drives: the blocks the
/// source delivers, placed as they come. Made by [`start_remote`].
#[derive(Clone)]
pub(crate) struct RemoteFill(Arc<Lazy>);

impl RemoteFill {
    /// Delivers `len` bytes at `gpa` (`data`, or zeroes if `None`): the
    /// next bytes of one block, in order, a block at a time. A block
    /// dropped meanwhile (a discard) takes its bytes and ignores them.
    pub(crate) fn deliver(&self, gpa: u64, data: Option<&[u8]>, len: u64) -> Result<(), String> {
        let lazy = &self.0;
        let mut f = lazy.lock();
        let bi = lazy
            .block_of(gpa)
            .ok_or_else(|| format!("[{gpa:#x}, +{len:#x}) lies in no pending block"))?;
        let b = lazy.blocks[bi].clone();
        let got = match f.assembling {
            Some((cur, got)) if cur == bi => got,
            Some((cur, _)) => {
                return Err(format!(
                    "bytes at {gpa:#x} came before block [{:#x}, {:#x}) was whole",
                    lazy.blocks[cur].start, lazy.blocks[cur].end
                ));
            }
            None if f.delivered[bi] => {
                return Err(format!(
                    "block [{:#x}, {:#x}) was sent twice",
                    b.start, b.end
                ));
            }
            None => 0,
        };
        let blen = b.end - b.start;
        if gpa != b.start + got || len == 0 || got + len > blen {
            return Err(format!(
                "[{gpa:#x}, +{len:#x}) is not the next part of block [{:#x}, {:#x})",
                b.start, b.end
            ));
        }
        let live = f.pending[bi] && !f.done;
        if live {
            let dst = &mut f.block[got as usize..(got + len) as usize];
            match data {
                Some(d) => dst.copy_from_slice(d),
                None => dst.fill(0),
            }
        }
        let got = got + len;
        if got < blen {
            f.assembling = Some((bi, got));
            return Ok(());
        }
        f.assembling = None;
        f.delivered[bi] = true;
        if live {
            let r = lazy
                .region_of(b.start)
                .ok_or_else(|| format!("block {:#x} outside the layout", b.start))?;
            lazy.uffd
                .copy(
                    r.host + (b.start - r.gpa) as usize,
                    &f.block[..blen as usize],
                    false,
                )
                .map_err(|e| format!("UFFDIO_COPY of [{:#x}, {:#x}): {e}", b.start, b.end))?;
            let why = if f.requested[bi] {
                Why::Fault
            } else {
                Why::Prefetch
            };
            lazy.filled_block(&mut f, bi, why);
        }
        Ok(())
    }

    /// The source failed (or sent a bad record): the restore fails, and
    /// the gatekeeper is poisoned.
    pub(crate) fn fail(&self, why: String) {
        {
            let mut f = self.0.lock();
            self.0.fail(&mut f, why);
        }
        self.0.poison_gate();
    }

    /// Whether every block is in.
    pub(crate) fn is_complete(&self) -> bool {
        let f = self.0.lock();
        f.remaining == 0
    }

    /// Whether the restore has stopped (failed or abandoned): the receiver
    /// reads no more.
    pub(crate) fn stopped(&self) -> bool {
        self.0.failure.get().is_some()
    }

    /// Writes one 8-byte word to the source, after any request.
    pub(crate) fn tell(&self, word: u64) -> std::io::Result<()> {
        let Source::Remote { requests, .. } = &self.0.source else {
            return Ok(());
        };
        let mut w = requests.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(&word.to_le_bytes())?;
        w.flush()
    }
}

/// The pending runs, rounded out to `unit` (the source's page size)
/// inside their regions, split at `max(unit, 1 MiB)`-aligned boundaries,
/// merged: the post-copy blocks, the same on both sides.
pub(crate) fn remote_blocks(
    runs: &[Range<u64>],
    regions: &[(u64, u64)],
    unit: u64,
) -> Vec<Range<u64>> {
    let split = unit.max(CHUNK as u64);
    let mut out: Vec<Range<u64>> = Vec::new();
    for run in runs {
        for &(rg, rl) in regions {
            let (lo, hi) = (run.start.max(rg), run.end.min(rg.saturating_add(rl)));
            if lo >= hi {
                continue;
            }
            let mut s = (lo / unit * unit).max(rg);
            let end = hi.div_ceil(unit).saturating_mul(unit).min(rg + rl);
            while s < end {
                let e = ((s / split + 1) * split).min(end);
                match out.last_mut() {
                    Some(last) if last.end > s => {}
                    // Touching, in the same split unit: one block.
                    Some(last) if last.end == s && last.start / split == s / split => {
                        last.end = e;
                    }
                    _ => out.push(s..e),
                }
                s = e;
            }
        }
    }
    out
}

/// Starts a post-copy restore on a frozen gatekeeper that holds the
/// pre-copy rounds: the mappings are registered with userfaultfd, the
/// `blocks` (what the source still has to send) discarded, the attributes
/// set, and a fault thread started; a fault or host access on a block
/// asks for it on `requests`, and the migration's receiver delivers it
/// through the [`RemoteFill`].
pub(crate) fn start_remote(
    gate: &Gatekeeper,
    frozen: &mut crate::gate::frozen::Frozen<'_>,
    blocks: Vec<Range<u64>>,
    private: &[Range<u64>],
    requests: Box<dyn std::io::Write + Send>,
    timeout: Duration,
    state: Vec<u8>,
) -> Result<(LazyRestore, RemoteFill), RestoreError> {
    let started = Instant::now();
    let regions = frozen.lazy_regions();
    if let Some(r) = regions
        .iter()
        .find(|r| r.memory.kind() == crate::BackingKind::GuestMemfd || r.granule > REMOTE_BLOCK)
    {
        return Err(RestoreError::Lazy {
            why: format!(
                "the region at {:#x} is {}: post-copy places 2 MiB blocks with userfaultfd, which this kernel refuses on guest_memfd and which cannot fill part of a 1 GiB page",
                r.gpa,
                r.memory.kind()
            ),
        });
    }
    for b in &blocks {
        let r = regions
            .iter()
            .find(|r| r.gpa <= b.start && b.end <= r.gpa + r.len);
        let fits =
            |x: u64, r: &LazyRegion| (x - r.gpa).is_multiple_of(r.granule) || x == r.gpa + r.len;
        match r {
            Some(r) if fits(b.start, r) && fits(b.end, r) => {}
            Some(r) => {
                return Err(RestoreError::Lazy {
                    why: format!(
                        "the source's post-copy block [{:#x}, {:#x}) is part of one of this destination's {:#x}-byte pages ({}): post-copy needs the destination's pages no larger than the source's; migrate pre-copy",
                        b.start,
                        b.end,
                        r.granule,
                        r.memory.kind()
                    ),
                });
            }
            None => {
                return Err(RestoreError::Lazy {
                    why: format!(
                        "a post-copy block [{:#x}, {:#x}) lies in no region",
                        b.start, b.end
                    ),
                });
            }
        }
    }
    let uffd =
        Userfaultfd::new(FEATURE_MISSING_SHMEM | FEATURE_MISSING_HUGETLBFS).map_err(|e| {
            RestoreError::Lazy {
                why: format!("userfaultfd: {e}"),
            }
        })?;
    for (i, r) in regions.iter().enumerate() {
        // SAFETY: as in `restore_lazy`: the region's binding mapping, kept
        // for the gatekeeper's life, reached by host code only through the
        // gatekeeper's copies; unregistered when the restore completes or
        // is dropped.
        let reg = unsafe { uffd.register(r.host, r.len as usize, MODE_MISSING) };
        if let Err(e) = reg {
            for r in &regions[..i] {
                let _ = uffd.unregister(r.host, r.len as usize);
            }
            return Err(RestoreError::Lazy {
                why: format!("registering the region at {:#x}: {e}", r.gpa),
            });
        }
    }
    for r in &regions {
        r.memory.core().set_filling(true);
    }
    let mut begun = Ok(());
    for b in &blocks {
        begun = begun.and_then(|()| frozen.discard_raw(b.clone()));
    }
    if let Err(e) = begun.and_then(|()| frozen.finish_restore(private)) {
        for r in &regions {
            let _ = uffd.unregister(r.host, r.len as usize);
            r.memory.core().set_filling(false);
        }
        return Err(e.into());
    }
    let largest = regions.iter().map(|r| r.granule).max().unwrap_or(4096);
    let n = blocks.len();
    let lazy = Arc::new(Lazy {
        source: Source::Remote {
            requests: Mutex::new(requests),
            timeout,
        },
        blocks,
        regions,
        uffd,
        zeroes: vec![0u8; largest as usize],
        fill: Mutex::new(Fill {
            pending: vec![true; n],
            remaining: n,
            progress: LazyProgress {
                blocks: n,
                pending: n,
                ..LazyProgress::default()
            },
            touched: Vec::new(),
            block: vec![0u8; REMOTE_BLOCK as usize],
            record: Vec::new(),
            requested: vec![false; n],
            assembling: None,
            delivered: vec![false; n],
            done: false,
        }),
        filled: Condvar::new(),
        stop: AtomicBool::new(false),
        failure: std::sync::OnceLock::new(),
        gate: gate.downgrade(),
    });
    gate.set_lazy_fill(Some(Arc::clone(&lazy) as Arc<dyn LazyFill>));
    {
        let mut f = lazy.lock();
        if f.remaining == 0 {
            lazy.complete(&mut f);
        }
    }
    let mut threads = Vec::new();
    let l = Arc::clone(&lazy);
    let t = std::thread::Builder::new()
        .name("gmem-uffd".into())
        .spawn(move || l.serve_faults())
        .map_err(|e| RestoreError::Lazy {
            why: format!("the fault thread: {e}"),
        })?;
    threads.push(t);
    let fill = RemoteFill(Arc::clone(&lazy));
    Ok((
        LazyRestore {
            lazy,
            state,
            threads,
            started,
        },
        fill,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one run each
    fn remote_blocks_are_the_sources_pages_inside_their_regions() {
        use super::remote_blocks;
        let regions = [(0, 5 << 20), (8 << 20, 4 << 20)];
        let huge = 2 << 20;
        assert_eq!(
            remote_blocks(&[0x1000..0x2000, 0x3000..0x4000], &regions, huge),
            vec![0..2 << 20]
        );
        // Clamped to the region's end; a run over two regions split.
        assert_eq!(
            remote_blocks(&[(4 << 20) + 0x1000..(9 << 20)], &regions, huge),
            vec![(4 << 20)..(5 << 20), (8 << 20)..(10 << 20)]
        );
        assert!(remote_blocks(&[(6 << 20)..(7 << 20)], &regions, huge).is_empty());
        // 4 KiB pages: the runs themselves, split at 1 MiB boundaries.
        assert_eq!(
            remote_blocks(&[0x1000..0x2000, 0x3000..0x4000], &regions, 4096),
            vec![0x1000..0x2000, 0x3000..0x4000]
        );
        assert_eq!(
            remote_blocks(&[0xff000..0x101000], &regions, 4096),
            vec![0xff000..0x100000, 0x100000..0x101000]
        );
    }

    #[test]
    fn prefetch_orders_round_trip_and_refuse_bad_bytes() {
        let o = PrefetchOrder(vec![0x1000, 0x20_0000, 7]);
        let b = o.encode();
        assert_eq!(PrefetchOrder::decode(&b).unwrap(), o);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 1;
            assert!(PrefetchOrder::decode(&c).is_err(), "byte {i}");
        }
        for n in 0..b.len() {
            assert!(PrefetchOrder::decode(&b[..n]).is_err(), "cut at {n}");
        }
    }
}
