//! `gmem restore`: continue a guest from a snapshot `gmem run --snapshot`
//! took, as if it had never stopped.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gmem::BackingKind;
use gmem::snapshot::PrefetchOrder;
use gmem_vmm::{Console, Machine, RestoreOptions};

/// `gmem restore` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The snapshot file.
    file: PathBuf,
    /// Fill guest memory on first touch (userfaultfd) while the guest
    /// runs, with a prefetcher filling the rest; guest_memfd falls back to
    /// an eager restore, and says so.
    #[arg(long)]
    lazy: bool,
    /// With --lazy: no prefetcher (memory comes in only when touched).
    #[arg(long, requires = "lazy")]
    no_prefetch: bool,
    /// With --lazy: the prefetcher's order, as --record-prefetch wrote it.
    #[arg(long, value_name = "FILE", requires = "lazy")]
    prefetch: Option<PathBuf>,
    /// With --lazy: write the order in which the guest touched memory, for
    /// the next restore's --prefetch.
    #[arg(long, value_name = "FILE", requires = "lazy")]
    record_prefetch: Option<PathBuf>,
    /// Guest RAM's backing [default: the snapshot's].
    #[arg(long)]
    backing: Option<BackingKind>,
    /// The disk image, if it moved (it must hold what it held when the
    /// snapshot was taken) [default: the snapshot's path].
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    /// Print the report as JSON (the guest's console then goes to stderr).
    #[arg(long)]
    json: bool,
    /// The key the snapshot was sealed with, and the options of the
    /// restored run's own snapshots.
    #[command(flatten)]
    snapshot: super::snapshot::SnapshotArgs,
}

/// Runs `gmem restore`; the process exits with the guest's status.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let key = args
        .snapshot
        .key
        .as_deref()
        .map(super::snapshot::read_key)
        .transpose()?;
    let file = std::fs::File::open(&args.file)
        .with_context(|| format!("opening the snapshot {}", args.file.display()))?;
    let console = if args.json {
        Console::stderr()
    } else {
        Console::stdout()
    };
    let prefetch = match &args.prefetch {
        Some(p) => {
            let bytes = std::fs::read(p)
                .with_context(|| format!("reading the prefetch order {}", p.display()))?;
            Some(
                PrefetchOrder::decode(&bytes)
                    .with_context(|| format!("the prefetch order {}", p.display()))?,
            )
        }
        None => None,
    };
    let opts = RestoreOptions {
        lazy: args.lazy,
        no_prefetch: args.no_prefetch,
        prefetch,
        backing: args.backing,
        console: console.clone(),
        disk: args.disk.clone(),
    };
    let (mut machine, summary) = Machine::restore(file, key.as_ref(), opts)
        .map_err(super::snapshot::explain)
        .with_context(|| format!("restoring {}", args.file.display()))?;
    if let Some(why) = &summary.lazy_refused {
        eprintln!("gmem: a lazy restore cannot run here ({why}); restored eagerly");
    }
    machine.set_snapshot_plan(args.snapshot.plan()?);
    let report = machine
        .run_to_end(&console)
        .map_err(super::snapshot::explain)
        .context("running the restored guest")?;
    if let (Some(path), Some(lazy)) = (&args.record_prefetch, &report.lazy) {
        std::fs::write(path, &lazy.touch_order)
            .with_context(|| format!("writing the prefetch order {}", path.display()))?;
    }
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["restore"] = serde_json::to_value(&summary)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        super::run::print_report(&report);
        println!(
            "{:<14}{} from {} ({} bytes of VMM state), first instruction after {:.3} ms",
            "restored",
            summary.mode,
            args.file.display(),
            summary.state_bytes,
            summary.ready_us as f64 / 1000.0
        );
    }
    Ok(super::run::exit_code(report.status))
}
