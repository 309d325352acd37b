//! Conversion checks (C-numbers): private/shared conversion with one copy
//! per page, the host view that faults on private memory, and guest memory
//! kept out of swap, dumps and forks.

use std::sync::Arc;

use gmem::{
    Attribute, ConvertError, GateError, GateOptions, Gatekeeper, PAGE_SIZE, Policy,
    RestrictedMemory, SlotRequest, Vm,
};

use crate::env::expect_errno;
use crate::probe_access::{Access, probe};
use crate::raw::RawAccess;
use crate::{Env, Need, Stop, ensure, skip};

const P: u64 = PAGE_SIZE;
/// Where the fixture's memory sits in the guest.
const GPA: u64 = 0x4000_0000;

struct Fixture {
    gate: Gatekeeper,
    memory: Arc<dyn RestrictedMemory>,
    _vm: Vm,
}

fn fixture(env: &Env, initial: Attribute, policy: Policy) -> Result<Fixture, Stop> {
    let vm = env.new_vm()?;
    let size = env.file_size();
    let memory = env.create_for(&vm, size)?;
    let binding = vm.bind(&memory, SlotRequest::new(GPA, 0, size))?;
    let gate = Gatekeeper::new(&vm, vec![binding], GateOptions::new(initial, policy))?;
    Ok(Fixture {
        gate,
        memory,
        _vm: vm,
    })
}

fn populated_bytes(memory: &dyn RestrictedMemory) -> Result<u64, Stop> {
    Ok(memory.populated()?.iter().map(|r| r.end - r.start).sum())
}

/// The bytes of the file resident in memory, measured independently of
/// gmem's own query (and never with `st_blocks`): on guest_memfd and memfd by
/// `mincore` over a fresh `PROT_NONE` mapping of the file (a page-cache
/// lookup); on hugetlb, where mincore sees only page tables, by the
/// hugetlbfs inode's block count, which hugetlbfs keeps exact per huge page.
fn resident_bytes(memory: &dyn RestrictedMemory) -> Result<u64, Stop> {
    let size = memory.size();
    if memory.kind().is_hugetlb() {
        let st =
            rustix::fs::fstat(memory.raw_fd()).map_err(|e| Stop::Fail(format!("fstat: {e}")))?;
        return Ok(st.st_blocks as u64 * 512);
    }
    // SAFETY: a fresh PROT_NONE mapping at a kernel-chosen address, unmapped below.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            size as usize,
            rustix::mm::ProtFlags::empty(),
            rustix::mm::MapFlags::SHARED,
            memory.raw_fd(),
            0,
        )
    }
    .map_err(|e| Stop::Fail(format!("mmap for mincore: {e}")))?;
    let mut vec = vec![0u8; (size / P) as usize];
    // SAFETY: the live mapping just made; vec has a byte per page of it.
    let rc = unsafe { libc::mincore(ptr, size as usize, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: the mapping just made, no longer used.
    unsafe { rustix::mm::munmap(ptr, size as usize) }
        .map_err(|e| Stop::Fail(format!("munmap: {e}")))?;
    if rc != 0 {
        return Err(Stop::Fail(format!("mincore: {err}")));
    }
    Ok(vec.iter().filter(|b| *b & 1 != 0).count() as u64 * P)
}

fn read_byte(view: &Gatekeeper, gpa: u64) -> Result<u8, GateError> {
    let mut b = [0u8];
    view.read(gpa, &mut b)?;
    Ok(b[0])
}

pub(crate) fn c1_in_place_keeps_one_copy(env: &Env) -> Result<(), Stop> {
    env.vm()?;
    let f = fixture(env, Attribute::Shared, Policy::InPlace)?;
    let view = &f.gate;
    let size = env.file_size();
    for page in 0..size / P {
        view.write(GPA + page * P, &[page as u8 ^ 0x5a])?;
    }
    let populated = populated_bytes(&*f.memory)?;
    let resident = resident_bytes(&*f.memory)?;
    ensure!(
        resident == size,
        "resident {resident:#x} after writing every page of {size:#x}"
    );
    let report = f.gate.convert(GPA, size, Attribute::Private)?;
    ensure!(
        report.changed_bytes == size && report.punched == gmem::PunchReport::default(),
        "report {report:?}"
    );
    match read_byte(view, GPA + P) {
        Err(GateError::Private { private, .. }) => ensure!(
            private == GPA + P,
            "the error names GPA {private:#x}, not {:#x}",
            GPA + P
        ),
        other => return Err(Stop::Fail(format!("reading private memory: {other:?}"))),
    }
    ensure!(
        populated_bytes(&*f.memory)? == populated,
        "converting to private changed the populated bytes"
    );
    f.gate.convert(GPA, size, Attribute::Shared)?;
    for page in 0..size / P {
        let b = read_byte(view, GPA + page * P)?;
        ensure!(
            b == page as u8 ^ 0x5a,
            "page {page} lost its content across in-place conversions: {b:#x}"
        );
    }
    ensure!(
        populated_bytes(&*f.memory)? == populated,
        "a round trip changed the populated bytes: a page exists twice"
    );
    let stats = f.gate.stats();
    ensure!(
        stats.to_private == 1 && stats.to_shared == 1,
        "stats {stats:?}"
    );
    ensure!(
        stats.pages_to_private == size / P && stats.pages_to_shared == size / P,
        "stats {stats:?}"
    );
    Ok(())
}

pub(crate) fn c2_discard_zeroes_and_frees(env: &Env) -> Result<(), Stop> {
    env.vm()?;
    let f = fixture(env, Attribute::Shared, Policy::Discard)?;
    let view = &f.gate;
    let size = env.file_size();
    let u = env.unit();
    view.fill(GPA, size, 0xcc)?;
    let before = populated_bytes(&*f.memory)?;
    ensure!(
        before == size,
        "populated {before:#x} after filling {size:#x}"
    );
    // One 4 KiB page: freed on 4 KiB backings, zeroed in place on hugetlb.
    let report = f.gate.convert(GPA + P, P, Attribute::Private)?;
    let expected_freed = if u == P { P } else { 0 };
    ensure!(
        report.punched.bytes_freed == expected_freed,
        "punch report {:?}",
        report.punched
    );
    ensure!(
        report.punched.bytes_freed + report.punched.bytes_zeroed == P,
        "punch report {:?}",
        report.punched
    );
    ensure!(
        populated_bytes(&*f.memory)? == before - expected_freed,
        "populated after a 4 KiB discard"
    );
    f.gate.convert(GPA + P, P, Attribute::Shared)?;
    ensure!(
        read_byte(view, GPA + P)? == 0,
        "a discarded page does not read zero"
    );
    // Converting a page to the side it is on changes nothing, content included.
    let report = f.gate.convert(GPA, P, Attribute::Shared)?;
    ensure!(
        report.changed_bytes == 0 && report.punched == gmem::PunchReport::default(),
        "a shared page converted to shared was punched: {report:?}"
    );
    ensure!(
        read_byte(view, GPA)? == 0xcc,
        "the neighbouring page lost its content"
    );
    // A whole backing page is freed on every backing.
    if size >= 2 * u {
        let report = f.gate.convert(GPA + u, u, Attribute::Private)?;
        ensure!(
            report.punched.bytes_freed == u,
            "whole-page punch report {:?}",
            report.punched
        );
        ensure!(
            populated_bytes(&*f.memory)? <= before - u,
            "a discarded backing page is still populated"
        );
    }
    Ok(())
}

pub(crate) fn c3_private_pages_fault(env: &Env) -> Result<(), Stop> {
    env.vm()?;
    let f = fixture(env, Attribute::Private, Policy::InPlace)?;
    let ptr = f
        .gate
        .view_addr(GPA)
        .ok_or_else(|| Stop::Fail("no view address for guest memory".into()))?
        .cast_mut();
    // A CLONE_VM child shares this address space, the view included.
    let access = probe(ptr, 1, None);
    ensure!(
        matches!(access, Access::Signal(libc::SIGSEGV | libc::SIGBUS)),
        "reading private memory through a raw pointer: {access:?}"
    );
    f.gate.convert(GPA, env.unit(), Attribute::Shared)?;
    let pin = f.gate.pin(GPA, env.unit())?;
    ensure!(pin.as_ptr() == ptr, "the pin's address is not the view's");
    let access = probe(ptr, 1, None);
    ensure!(
        access == Access::Completed,
        "reading a pinned page after conversion to shared: {access:?}"
    );
    // A forked child does not even have the mapping (MADV_DONTFORK).
    // SAFETY: the child only reads one byte and exits with _exit; it takes
    // no lock and allocates nothing.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: in the child; a fault kills only the child.
        unsafe {
            std::ptr::read_volatile(ptr);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    ensure!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV,
        "a forked child read guest memory (status {status:#x}); MADV_DONTFORK should have kept it out"
    );
    // While pinned, the guest cannot take the page back; once released, it
    // can, and the stale pointer faults again.
    expect_errno(
        f.gate.convert(GPA, env.unit(), Attribute::Private),
        libc::EAGAIN,
        "converting a pinned page to private",
    )?;
    drop(pin);
    f.gate.convert(GPA, env.unit(), Attribute::Private)?;
    let access = probe(ptr, 1, None);
    ensure!(
        matches!(access, Access::Signal(libc::SIGSEGV | libc::SIGBUS)),
        "a pointer kept past its pin read a page made private again: {access:?}"
    );
    Ok(())
}

pub(crate) fn c4_huge_page_granularity(env: &Env) -> Result<(), Stop> {
    env.vm()?;
    let u = env.unit();
    let f = fixture(env, Attribute::Private, Policy::InPlace)?;
    let view = &f.gate;
    // Share one 4 KiB page in the middle of the first backing page.
    let shared = GPA + if u > P { u / 2 } else { 0 };
    f.gate.convert(shared, P, Attribute::Shared)?;
    view.write(shared, b"device")?;
    let mut buf = [0u8; 6];
    view.read(shared, &mut buf)?;
    ensure!(&buf == b"device", "the shared page does not read back");
    let pin = view.pin(shared, P)?;
    let raw = probe(pin.as_ptr(), P as usize, Some(0x42));
    ensure!(
        raw == Access::Completed,
        "writing the pinned shared page through its pointer: {raw:?}"
    );
    if u > P {
        // Its private neighbour in the same huge page: refused by the API.
        match read_byte(view, GPA) {
            Err(GateError::Private { private, .. }) => {
                ensure!(private == GPA, "names {private:#x}")
            }
            other => {
                return Err(Stop::Fail(format!(
                    "private remainder of a mixed huge page: {other:?}"
                )));
            }
        }
        // And a pin of it is refused too.
        ensure!(
            matches!(view.pin(GPA, P), Err(GateError::Private { .. })),
            "a pin of the private remainder of a mixed huge page was not refused"
        );
    }
    // A backing page that is all private faults.
    if env.file_size() >= 2 * u {
        let addr = view.view_addr(GPA + u).unwrap_or(std::ptr::null());
        let access = probe(addr.cast_mut(), 1, None);
        ensure!(
            matches!(access, Access::Signal(_)),
            "an all-private backing page did not fault: {access:?}"
        );
    }
    // Released, and the page private again: the whole backing page faults.
    drop(pin);
    f.gate.convert(shared, P, Attribute::Private)?;
    let addr = view.view_addr(shared).unwrap_or(std::ptr::null());
    let access = probe(addr.cast_mut(), 1, None);
    ensure!(
        matches!(access, Access::Signal(_)),
        "an all-private backing page, once released, did not fault: {access:?}"
    );
    Ok(())
}

pub(crate) fn c5_refusals_change_nothing(env: &Env) -> Result<(), Stop> {
    let vm = env.vm()?.clone();
    let size = env.file_size();
    // Two files bound back to back, and a hole after them.
    env.need_pages(2 * size / env.unit())?;
    let a = env.create_for(&vm, size)?;
    let b = env.create_for(&vm, size)?;
    let ba = vm.bind(&a, SlotRequest::new(GPA, 0, size))?;
    let bb = vm.bind(&b, SlotRequest::new(GPA + size, 0, size))?;
    let gate = Gatekeeper::new(
        &vm,
        vec![ba, bb],
        GateOptions::new(Attribute::Private, Policy::InPlace),
    )?;
    let attrs = gate.attributes();
    let refusals: [(&str, u64, u64); 6] = [
        ("length 0", GPA, 0),
        ("unaligned GPA", GPA + 1, P),
        ("unaligned length", GPA, P + 1),
        ("wrapping range", u64::MAX - P + 1, 2 * P),
        ("below guest memory", GPA - P, 2 * P),
        ("across the hole after the slots", GPA + 2 * size - P, 2 * P),
    ];
    for (what, gpa, len) in refusals {
        expect_errno(
            gate.convert(gpa, len, Attribute::Shared),
            libc::EINVAL,
            what,
        )?;
        expect_errno(gate.discard(gpa, len), libc::EINVAL, what)?;
    }
    ensure!(
        gate.attributes() == attrs,
        "refused conversions changed the attributes"
    );
    let mut byte = [0u8];
    ensure!(
        matches!(
            gate.read(GPA + 2 * size, &mut byte),
            Err(GateError::OutsideMemory { .. })
        ),
        "a host-view read past guest memory was not refused"
    );
    ensure!(
        gate.stats() == gmem::ConversionStats::default(),
        "refused conversions counted"
    );
    // A range spanning both slots converts as one.
    let report = gate.convert(GPA + size - P, 2 * P, Attribute::Shared)?;
    ensure!(
        report.changed_bytes == 2 * P,
        "spanning conversion report {report:?}"
    );
    gate.write(GPA + size - P, &vec![1; 2 * P as usize])?;
    Ok(())
}

impl crate::env::Errno for ConvertError {
    fn errno(&self) -> i32 {
        ConvertError::errno(self)
    }
}

pub(crate) fn c6_dontneed_does_not_free(env: &Env) -> Result<(), Stop> {
    env.vm()?;
    let f = fixture(env, Attribute::Shared, Policy::InPlace)?;
    let view = &f.gate;
    let u = env.unit();
    view.fill(GPA, u, 7)?;
    let before = resident_bytes(&*f.memory)?;
    ensure!(
        before >= u,
        "the file holds {before:#x} bytes after a write of {u:#x}"
    );
    // A plain MAP_SHARED mapping of the file, as a VMM without gmem would
    // have (gmem's own mappings of the memfd are mlocked, where DONTNEED is
    // refused outright).
    // SAFETY: a fresh mapping at a kernel-chosen address, unmapped below.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            u as usize,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            f.memory.raw_fd(),
            0,
        )
    }
    .map_err(|e| Stop::Fail(format!("mmap: {e}")))?;
    // SAFETY: the first byte of the live mapping just made, inside the file.
    unsafe { ptr.cast::<u8>().write_volatile(7) };
    // SAFETY: the mapping just made; DONTNEED only drops its page-table entries.
    let dontneed =
        unsafe { rustix::mm::madvise(ptr, u as usize, rustix::mm::Advice::LinuxDontNeed) };
    // SAFETY: the mapping just made, no longer used.
    unsafe { rustix::mm::munmap(ptr, u as usize) }
        .map_err(|e| Stop::Fail(format!("munmap: {e}")))?;
    dontneed.map_err(|e| Stop::Fail(format!("madvise(MADV_DONTNEED): {e}")))?;
    ensure!(
        resident_bytes(&*f.memory)? == before,
        "MADV_DONTNEED changed what the file holds (it should not: the memory stays allocated)"
    );
    ensure!(
        read_byte(view, GPA)? == 7,
        "MADV_DONTNEED lost shared-file content"
    );
    let report = f.gate.discard(GPA, u)?;
    ensure!(report.bytes_freed == u, "discard report {report:?}");
    ensure!(
        resident_bytes(&*f.memory)? == before - u,
        "a discard did not return the page"
    );
    ensure!(
        read_byte(view, GPA)? == 0,
        "a discarded page does not read zero"
    );
    Ok(())
}

/// Drains the per-CPU LRU batches (mlock does `lru_add_drain_all`), so that
/// page flags such as unevictable are up to date.
fn drain_lru_batches() {
    let mut page = [0u8; 64];
    // SAFETY: locks and unlocks a live stack buffer; nothing else changes.
    unsafe {
        libc::mlock(page.as_mut_ptr().cast(), page.len());
        libc::munlock(page.as_mut_ptr().cast(), page.len());
    }
}

/// The `/proc/kpageflags` word of the page mapped at `addr`, if this process
/// may read physical frame numbers (root).
fn page_flags(addr: usize) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    pagemap.seek(SeekFrom::Start((addr as u64 / P) * 8)).ok()?;
    let mut entry = [0u8; 8];
    pagemap.read_exact(&mut entry).ok()?;
    let entry = u64::from_le_bytes(entry);
    let pfn = entry & ((1 << 55) - 1);
    if entry >> 63 == 0 || pfn == 0 {
        return None;
    }
    let mut kpf = std::fs::File::open("/proc/kpageflags").ok()?;
    kpf.seek(SeekFrom::Start(pfn * 8)).ok()?;
    let mut flags = [0u8; 8];
    kpf.read_exact(&mut flags).ok()?;
    Some(u64::from_le_bytes(flags))
}

pub(crate) fn c7_out_of_swap(env: &Env) -> Result<(), Stop> {
    const KPF_HUGE: u64 = 1 << 17;
    const KPF_UNEVICTABLE: u64 = 1 << 18;
    const KPF_MLOCKED: u64 = 1 << 33;
    env.vm()?;
    let f = fixture(env, Attribute::Shared, Policy::InPlace)?;
    let view = &f.gate;
    // A device's pin maps the page in the view, where its flags can be read.
    let pin = view.pin(GPA, P)?;
    pin.write(0, &[1])?;
    let addr = pin.as_ptr() as usize;
    drain_lru_batches();
    let Some(flags) = page_flags(addr) else {
        skip!(
            Need::NotApplicable,
            "reading page flags needs root (/proc/self/pagemap frame numbers)"
        );
    };
    let (ok, what) = match env.backing {
        gmem::BackingKind::GuestMemfd => {
            (flags & KPF_UNEVICTABLE != 0, "unevictable (guest_memfd)")
        }
        gmem::BackingKind::Memfd => {
            // mlock2(MLOCK_ONFAULT): the kernel marks the pages at reclaim
            // time (or already has); the mapping must be VM_LOCKED ("lo").
            let locked_vma = super::file::vm_flags(addr)
                .is_some_and(|f| f.split_whitespace().any(|w| w == "lo"));
            (
                locked_vma || flags & (KPF_MLOCKED | KPF_UNEVICTABLE) != 0,
                "mlocked (VmFlags lo)",
            )
        }
        _ => (flags & KPF_HUGE != 0, "a hugetlb page (never swapped)"),
    };
    ensure!(ok, "a guest page is not {what}: kpageflags {flags:#x}");
    Ok(())
}
