//! vCPU exits as the VMM sees them: a plain enum decoded from kvm-ioctls'
//! borrowed `VcpuExit`, so that exit handling is a function of data and can
//! be tested without KVM.

use std::fmt;

use kvm_ioctls::VcpuExit;

/// One vCPU exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `out` to a port.
    IoOut {
        /// The port.
        port: u16,
        /// The value, zero-extended (1, 2 or 4 bytes written).
        value: u32,
        /// How many bytes were written.
        size: u8,
    },
    /// `in` from a port.
    IoIn {
        /// The port.
        port: u16,
        /// How many bytes were read.
        size: u8,
        /// Whether a device answered (otherwise the guest read all-ones).
        answered: bool,
    },
    /// An access to a GPA no slot backs.
    Mmio {
        /// The guest physical address.
        gpa: u64,
        /// The access size.
        size: u8,
        /// Whether it was a write.
        write: bool,
        /// Whether a device took the access (a read that none answered read
        /// zeroes).
        answered: bool,
    },
    /// `hlt`.
    Hlt,
    /// A triple fault or similar.
    Shutdown,
    /// KVM could not emulate something.
    InternalError,
    /// `KVM_EXIT_FAIL_ENTRY`, with the hardware reason.
    FailEntry(u64),
    /// `KVM_EXIT_MEMORY_FAULT`.
    MemoryFault {
        /// The faulting GPA.
        gpa: u64,
        /// The size of the range.
        size: u64,
        /// `KVM_MEMORY_EXIT_FLAG_*`.
        flags: u64,
    },
    /// `KVM_EXIT_HYPERCALL`.
    Hypercall {
        /// The hypercall number.
        nr: u64,
        /// Its arguments.
        args: [u64; 6],
    },
    /// Any other exit, by name.
    Other(String),
}

/// The VMM's answers to the exits that wait for one: port and MMIO reads,
/// and hypercalls. Each is answered through kvm-ioctls' borrowed buffers
/// while the exit is decoded, so the device model that owns the port or
/// address is the one that answers.
pub trait Replies {
    /// Fills `data` for an `in` from `port`; false if nothing owns it.
    fn port_in(&self, port: u16, data: &mut [u8]) -> bool;
    /// Fills `data` for a read of `gpa`; false if nothing owns it.
    fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> bool;
    /// Takes a write of `data` to `gpa`; false if nothing owns it.
    fn mmio_write(&self, gpa: u64, data: &[u8]) -> bool;
    /// The return value of hypercall `nr`.
    fn hypercall(&self, nr: u64, args: &[u64; 6]) -> u64;
}

/// Answers nothing: reads see all-ones (ports) and zeroes (MMIO), and
/// hypercalls `-KVM_ENOSYS`.
pub struct NoReplies;

impl Replies for NoReplies {
    fn port_in(&self, _: u16, _: &mut [u8]) -> bool {
        false
    }

    fn mmio_read(&self, _: u64, _: &mut [u8]) -> bool {
        false
    }

    fn mmio_write(&self, _: u64, _: &[u8]) -> bool {
        false
    }

    fn hypercall(&self, _: u64, _: &[u64; 6]) -> u64 {
        (-crate::abi::KVM_ENOSYS) as u64
    }
}

impl Exit {
    /// Decodes kvm-ioctls' exit, answering nothing ([`NoReplies`]).
    pub fn decode(exit: VcpuExit<'_>) -> Exit {
        Exit::decode_with(exit, &NoReplies)
    }

    /// Decodes kvm-ioctls' exit, answering reads and hypercalls with
    /// `replies` through the exit's own buffers (the hypercall's through
    /// `HypercallExit::ret`).
    pub fn decode_with(exit: VcpuExit<'_>, replies: &dyn Replies) -> Exit {
        match exit {
            VcpuExit::IoOut(port, data) => {
                let mut bytes = [0u8; 4];
                let n = data.len().min(4);
                bytes[..n].copy_from_slice(&data[..n]);
                Exit::IoOut {
                    port,
                    value: u32::from_le_bytes(bytes),
                    size: data.len() as u8,
                }
            }
            VcpuExit::IoIn(port, data) => {
                let answered = replies.port_in(port, data);
                if !answered {
                    data.fill(0xff);
                }
                Exit::IoIn {
                    port,
                    size: data.len() as u8,
                    answered,
                }
            }
            VcpuExit::MmioRead(gpa, data) => {
                let answered = replies.mmio_read(gpa, data);
                if !answered {
                    data.fill(0);
                }
                Exit::Mmio {
                    gpa,
                    size: data.len() as u8,
                    write: false,
                    answered,
                }
            }
            VcpuExit::MmioWrite(gpa, data) => Exit::Mmio {
                gpa,
                size: data.len() as u8,
                write: true,
                answered: replies.mmio_write(gpa, data),
            },
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::InternalError => Exit::InternalError,
            VcpuExit::FailEntry(reason, _cpu) => Exit::FailEntry(reason),
            VcpuExit::MemoryFault { flags, gpa, size } => Exit::MemoryFault { gpa, size, flags },
            VcpuExit::Hypercall(h) => {
                *h.ret = replies.hypercall(h.nr, &h.args);
                Exit::Hypercall {
                    nr: h.nr,
                    args: h.args,
                }
            }
            other => Exit::Other(format!("{other:?}")),
        }
    }

    /// The reason's name, for reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Exit::IoOut { .. } | Exit::IoIn { .. } => "io",
            Exit::Mmio { .. } => "mmio",
            Exit::Hlt => "hlt",
            Exit::Shutdown => "shutdown",
            Exit::InternalError => "internal-error",
            Exit::FailEntry(_) => "fail-entry",
            Exit::MemoryFault { .. } => "memory-fault",
            Exit::Hypercall { .. } => "hypercall",
            Exit::Other(_) => "other",
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::IoOut { port, value, size } => {
                write!(f, "out to port {port:#x} of {size} bytes: {value:#x}")
            }
            Exit::IoIn { port, size, .. } => {
                write!(f, "in from port {port:#x} of {size} bytes")
            }
            Exit::Mmio {
                gpa, size, write, ..
            } => write!(
                f,
                "MMIO {} of {size} bytes at GPA {gpa:#x} (no memory or device there)",
                if *write { "write" } else { "read" }
            ),
            Exit::Hlt => f.write_str("hlt"),
            Exit::Shutdown => f.write_str("shutdown (triple fault)"),
            Exit::InternalError => f.write_str("KVM internal error"),
            Exit::FailEntry(r) => write!(f, "VM entry failed, hardware reason {r:#x}"),
            Exit::MemoryFault { gpa, size, flags } => {
                write!(
                    f,
                    "memory fault at GPA {gpa:#x}+{size:#x}, flags {flags:#x}"
                )
            }
            Exit::Hypercall { nr, .. } => write!(f, "hypercall {nr}"),
            Exit::Other(name) => write!(f, "unhandled exit {name}"),
        }
    }
}
