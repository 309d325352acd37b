//! Adopting files a VMM made itself: a guest_memfd from its own
//! `KVM_CREATE_GUEST_MEMFD`, a memfd or hugetlb memfd it sealed. Each file is
//! checked before gmem takes it over (what it is, its size, its seals, its
//! flags); a refusal hands the fd back in the error, untouched.
//!
//! The [`RestrictedMemory`](super::RestrictedMemory) trait stays sealed:
//! adoption goes through these constructors, which make the same
//! [`GuestMemfd`], [`SealedMemfd`] and [`HugetlbMemfd`] the conformance suite
//! certifies, so every file behind the trait still behaves as the kernel
//! does. A trait open to any implementor could not promise that (nor the
//! pointers and lengths the gatekeeper's unsafe code relies on).

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::SealFlags;
use thiserror::Error;

use super::file::FileCore;
use super::guest_memfd::GuestMemfd;
use super::hugetlb::HugetlbMemfd;
use super::memfd::SUPPORTED_FLAGS;
use super::sealed_memfd::SealedMemfd;
use super::{BackingKind, GmemFlags, validate_create};
use crate::kvm::Vm;

/// `HUGETLBFS_MAGIC` from `<linux/magic.h>` (the libc crate lacks it).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Why a file was not adopted. The fd comes back with it.
#[derive(Debug, Error)]
#[error("fd {raw} was not adopted as {kind}: {reason}")]
pub struct AdoptError {
    /// The fd, handed back untouched.
    pub fd: OwnedFd,
    /// Its number, for the message.
    raw: i32,
    /// What it was to become.
    pub kind: BackingKind,
    /// Why not.
    pub reason: AdoptReason,
}

impl AdoptError {
    fn new(fd: OwnedFd, kind: BackingKind, reason: AdoptReason) -> AdoptError {
        AdoptError {
            raw: fd.as_raw_fd(),
            fd,
            kind,
            reason,
        }
    }

    /// The errno for the same misuse: `EINVAL`, or the kernel's.
    pub fn errno(&self) -> i32 {
        match &self.reason {
            AdoptReason::Syscall { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            AdoptReason::Backing(e) => e.errno(),
            _ => libc::EINVAL,
        }
    }
}

/// What was wrong with an fd offered for adoption.
#[derive(Debug)]
#[non_exhaustive]
pub enum AdoptReason {
    /// The fd is another kind of file.
    WrongKind {
        /// What `/proc/self/fd` says it is.
        is: String,
        /// What it had to be.
        expected: &'static str,
    },
    /// The file's size breaks a creation rule, or is not the size given.
    Size(super::BackingError),
    /// A memfd without the seals that fix its size.
    MissingSeals {
        /// The seals it has.
        have: u32,
        /// The seals gmem needs (`F_SEAL_GROW|F_SEAL_SHRINK|F_SEAL_SEAL`).
        need: u32,
    },
    /// Flags the file cannot have on this VM, a kernel without guest_memfd,
    /// or a file gmem owns already ([`BackingError::AlreadyOwned`](super::BackingError::AlreadyOwned),
    /// `EBUSY`: one file has one owner, whatever fd it comes through).
    Backing(super::BackingError),
    /// The guest_memfd was created with other flags than the ones given
    /// (found by probing: a file adopted as `INIT_SHARED` that is not would
    /// make every host copy take the kernel's `SIGBUS`).
    FlagsDisagree {
        /// The flags given.
        given: u64,
        /// The flags the file has.
        found: u64,
    },
    /// A system call failed while checking.
    Syscall {
        /// The call.
        op: &'static str,
        /// The kernel's error.
        source: std::io::Error,
    },
}

impl fmt::Display for AdoptReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdoptReason::WrongKind { is, expected } => {
                write!(f, "it is {is:?}, not {expected}")
            }
            AdoptReason::Size(e) | AdoptReason::Backing(e) => write!(f, "{e}"),
            AdoptReason::MissingSeals { have, need } => write!(
                f,
                "its seals are {have:#x}; gmem needs {need:#x} (F_SEAL_GROW|F_SEAL_SHRINK|F_SEAL_SEAL) so that its size cannot change"
            ),
            AdoptReason::FlagsDisagree { given, found } => write!(
                f,
                "it was given as flags {given:#x}, but the file has {found:#x} (MMAP = 0x1, INIT_SHARED = 0x2): pass the flags it was created with"
            ),
            AdoptReason::Syscall { op, source } => write!(f, "{op} failed: {source}"),
        }
    }
}

/// What `/proc/self/fd/N` links to.
fn link(fd: BorrowedFd<'_>) -> Result<String, AdoptReason> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|source| AdoptReason::Syscall {
            op: "readlink(/proc/self/fd)",
            source,
        })
}

fn size_of(fd: BorrowedFd<'_>) -> Result<u64, AdoptReason> {
    rustix::fs::fstat(fd)
        .map(|st| st.st_size as u64)
        .map_err(|e| AdoptReason::Syscall {
            op: "fstat",
            source: e.into(),
        })
}

/// Runs `check` on `fd`; on a refusal, the fd goes back in the error.
fn checked<T>(
    fd: OwnedFd,
    kind: BackingKind,
    check: impl FnOnce(BorrowedFd<'_>) -> Result<T, AdoptReason>,
) -> Result<(OwnedFd, T), AdoptError> {
    match check(fd.as_fd()) {
        Ok(t) => Ok((fd, t)),
        Err(reason) => Err(AdoptError::new(fd, kind, reason)),
    }
}

/// Takes a checked fd over: registers its inode (a file gmem owns already
/// is refused: one file has one owner), marks it close-on-exec (an exec'd
/// child must not inherit a way to `pread` private pages), and reserves a
/// hugetlb file's pages. A failure hands the fd back.
fn take(
    fd: OwnedFd,
    kind: BackingKind,
    size: u64,
    flags: GmemFlags,
    owner: Option<crate::kvm::VmId>,
) -> Result<FileCore, AdoptError> {
    if let Err(e) = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC) {
        return Err(AdoptError::new(
            fd,
            kind,
            AdoptReason::Syscall {
                op: "fcntl(F_SETFD, FD_CLOEXEC)",
                source: e.into(),
            },
        ));
    }
    FileCore::try_new(fd, kind, size, flags, owner)
        .map_err(|(fd, e)| AdoptError::new(fd, kind, AdoptReason::Backing(e)))
}

impl GuestMemfd {
    /// Adopts a guest_memfd that the VMM created on `vm` itself, with
    /// `flags` (the kernel does not reveal a file's flags: pass what it was
    /// created with).
    ///
    /// The file is probed for its flags (it is mapped, and its first page
    /// faulted in where it is shared; a hole stays a hole), and adoption is
    /// refused if they are not `flags`.
    ///
    /// Checked first: `vm`'s KVM has guest_memfd at all (a VMM whose own
    /// ioctl failed gets [`BackingError::NoGuestMemfd`](super::BackingError::NoGuestMemfd)
    /// here, `ENOTTY`, and from [`GuestMemfd::create_error`]), it is a guest_memfd (`anon_inode:[kvm-gmem]`), its
    /// size follows the creation rules, and `flags` are ones `vm` accepts.
    /// The kernel checks at bind time that it is `vm`'s: another VM's file
    /// is refused there with `EINVAL`.
    ///
    /// # Errors
    /// [`AdoptError`] with the fd, naming what was wrong.
    pub fn adopt(vm: &Vm, fd: OwnedFd, flags: GmemFlags) -> Result<GuestMemfd, AdoptError> {
        let kind = BackingKind::GuestMemfd;
        let (fd, size) = checked(fd, kind, |fd| {
            if !vm.has_guest_memfd() {
                return Err(AdoptReason::Backing(super::BackingError::NoGuestMemfd));
            }
            let is = link(fd)?;
            if is != "anon_inode:[kvm-gmem]" {
                return Err(AdoptReason::WrongKind {
                    is,
                    expected: "a guest_memfd (anon_inode:[kvm-gmem])",
                });
            }
            let size = size_of(fd)?;
            validate_create(size, flags, vm.supported_gmem_flags(), kind.page_size())
                .map_err(AdoptReason::Size)?;
            // One owner per file: a file gmem owns already is refused before
            // the probe touches it (the registration itself comes after).
            let key = super::registry::key_of(fd).map_err(AdoptReason::Backing)?;
            if super::registry::is_registered(key) {
                return Err(AdoptReason::Backing(super::BackingError::AlreadyOwned {
                    dev: key.dev,
                    ino: key.ino,
                }));
            }
            let found = guest_memfd_flags(fd)?;
            if found != flags {
                return Err(AdoptReason::FlagsDisagree {
                    given: flags.bits(),
                    found: found.bits(),
                });
            }
            Ok(size)
        })?;
        take(fd, kind, size, flags, Some(vm.id())).map(GuestMemfd::from_core)
    }
}

/// The creation flags of the guest_memfd `fd`, found by trying what they
/// allow (the kernel reveals them no other way): `MMAP` if it can be
/// mapped (`mmap` answers `ENODEV` otherwise); `INIT_SHARED` if its first
/// page can be faulted in through that mapping (`MADV_POPULATE_READ`
/// answers `EFAULT` where a touch would raise `SIGBUS`). A page the probe
/// faults in that was a hole is punched again, so the file is left as it
/// was found.
fn guest_memfd_flags(fd: BorrowedFd<'_>) -> Result<GmemFlags, AdoptReason> {
    use rustix::mm::{Advice, MapFlags, ProtFlags};
    let page = crate::range::PAGE_SIZE as usize;
    // SAFETY: a new read-only mapping at an address the kernel chooses;
    // nothing is replaced, and it is unmapped below.
    let map = match unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            page,
            ProtFlags::READ,
            MapFlags::SHARED,
            fd,
            0,
        )
    } {
        Ok(ptr) => ptr,
        Err(rustix::io::Errno::NODEV) => return Ok(GmemFlags::empty()),
        Err(e) => {
            return Err(AdoptReason::Syscall {
                op: "mmap of the guest_memfd's first page (probing MMAP)",
                source: e.into(),
            });
        }
    };
    let was_populated =
        super::file::all_cached(fd, 0, page as u64).map_err(|e| AdoptReason::Syscall {
            op: "cachestat (probing INIT_SHARED)",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    // SAFETY: the range is exactly the mapping made above; POPULATE_READ
    // only faults pages in (reporting EFAULT instead of raising SIGBUS) and
    // changes no content.
    let populate = unsafe { rustix::mm::madvise(map, page, Advice::LinuxPopulateRead) };
    // SAFETY: unmapping exactly the mapping made above, which nothing else
    // refers to.
    let _ = unsafe { rustix::mm::munmap(map, page) };
    let shared = match populate {
        Ok(()) => true,
        Err(rustix::io::Errno::FAULT) => false,
        Err(e) => {
            return Err(AdoptReason::Syscall {
                op: "madvise(MADV_POPULATE_READ) of the guest_memfd's first page (probing INIT_SHARED)",
                source: e.into(),
            });
        }
    };
    if shared && was_populated == Some(false) {
        let _ = rustix::fs::fallocate(
            fd,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            0,
            page as u64,
        );
    }
    Ok(if shared {
        GmemFlags::MMAP | GmemFlags::INIT_SHARED
    } else {
        GmemFlags::MMAP
    })
}

/// The checks a memfd offered for adoption must pass: `expected` is what
/// `/proc/self/fd` must call it, `hugetlb` whether it must be on hugetlbfs.
fn check_memfd(
    fd: BorrowedFd<'_>,
    kind: BackingKind,
    flags: GmemFlags,
) -> Result<u64, AdoptReason> {
    let is = link(fd)?;
    if !is.starts_with("/memfd:") {
        return Err(AdoptReason::WrongKind {
            is,
            expected: "a memfd (/memfd:...)",
        });
    }
    let fs = rustix::fs::fstatfs(fd).map_err(|e| AdoptReason::Syscall {
        op: "fstatfs",
        source: e.into(),
    })?;
    let on_hugetlbfs = fs.f_type as i64 == HUGETLBFS_MAGIC;
    if on_hugetlbfs != kind.is_hugetlb() {
        return Err(AdoptReason::WrongKind {
            is: if on_hugetlbfs {
                format!("{is} on hugetlbfs")
            } else {
                format!("{is} on shmem")
            },
            expected: if kind.is_hugetlb() {
                "a hugetlb memfd"
            } else {
                "a shmem memfd (adopt hugetlb ones as HugetlbMemfd)"
            },
        });
    }
    if kind.is_hugetlb() {
        let st = rustix::fs::fstat(fd).map_err(|e| AdoptReason::Syscall {
            op: "fstat",
            source: e.into(),
        })?;
        if st.st_blksize as u64 != kind.page_size() {
            return Err(AdoptReason::WrongKind {
                is: format!("{is} with {:#x}-byte pages", st.st_blksize),
                expected: if kind == BackingKind::Hugetlb2M {
                    "a hugetlb memfd of 2 MiB pages"
                } else {
                    "a hugetlb memfd of 1 GiB pages"
                },
            });
        }
    }
    let seals = rustix::fs::fcntl_get_seals(fd).map_err(|e| AdoptReason::Syscall {
        op: "fcntl(F_GET_SEALS)",
        source: e.into(),
    })?;
    let need = SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL;
    if !seals.contains(need) {
        return Err(AdoptReason::MissingSeals {
            have: seals.bits(),
            need: need.bits(),
        });
    }
    let size = size_of(fd)?;
    validate_create(size, flags, SUPPORTED_FLAGS, kind.page_size()).map_err(AdoptReason::Size)?;
    Ok(size)
}

impl SealedMemfd {
    /// Adopts a shmem memfd the VMM created and sealed itself
    /// (`F_SEAL_GROW|F_SEAL_SHRINK|F_SEAL_SEAL`), to be used with `flags`.
    /// `vm`, if given, owns it; otherwise the first VM that binds it does.
    ///
    /// # Errors
    /// [`AdoptError`] with the fd: not a memfd, a hugetlb memfd, missing
    /// seals, a size that breaks the creation rules, unknown flags.
    pub fn adopt(
        fd: OwnedFd,
        flags: GmemFlags,
        vm: Option<&Vm>,
    ) -> Result<SealedMemfd, AdoptError> {
        let kind = BackingKind::Memfd;
        let (fd, size) = checked(fd, kind, |fd| check_memfd(fd, kind, flags))?;
        take(fd, kind, size, flags, vm.map(Vm::id)).map(SealedMemfd::from_core)
    }
}

impl HugetlbMemfd {
    /// Adopts a hugetlb memfd of `kind`'s page size that the VMM created and
    /// sealed itself, as [`SealedMemfd::adopt`].
    ///
    /// # Errors
    /// As [`SealedMemfd::adopt`]; also a page size other than `kind`'s.
    pub fn adopt(
        kind: BackingKind,
        fd: OwnedFd,
        flags: GmemFlags,
        vm: Option<&Vm>,
    ) -> Result<HugetlbMemfd, AdoptError> {
        let (fd, size) = checked(fd, kind, |fd| {
            if !kind.is_hugetlb() {
                return Err(AdoptReason::WrongKind {
                    is: kind.name().to_owned(),
                    expected: "a hugetlb kind (hugetlb-2m, hugetlb-1g)",
                });
            }
            check_memfd(fd, kind, flags)
        })?;
        take(fd, kind, size, flags, vm.map(Vm::id)).map(HugetlbMemfd::from_core)
    }
}
