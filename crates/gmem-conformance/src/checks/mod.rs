//! The checks, by catalogue number. T-numbers are the upstream selftests'
//! (spec §6); G-numbers are gmem's own.

mod bind;
mod convert;
mod file;
mod guest;
mod kernel;

use crate::{Check, Variants};

macro_rules! check {
    ($id:literal, $name:literal, $variants:ident, $run:path) => {
        Check {
            id: $id,
            name: $name,
            variants: Variants::$variants,
            run: $run,
        }
    };
}

pub(crate) static ALL: &[Check] = &[
    check!("T1", "guest_memfd_flags", Once, file::t1_flags),
    check!("T2", "create_multiple", PerFlags, file::t2_create_multiple),
    check!(
        "T3",
        "create_invalid_sizes",
        PerFlags,
        file::t3_invalid_sizes
    ),
    check!("T4", "file_read_write", PerFlags, file::t4_read_write),
    check!("T5", "mmap_supported", Once, file::t5_mmap_supported),
    check!("T6", "fault_overflow", Once, file::t6_fault_overflow),
    check!("T7", "fault_private", PerFlags, file::t7_fault_private),
    check!("T8", "mmap_cow", PerFlags, file::t8_mmap_cow),
    check!(
        "T9",
        "mmap_not_supported",
        PerFlags,
        file::t9_mmap_not_supported
    ),
    check!("T10", "file_size", PerFlags, file::t10_file_size),
    check!("T11", "fallocate", PerFlags, file::t11_fallocate),
    check!(
        "T12",
        "invalid_punch_hole",
        PerFlags,
        file::t12_invalid_punch_hole
    ),
    check!("T13", "guest_memfd_guest", Once, guest::t13_guest),
    check!(
        "T14",
        "invalid_memory_region_flags",
        Once,
        bind::t14_invalid_region_flags
    ),
    check!(
        "T15",
        "add_private_memory_region",
        Once,
        bind::t15_add_private_region
    ),
    check!(
        "T16",
        "add_overlapping_private_memory_regions",
        Once,
        bind::t16_overlapping_regions
    ),
    check!(
        "T17",
        "private_mem_conversions",
        Once,
        kernel::t17_conversions
    ),
    check!(
        "T18",
        "private_mem_kvm_exits_gmem_slot",
        Once,
        kernel::t18_exits_gmem_slot
    ),
    check!(
        "T19",
        "private_mem_kvm_exits_plain_slot",
        Once,
        kernel::t19_exits_plain_slot
    ),
    check!("T20", "pre_fault_memory", Once, kernel::t20_pre_fault),
    check!("G1", "populated_ranges_are_real", Once, file::g1_populated),
    check!(
        "G2",
        "punch_reports_freed_and_zeroed",
        Once,
        file::g2_punch_report
    ),
    check!("G3", "size_is_immutable", PerFlags, file::g3_size_immutable),
    check!(
        "G4",
        "hugetlb_pool_shortage_is_reported",
        Once,
        file::g4_pool_shortage
    ),
    check!(
        "G5",
        "mappings_out_of_dumps_and_forks",
        Once,
        file::g5_dontdump_dontfork
    ),
    check!(
        "G6",
        "bind_rules_refuse_and_change_nothing",
        Once,
        bind::g6_bind_rules
    ),
    check!("G7", "drop_in_any_order", Once, bind::g7_drop_orders),
    check!(
        "G8",
        "punch_invalidates_running_guest",
        Once,
        guest::g8_punch_invalidates
    ),
    check!(
        "G9",
        "refused_fallocate_changes_nothing",
        Once,
        file::g9_refusals_change_nothing
    ),
    check!(
        "C1",
        "in_place_conversion_keeps_one_copy",
        Once,
        convert::c1_in_place_keeps_one_copy
    ),
    check!(
        "C2",
        "discard_conversion_zeroes_and_frees",
        Once,
        convert::c2_discard_zeroes_and_frees
    ),
    check!(
        "C3",
        "private_pages_fault_in_the_host_view",
        Once,
        convert::c3_private_pages_fault
    ),
    check!(
        "C4",
        "huge_page_granularity",
        Once,
        convert::c4_huge_page_granularity
    ),
    check!(
        "C5",
        "refused_conversions_change_nothing",
        Once,
        convert::c5_refusals_change_nothing
    ),
    check!(
        "C6",
        "dontneed_does_not_free_punch_does",
        Once,
        convert::c6_dontneed_does_not_free
    ),
    check!(
        "C7",
        "guest_pages_out_of_swap",
        Once,
        convert::c7_out_of_swap
    ),
];
