//! Why a migration was refused or failed.

use thiserror::Error;

use crate::backing::BackingError;
use crate::gate::{DirtyError, GateError};
use crate::snapshot::{RestoreError, SnapshotError};

/// Why a migration was refused or failed. On the source, nothing is
/// changed by any of them: the VM can go on running.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// Private memory and no key: private bytes leave the process only
    /// sealed.
    #[error(
        "the VM has {bytes:#x} private bytes (the first at GPA {first_gpa:#x}) and the migration has no key: private memory leaves the process only sealed"
    )]
    PrivateWithoutKey {
        /// Private bytes at the time.
        bytes: u64,
        /// The first private GPA.
        first_gpa: u64,
    },
    /// The caller's state is larger than a record.
    #[error("the VMM state is {len} bytes; a migration stream carries at most {max}")]
    StateTooLarge {
        /// Its length.
        len: usize,
        /// The most.
        max: usize,
    },
    /// The migration was completed or failed already.
    #[error("the migration source has completed or failed already: start a new one")]
    Finished,
    /// Another pre-copy round would be past what a destination takes
    /// ([`MAX_ROUNDS`](super::MAX_ROUNDS)): nothing was sent, and the
    /// migration can still complete.
    #[error(
        "the migration has sent {max} pre-copy rounds, the most a destination takes: complete it"
    )]
    TooManyRounds {
        /// The most.
        max: u32,
    },
    /// The gatekeeper refused (poisoned, live pins at the stop-and-copy,
    /// two backings).
    #[error(transparent)]
    Gate(#[from] GateError),
    /// Dirty tracking could not start or be read.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// The population of guest memory could not be read.
    #[error("reading which guest pages are populated: {0}")]
    Populated(#[source] BackingError),
    /// Writing the stream failed (the connection dropped).
    #[error("sending the migration stream: {0}")]
    Send(#[source] SnapshotError),
    /// Post-copy cannot run on this source (1 GiB pages); nothing was sent
    /// for the switch, and pre-copy can still complete.
    #[error("post-copy is not possible here: {why}")]
    PostcopyUnsupported {
        /// Why.
        why: String,
    },
    /// A post-copy migration failed after the switch.
    #[error(
        "post-copy failed after the switch ({}): {why}",
        if *took_over { "the destination had started the guest, which is lost" } else { "the destination had not started the guest" }
    )]
    Postcopy {
        /// Whether the destination had said it runs the guest.
        took_over: bool,
        /// What failed.
        why: String,
    },
    /// The incoming stream was refused: not a migration stream, another
    /// version or layout, a missing or wrong key, a corrupt, forged or
    /// truncated record, or a read error. The destination gatekeeper is
    /// poisoned once records were applied: it never runs.
    #[error(transparent)]
    Stream(#[from] RestoreError),
}

impl MigrateError {
    /// The errno the kernel would give for the same condition.
    pub fn errno(&self) -> i32 {
        match self {
            MigrateError::PrivateWithoutKey { .. } => libc::EPERM,
            MigrateError::StateTooLarge { .. } => libc::E2BIG,
            MigrateError::Finished => libc::EINVAL,
            MigrateError::TooManyRounds { .. } => libc::E2BIG,
            MigrateError::Gate(e) => e.errno(),
            MigrateError::Dirty(e) => e.errno(),
            MigrateError::Populated(e) => e.errno(),
            MigrateError::Send(e) => e.errno(),
            MigrateError::Postcopy { .. } => libc::EIO,
            MigrateError::PostcopyUnsupported { .. } => libc::EOPNOTSUPP,
            MigrateError::Stream(e) => e.errno(),
        }
    }
}
