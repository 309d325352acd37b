//! `gmem selftest`: the conformance suite from the command line.

use std::process::ExitCode;

use gmem::BackingKind;
use gmem_conformance::{Outcome, checks, flag_sets, label, run as run_check};

/// `gmem selftest` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this backing (guest-memfd, memfd, hugetlb-2m, hugetlb-1g).
    #[arg(long)]
    backing: Option<BackingKind>,
    /// Only the check with this id (T5, G1, ...).
    #[arg(long)]
    check: Option<String>,
}

/// Runs `gmem selftest`: one line per check run, then
/// `N passed, M failed, K skipped`. Exits 1 if any check failed.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let backings: Vec<BackingKind> = match args.backing {
        Some(b) => {
            // Asked for by name: a backing this host cannot make at all is
            // an error that names why, not a run of skips.
            if b == BackingKind::GuestMemfd
                && let Ok(vm) = gmem::Vm::new()
                && !vm.has_guest_memfd()
            {
                return Err(anyhow::Error::new(gmem::BackingError::NoGuestMemfd).context(
                    "--backing guest-memfd: its checks cannot run on this host (the other backings' can: drop --backing)",
                ));
            }
            vec![b]
        }
        None => BackingKind::ALL.to_vec(),
    };
    let selected: Vec<_> = checks()
        .iter()
        .filter(|c| {
            args.check
                .as_deref()
                .is_none_or(|id| c.id.eq_ignore_ascii_case(id))
        })
        .collect();
    if selected.is_empty() {
        let families: Vec<String> = ['T', 'G', 'C']
            .into_iter()
            .filter_map(|f| {
                let n = checks().iter().filter(|c| c.id.starts_with(f)).count();
                (n > 0).then(|| format!("{f}1..{f}{n}"))
            })
            .collect();
        anyhow::bail!(
            "no check {:?}; the ids are {}",
            args.check.as_deref().unwrap_or(""),
            families.join(", ")
        );
    }
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for backing in backings {
        for check in &selected {
            for &flags in flag_sets(check) {
                let outcome = run_check(check, backing, flags);
                println!("{}: {outcome}", label(check, backing, flags));
                match outcome {
                    Outcome::Pass => passed += 1,
                    Outcome::Fail(_) => failed += 1,
                    Outcome::Skip(..) => skipped += 1,
                }
            }
        }
    }
    gmem_testkit::pool::restore();
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
