//! `gmem probe`: what this host offers restricted memory.

use std::process::ExitCode;

use gmem::probe::Probe;

use crate::units::size_name;

/// `gmem probe` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn flag_names(flags: u64) -> String {
    let mut names = Vec::new();
    if flags & 1 != 0 {
        names.push("MMAP");
    }
    if flags & 2 != 0 {
        names.push("INIT_SHARED");
    }
    if flags & !3 != 0 {
        names.push("unknown bits");
    }
    if names.is_empty() {
        format!("{flags:#x}")
    } else {
        format!("{flags:#x} ({})", names.join("|"))
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Runs `gmem probe`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let probe = Probe::run();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&probe)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<20}{}", "kernel", probe.kernel);
    match &probe.kvm {
        None => println!(
            "{:<20}absent: {}",
            "KVM",
            probe.kvm_error.as_deref().unwrap_or("?")
        ),
        Some(kvm) => {
            println!("{:<20}present, API version {}", "KVM", kvm.api_version);
            println!(
                "{:<20}{} (KVM_CAP_GUEST_MEMFD), flags {} system-wide",
                "guest_memfd",
                yes_no(kvm.guest_memfd),
                flag_names(kvm.guest_memfd_flags)
            );
            for t in &kvm.vm_types {
                match (&t.error, t.guest_memfd_flags) {
                    (Some(e), _) => {
                        println!("{:<20}{}: cannot create: {e}", "VM type", t.vm_type.name())
                    }
                    (None, flags) => println!(
                        "{:<20}{}: guest_memfd flags {}, memory attributes {:#x}",
                        "VM type",
                        t.vm_type.name(),
                        flag_names(flags.unwrap_or(0)),
                        t.memory_attributes.unwrap_or(0)
                    ),
                }
            }
            println!(
                "{:<20}{:#x}{}",
                "memory attributes",
                kvm.memory_attributes,
                if kvm.memory_attributes & 8 != 0 {
                    " (PRIVATE)"
                } else {
                    " (none: KVM_SET_MEMORY_ATTRIBUTES unavailable)"
                }
            );
            println!("{:<20}{}", "pre-fault memory", yes_no(kvm.pre_fault_memory));
            println!(
                "{:<20}{:#x}{}",
                "exit hypercall",
                kvm.exit_hypercall_mask,
                if kvm.exit_hypercall_mask & (1 << 12) != 0 {
                    " (KVM_HC_MAP_GPA_RANGE)"
                } else {
                    ""
                }
            );
            println!(
                "{:<20}{}; memory fault info {}",
                "user memory2",
                yes_no(kvm.user_memory2),
                yes_no(kvm.memory_fault_info)
            );
        }
    }
    for pool in &probe.huge_pages {
        println!(
            "{:<20}{} free of {} ({} reserved)",
            format!("huge pages {}", size_name(pool.page_size)),
            pool.free,
            pool.total,
            pool.reserved
        );
    }
    println!("backings:");
    for b in &probe.backings {
        let state = if b.usable { "usable" } else { "not usable" };
        match &b.reason {
            Some(r) => println!("  {:<14}{state}: {r}", b.backing.name()),
            None => println!("  {:<14}{state}", b.backing.name()),
        }
        println!("  {:<14}host view: {}", "", b.host_view);
    }
    Ok(ExitCode::SUCCESS)
}
