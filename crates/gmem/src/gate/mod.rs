//! The gatekeeper: the one owner of a VM's private/shared state and the only
//! way host code reaches its guest memory.
//!
//! A [`Gatekeeper`] takes a VM's [`Binding`](crate::Binding)s by value and from then on owns:
//!
//! - **the private/shared state** of every bound page: one attribute map per
//!   VM (a second gatekeeper for the same VM is refused while the first
//!   lives, and clones share the one state). When a gatekeeper is dropped,
//!   the file offsets that were private are remembered by the file, and the
//!   next gatekeeper over them starts them private;
//! - **conversions** ([`convert`](Gatekeeper::convert),
//!   [`discard`](Gatekeeper::discard), [`launch`](Gatekeeper::launch)), all
//!   or nothing, with the [`Policy`](crate::Policy) of the VM and, where the kernel has
//!   memory attributes, KVM's attributes kept in step;
//! - **every host access path**: safe copies ([`read`](Gatekeeper::read),
//!   [`write`](Gatekeeper::write), [`fill`](Gatekeeper::fill)) that refuse
//!   any private byte, and [`Pin`]s, the direct windows devices use (and,
//!   with the `vm-memory` feature, `DeviceMemory`, vm-memory's
//!   `GuestMemory` over pins).
//!
//! The raw paths to a file ([`RestrictedMemory::map_host`](crate::RestrictedMemory::map_host),
//! [`RestrictedMemory::as_fd`](crate::RestrictedMemory::as_fd)) are `unsafe`, with the gatekeeper's rules as
//! their contract, so no safe public item returns a private byte.
//!
//! # The host view: a page-table cache of the attributes
//!
//! Each region has a second `MAP_SHARED` mapping, the *view*, created
//! `PROT_NONE`. A window of it is opened (read-write) only when a device pins
//! a shared range, and closed again when any of it becomes private, so a
//! stray pointer into guest memory faults unless a device holds that range
//! right now or held it while it was shared. Open windows are a cache: their
//! number is kept under a budget ([`GateOptions::view_budget`], well below
//! `vm.max_map_count`) by closing unpinned windows, so no attribute pattern a
//! guest makes costs the VMM address-space map entries: conversions to
//! shared touch no page table at all, and conversions to private only close
//! windows that are open.
//!
//! Safe copies go through the file's own mapping (the one KVM's memslot
//! uses), after the attribute check and under the state lock, so a copy is
//! one `memcpy` per region and never waits for a window.
//!
//! # Pins
//!
//! While a [`Pin`] holds a range, converting any of it to private or
//! discarding it is refused with [`ConvertError::Pinned`](crate::ConvertError::Pinned) (`EAGAIN`): the
//! guest's doorbell answers `-EAGAIN` and the guest may retry. A device can
//! therefore never fault on a page the guest took away.
//!
//! # Huge pages
//!
//! Windows open whole backing pages. On hugetlb a pin of a shared 4 KiB page
//! opens its huge page; private 4 KiB pages of that huge page are then
//! reachable by a raw pointer (never by the safe API) until the pin is
//! dropped, when a huge page holding private bytes is closed again. A huge
//! page that the binding covers only in part is never opened (a pin there is
//! refused with [`GateError::PartialHugePage`]; safe copies work): its other
//! part is not this region's to expose.
//!
//! # Concurrency
//!
//! Copies hold the state's read lock for their length; conversions, pins and
//! unpins take the write lock, so a copy sees the state before or after a
//! conversion, never a mix.

mod conversion;
mod dirty;
mod error;
mod event;
pub(crate) mod frozen;
mod gatekeeper;
mod kernel;
mod live;
mod options;
mod pin;
mod pins;
mod region;
mod view;
#[cfg(feature = "vm-memory")]
mod vm_memory;
mod windows;

pub use error::{DirtyError, GateError};
pub use event::MemoryEvent;
pub(crate) use gatekeeper::LazyFill;
pub use gatekeeper::{DEFAULT_EVENT_QUEUE, Gatekeeper};
pub use kernel::{attributes_request, kernel_attributes_supported};
pub use options::{DEFAULT_MAX_PINS, DEFAULT_VIEW_BUDGET, GateOptions, view_mechanism};
pub use pin::Pin;
pub use pins::PinInfo;
pub use view::{process_view_budget, set_process_view_budget};
#[cfg(feature = "vm-memory")]
pub use vm_memory::DeviceMemory;
