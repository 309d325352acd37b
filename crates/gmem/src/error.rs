//! The crate-level error: every domain's error, each keeping its errno.

use thiserror::Error;

use crate::backing::{AccessError, BackingError};
use crate::binding::BindError;
use crate::convert::ConvertError;
use crate::host_view::ViewError;
use crate::kvm::KvmError;
use crate::range::RangeError;

/// Any gmem error. Each variant wraps one domain's error unchanged.
#[derive(Debug, Error)]
pub enum Error {
    /// A malformed or out-of-bounds range.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// A backing refused a call.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// A binding was refused.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// KVM could not be opened or a VM created.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A host access was refused.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// A host-view access was refused.
    #[error(transparent)]
    View(#[from] ViewError),
    /// A conversion or discard was refused.
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

impl Error {
    /// The errno the kernel gives for the same misuse.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Range(e) => e.errno(),
            Error::Backing(e) => e.errno(),
            Error::Bind(e) => e.errno(),
            Error::Kvm(e) => e.errno(),
            Error::Access(e) => e.errno(),
            Error::View(e) => e.errno(),
            Error::Convert(e) => e.errno(),
        }
    }
}
