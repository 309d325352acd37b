//! A virtio driver played from the host, for the device tests: a
//! virtio-blk behind its virtio-mmio registers over a memfd gatekeeper, and
//! the split-queue structures written into shared guest memory.
#![allow(dead_code)] // each test file uses its part

use gmem::{Attribute, BackingKind, GateOptions, Gatekeeper, MemoryOptions, SlotRequest, Vm};
use gmem_vmm::virtio::MmioTransport;
use gmem_vmm::virtio::blk::VirtioBlk;

/// Guest RAM of the rig.
pub const RAM: u64 = 8 << 20;
pub const DESC: u64 = 0x1_0000;
pub const AVAIL: u64 = 0x1_1000;
pub const USED: u64 = 0x1_2000;
pub const HDR: u64 = 0x2_0000;
pub const DATA: u64 = 0x2_1000;
pub const STATUS: u64 = 0x2_2000;

/// Status bits (virtio 1.x §2.1).
pub const ACKNOWLEDGE: u32 = 1;
pub const DRIVER: u32 = 2;
pub const DRIVER_OK: u32 = 4;
pub const FEATURES_OK: u32 = 8;
pub const NEEDS_RESET: u32 = 0x40;

/// Descriptor flags.
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

/// The host playing a virtio-blk driver.
pub struct Driver {
    pub gate: Gatekeeper,
    pub dev: MmioTransport,
    /// The driver's next avail index.
    pub next: u16,
    /// The queue size it set up.
    pub qsize: u16,
    _vm: Vm,
}

impl Driver {
    /// A virtio-blk over `disk`, reset, on 8 MiB of shared memfd RAM.
    pub fn blk(disk: &std::path::Path, readonly: bool) -> Driver {
        Driver::blk_on(BackingKind::Memfd, disk, readonly)
    }

    /// The same on `backing` (8 MiB: four 2 MiB pages on hugetlb-2m).
    pub fn blk_on(backing: BackingKind, disk: &std::path::Path, readonly: bool) -> Driver {
        let vm = Vm::new().unwrap();
        let mem = gmem::create_memory(MemoryOptions::new(backing, RAM), Some(&vm)).unwrap();
        let b = vm.bind(&mem, SlotRequest::new(0, 0, RAM)).unwrap();
        let gate = Gatekeeper::new(
            &vm,
            vec![b],
            GateOptions::new(Attribute::Shared, gmem::Policy::InPlace),
        )
        .unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(disk)
            .unwrap();
        let dev = MmioTransport::new(Box::new(VirtioBlk::new(file, readonly).unwrap()));
        Driver {
            gate,
            dev,
            next: 0,
            qsize: 8,
            _vm: vm,
        }
    }

    /// A 32-bit register write.
    pub fn w(&mut self, off: u64, v: u32) {
        self.dev.write(off, &v.to_le_bytes(), &self.gate);
    }

    /// A 32-bit register read.
    pub fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.r(0x70)
    }

    /// ACKNOWLEDGE, DRIVER, VERSION_1 accepted, FEATURES_OK.
    pub fn negotiate(&mut self) {
        self.w(0x70, 0);
        self.w(0x70, ACKNOWLEDGE | DRIVER);
        self.w(0x24, 1);
        self.w(0x20, 1);
        self.w(0x24, 0);
        self.w(0x20, 0);
        self.w(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    /// Queue 0 of `size` at the rig's rings, made ready (as far as the
    /// device accepts it).
    pub fn queue(&mut self, size: u32) {
        self.w(0x30, 0);
        self.w(0x38, size);
        self.w(0x80, DESC as u32);
        self.w(0x84, 0);
        self.w(0x90, AVAIL as u32);
        self.w(0x94, 0);
        self.w(0xa0, USED as u32);
        self.w(0xa4, 0);
        self.w(0x44, 1);
        self.qsize = size as u16;
        self.next = 0;
    }

    /// The usual bring-up: negotiate, a queue of 8, DRIVER_OK.
    pub fn ready(disk: &std::path::Path, readonly: bool) -> Driver {
        let mut d = Driver::blk(disk, readonly);
        d.start(8);
        d
    }

    /// Negotiate, a queue of `size`, DRIVER_OK.
    pub fn start(&mut self, size: u32) {
        self.negotiate();
        self.queue(size);
        self.w(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn desc(&self, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.gate.write(table + 16 * i, &d).unwrap();
    }

    /// Makes the chain at `head` available, without notifying.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.next % self.qsize.max(1));
        self.gate
            .write(AVAIL + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
        self.next = self.next.wrapping_add(1);
        self.gate
            .write(AVAIL + 2, &self.next.to_le_bytes())
            .unwrap();
    }

    /// Notifies queue 0.
    pub fn notify(&mut self) {
        self.w(0x50, 0);
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        let mut b = [0u8; 2];
        self.gate.read(USED + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    /// A blk header (type, sector) at `at`.
    pub fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.gate.write(at, &hdr).unwrap();
    }

    /// The byte at `gpa`.
    pub fn byte(&self, gpa: u64) -> u8 {
        let mut s = [0u8];
        self.gate.read(gpa, &mut s).unwrap();
        s[0]
    }
}

/// A disk image of `sectors` zeroed sectors, removed on drop.
pub struct Disk(pub std::path::PathBuf);

impl Disk {
    pub fn new(name: &str, sectors: usize) -> Disk {
        let path = std::env::temp_dir().join(format!("gmem-{name}-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; sectors * 512]).unwrap();
        Disk(path)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
