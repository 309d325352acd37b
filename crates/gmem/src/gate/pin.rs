//! [`Pin`]: a device's hold on a shared guest range, with direct access.

use std::fmt;
use std::sync::Arc;

use super::error::GateError;
use crate::backing::mapping::{copy_from_guest, copy_to_guest};

/// What a pin goes back to when it is dropped (the gatekeeper's state).
pub(crate) trait PinHolder: Send + Sync {
    /// Releases pin `id`.
    fn release(self: Arc<Self>, id: u64);
}

/// A device's hold on a shared guest range (from [`Gatekeeper::pin`]): the
/// range's view window is open for direct access, and the guest's
/// conversions of it to private and discards of it are refused with
/// `EAGAIN` until the pin is dropped.
///
/// [`Gatekeeper::pin`]: super::Gatekeeper::pin
pub struct Pin {
    holder: Option<Arc<dyn PinHolder>>,
    id: u64,
    gpa: u64,
    len: u64,
    /// The view's address of `gpa`.
    ptr: *mut u8,
}

// SAFETY: `ptr` addresses the view mapping that `holder` keeps alive; the pin
// only hands it out raw or copies through it volatile-tolerantly, from any
// thread.
unsafe impl Send for Pin {}
// SAFETY: as for Send: `&Pin` gives copies and a raw address only.
unsafe impl Sync for Pin {}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pin")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("len", &format_args!("{:#x}", self.len))
            .finish()
    }
}

impl Pin {
    pub(crate) fn new(
        holder: Arc<dyn PinHolder>,
        id: u64,
        gpa: u64,
        len: u64,
        ptr: *mut u8,
    ) -> Pin {
        Pin {
            holder: Some(holder),
            id,
            gpa,
            len,
            ptr,
        }
    }

    /// The first guest physical address held.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// How many bytes are held.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a pin holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The host address of [`gpa`](Self::gpa) in the view: `len()` bytes
    /// there are mapped read-write for as long as the pin lives. The guest
    /// may write them at any time, so accesses must be volatile (or raw
    /// copies); never make a Rust reference to them.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, GateError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(offset as usize),
            _ => Err(GateError::OutsideMemory {
                gpa: self.gpa.saturating_add(offset),
                len: len as u64,
            }),
        }
    }

    /// Copies `buf.len()` bytes at `offset` into the pin into `buf`.
    ///
    /// # Errors
    /// [`GateError::OutsideMemory`] if the copy reaches past the pin.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), GateError> {
        let start = self.check(offset, buf.len())?;
        // SAFETY: in bounds of the pinned range (checked), which is mapped
        // read-write while the pin lives; `buf` is a separate buffer.
        unsafe { copy_from_guest(buf, self.ptr.add(start)) };
        Ok(())
    }

    /// Copies `data` to `offset` into the pin.
    ///
    /// # Errors
    /// [`GateError::OutsideMemory`] if the copy reaches past the pin.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), GateError> {
        let start = self.check(offset, data.len())?;
        // SAFETY: as in `read`.
        unsafe { copy_to_guest(self.ptr.add(start), data) };
        Ok(())
    }

    /// The pinned range as a vm-memory `VolatileSlice`.
    #[cfg(feature = "vm-memory")]
    pub fn as_volatile_slice(&self) -> vm_memory::VolatileSlice<'_> {
        // SAFETY: `len` bytes at `ptr` are mapped read-write while the pin
        // lives, which the slice's lifetime (borrowing the pin) cannot
        // outlast; other users of guest memory (the guest, gmem's copies)
        // access it raw or volatile, never through references.
        unsafe { vm_memory::VolatileSlice::new(self.ptr, self.len as usize) }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(holder) = self.holder.take() {
            holder.release(self.id);
        }
    }
}
