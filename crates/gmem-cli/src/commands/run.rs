//! `gmem run`: run a guest on restricted memory, the built-in demo by default.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gmem::{Attribute, BackingKind, Policy, Vm};
use gmem_vmm::virtio::blk::VirtioBlk;
use gmem_vmm::virtio::console::VirtioConsole;
use gmem_vmm::{Console, Machine, MachineConfig, RunReport};

use crate::units::{parse_addr, parse_size, size_name};

/// `gmem run` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// An ELF executable (loaded by its PT_LOAD segments, entered at its
    /// entry point) or a flat binary to run; without one, the built-in demo
    /// guest (Rust, over virtio-console and virtio-blk) runs.
    payload: Option<PathBuf>,
    /// Guest RAM's backing: guest-memfd, memfd, hugetlb-2m or hugetlb-1g
    /// [default: guest-memfd where the kernel has it, else memfd].
    #[arg(long)]
    pub(crate) backing: Option<BackingKind>,
    /// Guest RAM, like 64M, 1G or 0x4000000 [default: 64M, rounded up to
    /// the backing's page size].
    #[arg(long, value_parser = parse_size)]
    pub(crate) mem: Option<u64>,
    /// vCPUs, one thread each.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Where the payload is loaded.
    #[arg(long, value_parser = parse_addr, default_value = "0x100000")]
    load: u64,
    /// Where the vCPUs start [default: the load address].
    #[arg(long, value_parser = parse_addr)]
    entry: Option<u64>,
    /// What conversions do to the content: in-place or discard.
    #[arg(long, default_value = "in-place")]
    conversion: Policy,
    /// RAM's attribute after launch: private or shared.
    #[arg(long, default_value = "private", value_parser = parse_attribute)]
    initial: Attribute,
    /// A disk image for a virtio-blk device: FILE or FILE,readonly [the
    /// demo: a small read-only image of its own].
    #[arg(long, value_parser = parse_disk)]
    pub(crate) disk: Option<Disk>,
    /// What the guest receives on its virtio-console (a file) [default:
    /// nothing].
    #[arg(long)]
    console_in: Option<PathBuf>,
    /// Run without virtio devices (payloads that predate them).
    #[arg(long)]
    no_devices: bool,
    /// Print the report as JSON (the guest's console then goes to stderr).
    #[arg(long)]
    pub(crate) json: bool,
    /// Where the guest's snapshot requests (port 0xf9) and SIGUSR1 write
    /// the snapshot; without it the guest's requests answer -ENOSYS.
    #[command(flatten)]
    pub(crate) snapshot: super::snapshot::SnapshotArgs,
    /// Live migration: the source's and the destination's options.
    #[command(flatten)]
    pub(crate) migrate: super::migrate::MigrateArgs,
}

/// `--disk FILE[,readonly]`.
#[derive(Clone, Debug)]
pub(crate) struct Disk {
    pub(crate) path: PathBuf,
    readonly: bool,
}

fn parse_disk(s: &str) -> Result<Disk, String> {
    let (path, readonly) = match s.rsplit_once(',') {
        Some((p, "readonly")) => (p, true),
        Some((_, other)) => {
            return Err(format!(
                "unknown disk option {other:?}; expected FILE or FILE,readonly"
            ));
        }
        None => (s, false),
    };
    if path.is_empty() {
        return Err("the disk needs a file: FILE or FILE,readonly".into());
    }
    Ok(Disk {
        path: PathBuf::from(path),
        readonly,
    })
}

/// The demo's disk: a sector of text, in a temporary file removed at exit.
fn demo_disk() -> anyhow::Result<tempfile_like::TempDisk> {
    tempfile_like::TempDisk::new(b"the gmem demo disk, read by the guest through virtio-blk\n")
}

mod tempfile_like {
    //! A temporary disk image, removed when dropped.
    use std::path::PathBuf;

    pub(super) struct TempDisk(pub(super) PathBuf);

    impl TempDisk {
        pub(super) fn new(text: &[u8]) -> anyhow::Result<TempDisk> {
            let path =
                std::env::temp_dir().join(format!("gmem-demo-disk-{}.img", std::process::id()));
            let mut image = text.to_vec();
            image.resize(64 << 10, 0);
            std::fs::write(&path, image)?;
            Ok(TempDisk(path))
        }
    }

    impl Drop for TempDisk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn parse_attribute(s: &str) -> Result<Attribute, String> {
    match s {
        "private" => Ok(Attribute::Private),
        "shared" => Ok(Attribute::Shared),
        other => Err(format!(
            "unknown attribute {other:?}; expected private or shared"
        )),
    }
}

/// guest-memfd where the kernel can back a runnable guest with it, else memfd
/// ([`Vm::preferred_backing`]).
fn default_backing() -> BackingKind {
    Vm::new().map_or(BackingKind::Memfd, |vm| vm.preferred_backing())
}

/// Runs `gmem run`; the process exits with the guest's status.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if let Some(from) = &args.migrate.incoming {
        return super::migrate::run_incoming(args, from);
    }
    let backing = args.backing.unwrap_or_else(default_backing);
    let mem_size = args
        .mem
        .unwrap_or_else(|| (64u64 << 20).next_multiple_of(backing.page_size()));
    let config = MachineConfig {
        vcpus: args.vcpus,
        initial: args.initial,
        policy: args.conversion,
        ..MachineConfig::new(backing, mem_size)
    };
    config.validate()?;
    let demo = args.payload.is_none();
    let payload = match &args.payload {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("reading the payload {}", path.display()))?,
        None => gmem_guests::VIRTIO_DEMO.to_vec(),
    };
    let entry = args.entry.unwrap_or(args.load);
    let mut machine = Machine::new(config).context("building the machine")?;
    let console = if args.json {
        Console::stderr()
    } else {
        Console::stdout()
    };
    let _demo_disk;
    if !args.no_devices {
        let input = match &args.console_in {
            Some(p) => std::fs::read(p)
                .with_context(|| format!("reading the console input {}", p.display()))?,
            None => Vec::new(),
        };
        machine
            .add_device(Box::new(VirtioConsole::new(console.clone(), input)))
            .context("adding virtio-console")?;
        let disk = match &args.disk {
            Some(d) => Some(d.clone()),
            None if demo => {
                let temp = demo_disk().context("creating the demo's disk image")?;
                let d = Disk {
                    path: temp.0.clone(),
                    readonly: true,
                };
                _demo_disk = temp;
                Some(d)
            }
            None => None,
        };
        if let Some(d) = disk {
            let blk = VirtioBlk::open(&d.path, d.readonly)
                .with_context(|| format!("opening the disk image {}", d.path.display()))?;
            machine
                .add_device(Box::new(blk))
                .context("adding virtio-blk")?;
        }
    }
    if gmem_vmm::elf::is_elf(&payload) {
        machine
            .load_elf(&payload)
            .context("loading the ELF payload")?;
    } else {
        machine
            .load(&payload, args.load, entry)
            .context("loading the payload")?;
    }
    machine.set_snapshot_plan(args.snapshot.plan()?);
    machine.set_migration_plan(args.migrate.plan(&args.snapshot)?);
    let report = machine
        .run_to_end(&console)
        .map_err(super::snapshot::explain)
        .context("running the guest")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(exit_code(report.status))
}

/// The process status for a guest status: its low byte, but never 0 for a
/// non-zero guest status.
pub(crate) fn exit_code(status: i32) -> ExitCode {
    let low = (status & 0xff) as u8;
    ExitCode::from(if status != 0 && low == 0 { 1 } else { low })
}

pub(crate) fn print_report(r: &RunReport) {
    let c = &r.conversions;
    println!("--- gmem run report");
    println!("{:<14}{}", "backing", r.backing);
    println!(
        "{:<14}{} ({:#x}), {} vCPU{}",
        "memory",
        size_name(r.mem_size),
        r.mem_size,
        r.vcpus,
        if r.vcpus == 1 { "" } else { "s" }
    );
    println!(
        "{:<14}{}, RAM {} after launch",
        "policy", r.policy, r.initial
    );
    println!(
        "{:<14}{} pages ({}) at the end",
        "populated",
        r.populated_pages,
        size_name(r.populated_bytes)
    );
    println!(
        "{:<14}to private: {} ({} pages), to shared: {} ({} pages)",
        "conversions", c.to_private, c.pages_to_private, c.to_shared, c.pages_to_shared
    );
    println!(
        "{:<14}{} (bytes freed {:#x}, bytes zeroed in place {:#x})",
        "discards", c.discards, c.bytes_freed, c.bytes_zeroed
    );
    let exits: Vec<String> = r.exits.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("{:<14}{}", "exits", exits.join(", "));
    for d in &r.devices {
        let refusals: Vec<String> = d
            .refusals
            .iter()
            .take(4)
            .map(|x| format!("[{:#x}, +{:#x})", x.gpa, x.len))
            .collect();
        println!(
            "{:<14}{}: {} refused{}{}",
            "device",
            d.name,
            d.refused,
            if refusals.is_empty() {
                String::new()
            } else {
                format!(" ({})", refusals.join(", "))
            },
            if d.status & 0x40 != 0 {
                ", needed a reset"
            } else {
                ""
            }
        );
    }
    println!(
        "{:<14}{:.3} ms",
        "wall time",
        r.wall_time_us as f64 / 1000.0
    );
    for t in &r.snapshots {
        println!(
            "{:<14}{} ({} bytes: {} in clear, {} sealed, {} omitted; {} bytes of VMM state; vCPU paused {:.3} ms; asked by the {})",
            "snapshot",
            t.path.display(),
            t.stream_bytes,
            size_name(t.shared_bytes),
            size_name(t.sealed_bytes),
            size_name(t.omitted_bytes),
            t.state_bytes,
            t.pause_us as f64 / 1000.0,
            t.by
        );
    }
    for n in &r.snapshot_notes {
        println!("{:<14}{n}", "snapshot");
    }
    if let Some(m) = &r.migration {
        println!(
            "{:<14}to {} in {} round(s) + stop-and-copy: {} bytes sent for {} of RAM ({:.3}×), downtime {:.3} ms, total {:.1} ms; the guest runs there",
            "migrated",
            m.to,
            m.rounds.len(),
            m.stream_bytes,
            m.guest_bytes,
            m.bytes_per_guest_byte,
            m.downtime_us as f64 / 1000.0,
            m.total_us as f64 / 1000.0
        );
    }
    for n in &r.migration_notes {
        println!("{:<14}{n}", "migration");
    }
    if r.stopped_for_snapshot {
        println!(
            "{:<14}the run stopped after the snapshot: `gmem restore FILE` continues it",
            "stopped"
        );
    }
    if let Some(l) = &r.lazy {
        println!(
            "{:<14}{} blocks: {} filled on a fault, {} zero, {} for devices, {} prefetched, {} pending at the end",
            "lazy restore",
            l.blocks,
            l.fault_fills,
            l.zero_fills,
            l.host_fills,
            l.prefetch_fills,
            l.pending_at_end
        );
    }
    println!("{:<14}{}", "status", r.status);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_never_hide_a_failure() {
        assert_eq!(exit_code(0), ExitCode::from(0));
        assert_eq!(exit_code(3), ExitCode::from(3));
        assert_eq!(exit_code(256), ExitCode::from(1));
        assert_eq!(exit_code(-1), ExitCode::from(255));
    }
}
