//! File-level checks: creation, flags, mapping, fallocate (T1–T12) and
//! gmem's own file checks (G1–G5).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use gmem::backing::sealed_memfd::SUPPORTED_FLAGS;
use gmem::{
    AccessError, BackingError, BackingKind, FileRange, GmemFlags, HostMapping, PAGE_SIZE,
    RestrictedMemory,
};
use kvm_bindings::kvm_create_guest_memfd;

use crate::env::expect_errno;
use crate::probe_access::{Access, probe};
use crate::raw::RawAccess;
use crate::{Env, Need, Stop, ensure, skip};

const P: u64 = PAGE_SIZE;
const FALLOC_ALLOCATE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const FALLOC_PUNCH: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;

/// `fallocate` straight to the kernel; returns 0 or the errno. Offsets are
/// passed bit for bit, so "negative" values reach the kernel as such.
pub(crate) fn raw_fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> i32 {
    // SAFETY: fallocate takes integers only; the fd is borrowed and open.
    let rc = unsafe { libc::fallocate64(fd.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 { 0 } else { errno() }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `KVM_CREATE_GUEST_MEMFD` straight to the kernel; returns the fd or errno.
fn raw_create_gmem(env: &Env, size: u64, flags: u64) -> Result<OwnedFd, i32> {
    let vm = env.vm().map_err(|_| libc::ENODEV)?;
    vm.fd()
        .create_guest_memfd(kvm_create_guest_memfd {
            size,
            flags,
            reserved: [0; 6],
        })
        // SAFETY: a new fd nobody else owns.
        .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) })
        .map_err(|e| e.errno())
}

/// The allocate or punch of `[off, off + len)` through gmem's API.
fn api_fallocate(
    mem: &dyn RestrictedMemory,
    punch: bool,
    off: u64,
    len: u64,
) -> Result<(), gmem::Error> {
    let range = FileRange::new(off, len)?;
    if punch {
        mem.punch_hole(range)?;
    } else {
        mem.allocate(range)?;
    }
    Ok(())
}

fn fstat(mem: &dyn RestrictedMemory) -> Result<rustix::fs::Stat, Stop> {
    rustix::fs::fstat(mem.raw_fd()).map_err(|e| Stop::Fail(format!("fstat: {e}")))
}

/// Checks that `[off, off + len)` reads `byte` through `host`: every byte of
/// small ranges, the first and last 16 bytes of each 4 KiB page of large ones.
pub(crate) fn verify(host: &HostMapping, off: u64, len: u64, byte: u8) -> Result<(), Stop> {
    let mut page = vec![0u8; P as usize];
    let whole = len <= 16 << 20;
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(P) as usize;
        let parts: &[(u64, usize)] = if whole || n < 32 {
            &[(0, n)]
        } else {
            &[(0, 16), ((n - 16) as u64, 16)]
        };
        for &(rel, cnt) in parts {
            host.read(pos + rel, &mut page[..cnt])?;
            if let Some(i) = page[..cnt].iter().position(|&b| b != byte) {
                return Err(Stop::Fail(format!(
                    "offset {:#x} reads {:#x}, expected {byte:#x}",
                    pos + rel + i as u64,
                    page[i]
                )));
            }
        }
        pos += n as u64;
    }
    Ok(())
}

fn supported_flags(env: &Env) -> Result<u64, Stop> {
    Ok(if env.is_gmem() {
        env.vm()?.supported_gmem_flags()
    } else {
        SUPPORTED_FLAGS
    })
}

pub(crate) fn t1_flags(env: &Env) -> Result<(), Stop> {
    let supported = supported_flags(env)?;
    for bit in 0..64 {
        let flags = GmemFlags::from_bits_retain(1 << bit);
        let result = env.create_with(env.unit(), flags);
        if supported & (1 << bit) != 0 {
            ensure!(
                result.is_ok(),
                "flag bit {bit} is supported but creation failed: {:?}",
                result.err()
            );
        } else {
            expect_errno(result, libc::EINVAL, &format!("create with flag bit {bit}"))?;
        }
        if env.is_gmem() {
            let raw = raw_create_gmem(env, env.unit(), 1 << bit);
            let expected = if supported & (1 << bit) != 0 {
                0
            } else {
                libc::EINVAL
            };
            let got = raw.err().unwrap_or(0);
            ensure!(
                got == expected,
                "kernel: flag bit {bit} gave errno {got}, gmem expects {expected}"
            );
        }
    }
    Ok(())
}

pub(crate) fn t2_create_multiple(env: &Env) -> Result<(), Stop> {
    env.need_pages(3)?;
    let one = env.create(env.unit())?;
    let two = env.create(2 * env.unit())?;
    let (st1, st2) = (fstat(&*one)?, fstat(&*two)?);
    ensure!(
        st1.st_size as u64 == env.unit(),
        "first file: st_size {:#x}",
        st1.st_size
    );
    ensure!(
        st2.st_size as u64 == 2 * env.unit(),
        "second file: st_size {:#x}",
        st2.st_size
    );
    ensure!(
        st1.st_ino != st2.st_ino,
        "both files have inode {}",
        st1.st_ino
    );
    let again = fstat(&*one)?;
    ensure!(
        again.st_size == st1.st_size && again.st_ino == st1.st_ino,
        "first file changed"
    );
    ensure!(
        one.size() == env.unit() && two.size() == 2 * env.unit(),
        "size() disagrees with fstat"
    );
    Ok(())
}

pub(crate) fn t3_invalid_sizes(env: &Env) -> Result<(), Stop> {
    let mut sizes: Vec<u64> = (0..P).collect();
    if env.backing.is_hugetlb() {
        sizes.extend([P, env.unit() - P, env.unit() + P]);
    }
    sizes.extend([1 << 63, u64::MAX - P + 1]);
    for size in sizes {
        expect_errno(
            env.create(size),
            libc::EINVAL,
            &format!("create of size {size:#x}"),
        )?;
    }
    if env.is_gmem() {
        for size in [0, 1, P - 1, P + 1, 1 << 63, u64::MAX - P + 1] {
            let got = raw_create_gmem(env, size, env.flags.bits())
                .err()
                .unwrap_or(0);
            ensure!(
                got == libc::EINVAL,
                "kernel: size {size:#x} gave errno {got}, not EINVAL"
            );
        }
    }
    Ok(())
}

pub(crate) fn t4_read_write(env: &Env) -> Result<(), Stop> {
    if !env.is_gmem() {
        skip!(
            Need::NotApplicable,
            "a memfd's own fd supports read(2)/write(2); gmem gives host code no file I/O path on any backing, only map_host()"
        );
    }
    let mem = env.create(env.file_size())?;
    let fd = mem.raw_fd().as_raw_fd();
    let mut buf = [0u8; 64];
    let expect = |name: &str, rc: isize, expected: i32| {
        let got = errno();
        if rc < 0 && got == expected {
            Ok(())
        } else {
            Err(Stop::Fail(format!(
                "{name}: returned {rc}, errno {got}, expected errno {expected}"
            )))
        }
    };
    // SAFETY: buf is a live 64-byte buffer and fd is open.
    let rc = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 64) };
    expect("read", rc, libc::EINVAL)?;
    // SAFETY: as above.
    let rc = unsafe { libc::write(fd, buf.as_ptr().cast(), 64) };
    expect("write", rc, libc::EINVAL)?;
    // SAFETY: as above.
    let rc = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), 64, 0) };
    expect("pread", rc, libc::ESPIPE)?;
    // SAFETY: as above.
    let rc = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), 64, 0) };
    expect("pwrite", rc, libc::ESPIPE)
}

pub(crate) fn t5_mmap_supported(env: &Env) -> Result<(), Stop> {
    env.require_flags(GmemFlags::MMAP | GmemFlags::INIT_SHARED, true)?;
    let size = env.file_size();
    let mem = env.create(size)?;
    let host = mem.raw_map()?;
    host.fill(0, size as usize, 0xaa)?;
    verify(&host, 0, size, 0xaa)?;
    mem.punch_hole(FileRange::new(0, P)?)?;
    verify(&host, 0, P, 0)?;
    verify(&host, P, size - P, 0xaa)?;
    host.fill(0, P as usize, 0xaa)?;
    verify(&host, 0, size, 0xaa)
}

pub(crate) fn t6_fault_overflow(env: &Env) -> Result<(), Stop> {
    env.require_flags(GmemFlags::MMAP | GmemFlags::INIT_SHARED, true)?;
    if env.backing.is_hugetlb() {
        skip!(
            Need::NotApplicable,
            "on hugetlbfs a writable mapping longer than the file grows it in spite of F_SEAL_GROW (measured on 6.18), so gmem never maps past the end; there is no past-the-end page to fault on"
        );
    }
    let size = env.file_size();
    let mem = env.create(size)?;
    let map_len = (4 * size) as usize;
    // SAFETY: a fresh mapping at a kernel-chosen address, unmapped below.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            map_len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            mem.raw_fd(),
            0,
        )
    }
    .map_err(|e| {
        Stop::Fail(format!(
            "mmap of {map_len:#x} bytes over a {size:#x}-byte file: {e}"
        ))
    })?
    .cast::<u8>();
    let fill = probe(ptr, map_len, Some(0xaa));
    // SAFETY: ptr + size lies inside the mapping just made.
    let past_end = probe(unsafe { ptr.add(size as usize) }, 1, None);
    let mut first_bytes_ok = true;
    for off in (0..size as usize).step_by(64) {
        // SAFETY: inside the file, which is shared and populated now.
        first_bytes_ok &= unsafe { ptr.add(off).read_volatile() } == 0xaa;
    }
    // SAFETY: the mapping made above, no longer used.
    unsafe { rustix::mm::munmap(ptr.cast(), map_len) }
        .map_err(|e| Stop::Fail(format!("munmap: {e}")))?;
    ensure!(
        fill == Access::Signal(libc::SIGBUS),
        "filling past the end: {fill:?}, expected SIGBUS"
    );
    ensure!(
        past_end == Access::Signal(libc::SIGBUS),
        "reading at the end: {past_end:?}, expected SIGBUS"
    );
    ensure!(first_bytes_ok, "the file's own bytes do not read back 0xaa");
    ensure!(
        fstat(&*mem)?.st_size as u64 == size,
        "the file's size changed"
    );
    Ok(())
}

pub(crate) fn t7_fault_private(env: &Env) -> Result<(), Stop> {
    env.require_flags(GmemFlags::MMAP, true)?;
    let mem = env.create(env.file_size())?;
    let host = mem.raw_map()?;
    ensure!(
        !host.is_shared(),
        "a file without INIT_SHARED mapped shared"
    );
    let write = probe(host.as_ptr(), P as usize, Some(0xaa));
    let read = probe(host.as_ptr(), 1, None);
    ensure!(
        write == Access::Signal(libc::SIGBUS),
        "write to private memory: {write:?}, expected SIGBUS"
    );
    ensure!(
        read == Access::Signal(libc::SIGBUS),
        "read of private memory: {read:?}, expected SIGBUS"
    );
    let mut byte = [0u8];
    ensure!(
        host.read(0, &mut byte) == Err(AccessError::Private { offset: 0 }),
        "the safe read API did not refuse private memory"
    );
    Ok(())
}

pub(crate) fn t8_mmap_cow(env: &Env) -> Result<(), Stop> {
    env.require_flags(GmemFlags::MMAP, false)?;
    let mem = env.create(env.file_size())?;
    if env.is_gmem() {
        // SAFETY: a fresh mapping request; on success it is unmapped at once.
        let result = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                P as usize,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
                mem.raw_fd(),
                0,
            )
        };
        if let Ok(ptr) = result {
            // SAFETY: the mapping just made.
            let _ = unsafe { rustix::mm::munmap(ptr, P as usize) };
            skip!(
                Need::NotApplicable,
                "unreachable: kernel accepted MAP_PRIVATE"
            );
        }
        ensure!(
            result.err() == Some(rustix::io::Errno::INVAL),
            "MAP_PRIVATE: {:?}, expected EINVAL",
            result.err()
        );
        return Ok(());
    }
    // gmem maps memfds MAP_SHARED only: no host mapping is a private copy.
    if !env.flags.contains(GmemFlags::INIT_SHARED) {
        skip!(
            Need::NotApplicable,
            "private file: its host mappings cannot be read to compare"
        );
    }
    let (a, b) = (mem.raw_map()?, mem.raw_map()?);
    a.write(P, &[0x5a])?;
    let mut byte = [0u8];
    b.read(P, &mut byte)?;
    ensure!(
        byte[0] == 0x5a,
        "two host mappings disagree: a private copy exists"
    );
    Ok(())
}

pub(crate) fn t9_mmap_not_supported(env: &Env) -> Result<(), Stop> {
    if env.flags.contains(GmemFlags::MMAP) {
        skip!(Need::NotApplicable, "runs on files without MMAP");
    }
    let mem = env.create(env.file_size())?;
    expect_errno(mem.raw_map(), libc::ENODEV, "map_host without MMAP")?;
    if env.is_gmem() {
        for len in [P, 4 * P] {
            // SAFETY: a fresh mapping request, expected to fail.
            let result = unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                    rustix::mm::MapFlags::SHARED,
                    mem.raw_fd(),
                    0,
                )
            };
            ensure!(
                result.err() == Some(rustix::io::Errno::NODEV),
                "kernel mmap of {len:#x} bytes: {:?}, expected ENODEV",
                result.err()
            );
        }
    }
    Ok(())
}

pub(crate) fn t10_file_size(env: &Env) -> Result<(), Stop> {
    let mem = env.create(env.file_size())?;
    let st = fstat(&*mem)?;
    ensure!(
        st.st_size as u64 == env.file_size(),
        "st_size {:#x}, expected {:#x}",
        st.st_size,
        env.file_size()
    );
    ensure!(
        st.st_blksize as u64 == mem.page_size(),
        "st_blksize {:#x}, expected {:#x}",
        st.st_blksize,
        mem.page_size()
    );
    ensure!(mem.size() == env.file_size(), "size() {:#x}", mem.size());
    Ok(())
}

pub(crate) fn t11_fallocate(env: &Env) -> Result<(), Stop> {
    let size = env.file_size();
    let steps: [(&str, bool, u64, u64, i32); 9] = [
        ("(a) allocate the whole file", false, 0, size, 0),
        ("(b) punch at offset page-1", true, P - 1, P, libc::EINVAL),
        ("(c) allocate at the end", false, size, P, libc::EINVAL),
        (
            "(d) allocate past the end",
            false,
            size + P,
            P,
            libc::EINVAL,
        ),
        ("(e) punch at the end", true, size, P, 0),
        ("(f) punch past the end", true, size + P, P, 0),
        ("(g) punch of length page-1", true, 0, P - 1, libc::EINVAL),
        ("(h) punch [page, 2 pages)", true, P, P, 0),
        ("(i) allocate [page, 2 pages)", false, P, P, 0),
    ];
    let mem = env.create(size)?;
    let raw = if env.is_gmem() {
        Some(env.create(size)?)
    } else {
        None
    };
    for (what, punch, off, len, expected) in steps {
        let got = api_fallocate(&*mem, punch, off, len)
            .err()
            .map_or(0, |e| e.errno());
        ensure!(got == expected, "{what}: errno {got}, expected {expected}");
        if let Some(raw) = &raw {
            let mode = if punch { FALLOC_PUNCH } else { FALLOC_ALLOCATE };
            let kernel = raw_fallocate(raw.raw_fd(), mode, off, len);
            ensure!(
                kernel == expected,
                "{what}: the kernel gave errno {kernel}, gmem expects {expected}"
            );
        }
    }
    Ok(())
}

pub(crate) fn t12_invalid_punch_hole(env: &Env) -> Result<(), Stop> {
    let mem = env.create(env.file_size())?;
    let cases = [
        (0, 1),
        (0, P - 1),
        (0, P + 1),
        (1, 1),
        (1, P - 1),
        (1, P),
        (1, P + 1),
        (P, 1),
        (P, P - 1),
        (P, P + 1),
    ];
    for (off, len) in cases {
        expect_errno(
            api_fallocate(&*mem, true, off, len),
            libc::EINVAL,
            &format!("punch {off:#x}+{len:#x}"),
        )?;
        if env.is_gmem() {
            let kernel = raw_fallocate(mem.raw_fd(), FALLOC_PUNCH, off, len);
            ensure!(
                kernel == libc::EINVAL,
                "kernel punch {off:#x}+{len:#x}: errno {kernel}"
            );
        }
    }
    // The VFS's own checks, in order: negative offset, zero length, overflow.
    let vfs = [
        (1 << 63, P, libc::EINVAL),
        (0, 0, libc::EINVAL),
        (i64::MAX as u64 - P + 1, 2 * P, libc::EFBIG),
    ];
    for (off, len, expected) in vfs {
        expect_errno(
            api_fallocate(&*mem, true, off, len),
            expected,
            &format!("punch {off:#x}+{len:#x}"),
        )?;
        if env.is_gmem() {
            let kernel = raw_fallocate(mem.raw_fd(), FALLOC_PUNCH, off, len);
            ensure!(
                kernel == expected,
                "kernel punch {off:#x}+{len:#x}: errno {kernel}, gmem expects {expected}"
            );
        }
    }
    Ok(())
}

/// Rounds byte ranges out to backing pages.
fn pages(unit: u64, ranges: &[(u64, u64)]) -> Vec<std::ops::Range<u64>> {
    let mut set = gmem::range_set::RangeSet::new();
    for &(start, end) in ranges {
        set.insert(start / unit * unit..end.next_multiple_of(unit));
    }
    set.to_vec()
}

pub(crate) fn g1_populated(env: &Env) -> Result<(), Stop> {
    let size = env.file_size();
    let u = env.unit();
    let mem = env.create(size)?;
    let host = mem.raw_map()?;
    ensure!(
        mem.populated()?.is_empty(),
        "a new file reports {:?} populated",
        mem.populated()?
    );
    // One allocated range and one page faulted in by a host write.
    let (alloc, touch) = if size >= 4 * u {
        ((u, 2 * u), 3 * u)
    } else {
        ((0, P), 0)
    };
    mem.allocate(FileRange::new(alloc.0, alloc.1 - alloc.0)?)?;
    host.write(touch, &[1])?;
    let want = pages(u, &[alloc, (touch, touch + 1)]);
    ensure!(
        mem.populated()? == want,
        "populated {:?}, expected {want:?}",
        mem.populated()?
    );
    // Cross-check the faulted page with the test's own mincore.
    let mut vec = [0u8; 1];
    // SAFETY: one page of the live host mapping; vec has room for one page.
    let rc = unsafe {
        libc::mincore(
            host.as_ptr().add(touch as usize).cast(),
            P as usize,
            vec.as_mut_ptr(),
        )
    };
    ensure!(
        rc == 0 && vec[0] & 1 == 1,
        "mincore does not see the touched page resident"
    );
    if env.backing == BackingKind::Memfd {
        // shmem counts fallocated and faulted pages in st_blocks.
        let blocks = fstat(&*mem)?.st_blocks as u64 * 512;
        let total: u64 = want.iter().map(|r| r.end - r.start).sum();
        ensure!(
            blocks == total,
            "st_blocks says {blocks:#x} bytes, populated() {total:#x}"
        );
    }
    mem.punch_hole(FileRange::new(0, size)?)?;
    ensure!(
        mem.populated()?.is_empty(),
        "after punching everything: {:?}",
        mem.populated()?
    );
    // A 4 KiB-aligned range across a backing-page boundary populates every
    // backing page it touches (hugetlbfs's rule; trivially so on 4 KiB pages).
    if size >= 2 * u {
        mem.allocate(FileRange::new(u - P, 2 * P)?)?;
        let want = pages(u, &[(u - P, u + P)]);
        ensure!(
            mem.populated()? == want,
            "allocating across a page boundary: {:?}, expected {want:?}",
            mem.populated()?
        );
    }
    Ok(())
}

pub(crate) fn g2_punch_report(env: &Env) -> Result<(), Stop> {
    let size = env.file_size();
    let u = env.unit();
    let mem = env.create(size)?;
    let host = mem.raw_map()?;
    host.fill(0, size as usize, 0xaa)?;
    // A range from the second 4 KiB page to one 4 KiB page past the second
    // backing page (or, with one huge page, a small range inside it).
    let (off, len) = if size >= 4 * u { (P, 2 * u) } else { (P, P) };
    let report = mem.punch_hole(FileRange::new(off, len)?)?;
    let split = FileRange::new(off, len)?.split_by_page(u);
    ensure!(
        report.bytes_freed == split.whole_bytes(),
        "freed {:#x}, expected {:#x}",
        report.bytes_freed,
        split.whole_bytes()
    );
    ensure!(
        report.bytes_zeroed == split.partial_bytes(),
        "zeroed {:#x}, expected {:#x}",
        report.bytes_zeroed,
        split.partial_bytes()
    );
    if u == P {
        ensure!(
            report.bytes_zeroed == 0,
            "a 4 KiB backing reported zeroed bytes"
        );
    }
    verify(&host, 0, off, 0xaa)?;
    verify(&host, off, len, 0)?;
    verify(&host, off + len, size - off - len, 0xaa)?;
    let beyond = mem.punch_hole(FileRange::new(size, P)?)?;
    ensure!(
        beyond == gmem::PunchReport::default(),
        "a punch past the end reported {beyond:?}"
    );
    Ok(())
}

pub(crate) fn g3_size_immutable(env: &Env) -> Result<(), Stop> {
    let size = env.file_size();
    let mem = env.create(size)?;
    // Whole backing pages: hugetlbfs refuses other lengths before the seals.
    for new_len in [size + env.unit(), size - env.unit(), 0] {
        let result = rustix::fs::ftruncate(mem.raw_fd(), new_len);
        // guest_memfd refuses any setattr (EINVAL); the memfds' seals say EPERM.
        let expected = if env.is_gmem() {
            rustix::io::Errno::INVAL
        } else {
            rustix::io::Errno::PERM
        };
        if new_len == size {
            continue;
        }
        ensure!(
            result.err() == Some(expected),
            "ftruncate({new_len:#x}): {:?}, expected {expected:?}",
            result.err()
        );
    }
    ensure!(fstat(&*mem)?.st_size as u64 == size, "the size changed");
    let seals = rustix::fs::fcntl_get_seals(mem.raw_fd());
    if env.is_gmem() {
        ensure!(
            seals.err() == Some(rustix::io::Errno::INVAL),
            "F_GET_SEALS on guest_memfd: {seals:?}"
        );
    } else {
        use rustix::fs::SealFlags;
        let want = SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL;
        ensure!(
            seals.is_ok_and(|s| s.contains(want)),
            "seals {seals:?}, expected GROW|SHRINK|SEAL"
        );
    }
    Ok(())
}

pub(crate) fn g4_pool_shortage(env: &Env) -> Result<(), Stop> {
    if !env.backing.is_hugetlb() {
        skip!(Need::NotApplicable, "only hugetlb backings draw on a pool");
    }
    let pool = gmem::backing::HugePagePool::read(env.unit())
        .ok_or_else(|| Stop::Fail("the pool vanished".into()))?;
    let needed = pool.available() + 1;
    match env.create(needed * env.unit()) {
        Err(BackingError::HugePagesExhausted {
            needed: n, free, ..
        }) => {
            ensure!(
                n == needed,
                "error says {n} pages needed, expected {needed}"
            );
            ensure!(
                free <= pool.available(),
                "error says {free} free, the pool had {}",
                pool.available()
            );
            Ok(())
        }
        other => Err(Stop::Fail(format!("asking for {needed} pages: {other:?}"))),
    }
}

/// The VmFlags of the mapping that starts at `addr`, from /proc/self/smaps.
pub(crate) fn vm_flags(addr: usize) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let start = format!("{addr:x}-");
    let mut inside = false;
    for line in smaps.lines() {
        if line.starts_with(&start) {
            inside = true;
        } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
            return Some(flags.trim().to_owned());
        }
    }
    None
}

pub(crate) fn g5_dontdump_dontfork(env: &Env) -> Result<(), Stop> {
    let mem: Arc<dyn RestrictedMemory> = env.create(env.file_size())?;
    let host = mem.raw_map()?;
    let flags = vm_flags(host.as_ptr() as usize)
        .ok_or_else(|| Stop::Fail("the host mapping is not in /proc/self/smaps".into()))?;
    let words: Vec<&str> = flags.split_whitespace().collect();
    ensure!(
        words.contains(&"dd"),
        "host mapping VmFlags {flags:?} lack dd (MADV_DONTDUMP)"
    );
    ensure!(
        words.contains(&"dc"),
        "host mapping VmFlags {flags:?} lack dc (MADV_DONTFORK)"
    );
    Ok(())
}

pub(crate) fn g9_refusals_change_nothing(env: &Env) -> Result<(), Stop> {
    let size = env.file_size();
    let mem = env.create(size)?;
    let host = mem.raw_map()?;
    host.fill(0, P as usize, 0x3c)?;
    mem.allocate(FileRange::new(size - P, P)?)?;
    let populated = mem.populated()?;
    let refusals: [(&str, bool, u64, u64, i32); 8] = [
        ("allocate of length 0", false, 0, 0, libc::EINVAL),
        (
            "allocate past the end",
            false,
            size - P,
            2 * P,
            libc::EINVAL,
        ),
        ("allocate at the end", false, size, P, libc::EINVAL),
        ("allocate at an unaligned offset", false, 1, P, libc::EINVAL),
        (
            "allocate overflowing loff_t",
            false,
            i64::MAX as u64 - P + 1,
            2 * P,
            libc::EFBIG,
        ),
        ("punch of an unaligned length", true, 0, P + 1, libc::EINVAL),
        ("punch at a negative offset", true, 1 << 63, P, libc::EINVAL),
        (
            "punch wrapping around",
            true,
            u64::MAX - P + 1,
            2 * P,
            libc::EINVAL,
        ),
    ];
    for (what, punch, off, len, errno) in refusals {
        expect_errno(api_fallocate(&*mem, punch, off, len), errno, what)?;
    }
    verify(&host, 0, P, 0x3c)?;
    ensure!(
        mem.populated()? == populated,
        "refusals changed the populated ranges: {:?}",
        mem.populated()?
    );
    ensure!(
        fstat(&*mem)?.st_size as u64 == size,
        "refusals changed the size"
    );
    Ok(())
}
