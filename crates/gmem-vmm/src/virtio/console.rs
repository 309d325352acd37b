//! virtio-console (device type 3), a single port: what the guest transmits
//! goes to the run's console; what it receives comes from an input given
//! at creation (`--console-in FILE`).

use std::collections::VecDeque;
use std::io::{Read, Write};

use gmem::DeviceMemory;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{F_ACCESS_PLATFORM, F_VERSION_1, QueueFault, VirtioDevice};
use crate::console::Console;

const RX: usize = 0;
const TX: usize = 1;

/// The console device.
pub struct VirtioConsole {
    out: Console,
    input: VecDeque<u8>,
    /// Bytes transmitted by the guest.
    pub transmitted: u64,
}

impl VirtioConsole {
    /// A console writing to `out` and offering `input` to the guest.
    pub fn new(out: Console, input: Vec<u8>) -> VirtioConsole {
        VirtioConsole {
            out,
            input: input.into(),
            transmitted: 0,
        }
    }

    fn transmit(&mut self, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, QueueFault> {
        let mut used = false;
        let chains: Vec<_> = queue
            .iter(mem)
            .map_err(|e| QueueFault(format!("transmitq: {e}")))?
            .collect();
        for chain in chains {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut reader) => {
                    let mut bytes = Vec::new();
                    if reader.read_to_end(&mut bytes).is_err() {
                        return Err(QueueFault("transmitq: a buffer could not be read".into()));
                    }
                    self.transmitted += bytes.len() as u64;
                    self.out.write(&bytes);
                }
                // virtio-console has no status to answer with: the buffer
                // is returned unread, and the device needs a reset.
                Err(e) => return Err(QueueFault(format!("transmitq: {e}"))),
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|e| QueueFault(format!("transmitq: {e}")))?;
            used = true;
        }
        Ok(used)
    }

    fn receive(&mut self, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, QueueFault> {
        let mut used = false;
        while !self.input.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut writer = chain
                .writer(mem)
                .map_err(|e| QueueFault(format!("receiveq: {e}")))?;
            let n = writer.available_bytes().min(self.input.len());
            let bytes: Vec<u8> = self.input.drain(..n).collect();
            writer
                .write_all(&bytes)
                .map_err(|e| QueueFault(format!("receiveq: {e}")))?;
            queue
                .add_used(mem, head, n as u32)
                .map_err(|e| QueueFault(format!("receiveq: {e}")))?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn name(&self) -> &'static str {
        "virtio-console"
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_ACCESS_PLATFORM
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[64, 64]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &DeviceMemory,
    ) -> Result<bool, QueueFault> {
        match index {
            TX => self.transmit(queue, mem),
            RX => self.receive(queue, mem),
            _ => Ok(false),
        }
    }
}
