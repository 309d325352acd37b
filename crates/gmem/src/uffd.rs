//! userfaultfd(2), by raw ioctls: what a lazy restore (and a post-copy
//! migration) fills guest memory with on first touch. The uapi structs and
//! numbers below are `linux/userfaultfd.h`'s, defined here because neither
//! `libc` nor `rustix` has them, and the `userfaultfd` crate (0.9) lacks the
//! shmem and hugetlbfs feature bits and `UFFDIO_CONTINUE`.
//!
//! A [`Userfaultfd`] is an owned fd. Registering a range is `unsafe`: the
//! ioctls that resolve faults write memory behind Rust's back, so the
//! caller vouches that the range is a shared file mapping nothing else
//! treats as Rust memory.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::backing::BackingError;

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_CONTINUE: libc::c_ulong = 0xc020_aa07;
/// `UFFDIO_REGISTER_MODE_MISSING`.
pub const MODE_MISSING: u64 = 1;
/// `UFFDIO_REGISTER_MODE_MINOR`.
pub const MODE_MINOR: u64 = 4;
/// `UFFD_FEATURE_MISSING_HUGETLBFS`.
pub const FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// `UFFD_FEATURE_MISSING_SHMEM`.
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_MINOR_HUGETLBFS`.
pub const FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// `UFFD_FEATURE_MINOR_SHMEM`.
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// A userfaultfd, with the features its `UFFDIO_API` handshake granted.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    features: u64,
}

fn os(op: &'static str) -> BackingError {
    BackingError::syscall(op, std::io::Error::last_os_error())
}

impl Userfaultfd {
    /// Opens a userfaultfd (close-on-exec, non-blocking, kernel faults
    /// included: KVM's come from the kernel) and asks for `features`.
    ///
    /// # Errors
    /// The kernel's errno: `ENOSYS` without userfaultfd, `EPERM` where an
    /// unprivileged process may not handle kernel faults, `EINVAL` for a
    /// feature it lacks.
    pub fn new(features: u64) -> Result<Userfaultfd, BackingError> {
        // SAFETY: userfaultfd(2) takes flags only and returns a new fd or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(os("userfaultfd(O_CLOEXEC|O_NONBLOCK)"));
        }
        // SAFETY: `raw` is a new fd this process owns and nothing else holds.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `uffdio_api`, which `api` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            return Err(os("ioctl(UFFDIO_API)"));
        }
        Ok(Userfaultfd {
            fd,
            features: api.features,
        })
    }

    /// The features the kernel granted.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `[addr, addr + len)` in `mode` ([`MODE_MISSING`],
    /// [`MODE_MINOR`]).
    ///
    /// # Safety
    /// The range must be a shared file mapping this process owns for as long
    /// as it stays registered, that no Rust reference covers: resolving its
    /// faults ([`copy`](Self::copy), [`cont`](Self::cont)) writes it.
    ///
    /// # Errors
    /// The kernel's errno (`EINVAL` on a mapping the mode does not support).
    pub unsafe fn register(&self, addr: usize, len: usize, mode: u64) -> Result<(), BackingError> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `uffdio_register`; the
        // caller vouches for the range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
            return Err(os("ioctl(UFFDIO_REGISTER)"));
        }
        Ok(())
    }

    /// Unregisters a range; faults waiting in it are woken (and then fault as
    /// if no userfaultfd were there).
    ///
    /// # Errors
    /// The kernel's errno.
    pub fn unregister(&self, addr: usize, len: usize) -> Result<(), BackingError> {
        let mut r = UffdioRange {
            start: addr as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER reads a `uffdio_range`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r) } < 0 {
            return Err(os("ioctl(UFFDIO_UNREGISTER)"));
        }
        Ok(())
    }

    /// Wakes the threads waiting on faults in a range.
    ///
    /// # Errors
    /// The kernel's errno.
    pub fn wake(&self, addr: usize, len: usize) -> Result<(), BackingError> {
        let mut r = UffdioRange {
            start: addr as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE reads a `uffdio_range`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r) } < 0 {
            return Err(os("ioctl(UFFDIO_WAKE)"));
        }
        Ok(())
    }

    /// `UFFDIO_COPY`: allocates the pages of `[dst, dst + src.len())` (a
    /// registered range, whole pages of its mapping) with `src`'s bytes,
    /// maps them and wakes the faults there.
    ///
    /// A page already present stops the copy: with `exists_ok` (a zero page
    /// for a hole another thread filled meanwhile) the faults are woken and
    /// the call succeeds; without it, that is the kernel's `EEXIST`, for a
    /// fill that expected every page missing must not leave some of them
    /// with other bytes.
    ///
    /// # Errors
    /// The kernel's errno (`EEXIST` as above, `ENOMEM`, `ENOSPC` on a
    /// drained hugetlb pool, `ENOENT`/`EFAULT` on an unmapped range).
    pub fn copy(&self, dst: usize, src: &[u8], exists_ok: bool) -> Result<(), BackingError> {
        let mut done = 0usize;
        while done < src.len() {
            let mut c = UffdioCopy {
                dst: (dst + done) as u64,
                src: src[done..].as_ptr() as u64,
                len: (src.len() - done) as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `src` (a live slice of the length
            // given) and writes only the registered range, which `register`'s
            // caller vouched for; it writes the struct's `copy` field.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) };
            if rc == 0 {
                return Ok(());
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                // Some pages were copied before the kernel stopped: go on.
                Some(libc::EAGAIN) if c.copy > 0 => done += c.copy as usize,
                Some(libc::EAGAIN) => {}
                Some(libc::EEXIST) if exists_ok => return self.wake(dst, src.len()),
                _ => return Err(BackingError::syscall("ioctl(UFFDIO_COPY)", err)),
            }
        }
        Ok(())
    }

    /// `UFFDIO_CONTINUE`: maps the page-cache pages of `[addr, addr + len)`
    /// (a range registered [`MODE_MINOR`]) and wakes their faults.
    ///
    /// # Errors
    /// The kernel's errno (`EFAULT` where the page cache has no page).
    pub fn cont(&self, addr: usize, len: usize) -> Result<(), BackingError> {
        let mut c = UffdioContinue {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: 0,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE reads and writes a `uffdio_continue`; it
        // maps pages the file already holds, in the registered range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_CONTINUE, &mut c) } < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EEXIST) {
                return self.wake(addr, len);
            }
            return Err(BackingError::syscall("ioctl(UFFDIO_CONTINUE)", err));
        }
        Ok(())
    }

    /// Reads the pending page-fault events into `out` (their addresses),
    /// without blocking; how many.
    ///
    /// # Errors
    /// The kernel's errno, but not `EAGAIN` (no event: 0).
    pub fn read_faults(&self, out: &mut Vec<u64>) -> Result<usize, BackingError> {
        let mut msgs = [0u8; 32 * 64];
        // SAFETY: reads at most `msgs.len()` bytes into the buffer.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), msgs.len()) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(0);
            }
            return Err(BackingError::syscall("read(userfaultfd)", err));
        }
        let mut count = 0;
        for m in msgs[..n as usize].chunks_exact(32) {
            // struct uffd_msg: event (u8), 7 reserved bytes, then for a page
            // fault: flags (u64), address (u64), ptid (u32).
            if m[0] == UFFD_EVENT_PAGEFAULT {
                out.push(u64::from_le_bytes(m[16..24].try_into().unwrap_or_default()));
                count += 1;
            }
        }
        Ok(count)
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
