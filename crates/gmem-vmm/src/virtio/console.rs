//! virtio-console (device type 3), a single port: what the guest transmits
//! goes to the run's console; what it receives comes from an input given
//! at creation (`--console-in FILE`).

use std::collections::VecDeque;
use std::io::{Read, Write};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::Queue;

use super::{
    F_ACCESS_PLATFORM, F_VERSION_1, QueueFault, RequestFns, Requests, VirtioDevice, serve_queue,
    whole_chain,
};
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

    /// A console restored from a snapshot: `input` is what the guest had
    /// not received yet.
    pub fn restored(out: Console, input: Vec<u8>, transmitted: u64) -> VirtioConsole {
        VirtioConsole {
            out,
            input: input.into(),
            transmitted,
        }
    }

    /// transmitq: what the guest sends goes to the console. virtio-console
    /// has no status to answer with: a buffer the device may not read (or a
    /// chain cut short) leaves the device needing a reset.
    fn transmit(
        &mut self,
        queue: &mut Queue,
        requests: &mut Requests<'_>,
    ) -> Result<bool, QueueFault> {
        serve_queue(
            self,
            queue,
            requests,
            "transmitq",
            RequestFns {
                want: |_| true,
                serve: |this: &mut VirtioConsole, chain, mem| {
                    let whole = whole_chain(&chain)?;
                    let mut reader = chain
                        .reader(mem)
                        .map_err(|e| QueueFault(format!("transmitq: {e}")))?; // Walked again from guest memory: a chain changed since
                    // it was checked is refused, and what is read stays
                    // within the checked bound.
                    if !whole.reads(reader.available_bytes()) {
                        return Err(QueueFault(
                            "transmitq: the chain changed under the device".into(),
                        ));
                    }
                    let mut bytes = Vec::new();
                    reader
                        .read_to_end(&mut bytes)
                        .map_err(|_| QueueFault("transmitq: a buffer could not be read".into()))?;
                    this.transmitted += bytes.len() as u64;
                    this.out.write(&bytes);
                    Ok(())
                },
                answer: |_, (), _| Ok(0),
            },
        )
    }

    /// receiveq: the input given at creation, as far as the guest's buffers
    /// take it.
    fn receive(
        &mut self,
        queue: &mut Queue,
        requests: &mut Requests<'_>,
    ) -> Result<bool, QueueFault> {
        serve_queue(
            self,
            queue,
            requests,
            "receiveq",
            RequestFns {
                want: |this: &VirtioConsole| !this.input.is_empty(),
                serve: |this: &mut VirtioConsole, chain, mem| {
                    let whole = whole_chain(&chain)?;
                    let mut writer = chain
                        .writer(mem)
                        .map_err(|e| QueueFault(format!("receiveq: {e}")))?;
                    if !whole.writes(writer.available_bytes()) {
                        return Err(QueueFault(
                            "receiveq: the chain changed under the device".into(),
                        ));
                    }
                    let n = writer.available_bytes().min(this.input.len());
                    let (a, b) = this.input.as_slices();
                    let (a, b) = (&a[..n.min(a.len())], &b[..n - n.min(a.len())]);
                    writer
                        .write_all(a)
                        .and_then(|()| writer.write_all(b))
                        .map_err(|e| QueueFault(format!("receiveq: {e}")))?;
                    this.input.drain(..n);
                    Ok(n as u32)
                },
                answer: |_, n, _| Ok(n),
            },
        )
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

    fn save(&self) -> Result<crate::state::DeviceSnapshot, String> {
        if self.input.len() > gmem::snapshot::MAX_STATE / 2 {
            return Err(format!(
                "virtio-console has {} bytes of input not yet received: a snapshot carries at most {}",
                self.input.len(),
                gmem::snapshot::MAX_STATE / 2
            ));
        }
        Ok(crate::state::DeviceSnapshot::Console {
            input: self.input.iter().copied().collect(),
            transmitted: self.transmitted,
        })
    }

    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        requests: &mut Requests<'_>,
    ) -> Result<bool, QueueFault> {
        match index {
            TX => self.transmit(queue, requests),
            RX => self.receive(queue, requests),
            _ => Ok(false),
        }
    }
}
