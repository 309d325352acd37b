//! virtio-blk's answers, driven from the host through the transport's
//! registers with a split queue built in shared guest memory: read, write,
//! flush, get-id, a request past the end of the disk and a write to a
//! read-only disk (IOERR), an unknown request type (UNSUPP).

use gmem::{Attribute, BackingKind, GateOptions, Gatekeeper, MemoryOptions, SlotRequest, Vm};
use gmem_testkit::{kvm_or_skip, on_backing};
use gmem_vmm::virtio::MmioTransport;
use gmem_vmm::virtio::blk::VirtioBlk;

const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x1_1000;
const USED: u64 = 0x1_2000;
const HDR: u64 = 0x2_0000;
const DATA: u64 = 0x2_1000;
const STATUS: u64 = 0x2_2000;

struct Rig {
    gate: Gatekeeper,
    dev: MmioTransport,
    next: u16,
    _vm: Vm,
}

fn w(r: &mut Rig, off: u64, v: u32) {
    r.dev.write(off, &v.to_le_bytes(), &r.gate);
}

fn rig(disk: &std::path::Path, readonly: bool) -> Rig {
    let vm = Vm::new().unwrap();
    let mem =
        gmem::create_memory(MemoryOptions::new(BackingKind::Memfd, 2 << 20), Some(&vm)).unwrap();
    let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 << 20)).unwrap();
    let gate = Gatekeeper::new(
        &vm,
        vec![b],
        GateOptions::new(Attribute::Shared, gmem::Policy::InPlace),
    )
    .unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(disk)
        .unwrap();
    let dev = MmioTransport::new(Box::new(VirtioBlk::new(file, readonly).unwrap()));
    let mut r = Rig {
        gate,
        dev,
        next: 0,
        _vm: vm,
    };
    w(&mut r, 0x70, 3);
    w(&mut r, 0x24, 1);
    w(&mut r, 0x20, 1);
    w(&mut r, 0x70, 0xb);
    w(&mut r, 0x38, 8);
    w(&mut r, 0x80, DESC as u32);
    w(&mut r, 0x90, AVAIL as u32);
    w(&mut r, 0xa0, USED as u32);
    w(&mut r, 0x44, 1);
    w(&mut r, 0x70, 0xf);
    r
}

/// One request: header (type, sector), then `data` bytes (device-writable
/// for reads and get-id), then the status; returns the status.
fn request(r: &mut Rig, kind: u32, sector: u64, data: &[u8], device_writes: bool) -> u8 {
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    r.gate.write(HDR, &hdr).unwrap();
    r.gate.write(DATA, data).unwrap();
    r.gate.write(STATUS, &[0xff]).unwrap();
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        r.gate.write(DESC + 16 * i, &d).unwrap();
    };
    desc(0, HDR, 16, 1, 1);
    desc(
        1,
        DATA,
        data.len() as u32,
        1 | if device_writes { 2 } else { 0 },
        2,
    );
    desc(2, STATUS, 1, 2, 0);
    let slot = u64::from(r.next % 8);
    r.gate
        .write(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes())
        .unwrap();
    r.next = r.next.wrapping_add(1);
    r.gate.write(AVAIL + 2, &r.next.to_le_bytes()).unwrap();
    w(r, 0x50, 0);
    let mut s = [0u8];
    r.gate.read(STATUS, &mut s).unwrap();
    s[0]
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
    let mut r = rig(&path, false);
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
    let mut ro = rig(&path, true);
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
