//! The window cache of the gatekeeper's host views, and what it costs.
//!
//! Each region's view is a `PROT_NONE` mapping; a pin opens a *window* (whole
//! backing pages, read-write) and the window stays open after the pin as a
//! cache, until a conversion to private closes it or the budget needs it.
//! [`ViewState`] is one region's cache: which windows are open, and the map
//! entries (VMAs) the view costs for it, counted the way the kernel keeps
//! them:
//!
//! - a shmem or guest_memfd view is split by each `mprotect` and merges
//!   back when its neighbours' protections agree again: it costs one VMA per
//!   run of equal protection;
//! - a hugetlb view never merges back: every boundary an `mprotect` ever
//!   made stays a VMA boundary, until the view is mapped afresh
//!   ([`ViewState::compact`]), which gmem does when no pin is held there.
//!
//! The budget is as wide as the resource. `vm.max_map_count` is per
//! process, so every gatekeeper reserves its views' VMAs from one
//! process-wide budget ([`process_view_budget`]) when it is created, and
//! stays within its reservation ([`GateOptions::view_budget`](super::GateOptions::view_budget))
//! for its life: no guest can make its VMM's other VMs, thread stacks or
//! allocations run out of map entries, and a VM that cannot get its share is
//! refused at creation with a typed error, not starved later.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Mutex;

use super::error::GateError;
use crate::range_set::RangeSet;

/// The process-wide budget of view VMAs: what every live gatekeeper has
/// reserved, and the limit (0 until first read: half of
/// `vm.max_map_count`).
struct ProcessBudget {
    used: usize,
    limit: usize,
}

static PROCESS: Mutex<ProcessBudget> = Mutex::new(ProcessBudget { used: 0, limit: 0 });

fn process() -> std::sync::MutexGuard<'static, ProcessBudget> {
    // Two integers, updated together under the lock: consistent even if a
    // panic poisoned it elsewhere.
    let mut b = PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    if b.limit == 0 {
        b.limit = (max_map_count() / 2).max(1) as usize;
    }
    b
}

/// `vm.max_map_count` (65,530 by default; that value if unreadable).
pub(crate) fn max_map_count() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65_530)
}

/// The process-wide budget of view map entries: `(reserved, limit)`. Every
/// live gatekeeper holds a reservation of one VMA per region plus its
/// [`GateOptions::view_budget`](super::GateOptions::view_budget); the limit
/// is half of `vm.max_map_count` unless [`set_process_view_budget`] says
/// otherwise, so the other half stays for the VMM's own mappings (thread
/// stacks, allocations, memslots).
pub fn process_view_budget() -> (usize, usize) {
    let b = process();
    (b.used, b.limit)
}

/// Sets the process-wide budget of view map entries. Gatekeepers already
/// created keep their reservations; new ones are refused while the
/// reservations would pass `limit`.
///
/// # Errors
/// [`GateError::ZeroBudget`] (`EINVAL`) for 0.
pub fn set_process_view_budget(limit: usize) -> Result<(), GateError> {
    if limit == 0 {
        return Err(GateError::ZeroBudget);
    }
    process().limit = limit;
    Ok(())
}

/// A gatekeeper's share of the process-wide budget; released on drop.
#[derive(Debug)]
pub(crate) struct Reservation(usize);

impl Reservation {
    /// Reserves `vmas` map entries from the process-wide budget.
    ///
    /// # Errors
    /// [`GateError::ProcessViewBudget`] (`ENOMEM`) if the reservations of
    /// live gatekeepers leave fewer than `vmas`.
    pub(crate) fn take(vmas: usize) -> Result<Reservation, GateError> {
        let mut b = process();
        match b.used.checked_add(vmas) {
            Some(total) if total <= b.limit => {
                b.used = total;
                Ok(Reservation(vmas))
            }
            _ => Err(GateError::ProcessViewBudget {
                wanted: vmas,
                reserved: b.used,
                limit: b.limit,
                max_map_count: max_map_count(),
            }),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut b = process();
        b.used = b.used.saturating_sub(self.0);
    }
}

/// One region's view windows, in GPA. Every method is arithmetic: the
/// gatekeeper makes the `mprotect` calls and tells this what happened.
#[derive(Clone, Debug)]
pub(crate) struct ViewState {
    /// The view's bounds in GPA: the whole backing pages of the region (on
    /// hugetlb they may start before and end after the region).
    lo: u64,
    hi: u64,
    /// Whether VMAs split by `mprotect` stay split (hugetlb).
    sticky: bool,
    /// The open windows: whole backing pages, inside the region.
    open: RangeSet,
    /// hugetlb: every boundary an `mprotect` made inside the view.
    splits: BTreeSet<u64>,
    /// The ends of every live pin's window, counted (how many pins' windows
    /// end there): the boundaries the pinned windows could ever need,
    /// whatever else closes around them.
    pinned_ends: BTreeMap<u64, u32>,
}

impl ViewState {
    /// A closed view over `[lo, hi)`; `sticky` on hugetlb.
    pub(crate) fn new(lo: u64, hi: u64, sticky: bool) -> ViewState {
        ViewState {
            lo,
            hi,
            sticky,
            open: RangeSet::new(),
            splits: BTreeSet::new(),
            pinned_ends: BTreeMap::new(),
        }
    }

    /// The open windows.
    pub(crate) fn open(&self) -> &RangeSet {
        &self.open
    }

    /// Whether all of `w` is open.
    pub(crate) fn is_open(&self, w: &Range<u64>) -> bool {
        self.open.contains(w.clone())
    }

    /// The VMAs the view costs now.
    pub(crate) fn vmas(&self) -> usize {
        self.vmas_if_open(&self.open)
    }

    /// The VMAs the view would cost with exactly `open` open: one per run
    /// of equal protection on shmem; on hugetlb every boundary made so far,
    /// and those of `open`'s runs.
    pub(crate) fn vmas_if_open(&self, open: &RangeSet) -> usize {
        if self.sticky {
            let new = open
                .iter()
                .flat_map(|r| [r.start, r.end])
                .filter(|b| *b != self.lo && *b != self.hi && !self.splits.contains(b))
                .collect::<BTreeSet<u64>>()
                .len();
            return 1 + self.splits.len() + new;
        }
        let runs = open.run_count();
        if runs == 0 {
            return 1;
        }
        let mut vmas = 2 * runs + 1;
        if open.iter().next().is_some_and(|r| r.start == self.lo) {
            vmas -= 1;
        }
        if open.iter().last().is_some_and(|r| r.end == self.hi) {
            vmas -= 1;
        }
        vmas
    }

    /// Whether `mprotect` splits stay (hugetlb).
    pub(crate) fn is_sticky(&self) -> bool {
        self.sticky
    }

    /// Records a pin of window `w`: its ends are boundaries the view may
    /// need whatever closes around it (a pinned window inside a larger
    /// open run becomes one the day the run closes), so they are paid for
    /// now; on hugetlb they count as splits from now on.
    pub(crate) fn pin_window(&mut self, w: &Range<u64>) {
        for b in self.inner_ends(w) {
            *self.pinned_ends.entry(b).or_insert(0) += 1;
        }
        self.split_at(w);
    }

    /// Records that a pin of window `w` went.
    pub(crate) fn unpin_window(&mut self, w: &Range<u64>) {
        for b in self.inner_ends(w) {
            if let Some(c) = self.pinned_ends.get_mut(&b) {
                *c -= 1;
                if *c == 0 {
                    self.pinned_ends.remove(&b);
                }
            }
        }
    }

    /// The ends of `w` that are not the view's own.
    fn inner_ends(&self, w: &Range<u64>) -> impl Iterator<Item = u64> + use<> {
        let (lo, hi) = (self.lo, self.hi);
        [w.start, w.end]
            .into_iter()
            .filter(move |b| *b != lo && *b != hi)
    }

    /// The most VMAs beyond one the view could need for its pinned windows,
    /// and `extra` (a window about to be pinned), whatever opens and closes
    /// around them: one per boundary any of them has (on hugetlb, with
    /// every split made so far, which only a fresh mapping clears). Dropping
    /// a pin never raises it.
    pub(crate) fn pinned_cost(&self, extra: Option<&Range<u64>>) -> usize {
        let mut ends: BTreeSet<u64> = self.pinned_ends.keys().copied().collect();
        if let Some(w) = extra {
            ends.extend(self.inner_ends(w));
        }
        if self.sticky {
            ends.extend(self.splits.iter().copied());
        }
        ends.len()
    }

    /// The VMAs the view would cost with `parts` opened too (one
    /// `mprotect` each).
    pub(crate) fn vmas_after(&self, parts: &[Range<u64>]) -> usize {
        let mut after = self.clone();
        for p in parts {
            after.opened(p.clone());
        }
        after.vmas()
    }

    /// Records that `w` was opened (an `mprotect` over exactly `w`).
    pub(crate) fn opened(&mut self, w: Range<u64>) {
        self.split_at(&w);
        self.open.insert(w);
    }

    /// Records that `w` was closed (an `mprotect` over exactly `w`).
    pub(crate) fn closed(&mut self, w: Range<u64>) {
        self.split_at(&w);
        self.open.remove(w);
    }

    /// Records an `mprotect` over `w` whose outcome is unknown (it failed
    /// part-way): its ends may be boundaries now.
    pub(crate) fn touched(&mut self, w: &Range<u64>) {
        self.split_at(w);
    }

    fn split_at(&mut self, w: &Range<u64>) {
        if self.sticky {
            for b in [w.start, w.end] {
                if b != self.lo && b != self.hi {
                    self.splits.insert(b);
                }
            }
        }
    }

    /// Whether mapping the view afresh would give map entries back (a
    /// hugetlb view that `mprotect` split).
    pub(crate) fn can_compact(&self) -> bool {
        self.sticky && !self.splits.is_empty()
    }

    /// Records that the view was mapped afresh, `PROT_NONE`: one VMA, no
    /// window open (the caller checked no pin is held there).
    pub(crate) fn compacted(&mut self) {
        self.open = RangeSet::new();
        self.splits.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    /// The VMAs `v` would cost with `r` opened too.
    fn after(v: &ViewState, r: Range<u64>) -> usize {
        v.vmas_after(std::slice::from_ref(&r))
    }

    #[test]
    fn shmem_views_cost_a_vma_per_run_of_equal_protection() {
        let mut v = ViewState::new(0, 16 * P, false);
        assert_eq!(v.vmas(), 1);
        assert_eq!(after(&v, 4 * P..5 * P), 3);
        v.opened(4 * P..5 * P);
        assert_eq!(v.vmas(), 3);
        // At the view's start: two runs, two VMAs more only once.
        assert_eq!(after(&v, 0..P), 4);
        v.opened(0..P);
        // Touching an open window merges with it.
        assert_eq!(after(&v, 5 * P..6 * P), 4);
        v.closed(0..P);
        v.closed(4 * P..5 * P);
        assert_eq!(v.vmas(), 1, "merged back");
        v.opened(0..16 * P);
        assert_eq!(v.vmas(), 1);
    }

    #[test]
    fn hugetlb_views_keep_every_split_until_compacted() {
        let h = 2 << 20;
        let mut v = ViewState::new(0, 8 * h, true);
        assert_eq!(after(&v, 2 * h..3 * h), 3);
        v.opened(2 * h..3 * h);
        v.closed(2 * h..3 * h);
        assert_eq!(v.vmas(), 3, "hugetlb does not merge back");
        assert_eq!(after(&v, 2 * h..3 * h), 3, "no new boundary");
        assert_eq!(after(&v, 3 * h..4 * h), 4);
        assert!(v.can_compact());
        v.compacted();
        assert_eq!(v.vmas(), 1);
        assert!(!v.can_compact());
    }

    #[test]
    fn reservations_are_bounded_and_given_back() {
        // One test only: the budget is process-wide, and other tests of this
        // binary take their own reservations meanwhile.
        let (used, limit) = process_view_budget();
        assert!(limit > 0);
        let free = limit - used;
        let e = Reservation::take(free + limit).unwrap_err();
        assert!(matches!(e, GateError::ProcessViewBudget { .. }), "{e}");
        assert_eq!(e.errno(), libc::ENOMEM);
        assert!(e.to_string().contains("vm.max_map_count"), "{e}");
        let r = Reservation::take(1).unwrap();
        drop(r);
        assert!(set_process_view_budget(0).is_err());
    }
}
