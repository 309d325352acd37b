//! VM identities: what files and slot tables remember of a VM.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A process-unique identifier of a VM; files remember the VM they were
/// created for by this id ("one VM per file", spec §3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(u64);

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm#{}", self.0)
    }
}

impl VmId {
    /// An id from a number, for models and tests of the binding rules
    /// ([`crate::binding::SlotTable`]); real VMs get theirs from `Vm::new`.
    pub fn from_raw(id: u64) -> VmId {
        VmId(id)
    }

    pub(crate) fn next() -> VmId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        VmId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}
