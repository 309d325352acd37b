//! A machine: one VM, its guest RAM in a restricted memory file bound at GPA
//! 0, the gatekeeper over it, and the vCPUs, booted into long mode.

use std::sync::Arc;

use gmem::{
    Attribute, BackingError, BackingKind, BindError, Binding, ConvertError, GateError, GateOptions,
    Gatekeeper, GmemFlags, KvmError, MemoryOptions, Policy, RestrictedMemory, SlotRequest, Vm,
    create_memory,
};
use kvm_bindings::{KVM_CAP_EXIT_HYPERCALL, kvm_enable_cap};
use thiserror::Error;

use crate::abi::HC_MAP_GPA_RANGE;
use crate::boot::{self, MAX_RAM, PAYLOAD_FLOOR, STACK_SIZE};
use crate::exit::Exit;
use crate::vcpu::{Console, ExitCounts, Step, VcpuState, run_once};

/// The smallest guest RAM: the boot area, a 64 KiB payload and one stack.
pub const MIN_RAM: u64 = 2 << 20;
/// The most vCPUs a machine may have.
pub const MAX_VCPUS: u32 = 64;

/// Why a machine could not be built or run.
#[derive(Debug, Error)]
pub enum VmmError {
    /// KVM could not be opened or the VM created.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest RAM could not be created or mapped.
    #[error("guest RAM")]
    Memory(#[from] BackingError),
    /// Guest RAM could not be bound.
    #[error("binding guest RAM")]
    Bind(#[from] BindError),
    /// The gatekeeper refused an access or could not be built.
    #[error("guest RAM's gatekeeper")]
    Gate(#[from] GateError),
    /// A conversion failed.
    #[error("converting guest RAM")]
    Convert(#[from] ConvertError),
    /// The RAM size breaks a rule.
    #[error("RAM size {size:#x} is invalid: it {rule}")]
    InvalidRam {
        /// The size given.
        size: u64,
        /// The rule broken.
        rule: String,
    },
    /// The vCPU count breaks a rule.
    #[error("{count} vCPUs requested: {rule}")]
    InvalidVcpus {
        /// The count.
        count: u32,
        /// The rule broken.
        rule: String,
    },
    /// A payload does not fit.
    #[error(
        "payload of {len:#x} bytes at {addr:#x} (entry {entry:#x}) does not fit: payload and entry must lie in [{floor:#x}, {limit:#x})"
    )]
    PayloadOutsideRam {
        /// Load address.
        addr: u64,
        /// Payload length.
        len: u64,
        /// Entry point.
        entry: u64,
        /// The lowest address a payload may use.
        floor: u64,
        /// One past the highest (the vCPU stacks are above).
        limit: u64,
    },
    /// The payload is empty.
    #[error("the payload is empty")]
    EmptyPayload,
    /// The machine was launched already.
    #[error("the machine is launched: the host no longer writes guest memory")]
    AlreadyLaunched,
    /// A vCPU index beyond the machine's vCPUs.
    #[error("vCPU {index} does not exist: the machine has {count}")]
    NoSuchVcpu {
        /// The index given.
        index: usize,
        /// How many vCPUs there are.
        count: usize,
    },
    /// A vCPU ioctl failed.
    #[error("{op} on vCPU {vcpu} failed")]
    Vcpu {
        /// The ioctl.
        op: &'static str,
        /// The vCPU index.
        vcpu: usize,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest used a port the ABI does not define.
    #[error("vCPU {vcpu}: {exit}: port {port:#x} is not part of the guest ABI")]
    UnknownPort {
        /// The vCPU index.
        vcpu: usize,
        /// The port.
        port: u16,
        /// The exit.
        exit: Exit,
    },
    /// The guest stopped in a way that ends the run.
    #[error("vCPU {vcpu} stopped: {exit}\n{dump}")]
    Guest {
        /// The vCPU index.
        vcpu: usize,
        /// The exit.
        exit: Exit,
        /// The vCPU's registers.
        dump: String,
    },
    /// The same memory fault came back right after it was handled.
    #[error("vCPU {vcpu}: memory fault at GPA {gpa:#x} repeats after conversion")]
    RepeatedFault {
        /// The vCPU index.
        vcpu: usize,
        /// The GPA.
        gpa: u64,
    },
    /// A memory-fault exit could not be handled by converting.
    #[error("vCPU {vcpu}: memory fault at GPA {gpa:#x} could not be handled")]
    Fault {
        /// The vCPU index.
        vcpu: usize,
        /// The GPA.
        gpa: u64,
        /// Why the conversion failed.
        #[source]
        source: ConvertError,
    },
    /// A vCPU thread could not be started.
    #[error("starting the thread of vCPU {vcpu}")]
    Thread {
        /// The vCPU index.
        vcpu: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// How to build a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// The backing of guest RAM.
    pub backing: BackingKind,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The attribute all of RAM has after launch.
    pub initial: Attribute,
    /// What conversions do to the content.
    pub policy: Policy,
}

impl MachineConfig {
    /// `mem_size` bytes of `backing`, one vCPU, RAM private after launch,
    /// in-place conversions.
    pub fn new(backing: BackingKind, mem_size: u64) -> Self {
        MachineConfig {
            backing,
            mem_size,
            vcpus: 1,
            initial: Attribute::Private,
            policy: Policy::InPlace,
        }
    }

    /// The highest address a payload may reach: the stacks sit above it.
    pub fn payload_limit(&self) -> u64 {
        self.mem_size
            .saturating_sub(u64::from(self.vcpus) * STACK_SIZE)
    }

    /// Checks the RAM size and the vCPU count.
    ///
    /// # Errors
    /// [`VmmError::InvalidRam`], [`VmmError::InvalidVcpus`].
    pub fn validate(&self) -> Result<(), VmmError> {
        let size = self.mem_size;
        let page = self.backing.page_size();
        let rule = if size < MIN_RAM {
            Some(format!("must be at least {MIN_RAM:#x} (2 MiB)"))
        } else if size > MAX_RAM {
            Some(format!(
                "must be at most {MAX_RAM:#x} (what the boot page tables map)"
            ))
        } else if !size.is_multiple_of(page) {
            Some(format!(
                "must be a multiple of the {} page size {page:#x}",
                self.backing
            ))
        } else {
            None
        };
        if let Some(rule) = rule {
            return Err(VmmError::InvalidRam { size, rule });
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmmError::InvalidVcpus {
                count: self.vcpus,
                rule: format!("must be between 1 and {MAX_VCPUS}"),
            });
        }
        if self.payload_limit() < PAYLOAD_FLOOR + (64 << 10) {
            return Err(VmmError::InvalidVcpus {
                count: self.vcpus,
                rule: format!(
                    "their {STACK_SIZE:#x}-byte stacks leave no room for a payload in {size:#x} bytes"
                ),
            });
        }
        Ok(())
    }
}

/// What every vCPU shares: the VM, RAM, and its gatekeeper (which owns the
/// binding).
pub(crate) struct Shared {
    // Field order is drop order: the gatekeeper (its view, then the slot),
    // then the file, then the VM.
    pub(crate) gate: Gatekeeper,
    pub(crate) memory: Arc<dyn RestrictedMemory>,
    pub(crate) vm: Vm,
    pub(crate) config: MachineConfig,
}

/// A booted machine: every vCPU is in 64-bit mode, paging on, with an
/// identity map of RAM. [`Machine::load`] writes the payload and launches.
pub struct Machine {
    // Field order is drop order: vCPUs before the memory they run on.
    pub(crate) vcpus: Vec<VcpuState>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) counts: ExitCounts,
    launched: bool,
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
        let gdt: Vec<u8> = boot::gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
        gate.write(boot::GDT_ADDR, &gdt)?;
        for (addr, word) in boot::page_tables(config.mem_size) {
            gate.write(addr, &word.to_le_bytes())?;
        }
        enable_exit_hypercall(&vm);
        // A property of the kernel: read once per process.
        static SYNC_REGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let sync_regs =
            *SYNC_REGS.get_or_init(|| vm.fd().check_extension(kvm_ioctls::Cap::SyncRegs));
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus as usize {
            let vcpu_err = |op| {
                move |source| VmmError::Vcpu {
                    op,
                    vcpu: index,
                    source,
                }
            };
            let fd = vm
                .fd()
                .create_vcpu(index as u64)
                .map_err(vcpu_err("KVM_CREATE_VCPU"))?;
            let sregs = fd.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))?;
            fd.set_sregs(&boot::long_mode_sregs(sregs))
                .map_err(vcpu_err("KVM_SET_SREGS"))?;
            vcpus.push(VcpuState::new(index, fd, sync_regs));
        }
        Ok(Machine {
            vcpus,
            shared: Arc::new(Shared {
                gate,
                memory,
                vm,
                config,
            }),
            counts: ExitCounts::default(),
            launched: false,
        })
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
/// (`KVM_CAP_EXIT_HYPERCALL`). Hosts that cannot just keep the doorbell port.
fn enable_exit_hypercall(vm: &Vm) {
    static MASK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let mask = *MASK.get_or_init(|| {
        u64::try_from(vm.fd().check_extension_raw(KVM_CAP_EXIT_HYPERCALL.into())).unwrap_or(0)
    });
    let wanted = 1u64 << HC_MAP_GPA_RANGE;
    if mask & wanted != 0 {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_EXIT_HYPERCALL,
            ..Default::default()
        };
        cap.args[0] = wanted;
        // A refusal only means vmcall keeps returning -KVM_ENOSYS to the guest.
        let _ = vm.fd().enable_cap(&cap);
    }
}
