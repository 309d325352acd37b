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

use gmem::{DeviceMemory, Gatekeeper};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};

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

/// The most descriptors one request may have: a chain longer than this is
/// a device error, whatever the queue size or indirect table allows (an
/// indirect table may hold 65,535 descriptors, each of which the device
/// would read and pin).
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// The most bytes one request's descriptors may add up to: 64 MiB, what
/// one request's memory may pin. Descriptors may overlap (each naming the
/// same buffer), so the pinned bytes do not bound what a device would copy;
/// this does.
pub const MAX_CHAIN_BYTES: u64 = 64 << 20;

/// Guest memory for one notification's requests: each request gets its own
/// [`DeviceMemory`] ([`memory`](Self::memory)), whose pins are released
/// when the request is done ([`done`](Self::done)), so that a request costs
/// its VMM only what it holds while it is served; refusals are collected
/// for the transport to count.
pub struct Requests<'g> {
    gate: &'g Gatekeeper,
    refusals: Vec<(u64, u64)>,
    refusals_total: u64,
}

impl<'g> Requests<'g> {
    /// Requests over `gate`'s memory.
    pub fn new(gate: &'g Gatekeeper) -> Requests<'g> {
        Requests {
            gate,
            refusals: Vec::new(),
            refusals_total: 0,
        }
    }

    /// Memory for one request (a descriptor chain), with `DeviceMemory`'s
    /// default bounds.
    pub fn memory(&self) -> DeviceMemory {
        DeviceMemory::new(self.gate)
    }

    /// Ends a request: its pins are released, its refusals recorded.
    pub fn done(&mut self, mem: DeviceMemory) {
        self.refusals_total += mem.refusal_count();
        for r in mem.refusals() {
            if self.refusals.len() < MAX_REFUSALS_PER_NOTIFY {
                self.refusals.push(r);
            }
        }
    }

    /// The refusals recorded (the first of them) and how many there were.
    pub fn refusals(&self) -> (&[(u64, u64)], u64) {
        (&self.refusals, self.refusals_total)
    }
}

/// How many refusals one notification records the ranges of.
const MAX_REFUSALS_PER_NOTIFY: usize = 64;

/// The descriptors of `chain`, if it is whole: a chain virtio-queue ended
/// early (a descriptor it could not read, a bad `next`, an indirect table it
/// refused, more than 2^32 bytes, a loop) ends with a descriptor that still
/// says `NEXT`, or with none at all; one longer than
/// [`MAX_CHAIN_DESCRIPTORS`] is refused too. A device must not serve a cut
/// chain as if whole (its last descriptor is not the status byte).
///
/// # Errors
/// [`QueueFault`] naming the head and why.
pub fn whole_chain<M>(chain: &DescriptorChain<M>) -> Result<WholeChain, QueueFault>
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    let mut descs = Vec::new();
    let bytes = whole_chain_into(chain, &mut descs)?;
    Ok(WholeChain {
        readable: bytes.readable,
        writable: bytes.writable,
        descs,
    })
}

/// [`whole_chain`] into `descs` (cleared first), so that a device serving
/// request after request reuses one vector: the chain is walked once, and
/// a device that serves it from `descs` never reads the descriptors again
/// (the guest may change them meanwhile, from another vCPU).
///
/// # Errors
/// As [`whole_chain`]; `descs` then holds the descriptors read.
pub fn whole_chain_into<M>(
    chain: &DescriptorChain<M>,
    descs: &mut Vec<Descriptor>,
) -> Result<ChainBytes, QueueFault>
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    descs.clear();
    let mut bytes = ChainBytes::default();
    for d in chain.clone() {
        if descs.len() == MAX_CHAIN_DESCRIPTORS {
            return Err(QueueFault(format!(
                "the chain at head {head} has more than {MAX_CHAIN_DESCRIPTORS} descriptors"
            )));
        }
        let len = u64::from(d.len());
        if d.is_write_only() {
            bytes.writable += len;
        } else {
            bytes.readable += len;
        }
        if bytes.readable + bytes.writable > MAX_CHAIN_BYTES {
            return Err(QueueFault(format!(
                "the chain at head {head} names more than {MAX_CHAIN_BYTES:#x} bytes"
            )));
        }
        descs.push(d);
    }
    match descs.last() {
        None => Err(QueueFault(format!(
            "the chain at head {head} has no descriptor the device may read"
        ))),
        Some(last) if last.has_next() => Err(QueueFault(format!(
            "the chain at head {head} was cut short after {} descriptors (a descriptor or table it names is not readable shared memory, or it is malformed)",
            descs.len()
        ))),
        Some(_) => Ok(bytes),
    }
}

/// The bytes a whole chain offers the device ([`whole_chain_into`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainBytes {
    /// The bytes of the device-readable descriptors.
    pub readable: u64,
    /// The bytes of the device-writable descriptors.
    pub writable: u64,
}

/// A chain [`whole_chain`] checked: its descriptors, and the bytes they
/// offer the device to read and to write. virtio-queue's `Reader` and
/// `Writer` walk the chain again from guest memory, which the guest may
/// have changed since (from another vCPU): a device compares their sizes
/// with these ([`reads`](Self::reads), [`writes`](Self::writes)), and
/// serves nothing if they differ.
pub struct WholeChain {
    /// The descriptors, in chain order.
    pub descs: Vec<Descriptor>,
    /// The bytes of the device-readable descriptors.
    pub readable: u64,
    /// The bytes of the device-writable descriptors.
    pub writable: u64,
}

impl WholeChain {
    /// Whether a `Reader` of `n` bytes walked the same chain.
    pub fn reads(&self, n: usize) -> bool {
        n as u64 == self.readable
    }

    /// Whether a `Writer` of `n` bytes walked the same chain.
    pub fn writes(&self, n: usize) -> bool {
        n as u64 == self.writable
    }
}

/// One request's part of a device: `serve` reads and writes the chain's
/// buffers (through memory the chain borrows) and says what to answer;
/// `answer` completes it once the buffers' pins are released (a status byte,
/// say) and returns the length for the used ring.
pub struct RequestFns<S, T> {
    /// Whether to take another chain (a receive queue with nothing to give
    /// stops).
    pub want: fn(&S) -> bool,
    /// Serves one chain.
    pub serve: fn(&mut S, DescriptorChain<&DeviceMemory>, &DeviceMemory) -> Result<T, QueueFault>,
    /// Completes it, with the chain's pins released.
    pub answer: fn(&mut S, T, &mut DeviceMemory) -> Result<u32, QueueFault>,
}

/// Serves the chains of `queue` one at a time, each with its own memory
/// from `requests`, released when it is done: at most the chains the avail
/// index showed when the notification came (a queue's worth; more is the
/// driver's error), so that a guest adding chains as fast as the device
/// takes them cannot keep its VMM in one notification forever. Whether any
/// was used.
///
/// # Errors
/// [`QueueFault`] (`what` names the queue) for rings the device cannot
/// use, and whatever `fns` return.
pub fn serve_queue<S, T>(
    state: &mut S,
    queue: &mut Queue,
    requests: &mut Requests<'_>,
    what: &str,
    fns: RequestFns<S, T>,
) -> Result<bool, QueueFault> {
    use virtio_queue::{QueueOwnedT, QueueT};
    // The avail index is read with the first request's memory, which the
    // first chain then uses too: the avail ring's page is pinned once for
    // both, not once for the index and again for the chain.
    let first = requests.memory();
    let pending = queue
        .avail_idx(&first, std::sync::atomic::Ordering::Acquire)
        .map_err(|e| QueueFault(format!("{what}: {e}")))
        .and_then(|avail| {
            let pending = avail.0.wrapping_sub(queue.next_avail());
            if pending > queue.size() {
                return Err(QueueFault(format!(
                    "{what}: the avail index is {pending} chains ahead of the device, more than the queue's {}",
                    queue.size()
                )));
            }
            Ok(pending)
        });
    let pending = match pending {
        Ok(p) => p,
        Err(e) => {
            requests.done(first);
            return Err(e);
        }
    };
    let mut first = Some(first);
    let mut used = false;
    for _ in 0..pending {
        if !(fns.want)(state) {
            break;
        }
        let mut mem = first.take().unwrap_or_else(|| requests.memory());
        let served = match queue.iter(&mem) {
            Err(e) => Err(QueueFault(format!("{what}: {e}"))),
            Ok(mut avail) => match avail.next() {
                None => Ok(None),
                Some(chain) => {
                    let head = chain.head_index();
                    (fns.serve)(state, chain, &mem).map(|t| Some((head, t)))
                }
            },
        };
        let (head, served) = match served {
            Ok(Some(x)) => x,
            Ok(None) => {
                requests.done(mem);
                break;
            }
            Err(e) => {
                requests.done(mem);
                return Err(e);
            }
        };
        mem.release();
        let answered = (fns.answer)(state, served, &mut mem).and_then(|len| {
            queue
                .add_used(&mem, head, len)
                .map_err(|e| QueueFault(format!("{what}: {e}")))
        });
        requests.done(mem);
        answered?;
        used = true;
    }
    if let Some(mem) = first {
        requests.done(mem);
    }
    Ok(used)
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
    /// made available and answers them, each with its own memory from
    /// `requests`; whether any was used.
    ///
    /// # Errors
    /// [`QueueFault`] when the queue itself cannot be used (its rings in
    /// private memory, a chain cut short or with no room for the status).
    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        requests: &mut Requests<'_>,
    ) -> Result<bool, QueueFault>;
    /// Forgets what the driver set up (a reset).
    fn reset(&mut self) {}
    /// The model's state for a snapshot; an error names why this device
    /// cannot be saved (the default: none can).
    ///
    /// # Errors
    /// Why not, in words.
    fn save(&self) -> Result<crate::state::DeviceSnapshot, String> {
        Err(format!("{} cannot be saved in a snapshot", self.name()))
    }
}
