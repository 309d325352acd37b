//! Where a machine launch's time goes: build, load, first exit.
use std::time::Instant;

use gmem::BackingKind;
use gmem_vmm::{Machine, MachineConfig};

fn main() -> Result<(), gmem_vmm::VmmError> {
    // mov al, 1; out 0x10, al; hlt
    let code = [0xb0, 0x01, 0xe6, 0x10, 0xf4];
    for kind in [BackingKind::GuestMemfd, BackingKind::Memfd] {
        for _ in 0..4 {
            let t = Instant::now();
            let mut m = Machine::new(MachineConfig::new(kind, 2 << 20))?;
            let built = t.elapsed();
            m.load(&code, 0x10_0000, 0x10_0000)?;
            let loaded = t.elapsed();
            let exit = m.run(0)?;
            let ran = t.elapsed();
            println!(
                "{kind}: new {built:?} load {:?} run {:?} ({exit})",
                loaded - built,
                ran - loaded
            );
        }
    }
    Ok(())
}
