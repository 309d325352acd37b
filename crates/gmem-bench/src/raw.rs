//! The raw baselines: the same work as gmem's, done with direct system calls
//! and KVM ioctls, with no gmem layer. Every measurement compares against one
//! of these in the same run.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use gmem::BackingKind;
use gmem_vmm::boot;
use kvm_bindings::{KVM_MEM_GUEST_MEMFD, kvm_create_guest_memfd, kvm_userspace_memory_region2};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{Advice, MapFlags, ProtFlags};

use crate::BenchError;

/// What memory a measurement runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Subject {
    /// A gmem backing.
    Backing(BackingKind),
    /// Anonymous memory (plain-memory baseline).
    Anon,
    /// Anonymous memory with `MADV_HUGEPAGE`.
    AnonThp,
}

impl Subject {
    /// The name in tables and charts.
    pub fn name(self) -> &'static str {
        match self {
            Subject::Backing(b) => b.name(),
            Subject::Anon => "anon",
            Subject::AnonThp => "anon-thp",
        }
    }

    /// The backing, if this is one.
    pub fn backing(self) -> Option<BackingKind> {
        match self {
            Subject::Backing(b) => Some(b),
            _ => None,
        }
    }

    /// The page size its memory comes in (THP: 2 MiB when it gets them).
    pub fn page_size(self) -> u64 {
        match self {
            Subject::Backing(b) => b.page_size(),
            Subject::Anon => 4096,
            Subject::AnonThp => 2 << 20,
        }
    }
}

/// A raw file of `kind` and `size` bytes: `KVM_CREATE_GUEST_MEMFD` (flags
/// `MMAP|INIT_SHARED`) on `vm`, or `memfd_create` + `ftruncate`.
pub fn file(kind: BackingKind, size: u64, vm: &VmFd) -> Result<OwnedFd, BenchError> {
    let memfd = |extra: MemfdFlags| -> Result<OwnedFd, BenchError> {
        let fd = rustix::fs::memfd_create("raw", MemfdFlags::CLOEXEC | extra)?;
        rustix::fs::ftruncate(&fd, size)?;
        Ok(fd)
    };
    match kind {
        BackingKind::GuestMemfd => {
            let raw = vm
                .create_guest_memfd(kvm_create_guest_memfd {
                    size,
                    flags: 3,
                    reserved: [0; 6],
                })
                .map_err(|e| BenchError::Os(std::io::Error::from_raw_os_error(e.errno())))?;
            // SAFETY: a new fd that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        }
        BackingKind::Memfd => memfd(MemfdFlags::empty()),
        BackingKind::Hugetlb2M => memfd(MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB),
        BackingKind::Hugetlb1G => memfd(MemfdFlags::HUGETLB | MemfdFlags::HUGE_1GB),
    }
}

/// `fallocate(KEEP_SIZE)` of `[0, size)`.
pub fn populate(fd: BorrowedFd<'_>, size: u64) -> Result<(), BenchError> {
    Ok(rustix::fs::fallocate(
        fd,
        FallocateFlags::KEEP_SIZE,
        0,
        size,
    )?)
}

/// `fallocate(PUNCH_HOLE|KEEP_SIZE)` of `[0, size)`.
pub fn punch(fd: BorrowedFd<'_>, size: u64) -> Result<(), BenchError> {
    Ok(rustix::fs::fallocate(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        0,
        size,
    )?)
}

/// An owned mapping, unmapped on drop.
pub struct Map {
    ptr: NonNull<u8>,
    len: usize,
}

impl Map {
    /// `MAP_SHARED` read-write of `fd` from offset 0.
    pub fn shared(fd: BorrowedFd<'_>, len: u64) -> Result<Map, BenchError> {
        // SAFETY: a new mapping at a kernel-chosen address.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        Ok(Map::wrap(ptr, len))
    }

    /// Anonymous private memory, with `MADV_HUGEPAGE` if `thp`.
    pub fn anon(len: u64, thp: bool) -> Result<Map, BenchError> {
        // SAFETY: a new anonymous mapping at a kernel-chosen address.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }?;
        let map = Map::wrap(ptr, len);
        if thp {
            map.advise(Advice::LinuxHugepage)?;
        }
        Ok(map)
    }

    fn wrap(ptr: *mut std::ffi::c_void, len: u64) -> Map {
        Map {
            // mmap never returns NULL on success.
            ptr: NonNull::new(ptr.cast()).unwrap_or(NonNull::dangling()),
            len: len as usize,
        }
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// `madvise` over the whole mapping.
    pub fn advise(&self, advice: Advice) -> Result<(), BenchError> {
        // SAFETY: exactly this live mapping.
        unsafe { rustix::mm::madvise(self.ptr.as_ptr().cast(), self.len, advice) }?;
        Ok(())
    }

    /// `mprotect` of `[off, off + len)` of the mapping.
    pub fn protect_range(
        &self,
        off: u64,
        len: u64,
        flags: rustix::mm::MprotectFlags,
    ) -> Result<(), BenchError> {
        let end = off.checked_add(len).filter(|&e| e <= self.len as u64);
        if end.is_none() {
            return Err(rustix::io::Errno::INVAL.into());
        }
        // SAFETY: inside this live mapping (checked); no reference points
        // into it.
        unsafe {
            rustix::mm::mprotect(
                self.ptr.as_ptr().add(off as usize).cast(),
                len as usize,
                flags,
            )
        }?;
        Ok(())
    }

    /// The mapping's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `mprotect` over the whole mapping.
    pub fn protect(&self, flags: rustix::mm::MprotectFlags) -> Result<(), BenchError> {
        // SAFETY: exactly this live mapping; no reference points into it.
        unsafe { rustix::mm::mprotect(self.ptr.as_ptr().cast(), self.len, flags) }?;
        Ok(())
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: this value owns the mapping.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Writes one byte in every 4 KiB page of `[ptr, ptr + len)`.
///
/// # Safety
/// - `[ptr, ptr + len)` must be a live, writable mapping;
/// - no Rust reference may point into it.
pub unsafe fn touch(ptr: *mut u8, len: u64) {
    for off in (0..len as usize).step_by(4096) {
        // SAFETY: inside the range the caller vouches for.
        unsafe { ptr.add(off).write_volatile(1) };
    }
}

/// Makes `map` (of `fd`, a file of `kind`, or anonymous memory if `kind` is
/// `None`) the VM's memslot 0 at GPA 0, as KVM requires for the kind: a
/// guest_memfd slot names the file and its own mapping.
///
/// # Safety
/// `map` (and `fd`) must outlive the slot: the VM fd must be closed (or the
/// slot deleted) before either is dropped.
pub unsafe fn bind(
    vm: &VmFd,
    kind: Option<BackingKind>,
    fd: Option<&OwnedFd>,
    map: &Map,
) -> Result<(), BenchError> {
    let gmem = kind == Some(BackingKind::GuestMemfd);
    let region = kvm_userspace_memory_region2 {
        slot: 0,
        flags: if gmem { KVM_MEM_GUEST_MEMFD } else { 0 },
        guest_phys_addr: 0,
        memory_size: map.len() as u64,
        userspace_addr: map.as_ptr() as u64,
        guest_memfd_offset: 0,
        guest_memfd: fd.map_or(0, |f| f.as_raw_fd() as u32),
        pad1: 0,
        pad2: [0; 14],
    };
    // SAFETY: the caller keeps the mapping alive as long as the slot; the
    // slot is the VM's only one, so nothing overlaps.
    unsafe { vm.set_user_memory_region2(region) }.map_err(kvm_err)
}

/// Guest memory as a VMM without gmem has it: a raw file of `kind`, one
/// read-write host mapping of it, and a VM whose memslot 0 maps it.
pub struct SlotFile {
    // Field order is drop order: the VM (and its slot) before the mapping.
    _vm: VmFd,
    map: Map,
    fd: OwnedFd,
    _kvm: Kvm,
}

impl SlotFile {
    /// Creates the VM, the file of `size` bytes, its mapping and the slot.
    pub fn new(kind: BackingKind, size: u64) -> Result<SlotFile, BenchError> {
        let kvm = Kvm::new().map_err(kvm_err)?;
        let vm = kvm.create_vm().map_err(kvm_err)?;
        let fd = file(kind, size, &vm)?;
        let map = Map::shared(fd.as_fd(), size)?;
        // SAFETY: the returned value's field order closes the VM fd before
        // unmapping and closing the file.
        unsafe { bind(&vm, Some(kind), Some(&fd), &map) }?;
        Ok(SlotFile {
            _vm: vm,
            map,
            fd,
            _kvm: kvm,
        })
    }

    /// The host mapping.
    pub fn map(&self) -> &Map {
        &self.map
    }

    /// Sets the slot again with `KVM_MEM_LOG_DIRTY_PAGES` (memfd and
    /// hugetlb kinds only).
    ///
    /// # Errors
    /// KVM's.
    pub fn log_dirty(&self) -> Result<(), BenchError> {
        let region = kvm_userspace_memory_region2 {
            slot: 0,
            flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: self.map.len() as u64,
            userspace_addr: self.map.as_ptr() as u64,
            guest_memfd_offset: 0,
            guest_memfd: 0,
            pad1: 0,
            pad2: [0; 14],
        };
        // SAFETY: the slot and mapping this SlotFile made (it keeps the
        // mapping until the VM fd is closed); only the flags change.
        unsafe { self._vm.set_user_memory_region2(region) }.map_err(kvm_err)
    }

    /// `KVM_GET_DIRTY_LOG` of the slot: its bitmap, read and cleared.
    ///
    /// # Errors
    /// KVM's.
    pub fn dirty_log(&self) -> Result<Vec<u64>, BenchError> {
        self._vm.get_dirty_log(0, self.map.len()).map_err(kvm_err)
    }

    /// The file.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A VM built with kvm-ioctls alone: memory, one memslot at GPA 0, boot
/// structures and one vCPU in long mode, as gmem-vmm builds them.
pub struct RawVm {
    // Field order is drop order: the vCPU and the VM fd go before the
    // memory their slot points at.
    vcpu: VcpuFd,
    _vm: VmFd,
    _map: Map,
    _fd: Option<OwnedFd>,
    _kvm: Kvm,
}

impl RawVm {
    /// Builds the VM with `size` bytes of `subject` memory and `code` at
    /// `load` (entry there too).
    pub fn new(subject: Subject, size: u64, code: &[u8], load: u64) -> Result<RawVm, BenchError> {
        let kvm = Kvm::new().map_err(kvm_err)?;
        let vm = kvm.create_vm().map_err(kvm_err)?;
        let (fd, map) = match subject {
            Subject::Backing(kind) => {
                let fd = file(kind, size, &vm)?;
                let map = Map::shared(fd.as_fd(), size)?;
                (Some(fd), map)
            }
            Subject::Anon => (None, Map::anon(size, false)?),
            Subject::AnonThp => (None, Map::anon(size, true)?),
        };
        // SAFETY: the mapping and the file live in the returned RawVm, whose
        // field order closes the vCPU and the VM fds before unmapping.
        unsafe { bind(&vm, subject.backing(), fd.as_ref(), &map) }?;
        let write = |gpa: u64, bytes: &[u8]| {
            // SAFETY: gpa + len lies inside the mapping (boot structures below
            // 1 MiB, the payload checked by the callers).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    map.as_ptr().add(gpa as usize),
                    bytes.len(),
                )
            }
        };
        let gdt: Vec<u8> = boot::gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
        write(boot::GDT_ADDR, &gdt);
        for (addr, word) in boot::page_tables(size) {
            write(addr, &word.to_le_bytes());
        }
        write(load, code);
        let vcpu = vm.create_vcpu(0).map_err(kvm_err)?;
        let sregs = vcpu.get_sregs().map_err(kvm_err)?;
        vcpu.set_sregs(&boot::long_mode_sregs(sregs))
            .map_err(kvm_err)?;
        vcpu.set_regs(&boot::entry_regs(load, boot::stack_top(size, 0), size, 0))
            .map_err(kvm_err)?;
        Ok(RawVm {
            vcpu,
            _vm: vm,
            _map: map,
            _fd: fd,
            _kvm: kvm,
        })
    }

    /// Runs until an `out` to `port`, re-entering on every other `out`
    /// (the doorbell ports included: a raw loop that does no work for them).
    /// Returns the value written.
    pub fn run_until_out(&mut self, port: u16) -> Result<u32, BenchError> {
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(p, data)) if p == port => {
                    let mut v = [0u8; 4];
                    v[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                    return Ok(u32::from_le_bytes(v));
                }
                Ok(VcpuExit::IoOut(..)) => {}
                Ok(other) => return Err(BenchError::Guest(format!("raw VM exit {other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(kvm_err(e)),
            }
        }
    }
}

fn kvm_err(e: kvm_ioctls::Error) -> BenchError {
    BenchError::Os(std::io::Error::from_raw_os_error(e.errno()))
}
