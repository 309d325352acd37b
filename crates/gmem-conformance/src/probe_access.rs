//! Touching memory that may fault, without killing the test process.
//!
//! The access runs in a child made with `clone(CLONE_VM)`: the child shares
//! this process's address space, so it sees exactly the mappings under test
//! (including those marked `MADV_DONTFORK`, which a `fork`ed child would not
//! have), and a fault kills only the child. The parent reads the signal from
//! `waitpid`.

use std::ptr;

/// What a probe's access did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The access completed.
    Completed,
    /// The child died of this signal.
    Signal(i32),
}

#[repr(C)]
struct Job {
    addr: *mut u8,
    len: usize,
    write: Option<u8>,
}

extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Job` the parent passed to clone and keeps alive
    // until the child has been reaped.
    let job = unsafe { &*arg.cast::<Job>() };
    for i in (0..job.len).step_by(64) {
        // SAFETY: the address may fault; that is the point of the probe, and a
        // fault kills only this child. No Rust object lives in the range.
        unsafe {
            let p = job.addr.add(i);
            match job.write {
                Some(b) => ptr::write_volatile(p, b),
                None => {
                    ptr::read_volatile(p);
                }
            }
        }
    }
    0
}

/// Reads (or, with `write`, fills) `[addr, addr + len)` every 64 bytes in a
/// `CLONE_VM` child and reports how it ended.
pub fn probe(addr: *mut u8, len: usize, write: Option<u8>) -> Access {
    let mut job = Job { addr, len, write };
    let mut stack = vec![0u8; 256 << 10];
    // SAFETY: the stack is 256 KiB owned by this frame and outlives the child
    // (it is reaped below); its top is 16-byte aligned; `child` touches only
    // `job` and the probed range, takes no locks and allocates nothing.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len()) as usize & !15;
        libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::SIGCHLD,
            ptr::from_mut(&mut job).cast(),
        )
    };
    assert!(pid > 0, "clone failed: {}", std::io::Error::last_os_error());
    let mut status = 0;
    loop {
        // SAFETY: waits for the child just created; `status` is a valid out-pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        assert!(
            std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR),
            "waitpid failed"
        );
    }
    drop(stack);
    if libc::WIFSIGNALED(status) {
        Access::Signal(libc::WTERMSIG(status))
    } else {
        Access::Completed
    }
}
