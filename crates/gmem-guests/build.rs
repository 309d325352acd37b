//! Builds the guests of `guests/` (a workspace of its own: `no_std`,
//! `panic = "abort"`, a static relocation model and a linker script) with
//! the same cargo, for the installed target, into this build's `OUT_DIR`.
//! Nothing prebuilt is ever committed: the guests come from source here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The guests, by package (and binary) name.
const GUESTS: &[&str] = &[
    "hello",
    "virtio-demo",
    "disk-sum",
    "attacker",
    "snapshot-demo",
    "migrate-demo",
    "blk-bench",
];
/// The one target installed on this project's machines.
const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let guests = manifest.join("../../guests");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "link.ld",
        ".cargo/config.toml",
        "gmem-guest",
    ] {
        println!("cargo:rerun-if-changed={}", guests.join(path).display());
    }
    for g in GUESTS {
        println!("cargo:rerun-if-changed={}", guests.join(g).display());
    }
    // The guest SDK links the ABI's numbers from the host workspace.
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../gmem-abi").display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // The guests' .cargo/config.toml is found from the working directory.
    cmd.current_dir(&guests)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(out.join("target"));
    if std::env::var_os("CARGO_GMEM_UNLOCKED").is_none() {
        cmd.arg("--locked");
    }
    for g in GUESTS {
        cmd.args(["-p", g]);
    }
    // What cargo sets for this build script must not leak into the guests'
    // build: these would replace the guests' own rustflags.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for the guests");
    assert!(
        status.success(),
        "building the guests in {} failed",
        guests.display()
    );
    let bin = out.join("target").join(TARGET).join("release");
    for g in GUESTS {
        copy(&bin.join(g), &out.join(format!("{g}.elf")));
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}
