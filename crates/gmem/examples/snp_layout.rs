//! Cloud Hypervisor's SEV-SNP memory layout expressed with gmem, run on
//! this host: the VMM's own `VmFd`, one flags-0 guest_memfd (private side)
//! and one shared memfd per slot, slots the VMM chose, a listener that
//! follows conversions (as a VFIO DMA mapper would), and a guest-like
//! conversion loop. After each step it prints what the two sides hold, as
//! the kernel counts it: one copy of every page.
//!
//! `cargo run -p gmem --example snp_layout`
//!
//! On this host a default VM does not use the private side (KVM runs the
//! guest from `userspace_addr`); the example faults private pages in with
//! `fallocate`, where an SNP host's KVM would on the guest's accesses.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use gmem::backing::{GuestMemfd, SealedMemfd};
use gmem::{
    Attribute, FileRange, GateOptions, Gatekeeper, GmemFlags, MemoryEvent, Policy,
    RestrictedMemory, Slot, SlotRequest, Vm, VmType,
};

const MIB: u64 = 1 << 20;
/// The VMM's RAM layout: (slot, GPA, size), below and above the 32-bit hole.
const RAM: [(u16, u64, u64); 2] = [(0, 0, 64 * MIB), (1, 4 << 30, 64 * MIB)];

fn bytes(m: &dyn RestrictedMemory) -> u64 {
    m.populated()
        .map(|runs| runs.iter().map(|r| r.end - r.start).sum())
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The VMM's own VM.
    let kvm = kvm_ioctls::Kvm::new()?;
    let vm = Vm::from_vm_fd(kvm.create_vm()?, VmType::Default)?;
    // The private side is a guest_memfd: on a kernel without one there is
    // nothing to show (kernels before 6.8, KVMs built without it).
    if !vm.has_guest_memfd() {
        println!("skipped: {}", gmem::BackingError::NoGuestMemfd);
        return Ok(());
    }
    let mut bindings = Vec::new();
    let mut sides = Vec::new();
    for (slot, gpa, size) in RAM {
        // The private side: the VMM's own KVM_CREATE_GUEST_MEMFD, flags 0.
        let request = kvm_bindings::kvm_create_guest_memfd {
            size,
            flags: 0,
            reserved: [0; 6],
        };
        let raw = vm
            .fd()
            .create_guest_memfd(request)
            .map_err(|e| GuestMemfd::create_error(&vm, &request, e))?;
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let private: Arc<dyn RestrictedMemory> =
            Arc::new(GuestMemfd::adopt(&vm, fd, GmemFlags::empty())?);
        // The shared side: a sealed memfd at userspace_addr.
        let shared: Arc<dyn RestrictedMemory> = Arc::new(SealedMemfd::create(
            size,
            GmemFlags::MMAP | GmemFlags::INIT_SHARED,
            Some(&vm),
        )?);
        let req = SlotRequest::new(gpa, 0, size).in_slot(Slot(slot));
        bindings.push(vm.bind_two(&private, &shared, req)?);
        sides.push((gpa, private, shared));
    }
    let gate = Gatekeeper::new(
        &vm,
        bindings,
        GateOptions::new(Attribute::Private, Policy::Discard),
    )?;
    // A listener, as a VFIO or vhost-user mapper would run it.
    let events = gate.subscribe();
    let listener = std::thread::spawn(move || {
        let (mut shared, mut private) = (0u64, 0u64);
        for event in events {
            match event {
                MemoryEvent::Converted {
                    range,
                    to: Attribute::Shared,
                } => shared += range.end - range.start, // map for DMA
                MemoryEvent::Converted { range, .. } => private += range.end - range.start, // unmap
                _ => {}
            }
        }
        (shared, private)
    });
    let report = |what: &str| {
        let mut total = (0, 0);
        for (gpa, private, shared) in &sides {
            let (p, s) = (bytes(&**private), bytes(&**shared));
            total = (total.0 + p, total.1 + s);
            println!(
                "  {what:<28} slot at {gpa:#011x}: private side {:>3} MiB, shared side {:>3} MiB",
                p / MIB,
                s / MIB
            );
        }
        total
    };
    // Launch: the guest's memory is private; its kernel faults it in.
    for (_, private, _) in &sides {
        private.allocate(FileRange::new(0, private.size())?)?;
    }
    report("launched, all private");
    // The guest's SWIOTLB pool: 16 MiB of each slot to shared, then I/O.
    for (gpa, _, _) in &sides {
        gate.convert(*gpa, 16 * MIB, Attribute::Shared)?;
        gate.fill(*gpa, 16 * MIB, 0x42)?;
    }
    report("16 MiB bounce pools shared");
    // A conversion loop: pages go back and forth, a device between.
    for round in 0..100u64 {
        for (gpa, private, _) in &sides {
            let page = gpa + 16 * MIB + (round % 64) * 0x1000;
            gate.convert(page, 0x1000, Attribute::Shared)?;
            gate.write(page, &round.to_le_bytes())?;
            gate.convert(page, 0x1000, Attribute::Private)?;
            // The guest touches its page again: the kernel faults it in.
            private.allocate(FileRange::new(page - gpa, 0x1000)?)?;
        }
    }
    let (p, s) = report("after 200 round trips");
    let total: u64 = RAM.iter().map(|r| r.2).sum();
    println!(
        "one copy of every page: {} MiB private + {} MiB shared = {} MiB of {} MiB of RAM",
        p / MIB,
        s / MIB,
        (p + s) / MIB,
        total / MIB
    );
    let stats = gate.stats();
    drop(gate);
    let (mapped, unmapped) = listener.join().map_err(|_| "the listener panicked")?;
    println!(
        "conversions: {} to shared, {} to private; the listener saw {} KiB become shared and {} KiB become private",
        stats.to_shared,
        stats.to_private,
        mapped >> 10,
        unmapped >> 10
    );
    assert_eq!(p + s, total, "a page exists twice, or not at all");
    Ok(())
}
