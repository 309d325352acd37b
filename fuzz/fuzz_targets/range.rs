//! `FileRange` against the kernel's fallocate rules, written out naively in
//! 128-bit arithmetic: validation, bounds, clamping and huge-page splits.
#![no_main]

use gmem::FileRange;
use libfuzzer_sys::fuzz_target;

const EINVAL: i32 = 22;
const EFBIG: i32 = 27;

fuzz_target!(|input: (u64, u64, u64, u8)| {
    let (off, len, size, shift) = input;
    let (o, l, max) = (i128::from(off), i128::from(len), i128::from(i64::MAX));
    // spec §2.5, in order: VFS (offset < 0, len <= 0, EFBIG), then alignment.
    let expected = if o > max || l == 0 || l > max {
        Err(EINVAL)
    } else if o + l > max {
        Err(EFBIG)
    } else if off % 4096 != 0 || len % 4096 != 0 {
        Err(EINVAL)
    } else {
        Ok(())
    };
    match FileRange::new(off, len) {
        Err(e) => assert_eq!(Err(e.errno()), expected, "{off:#x}+{len:#x}: {e}"),
        Ok(r) => {
            assert_eq!(expected, Ok(()), "{off:#x}+{len:#x} accepted");
            assert_eq!(i128::from(r.end()), o + l);
            assert_eq!(r.within(size).is_ok(), o + l <= i128::from(size));
            // A size inside a page counts to the end of that page.
            let page_end = (i128::from(size) + 4095) / 4096 * 4096;
            match r.clamp_to(size) {
                Some(c) => {
                    assert_eq!(c.offset(), off);
                    assert_eq!(i128::from(c.end()), (o + l).min(page_end));
                    assert!(c.len() > 0 && c.len() % 4096 == 0);
                }
                None => assert!(o >= page_end),
            }
            let page = 1u64 << (12 + u32::from(shift) % 19);
            let split = r.split_by_page(page);
            assert_eq!(split.whole_bytes() + split.partial_bytes(), len);
            assert_eq!(split.head.0, off);
            assert_eq!(split.tail.1, r.end());
            assert_eq!(split.head.1, split.whole.0);
            assert_eq!(split.whole.1, split.tail.0);
            if split.whole_bytes() > 0 {
                assert!(split.whole.0 % page == 0 && split.whole.1 % page == 0);
            }
            assert!(split.head.1 - split.head.0 < page && split.tail.1 - split.tail.0 < page);
        }
    }
});
