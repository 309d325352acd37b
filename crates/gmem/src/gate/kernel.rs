//! The narrow seam between the gatekeeper and KVM's memory attributes
//! (`KVM_SET_MEMORY_ATTRIBUTES`): one call, so that the attributes path runs
//! in tests against a model of the kernel's documented behaviour. No host of
//! this project has memory attributes (the ioctl is `ENOTTY` on 6.18 with
//! `kvm_pvm`), so the model is the only place the path runs here.
//!
//! Upstream's in-place conversion (`KVM_SET_MEMORY_ATTRIBUTES2` on the
//! guest_memfd, which refuses pinned pages with `EAGAIN`) is not in the 6.18
//! headers nor in kvm-bindings 0.14. It belongs behind this seam as a second
//! implementation, gated on its capability once the number is merged
//! upstream and in kvm-bindings: out-of-tree trees have reused numbers
//! (Firecracker's `KVM_CAP_USERFAULT` = 245 collides with upstream's
//! `KVM_CAP_ARM_SEA_TO_USER`), so gmem hard-codes none.

use std::fmt;
use std::ops::Range;

use kvm_bindings::{KVM_MEMORY_ATTRIBUTE_PRIVATE, kvm_memory_attributes};

use crate::attributes::Attribute;
use crate::kvm::Vm;

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

/// Where the gatekeeper keeps KVM's attributes in step: the VM on hosts that
/// have them, a model in tests.
pub(crate) trait KernelAttributes: Send + Sync + fmt::Debug {
    /// Sets every page of `range` to `to`. The kernel documents that a
    /// failed call may have changed a prefix of the range.
    fn set(&self, range: &Range<u64>, to: Attribute) -> Result<(), kvm_ioctls::Error>;
}

impl<T: KernelAttributes + ?Sized> KernelAttributes for std::sync::Arc<T> {
    fn set(&self, range: &Range<u64>, to: Attribute) -> Result<(), kvm_ioctls::Error> {
        (**self).set(range, to)
    }
}

/// The real kernel: `KVM_SET_MEMORY_ATTRIBUTES` on the VM fd.
#[derive(Debug)]
pub(crate) struct VmAttributes(pub(crate) Vm);

impl KernelAttributes for VmAttributes {
    fn set(&self, range: &Range<u64>, to: Attribute) -> Result<(), kvm_ioctls::Error> {
        self.0
            .fd()
            .set_memory_attributes(attributes_request(range, to))
    }
}

/// Puts KVM's attributes of `range` back to exactly `before` (its private
/// runs before a failed conversion). It tries every step; the first error,
/// if any, is returned, and the caller must then treat KVM's attributes as
/// unknown (the gatekeeper poisons itself).
pub(crate) fn restore(
    kernel: &dyn KernelAttributes,
    range: &Range<u64>,
    before: &[Range<u64>],
) -> Result<(), kvm_ioctls::Error> {
    let mut first = kernel.set(range, Attribute::Shared).err();
    for run in before {
        if let Err(e) = kernel.set(run, Attribute::Private) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
pub(crate) mod model {
    //! A model of `KVM_SET_MEMORY_ATTRIBUTES` as documented
    //! (Documentation/virt/kvm/api.rst §4.141): per-GPA attributes, set for
    //! a whole range; a failure may leave a prefix changed. Failures are
    //! injected by call number.

    use std::sync::Mutex;

    use super::*;
    use crate::attributes::AttributeMap;

    #[derive(Debug, Default)]
    pub(crate) struct KernelModel {
        state: Mutex<ModelState>,
    }

    #[derive(Debug, Default)]
    struct ModelState {
        map: AttributeMap,
        calls: usize,
        /// Fail the calls with these numbers (0-based), each having
        /// changed the first page of its range.
        fail_at: Vec<usize>,
    }

    impl KernelModel {
        /// Fails the `n`th call from now (0: the next).
        pub(crate) fn fail_call(&self, n: usize) {
            let mut st = self.state.lock().unwrap();
            let call = st.calls + n;
            st.fail_at.push(call);
        }

        pub(crate) fn map(&self) -> AttributeMap {
            self.state.lock().unwrap().map.clone()
        }

        pub(crate) fn calls(&self) -> usize {
            self.state.lock().unwrap().calls
        }
    }

    impl KernelAttributes for KernelModel {
        fn set(&self, range: &Range<u64>, to: Attribute) -> Result<(), kvm_ioctls::Error> {
            let mut st = self.state.lock().unwrap();
            let call = st.calls;
            st.calls += 1;
            if let Some(i) = st.fail_at.iter().position(|&c| c == call) {
                st.fail_at.swap_remove(i);
                // A partial update: the first page changed, then ENOMEM.
                let first = range.start..(range.start + 4096).min(range.end);
                st.map.set(first, to);
                return Err(kvm_ioctls::Error::new(libc::ENOMEM));
            }
            st.map.set(range.clone(), to);
            Ok(())
        }
    }
}
