//! `gmem`: probe the host, run the conformance suite, run guests on
//! restricted memory.

mod commands;
mod units;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Restricted guest memory for VMMs: guest_memfd, sealed memfd and hugetlb.
#[derive(Debug, Parser)]
#[command(name = "gmem", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report what this kernel offers: KVM, guest_memfd and its flags per VM
    /// type, memory attributes, pre-fault, huge pages, usable backings.
    Probe(commands::probe::Args),
    /// Run a guest on restricted memory: the built-in demo, or a flat binary
    /// that speaks the guest ABI (docs/guest-abi.md). Exits with the guest's
    /// status.
    Run(commands::run::Args),
    /// Continue a guest from a snapshot `gmem run --snapshot FILE` took
    /// (eagerly, or lazily with --lazy); exits with the guest's status.
    Restore(commands::restore::Args),
    /// Measure every backing beside the raw system calls and plain memory:
    /// populate, fault-in, discard, guest fault-in, launch, conversion.
    Bench(commands::bench::Args),
    /// Run the conformance suite (the upstream T-checks and gmem's G-checks)
    /// on every backing this host has, or on one.
    Selftest(commands::selftest::Args),
    /// One VM of `gmem bench`'s across-processes rows (started by it).
    #[command(hide = true)]
    BenchWorker(commands::bench::WorkerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe(args) => commands::probe::run(&args),
        Command::Run(args) => commands::run::run(&args),
        Command::Restore(args) => commands::restore::run(&args),
        Command::Bench(args) => commands::bench::run(&args),
        Command::Selftest(args) => commands::selftest::run(&args),
        Command::BenchWorker(args) => commands::bench::worker(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gmem: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
