//! [`create_memory`]: a restricted memory file of any backing, by kind.

use std::sync::Arc;

use super::guest_memfd::GuestMemfd;
use super::hugetlb::HugetlbMemfd;
use super::sealed_memfd::SealedMemfd;
use super::{BackingError, BackingKind, MemoryOptions, RestrictedMemory};
use crate::kvm::Vm;

/// Creates a restricted memory file of any backing.
///
/// `vm` is required for guest-memfd, and optional for the others: a memfd
/// created without a VM belongs to the first VM that binds it.
///
/// # Errors
/// See each backing's `create`: [`BackingError::UnsupportedFlags`] and
/// [`BackingError::InvalidSize`] (`EINVAL`) for bad arguments,
/// [`BackingError::NeedsVm`] for guest-memfd without a VM,
/// [`BackingError::HugePagesExhausted`] (`ENOMEM`) for a short pool.
pub fn create_memory(
    opts: MemoryOptions,
    vm: Option<&Vm>,
) -> Result<Arc<dyn RestrictedMemory>, BackingError> {
    Ok(match opts.kind {
        BackingKind::GuestMemfd => {
            let vm = vm.ok_or(BackingError::NeedsVm { kind: opts.kind })?;
            Arc::new(GuestMemfd::create(vm, opts.size, opts.flags)?)
        }
        BackingKind::Memfd => Arc::new(SealedMemfd::create(opts.size, opts.flags, vm)?),
        BackingKind::Hugetlb2M | BackingKind::Hugetlb1G => {
            Arc::new(HugetlbMemfd::create(opts.kind, opts.size, opts.flags, vm)?)
        }
    })
}
