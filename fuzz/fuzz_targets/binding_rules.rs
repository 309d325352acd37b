//! The binding rules (`SlotTable::check`) against a naive model of the
//! kernel's `kvm_set_memory_region` + `kvm_gmem_bind` checks (spec §3.1),
//! over random binds and deletes in one VM with three files: its own, another
//! VM's, and one that belongs to whichever VM binds it first.
#![no_main]

use gmem::{BindError, FileFacts, Slot, SlotRequest, SlotTable, VmId};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const MAX_SLOTS: u32 = 8;
const PAGE: u64 = 4096;
const EINVAL: i32 = 22;
const EEXIST: i32 = 17;
const ENOSPC: i32 = 28;

#[derive(Arbitrary, Debug)]
enum Op {
    Bind {
        file: u8,
        slot: Option<u8>,
        gpa: u64,
        offset: u64,
        len: u64,
        /// Shrink the values to small page multiples, where the rules bite.
        small: bool,
    },
    Delete {
        slot: u8,
    },
}

#[derive(Clone, Copy, Debug)]
struct Bound {
    slot: u16,
    gpa: u64,
    len: u64,
    file: usize,
    offset: u64,
}

/// The rules as the kernel states them, in 128-bit arithmetic.
fn model(bound: &[Bound], vm: VmId, file: FileFacts, req: SlotRequest) -> Result<u16, i32> {
    let (gpa, offset, len) = (req.guest_phys_addr, req.offset, req.len);
    let (g, o, l) = (u128::from(gpa), u128::from(offset), u128::from(len));
    if len == 0 || len % PAGE != 0 || gpa % PAGE != 0 || offset % PAGE != 0 {
        return Err(EINVAL);
    }
    if o + l > u128::from(u64::MAX) {
        return Err(EINVAL);
    }
    let slot = match req.slot {
        Some(s) if u32::from(s.0) >= MAX_SLOTS => return Err(EINVAL),
        Some(s) => s.0,
        None => match (0..MAX_SLOTS as u16).find(|s| bound.iter().all(|b| b.slot != *s)) {
            Some(s) => s,
            None => return Err(ENOSPC),
        },
    };
    if g + l > u128::from(u64::MAX) || len / PAGE > (1 << 31) - 1 {
        return Err(EINVAL);
    }
    if bound.iter().any(|b| b.slot == slot) {
        return Err(EINVAL);
    }
    let overlap = |a: u128, al: u128, b: u64, bl: u64| {
        a < u128::from(b) + u128::from(bl) && u128::from(b) < a + al
    };
    if bound.iter().any(|b| overlap(g, l, b.gpa, b.len)) {
        return Err(EEXIST);
    }
    if file.owner.is_some_and(|owner| owner != vm) {
        return Err(EINVAL);
    }
    if o + l > u128::from(file.size) {
        return Err(EINVAL);
    }
    if bound
        .iter()
        .any(|b| b.file == file.id && overlap(o, l, b.offset, b.len))
    {
        return Err(EINVAL);
    }
    Ok(slot)
}

fuzz_target!(|ops: Vec<Op>| {
    let vm = VmId::from_raw(1);
    let mut files = [
        FileFacts::new(1, Some(vm), 64 * PAGE),
        FileFacts::new(2, Some(VmId::from_raw(2)), 64 * PAGE),
        FileFacts::new(3, None, 16 * PAGE),
    ];
    let mut table = SlotTable::new();
    let mut bound: Vec<Bound> = Vec::new();
    for op in ops.into_iter().take(64) {
        match op {
            Op::Bind {
                file,
                slot,
                gpa,
                offset,
                len,
                small,
            } => {
                let (gpa, offset, len) = if small {
                    ((gpa % 64) * PAGE, (offset % 80) * PAGE, (len % 24) * PAGE)
                } else {
                    (gpa, offset, len)
                };
                let f = files[usize::from(file) % files.len()];
                let mut req = SlotRequest::new(gpa, offset, len);
                if let Some(s) = slot {
                    req = req.in_slot(Slot(u16::from(s % 12)));
                }
                let got = table.check(vm, MAX_SLOTS, f, req);
                let want = model(&bound, vm, f, req);
                match (&got, want) {
                    (Ok(slot), Ok(s)) => assert_eq!(slot.0, s, "{req:?}"),
                    (Err(e), Err(errno)) => assert_eq!(e.errno(), errno, "{req:?}: {e}"),
                    _ => panic!("{req:?}: gmem {got:?}, model {want:?}"),
                }
                if let Ok(slot) = got {
                    table.insert(slot, f, req);
                    bound.push(Bound {
                        slot: slot.0,
                        gpa,
                        len,
                        file: f.id,
                        offset,
                    });
                    // Vm::bind's claim: an unowned file is this VM's from now on.
                    for file in &mut files {
                        if file.id == f.id && file.owner.is_none() {
                            file.owner = Some(vm);
                        }
                    }
                }
                if let Err(BindError::Kvm { .. }) = got {
                    panic!("the pure rules never report a KVM error");
                }
            }
            Op::Delete { slot } => {
                let slot = u16::from(slot % 12);
                let was = bound.iter().any(|b| b.slot == slot);
                assert_eq!(table.remove(Slot(slot)), was);
                bound.retain(|b| b.slot != slot);
            }
        }
        assert_eq!(table.len(), bound.len());
    }
});
