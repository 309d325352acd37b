//! Second attack review (another reviewer who did not write the fixes):
//! trying to break the view budget's fixes. Its first run found pins whose
//! drop raised what the pinned windows could cost (adjacent pins merging,
//! pins inside a larger pin); pins are now charged for every boundary of
//! their own windows. The tests are kept as written, but for admission:
//! a pin past the budget is refused now, so they take what is admitted.

use gmem::{
    Attribute, BackingKind, GateOptions, Gatekeeper, MemoryOptions, Policy, SlotRequest, Vm,
    create_memory,
};
mod common;

use common::{gate_on, vmas_in};
use gmem_testkit::{kvm_or_skip, on_backing};

const P: u64 = 4096;
const MIB: u64 = 1 << 20;

/// Adjacent pins cost 2 VMAs together (one run), so all are admitted; then
/// every other one is dropped (its window stays open as cache) and its page
/// converted to private. The close splits the run; the fallback (close every
/// unpinned window) closes exactly the same pages: the pinned windows alone
/// now cost 2 per surviving pin.
#[test]
fn dropping_every_other_adjacent_pin_then_converting_splits_past_budget() {
    let test = "drop middle pins";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let size = 8 * MIB;
    let budget = 4;
    let opts = GateOptions::new(Attribute::Shared, Policy::InPlace).with_view_budget(budget);
    let (_vm, _mem, gate) = gate_on(BackingKind::Memfd, size, opts);
    let view = gate.view_addr(0).unwrap() as usize;
    let n = 200u64;
    let mut pins: Vec<Option<gmem::Pin>> = (0..n)
        // Pins whose windows' boundaries would pass the budget are refused
        // (adjacent pins each cost their ends).
        .map(|i| gate.pin(P + i * P, P).ok())
        .collect();
    println!(
        "after {n} adjacent pins: gmem {:?}, kernel {}",
        gate.view_vmas(),
        vmas_in(view, size as usize)
    );
    for i in (1..n).step_by(2) {
        pins[i as usize] = None;
    }
    println!(
        "after dropping odd ones: gmem {:?}, kernel {}",
        gate.view_vmas(),
        vmas_in(view, size as usize)
    );
    let mut refused = 0;
    for i in (1..n).step_by(2) {
        if gate.convert(P + i * P, P, Attribute::Private).is_err() {
            refused += 1;
        }
    }
    let (used, max) = gate.view_vmas();
    let kernel = vmas_in(view, size as usize);
    println!("after converting them: gmem {used} of {max}, kernel {kernel}, refused {refused}");
    assert!(
        used <= max && kernel <= max,
        "view costs {kernel} VMAs (gmem {used}), budget {max}"
    );
    drop(pins);
}

/// Same as above with no conversion at all: a refused pin elsewhere evicts
/// (closes every unpinned window), which splits the run the same way.
#[test]
fn a_refused_pin_evicts_and_splits_past_budget() {
    let test = "drop middle pins, evict";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let size = 8 * MIB;
    let opts = GateOptions::new(Attribute::Shared, Policy::InPlace).with_view_budget(4);
    let (_vm, _mem, gate) = gate_on(BackingKind::Memfd, size, opts);
    let view = gate.view_addr(0).unwrap() as usize;
    let n = 200u64;
    let mut pins: Vec<Option<gmem::Pin>> = (0..n).map(|i| gate.pin(P + i * P, P).ok()).collect();
    for i in (1..n).step_by(2) {
        pins[i as usize] = None;
    }
    let r = gate.pin(4 * MIB, P).map(drop);
    let (used, max) = gate.view_vmas();
    let kernel = vmas_in(view, size as usize);
    println!("refused pin {r:?}: gmem {used} of {max}, kernel {kernel}");
    assert!(kernel <= max, "view costs {kernel} VMAs, budget {max}");
}

fn walk(kind: BackingKind, budget: usize, seed0: u64, steps: usize) {
    let h = kind.page_size();
    let size = if kind.is_hugetlb() { 8 * h } else { 2 * MIB };
    let vm = Vm::new().unwrap();
    let mem = create_memory(MemoryOptions::new(kind, 2 * size), Some(&vm)).unwrap();
    let hi = vm.bind(&mem, SlotRequest::new(size, size, size)).unwrap();
    let lo = vm.bind(&mem, SlotRequest::new(0, 0, size)).unwrap();
    let gate = Gatekeeper::new(
        &vm,
        vec![hi, lo],
        GateOptions::new(Attribute::Shared, Policy::InPlace).with_view_budget(budget),
    )
    .unwrap();
    let views = [
        gate.view_addr(0).unwrap() as usize,
        gate.view_addr(size).unwrap() as usize,
    ];
    let mut seed = seed0;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let pages = 2 * size / P;
    let mut pins: Vec<gmem::Pin> = Vec::new();
    let mut log: Vec<String> = Vec::new();
    for step in 0..steps {
        let op = match rnd(5) {
            0 | 1 => {
                let g = if kind.is_hugetlb() && rnd(2) == 0 {
                    rnd(2 * size / h) * h
                } else {
                    rnd(pages) * P
                };
                let len = if kind.is_hugetlb() && rnd(2) == 0 {
                    (1 + rnd(3)) * h
                } else {
                    (1 + rnd(4)) * P
                };
                let r = gate.pin(g, len);
                let s = format!(
                    "pin {g:#x}+{len:#x} -> {:?}",
                    r.as_ref().map(|_| ()).map_err(|e| e.to_string())
                );
                if let Ok(p) = r {
                    pins.push(p);
                }
                s
            }
            2 => {
                if pins.is_empty() {
                    continue;
                }
                let i = rnd(pins.len() as u64) as usize;
                let p = pins.swap_remove(i);
                format!("drop pin {:#x}", p.gpa())
            }
            3 => {
                let g = rnd(pages) * P;
                let to = if rnd(3) == 0 {
                    Attribute::Shared
                } else {
                    Attribute::Private
                };
                let r = gate.convert(g, P, to);
                format!(
                    "convert {g:#x} {to:?} -> {:?}",
                    r.map(|_| ()).map_err(|e| e.to_string())
                )
            }
            _ => {
                let g = rnd(pages) * P;
                let r = gate.discard(g, P);
                format!(
                    "discard {g:#x} -> {:?}",
                    r.map(|_| ()).map_err(|e| e.to_string())
                )
            }
        };
        log.push(op);
        let (used, max) = gate.view_vmas();
        let kernel = vmas_in(views[0], size as usize) + vmas_in(views[1], size as usize);
        if kernel > max || used > max || kernel > used + 1 {
            let tail = &log[log.len().saturating_sub(25)..];
            panic!(
                "{kind:?} budget {budget} seed {seed0:#x} step {step}: kernel {kernel} ({} + {}), gmem {used}, max {max}; pins {} {:x?} windows {:?}\n{}",
                vmas_in(views[0], size as usize),
                vmas_in(views[1], size as usize),
                pins.len(),
                gate.pins()
                    .iter()
                    .map(|p| p.range.clone())
                    .collect::<Vec<_>>(),
                gate.view_windows(),
                tail.join("\n")
            );
        }
    }
}

#[test]
fn walk_memfd_budgets() {
    let test = "walk memfd";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    for budget in [1, 2, 3, 6, 16] {
        for s in 1..4u64 {
            walk(
                BackingKind::Memfd,
                budget,
                0x9e37_79b9_7f4a_7c15 ^ (s * 0x1234_5678 + budget as u64),
                1500,
            );
        }
    }
}

#[test]
fn walk_hugetlb_budgets() {
    let test = "walk hugetlb";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(_on) = on_backing(test, BackingKind::Hugetlb2M, 16) else {
        return;
    };
    for budget in [1, 2, 3, 6, 16] {
        for s in 1..4u64 {
            walk(
                BackingKind::Hugetlb2M,
                budget,
                0x9e37_79b9_7f4a_7c15 ^ (s * 0x1234_5678 + budget as u64),
                1500,
            );
        }
    }
}

/// hugetlb: small pins inside one big pinned window cost nothing at
/// admission (pinned_cost takes the union of the pinned windows), though
/// each is `charge`d as a boundary afterwards. Drop the big pin, convert a
/// 4 KiB page in each huge page between the small pins: the close takes
/// whole open runs around the pinned windows, and every small pin's edges
/// become real VMA boundaries.
#[test]
fn hugetlb_pins_inside_a_big_pin_split_past_budget_once_it_drops() {
    let test = "hugetlb nested pins";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(_on) = on_backing(test, BackingKind::Hugetlb2M, 16) else {
        return;
    };
    let h = 2 * MIB;
    let size = 16 * h;
    let opts = GateOptions::new(Attribute::Shared, Policy::InPlace).with_view_budget(4);
    let (_vm, _mem, gate) = gate_on(BackingKind::Hugetlb2M, size, opts);
    let view = gate.view_addr(0).unwrap() as usize;
    let big = gate.pin(h, 14 * h).unwrap();
    let small: Vec<gmem::Pin> = (1..15)
        .step_by(2)
        .filter_map(|i| gate.pin(i * h, P).ok())
        .collect();
    println!(
        "small pins admitted: {:x?}",
        small.iter().map(|p| p.gpa()).collect::<Vec<_>>()
    );
    println!(
        "pinned: gmem {:?}, kernel {}",
        gate.view_vmas(),
        vmas_in(view, size as usize)
    );
    drop(big);
    for i in (2..15).step_by(2) {
        gate.convert(i * h + P, P, Attribute::Private).unwrap();
    }
    let (used, max) = gate.view_vmas();
    let kernel = vmas_in(view, size as usize);
    println!("after: gmem {used} of {max}, kernel {kernel}");
    assert!(kernel <= max, "view costs {kernel} VMAs, budget {max}");
    drop(small);
}

/// memfd: the same nesting, with no drop order trick needed beyond the big
/// pin: small pins at every other page inside a big pin cost nothing.
#[test]
fn memfd_pins_inside_a_big_pin_split_past_budget_once_it_drops() {
    let test = "memfd nested pins";
    if !kvm_or_skip(test) || on_backing(test, BackingKind::Memfd, 0).is_none() {
        return;
    }
    let size = 8 * MIB;
    let opts = GateOptions::new(Attribute::Shared, Policy::InPlace).with_view_budget(4);
    let (_vm, _mem, gate) = gate_on(BackingKind::Memfd, size, opts);
    let view = gate.view_addr(0).unwrap() as usize;
    let n = 1000u64;
    let big = gate.pin(P, 2 * n * P).unwrap();
    let small: Vec<gmem::Pin> = (0..n)
        .filter_map(|i| gate.pin(P + 2 * i * P, 1).ok())
        .collect();
    drop(big);
    let r = gate.pin(6 * MIB, P).map(drop);
    let (used, max) = gate.view_vmas();
    let kernel = vmas_in(view, size as usize);
    println!("refused pin {r:?}; gmem {used} of {max}, kernel {kernel}");
    assert!(kernel <= max, "view costs {kernel} VMAs, budget {max}");
    drop(small);
}
