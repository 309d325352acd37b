//! What `gmem run` and `gmem restore` share about snapshots: the options
//! (`--snapshot`, `--snapshot-then`, `--key`, `--omit-private`), the key
//! file, and the messages for a refused snapshot.

use std::path::{Path, PathBuf};

use anyhow::Context;
use gmem::snapshot::{PrivatePages, SealKey, SnapshotError};
use gmem_vmm::{SnapshotPlan, Then, VmmError};

/// `--snapshot-then`.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum ThenArg {
    /// The run ends once the snapshot is written (status 0).
    #[default]
    Stop,
    /// The guest continues.
    Continue,
}

/// The snapshot options of `gmem run` and `gmem restore`.
#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// Take the snapshots the guest asks for (port 0xf9), or SIGUSR1
    /// does, into FILE.
    #[arg(long, value_name = "FILE")]
    pub snapshot: Option<PathBuf>,
    /// What the run does after the snapshot.
    #[arg(long, value_enum, default_value_t = ThenArg::Stop, requires = "snapshot")]
    pub snapshot_then: ThenArg,
    /// A 32-byte key file: private pages and the VMM state are sealed
    /// under it (XChaCha20-Poly1305). Without it, a guest with private
    /// pages is not snapshotted, unless --omit-private.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Without --key: save no private page (restored as zeroes: a guest
    /// whose code or stack is in private memory, as every guest's is by
    /// default, does not survive the restore).
    #[arg(long, conflicts_with = "key")]
    pub omit_private: bool,
}

impl SnapshotArgs {
    /// The plan these options give, if `--snapshot` was given.
    pub fn plan(&self) -> anyhow::Result<Option<SnapshotPlan>> {
        let Some(path) = &self.snapshot else {
            return Ok(None);
        };
        let private = match (&self.key, self.omit_private) {
            (Some(k), _) => PrivatePages::Seal(read_key(k)?),
            (None, true) => PrivatePages::Omit,
            (None, false) => PrivatePages::Refuse,
        };
        Ok(Some(SnapshotPlan {
            path: path.clone(),
            private,
            then: match self.snapshot_then {
                ThenArg::Stop => Then::Stop,
                ThenArg::Continue => Then::Continue,
            },
        }))
    }
}

/// Reads a key file: exactly 32 bytes.
pub fn read_key(path: &Path) -> anyhow::Result<SealKey> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading the key file {}", path.display()))?;
    SealKey::from_slice(&bytes).map_err(|len| {
        anyhow::anyhow!(
            "the key file {} has {len} bytes: a key is exactly 32 bytes (e.g. `head -c 32 /dev/urandom > {}`)",
            path.display(),
            path.display()
        )
    })
}

/// A VMM error with the CLI's advice where the fix is an option.
pub fn explain(e: VmmError) -> anyhow::Error {
    let advice = match &e {
        VmmError::Snapshot(SnapshotError::PrivatePages { .. }) => Some(
            "the guest has private pages: pass --key FILE (32 bytes) to seal them, or --omit-private to leave them out",
        ),
        VmmError::Restore(gmem::snapshot::RestoreError::NeedsKey) => {
            Some("the snapshot is sealed: pass the --key FILE it was taken with")
        }
        VmmError::Restore(gmem::snapshot::RestoreError::WrongKey) => {
            Some("--key is not the key the snapshot was taken with (or the file was changed)")
        }
        _ => None,
    };
    match advice {
        Some(a) => anyhow::Error::new(e).context(a),
        None => anyhow::Error::new(e),
    }
}
