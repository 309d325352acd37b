//! `gmem bench`: every backing beside the raw system calls and plain memory.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gmem::BackingKind;
use gmem_bench::{BenchOptions, output};

use crate::units::parse_size;

/// `gmem bench` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backings to measure; repeat for several [default: all four].
    #[arg(long)]
    backing: Vec<BackingKind>,
    /// The region size per measurement (a multiple of 2 MiB).
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    size: u64,
    /// Measured reps per measurement, after one warm-up rep.
    #[arg(long, default_value_t = 5)]
    reps: u32,
    /// A quick subset (about a minute): one row of each family, one rep,
    /// 64 MiB regions.
    #[arg(long)]
    quick: bool,
    /// Only the rows whose metric contains this text; repeat for several.
    #[arg(long)]
    only: Vec<String>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write an SVG chart to this file, and the scale curves beside it
    /// (`<stem>-<curve>.svg`).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Runs `gmem bench`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let opts = BenchOptions {
        backings: if args.backing.is_empty() {
            BackingKind::ALL.to_vec()
        } else {
            args.backing.clone()
        },
        size: if args.quick { 64 << 20 } else { args.size },
        reps: if args.quick { 1 } else { args.reps },
        only: args.only.clone(),
        quick: args.quick,
        // The across-processes rows start this binary's hidden worker.
        worker: std::env::current_exe()
            .ok()
            .map(|exe| vec![exe.into_os_string(), "bench-worker".into()]),
    };
    opts.validate()?;
    // A progress bar on stderr when it is a terminal, never under --json.
    let bar = (std::io::stderr().is_terminal() && !args.json).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut progress = |done: usize, total: usize, label: &str| {
        if let Some(bar) = &bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(label.to_owned());
            if done == total {
                bar.finish_and_clear();
            }
        }
    };
    let report = gmem_bench::run(&opts, &mut progress).context("running the benchmarks")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", output::table(&report));
    }
    if let Some(path) = &args.plot {
        let chart = gmem_bench::charts::bars(&report)
            .map_err(|e| anyhow::anyhow!("drawing the chart: {e}"))?;
        std::fs::write(path, chart)
            .with_context(|| format!("writing the chart {}", path.display()))?;
        eprintln!("chart written to {}", path.display());
        let stem = path
            .file_stem()
            .map_or("bench".into(), |s| s.to_string_lossy());
        for (name, svg) in gmem_bench::charts::curves(&report)
            .map_err(|e| anyhow::anyhow!("drawing the curves: {e}"))?
        {
            let curve = path.with_file_name(format!("{stem}-{name}.svg"));
            std::fs::write(&curve, svg)
                .with_context(|| format!("writing the chart {}", curve.display()))?;
            eprintln!("chart written to {}", curve.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `gmem bench-worker` arguments (hidden: `gmem bench` starts it).
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Round trips the worker's guest makes once started.
    round_trips: u32,
}

/// Runs one VM worker process for `gmem bench` (see
/// `gmem_bench::processes`).
pub fn worker(args: &WorkerArgs) -> anyhow::Result<ExitCode> {
    gmem_bench::processes::worker(args.round_trips).context("bench worker")?;
    Ok(ExitCode::SUCCESS)
}
