//! The conformance suite under `cargo test`: one test per check and backing,
//! named after the check's catalogue number (`t05_mmap_supported::memfd`).
//! Each runs the check with every flag set it applies to.
//!
//! A skipped check prints `skipped: <reason>` on stderr. A skip for want of
//! something the environment requires the host to have (`GMEM_REQUIRE`, see
//! `gmem_testkit::required`) fails the test.

use std::io::Write;

use gmem::BackingKind;
use gmem_conformance::{Need, Outcome, check, flag_sets, label, run};
use gmem_testkit::required;

fn run_check(id: &str, backing: BackingKind) {
    let check = check(id).unwrap_or_else(|| panic!("no check {id}"));
    let mut failures = Vec::new();
    for &flags in flag_sets(check) {
        let name = label(check, backing, flags);
        let outcome = run(check, backing, flags);
        // Written to stderr directly, so that skips show without --nocapture.
        let _ = writeln!(std::io::stderr(), "{name}: {outcome}");
        match outcome {
            Outcome::Pass => gmem_testkit::log::ran(&name, backing),
            Outcome::Fail(why) => failures.push(format!("{name}: {why}")),
            Outcome::Skip(need, why) => {
                gmem_testkit::log::skipped(&name, &need.name(), &why);
                if let Need::Host(need) = need
                    && required(need)
                {
                    failures.push(format!(
                        "{name}: skipped for want of {}, which the environment requires this host to have: {why}",
                        need.name()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

macro_rules! suite {
    ($($name:ident => $id:literal),* $(,)?) => {
        $(
            mod $name {
                use super::*;

                #[test]
                fn guest_memfd() {
                    run_check($id, BackingKind::GuestMemfd);
                }

                #[test]
                fn memfd() {
                    run_check($id, BackingKind::Memfd);
                }

                #[test]
                fn hugetlb_2m() {
                    run_check($id, BackingKind::Hugetlb2M);
                }

                #[test]
                fn hugetlb_1g() {
                    run_check($id, BackingKind::Hugetlb1G);
                }
            }
        )*

        #[test]
        fn every_check_has_a_test() {
            let listed = [$($id),*];
            for check in gmem_conformance::checks() {
                assert!(listed.contains(&check.id), "{} has no test", check.id);
            }
        }
    };
}

suite! {
    t01_guest_memfd_flags => "T1",
    t02_create_multiple => "T2",
    t03_create_invalid_sizes => "T3",
    t04_file_read_write => "T4",
    t05_mmap_supported => "T5",
    t06_fault_overflow => "T6",
    t07_fault_private => "T7",
    t08_mmap_cow => "T8",
    t09_mmap_not_supported => "T9",
    t10_file_size => "T10",
    t11_fallocate => "T11",
    t12_invalid_punch_hole => "T12",
    t13_guest_memfd_guest => "T13",
    t14_invalid_memory_region_flags => "T14",
    t15_add_private_memory_region => "T15",
    t16_add_overlapping_private_memory_regions => "T16",
    t17_private_mem_conversions => "T17",
    t18_private_mem_kvm_exits_gmem_slot => "T18",
    t19_private_mem_kvm_exits_plain_slot => "T19",
    t20_pre_fault_memory => "T20",
    g01_populated_ranges_are_real => "G1",
    g02_punch_reports_freed_and_zeroed => "G2",
    g03_size_is_immutable => "G3",
    g04_hugetlb_pool_shortage_is_reported => "G4",
    g05_mappings_out_of_dumps_and_forks => "G5",
    g06_bind_rules_refuse_and_change_nothing => "G6",
    g07_drop_in_any_order => "G7",
    g08_punch_invalidates_running_guest => "G8",
    g09_refused_fallocate_changes_nothing => "G9",
    c01_in_place_conversion_keeps_one_copy => "C1",
    c02_discard_conversion_zeroes_and_frees => "C2",
    c03_private_pages_fault_in_the_host_view => "C3",
    c04_huge_page_granularity => "C4",
    c05_refused_conversions_change_nothing => "C5",
    c06_dontneed_does_not_free_punch_does => "C6",
    c07_guest_pages_out_of_swap => "C7",
}
