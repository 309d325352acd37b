//! # gmem-vmm: the reference VMM
//!
//! Runs real guests on gmem's restricted memory: builds a VM whose RAM is a
//! restricted memory file bound at GPA 0, boots its vCPUs straight into
//! 64-bit long mode (GDT and identity page tables written by the VMM), loads a
//! flat payload, launches (RAM becomes private), and runs every vCPU on a
//! thread of its own, serving the guest ABI (`docs/guest-abi.md`): serial
//! console, exit port, hypercall doorbell, shared-buffer console, discard.
//!
//! It depends on the `gmem` library and nothing depends on it but the CLI
//! and the conformance suite.
#![warn(missing_docs)]

pub mod abi;
pub mod boot;
pub mod config;
pub mod console;
pub mod demo;
pub mod elf;
pub mod error;
pub mod exit;
pub mod machine;
pub mod migrate;
mod migrate_plan;
mod pause;
pub mod runner;
mod shared;
pub mod snapshot;
mod snapshot_plan;
pub mod state;
pub mod vcpu;
pub mod virtio;

pub use config::{MAX_VCPUS, MIN_RAM, MachineConfig};
pub use console::Console;
pub use error::VmmError;
pub use exit::Exit;
pub use machine::{Machine, MemoryHandle};
pub use migrate::{Endpoint, IncomingOptions, IncomingSummary, MigrationPlan, MigrationTaken};
pub use runner::{DeviceReport, LazyReport, RunReport};
pub use snapshot::{RestoreOptions, RestoreSummary, SnapshotPlan, SnapshotTaken, Then};
pub use vcpu::Step;
