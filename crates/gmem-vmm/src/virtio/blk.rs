//! virtio-blk (device type 2) over a disk image: read, write, flush and
//! get-id, with the spec's status codes: a request outside the disk, or a
//! write to a read-only disk, is `VIRTIO_BLK_S_IOERR`; an unknown type is
//! `VIRTIO_BLK_S_UNSUPP`; a request whose buffers lie in private memory is
//! refused (`IOERR` where the status byte is reachable; otherwise the device
//! needs a reset).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use gmem::DeviceMemory;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress};

use super::{
    F_ACCESS_PLATFORM, F_VERSION_1, QueueFault, RequestFns, Requests, VirtioDevice, serve_queue,
    whole_chain,
};

/// The sector size virtio-blk counts in.
pub const SECTOR: u64 = 512;

/// What a served request answers: its status, where the status byte is,
/// and the bytes written before it.
struct Answer {
    status: u8,
    status_at: u64,
    written: u32,
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
    /// Where data passes between the disk and guest memory, reused.
    copy: Vec<u8>,
}

/// The most bytes one copy between the disk and guest memory moves.
const COPY_CHUNK: usize = 1 << 20;

/// `n` bytes (at most [`COPY_CHUNK`]) of the device's copy buffer.
fn sized(copy: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if copy.len() < n {
        copy.resize(n, 0);
    }
    &mut copy[..n]
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
            copy: Vec::new(),
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

    /// Serves one request: checks the chain whole ([`whole_chain`]), then
    /// reads and writes its buffers; the status to answer, where the status
    /// byte is, and the bytes written before it.
    fn serve_chain(
        &mut self,
        chain: DescriptorChain<&DeviceMemory>,
        mem: &DeviceMemory,
    ) -> Result<Answer, QueueFault> {
        let whole = whole_chain(&chain)?;
        // The status byte: the last byte of the last descriptor, which must
        // be device-writable (checked arithmetic: the address is the guest's).
        let status_at = match whole.descs.last() {
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
        // The reader and writer walk the chain again from guest memory: a
        // guest that changed it since (another vCPU) gets an error, never
        // a chain other than the one checked.
        let (status, written) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(mut reader), Ok(mut writer))
                if whole.reads(reader.available_bytes())
                    && whole.writes(writer.available_bytes()) =>
            {
                match writer
                    .available_bytes()
                    .checked_sub(1)
                    .map(|n| writer.split_at(n))
                {
                    Some(Ok(_status)) => {
                        let status = self.serve(&mut reader, &mut writer);
                        (status, writer.bytes_written())
                    }
                    _ => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            // A header or a buffer in private memory, or more than a request
            // may pin: refused, read or written not at all.
            _ => (VIRTIO_BLK_S_IOERR, 0),
        };
        self.statuses[match status {
            VIRTIO_BLK_S_OK => 0,
            VIRTIO_BLK_S_IOERR => 1,
            _ => 2,
        }] += 1;
        Ok(Answer {
            status: status as u8,
            status_at,
            written: written as u32,
        })
    }

    fn serve(
        &mut self,
        reader: &mut virtio_queue::Reader<'_>,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> u32 {
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        let kind = u32::from_le_bytes(header[..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..].try_into().unwrap_or_default());
        let in_disk = |len: usize| {
            sector
                .checked_mul(SECTOR)
                .and_then(|off| off.checked_add(len as u64))
                .is_some_and(|end| end <= self.capacity * SECTOR)
        };
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                if !in_disk(len) {
                    return VIRTIO_BLK_S_IOERR;
                }
                // Through one buffer of at most a chunk, reused: a request
                // costs no allocation of its size.
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(COPY_CHUNK);
                    let buf = sized(&mut self.copy, n);
                    let at = sector * SECTOR + done as u64;
                    if self.disk.read_exact_at(buf, at).is_err() || writer.write_all(buf).is_err() {
                        return VIRTIO_BLK_S_IOERR;
                    }
                    done += n;
                }
                VIRTIO_BLK_S_OK
            }
            VIRTIO_BLK_T_OUT => {
                let len = reader.available_bytes();
                if self.readonly || !in_disk(len) {
                    return VIRTIO_BLK_S_IOERR;
                }
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(COPY_CHUNK);
                    let at = sector * SECTOR + done as u64;
                    let buf = sized(&mut self.copy, n);
                    if reader.read_exact(buf).is_err() || self.disk.write_all_at(buf, at).is_err() {
                        return VIRTIO_BLK_S_IOERR;
                    }
                    done += n;
                }
                VIRTIO_BLK_S_OK
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.disk.sync_data().is_err() {
                    return VIRTIO_BLK_S_IOERR;
                }
                VIRTIO_BLK_S_OK
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(self.id.len());
                if writer.write_all(&self.id[..n]).is_err() {
                    return VIRTIO_BLK_S_IOERR;
                }
                VIRTIO_BLK_S_OK
            }
            _ => VIRTIO_BLK_S_UNSUPP,
        }
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
                    mem.write_obj(a.status, GuestAddress(a.status_at))
                        .map_err(|e| {
                            QueueFault(format!("the status byte at {:#x}: {e}", a.status_at))
                        })?;
                    Ok(a.written + 1)
                },
            },
        )
    }
}
