//! Boot structures: the GDT, identity page tables over all guest RAM, and the
//! register state of a vCPU entering 64-bit long mode (the guest ABI's entry
//! state, `docs/guest-abi.md`).
//!
//! Everything here is written below [`PAYLOAD_FLOOR`], the part of guest RAM
//! the VMM keeps for itself; [`written`] says exactly which bytes of it.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

/// Guest RAM below this address holds the VMM's boot structures.
pub const PAYLOAD_FLOOR: u64 = 0x10_0000;
/// Where the GDT lives.
pub const GDT_ADDR: u64 = 0x500;
/// The PML4.
pub const PML4_ADDR: u64 = 0x1000;
/// The PDPT (512 entries: up to 512 GiB of RAM).
pub const PDPT_ADDR: u64 = 0x2000;
/// The first page directory; one follows per GiB of RAM.
pub const PD_ADDR: u64 = 0x3000;
/// The most RAM the page directories below [`PAYLOAD_FLOOR`] can map.
pub const MAX_RAM: u64 = ((PAYLOAD_FLOOR - PD_ADDR) / 0x1000) << 30;
/// Each vCPU's stack size.
pub const STACK_SIZE: u64 = 64 << 10;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;
/// Cache disable and write-through (PCD | PWT): device memory.
const PTE_UNCACHED: u64 = 0x18;

/// GDT selectors.
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;
/// The CPL3 data selector (GDT entry 5, RPL 3), for payloads that drop to
/// user mode with `iretq`.
pub const USER_DATA_SELECTOR: u16 = 0x28 | 3;
/// The CPL3 64-bit code selector (GDT entry 6, RPL 3).
pub const USER_CODE_SELECTOR: u16 = 0x30 | 3;

/// The GDT: null, 64-bit code, data, TSS (two words in long mode; the
/// Firecracker layout so far), then user data and 64-bit user code.
pub fn gdt() -> [u64; 7] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
        0,
        gdt_entry(0xc0f3, 0, 0xfffff),
        gdt_entry(0xa0fb, 0, 0xfffff),
    ]
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
        | ((limit & 0x000f_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

fn segment(selector: u16, entry: u64) -> kvm_segment {
    let bits = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32,
        selector,
        type_: bits(40, 0xf),
        present: bits(47, 1),
        dpl: bits(45, 3),
        db: bits(54, 1),
        s: bits(44, 1),
        l: bits(53, 1),
        g: bits(55, 1),
        avl: bits(52, 1),
        unusable: 0,
        padding: 0,
    }
}

/// The page-table words to write, as `(guest address, value)`: an identity
/// map of `[0, ram_size)` with 2 MiB pages, user-accessible so that CPL3 code
/// can run too. `ram_size` must be at most [`MAX_RAM`].
pub fn page_tables(ram_size: u64) -> Vec<(u64, u64)> {
    let flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    let huge_pages = ram_size.div_ceil(2 << 20);
    let directories = huge_pages.div_ceil(512);
    let mut words = vec![(PML4_ADDR, PDPT_ADDR | flags)];
    for d in 0..directories {
        words.push((PDPT_ADDR + d * 8, (PD_ADDR + d * 0x1000) | flags));
    }
    for p in 0..huge_pages {
        words.push((PD_ADDR + p * 8, (p << 21) | flags | PTE_HUGE));
    }
    // The device window (virtio-mmio), uncached, where RAM leaves its 1 GiB
    // free: its page directory is the one RAM would use there.
    let mmio = crate::virtio::MMIO_BASE;
    if ram_size <= mmio {
        let gib = mmio >> 30;
        if gib >= directories {
            words.push((PDPT_ADDR + gib * 8, (PD_ADDR + gib * 0x1000) | flags));
        }
        let page = mmio >> 21;
        words.push((
            PD_ADDR + page * 8,
            (page << 21) | flags | PTE_HUGE | PTE_UNCACHED,
        ));
    }
    words
}

/// What the VMM writes into guest RAM before a payload loads: the GDT and
/// the page-table pages of [`page_tables`] for `ram_size`, as merged ranges
/// with their names. A payload segment may lie below [`PAYLOAD_FLOOR`] (the
/// ELF headers `ld -Ttext=0x100000` puts at `0xff000`, for one) as long as
/// it overlaps none of these.
pub fn written(ram_size: u64) -> Vec<(std::ops::Range<u64>, &'static str)> {
    let gdt_len = std::mem::size_of_val(&gdt()) as u64;
    let mut out = vec![(GDT_ADDR..GDT_ADDR + gdt_len, "the GDT")];
    let mut pages: Vec<u64> = page_tables(ram_size)
        .iter()
        .map(|(addr, _)| addr & !0xfff)
        .collect();
    pages.sort_unstable();
    pages.dedup();
    for page in pages {
        match out.last_mut() {
            Some((run, "the page tables")) if run.end == page => run.end = page + 0x1000,
            _ => out.push((page..page + 0x1000, "the page tables")),
        }
    }
    out
}

/// Special registers for 64-bit mode with paging through [`PML4_ADDR`].
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = gdt();
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment(CODE_SELECTOR, gdt[1]);
    let data = segment(DATA_SELECTOR, gdt[2]);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR, gdt[3]);
    // CR0: PE | MP | ET | NE | WP | PG. CR4: PAE | OSFXSR | OSXMMEXCPT.
    sregs.cr0 = 0x8005_0033;
    sregs.cr4 = 0x620;
    sregs.cr3 = PML4_ADDR;
    // EFER: LME | LMA.
    sregs.efer = 0x500;
    sregs
}

/// General registers at entry: `rip = entry`, `rsp = stack_top`,
/// `rdi = ram_size`, `rsi = vcpu_index`, interrupts off.
pub fn entry_regs(entry: u64, stack_top: u64, ram_size: u64, vcpu_index: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack_top,
        rdi: ram_size,
        rsi: vcpu_index,
        rflags: 0x2,
        ..Default::default()
    }
}

/// The top of vCPU `index`'s stack: stacks are stacked down from the top of
/// RAM, [`STACK_SIZE`] each.
pub fn stack_top(ram_size: u64, index: u64) -> u64 {
    ram_size - index * STACK_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit() {
        let cs = segment(CODE_SELECTOR, gdt()[1]);
        assert_eq!((cs.l, cs.db, cs.present, cs.type_, cs.s), (1, 0, 1, 0xb, 1));
        assert_eq!(cs.limit, 0xfffff);
    }

    #[test]
    fn user_segments_are_dpl3() {
        let g = gdt();
        let code = segment(USER_CODE_SELECTOR, g[6]);
        assert_eq!((code.dpl, code.l, code.type_), (3, 1, 0xb));
        let data = segment(USER_DATA_SELECTOR, g[5]);
        assert_eq!((data.dpl, data.type_), (3, 3));
    }

    #[test]
    fn page_tables_cover_ram() {
        let words = page_tables(64 << 20);
        // PML4 + 1 PDPT entry + 32 huge pages, and the device window: its
        // PDPT entry and one uncached huge page.
        assert_eq!(words.len(), 1 + 1 + 32 + 2);
        assert_eq!(words[33].1 & !0xfff, 31 << 21);
        let window = words.last().unwrap().1;
        assert_eq!(window & !0xfff, crate::virtio::MMIO_BASE);
        assert_eq!(window & 0x18, 0x18, "uncached");
        assert!(words.iter().all(|(a, _)| *a < PAYLOAD_FLOOR));
        let big = page_tables(MAX_RAM);
        assert!(big.iter().all(|(a, _)| *a < PAYLOAD_FLOOR));
    }

    #[test]
    fn written_names_the_gdt_and_every_page_table_page() {
        // 64 MiB: the PML4, the PDPT and one directory, then the device
        // window's directory (the fourth GiB's) on its own.
        let w = written(64 << 20);
        assert_eq!(w[0], (0x500..0x538, "the GDT"));
        assert_eq!(w[1], (0x1000..0x4000, "the page tables"));
        assert_eq!(w[2], (0x6000..0x7000, "the page tables"));
        assert_eq!(w.len(), 3);
        // The ELF headers `ld -Ttext=0x100000` makes, at 0xff000, touch none.
        assert!(w.iter().all(|(r, _)| r.end <= 0xff000));
        // At the most RAM, the directories fill up to the payload floor.
        let max = written(MAX_RAM);
        assert_eq!(max.last().unwrap().0.end, PAYLOAD_FLOOR);
    }
}
