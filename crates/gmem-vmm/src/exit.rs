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
    /// `in` from a port (answered with all-ones).
    IoIn {
        /// The port.
        port: u16,
        /// How many bytes were read.
        size: u8,
    },
    /// An access to a GPA no slot backs.
    Mmio {
        /// The guest physical address.
        gpa: u64,
        /// The access size.
        size: u8,
        /// Whether it was a write.
        write: bool,
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

impl Exit {
    /// Decodes kvm-ioctls' exit. Port reads are answered with all-ones and
    /// MMIO reads with zeroes, through the borrowed buffers, before returning.
    pub fn decode(exit: VcpuExit<'_>) -> Exit {
        match exit {
            VcpuExit::IoOut(port, data) => {
                let mut bytes = [0u8; 4];
                let n = data.len().min(4);
                bytes[..n].copy_from_slice(&data[..n]);
                Exit::IoOut {
                    port,
                    value: u32::from_le_bytes(bytes),
                    size: n as u8,
                }
            }
            VcpuExit::IoIn(port, data) => {
                data.fill(0xff);
                Exit::IoIn {
                    port,
                    size: data.len() as u8,
                }
            }
            VcpuExit::MmioRead(gpa, data) => {
                data.fill(0);
                Exit::Mmio {
                    gpa,
                    size: data.len() as u8,
                    write: false,
                }
            }
            VcpuExit::MmioWrite(gpa, data) => Exit::Mmio {
                gpa,
                size: data.len() as u8,
                write: true,
            },
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::InternalError => Exit::InternalError,
            VcpuExit::FailEntry(reason, _cpu) => Exit::FailEntry(reason),
            VcpuExit::MemoryFault { flags, gpa, size } => Exit::MemoryFault { gpa, size, flags },
            VcpuExit::Hypercall(h) => Exit::Hypercall {
                nr: h.nr,
                args: h.args,
            },
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
            Exit::IoIn { port, size } => write!(f, "in from port {port:#x} of {size} bytes"),
            Exit::Mmio { gpa, size, write } => write!(
                f,
                "MMIO {} of {size} bytes at GPA {gpa:#x} (no memory there)",
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
