//! What a run is told about live migration and what it reports of it:
//! plain data (endpoints, the plan, the report),
//! apart from the migration machinery ([`crate::migrate`]), so that the
//! machine's shared state can hold it without depending on that machinery.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use gmem::snapshot::SealKey;

/// Where a migration goes, or where one comes from: `unix:PATH` or
/// `tcp:ADDR:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix stream socket at a path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Endpoint, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, like unix:/tmp/gmem.sock".into());
            }
            Ok(Endpoint::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse().map(Endpoint::Tcp).map_err(|e| {
                format!("tcp:{addr}: {e} (an address and port, like tcp:127.0.0.1:4444)")
            })
        } else {
            Err(format!("{s}: an endpoint is unix:PATH or tcp:ADDR:PORT"))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// How a run migrates when it is asked to (by its plan's signal).
#[derive(Clone, Debug)]
pub struct MigrationPlan {
    /// The signal that starts the migration (`SIGUSR2`, say).
    pub signal: i32,
    /// Where the destination listens.
    pub to: Endpoint,
    /// The key both sides hold (private pages are sealed under it); a
    /// guest with private pages is not migrated without one.
    pub key: Option<SealKey>,
    /// The most pre-copy rounds.
    pub max_rounds: u32,
    /// Pre-copy stops once this many bytes are left to send.
    pub converge_bytes: u64,
    /// Post-copy: after one pre-copy round the guest moves at once, and
    /// the destination faults in what it does not hold yet.
    pub postcopy: bool,
}

/// The post-copy phase of a migration.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PostcopyTaken {
    /// 2 MiB blocks sent after the switch.
    pub blocks: usize,
    /// Of those, sent because the destination asked (a fault there).
    pub requested: usize,
    /// Guest bytes sent after the switch.
    pub data_bytes: u64,
    /// From the switch to every block in at the destination, in µs.
    pub elapsed_us: u64,
}

/// One pre-copy round, as the run reports it.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct RoundTaken {
    /// Guest bytes sent.
    pub data_bytes: u64,
    /// Bytes dirtied meanwhile.
    pub dirty_after: u64,
    /// How long it took, in µs.
    pub us: u64,
}

/// A migration a run completed: the run ended there, and the destination
/// runs the guest.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MigrationTaken {
    /// Where it went.
    pub to: String,
    /// The pre-copy rounds.
    pub rounds: Vec<RoundTaken>,
    /// Guest bytes the stop-and-copy sent, with the vCPU paused.
    pub final_data_bytes: u64,
    /// Bytes of the whole stream.
    pub stream_bytes: u64,
    /// Guest RAM in bytes.
    pub guest_bytes: u64,
    /// `stream_bytes / guest_bytes`.
    pub bytes_per_guest_byte: f64,
    /// Guest bytes sent sealed.
    pub sealed_bytes: u64,
    /// From the signal to the vCPU's pause, in µs (pre-copy).
    pub precopy_us: u64,
    /// From the vCPU's pause to the destination's answer, in µs: the
    /// downtime, as the source sees it (the destination resumes the guest
    /// right after it answers).
    pub downtime_us: u64,
    /// From the signal to the answer, in µs.
    pub total_us: u64,
    /// `CLOCK_MONOTONIC` at the vCPU's pause, in ns (with the
    /// destination's `resumed_at_ns` on the same host: the exact downtime).
    pub paused_at_ns: u64,
    /// The post-copy phase, if the migration had one.
    pub postcopy: Option<PostcopyTaken>,
}
