//! Snapshots of a whole machine: guest memory through the gatekeeper
//! (`gmem::snapshot`), and beside it the VMM's state ([`crate::state`]):
//! each vCPU's registers, the devices, the configuration. Taking one
//! ([`Machine::snapshot`], or the guest's request on
//! [`PORT_SNAPSHOT`](crate::abi::PORT_SNAPSHOT) during a run) and restoring
//! one into a new machine ([`Machine::restore`]), eagerly or lazily.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gmem::BackingKind;
use gmem::snapshot::RestoreError;
use gmem::snapshot::{LazyOptions, PrefetchOrder, PrivatePages, SealKey, SnapshotReport};
use kvm_bindings::{Msrs, kvm_msr_entry, kvm_regs};
use kvm_ioctls::Cap;

use crate::config::MachineConfig;
use crate::console::Console;
use crate::error::VmmError;
use crate::machine::Machine;
use crate::pause::{AllPaused, Verdict};
use crate::shared::Shared;
pub use crate::snapshot_plan::{SnapshotPlan, SnapshotTaken, Then};
use crate::state::{DeviceSnapshot, VcpuSnapshot, VmmState};
use crate::vcpu::VcpuState;
use crate::virtio::MmioTransport;
use crate::virtio::blk::VirtioBlk;
use crate::virtio::console::VirtioConsole;

/// The MSRs a snapshot saves, where this host's KVM lists them.
const MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0080, // EFER
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// [`MSRS`] filtered by `KVM_GET_MSR_INDEX_LIST`: asked once per process
/// (the host's list does not change), not once per vCPU per pause.
fn msr_indices(vcpu: usize) -> Result<Vec<u32>, VmmError> {
    static LIST: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    if let Some(list) = LIST.get() {
        return Ok(list.clone());
    }
    let list = ask_msr_indices(vcpu)?;
    Ok(LIST.get_or_init(|| list).clone())
}

fn ask_msr_indices(vcpu: usize) -> Result<Vec<u32>, VmmError> {
    let err = |op| move |source| VmmError::Vcpu { op, vcpu, source };
    let kvm = kvm_ioctls::Kvm::new().map_err(err("open /dev/kvm"))?;
    let list = kvm
        .get_msr_index_list()
        .map_err(err("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(MSRS
        .iter()
        .copied()
        .filter(|m| list.as_slice().contains(m))
        .collect())
}

impl VcpuState {
    /// Lets KVM finish the exit's instruction (an `in`'s value, a PIO or
    /// MMIO completion): `KVM_RUN` with `immediate_exit` completes it and
    /// returns `EINTR` before entering the guest (the kernel's
    /// documentation of `immediate_exit`). Only then is the vCPU's state
    /// the guest's.
    pub(crate) fn complete_io(&mut self) -> Result<(), VmmError> {
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Err(libc::EINTR) | Ok(()) => Ok(()),
            Err(errno) => Err(VmmError::Vcpu {
                op: "KVM_RUN (immediate_exit)",
                vcpu: self.index,
                source: kvm_ioctls::Error::new(errno),
            }),
        }
    }

    /// Sets rax (a port's answer) through `KVM_SET_REGS`.
    pub(crate) fn set_rax(&mut self, value: i64) -> Result<(), VmmError> {
        let mut regs = self.regs()?;
        regs.rax = value as u64;
        self.set_regs(&regs)
    }

    pub(crate) fn set_regs(&self, regs: &kvm_regs) -> Result<(), VmmError> {
        self.fd.set_regs(regs).map_err(|source| VmmError::Vcpu {
            op: "KVM_SET_REGS",
            vcpu: self.index,
            source,
        })
    }

    /// The vCPU's state, as [`complete_io`](Self::complete_io) left it.
    pub(crate) fn capture(&self, vm: &gmem::Vm) -> Result<VcpuSnapshot, VmmError> {
        let vcpu = self.index;
        let err = |op| move |source| VmmError::Vcpu { op, vcpu, source };
        let fd = &self.fd;
        let has = |c| vm.fd().check_extension(c);
        let wanted = msr_indices(vcpu)?;
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VmmError::Vcpu {
            op: "KVM_GET_MSRS",
            vcpu,
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
        Ok(VcpuSnapshot {
            regs: fd.get_regs().map_err(err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(err("KVM_GET_SREGS"))?,
            fpu: fd.get_fpu().map_err(err("KVM_GET_FPU"))?,
            msrs: msrs.as_slice()[..read]
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
            xsave: if has(Cap::Xsave) {
                Some(
                    zerocopy::IntoBytes::as_bytes(&fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?)
                        .to_vec(),
                )
            } else {
                None
            },
            xcrs: if has(Cap::Xcrs) {
                Some(fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?)
            } else {
                None
            },
            events: if has(Cap::VcpuEvents) {
                Some(fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?)
            } else {
                None
            },
            mp_state: if has(Cap::MpState) {
                Some(fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?)
            } else {
                None
            },
            // This VMM's machines have no in-kernel irqchip, hence no LAPIC.
            lapic: None,
            abi_key: self.abi_key,
            serial: self.serial.clone(),
        })
    }

    /// Sets a saved state on a new vCPU: special registers before the
    /// general ones (the mode they run in), MSRs, FPU and extended state,
    /// pending events, then the run state.
    fn apply(&mut self, s: &VcpuSnapshot) -> Result<(), VmmError> {
        let vcpu = self.index;
        let err = |op| move |source| VmmError::Vcpu { op, vcpu, source };
        let fd = &self.fd;
        fd.set_sregs(&s.sregs).map_err(err("KVM_SET_SREGS"))?;
        fd.set_regs(&s.regs).map_err(err("KVM_SET_REGS"))?;
        if !s.msrs.is_empty() {
            let entries: Vec<kvm_msr_entry> = s
                .msrs
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| VmmError::Vcpu {
                op: "KVM_SET_MSRS",
                vcpu,
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            let set = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
            if set != entries.len() {
                return Err(VmmError::RestoreVcpu {
                    vcpu,
                    what: format!(
                        "KVM_SET_MSRS set {set} of {} MSRs: MSR {:#x} was refused",
                        entries.len(),
                        entries[set].index
                    ),
                });
            }
        }
        fd.set_fpu(&s.fpu).map_err(err("KVM_SET_FPU"))?;
        if let Some(x) = &s.xcrs {
            fd.set_xcrs(x).map_err(err("KVM_SET_XCRS"))?;
        }
        if let Some(bytes) = &s.xsave {
            let x = <kvm_bindings::kvm_xsave as zerocopy::FromBytes>::read_from_bytes(bytes)
                .map_err(|_| VmmError::RestoreVcpu {
                    vcpu,
                    what: format!("kvm_xsave of {} bytes", bytes.len()),
                })?;
            // SAFETY: `x` is a whole `kvm_xsave` (4 KiB, its size checked when
            // the state was decoded), and the kernel reads no more than that
            // for KVM_SET_XSAVE unless the process was granted dynamic
            // XSTATE features for guests (ARCH_REQ_XCOMP_GUEST_PERM, AMX),
            // which this VMM never requests.
            unsafe { fd.set_xsave(&x) }.map_err(err("KVM_SET_XSAVE"))?;
        }
        if let Some(e) = &s.events {
            fd.set_vcpu_events(e).map_err(err("KVM_SET_VCPU_EVENTS"))?;
        }
        if let Some(m) = s.mp_state {
            fd.set_mp_state(m).map_err(err("KVM_SET_MP_STATE"))?;
        }
        if s.lapic.is_some() {
            return Err(VmmError::RestoreVcpu {
                vcpu,
                what: "the snapshot has a LAPIC, and this VMM's machines have no irqchip".into(),
            });
        }
        self.abi_key = s.abi_key;
        self.serial = s.serial.clone();
        Ok(())
    }
}

/// The VMM state of `shared`'s machine from its vCPUs' saved states (every
/// vCPU paused, by index): those, the devices and the configuration,
/// encoded.
pub(crate) fn encode_state(shared: &Shared, vcpus: Vec<VcpuSnapshot>) -> Result<Vec<u8>, VmmError> {
    let devices = shared
        .lock_devices()
        .iter()
        .enumerate()
        .map(|(index, d)| {
            d.save()
                .map_err(|what| VmmError::DeviceState { index, what })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VmmState {
        config: shared.config,
        vcpus,
        devices,
    }
    .encode())
}

/// Writes the snapshot of `shared`'s memory and the saved states of its
/// vCPUs (see [`encode_state`]) to `w`.
fn write_snapshot(
    shared: &Shared,
    vcpus: Vec<VcpuSnapshot>,
    w: &mut impl Write,
    private: &PrivatePages,
) -> Result<(SnapshotReport, usize), VmmError> {
    let blob = encode_state(shared, vcpus)?;
    let report = shared
        .gate
        .snapshot_with_state(w, private, &blob)
        .map_err(VmmError::Snapshot)?;
    Ok((report, blob.len()))
}

/// What [`save_all`] got.
enum SaveAll<'a> {
    /// Every vCPU's saved state, by index, and the pause that holds the
    /// others (none on a machine of one vCPU).
    Saved(Vec<VcpuSnapshot>, Option<AllPaused<'a>>),
    /// Why the others could not be paused (nothing is saved).
    Refused(String),
}

/// Every vCPU's saved state, for a snapshot `vcpu` takes between two of
/// its exits (its I/O completed): its own (with `regs` for its general
/// registers, if given) and the others', paused at the rendezvous until
/// the returned pause is decided (or dropped: they run on).
fn save_all<'a>(
    vcpu: &VcpuState,
    shared: &'a Shared,
    regs: Option<kvm_regs>,
) -> Result<SaveAll<'a>, VmmError> {
    let mut own = vcpu.capture(&shared.vm)?;
    if let Some(r) = regs {
        own.regs = r;
    }
    let others = shared.config.vcpus as usize - 1;
    if others == 0 {
        return Ok(SaveAll::Saved(vec![own], None));
    }
    let mut all = match shared.pause.pause_all(
        others,
        || shared.kick_now.store(true, Ordering::Release),
        || shared.run_over.load(Ordering::Acquire),
    ) {
        Ok(all) => all,
        Err(refused) => return Ok(SaveAll::Refused(refused.why)),
    };
    let mut saved = std::mem::take(&mut all.vcpus);
    saved.push((vcpu.index, own));
    saved.sort_by_key(|(index, _)| *index);
    Ok(SaveAll::Saved(
        saved.into_iter().map(|(_, v)| v).collect(),
        Some(all),
    ))
}

/// Takes the snapshot `plan` says, of `vcpus` (every vCPU's saved state),
/// into its file: created (or truncated), written, synced; removed again
/// if anything fails.
fn write_file(
    shared: &Shared,
    vcpus: Vec<VcpuSnapshot>,
    plan: &SnapshotPlan,
    by: &'static str,
    started: Instant,
) -> Result<SnapshotTaken, VmmError> {
    let io = |source| VmmError::SnapshotIo {
        path: plan.path.clone(),
        source,
    };
    let file = File::create(&plan.path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let result = write_snapshot(shared, vcpus, &mut w, &plan.private).and_then(|r| {
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(r)
    });
    match result {
        Ok((report, state_bytes)) => Ok(SnapshotTaken {
            path: plan.path.clone(),
            stream_bytes: report.stream_bytes,
            shared_bytes: report.shared_bytes,
            sealed_bytes: report.sealed_bytes,
            omitted_bytes: report.omitted_bytes,
            state_bytes,
            pause_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            by,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&plan.path);
            Err(e)
        }
    }
}

/// The guest's request on `PORT_SNAPSHOT`: answers `-ENOSYS` without a
/// plan, and `-EBUSY` if the other vCPUs cannot be paused (one has ended,
/// or a migration is pausing them; the run goes on); otherwise takes the
/// snapshot with every vCPU paused, with rax = 1 in the saved state and 0
/// in this run. What the run does next, if a snapshot was taken.
pub(crate) fn guest_request(
    vcpu: &mut VcpuState,
    shared: &Shared,
    console: &Console,
) -> Result<Option<Then>, VmmError> {
    let started = Instant::now();
    let Some(plan) = shared.plan() else {
        vcpu.complete_io()?;
        vcpu.set_rax(-crate::abi::ENOSYS)?;
        return Ok(None);
    };
    vcpu.complete_io()?;
    vcpu.flush_serial(console);
    let mut regs = vcpu.regs()?;
    regs.rax = crate::abi::SNAPSHOT_RESUMED as u64;
    let (saved, others) = match save_all(vcpu, shared, Some(regs))? {
        SaveAll::Saved(saved, others) => (saved, others),
        SaveAll::Refused(why) => {
            shared.note(format!(
                "the guest's snapshot request: refused (-EBUSY): {why}"
            ));
            vcpu.set_rax(-crate::abi::EBUSY)?;
            return Ok(None);
        }
    };
    let taken = write_file(shared, saved, &plan, "guest", started)?;
    vcpu.set_rax(crate::abi::SNAPSHOT_TAKEN)?;
    shared.record_snapshot(taken);
    resume_others(others, plan.then);
    Ok(Some(plan.then))
}

/// The other vCPUs after a snapshot: they end with the run if it stops.
fn resume_others(others: Option<AllPaused<'_>>, then: Then) {
    if let Some(o) = others {
        o.decide(if then == Then::Stop {
            Verdict::End
        } else {
            Verdict::Resume
        });
    }
}

/// A snapshot the host asked for (`SIGUSR1`), between two exits (the
/// runner has settled this vCPU's last instruction), with every vCPU
/// paused; what the run does next. If the other vCPUs cannot
/// be paused, nothing is taken and the run goes on: the refusal is in the
/// report.
pub(crate) fn host_request(
    vcpu: &mut VcpuState,
    shared: &Shared,
    console: &Console,
) -> Result<Option<Then>, VmmError> {
    let started = Instant::now();
    let Some(plan) = shared.plan() else {
        return Ok(None);
    };
    vcpu.flush_serial(console);
    let (saved, others) = match save_all(vcpu, shared, None)? {
        SaveAll::Saved(saved, others) => (saved, others),
        SaveAll::Refused(why) => {
            shared.note(format!("SIGUSR1: no snapshot taken: {why}"));
            return Ok(None);
        }
    };
    let taken = write_file(shared, saved, &plan, "signal", started)?;
    shared.record_snapshot(taken);
    resume_others(others, plan.then);
    Ok(Some(plan.then))
}

/// How [`Machine::restore`] builds the machine.
#[derive(Clone)]
pub struct RestoreOptions {
    /// Fill memory on first touch (userfaultfd) instead of before the run.
    pub lazy: bool,
    /// With `lazy`: no prefetcher (pages come in only when touched).
    pub no_prefetch: bool,
    /// With `lazy`: the prefetcher's order (a previous run's touch order).
    pub prefetch: Option<PrefetchOrder>,
    /// Guest RAM's backing [default: the snapshot's].
    pub backing: Option<BackingKind>,
    /// Where the console devices write.
    pub console: Console,
    /// Replaces the snapshot's disk image path (the image must hold what
    /// the snapshot's did).
    pub disk: Option<PathBuf>,
}

impl RestoreOptions {
    /// Eager, onto the snapshot's backing, writing to `console`.
    pub fn new(console: Console) -> RestoreOptions {
        RestoreOptions {
            lazy: false,
            no_prefetch: false,
            prefetch: None,
            backing: None,
            console,
            disk: None,
        }
    }
}

/// How a restore went.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreSummary {
    /// `eager`, `lazy`, or `eager` after a refused lazy restore.
    pub mode: &'static str,
    /// Why a lazy restore was not possible, if it was asked for.
    pub lazy_refused: Option<String>,
    /// Time to the first instruction, in µs.
    pub ready_us: u64,
    /// Bytes of VMM state.
    pub state_bytes: usize,
    /// The backing of guest RAM.
    pub backing: BackingKind,
}

/// The layout and conversion policy a snapshot's header names, read with
/// the library's `SnapshotInfo` (without the key, only to build the new
/// machine: the restore checks, and when sealed authenticates, them again).
fn peek_layout(file: &File) -> Result<(u64, BackingKind, gmem::Policy), VmmError> {
    let bad = |what: String| VmmError::SnapshotFile { what };
    let mut r = BufReader::new(file);
    let info = gmem::snapshot::SnapshotInfo::read(&mut r).map_err(VmmError::Restore)?;
    match info.regions.as_slice() {
        [(0, len, backing)] => Ok((*len, *backing, info.conversion)),
        regions => Err(bad(format!(
            "it has {} regions, the first at {:#x}; this VMM's machines have one, at GPA 0",
            regions.len(),
            regions.first().map_or(0, |r| r.0)
        ))),
    }
}

/// Guest memory restored, and what is needed to finish the machine.
struct Memory {
    machine: Machine,
    state: VmmState,
    state_bytes: usize,
    lazy: Option<gmem::snapshot::LazyRestore>,
    lazy_refused: Option<String>,
}

fn restore_memory(
    config: MachineConfig,
    file: &File,
    key: Option<&SealKey>,
    opts: &RestoreOptions,
) -> Result<Memory, VmmError> {
    let machine = Machine::bare(config)?;
    let gate = &machine.shared.gate;
    let mut lazy_refused = None;
    if opts.lazy {
        let mut lo = LazyOptions::new();
        if opts.no_prefetch {
            lo = lo.without_prefetch();
        }
        if let Some(order) = &opts.prefetch {
            lo = lo.with_order(order.clone());
        }
        let dup = file.try_clone().map_err(VmmError::SnapshotRead)?;
        match gate.restore_lazy(dup, key, lo) {
            Ok(lazy) => {
                let state = VmmState::decode(lazy.state())?;
                return Ok(Memory {
                    machine,
                    state,
                    state_bytes: lazy.state().len(),
                    lazy: Some(lazy),
                    lazy_refused,
                });
            }
            Err(RestoreError::Lazy { why }) => lazy_refused = Some(why),
            Err(e) => return Err(VmmError::Restore(e)),
        }
    }
    // From the start, whatever read the file before (a first restore).
    let mut f = file;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).map_err(VmmError::SnapshotRead)?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let report = gate.restore(&mut r, key).map_err(VmmError::Restore)?;
    let state = VmmState::decode(&report.state)?;
    Ok(Memory {
        machine,
        state,
        state_bytes: report.state.len(),
        lazy: None,
        lazy_refused,
    })
}

impl Machine {
    /// Writes a snapshot of the machine (memory, vCPUs, devices) to `w`,
    /// between runs (the vCPUs are this machine's, so none is running).
    /// Private pages follow `private`.
    ///
    /// # Errors
    /// [`VmmError::Snapshot`] (private pages under `Refuse`, live pins, a
    /// failed write), [`VmmError::DeviceState`] for a device that cannot be
    /// saved, [`VmmError::Vcpu`] for a failed ioctl.
    pub fn snapshot(
        &mut self,
        w: &mut impl Write,
        private: &PrivatePages,
    ) -> Result<SnapshotReport, VmmError> {
        let mut saved = Vec::with_capacity(self.vcpus.len());
        for v in &mut self.vcpus {
            v.complete_io()?;
            saved.push(v.capture(&self.shared.vm)?);
        }
        write_snapshot(&self.shared, saved, w, private).map(|(r, _)| r)
    }

    /// Builds a machine from the snapshot in `file` and restores it: its
    /// configuration and layout, guest memory (eagerly, or lazily with
    /// `opts.lazy` where userfaultfd can serve the backing: otherwise
    /// eagerly, and the summary says why), the vCPUs and the devices (the
    /// disk image reopened by its path, or `opts.disk`). The machine is
    /// launched; [`run_to_end`](Self::run_to_end) continues the guest where
    /// it was.
    ///
    /// # Errors
    /// [`VmmError::Restore`] for a snapshot the library refuses (a flipped
    /// byte, a wrong or missing key, another layout), [`VmmError::State`]
    /// for VMM state that does not decode, [`VmmError::SnapshotFile`],
    /// [`VmmError::DeviceState`] (a disk image that is gone or resized),
    /// [`VmmError::RestoreVcpu`]; nothing runs on any error.
    pub fn restore(
        file: File,
        key: Option<&SealKey>,
        opts: RestoreOptions,
    ) -> Result<(Machine, RestoreSummary), VmmError> {
        let started = Instant::now();
        let (mem_size, header_backing, policy) = peek_layout(&file)?;
        let backing = opts.backing.unwrap_or(header_backing);
        let config = MachineConfig {
            policy,
            ..MachineConfig::new(backing, mem_size)
        };
        let memory = restore_memory(config, &file, key, &opts)?;
        let saved = memory.state.config;
        if saved.mem_size != mem_size || saved.policy != policy {
            return Err(VmmError::SnapshotFile {
                what: format!(
                    "its state says {:#x} bytes of RAM and the {} policy, its header {mem_size:#x} and {policy}",
                    saved.mem_size, saved.policy
                ),
            });
        }
        let Memory {
            mut machine,
            state,
            state_bytes,
            lazy,
            lazy_refused,
        } = memory;
        machine.take_state(&state, backing, &opts.console, opts.disk.as_deref())?;
        *machine.shared.lock_lazy() = lazy;
        machine.launched = true;
        machine.shared.restored.store(true, Ordering::Release);
        let summary = RestoreSummary {
            mode: match (opts.lazy, &lazy_refused) {
                (true, None) => "lazy",
                _ => "eager",
            },
            lazy_refused,
            ready_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            state_bytes,
            backing,
        };
        Ok((machine, summary))
    }
}

impl Machine {
    /// Sets a new machine's configuration, vCPUs and devices from a saved
    /// state (a snapshot's or a migration's): the memory is restored
    /// already. The console devices write to `console`; the disk image is
    /// reopened at its saved path, or `disk`.
    pub(crate) fn take_state(
        &mut self,
        state: &VmmState,
        backing: BackingKind,
        console: &Console,
        disk: Option<&std::path::Path>,
    ) -> Result<(), VmmError> {
        let machine = self;
        let saved = state.config;
        let shared =
            std::sync::Arc::get_mut(&mut machine.shared).ok_or_else(|| VmmError::SnapshotFile {
                what: "the new machine is shared already".into(),
            })?;
        shared.config = MachineConfig { backing, ..saved };
        let sync_regs = shared.vm.has_sync_regs();
        for (index, s) in state.vcpus.iter().enumerate() {
            let fd = shared
                .vm
                .fd()
                .create_vcpu(index as u64)
                .map_err(|source| VmmError::Vcpu {
                    op: "KVM_CREATE_VCPU",
                    vcpu: index,
                    source,
                })?;
            let mut v = VcpuState::new(index, fd, sync_regs);
            v.apply(s)?;
            machine.vcpus.push(v);
        }
        {
            let shared = &machine.shared;
            let mut devices = shared.lock_devices();
            for (index, d) in state.devices.iter().enumerate() {
                let model: Box<dyn crate::virtio::VirtioDevice> = match &d.device {
                    DeviceSnapshot::Console { input, transmitted } => Box::new(
                        VirtioConsole::restored(console.clone(), input.clone(), *transmitted),
                    ),
                    DeviceSnapshot::Blk {
                        path,
                        capacity,
                        readonly,
                        statuses,
                    } => {
                        let path = disk.map_or_else(|| path.clone(), std::path::Path::to_path_buf);
                        let blk = VirtioBlk::open(&path, *readonly).map_err(|e| {
                            VmmError::DeviceState {
                                index,
                                what: format!("opening the disk image {}: {e}", path.display()),
                            }
                        })?;
                        if blk.capacity() != *capacity {
                            return Err(VmmError::DeviceState {
                                index,
                                what: format!(
                                    "the disk image {} has {} sectors; the snapshot's had {capacity}",
                                    path.display(),
                                    blk.capacity()
                                ),
                            });
                        }
                        Box::new(blk.with_statuses(*statuses))
                    }
                };
                let t = MmioTransport::restore(model, &d.transport, &shared.gate)
                    .map_err(|what| VmmError::DeviceState { index, what })?;
                devices.push(t);
            }
        }
        Ok(())
    }
}

/// How long the runner waits between looks at a lazy restore's health and
/// at `SIGUSR1`.
pub(crate) const POLL: Duration = Duration::from_millis(5);
