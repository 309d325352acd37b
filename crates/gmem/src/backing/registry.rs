//! One owner per file, process-wide. Every gmem file (created or adopted)
//! registers its inode, `(st_dev, st_ino)`, here for its life, so a file
//! cannot become two gmem files: a memfd adopted twice (through a `dup` of
//! its fd), or a file adopted beside the one gmem created, is refused. Two
//! gmem files over one inode would each have their own attribute state and
//! the gatekeeper's one-file rules would not see the alias (issue "no way
//! in", item 1).
//!
//! Identity is the kernel's, not gmem's: an fd number, a path or the
//! address of an allocation can all differ for one file; the inode cannot.

use std::collections::BTreeSet;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use super::BackingError;

/// A file's identity: its device and inode numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct FileKey {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

/// The inodes of every live gmem file in this process.
static FILES: Mutex<BTreeSet<FileKey>> = Mutex::new(BTreeSet::new());

fn files() -> std::sync::MutexGuard<'static, BTreeSet<FileKey>> {
    // The set is updated by single insert/remove calls, which leave it
    // consistent even if a panic poisoned the lock elsewhere.
    FILES.lock().unwrap_or_else(|e| e.into_inner())
}

/// A file's place in the registry; dropping it frees the inode for a new
/// owner.
#[derive(Debug)]
pub(crate) struct Registration {
    key: FileKey,
}

impl Registration {
    /// The file's identity.
    #[cfg(test)]
    pub(crate) fn key(&self) -> FileKey {
        self.key
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        files().remove(&self.key);
    }
}

/// The identity of the file `fd` refers to (`fstat`).
pub(crate) fn key_of(fd: BorrowedFd<'_>) -> Result<FileKey, BackingError> {
    let st = rustix::fs::fstat(fd).map_err(|e| BackingError::syscall("fstat", e))?;
    Ok(FileKey {
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// Whether a live gmem file has inode `key`.
pub(crate) fn is_registered(key: FileKey) -> bool {
    files().contains(&key)
}

/// Registers the file `fd` refers to as a gmem file.
///
/// # Errors
/// [`BackingError::AlreadyOwned`] (`EBUSY`) if a live gmem file has the
/// same inode; [`BackingError::Syscall`] if `fstat` fails.
pub(crate) fn register(fd: BorrowedFd<'_>) -> Result<Registration, BackingError> {
    let key = key_of(fd)?;
    if !files().insert(key) {
        return Err(BackingError::AlreadyOwned {
            dev: key.dev,
            ino: key.ino,
        });
    }
    Ok(Registration { key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn one_inode_has_one_registration_at_a_time() {
        let fd = rustix::fs::memfd_create("registry", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let dup = fd.try_clone().unwrap();
        let first = register(fd.as_fd()).unwrap();
        let e = register(dup.as_fd()).unwrap_err();
        assert!(matches!(e, BackingError::AlreadyOwned { .. }), "{e}");
        assert_eq!(e.errno(), libc::EBUSY);
        assert_eq!(first.key(), key_of(dup.as_fd()).unwrap());
        drop(first);
        register(dup.as_fd()).unwrap();
    }
}
