//! Snapshots a running guest half way through a computation and shows the
//! restored run ends exactly as an uninterrupted one: fills 4 MiB of
//! shared memory with a pattern, derives a secret into a private page,
//! checksums the first half (FNV-1a, and a floating-point sum kept in SSE
//! registers across the snapshot), asks the VMM for a snapshot, then
//! checksums the second half and the secret, prints the result (over
//! virtio-console when there is one, whose queue is set up before the
//! snapshot and used after it) and exits with a status derived from it.
#![no_std]
#![no_main]

use gmem_guest::mem::{self, Attribute};
use gmem_guest::say::{Console, say};
use gmem_guest::virtio::{self, GmemHal};
use gmem_guest::{Boot, Snapshot, println};
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::{DeviceType, Transport};

gmem_guest::entry!(main);

/// The pattern area: 4 MiB at 8 MiB, made shared.
const AREA: u64 = 8 << 20;
const AREA_LEN: usize = 4 << 20;
/// The secret's page, kept private.
const SECRET_PAGE: u64 = 12 << 20;
/// The secret's seed: the host's test derives the same 32 bytes.
const SEED: u64 = 0x5eed_cafe_f00d_d00d;

/// xorshift64*, the pattern's and the secret's generator.
fn next(s: &mut u64) -> u64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A floating-point sum the compiler keeps in SSE registers.
fn fsum(mut f: f64, bytes: &[u8]) -> f64 {
    for c in bytes.chunks(8) {
        f = f * 0.999_999_9 + f64::from(c[0]) * 0.5;
    }
    f
}

fn main(boot: Boot) -> i32 {
    if boot.ram_size < (32 << 20) {
        println!("snapshot-demo: needs 32 MiB of RAM");
        return 20;
    }
    let mut console: Console = None;
    if virtio::init(&boot).is_ok() {
        for i in 0..8 {
            // SAFETY: one transport per device window, made once.
            let Some(t) = (unsafe { virtio::transport(i) }) else {
                break;
            };
            if t.device_type() == DeviceType::Console {
                console = VirtIOConsole::<GmemHal, _>::new(t).ok();
            }
        }
    }
    if mem::convert(AREA, (AREA_LEN / 4096) as u64, Attribute::Shared).is_err()
        || mem::convert(SECRET_PAGE, 1, Attribute::Private).is_err()
    {
        println!("snapshot-demo: a conversion was refused");
        return 21;
    }
    // SAFETY: [AREA, +AREA_LEN) and the secret's page are guest RAM below
    // the bounce pool and the stacks, clear of this program's segments;
    // nothing else in the guest uses them.
    let (area, secret) = unsafe {
        (
            core::slice::from_raw_parts_mut(AREA as *mut u8, AREA_LEN),
            core::slice::from_raw_parts_mut(SECRET_PAGE as *mut u8, 32),
        )
    };
    let mut s = 0x1234_5678_9abc_def1u64;
    for w in area.chunks_mut(8) {
        w.copy_from_slice(&next(&mut s).to_le_bytes());
    }
    let mut k = SEED;
    for w in secret.chunks_mut(8) {
        w.copy_from_slice(&next(&mut k).to_le_bytes());
    }
    let half = AREA_LEN / 2;
    let h = fnv1a(0xcbf2_9ce4_8422_2325, &area[..half]);
    let f = fsum(1.0, &area[..half]);
    say(
        &mut console,
        format_args!("snapshot-demo: first half done, asking for a snapshot"),
    );
    match gmem_guest::snapshot() {
        Ok(Snapshot::Taken) => println!("snapshot-demo: snapshot taken, continuing"),
        Ok(Snapshot::Resumed) => println!("snapshot-demo: resumed from a snapshot"),
        Err(e) => println!("snapshot-demo: no snapshot ({})", e.0),
    }
    let h = fnv1a(h, &area[half..]);
    let f = fsum(f, &area[half..]);
    let secret_hash = fnv1a(0xcbf2_9ce4_8422_2325, secret);
    let result = h ^ secret_hash.rotate_left(17) ^ f.to_bits();
    say(
        &mut console,
        format_args!(
            "snapshot-demo: checksum {h:016x}, fsum {:016x}, secret hash {secret_hash:016x}, result {result:016x}",
            f.to_bits()
        ),
    );
    (result % 100) as i32 + 1
}
