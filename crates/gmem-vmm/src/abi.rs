//! The guest ABI (`docs/guest-abi.md`): port numbers, hypercall numbers and
//! the decoding of doorbell arguments. Pure functions of register values, so
//! they are tested without KVM.

use std::ops::Range;

use gmem::{Attribute, PAGE_SIZE};

// The numbers live in `gmem-abi`, which the guest SDK links too.
pub use gmem_abi::{
    ABI_VERSION, AbiKey, EAGAIN, EBUSY, EFAULT, EINVAL, ENOSYS, HC_MAP_GPA_RANGE, KVM_ENOSYS,
    MAP_GPA_RANGE_ENCRYPTED, MAP_GPA_RANGE_PAGE_SIZE_MASK, PORT_ABI, PORT_DISCARD, PORT_EXIT,
    PORT_HYPERCALL, PORT_SERIAL, PORT_SERIAL_LSR, PORT_SHARED_CONSOLE, PORT_SNAPSHOT,
    SERIAL_LSR_IDLE, SNAPSHOT_RESUMED, SNAPSHOT_TAKEN,
};

/// The access width (bytes) the ABI defines for `out` to `port`, if it
/// defines the port.
pub fn out_width(port: u16) -> Option<u8> {
    match port {
        PORT_SERIAL => Some(1),
        PORT_EXIT | PORT_HYPERCALL | PORT_SHARED_CONSOLE | PORT_DISCARD | PORT_ABI
        | PORT_SNAPSHOT => Some(4),
        _ => None,
    }
}

/// The access width (bytes) the ABI defines for `in` from `port`.
pub fn in_width(port: u16) -> Option<u8> {
    match port {
        PORT_SERIAL_LSR => Some(1),
        PORT_ABI => Some(4),
        _ => None,
    }
}

/// The registers a doorbell request carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoorbellArgs {
    /// The hypercall number (eax).
    pub nr: u64,
    /// rbx.
    pub a0: u64,
    /// rcx.
    pub a1: u64,
    /// rdx.
    pub a2: u64,
    /// rsi.
    pub a3: u64,
}

/// A guest request, decoded and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Convert a guest range.
    MapGpaRange {
        /// The range.
        range: Range<u64>,
        /// What it becomes.
        to: Attribute,
    },
}

/// Decodes a doorbell (or `vmcall`) request of `ram_size` bytes of guest RAM.
///
/// # Errors
/// `-KVM_ENOSYS` (-1000) for an unknown number, as KVM's hypercall
/// convention answers; `-EINVAL` for a range that is unaligned, empty,
/// wraps, or reaches past RAM, for unknown attribute bits, or a page-size
/// level above 2 (1 GiB). The level is otherwise ignored: the range is
/// counted in 4 KiB pages whatever it says.
pub fn decode_hypercall(args: DoorbellArgs, ram_size: u64) -> Result<Request, i64> {
    match args.nr {
        HC_MAP_GPA_RANGE => {
            let known = MAP_GPA_RANGE_ENCRYPTED | MAP_GPA_RANGE_PAGE_SIZE_MASK;
            if args.a2 & !known != 0 || args.a2 & MAP_GPA_RANGE_PAGE_SIZE_MASK > 2 {
                return Err(-EINVAL);
            }
            let range = guest_pages(args.a0, args.a1, ram_size)?;
            let to = if args.a2 & MAP_GPA_RANGE_ENCRYPTED != 0 {
                Attribute::Private
            } else {
                Attribute::Shared
            };
            Ok(Request::MapGpaRange { range, to })
        }
        _ => Err(-KVM_ENOSYS),
    }
}

/// Checks `pages` 4 KiB pages at `gpa` against `ram_size` bytes of RAM.
///
/// # Errors
/// `-EINVAL` if `gpa` is unaligned, `pages` is 0, the range wraps or it
/// reaches past RAM.
pub fn guest_pages(gpa: u64, pages: u64, ram_size: u64) -> Result<Range<u64>, i64> {
    if !gpa.is_multiple_of(PAGE_SIZE) || pages == 0 {
        return Err(-EINVAL);
    }
    let end = pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| gpa.checked_add(len))
        .ok_or(-EINVAL)?;
    if end > ram_size {
        return Err(-EINVAL);
    }
    Ok(gpa..end)
}

/// Checks a byte range for the shared-buffer console.
///
/// # Errors
/// `-EFAULT` if it wraps or reaches past RAM.
pub fn guest_bytes(gpa: u64, len: u64, ram_size: u64) -> Result<Range<u64>, i64> {
    match gpa.checked_add(len) {
        Some(end) if end <= ram_size => Ok(gpa..end),
        _ => Err(-EFAULT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 64 << 20;

    fn map(gpa: u64, pages: u64, attrs: u64) -> Result<Request, i64> {
        decode_hypercall(
            DoorbellArgs {
                nr: HC_MAP_GPA_RANGE,
                a0: gpa,
                a1: pages,
                a2: attrs,
                a3: 0,
            },
            RAM,
        )
    }

    #[test]
    fn map_gpa_range_decodes_both_directions() {
        assert_eq!(
            map(0x20_0000, 2, MAP_GPA_RANGE_ENCRYPTED),
            Ok(Request::MapGpaRange {
                range: 0x20_0000..0x20_2000,
                to: Attribute::Private
            })
        );
        assert_eq!(
            map(0x20_0000, 1, 1),
            Ok(Request::MapGpaRange {
                range: 0x20_0000..0x20_1000,
                to: Attribute::Shared
            })
        );
    }

    #[test]
    fn bad_ranges_are_einval() {
        assert_eq!(map(0x20_0001, 1, 0), Err(-EINVAL), "unaligned");
        assert_eq!(map(0x20_0000, 0, 0), Err(-EINVAL), "no pages");
        assert_eq!(map(RAM - PAGE_SIZE, 2, 0), Err(-EINVAL), "past RAM");
        assert_eq!(map(PAGE_SIZE, u64::MAX / 2, 0), Err(-EINVAL), "wrapping");
        assert_eq!(map(0, 1, 1 << 5), Err(-EINVAL), "unknown attribute bit");
        assert_eq!(map(0, 1, 3), Err(-EINVAL), "page-size level 3");
    }

    #[test]
    fn unknown_numbers_are_kvm_enosys() {
        let args = DoorbellArgs {
            nr: 99,
            ..Default::default()
        };
        assert_eq!(decode_hypercall(args, RAM), Err(-KVM_ENOSYS));
        assert_eq!(KVM_ENOSYS, 1000);
    }

    #[test]
    fn widths_and_keys() {
        assert_eq!(out_width(PORT_SERIAL), Some(1));
        assert_eq!(out_width(PORT_HYPERCALL), Some(4));
        assert_eq!(out_width(0x80), None);
        assert_eq!(in_width(PORT_SERIAL_LSR), Some(1));
        assert_eq!(in_width(PORT_SERIAL), None);
        assert_eq!(AbiKey::from_raw(3), Some(AbiKey::VmcallTaken));
        assert_eq!(AbiKey::from_raw(99), None);
    }

    #[test]
    fn console_ranges() {
        assert_eq!(guest_bytes(RAM - 4, 4, RAM), Ok(RAM - 4..RAM));
        assert_eq!(guest_bytes(RAM - 4, 5, RAM), Err(-EFAULT));
        assert_eq!(guest_bytes(u64::MAX, 2, RAM), Err(-EFAULT));
    }
}
