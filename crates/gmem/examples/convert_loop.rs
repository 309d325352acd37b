//! Conversions of one page back and forth in a loop: what one guest-driven
//! conversion costs on the host side, for profiling (`perf record`).
use gmem::*;

fn main() -> Result<(), gmem::Error> {
    let vm = Vm::new()?;
    let mem = create_memory(MemoryOptions::new(BackingKind::Memfd, 4 << 20), Some(&vm))?;
    let binding = vm.bind(&mem, SlotRequest::new(0, 0, 4 << 20))?;
    let gate = Gatekeeper::new(
        &vm,
        vec![binding],
        GateOptions::new(Attribute::Private, Policy::InPlace),
    )?;
    let start = std::time::Instant::now();
    for i in 0..200_000 {
        let to = if i % 2 == 0 {
            Attribute::Shared
        } else {
            Attribute::Private
        };
        gate.convert(0x20_0000, 4096, to)?;
    }
    println!("{:?} per conversion", start.elapsed() / 200_000);
    Ok(())
}
