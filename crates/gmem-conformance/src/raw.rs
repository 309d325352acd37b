//! The raw paths to a restricted memory file that conformance checks of the
//! kernel's own behaviour need: the fd and a whole-file mapping, outside any
//! gatekeeper. gmem makes both `unsafe` (they bypass the private/shared
//! state); this module is the one place the suite takes them, under one
//! argument.

use std::os::fd::BorrowedFd;

use gmem::{BackingError, HostMapping, RestrictedMemory};

/// The raw fd and mapping of a file, for checks of kernel behaviour.
pub(crate) trait RawAccess {
    /// The file's fd.
    fn raw_fd(&self) -> BorrowedFd<'_>;
    /// A whole-file host mapping.
    fn raw_map(&self) -> Result<HostMapping, BackingError>;
}

impl<T: RestrictedMemory + ?Sized> RawAccess for T {
    fn raw_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the suite uses the fd for metadata (fstat, seals), for the
        // kernel's own fallocate/ftruncate/read/write answers, and as the fd
        // of raw memslots, on files it made for the check; where a check
        // runs a gatekeeper over a file, it touches through the fd only
        // pages that the check keeps shared, or only their metadata.
        unsafe { self.as_fd() }
    }

    fn raw_map(&self) -> Result<HostMapping, BackingError> {
        // SAFETY: the suite maps files it made for the check; no gatekeeper
        // holds them while the mapping is used, or the check touches only
        // pages it keeps shared, or it touches private pages on purpose in
        // a child process (`probe_access`) to show that they fault.
        unsafe { self.map_host() }
    }
}
