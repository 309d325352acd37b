//! The crate-level error: every domain's error, each keeping its errno.

use thiserror::Error;

use crate::backing::{AccessError, BackingError};
use crate::binding::BindError;
use crate::convert::ConvertError;
use crate::gate::GateError;
use crate::kvm::KvmError;
use crate::range::RangeError;

/// Any gmem error. Each variant wraps one domain's error unchanged.
#[derive(Debug, Error)]
#[non_exhaustive]
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
    /// The gatekeeper refused an access or a pin.
    #[error(transparent)]
    Gate(#[from] GateError),
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
            Error::Gate(e) => e.errno(),
            Error::Convert(e) => e.errno(),
        }
    }
}
