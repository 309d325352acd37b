//! The virtio-mmio register file (virtio 1.x, §4.2.2, MMIO version 2) of
//! one device: feature negotiation, queue setup, notifications, status and
//! reset. Registers are 32-bit; configuration space starts at `0x100`.

use gmem::{DeviceMemory, Gatekeeper};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};

use super::{F_VERSION_1, Refusal, Requests, VirtioDevice};

/// Where the device windows start: outside RAM (machines with devices keep
/// their RAM below it), mapped uncached by the boot page tables.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// The size of each device's window.
pub const MMIO_STRIDE: u64 = 0x1000;
/// The most devices a machine has.
pub const MAX_DEVICES: usize = 16;
/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// "GMEM", the vendor id.
pub const VENDOR: u32 = 0x4d45_4d47;
/// The most refusals one device records (later ones are counted only).
const MAX_REFUSALS: usize = 64;

/// Queue settings a driver wrote that the spec forbids, by bit: the queue
/// may not become ready while any is set (a later valid write of the same
/// setting clears it).
mod bad {
    pub const SIZE: u8 = 1;
    pub const DESC: u8 = 2;
    pub const AVAIL: u8 = 4;
    pub const USED: u8 = 8;
}

/// One device behind its registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    /// Per queue: which of its settings were written invalid ([`bad`]).
    bad: Vec<u8>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    refusals: Vec<Refusal>,
    refusals_total: u64,
}

impl MmioTransport {
    /// A transport for `device`, reset.
    pub fn new(device: Box<dyn VirtioDevice>) -> MmioTransport {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).unwrap_or_else(|_| Queue::new(1).expect("size 1 is valid")))
            .collect();
        MmioTransport {
            bad: vec![0; device.queue_max_sizes().len()],
            device,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            refusals: Vec::new(),
            refusals_total: 0,
        }
    }

    /// The device's name.
    pub fn name(&self) -> &'static str {
        self.device.name()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The refusals recorded, and how many there were in all.
    pub fn refusals(&self) -> (&[Refusal], u64) {
        (&self.refusals, self.refusals_total)
    }

    fn queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn queue_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A read of `data.len()` bytes at `offset` in the window. Registers
    /// are 32-bit: a read of any other width (1, 2, 8 bytes) reads zeroes,
    /// as the guest ABI says.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let value = {
            match offset as u32 {
                VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
                VIRTIO_MMIO_VERSION => 2,
                VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
                VIRTIO_MMIO_VENDOR_ID => VENDOR,
                VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                    0 => self.device.features() as u32,
                    1 => (self.device.features() >> 32) as u32,
                    _ => 0,
                },
                VIRTIO_MMIO_QUEUE_NUM_MAX => self.queue().map_or(0, |q| u32::from(q.max_size())),
                VIRTIO_MMIO_QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready())),
                VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
                VIRTIO_MMIO_STATUS => self.status,
                VIRTIO_MMIO_CONFIG_GENERATION => 0,
                _ => 0,
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A write of `data` at `offset` in the window; notifications run the
    /// device over `gate`'s memory.
    pub fn write(&mut self, offset: u64, data: &[u8], gate: &Gatekeeper) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return; // registers take 32-bit writes only; config is read-only
        };
        let value = u32::from_le_bytes(bytes);
        // A queue is set up while it is not ready (virtio 1.x §4.2.3.2); the
        // driver disables it again by writing 0 to QueueReady.
        let setting_up = self.queue().is_some_and(|q| !q.ready());
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM if setting_up => {
                // virtio 1.x §4.2.2.2: a power of two, 1..=QueueNumMax; the
                // register is 32-bit, so 0x10008 is no size of 8.
                let ok = self.queue_mut().is_some_and(|q| {
                    u16::try_from(value).is_ok_and(|size| q.try_set_size(size).is_ok())
                });
                self.mark(bad::SIZE, ok);
            }
            VIRTIO_MMIO_QUEUE_READY => self.set_queue_ready(value, gate),
            VIRTIO_MMIO_QUEUE_DESC_LOW if setting_up => self.set_address(bad::DESC, value, false),
            VIRTIO_MMIO_QUEUE_DESC_HIGH if setting_up => self.set_address(bad::DESC, value, true),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if setting_up => self.set_address(bad::AVAIL, value, false),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if setting_up => self.set_address(bad::AVAIL, value, true),
            VIRTIO_MMIO_QUEUE_USED_LOW if setting_up => self.set_address(bad::USED, value, false),
            VIRTIO_MMIO_QUEUE_USED_HIGH if setting_up => self.set_address(bad::USED, value, true),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value as usize, gate),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.set_status(value),
            _ => {}
        }
    }

    /// Records whether the selected queue's setting `bit` was written valid.
    fn mark(&mut self, bit: u8, ok: bool) {
        if let Some(b) = self.bad.get_mut(self.queue_sel as usize) {
            if ok {
                *b &= !bit;
            } else {
                *b |= bit;
            }
        }
    }

    /// Writes half (`high` or low) of the selected queue's ring address
    /// `which` ([`bad::DESC`], [`bad::AVAIL`], [`bad::USED`]), checked by
    /// virtio-queue's alignment rules (`try_set_*`, never the setters that
    /// only log a bad value and keep the old one).
    fn set_address(&mut self, which: u8, value: u32, high: bool) {
        let Some(q) = self.queue_mut() else {
            return;
        };
        let old = match which {
            bad::DESC => q.desc_table(),
            bad::AVAIL => q.avail_ring(),
            _ => q.used_ring(),
        };
        let addr = if high {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        };
        let addr = vm_memory::GuestAddress(addr);
        let ok = match which {
            bad::DESC => q.try_set_desc_table_address(addr),
            bad::AVAIL => q.try_set_avail_ring_address(addr),
            _ => q.try_set_used_ring_address(addr),
        }
        .is_ok();
        self.mark(which, ok);
    }

    /// `QueueReady`: 1 makes the selected queue ready only if every setting
    /// was valid and its rings lie in shared guest memory (virtio-queue's
    /// `is_valid`); otherwise the queue stays not ready and the device needs
    /// a reset (the guest ABI: a ring in private memory is a device error),
    /// and a ring the device was refused counts as a refusal. 0 disables it.
    fn set_queue_ready(&mut self, value: u32, gate: &Gatekeeper) {
        let sel = self.queue_sel as usize;
        let settings_ok = self.bad.get(sel).is_some_and(|b| *b == 0);
        let Some(q) = self.queues.get_mut(sel) else {
            return;
        };
        if value != 1 {
            q.set_ready(false);
            return;
        }
        q.set_ready(true);
        let mem = DeviceMemory::new(gate);
        if settings_ok && q.is_valid(&mem) {
            return;
        }
        q.set_ready(false);
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
        self.record(&mem.refusals(), mem.refusal_count());
    }

    /// Counts `total` refusals, of which `recorded` are the first ranges.
    fn record(&mut self, recorded: &[(u64, u64)], total: u64) {
        self.refusals_total += total;
        for &(gpa, len) in recorded {
            if self.refusals.len() < MAX_REFUSALS {
                self.refusals.push(Refusal {
                    device: self.device.name(),
                    gpa,
                    len,
                });
            }
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
        {
            // The driver may accept only what the device offers, and must
            // speak virtio 1.x; otherwise FEATURES_OK does not stick.
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        // DRIVER_OK only after FEATURES_OK (virtio 1.x §3.1.1): a driver
        // that skips the negotiation gets a device that needs a reset, and
        // no request is served.
        if value & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
            && value & VIRTIO_CONFIG_S_FEATURES_OK == 0
        {
            value &= !VIRTIO_CONFIG_S_DRIVER_OK;
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        }
        // A driver never clears a status bit but by a reset (virtio 1.x
        // §2.1.1): bits once set stay, so FEATURES_OK cannot be dropped under
        // a live device (which would make the features writable again).
        // NEEDS_RESET is the device's to set.
        self.status = (value | self.status) & !VIRTIO_CONFIG_S_NEEDS_RESET
            | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
    }

    /// The registers' state and the model's, for a snapshot (between
    /// requests: a transport holds no pin then).
    ///
    /// # Errors
    /// The model's refusal ([`VirtioDevice::save`]).
    pub fn save(&self) -> Result<crate::state::DeviceRecord, String> {
        Ok(crate::state::DeviceRecord {
            device: self.device.save()?,
            transport: crate::state::TransportSnapshot {
                status: self.status,
                driver_features: self.driver_features,
                device_features_sel: self.device_features_sel,
                driver_features_sel: self.driver_features_sel,
                queue_sel: self.queue_sel,
                interrupt_status: self.interrupt_status,
                config_generation: 0,
                refusals_total: self.refusals_total,
                queues: self
                    .bad
                    .iter()
                    .copied()
                    .zip(self.queues.iter().map(Queue::state))
                    .collect(),
            },
        })
    }

    /// A transport for `device` with the registers of `saved`, checked as
    /// the driver's writes would have been: one queue per queue of the
    /// device, each of the device's maximum size, a size virtio-queue
    /// accepts (`try_from` uses `try_set_size` and the `try_set_*`
    /// addresses), and a ready queue's rings valid in shared memory now.
    ///
    /// # Errors
    /// What does not hold, naming the queue.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        saved: &crate::state::TransportSnapshot,
        gate: &Gatekeeper,
    ) -> Result<MmioTransport, String> {
        let maxes = device.queue_max_sizes();
        if saved.queues.len() != maxes.len() {
            return Err(format!(
                "{} has {} queues; the snapshot's had {}",
                device.name(),
                maxes.len(),
                saved.queues.len()
            ));
        }
        if saved.config_generation != 0 {
            return Err(format!(
                "config generation {}: this VMM's devices never change their configuration",
                saved.config_generation
            ));
        }
        let mut queues = Vec::with_capacity(maxes.len());
        let mut bad = Vec::with_capacity(maxes.len());
        let mem = DeviceMemory::new(gate);
        for (i, ((b, state), &max)) in saved.queues.iter().zip(maxes).enumerate() {
            if state.max_size != max {
                return Err(format!(
                    "queue {i}: the snapshot's maximum size {} is not the device's {max}",
                    state.max_size
                ));
            }
            let q = Queue::try_from(*state).map_err(|e| format!("queue {i}: {e}"))?;
            if q.ready() && (*b != 0 || !q.is_valid(&mem)) {
                return Err(format!(
                    "queue {i} is ready, and its settings or rings are not valid in shared memory"
                ));
            }
            queues.push(q);
            bad.push(*b & (bad::SIZE | bad::DESC | bad::AVAIL | bad::USED));
        }
        Ok(MmioTransport {
            device,
            queues,
            bad,
            status: saved.status,
            device_features_sel: saved.device_features_sel,
            driver_features_sel: saved.driver_features_sel,
            driver_features: saved.driver_features,
            queue_sel: saved.queue_sel,
            interrupt_status: saved.interrupt_status,
            refusals: Vec::new(),
            refusals_total: saved.refusals_total,
        })
    }

    /// Back to the state after power-on (status 0).
    pub fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.bad.fill(0);
        self.device.reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
    }

    fn notify(&mut self, index: usize, gate: &Gatekeeper) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
            || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0
        {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        // Each request gets its own memory, whose pins go when it is done.
        let mut requests = Requests::new(gate);
        let result = self.device.process(index, queue, &mut requests);
        let (recorded, total) = requests.refusals();
        self.record(recorded, total);
        match result {
            Ok(true) => self.interrupt_status |= VIRTIO_MMIO_INT_VRING,
            Ok(false) => {}
            Err(_) => {
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{F_ACCESS_PLATFORM, QueueFault};

    struct Null;

    impl VirtioDevice for Null {
        fn device_type(&self) -> u32 {
            42
        }
        fn name(&self) -> &'static str {
            "null"
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | F_ACCESS_PLATFORM
        }
        fn queue_max_sizes(&self) -> &'static [u16] {
            &[16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn process(
            &mut self,
            _: usize,
            _: &mut Queue,
            _: &mut Requests<'_>,
        ) -> Result<bool, QueueFault> {
            Ok(false)
        }
    }

    fn r(t: &MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn gate() -> Option<Gatekeeper> {
        let vm = gmem::Vm::new().ok()?;
        let mem = gmem::create_memory(
            gmem::MemoryOptions::new(gmem::BackingKind::Memfd, 2 << 20),
            Some(&vm),
        )
        .ok()?;
        let b = vm.bind(&mem, gmem::SlotRequest::new(0, 0, 2 << 20)).ok()?;
        Gatekeeper::new(&vm, vec![b], gmem::GateOptions::default()).ok()
    }

    fn w(t: &mut MmioTransport, off: u32, v: u32, g: &Gatekeeper) {
        t.write(u64::from(off), &v.to_le_bytes(), g);
    }

    #[test]
    fn identity_registers() {
        let t = MmioTransport::new(Box::new(Null));
        assert_eq!(r(&t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(r(&t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&t, VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(r(&t, VIRTIO_MMIO_VENDOR_ID), VENDOR);
        assert_eq!(r(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        let mut cfg = [0u8; 2];
        t.read(0x104, &mut cfg);
        assert_eq!(cfg, [4, 4], "config space from 0x100");
        // A register read of the wrong width reads zeroes.
        let mut b = [0xffu8; 1];
        t.read(0, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn feature_negotiation_and_reset() {
        let Some(g) = gate() else {
            println!("skipped: no /dev/kvm");
            return;
        };
        let mut t = MmioTransport::new(Box::new(Null));
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1, &g);
        assert_eq!(
            r(&t, VIRTIO_MMIO_DEVICE_FEATURES),
            0b11,
            "VERSION_1 | ACCESS_PLATFORM"
        );
        // Accepting a feature not offered: FEATURES_OK does not stick.
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0, &g);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5, &g);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            1 | 2 | VIRTIO_CONFIG_S_FEATURES_OK,
            &g,
        );
        assert_eq!(r(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        // Without VERSION_1 neither.
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0, &g);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            1 | 2 | VIRTIO_CONFIG_S_FEATURES_OK,
            &g,
        );
        assert_eq!(r(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        // VERSION_1 and ACCESS_PLATFORM: accepted.
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1, &g);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0b11, &g);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            1 | 2 | VIRTIO_CONFIG_S_FEATURES_OK,
            &g,
        );
        assert_ne!(r(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        // Queue setup, then reset clears it.
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0, &g);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8, &g);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000, &g);
        w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000, &g);
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000, &g);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1, &g);
        assert_eq!(r(&t, VIRTIO_MMIO_QUEUE_READY), 1);
        // A queue index the device lacks reads as absent.
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7, &g);
        assert_eq!(r(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        w(&mut t, VIRTIO_MMIO_STATUS, 0, &g);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0, &g);
        assert_eq!(
            (r(&t, VIRTIO_MMIO_STATUS), r(&t, VIRTIO_MMIO_QUEUE_READY)),
            (0, 0)
        );
    }

    #[test]
    fn a_saved_transport_is_checked_when_restored() {
        let Some(g) = gate() else {
            println!("skipped: no /dev/kvm");
            return;
        };
        let mut t = MmioTransport::new(Box::new(Null));
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0, &g);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8, &g);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000, &g);
        w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000, &g);
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000, &g);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1, &g);
        let saved = t.save().unwrap_err();
        assert!(saved.contains("cannot be saved"), "{saved}");
        // The registers alone, as a snapshot carries them.
        let regs = crate::state::TransportSnapshot {
            status: 0xf,
            queues: t
                .bad
                .iter()
                .copied()
                .zip(t.queues.iter().map(Queue::state))
                .collect(),
            ..Default::default()
        };
        let back = MmioTransport::restore(Box::new(Null), &regs, &g).unwrap();
        assert_eq!(r(&back, VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(r(&back, VIRTIO_MMIO_STATUS), 0xf);
        // Another maximum size, another queue count, a size virtio-queue
        // refuses, a ready queue whose rings are private: each refused.
        let mut bad = regs.clone();
        bad.queues[0].1.max_size = 32;
        assert!(MmioTransport::restore(Box::new(Null), &bad, &g).is_err());
        let mut bad = regs.clone();
        bad.queues.push(bad.queues[0]);
        assert!(MmioTransport::restore(Box::new(Null), &bad, &g).is_err());
        let mut bad = regs.clone();
        bad.queues[0].1.size = 3;
        assert!(MmioTransport::restore(Box::new(Null), &bad, &g).is_err());
        let mut bad = regs.clone();
        bad.config_generation = 1;
        assert!(MmioTransport::restore(Box::new(Null), &bad, &g).is_err());
        g.convert(0x1000, 0x1000, gmem::Attribute::Private).unwrap();
        match MmioTransport::restore(Box::new(Null), &regs, &g) {
            Err(e) => assert!(e.contains("not valid in shared memory"), "{e}"),
            Ok(_) => panic!("a ready queue with a private ring was restored"),
        }
    }
}
