//! "No way in": each sequence review and attack found that reached a private
//! byte, crashed the host or starved another VM through safe code, run again
//! as the attack it was, through the public API only. Each must now be
//! refused with a typed error, or succeed without revealing or changing a
//! private byte; the numbers are the items.
//!
//! Tests skip (saying why) for what the host lacks: KVM, guest_memfd (items
//! 3 and 7), huge pages.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use gmem::backing::{GuestMemfd, HugetlbMemfd, SealedMemfd};
use gmem::{
    AdoptReason, Attribute, BackingError, BackingKind, ConvertError, FileRange, GateError,
    GateOptions, Gatekeeper, GmemFlags, KvmError, MemoryOptions, Policy, RestrictedMemory,
    SlotRequest, Vm, VmType, create_memory,
};
mod common;

use common::all_vmas;
use gmem_testkit::{Need, kvm_or_skip, needs, on_backing};
use rustix::fs::{MemfdFlags, SealFlags};

const P: u64 = 4096;
const MIB: u64 = 1 << 20;
const SECRET: &[u8] = b"TOPSECRET";
const SHARED: GmemFlags = GmemFlags::MMAP.union(GmemFlags::INIT_SHARED);

fn sealed_memfd(size: u64, hugetlb: bool) -> OwnedFd {
    let extra = if hugetlb {
        MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB
    } else {
        MemfdFlags::empty()
    };
    let fd = rustix::fs::memfd_create(
        "attack",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING | extra,
    )
    .unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    rustix::fs::fcntl_add_seals(&fd, SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL)
        .unwrap();
    fd
}

fn gate_over(vm: &Vm, mem: &Arc<dyn RestrictedMemory>, len: u64, policy: Policy) -> Gatekeeper {
    let b = vm.bind(mem, SlotRequest::new(0, 0, len)).unwrap();
    Gatekeeper::new(vm, vec![b], GateOptions::new(Attribute::Shared, policy)).unwrap()
}

fn private(r: Result<(), GateError>) -> bool {
    matches!(r, Err(GateError::Private { .. }))
}

/// Item 1: The same memfd adopted twice was an alias the gatekeeper did not see:
/// one file has one owner now, whatever fd it comes through, on one VM or
/// two, memfd or hugetlb; and when the owner lets the file go, its private
/// pages are gone for whoever else holds the inode.
#[test]
fn a_file_adopted_twice_is_refused() {
    let test = "1: adopted twice";
    if !kvm_or_skip(test) {
        return;
    }
    for backing in [BackingKind::Memfd, BackingKind::Hugetlb2M] {
        let Some(_on) = on_backing(test, backing, 2) else {
            continue;
        };
        let fd = sealed_memfd(2 * MIB, backing.is_hugetlb());
        let dup = fd.try_clone().unwrap();
        let vm = Vm::new().unwrap();
        let first: Arc<dyn RestrictedMemory> = match backing {
            BackingKind::Memfd => Arc::new(SealedMemfd::adopt(fd, SHARED, Some(&vm)).unwrap()),
            _ => Arc::new(HugetlbMemfd::adopt(backing, fd, SHARED, Some(&vm)).unwrap()),
        };
        let raw = dup.as_raw_fd();
        let e = match backing {
            BackingKind::Memfd => SealedMemfd::adopt(dup, SHARED, None).map(drop),
            _ => HugetlbMemfd::adopt(backing, dup, SHARED, None).map(drop),
        }
        .unwrap_err();
        assert!(
            matches!(
                e.reason,
                AdoptReason::Backing(BackingError::AlreadyOwned { .. })
            ),
            "{backing}: {e}"
        );
        assert_eq!(e.errno(), libc::EBUSY);
        assert_eq!(e.fd.as_raw_fd(), raw, "the fd comes back");
        assert!(e.to_string().contains("one file has one owner"), "{e}");
        let dup = e.fd;
        // The attack: a secret made private, then the owner lets go. The
        // dup (the VMM's fd) reads zeroes there, never the secret.
        let gate = gate_over(&vm, &first, 2 * MIB, Policy::InPlace);
        gate.write(P, SECRET).unwrap();
        gate.convert(0, 2 * MIB, Attribute::Private).unwrap();
        drop(gate);
        drop(first);
        let mut buf = [0u8; 9];
        let n = rustix::io::pread(&dup, &mut buf, P).unwrap();
        assert_eq!(n, 9);
        assert_eq!(
            buf, [0; 9],
            "{backing}: the private page outlived its owner"
        );
        // Now that nobody owns it, it may be adopted again.
        let again = match backing {
            BackingKind::Memfd => SealedMemfd::adopt(dup, SHARED, None).map(drop),
            _ => HugetlbMemfd::adopt(backing, dup, SHARED, None).map(drop),
        };
        assert!(again.is_ok(), "{backing}: {:?}", again.err());
    }
}

/// Item 2: `launch` could be called at any time and converted in place: a second
/// launch shared a secret, and so did a launch of a rebuilt gatekeeper.
/// Launch is a phase now, once, and never shares a private page.
#[test]
fn launch_happens_once_and_never_shares_a_private_page() {
    let test = "2: launch";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let vm = Vm::new().unwrap();
    let mem = create_memory(MemoryOptions::new(BackingKind::Memfd, 2 * MIB), Some(&vm)).unwrap();
    let gate = gate_over(&vm, &mem, 2 * MIB, Policy::Discard);
    gate.write(P, SECRET).unwrap();
    assert!(!gate.is_launched());
    gate.launch(Attribute::Private).unwrap();
    assert!(gate.is_launched());
    let e = gate.launch(Attribute::Shared).unwrap_err();
    assert!(matches!(e, ConvertError::AlreadyLaunched), "{e}");
    assert_eq!(e.errno(), libc::EINVAL);
    let mut buf = [0u8; 9];
    assert!(private(gate.read(P, &mut buf)));
    // The old gatekeeper's binding goes with it; a new one is built.
    drop(gate);
    let gate = gate_over(&vm, &mem, 2 * MIB, Policy::Discard);
    // The rebuilt gatekeeper starts the old private pages private; its
    // launch(Shared) leaves them so.
    assert_eq!(gate.attribute(P), Some(Attribute::Private));
    gate.launch(Attribute::Shared).unwrap();
    assert!(
        private(gate.read(P, &mut buf)),
        "a relaunch shared the secret"
    );
    // A conversion ends the launch phase too.
    drop(gate);
    let gate = gate_over(&vm, &mem, 2 * MIB, Policy::InPlace);
    gate.convert(0x10_0000, P, Attribute::Private).unwrap();
    assert!(matches!(
        gate.launch(Attribute::Private),
        Err(ConvertError::AlreadyLaunched)
    ));
}

/// Item 8c: A launch was not all or nothing across regions: a pin in the second
/// left the first private. Now nothing changes.
#[test]
fn launch_is_all_or_nothing_across_regions() {
    let test = "8c: launch across regions";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let vm = Vm::new().unwrap();
    let a = create_memory(MemoryOptions::new(BackingKind::Memfd, 2 * MIB), Some(&vm)).unwrap();
    let b = create_memory(MemoryOptions::new(BackingKind::Memfd, 2 * MIB), Some(&vm)).unwrap();
    let ba = vm.bind(&a, SlotRequest::new(0, 0, 2 * MIB)).unwrap();
    let bb = vm.bind(&b, SlotRequest::new(1 << 30, 0, 2 * MIB)).unwrap();
    let gate = Gatekeeper::new(&vm, vec![ba, bb], GateOptions::default()).unwrap();
    let events = gate.subscribe();
    let pin = gate.pin((1 << 30) + P, 8).unwrap();
    let e = gate.launch(Attribute::Private).unwrap_err();
    assert!(matches!(e, ConvertError::Pinned { .. }), "{e}");
    assert_eq!(e.errno(), libc::EAGAIN);
    assert!(gate.is_shared(0, 2 * MIB), "the first region went private");
    assert!(events.try_recv().is_err(), "subscribers were told");
    assert!(!gate.is_launched(), "a refused launch may be retried");
    drop(pin);
    gate.launch(Attribute::Private).unwrap();
    assert_eq!(gate.private_runs().len(), 2);
}

/// Item 4: `RestrictedMemory::punch_hole` bypassed the gatekeeper (no lock, no
/// pin check, no event): refused on a gated file, and over pages a dropped
/// gatekeeper left private.
#[test]
fn punch_hole_cannot_bypass_the_gatekeeper() {
    let test = "4: punch_hole";
    if !kvm_or_skip(test) {
        return;
    }
    for backing in [BackingKind::Memfd, BackingKind::Hugetlb2M] {
        let Some(_on) = on_backing(test, backing, 1) else {
            continue;
        };
        let vm = Vm::new().unwrap();
        let mem = create_memory(MemoryOptions::new(backing, 2 * MIB), Some(&vm)).unwrap();
        let gate = gate_over(&vm, &mem, 2 * MIB, Policy::InPlace);
        gate.write(P, SECRET).unwrap();
        gate.convert(0, 2 * P, Attribute::Private).unwrap();
        let via_binding = Arc::clone(gate.bindings().next().unwrap().memory());
        let e = via_binding
            .punch_hole(FileRange::new(0, 2 * MIB).unwrap())
            .unwrap_err();
        assert!(matches!(e, BackingError::Gated { .. }), "{backing}: {e}");
        assert_eq!(e.errno(), libc::EBUSY);
        let pin = gate.pin(4 * P, 8).unwrap();
        assert!(mem.punch_hole(FileRange::new(4 * P, P).unwrap()).is_err());
        drop(pin);
        drop(gate);
        // The gatekeeper is gone; the private pages it left stay out of
        // reach of a punch too; the rest may be punched.
        let e = mem
            .punch_hole(FileRange::new(0, 2 * MIB).unwrap())
            .unwrap_err();
        assert!(
            matches!(e, BackingError::PrivatePages { private: 0, .. }),
            "{e}"
        );
        if !backing.is_hugetlb() {
            mem.punch_hole(FileRange::new(4 * P, P).unwrap()).unwrap();
        }
    }
}

/// Item 5: Windows of adjacent regions merged into one run that no `mprotect`
/// could close (`EINVAL`), and after that every pin that needed a window
/// failed. The cache is per region now.
#[test]
fn windows_at_a_region_seam_close() {
    let test = "5: adjacent regions";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let vm = Vm::new().unwrap();
    let mem = create_memory(MemoryOptions::new(BackingKind::Memfd, 4 * MIB), Some(&vm)).unwrap();
    let lo = vm.bind(&mem, SlotRequest::new(0, 0, 2 * MIB)).unwrap();
    let hi = vm
        .bind(&mem, SlotRequest::new(2 * MIB, 2 * MIB, 2 * MIB))
        .unwrap();
    let gate = Gatekeeper::new(&vm, vec![lo, hi], GateOptions::default()).unwrap();
    drop(gate.pin(2 * MIB - P, P).unwrap());
    drop(gate.pin(2 * MIB, P).unwrap());
    gate.convert(2 * MIB - P, 2 * P, Attribute::Private)
        .unwrap();
    assert_eq!(gate.view_windows().0, 0);
    // The cache is still usable after: pins open and close again.
    gate.convert(2 * MIB - P, 2 * P, Attribute::Shared).unwrap();
    drop(gate.pin(2 * MIB - P, P).unwrap());
    drop(gate.pin(2 * MIB, P).unwrap());
    gate.convert(0, 4 * MIB, Attribute::Private).unwrap();
}

/// Item 6: After a discard of a populated huge page its reservation was gone;
/// once another file drained the pool, the next host access took SIGBUS.
/// The page is reserved again at the punch, so the pool cannot be drained
/// under it.
#[test]
fn a_discarded_huge_page_is_not_taken_by_another_file() {
    let test = "6: hugetlb after a discard";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(_on) = on_backing(test, BackingKind::Hugetlb2M, 3) else {
        return;
    };
    let vm = Vm::new().unwrap();
    let mem = create_memory(
        MemoryOptions::new(BackingKind::Hugetlb2M, 4 * MIB),
        Some(&vm),
    )
    .unwrap();
    let gate = gate_over(&vm, &mem, 4 * MIB, Policy::InPlace);
    gate.fill(0, 4 * MIB, 0x5a).unwrap();
    gate.discard(2 * MIB, 2 * MIB).unwrap();
    // Another tenant takes every free huge page there is.
    let mut drain = Vec::new();
    while let Ok(m) = create_memory(MemoryOptions::new(BackingKind::Hugetlb2M, 2 * MIB), None) {
        drain.push(m);
        assert!(drain.len() < 100_000, "the pool does not run out");
    }
    // The discarded page faults in (as zeroes), no SIGBUS; devices too.
    let mut buf = vec![0xffu8; 4096];
    gate.read(2 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let pin = gate.pin(3 * MIB, 16).unwrap();
    pin.write(0, b"still here").unwrap();
    drop(pin);
    drop(drain);
}

/// Item 8: The window budget was per gatekeeper, `vm.max_map_count` per process:
/// eight VMs that each pinned and dropped 4,096 isolated pages left the
/// ninth unable to map its view. Each VM's views now stay within their share
/// of one process-wide budget, counted in the kernel's VMAs.
#[test]
fn many_vms_cannot_starve_another() {
    let test = "8: VMs in one process";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let before = all_vmas();
    let mut vms = Vec::new();
    for _ in 0..8 {
        let vm = Vm::new().unwrap();
        let mem =
            create_memory(MemoryOptions::new(BackingKind::Memfd, 32 * MIB), Some(&vm)).unwrap();
        let gate = gate_over(&vm, &mem, 32 * MIB, Policy::InPlace);
        for i in 0..4096 {
            drop(gate.pin(i * 2 * P, P).unwrap());
        }
        let (now, most) = gate.view_vmas();
        assert!(now <= most, "{now} of {most}");
        vms.push((vm, gate));
    }
    // The ninth VM maps its view and its devices pin.
    let vm = Vm::new().unwrap();
    let mem = create_memory(MemoryOptions::new(BackingKind::Memfd, 32 * MIB), Some(&vm)).unwrap();
    let gate = gate_over(&vm, &mem, 32 * MIB, Policy::InPlace);
    let pin = gate.pin(P, 8).unwrap();
    drop(pin);
    let (reserved, limit) = gmem::gate::process_view_budget();
    assert!(reserved <= limit);
    let grown = all_vmas() - before;
    let bound = 9 * (gmem::DEFAULT_VIEW_BUDGET + 1) + 9 * 4;
    assert!(
        grown <= bound,
        "the VMs cost {grown} VMAs, more than {bound}"
    );
}

/// Item 8b: Hugetlb views never merged back: every huge page a pin had opened
/// stayed a map entry. Views split past the budget are mapped afresh.
#[test]
fn hugetlb_views_shrink_back() {
    let test = "8b: hugetlb views";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(_on) = on_backing(test, BackingKind::Hugetlb2M, 32) else {
        return;
    };
    let vm = Vm::new().unwrap();
    let size = 32 * 2 * MIB;
    let mem = create_memory(MemoryOptions::new(BackingKind::Hugetlb2M, size), Some(&vm)).unwrap();
    let b = vm.bind(&mem, SlotRequest::new(0, 0, size)).unwrap();
    let gate = Gatekeeper::new(&vm, vec![b], GateOptions::default().with_view_budget(4)).unwrap();
    for i in (0..32).step_by(2) {
        drop(gate.pin(i * 2 * MIB, P).unwrap());
        let (now, most) = gate.view_vmas();
        assert!(now <= most, "page {i}: {now} of {most}");
    }
    let (now, most) = gate.view_vmas();
    assert!(now <= most && most == 5, "{now} of {most}");
}

/// Item 8d: A second gmem `Vm` over a dup of a VM's fd got its own gatekeeper
/// (and slot table). The dup is the same VM now.
#[test]
fn a_dup_of_a_vm_fd_is_the_same_vm() {
    let test = "8d: one VM, two handles";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let vm = Vm::new().unwrap();
    let mem = create_memory(MemoryOptions::new(BackingKind::Memfd, 2 * MIB), Some(&vm)).unwrap();
    let _gate = gate_over(&vm, &mem, 2 * MIB, Policy::InPlace);
    let dup = dup_of(&vm);
    let again = Vm::from_owned_fd(dup, VmType::Default).unwrap();
    assert_eq!(again.id(), vm.id());
    let other = create_memory(
        MemoryOptions::new(BackingKind::Memfd, 2 * MIB),
        Some(&again),
    )
    .unwrap();
    let b = again
        .bind(&other, SlotRequest::new(1 << 30, 0, 2 * MIB))
        .unwrap();
    let e = Gatekeeper::new(&again, vec![b], GateOptions::default()).unwrap_err();
    assert!(matches!(e, GateError::AlreadyGated { .. }), "{e}");
    // The same GPA through the other handle is the same slot table.
    let e = again
        .bind(&other, SlotRequest::new(0, 0, 2 * MIB))
        .unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST, "{e}");
    #[cfg(target_arch = "x86_64")]
    {
        let dup = dup_of(&vm);
        let e = Vm::from_owned_fd(dup, VmType::SwProtected).unwrap_err();
        assert!(matches!(e, KvmError::TypeMismatch { .. }), "{e}");
    }
}

/// The hardening that came with these: adopted fds are close-on-exec, pins
/// are bounded and listed, subscribers bounded.
#[test]
fn fds_pins_and_subscribers_are_bounded() {
    let test = "hardening";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let vm = Vm::new().unwrap();
    let fd = rustix::fs::memfd_create("inheritable", MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, 2 * MIB).unwrap();
    rustix::fs::fcntl_add_seals(&fd, SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL)
        .unwrap();
    let mem: Arc<dyn RestrictedMemory> =
        Arc::new(SealedMemfd::adopt(fd, SHARED, Some(&vm)).unwrap());
    // SAFETY: fcntl(F_GETFD) reads the fd's flags only.
    let flags = rustix::io::fcntl_getfd(unsafe { mem.as_fd() }).unwrap();
    assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 * MIB)).unwrap();
    let gate = Gatekeeper::new(&vm, vec![b], GateOptions::default().with_max_pins(3)).unwrap();
    let held: Vec<_> = (0..3).map(|i| gate.pin(i * P, 8).unwrap()).collect();
    let e = gate.pin(4 * P, 8).unwrap_err();
    assert!(
        matches!(
            e,
            GateError::TooManyPins {
                live: 3,
                max: 3,
                ..
            }
        ),
        "{e}"
    );
    let listed = gate.pins();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[1].range, P..P + 8);
    drop(held);
    assert!(gate.pins().is_empty());
    let slow = gate.subscribe_with_capacity(2);
    for i in 0..5 {
        gate.convert(i * P, P, Attribute::Private).unwrap();
    }
    let got: Vec<_> = slow.try_iter().collect();
    assert_eq!(got.len(), 2, "a full subscriber is cut off, not grown");
    assert!(matches!(
        slow.try_recv(),
        Err(std::sync::mpsc::TryRecvError::Disconnected)
    ));
}

/// Item 3: The two-backing layout on a host whose KVM has no memory attributes:
/// KVM runs the guest from the shared memfd, and a to-shared conversion
/// punched the empty guest_memfd, leaving the old private content readable.
#[test]
fn two_backing_discard_punches_the_side_kvm_uses() {
    let test = "3: two backings";
    if !kvm_or_skip(test) || !needs(test, &Need::of_backing(BackingKind::GuestMemfd)) {
        return;
    }
    let vm = Vm::new().unwrap();
    if vm.memory_attributes() != 0 {
        eprintln!(
            "{test}: skipped: this host has memory attributes, where KVM uses the guest_memfd"
        );
        return;
    }
    let private = create_memory(
        MemoryOptions::new(BackingKind::GuestMemfd, 2 * MIB).with_flags(GmemFlags::empty()),
        Some(&vm),
    )
    .unwrap();
    let shared = create_memory(MemoryOptions::new(BackingKind::Memfd, 2 * MIB), Some(&vm)).unwrap();
    let b = vm
        .bind_two(&private, &shared, SlotRequest::new(0, 0, 2 * MIB))
        .unwrap();
    let gate = Gatekeeper::new(
        &vm,
        vec![b],
        GateOptions::new(Attribute::Shared, Policy::Discard),
    )
    .unwrap();
    gate.convert(P, P, Attribute::Private).unwrap();
    // The guest writes its secret where KVM puts it: the shared memfd.
    // SAFETY: this test plays the guest; the page is private and only this
    // mapping (not the gatekeeper) touches it, before it is shared again.
    let map = unsafe { shared.map_host() }.unwrap();
    map.write(P, SECRET).unwrap();
    drop(map);
    gate.convert(P, P, Attribute::Shared).unwrap();
    let mut buf = [0xffu8; 9];
    gate.read(P, &mut buf).unwrap();
    assert_eq!(buf, [0; 9], "the old private content was readable");
}

/// Item 7: `GuestMemfd::adopt` trusted the flags it was given: an MMAP file
/// adopted as MMAP|INIT_SHARED passed, and every copy took SIGBUS.
#[test]
fn guest_memfd_flags_are_probed_not_trusted() {
    let test = "7: adopted flags";
    if !kvm_or_skip(test) || !needs(test, &Need::of_backing(BackingKind::GuestMemfd)) {
        return;
    }
    let vm = Vm::new().unwrap();
    let make = |flags: u64| {
        let raw = vm
            .fd()
            .create_guest_memfd(kvm_bindings::kvm_create_guest_memfd {
                size: 2 * MIB,
                flags,
                reserved: [0; 6],
            })
            .unwrap();
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
    };
    let e = GuestMemfd::adopt(&vm, make(GmemFlags::MMAP.bits()), SHARED).unwrap_err();
    assert!(
        matches!(e.reason, AdoptReason::FlagsDisagree { given: 3, found: 1 }),
        "{e}"
    );
    let e = GuestMemfd::adopt(&vm, make(0), GmemFlags::MMAP).unwrap_err();
    assert!(matches!(e.reason, AdoptReason::FlagsDisagree { .. }), "{e}");
    let ok = GuestMemfd::adopt(&vm, make(SHARED.bits()), SHARED).unwrap();
    // The probe left the file as it was: nothing populated.
    assert_eq!(ok.populated().unwrap(), vec![]);
}

/// A dup of `vm`'s fd, as a VMM that hands its VM fd around would have.
fn dup_of(vm: &Vm) -> OwnedFd {
    // SAFETY: the VM's fd is open for this borrow, which only dups it.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(vm.fd().as_raw_fd()) }
        .try_clone_to_owned()
        .unwrap()
}
