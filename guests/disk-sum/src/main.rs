//! Reads a whole disk image through virtio-blk, 1 MiB a request, into a
//! `SharedBuffer` of the pool (the device must see the blocks anyway, so
//! they are not bounced), checksums it with FNV-1a 64, prints the sum and
//! writes it back into the last sector (as text), so the host can check
//! both.
#![no_std]
#![no_main]

use gmem_guest::virtio::{self, GmemHal, SharedBuffer};
use gmem_guest::{Boot, println};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::{DeviceType, Transport};

gmem_guest::entry!(main);

/// FNV-1a, 64 bits.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Sectors a request: 1 MiB (one exit a MiB).
const CHUNK_SECTORS: usize = 2048;

fn main(boot: Boot) -> i32 {
    if virtio::init(&boot).is_err() {
        return 10;
    }
    let mut blk = None;
    for i in 0..8 {
        // SAFETY: one transport per device window, made once.
        let Some(t) = (unsafe { virtio::transport(i) }) else {
            break;
        };
        if t.device_type() == DeviceType::Block {
            blk = VirtIOBlk::<GmemHal, _>::new(t).ok();
        }
    }
    let Some(mut blk) = blk else {
        println!("disk-sum: no virtio-blk device");
        return 11;
    };
    let sectors = blk.capacity() as usize;
    if sectors < 2 {
        return 12;
    }
    // Everything but the last sector, where the result goes.
    let data_sectors = sectors - 1;
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let Some(mut shared) = SharedBuffer::new(512 * CHUNK_SECTORS) else {
        println!("disk-sum: no room in the bounce pool");
        return 15;
    };
    let buf = shared.as_mut_slice();
    let mut at = 0;
    while at < data_sectors {
        let n = CHUNK_SECTORS.min(data_sectors - at);
        if blk.read_blocks(at, &mut buf[..512 * n]).is_err() {
            println!("disk-sum: reading sector {at} failed");
            return 13;
        }
        h = fnv1a(h, &buf[..512 * n]);
        at += n;
    }
    println!("disk-sum: {} bytes, fnv1a64 {h:016x}", data_sectors * 512);
    let mut result = [0u8; 512];
    let mut hex = [0u8; 16];
    for (i, d) in hex.iter_mut().enumerate() {
        *d = b"0123456789abcdef"[((h >> (60 - 4 * i)) & 0xf) as usize];
    }
    result[..8].copy_from_slice(b"fnv1a64 ");
    result[8..24].copy_from_slice(&hex);
    if blk.write_blocks(data_sectors, &result).is_err() || blk.flush().is_err() {
        println!("disk-sum: writing the result failed");
        return 14;
    }
    0
}
