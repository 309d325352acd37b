//! `gmem bench`'s virtio-blk guest: runs the requests its disk's first
//! sector asks for (sequential reads or writes, or random reads, of one
//! size) through `virtio-drivers`' `VirtIOBlk`, then a loop of MMIO
//! register reads (an exit each) so the bench can price one exit in the
//! same run.
//!
//! On a machine whose RAM is private after launch the driver goes through
//! the shared bounce pool ([`GmemHal`], the confidential path); where RAM
//! is all shared (ABI key `Initial` = 1) it is given the guest's own
//! buffers ([`DirectHal`], the plain baseline). Same guest, same VMM.
//!
//! The plan, in sector 0, little-endian:
//!
//! | bytes | what |
//! |---|---|
//! | 0..8 | `GMEMBLK1` |
//! | 8..12 | mode: 1 sequential read, 2 sequential write, 3 random read |
//! | 12..16 | bytes per request (a multiple of 512, at most 1 MiB) |
//! | 16..20 | requests |
//! | 20..24 | MMIO reads in the exit loop |
//! | 24..32 | the data's first sector |
//! | 32..40 | the data's sectors |
//! | 40..48 | the random reads' seed |
//! | 48..52 | the buffer: 0 the guest's own (bounced where RAM is private), 1 a [`SharedBuffer`] in the pool (never bounced) |
//! | 52..56 | requests in flight per notification: 0 or 1, one at a time through `VirtIOBlk`; more, batches of that many through [`BatchBlk`] (at most [`MAX_BATCH`], and that many requests must fit in 1 MiB) |
//!
//! The data holds, at every 8-byte-aligned disk offset, that offset (a
//! little-endian u64): each read checks the first word of its buffer.
//!
//! It reports on port `0x10` (a 32-bit `out`, not a port of the guest
//! ABI: the bench's exit loop timestamps it): 1 before the requests, 2
//! after them, 3 before the exit loop, 4 after it. Exit statuses: 0 done;
//! 10–16 a step failed (see the code); 20 a read found the wrong data.
#![no_std]
#![no_main]

use core::cell::UnsafeCell;

use gmem_guest::blk::{BatchBlk, Direction, MAX_BATCH, Request};
use gmem_guest::virtio::{self, DirectHal, GmemHal, SharedBuffer};
use gmem_guest::{Boot, abi, io, println};
use virtio_drivers::Hal;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::{DeviceType, Transport};

gmem_guest::entry!(main);

/// The port the bench timestamps (not part of the guest ABI).
const MARK_PORT: u16 = 0x10;
/// The largest request.
const MAX_REQUEST: usize = 1 << 20;
const SECTOR: usize = 512;

#[repr(C, align(4096))]
struct Buffer(UnsafeCell<[u8; MAX_REQUEST]>);

// SAFETY: only `run`, on vCPU 0, once, takes a reference to it.
unsafe impl Sync for Buffer {}

static BUFFER: Buffer = Buffer(UnsafeCell::new([0; MAX_REQUEST]));

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    SequentialRead,
    SequentialWrite,
    RandomRead,
}

struct Plan {
    mode: Mode,
    request: usize,
    requests: u32,
    exit_loops: u32,
    data_start: u64,
    data_sectors: u64,
    seed: u64,
    pool_buffer: bool,
    depth: usize,
}

impl Plan {
    fn parse(s: &[u8]) -> Option<Plan> {
        let u32_at = |at: usize| Some(u32::from_le_bytes(s.get(at..at + 4)?.try_into().ok()?));
        let u64_at = |at: usize| Some(u64::from_le_bytes(s.get(at..at + 8)?.try_into().ok()?));
        if s.get(..8)? != b"GMEMBLK1" {
            return None;
        }
        let mode = match u32_at(8)? {
            1 => Mode::SequentialRead,
            2 => Mode::SequentialWrite,
            3 => Mode::RandomRead,
            _ => return None,
        };
        let request = u32_at(12)? as usize;
        let plan = Plan {
            mode,
            request,
            requests: u32_at(16)?,
            exit_loops: u32_at(20)?,
            data_start: u64_at(24)?,
            data_sectors: u64_at(32)?,
            seed: u64_at(40)?,
            pool_buffer: match u32_at(48)? {
                0 => false,
                1 => true,
                _ => return None,
            },
            depth: (u32_at(52)? as usize).max(1),
        };
        let fits = request > 0
            && plan.depth <= MAX_BATCH
            && request * plan.depth <= MAX_REQUEST
            && request.is_multiple_of(SECTOR)
            && plan.data_sectors >= (request / SECTOR) as u64;
        fits.then_some(plan)
    }
}

fn mark(n: u32) {
    // SAFETY: an `out` to the bench's mark port: the VMM's loop notes the
    // time and resumes the guest; no memory is touched.
    unsafe { io::outl(MARK_PORT, n) };
}

fn main(boot: Boot) -> i32 {
    if virtio::init(&boot).is_err() {
        return 10;
    }
    for i in 0..8 {
        // SAFETY: one transport per device window at a time: this one is
        // dropped (or handed on) before the next is made.
        let Some(t) = (unsafe { virtio::transport(i) }) else {
            break;
        };
        if t.device_type() == DeviceType::Block {
            drop(t);
            return if virtio::ram_is_shared() {
                run::<DirectHal>(i)
            } else {
                run::<GmemHal>(i)
            };
        }
    }
    println!("blk-bench: no virtio-blk device");
    11
}

/// The driver the plan asks for.
#[expect(
    clippy::large_enum_variant,
    reason = "one driver, made once, on run's stack"
)]
enum Driver<H: Hal> {
    /// `virtio-drivers`' `VirtIOBlk`: a notification a request.
    One(VirtIOBlk<H, MmioTransport<'static>>),
    /// The SDK's `BatchBlk`: a notification a batch.
    Batch(BatchBlk<H, MmioTransport<'static>>),
}

impl<H: Hal> Driver<H> {
    fn run(&mut self, direction: Direction, requests: &mut [Request<'_>]) -> bool {
        match self {
            Driver::One(blk) => requests.iter_mut().all(|r| {
                let sector = r.sector as usize;
                match direction {
                    Direction::Read => blk.read_blocks(sector, r.buf).is_ok(),
                    Direction::Write => blk.write_blocks(sector, r.buf).is_ok(),
                }
            }),
            Driver::Batch(blk) => blk.run(direction, requests).is_ok(),
        }
    }
}

/// The transport of device `index`.
fn transport(index: u32) -> Option<MmioTransport<'static>> {
    // SAFETY: callers hold at most one transport of a device at a time
    // (the last one was dropped with its driver).
    unsafe { virtio::transport(index) }
}

fn run<H: Hal>(index: u32) -> i32 {
    // SAFETY: the one reference to BUFFER there is (`run` runs once).
    let own = unsafe { &mut *BUFFER.0.get() };
    let plan = {
        let Some(Ok(mut blk)) = transport(index).map(VirtIOBlk::<H, _>::new) else {
            return 12;
        };
        if blk.read_blocks(0, &mut own[..SECTOR]).is_err() {
            return 13;
        }
        let Some(plan) = Plan::parse(&own[..SECTOR]) else {
            println!("blk-bench: sector 0 holds no plan");
            return 14;
        };
        plan
    };
    // The driver the plan asks for, on the device afresh.
    let mut driver = match transport(index) {
        Some(t) if plan.depth > 1 => match BatchBlk::<H, _>::new(t) {
            Ok(b) => Driver::Batch(b),
            Err(_) => return 12,
        },
        Some(t) => match VirtIOBlk::<H, _>::new(t) {
            Ok(b) => Driver::One(b),
            Err(_) => return 12,
        },
        None => return 12,
    };
    let mut pool = None;
    let buf = if plan.pool_buffer {
        match SharedBuffer::new(MAX_REQUEST) {
            Some(b) => pool.insert(b).as_mut_slice(),
            None => return 16,
        }
    } else {
        own
    };
    let len = plan.request;
    let per = (len / SECTOR) as u64;
    let slots = plan.data_sectors / per;
    let direction = if plan.mode == Mode::SequentialWrite {
        for (i, w) in buf.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&((i * 8 % len) as u64).to_le_bytes());
        }
        Direction::Write
    } else {
        Direction::Read
    };
    let mut rng = plan.seed | 1;
    let mut wrong = 0u32;
    let mut next = 0u64;
    mark(1);
    while next < u64::from(plan.requests) {
        let batch = (u64::from(plan.requests) - next).min(plan.depth as u64) as usize;
        let mut requests: [Request<'_>; MAX_BATCH] = core::array::from_fn(|_| Request {
            sector: 0,
            buf: &mut [],
        });
        for (r, chunk) in requests
            .iter_mut()
            .zip(buf.chunks_exact_mut(len))
            .take(batch)
        {
            let slot = match plan.mode {
                Mode::RandomRead => {
                    // xorshift64
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % slots
                }
                _ => next % slots,
            };
            next += 1;
            *r = Request {
                sector: plan.data_start + slot * per,
                buf: chunk,
            };
        }
        if !driver.run(direction, &mut requests[..batch]) {
            println!("blk-bench: a batch of {batch} requests failed");
            return 15;
        }
        if direction == Direction::Read {
            for r in &requests[..batch] {
                let first = u64::from_le_bytes([
                    r.buf[0], r.buf[1], r.buf[2], r.buf[3], r.buf[4], r.buf[5], r.buf[6], r.buf[7],
                ]);
                wrong += u32::from(first != r.sector * SECTOR as u64);
            }
        }
    }
    mark(2);
    // Exits alone: a read of the device's magic register, answered by the
    // VMM and nothing else.
    let magic = u64::from(abi::query(abi::Key::MmioBase)) + u64::from(index) * 0x1000;
    mark(3);
    for _ in 0..plan.exit_loops {
        // SAFETY: the device window is identity-mapped (the ABI); reading
        // its magic register has no effect on the device.
        let _ = unsafe { core::ptr::read_volatile(magic as *const u32) };
    }
    mark(4);
    if wrong > 0 {
        println!("blk-bench: {wrong} reads found the wrong data");
        return 20;
    }
    0
}
