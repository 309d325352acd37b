//! The conversion engine: private/shared conversion driven by the guest,
//! with one copy of every page.
//!
//! [`Converter::convert`] validates everything before it changes anything
//! (alignment, overflow, that the whole range is bound memory; a range that
//! spans several slots is handled when the slots are contiguous in GPA space
//! and refused if there is a hole), then changes the attributes, the host
//! view's protections and (where the kernel has memory attributes) KVM's
//! attributes together, under the view's write lock, applying the VM's
//! [`Policy`]:
//!
//! - [`Policy::InPlace`]: the content is kept. The page is the same page on
//!   both sides; only who may touch it changes. This is the direction of the
//!   upstream in-place conversion work and of pKVM.
//! - [`Policy::Discard`]: the pages that change sides are punched, so they
//!   read as zero and their memory is freed, as SEV-SNP and TDX hardware
//!   conversions behave (a page converted to the side it is on keeps its
//!   content). When going private → shared the punch happens **before** the
//!   host view opens the pages, so no secret is ever visible.
//!
//! Either way no page exists twice: there is one file, mapped `MAP_SHARED`.
//!
//! Ordering: to private, the host view closes first; to shared, the content
//! is discarded (by policy) and KVM told first, and the host view opens last.
//! If a step fails, the steps before it are undone.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Mutex;

use kvm_bindings::{
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE, kvm_memory_attributes,
};
use thiserror::Error;

use crate::attributes::{Attribute, AttributeMap};
use crate::backing::{BackingError, PunchReport};
use crate::host_view::{HostView, Part, ViewError};
use crate::kvm::Vm;
use crate::range::{FileRange, PAGE_SIZE};

/// What a conversion does to the content.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
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
    /// The host view could not be updated.
    #[error("updating the host view")]
    View(#[from] ViewError),
    /// A punch failed.
    #[error("discarding guest memory")]
    Backing(#[from] BackingError),
    /// `KVM_SET_MEMORY_ATTRIBUTES` failed.
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
            ConvertError::View(e) => e.errno(),
            ConvertError::Backing(e) => e.errno(),
            ConvertError::Kernel { source, .. } => source.errno(),
            _ => libc::EINVAL,
        }
    }
}

/// What one conversion did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConvertReport {
    /// The attribute the range now has.
    pub to: Attribute,
    /// Bytes whose attribute changed.
    pub changed_bytes: u64,
    /// What the discard policy punched (zero under in-place).
    pub punched: PunchReport,
}

/// Counters over a converter's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
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
        if !value.is_multiple_of(PAGE_SIZE) {
            return Err(ConvertError::Unaligned { what, value });
        }
    }
    let end = gpa
        .checked_add(len)
        .ok_or(ConvertError::Overflow { gpa, len })?;
    Ok(gpa..end)
}

/// Whether the kernel's attributes path applies: the VM-scope
/// `KVM_CAP_MEMORY_ATTRIBUTES` has the PRIVATE bit.
pub fn kernel_attributes_supported(memory_attributes_cap: u64) -> bool {
    memory_attributes_cap & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0
}

/// The `KVM_SET_MEMORY_ATTRIBUTES` request for `range` becoming `to`.
pub fn attributes_request(range: &Range<u64>, to: Attribute) -> kvm_memory_attributes {
    kvm_memory_attributes {
        address: range.start,
        size: range.end - range.start,
        attributes: match to {
            Attribute::Private => u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
            Attribute::Shared => 0,
        },
        flags: 0,
    }
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

/// The conversion engine of one VM. See the module docs.
#[derive(Debug)]
pub struct Converter {
    view: HostView,
    policy: Policy,
    /// The VM, when the kernel keeps memory attributes too.
    kernel: Option<Vm>,
    stats: Mutex<ConversionStats>,
}

impl Converter {
    /// An engine over `view` for `vm`. Where the VM has kernel memory
    /// attributes, they are brought in line with the view's now.
    ///
    /// # Errors
    /// [`ConvertError::Kernel`] if the kernel refuses the initial attributes.
    pub fn new(view: HostView, policy: Policy, vm: &Vm) -> Result<Converter, ConvertError> {
        let kernel = kernel_attributes_supported(vm.memory_attributes()).then(|| vm.clone());
        let converter = Converter {
            view,
            policy,
            kernel,
            stats: Mutex::default(),
        };
        if converter.kernel.is_some() {
            let attrs = converter.view.attributes();
            for run in attrs.private_runs() {
                converter.set_kernel(&run, Attribute::Private)?;
            }
        }
        Ok(converter)
    }

    /// The host view.
    pub fn view(&self) -> &HostView {
        &self.view
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Whether KVM's memory attributes are kept in step too.
    pub fn uses_kernel_attributes(&self) -> bool {
        self.kernel.is_some()
    }

    /// The counters so far.
    pub fn stats(&self) -> ConversionStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Converts `[gpa, gpa + len)` to `to`, all or nothing.
    ///
    /// # Errors
    /// `EINVAL` for a bad range ([`ConvertError::Empty`],
    /// [`ConvertError::Unaligned`], [`ConvertError::Overflow`],
    /// [`ConvertError::OutsideMemory`]), before anything changes; the
    /// kernel's errno if a step fails (the steps before it are undone).
    pub fn convert(
        &self,
        gpa: u64,
        len: u64,
        to: Attribute,
    ) -> Result<ConvertReport, ConvertError> {
        self.convert_with(gpa, len, to, self.policy, true)
    }

    /// Ends the launch: every region becomes `initial`, keeping its content
    /// whatever the policy (the VMM wrote the boot structures and payload
    /// into shared memory; this is where SEV-SNP's launch update would
    /// encrypt them in place). Not counted in [`stats`](Self::stats).
    ///
    /// # Errors
    /// As [`convert`](Self::convert).
    pub fn launch(&self, initial: Attribute) -> Result<(), ConvertError> {
        let regions: Vec<Range<u64>> = self.view.regions().collect();
        for r in regions {
            self.convert_with(r.start, r.end - r.start, initial, Policy::InPlace, false)?;
        }
        Ok(())
    }

    fn convert_with(
        &self,
        gpa: u64,
        len: u64,
        to: Attribute,
        policy: Policy,
        count: bool,
    ) -> Result<ConvertReport, ConvertError> {
        let range = validate_range(gpa, len)?;
        let mut attrs = self.view.write_attributes();
        let parts = self
            .view
            .parts(gpa, len)
            .map_err(|_| ConvertError::OutsideMemory { gpa, len })?;
        let private_before = attrs.private_bytes(range.clone());
        let changed_bytes = match to {
            Attribute::Private => len - private_before,
            Attribute::Shared => private_before,
        };
        let before: Vec<Range<u64>> = attrs.private_runs_in(range.clone()).collect();
        let mut punched = PunchReport::default();
        match to {
            Attribute::Private => {
                // Close the host's view first.
                self.apply(&mut attrs, &parts, &range, to, &before)?;
                if let Err(e) = self.set_kernel(&range, to) {
                    self.undo(&mut attrs, &parts, &range, &before);
                    return Err(e);
                }
                if policy == Policy::Discard {
                    punched = match self.punch_changing(&range, &before, to) {
                        Ok(report) => report,
                        Err(e) => {
                            let _ = self.set_kernel(&range, Attribute::Shared);
                            self.undo(&mut attrs, &parts, &range, &before);
                            return Err(e);
                        }
                    };
                }
            }
            Attribute::Shared => {
                // Discard the secret before anyone can see it.
                if policy == Policy::Discard {
                    punched = self.punch_changing(&range, &before, to)?;
                }
                self.set_kernel(&range, to)?;
                if let Err(e) = self.apply(&mut attrs, &parts, &range, to, &before) {
                    let _ = self.set_kernel(&range, Attribute::Private);
                    return Err(e);
                }
            }
        }
        let report = ConvertReport {
            to,
            changed_bytes,
            punched,
        };
        if !count {
            return Ok(report);
        }
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        match to {
            Attribute::Private => {
                stats.to_private += 1;
                stats.pages_to_private += changed_bytes / PAGE_SIZE;
            }
            Attribute::Shared => {
                stats.to_shared += 1;
                stats.pages_to_shared += changed_bytes / PAGE_SIZE;
            }
        }
        stats.bytes_freed += punched.bytes_freed;
        stats.bytes_zeroed += punched.bytes_zeroed;
        Ok(report)
    }

    /// Discards `[gpa, gpa + len)` whatever its attribute (free page
    /// reporting): the guest reads zeroes there afterwards. Whole backing
    /// pages are freed; parts of huge pages are zeroed in place.
    ///
    /// # Errors
    /// As [`convert`](Self::convert) for a bad range; the backing's errno if a
    /// punch fails.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<PunchReport, ConvertError> {
        validate_range(gpa, len)?;
        let _attrs = self.view.write_attributes();
        let parts = self
            .view
            .parts(gpa, len)
            .map_err(|_| ConvertError::OutsideMemory { gpa, len })?;
        let report = self.punch(&parts)?;
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.discards += 1;
        stats.bytes_freed += report.bytes_freed;
        stats.bytes_zeroed += report.bytes_zeroed;
        Ok(report)
    }

    /// Handles a `KVM_EXIT_MEMORY_FAULT`: converts the page to the kind of
    /// access the guest made, so the vCPU can re-enter.
    ///
    /// # Errors
    /// [`ConvertError::UnknownFaultFlags`] for unknown flags; as
    /// [`convert`](Self::convert) otherwise.
    pub fn handle_memory_fault(
        &self,
        flags: u64,
        gpa: u64,
        size: u64,
    ) -> Result<ConvertReport, ConvertError> {
        let (range, to) = decode_memory_fault(flags, gpa, size)?;
        self.convert(range.start, range.end - range.start, to)
    }

    fn apply(
        &self,
        attrs: &mut AttributeMap,
        parts: &[Part],
        range: &Range<u64>,
        to: Attribute,
        before: &[Range<u64>],
    ) -> Result<(), ConvertError> {
        attrs.set(range.clone(), to);
        for part in parts {
            if let Err(e) = self.view.reprotect(attrs, part) {
                self.undo(attrs, parts, range, before);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Puts the attributes of `range` back to `before` (its private runs) and
    /// the protections with them. Best effort: it runs on an error path.
    fn undo(
        &self,
        attrs: &mut AttributeMap,
        parts: &[Part],
        range: &Range<u64>,
        before: &[Range<u64>],
    ) {
        attrs.set(range.clone(), Attribute::Shared);
        for run in before {
            attrs.set(run.clone(), Attribute::Private);
        }
        for part in parts {
            let _ = self.view.reprotect(attrs, part);
        }
    }

    /// The discard policy's punch: only the pages of `range` whose attribute
    /// changes (converting a private page to private again keeps it), given
    /// `before`, the private runs of `range` before the conversion.
    fn punch_changing(
        &self,
        range: &Range<u64>,
        before: &[Range<u64>],
        to: Attribute,
    ) -> Result<PunchReport, ConvertError> {
        let changing: Vec<Range<u64>> = match to {
            Attribute::Shared => before.to_vec(),
            Attribute::Private => {
                let mut shared = Vec::new();
                let mut pos = range.start;
                for run in before {
                    if run.start > pos {
                        shared.push(pos..run.start);
                    }
                    pos = run.end;
                }
                if range.end > pos {
                    shared.push(pos..range.end);
                }
                shared
            }
        };
        let mut report = PunchReport::default();
        for r in changing {
            let parts = self.view.parts(r.start, r.end - r.start).map_err(|_| {
                ConvertError::OutsideMemory {
                    gpa: r.start,
                    len: r.end - r.start,
                }
            })?;
            report += self.punch(&parts)?;
        }
        Ok(report)
    }

    fn punch(&self, parts: &[Part]) -> Result<PunchReport, ConvertError> {
        let mut report = PunchReport::default();
        for part in parts {
            let r = self.view.region(part.region);
            let offset = r.offset + (part.gpa.start - r.gpa);
            let range = FileRange::new(offset, part.gpa.end - part.gpa.start)
                .map_err(BackingError::from)?;
            report += r.memory.punch_hole(range)?;
        }
        Ok(report)
    }

    fn set_kernel(&self, range: &Range<u64>, to: Attribute) -> Result<(), ConvertError> {
        let Some(vm) = &self.kernel else {
            return Ok(());
        };
        vm.fd()
            .set_memory_attributes(attributes_request(range, to))
            .map_err(|source| ConvertError::Kernel {
                gpa: range.start,
                len: range.end - range.start,
                source,
            })
    }
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
    fn kernel_path_is_gated_on_the_private_bit() {
        assert!(!kernel_attributes_supported(0));
        assert!(kernel_attributes_supported(8));
        assert!(!kernel_attributes_supported(7));
    }

    #[test]
    fn attributes_request_encodes_private_as_bit_3() {
        let r = attributes_request(&(0x1000..0x3000), Attribute::Private);
        assert_eq!(
            (r.address, r.size, r.attributes, r.flags),
            (0x1000, 0x2000, 8, 0)
        );
        assert_eq!(
            attributes_request(&(0..0x1000), Attribute::Shared).attributes,
            0
        );
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
    }

    #[test]
    fn policy_names() {
        assert_eq!("in-place".parse::<Policy>().unwrap(), Policy::InPlace);
        assert_eq!("discard".parse::<Policy>().unwrap(), Policy::Discard);
        assert!("keep".parse::<Policy>().unwrap_err().contains("\"keep\""));
    }
}
