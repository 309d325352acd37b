//! # gmem-vmm: the reference VMM
//!
//! Runs real guests on gmem's restricted memory: builds a VM whose RAM is a
//! restricted memory file bound at GPA 0, boots its vCPUs straight into
//! 64-bit long mode (GDT and identity page tables written by the VMM), loads a
//! flat payload and runs it, decoding every exit.
//!
//! It depends on the `gmem` library and nothing depends on it but the CLI.
#![warn(missing_docs)]

pub mod boot;
pub mod exit;
pub mod machine;

pub use exit::Exit;
pub use machine::{MIN_RAM, Machine, MachineConfig, VmmError};
