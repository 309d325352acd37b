//! Guests written in Rust (`guests/`, built from source by `gmem-guests`),
//! loaded as ELF files and run on every backing; and the ELF loader's bad
//! inputs, each a clear error that writes nothing.

use gmem::{BackingKind, Policy};
use gmem_testkit::{hugepages_or_skip, kvm_or_skip};
use gmem_vmm::{Console, Machine, MachineConfig, VmmError};

fn ram(backing: BackingKind) -> u64 {
    if backing == BackingKind::Hugetlb1G {
        1 << 30
    } else {
        16 << 20
    }
}

#[test]
fn hello_runs_on_every_backing_and_policy() {
    for backing in BackingKind::ALL {
        for policy in [Policy::InPlace, Policy::Discard] {
            if !kvm_or_skip("hello") {
                return;
            }
            let Some(_pool) =
                hugepages_or_skip("hello", backing, ram(backing) / backing.page_size())
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
                out.contains("hello from a Rust guest: vCPU 0") && out.contains("guest ABI 2"),
                "{out}"
            );
        }
    }
}

#[test]
fn elf_files_that_do_not_fit_are_refused_by_segment() {
    if !kvm_or_skip("elf refusals") {
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
        matches!(e, VmmError::SegmentOutsideRam { addr: 0x1000, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("segment"), "{e}");
    // The machine is still unlaunched: a good file loads now.
    m.load_elf(gmem_guests::HELLO).unwrap();
    assert!(matches!(
        m.load_elf(gmem_guests::HELLO),
        Err(VmmError::AlreadyLaunched)
    ));
}
