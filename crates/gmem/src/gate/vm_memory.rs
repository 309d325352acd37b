//! The gatekeeper as vm-memory 0.18's permission-aware `GuestMemory`
//! (feature `vm-memory`), so that `Bytes<GuestAddress>`,
//! `read_obj`/`write_obj` and virtio-queue 0.18 work on it unchanged.
//!
//! vm-memory's `VolatileSlice`s carry no revocation, so every slice
//! [`DeviceMemory::get_slices`] hands out is backed by a [`Pin`] that lives
//! as long as the `DeviceMemory`: the guest cannot make that memory private
//! (its conversion gets `EAGAIN`) while a device may still touch it. Take
//! one `DeviceMemory` per device request (a descriptor chain) and drop it
//! when the request is done; a long-lived one pins everything it has
//! touched.
//!
//! Refusals, which read or write nothing:
//! - a range that is not all bound guest memory:
//!   `GuestMemoryError::InvalidGuestAddress(addr)`;
//! - a range holding a private byte, or that cannot be pinned (a partly
//!   bound huge page, the view budget): `GuestMemoryError::IOError` of kind
//!   `PermissionDenied` whose inner error is the [`GateError`], naming the
//!   GPA and the rule.
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

/// A vm-memory `GuestMemory` over a [`Gatekeeper`], for one device request.
/// See the module docs.
#[derive(Debug)]
pub struct DeviceMemory {
    gate: Gatekeeper,
    /// The pins behind every slice handed out; released on drop.
    pins: Mutex<Vec<Pin>>,
    /// The ranges refused (private, unbound, unpinnable), for the device to
    /// report: `(gpa, len)`.
    refused: Mutex<Vec<(u64, u64)>>,
}

impl DeviceMemory {
    /// A `GuestMemory` over `gate` for one device request.
    pub fn new(gate: &Gatekeeper) -> DeviceMemory {
        DeviceMemory {
            gate: gate.clone(),
            pins: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
        }
    }

    /// The ranges this request was refused, `(gpa, len)` in order: what a
    /// device reports when the guest pointed it at memory it may not touch.
    pub fn refusals(&self) -> Vec<(u64, u64)> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn refuse(&self, gpa: u64, len: u64) {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((gpa, len));
    }

    /// The gatekeeper.
    pub fn gatekeeper(&self) -> &Gatekeeper {
        &self.gate
    }

    /// How many pins this request holds.
    pub fn pinned(&self) -> usize {
        self.pins.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Releases every pin (no slice can be alive: this takes `&mut self`).
    pub fn release(&mut self) {
        self.pins
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

fn refused(addr: GuestAddress, e: GateError) -> GuestMemoryError {
    match e {
        GateError::OutsideMemory { .. } => GuestMemoryError::InvalidGuestAddress(addr),
        other => GuestMemoryError::IOError(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            other,
        )),
    }
}

/// The slices of one `get_slices` call: the first inline (a range in one
/// region, the common case, allocates nothing here), the rest in a vector.
pub struct Slices<'a> {
    first: Option<VolatileSlice<'a>>,
    rest: std::vec::IntoIter<VolatileSlice<'a>>,
}

impl<'a> Iterator for Slices<'a> {
    type Item = Result<VolatileSlice<'a>, GuestMemoryError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.first.take().or_else(|| self.rest.next()).map(Ok)
    }
}

impl FusedIterator for Slices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, ()> for Slices<'a> {}

/// A slice over `pin`, valid for `'a`.
///
/// # Safety
/// The pin must live at least as long as `'a`.
unsafe fn slice_of<'a>(pin: &Pin) -> VolatileSlice<'a> {
    // SAFETY: the pin's `len` bytes at `as_ptr` are mapped read-write while
    // the pin lives, which the caller promises for `'a`; other users of guest
    // memory access it raw or volatile, never through references.
    unsafe { VolatileSlice::new(pin.as_ptr(), pin.len() as usize) }
}

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
        let mut slices = Slices {
            first: None,
            rest: Vec::new().into_iter(),
        };
        if count == 0 {
            return Ok(slices);
        }
        let end = addr
            .0
            .checked_add(count as u64)
            .ok_or(GuestMemoryError::GuestAddressOverflow)?;
        let region = |pos: u64| {
            self.gate.region_of(pos).ok_or_else(|| {
                self.refuse(addr.0, count as u64);
                GuestMemoryError::InvalidGuestAddress(GuestAddress(pos))
            })
        };
        let first_end = end.min(region(addr.0)?.end);
        let first = self.gate.pin(addr.0, first_end - addr.0).map_err(|e| {
            self.refuse(addr.0, count as u64);
            refused(addr, e)
        })?;
        // All or nothing: pin every other region's part before handing out
        // any slice (dropping the pins on error releases them).
        let mut others = Vec::new();
        let mut pos = first_end;
        while pos < end {
            let stop = end.min(region(pos)?.end);
            others.push(self.gate.pin(pos, stop - pos).map_err(|e| {
                self.refuse(addr.0, count as u64);
                refused(addr, e)
            })?);
            pos = stop;
        }
        // SAFETY: `first` is moved into `self.pins` below and only dropped
        // with `self` (or by `release`, which takes `&mut self`, so no `'a`
        // borrow is alive then), which outlasts `'a`.
        slices.first = Some(unsafe { slice_of(&first) });
        if !others.is_empty() {
            let rest: Vec<VolatileSlice<'a>> = others
                .iter()
                // SAFETY: as for `first`: each pin moves into `self.pins`.
                .map(|p| unsafe { slice_of(p) })
                .collect();
            slices.rest = rest.into_iter();
        }
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        pins.push(first);
        pins.extend(others);
        Ok(slices)
    }
}
