//! A virtio-blk driver that puts several requests in flight per
//! notification, over `virtio-drivers`' `VirtQueue` (its `VirtIOBlk`
//! notifies the device for every request, `read_blocks_nb` included).
//!
//! [`BatchBlk::run`] adds a batch of requests to the queue, notifies the
//! device once, and waits for every one of them: one exit for the batch
//! instead of one a request. Buffers go through the `Hal` as with
//! `VirtIOBlk` (bounced by [`GmemHal`](crate::virtio::GmemHal) unless they
//! are a [`SharedBuffer`](crate::virtio::SharedBuffer)'s).

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_drivers::{Error, Hal};

/// The queue's size: the reference VMM's largest for virtio-blk.
pub const QUEUE_SIZE: usize = 128;
/// The most requests one batch may hold: three descriptors each (header,
/// data, status) in a queue of [`QUEUE_SIZE`].
pub const MAX_BATCH: usize = QUEUE_SIZE / 3;

/// `VIRTIO_F_VERSION_1`, the one feature this driver takes.
const F_VERSION_1: u64 = 1 << 32;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

/// What a batch does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Reads the disk into the buffers.
    Read,
    /// Writes the buffers to the disk.
    Write,
}

/// One request of a batch: `buf` (a non-zero multiple of 512 bytes) from or
/// to the disk at `sector`.
pub struct Request<'a> {
    /// The first sector.
    pub sector: u64,
    /// The data.
    pub buf: &'a mut [u8],
}

/// A virtio-blk device with one request queue of [`QUEUE_SIZE`].
pub struct BatchBlk<H: Hal, T: Transport> {
    transport: T,
    queue: VirtQueue<H, QUEUE_SIZE>,
    capacity: u64,
}

impl<H: Hal, T: Transport> BatchBlk<H, T> {
    /// Initialises the device behind `transport` (`VIRTIO_F_VERSION_1`
    /// only: no indirect descriptors, no event index).
    ///
    /// # Errors
    /// `virtio-drivers`' error when the queue cannot be set up (the
    /// device's queue is smaller than [`QUEUE_SIZE`]: `InvalidParam`).
    pub fn new(mut transport: T) -> Result<Self, Error> {
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let features = transport.read_device_features() & F_VERSION_1;
        transport.write_driver_features(features);
        transport.set_status(
            DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK,
        );
        transport.set_guest_page_size(4096);
        let low: u32 = transport.read_config_space(0)?;
        let high: u32 = transport.read_config_space(4)?;
        let queue = VirtQueue::new(&mut transport, 0, false, false)?;
        transport.finish_init();
        Ok(BatchBlk {
            transport,
            queue,
            capacity: u64::from(low) | u64::from(high) << 32,
        })
    }

    /// The capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Runs `requests` (at most [`MAX_BATCH`]) as one batch: adds them all,
    /// notifies the device once (unless it suppressed notifications), and
    /// returns when every one is done.
    ///
    /// # Errors
    /// `InvalidParam` for an empty or oversized batch or a buffer that is
    /// not a non-zero multiple of 512 bytes; `IoError` if the device
    /// answered any request with an error status (the others are done).
    pub fn run(&mut self, direction: Direction, requests: &mut [Request<'_>]) -> Result<(), Error> {
        let n = requests.len();
        if n == 0
            || n > MAX_BATCH
            || requests
                .iter()
                .any(|r| r.buf.is_empty() || r.buf.len() % 512 != 0)
        {
            return Err(Error::InvalidParam);
        }
        let kind = match direction {
            Direction::Read => T_IN,
            Direction::Write => T_OUT,
        };
        let mut headers = [[0u8; 16]; MAX_BATCH];
        let mut statuses = [[0xffu8; 1]; MAX_BATCH];
        let mut tokens = [0u16; MAX_BATCH];
        let mut added = 0;
        let mut failed = None;
        for (i, r) in requests.iter_mut().enumerate() {
            headers[i][..4].copy_from_slice(&kind.to_le_bytes());
            headers[i][8..].copy_from_slice(&r.sector.to_le_bytes());
            // SAFETY: the header, the status and the data stay where they
            // are (this frame's arrays, the caller's buffers borrowed for
            // this call) and untouched until `pop_used` below takes each
            // token back; nothing returns before every added request is
            // popped (or the run ends).
            let token = unsafe {
                match direction {
                    Direction::Read => self
                        .queue
                        .add(&[&headers[i]], &mut [&mut *r.buf, &mut statuses[i]]),
                    Direction::Write => self
                        .queue
                        .add(&[&headers[i], &*r.buf], &mut [&mut statuses[i]]),
                }
            };
            match token {
                Ok(t) => {
                    tokens[i] = t;
                    added += 1;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if added > 0 && self.queue.should_notify() {
            self.transport.notify(0);
        }
        // Take every added request back, in the order the device used them.
        let mut done = [false; MAX_BATCH];
        for _ in 0..added {
            let token = loop {
                if let Some(t) = self.queue.peek_used() {
                    break t;
                }
                core::hint::spin_loop();
            };
            let Some(i) = (0..added).find(|&i| !done[i] && tokens[i] == token) else {
                // The device used a chain this batch did not add: the
                // buffers cannot be known free, so the run ends here.
                crate::println!("gmem-guest: virtio-blk used a chain it was not given");
                crate::exit(103);
            };
            let r = &mut requests[i];
            // SAFETY: the same buffers `add` was given for this token.
            let popped = unsafe {
                match direction {
                    Direction::Read => self.queue.pop_used(
                        token,
                        &[&headers[i]],
                        &mut [&mut *r.buf, &mut statuses[i]],
                    ),
                    Direction::Write => {
                        self.queue
                            .pop_used(token, &[&headers[i], &*r.buf], &mut [&mut statuses[i]])
                    }
                }
            };
            if popped.is_err() {
                crate::println!("gmem-guest: virtio-blk's used ring is out of order");
                crate::exit(103);
            }
            done[i] = true;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if statuses[..n].iter().any(|s| s[0] != 0) {
            return Err(Error::IoError);
        }
        Ok(())
    }
}
