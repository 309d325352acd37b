//! Snapshots of a VM's memory, through its gatekeeper: [`Gatekeeper::snapshot`](crate::Gatekeeper::snapshot)
//! streams the layout, the attribute map and the populated runs to any
//! `Write`; [`Gatekeeper::restore`](crate::Gatekeeper::restore) fills a new VM's files from one. The
//! format is versioned and documented in `docs/snapshot-format.md`.
//!
//! - **Only populated runs** are written: holes stay holes, so a sparse
//!   guest's snapshot is the size of what it touched.
//! - **Bounded memory**: one chunk ([`CHUNK`], 1 MiB) at a time, whatever
//!   the guest's size.
//! - **Integrity**: every record carries a CRC-32C, and the last one counts
//!   the records and bytes, so a flipped, cut or dropped byte is refused.
//! - **Consistency**: the gatekeeper is frozen while it runs (no
//!   conversion, discard or copy), and a snapshot with pins live is refused
//!   (a device could write through them). The VMM pauses its vCPUs.
//! - **Private pages** follow the caller's [`PrivatePages`], with no
//!   default: refused, sealed with an AEAD under a key the caller gives
//!   ([`SealKey`]), or omitted (restored private and zero). No private byte
//!   reaches the stream in clear.
//! - **The caller's state** (a VMM's vCPUs and devices) rides along:
//!   [`Gatekeeper::snapshot_with_state`](crate::Gatekeeper::snapshot_with_state),
//!   sealed with the private pages; [`RestoreReport::state`] and
//!   [`LazyRestore::state`] give it back.
//!
//! ## Lazy restore
//!
//! [`Gatekeeper::restore_lazy`](crate::Gatekeeper::restore_lazy) checks a
//! snapshot file's header, key, index and end, and returns at once: the VM
//! can run. Each block (one record on memfd, one huge page on hugetlb) is
//! filled when first touched: by a userfaultfd thread when the guest
//! touches it (`MISSING` + `UFFDIO_COPY` on the mapping KVM runs the guest
//! from), and by the host path itself before gatekeeper copies, pins and
//! `DeviceMemory` reach it, so host code never reads a restored page as
//! zero. A prefetcher fills the rest, the blocks of a recorded
//! [`PrefetchOrder`] first. guest_memfd mappings take no userfaultfd on
//! this kernel: restore them eagerly ([`RestoreError::Lazy`] says so).
//!
//! ```
//! use gmem::snapshot::{LazyOptions, PrivatePages};
//! use gmem::{BackingKind, GateOptions, Gatekeeper, MemoryOptions, SlotRequest, Vm};
//!
//! let Ok(vm) = Vm::new() else { return Ok(()) }; // no /dev/kvm here
//! let gate_of = |vm: &Vm| -> Result<Gatekeeper, gmem::Error> {
//!     let mem = gmem::create_memory(MemoryOptions::new(BackingKind::Memfd, 2 << 20), Some(vm))?;
//!     let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 << 20))?;
//!     Ok(Gatekeeper::new(vm, vec![b], GateOptions::default())?)
//! };
//! let gate = gate_of(&vm)?;
//! gate.write(0x4000, b"before")?;
//! let mut file = std::fs::File::from(rustix::fs::memfd_create("snap", rustix::fs::MemfdFlags::CLOEXEC)?);
//! gate.snapshot_with_state(&mut file, &PrivatePages::Refuse, b"vcpus")?;
//!
//! let vm2 = Vm::new()?;
//! let gate2 = gate_of(&vm2)?;
//! let lazy = gate2.restore_lazy(file, None, LazyOptions::new())?;
//! assert_eq!(lazy.state(), b"vcpus");
//! let mut buf = [0u8; 6];
//! gate2.read(0x4000, &mut buf)?; // filled before it is read
//! assert_eq!(&buf, b"before");
//! lazy.finish()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ```
//! use gmem::snapshot::{PrivatePages, SealKey};
//! use gmem::{Attribute, BackingKind, GateOptions, Gatekeeper, MemoryOptions, Policy, SlotRequest, Vm};
//!
//! let Ok(vm) = Vm::new() else { return Ok(()) }; // no /dev/kvm here
//! let mem = gmem::create_memory(MemoryOptions::new(BackingKind::Memfd, 2 << 20), Some(&vm))?;
//! let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 << 20))?;
//! let gate = Gatekeeper::new(&vm, vec![b], GateOptions::default())?;
//! gate.write(0x1000, b"guest state")?;
//! gate.convert(0x1000, 0x1000, Attribute::Private)?;
//! let key = SealKey::new([7; 32]);
//! let mut stream = Vec::new();
//! gate.snapshot(&mut stream, &PrivatePages::Seal(key.clone()))?;
//!
//! // A new VM of the same layout, on any backing.
//! let vm2 = Vm::new()?;
//! let mem2 = gmem::create_memory(MemoryOptions::new(BackingKind::Memfd, 2 << 20), Some(&vm2))?;
//! let b2 = vm2.bind(&mem2, SlotRequest::new(0, 0, 2 << 20))?;
//! let gate2 = Gatekeeper::new(&vm2, vec![b2], GateOptions::default())?;
//! gate2.restore(&mut stream.as_slice(), Some(&key))?;
//! assert_eq!(gate2.attribute(0x1000), Some(Attribute::Private));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
pub(crate) mod format;
pub(crate) mod lazy;
pub(crate) mod restore;
pub(crate) mod seal;
mod write;

pub use error::{RestoreError, SnapshotError};
pub use format::{CHUNK, MAGIC, MAX_STATE, VERSION};
pub use lazy::{LazyOptions, LazyProgress, LazyRestore, PrefetchOrder};
pub use restore::{RestoreReport, SnapshotInfo};
pub use seal::SealKey;
pub use write::SnapshotReport;

/// What a snapshot does with private pages: the caller chooses, there is no
/// default.
#[derive(Clone, Debug)]
pub enum PrivatePages {
    /// A VM with private pages is not snapshotted
    /// ([`SnapshotError::PrivatePages`]).
    Refuse,
    /// Private runs are encrypted and authenticated (XChaCha20-Poly1305)
    /// under this key; the layout and the attribute map are authenticated
    /// too. Restoring needs the same key.
    Seal(SealKey),
    /// Private pages are not saved: they are restored private and zero.
    Omit,
}
