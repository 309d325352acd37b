//! `gmem bench`'s virtio-blk rows, run once on memfd: confidential beside
//! plain, with their limits and goals in the report. Counts are checked,
//! never times.

use gmem::BackingKind;
use gmem_bench::{BenchOptions, run};
use gmem_testkit::{kvm_or_skip, on_backing};

#[test]
fn the_virtio_rows_carry_ratios_limits_and_goals() {
    if !kvm_or_skip("bench virtio rows")
        || on_backing("bench virtio rows", BackingKind::Memfd, 0).is_none()
    {
        return;
    }
    let opts = BenchOptions {
        backings: vec![BackingKind::Memfd],
        size: 4 << 20,
        reps: 1,
        only: vec![
            "virtio-blk exits per MiB, 1 MiB".into(),
            "virtio-blk sequential read, 1 MiB requests".into(),
            "virtio-blk random read, 4 KiB requests, 16 in flight".into(),
        ],
        quick: false,
        worker: None,
    };
    let report = run(&opts, &mut |_, _, _| {}).unwrap();
    let row = |metric: &str| {
        report
            .rows
            .iter()
            .find(|r| r.metric == metric && r.subject == "memfd")
            .unwrap_or_else(|| panic!("no {metric} row"))
    };
    // One notification per 1 MiB request, on both sides: the goal is met
    // by count.
    let exits = row("virtio-blk exits per MiB, 1 MiB sequential reads");
    assert_eq!(exits.gmem.unwrap().median, 1.0);
    assert_eq!(exits.raw.unwrap().median, 1.0);
    assert_eq!(exits.targets.len(), 1);
    assert_eq!(exits.targets[0].text, "≤ 2 exits/MiB");
    assert!(exits.targets[0].met);
    // A throughput row: both sides, the ratio, the ratio goal and the
    // absolute one, and the exit-bound limit of each side.
    let read = row("virtio-blk sequential read, 1 MiB requests");
    assert!(read.gmem.is_some() && read.raw.is_some() && read.ratio.is_some());
    assert_eq!(read.goal.as_ref().unwrap().text, "≥ 0.8× raw");
    assert_eq!(read.targets[0].text, "≥ 1024 MiB/s");
    let limit = read.limit.as_ref().expect("a limit");
    assert_eq!(limit.gmem_exits_per_mib, Some(1.0));
    assert_eq!(limit.raw_exits_per_mib, Some(1.0));
    assert!(limit.gmem.is_some_and(|l| l > 0.0) && limit.gmem_exit_us.is_some_and(|u| u > 0.0));
    // Sixteen requests per notification: 16 exits per MiB at 4 KiB.
    let batched = row("virtio-blk random read, 4 KiB requests, 16 in flight");
    let limit = batched.limit.as_ref().expect("a limit");
    assert_eq!(limit.gmem_exits_per_mib, Some(16.0));
    assert_eq!(limit.raw_exits_per_mib, Some(16.0));
    assert_eq!(
        report
            .rows
            .iter()
            .filter(|r| r.metric.starts_with("virtio"))
            .count(),
        4
    );
}
