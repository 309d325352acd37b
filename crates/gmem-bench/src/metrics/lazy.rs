//! Lazy restores over userfaultfd, beside the raw userfaultfd modes in the
//! same run: first-touch cost per page (gmem's fault path serves whole
//! blocks, checked and decrypted; raw `MISSING` + `UFFDIO_COPY` and raw
//! fill + `MINOR` + `UFFDIO_CONTINUE` serve one page a fault), the time a
//! lazy restore takes to return (the guest could run) against an eager
//! restore of the same snapshot, and a 1 TiB sparse guest's snapshot.

use std::io::Write;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gmem::snapshot::{LazyOptions, PrivatePages, SealKey};
use gmem::uffd::{
    FEATURE_MINOR_HUGETLBFS, FEATURE_MINOR_SHMEM, FEATURE_MISSING_HUGETLBFS, FEATURE_MISSING_SHMEM,
    MODE_MINOR, MODE_MISSING, Userfaultfd,
};
use gmem::{Attribute, BackingKind};

use super::file::{bound, raw_file};
use crate::BenchError;
use crate::plan::{micros, timed};
use crate::raw::Map;

fn key() -> SealKey {
    SealKey::new([0x1a; 32])
}

fn invalid(e: impl std::fmt::Display) -> BenchError {
    BenchError::Invalid(e.to_string())
}

/// A snapshot file of a `ram`-byte guest with `populated` bytes written
/// from 1 MiB on (an eighth of them private, sealed).
fn snapshot_file(kind: BackingKind, ram: u64, populated: u64) -> Result<std::fs::File, BenchError> {
    let b = bound(kind, ram)?;
    b.gate.fill(1 << 20, populated, 0x5a)?;
    b.gate.convert(
        1 << 20,
        (populated / 8).next_multiple_of(kind.page_size()),
        Attribute::Private,
    )?;
    let fd = rustix::fs::memfd_create("gmem-bench-snapshot", rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::from(fd));
    b.gate
        .snapshot(&mut f, &PrivatePages::Seal(key()))
        .map_err(invalid)?;
    f.flush()?;
    let mut f = f.into_inner().map_err(|e| invalid(e.error()))?;
    std::io::Seek::rewind(&mut f)?;
    Ok(f)
}

/// gmem: microseconds per page for host code to touch every page of a
/// lazily restored, fully populated guest (no prefetch: each block is
/// filled on its first touch, every record checked and the private ones
/// decrypted).
pub(super) fn first_touch_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let populated = size - (1 << 20);
    let file = snapshot_file(kind, size, populated)?;
    let b = bound(kind, size)?;
    let lazy = b
        .gate
        .restore_lazy(file, Some(&key()), LazyOptions::new().without_prefetch())
        .map_err(invalid)?;
    let shared_from = (1 << 20) + (populated / 8).next_multiple_of(kind.page_size());
    let pages = (size - shared_from) / 4096;
    let mut byte = [0u8; 1];
    let d = timed(|| {
        for i in 0..pages {
            b.gate.read(shared_from + i * 4096, &mut byte)?;
        }
        Ok(())
    })?;
    drop(lazy);
    Ok(micros(d) / pages as f64)
}

/// The raw modes a lazy restore could use.
#[derive(Clone, Copy)]
pub(super) enum RawMode {
    /// `MISSING` + `UFFDIO_COPY` of each faulting page.
    Copy,
    /// `MISSING|MINOR`: each faulting page written into the file through a
    /// second mapping, then `UFFDIO_CONTINUE`.
    Continue,
}

/// Raw: microseconds per page for a thread to touch every page of a
/// registered file mapping, a handler thread serving each fault.
pub(super) fn first_touch_raw(
    kind: BackingKind,
    size: u64,
    mode: RawMode,
) -> Result<f64, BenchError> {
    let (fd, _vm) = raw_file(kind, size)?;
    let guest = Map::shared(fd.as_fd(), size)?;
    let filler = Map::shared(fd.as_fd(), size)?;
    let features = match mode {
        RawMode::Copy => FEATURE_MISSING_SHMEM | FEATURE_MISSING_HUGETLBFS,
        RawMode::Continue => {
            FEATURE_MISSING_SHMEM
                | FEATURE_MISSING_HUGETLBFS
                | FEATURE_MINOR_SHMEM
                | FEATURE_MINOR_HUGETLBFS
        }
    };
    let uffd = Arc::new(Userfaultfd::new(features).map_err(invalid)?);
    let reg = match mode {
        RawMode::Copy => MODE_MISSING,
        RawMode::Continue => MODE_MISSING | MODE_MINOR,
    };
    // SAFETY: `guest` is a shared file mapping this function owns for the
    // whole measurement and no Rust reference covers; it outlives the
    // registration (the uffd is dropped before the mapping below).
    unsafe { uffd.register(guest.as_ptr() as usize, size as usize, reg) }.map_err(invalid)?;
    let page = kind.page_size() as usize;
    let data = vec![0x5au8; page];
    let done = Arc::new(AtomicBool::new(false));
    let (base, fill_base) = (guest.as_ptr() as usize, filler.as_ptr() as usize);
    let handler = {
        let (uffd, done) = (Arc::clone(&uffd), Arc::clone(&done));
        std::thread::spawn(move || -> Result<(), String> {
            let mut faults = Vec::new();
            while !done.load(Ordering::Acquire) {
                faults.clear();
                if uffd.read_faults(&mut faults).map_err(|e| e.to_string())? == 0 {
                    std::hint::spin_loop();
                    continue;
                }
                for &a in &faults {
                    let at = (a as usize - base) / page * page;
                    match mode {
                        RawMode::Copy => uffd
                            .copy(base + at, &data, false)
                            .map_err(|e| e.to_string())?,
                        RawMode::Continue => {
                            // SAFETY: `[at, at + page)` lies inside the live
                            // filler mapping, which no reference covers.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    data.as_ptr(),
                                    (fill_base + at) as *mut u8,
                                    page,
                                )
                            };
                            uffd.cont(base + at, page).map_err(|e| e.to_string())?;
                        }
                    }
                }
            }
            Ok(())
        })
    };
    let pages = size as usize / 4096;
    let start = Instant::now();
    let mut sum = 0u64;
    for i in 0..pages {
        // SAFETY: inside the live mapping; a volatile read, which the
        // handler thread's fill resolves.
        sum += u64::from(unsafe { std::ptr::read_volatile((base + i * 4096) as *const u8) });
    }
    let d = start.elapsed();
    done.store(true, Ordering::Release);
    handler
        .join()
        .map_err(|_| invalid("the handler thread panicked"))?
        .map_err(invalid)?;
    if sum != 0x5a * pages as u64 {
        return Err(invalid("the raw fill served other bytes"));
    }
    drop(uffd);
    Ok(micros(d) / pages as f64)
}

/// gmem: microseconds from `restore_lazy` to its return (the VM could run)
/// for a `ram`-byte guest with 64 MiB populated.
pub(super) fn lazy_start_gmem(ram: u64) -> Result<f64, BenchError> {
    let file = snapshot_file(BackingKind::Memfd, ram, 64 << 20)?;
    let b = bound(BackingKind::Memfd, ram)?;
    let start = Instant::now();
    let lazy = b
        .gate
        .restore_lazy(file, Some(&key()), LazyOptions::new())
        .map_err(invalid)?;
    let d = start.elapsed();
    drop(lazy);
    Ok(micros(d))
}

/// The same snapshot restored eagerly: microseconds until it returns.
pub(super) fn eager_start(ram: u64) -> Result<f64, BenchError> {
    let file = snapshot_file(BackingKind::Memfd, ram, 64 << 20)?;
    let b = bound(BackingKind::Memfd, ram)?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let d = timed(|| {
        b.gate.restore(&mut r, Some(&key())).map_err(invalid)?;
        Ok(())
    })?;
    Ok(micros(d))
}

/// gmem: milliseconds until a lazy restore with its prefetcher has every
/// block in (`prefetch`), or until host code has touched every page
/// (without).
pub(super) fn lazy_complete_gmem(size: u64, prefetch: bool) -> Result<f64, BenchError> {
    let file = snapshot_file(BackingKind::Memfd, size, size - (1 << 20))?;
    let b = bound(BackingKind::Memfd, size)?;
    let start = Instant::now();
    let opts = if prefetch {
        LazyOptions::new()
    } else {
        LazyOptions::new().without_prefetch()
    };
    let lazy = b
        .gate
        .restore_lazy(file, Some(&key()), opts)
        .map_err(invalid)?;
    if prefetch {
        if !lazy.wait(Duration::from_secs(120)) {
            return Err(invalid("the prefetcher did not finish in 120 s"));
        }
    } else {
        lazy.finish().map_err(invalid)?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// The same bytes restored eagerly from the file: milliseconds.
pub(super) fn eager_complete(size: u64) -> Result<f64, BenchError> {
    let file = snapshot_file(BackingKind::Memfd, size, size - (1 << 20))?;
    let b = bound(BackingKind::Memfd, size)?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let d = timed(|| {
        b.gate.restore(&mut r, Some(&key())).map_err(invalid)?;
        Ok(())
    })?;
    Ok(d.as_secs_f64() * 1e3)
}

/// A 1 TiB memfd guest with 64 runs of 1 MiB written (64 MiB), one every
/// 16 GiB: its snapshot's size in MiB and its time in milliseconds.
pub(super) fn sparse_tib() -> Result<(f64, f64), BenchError> {
    let tib = 1u64 << 40;
    let b = bound(BackingKind::Memfd, tib)?;
    for i in 0..64u64 {
        b.gate.fill(i << 34, 1 << 20, 0x33)?;
    }
    let fd = rustix::fs::memfd_create("gmem-bench-sparse", rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::from(fd));
    let mut bytes = 0;
    let d = timed(|| {
        bytes = b
            .gate
            .snapshot(&mut out, &PrivatePages::Refuse)
            .map_err(invalid)?
            .stream_bytes;
        Ok(())
    })?;
    Ok((bytes as f64 / (1 << 20) as f64, d.as_secs_f64() * 1e3))
}

/// Raw: the same 64 MiB written to a file (milliseconds).
pub(super) fn sparse_raw() -> Result<f64, BenchError> {
    let data = vec![0x33u8; 1 << 20];
    let fd = rustix::fs::memfd_create("gmem-bench-sparse-raw", rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut out = std::fs::File::from(fd);
    timed(|| {
        for _ in 0..64 {
            out.write_all(&data)?;
        }
        Ok(())
    })
    .map(|d| d.as_secs_f64() * 1e3)
}
