//! virtio-blk's answers, driven from the host through the transport's
//! registers with a split queue built in shared guest memory: read, write,
//! flush, get-id, a request past the end of the disk and a write to a
//! read-only disk (IOERR), an unknown request type (UNSUPP).

mod common;

use common::{DATA, DESC, Driver, HDR, NEXT, STATUS, WRITE};
use gmem::BackingKind;
use gmem_testkit::{kvm_or_skip, on_backing};

/// One request: header (type, sector), then `data` bytes (device-writable
/// for reads and get-id), then the status; returns the status.
fn request(r: &mut Driver, kind: u32, sector: u64, data: &[u8], device_writes: bool) -> u8 {
    r.header(HDR, kind, sector);
    r.gate.write(DATA, data).unwrap();
    r.gate.write(STATUS, &[0xff]).unwrap();
    r.desc(DESC, 0, HDR, 16, NEXT, 1);
    let flags = NEXT | if device_writes { WRITE } else { 0 };
    r.desc(DESC, 1, DATA, data.len() as u32, flags, 2);
    r.desc(DESC, 2, STATUS, 1, WRITE, 0);
    r.publish(0);
    r.notify();
    r.byte(STATUS)
}

#[test]
fn statuses_follow_the_spec() {
    if !kvm_or_skip("virtio-blk") || on_backing("virtio-blk", BackingKind::Memfd, 0).is_none() {
        return;
    }
    let path = std::env::temp_dir().join(format!("gmem-blk-{}.img", std::process::id()));
    let mut image = vec![0u8; 8 * 512];
    image[..5].copy_from_slice(b"disk!");
    std::fs::write(&path, &image).unwrap();
    let mut r = Driver::ready(&path, false);
    // Read sector 0.
    assert_eq!(request(&mut r, 0, 0, &[0; 512], true), 0);
    let mut got = [0u8; 5];
    r.gate.read(DATA, &mut got).unwrap();
    assert_eq!(&got, b"disk!");
    // Write sector 3, flush, read it back from the file.
    assert_eq!(request(&mut r, 1, 3, &[7; 512], false), 0);
    assert_eq!(request(&mut r, 4, 0, &[0; 8], false), 0, "flush");
    assert_eq!(std::fs::read(&path).unwrap()[3 * 512], 7);
    // Past the end: the last sector is 7.
    assert_eq!(
        request(&mut r, 0, 7, &[0; 1024], true),
        1,
        "read past the end"
    );
    assert_eq!(
        request(&mut r, 1, 8, &[0; 512], false),
        1,
        "write past the end"
    );
    assert_eq!(
        request(&mut r, 0, u64::MAX, &[0; 512], true),
        1,
        "a sector that overflows"
    );
    // Get-id.
    assert_eq!(request(&mut r, 8, 0, &[0; 20], true), 0);
    let mut id = [0u8; 9];
    r.gate.read(DATA, &mut id).unwrap();
    assert_eq!(&id, b"gmem-disk");
    // An unknown type.
    assert_eq!(request(&mut r, 77, 0, &[0; 8], true), 2, "UNSUPP");
    // A read-only disk refuses writes.
    let mut ro = Driver::ready(&path, true);
    assert_eq!(
        request(&mut ro, 1, 0, &[9; 512], false),
        1,
        "write to a read-only disk"
    );
    assert_eq!(
        request(&mut ro, 0, 0, &[0; 512], true),
        0,
        "reads still work"
    );
    assert_ne!(std::fs::read(&path).unwrap()[0], 9);
    let _ = std::fs::remove_file(path);
}
