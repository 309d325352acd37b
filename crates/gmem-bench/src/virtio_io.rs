//! The confidential-VM I/O path measured: `guests/disk-sum` reads a disk
//! image through virtio-blk, over the gatekeeper and the guest's shared
//! bounce pool; beside it, the host reading the same file.

use std::time::Instant;

use gmem::BackingKind;
use gmem_vmm::virtio::blk::VirtioBlk;
use gmem_vmm::virtio::console::VirtioConsole;
use gmem_vmm::{Console, Machine, MachineConfig, RunReport};

use crate::BenchError;
use crate::plan::Plan;
use crate::raw::Subject;

/// The disk the guest reads.
const DISK: usize = 16 << 20;
const MIB: f64 = (1u64 << 20) as f64;

fn image() -> Result<std::path::PathBuf, BenchError> {
    let path = std::env::temp_dir().join(format!("gmem-bench-disk-{}.img", std::process::id()));
    if !path.exists() {
        let mut bytes = vec![0u8; DISK];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        std::fs::write(&path, bytes)?;
    }
    Ok(path)
}

/// Runs disk-sum over the image on `kind`; the report.
fn disk_sum(kind: BackingKind) -> Result<RunReport, BenchError> {
    let path = image()?;
    let ram = if kind == BackingKind::Hugetlb1G {
        1 << 30
    } else {
        64 << 20
    };
    let mut m = Machine::new(MachineConfig::new(kind, ram))?;
    let (console, _out) = Console::buffer();
    m.add_device(Box::new(VirtioConsole::new(console.clone(), Vec::new())))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    m.add_device(Box::new(VirtioBlk::new(file, false)?))?;
    m.load_elf(gmem_guests::DISK_SUM)?;
    let report = m.run_to_end(&console)?;
    if report.status != 0 {
        return Err(BenchError::Guest(format!(
            "disk-sum ended with status {}",
            report.status
        )));
    }
    Ok(report)
}

fn read_mib_per_s(kind: BackingKind) -> Result<f64, BenchError> {
    let r = disk_sum(kind)?;
    Ok((DISK - 512) as f64 / MIB / (r.wall_time_us.max(1) as f64 / 1e6))
}

fn exits_per_mib(kind: BackingKind) -> Result<f64, BenchError> {
    let r = disk_sum(kind)?;
    let exits: u64 = r.exits.values().sum();
    Ok(exits as f64 / ((DISK - 512) as f64 / MIB))
}

fn host_read_mib_per_s() -> Result<f64, BenchError> {
    let path = image()?;
    let start = Instant::now();
    let bytes = std::fs::read(&path)?;
    let d = start.elapsed();
    std::hint::black_box(&bytes);
    Ok(bytes.len() as f64 / MIB / d.as_secs_f64().max(1e-9))
}

/// The rows, for `backings`.
pub(crate) fn plans(backings: &[BackingKind]) -> Vec<Plan> {
    let mut plans = Vec::new();
    for &k in backings {
        plans.push(
            Plan::new("virtio-blk sequential read (guest)", Subject::Backing(k), "MiB/s", true)
                .gmem(move || read_mib_per_s(k))
                .raw(host_read_mib_per_s)
                .note("guests/disk-sum over 16 MiB, through the shared bounce pool; raw: the host reads the same file (page cache)"),
        );
        plans.push(
            Plan::new(
                "virtio-blk exits per MiB (guest)",
                Subject::Backing(k),
                "exits",
                false,
            )
            .gmem(move || exits_per_mib(k))
            .note("every exit of the run: MMIO register accesses, notifications, ports"),
        );
    }
    plans
}
