//! What a run is told about snapshots and what it reports of them: plain
//! data, apart from the snapshot machinery ([`crate::snapshot`]), so that
//! the machine's shared state can hold it without depending on that
//! machinery.

use std::path::PathBuf;

use gmem::snapshot::PrivatePages;

/// What a run does after the snapshot it was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Then {
    /// The run ends (status 0) once the snapshot is written.
    #[default]
    Stop,
    /// The guest continues.
    Continue,
}

/// Where and how a run takes the snapshots it is asked for (by the guest,
/// or by `SIGUSR1`).
#[derive(Clone, Debug)]
pub struct SnapshotPlan {
    /// The file (created, or truncated).
    pub path: PathBuf,
    /// What becomes of private pages.
    pub private: PrivatePages,
    /// Stop or continue afterwards.
    pub then: Then,
}

/// A snapshot a run took.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotTaken {
    /// The file.
    pub path: PathBuf,
    /// Bytes of the stream.
    pub stream_bytes: u64,
    /// Guest bytes in clear, sealed, omitted.
    pub shared_bytes: u64,
    /// See `shared_bytes`.
    pub sealed_bytes: u64,
    /// See `shared_bytes`.
    pub omitted_bytes: u64,
    /// Bytes of VMM state.
    pub state_bytes: usize,
    /// How long the vCPU was stopped for it, in µs.
    pub pause_us: u64,
    /// Who asked: `guest` or `signal`.
    pub by: &'static str,
}
