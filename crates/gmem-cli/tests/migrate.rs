//! Live migration between two `gmem run` processes over Unix sockets:
//! `guests/migrate-demo` (which rewrites its private and shared memory on
//! every pass, converting and discarding pages as it goes) is migrated
//! mid-run and must end exactly as an uninterrupted run does; and a
//! proxy between the two sides cuts, corrupts or watches the stream, so
//! that whatever fails, the source runs on and the destination stops with
//! an error without running anything.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gmem::BackingKind;
use gmem_testkit::{kvm_or_skip, on_backing};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One test's guests at a time: each runs two 64 MiB guests and their
/// VMMs, on a host of 2 cores; run together they only slow each other
/// (and a guest that ends before its migration could fail a round trip).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh path under the temp dir.
fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "gmem-mig-{}-{}-{name}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The guest's ELF on disk.
fn guest() -> PathBuf {
    let p = temp("migrate-demo.elf");
    std::fs::write(&p, gmem_guests::MIGRATE_DEMO).unwrap();
    p
}

fn key(byte: u8) -> PathBuf {
    let p = temp("key");
    std::fs::write(&p, [byte; 32]).unwrap();
    p
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The guest's own lines (`migrate-demo: ...`) in an output.
fn guest_lines(out: &Output) -> Vec<String> {
    text(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("migrate-demo:"))
        .map(str::to_owned)
        .collect()
}

fn backing_name(b: BackingKind) -> &'static str {
    match b {
        BackingKind::Hugetlb2M => "hugetlb-2m",
        _ => "memfd",
    }
}

thread_local! {
    /// Extra source arguments for this test's migrations (`--postcopy`).
    static EXTRA: std::cell::RefCell<Vec<&'static str>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Extra guest arguments for this test's runs, migrated or not
    /// (`--vcpus 2`).
    static GUEST: std::cell::RefCell<Vec<&'static str>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn source_cmd(elf: &Path, backing: BackingKind, to: &Path, key: Option<&Path>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gmem"));
    c.arg("run")
        .arg(elf)
        .args([
            "--mem",
            "64M",
            "--no-devices",
            "--backing",
            backing_name(backing),
        ])
        .args(GUEST.with(|g| g.borrow().clone()))
        .args(["--migrate-on", "SIGUSR2", "--to"])
        .arg(format!("unix:{}", to.display()));
    if let Some(k) = key {
        c.arg("--key").arg(k);
    }
    EXTRA.with(|e| c.args(e.borrow().iter()));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn dest_cmd(at: &Path, key: Option<&Path>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gmem"));
    c.args(["run", "--incoming"])
        .arg(format!("unix:{}", at.display()));
    if let Some(k) = key {
        c.arg("--key").arg(k);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid, which it has not reaped.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// The uninterrupted run's guest lines and status.
fn uninterrupted(elf: &Path, backing: BackingKind) -> (Vec<String>, Option<i32>) {
    let out = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .arg("run")
        .arg(elf)
        .args([
            "--mem",
            "64M",
            "--no-devices",
            "--backing",
            backing_name(backing),
        ])
        .args(GUEST.with(|g| g.borrow().clone()))
        .output()
        .unwrap();
    let lines = guest_lines(&out);
    assert!(
        lines.last().is_some_and(|l| l.contains("checksum")),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    (lines, out.status.code())
}

/// What the proxy does to the source's bytes.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Forward everything.
    None,
    /// Close both sides after this many bytes.
    CutAt(u64),
    /// Flip a bit of the byte at this offset.
    FlipAt(u64),
}

/// A proxy at `at` to `to`: forwards both ways, records what the source
/// sent, and applies `fault` to it.
fn proxy(at: PathBuf, to: PathBuf, fault: Fault) -> Arc<Mutex<Vec<u8>>> {
    let wire = Arc::new(Mutex::new(Vec::new()));
    let w = Arc::clone(&wire);
    let listener = UnixListener::bind(&at).unwrap();
    std::thread::spawn(move || {
        let Ok((mut src, _)) = listener.accept() else {
            return;
        };
        let Ok(mut dst) = UnixStream::connect(&to) else {
            return;
        };
        let (mut src_back, mut dst_in) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        // The answer, back to the source.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut dst_in, &mut src_back);
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut pos = 0u64;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &mut buf[..n];
            let end = pos + n as u64;
            let mut cut = false;
            let mut len = n;
            match fault {
                Fault::CutAt(at) if end >= at => {
                    len = (at - pos) as usize;
                    cut = true;
                }
                Fault::FlipAt(at) if (pos..end).contains(&at) => chunk[(at - pos) as usize] ^= 0x10,
                _ => {}
            }
            w.lock().unwrap().extend_from_slice(&chunk[..len]);
            if dst.write_all(&chunk[..len]).is_err() || cut {
                break;
            }
            pos = end;
        }
        let _ = dst.shutdown(std::net::Shutdown::Both);
        let _ = src.shutdown(std::net::Shutdown::Both);
    });
    wire
}

/// Runs a migration: the destination, a proxy with `fault`, the source,
/// `SIGUSR2` after `after`; both outputs and what crossed the wire.
fn migrate(
    elf: &Path,
    backing: BackingKind,
    src_key: Option<&Path>,
    dst_key: Option<&Path>,
    fault: Fault,
) -> (Output, Output, Vec<u8>) {
    let dsock = temp("dest.sock");
    let psock = temp("proxy.sock");
    let dest = dest_cmd(&dsock, dst_key).spawn().unwrap();
    wait_for(&dsock);
    let wire = proxy(psock.clone(), dsock, fault);
    let source = source_cmd(elf, backing, &psock, src_key).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    signal(&source, libc::SIGUSR2);
    let src = source.wait_with_output().unwrap();
    let dst = dest.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&psock);
    let bytes = wire.lock().unwrap().clone();
    (src, dst, bytes)
}

/// The source ran the guest to its end itself, and the destination
/// stopped with an error without running any of it.
fn assert_source_ran_on(src: &Output, dst: &Output, want: &(Vec<String>, Option<i32>), why: &str) {
    assert_eq!(
        (guest_lines(src), src.status.code()),
        want.clone(),
        "{why}: the source did not run on\n{}\n{}",
        text(&src.stdout),
        text(&src.stderr)
    );
    assert!(
        text(&src.stdout).contains("failed, and the guest ran on"),
        "{why}: {}",
        text(&src.stdout)
    );
    assert!(!dst.status.success(), "{why}: the destination succeeded");
    assert!(
        guest_lines(dst).is_empty(),
        "{why}: the destination ran the guest: {}",
        text(&dst.stdout)
    );
    assert!(
        text(&dst.stderr).contains("error"),
        "{why}: {}",
        text(&dst.stderr)
    );
}

/// A 24-bit hash of a window's first 8 bytes.
fn head(w: &[u8]) -> usize {
    let x = u64::from_le_bytes(w[..8].try_into().unwrap());
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize
}

fn round_trip(backing: BackingKind, test: &str, postcopy: bool) {
    if postcopy {
        EXTRA.with(|e| e.borrow_mut().push("--postcopy"));
    }
    round_trip_vcpus(backing, test);
}

/// [`round_trip`] with the run's arguments as set.
fn round_trip_vcpus(backing: BackingKind, test: &str) {
    if !kvm_or_skip(test) {
        return;
    }
    let _serial = serial();
    // Two 64 MiB guests at once.
    let pages = 2 * (64 << 20) / backing.page_size() + 8;
    let Some(_pool) = on_backing(test, backing, pages) else {
        return;
    };
    let elf = guest();
    let want = uninterrupted(&elf, backing);
    let k = key(7);
    let (src, dst, wire) = migrate(&elf, backing, Some(&k), Some(&k), Fault::None);
    assert_eq!(
        src.status.code(),
        Some(0),
        "{}\n{}",
        text(&src.stdout),
        text(&src.stderr)
    );
    assert!(
        text(&src.stdout).contains("migrated"),
        "{}",
        text(&src.stdout)
    );
    let mut lines = guest_lines(&src);
    lines.extend(guest_lines(&dst));
    assert_eq!(
        (lines, dst.status.code()),
        want,
        "the migrated run differs\nsource:\n{}\ndestination:\n{}\n{}",
        text(&src.stdout),
        text(&dst.stdout),
        text(&dst.stderr)
    );
    // The guest's code and data are private after launch: no 64-byte
    // window of its ELF crosses the socket in clear.
    let code = &gmem_guests::MIGRATE_DEMO;
    let windows: std::collections::HashSet<&[u8]> = code
        .chunks_exact(64)
        .filter(|w| w.iter().filter(|&&b| b != 0).count() > 32)
        .collect();
    assert!(!windows.is_empty());
    // A cheap first look (a bit per hash of a window's first 8 bytes:
    // the scan covers tens of MB in a debug build), then the whole window.
    let mut heads = vec![0u64; 1 << 18];
    for w in &windows {
        let h = head(w);
        heads[h / 64] |= 1 << (h % 64);
    }
    let leaked = wire.windows(64).any(|w| {
        let h = head(w);
        heads[h / 64] & (1 << (h % 64)) != 0 && windows.contains(w)
    });
    assert!(!leaked, "private guest code crossed the socket in clear");
}

#[test]
fn a_migrated_guest_ends_as_an_uninterrupted_one_on_memfd() {
    round_trip(BackingKind::Memfd, "migrate_memfd", false);
}

#[test]
fn a_guest_migrated_post_copy_ends_as_an_uninterrupted_one_on_memfd() {
    round_trip(BackingKind::Memfd, "migrate_postcopy_memfd", true);
}

#[test]
fn a_guest_migrated_post_copy_ends_as_an_uninterrupted_one_on_hugetlb_2m() {
    round_trip(BackingKind::Hugetlb2M, "migrate_postcopy_hugetlb_2m", true);
}

#[test]
fn a_migrated_guest_ends_as_an_uninterrupted_one_on_hugetlb_2m() {
    round_trip(BackingKind::Hugetlb2M, "migrate_hugetlb_2m", false);
}

#[test]
fn a_guest_of_two_vcpus_migrates_with_both_mid_work() {
    // vCPU 1 computes over its own memory while vCPU 0 does its passes:
    // the pause stops both, and both go on at the destination.
    GUEST.with(|g| g.borrow_mut().extend(["--vcpus", "2"]));
    round_trip_vcpus(BackingKind::Memfd, "migrate_two_vcpus");
}

#[test]
fn a_guest_of_two_vcpus_migrates_post_copy() {
    GUEST.with(|g| g.borrow_mut().extend(["--vcpus", "2"]));
    round_trip(BackingKind::Memfd, "migrate_two_vcpus_postcopy", true);
}

#[test]
fn whatever_breaks_the_stream_the_source_runs_on_and_the_destination_runs_nothing() {
    let test = "migrate_faults";
    if !kvm_or_skip(test) {
        return;
    }
    let _serial = serial();
    let elf = guest();
    let want = uninterrupted(&elf, BackingKind::Memfd);
    let k = key(7);
    let other = key(8);
    // Private pages and no key: the source refuses before it sends a
    // page; the destination gets a cut stream.
    let (src, dst, _) = migrate(&elf, BackingKind::Memfd, None, None, Fault::None);
    assert_source_ran_on(&src, &dst, &want, "no key");
    assert!(
        text(&src.stdout).contains("no key"),
        "{}",
        text(&src.stdout)
    );
    // The wrong key at the destination.
    let (src, dst, _) = migrate(
        &elf,
        BackingKind::Memfd,
        Some(&k),
        Some(&other),
        Fault::None,
    );
    assert_source_ran_on(&src, &dst, &want, "wrong key");
    // Cut in the header, in the first round, and at the very end.
    for at in [20, 3 << 20, u64::MAX] {
        let fault = if at == u64::MAX {
            // Everything but the end record's last bytes: measured first.
            let (_, _, wire) = migrate(&elf, BackingKind::Memfd, Some(&k), Some(&k), Fault::None);
            Fault::CutAt(wire.len() as u64 - 8)
        } else {
            Fault::CutAt(at)
        };
        let (src, dst, _) = migrate(&elf, BackingKind::Memfd, Some(&k), Some(&k), fault);
        // A cut measured on another run can land past its end: then the
        // migration may complete, which is as good.
        if at == u64::MAX && src.status.code() == Some(0) {
            continue;
        }
        assert_source_ran_on(&src, &dst, &want, &format!("{fault:?}"));
    }
    // A flipped bit in the first round.
    let (src, dst, _) = migrate(
        &elf,
        BackingKind::Memfd,
        Some(&k),
        Some(&k),
        Fault::FlipAt(1 << 20),
    );
    assert_source_ran_on(&src, &dst, &want, "a flipped bit");
}

#[test]
fn a_destination_killed_mid_stream_leaves_the_source_running() {
    let test = "migrate_kill_destination";
    if !kvm_or_skip(test) {
        return;
    }
    let _serial = serial();
    let elf = guest();
    let want = uninterrupted(&elf, BackingKind::Memfd);
    let k = key(7);
    let dsock = temp("dest.sock");
    let mut dest = dest_cmd(&dsock, Some(&k)).spawn().unwrap();
    wait_for(&dsock);
    let source = source_cmd(&elf, BackingKind::Memfd, &dsock, Some(&k))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    signal(&source, libc::SIGUSR2);
    std::thread::sleep(Duration::from_millis(20));
    dest.kill().unwrap();
    let _ = dest.wait();
    let src = source.wait_with_output().unwrap();
    // Killed before it answered, the destination ran nothing; the source
    // either finished the guest itself or (if the kill came after the
    // answer) handed it over.
    if src.status.code() == Some(0) && text(&src.stdout).contains("migrated") {
        return;
    }
    assert_eq!(
        (guest_lines(&src), src.status.code()),
        want,
        "{}",
        text(&src.stdout)
    );
}

#[test]
fn a_source_killed_mid_stream_leaves_the_destination_stopped_with_an_error() {
    let test = "migrate_kill_source";
    if !kvm_or_skip(test) {
        return;
    }
    let _serial = serial();
    let elf = guest();
    let k = key(7);
    let dsock = temp("dest.sock");
    let dest = dest_cmd(&dsock, Some(&k)).spawn().unwrap();
    wait_for(&dsock);
    let mut source = source_cmd(&elf, BackingKind::Memfd, &dsock, Some(&k))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    signal(&source, libc::SIGUSR2);
    std::thread::sleep(Duration::from_millis(15));
    source.kill().unwrap();
    let _ = source.wait();
    let dst = dest.wait_with_output().unwrap();
    // A guest run to its end exits with its own status (not 0).
    let ran = guest_lines(&dst)
        .last()
        .is_some_and(|l| l.contains("checksum"));
    if ran {
        // The whole stream and the go-ahead were in before the kill: the
        // guest ran there to its end.
        let want = uninterrupted(&elf, BackingKind::Memfd);
        assert_eq!(
            (guest_lines(&dst), dst.status.code()),
            want,
            "{}",
            text(&dst.stdout)
        );
    } else {
        assert!(guest_lines(&dst).is_empty(), "{}", text(&dst.stdout));
        assert!(text(&dst.stderr).contains("error"), "{}", text(&dst.stderr));
    }
}

#[test]
fn post_copy_cut_before_the_destination_runs_resumes_the_source_and_after_it_stops_both() {
    let test = "migrate_postcopy_faults";
    if !kvm_or_skip(test) {
        return;
    }
    let _serial = serial();
    EXTRA.with(|e| e.borrow_mut().push("--postcopy"));
    let elf = guest();
    let want = uninterrupted(&elf, BackingKind::Memfd);
    let k = key(7);
    // Cut in the first round: before the switch, the source runs on.
    let (src, dst, _) = migrate(
        &elf,
        BackingKind::Memfd,
        Some(&k),
        Some(&k),
        Fault::CutAt(3 << 20),
    );
    assert_source_ran_on(&src, &dst, &want, "post-copy, cut before the switch");
    // A clean post-copy run's stream, then one cut a few bytes before its
    // end: the destination may run the guest by then; either way, no side
    // ends with a wrong result, and a side that fails says so.
    let (_, _, wire) = migrate(&elf, BackingKind::Memfd, Some(&k), Some(&k), Fault::None);
    let (src, dst, _) = migrate(
        &elf,
        BackingKind::Memfd,
        Some(&k),
        Some(&k),
        Fault::CutAt(wire.len() as u64 - 64),
    );
    let src_lines = guest_lines(&src);
    let dst_lines = guest_lines(&dst);
    let mut lines = src_lines.clone();
    lines.extend(dst_lines.iter().cloned());
    // The guest's status is its exit code: a destination that ran it to
    // its end printed its checksum (and exits with the guest's status).
    if dst_lines.last().is_some_and(|l| l.contains("checksum")) {
        assert_eq!((lines, dst.status.code()), want, "{}", text(&dst.stdout));
    } else if src.status.code() == want.1 && src_lines == want.0 {
        // Cut before the switch in this run: the source ran on.
    } else {
        // Cut after the destination took over: both stop with an error,
        // neither prints a checksum.
        assert!(
            !src.status.success(),
            "{}\ndestination:\n{}\n{}",
            text(&src.stdout),
            text(&dst.stdout),
            text(&dst.stderr)
        );
        assert!(text(&src.stderr).contains("lost") || text(&dst.stderr).contains("error"));
        assert!(!lines.iter().any(|l| l.contains("checksum")), "{lines:?}");
    }
}
