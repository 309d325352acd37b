//! The KVM side of gmem: the VM handle, the capability probe, and the
//! constants the bindings lack.
//!
//! Everything that opens `/dev/kvm` or issues a VM ioctl lives here or in
//! [`crate::binding`]; the backings borrow the VM through [`Vm`].

mod caps;
mod id;
pub mod uapi;
pub(crate) mod vm;

pub use caps::{KvmCaps, VmTypeCaps};
pub use id::VmId;
pub use vm::{Binding, KvmError, SlotReservation, Vm, VmType, WeakVm};
