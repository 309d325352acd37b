//! How fast a snapshot streams and an eager restore fills, for profiling
//! before `gmem bench` has rows for them: a memfd guest of `[MiB]` (256 by
//! default) filled with a pattern, an eighth of it private, snapshotted
//! sealed into memory and into a file, restored from memory; beside the
//! same bytes read out through the gatekeeper (`Gatekeeper::read`) and
//! written to the file with `write(2)`.
//!
//! `cargo run --release -p gmem --example snapshot_throughput [MiB]`
use std::io::Write;
use std::time::Instant;

use gmem::snapshot::{PrivatePages, SealKey};
use gmem::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let size = mib << 20;
    let guest = |vm: &Vm| -> Result<Gatekeeper, Box<dyn std::error::Error>> {
        let mem = create_memory(MemoryOptions::new(BackingKind::Memfd, size), Some(vm))?;
        let b = vm.bind(&mem, SlotRequest::new(0, 0, size))?;
        Ok(Gatekeeper::new(vm, vec![b], GateOptions::default())?)
    };
    let vm = Vm::new()?;
    let gate = guest(&vm)?;
    gate.fill(0, size, 0x5a)?;
    gate.convert(0, size / 8, Attribute::Private)?;
    let key = SealKey::new([1; 32]);
    let gib = |bytes: u64, secs: f64| bytes as f64 / secs / (1u64 << 30) as f64;

    let mut stream = Vec::with_capacity(size as usize + (1 << 20));
    let t = Instant::now();
    let rep = gate.snapshot(&mut stream, &PrivatePages::Seal(key.clone()))?;
    let d = t.elapsed().as_secs_f64();
    println!(
        "snapshot to memory: {mib} MiB ({} sealed) in {d:.3} s = {:.2} GiB/s",
        rep.sealed_bytes >> 20,
        gib(size, d)
    );
    let path = std::env::temp_dir().join(format!("gmem-snap-{}.bin", std::process::id()));
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
    let t = Instant::now();
    gate.snapshot(&mut file, &PrivatePages::Seal(key.clone()))?;
    file.flush()?;
    let d = t.elapsed().as_secs_f64();
    println!("snapshot to a file: {:.2} GiB/s", gib(size, d));

    // The baseline: the shared bytes read out and written, no format.
    gate.convert(0, size / 8, Attribute::Shared)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut raw = std::fs::File::create(&path)?;
    let t = Instant::now();
    for off in (0..size).step_by(1 << 20) {
        gate.read(off, &mut buf)?;
        raw.write_all(&buf)?;
    }
    let d = t.elapsed().as_secs_f64();
    println!(
        "baseline, read + write(2) of the same bytes: {:.2} GiB/s",
        gib(size, d)
    );
    let _ = std::fs::remove_file(&path);

    let vm2 = Vm::new()?;
    let gate2 = guest(&vm2)?;
    let t = Instant::now();
    gate2.restore(&mut stream.as_slice(), Some(&key))?;
    let d = t.elapsed().as_secs_f64();
    println!("eager restore from memory: {:.2} GiB/s", gib(size, d));
    Ok(())
}
