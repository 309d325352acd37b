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

/// The used length of the `i`-th element of the used ring.
fn used_len(r: &Driver, i: u64) -> u32 {
    let mut b = [0u8; 4];
    r.gate.read(common::USED + 4 + 8 * i + 4, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// The device moves data straight between the disk and the descriptors'
/// buffers: a header split over two descriptors, data over several of odd
/// sizes (one across a page boundary), the status byte at the end of a
/// data descriptor; and a write whose data shares the header's descriptor.
#[test]
fn scattered_buffers_get_the_bytes_the_disk_has() {
    if !kvm_or_skip("virtio-blk scatter")
        || on_backing("virtio-blk", BackingKind::Memfd, 0).is_none()
    {
        return;
    }
    let disk = common::Disk::new("scatter", 16);
    let image: Vec<u8> = (0..16 * 512).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&disk.0, &image).unwrap();
    let mut r = Driver::ready(&disk.0, false);
    // Read 2 sectors from sector 3 into 100 + 900 + 24 bytes, the last 24
    // in the status descriptor (25 bytes: data, then the status byte).
    r.header(HDR, 0, 3);
    let a = DATA; // 100 bytes
    let b = DATA + 0x1000 - 400; // 900 bytes, across a page boundary
    let c = STATUS + 0x800; // 24 bytes of data + the status byte
    r.gate.write(a, &[0xaa; 100]).unwrap();
    r.gate.write(b, &[0xaa; 900]).unwrap();
    r.gate.write(c, &[0xaa; 25]).unwrap();
    r.desc(DESC, 0, HDR, 10, NEXT, 1);
    r.desc(DESC, 1, HDR + 10, 6, NEXT, 2);
    r.desc(DESC, 2, a, 100, NEXT | WRITE, 3);
    r.desc(DESC, 3, b, 900, NEXT | WRITE, 4);
    r.desc(DESC, 4, c, 25, WRITE, 0);
    r.publish(0);
    r.notify();
    assert_eq!(r.byte(c + 24), 0, "OK");
    assert_eq!(used_len(&r, 0), 1025, "1024 bytes and the status");
    let mut got = vec![0u8; 1024];
    r.gate.read(a, &mut got[..100]).unwrap();
    r.gate.read(b, &mut got[100..1000]).unwrap();
    r.gate.read(c, &mut got[1000..]).unwrap();
    assert_eq!(got, &image[3 * 512..5 * 512]);
    // Write sector 9 from one descriptor holding the header and the data.
    let data: Vec<u8> = (0..512).map(|i| (i % 13) as u8 + 1).collect();
    r.header(DATA, 1, 9);
    r.gate.write(DATA + 16, &data).unwrap();
    r.gate.write(STATUS, &[0xff]).unwrap();
    r.desc(DESC, 0, DATA, 16 + 512, NEXT, 1);
    r.desc(DESC, 1, STATUS, 1, WRITE, 0);
    r.publish(0);
    r.notify();
    assert_eq!(r.byte(STATUS), 0, "OK");
    assert_eq!(used_len(&r, 1), 1, "only the status");
    assert_eq!(
        &std::fs::read(&disk.0).unwrap()[9 * 512..10 * 512],
        &data[..]
    );
}

/// A read whose second buffer is private is refused whole: the first,
/// shared, buffer is not written either, and the refusal is counted.
#[test]
fn a_read_with_one_private_buffer_writes_none_of_them() {
    if !kvm_or_skip("virtio-blk private buffer")
        || on_backing("virtio-blk", BackingKind::Memfd, 0).is_none()
    {
        return;
    }
    let disk = common::Disk::new("private-buffer", 16);
    std::fs::write(&disk.0, vec![0x5a; 16 * 512]).unwrap();
    let mut r = Driver::ready(&disk.0, false);
    let private = DATA + 0x4000;
    r.header(HDR, 0, 0);
    r.gate.write(DATA, &[0xaa; 512]).unwrap();
    r.gate.write(STATUS, &[0xff]).unwrap();
    r.gate
        .convert(private, 0x1000, gmem::Attribute::Private)
        .unwrap();
    r.desc(DESC, 0, HDR, 16, NEXT, 1);
    r.desc(DESC, 1, DATA, 512, NEXT | WRITE, 2);
    r.desc(DESC, 2, private, 512, NEXT | WRITE, 3);
    r.desc(DESC, 3, STATUS, 1, WRITE, 0);
    r.publish(0);
    r.notify();
    assert_eq!(r.byte(STATUS), 1, "IOERR");
    let mut first = [0u8; 512];
    r.gate.read(DATA, &mut first).unwrap();
    assert_eq!(first, [0xaa; 512], "the shared buffer was not written");
    assert_eq!(used_len(&r, 0), 1, "only the status");
}
