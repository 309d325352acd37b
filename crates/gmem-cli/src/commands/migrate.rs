//! What `gmem run` has for live migration: the source's options
//! (`--migrate-on SIGNAL --to ENDPOINT`) and the destination's
//! (`--incoming ENDPOINT`), with `--key FILE` on both sides.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use gmem::migrate::ACK_FAILED;
use gmem_vmm::migrate::{IO_TIMEOUT, monotonic_ns};
use gmem_vmm::{Console, Endpoint, IncomingOptions, Machine, MigrationPlan, VmmError};

/// The migration options of `gmem run`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Migrate the running guest when the process gets this signal
    /// (SIGUSR2, SIGUSR1, SIGHUP or SIGWINCH): pre-copy rounds while it
    /// runs, then a short pause; the run ends (status 0) once the
    /// destination runs it, and goes on if the migration fails.
    #[arg(long, value_name = "SIGNAL", value_parser = parse_signal, requires = "to")]
    pub migrate_on: Option<i32>,
    /// Where the destination listens: unix:PATH or tcp:ADDR:PORT.
    #[arg(long, value_name = "ENDPOINT", requires = "migrate_on")]
    pub to: Option<Endpoint>,
    /// Post-copy: after one pre-copy round the guest moves at once, and
    /// the destination faults in over the connection what it does not hold
    /// yet while the source pushes the rest (memfd and hugetlb-2m
    /// destinations). Once the destination runs the guest, a failure of
    /// the connection loses it.
    #[arg(long, requires = "migrate_on")]
    pub postcopy: bool,
    /// The most pre-copy rounds before the stop-and-copy.
    #[arg(long, default_value_t = gmem::migrate::DEFAULT_MAX_ROUNDS, requires = "migrate_on")]
    pub max_rounds: u32,
    /// Receive a migrating guest on ENDPOINT (unix:PATH or
    /// tcp:ADDR:PORT) and run it: no payload is given, and the RAM, vCPUs,
    /// policy and devices come with it (--mem, if given, must be the
    /// source's; --backing, --disk, --key, --json and --migrate-on apply).
    #[arg(long, value_name = "ENDPOINT", conflicts_with_all = ["payload", "console_in"])]
    pub incoming: Option<Endpoint>,
}

/// `--migrate-on`: a signal by name.
fn parse_signal(s: &str) -> Result<i32, String> {
    let name = s.trim_start_matches("SIG");
    match name {
        "USR1" => Ok(libc::SIGUSR1),
        "USR2" => Ok(libc::SIGUSR2),
        "HUP" => Ok(libc::SIGHUP),
        "WINCH" => Ok(libc::SIGWINCH),
        _ => Err(format!(
            "{s}: the migration signal is one of SIGUSR2, SIGUSR1, SIGHUP, SIGWINCH"
        )),
    }
}

impl MigrateArgs {
    /// The source's plan, if `--migrate-on` was given.
    pub fn plan(
        &self,
        snapshot: &super::snapshot::SnapshotArgs,
    ) -> anyhow::Result<Option<MigrationPlan>> {
        let (Some(signal), Some(to)) = (self.migrate_on, &self.to) else {
            return Ok(None);
        };
        if signal == libc::SIGUSR1 && snapshot.snapshot.is_some() {
            anyhow::bail!(
                "--migrate-on SIGUSR1: SIGUSR1 takes the --snapshot already; choose SIGUSR2"
            );
        }
        let key = snapshot
            .key
            .as_deref()
            .map(super::snapshot::read_key)
            .transpose()?;
        Ok(Some(MigrationPlan {
            signal,
            to: to.clone(),
            key,
            max_rounds: self.max_rounds,
            converge_bytes: gmem::migrate::DEFAULT_CONVERGE_BYTES,
            postcopy: self.postcopy,
        }))
    }
}

/// `gmem run --incoming ENDPOINT`: waits for one migration, builds the
/// machine from it, answers the source, and runs the guest; the process
/// exits with the guest's status.
pub fn run_incoming(args: &super::run::Args, from: &Endpoint) -> anyhow::Result<ExitCode> {
    let key = args
        .snapshot
        .key
        .as_deref()
        .map(super::snapshot::read_key)
        .transpose()?;
    let console = if args.json {
        Console::stderr()
    } else {
        Console::stdout()
    };
    let opts = IncomingOptions {
        backing: args.backing,
        console: console.clone(),
        disk: args.disk.as_ref().map(|d| d.path.clone()),
    };
    let mut conn = from.accept_one().context("waiting for the migration")?;
    conn.set_timeouts(Some(IO_TIMEOUT))
        .context("configuring the migration connection")?;
    let (mut machine, mut summary, answer) =
        match Machine::incoming(&conn, from, key.as_ref(), &opts).and_then(|(m, s, a)| {
            match args.mem {
                Some(mem) if mem != m.config().mem_size => Err(VmmError::MigrationStream {
                    what: format!(
                        "the source's guest has {:#x} bytes of RAM, and --mem says {mem:#x}",
                        m.config().mem_size
                    ),
                }),
                _ => Ok((m, s, a)),
            }
        }) {
            Ok(m) => m,
            Err(e) => {
                // The source resumes its guest on this answer (or on none).
                let _ = conn.write_all(&[ACK_FAILED]);
                return Err(super::snapshot::explain(e))
                    .context(format!("receiving the migration on {from}"));
            }
        };
    // The guest runs here only on the source's go-ahead, which it sends
    // once it has committed to never resuming it: without it, this side
    // does not run the guest (the source may).
    machine
        .answer_running(&mut conn, answer)
        .context("answering the source: the guest is not run here")?;
    summary.resumed_at_ns = monotonic_ns();
    drop(conn);
    machine.set_snapshot_plan(args.snapshot.plan()?);
    machine.set_migration_plan(args.migrate.plan(&args.snapshot)?);
    let report = machine
        .run_to_end(&console)
        .map_err(super::snapshot::explain)
        .context("running the migrated guest")?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["incoming"] = serde_json::to_value(&summary)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        super::run::print_report(&report);
        println!(
            "{:<14}from {} in {} round(s), {} bytes of stream ({} bytes of VMM state), built after {:.3} ms",
            "incoming",
            summary.from,
            summary.rounds,
            summary.stream_bytes,
            summary.state_bytes,
            summary.receive_us as f64 / 1000.0
        );
    }
    Ok(super::run::exit_code(report.status))
}
