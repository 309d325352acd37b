//! The `gmem` binary as users run it: status codes, output, and clear errors
//! for bad input.

use std::process::{Command, Output};

use gmem_testkit::kvm_or_skip;

fn gmem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .output()
        .expect("run gmem")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_without_a_payload_runs_the_demo_and_reports() {
    if !kvm_or_skip("gmem run") {
        return;
    }
    let out = gmem(&["run"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for needle in [
        "a secret is in private memory; this line came through virtio-console over shared bounce buffers",
        "read through virtio-blk (128 sectors): the gmem demo disk",
        "the device was refused the private page: Err(Errno(-14))",
        "device        virtio-console: 0 refused",
        "device        virtio-blk: 0 refused",
        "--- gmem run report",
        "backing",
        "populated",
        "conversions",
        "discards",
        "exits",
        "wall time",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in\n{stdout}");
    }
}

#[test]
fn run_json_prints_the_report_as_json() {
    if !kvm_or_skip("gmem run --json") {
        return;
    }
    let out = gmem(&[
        "run",
        "--json",
        "--vcpus",
        "2",
        "--backing",
        "memfd",
        "--conversion",
        "discard",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report["status"], 0);
    assert_eq!(report["backing"], "memfd");
    assert_eq!(report["vcpus"], 2);
    assert_eq!(report["policy"], "discard");
    // The bounce pool, shared once by vCPU 0 (the other vCPU waits).
    assert_eq!(report["conversions"]["to_shared"], 1);
    assert_eq!(report["devices"].as_array().map(Vec::len), Some(2));
    assert!(report["populated_pages"].as_u64().is_some());
    assert!(
        text(&out.stderr).contains("through virtio-console"),
        "the console goes to stderr under --json"
    );
}

#[test]
fn run_exits_with_the_guest_status() {
    if !kvm_or_skip("gmem run status") {
        return;
    }
    // mov eax, 5; out 0xf4, eax
    let payload = [0xb8, 5, 0, 0, 0, 0xe7, 0xf4];
    let path = std::env::temp_dir().join(format!("gmem-status-{}.bin", std::process::id()));
    std::fs::write(&path, payload).unwrap();
    let out = gmem(&["run", path.to_str().unwrap(), "--backing", "memfd"]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
}

#[test]
fn bad_input_gets_a_clear_error_and_a_failure_status() {
    let cases: [(&[&str], &str); 6] = [
        (&["run", "--mem", "lots"], "invalid size \"lots\""),
        (
            &["run", "--mem", "1M", "--backing", "memfd"],
            "must be at least",
        ),
        (
            &["run", "--mem", "3M", "--backing", "hugetlb-2m"],
            "hugetlb-2m page size",
        ),
        (
            &["run", "--backing", "floppy"],
            "unknown backing \"floppy\"",
        ),
        (
            &["run", "--vcpus", "0", "--backing", "memfd"],
            "between 1 and 64",
        ),
        (
            &["run", "/nonexistent/payload.bin", "--backing", "memfd"],
            "reading the payload /nonexistent/payload.bin",
        ),
    ];
    for (args, needle) in cases {
        let out = gmem(args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(needle),
            "{args:?}: no {needle:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

#[test]
fn run_refuses_payloads_that_do_not_fit() {
    if !kvm_or_skip("gmem run payload") {
        return;
    }
    let path = std::env::temp_dir().join(format!("gmem-big-{}.bin", std::process::id()));
    std::fs::write(&path, vec![0x90u8; 5 << 20]).unwrap();
    let big = gmem(&[
        "run",
        path.to_str().unwrap(),
        "--backing",
        "memfd",
        "--mem",
        "4M",
    ]);
    std::fs::write(&path, [0xf4u8]).unwrap();
    let low = gmem(&[
        "run",
        path.to_str().unwrap(),
        "--backing",
        "memfd",
        "--load",
        "0x1000",
    ]);
    let high = gmem(&[
        "run",
        path.to_str().unwrap(),
        "--backing",
        "memfd",
        "--load",
        "0x10000000",
    ]);
    std::fs::write(&path, []).unwrap();
    let empty = gmem(&["run", path.to_str().unwrap(), "--backing", "memfd"]);
    let _ = std::fs::remove_file(&path);
    for (what, out, needle) in [
        ("larger than RAM", big, "does not fit"),
        ("below the payload area", low, "does not fit"),
        ("outside RAM", high, "does not fit"),
        ("empty", empty, "payload is empty"),
    ] {
        assert!(!out.status.success(), "{what}: succeeded");
        assert!(
            text(&out.stderr).contains(needle),
            "{what}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn probe_json_has_every_field() {
    let out = gmem(&["probe", "--json"]);
    assert!(out.status.success());
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    for field in ["kernel", "kvm_present", "huge_pages", "backings"] {
        assert!(p.get(field).is_some(), "no {field}");
    }
    if p["kvm_present"] == true {
        let kvm = &p["kvm"];
        for field in [
            "api_version",
            "guest_memfd",
            "guest_memfd_flags",
            "vm_types",
            "memory_attributes",
            "pre_fault_memory",
            "exit_hypercall_mask",
        ] {
            assert!(kvm.get(field).is_some(), "no kvm.{field}");
        }
        assert!(kvm["vm_types"][0].get("guest_memfd_flags").is_some());
    }
    let backings: Vec<&str> = p["backings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backing"].as_str().unwrap())
        .collect();
    assert_eq!(
        backings,
        ["guest-memfd", "memfd", "hugetlb-2m", "hugetlb-1g"]
    );
}

#[test]
fn selftest_prints_one_line_per_check_and_the_totals() {
    let out = gmem(&["selftest", "--backing", "memfd", "--check", "T11"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("T11 fallocate [memfd, flags 0x0]: ok"),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().last(),
        Some("3 passed, 0 failed, 0 skipped"),
        "{stdout}"
    );
    let bad = gmem(&["selftest", "--check", "T99"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("no check \"T99\"; the ids are T1..T20, G1..G9, C1..C7"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn run_without_dev_kvm_says_so() {
    // A private mount namespace with an empty /dev: needs root and unshare(1).
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run",
        env!("CARGO_BIN_EXE_gmem")
    );
    let out = match Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
    {
        Ok(out) if !text(&out.stderr).contains("unshare failed") => out,
        _ => {
            eprintln!("run_without_dev_kvm_says_so: skipped: needs root and unshare(1)");
            return;
        }
    };
    let stderr = text(&out.stderr);
    if stderr.contains("mount:") {
        eprintln!("run_without_dev_kvm_says_so: skipped: cannot mount here: {stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot open /dev/kvm"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The worker protocol of `gmem bench`'s across-processes rows: `ready`
/// with six figures, then `done` once started; a parent that goes away
/// before starting it gets an error, not a run.
#[test]
fn bench_worker_speaks_its_protocol() {
    if !kvm_or_skip("gmem bench-worker") {
        return;
    }
    let run = |input: &[u8]| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gmem"))
            .args(["bench-worker", "10"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(b"go\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let ready: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(ready[0], "ready", "{stdout}");
    assert_eq!(ready.len(), 7, "{stdout}");
    assert!(
        ready[1..].iter().all(|w| w.parse::<u64>().is_ok()),
        "{stdout}"
    );
    assert_eq!(lines[1], "done");
    let out = run(b"");
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("error ") && l.contains("closed stdin")),
        "{stdout}"
    );
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bench_runs_at_a_tiny_size() {
    if !kvm_or_skip("gmem bench") {
        return;
    }
    let svg = std::env::temp_dir().join(format!("gmem-bench-{}.svg", std::process::id()));
    let out = gmem(&[
        "bench",
        "--backing",
        "memfd",
        "--size",
        "4M",
        "--reps",
        "1",
        "--only",
        "populate",
        "--only",
        "fault-in",
        "--only",
        "discard",
        "--only",
        "launch, 2 MiB",
        "--only",
        "conversion round trips",
        "--only",
        "bulk conversion",
        "--only",
        "8 VM processes",
        "--json",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let rows = report["rows"].as_array().unwrap();
    for metric in [
        "populate",
        "host fault-in",
        "discard, unmapped",
        "discard, host-mapped",
        "guest fault-in (CPL3)",
        "launch, 2 MiB",
        "conversion round trips (doorbell)",
        "bulk conversion",
    ] {
        let row = rows
            .iter()
            .find(|r| r["metric"] == metric && r["subject"] == "memfd")
            .unwrap_or_else(|| panic!("no {metric} row for memfd"));
        assert!(row["gmem"]["median"].as_f64().unwrap() > 0.0, "{metric}");
        assert!(row["raw"]["median"].as_f64().unwrap() > 0.0, "{metric}");
    }
    assert!(
        rows.iter().any(|r| r["subject"] == "anon-thp"),
        "the THP baseline is measured"
    );
    let procs = rows
        .iter()
        .find(|r| r["metric"] == "8 VM processes, aggregate round trips")
        .expect("the across-processes row");
    assert!(procs["gmem"]["median"].as_f64().unwrap() > 0.0);
    let chart = std::fs::read_to_string(&svg).expect("the chart");
    let _ = std::fs::remove_file(&svg);
    assert!(chart.starts_with("<svg") && chart.contains("populate"));
    let bad = gmem(&["bench", "--size", "3M"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("multiple of 2 MiB"),
        "{}",
        text(&bad.stderr)
    );
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("gmem-cli-snap-{name}-{}", std::process::id()))
}

/// The lines of a run's stdout the guest printed (before the report),
/// without the one about the snapshot request.
fn guest_lines(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .take_while(|l| !l.starts_with("--- gmem run report"))
        .filter(|l| {
            !(l.starts_with("snapshot-demo: no snapshot")
                || l.starts_with("snapshot-demo: snapshot taken")
                || l.starts_with("snapshot-demo: resumed"))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn run_snapshot_then_restore_prints_what_an_uninterrupted_run_prints() {
    if !kvm_or_skip("gmem run --snapshot") {
        return;
    }
    let elf = temp("demo.elf");
    std::fs::write(&elf, gmem_guests::SNAPSHOT_DEMO).unwrap();
    let elf = elf.to_str().unwrap();
    let (snap, key, short_key, order) = (
        temp("s.snap"),
        temp("k.key"),
        temp("short.key"),
        temp("p.order"),
    );
    let snap_s = snap.to_str().unwrap();
    std::fs::write(&key, [9u8; 32]).unwrap();
    std::fs::write(&short_key, [9u8; 31]).unwrap();
    let common = ["run", elf, "--backing", "memfd", "--mem", "32M"];

    let whole = gmem(&common);
    let whole_out = text(&whole.stdout);
    assert!(whole_out.contains("no snapshot (-38)"), "{whole_out}");

    // Without --key, a guest with private pages is not snapshotted.
    let mut args = common.to_vec();
    args.extend(["--snapshot", snap_s]);
    let refused = gmem(&args);
    let err = text(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("--key") && err.contains("--omit-private"),
        "{err}"
    );
    // A key file must be 32 bytes.
    args.extend(["--key", short_key.to_str().unwrap()]);
    let bad_key = gmem(&args);
    let err = text(&bad_key.stderr);
    assert!(!bad_key.status.success());
    assert!(
        err.contains("has 31 bytes") && err.contains("exactly 32"),
        "{err}"
    );

    let mut args = common.to_vec();
    args.extend(["--snapshot", snap_s, "--key", key.to_str().unwrap()]);
    let first = gmem(&args);
    let first_out = text(&first.stdout);
    assert!(first.status.success(), "{first_out}{}", text(&first.stderr));
    assert!(
        first_out.contains("the run stopped after the snapshot"),
        "{first_out}"
    );

    for extra in [
        vec![],
        vec!["--lazy", "--record-prefetch", order.to_str().unwrap()],
        vec!["--lazy", "--prefetch", order.to_str().unwrap()],
        vec!["--lazy", "--no-prefetch"],
    ] {
        let mut args = vec!["restore", snap_s, "--key", key.to_str().unwrap()];
        args.extend(extra.iter().copied());
        let restored = gmem(&args);
        let out = text(&restored.stdout);
        assert_eq!(
            restored.status.code(),
            whole.status.code(),
            "{extra:?}: {out}"
        );
        let mut lines = guest_lines(&first_out);
        lines.extend(guest_lines(&out));
        assert_eq!(lines, guest_lines(&whole_out), "{extra:?}");
        assert!(out.contains("restored      "), "{out}");
    }
    // No key: the error says what to pass.
    let no_key = gmem(&["restore", snap_s]);
    let err = text(&no_key.stderr);
    assert!(!no_key.status.success());
    assert!(err.contains("--key"), "{err}");
    for p in [&snap, &key, &short_key, &order] {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_file(elf);
}
