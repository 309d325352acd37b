//! What the library's tests share: one gatekeeper over one file, the
//! kernel's own count of map entries, and the snapshot tests' key, reads
//! and files.
#![allow(dead_code)] // each test file uses its part

use std::sync::Arc;

use gmem::{
    BackingKind, GateOptions, Gatekeeper, MemoryOptions, RestrictedMemory, SlotRequest, Vm,
    create_memory,
};

/// A VM with one `size`-byte file of `kind` bound at GPA 0, under a
/// gatekeeper with `opts`.
pub fn gate_on(
    kind: BackingKind,
    size: u64,
    opts: GateOptions,
) -> (Vm, Arc<dyn RestrictedMemory>, Gatekeeper) {
    let vm = Vm::new().unwrap();
    let mem = create_memory(MemoryOptions::new(kind, size), Some(&vm)).unwrap();
    let b = vm.bind(&mem, SlotRequest::new(0, 0, size)).unwrap();
    let gate = Gatekeeper::new(&vm, vec![b], opts).unwrap();
    (vm, mem, gate)
}

/// The lines of /proc/self/maps (VMAs) that overlap `[start, start + len)`.
pub fn vmas_in(start: usize, len: usize) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let a = usize::from_str_radix(a, 16).unwrap();
            let b = usize::from_str_radix(b, 16).unwrap();
            a < start + len && b > start
        })
        .count()
}

/// This process's VMAs.
pub fn all_vmas() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

/// The snapshot tests' sealing key.
pub fn key() -> gmem::snapshot::SealKey {
    gmem::snapshot::SealKey::new(*b"0123456789abcdef0123456789abcdef")
}

/// `len` bytes of guest memory at `gpa`, through the gatekeeper.
pub fn read(gate: &Gatekeeper, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    gate.read(gpa, &mut b).unwrap();
    b
}

/// A memfd holding `bytes`: a snapshot file.
pub fn file_of(bytes: &[u8]) -> std::fs::File {
    use std::io::Write;
    let mut f = tempfile();
    f.write_all(bytes).unwrap();
    f
}

/// An empty memfd, as a file.
pub fn tempfile() -> std::fs::File {
    let fd = rustix::fs::memfd_create("snapshot", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    std::fs::File::from(fd)
}
