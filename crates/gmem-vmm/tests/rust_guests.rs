//! Guests written in Rust (`guests/`, built from source by `gmem-guests`),
//! loaded as ELF files and run on every backing; and the ELF loader's bad
//! inputs, each a clear error that writes nothing.

use gmem::{BackingKind, Policy};
use gmem_testkit::{kvm_or_skip, on_backing};
use gmem_vmm::{Console, Machine, MachineConfig, VmmError};

fn ram(backing: BackingKind) -> u64 {
    gmem_testkit::ram_for(backing, 16 << 20)
}

#[test]
fn hello_runs_on_every_backing_and_policy() {
    for backing in BackingKind::ALL {
        for policy in [Policy::InPlace, Policy::Discard] {
            if !kvm_or_skip("hello") {
                return;
            }
            let Some(_pool) = on_backing("hello", backing, ram(backing) / backing.page_size())
            else {
                continue;
            };
            let config = MachineConfig {
                policy,
                ..MachineConfig::new(backing, ram(backing))
            };
            let mut m = Machine::new(config).unwrap();
            let entry = m.load_elf(gmem_guests::HELLO).unwrap();
            assert_eq!(entry, 0x10_0000);
            let (console, out) = Console::buffer();
            let report = m
                .run_to_end(&console)
                .unwrap_or_else(|e| panic!("{backing} {policy}: {e}"));
            let out = String::from_utf8(out.lock().unwrap().clone()).unwrap();
            assert_eq!(report.status, 0, "{backing} {policy}: {out}");
            assert!(
                out.contains("hello from a Rust guest: vCPU 0") && out.contains("guest ABI 3"),
                "{out}"
            );
        }
    }
}

#[test]
fn elf_files_that_do_not_fit_are_refused_by_segment() {
    if !kvm_or_skip("elf refusals") || on_backing("elf refusals", BackingKind::Memfd, 0).is_none() {
        return;
    }
    let mut m = Machine::new(MachineConfig::new(BackingKind::Memfd, 4 << 20)).unwrap();
    // Truncated: the segment's bytes are cut off.
    let e = m.load_elf(&gmem_guests::HELLO[..0x1100]).unwrap_err();
    assert!(matches!(e, VmmError::Elf(_)), "{e}");
    assert!(format!("{e:#}").contains("ELF"), "{e}");
    // Not ELF at all.
    assert!(matches!(
        m.load_elf(b"\x7fELF garbage"),
        Err(VmmError::Elf(_))
    ));
    // A segment over the boot structures: the last PT_LOAD (data, not the
    // code the entry point is in) moved to 4 KiB.
    let mut low = gmem_guests::HELLO.to_vec();
    let phoff = u64::from_le_bytes(low[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(low[56..58].try_into().unwrap()) as usize;
    let last_load = (0..phnum)
        .map(|i| phoff + i * 0x38)
        .rfind(|&ph| low[ph..ph + 4] == 1u32.to_le_bytes())
        .unwrap();
    low[last_load + 24..last_load + 32].copy_from_slice(&0x1000u64.to_le_bytes());
    let e = m.load_elf(&low).unwrap_err();
    assert!(
        matches!(
            e,
            VmmError::SegmentOverBootStructures {
                addr: 0x1000,
                what: "the page tables",
                taken_start: 0x1000,
                ..
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("segment")
            && msg.contains("[0x1000, 0x4000)")
            && msg.contains("-Ttext=0x100000"),
        "{msg}"
    );
    // Past the RAM payloads may use (the stacks are above).
    let mut high = gmem_guests::HELLO.to_vec();
    high[last_load + 24..last_load + 32].copy_from_slice(&(4u64 << 20).to_le_bytes());
    let e = m.load_elf(&high).unwrap_err();
    assert!(matches!(e, VmmError::SegmentOutsideRam { .. }), "{e}");
    // The machine is still unlaunched: a good file loads now.
    m.load_elf(gmem_guests::HELLO).unwrap();
    assert!(matches!(
        m.load_elf(gmem_guests::HELLO),
        Err(VmmError::AlreadyLaunched)
    ));
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn disk(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("gmem-{name}-{}.img", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn machine_with_devices(
    backing: BackingKind,
    disk_path: &std::path::Path,
    readonly: bool,
) -> (Machine, std::sync::Arc<std::sync::Mutex<Vec<u8>>>, Console) {
    let mut m = Machine::new(MachineConfig::new(backing, ram(backing))).unwrap();
    let (console, out) = Console::buffer();
    m.add_device(Box::new(gmem_vmm::virtio::console::VirtioConsole::new(
        console.clone(),
        Vec::new(),
    )))
    .unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(disk_path)
        .unwrap();
    m.add_device(Box::new(
        gmem_vmm::virtio::blk::VirtioBlk::new(file, readonly).unwrap(),
    ))
    .unwrap();
    (m, out, console)
}

#[test]
fn the_virtio_demo_talks_through_virtio_console_and_blk() {
    for backing in BackingKind::ALL {
        if !kvm_or_skip("virtio demo") {
            return;
        }
        let Some(_pool) = on_backing("virtio demo", backing, ram(backing) / backing.page_size())
        else {
            continue;
        };
        let mut image = b"gmem demo disk: read through virtio-blk\n".to_vec();
        image.resize(64 << 10, 0);
        let path = disk("demo", &image);
        let (mut m, out, console) = machine_with_devices(backing, &path, true);
        m.load_elf(gmem_guests::VIRTIO_DEMO).unwrap();
        let report = m
            .run_to_end(&console)
            .unwrap_or_else(|e| panic!("{backing}: {e}"));
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(report.status, 0, "{backing}: {text}");
        assert!(
            text.contains("came through virtio-console over shared bounce buffers"),
            "{text}"
        );
        assert!(
            text.contains("read through virtio-blk (128 sectors): gmem demo disk"),
            "{text}"
        );
        assert!(
            text.contains("refused the private page: Err(Errno(-14))"),
            "{text}"
        );
        assert_eq!(report.devices.len(), 2);
        assert!(
            report.devices.iter().all(|d| d.refused == 0),
            "{:?}",
            report.devices
        );
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn disk_sum_matches_the_host_and_writes_its_result_back() {
    if !kvm_or_skip("disk-sum") {
        return;
    }
    let mut image = vec![0u8; 1 << 20];
    let mut x = 0x1234_5678_9abc_def0u64;
    for b in image.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let want = fnv1a(&image[..image.len() - 512]);
    let path = disk("sum", &image);
    for backing in BackingKind::ALL {
        let Some(_pool) = on_backing("disk-sum", backing, ram(backing) / backing.page_size())
        else {
            continue;
        };
        let (mut m, out, console) = machine_with_devices(backing, &path, false);
        m.load_elf(gmem_guests::DISK_SUM).unwrap();
        let report = m
            .run_to_end(&console)
            .unwrap_or_else(|e| panic!("{backing}: {e}"));
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(report.status, 0, "{backing}: {text}");
        assert!(
            text.contains(&format!("fnv1a64 {want:016x}")),
            "{backing}: {text}"
        );
        let back = std::fs::read(&path).unwrap();
        let tail = &back[back.len() - 512..];
        assert_eq!(&tail[..24], format!("fnv1a64 {want:016x}").as_bytes());
    }
    let _ = std::fs::remove_file(path);
}

#[test]
fn the_attacker_is_refused_every_time_and_the_vm_lives() {
    for backing in BackingKind::ALL {
        if !kvm_or_skip("attacker") {
            return;
        }
        let Some(_pool) = on_backing("attacker", backing, ram(backing) / backing.page_size())
        else {
            continue;
        };
        let mut image = b"attacker disk".to_vec();
        image.resize(64 << 10, 0);
        let path = disk(&format!("attack-{backing}"), &image);
        let (mut m, out, console) = machine_with_devices(backing, &path, false);
        m.load_elf(gmem_guests::ATTACKER).unwrap();
        let report = m
            .run_to_end(&console)
            .unwrap_or_else(|e| panic!("{backing}: {e}"));
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(
            report.status, 0,
            "{backing}: attack {} was not refused\n{text}",
            report.status
        );
        assert!(
            text.contains("every attempt was refused, and the VM lives"),
            "{text}"
        );
        let blk = report
            .devices
            .iter()
            .find(|d| d.name == "virtio-blk")
            .unwrap();
        assert!(
            blk.refused >= 9,
            "{backing}: the report counts {} refusals",
            blk.refused
        );
        assert!(blk.refusals.iter().all(|r| r.device == "virtio-blk"));
        let _ = std::fs::remove_file(path);
    }
}

/// A payload linked the usual quick way, `ld -Ttext=0x100000 -e _start`: the
/// linker puts the ELF headers in a read-only segment at 0xff000, below the
/// payload floor and clear of the boot structures, and the payload runs as
/// its flat twin does.
#[test]
fn elf_files_as_ld_links_them_run_like_their_flat_twins() {
    use gmem_vmm::abi::{PORT_EXIT, PORT_SERIAL};
    use iced_x86::code_asm::*;

    let test = "ld -Ttext";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("gmem-ld-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(dx, u32::from(PORT_SERIAL)).unwrap();
    for b in b"linked\n" {
        a.mov(al, u32::from(*b)).unwrap();
        a.out(dx, al).unwrap();
    }
    a.mov(eax, 42).unwrap();
    a.out(u32::from(PORT_EXIT), eax).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x10_0000).unwrap();
    let bytes: Vec<String> = code.iter().map(|b| format!("{b:#04x}")).collect();
    let source = format!(
        ".globl _start\n.text\n_start:\n.byte {}\n.data\n.quad 1\n",
        bytes.join(",")
    );
    std::fs::write(dir.join("p.s"), source).unwrap();
    let tool = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .current_dir(&dir)
            .output()
    };
    match tool("as", &["p.s", "-o", "p.o"]) {
        Ok(out) if out.status.success() => {}
        other => {
            eprintln!("{test}: skipped: needs binutils' as and ld: {other:?}");
            return;
        }
    }
    let out = tool("ld", &["-Ttext=0x100000", "-e", "_start", "p.o", "-o", "p"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let elf = std::fs::read(dir.join("p")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let program = gmem_vmm::elf::parse(&elf).unwrap();
    assert!(
        program.segments.iter().any(|s| s.addr < 0x10_0000),
        "ld put no segment below 0x100000: {:?}",
        program.segments.iter().map(|s| s.addr).collect::<Vec<_>>()
    );
    let mut m = Machine::new(MachineConfig::new(BackingKind::Memfd, 4 << 20)).unwrap();
    m.load_elf(&elf).unwrap();
    let (console, out) = Console::buffer();
    let linked = (
        m.run_to_end(&console).unwrap().status,
        out.lock().unwrap().clone(),
    );
    let mut m = Machine::new(MachineConfig::new(BackingKind::Memfd, 4 << 20)).unwrap();
    m.load(&code, 0x10_0000, 0x10_0000).unwrap();
    let (console, out) = Console::buffer();
    let flat = (
        m.run_to_end(&console).unwrap().status,
        out.lock().unwrap().clone(),
    );
    assert_eq!(linked, flat);
    assert_eq!(linked, (42, b"linked\n".to_vec()));
}

/// Runs `guests/blk-bench` with `plan` in sector 0 of `path`, on RAM that
/// is all shared if `plain`; its status, and the exits between its marks 1
/// and 2 (around its requests). Marks are outs to port 0x10, which the
/// machine refuses as unknown and the guest runs on after.
fn blk_bench(backing: BackingKind, path: &std::path::Path, plan: &[u8], plain: bool) -> (i32, u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    file.write_all_at(plan, 0).unwrap();
    let mut config = MachineConfig::new(backing, ram(backing));
    if plain {
        config.initial = gmem::Attribute::Shared;
    }
    let mut m = Machine::new(config).unwrap();
    m.add_device(Box::new(
        gmem_vmm::virtio::blk::VirtioBlk::new(file, false).unwrap(),
    ))
    .unwrap();
    m.load_elf(gmem_guests::BLK_BENCH).unwrap();
    let (console, out) = Console::buffer();
    let (mut exits, mut marks) = (0u64, Vec::new());
    loop {
        match m.step(0, &console) {
            Ok(gmem_vmm::Step::Continue(_)) => exits += 1,
            Ok(gmem_vmm::Step::Interrupted) => {}
            Ok(gmem_vmm::Step::Exit(status)) => {
                let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
                assert_eq!(
                    marks.len(),
                    if status == 0 { 4 } else { marks.len() },
                    "{text}"
                );
                let window = match marks.as_slice() {
                    [(1, a), (2, b), ..] => b - a,
                    _ => 0,
                };
                return (status, window);
            }
            Ok(gmem_vmm::Step::Halted) => panic!("blk-bench halted"),
            Err(VmmError::UnknownPort {
                port: 0x10,
                exit: gmem_vmm::Exit::IoOut { value, .. },
                ..
            }) => marks.push((value, exits)),
            Err(e) => panic!("{backing}: {e}"),
        }
    }
}

/// blk-bench's plan: `mode`, `requests` of `request` bytes over the 3 MiB
/// of data from sector 2048, the buffer in the pool if `pool`, `depth` in
/// flight per notification.
fn blk_plan(mode: u32, request: u32, requests: u32, pool: bool, depth: u32) -> [u8; 512] {
    let mut s = [0u8; 512];
    s[..8].copy_from_slice(b"GMEMBLK1");
    s[8..12].copy_from_slice(&mode.to_le_bytes());
    s[12..16].copy_from_slice(&request.to_le_bytes());
    s[16..20].copy_from_slice(&requests.to_le_bytes());
    s[20..24].copy_from_slice(&10u32.to_le_bytes());
    s[24..32].copy_from_slice(&2048u64.to_le_bytes());
    s[32..40].copy_from_slice(&(6144u64).to_le_bytes());
    s[40..48].copy_from_slice(&7u64.to_le_bytes());
    s[48..52].copy_from_slice(&u32::from(pool).to_le_bytes());
    s[52..56].copy_from_slice(&depth.to_le_bytes());
    s
}

/// The bench's guest reads what the disk holds and writes what it means
/// to, through the bounce pool, a SharedBuffer and (RAM all shared) its
/// own buffer, with one exit (the notification) per request, or per batch
/// of requests in flight.
#[test]
fn blk_bench_moves_the_right_bytes_at_one_exit_a_request() {
    if !kvm_or_skip("blk-bench") {
        return;
    }
    // 1 MiB for the plan, then 3 MiB whose every word holds its offset.
    let mut image = vec![0u8; 4 << 20];
    for (i, w) in image.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(i as u64 * 8).to_le_bytes());
    }
    let path = disk("blk-bench", &image);
    let Some(_pool) = on_backing("blk-bench", BackingKind::Memfd, 0) else {
        return;
    };
    for (plain, pool) in [(false, false), (false, true), (true, false)] {
        for (mode, request, requests, depth) in [
            (1, 1 << 20, 5, 1),
            (3, 4096, 40, 1),
            (3, 4096, 40, 16),
            (1, 64 << 10, 20, 16),
            (2, 64 << 10, 8, 1),
            (2, 64 << 10, 8, 3),
        ] {
            let plan = blk_plan(mode, request, requests, pool, depth);
            let (status, exits) = blk_bench(BackingKind::Memfd, &path, &plan, plain);
            let what = format!(
                "mode {mode}, {request} bytes, {depth} in flight, plain {plain}, pool {pool}"
            );
            assert_eq!(status, 0, "{what}");
            assert_eq!(
                exits,
                u64::from(requests.div_ceil(depth)),
                "{what}: one exit a batch"
            );
        }
        // The writes put the guest's buffer (word i = 8 i) at the first
        // eight 64 KiB slots; the data's pattern comes back for the next run.
        let back = std::fs::read(&path).unwrap();
        for slot in 0..8usize {
            let at = (1 << 20) + slot * (64 << 10);
            let word = u64::from_le_bytes(back[at + 8..at + 16].try_into().unwrap());
            assert_eq!(word, 8, "slot {slot}");
        }
        std::fs::write(&path, &image).unwrap();
    }
    let _ = std::fs::remove_file(path);
}
