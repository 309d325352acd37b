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

/// Every guest, by name.
pub const ALL: &[(&str, &[u8])] = &[("hello", HELLO)];
