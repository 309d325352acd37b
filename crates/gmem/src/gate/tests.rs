//! The gatekeeper under attack: every host path tries a private byte, and
//! every conversion step fails in turn. Each runs on every backing this host
//! has; what it lacks (KVM, guest_memfd, huge pages) is skipped by the test
//! kit's rule, which prints `skipped: <reason>` (a failure where the
//! environment requires it).

use std::sync::Arc;

use super::super::kernel::model::KernelModel;
use super::*;
use crate::backing::{BackingKind, MemoryOptions, RestrictedMemory, create_memory};
use crate::binding::SlotRequest;
use crate::gate::{attributes_request, kernel_attributes_supported};
use crate::range::FileRange;

const P: u64 = PAGE_SIZE;
const SECRET: &[u8] = b"SECRET: the guest's key";

/// The running test's name: the harness names each test's thread after it.
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("gatekeeper test")
        .to_owned()
}

/// A VM, if this host has KVM; the test kit prints the skip otherwise (a
/// failure where the environment requires KVM).
fn vm() -> Option<Vm> {
    gmem_testkit::kvm_or_skip(&test_name()).then(|| Vm::new().expect("KVM was probed"))
}

/// The test kit's rule for running on `kind` with `pages` of its pages free:
/// it checks what the backing needs (guest_memfd and its flags, huge
/// pages), records the run, and prints the skip if the host lacks it. The
/// test kit links the library's normal build, whose `BackingKind` is
/// another type than this test build's, so the kind crosses by name.
fn on(kind: BackingKind, pages: u64) -> Option<gmem_testkit::OnBacking> {
    let kind = kind.name().parse().expect("the same backing names");
    gmem_testkit::on_backing(&test_name(), kind, pages)
}

/// Whether this host has what `kind` needs, without recording a run.
fn has(kind: BackingKind) -> bool {
    let kind = kind.name().parse().expect("the same backing names");
    gmem_testkit::needs(&test_name(), &gmem_testkit::Need::of_backing(kind))
}

struct Fixture {
    gate: Gatekeeper,
    memory: Arc<dyn RestrictedMemory>,
    vm: Vm,
    _on: gmem_testkit::OnBacking,
}

fn fixture_with(
    kind: BackingKind,
    size: u64,
    opts: GateOptions,
    kernel: Option<Arc<KernelModel>>,
) -> Option<Fixture> {
    let vm = vm()?;
    // One page of slack: some tests bind a second file beside the first.
    let on = on(kind, size.div_ceil(kind.page_size()) + 1)?;
    let memory = create_memory(MemoryOptions::new(kind, size), Some(&vm))
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
    let binding = vm.bind(&memory, SlotRequest::new(0, 0, size)).unwrap();
    let kernel = kernel.map(|k| Box::new(k) as Box<dyn KernelAttributes>);
    let gate = Gatekeeper::with_kernel(&vm, vec![binding], opts, kernel).unwrap();
    Some(Fixture {
        gate,
        memory,
        vm,
        _on: on,
    })
}

fn fixture(kind: BackingKind, size: u64, opts: GateOptions) -> Option<Fixture> {
    fixture_with(kind, size, opts, None)
}

const KINDS: [BackingKind; 2] = [BackingKind::Memfd, BackingKind::GuestMemfd];
/// The backings every attack runs on (hugetlb-2m where the pool allows).
const ALL_KINDS: [BackingKind; 3] = [
    BackingKind::Memfd,
    BackingKind::GuestMemfd,
    BackingKind::Hugetlb2M,
];

/// VMAs of this process that overlap `[start, start + len)`.
fn vmas_in(start: usize, len: usize) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| {
            let range = l.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .filter(|&(a, b)| a < start + len && start < b)
        .count()
}

fn view_vmas(gate: &Gatekeeper) -> usize {
    let r = &gate.0.regions[0];
    vmas_in(r.view().addr(), r.view().len())
}

#[test]
fn no_safe_path_reads_a_private_byte() {
    for kind in ALL_KINDS {
        let Some(f) = fixture(kind, 4 << 20, GateOptions::default()) else {
            continue;
        };
        f.gate.write(P, SECRET).unwrap();
        f.gate.convert(0, 2 * P, Attribute::Private).unwrap();
        let mut buf = vec![0u8; SECRET.len()];
        let private = |r: Result<(), GateError>| matches!(r, Err(GateError::Private { private, .. }) if private <= P);
        assert!(private(f.gate.read(P, &mut buf)), "{kind}: read");
        assert!(private(f.gate.write(P, b"x")), "{kind}: write");
        assert!(private(f.gate.fill(P, 1, 0)), "{kind}: fill");
        // A read straddling shared and private memory copies nothing.
        buf.fill(0xee);
        assert!(private(f.gate.read(P - 8, &mut buf)), "{kind}: straddle");
        assert!(buf.iter().all(|&b| b == 0xee), "{kind}: partial copy");
        assert!(
            matches!(f.gate.pin(P, 8), Err(GateError::Private { .. })),
            "{kind}: pin"
        );
        // A clone is the same gatekeeper: the same state.
        let clone = f.gate.clone();
        assert!(private(clone.read(P, &mut buf)), "{kind}: clone");
        // A second gatekeeper for the VM is refused.
        let other = create_memory(MemoryOptions::new(kind, 2 << 20), Some(&f.vm)).unwrap();
        let b =
            f.vm.bind(&other, SlotRequest::new(1 << 30, 0, 2 << 20))
                .unwrap();
        let e = Gatekeeper::new(&f.vm, vec![b], GateOptions::default()).unwrap_err();
        assert!(matches!(e, GateError::AlreadyGated { .. }), "{kind}: {e}");
        assert_eq!(e.errno(), libc::EBUSY);
        // Dropping the gatekeeper and building another over the same file,
        // starting "shared", still refuses the page the guest made private.
        let Fixture {
            gate, memory, vm, ..
        } = f;
        drop((gate, clone));
        let b = vm.bind(&memory, SlotRequest::new(0, 0, 4 << 20)).unwrap();
        let gate = Gatekeeper::new(&vm, vec![b], GateOptions::default()).unwrap();
        assert_eq!(gate.attribute(P), Some(Attribute::Private), "{kind}");
        assert_eq!(gate.attribute(2 * P), Some(Attribute::Shared), "{kind}");
        assert!(
            private(gate.read(P, &mut buf)),
            "{kind}: after a new gatekeeper"
        );
        // The guest can still convert it back, content kept (in place).
        gate.convert(0, 2 * P, Attribute::Shared).unwrap();
        gate.read(P, &mut buf).unwrap();
        assert_eq!(buf, SECRET, "{kind}");
    }
}

#[test]
fn queries_say_none_outside_memory() {
    let Some(f) = fixture(BackingKind::Memfd, 2 << 20, GateOptions::default()) else {
        return;
    };
    assert_eq!(f.gate.attribute(2 << 20), None);
    assert_eq!(f.gate.uniform(0, 4 << 20), None);
    assert!(!f.gate.is_shared(0, 0));
    assert!(f.gate.is_shared(0, 2 << 20));
    f.gate.convert(P, P, Attribute::Private).unwrap();
    assert_eq!(f.gate.uniform(0, 2 * P), None);
    assert_eq!(f.gate.uniform(P, P), Some(Attribute::Private));
    assert_eq!(f.gate.private_runs(), vec![P..2 * P]);
    let mut buf = [0u8; 4];
    assert!(matches!(
        f.gate.read(u64::MAX - 1, &mut buf),
        Err(GateError::OutsideMemory { .. })
    ));
}

#[test]
fn copies_are_exact_at_every_size_and_alignment() {
    let Some(f) = fixture(BackingKind::Memfd, 2 << 20, GateOptions::default()) else {
        return;
    };
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
    for len in [0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 4095, 4096, 4097, 10_000] {
        for off in [0u64, 1, 2, 4, 8, 4093] {
            f.gate.fill(0x10000, 0x4000, 0).unwrap();
            f.gate.write(0x10000 + off, &data[..len]).unwrap();
            let mut back = vec![0u8; len];
            f.gate.read(0x10000 + off, &mut back).unwrap();
            assert_eq!(back, data[..len], "len {len} off {off}");
        }
    }
}

#[test]
fn pins_hold_off_private_conversions_and_discards() {
    for kind in KINDS {
        let Some(f) = fixture(
            kind,
            4 << 20,
            GateOptions::new(Attribute::Shared, Policy::Discard),
        ) else {
            continue;
        };
        f.gate.write(0x3000, b"ring").unwrap();
        let pin = f.gate.pin(0x3000, 16).unwrap();
        for (what, r) in [
            (
                "convert",
                f.gate.convert(0x2000, 0x4000, Attribute::Private).map(drop),
            ),
            ("discard", f.gate.discard(0x3000, P).map(drop)),
        ] {
            let e = r.unwrap_err();
            assert!(
                matches!(e, ConvertError::Pinned { .. }),
                "{kind} {what}: {e}"
            );
            assert_eq!(e.errno(), libc::EAGAIN);
            assert!(e.to_string().contains("0x3000"), "{e}");
        }
        // Nothing changed: still shared, content intact, readable by the pin.
        assert!(f.gate.is_shared(0, 4 << 20));
        let mut buf = [0u8; 4];
        pin.read(0, &mut buf).unwrap();
        assert_eq!(&buf, b"ring");
        // Neighbours are free to convert, and to-shared is never refused.
        f.gate.convert(0x4000, P, Attribute::Private).unwrap();
        f.gate.convert(0x4000, P, Attribute::Shared).unwrap();
        assert!(pin.read(16, &mut buf).is_err(), "read past the pin");
        drop(pin);
        f.gate.convert(0x2000, 0x4000, Attribute::Private).unwrap();
        assert_eq!(f.gate.view_windows().1, 0);
    }
}

#[test]
fn pins_are_checked_and_open_only_their_window() {
    for kind in KINDS {
        let Some(f) = fixture(kind, 4 << 20, GateOptions::default()) else {
            continue;
        };
        pins_open_only_their_window(&f);
    }
}

fn pins_open_only_their_window(f: &Fixture) {
    assert!(matches!(f.gate.pin(0, 0), Err(GateError::EmptyPin { .. })));
    assert!(matches!(
        f.gate.pin(4 << 20, 1),
        Err(GateError::OutsideMemory { .. })
    ));
    let before = view_vmas(&f.gate);
    assert_eq!(before, 1, "a fresh view is one PROT_NONE mapping");
    let pin = f.gate.pin(0x5001, 2).unwrap();
    assert_eq!(f.gate.view_windows(), (1, 1));
    assert_eq!(view_vmas(&f.gate), 3);
    pin.write(0, b"ok").unwrap();
    let mut b = [0u8; 2];
    f.gate.read(0x5001, &mut b).unwrap();
    assert_eq!(&b, b"ok");
}

#[test]
fn the_view_budget_bounds_open_windows() {
    for kind in KINDS {
        let Some(f) = fixture(kind, 4 << 20, GateOptions::default().with_view_budget(8)) else {
            continue;
        };
        the_view_budget_bounds(&f);
    }
}

fn the_view_budget_bounds(f: &Fixture) {
    // Devices touch 200 separate pages, one at a time: the cache of open
    // windows stays within the budget of 8 map entries beyond the view's
    // first, and the count is the kernel's own.
    for i in 0..200 {
        let pin = f.gate.pin(i * 2 * P, P).unwrap();
        drop(pin);
        let (vmas, most) = f.gate.view_vmas();
        assert!(vmas <= most && most == 9, "{vmas} of {most}");
        assert_eq!(view_vmas(&f.gate), vmas, "the kernel's count");
    }
    // Pins that hold the whole budget open (4 isolated windows, 2 map
    // entries each) refuse a further window.
    let held: Vec<Pin> = (1..5).map(|i| f.gate.pin(i * 4 * P, P).unwrap()).collect();
    let e = f.gate.pin(0x10_0000, P).unwrap_err();
    assert!(matches!(e, GateError::ViewBudget { budget: 9, .. }), "{e}");
    assert!(e.to_string().contains("view_budget"), "{e}");
    assert_eq!(e.errno(), libc::ENOMEM);
    drop(held);
    f.gate.pin(0x10_0000, P).unwrap();
    assert!(matches!(
        Gatekeeper::new(&Vm::new().unwrap(), Vec::new(), GateOptions::default()),
        Err(GateError::NoBindings)
    ));
}

#[test]
fn fragmentation_costs_the_view_nothing() {
    for kind in KINDS {
        let size = 1u64 << 30;
        let Some(f) = fixture(kind, size, GateOptions::default()) else {
            continue;
        };
        let before = view_vmas(&f.gate);
        // Every other page shared, the rest private: 131,072 islands.
        f.gate.convert(0, size, Attribute::Private).unwrap();
        for page in (0..size / P).step_by(2) {
            f.gate.convert(page * P, P, Attribute::Shared).unwrap();
        }
        assert_eq!(f.gate.attributes().run_count(), (size / P / 2) as usize);
        let peak = view_vmas(&f.gate);
        for page in (0..size / P).step_by(2) {
            f.gate.convert(page * P, P, Attribute::Private).unwrap();
        }
        assert_eq!((before, peak), (1, 1), "{kind}");
        assert_eq!(f.gate.private_runs(), vec![0..size]);
    }
}

#[test]
fn a_failed_view_update_changes_nothing() {
    for policy in [Policy::InPlace, Policy::Discard] {
        let Some(f) = fixture(
            BackingKind::Memfd,
            2 << 20,
            GateOptions::new(Attribute::Shared, policy),
        ) else {
            return;
        };
        f.gate.write(0x1000, b"keep").unwrap();
        drop(f.gate.pin(0x1000, 4).unwrap()); // its window stays open
        f.gate.0.faults.lock().unwrap().close = 1;
        let e = f.gate.convert(0, 0x4000, Attribute::Private).unwrap_err();
        assert!(
            matches!(
                e,
                ConvertError::View {
                    gpa: 0,
                    len: 0x4000,
                    ..
                }
            ),
            "{e}"
        );
        assert!(f.gate.is_shared(0, 2 << 20), "{policy}");
        assert_eq!(f.gate.view_windows().0, 1, "the window is still open");
        let pin = f.gate.pin(0x1000, 4).unwrap();
        let mut b = [0u8; 4];
        pin.read(0, &mut b).unwrap();
        assert_eq!(&b, b"keep", "{policy}: content");
        assert_eq!(f.gate.stats(), ConversionStats::default());
    }
}

/// A failed `mprotect` whose undo fails too leaves the records and the page
/// tables possibly apart: the gatekeeper poisons itself and refuses every
/// host access, and a gatekeeper built after it starts every page private.
#[test]
fn a_failed_rollback_poisons_the_gatekeeper() {
    let Some(f) = fixture(BackingKind::Memfd, 2 << 20, GateOptions::default()) else {
        return;
    };
    f.gate.write(0x1000, b"keep").unwrap();
    drop(f.gate.pin(0x1000, 4).unwrap()); // its window stays open
    // The close fails, the undo's reopen fails, and closing it for certain
    // fails too.
    {
        let mut faults = f.gate.0.faults.lock().unwrap();
        faults.close = 2;
        faults.reopen = 1;
    }
    f.gate.convert(0, 0x4000, Attribute::Private).unwrap_err();
    let why = f.gate.poisoned().expect("poisoned");
    assert!(why.contains("unknown state"), "{why}");
    let mut b = [0u8; 4];
    let e = f.gate.read(0x1000, &mut b).unwrap_err();
    assert!(matches!(e, GateError::Poisoned { .. }), "{e}");
    assert_eq!(e.errno(), libc::EIO);
    assert!(matches!(
        f.gate.pin(0x1000, 4),
        Err(GateError::Poisoned { .. })
    ));
    let e = f.gate.convert(0, 0x1000, Attribute::Shared).unwrap_err();
    assert!(matches!(e, ConvertError::Poisoned { .. }), "{e}");
    assert_eq!(e.errno(), libc::EIO);
    // A gatekeeper over the same file after it starts all of it private.
    let Fixture {
        gate, memory, vm, ..
    } = f;
    drop(gate);
    let b = vm.bind(&memory, SlotRequest::new(0, 0, 2 << 20)).unwrap();
    let gate = Gatekeeper::new(&vm, vec![b], GateOptions::default()).unwrap();
    assert_eq!(gate.private_runs(), vec![0..2 << 20]);
}

/// KVM refusing to restore its attributes after a failed conversion leaves
/// KVM and gmem possibly apart: poisoned, never silently.
#[test]
fn a_failed_kernel_restore_poisons_the_gatekeeper() {
    let model = Arc::new(KernelModel::default());
    let Some(f) = fixture_with(
        BackingKind::Memfd,
        2 << 20,
        GateOptions::new(Attribute::Shared, Policy::InPlace),
        Some(Arc::clone(&model)),
    ) else {
        return;
    };
    // The conversion's call fails, then the restore's first call.
    model.fail_call(0);
    model.fail_call(1);
    let e = f.gate.convert(0, 0x4000, Attribute::Private).unwrap_err();
    assert!(matches!(e, ConvertError::Kernel { .. }), "{e}");
    let why = f.gate.poisoned().expect("poisoned");
    assert!(why.contains("KVM_SET_MEMORY_ATTRIBUTES"), "{why}");
    let mut b = [0u8; 4];
    assert!(matches!(
        f.gate.read(0x8000, &mut b),
        Err(GateError::Poisoned { .. })
    ));
}

#[test]
fn a_failed_punch_changes_nothing() {
    let Some(f) = fixture(
        BackingKind::Memfd,
        2 << 20,
        GateOptions::new(Attribute::Shared, Policy::Discard),
    ) else {
        return;
    };
    f.gate.write(0x1000, b"keep").unwrap();
    let populated = f.memory.populated().unwrap();
    // To private: the punch is the last step; its failure undoes the rest.
    f.gate.0.faults.lock().unwrap().punch = true;
    let e = f.gate.convert(0, 0x4000, Attribute::Private).unwrap_err();
    assert!(
        matches!(e, ConvertError::Backing { discarded: 0, .. }),
        "{e}"
    );
    assert!(f.gate.is_shared(0, 2 << 20));
    let mut b = [0u8; 4];
    f.gate.read(0x1000, &mut b).unwrap();
    assert_eq!(&b, b"keep");
    assert_eq!(f.memory.populated().unwrap(), populated);
    // To shared: the secret stays private (and intact) if the punch fails.
    f.gate.convert(0, 0x4000, Attribute::Private).unwrap();
    f.gate.0.faults.lock().unwrap().punch = true;
    f.gate.convert(0, 0x4000, Attribute::Shared).unwrap_err();
    assert_eq!(f.gate.uniform(0, 0x4000), Some(Attribute::Private));
    assert_eq!(f.gate.stats().to_shared, 0);
}

#[test]
fn the_kernel_attributes_follow_and_roll_back_exactly() {
    let model = Arc::new(KernelModel::default());
    let Some(f) = fixture_with(
        BackingKind::Memfd,
        2 << 20,
        GateOptions::new(Attribute::Private, Policy::InPlace),
        Some(Arc::clone(&model)),
    ) else {
        return;
    };
    assert!(f.gate.uses_kernel_attributes());
    assert_eq!(model.map(), f.gate.attributes(), "initial state");
    // A patchwork of runs, then a conversion over all of it that fails.
    for (gpa, len) in [(0x1000, 0x1000), (0x5000, 0x3000), (0x20000, 0x1000)] {
        f.gate.convert(gpa, len, Attribute::Shared).unwrap();
    }
    assert_eq!(model.map(), f.gate.attributes());
    let before = f.gate.attributes();
    for to in [Attribute::Shared, Attribute::Private] {
        model.fail_call(0);
        let e = f.gate.convert(0, 0x40000, to).unwrap_err();
        assert!(
            matches!(
                e,
                ConvertError::Kernel {
                    gpa: 0,
                    len: 0x40000,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.errno(), libc::ENOMEM);
        assert_eq!(f.gate.attributes(), before, "{to}: gmem's map");
        assert_eq!(model.map(), before, "{to}: KVM's runs restored exactly");
    }
    // The kernel refusing the initial state: no gatekeeper, and the VM is
    // free for another.
    let vm = f.vm.clone();
    drop(f);
    let initial = Arc::new(KernelModel::default());
    initial.fail_call(1);
    let mem = create_memory(MemoryOptions::new(BackingKind::Memfd, 2 << 20), Some(&vm)).unwrap();
    let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 << 20)).unwrap();
    let e = Gatekeeper::with_kernel(
        &vm,
        vec![b],
        GateOptions::new(Attribute::Private, Policy::InPlace),
        Some(Box::new(Arc::clone(&initial))),
    )
    .unwrap_err();
    assert!(matches!(e, GateError::Kernel { .. }), "{e}");
    let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 << 20)).unwrap();
    Gatekeeper::new(&vm, vec![b], GateOptions::default()).unwrap();
    // A failed punch after the kernel call rolls KVM back too.
    let model2 = Arc::new(KernelModel::default());
    let Some(g) = fixture_with(
        BackingKind::Memfd,
        2 << 20,
        GateOptions::new(Attribute::Shared, Policy::Discard),
        Some(Arc::clone(&model2)),
    ) else {
        return;
    };
    g.gate.0.faults.lock().unwrap().punch = true;
    g.gate
        .convert(0x1000, 0x2000, Attribute::Private)
        .unwrap_err();
    assert_eq!(model2.map(), g.gate.attributes());
    assert!(g.gate.is_shared(0, 2 << 20));
    let calls = model2.calls();
    g.gate.convert(0x1000, 0x2000, Attribute::Private).unwrap();
    assert_eq!(model2.calls(), calls + 1, "one kernel call per conversion");
    assert_eq!(model2.map(), g.gate.attributes());
}

#[test]
fn huge_pages_bound_in_part_convert_like_any_other() {
    let page = 2u64 << 20;
    for (offset, len) in [(1 << 20, page), (0, 1 << 20), (P, 2 * page - 2 * P)] {
        let Some(vm) = vm() else {
            return;
        };
        let Some(_on) = on(BackingKind::Hugetlb2M, 2) else {
            return;
        };
        let memory = create_memory(
            MemoryOptions::new(BackingKind::Hugetlb2M, 2 * page),
            Some(&vm),
        )
        .unwrap();
        let binding = vm.bind(&memory, SlotRequest::new(0, offset, len)).unwrap();
        let gate = Gatekeeper::new(
            &vm,
            vec![binding],
            GateOptions::new(Attribute::Private, Policy::InPlace),
        )
        .unwrap();
        gate.convert(0, P, Attribute::Shared).unwrap();
        gate.write(0, b"edge").unwrap();
        // A pin there would open a huge page the binding covers in part.
        let e = gate.pin(0, 4).unwrap_err();
        assert!(matches!(e, GateError::PartialHugePage { .. }), "{e}");
        gate.convert(0, len, Attribute::Private).unwrap();
        gate.convert(0, len, Attribute::Shared).unwrap();
        let mut b = [0u8; 4];
        gate.read(0, &mut b).unwrap();
        assert_eq!(&b, b"edge", "[{offset:#x}, +{len:#x})");
    }
}

#[test]
fn kernel_path_is_gated_on_the_private_bit() {
    assert!(!kernel_attributes_supported(0));
    assert!(kernel_attributes_supported(8));
    assert!(!kernel_attributes_supported(7));
}

#[test]
fn attributes_request_encodes_private_as_bit_3() {
    let r = attributes_request(&(0x1000..0x3000), Attribute::Private);
    assert_eq!(
        (r.address, r.size, r.attributes, r.flags),
        (0x1000, 0x2000, 8, 0)
    );
    assert_eq!(
        attributes_request(&(0..0x1000), Attribute::Shared).attributes,
        0
    );
}

#[cfg(feature = "vm-memory")]
mod device_memory {
    use ::vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    use super::*;
    use crate::gate::DeviceMemory;

    const DESC: u64 = 0x10000;
    const AVAIL: u64 = 0x11000;
    const USED: u64 = 0x12000;
    const BUF: u64 = 0x20000;
    const OUT: u64 = 0x21000;
    const SECRET_GPA: u64 = 0x40000;

    fn desc(gate: &Gatekeeper, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        gate.write(DESC + 16 * i, &d).unwrap();
    }

    fn publish(gate: &Gatekeeper, slot: u16, head: u16) {
        gate.write(AVAIL + 4 + 2 * u64::from(slot), &head.to_le_bytes())
            .unwrap();
        gate.write(AVAIL + 2, &(slot + 1).to_le_bytes()).unwrap();
    }

    fn queue() -> Queue {
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Where a range is not all bound memory, `DeviceMemory` answers as
    /// vm-memory's `GuestMemoryMmap` of the same layout does, call for call:
    /// a range running into a hole copies the part that exists, a start
    /// outside memory is an iterator whose first item is the error, an
    /// overflowing range ends at the hole after memory; and every such
    /// refusal is counted.
    #[test]
    fn holes_and_overflows_behave_as_in_vm_memory() {
        let Some(f) = fixture(BackingKind::Memfd, 2 << 20, GateOptions::default()) else {
            return;
        };
        let size = 2u64 << 20;
        let plain =
            ::vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
                .unwrap();
        f.gate.fill(0, size, 0x11).unwrap();
        plain
            .write_slice(&vec![0x11; size as usize], GuestAddress(0))
            .unwrap();
        let mem = DeviceMemory::new(&f.gate);
        for (addr, len) in [
            (size - 8, 16usize), // into the hole after memory
            (size, 8),           // in the hole
            (size + P, 8),       // further in
            (u64::MAX - 3, 8),   // wrapping around 2^64
            (0, 16),             // plain memory: the same too
        ] {
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            let got = mem.read(&mut a, GuestAddress(addr));
            let want = plain.read(&mut b, GuestAddress(addr));
            assert_eq!(
                format!("{:?}", got.as_ref().map_err(|e| e.to_string())),
                format!("{:?}", want.as_ref().map_err(|e| e.to_string())),
                "read at {addr:#x}+{len}"
            );
            assert_eq!(a, b, "bytes at {addr:#x}");
            let got = mem
                .read_slice(&mut a, GuestAddress(addr))
                .map_err(|e| e.to_string());
            let want = plain
                .read_slice(&mut b, GuestAddress(addr))
                .map_err(|e| e.to_string());
            assert_eq!(got, want, "read_slice at {addr:#x}+{len}");
            let got: Vec<Result<usize, String>> = mem
                .get_slices(GuestAddress(addr), len, Permissions::Read)
                .map(|it| {
                    it.map(|s| s.map(|s| s.len()).map_err(|e| e.to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let want: Vec<Result<usize, String>> = plain
                .get_slices(GuestAddress(addr), len, Permissions::Read)
                .map(|it| {
                    it.map(|s| s.map(|s| s.len()).map_err(|e| e.to_string()))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(got, want, "get_slices at {addr:#x}+{len}");
        }
        // Four ranges reached past memory, each refused three times (read,
        // read_slice, get_slices); all counted.
        assert_eq!(mem.refusal_count(), 12);
    }

    /// A request pins each page once however often it reads it, and no more
    /// than its bound: past it, refused and counted, and the request's pins
    /// go when it does.
    #[test]
    fn a_request_pins_each_page_once_and_within_its_bound() {
        let Some(f) = fixture(BackingKind::Memfd, 2 << 20, GateOptions::default()) else {
            return;
        };
        let mem = DeviceMemory::with_limits(&f.gate, 4 * P, 64);
        for i in 0..1000u64 {
            let _: u64 = mem.read_obj(GuestAddress(DESC + (i % 256) * 16)).unwrap();
        }
        assert_eq!((mem.pinned(), mem.pinned_bytes()), (1, P), "one page, once");
        let mut big = vec![0u8; 8 * P as usize];
        let e = mem
            .read_slice(&mut big, GuestAddress(0x8_0000))
            .unwrap_err();
        assert!(e.to_string().contains("may hold at most"), "{e}");
        assert_eq!(mem.refusal_count(), 1);
        assert_eq!(mem.pinned(), 1, "nothing of the refused range stays pinned");
        drop(mem);
        assert_eq!(f.gate.view_windows().1, 0);
    }

    #[test]
    fn bytes_and_objects_refuse_private_pages() {
        let Some(f) = fixture(BackingKind::Memfd, 2 << 20, GateOptions::default()) else {
            return;
        };
        let mem = DeviceMemory::new(&f.gate);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        drop(mem);
        f.gate.write(SECRET_GPA, SECRET).unwrap();
        f.gate.convert(SECRET_GPA, P, Attribute::Private).unwrap();
        let mem = DeviceMemory::new(&f.gate);
        assert!(!mem.check_range(GuestAddress(SECRET_GPA), 1, Permissions::Read));
        assert!(mem.check_range(GuestAddress(0x1000), 4, Permissions::Read));
        assert!(mem.physical_memory().is_none(), "no way around the check");
        let mut buf = [0u8; 8];
        let e = mem
            .read_slice(&mut buf, GuestAddress(SECRET_GPA - 4))
            .unwrap_err();
        assert!(
            matches!(&e, GuestMemoryError::IOError(io) if io.kind() == std::io::ErrorKind::PermissionDenied),
            "{e}"
        );
        assert!(e.to_string().contains("0x40000"), "{e}");
        assert_eq!(buf, [0; 8], "nothing was read");
        assert!(mem.read_obj::<u64>(GuestAddress(SECRET_GPA)).is_err());
        assert!(mem.write_obj(0u8, GuestAddress(SECRET_GPA + 9)).is_err());
        assert!(matches!(
            mem.read_obj::<u64>(GuestAddress(4 << 20)),
            Err(GuestMemoryError::InvalidGuestAddress(_))
        ));
        // Slices handed out are pinned: the guest cannot take them back.
        mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.pinned(), 1);
        let e = f.gate.convert(0x1000, P, Attribute::Private).unwrap_err();
        assert_eq!(e.errno(), libc::EAGAIN);
        drop(mem);
        f.gate.convert(0x1000, P, Attribute::Private).unwrap();
    }

    #[test]
    fn slices_across_regions_are_all_or_nothing() {
        let Some(vm) = vm() else {
            return;
        };
        let size = 2u64 << 20;
        let a = create_memory(MemoryOptions::new(BackingKind::Memfd, size), Some(&vm)).unwrap();
        let b = create_memory(MemoryOptions::new(BackingKind::Memfd, size), Some(&vm)).unwrap();
        let ba = vm.bind(&a, SlotRequest::new(0, 0, size)).unwrap();
        let bb = vm.bind(&b, SlotRequest::new(size, 0, size)).unwrap();
        let gate = Gatekeeper::new(&vm, vec![bb, ba], GateOptions::default()).unwrap();
        gate.write(size - 4, b"acrossit").unwrap();
        let mem = DeviceMemory::new(&gate);
        let mut buf = [0u8; 8];
        mem.read_slice(&mut buf, GuestAddress(size - 4)).unwrap();
        assert_eq!(&buf, b"acrossit");
        assert_eq!(mem.pinned(), 2, "one pin per region");
        drop(mem);
        // The second region's part is private: the first region's pin is
        // released too, and nothing is read.
        gate.convert(size, P, Attribute::Private).unwrap();
        let mem = DeviceMemory::new(&gate);
        let mut buf = [0u8; 8];
        assert!(mem.read_slice(&mut buf, GuestAddress(size - 4)).is_err());
        assert_eq!((mem.pinned(), buf), (0, [0; 8]));
        assert_eq!(gate.view_windows().1, 0);
    }

    #[test]
    fn virtio_queue_runs_over_the_gatekeeper_and_is_refused_private_memory() {
        for kind in KINDS {
            let Some(f) = fixture(kind, 2 << 20, GateOptions::default()) else {
                continue;
            };
            virtio_queue_over(&f.gate);
        }
    }

    fn virtio_queue_over(gate: &Gatekeeper) {
        gate.write(BUF, b"request").unwrap();
        // Chain 0: a readable request and a writable reply.
        desc(gate, 0, BUF, 7, 1, 1); // NEXT
        desc(gate, 1, OUT, 8, 2, 0); // WRITE
        publish(gate, 0, 0);
        let mut q = queue();
        let mem = DeviceMemory::new(gate);
        assert!(q.is_valid(&mem));
        let chain = q.pop_descriptor_chain(&mem).expect("a chain");
        let head = chain.head_index();
        let mut reader = chain.clone().reader(&mem).unwrap();
        let mut req = [0u8; 7];
        std::io::Read::read_exact(&mut reader, &mut req).unwrap();
        assert_eq!(&req, b"request");
        let mut writer = chain.writer(&mem).unwrap();
        std::io::Write::write_all(&mut writer, b"answered").unwrap();
        q.add_used(&mem, head, 8).unwrap();
        drop(mem);
        let mut out = [0u8; 8];
        gate.read(OUT, &mut out).unwrap();
        assert_eq!(&out, b"answered");

        // Chain 1: a descriptor into private memory. Its buffer is refused.
        gate.write(SECRET_GPA, SECRET).unwrap();
        gate.convert(SECRET_GPA, P, Attribute::Private).unwrap();
        desc(gate, 2, SECRET_GPA, 16, 0, 0);
        publish(gate, 1, 2);
        let mem = DeviceMemory::new(gate);
        let chain = q.pop_descriptor_chain(&mem).expect("a chain");
        // virtio-queue checks the buffer with `check_range` and refuses the
        // chain outright.
        let refused = chain.reader(&mem).err();
        assert!(
            matches!(refused, Some(virtio_queue::Error::InvalidChain)),
            "{refused:?}"
        );
        // Only the ring and the descriptor were pinned, not the buffer.
        assert!(
            gate.discard(SECRET_GPA, P).is_ok(),
            "the private buffer was pinned"
        );
        drop(mem);

        // The rings moved into private memory: the queue is invalid.
        gate.convert(AVAIL, P, Attribute::Private).unwrap();
        let mem = DeviceMemory::new(gate);
        assert!(!q.is_valid(&mem));
        assert!(q.iter(&mem).is_err());
        assert_eq!(mem.pinned(), 0);
    }
}

fn populated_bytes(m: &dyn RestrictedMemory) -> u64 {
    m.populated().unwrap().iter().map(|r| r.end - r.start).sum()
}

/// The two-backing layout (Cloud Hypervisor's SEV-SNP memory manager,
/// QEMU): a flags-0 guest_memfd private side and a memfd shared side in one
/// slot. Each conversion frees the side that becomes unused, so the two
/// files together hold one copy of every page, as the kernel counts it
/// (cachestat, exact on both).
#[test]
fn a_two_backing_slot_keeps_one_copy_of_every_page() {
    let Some(vm) = vm() else {
        return;
    };
    if !has(BackingKind::GuestMemfd) {
        return;
    }
    let size = 4u64 << 20;
    let private = create_memory(
        MemoryOptions::new(BackingKind::GuestMemfd, size).with_flags(crate::GmemFlags::empty()),
        Some(&vm),
    )
    .unwrap();
    let shared = create_memory(MemoryOptions::new(BackingKind::Memfd, size), Some(&vm)).unwrap();
    // The layout's rules: a mappable private side is refused.
    let mappable =
        create_memory(MemoryOptions::new(BackingKind::GuestMemfd, size), Some(&vm)).unwrap();
    let e = vm
        .bind_two(&mappable, &shared, SlotRequest::new(0, 0, size))
        .unwrap_err();
    assert!(e.to_string().contains("without MMAP"), "{e}");
    let binding = vm
        .bind_two(&private, &shared, SlotRequest::new(0, 0, size))
        .unwrap();
    assert!(binding.private_memory().is_some());
    let e = Gatekeeper::new(
        &vm,
        Vec::new(),
        GateOptions::new(Attribute::Private, Policy::InPlace),
    );
    assert!(matches!(e, Err(GateError::NoBindings)));
    let gate = Gatekeeper::new(
        &vm,
        vec![binding],
        GateOptions::new(Attribute::Private, Policy::Discard),
    )
    .unwrap();
    let events = gate.subscribe();
    // The guest's private memory, as the kernel faults it in.
    private.allocate(FileRange::new(0, size).unwrap()).unwrap();
    let total = |what: &str| {
        let (p, s) = (populated_bytes(&*private), populated_bytes(&*shared));
        assert_eq!(
            p + s,
            size,
            "{what}: private side {p:#x} + shared side {s:#x}"
        );
        (p, s)
    };
    assert_eq!(total("launch"), (size, 0));
    // Half to shared: the private copies are freed; devices fill the shared side.
    gate.convert(0, size / 2, Attribute::Shared).unwrap();
    gate.fill(0, size / 2, 0x5a).unwrap();
    assert_eq!(total("half shared"), (size / 2, size / 2));
    assert_eq!(
        events.try_recv().unwrap(),
        MemoryEvent::Converted {
            range: 0..size / 2,
            to: Attribute::Shared
        }
    );
    // Back to private: the shared copies are freed; the kernel faults the
    // private side in again (here: as the guest touches it).
    gate.convert(0, size / 2, Attribute::Private).unwrap();
    assert_eq!(
        populated_bytes(&*shared),
        0,
        "the shared side was not freed"
    );
    private
        .allocate(FileRange::new(0, size / 2).unwrap())
        .unwrap();
    assert_eq!(total("all private again"), (size, 0));
    // An explicit discard frees both sides.
    gate.convert(0, P, Attribute::Shared).unwrap();
    gate.write(0, b"x").unwrap();
    gate.discard(0, 2 * P).unwrap();
    assert_eq!(populated_bytes(&*private), size - 2 * P);
    assert_eq!(populated_bytes(&*shared), 0);
    let events: Vec<MemoryEvent> = events.try_iter().collect();
    assert_eq!(
        events.last(),
        Some(&MemoryEvent::Discarded { range: 0..2 * P })
    );
    // The private side has no host path at all: the shared side is what
    // host code reaches, and only where shared.
    let mut b = [0u8; 1];
    assert!(matches!(
        gate.read(2 * P, &mut b),
        Err(GateError::Private { .. })
    ));
}

#[test]
fn runs_and_events_describe_what_changed() {
    let Some(f) = fixture(BackingKind::Memfd, 2 << 20, GateOptions::default()) else {
        return;
    };
    let events = f.gate.subscribe();
    f.gate.convert(P, 2 * P, Attribute::Private).unwrap();
    // Converting a range that is partly private already reports only what
    // changed sides.
    f.gate.convert(0, 4 * P, Attribute::Private).unwrap();
    assert_eq!(
        f.gate.runs(0, 5 * P).unwrap(),
        vec![
            (0..4 * P, Attribute::Private),
            (4 * P..5 * P, Attribute::Shared)
        ]
    );
    let got: Vec<MemoryEvent> = events.try_iter().collect();
    assert_eq!(
        got,
        vec![
            MemoryEvent::Converted {
                range: P..3 * P,
                to: Attribute::Private
            },
            MemoryEvent::Converted {
                range: 0..P,
                to: Attribute::Private
            },
            MemoryEvent::Converted {
                range: 3 * P..4 * P,
                to: Attribute::Private
            },
        ]
    );
    assert!(matches!(
        f.gate.runs(0, 4 << 20),
        Err(GateError::OutsideMemory { .. })
    ));
    drop(events);
    f.gate.convert(0, P, Attribute::Shared).unwrap(); // no receiver: no error
}
