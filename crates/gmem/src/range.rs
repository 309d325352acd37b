//! Validated byte ranges of a restricted memory file.
//!
//! This module owns the arithmetic of `fallocate` ranges: page alignment, the
//! signed-offset rules the kernel inherits from `loff_t`, overflow and the file
//! bounds. It makes no system call, so it runs (and is tested) anywhere.
//!
//! The checks and their order follow `fallocate(2)` on a guest_memfd in Linux
//! 6.18 (spec §2.5): the VFS checks first (`offset < 0` or `len == 0` →
//! `EINVAL`, `offset + len` past `i64::MAX` → `EFBIG`), then guest_memfd's own
//! page-alignment check (`EINVAL`). Bounds against the file size are checked by
//! the operation that needs them: allocate refuses a range past the end, punch
//! clamps it.

use std::fmt;

use thiserror::Error;

/// The base page size, in bytes, that every offset and length is aligned to.
///
/// Huge-page backings also take 4 KiB-aligned ranges (as hugetlbfs does);
/// their backing page size is reported separately.
pub const PAGE_SIZE: u64 = 4096;

/// Whether `value` is a multiple of [`PAGE_SIZE`]: the one alignment rule
/// that ranges, bindings, conversions and sizes share.
pub fn is_page_aligned(value: u64) -> bool {
    value.is_multiple_of(PAGE_SIZE)
}

/// The largest file offset the kernel accepts (`loff_t` is signed).
pub const MAX_FILE_OFFSET: u64 = i64::MAX as u64;

/// Why a range was refused. Each variant carries the values it refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RangeError {
    /// The length is zero.
    #[error("range at offset {offset:#x} has length 0; a range must be at least one page")]
    Empty {
        /// The offset given.
        offset: u64,
    },
    /// The length is beyond `i64::MAX`, i.e. negative as the kernel's `loff_t`.
    #[error("length {len:#x} at offset {offset:#x} is above i64::MAX (negative as loff_t)")]
    NegativeLength {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
    },
    /// The offset is beyond `i64::MAX`, i.e. negative as the kernel's `loff_t`.
    #[error("offset {offset:#x} is above i64::MAX (negative as loff_t)")]
    NegativeOffset {
        /// The offset given.
        offset: u64,
    },
    /// `offset + len` does not fit in `loff_t`.
    #[error("range {offset:#x}+{len:#x} ends beyond i64::MAX")]
    Overflow {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
    },
    /// The offset or the length is not a multiple of the page size.
    #[error("{what} {value:#x} is not a multiple of the page size {align:#x}")]
    Unaligned {
        /// Which value: "offset" or "length".
        what: &'static str,
        /// The value given.
        value: u64,
        /// The alignment it must have.
        align: u64,
    },
    /// The range reaches past the end of the file.
    #[error("range {offset:#x}+{len:#x} reaches past the file size {size:#x}")]
    PastEnd {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
        /// The file size.
        size: u64,
    },
}

impl RangeError {
    /// The errno the kernel returns for the same misuse of `fallocate`.
    pub fn errno(&self) -> i32 {
        match self {
            RangeError::Overflow { .. } => libc::EFBIG,
            _ => libc::EINVAL,
        }
    }
}

/// A non-empty, 4 KiB-aligned byte range `[offset, offset + len)` of a file,
/// whose end does not overflow `loff_t`.
///
/// Being a `FileRange` says nothing about the file size; see
/// [`FileRange::within`] and [`FileRange::clamp_to`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileRange {
    offset: u64,
    len: u64,
}

impl FileRange {
    /// Validates `offset` and `len` in the kernel's order (spec §2.5).
    ///
    /// # Errors
    /// - [`RangeError::NegativeOffset`] (`EINVAL`) if `offset > i64::MAX`;
    /// - [`RangeError::Empty`] (`EINVAL`) if `len == 0`;
    /// - [`RangeError::NegativeLength`] (`EINVAL`) if `len > i64::MAX`;
    /// - [`RangeError::Overflow`] (`EFBIG`) if `offset + len > i64::MAX`;
    /// - [`RangeError::Unaligned`] (`EINVAL`) if either is not 4 KiB-aligned.
    pub fn new(offset: u64, len: u64) -> Result<Self, RangeError> {
        if offset > MAX_FILE_OFFSET {
            return Err(RangeError::NegativeOffset { offset });
        }
        if len == 0 {
            return Err(RangeError::Empty { offset });
        }
        // The VFS reads len as signed too: a "negative" len is refused as EINVAL.
        if len > MAX_FILE_OFFSET {
            return Err(RangeError::NegativeLength { offset, len });
        }
        match offset.checked_add(len) {
            Some(end) if end <= MAX_FILE_OFFSET => {}
            _ => return Err(RangeError::Overflow { offset, len }),
        }
        if !is_page_aligned(offset) {
            return Err(RangeError::Unaligned {
                what: "offset",
                value: offset,
                align: PAGE_SIZE,
            });
        }
        if !is_page_aligned(len) {
            return Err(RangeError::Unaligned {
                what: "length",
                value: len,
                align: PAGE_SIZE,
            });
        }
        Ok(FileRange { offset, len })
    }

    /// The first byte of the range.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a `FileRange` is never empty. Present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// One past the last byte (cannot overflow: checked at construction).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Checks that the whole range lies inside a file of `size` bytes, as
    /// allocation requires.
    ///
    /// # Errors
    /// [`RangeError::PastEnd`] (`EINVAL`) if `end() > size`.
    pub fn within(self, size: u64) -> Result<Self, RangeError> {
        if self.end() > size {
            return Err(RangeError::PastEnd {
                offset: self.offset,
                len: self.len,
                size,
            });
        }
        Ok(self)
    }

    /// The part of the range inside a file of `size` bytes, if any, as punching
    /// a hole does (it has no size check). A `size` that is not page-aligned
    /// counts up to the end of its last page, so the result stays aligned.
    pub fn clamp_to(self, size: u64) -> Option<FileRange> {
        let size = size
            .checked_next_multiple_of(PAGE_SIZE)
            .unwrap_or(u64::MAX / PAGE_SIZE * PAGE_SIZE);
        let end = self.end().min(size);
        (end > self.offset).then(|| FileRange {
            offset: self.offset,
            len: end - self.offset,
        })
    }

    /// Splits the range at `page`-aligned boundaries: the head before the first
    /// boundary, the whole pages, and the tail after the last boundary.
    ///
    /// Returns `(head, whole, tail)`, each possibly empty. `page` must be a
    /// power of two that is a multiple of [`PAGE_SIZE`].
    pub fn split_by_page(self, page: u64) -> RangeSplit {
        debug_assert!(page.is_power_of_two() && page >= PAGE_SIZE);
        let start = self.offset;
        let end = self.end();
        let whole_start = start.next_multiple_of(page).min(end);
        let whole_end = (end / page * page).max(whole_start);
        RangeSplit {
            head: (start, whole_start),
            whole: (whole_start, whole_end),
            tail: (whole_end, end),
        }
    }
}

impl fmt::Display for FileRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.offset, self.end())
    }
}

/// A range cut at backing-page boundaries by [`FileRange::split_by_page`].
/// Each part is a half-open `(start, end)`; an empty part has `start == end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeSplit {
    /// Bytes before the first whole backing page.
    pub head: (u64, u64),
    /// Whole backing pages.
    pub whole: (u64, u64),
    /// Bytes after the last whole backing page.
    pub tail: (u64, u64),
}

impl RangeSplit {
    /// Bytes in whole backing pages.
    pub fn whole_bytes(&self) -> u64 {
        self.whole.1 - self.whole.0
    }

    /// Bytes in the partial pages at either end.
    pub fn partial_bytes(&self) -> u64 {
        (self.head.1 - self.head.0) + (self.tail.1 - self.tail.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn valid_range_is_accepted() {
        let r = FileRange::new(P, 2 * P).unwrap();
        assert_eq!((r.offset(), r.len(), r.end()), (P, 2 * P, 3 * P));
    }

    #[test]
    fn zero_length_is_einval() {
        let e = FileRange::new(0, 0).unwrap_err();
        assert_eq!(e, RangeError::Empty { offset: 0 });
        assert_eq!(e.errno(), libc::EINVAL);
    }

    #[test]
    fn negative_offset_is_einval() {
        let e = FileRange::new(1 << 63, P).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains("0x8000000000000000"), "{e}");
    }

    /// Lengths past `i64::MAX` are "negative" to the VFS (EINVAL), and the
    /// message says so instead of "length 0".
    #[test]
    fn negative_lengths_are_einval_and_say_so() {
        for (offset, len) in [(0, 1 << 63), (0, u64::MAX), (0x1000, 0xffff_ffff_ffff_f000)] {
            let e = FileRange::new(offset, len).unwrap_err();
            assert_eq!(e, RangeError::NegativeLength { offset, len });
            assert_eq!(e.errno(), libc::EINVAL);
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{len:#x}")) && msg.contains("i64::MAX"),
                "{msg}"
            );
            assert!(!msg.contains("has length 0"), "{msg}");
        }
    }

    #[test]
    fn overflowing_end_is_efbig() {
        let e = FileRange::new(MAX_FILE_OFFSET - P + 1, 2 * P).unwrap_err();
        assert_eq!(e.errno(), libc::EFBIG);
        let e = FileRange::new(0x7fff_ffff_ffff_f000, P).unwrap_err();
        assert!(matches!(e, RangeError::Overflow { .. }));
    }

    #[test]
    fn unaligned_offset_and_length_are_einval() {
        // The kernel's T12 pairs (spec §6.1).
        for (off, len) in [
            (0, 1),
            (0, P - 1),
            (0, P + 1),
            (1, 1),
            (1, P - 1),
            (1, P),
            (1, P + 1),
            (P, 1),
            (P, P - 1),
            (P, P + 1),
        ] {
            let e = FileRange::new(off, len).unwrap_err();
            assert!(matches!(e, RangeError::Unaligned { .. }), "{off} {len}");
            assert_eq!(e.errno(), libc::EINVAL);
        }
    }

    #[test]
    fn within_and_clamp() {
        let r = FileRange::new(3 * P, 2 * P).unwrap();
        assert!(r.within(5 * P).is_ok());
        assert_eq!(r.within(4 * P).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(r.clamp_to(4 * P).unwrap().len(), P);
        assert!(r.clamp_to(3 * P).is_none());
    }

    /// Found by the `range` fuzz target: clamping to a size that is not page
    /// aligned produced an unaligned range.
    #[test]
    fn clamp_to_an_unaligned_size_stays_aligned() {
        let r = FileRange::new(144115183780888576, 562949936644096).unwrap();
        let c = r.clamp_to(144115188059143952).unwrap();
        assert_eq!(c.len() % PAGE_SIZE, 0);
        assert_eq!(c.end(), 144115188059143952u64.next_multiple_of(PAGE_SIZE));
        assert_eq!(FileRange::new(0, P).unwrap().clamp_to(1).unwrap().len(), P);
    }

    #[test]
    fn split_by_huge_page() {
        const H: u64 = 2 << 20;
        let r = FileRange::new(H - P, H + 2 * P).unwrap();
        let s = r.split_by_page(H);
        assert_eq!(s.head, (H - P, H));
        assert_eq!(s.whole, (H, 2 * H));
        assert_eq!(s.tail, (2 * H, 2 * H + P));
        let inner = FileRange::new(P, P).unwrap().split_by_page(H);
        assert_eq!(inner.whole_bytes(), 0);
        assert_eq!(inner.partial_bytes(), P);
    }

    proptest! {
        #[test]
        fn new_never_panics_and_accepts_exactly_the_kernel_set(off in any::<u64>(), len in any::<u64>()) {
            let ok = off <= MAX_FILE_OFFSET
                && len != 0
                && len <= MAX_FILE_OFFSET
                && off.checked_add(len).is_some_and(|e| e <= MAX_FILE_OFFSET)
                && off % P == 0
                && len % P == 0;
            prop_assert_eq!(FileRange::new(off, len).is_ok(), ok);
        }

        #[test]
        fn split_parts_cover_the_range(off in 0u64..1 << 40, len in 1u64..1 << 32, shift in 12u32..31) {
            let (off, len) = (off * P, len * P);
            let page = 1u64 << shift;
            let s = FileRange::new(off, len).unwrap().split_by_page(page);
            prop_assert_eq!(s.whole_bytes() + s.partial_bytes(), len);
            prop_assert_eq!(s.whole.0 % page, 0);
            prop_assert_eq!(s.whole.1 % page, 0);
        }
    }
}
