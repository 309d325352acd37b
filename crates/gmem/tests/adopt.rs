//! Adoption by an existing VMM, through the public API only: its own VM fd,
//! its own guest_memfd and memfd, slots it chose, and slots it created
//! itself beside gmem's. Needs /dev/kvm; the guest_memfd parts need
//! guest_memfd, and run where the host has it (the test kit prints
//! `skipped: <reason>` for what the host lacks, a failure where the
//! environment requires it).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use gmem::backing::{GuestMemfd, SealedMemfd};
use gmem::{
    AdoptReason, Attribute, BackingError, BackingKind, BindError, GateOptions, Gatekeeper,
    GmemFlags, KvmError, MemslotFlags, Policy, RestrictedMemory, Slot, SlotRequest, Vm, VmType,
};
use gmem_testkit::{Need, kvm_or_skip, needs, on_backing};
use rustix::fs::{MemfdFlags, SealFlags};

const MIB: u64 = 1 << 20;

/// The VMM's own `/dev/kvm`, where KVM is here.
fn kvm(test: &str) -> Option<kvm_ioctls::Kvm> {
    kvm_or_skip(test).then(|| kvm_ioctls::Kvm::new().expect("KVM was probed"))
}

/// A guest_memfd made by "the VMM" with its own ioctl.
fn vmm_guest_memfd(vm: &Vm, size: u64, flags: u64) -> OwnedFd {
    let raw = vm
        .fd()
        .create_guest_memfd(kvm_bindings::kvm_create_guest_memfd {
            size,
            flags,
            reserved: [0; 6],
        })
        .unwrap();
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn vmm_memfd(size: u64, seals: SealFlags) -> OwnedFd {
    let fd = rustix::fs::memfd_create("vmm-ram", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    if !seals.is_empty() {
        rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
    }
    fd
}

const SEALS: SealFlags = SealFlags::GROW
    .union(SealFlags::SHRINK)
    .union(SealFlags::SEAL);

#[test]
fn a_vmm_brings_its_vm_and_files_and_chooses_its_slots() {
    let test = "adoption";
    let Some(kvm) = kvm(test) else {
        return;
    };
    let vm = Vm::from_vm_fd(kvm.create_vm().unwrap(), VmType::Default).unwrap();
    // Its memfd, and its guest_memfd where the kernel has one, adopted
    // after checks, each in a slot it chose (9, 5) at its own GPA.
    let flags = GmemFlags::MMAP | GmemFlags::INIT_SHARED;
    let mut files: Vec<(Arc<dyn RestrictedMemory>, Slot, u64)> = Vec::new();
    if on_backing(test, BackingKind::Memfd, 0).is_some() {
        let memfd = SealedMemfd::adopt(vmm_memfd(4 * MIB, SEALS), flags, Some(&vm)).unwrap();
        files.push((Arc::new(memfd), Slot(9), 1 << 30));
    }
    if on_backing(test, BackingKind::GuestMemfd, 0).is_some() {
        let fd = vmm_guest_memfd(&vm, 4 * MIB, flags.bits());
        files.push((
            Arc::new(GuestMemfd::adopt(&vm, fd, flags).unwrap()),
            Slot(5),
            0,
        ));
    }
    let mut bindings = Vec::new();
    for (mem, slot, gpa) in &files {
        assert_eq!(mem.size(), 4 * MIB);
        let b = vm
            .bind(mem, SlotRequest::new(*gpa, 0, 4 * MIB).in_slot(*slot))
            .unwrap();
        assert_eq!(b.slot(), *slot);
        bindings.push(b);
    }
    // Conversions round trip over each, content kept.
    let gate = Gatekeeper::new(
        &vm,
        bindings,
        GateOptions::new(Attribute::Shared, Policy::InPlace),
    )
    .unwrap();
    for (_, _, base) in &files {
        let gpa = base + 0x1000;
        gate.write(gpa, b"vmm data").unwrap();
        gate.convert(gpa, 0x1000, Attribute::Private).unwrap();
        gate.convert(gpa, 0x1000, Attribute::Shared).unwrap();
        let mut buf = [0u8; 8];
        gate.read(gpa, &mut buf).unwrap();
        assert_eq!(&buf, b"vmm data");
    }
}

/// On a host whose KVM has no guest_memfd, every path to
/// `KVM_CREATE_GUEST_MEMFD` names it (`BackingError::NoGuestMemfd`,
/// `ENOTTY`), never a bare errno: creation, adoption after the VMM's own
/// failed ioctl, and the error of that ioctl itself. Where the kernel has
/// guest_memfd, the same calls succeed.
#[test]
fn no_guest_memfd_is_named_on_every_path() {
    let Some(kvm) = kvm("no guest_memfd, named") else {
        return;
    };
    let vm = Vm::from_vm_fd(kvm.create_vm().unwrap(), VmType::Default).unwrap();
    let created = gmem::create_memory(
        gmem::MemoryOptions::new(BackingKind::GuestMemfd, 2 * MIB),
        Some(&vm),
    );
    let request = kvm_bindings::kvm_create_guest_memfd {
        size: 2 * MIB,
        flags: 0,
        reserved: [0; 6],
    };
    let ioctl = vm.fd().create_guest_memfd(request);
    if vm.has_guest_memfd() {
        assert!(created.is_ok(), "{:?}", created.err());
        assert!(ioctl.is_ok(), "{ioctl:?}");
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        drop(unsafe { OwnedFd::from_raw_fd(ioctl.unwrap()) });
        return;
    }
    let e = created.unwrap_err();
    assert!(matches!(e, BackingError::NoGuestMemfd), "{e}");
    assert_eq!(e.errno(), libc::ENOTTY);
    assert!(e.to_string().contains("has no guest_memfd"), "{e}");
    // The VMM's own ioctl: a bare ENOTTY, which gmem names.
    let err = ioctl.unwrap_err();
    assert_eq!(err.errno(), libc::ENOTTY);
    let e = GuestMemfd::create_error(&vm, &request, err);
    assert!(matches!(e, BackingError::NoGuestMemfd), "{e}");
    // Adoption of whatever fd it has then: named too, the fd handed back.
    let fd = vmm_memfd(2 * MIB, SEALS);
    let raw = fd.as_raw_fd();
    let e = GuestMemfd::adopt(&vm, fd, GmemFlags::empty()).unwrap_err();
    assert!(
        matches!(e.reason, AdoptReason::Backing(BackingError::NoGuestMemfd)),
        "{e}"
    );
    assert_eq!(e.errno(), libc::ENOTTY);
    assert_eq!(e.fd.as_raw_fd(), raw);
    assert!(e.to_string().contains("has no guest_memfd"), "{e}");
}

#[test]
fn wrong_fds_are_refused_and_handed_back() {
    let Some(kvm) = kvm("adoption refusals") else {
        return;
    };
    let flags = GmemFlags::MMAP | GmemFlags::INIT_SHARED;
    // Missing seals, named.
    for seals in [SealFlags::empty(), SealFlags::GROW | SealFlags::SHRINK] {
        let e = SealedMemfd::adopt(vmm_memfd(2 * MIB, seals), flags, None).unwrap_err();
        assert!(matches!(e.reason, AdoptReason::MissingSeals { .. }), "{e}");
        assert!(e.to_string().contains("F_SEAL_SEAL"), "{e}");
    }
    // A size that breaks the rules (sealed at 5000 bytes).
    let e = SealedMemfd::adopt(vmm_memfd(5000, SEALS), flags, None).unwrap_err();
    assert!(matches!(e.reason, AdoptReason::Size(_)), "{e}");
    // A file that is not a VM.
    let e = Vm::from_owned_fd(vmm_memfd(MIB, SEALS), VmType::Default).unwrap_err();
    assert!(matches!(e, KvmError::NotAVm { .. }), "{e}");
    // A real VM fd, as an OwnedFd (a dup of a VmFd's).
    let vm_fd = kvm.create_vm().unwrap();
    // SAFETY: the VmFd's fd is open for this borrow, which only dups it.
    let owned = unsafe { std::os::fd::BorrowedFd::borrow_raw(vm_fd.as_raw_fd()) }
        .try_clone_to_owned()
        .unwrap();
    assert!(Vm::from_owned_fd(owned, VmType::Default).is_ok());
}

#[test]
fn wrong_guest_memfds_are_refused_and_handed_back() {
    let test = "guest_memfd adoption refusals";
    let Some(kvm) = kvm(test) else {
        return;
    };
    if on_backing(test, BackingKind::GuestMemfd, 0).is_none() {
        return;
    }
    let vm = Vm::from_vm_fd(kvm.create_vm().unwrap(), VmType::Default).unwrap();
    let flags = GmemFlags::MMAP | GmemFlags::INIT_SHARED;
    // A memfd is no guest_memfd; the fd comes back open.
    let fd = vmm_memfd(2 * MIB, SEALS);
    let raw = fd.as_raw_fd();
    let e = GuestMemfd::adopt(&vm, fd, flags).unwrap_err();
    assert!(matches!(e.reason, AdoptReason::WrongKind { .. }), "{e}");
    assert_eq!(e.fd.as_raw_fd(), raw, "the same fd is handed back");
    assert!(e.to_string().contains("/memfd:vmm-ram"), "{e}");
    assert_eq!(e.errno(), libc::EINVAL);
    // A guest_memfd is no memfd.
    let e = SealedMemfd::adopt(vmm_guest_memfd(&vm, 2 * MIB, 0), flags, None).unwrap_err();
    assert!(matches!(e.reason, AdoptReason::WrongKind { .. }), "{e}");
    // Flags the VM does not accept.
    let e = GuestMemfd::adopt(
        &vm,
        vmm_guest_memfd(&vm, 2 * MIB, 0),
        GmemFlags::from_bits_retain(1 << 5),
    )
    .unwrap_err();
    assert!(matches!(e.reason, AdoptReason::Size(_)), "{e}");
    // Another VM's guest_memfd: the kernel refuses the binding (EINVAL).
    let other = Vm::new().unwrap();
    let theirs: Arc<dyn RestrictedMemory> = Arc::new(
        GuestMemfd::adopt(
            &other,
            vmm_guest_memfd(&other, 2 * MIB, flags.bits()),
            flags,
        )
        .unwrap(),
    );
    let e = vm
        .bind(&theirs, SlotRequest::new(0, 0, 2 * MIB))
        .unwrap_err();
    assert!(matches!(e, BindError::ForeignVm { .. }), "{e}");
}

#[test]
fn slots_the_vmm_created_itself_are_never_overwritten() {
    let Some(kvm) = kvm("reserved slots") else {
        return;
    };
    let vm = Vm::from_vm_fd(kvm.create_vm().unwrap(), VmType::Default).unwrap();
    // The VMM's own slot 3 at 16 MiB, over anonymous memory.
    let len = 2 * MIB as usize;
    // SAFETY: a fresh anonymous mapping, kept for the test's life.
    let host = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .unwrap();
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 3,
        flags: 0,
        guest_phys_addr: 16 * MIB,
        memory_size: len as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping lives as long as the test, longer than the VM.
    unsafe { vm.fd().set_user_memory_region(region) }.unwrap();
    let reservation = vm
        .reserve_slot(SlotRequest::new(16 * MIB, 0, len as u64).in_slot(Slot(3)))
        .unwrap();
    let mem = gmem::create_memory(
        gmem::MemoryOptions::new(BackingKind::Memfd, 2 * MIB),
        Some(&vm),
    )
    .unwrap();
    let e = vm
        .bind(&mem, SlotRequest::new(0, 0, 2 * MIB).in_slot(Slot(3)))
        .unwrap_err();
    assert!(matches!(e, BindError::SlotInUse { slot: Slot(3) }), "{e}");
    let e = vm
        .bind(&mem, SlotRequest::new(17 * MIB, 0, 2 * MIB))
        .unwrap_err();
    assert!(
        matches!(e, BindError::GpaOverlap { other: Slot(3), .. }),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EEXIST);
    // Memslot flags pass through on a memfd slot, and are refused with the
    // kernel's errno on a guest_memfd slot.
    let ro = vm
        .bind(
            &mem,
            SlotRequest::new(0, 0, 2 * MIB).with_flags(MemslotFlags::READONLY),
        )
        .unwrap();
    assert_eq!(ro.flags(), MemslotFlags::READONLY);
    drop(ro);
    // The address spaces KVM has (2 with SMM on x86), and one past them.
    let spaces = vm.address_spaces();
    let e = vm
        .bind(
            &mem,
            SlotRequest::new(0, 0, 2 * MIB).in_address_space(spaces),
        )
        .unwrap_err();
    assert!(matches!(e, BindError::InvalidAddressSpace { .. }), "{e}");
    if !needs(
        "memslot flags on guest_memfd",
        &Need::of_backing(BackingKind::GuestMemfd),
    ) {
        return;
    }
    let g = gmem::create_memory(
        gmem::MemoryOptions::new(BackingKind::GuestMemfd, 2 * MIB),
        Some(&vm),
    )
    .unwrap();
    for flags in [MemslotFlags::READONLY, MemslotFlags::LOG_DIRTY_PAGES] {
        let e = vm
            .bind(&g, SlotRequest::new(0, 0, 2 * MIB).with_flags(flags))
            .unwrap_err();
        assert!(matches!(e, BindError::FlagsWithGuestMemfd { .. }), "{e}");
        assert_eq!(e.errno(), libc::EINVAL);
    }
    // The reservation lasts as long as the VMM's slot: it is dropped when
    // the VMM deletes the slot.
    drop(reservation);
}

/// Sizes the kernel accepts, gmem accepts: creation maps nothing (only a
/// binding maps its range), so a guest_memfd or memfd of 2^47, 2^62 or
/// 0x7ffffffffffff000 bytes costs no address space until bound.
#[test]
fn huge_sparse_files_cost_nothing_until_bound() {
    let test = "huge files";
    let Some(_kvm) = kvm(test) else {
        return;
    };
    let vm = Vm::new().unwrap();
    for kind in [BackingKind::GuestMemfd, BackingKind::Memfd] {
        if on_backing(test, kind, 0).is_none() {
            continue;
        }
        for size in [1u64 << 47, 1 << 62, 0x7fff_ffff_ffff_f000] {
            let mem = gmem::create_memory(gmem::MemoryOptions::new(kind, size), Some(&vm))
                .unwrap_or_else(|e| panic!("{kind} of {size:#x}: {e}"));
            assert_eq!(mem.size(), size);
            // A binding of 2 MiB at the end of the file maps just that.
            let b = vm
                .bind(&mem, SlotRequest::new(0, size - 2 * MIB, 2 * MIB))
                .unwrap_or_else(|e| panic!("{kind} of {size:#x}: {e}"));
            drop(b);
        }
    }
}
