//! Where a machine launch's time goes (build, load, first exit), for
//! profiling `gmem bench`'s launch figures: `launch_profile [backing] [MiB]`.
use std::time::{Duration, Instant};

use gmem::BackingKind;
use gmem_vmm::{Machine, MachineConfig};

fn main() -> Result<(), gmem_vmm::VmmError> {
    let mut args = std::env::args().skip(1);
    let kind: BackingKind = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(BackingKind::GuestMemfd);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    // mov al, 1; out 0x10, al; hlt
    let code = [0xb0, 0x01, 0xe6, 0x10, 0xf4];
    let (mut new, mut load, mut run) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    const N: u32 = 200;
    for _ in 0..N {
        let t = Instant::now();
        let mut m = Machine::new(MachineConfig::new(kind, mib << 20))?;
        let built = t.elapsed();
        m.load(&code, 0x10_0000, 0x10_0000)?;
        let loaded = t.elapsed();
        m.run(0)?;
        let ran = t.elapsed();
        new += built;
        load += loaded - built;
        run += ran - loaded;
    }
    println!(
        "{kind} {mib} MiB: new {:?} load {:?} run {:?}",
        new / N,
        load / N,
        run / N
    );
    Ok(())
}
