//! Why a machine could not be built or run: every failure of the VMM, each
//! naming the values and the rule.

use gmem::migrate::MigrateError;
use gmem::snapshot::{RestoreError, SnapshotError};
use gmem::{BackingError, BindError, ConvertError, GateError, KvmError};
use thiserror::Error;

use crate::exit::Exit;

/// Why a machine could not be built or run.
#[derive(Debug, Error)]
#[non_exhaustive]
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
    /// A device could not be added.
    #[error("adding a device: {rule}")]
    Devices {
        /// The rule broken.
        rule: String,
    },
    /// An ELF payload was refused.
    #[error("the ELF payload")]
    Elf(#[from] crate::elf::ElfError),
    /// An ELF segment does not fit where payloads may go.
    #[error(
        "ELF segment {index} at {addr:#x} of {len:#x} bytes does not fit: segments must lie in guest RAM below {limit:#x} (the vCPU stacks are above), and clear of the boot structures below {floor:#x}"
    )]
    SegmentOutsideRam {
        /// The program header index.
        index: usize,
        /// Its address.
        addr: u64,
        /// Its size in memory.
        len: u64,
        /// The lowest address a payload may use.
        floor: u64,
        /// One past the highest.
        limit: u64,
    },
    /// An ELF segment overlaps what the VMM writes below the payload floor.
    #[error(
        "ELF segment {index} at [{addr:#x}, {end:#x}) overlaps {what} at [{taken_start:#x}, {taken_end:#x}), which the VMM writes before the payload loads: link the payload at {floor:#x} or above (`ld -Ttext={floor:#x}` puts only the ELF headers below it, at {headers:#x}, which is fine; keep every segment clear of [{taken_start:#x}, {taken_end:#x}))",
        end = addr + len,
        headers = floor - 0x1000
    )]
    SegmentOverBootStructures {
        /// The program header index.
        index: usize,
        /// Its address.
        addr: u64,
        /// Its size in memory.
        len: u64,
        /// What it overlaps: `the GDT` or `the page tables`.
        what: &'static str,
        /// The first byte of what it overlaps.
        taken_start: u64,
        /// One past the last.
        taken_end: u64,
        /// [`PAYLOAD_FLOOR`](crate::boot::PAYLOAD_FLOOR).
        floor: u64,
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
    /// A vCPU thread panicked: a bug in the VMM, never the guest's doing.
    #[error("vCPU {vcpu}'s thread panicked: {message}")]
    VcpuPanicked {
        /// The vCPU index.
        vcpu: usize,
        /// The panic's message.
        message: String,
    },
    /// An access of a width the port does not take.
    #[error(
        "vCPU {vcpu}: a {size}-byte access to port {port:#x}, which takes {expected}-byte accesses"
    )]
    BadWidth {
        /// The vCPU index.
        vcpu: usize,
        /// The port.
        port: u16,
        /// The access's width.
        size: u8,
        /// The port's width.
        expected: u8,
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
    /// The library did not take the snapshot (private pages under
    /// `Refuse`, live pins, a failed write).
    #[error("taking the snapshot")]
    Snapshot(#[source] SnapshotError),
    /// The snapshot file could not be created, written or synced.
    #[error("writing the snapshot {}", path.display())]
    SnapshotIo {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The snapshot file could not be read (or its descriptor duplicated).
    #[error("reading the snapshot")]
    SnapshotRead(#[source] std::io::Error),
    /// The library refused the snapshot's memory (a flipped byte, a wrong
    /// or missing key, another layout); no guest ran.
    #[error("restoring the snapshot")]
    Restore(#[source] RestoreError),
    /// The snapshot's VMM state does not decode; no guest ran.
    #[error("the snapshot's VMM state")]
    State(#[from] crate::state::StateError),
    /// The snapshot file does not describe a machine this VMM builds.
    #[error("the snapshot file: {what}")]
    SnapshotFile {
        /// What does not hold.
        what: String,
    },
    /// A device could not be saved or restored.
    #[error("device {index}: {what}")]
    DeviceState {
        /// The device's window.
        index: usize,
        /// What does not hold.
        what: String,
    },
    /// A vCPU's saved state could not be set.
    #[error("restoring vCPU {vcpu}: {what}")]
    RestoreVcpu {
        /// The vCPU index.
        vcpu: usize,
        /// What failed.
        what: String,
    },
    /// The lazy restore under the run failed (a record did not check out):
    /// the vCPUs were stopped.
    #[error("the lazy restore failed, and the run was stopped: {reason}")]
    LazyRestore {
        /// The library's reason.
        reason: String,
    },
    /// The library refused or failed a migration (either side).
    #[error("migrating the machine")]
    Migrate(#[source] MigrateError),
    /// The migration's connection could not be made, read or written.
    #[error("the migration connection ({what})")]
    MigrationIo {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The incoming stream does not describe a machine this VMM builds.
    #[error("the incoming migration: {what}")]
    MigrationStream {
        /// What does not hold.
        what: String,
    },
    /// A post-copy migration failed after the destination had started the
    /// guest: neither side holds all of it any more.
    #[error(
        "post-copy migration failed after the destination took over, and the guest is lost: {why}"
    )]
    MigrationLost {
        /// What failed.
        why: String,
    },
}
