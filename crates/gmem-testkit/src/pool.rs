//! Huge page pool reservation for the hugetlb checks.
//!
//! When a check needs more free huge pages than the pool has, and the process
//! may write sysfs (root), the pool is raised by the shortfall; the value found
//! first is restored when the process exits. Checks of one page size are
//! serialised, so that they never compete for the pool.

use std::sync::{Mutex, MutexGuard, Once};

use gmem::backing::HugePagePool;

/// The pool sizes before this process first raised them, by page size.
static ORIGINAL: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
static RESTORE_AT_EXIT: Once = Once::new();
static LOCK_2M: Mutex<()> = Mutex::new(());
static LOCK_1G: Mutex<()> = Mutex::new(());

/// Held while a hugetlb check runs; serialises checks of one page size.
#[derive(Debug)]
pub struct PoolGuard {
    _lock: MutexGuard<'static, ()>,
}

extern "C" fn restore_pools() {
    restore();
}

/// Puts every pool this process raised back to the size it found.
pub fn restore() {
    let original = ORIGINAL.lock().unwrap_or_else(|e| e.into_inner());
    for &(page_size, total) in original.iter() {
        let _ = std::fs::write(
            format!("{}/nr_hugepages", HugePagePool::sysfs_dir(page_size)),
            total.to_string(),
        );
    }
}

/// Takes the lock of `page_size`'s pool: checks of one page size run one at
/// a time.
pub fn lock(page_size: u64) -> PoolGuard {
    let lock = if page_size == 1 << 30 {
        &LOCK_1G
    } else {
        &LOCK_2M
    };
    PoolGuard {
        _lock: lock.lock().unwrap_or_else(|e| e.into_inner()),
    }
}

/// Makes sure `pages` huge pages of `page_size` are free, raising the pool
/// if need be (call it holding [`lock`]); says why not otherwise.
pub fn ensure_free(page_size: u64, pages: u64) -> Result<(), String> {
    let kib = page_size >> 10;
    let Some(pool) = HugePagePool::read(page_size) else {
        return Err(format!("the kernel has no {kib} KiB huge page pool"));
    };
    if pool.available() >= pages {
        return Ok(());
    }
    let wanted = pool.total + (pages - pool.available());
    let path = format!("{}/nr_hugepages", HugePagePool::sysfs_dir(page_size));
    {
        let mut original = ORIGINAL.lock().unwrap_or_else(|e| e.into_inner());
        if !original.iter().any(|&(size, _)| size == page_size) {
            original.push((page_size, pool.total));
        }
    }
    RESTORE_AT_EXIT.call_once(|| {
        // SAFETY: registers a plain extern "C" fn with no captured state;
        // atexit only stores the pointer.
        unsafe { libc::atexit(restore_pools) };
    });
    if std::fs::write(&path, wanted.to_string()).is_err() {
        return Err(format!(
            "needs {pages} free {kib} KiB huge pages, the pool has {} and {path} is not writable here",
            pool.available()
        ));
    }
    let after = HugePagePool::read(page_size).map_or(0, |p| p.available());
    if after < pages {
        return Err(format!(
            "needs {pages} free {kib} KiB huge pages; raising the pool got only {after} (memory too fragmented)"
        ));
    }
    Ok(())
}
