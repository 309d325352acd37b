//! What every vCPU shares, and the guest ABI's requests that reach guest
//! memory: conversions, the shared-buffer console and discard, all through
//! the gatekeeper.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use gmem::{Attribute, Gatekeeper, Policy, RestrictedMemory, Vm};

use crate::abi::{self, AbiKey, DoorbellArgs, Request};
use crate::config::MachineConfig;
use crate::console::{Console, MAX_CONSOLE_BYTES};
use crate::migrate_plan::{MigrationPlan, MigrationTaken};
use crate::pause::Rendezvous;
use crate::snapshot_plan::{SnapshotPlan, SnapshotTaken};
use crate::virtio::{MMIO_BASE, MMIO_STRIDE, MmioTransport};

/// The most notes on refused snapshots a run keeps (then a count).
pub(crate) const MAX_NOTES: usize = 32;

/// What every vCPU shares: the VM, RAM, and its gatekeeper (which owns the
/// binding).
pub(crate) struct Shared {
    // Field order is drop order: a lazy restore under way (its threads
    // fill through the gatekeeper), the gatekeeper (its view, then the
    // slot), then the file, then the VM.
    /// The lazy restore this machine came from, while it fills.
    pub(crate) lazy: Mutex<Option<gmem::snapshot::LazyRestore>>,
    pub(crate) gate: Gatekeeper,
    pub(crate) memory: Arc<dyn RestrictedMemory>,
    /// Whether `vmcall` with `KVM_HC_MAP_GPA_RANGE` exits to the VMM.
    pub(crate) vmcall_taken: bool,
    /// The virtio-mmio devices, by window (`MMIO_BASE + i × MMIO_STRIDE`).
    pub(crate) devices: Mutex<Vec<MmioTransport>>,
    pub(crate) vm: Vm,
    pub(crate) config: MachineConfig,
    /// Where snapshots go, if the run takes them.
    pub(crate) plan: Mutex<Option<SnapshotPlan>>,
    /// The snapshots taken, and what the run noted about refused ones.
    pub(crate) taken: Mutex<(Vec<SnapshotTaken>, Vec<String>)>,
    /// Notes past [`MAX_NOTES`], counted only.
    pub(crate) notes_dropped: std::sync::atomic::AtomicU64,
    /// A snapshot the host asked for (`SIGUSR1`), for the next exit.
    pub(crate) snapshot_now: AtomicBool,
    /// The run ended after a snapshot (`Then::Stop`).
    pub(crate) stopped: AtomicBool,
    /// The machine was restored from a snapshot.
    pub(crate) restored: AtomicBool,
    /// Where the run migrates when its signal comes, if it does.
    pub(crate) migration: Mutex<Option<MigrationPlan>>,
    /// A migration thread is running.
    pub(crate) migrating: AtomicBool,
    /// Where every vCPU pauses for a migration's stop-and-copy.
    pub(crate) pause: Rendezvous,
    /// The runner is to kick the vCPUs.
    pub(crate) kick_now: AtomicBool,
    /// The migration the run completed, and notes on failed ones.
    pub(crate) migrated: Mutex<(Option<MigrationTaken>, Vec<String>)>,
    /// A post-copy migration failed after the destination took over: the
    /// guest is lost, and the run ends with this error.
    pub(crate) migration_lost: Mutex<Option<String>>,
    /// Every vCPU has ended: a migration under way gives up.
    pub(crate) run_over: AtomicBool,
    /// The migration thread, joined when the run ends.
    pub(crate) migration_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Shared {
    /// What `Machine::new` and `Machine::restore` share: no devices, no
    /// plan.
    pub(crate) fn new(
        gate: Gatekeeper,
        memory: Arc<dyn RestrictedMemory>,
        vmcall_taken: bool,
        vm: Vm,
        config: MachineConfig,
    ) -> Shared {
        Shared {
            lazy: Mutex::new(None),
            gate,
            memory,
            vmcall_taken,
            devices: Mutex::default(),
            vm,
            config,
            plan: Mutex::new(None),
            taken: Mutex::default(),
            notes_dropped: std::sync::atomic::AtomicU64::new(0),
            snapshot_now: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            restored: AtomicBool::new(false),
            migration: Mutex::new(None),
            migrating: AtomicBool::new(false),
            pause: Rendezvous::new(),
            kick_now: AtomicBool::new(false),
            migrated: Mutex::default(),
            migration_lost: Mutex::new(None),
            run_over: AtomicBool::new(false),
            migration_thread: Mutex::new(None),
        }
    }

    /// The migration plan, if the run has one.
    pub(crate) fn migration_plan(&self) -> Option<MigrationPlan> {
        self.migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn lock_migrated(&self) -> MutexGuard<'_, (Option<MigrationTaken>, Vec<String>)> {
        self.migrated.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock_lazy(&self) -> MutexGuard<'_, Option<gmem::snapshot::LazyRestore>> {
        self.lazy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The snapshot plan, if the run has one.
    pub(crate) fn plan(&self) -> Option<SnapshotPlan> {
        self.plan.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn record_snapshot(&self, taken: SnapshotTaken) {
        self.taken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .push(taken);
    }

    /// Notes a refused snapshot for the report. Bounded: a guest can ask
    /// without end, so past [`MAX_NOTES`] only the count grows (in the
    /// last note).
    pub(crate) fn note(&self, note: String) {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let notes = &mut taken.1;
        if notes.len() < MAX_NOTES {
            notes.push(note);
            return;
        }
        let more = self.notes_dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if notes.len() == MAX_NOTES {
            notes.push(String::new());
        }
        if let Some(last) = notes.last_mut() {
            *last = format!("… and {more} more refused snapshot(s), not listed");
        }
    }

    pub(crate) fn stop_for_snapshot(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    pub(crate) fn lock_devices(&self) -> MutexGuard<'_, Vec<MmioTransport>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device whose window holds `gpa`, and the offset in it.
    fn device_at(&self, gpa: u64) -> Option<(usize, u64)> {
        let off = gpa.checked_sub(MMIO_BASE)?;
        let index = usize::try_from(off / MMIO_STRIDE).ok()?;
        (index < self.lock_devices().len()).then_some((index, off % MMIO_STRIDE))
    }

    /// An MMIO read: a device's register or configuration space.
    pub(crate) fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> bool {
        let Some((i, off)) = self.device_at(gpa) else {
            return false;
        };
        self.lock_devices()[i].read(off, data);
        true
    }

    /// An MMIO write: a device's register (a notification runs it).
    pub(crate) fn mmio_write(&self, gpa: u64, data: &[u8]) -> bool {
        let Some((i, off)) = self.device_at(gpa) else {
            return false;
        };
        self.lock_devices()[i].write(off, data, &self.gate);
        true
    }

    /// The value of `key` on the ABI port (all-ones for an unknown key).
    pub(crate) fn abi_value(&self, key: u32) -> u32 {
        let c = &self.config;
        match AbiKey::from_raw(key) {
            Some(AbiKey::Version) => abi::ABI_VERSION,
            Some(AbiKey::Policy) => u32::from(c.policy == Policy::Discard),
            Some(AbiKey::Initial) => u32::from(c.initial == Attribute::Shared),
            Some(AbiKey::VmcallTaken) => u32::from(self.vmcall_taken),
            Some(AbiKey::Devices) => self.lock_devices().len() as u32,
            Some(AbiKey::MmioBase) => MMIO_BASE as u32,
            Some(AbiKey::RamLow) => c.mem_size as u32,
            Some(AbiKey::RamHigh) => (c.mem_size >> 32) as u32,
            Some(AbiKey::Snapshots) => u32::from(self.plan().is_some()),
            None => u32::MAX,
        }
    }

    /// `KVM_HC_MAP_GPA_RANGE` and any other hypercall: 0 or a negative errno.
    pub(crate) fn hypercall(&self, args: DoorbellArgs) -> i64 {
        match abi::decode_hypercall(args, self.config.mem_size) {
            Err(errno) => errno,
            Ok(Request::MapGpaRange { range, to }) => {
                match self.gate.convert(range.start, range.end - range.start, to) {
                    Ok(_) => 0,
                    Err(e) => -i64::from(e.errno()),
                }
            }
        }
    }

    /// The shared-buffer console: prints the bytes if all are shared RAM.
    pub(crate) fn print_shared(&self, gpa: u64, len: u64, console: &Console) -> i64 {
        if len > MAX_CONSOLE_BYTES {
            return -abi::EINVAL;
        }
        if let Err(errno) = abi::guest_bytes(gpa, len, self.config.mem_size) {
            return errno;
        }
        let mut buf = vec![0u8; len as usize];
        match self.gate.read(gpa, &mut buf) {
            Ok(()) => {
                console.write(&buf);
                0
            }
            Err(_) => -abi::EFAULT,
        }
    }

    /// Free page reporting: punch the pages.
    pub(crate) fn discard(&self, gpa: u64, pages: u64) -> i64 {
        match abi::guest_pages(gpa, pages, self.config.mem_size) {
            Err(errno) => errno,
            Ok(range) => match self.gate.discard(range.start, range.end - range.start) {
                Ok(_) => 0,
                Err(e) => -i64::from(e.errno()),
            },
        }
    }
}
