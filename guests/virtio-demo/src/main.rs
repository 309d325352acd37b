//! The built-in demo of `gmem run`, in Rust over virtio: a secret kept in
//! private memory, console output through virtio-console over shared bounce
//! buffers, a disk read through virtio-blk, and a device refused the
//! private page.
#![no_std]
#![no_main]

use gmem_guest::say::say;
use gmem_guest::virtio::{self, GmemHal};
use gmem_guest::{Boot, mem, println};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::{DeviceType, Transport};

gmem_guest::entry!(main);

/// Private (the guest's RAM is private after launch): the host never sees it.
static mut SECRET: [u8; 4096] = [0; 4096];

/// Lines for virtio-console, built without allocation.
fn main(boot: Boot) -> i32 {
    if boot.vcpu != 0 {
        // One vCPU drives the devices; the others wait for the end.
        gmem_guest::park();
    }
    if let Err(e) = virtio::init(&boot) {
        println!("could not share the bounce pool: {e:?}");
        return 10;
    }
    // SAFETY: the only access to SECRET, on this vCPU.
    let secret = unsafe { &mut *core::ptr::addr_of_mut!(SECRET) };
    secret[..22].copy_from_slice(b"the guest's secret key");
    let mut console = None;
    let mut blk = None;
    for i in 0..8 {
        // SAFETY: one transport per device window, made once.
        let Some(t) = (unsafe { virtio::transport(i) }) else {
            break;
        };
        match t.device_type() {
            DeviceType::Console => console = VirtIOConsole::<GmemHal, _>::new(t).ok(),
            DeviceType::Block => blk = VirtIOBlk::<GmemHal, _>::new(t).ok(),
            _ => {}
        }
    }
    say(
        &mut console,
        format_args!(
            "a secret is in private memory; this line came through virtio-console over shared bounce buffers"
        ),
    );
    match blk.as_mut() {
        Some(blk) => {
            let mut sector = [0u8; 512];
            if blk.read_blocks(0, &mut sector).is_err() {
                say(&mut console, format_args!("virtio-blk: the read failed"));
                return 11;
            }
            let text = sector
                .split(|&b| b == 0 || b == b'\n')
                .next()
                .unwrap_or(&[]);
            say(
                &mut console,
                format_args!(
                    "read through virtio-blk ({} sectors): {}",
                    blk.capacity(),
                    core::str::from_utf8(text).unwrap_or("(not text)")
                ),
            );
        }
        None => say(&mut console, format_args!("no virtio-blk device")),
    }
    // A device pointed at the private secret is refused by the gatekeeper.
    let refused = mem::print_shared(secret.as_ptr() as u64, 22);
    say(
        &mut console,
        format_args!("the device was refused the private page: {refused:?}"),
    );
    if refused.is_ok() {
        return 12;
    }
    0
}
