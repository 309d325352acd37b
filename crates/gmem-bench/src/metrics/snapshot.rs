//! Snapshots and eager restores of populated memory, beside the same bytes
//! moved raw: a snapshot to a file against `pread` + `write(2)` of the raw
//! file, a restore from memory against a copy into a raw file's mapping.

use std::io::Write;

use gmem::snapshot::{PrivatePages, SealKey};
use gmem::{Attribute, BackingKind};

use super::file::{bound, raw_file};
use crate::BenchError;
use crate::plan::{gib_per_s, timed};
use crate::raw::{self, Map};

/// The part of the guest kept private (sealed in the snapshot).
const PRIVATE_SHARE: u64 = 8;

fn key() -> SealKey {
    SealKey::new([0x5e; 32])
}

fn temp_file(what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("gmem-bench-{what}-{}.bin", std::process::id()))
}

/// A populated guest of `kind`, an eighth private.
fn populated(kind: BackingKind, size: u64) -> Result<super::file::Bound, BenchError> {
    let b = bound(kind, size)?;
    b.gate.fill(0, size, 0x5a)?;
    b.gate
        .convert(0, size / PRIVATE_SHARE, Attribute::Private)?;
    Ok(b)
}

pub(super) fn snapshot_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let b = populated(kind, size)?;
    let path = temp_file("snapshot");
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
    let d = timed(|| {
        b.gate
            .snapshot(&mut w, &PrivatePages::Seal(key()))
            .map_err(|e| BenchError::Invalid(e.to_string()))?;
        w.flush()?;
        Ok(())
    })?;
    let _ = std::fs::remove_file(&path);
    Ok(gib_per_s(size, d))
}

pub(super) fn snapshot_raw(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let (fd, _vm) = raw_file(kind, size)?;
    let map = Map::shared(std::os::fd::AsFd::as_fd(&fd), size)?;
    // SAFETY: the mapping is live, read-write, `size` bytes, unreferenced.
    unsafe { raw::touch(map.as_ptr(), size) };
    let path = temp_file("raw-snapshot");
    let mut out = std::fs::File::create(&path)?;
    let d = timed(|| {
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(1 << 20) as usize;
            // SAFETY: `[off, off + n)` lies inside the live mapping, which
            // nothing else touches during the write.
            let bytes = unsafe { std::slice::from_raw_parts(map.as_ptr().add(off as usize), n) };
            out.write_all(bytes)?;
            off += n as u64;
        }
        out.flush()?;
        Ok(())
    })?;
    let _ = std::fs::remove_file(&path);
    Ok(gib_per_s(size, d))
}

pub(super) fn restore_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let mut stream = Vec::with_capacity(size as usize + (1 << 20));
    populated(kind, size)?
        .gate
        .snapshot(&mut stream, &PrivatePages::Seal(key()))
        .map_err(|e| BenchError::Invalid(e.to_string()))?;
    let b = bound(kind, size)?;
    let d = timed(|| {
        b.gate
            .restore(&mut stream.as_slice(), Some(&key()))
            .map_err(|e| BenchError::Invalid(e.to_string()))?;
        Ok(())
    })?;
    Ok(gib_per_s(size, d))
}

pub(super) fn restore_raw(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let data = vec![0x5au8; size as usize];
    let (fd, _vm) = raw_file(kind, size)?;
    let map = Map::shared(std::os::fd::AsFd::as_fd(&fd), size)?;
    let d = timed(|| {
        // SAFETY: the mapping is live, read-write and `size` bytes long, and
        // `data` is a separate buffer of that length.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), map.as_ptr(), size as usize) };
        Ok(())
    })?;
    Ok(gib_per_s(size, d))
}
