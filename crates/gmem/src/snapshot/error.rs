//! Why a snapshot was not taken, or a restore refused: the errors of the
//! snapshot module, in one place every part of it can name.

use thiserror::Error;

use crate::backing::BackingError;
use crate::gate::GateError;

/// Why a snapshot was not taken. The VM is untouched either way.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The gatekeeper refused to freeze: pins are live, it is poisoned, or
    /// a slot has two backings.
    #[error("the gatekeeper cannot be snapshotted now")]
    Gate(#[from] GateError),
    /// [`PrivatePages::Refuse`](super::PrivatePages::Refuse), and the VM has private pages.
    #[error(
        "the VM has {bytes:#x} bytes of private memory (the first run at [{first_gpa:#x}, +{first_len:#x})) and the policy is Refuse: seal them (PrivatePages::Seal) or omit them (PrivatePages::Omit)"
    )]
    PrivatePages {
        /// Private bytes in all.
        bytes: u64,
        /// The first private run's GPA.
        first_gpa: u64,
        /// Its length.
        first_len: u64,
    },
    /// The caller's state is longer than a snapshot carries.
    #[error("the state is {len} bytes; a snapshot carries at most {max}")]
    StateTooLarge {
        /// Its length.
        len: usize,
        /// The most.
        max: usize,
    },
    /// The populated ranges could not be found.
    #[error("reading which pages are populated")]
    Populated(#[source] BackingError),
    /// The random snapshot id could not be drawn.
    #[error("getrandom(2) for the snapshot's id")]
    Random(#[source] std::io::Error),
    /// Writing the stream failed (a full disk, a closed socket).
    #[error("writing the snapshot")]
    Write(#[source] std::io::Error),
}

impl SnapshotError {
    /// The errno: `EAGAIN` for pins, `EPERM` for refused private pages, the
    /// kernel's for I/O.
    pub fn errno(&self) -> i32 {
        match self {
            SnapshotError::Gate(e) => e.errno(),
            SnapshotError::PrivatePages { .. } => libc::EPERM,
            SnapshotError::StateTooLarge { .. } => libc::E2BIG,
            SnapshotError::Populated(e) => e.errno(),
            SnapshotError::Random(e) | SnapshotError::Write(e) => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }
}

/// Why a restore was refused or stopped. Refused before the memory was
/// touched (a bad header, another layout, a wrong key), the gatekeeper is
/// as it was; stopped part-way (a corrupt or truncated record), it is
/// poisoned and must not run: its memory is neither the snapshot's nor
/// empty.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The stream does not start with `GMEMSNAP`.
    #[error("not a gmem snapshot (its first 8 bytes are not GMEMSNAP)")]
    NotASnapshot,
    /// Another format version.
    #[error(
        "snapshot format version {found}; this gmem reads version {}",
        super::VERSION
    )]
    Version {
        /// The version found.
        found: u32,
    },
    /// The stream ends before the snapshot does.
    #[error("the snapshot is truncated at byte {at}")]
    Truncated {
        /// Where it ends.
        at: u64,
    },
    /// A byte of the snapshot is not what was written.
    #[error("the snapshot is corrupt at byte {at}: {what}")]
    Corrupt {
        /// Where.
        at: u64,
        /// What does not hold.
        what: String,
    },
    /// Reading the stream failed.
    #[error("reading the snapshot")]
    Read(#[source] std::io::Error),
    /// The snapshot's private pages are sealed, and no key was given.
    #[error("the snapshot's private pages are sealed: restoring needs its key")]
    NeedsKey,
    /// A key was given, and the snapshot is not sealed: nothing
    /// authenticates it.
    #[error(
        "a key was given, and the snapshot is not sealed (its private pages were refused or omitted): nothing authenticates it; restore it without a key only if you trust where it came from"
    )]
    NotSealed,
    /// The key does not open the snapshot (or its header was changed).
    #[error(
        "the key does not authenticate the snapshot's layout and attribute map: a wrong key, or a tampered header"
    )]
    WrongKey,
    /// The VM's layout is not the snapshot's.
    #[error(
        "the snapshot has {snapshot} regions ({snapshot_layout}), this VM has {here} ({here_layout}): restore onto a VM bound as the snapshot's was"
    )]
    Layout {
        /// The snapshot's region count.
        snapshot: usize,
        /// Its regions, `[gpa, +len)`.
        snapshot_layout: String,
        /// The VM's region count.
        here: usize,
        /// Its regions.
        here_layout: String,
    },
    /// A lazy restore cannot run here (guest_memfd, no userfaultfd for the
    /// mapping, no thread): nothing changed; restore eagerly.
    #[error("a lazy restore cannot run: {why}")]
    Lazy {
        /// Why.
        why: String,
    },
    /// The gatekeeper cannot take a restore now.
    #[error("the gatekeeper cannot be restored into")]
    Gate(#[from] GateError),
}

impl RestoreError {
    /// The errno: `EINVAL` for bad snapshots and layouts, `EKEYREJECTED` for
    /// keys, the kernel's for I/O.
    pub fn errno(&self) -> i32 {
        match self {
            RestoreError::NeedsKey | RestoreError::WrongKey | RestoreError::NotSealed => {
                libc::EKEYREJECTED
            }
            RestoreError::Read(e) => e.raw_os_error().unwrap_or(libc::EIO),
            RestoreError::Gate(e) => e.errno(),
            RestoreError::Lazy { .. } => libc::EOPNOTSUPP,
            _ => libc::EINVAL,
        }
    }
}
