//! A machine: one VM, its guest RAM in a restricted memory file bound at GPA
//! 0, the host's mapping of it, and the vCPUs, booted into long mode.

use std::sync::Arc;

use gmem::{
    AccessError, BackingError, BackingKind, BindError, Binding, GmemFlags, HostMapping, KvmError,
    MemoryOptions, RestrictedMemory, SlotRequest, Vm, create_memory,
};
use kvm_ioctls::VcpuFd;
use thiserror::Error;

use crate::boot::{self, MAX_RAM, PAYLOAD_FLOOR, STACK_SIZE};
use crate::exit::Exit;

/// The smallest guest RAM: the boot area, a 64 KiB payload and one stack.
pub const MIN_RAM: u64 = 2 << 20;

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
    /// A host access to guest RAM was refused.
    #[error("writing guest RAM")]
    Access(#[from] AccessError),
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
        "payload of {len:#x} bytes at {addr:#x} does not fit: the payload area is [{floor:#x}, {limit:#x})"
    )]
    PayloadOutsideRam {
        /// Load address.
        addr: u64,
        /// Payload length.
        len: u64,
        /// The lowest address a payload may use.
        floor: u64,
        /// One past the highest.
        limit: u64,
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
}

impl MachineConfig {
    /// `mem_size` bytes of `backing` with one vCPU.
    pub fn new(backing: BackingKind, mem_size: u64) -> Self {
        MachineConfig {
            backing,
            mem_size,
            vcpus: 1,
        }
    }

    /// The highest address a payload may reach: the stacks sit above it.
    pub fn payload_limit(&self) -> u64 {
        self.mem_size - u64::from(self.vcpus) * STACK_SIZE
    }

    fn validate(&self) -> Result<(), VmmError> {
        let size = self.mem_size;
        let page = self.backing.page_size();
        let rule = if size < MIN_RAM {
            Some(format!("must be at least {MIN_RAM:#x}"))
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
        if self.vcpus == 0 || self.vcpus > 64 {
            return Err(VmmError::InvalidVcpus {
                count: self.vcpus,
                rule: "must be between 1 and 64".into(),
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

/// A booted machine: every vCPU is in 64-bit mode, paging on, with an
/// identity map of RAM, waiting at the entry point given to [`Machine::load`].
pub struct Machine {
    // Field order is drop order: vCPUs, then the slot, then the memory.
    vcpus: Vec<VcpuFd>,
    binding: Binding,
    host: HostMapping,
    memory: Arc<dyn RestrictedMemory>,
    vm: Vm,
    config: MachineConfig,
}

impl Machine {
    /// Creates the VM and its RAM (`MMAP|INIT_SHARED`, so the VMM can write the
    /// boot structures), binds the RAM at GPA 0 and creates the vCPUs.
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
        let host = memory.map_host()?;
        let binding = vm.bind(&memory, SlotRequest::new(0, 0, config.mem_size))?;
        let gdt: Vec<u8> = boot::gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
        host.write(boot::GDT_ADDR, &gdt)?;
        for (addr, word) in boot::page_tables(config.mem_size) {
            host.write(addr, &word.to_le_bytes())?;
        }
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus as usize {
            let vcpu_err = |op| {
                move |source| VmmError::Vcpu {
                    op,
                    vcpu: index,
                    source,
                }
            };
            let vcpu = vm
                .fd()
                .create_vcpu(index as u64)
                .map_err(vcpu_err("KVM_CREATE_VCPU"))?;
            let sregs = vcpu.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))?;
            vcpu.set_sregs(&boot::long_mode_sregs(sregs))
                .map_err(vcpu_err("KVM_SET_SREGS"))?;
            vcpus.push(vcpu);
        }
        Ok(Machine {
            vcpus,
            binding,
            host,
            memory,
            vm,
            config,
        })
    }

    /// Writes `payload` at `load_addr` and points every vCPU at `entry` with
    /// the ABI's registers.
    ///
    /// # Errors
    /// [`VmmError::PayloadOutsideRam`] unless the payload lies in
    /// `[PAYLOAD_FLOOR, payload_limit)`.
    pub fn load(&mut self, payload: &[u8], load_addr: u64, entry: u64) -> Result<(), VmmError> {
        let limit = self.config.payload_limit();
        let len = payload.len() as u64;
        let fits = load_addr >= PAYLOAD_FLOOR
            && load_addr.checked_add(len).is_some_and(|end| end <= limit)
            && (load_addr..limit).contains(&entry);
        if !fits {
            return Err(VmmError::PayloadOutsideRam {
                addr: load_addr,
                len,
                floor: PAYLOAD_FLOOR,
                limit,
            });
        }
        self.host.write(load_addr, payload)?;
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            let regs = boot::entry_regs(
                entry,
                boot::stack_top(self.config.mem_size, index as u64),
                self.config.mem_size,
                index as u64,
            );
            vcpu.set_regs(&regs).map_err(|source| VmmError::Vcpu {
                op: "KVM_SET_REGS",
                vcpu: index,
                source,
            })?;
        }
        Ok(())
    }

    /// Runs vCPU `index` until its next exit.
    ///
    /// # Errors
    /// [`VmmError::Vcpu`] if `KVM_RUN` fails (other than with `EINTR`/`EAGAIN`,
    /// which are retried).
    pub fn run(&mut self, index: usize) -> Result<Exit, VmmError> {
        let vcpu = &mut self.vcpus[index];
        loop {
            match vcpu.run() {
                Ok(exit) => return Ok(Exit::decode(exit)),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(source) => {
                    return Err(VmmError::Vcpu {
                        op: "KVM_RUN",
                        vcpu: index,
                        source,
                    });
                }
            }
        }
    }

    /// vCPU `index`'s general registers.
    ///
    /// # Errors
    /// [`VmmError::Vcpu`] if `KVM_GET_REGS` fails.
    pub fn regs(&self, index: usize) -> Result<kvm_bindings::kvm_regs, VmmError> {
        self.vcpus[index]
            .get_regs()
            .map_err(|source| VmmError::Vcpu {
                op: "KVM_GET_REGS",
                vcpu: index,
                source,
            })
    }

    /// The guest RAM file.
    pub fn memory(&self) -> &Arc<dyn RestrictedMemory> {
        &self.memory
    }

    /// The host's mapping of guest RAM.
    pub fn host(&self) -> &HostMapping {
        &self.host
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// RAM's binding (slot 0 at GPA 0).
    pub fn binding(&self) -> &Binding {
        &self.binding
    }

    /// The configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// How many vCPUs there are.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }
}
