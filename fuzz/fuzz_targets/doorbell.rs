//! The guest ABI's doorbell decoding against a naive model of the ABI text
//! (docs/guest-abi.md): hypercall numbers, attributes, page ranges.
#![no_main]

use gmem::Attribute;
use gmem_vmm::abi::{DoorbellArgs, Request, decode_hypercall, guest_bytes, guest_pages};
use libfuzzer_sys::fuzz_target;

const EINVAL: i64 = -22;
const EFAULT: i64 = -14;
/// `-KVM_ENOSYS` (guest ABI 2): unknown hypercalls.
const KVM_ENOSYS: i64 = -1000;

fn model_pages(gpa: u64, pages: u64, ram: u64) -> Result<(u128, u128), i64> {
    let (start, end) = (u128::from(gpa), u128::from(gpa) + u128::from(pages) * 4096);
    if gpa % 4096 != 0 || pages == 0 || end > u128::from(ram) {
        return Err(EINVAL);
    }
    Ok((start, end))
}

fuzz_target!(|input: (u64, u64, u64, u64, u64, u64)| {
    let (nr, gpa, pages, attrs, len, ram_pages) = input;
    let ram = (ram_pages % (1 << 28)) * 4096;
    let args = DoorbellArgs {
        nr,
        a0: gpa,
        a1: pages,
        a2: attrs,
        a3: 0,
    };
    let expected = if nr != 12 {
        Err(KVM_ENOSYS)
    } else if attrs & !0x1f != 0 || attrs & 0xf > 2 {
        Err(EINVAL)
    } else {
        model_pages(gpa, pages, ram).map(|(s, e)| {
            let to = if attrs & 0x10 != 0 {
                Attribute::Private
            } else {
                Attribute::Shared
            };
            (s, e, to)
        })
    };
    match decode_hypercall(args, ram) {
        Ok(Request::MapGpaRange { range, to }) => {
            assert_eq!(
                Ok((u128::from(range.start), u128::from(range.end), to)),
                expected
            )
        }
        Err(errno) => assert_eq!(Err::<(), i64>(errno), expected.map(|_| ())),
    }
    assert_eq!(
        guest_pages(gpa, pages, ram).map(|r| (u128::from(r.start), u128::from(r.end))),
        model_pages(gpa, pages, ram)
    );
    let bytes_ok = u128::from(gpa) + u128::from(len) <= u128::from(ram);
    assert_eq!(guest_bytes(gpa, len, ram).is_ok(), bytes_ok);
    if !bytes_ok {
        assert_eq!(guest_bytes(gpa, len, ram), Err(EFAULT));
    }
});
