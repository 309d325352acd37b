//! One vCPU's exit loop step: run to the next exit and handle it as the guest
//! ABI says (ports, halts, memory faults, hypercalls), or end the run with a
//! clear error and a register dump.

use std::collections::BTreeMap;

use kvm_bindings::{kvm_regs, kvm_run};
use kvm_ioctls::{SyncReg, VcpuFd};

use crate::abi::{
    self, AbiKey, DoorbellArgs, PORT_ABI, PORT_DISCARD, PORT_EXIT, PORT_HYPERCALL, PORT_SERIAL,
    PORT_SERIAL_LSR, PORT_SHARED_CONSOLE, PORT_SNAPSHOT, SERIAL_LSR_IDLE,
};
use crate::console::Console;
use crate::error::VmmError;
use crate::exit::{Exit, NoReplies, Replies};
use crate::shared::Shared;

/// Exits counted by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts(pub BTreeMap<&'static str, u64>);

impl ExitCounts {
    pub(crate) fn add(&mut self, reason: &'static str) {
        *self.0.entry(reason).or_default() += 1;
    }

    pub(crate) fn merge(&mut self, other: &ExitCounts) {
        for (reason, n) in &other.0 {
            *self.0.entry(reason).or_default() += n;
        }
    }
}

/// What one step of a vCPU ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The exit was handled; run again.
    Continue(Exit),
    /// The vCPU executed `hlt`: it is done.
    Halted,
    /// The guest asked to end the run with this status (port 0xf4).
    Exit(i32),
    /// `KVM_RUN` was interrupted by a signal (a kick); nothing ran.
    Interrupted,
}

/// A vCPU and what its exit loop remembers.
pub(crate) struct VcpuState {
    pub(crate) index: usize,
    pub(crate) fd: VcpuFd,
    /// The last memory fault handled, to catch one that repeats.
    last_fault: Option<u64>,
    /// Whether KVM copies the general registers into `kvm_run` on every exit
    /// (`KVM_CAP_SYNC_REGS`), so a doorbell needs no `KVM_GET_REGS` and
    /// `KVM_SET_REGS` (about 5 µs each on this project's hosts).
    sync_regs: bool,
    /// The key selected on the ABI port.
    pub(crate) abi_key: u32,
    /// Serial output not written yet: it goes out a line at a time.
    pub(crate) serial: Vec<u8>,
}

impl VcpuState {
    pub(crate) fn new(index: usize, mut fd: VcpuFd, sync_regs: bool) -> Self {
        if sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
        }
        VcpuState {
            index,
            fd,
            last_fault: None,
            sync_regs,
            abi_key: AbiKey::Version as u32,
            serial: Vec::new(),
        }
    }

    /// This vCPU's `kvm_run` mapping, for the kick handler.
    pub(crate) fn kvm_run(&mut self) -> *mut kvm_run {
        self.fd.get_kvm_run()
    }

    /// Writes out the serial bytes not yet written (a partial line).
    pub(crate) fn flush_serial(&mut self, console: &Console) {
        if !self.serial.is_empty() {
            console.write(&self.serial);
            self.serial.clear();
        }
    }

    /// A serial byte: buffered, and written out at the end of each line.
    fn serial_byte(&mut self, byte: u8, console: &Console) {
        self.serial.push(byte);
        if byte == b'\n' || self.serial.len() >= SERIAL_LINE_MAX {
            self.flush_serial(console);
        }
    }

    fn err(&self, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        let vcpu = self.index;
        move |source| VmmError::Vcpu { op, vcpu, source }
    }

    pub(crate) fn regs(&self) -> Result<kvm_regs, VmmError> {
        self.fd.get_regs().map_err(self.err("KVM_GET_REGS"))
    }

    /// `KVM_RUN` to the next exit, retrying `EAGAIN`; `None` if a kick
    /// interrupted it. Reads and hypercalls are answered by `replies`.
    fn run_decoded(&mut self, replies: &dyn Replies) -> Result<Option<Exit>, VmmError> {
        loop {
            match self.fd.run() {
                Ok(exit) => return Ok(Some(Exit::decode_with(exit, replies))),
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(e) if e.errno() == libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    return Ok(None);
                }
                Err(source) => {
                    return Err(VmmError::Vcpu {
                        op: "KVM_RUN",
                        vcpu: self.index,
                        source,
                    });
                }
            }
        }
    }

    pub(crate) fn run_raw(&mut self) -> Result<Exit, VmmError> {
        loop {
            if let Some(exit) = self.run_decoded(&NoReplies)? {
                return Ok(exit);
            }
        }
    }

    /// Answers a doorbell: the result goes to rax, the rest of the registers
    /// (rip included) stay as they are.
    fn doorbell(&mut self, answer: impl FnOnce(&kvm_regs) -> i64) -> Result<(), VmmError> {
        if self.sync_regs {
            let regs = self.fd.sync_regs().regs;
            self.fd.sync_regs_mut().regs.rax = answer(&regs) as u64;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            return Ok(());
        }
        let mut regs = self.regs()?;
        regs.rax = answer(&regs) as u64;
        self.fd.set_regs(&regs).map_err(self.err("KVM_SET_REGS"))
    }

    fn dump(&self) -> String {
        let Ok(r) = self.regs() else {
            return "  (registers unavailable)".into();
        };
        let sregs = self.fd.get_sregs().ok();
        let mut s = format!(
            "  rip {:#018x}  rsp {:#018x}  rflags {:#x}\n  rax {:#018x}  rbx {:#018x}  rcx {:#018x}  rdx {:#018x}\n  rsi {:#018x}  rdi {:#018x}  rbp {:#018x}\n  r8  {:#018x}  r9  {:#018x}  r10 {:#018x}  r11 {:#018x}\n  r12 {:#018x}  r13 {:#018x}  r14 {:#018x}  r15 {:#018x}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15
        );
        if let Some(sr) = sregs {
            s.push_str(&format!(
                "\n  cr0 {:#x}  cr2 {:#x}  cr3 {:#x}  cr4 {:#x}  efer {:#x}  cs {:#x}",
                sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer, sr.cs.selector
            ));
        }
        s
    }

    /// Ends the run for `exit`, with the registers.
    fn guest_error(&self, exit: Exit) -> VmmError {
        VmmError::Guest {
            vcpu: self.index,
            dump: self.dump(),
            exit,
        }
    }
}

/// The longest serial line buffered before it is written anyway.
pub(crate) const SERIAL_LINE_MAX: usize = 4096;

/// What the VMM answers while an exit is decoded: the ABI port, the serial
/// port's line status, and hypercalls.
struct Answers<'a> {
    shared: &'a Shared,
    abi_key: u32,
}

impl Replies for Answers<'_> {
    fn port_in(&self, port: u16, data: &mut [u8]) -> bool {
        if abi::in_width(port) != Some(data.len() as u8) {
            return false;
        }
        match port {
            PORT_SERIAL_LSR => data[0] = SERIAL_LSR_IDLE,
            PORT_ABI => data.copy_from_slice(&self.shared.abi_value(self.abi_key).to_le_bytes()),
            _ => return false,
        }
        true
    }

    fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> bool {
        self.shared.mmio_read(gpa, data)
    }

    fn mmio_write(&self, gpa: u64, data: &[u8]) -> bool {
        self.shared.mmio_write(gpa, data)
    }

    fn hypercall(&self, nr: u64, args: &[u64; 6]) -> u64 {
        self.shared.hypercall(DoorbellArgs {
            nr,
            a0: args[0],
            a1: args[1],
            a2: args[2],
            a3: args[3],
        }) as u64
    }
}

/// Runs `vcpu` to its next exit and handles it.
pub(crate) fn run_once(
    vcpu: &mut VcpuState,
    shared: &Shared,
    console: &Console,
    counts: &mut ExitCounts,
) -> Result<Step, VmmError> {
    let answers = Answers {
        shared,
        abi_key: vcpu.abi_key,
    };
    let Some(exit) = vcpu.run_decoded(&answers)? else {
        return Ok(Step::Interrupted);
    };
    counts.add(exit.reason());
    if !matches!(exit, Exit::MemoryFault { .. }) {
        vcpu.last_fault = None;
    }
    match &exit {
        &Exit::IoOut { port, value, size } => {
            match abi::out_width(port) {
                None => {
                    return Err(VmmError::UnknownPort {
                        vcpu: vcpu.index,
                        port,
                        exit,
                    });
                }
                Some(expected) if expected != size => {
                    return Err(VmmError::BadWidth {
                        vcpu: vcpu.index,
                        port,
                        size,
                        expected,
                    });
                }
                Some(_) => {}
            }
            match port {
                PORT_SERIAL => vcpu.serial_byte(value as u8, console),
                PORT_EXIT => {
                    vcpu.flush_serial(console);
                    return Ok(Step::Exit(value as i32));
                }
                PORT_ABI => vcpu.abi_key = value,
                PORT_HYPERCALL => vcpu.doorbell(|r| {
                    shared.hypercall(DoorbellArgs {
                        nr: r.rax & 0xffff_ffff,
                        a0: r.rbx,
                        a1: r.rcx,
                        a2: r.rdx,
                        a3: r.rsi,
                    })
                })?,
                PORT_SHARED_CONSOLE => {
                    vcpu.flush_serial(console);
                    vcpu.doorbell(|r| shared.print_shared(r.rbx, r.rcx, console))?
                }
                PORT_DISCARD => vcpu.doorbell(|r| shared.discard(r.rbx, r.rcx))?,
                PORT_SNAPSHOT => {
                    if crate::snapshot::guest_request(vcpu, shared, console)?
                        == Some(crate::snapshot::Then::Stop)
                    {
                        // The run ends here: the vCPU is done, as if halted.
                        shared.stop_for_snapshot();
                        return Ok(Step::Halted);
                    }
                }
                _ => {
                    return Err(VmmError::UnknownPort {
                        vcpu: vcpu.index,
                        port,
                        exit,
                    });
                }
            }
        }
        &Exit::IoIn {
            port,
            size,
            answered,
        } => {
            if !answered {
                if let Some(expected) = abi::in_width(port) {
                    return Err(VmmError::BadWidth {
                        vcpu: vcpu.index,
                        port,
                        size,
                        expected,
                    });
                }
                return Err(VmmError::UnknownPort {
                    vcpu: vcpu.index,
                    port,
                    exit,
                });
            }
        }
        Exit::Hlt => {
            vcpu.flush_serial(console);
            return Ok(Step::Halted);
        }
        &Exit::MemoryFault { gpa, size, flags } => {
            if vcpu.last_fault == Some(gpa) {
                return Err(VmmError::RepeatedFault {
                    vcpu: vcpu.index,
                    gpa,
                });
            }
            vcpu.last_fault = Some(gpa);
            shared
                .gate
                .handle_memory_fault(flags, gpa, size)
                .map_err(|source| VmmError::Fault {
                    vcpu: vcpu.index,
                    gpa,
                    source,
                })?;
        }
        // Answered through HypercallExit::ret while it was decoded.
        Exit::Hypercall { .. } => {}
        Exit::Mmio { answered: true, .. } => {}
        Exit::Mmio { .. }
        | Exit::Shutdown
        | Exit::InternalError
        | Exit::FailEntry(_)
        | Exit::Other(_) => return Err(vcpu.guest_error(exit)),
    }
    Ok(Step::Continue(exit))
}
