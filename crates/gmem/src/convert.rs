//! Conversion vocabulary: the [`Policy`], the range rules, the errors and
//! reports of [`Gatekeeper::convert`](crate::Gatekeeper::convert) and
//! [`Gatekeeper::discard`](crate::Gatekeeper::discard), and the decoding of
//! `KVM_EXIT_MEMORY_FAULT`. The engine itself is the gatekeeper's: it owns
//! the state a conversion changes. This module makes no system call.
//!
//! - [`Policy::InPlace`]: the content is kept. The page is the same page on
//!   both sides; only who may touch it changes. This is the direction of the
//!   upstream in-place conversion work and of pKVM.
//! - [`Policy::Discard`]: the pages that change sides are punched, so they
//!   read as zero and their memory is freed, as SEV-SNP and TDX hardware
//!   conversions behave (a page converted to the side it is on keeps its
//!   content).
//!
//! Either way no page exists twice: there is one file, mapped `MAP_SHARED`.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE;
use thiserror::Error;

use crate::attributes::Attribute;
use crate::backing::{BackingError, PunchReport};
use crate::gate::GateError;
use crate::range::is_page_aligned;

/// What a conversion does to the content.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
#[non_exhaustive]
pub enum Policy {
    /// Keep the content (upstream in-place conversion, pKVM).
    #[default]
    InPlace,
    /// Punch the range: it reads as zero and its memory is freed (SEV-SNP, TDX).
    Discard,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::InPlace => "in-place",
            Policy::Discard => "discard",
        })
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "in-place" => Ok(Policy::InPlace),
            "discard" => Ok(Policy::Discard),
            other => Err(format!(
                "unknown conversion policy {other:?}; expected in-place or discard"
            )),
        }
    }
}

/// Why a conversion or discard was refused or failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The length is zero.
    #[error("conversion at GPA {gpa:#x} has length 0")]
    Empty {
        /// The GPA.
        gpa: u64,
    },
    /// The GPA or the length is not 4 KiB-aligned.
    #[error("{what} {value:#x} is not a multiple of the page size 0x1000")]
    Unaligned {
        /// "gpa" or "length".
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// `gpa + len` wraps around.
    #[error("range at GPA {gpa:#x} of length {len:#x} wraps around")]
    Overflow {
        /// The GPA.
        gpa: u64,
        /// The length.
        len: u64,
    },
    /// Part of the range is not bound guest memory.
    #[error("guest range [{gpa:#x}, +{len:#x}) is not all bound guest memory")]
    OutsideMemory {
        /// The GPA.
        gpa: u64,
        /// The length.
        len: u64,
    },
    /// A device holds part of the range (a [`Pin`](crate::Pin)).
    #[error(
        "guest range [{gpa:#x}, +{len:#x}) is pinned by a device at [{:#x}, +{:#x}): it cannot become private or be discarded until the device releases it; retry",
        pin.start, pin.end - pin.start
    )]
    Pinned {
        /// The GPA.
        gpa: u64,
        /// The length.
        len: u64,
        /// A pinned range in the way.
        pin: Range<u64>,
    },
    /// A memory-fault exit carried flags gmem does not know.
    #[error(
        "KVM_EXIT_MEMORY_FAULT at GPA {gpa:#x} with unknown flags {flags:#x} (known: PRIVATE = 0x8)"
    )]
    UnknownFaultFlags {
        /// The GPA.
        gpa: u64,
        /// The flags.
        flags: u64,
    },
    /// The host view could not be updated; nothing changed.
    #[error("converting [{gpa:#x}, +{len:#x}): the host view could not be updated")]
    View {
        /// The GPA.
        gpa: u64,
        /// The length.
        len: u64,
        /// The view's error.
        #[source]
        source: GateError,
    },
    /// A punch failed; the range kept its attribute.
    #[error(
        "discarding [{gpa:#x}, +{len:#x}) failed after {discarded:#x} bytes were discarded; the range keeps its attribute"
    )]
    Backing {
        /// The GPA.
        gpa: u64,
        /// The length.
        len: u64,
        /// Bytes punched before the failure (their content is gone).
        discarded: u64,
        /// The backing's error.
        #[source]
        source: BackingError,
    },
    /// The launch phase is over: launch happens once, before any
    /// conversion.
    #[error(
        "the gatekeeper has left its launch phase (a launch, a conversion or a discard ended it): launch happens once, before any conversion"
    )]
    AlreadyLaunched,
    /// The gatekeeper is poisoned and refuses every change.
    #[error("the conversion was refused")]
    Poisoned {
        /// Why ([`GateError::Poisoned`]).
        #[source]
        source: GateError,
    },
    /// `KVM_SET_MEMORY_ATTRIBUTES` failed; KVM's attributes were restored.
    #[error("KVM_SET_MEMORY_ATTRIBUTES on [{gpa:#x}, +{len:#x}) failed")]
    Kernel {
        /// The GPA.
        gpa: u64,
        /// The length.
        len: u64,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl ConvertError {
    /// The errno for the same misuse (what `KVM_HC_MAP_GPA_RANGE` returns).
    pub fn errno(&self) -> i32 {
        match self {
            ConvertError::Pinned { .. } => libc::EAGAIN,
            ConvertError::View { source, .. } | ConvertError::Poisoned { source } => source.errno(),
            ConvertError::Backing { source, .. } => source.errno(),
            ConvertError::Kernel { source, .. } => source.errno(),
            _ => libc::EINVAL,
        }
    }
}

/// What one conversion did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ConvertReport {
    /// The attribute the range now has.
    pub to: Attribute,
    /// Bytes whose attribute changed.
    pub changed_bytes: u64,
    /// What the discard policy punched (zero under in-place).
    pub punched: PunchReport,
}

/// Counters over a converter's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ConversionStats {
    /// Conversions to private.
    pub to_private: u64,
    /// Conversions to shared.
    pub to_shared: u64,
    /// Pages whose attribute became private.
    pub pages_to_private: u64,
    /// Pages whose attribute became shared.
    pub pages_to_shared: u64,
    /// Explicit discards.
    pub discards: u64,
    /// Bytes whose backing pages were released, by discards and policy.
    pub bytes_freed: u64,
    /// Bytes only zeroed in place (parts of huge pages).
    pub bytes_zeroed: u64,
}

/// Checks a guest range: non-empty, 4 KiB-aligned, not wrapping.
///
/// # Errors
/// [`ConvertError::Empty`], [`ConvertError::Unaligned`],
/// [`ConvertError::Overflow`], all `EINVAL`.
pub fn validate_range(gpa: u64, len: u64) -> Result<Range<u64>, ConvertError> {
    if len == 0 {
        return Err(ConvertError::Empty { gpa });
    }
    for (what, value) in [("gpa", gpa), ("length", len)] {
        if !is_page_aligned(value) {
            return Err(ConvertError::Unaligned { what, value });
        }
    }
    let end = gpa
        .checked_add(len)
        .ok_or(ConvertError::Overflow { gpa, len })?;
    Ok(gpa..end)
}

/// Decodes a `KVM_EXIT_MEMORY_FAULT` into the conversion it asks for.
///
/// # Errors
/// [`ConvertError::UnknownFaultFlags`] for flags other than PRIVATE.
pub fn decode_memory_fault(
    flags: u64,
    gpa: u64,
    size: u64,
) -> Result<(Range<u64>, Attribute), ConvertError> {
    let private = u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE);
    if flags & !private != 0 {
        return Err(ConvertError::UnknownFaultFlags { gpa, flags });
    }
    let to = if flags & private != 0 {
        Attribute::Private
    } else {
        Attribute::Shared
    };
    let end = gpa
        .checked_add(size)
        .ok_or(ConvertError::Overflow { gpa, len: size })?;
    Ok((gpa..end, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_range_rules() {
        assert!(matches!(
            validate_range(0, 0),
            Err(ConvertError::Empty { gpa: 0 })
        ));
        assert!(matches!(
            validate_range(1, 4096),
            Err(ConvertError::Unaligned { what: "gpa", .. })
        ));
        assert!(matches!(
            validate_range(0, 1),
            Err(ConvertError::Unaligned { what: "length", .. })
        ));
        assert!(matches!(
            validate_range(u64::MAX - 4095, 8192),
            Err(ConvertError::Overflow { .. })
        ));
        assert_eq!(validate_range(4096, 8192).unwrap(), 4096..12288);
        assert_eq!(validate_range(0, 0).unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn memory_faults_decode_and_refuse_unknown_flags() {
        assert_eq!(
            decode_memory_fault(8, 0x1000, 0x1000).unwrap(),
            (0x1000..0x2000, Attribute::Private)
        );
        assert_eq!(
            decode_memory_fault(0, 0x1000, 0x1000).unwrap(),
            (0x1000..0x2000, Attribute::Shared)
        );
        let e = decode_memory_fault(8 | 1, 0x1000, 0x1000).unwrap_err();
        assert!(matches!(
            e,
            ConvertError::UnknownFaultFlags { flags: 9, .. }
        ));
        assert!(e.to_string().contains("0x9"), "{e}");
        // Firecracker's out-of-tree KVM_MEMORY_EXIT_FLAG_USERFAULT (bit 4):
        // refused, naming the flags, never taken for a conversion.
        let e = decode_memory_fault(1 << 4, 0x1000, 0x1000).unwrap_err();
        assert!(matches!(
            e,
            ConvertError::UnknownFaultFlags { flags: 0x10, .. }
        ));
        assert!(e.to_string().contains("0x10"), "{e}");
    }

    #[test]
    fn policy_names() {
        assert_eq!("in-place".parse::<Policy>().unwrap(), Policy::InPlace);
        assert_eq!("discard".parse::<Policy>().unwrap(), Policy::Discard);
        assert!("keep".parse::<Policy>().unwrap_err().contains("\"keep\""));
    }
}
