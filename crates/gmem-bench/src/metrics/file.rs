//! Populate, host fault-in and discard: the file-level operations, on a
//! gmem region and on the raw file.

use std::sync::Arc;
use std::time::Duration;

use gmem::{
    BackingKind, FileRange, GateOptions, Gatekeeper, GmemFlags, MemoryOptions, RestrictedMemory,
    SlotRequest, Vm, create_memory,
};
use rustix::mm::Advice;

use crate::BenchError;
use crate::plan::{gib_per_s, timed};
use crate::raw::{self, Map, Subject};

fn memory(kind: BackingKind, size: u64, vm: &Vm) -> Result<Arc<dyn RestrictedMemory>, BenchError> {
    let opts = MemoryOptions::new(kind, size).with_flags(GmemFlags::MMAP | GmemFlags::INIT_SHARED);
    Ok(create_memory(opts, Some(vm))?)
}

fn whole(size: u64) -> Result<FileRange, BenchError> {
    Ok(FileRange::new(0, size)?)
}

/// A VM, a file bound at GPA 0 and a shared gatekeeper over it.
pub(super) struct Bound {
    pub(super) gate: Gatekeeper,
    _vm: Vm,
}

pub(super) fn bound(kind: BackingKind, size: u64) -> Result<Bound, BenchError> {
    let vm = Vm::new()?;
    let memory = memory(kind, size, &vm)?;
    let binding = vm.bind(&memory, SlotRequest::new(0, 0, size))?;
    let gate = Gatekeeper::new(&vm, vec![binding], GateOptions::default())?;
    Ok(Bound { gate, _vm: vm })
}

/// A raw file of `kind` (created on a fresh VM for guest-memfd; the VM is
/// returned too, since the file is its).
pub(super) fn raw_file(
    kind: BackingKind,
    size: u64,
) -> Result<(std::os::fd::OwnedFd, Vm), BenchError> {
    let vm = Vm::new()?;
    let fd = raw::file(kind, size, vm.fd())?;
    Ok((fd, vm))
}

// --- populate -------------------------------------------------------------

pub(super) fn populate_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let vm = Vm::new()?;
    let mem = memory(kind, size, &vm)?;
    let range = whole(size)?;
    Ok(gib_per_s(size, timed(|| Ok(mem.allocate(range)?))?))
}

pub(super) fn populate_raw(subject: Subject, size: u64) -> Result<f64, BenchError> {
    match subject.backing() {
        Some(kind) => {
            let (fd, _vm) = raw_file(kind, size)?;
            Ok(gib_per_s(
                size,
                timed(|| raw::populate(std::os::fd::AsFd::as_fd(&fd), size))?,
            ))
        }
        None => {
            let map = Map::anon(size, subject == Subject::AnonThp)?;
            Ok(gib_per_s(
                size,
                timed(|| map.advise(Advice::LinuxPopulateWrite))?,
            ))
        }
    }
}

// --- host fault-in ----------------------------------------------------------

/// Touches every 4 KiB page through a device's pin of the whole region (the
/// view, opened once outside the timing); returns the time.
pub(super) fn host_touch_gmem(kind: BackingKind, size: u64) -> Result<Duration, BenchError> {
    let b = bound(kind, size)?;
    let pin = b.gate.pin(0, size)?;
    let ptr = pin.as_ptr();
    timed(|| {
        // SAFETY: the pin holds all `size` bytes shared and read-write in the
        // view, and no reference points into it.
        unsafe { raw::touch(ptr, size) };
        Ok(())
    })
}

pub(super) fn host_touch_raw(subject: Subject, size: u64) -> Result<Duration, BenchError> {
    let (map, _fd) = match subject.backing() {
        Some(kind) => {
            let (fd, vm) = raw_file(kind, size)?;
            (
                Map::shared(std::os::fd::AsFd::as_fd(&fd), size)?,
                Some((fd, vm)),
            )
        }
        None => (Map::anon(size, subject == Subject::AnonThp)?, None),
    };
    timed(|| {
        // SAFETY: the mapping is live, read-write, `size` bytes, unreferenced.
        unsafe { raw::touch(map.as_ptr(), size) };
        Ok(())
    })
}

// --- discard ------------------------------------------------------------------

pub(super) fn punch_unmapped_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let vm = Vm::new()?;
    let mem = memory(kind, size, &vm)?;
    mem.allocate(whole(size)?)?;
    let range = whole(size)?;
    Ok(gib_per_s(size, timed(|| Ok(mem.punch_hole(range)?))?))
}

pub(super) fn punch_unmapped_raw(subject: Subject, size: u64) -> Result<f64, BenchError> {
    match subject.backing() {
        Some(kind) => {
            let (fd, _vm) = raw_file(kind, size)?;
            let fd = std::os::fd::AsFd::as_fd(&fd);
            raw::populate(fd, size)?;
            Ok(gib_per_s(size, timed(|| raw::punch(fd, size))?))
        }
        None => {
            let map = Map::anon(size, subject == Subject::AnonThp)?;
            map.advise(Advice::LinuxPopulateWrite)?;
            Ok(gib_per_s(
                size,
                timed(|| map.advise(Advice::LinuxDontNeed))?,
            ))
        }
    }
}

pub(super) fn punch_mapped_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let b = bound(kind, size)?;
    let pin = b.gate.pin(0, size)?;
    // SAFETY: the pin holds all `size` bytes shared and read-write.
    unsafe { raw::touch(pin.as_ptr(), size) };
    // The device is done with it; its window stays mapped (the view's
    // cache), as a VMM's guest memory stays mapped. The discard goes through
    // the gatekeeper, the only way to discard a gated file.
    drop(pin);
    let d = timed(|| Ok(b.gate.discard(0, size).map(drop)?))?;
    Ok(gib_per_s(size, d))
}

/// How the raw baseline of a host-mapped discard punches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RawPunch {
    /// `fallocate(PUNCH_HOLE)` with the mapping in place.
    Naive,
    /// `MADV_DONTNEED` over the mapping, then the punch: the least work for
    /// guest_memfd, whose punch unmaps still-mapped pages one at a time.
    ZapFirst,
}

/// The raw baseline of a host-mapped discard: guest memory as any VMM has
/// it (a VM whose memslot maps the file through one host mapping, touched
/// by the host), punched as `how` says.
pub(super) fn punch_mapped_raw(
    kind: BackingKind,
    size: u64,
    how: RawPunch,
) -> Result<f64, BenchError> {
    let slot = raw::SlotFile::new(kind, size)?;
    // SAFETY: the mapping is live, read-write, `size` bytes, unreferenced.
    unsafe { raw::touch(slot.map().as_ptr(), size) };
    let d = timed(|| {
        if how == RawPunch::ZapFirst {
            slot.map().advise(Advice::LinuxDontNeed)?;
        }
        raw::punch(slot.fd(), size)
    })?;
    Ok(gib_per_s(size, d))
}
