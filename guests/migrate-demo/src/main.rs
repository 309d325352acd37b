//! Keeps changing its memory while it computes, so that a live migration
//! at any moment has pages dirtied under it: 8 MiB of private memory and
//! 2 MiB of shared memory are rewritten on every pass (a xorshift chain
//! folded into each word), one page per pass is converted to shared and
//! back, and one is discarded and rewritten. Every 256 passes it prints
//! its progress; at the end a checksum of all of it, and it exits with a
//! status derived from the checksum. Its lines go to virtio-console when
//! the machine has one (so that a migration carries a device mid-use),
//! else to the serial port. Nothing depends on when (or whether) the guest
//! moved: a migrated run prints and returns what an uninterrupted one does.
//!
//! With a second vCPU (`--vcpus 2`), vCPU 1 computes too, over 2 MiB of
//! private memory of its own, and vCPU 0 waits for it before its checksum
//! (which then folds in vCPU 1's): a migration pauses both mid-work.
//! Further vCPUs park.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use gmem_guest::mem::{self, Attribute};
use gmem_guest::say::{Console, say};
use gmem_guest::virtio::{self, GmemHal};
use gmem_guest::{Boot, println};
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::{DeviceType, Transport};

gmem_guest::entry!(main);

/// The private area: 8 MiB at 16 MiB.
const PRIVATE: u64 = 16 << 20;
const PRIVATE_LEN: usize = 8 << 20;
/// The shared area: 2 MiB at 24 MiB.
const SHARED: u64 = 24 << 20;
const SHARED_LEN: usize = 2 << 20;
/// Passes over both.
const PASSES: u64 = 1024;
/// vCPU 1's area: 2 MiB at 12 MiB (clear of this program, the areas above
/// and the bounce pool and stacks at the top of RAM).
const SECOND: u64 = 12 << 20;
const SECOND_LEN: usize = 2 << 20;
/// vCPU 1's passes over its area.
const SECOND_PASSES: u64 = 1536;

/// vCPU 1's progress: 0 before it starts, 1 while it computes, then its
/// checksum with the top bit set.
static SECOND_STATE: AtomicU64 = AtomicU64::new(0);
const SECOND_DONE: u64 = 1 << 63;

/// vCPU 1's work: passes over its own area; its checksum for vCPU 0.
fn second() -> ! {
    SECOND_STATE.store(1, Ordering::Release);
    // SAFETY: guest RAM that only this vCPU uses, 8-byte aligned, clear of
    // this program's segments and of every other area.
    let words = unsafe { core::slice::from_raw_parts_mut(SECOND as *mut u64, SECOND_LEN / 8) };
    words.fill(0);
    let mut s = 0x0fed_cba9_8765_4321u64;
    for _ in 0..SECOND_PASSES {
        pass(words, &mut s);
    }
    let h = fnv1a(0xcbf2_9ce4_8422_2325, words);
    SECOND_STATE.store(SECOND_DONE | (h >> 1), Ordering::Release);
    gmem_guest::park()
}

/// xorshift64*.
fn next(s: &mut u64) -> u64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// One pass over `words`: each word folds in the next of the chain.
fn pass(words: &mut [u64], s: &mut u64) {
    for w in words.iter_mut() {
        *w = w.rotate_left(7) ^ next(s);
    }
}

fn fnv1a(mut h: u64, words: &[u64]) -> u64 {
    for &w in words {
        h ^= w;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn main(boot: Boot) -> i32 {
    match boot.vcpu {
        0 => {}
        1 => second(),
        _ => gmem_guest::park(),
    }
    if boot.ram_size < (32 << 20) {
        println!("migrate-demo: needs 32 MiB of RAM");
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
    if mem::convert(SHARED, (SHARED_LEN / 4096) as u64, Attribute::Shared).is_err() {
        println!("migrate-demo: the shared area was refused");
        return 21;
    }
    // SAFETY: both areas are guest RAM below the bounce pool and the
    // stacks, clear of this program's segments, 8-byte aligned; nothing
    // else in the guest uses them.
    let (private, shared) = unsafe {
        (
            core::slice::from_raw_parts_mut(PRIVATE as *mut u64, PRIVATE_LEN / 8),
            core::slice::from_raw_parts_mut(SHARED as *mut u64, SHARED_LEN / 8),
        )
    };
    let mut s = 0x0123_4567_89ab_cdefu64;
    private.fill(0);
    shared.fill(0);
    let pages = (PRIVATE_LEN / 4096) as u64;
    for p in 0..PASSES {
        pass(private, &mut s);
        pass(shared, &mut s);
        // One page goes shared and back (its content rewritten, so that
        // either conversion policy gives the same result), another is
        // discarded and reads zero until it is rewritten.
        let page = (p * 7) % pages;
        let gpa = PRIVATE + page * 4096;
        let words = &mut private[(page as usize) * 512..(page as usize + 1) * 512];
        if mem::convert(gpa, 1, Attribute::Shared).is_err()
            || mem::convert(gpa, 1, Attribute::Private).is_err()
        {
            println!("migrate-demo: pass {p}: a conversion was refused");
            return 22;
        }
        for (i, w) in words.iter_mut().enumerate() {
            *w = p.wrapping_mul(0x9e37_79b9) ^ i as u64;
        }
        let hole = (p * 13 + 5) % pages;
        if mem::discard(PRIVATE + hole * 4096, 1).is_err() {
            println!("migrate-demo: pass {p}: a discard was refused");
            return 23;
        }
        let hole_words = &mut private[(hole as usize) * 512..(hole as usize + 1) * 512];
        if hole_words.iter().any(|&w| w != 0) {
            println!("migrate-demo: pass {p}: a discarded page did not read zero");
            return 24;
        }
        hole_words[0] = p;
        if p % 256 == 255 {
            say(
                &mut console,
                format_args!("migrate-demo: pass {} of {PASSES}", p + 1),
            );
        }
    }
    let mut h = fnv1a(fnv1a(0xcbf2_9ce4_8422_2325, private), shared);
    // vCPU 1 started long ago if the machine has it: wait for its end.
    let mut second = SECOND_STATE.load(Ordering::Acquire);
    if second != 0 {
        while second & SECOND_DONE == 0 {
            core::hint::spin_loop();
            second = SECOND_STATE.load(Ordering::Acquire);
        }
        h = fnv1a(h, &[second]);
        say(
            &mut console,
            format_args!("migrate-demo: vcpu 1 checksum {:016x}", second << 1),
        );
    }
    say(
        &mut console,
        format_args!("migrate-demo: checksum {h:016x}"),
    );
    (h % 100) as i32 + 1
}
