//! Conversion: guest round trips, bulk conversion and the attribute map.

use gmem::{Attribute, AttributeMap, BackingKind};
use gmem_vmm::abi::PORT_EXIT;
use rustix::mm::MprotectFlags;

use super::file::{bound, raw_file};
use crate::BenchError;
use crate::guest::{self, LOAD};
use crate::plan::{PAGE, gib_per_s, per_s, timed};
use crate::raw::{self, Map, RawVm, Subject};

/// Doorbell round trips per conversion measurement.
const ROUND_TRIPS: u32 = 1000;
/// Attribute-map operations per measurement.
const MAP_OPS: u64 = 100_000;

pub(super) fn round_trips_gmem(kind: BackingKind, ram: u64) -> Result<f64, BenchError> {
    let mut m = guest::round_trip_machine(kind, ram, ROUND_TRIPS)?;
    let d = timed(|| guest::run_to_exit(&mut m))?;
    Ok(per_s(u64::from(ROUND_TRIPS), d))
}

pub(super) fn round_trips_raw(subject: Subject, ram: u64) -> Result<f64, BenchError> {
    let mut vm = RawVm::new(
        subject,
        ram,
        &guest::round_trips(guest::ROUND_TRIP_GPA, ROUND_TRIPS)?,
        LOAD,
    )?;
    let d = timed(|| vm.run_until_out(PORT_EXIT).map(drop))?;
    Ok(per_s(u64::from(ROUND_TRIPS), d))
}

/// Bulk conversions (to private and back) timed per rep: one pair is a
/// single `mprotect` of the whole region (20–80 µs), so a rep sums several,
/// each after the host touched the region again, untimed.
pub(super) const BULK_PAIRS: u32 = 16;

pub(super) fn bulk_convert_gmem(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let b = bound(kind, size)?;
    let mut total = std::time::Duration::ZERO;
    for _ in 0..BULK_PAIRS {
        {
            // A device touched all of it (its window stays open once
            // released, until a conversion to private closes it).
            let pin = b.gate.pin(0, size)?;
            // SAFETY: the pin holds all `size` bytes shared and read-write.
            unsafe { raw::touch(pin.as_ptr(), size) };
        }
        total += timed(|| {
            b.gate.convert(0, size, Attribute::Private)?;
            b.gate.convert(0, size, Attribute::Shared)?;
            Ok(())
        })?;
    }
    drop(b);
    Ok(gib_per_s(2 * size * u64::from(BULK_PAIRS), total))
}

pub(super) fn bulk_convert_raw(kind: BackingKind, size: u64) -> Result<f64, BenchError> {
    let (fd, _vm) = raw_file(kind, size)?;
    let map = Map::shared(std::os::fd::AsFd::as_fd(&fd), size)?;
    let mut total = std::time::Duration::ZERO;
    for _ in 0..BULK_PAIRS {
        // SAFETY: the mapping is live, read-write, `size` bytes, unreferenced.
        unsafe { raw::touch(map.as_ptr(), size) };
        total += timed(|| {
            map.protect(MprotectFlags::empty())?;
            map.protect(MprotectFlags::READ | MprotectFlags::WRITE)
        })?;
    }
    Ok(gib_per_s(2 * size * u64::from(BULK_PAIRS), total))
}

/// A deterministic stream of (first page, pages, private?) over `pages`.
fn map_ops(pages: u64) -> impl Iterator<Item = (u64, u64, bool)> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..MAP_OPS).map(move |i| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1 + (x >> 40) % 16;
        ((x % (pages - len)), len, i % 2 == 0)
    })
}

pub(super) fn attribute_map_gmem() -> Result<f64, BenchError> {
    const PAGES: u64 = 1 << 20;
    let mut map = AttributeMap::new();
    let d = timed(|| {
        for (first, len, private) in map_ops(PAGES) {
            let attr = if private {
                Attribute::Private
            } else {
                Attribute::Shared
            };
            map.set(first * PAGE..(first + len) * PAGE, attr);
        }
        Ok(())
    })?;
    std::hint::black_box(&map);
    Ok(per_s(MAP_OPS, d))
}

pub(super) fn attribute_map_naive() -> Result<f64, BenchError> {
    const PAGES: u64 = 1 << 20;
    let mut pages = vec![false; PAGES as usize];
    let d = timed(|| {
        for (first, len, private) in map_ops(PAGES) {
            pages[first as usize..(first + len) as usize].fill(private);
        }
        Ok(())
    })?;
    std::hint::black_box(&pages);
    Ok(per_s(MAP_OPS, d))
}
