//! # gmem-guest: the guest side of gmem's ABI
//!
//! For payloads of `gmem run` written in Rust (`no_std`). The ABI is
//! `docs/guest-abi.md`; this crate is its guest half:
//!
//! - [`entry!`] defines `_start`: at CPL0 it builds an `iretq` frame and
//!   drops to CPL3 with IOPL 3 (on this project's hosts CPL0 code is
//!   emulated, about 1 µs an instruction, and the emulator rejects SSE; CPL3
//!   code runs natively), with `rsp ≡ 8 (mod 16)` at the entry of Rust code,
//!   then calls the guest's `main` and ends the run with its status;
//! - [`console`]: `print!`/`println!` to the serial port;
//! - [`exit`] ends the run with a status;
//! - [`mem`]: conversions (`KVM_HC_MAP_GPA_RANGE` through the doorbell) and
//!   discard;
//! - [`abi`]: the port numbers and the ABI information port;
//! - [`snapshot`] asks the VMM for a snapshot of the whole machine;
//! - [`virtio`]: a bounce-buffer pool converted to shared at start (as
//!   SWIOTLB does) and a `virtio-drivers` `Hal` whose `share`/`unshare` copy
//!   through it, so the drivers of the `virtio-drivers` crate run here and
//!   devices only ever see shared pages;
//! - [`blk`]: a virtio-blk driver over `virtio-drivers`' queue that puts a
//!   batch of requests in flight per notification;
//! - the runtime pieces a `no_std` binary needs here: a panic handler that
//!   prints and exits with status 101, `rust_eh_personality`, and `memcpy`,
//!   `memmove`, `memset`, `memcmp`, `bcmp` (there is no C library).
//!
//! `vmcall` is never executed: on this project's hosts it hangs the vCPU.
#![no_std]

extern crate alloc;

pub mod abi;
pub mod blk;
pub mod console;
mod entry;
pub mod io;
pub mod mem;
mod runtime;
pub mod say;
pub mod virtio;

/// What the VMM passed at entry.
#[derive(Clone, Copy, Debug)]
pub struct Boot {
    /// Guest RAM in bytes (`rdi` at entry).
    pub ram_size: u64,
    /// This vCPU's index (`rsi` at entry).
    pub vcpu: u64,
}

/// Parks this vCPU for the rest of the run (CPL3 code cannot `hlt`): for
/// vCPUs other than the one doing the work; the run ends when that one
/// exits.
pub fn park() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Where [`snapshot`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Snapshot {
    /// In the run that took the snapshot.
    Taken,
    /// In a run restored from it.
    Resumed,
}

/// Asks the VMM for a snapshot (port `0xf9`): the whole machine is saved
/// and this call returns twice, as it were: [`Snapshot::Taken`] now, and
/// [`Snapshot::Resumed`] in every run restored from the snapshot. When the
/// VMM was told to stop after it, the run ends here instead.
///
/// # Errors
/// The VMM's errno: `-ENOSYS` (-38) when it takes no snapshots (no
/// snapshot file), `-EBUSY` (-16) when the other vCPUs cannot be paused
/// (one has ended, or a migration is pausing them).
pub fn snapshot() -> Result<Snapshot, mem::Errno> {
    console::flush();
    // SAFETY: the ABI's snapshot port; the VMM saves the machine and
    // changes only rax.
    let ret = unsafe { io::doorbell::<{ abi::PORT_SNAPSHOT as u8 }>(0, 0, 0, 0) };
    match ret {
        abi::SNAPSHOT_TAKEN => Ok(Snapshot::Taken),
        abi::SNAPSHOT_RESUMED => Ok(Snapshot::Resumed),
        e => Err(mem::Errno(e)),
    }
}

/// Ends the run with `status` (port `0xf4`); never returns.
pub fn exit(status: i32) -> ! {
    console::flush();
    // SAFETY: an `out` to the ABI's exit port; the VMM ends the run.
    unsafe { io::outl(abi::PORT_EXIT, status as u32) };
    // The VMM stops this vCPU; CPL3 cannot `hlt`, so wait.
    loop {
        core::hint::spin_loop();
    }
}
