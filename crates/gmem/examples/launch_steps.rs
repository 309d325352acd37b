//! Where a launch's time goes, step by step (VM, memory, binding, gatekeeper),
//! for `gmem bench`'s launch figures.
use std::time::Instant;

use gmem::*;

fn main() -> Result<(), gmem::Error> {
    for kind in [BackingKind::GuestMemfd, BackingKind::Memfd] {
        for _ in 0..3 {
            let t = Instant::now();
            let vm = Vm::new()?;
            let t_vm = t.elapsed();
            if kind == BackingKind::GuestMemfd && !vm.has_guest_memfd() {
                println!("{kind}: skipped: {}", BackingError::NoGuestMemfd);
                break;
            }
            let mem = create_memory(MemoryOptions::new(kind, 2 << 20), Some(&vm))?;
            let t_mem = t.elapsed();
            let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 << 20))?;
            let t_bind = t.elapsed();
            let gate = Gatekeeper::new(&vm, vec![b], GateOptions::default())?;
            let t_view = t.elapsed();
            gate.launch(Attribute::Private)?;
            let t_conv = t.elapsed();
            println!(
                "{kind}: vm {t_vm:?} memory {:?} bind {:?} gatekeeper {:?} launch {:?}",
                t_mem - t_vm,
                t_bind - t_mem,
                t_view - t_bind,
                t_conv - t_view
            );
        }
    }
    Ok(())
}
