//! virtio for confidential guests: the device may touch only shared pages,
//! so every buffer it sees lives in a bounce pool that the guest converts
//! to shared at start (as Linux's SWIOTLB does); [`GmemHal`] is the
//! `virtio-drivers` `Hal` that allocates rings there and copies buffers in
//! and out in `share`/`unshare`. Data the device must see anyway (disk
//! blocks) can live in the pool from the start ([`SharedBuffer`]), and is
//! then not copied at all. [`DirectHal`] is the plain baseline: all of RAM
//! shared, no pool for buffers. The drivers themselves are the
//! `virtio-drivers` crate's.
//!
//! (`virtio-drivers` 0.13 does not accept `VIRTIO_F_ACCESS_PLATFORM`; its
//! `share`/`unshare` hooks are what the feature stands for.)

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

use crate::mem::{self, Attribute, Errno};
use crate::{Boot, abi};

/// The bounce pool's size: 4 MiB, in 4 KiB pages.
pub const POOL_PAGES: usize = 1024;
const PAGE: usize = 4096;

/// Bounces of at most this many bytes (a request's header, its status
/// byte) share the pool's first page, in slots of this size, so that the
/// device pins one page for both rather than a page each.
const SMALL: usize = 256;
const SMALL_SLOTS: u32 = (PAGE / SMALL) as u32;

struct Pool {
    base: usize,
    /// A bit per page: in use. Page 0 is the small bounces' (always set).
    used: [u64; POOL_PAGES / 64],
    /// A bit per small slot of page 0: in use.
    small: u16,
}

struct Locked {
    busy: AtomicBool,
    pool: UnsafeCell<Pool>,
}

// SAFETY: `pool` is only reached with `busy` held (see `with_pool`).
unsafe impl Sync for Locked {}

static POOL: Locked = Locked {
    busy: AtomicBool::new(false),
    pool: UnsafeCell::new(Pool {
        base: 0,
        used: [0; POOL_PAGES / 64],
        small: 0,
    }),
};

fn with_pool<T>(f: impl FnOnce(&mut Pool) -> T) -> T {
    while POOL.busy.swap(true, Ordering::Acquire) {
        core::hint::spin_loop();
    }
    // SAFETY: `busy` is held: no other reference to the pool exists.
    let r = f(unsafe { &mut *POOL.pool.get() });
    POOL.busy.store(false, Ordering::Release);
    r
}

/// Where the bounce pool goes for `boot`: 4 MiB, 2 MiB-aligned, below the
/// top 1 MiB of RAM (the vCPU stacks).
pub fn pool_base(boot: &Boot) -> u64 {
    (boot.ram_size - (1 << 20) - (POOL_PAGES * PAGE) as u64) & !((2 << 20) - 1)
}

/// Converts the bounce pool to shared and makes it [`GmemHal`]'s.
///
/// # Errors
/// The VMM's errno if the conversion is refused.
pub fn init(boot: &Boot) -> Result<(), Errno> {
    let base = pool_base(boot);
    mem::convert(base, POOL_PAGES as u64, Attribute::Shared)?;
    with_pool(|p| {
        p.base = base as usize;
        p.used = [0; POOL_PAGES / 64];
        p.used[0] = 1; // page 0: the small bounces
        p.small = 0;
    });
    Ok(())
}

/// The first address of the bounce pool (0 before [`init`]).
pub fn pool_start() -> usize {
    with_pool(|p| p.base)
}

fn alloc(pages: usize) -> Option<usize> {
    with_pool(|p| {
        if p.base == 0 || pages == 0 {
            return None;
        }
        let free = |i: usize| p.used[i / 64] & (1 << (i % 64)) == 0;
        let mut start = 0;
        while start + pages <= POOL_PAGES {
            // Skip the used pages from `start` a word at a time (a request's
            // header page would otherwise test every page of a large
            // buffer before it, one by one).
            let used = (!(p.used[start / 64] >> (start % 64))).trailing_zeros() as usize;
            if used > 0 {
                start += used.min(64 - start % 64);
                continue;
            }
            match (start..start + pages).find(|&i| !free(i)) {
                Some(taken) => start = taken + 1,
                None => {
                    for i in start..start + pages {
                        p.used[i / 64] |= 1 << (i % 64);
                    }
                    return Some(p.base + start * PAGE);
                }
            }
        }
        None
    })
}

fn free(addr: usize, pages: usize) {
    with_pool(|p| {
        let first = (addr - p.base) / PAGE;
        for i in first..(first + pages).min(POOL_PAGES) {
            p.used[i / 64] &= !(1 << (i % 64));
        }
    });
}

/// A slot of the small bounces' page, if one is free.
fn alloc_small() -> Option<usize> {
    with_pool(|p| {
        let slot = p.small.trailing_ones();
        if p.base == 0 || slot >= SMALL_SLOTS {
            return None;
        }
        p.small |= 1 << slot;
        Some(p.base + slot as usize * SMALL)
    })
}

/// Gives back a bounce of `len` bytes at `addr`: a small slot or pages.
fn free_bounce(addr: usize, len: usize) {
    let small = with_pool(|p| {
        if addr >= p.base && addr < p.base + PAGE {
            p.small &= !(1 << ((addr - p.base) / SMALL));
            true
        } else {
            false
        }
    });
    if !small {
        free(addr, len.div_ceil(PAGE).max(1));
    }
}

/// Whether `len` bytes at `addr` lie wholly inside the pool.
fn in_pool(addr: usize, len: usize) -> bool {
    with_pool(|p| {
        p.base != 0
            && addr >= p.base
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= p.base + POOL_PAGES * PAGE)
    })
}

/// A buffer in the shared pool, for data the device must see anyway (a
/// disk's blocks, a packet): [`GmemHal`] hands it to the device as it is,
/// with no bounce copy, so a request on it costs what it costs on a
/// machine without confidentiality. The host can read and change its
/// content at any time: never put a secret there, and copy out (or check)
/// what must not change under the guest's feet. Its pages go back to the
/// pool when it is dropped.
pub struct SharedBuffer {
    addr: usize,
    len: usize,
}

impl SharedBuffer {
    /// `len` bytes (at least one) of the pool, zeroed; `None` if the pool
    /// has no room or [`init`] has not run.
    pub fn new(len: usize) -> Option<SharedBuffer> {
        let addr = alloc(len.div_ceil(PAGE).max(1))?;
        // SAFETY: the pages just taken, shared and this buffer's alone.
        unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len) };
        Some(SharedBuffer { addr, len })
    }

    /// The bytes, for the driver (and the guest) to use.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes at `addr` are this buffer's pool pages, which
        // no other allocation aliases while it lives; `&mut self` makes this
        // the one reference. (The device writes them only while a request
        // the driver made on this slice is in flight.)
        unsafe { core::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

impl Drop for SharedBuffer {
    fn drop(&mut self) {
        free(self.addr, self.len.div_ceil(PAGE).max(1));
    }
}

/// The `virtio-drivers` `Hal` of a gmem guest: DMA memory and bounce
/// buffers from the shared pool; guest RAM is identity-mapped, so a
/// physical address is its virtual one. A buffer already in the pool (a
/// [`SharedBuffer`]) is given to the device as it is: bounce copies are
/// made only of what the device must see and cannot reach.
pub struct GmemHal;

// SAFETY: dma_alloc returns zeroed, page-aligned pages of the pool that no
// other allocation aliases until dma_dealloc; share copies into pages of
// the same kind (or, for a small buffer, a slot of the pool's first page
// that no other bounce holds until it is unshared) and returns their
// (identity-mapped) address, or, for a
// buffer wholly inside the pool (shared memory the caller owns, such as a
// SharedBuffer), that buffer's own address; unshare then copies nothing
// and frees nothing.
unsafe impl Hal for GmemHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(addr) = alloc(pages) else {
            crate::println!("gmem-guest: the bounce pool is exhausted ({pages} pages asked)");
            crate::exit(102);
        };
        // SAFETY: `pages` pages at `addr` are the pool's, shared, just taken.
        unsafe { core::ptr::write_bytes(addr as *mut u8, 0, pages * PAGE) };
        // The pool never starts at 0 (it is below the top of RAM).
        (
            addr as PhysAddr,
            NonNull::new(addr as *mut u8).unwrap_or(NonNull::dangling()),
        )
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        free(paddr as usize, pages);
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let len = buffer.len();
        let at = buffer.cast::<u8>().as_ptr() as usize;
        if in_pool(at, len) {
            // Shared already (a SharedBuffer): no bounce.
            return at as PhysAddr;
        }
        let pages = len.div_ceil(PAGE).max(1);
        let small = if len <= SMALL { alloc_small() } else { None };
        let Some(bounce) = small.or_else(|| alloc(pages)) else {
            crate::println!("gmem-guest: the bounce pool is exhausted ({len} bytes to share)");
            crate::exit(102);
        };
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: `len` bytes at both: the caller's buffer and the
            // bounce slot or pages just taken; they do not overlap.
            unsafe {
                core::ptr::copy_nonoverlapping(buffer.cast::<u8>().as_ptr(), bounce as *mut u8, len)
            };
        }
        bounce as PhysAddr
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let len = buffer.len();
        if in_pool(buffer.cast::<u8>().as_ptr() as usize, len) {
            // `share` passed it through: nothing was bounced.
            return;
        }
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: the bounce slot or pages `share` returned hold `len`
            // bytes for the caller's buffer of that length.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    paddr as *const u8,
                    buffer.cast::<u8>().as_ptr(),
                    len,
                )
            };
        }
        free_bounce(paddr as usize, len);
    }
}

/// The `virtio-drivers` `Hal` of a guest whose RAM is all shared (the
/// machine's RAM is shared after launch, ABI key `Initial` = 1, and the
/// guest converts none of it to private): the device is given the driver's
/// own buffers, with no bounce copy. DMA memory (the rings) still comes
/// from the pool, so [`init`] must have run.
///
/// This is the plain baseline that `gmem bench` holds the confidential
/// path ([`GmemHal`]) against; in a guest with private memory a buffer
/// there would be refused by the device.
pub struct DirectHal;

// SAFETY: dma_alloc and dma_dealloc are GmemHal's (pool pages, zeroed,
// never aliased until freed); share hands the device the caller's own
// buffer, identity-mapped, which stays valid and unaliased for as long as
// virtio-drivers holds it (the caller's contract for `share`), and which
// the device can reach because all of RAM is shared (this Hal's rule).
unsafe impl Hal for DirectHal {
    fn dma_alloc(pages: usize, direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        GmemHal::dma_alloc(pages, direction)
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: the caller's contract, which is GmemHal's too.
        unsafe { GmemHal::dma_dealloc(paddr, vaddr, pages) }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // SAFETY: the caller's contract, which is GmemHal's too.
        unsafe { GmemHal::mmio_phys_to_virt(paddr, size) }
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        // Identity-mapped: the buffer's address is its physical address.
        buffer.cast::<u8>().as_ptr() as usize as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// Whether the machine's RAM is shared after launch (ABI key `Initial`),
/// so that [`DirectHal`] may be used.
pub fn ram_is_shared() -> bool {
    abi::query(abi::Key::Initial) == 1
}

/// The `index`-th device's transport, if there is such a device.
///
/// # Safety
/// The VMM's device window must be identity-mapped (the ABI guarantees
/// it), and no other transport for the same device may exist.
pub unsafe fn transport(index: u32) -> Option<MmioTransport<'static>> {
    if index >= abi::query(abi::Key::Devices) {
        return None;
    }
    let base = u64::from(abi::query(abi::Key::MmioBase)) + u64::from(index) * 0x1000;
    let header = NonNull::new(base as *mut VirtIOHeader)?;
    // SAFETY: the caller's contract: a device window of 0x1000 bytes, used
    // by this transport alone.
    unsafe { MmioTransport::new(header, 0x1000) }.ok()
}
