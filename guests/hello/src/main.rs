//! The smallest gmem guest in Rust: prints through the serial console and
//! ends the run with a status.
#![no_std]
#![no_main]

use gmem_guest::{Boot, abi, println};

gmem_guest::entry!(main);

fn main(boot: Boot) -> i32 {
    let version = abi::query(abi::Key::Version);
    println!(
        "hello from a Rust guest: vCPU {}, {} MiB of RAM, guest ABI {version}",
        boot.vcpu,
        boot.ram_size >> 20
    );
    if version != abi::ABI_VERSION {
        return 2;
    }
    0
}
