//! Punching a host-mapped guest_memfd range: naive (mapping in place), as
//! gmem does it (zap the mappings, then punch), and unmapped, for profiling
//! `gmem bench`'s discard figures: `punch_mapped [naive|gmem|unmapped] [MiB]`.
use std::time::Instant;

use gmem::*;

fn main() -> Result<(), gmem::Error> {
    let mut args = std::env::args().skip(1);
    let how = args.next().unwrap_or_else(|| "naive".into());
    let size = args
        .next()
        .and_then(|a| a.parse::<u64>().ok())
        .unwrap_or(256)
        << 20;
    let vm = Vm::new()?;
    if !vm.has_guest_memfd() {
        println!("skipped: {}", BackingError::NoGuestMemfd);
        return Ok(());
    }
    let mut total = std::time::Duration::ZERO;
    for _ in 0..10 {
        let mem = create_memory(MemoryOptions::new(BackingKind::GuestMemfd, size), Some(&vm))?;
        // SAFETY: a file made for this measurement, shared throughout; no
        // gatekeeper holds it.
        let host = unsafe { mem.map_host() }?;
        if how != "unmapped" {
            for off in (0..size).step_by(4096) {
                host.write(off, &[1])?;
            }
        } else {
            mem.allocate(FileRange::new(0, size)?)?;
        }
        let start = Instant::now();
        if how == "naive" {
            // SAFETY: the punch is what is measured, on a file no gatekeeper
            // holds.
            let fd = unsafe { mem.as_fd() };
            // SAFETY: fallocate takes integers only; the fd is open.
            let rc = unsafe {
                libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
                    0,
                    size as i64,
                )
            };
            assert_eq!(rc, 0);
        } else {
            mem.punch_hole(FileRange::new(0, size)?)?;
        }
        total += start.elapsed();
    }
    println!("{how}: {:?} per punch of {} MiB", total / 10, size >> 20);
    Ok(())
}
