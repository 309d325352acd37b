//! A machine: one VM, its guest RAM in a restricted memory file bound at GPA
//! 0, the gatekeeper over it, and the vCPUs, booted into long mode.

use std::sync::Arc;

use gmem::{
    Attribute, Binding, GateOptions, Gatekeeper, GmemFlags, MemoryOptions, RestrictedMemory,
    SlotRequest, Vm, create_memory,
};
use kvm_bindings::{KVM_CAP_EXIT_HYPERCALL, kvm_enable_cap};

use crate::abi::HC_MAP_GPA_RANGE;
use crate::boot::{self, PAYLOAD_FLOOR};
use crate::config::MachineConfig;
use crate::console::Console;
use crate::error::VmmError;
use crate::exit::Exit;
use crate::shared::Shared;
use crate::vcpu::{ExitCounts, Step, VcpuState, run_once};

/// A booted machine: every vCPU is in 64-bit mode, paging on, with an
/// identity map of RAM. [`Machine::load`] writes the payload and launches.
pub struct Machine {
    // Field order is drop order: vCPUs before the memory they run on.
    pub(crate) vcpus: Vec<VcpuState>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) counts: ExitCounts,
    pub(crate) launched: bool,
}

impl Machine {
    /// Creates the VM and its RAM (`MMAP|INIT_SHARED`, so the VMM can write
    /// the boot structures), binds the RAM at GPA 0, hands the binding to a
    /// gatekeeper, and creates the vCPUs.
    ///
    /// # Errors
    /// [`VmmError::InvalidRam`] / [`VmmError::InvalidVcpus`] for a bad
    /// config; the library's errors for KVM, memory and binding failures.
    pub fn new(config: MachineConfig) -> Result<Machine, VmmError> {
        let mut machine = Machine::bare(config)?;
        let shared = &machine.shared;
        let gate = &shared.gate;
        let gdt: Vec<u8> = boot::gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
        gate.write(boot::GDT_ADDR, &gdt)?;
        for (addr, word) in boot::page_tables(config.mem_size) {
            gate.write(addr, &word.to_le_bytes())?;
        }
        let sync_regs = shared.vm.has_sync_regs();
        for index in 0..config.vcpus as usize {
            let vcpu_err = |op| {
                move |source| VmmError::Vcpu {
                    op,
                    vcpu: index,
                    source,
                }
            };
            let fd = shared
                .vm
                .fd()
                .create_vcpu(index as u64)
                .map_err(vcpu_err("KVM_CREATE_VCPU"))?;
            let sregs = fd.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))?;
            fd.set_sregs(&boot::long_mode_sregs(sregs))
                .map_err(vcpu_err("KVM_SET_SREGS"))?;
            machine.vcpus.push(VcpuState::new(index, fd, sync_regs));
        }
        Ok(machine)
    }

    /// The VM, its RAM bound at GPA 0 and the gatekeeper over it: nothing
    /// written, no vCPU (what a restore fills).
    pub(crate) fn bare(config: MachineConfig) -> Result<Machine, VmmError> {
        config.validate()?;
        let vm = Vm::new()?;
        let opts = MemoryOptions::new(config.backing, config.mem_size)
            .with_flags(GmemFlags::MMAP | GmemFlags::INIT_SHARED);
        let memory = create_memory(opts, Some(&vm))?;
        let binding = vm.bind(&memory, SlotRequest::new(0, 0, config.mem_size))?;
        let gate = Gatekeeper::new(
            &vm,
            vec![binding],
            GateOptions::new(Attribute::Shared, config.policy),
        )?;
        let vmcall_taken = enable_exit_hypercall(&vm);
        Ok(Machine {
            vcpus: Vec::new(),
            shared: Arc::new(Shared::new(gate, memory, vmcall_taken, vm, config)),
            counts: ExitCounts::default(),
            launched: false,
        })
    }

    /// Takes snapshots into `plan`'s file when the guest asks
    /// ([`PORT_SNAPSHOT`](crate::abi::PORT_SNAPSHOT)) or the process gets
    /// `SIGUSR1` during [`run_to_end`](Self::run_to_end); without a plan
    /// the guest's request answers `-ENOSYS`.
    /// With a plan, `SIGUSR1`'s handler is installed at once (a signal
    /// before the run is taken at its start).
    pub fn set_snapshot_plan(&mut self, plan: Option<crate::snapshot::SnapshotPlan>) {
        if plan.is_some() {
            crate::runner::install_sigusr1_handler();
        }
        *self.shared.plan.lock().unwrap_or_else(|e| e.into_inner()) = plan;
    }

    /// Writes `payload` at `load_addr`, points every vCPU at `entry` with the
    /// ABI's registers, and launches: all of RAM takes the configured initial
    /// attribute (private by default), content kept. After this the host
    /// never writes private memory.
    ///
    /// # Errors
    /// [`VmmError::EmptyPayload`]; [`VmmError::PayloadOutsideRam`] unless
    /// the payload and the entry lie in `[PAYLOAD_FLOOR, payload_limit)`;
    /// [`VmmError::AlreadyLaunched`] on a second call.
    pub fn load(&mut self, payload: &[u8], load_addr: u64, entry: u64) -> Result<(), VmmError> {
        if self.launched {
            return Err(VmmError::AlreadyLaunched);
        }
        if payload.is_empty() {
            return Err(VmmError::EmptyPayload);
        }
        let config = &self.shared.config;
        let limit = config.payload_limit();
        let len = payload.len() as u64;
        let fits = load_addr >= PAYLOAD_FLOOR
            && load_addr.checked_add(len).is_some_and(|end| end <= limit)
            && (PAYLOAD_FLOOR..limit).contains(&entry);
        if !fits {
            return Err(VmmError::PayloadOutsideRam {
                addr: load_addr,
                len,
                entry,
                floor: PAYLOAD_FLOOR,
                limit,
            });
        }
        self.shared.gate.write(load_addr, payload)?;
        self.start_at(entry)
    }

    /// Loads an ELF executable (its `PT_LOAD` segments at their physical
    /// addresses, the rest of each zeroed) and launches at its entry point,
    /// as [`load`](Self::load) does for a flat binary.
    ///
    /// # Errors
    /// [`VmmError::Elf`] for a malformed or unfit file, naming the segment;
    /// [`VmmError::SegmentOutsideRam`] for a segment reaching past
    /// `payload_limit` (the vCPU stacks);
    /// [`VmmError::SegmentOverBootStructures`] for one overlapping the GDT or
    /// the page tables ([`boot::written`]), naming both ranges (a segment
    /// below `PAYLOAD_FLOOR` that overlaps neither loads: the ELF headers
    /// `ld -Ttext=0x100000` puts at `0xff000`);
    /// [`VmmError::AlreadyLaunched`] on a second load. Nothing is written
    /// unless every segment fits.
    pub fn load_elf(&mut self, file: &[u8]) -> Result<u64, VmmError> {
        if self.launched {
            return Err(VmmError::AlreadyLaunched);
        }
        let program = crate::elf::parse(file)?;
        let config = &self.shared.config;
        let limit = config.payload_limit();
        let written = boot::written(config.mem_size);
        for s in &program.segments {
            let r = s.range();
            if r.end > limit {
                return Err(VmmError::SegmentOutsideRam {
                    index: s.index,
                    addr: s.addr,
                    len: s.mem_size,
                    floor: PAYLOAD_FLOOR,
                    limit,
                });
            }
            if let Some((taken, what)) = written
                .iter()
                .find(|(w, _)| w.start < r.end && r.start < w.end)
            {
                return Err(VmmError::SegmentOverBootStructures {
                    index: s.index,
                    addr: s.addr,
                    len: s.mem_size,
                    what,
                    taken_start: taken.start,
                    taken_end: taken.end,
                    floor: PAYLOAD_FLOOR,
                });
            }
        }
        let gate = &self.shared.gate;
        for s in &program.segments {
            gate.write(s.addr, s.data)?;
            let rest = s.mem_size - s.data.len() as u64;
            if rest > 0 {
                gate.fill(s.addr + s.data.len() as u64, rest, 0)?;
            }
        }
        self.start_at(program.entry)?;
        Ok(program.entry)
    }

    /// Points every vCPU at `entry` with the ABI's registers and launches.
    fn start_at(&mut self, entry: u64) -> Result<(), VmmError> {
        let config = &self.shared.config;
        for vcpu in &self.vcpus {
            let index = vcpu.index as u64;
            let regs = boot::entry_regs(
                entry,
                boot::stack_top(config.mem_size, index),
                config.mem_size,
                index,
            );
            vcpu.fd.set_regs(&regs).map_err(|source| VmmError::Vcpu {
                op: "KVM_SET_REGS",
                vcpu: vcpu.index,
                source,
            })?;
        }
        self.shared.gate.launch(config.initial)?;
        self.launched = true;
        Ok(())
    }

    /// Adds a virtio-mmio device; its window is the next one after
    /// [`MMIO_BASE`](crate::virtio::MMIO_BASE) (the guest finds the count
    /// and the base on the ABI port). Returns its index.
    ///
    /// # Errors
    /// [`VmmError::Devices`] after the launch, with more than
    /// [`MAX_DEVICES`](crate::virtio::MAX_DEVICES), or with RAM reaching the
    /// device windows.
    pub fn add_device(
        &mut self,
        device: Box<dyn crate::virtio::VirtioDevice>,
    ) -> Result<usize, VmmError> {
        let rule = if self.launched {
            Some("devices are added before the launch".to_owned())
        } else if self.shared.config.mem_size > crate::virtio::MMIO_BASE {
            Some(format!(
                "RAM of {:#x} bytes reaches the device windows at {:#x}",
                self.shared.config.mem_size,
                crate::virtio::MMIO_BASE
            ))
        } else {
            None
        };
        if let Some(rule) = rule {
            return Err(VmmError::Devices { rule });
        }
        let mut devices = self.shared.lock_devices();
        if devices.len() >= crate::virtio::MAX_DEVICES {
            return Err(VmmError::Devices {
                rule: format!(
                    "a machine has at most {} devices",
                    crate::virtio::MAX_DEVICES
                ),
            });
        }
        devices.push(crate::virtio::MmioTransport::new(device));
        Ok(devices.len() - 1)
    }

    /// Runs vCPU `index` to its next exit and handles it as the guest ABI
    /// says, writing console output to `console`.
    ///
    /// # Errors
    /// As the runner: guest failures, unknown ports and failed ioctls.
    pub fn step(&mut self, index: usize, console: &Console) -> Result<Step, VmmError> {
        let count = self.vcpus.len();
        let vcpu = self
            .vcpus
            .get_mut(index)
            .ok_or(VmmError::NoSuchVcpu { index, count })?;
        run_once(vcpu, &self.shared, console, &mut self.counts)
    }

    /// Runs vCPU `index` until its next exit and returns it undecoded by the
    /// ABI (no port is handled). For tests that drive a guest exit by exit.
    ///
    /// # Errors
    /// [`VmmError::Vcpu`] if `KVM_RUN` fails other than with `EINTR`/`EAGAIN`.
    pub fn run(&mut self, index: usize) -> Result<Exit, VmmError> {
        let count = self.vcpus.len();
        self.vcpus
            .get_mut(index)
            .ok_or(VmmError::NoSuchVcpu { index, count })?
            .run_raw()
    }

    /// vCPU `index`'s general registers.
    ///
    /// # Errors
    /// [`VmmError::Vcpu`] if `KVM_GET_REGS` fails.
    pub fn regs(&self, index: usize) -> Result<kvm_bindings::kvm_regs, VmmError> {
        self.vcpus
            .get(index)
            .ok_or(VmmError::NoSuchVcpu {
                index,
                count: self.vcpus.len(),
            })?
            .regs()
    }

    /// The guest RAM file.
    pub fn memory(&self) -> &Arc<dyn RestrictedMemory> {
        &self.shared.memory
    }

    /// Guest RAM's gatekeeper: the only way host code reaches it
    /// (GPA-addressed; private pages refused), and its conversions.
    pub fn gate(&self) -> &Gatekeeper {
        &self.shared.gate
    }

    /// A handle on guest memory that outlives the machine's vCPUs: for host
    /// threads (device models, tests) that work while
    /// [`run_to_end`](Self::run_to_end) runs the guest.
    pub fn memory_handle(&self) -> MemoryHandle {
        MemoryHandle(Arc::clone(&self.shared))
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.shared.vm
    }

    /// RAM's binding (at GPA 0).
    pub fn binding(&self) -> &Binding {
        // The gatekeeper holds exactly the one binding `new` gave it.
        self.shared
            .gate
            .bindings()
            .next()
            .expect("a machine's gatekeeper holds RAM's binding")
    }

    /// The configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.shared.config
    }

    /// How many vCPUs there are.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }
}

/// A shared handle on a machine's guest memory, usable from other threads
/// while the vCPUs run.
#[derive(Clone)]
pub struct MemoryHandle(Arc<Shared>);

impl MemoryHandle {
    /// Guest RAM's gatekeeper.
    pub fn gate(&self) -> &Gatekeeper {
        &self.0.gate
    }
}

/// Lets `vmcall` with `KVM_HC_MAP_GPA_RANGE` exit to userspace where KVM can
/// (`KVM_CAP_EXIT_HYPERCALL`); whether it does. Hosts that cannot just keep
/// the doorbell port.
fn enable_exit_hypercall(vm: &Vm) -> bool {
    let mask = vm.exit_hypercall_mask();
    let wanted = 1u64 << HC_MAP_GPA_RANGE;
    if mask & wanted != 0 {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_EXIT_HYPERCALL,
            ..Default::default()
        };
        cap.args[0] = wanted;
        // A refusal only means vmcall keeps returning -KVM_ENOSYS to the guest.
        return vm.fd().enable_cap(&cap).is_ok();
    }
    false
}
