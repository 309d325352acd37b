//! Tries to make the VMM's virtio-blk device touch private memory, with a
//! split virtqueue of its own (no driver library, so every descriptor is
//! the attacker's to forge), and checks that each attempt is refused and
//! the VM lives on:
//!
//! 1. a data buffer in private RAM: the status is IOERR, the private buffer
//!    is untouched;
//! 2. the request header in private RAM: IOERR;
//! 3. the status byte in private RAM: the device cannot answer, and marks
//!    itself as needing reset (status bit 0x40);
//! 4. the descriptor table in private RAM: needs reset;
//! 5. the available ring converted to private after setup: needs reset;
//! 6. two requests in one notification, the first into private RAM, the
//!    second with its header and status on one page (as `BatchBlk` puts
//!    them): IOERR, then OK, the private page untouched;
//! 7. a write to the disk from private RAM: IOERR, and reading the sector
//!    back shows none of its bytes;
//! 8. a data buffer straddling from private RAM into the shared pool (its
//!    first 256 bytes private): IOERR, the private bytes untouched;
//! 9. an indirect table (a feature the device does not offer) in private
//!    RAM: needs reset;
//!
//! and after each reset a clean request succeeds. Exits 0 if all held, else
//! the number of the attempt that did not.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use gmem_guest::mem::{self, Attribute};
use gmem_guest::{Boot, abi, println, virtio};

gmem_guest::entry!(main);

const QSIZE: u16 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;

/// Private memory the attacks point the device at (the guest's RAM is
/// private after launch).
#[repr(align(4096))]
struct Page(#[expect(dead_code, reason = "reached by address only")] [u8; 4096]);
static mut PRIVATE: [Page; 4] = [const { Page([0x5e; 4096]) }; 4];

fn private(i: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { core::ptr::addr_of!(PRIVATE[i]) as u64 }
}

struct Blk {
    regs: u64,
    /// Shared pages: descriptors, avail, used, header, data, status.
    shared: u64,
    next_avail: u16,
    last_used: u16,
}

fn rd(addr: u64) -> u32 {
    // SAFETY: an MMIO register of the device window (identity-mapped).
    unsafe { read_volatile(addr as *const u32) }
}

fn wr(addr: u64, v: u32) {
    // SAFETY: as `rd`.
    unsafe { write_volatile(addr as *mut u32, v) }
}

fn put<T>(addr: u64, v: T) {
    // SAFETY: guest RAM the attacker owns (shared or private).
    unsafe { write_volatile(addr as *mut T, v) }
}

fn get<T: Copy>(addr: u64) -> T {
    // SAFETY: as `put`.
    unsafe { read_volatile(addr as *const T) }
}

impl Blk {
    fn desc(&self) -> u64 {
        self.shared
    }
    fn avail(&self) -> u64 {
        self.shared + 0x1000
    }
    fn used(&self) -> u64 {
        self.shared + 0x2000
    }
    fn header(&self) -> u64 {
        self.shared + 0x3000
    }
    fn data(&self) -> u64 {
        self.shared + 0x4000
    }
    fn status_byte(&self) -> u64 {
        self.shared + 0x5000
    }

    /// Resets the device and sets its queue up at `desc` (the rest in the
    /// shared pages).
    fn setup(&mut self, desc: u64) {
        let r = self.regs;
        wr(r + 0x70, 0);
        wr(r + 0x70, 1 | 2);
        wr(r + 0x24, 1);
        wr(r + 0x20, 1); // VERSION_1 (bit 32)
        wr(r + 0x24, 0);
        wr(r + 0x20, 0);
        wr(r + 0x70, 1 | 2 | 8);
        wr(r + 0x30, 0);
        wr(r + 0x38, u32::from(QSIZE));
        wr(r + 0x80, desc as u32);
        wr(r + 0x84, (desc >> 32) as u32);
        wr(r + 0x90, self.avail() as u32);
        wr(r + 0x94, 0);
        wr(r + 0xa0, self.used() as u32);
        wr(r + 0xa4, 0);
        for off in (0..0x1000).step_by(8) {
            put::<u64>(self.avail() + off, 0);
            put::<u64>(self.used() + off, 0);
        }
        wr(r + 0x44, 1);
        wr(r + 0x70, 1 | 2 | 4 | 8);
        self.next_avail = 0;
        self.last_used = 0;
    }

    fn status(&self) -> u32 {
        rd(self.regs + 0x70)
    }

    /// One read request of sector 0: header at `hdr`, data at `data`,
    /// status at `st`, descriptors at `desc`. The status the device gave,
    /// or `None` if it answered nothing.
    fn read(&mut self, desc: u64, hdr: u64, data: u64, st: u64) -> Option<u8> {
        put::<u32>(hdr, 0); // VIRTIO_BLK_T_IN
        put::<u32>(hdr + 4, 0);
        put::<u64>(hdr + 8, 0);
        put::<u8>(st, 0xff);
        let d = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            put::<u64>(desc + 16 * i, addr);
            put::<u32>(desc + 16 * i + 8, len);
            put::<u16>(desc + 16 * i + 12, flags);
            put::<u16>(desc + 16 * i + 14, next);
        };
        d(0, hdr, 16, 1, 1);
        d(1, data, 512, 1 | 2, 2);
        d(2, st, 1, 2, 0);
        let slot = u64::from(self.next_avail % QSIZE);
        put::<u16>(self.avail() + 4 + 2 * slot, 0);
        self.next_avail = self.next_avail.wrapping_add(1);
        put::<u16>(self.avail() + 2, self.next_avail);
        wr(self.regs + 0x50, 0);
        // The device answers during the notification's exit.
        let used: u16 = get(self.used() + 2);
        if used == self.last_used {
            return None;
        }
        self.last_used = used;
        Some(get::<u8>(st))
    }

    /// Writes descriptor `i` of the table at `desc`.
    fn put_desc(&self, desc: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        put::<u64>(desc + 16 * i, addr);
        put::<u32>(desc + 16 * i + 8, len);
        put::<u16>(desc + 16 * i + 12, flags);
        put::<u16>(desc + 16 * i + 14, next);
    }

    /// Makes the chain at `head` available, without notifying.
    fn publish(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % QSIZE);
        put::<u16>(self.avail() + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        put::<u16>(self.avail() + 2, self.next_avail);
    }

    /// Notifies the queue; how many chains the device used.
    fn kick(&mut self) -> u16 {
        wr(self.regs + 0x50, 0);
        let used: u16 = get(self.used() + 2);
        let n = used.wrapping_sub(self.last_used);
        self.last_used = used;
        n
    }

    /// A request header (type, sector) at `at`.
    fn put_header(&self, at: u64, kind: u32, sector: u64) {
        put::<u32>(at, kind);
        put::<u32>(at + 4, 0);
        put::<u64>(at + 8, sector);
    }

    fn clean_read(&mut self) -> bool {
        let (desc, hdr, data, st) = (self.desc(), self.header(), self.data(), self.status_byte());
        self.read(desc, hdr, data, st) == Some(0)
    }
}

fn main(boot: Boot) -> i32 {
    if boot.vcpu != 0 {
        gmem_guest::park();
    }
    if virtio::init(&boot).is_err() {
        return 90;
    }
    let base = u64::from(abi::query(abi::Key::MmioBase));
    let Some(regs) = (0..abi::query(abi::Key::Devices))
        .map(|i| base + u64::from(i) * 0x1000)
        .find(|&r| rd(r + 8) == 2)
    else {
        println!("attacker: no virtio-blk device");
        return 91;
    };
    // The shared pages the attacker's own queue uses: past what GmemHal
    // would hand out first (the attacker uses no driver).
    let shared = virtio::pool_start() as u64 + 0x10_0000;
    let mut blk = Blk {
        regs,
        shared,
        next_avail: 0,
        last_used: 0,
    };
    blk.setup(blk.desc());
    if !blk.clean_read() {
        println!("attacker: a clean read failed before any attack");
        return 92;
    }
    let (desc, hdr, data, st) = (blk.desc(), blk.header(), blk.data(), blk.status_byte());

    // 1. A data buffer in private RAM.
    let got = blk.read(desc, hdr, private(0), st);
    let untouched = (0..4096).all(|i| get::<u8>(private(0) + i) == 0x5e);
    println!(
        "attack 1, a data buffer in private memory: status {got:?}, private page untouched: {untouched}"
    );
    if got != Some(1) || !untouched {
        return 1;
    }
    // 2. The request header in private RAM (it reads as a write request
    // to the attacker, but the device cannot read it at all).
    let got = blk.read(desc, private(1), data, st);
    println!("attack 2, the request header in private memory: status {got:?}");
    if got != Some(1) {
        return 2;
    }
    // 3. The status byte in private RAM.
    let got = blk.read(desc, hdr, data, private(2));
    let needs_reset = blk.status() & STATUS_NEEDS_RESET != 0;
    println!(
        "attack 3, the status byte in private memory: answered {got:?}, device needs reset: {needs_reset}"
    );
    if !needs_reset {
        return 3;
    }
    blk.setup(desc);
    if !blk.clean_read() {
        return 30;
    }
    // 4. The descriptor table in private RAM.
    blk.setup(private(3));
    let got = blk.read(private(3), hdr, data, st);
    let needs_reset = blk.status() & STATUS_NEEDS_RESET != 0;
    println!(
        "attack 4, the descriptor table in private memory: answered {got:?}, device needs reset: {needs_reset}"
    );
    if !needs_reset {
        return 4;
    }
    blk.setup(desc);
    if !blk.clean_read() {
        return 40;
    }
    // 5. The available ring converted to private after setup.
    if mem::convert(blk.avail(), 1, Attribute::Private).is_err() {
        return 50;
    }
    let got = blk.read(desc, hdr, data, st);
    let needs_reset = blk.status() & STATUS_NEEDS_RESET != 0;
    println!(
        "attack 5, the available ring made private after setup: answered {got:?}, device needs reset: {needs_reset}"
    );
    if !needs_reset {
        return 5;
    }
    if mem::convert(blk.avail(), 1, Attribute::Shared).is_err() {
        return 51;
    }
    blk.setup(desc);
    if !blk.clean_read() {
        return 52;
    }
    // 6. Two requests in one notification: the first's data private, the
    // second's header and status sharing a page.
    let (hdr2, st2) = (hdr + 0x100, hdr + 0x200);
    blk.put_header(hdr, 0, 0);
    blk.put_header(hdr2, 0, 0);
    put::<u8>(st, 0xff);
    put::<u8>(st2, 0xff);
    blk.put_desc(desc, 0, hdr, 16, 1, 1);
    blk.put_desc(desc, 1, private(0), 512, 1 | 2, 2);
    blk.put_desc(desc, 2, st, 1, 2, 0);
    blk.put_desc(desc, 3, hdr2, 16, 1, 4);
    blk.put_desc(desc, 4, data, 512, 1 | 2, 5);
    blk.put_desc(desc, 5, st2, 1, 2, 0);
    blk.publish(0);
    blk.publish(3);
    let used = blk.kick();
    let (a, b) = (get::<u8>(st), get::<u8>(st2));
    let untouched = (0..4096).all(|i| get::<u8>(private(0) + i) == 0x5e);
    println!(
        "attack 6, two requests in one notification, the first into private memory: {used} used, statuses {a} and {b}, private page untouched: {untouched}"
    );
    if used != 2 || a != 1 || b != 0 || !untouched {
        return 6;
    }
    // 7. A write to sector 1 from private memory; then sector 1 read back.
    blk.put_header(hdr, 1, 1);
    put::<u8>(st, 0xff);
    blk.put_desc(desc, 0, hdr, 16, 1, 1);
    blk.put_desc(desc, 1, private(0), 512, 1, 2);
    blk.put_desc(desc, 2, st, 1, 2, 0);
    blk.publish(0);
    let used = blk.kick();
    let wrote = get::<u8>(st);
    blk.put_header(hdr, 0, 1);
    put::<u8>(st, 0xff);
    for i in 0..512 {
        put::<u8>(data + i, 0);
    }
    blk.put_desc(desc, 1, data, 512, 1 | 2, 2);
    blk.publish(0);
    let used = used + blk.kick();
    let leaked = (0..512).filter(|&i| get::<u8>(data + i) == 0x5e).count();
    println!(
        "attack 7, a write to the disk from private memory: status {wrote}, read back {}, {leaked} private bytes on the disk",
        get::<u8>(st)
    );
    if used != 2 || wrote != 1 || get::<u8>(st) != 0 || leaked != 0 {
        return 7;
    }
    // 8. A buffer from the last 256 bytes of the private page below the
    // pool into the pool's first page.
    let below = virtio::pool_start() as u64 - 256;
    let before: [u8; 256] = core::array::from_fn(|i| get::<u8>(below + i as u64));
    blk.put_header(hdr, 0, 0);
    put::<u8>(st, 0xff);
    blk.put_desc(desc, 1, below, 512, 1 | 2, 2);
    blk.publish(0);
    let used = blk.kick();
    let untouched = (0..256).all(|i| get::<u8>(below + i as u64) == before[i]);
    println!(
        "attack 8, a buffer from private memory into the shared pool: {used} used, status {}, private bytes untouched: {untouched}",
        get::<u8>(st)
    );
    if used != 1 || get::<u8>(st) != 1 || !untouched {
        return 8;
    }
    // 9. An indirect table in private memory.
    let table = private(1);
    blk.put_desc(table, 0, hdr, 16, 1, 1);
    blk.put_desc(table, 1, data, 512, 1 | 2, 2);
    blk.put_desc(table, 2, st, 1, 2, 0);
    put::<u8>(st, 0xff);
    blk.put_desc(desc, 0, table, 48, 4, 0);
    blk.publish(0);
    let used = blk.kick();
    let needs_reset = blk.status() & STATUS_NEEDS_RESET != 0;
    println!(
        "attack 9, an indirect table in private memory: {used} used, device needs reset: {needs_reset}"
    );
    if used != 0 || !needs_reset || get::<u8>(st) != 0xff {
        return 9;
    }
    blk.setup(desc);
    if !blk.clean_read() {
        return 93;
    }
    println!("attacker: every attempt was refused, and the VM lives");
    0
}
