//! virtio devices over the gatekeeper: the virtio-mmio transport (virtio
//! 1.x, MMIO version 2; the register file is this crate's, as the
//! `virtio-device` crate is not published) and the devices behind it, whose
//! queues are rust-vmm `virtio-queue` 0.18 over gmem's vm-memory
//! `DeviceMemory`. A descriptor, ring or buffer in private memory is
//! refused by the gatekeeper: the device neither reads nor writes it,
//! answers with the error status the device type has (or marks the device
//! as needing reset), and records the refusal.

pub mod blk;
pub mod console;
pub mod mmio;

use gmem::DeviceMemory;
use virtio_queue::Queue;

pub use mmio::{MAX_DEVICES, MMIO_BASE, MMIO_STRIDE, MmioTransport};

/// `VIRTIO_F_VERSION_1`: the device speaks virtio 1.x.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_F_ACCESS_PLATFORM`: the device reaches only memory the platform
/// lets it (here: shared pages), as confidential guests negotiate.
pub const F_ACCESS_PLATFORM: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;

/// What a device could not do with a queue: the transport marks the
/// device as needing reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueFault(pub String);

/// A device's refusal to touch guest memory, for the run report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Refusal {
    /// The device.
    pub device: &'static str,
    /// The first GPA refused.
    pub gpa: u64,
    /// The length of the access.
    pub len: u64,
}

/// A virtio device model; the transport owns its queues and registers.
pub trait VirtioDevice: Send {
    /// The virtio device type (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// A short name, for reports.
    fn name(&self) -> &'static str;
    /// The feature bits it offers.
    fn features(&self) -> u64;
    /// The largest size of each queue.
    fn queue_max_sizes(&self) -> &'static [u16];
    /// Reads its configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Handles a notification of queue `index`: takes the chains the driver
    /// made available and answers them; whether any was used.
    ///
    /// # Errors
    /// [`QueueFault`] when the queue itself cannot be used (its rings in
    /// private memory, a chain with no room for the status).
    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &DeviceMemory,
    ) -> Result<bool, QueueFault>;
    /// Forgets what the driver set up (a reset).
    fn reset(&mut self) {}
}
