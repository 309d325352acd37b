//! How to build a machine, and the rules a configuration must meet.

use gmem::{Attribute, BackingKind, Policy};

use crate::boot::{MAX_RAM, PAYLOAD_FLOOR, STACK_SIZE};
use crate::error::VmmError;

/// The smallest guest RAM: the boot area, a 64 KiB payload and one stack.
pub const MIN_RAM: u64 = 2 << 20;
/// The most vCPUs a machine may have.
pub const MAX_VCPUS: u32 = 64;

/// How to build a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// The backing of guest RAM.
    pub backing: BackingKind,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The attribute all of RAM has after launch.
    pub initial: Attribute,
    /// What conversions do to the content.
    pub policy: Policy,
}

impl MachineConfig {
    /// `mem_size` bytes of `backing`, one vCPU, RAM private after launch,
    /// in-place conversions.
    pub fn new(backing: BackingKind, mem_size: u64) -> Self {
        MachineConfig {
            backing,
            mem_size,
            vcpus: 1,
            initial: Attribute::Private,
            policy: Policy::InPlace,
        }
    }

    /// The highest address a payload may reach: the stacks sit above it.
    pub fn payload_limit(&self) -> u64 {
        self.mem_size
            .saturating_sub(u64::from(self.vcpus) * STACK_SIZE)
    }

    /// Checks the RAM size and the vCPU count.
    ///
    /// # Errors
    /// [`VmmError::InvalidRam`], [`VmmError::InvalidVcpus`].
    pub fn validate(&self) -> Result<(), VmmError> {
        let size = self.mem_size;
        let page = self.backing.page_size();
        let rule = if size < MIN_RAM {
            Some(format!("must be at least {MIN_RAM:#x} (2 MiB)"))
        } else if size > MAX_RAM {
            Some(format!(
                "must be at most {MAX_RAM:#x} (what the boot page tables map)"
            ))
        } else if !size.is_multiple_of(page) {
            Some(format!(
                "must be a multiple of the {} page size {page:#x}",
                self.backing
            ))
        } else {
            None
        };
        if let Some(rule) = rule {
            return Err(VmmError::InvalidRam { size, rule });
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmmError::InvalidVcpus {
                count: self.vcpus,
                rule: format!("must be between 1 and {MAX_VCPUS}"),
            });
        }
        if self.payload_limit() < PAYLOAD_FLOOR + (64 << 10) {
            return Err(VmmError::InvalidVcpus {
                count: self.vcpus,
                rule: format!(
                    "their {STACK_SIZE:#x}-byte stacks leave no room for a payload in {size:#x} bytes"
                ),
            });
        }
        Ok(())
    }
}
