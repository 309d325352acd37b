//! ELF payloads: the `PT_LOAD` segments of a 64-bit x86-64 executable and
//! its entry point, parsed with the `object` crate (never by hand), and
//! checked before anything is written into guest RAM.

use std::ops::Range;

use object::elf::{EM_X86_64, FileHeader64, PF_X, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader};
use object::{Endianness, ReadRef};
use thiserror::Error;

/// The 4 bytes every ELF file starts with.
pub const MAGIC: &[u8; 4] = b"\x7fELF";

/// Whether `bytes` look like an ELF file (its magic).
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// One `PT_LOAD` segment, borrowed from the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Its index among the program headers.
    pub index: usize,
    /// Where it goes in guest memory (`p_paddr`).
    pub addr: u64,
    /// The bytes from the file (`p_filesz` of them).
    pub data: &'a [u8],
    /// Its size in memory (`p_memsz`); the rest past the data is zeroed.
    pub mem_size: u64,
    /// Whether it is executable (`PF_X`).
    pub exec: bool,
}

impl Segment<'_> {
    /// The guest range it occupies.
    pub fn range(&self) -> Range<u64> {
        self.addr..self.addr + self.mem_size
    }
}

/// A parsed payload: its loadable segments and entry point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program<'a> {
    /// `e_entry`.
    pub entry: u64,
    /// The `PT_LOAD` segments, in file order.
    pub segments: Vec<Segment<'a>>,
}

/// Why an ELF payload was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ElfError {
    /// The ELF header or the program headers cannot be read.
    #[error("malformed ELF file: {0}")]
    Malformed(String),
    /// Not for this machine.
    #[error("the ELF file is for machine {machine}, not x86-64 ({EM_X86_64})")]
    WrongMachine {
        /// `e_machine`.
        machine: u16,
    },
    /// No `PT_LOAD` segment.
    #[error("the ELF file has no PT_LOAD segment")]
    NoSegments,
    /// A segment's bytes are not all in the file.
    #[error(
        "segment {index}: its {size:#x} bytes at file offset {offset:#x} reach past the end of the file ({len:#x} bytes): the file is truncated"
    )]
    Truncated {
        /// The program header index.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        size: u64,
        /// The file's length.
        len: u64,
    },
    /// `p_filesz > p_memsz`, or the segment wraps around.
    #[error(
        "segment {index} at {addr:#x}: {file_size:#x} bytes in the file but {mem_size:#x} in memory (or it wraps around)"
    )]
    BadSize {
        /// The program header index.
        index: usize,
        /// `p_paddr`.
        addr: u64,
        /// `p_filesz`.
        file_size: u64,
        /// `p_memsz`.
        mem_size: u64,
    },
    /// Two segments overlap in memory.
    #[error("segments {a} and {b} overlap in guest memory")]
    Overlap {
        /// One segment's index.
        a: usize,
        /// The other's.
        b: usize,
    },
    /// The entry point lies in no executable segment.
    #[error("the entry point {entry:#x} lies in no executable PT_LOAD segment")]
    EntryOutside {
        /// `e_entry`.
        entry: u64,
    },
}

/// Parses `bytes` as a 64-bit little-endian x86-64 ELF executable.
///
/// # Errors
/// [`ElfError`]: malformed headers, another machine, no or truncated
/// segments, sizes that disagree, overlapping segments, an entry point
/// outside the executable segments.
pub fn parse(bytes: &[u8]) -> Result<Program<'_>, ElfError> {
    let malformed = |e: object::read::Error| ElfError::Malformed(e.to_string());
    let header = FileHeader64::<Endianness>::parse(bytes).map_err(malformed)?;
    let endian = header.endian().map_err(malformed)?;
    let machine = header.e_machine(endian);
    if machine != EM_X86_64 {
        return Err(ElfError::WrongMachine { machine: machine.0 });
    }
    let headers = header.program_headers(endian, bytes).map_err(malformed)?;
    let mut segments = Vec::new();
    for (index, ph) in headers.iter().enumerate() {
        if ph.p_type(endian) != PT_LOAD {
            continue;
        }
        let (offset, size) = ph.file_range(endian);
        let data = bytes
            .read_bytes_at(offset, size)
            .map_err(|()| ElfError::Truncated {
                index,
                offset,
                size,
                len: bytes.len() as u64,
            })?;
        let addr = ph.p_paddr(endian);
        let mem_size = ph.p_memsz(endian);
        if size > mem_size || addr.checked_add(mem_size).is_none() {
            return Err(ElfError::BadSize {
                index,
                addr,
                file_size: size,
                mem_size,
            });
        }
        segments.push(Segment {
            index,
            addr,
            data,
            mem_size,
            exec: ph.p_flags(endian).0 & PF_X.0 != 0,
        });
    }
    if segments.is_empty() {
        return Err(ElfError::NoSegments);
    }
    for (i, a) in segments.iter().enumerate() {
        for b in &segments[i + 1..] {
            let (ra, rb) = (a.range(), b.range());
            if ra.start < rb.end && rb.start < ra.end {
                return Err(ElfError::Overlap {
                    a: a.index,
                    b: b.index,
                });
            }
        }
    }
    let entry = header.e_entry(endian);
    if !segments
        .iter()
        .any(|s| s.exec && s.range().contains(&entry))
    {
        return Err(ElfError::EntryOutside { entry });
    }
    Ok(Program { entry, segments })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 executable: one PT_LOAD of `code` at `addr`.
    pub(crate) fn tiny(addr: u64, code: &[u8], entry: u64) -> Vec<u8> {
        let mut f = vec![0u8; 0x78];
        f[..4].copy_from_slice(MAGIC);
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little endian
        f[6] = 1; // EV_CURRENT
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&0x40u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&0x38u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 0x40;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R|X
        f[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // p_offset
        f[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes());
        let n = code.len() as u64;
        f[ph + 32..ph + 40].copy_from_slice(&n.to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&(n + 0x100).to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn a_minimal_executable_parses() {
        let f = tiny(0x10_0000, &[0xf4], 0x10_0000);
        let p = parse(&f).unwrap();
        assert_eq!(p.entry, 0x10_0000);
        assert_eq!(p.segments.len(), 1);
        assert_eq!(p.segments[0].data, &[0xf4]);
        assert_eq!(p.segments[0].mem_size, 0x101);
        assert!(is_elf(&f));
    }

    #[test]
    fn bad_files_are_refused_by_name() {
        let good = tiny(0x10_0000, &[0xf4; 16], 0x10_0000);
        assert!(matches!(parse(b"\x7fELF"), Err(ElfError::Malformed(_))));
        assert!(matches!(parse(&good[..0x70]), Err(ElfError::Malformed(_))));
        // Truncated segment data.
        let e = parse(&good[..0x80]).unwrap_err();
        assert!(matches!(e, ElfError::Truncated { index: 0, .. }), "{e}");
        assert!(e.to_string().contains("segment 0"), "{e}");
        // Another machine.
        let mut arm = good.clone();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert_eq!(parse(&arm), Err(ElfError::WrongMachine { machine: 183 }));
        // An entry point outside the segment.
        let e = parse(&tiny(0x10_0000, &[0xf4], 0x20_0000)).unwrap_err();
        assert_eq!(e, ElfError::EntryOutside { entry: 0x20_0000 });
        // filesz > memsz.
        let mut big = good.clone();
        big[0x40 + 40..0x40 + 48].copy_from_slice(&1u64.to_le_bytes());
        assert!(matches!(parse(&big), Err(ElfError::BadSize { .. })));
        // A segment that wraps.
        let e = parse(&tiny(u64::MAX - 4, &[0xf4; 16], u64::MAX - 4)).unwrap_err();
        assert!(matches!(e, ElfError::BadSize { .. }), "{e}");
    }
}
