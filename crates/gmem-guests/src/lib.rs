//! # gmem-guests: the example guests, as ELF files
//!
//! Built from the Rust sources in `guests/` by this crate's build script
//! (their own workspace, `no_std`, for the installed x86_64 target) and
//! embedded here, so that `gmem run` and the tests run them without any
//! prebuilt binary in the repository.
#![warn(missing_docs)]

/// `guests/hello`: prints through the serial console, checks the guest ABI
/// version, and exits 0.
pub const HELLO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello.elf"));

/// `guests/virtio-demo`, the built-in demo of `gmem run`: a secret in
/// private memory, console output through virtio-console over shared bounce
/// buffers, a disk read through virtio-blk, a device refused a private page.
pub const VIRTIO_DEMO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/virtio-demo.elf"));

/// `guests/disk-sum`: reads a disk through virtio-blk, prints its FNV-1a 64
/// checksum (all but the last sector) and writes it into the last sector.
pub const DISK_SUM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/disk-sum.elf"));

/// `guests/attacker`: forges virtqueue descriptors and rings that point a
/// virtio-blk device at private memory, and checks each is refused and the
/// VM lives on.
pub const ATTACKER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/attacker.elf"));

/// `guests/snapshot-demo`: fills memory with a pattern, keeps a secret in a
/// private page, asks for a snapshot half way (ABI port `0xf9`), and prints
/// a checksum of both; a restored run prints the same.
pub const SNAPSHOT_DEMO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/snapshot-demo.elf"));

/// `guests/migrate-demo`: rewrites 10 MiB of private and shared memory on
/// every pass, converting and discarding a page each pass, and prints a
/// checksum: what a migrated run must reproduce.
pub const MIGRATE_DEMO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/migrate-demo.elf"));

/// `guests/blk-bench`: `gmem bench`'s virtio-blk guest; runs the requests
/// its disk's sector 0 asks for (sequential reads or writes, random reads),
/// over the bounce pool where RAM is private and on its own buffers where
/// RAM is all shared, and reports on port `0x10` around them.
pub const BLK_BENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blk-bench.elf"));

/// Every guest, by name.
pub const ALL: &[(&str, &[u8])] = &[
    ("hello", HELLO),
    ("virtio-demo", VIRTIO_DEMO),
    ("disk-sum", DISK_SUM),
    ("attacker", ATTACKER),
    ("snapshot-demo", SNAPSHOT_DEMO),
    ("migrate-demo", MIGRATE_DEMO),
    ("blk-bench", BLK_BENCH),
];
