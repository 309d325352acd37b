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
//! ```
//! use gmem::{Attribute, BackingKind, FileRange, GateOptions, Gatekeeper, MemoryOptions, Policy};
//! use gmem::{SlotRequest, Vm, create_memory};
//!
//! let Ok(vm) = Vm::new() else { return Ok(()) }; // this example needs /dev/kvm
//! // guest_memfd where this KVM has it (Linux 6.18), the sealed memfd elsewhere.
//! let kind: BackingKind = vm.preferred_backing();
//! let mem = create_memory(MemoryOptions::new(kind, 2 << 20), Some(&vm))?;
//! mem.allocate(FileRange::new(0, 2 << 20)?)?;
//! let binding = vm.bind(&mem, SlotRequest::new(0x0, 0, 2 << 20))?;
//! let gate = Gatekeeper::new(&vm, vec![binding], GateOptions::new(Attribute::Shared, Policy::InPlace))?;
//! gate.write(0x1000, b"boot data")?;
//! gate.launch(Attribute::Private)?;         // the guest's now; the host is refused
//! assert!(gate.read(0x1000, &mut [0; 9]).is_err());
//! gate.discard(0x1000, 0x1000)?;            // the guest reads zeroes there now
//! # Ok::<(), gmem::Error>(())
//! ```
//!
//! # Cargo features
//!
//! - `vm-memory` (off by default): `DeviceMemory`, the gatekeeper as
//!   vm-memory 0.18's permission-aware `GuestMemory`, for device models and
//!   virtio-queue;
//! - `serde` (off by default): `serde::Serialize` on reports, options and
//!   probe results.
//!
//! # Platforms
//!
//! Linux hosts with KVM. The VM types and the reference VMM are x86-64's
//! (they are `cfg(target_arch = "x86_64")`); the rest is generic KVM, but
//! only x86-64 is built and tested here.
#![warn(missing_docs)]

pub mod attributes;
pub mod backing;
pub mod binding;
pub mod convert;
mod error;
pub mod gate;
pub mod kvm;
pub mod migrate;
pub mod probe;
pub mod range;
pub mod range_set;
pub mod snapshot;
pub mod uffd;

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
pub use gate::{
    DEFAULT_VIEW_BUDGET, DirtyError, GateError, GateOptions, Gatekeeper, MemoryEvent, Pin,
};
pub use kvm::{Binding, KvmError, SlotReservation, Vm, VmId, VmType};
pub use range::{FileRange, PAGE_SIZE, RangeError};
