//! Binding checks: memslot flags, foreign files, overlaps (T14–T16), the
//! binding rules with nothing changed by a refusal (G6), and drop orders (G7).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use gmem::{BindError, FileRange, PAGE_SIZE, RestrictedMemory, Slot, SlotRequest};
use kvm_bindings::{
    KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, kvm_userspace_memory_region,
    kvm_userspace_memory_region2,
};

use crate::env::expect_errno;
use crate::raw::RawAccess;
use crate::{Env, Need, Stop, ensure, skip};

const P: u64 = PAGE_SIZE;

fn region2(slot: u32, flags: u32, gpa: u64, size: u64, fd: i32) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: 0,
        guest_memfd_offset: 0,
        guest_memfd: fd as u32,
        pad1: 0,
        pad2: [0; 14],
    }
}

pub(crate) fn t14_invalid_region_flags(env: &Env) -> Result<(), Stop> {
    if !env.is_gmem() {
        skip!(
            Need::NotApplicable,
            "gmem's bind takes no memslot flags: dirty logging and read-only slots are not offered on restricted memory"
        );
    }
    let vm = env.vm()?;
    let mem = env.create(env.file_size())?;
    let fd = mem.raw_fd().as_raw_fd();
    let supported = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD;
    for bit in 0..32 {
        let flag = 1u32 << bit;
        if flag & (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY) == 0 {
            let v1 = kvm_userspace_memory_region {
                slot: 0,
                flags: flag,
                guest_phys_addr: 0,
                memory_size: P,
                userspace_addr: 0,
            };
            // SAFETY: the flag is invalid for the v1 ioctl, so the kernel refuses
            // it before it could use userspace_addr.
            let result = unsafe { vm.fd().set_user_memory_region(v1) };
            ensure!(
                result.as_ref().err().map(|e| e.errno()) == Some(libc::EINVAL),
                "v1 with flag {flag:#x}: {result:?}, expected EINVAL"
            );
        }
        if flag & supported == 0 {
            // SAFETY: an unsupported flag: refused before any memory is used.
            let result = unsafe { vm.fd().set_user_memory_region2(region2(0, flag, 0, P, fd)) };
            ensure!(
                result.as_ref().err().map(|e| e.errno()) == Some(libc::EINVAL),
                "v2 with flag {flag:#x}: {result:?}, expected EINVAL"
            );
        }
    }
    let both = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_GUEST_MEMFD;
    // SAFETY: dirty logging with guest_memfd is refused before any memory is used.
    let result = unsafe { vm.fd().set_user_memory_region2(region2(0, both, 0, P, fd)) };
    ensure!(
        result.as_ref().err().map(|e| e.errno()) == Some(libc::EINVAL),
        "v2 with LOG_DIRTY|GUEST_MEMFD: {result:?}, expected EINVAL"
    );
    Ok(())
}

pub(crate) fn t15_add_private_region(env: &Env) -> Result<(), Stop> {
    let vm = env.vm()?;
    let other = env.new_vm()?;
    let size = env.file_size();
    env.need_pages(2 * size / env.unit())?;
    let theirs = env.create_for(&other, size)?;
    expect_errno(
        vm.bind(&theirs, SlotRequest::new(0, 0, size)),
        libc::EINVAL,
        "binding another VM's file",
    )?;
    let mine = env.create_for(vm, size)?;
    for offset in 1..P {
        expect_errno(
            vm.bind(&mine, SlotRequest::new(0, offset, P)),
            libc::EINVAL,
            &format!("binding at offset {offset:#x}"),
        )?;
    }
    if env.is_gmem() {
        // Files that are not this VM's guest_memfd, straight to the kernel.
        let kvm_fd = vm.kvm().as_raw_fd();
        let vm_fd = vm.fd().as_raw_fd();
        let memfd = rustix::fs::memfd_create("gmem-test", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| Stop::Fail(format!("memfd_create: {e}")))?;
        for (what, fd) in [
            ("/dev/kvm", kvm_fd),
            ("the VM fd", vm_fd),
            ("a memfd", memfd.as_raw_fd()),
            ("another VM's guest_memfd", theirs.raw_fd().as_raw_fd()),
        ] {
            // SAFETY: the fd is not this VM's guest_memfd, so the kernel refuses
            // the slot before it maps anything.
            let result = unsafe {
                vm.fd()
                    .set_user_memory_region2(region2(0, KVM_MEM_GUEST_MEMFD, 0, P, fd))
            };
            ensure!(
                result.as_ref().err().map(|e| e.errno()) == Some(libc::EINVAL),
                "kernel bind of {what}: {result:?}, expected EINVAL"
            );
        }
    }
    let _mine = vm.bind(&mine, SlotRequest::new(0, 0, size))?;
    let _theirs = other.bind(&theirs, SlotRequest::new(0, 0, size))?;
    Ok(())
}

pub(crate) fn t16_overlapping_regions(env: &Env) -> Result<(), Stop> {
    const GPA: u64 = 0xc000_0000;
    const R: u64 = P;
    let vm = env.vm()?;
    let size = env.file_size().max(4 * R);
    let mem = env.create_for(vm, size)?;
    let a = vm.bind(&mem, SlotRequest::new(GPA, 0, 2 * R))?;
    let _b = vm.bind(&mem, SlotRequest::new(GPA * 2, 2 * R, 2 * R))?;
    drop(a);
    for gpa in [GPA * 2 - R, GPA * 2 + R] {
        expect_errno(
            vm.bind(&mem, SlotRequest::new(gpa, 0, 2 * R)),
            libc::EEXIST,
            &format!("re-binding at GPA {gpa:#x}, over the other slot"),
        )?;
    }
    // A pure file-range overlap at a free GPA is EINVAL (spec §3.1 note).
    expect_errno(
        vm.bind(&mem, SlotRequest::new(GPA, 2 * R, 2 * R)),
        libc::EINVAL,
        "binding a bound file range again",
    )?;
    Ok(())
}

pub(crate) fn g6_bind_rules(env: &Env) -> Result<(), Stop> {
    let vm = env.vm()?;
    let size = env.file_size();
    env.need_pages(2 * size / env.unit())?;
    let mem = env.create_for(vm, size)?;
    let host = mem.raw_map()?;
    host.write(0, b"marker")?;
    let populated = mem.populated()?;
    let gpa = 0x1000_0000;
    let refusals: [(&str, SlotRequest, i32); 9] = [
        ("size 0", SlotRequest::new(gpa, 0, 0), libc::EINVAL),
        (
            "unaligned GPA",
            SlotRequest::new(gpa + 1, 0, P),
            libc::EINVAL,
        ),
        (
            "unaligned size",
            SlotRequest::new(gpa, 0, P + 1),
            libc::EINVAL,
        ),
        (
            "unaligned offset",
            SlotRequest::new(gpa, 1, P),
            libc::EINVAL,
        ),
        (
            "wrapping GPA",
            SlotRequest::new(u64::MAX - P + 1, 0, 2 * P),
            libc::EINVAL,
        ),
        (
            "offset at the end",
            SlotRequest::new(gpa, size, P),
            libc::EINVAL,
        ),
        (
            "range past the end",
            SlotRequest::new(gpa, 0, size + P),
            libc::EINVAL,
        ),
        (
            "wrapping offset",
            SlotRequest::new(gpa, u64::MAX - P + 1, 2 * P),
            libc::EINVAL,
        ),
        (
            "slot id past the VM's slots",
            SlotRequest::new(gpa, 0, P).in_slot(Slot(u16::MAX)),
            libc::EINVAL,
        ),
    ];
    for (what, req, errno) in refusals {
        expect_errno(vm.bind(&mem, req), errno, what)?;
    }
    let first = vm.bind(&mem, SlotRequest::new(gpa, 0, P).in_slot(Slot(5)))?;
    let second_file = env.create_for(vm, size)?;
    let after_bind: [(&str, SlotRequest, &Arc<dyn RestrictedMemory>, i32); 3] = [
        (
            "a bound slot again",
            SlotRequest::new(gpa + 0x10_0000, P, P).in_slot(Slot(5)),
            &mem,
            libc::EINVAL,
        ),
        (
            "an overlapping GPA",
            SlotRequest::new(gpa, 0, P),
            &second_file,
            libc::EEXIST,
        ),
        (
            "a bound file range",
            SlotRequest::new(gpa + 0x10_0000, 0, P),
            &mem,
            libc::EINVAL,
        ),
    ];
    for (what, req, file, errno) in after_bind {
        expect_errno(vm.bind(file, req), errno, what)?;
    }
    let mut marker = [0u8; 6];
    host.read(0, &mut marker)?;
    ensure!(
        &marker == b"marker",
        "refused bindings changed the file: {marker:?}"
    );
    ensure!(
        mem.populated()? == populated,
        "refused bindings changed what is populated"
    );
    // The refusals left the slot table as it was: adjacent and freed ranges bind.
    let _adjacent = vm.bind(&mem, SlotRequest::new(gpa + P, P, P))?;
    drop(first);
    let again = vm.bind(&mem, SlotRequest::new(gpa, 0, P).in_slot(Slot(5)));
    ensure!(
        again.is_ok(),
        "re-binding a deleted slot's range: {:?}",
        again.err()
    );
    ensure!(
        matches!(
            vm.bind(&mem, SlotRequest::new(gpa + 2 * P, 0, P)),
            Err(BindError::FileRangeOverlap { .. })
        ),
        "overlap not named"
    );
    Ok(())
}

/// Whether any fd or mapping of this process still refers to inode `ino`.
fn inode_in_use(ino: u64) -> Result<Option<String>, Stop> {
    let fds = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| Stop::Fail(format!("/proc/self/fd: {e}")))?;
    for entry in fds.flatten() {
        if let Ok(meta) = std::fs::metadata(entry.path())
            && std::os::unix::fs::MetadataExt::ino(&meta) == ino
            && let Ok(target) = std::fs::read_link(entry.path())
        {
            let target = target.to_string_lossy().into_owned();
            if target.contains("gmem") {
                return Ok(Some(format!("fd {:?} -> {target}", entry.file_name())));
            }
        }
    }
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| Stop::Fail(format!("/proc/self/maps: {e}")))?;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 6
            && fields[4] == ino.to_string()
            && fields[5..].join(" ").contains("gmem")
        {
            return Ok(Some(format!("mapping {line}")));
        }
    }
    Ok(None)
}

pub(crate) fn g7_drop_orders(env: &Env) -> Result<(), Stop> {
    #[derive(Clone, Copy, Debug)]
    enum Part {
        Vm,
        File,
        Binding,
    }
    use Part::{Binding, File, Vm};
    let orders = [
        [Vm, File, Binding],
        [Vm, Binding, File],
        [File, Vm, Binding],
        [File, Binding, Vm],
        [Binding, Vm, File],
        [Binding, File, Vm],
    ];
    let size = env.file_size();
    for order in orders {
        let vm = env.new_vm()?;
        let weak = vm.downgrade();
        let mem = env.create_for(&vm, size)?;
        let ino = rustix::fs::fstat(mem.raw_fd())
            .map_err(|e| Stop::Fail(e.to_string()))?
            .st_ino;
        let binding = vm.bind(&mem, SlotRequest::new(0, 0, size))?;
        let (mut vm, mut mem, mut binding) = (Some(vm), Some(mem), Some(binding));
        for part in order {
            match part {
                Vm => drop(vm.take()),
                Binding => drop(binding.take()),
                File => {
                    // The file still works once the VM and the binding are gone
                    // (spec §2.8; the end of upstream T17).
                    if vm.is_none()
                        && binding.is_none()
                        && let Some(mem) = &mem
                    {
                        mem.allocate(FileRange::new(0, P)?)?;
                        mem.punch_hole(FileRange::new(0, P)?)?;
                    }
                    drop(mem.take());
                }
            }
        }
        ensure!(
            weak.upgrade().is_none(),
            "drop order {order:?}: the VM is still alive"
        );
        if let Some(what) = inode_in_use(ino)? {
            return Err(Stop::Fail(format!(
                "drop order {order:?}: the file is still in use: {what}"
            )));
        }
    }
    Ok(())
}
