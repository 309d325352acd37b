//! The restricted memory file and its minimal ops API.
//!
//! [`RestrictedMemory`] is the one interface every consumer (bindings,
//! conversion, the VMM) uses: size, page size, allocate, punch hole, the
//! populated ranges, the fd and a host mapping. It is deliberately small, as the
//! guest_memfd design asked for a dedicated minimal API instead of an overlay of
//! a file system's operations. It is sealed to the three backings below, whose
//! behaviour the conformance suite certifies:
//!
//! | backing | module | made by |
//! |---|---|---|
//! | `guest-memfd` | [`guest_memfd`] | `KVM_CREATE_GUEST_MEMFD` on a VM |
//! | `memfd` | [`sealed_memfd`] | `memfd_create` + `F_SEAL_GROW\|F_SEAL_SHRINK\|F_SEAL_SEAL` |
//! | `hugetlb-2m`, `hugetlb-1g` | [`hugetlb`] | the same with `MFD_HUGETLB` |
//!
//! Every backing validates its arguments with the same code, in the kernel's
//! order, so a bad call gets the same [`BackingError`] (and [`errno`]) on all
//! of them, and a refused call changes nothing.
//!
//! [`errno`]: BackingError::errno

mod adopt;
mod create;
pub(crate) mod file;
pub mod guest_memfd;
pub mod hugetlb;
pub(crate) mod mapping;
mod memfd;
pub(crate) mod registry;
pub mod sealed_memfd;

use std::fmt;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::str::FromStr;

use thiserror::Error;

pub use adopt::{AdoptError, AdoptReason};
pub use create::create_memory;
pub use guest_memfd::GuestMemfd;
pub use hugetlb::{HugePagePool, HugetlbMemfd};
pub use mapping::{AccessError, HostMapping};
pub use sealed_memfd::SealedMemfd;

use crate::kvm::VmId;
use crate::range::{FileRange, MAX_FILE_OFFSET, PAGE_SIZE, RangeError, is_page_aligned};

/// The backings, by the names the CLI and JSON use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum BackingKind {
    /// The kernel's guest_memfd (`guest-memfd`).
    #[cfg_attr(feature = "serde", serde(rename = "guest-memfd"))]
    GuestMemfd,
    /// A sealed shmem memfd (`memfd`).
    #[cfg_attr(feature = "serde", serde(rename = "memfd"))]
    Memfd,
    /// A sealed hugetlb memfd with 2 MiB pages (`hugetlb-2m`).
    #[cfg_attr(feature = "serde", serde(rename = "hugetlb-2m"))]
    Hugetlb2M,
    /// A sealed hugetlb memfd with 1 GiB pages (`hugetlb-1g`).
    #[cfg_attr(feature = "serde", serde(rename = "hugetlb-1g"))]
    Hugetlb1G,
}

impl BackingKind {
    /// Every backing, in the order the CLI lists them.
    pub const ALL: [BackingKind; 4] = [
        BackingKind::GuestMemfd,
        BackingKind::Memfd,
        BackingKind::Hugetlb2M,
        BackingKind::Hugetlb1G,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            BackingKind::GuestMemfd => "guest-memfd",
            BackingKind::Memfd => "memfd",
            BackingKind::Hugetlb2M => "hugetlb-2m",
            BackingKind::Hugetlb1G => "hugetlb-1g",
        }
    }

    /// The size of the backing's pages: what it allocates and frees at once.
    pub fn page_size(self) -> u64 {
        match self {
            BackingKind::GuestMemfd | BackingKind::Memfd => PAGE_SIZE,
            BackingKind::Hugetlb2M => 2 << 20,
            BackingKind::Hugetlb1G => 1 << 30,
        }
    }

    /// Whether the backing uses the hugetlb pool.
    pub fn is_hugetlb(self) -> bool {
        matches!(self, BackingKind::Hugetlb2M | BackingKind::Hugetlb1G)
    }
}

impl fmt::Display for BackingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown backing name.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("unknown backing {0:?}; expected one of guest-memfd, memfd, hugetlb-2m, hugetlb-1g")]
pub struct UnknownBacking(pub String);

impl FromStr for BackingKind {
    type Err = UnknownBacking;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackingKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownBacking(s.to_owned()))
    }
}

bitflags::bitflags! {
    /// Creation flags, with guest_memfd's meaning on every backing (spec §1.3).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct GmemFlags: u64 {
        /// `GUEST_MEMFD_FLAG_MMAP`: the host may map the file.
        const MMAP = crate::kvm::uapi::GUEST_MEMFD_FLAG_MMAP;
        /// `GUEST_MEMFD_FLAG_INIT_SHARED`: the memory is shared, so host
        /// accesses through a mapping are allowed.
        const INIT_SHARED = crate::kvm::uapi::GUEST_MEMFD_FLAG_INIT_SHARED;
    }
}

/// What a punch did: how many bytes had their pages released, and how many
/// could only be zeroed in place (parts of huge pages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PunchReport {
    /// Bytes of the range (inside the file) that lie in whole backing pages;
    /// those pages are released and read as zeroes afterwards.
    pub bytes_freed: u64,
    /// Bytes that lie in partial huge pages; they are zeroed in place and
    /// their pages stay allocated. Always 0 on 4 KiB backings.
    pub bytes_zeroed: u64,
}

impl std::ops::AddAssign for PunchReport {
    fn add_assign(&mut self, rhs: Self) {
        self.bytes_freed += rhs.bytes_freed;
        self.bytes_zeroed += rhs.bytes_zeroed;
    }
}

/// Why a backing refused a call. Each variant names the values and the rule.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackingError {
    /// The range is malformed or out of bounds.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The size given at creation breaks a rule.
    #[error("size {size:#x} is invalid: it {rule}")]
    InvalidSize {
        /// The size given.
        size: u64,
        /// The rule it broke.
        rule: &'static str,
    },
    /// Creation flags outside what the VM (or backing) supports.
    #[error(
        "flags {requested:#x} requested, but only {supported:#x} are supported (MMAP = 0x1, INIT_SHARED = 0x2)"
    )]
    UnsupportedFlags {
        /// The flags asked for.
        requested: u64,
        /// The flags accepted.
        supported: u64,
    },
    /// The backing is made through a VM, and none was given.
    #[error("the {kind} backing is created through a VM (KVM_CREATE_GUEST_MEMFD); none was given")]
    NeedsVm {
        /// The backing.
        kind: BackingKind,
    },
    /// The kernel has no guest_memfd.
    #[error("this kernel's KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0)")]
    NoGuestMemfd,
    /// The hugetlb pool has too few free pages.
    #[error(
        "the {page_size_kib} KiB huge page pool has {free} free pages, {needed} are needed (raise /proc/sys/vm/nr_hugepages or /sys/kernel/mm/hugepages/hugepages-{page_size_kib}kB/nr_hugepages)"
    )]
    HugePagesExhausted {
        /// The huge page size in KiB.
        page_size_kib: u64,
        /// Pages the file needs.
        needed: u64,
        /// Pages free (and not reserved) in the pool.
        free: u64,
    },
    /// The file was created without `MMAP`, so the host may not map it.
    #[error(
        "the file was created with flags {flags:#x}, without MMAP (0x1): the host may not map it"
    )]
    MappingNotAllowed {
        /// The file's creation flags.
        flags: u64,
    },
    /// The operation is not available on this backing.
    #[error("{op} is not available on the {kind} backing: {reason}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The backing.
        kind: BackingKind,
        /// Why not.
        reason: &'static str,
    },
    /// The kernel counts more populated bytes than gmem can locate.
    #[error(
        "the file holds {populated:#x} populated bytes but only {located:#x} can be located: on hugetlbfs, pages faulted in through a mapping gmem does not own, or dropped from one with MADV_DONTNEED, are visible to no query"
    )]
    Unlocatable {
        /// Bytes gmem located.
        located: u64,
        /// Bytes the kernel counts (`st_blocks`).
        populated: u64,
    },
    /// The file is a gmem file already: one file has one owner.
    #[error(
        "the file (device {dev:#x}, inode {ino}) is a gmem file of this process already: one file has one owner (share its Arc<dyn RestrictedMemory> instead of adopting it again)"
    )]
    AlreadyOwned {
        /// `st_dev`.
        dev: u64,
        /// `st_ino`.
        ino: u64,
    },
    /// A gatekeeper holds the file: its content changes through it.
    #[error(
        "{op} of [{offset:#x}, +{len:#x}) refused: a gatekeeper holds this file, and discards go through it (Gatekeeper::discard), which checks pins and private pages"
    )]
    Gated {
        /// The operation.
        op: &'static str,
        /// The file offset.
        offset: u64,
        /// The length.
        len: u64,
    },
    /// A lazy restore is filling the file: populating it now would put zero
    /// pages where the snapshot's belong.
    #[error(
        "{op} of [{offset:#x}, +{len:#x}) refused: a lazy restore is filling this file; wait for it (LazyRestore::wait or finish)"
    )]
    Restoring {
        /// The operation.
        op: &'static str,
        /// The file offset.
        offset: u64,
        /// The length.
        len: u64,
    },
    /// The range holds pages a gatekeeper left private.
    #[error(
        "{op} of [{offset:#x}, +{len:#x}) refused: file offset {private:#x} was private when the last gatekeeper over it was dropped, and only a gatekeeper may change private memory"
    )]
    PrivatePages {
        /// The operation.
        op: &'static str,
        /// The file offset.
        offset: u64,
        /// The length.
        len: u64,
        /// The first retained private offset.
        private: u64,
    },
    /// A discarded huge page could not be reserved again: the pool was
    /// drained meanwhile, and a host access would find no page to fault in.
    #[error(
        "[{offset:#x}, +{len:#x}) of the {page_size_kib} KiB hugetlb file has no huge page reserved: it was discarded and the pool has no free page to reserve again ({free} free); free huge pages or raise the pool"
    )]
    Unreserved {
        /// The file offset.
        offset: u64,
        /// The length.
        len: u64,
        /// The huge page size in KiB.
        page_size_kib: u64,
        /// Free pages in the pool now.
        free: u64,
    },
    /// A system call failed.
    #[error("{op} failed")]
    Syscall {
        /// The call, with its main arguments.
        op: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
}

impl BackingError {
    /// The errno the kernel gives for the same misuse of a guest_memfd.
    pub fn errno(&self) -> i32 {
        match self {
            BackingError::Range(e) => e.errno(),
            BackingError::InvalidSize { .. }
            | BackingError::UnsupportedFlags { .. }
            | BackingError::NeedsVm { .. } => libc::EINVAL,
            BackingError::NoGuestMemfd => libc::ENOTTY,
            BackingError::HugePagesExhausted { .. } => libc::ENOMEM,
            BackingError::MappingNotAllowed { .. } => libc::ENODEV,
            BackingError::AlreadyOwned { .. }
            | BackingError::Gated { .. }
            | BackingError::Restoring { .. }
            | BackingError::PrivatePages { .. } => libc::EBUSY,
            BackingError::Unreserved { .. } => libc::ENOMEM,
            BackingError::Unsupported { .. } | BackingError::Unlocatable { .. } => libc::EOPNOTSUPP,
            BackingError::Syscall { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    pub(crate) fn syscall(op: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        BackingError::Syscall {
            op: op.into(),
            source: source.into(),
        }
    }
}

/// Checks creation arguments in the kernel's order (spec §2.1): flags first,
/// then the size. `page_size` is the backing's page size.
pub(crate) fn validate_create(
    size: u64,
    flags: GmemFlags,
    supported: u64,
    page_size: u64,
) -> Result<(), BackingError> {
    if flags.bits() & !supported != 0 {
        return Err(BackingError::UnsupportedFlags {
            requested: flags.bits(),
            supported,
        });
    }
    let rule = if size == 0 {
        "must be greater than zero"
    } else if size > MAX_FILE_OFFSET {
        "must not exceed i64::MAX"
    } else if !is_page_aligned(size) {
        "must be a multiple of the page size 0x1000"
    } else if !size.is_multiple_of(page_size) {
        "must be whole huge pages (a multiple of the backing's page size)"
    } else {
        return Ok(());
    };
    Err(BackingError::InvalidSize { size, rule })
}

pub(crate) mod sealed {
    use super::VmId;
    use super::file::FileCore;

    /// What bindings need of a file and nobody else may call, and the shared
    /// core every backing keeps.
    pub trait Sealed {
        /// The fd, size, flags, owner and KVM mapping every backing has.
        fn core(&self) -> &FileCore;

        /// Records `vm` as the file's VM if it has none yet; returns the owner
        /// if it is another VM.
        fn claim(&self, vm: VmId) -> Result<(), VmId> {
            self.core().claim(vm)
        }
    }
}

/// The minimal ops API of a restricted memory file.
///
/// A file has a fixed size, starts empty (reads as zero), is populated with
/// [`allocate`](Self::allocate) or by faults, and discarded with
/// [`punch_hole`](Self::punch_hole), after which every consumer (guest and
/// host) reads zeroes. Host code reaches the memory through the VM's
/// [`Gatekeeper`](crate::Gatekeeper), which refuses private pages; the raw
/// paths ([`as_fd`](Self::as_fd), [`map_host`](Self::map_host)) are
/// `unsafe`, with the gatekeeper's rules as their contract.
///
/// The trait is sealed: the conformance suite certifies exactly the three
/// backings of this module.
pub trait RestrictedMemory: sealed::Sealed + fmt::Debug + Send + Sync {
    /// Which backing this is.
    fn kind(&self) -> BackingKind {
        self.core().kind
    }

    /// The size in bytes, fixed at creation.
    fn size(&self) -> u64 {
        self.core().size
    }

    /// The backing's page size (4 KiB, 2 MiB or 1 GiB).
    fn page_size(&self) -> u64 {
        self.kind().page_size()
    }

    /// The creation flags.
    fn flags(&self) -> GmemFlags {
        self.core().flags
    }

    /// The VM the file belongs to, if it was created for one or has been bound.
    fn owner(&self) -> Option<VmId> {
        self.core().owner.get().copied()
    }

    /// Populates `range`, as `fallocate(FALLOC_FL_KEEP_SIZE)`.
    ///
    /// Pages already present keep their contents. On hugetlb backings every
    /// huge page the range touches is populated.
    ///
    /// # Errors
    /// [`RangeError::PastEnd`] (`EINVAL`) if the range reaches past the size;
    /// [`BackingError::Syscall`] with the kernel's errno (`ENOMEM`, `EINTR`,
    /// `ENOSPC` for an empty hugetlb pool) otherwise.
    fn allocate(&self, range: FileRange) -> Result<(), BackingError> {
        self.core().allocate(range)
    }

    /// Discards `range`, as `fallocate(FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE)`.
    ///
    /// Like the kernel's punch it has no size check: the part past the end is
    /// ignored. Every binding of the range is invalidated, so the guest reads
    /// zeroes next time, and so does the host. On hugetlb backings the parts of
    /// the range that do not cover a whole huge page are zeroed in place, and
    /// the huge pages freed are reserved for the file again, so that no
    /// later fault finds the pool drained.
    ///
    /// Only a file no gatekeeper holds may be punched here: a gatekeeper's
    /// file is discarded through [`Gatekeeper::discard`](crate::Gatekeeper::discard),
    /// which refuses pinned ranges and keeps its subscribers told.
    ///
    /// # Errors
    /// [`BackingError::Gated`] (`EBUSY`) while a gatekeeper holds the file;
    /// [`BackingError::PrivatePages`] (`EBUSY`) for a range a dropped
    /// gatekeeper left private (only a gatekeeper changes private memory);
    /// [`BackingError::Syscall`] with the kernel's errno.
    fn punch_hole(&self, range: FileRange) -> Result<PunchReport, BackingError> {
        self.core().punch_ungated(range)
    }

    /// The populated ranges of the file, in order, merged.
    ///
    /// # Errors
    /// [`BackingError::Unsupported`] on a guest_memfd without `MMAP`, whose
    /// population the kernel does not reveal; [`BackingError::Syscall`] if a
    /// query fails.
    fn populated(&self) -> Result<Vec<Range<u64>>, BackingError>;

    /// The file descriptor, for `fstat` and for tests of the kernel's own
    /// behaviour.
    ///
    /// # Safety
    /// The fd reaches every byte of the file, private pages included, and
    /// nothing checks what is done with it. The caller must:
    /// - not read, write or map through it any page that is private, or that
    ///   a [`Gatekeeper`](crate::Gatekeeper) over this file may make private
    ///   while the access lasts;
    /// - not change the file's size, seals or content behind a gatekeeper's
    ///   back (punch through [`Gatekeeper::discard`](crate::Gatekeeper::discard)).
    ///
    /// Metadata calls (`fstat`, `fcntl(F_GET_SEALS)`) meet this contract.
    unsafe fn as_fd(&self) -> BorrowedFd<'_> {
        self.core().fd()
    }

    /// Maps the whole file for host access (`MAP_SHARED`, read-write), with
    /// no regard to which pages are private: the raw mapping that
    /// conformance tests of the kernel's own behaviour need. Host code
    /// reaches guest memory through a [`Gatekeeper`](crate::Gatekeeper).
    ///
    /// # Safety
    /// The mapping bypasses the gatekeeper. The caller must:
    /// - not read or write, through the mapping or a pointer from it, a page
    ///   that is private or that a gatekeeper may make private while the
    ///   access lasts (that would expose a secret or, on guest_memfd and
    ///   private files, raise `SIGBUS`);
    /// - not let the mapping reach code that does not keep this contract.
    ///
    /// # Errors
    /// [`BackingError::MappingNotAllowed`] (`ENODEV`) without `MMAP`;
    /// [`BackingError::Syscall`] if `mmap` fails.
    unsafe fn map_host(&self) -> Result<HostMapping, BackingError> {
        self.core().map_host()
    }
}

/// The arguments of [`create_memory`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryOptions {
    /// The backing.
    pub kind: BackingKind,
    /// The size in bytes.
    pub size: u64,
    /// Creation flags.
    pub flags: GmemFlags,
}

impl MemoryOptions {
    /// Options for `size` bytes of `kind`, with `MMAP|INIT_SHARED`.
    pub fn new(kind: BackingKind, size: u64) -> Self {
        MemoryOptions {
            kind,
            size,
            flags: GmemFlags::MMAP | GmemFlags::INIT_SHARED,
        }
    }

    /// The same options with other flags.
    pub fn with_flags(self, flags: GmemFlags) -> Self {
        MemoryOptions { flags, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_round_trip() {
        for k in BackingKind::ALL {
            assert_eq!(k.name().parse::<BackingKind>().unwrap(), k);
        }
        let e = "hugetlb".parse::<BackingKind>().unwrap_err();
        assert!(e.to_string().contains("\"hugetlb\""));
    }

    #[test]
    fn validate_create_checks_flags_before_size() {
        let e = validate_create(0, GmemFlags::from_bits_retain(4), 3, PAGE_SIZE).unwrap_err();
        assert!(matches!(
            e,
            BackingError::UnsupportedFlags {
                requested: 4,
                supported: 3
            }
        ));
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(
            e.to_string().contains("0x4") && e.to_string().contains("0x3"),
            "{e}"
        );
    }

    #[test]
    fn guest_memfd_without_a_vm_is_refused() {
        let e = create_memory(MemoryOptions::new(BackingKind::GuestMemfd, 4096), None).unwrap_err();
        assert!(matches!(
            e,
            BackingError::NeedsVm {
                kind: BackingKind::GuestMemfd
            }
        ));
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(
            e.to_string()
                .contains("guest-memfd backing is created through a VM"),
            "{e}"
        );
    }

    #[test]
    fn validate_create_size_rules() {
        let ok = GmemFlags::empty();
        for size in [0, 1, 4095, 4097, 1 << 63, u64::MAX - 4095] {
            let e = validate_create(size, ok, 3, PAGE_SIZE).unwrap_err();
            assert!(matches!(e, BackingError::InvalidSize { .. }), "{size:#x}");
            assert_eq!(e.errno(), libc::EINVAL);
        }
        assert!(validate_create(0x7fff_ffff_ffff_f000, ok, 3, PAGE_SIZE).is_ok());
        let e = validate_create(4096, ok, 3, 2 << 20).unwrap_err();
        assert!(e.to_string().contains("whole huge pages"), "{e}");
    }
}
