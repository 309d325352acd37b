//! virtio-blk (device type 2) over a disk image: read, write, flush and
//! get-id, with the spec's status codes: a request outside the disk, or a
//! write to a read-only disk, is `VIRTIO_BLK_S_IOERR`; an unknown type is
//! `VIRTIO_BLK_S_UNSUPP`; a request whose buffers lie in private memory is
//! refused (`IOERR` where the status byte is reachable; otherwise the device
//! needs a reset).

use std::fs::File;
use std::os::fd::AsRawFd;

use gmem::DeviceMemory;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, Permissions, ReadVolatile, VolatileMemoryError,
    VolatileSlice, WriteVolatile,
};

use super::{
    ChainBytes, F_ACCESS_PLATFORM, F_VERSION_1, QueueFault, RequestFns, Requests, VirtioDevice,
    serve_queue, whole_chain_into,
};

/// The sector size virtio-blk counts in.
pub const SECTOR: u64 = 512;

/// What a served request answers: its status, where the status byte is,
/// and the bytes written before it.
struct Answer {
    status: u8,
    status_at: u64,
    written: u32,
    /// Whether the status byte is written already (under the request's
    /// own pins, which cover it when the whole chain was pinned).
    status_written: bool,
}

/// The block device.
pub struct VirtioBlk {
    disk: File,
    /// The image's path, if the device was opened by one: a snapshot
    /// records it, and a restore reopens it.
    path: Option<std::path::PathBuf>,
    capacity: u64,
    readonly: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Requests answered, by status (`OK`, `IOERR`, `UNSUPP`).
    pub statuses: [u64; 3],
    /// The descriptors of the request being served, reused request after
    /// request (at most [`super::MAX_CHAIN_DESCRIPTORS`]).
    descs: Vec<Descriptor>,
}

impl VirtioBlk {
    /// A device over `disk` (its size rounded down to whole sectors).
    ///
    /// # Errors
    /// The `fstat` error of the image.
    pub fn new(disk: File, readonly: bool) -> std::io::Result<VirtioBlk> {
        let capacity = disk.metadata()?.len() / SECTOR;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        id[..9].copy_from_slice(b"gmem-disk");
        Ok(VirtioBlk {
            disk,
            path: None,
            capacity,
            readonly,
            id,
            statuses: [0; 3],
            descs: Vec::new(),
        })
    }

    /// A device over the image at `path` (read-write unless `readonly`),
    /// which a snapshot can record and a restore reopen (its absolute path).
    ///
    /// # Errors
    /// Opening the image or reading its size.
    pub fn open(path: &std::path::Path, readonly: bool) -> std::io::Result<VirtioBlk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)?;
        let mut blk = VirtioBlk::new(file, readonly)?;
        blk.path = Some(std::path::absolute(path)?);
        Ok(blk)
    }

    /// The capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The same device with its answer counts restored.
    pub fn with_statuses(mut self, statuses: [u64; 3]) -> VirtioBlk {
        self.statuses = statuses;
        self
    }

    /// Serves one request: checks the chain whole ([`whole_chain_into`],
    /// one walk, into the device's reused vector), then serves it from the
    /// descriptors that walk read; the status to answer, where the status
    /// byte is, and the bytes written before it.
    fn serve_chain(
        &mut self,
        chain: DescriptorChain<&DeviceMemory>,
        mem: &DeviceMemory,
    ) -> Result<Answer, QueueFault> {
        let mut descs = std::mem::take(&mut self.descs);
        let answer = self.serve_descs(&chain, &mut descs, mem);
        self.descs = descs;
        let answer = answer?;
        self.statuses[match answer.status {
            s if s == VIRTIO_BLK_S_OK as u8 => 0,
            s if s == VIRTIO_BLK_S_IOERR as u8 => 1,
            _ => 2,
        }] += 1;
        Ok(answer)
    }

    fn serve_descs(
        &mut self,
        chain: &DescriptorChain<&DeviceMemory>,
        descs: &mut Vec<Descriptor>,
        mem: &DeviceMemory,
    ) -> Result<Answer, QueueFault> {
        let bytes = whole_chain_into(chain, descs)?;
        // The status byte: the last byte of the last descriptor, which must
        // be device-writable (checked arithmetic: the address is the guest's).
        let status_at = match descs.last() {
            Some(d) if d.is_write_only() && d.len() > 0 => d
                .addr()
                .0
                .checked_add(u64::from(d.len()) - 1)
                .ok_or_else(|| {
                    QueueFault(format!(
                        "the status descriptor at {:#x} of {:#x} bytes wraps around",
                        d.addr().0,
                        d.len()
                    ))
                })?,
            _ => return Err(QueueFault("a request with no writable status byte".into())),
        };
        // Every buffer pinned (and so checked shared) before any is read or
        // written: a header or a buffer in private memory, or more than a
        // request may pin, is refused, read or written not at all.
        let pinned = descs.iter().all(|d| {
            let access = if d.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            mem.get_slices(d.addr(), d.len() as usize, access)
                .is_ok_and(|mut slices| slices.all(|s| s.is_ok()))
        });
        let (status, written) = if pinned {
            self.serve(descs, bytes, mem)
        } else {
            (VIRTIO_BLK_S_IOERR, 0)
        };
        // With the whole chain pinned, the status byte's page is too: write
        // it now, with no pin of its own. Otherwise it is written once the
        // request's pins are released (a request refused for its pin bound
        // may still be answered).
        let status_written = pinned && mem.write_obj(status as u8, GuestAddress(status_at)).is_ok();
        Ok(Answer {
            status: status as u8,
            status_at,
            written: u32::try_from(written).unwrap_or(u32::MAX),
            status_written,
        })
    }

    /// Serves a pinned request; its status and the bytes written to the
    /// guest before the status byte. Data moves between the disk and the
    /// pinned guest slices directly (`pread`/`pwrite` into them): no copy
    /// in between, no allocation.
    fn serve(&mut self, descs: &[Descriptor], bytes: ChainBytes, mem: &DeviceMemory) -> (u32, u64) {
        let mut header = [0u8; 16];
        if each_segment(descs, false, 0, 16, |addr, at, n| {
            mem.read_slice(&mut header[at as usize..at as usize + n], addr)
                .is_ok()
        }) != Some(16)
        {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let kind = u32::from_le_bytes(header[..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..].try_into().unwrap_or_default());
        let start = sector.checked_mul(SECTOR);
        let in_disk = |len: u64| {
            start
                .and_then(|off| off.checked_add(len))
                .is_some_and(|end| end <= self.capacity * SECTOR)
        };
        // The device-writable bytes before the status byte (at least one
        // writable byte exists: the status descriptor was checked).
        let room = bytes.writable.saturating_sub(1);
        match kind {
            VIRTIO_BLK_T_IN => {
                let Some(start) = start.filter(|_| in_disk(room)) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let mut disk = DiskAt {
                    disk: &self.disk,
                    at: start,
                };
                match each_segment(descs, true, 0, room, |addr, _, n| {
                    mem.read_exact_volatile_from(addr, &mut disk, n).is_ok()
                }) {
                    Some(done) if done == room => (VIRTIO_BLK_S_OK, room),
                    _ => (VIRTIO_BLK_S_IOERR, disk.at - start),
                }
            }
            VIRTIO_BLK_T_OUT => {
                let len = bytes.readable.saturating_sub(16);
                let Some(start) = start.filter(|_| !self.readonly && in_disk(len)) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let mut disk = DiskAt {
                    disk: &self.disk,
                    at: start,
                };
                match each_segment(descs, false, 16, len, |addr, _, n| {
                    mem.write_all_volatile_to(addr, &mut disk, n).is_ok()
                }) {
                    Some(done) if done == len => (VIRTIO_BLK_S_OK, 0),
                    _ => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.disk.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = room.min(self.id.len() as u64);
                let id = &self.id;
                match each_segment(descs, true, 0, n, |addr, at, len| {
                    mem.write_slice(&id[at as usize..at as usize + len], addr)
                        .is_ok()
                }) {
                    Some(done) if done == n => (VIRTIO_BLK_S_OK, n),
                    _ => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }
}

/// Calls `f(addr, offset, len)` for the pieces of the device-readable (or,
/// with `writable`, device-writable) descriptors of `descs` that hold the
/// `len` bytes from byte `skip` of that stream, in order; `offset` counts
/// from `skip`. The bytes done, or `None` if `f` failed. Bounded by
/// `descs` (at most [`super::MAX_CHAIN_DESCRIPTORS`]).
fn each_segment(
    descs: &[Descriptor],
    writable: bool,
    skip: u64,
    len: u64,
    mut f: impl FnMut(GuestAddress, u64, usize) -> bool,
) -> Option<u64> {
    let mut pos = 0u64; // where this descriptor starts in the stream
    let mut done = 0u64;
    for d in descs.iter().filter(|d| d.is_write_only() == writable) {
        if done == len {
            break;
        }
        let dlen = u64::from(d.len());
        let from = skip.saturating_sub(pos).min(dlen); // bytes of it skipped
        let n = (dlen - from).min(len - done);
        pos += dlen;
        if n == 0 {
            continue;
        }
        let addr = d.addr().0.checked_add(from)?;
        if !f(GuestAddress(addr), done, usize::try_from(n).ok()?) {
            return None;
        }
        done += n;
    }
    Some(done)
}

/// A position on the disk for vm-memory's volatile I/O: reads and writes
/// are `pread`/`pwrite` at `at`, straight into or out of guest slices
/// (pinned by the request's `DeviceMemory`), and `at` advances.
struct DiskAt<'f> {
    disk: &'f File,
    at: u64,
}

impl DiskAt<'_> {
    fn offset(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.at).map_err(|_| {
            VolatileMemoryError::IOError(std::io::Error::from_raw_os_error(libc::EOVERFLOW))
        })
    }
}

impl ReadVolatile for DiskAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let mut done = 0;
        while done < buf.len() {
            let offset = self.offset()?;
            // SAFETY: the fd is the disk's, open for as long as `self.disk`
            // is borrowed; `[ptr + done, ptr + len)` lies inside the slice,
            // valid for writes of `len` bytes while `guard` lives (the
            // `VolatileSlice` invariant; the request's `DeviceMemory` holds
            // the pins that keep it mapped and shared). No Rust reference
            // to that memory exists: the kernel writes it as raw memory.
            let n = unsafe {
                libc::pread(
                    self.disk.as_raw_fd(),
                    guard.as_ptr().wrapping_add(done).cast::<libc::c_void>(),
                    buf.len() - done,
                    offset,
                )
            };
            match usize::try_from(n) {
                Ok(0) => break, // the end of the disk
                Ok(n) => {
                    done += n;
                    self.at += n as u64;
                }
                Err(_) => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(VolatileMemoryError::IOError(e));
                    }
                }
            }
        }
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

impl WriteVolatile for DiskAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        let mut done = 0;
        while done < buf.len() {
            let offset = self.offset()?;
            // SAFETY: the fd is the disk's, open while `self.disk` is
            // borrowed; `[ptr + done, ptr + len)` lies inside the slice,
            // valid for reads of `len` bytes while `guard` lives (the
            // `VolatileSlice` invariant, the request's pins behind it); the
            // kernel only reads it.
            let n = unsafe {
                libc::pwrite(
                    self.disk.as_raw_fd(),
                    guard.as_ptr().wrapping_add(done).cast::<libc::c_void>(),
                    buf.len() - done,
                    offset,
                )
            };
            match usize::try_from(n) {
                Ok(0) => {
                    return Err(VolatileMemoryError::IOError(
                        std::io::ErrorKind::WriteZero.into(),
                    ));
                }
                Ok(n) => {
                    done += n;
                    self.at += n as u64;
                }
                Err(_) => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(VolatileMemoryError::IOError(e));
                    }
                }
            }
        }
        Ok(done)
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn features(&self) -> u64 {
        let ro = if self.readonly {
            1 << VIRTIO_BLK_F_RO
        } else {
            0
        };
        F_VERSION_1 | F_ACCESS_PLATFORM | 1 << VIRTIO_BLK_F_FLUSH | ro
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[128]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The configuration space: capacity (le64) first; the rest zero.
        let cfg = self.capacity.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = at.and_then(|at| cfg.get(at)).copied().unwrap_or(0);
        }
    }

    fn save(&self) -> Result<crate::state::DeviceSnapshot, String> {
        let path = self.path.clone().ok_or_else(|| {
            "virtio-blk over a file without a path cannot be saved: open it with VirtioBlk::open"
                .to_owned()
        })?;
        Ok(crate::state::DeviceSnapshot::Blk {
            path,
            capacity: self.capacity,
            readonly: self.readonly,
            statuses: self.statuses,
        })
    }

    fn process(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        requests: &mut Requests<'_>,
    ) -> Result<bool, QueueFault> {
        serve_queue(
            self,
            queue,
            requests,
            "requestq",
            RequestFns {
                want: |_| true,
                serve: VirtioBlk::serve_chain,
                answer: |_, a: Answer, mem| {
                    if !a.status_written {
                        mem.write_obj(a.status, GuestAddress(a.status_at))
                            .map_err(|e| {
                                QueueFault(format!("the status byte at {:#x}: {e}", a.status_at))
                            })?;
                    }
                    Ok(a.written + 1)
                },
            },
        )
    }
}
