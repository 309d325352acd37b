//! The gatekeeper as vm-memory 0.18's permission-aware `GuestMemory`
//! (feature `vm-memory`), so that `Bytes<GuestAddress>`,
//! `read_obj`/`write_obj` and virtio-queue 0.18 work on it unchanged.
//!
//! vm-memory's `VolatileSlice`s carry no revocation, so every slice
//! [`DeviceMemory::get_slices`] hands out is backed by a [`Pin`] that lives
//! as long as the `DeviceMemory`: the guest cannot make that memory private
//! (its conversion gets `EAGAIN`) while a device may still touch it. Take
//! one `DeviceMemory` per device request (a descriptor chain) and drop it
//! when the request is done.
//!
//! # Bounded by design
//!
//! Pins are whole 4 KiB pages (attributes are per page, so a page is all
//! shared or all private), and a page already pinned by this
//! `DeviceMemory` is reused: reading a descriptor table sixteen bytes at a
//! time pins its page once. A `DeviceMemory` pins at most
//! [`DeviceMemory::DEFAULT_MAX_BYTES`] and [`DeviceMemory::DEFAULT_MAX_PINS`]
//! pins (or what [`DeviceMemory::with_limits`] says); past that it refuses,
//! so a guest's request costs its VMM bounded memory.
//!
//! # Where it differs from `GuestMemoryMmap`
//!
//! Within bound, shared memory it behaves exactly as vm-memory's
//! `GuestMemoryMmap` of the same layout. Like it:
//! - a range running from memory into a hole yields the slices that exist,
//!   then `Err(InvalidGuestAddress(first byte of the hole))`, so `read` and
//!   `write` return the bytes done and `read_slice` gives `PartialBuffer`;
//! - `get_slices` at an address outside memory returns `Ok` of an iterator
//!   whose first item is that error;
//! - a range whose end overflows yields what exists, then
//!   `InvalidGuestAddress` (guest memory never reaches 2^64).
//!
//! Confidential memory adds one rule, all or nothing: if any byte of the
//! bound part of the range is private (or cannot be pinned: a partly bound
//! huge page, the gatekeeper's budget, this request's bound), the first
//! item is `Err(IOError)` and **nothing** is handed out, whatever comes
//! before it. Its kind is `PermissionDenied` (private, unpinnable) or
//! `OutOfMemory` (a bound), and its inner error the [`GateError`], naming
//! the GPA and the rule. Every refusal, holes and overflows included, is
//! counted ([`DeviceMemory::refusals`]).
//!
//! `physical_memory()` is `None`: there is no way around the check.

use std::iter::FusedIterator;
use std::sync::Mutex;

use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions, VolatileSlice,
};

use super::error::GateError;
use super::gatekeeper::Gatekeeper;
use super::pin::Pin;
use crate::range::PAGE_SIZE;
use crate::range_set::RangeSet;

/// How many refusals a `DeviceMemory` keeps the ranges of (later ones are
/// only counted).
const MAX_RECORDED: usize = 64;

/// What one request holds.
#[derive(Debug, Default)]
struct Held {
    /// The pins behind every slice handed out; released on drop.
    pins: Vec<Pin>,
    /// What they cover, in GPA (whole pages).
    covered: RangeSet,
    /// Their bytes.
    bytes: u64,
}

/// The refusals of one request.
#[derive(Debug, Default)]
struct Refusals {
    /// The first [`MAX_RECORDED`], `(gpa, len)`.
    recorded: Vec<(u64, u64)>,
    /// All of them.
    total: u64,
}

/// A vm-memory `GuestMemory` over a [`Gatekeeper`], for one device request.
/// See the module docs.
#[derive(Debug)]
pub struct DeviceMemory {
    gate: Gatekeeper,
    held: Mutex<Held>,
    refused: Mutex<Refusals>,
    max_bytes: u64,
    max_pins: usize,
}

impl DeviceMemory {
    /// The most bytes one `DeviceMemory` pins by default: 64 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
    /// The most pins one `DeviceMemory` holds by default.
    pub const DEFAULT_MAX_PINS: usize = 1024;

    /// A `GuestMemory` over `gate` for one device request, with the default
    /// bounds.
    pub fn new(gate: &Gatekeeper) -> DeviceMemory {
        DeviceMemory::with_limits(gate, Self::DEFAULT_MAX_BYTES, Self::DEFAULT_MAX_PINS)
    }

    /// A `GuestMemory` over `gate` for one device request, pinning at most
    /// `max_bytes` in at most `max_pins` pins.
    pub fn with_limits(gate: &Gatekeeper, max_bytes: u64, max_pins: usize) -> DeviceMemory {
        DeviceMemory {
            gate: gate.clone(),
            held: Mutex::default(),
            refused: Mutex::default(),
            max_bytes,
            max_pins,
        }
    }

    /// The ranges this request was refused, `(gpa, len)` in order (the
    /// first 64): what a device reports when the guest pointed it at memory
    /// it may not touch.
    pub fn refusals(&self) -> Vec<(u64, u64)> {
        self.refused().recorded.clone()
    }

    /// How many refusals there were in all.
    pub fn refusal_count(&self) -> u64 {
        self.refused().total
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, Refusals> {
        // A Vec and a counter, each updated by one call: consistent even if
        // a panic poisoned the lock elsewhere.
        self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, gpa: u64, len: u64) {
        let mut r = self.refused();
        r.total += 1;
        if r.recorded.len() < MAX_RECORDED {
            r.recorded.push((gpa, len));
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        // Pins are pushed after their coverage is recorded, under the lock;
        // a poisoned lock can at worst over-count coverage of pins that were
        // never pushed, which `release` clears with everything.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The gatekeeper.
    pub fn gatekeeper(&self) -> &Gatekeeper {
        &self.gate
    }

    /// How many pins this request holds.
    pub fn pinned(&self) -> usize {
        self.held().pins.len()
    }

    /// How many bytes this request holds pinned.
    pub fn pinned_bytes(&self) -> u64 {
        self.held().bytes
    }

    /// Releases every pin (no slice can be alive: this takes `&mut self`).
    pub fn release(&mut self) {
        *self.held.get_mut().unwrap_or_else(|e| e.into_inner()) = Held::default();
    }

    /// Makes sure every part (each inside one region) is covered by this
    /// request's pins: pins the whole pages of those that are not, all or
    /// nothing (a refusal drops the pins this call made).
    ///
    /// A new pin that touches pages this request holds already takes them
    /// in: it pins the whole run and the pins it covers go, so a request's
    /// contiguous buffers (a descriptor each) cost one pin and one window,
    /// not one a descriptor (pins' window boundaries are what the view
    /// budget counts).
    fn cover(&self, held: &mut Held, parts: &[(u64, u64)]) -> Result<(), GateError> {
        let mut new: Vec<(Pin, u64, u64)> = Vec::new();
        let mut covered = held.covered.clone();
        let mut bytes = held.bytes;
        for &(start, end) in parts {
            if covered.contains(start..end) {
                continue;
            }
            let (mut pstart, mut pend) = (
                start / PAGE_SIZE * PAGE_SIZE,
                end.next_multiple_of(PAGE_SIZE),
            );
            // Take in the held runs it touches, inside the same region.
            if let Some(region) = self.gate.region_of(pstart) {
                let touching: Vec<_> = covered
                    .overlapping(pstart.saturating_sub(1)..pend.saturating_add(1))
                    .collect();
                for run in touching {
                    if run.start >= region.start && run.end <= region.end {
                        pstart = pstart.min(run.start);
                        pend = pend.max(run.end);
                    }
                }
            }
            let grown = (pend - pstart).saturating_sub(covered_in(&covered, pstart, pend));
            let pins = held.pins.len() + new.len();
            if pins >= self.max_pins || bytes.saturating_add(grown) > self.max_bytes {
                return Err(GateError::RequestBound {
                    gpa: start,
                    len: end - start,
                    pinned_bytes: bytes,
                    max_bytes: self.max_bytes,
                    pins,
                    max_pins: self.max_pins,
                });
            }
            new.push((self.gate.pin(pstart, pend - pstart)?, pstart, pend));
            covered.insert(pstart..pend);
            bytes += grown;
        }
        for (pin, start, end) in new {
            // The pins this one covers go, after it is made: the pages stay
            // pinned throughout.
            held.pins
                .retain(|p| !(p.gpa() >= start && p.gpa() + p.len() <= end));
            held.pins.push(pin);
        }
        held.covered = covered;
        held.bytes = bytes;
        Ok(())
    }
}

/// The bytes of `[start, end)` that `set` covers.
fn covered_in(set: &RangeSet, start: u64, end: u64) -> u64 {
    set.overlapping(start..end)
        .map(|r| r.end.min(end) - r.start.max(start))
        .sum()
}

fn refused(e: GateError) -> GuestMemoryError {
    let kind = match e {
        GateError::RequestBound { .. }
        | GateError::TooManyPins { .. }
        | GateError::ViewBudget { .. }
        | GateError::NoHugePage { .. } => std::io::ErrorKind::OutOfMemory,
        _ => std::io::ErrorKind::PermissionDenied,
    };
    GuestMemoryError::IOError(std::io::Error::new(kind, e))
}

type Item<'a> = Result<VolatileSlice<'a>, GuestMemoryError>;

/// The items of one `get_slices` call: the first inline (a range in one
/// region, the common case, allocates nothing here), the rest in a vector.
pub struct Slices<'a> {
    first: Option<Item<'a>>,
    rest: std::vec::IntoIter<Item<'a>>,
}

impl<'a> Iterator for Slices<'a> {
    type Item = Item<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        self.first.take().or_else(|| self.rest.next())
    }
}

impl FusedIterator for Slices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, ()> for Slices<'a> {}

impl GuestMemory for DeviceMemory {
    type PhysicalMemory = GuestMemoryMmap<()>;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        let ok = count == 0 || self.gate.is_shared(addr.0, count as u64);
        if !ok {
            self.refuse(addr.0, count as u64);
        }
        ok
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> Result<impl GuestMemorySliceIterator<'a, ()>, GuestMemoryError> {
        let mut out = Slices {
            first: None,
            rest: Vec::new().into_iter(),
        };
        if count == 0 {
            return Ok(out);
        }
        // The bound parts from `addr`, region by region, up to the first
        // hole (or guest memory's end, for a range that overflows).
        let end = addr.0.saturating_add(count as u64);
        let mut parts: Vec<(u64, u64)> = Vec::new();
        let mut pos = addr.0;
        let mut hole = None;
        while pos < end {
            match self.gate.region_of(pos) {
                Some(r) => {
                    let stop = end.min(r.end);
                    parts.push((pos, stop));
                    pos = stop;
                }
                None => {
                    hole = Some(pos);
                    break;
                }
            }
        }
        if hole.is_none() && (addr.0 as u128 + count as u128) > u128::from(u64::MAX) {
            hole = Some(end); // the range runs past 2^64
        }
        if hole.is_some() {
            self.refuse(addr.0, count as u64);
        }
        // All or nothing over the bound part: pin (or find pinned) every
        // page of it before handing out any slice.
        let covered = self.cover(&mut self.held(), &parts);
        if let Err(e) = covered {
            if hole.is_none() {
                self.refuse(addr.0, count as u64);
            }
            out.first = Some(Err(refused(e)));
            return Ok(out);
        }
        let mut items = parts.into_iter().map(|(start, stop)| {
            let Some(ptr) = self.gate.view_addr(start) else {
                // Not reached: every part lies in a region (region_of).
                return Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(start)));
            };
            // SAFETY: `[start, stop)` lies in one region and is covered by
            // pins this DeviceMemory holds (just checked or made), which are
            // only dropped with `self` or by `release` (`&mut self`, so no
            // `'a` borrow is alive then); the view is mapped read-write there
            // while they live. Other users of guest memory (the guest, gmem's
            // copies) access it raw or volatile, never through references.
            Ok(unsafe { VolatileSlice::new(ptr.cast_mut(), (stop - start) as usize) })
        });
        out.first = items.next();
        let mut rest: Vec<Item<'a>> = items.collect();
        if let Some(h) = hole {
            let item = Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(h)));
            if out.first.is_none() {
                out.first = Some(item);
            } else {
                rest.push(item);
            }
        }
        out.rest = rest.into_iter();
        Ok(out)
    }
}
