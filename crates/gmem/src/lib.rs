//! # gmem: restricted guest memory for Rust VMMs
//!
//! Linux's design for confidential guests' memory (first `memfd_restricted`,
//! shipped as KVM **guest_memfd**) as a library:
//!
//! - a memory file is created **for a VM**, with a size fixed at creation;
//! - it is populated and discarded with `fallocate` semantics
//!   ([`RestrictedMemory::allocate`], [`RestrictedMemory::punch_hole`]); a
//!   punched range reads as zeroes for every consumer, guest included;
//! - consumers use the small [`RestrictedMemory`] trait and nothing else;
//! - a range of a file is bound to a guest memslot with [`Vm::bind`], under the
//!   kernel's binding rules, on every backing;
//! - the bindings go to the VM's one [`Gatekeeper`], which owns the
//!   private/shared state and every host access path: safe copies, device
//!   [`Pin`]s and (feature `vm-memory`) vm-memory's `GuestMemory`
//!   (`DeviceMemory`). No safe item returns a private byte.
//!
//! Three backings sit behind the trait: the kernel's guest_memfd, a sealed
//! memfd for kernels without it, and hugetlb memfds with 2 MiB or 1 GiB pages.
//! They behave alike, errno for errno; the `gmem-conformance` crate proves it.
//!
//! ```no_run
//! use gmem::{BackingKind, FileRange, MemoryOptions, SlotRequest, Vm, create_memory};
//!
//! let vm = Vm::new()?;
//! let mem = create_memory(MemoryOptions::new(BackingKind::GuestMemfd, 2 << 20), Some(&vm))?;
//! mem.allocate(FileRange::new(0, 2 << 20)?)?;
//! let binding = vm.bind(&mem, SlotRequest::new(0x0, 0, 2 << 20))?;
//! mem.punch_hole(FileRange::new(0, 4096)?)?; // the guest reads zeroes there now
//! drop(binding);
//! # Ok::<(), gmem::Error>(())
//! ```
#![warn(missing_docs)]

pub mod attributes;
pub mod backing;
pub mod binding;
pub mod convert;
mod error;
pub mod gate;
pub mod kvm;
pub mod probe;
pub mod range;
pub mod range_set;

pub use attributes::{Attribute, AttributeMap};
pub use backing::{
    AccessError, AdoptError, AdoptReason, BackingError, BackingKind, GmemFlags, HostMapping,
    MemoryOptions, PunchReport, RestrictedMemory, create_memory,
};
pub use binding::{BindError, FileFacts, MemslotFlags, Slot, SlotRequest, SlotTable, VmLimits};
pub use convert::{ConversionStats, ConvertError, ConvertReport, Policy};
pub use error::Error;
#[cfg(feature = "vm-memory")]
pub use gate::DeviceMemory;
pub use gate::{DEFAULT_VIEW_BUDGET, GateError, GateOptions, Gatekeeper, MemoryEvent, Pin};
pub use kvm::{Binding, KvmError, SlotReservation, Vm, VmId, VmType};
pub use range::{FileRange, PAGE_SIZE, RangeError};
