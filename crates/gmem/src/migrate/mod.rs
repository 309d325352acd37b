//! Live migration of a VM's memory between processes (or hosts), pre-copy,
//! over any byte stream: a Unix socket, TCP. The stream reuses the
//! snapshot format's records (`docs/migration-stream.md`).
//!
//! **Source** ([`Gatekeeper::migrate_to`](crate::Gatekeeper::migrate_to)):
//! dirty tracking starts, the header goes out, and the VMM sends pre-copy
//! rounds while the guest runs ([`MigrationSource::precopy`]): the first
//! holds every populated page, each later one what was dirtied during the
//! one before (KVM's dirty log, host writes, device pins, conversions and
//! discards; [`Gatekeeper::take_dirty`](crate::Gatekeeper::take_dirty)).
//! When what is left is small, or the round budget is spent, the VMM pauses
//! the vCPUs and calls [`MigrationSource::complete`] with their state: the
//! last dirty pages, the attribute map, the state and the end go out.
//!
//! **Destination** ([`Incoming`]): the header names the layout, the VMM
//! builds a VM of it, and [`Incoming::receive`] applies each record after
//! checking it, so a VM is never run on a stream it has not wholly
//! received: a cut, corrupt or forged stream poisons the new gatekeeper.
//! The destination then answers [`ACK_RUNNING`] and waits; the source
//! answers [`GO_AHEAD`] and its VMM exits, and only then does the
//! destination run the guest. With any other answer (or none) the source
//! resumes its guest, and a destination without the go-ahead never runs
//! it: the two never both run it.
//!
//! **Post-copy** ([`MigrationSource::switch_to_postcopy`]): the state and
//! the attribute map go first, the destination says it is ready
//! ([`Postcopy::answer_running`]), the source's go-ahead record comes back
//! in the stream, and the guest runs at the destination while the source
//! serves the rest ([`PostcopySource::serve`]).
//!
//! **Private memory** leaves the process only sealed: under the key both
//! sides hold (XChaCha20-Poly1305, the snapshot's AEAD), private pages and
//! the state are encrypted, and every other record and the header are
//! authenticated, each record's ordinal its nonce, so records cannot be
//! edited, dropped, reordered or replayed from another migration. Without
//! a key a VM with private pages is refused.
//!
//! ```
//! use gmem::migrate::{Incoming, MigrationOptions};
//! use gmem::snapshot::SealKey;
//! use gmem::{Attribute, BackingKind, GateOptions, Gatekeeper, MemoryOptions, SlotRequest, Vm};
//!
//! let gate_of = |vm: &Vm| -> Result<Gatekeeper, gmem::Error> {
//!     let mem = gmem::create_memory(MemoryOptions::new(BackingKind::Memfd, 2 << 20), Some(vm))?;
//!     let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 << 20))?;
//!     Ok(Gatekeeper::new(vm, vec![b], GateOptions::default())?)
//! };
//! let Ok(vm) = Vm::new() else { return Ok(()) }; // no /dev/kvm here
//! let source = gate_of(&vm)?;
//! source.write(0x1000, b"private")?;
//! source.convert(0x1000, 0x1000, Attribute::Private)?;
//! let key = SealKey::new([9; 32]);
//!
//! let mut wire = Vec::new();
//! let mut m = source.migrate_to(&mut wire, MigrationOptions::new().with_key(key.clone()))?;
//! m.precopy()?;
//! source.write(0x8000, b"dirtied after the round")?;
//! m.complete(b"vcpu state")?; // the vCPUs are paused here
//!
//! let vm2 = Vm::new()?;
//! let dest = gate_of(&vm2)?;
//! let mut r = wire.as_slice();
//! let incoming = Incoming::read_header(&mut r)?;
//! let report = incoming.receive(&dest, &mut r, Some(&key))?;
//! assert_eq!(report.state, b"vcpu state");
//! assert_eq!(dest.attribute(0x1000), Some(Attribute::Private));
//! let mut b = [0u8; 23];
//! dest.read(0x8000, &mut b)?;
//! assert_eq!(&b, b"dirtied after the round");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod receive;
mod send;

pub use error::MigrateError;
pub use receive::{Incoming, IncomingReport};
pub use receive::{Postcopy, Received};
pub use send::{
    MigrationOptions, MigrationReport, MigrationSource, PostcopyReport, PostcopySource, RoundReport,
};

/// A migration stream's first 8 bytes.
pub const MAGIC: &[u8; 8] = b"GMEMMIGR";
/// The migration stream version this gmem writes and reads.
pub const VERSION: u32 = 2;
/// The destination's answer once it holds the whole VM and is ready to run
/// it. The source answers [`GO_AHEAD`] (and from then on never resumes the
/// guest); the destination runs the guest only once it has read that.
pub const ACK_RUNNING: u8 = b'K';
/// Pre-copy, the source's answer to [`ACK_RUNNING`]: the destination may
/// run the guest, and the source's VMM exits. A destination that never
/// reads it does not run the guest, so the two never both run it (a
/// connection lost between the two answers loses the guest instead).
pub const GO_AHEAD: u8 = b'G';
/// The destination's answer when it refused the stream: the source's VMM
/// resumes its guest.
pub const ACK_FAILED: u8 = b'F';
/// Pre-copy rounds by default.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// What is left to send when pre-copy stops by default: 4 MiB, about 4 ms
/// over a Unix socket on the reference host.
pub const DEFAULT_CONVERGE_BYTES: u64 = 4 << 20;
/// The most rounds a destination accepts: with every round at most the
/// guest's size, a stream costs the destination bounded work.
pub const MAX_ROUNDS: u32 = 1024;
/// Post-copy, destination to source: every block is in, and the
/// go-ahead (the source reports success only on it).
pub const POSTCOPY_DONE: u64 = u64::MAX;
/// Post-copy, destination to source: the destination is ready to run the
/// guest. The source answers with the go-ahead record in the stream, and
/// from then on must never resume it; the destination runs the guest once
/// the go-ahead has come ([`Postcopy::answer_running`]).
pub const POSTCOPY_RUNNING: u64 = u64::MAX - 1;
/// Post-copy, destination to source: the stream was refused (the source
/// may resume the guest).
pub const POSTCOPY_FAILED: u64 = u64::MAX - 2;
/// How long a post-copy source waits for the destination's last word, and
/// a destination for a block it asked for.
pub const POSTCOPY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
