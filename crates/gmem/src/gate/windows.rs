//! The view's windows, as [`Gatekeeper`] opens and closes them: each region's
//! cache ([`ViewState`](super::view::ViewState)) kept under the gatekeeper's
//! budget of map entries, and in step with the page tables.
//!
//! Every `mprotect` result is recorded as it happened. When one fails, what
//! it may have changed is put back to a known state (closed, or open again)
//! at once; if even that fails, the records and the page tables may
//! disagree, and the gatekeeper is poisoned: it refuses every host access
//! from then on, rather than let a pin fault or a stray pointer reach a
//! window it believes closed.

use std::ops::Range;

use super::error::GateError;
use super::gatekeeper::{Gatekeeper, State, gaps};
use crate::range_set::RangeSet;

impl Gatekeeper {
    /// Opens `window` (whole backing pages of region `ri`) in the view,
    /// evicting unpinned windows first if the budget of map entries would be
    /// exceeded; `gpa`/`len` name the pin in errors.
    pub(super) fn open(
        &self,
        st: &mut State,
        ri: usize,
        window: Range<u64>,
        gpa: u64,
        len: u64,
    ) -> Result<(), GateError> {
        if st.views[ri].is_open(&window) {
            return Ok(());
        }
        let mut missing = self.missing(st, ri, &window);
        if !self.fits(st, ri, &missing) {
            self.evict(st)?;
            missing = self.missing(st, ri, &window);
            if !self.fits(st, ri, &missing) {
                let regions = self.0.regions.len();
                return Err(GateError::ViewBudget {
                    gpa,
                    len,
                    vmas: regions + st.extra_vmas(),
                    budget: regions + self.0.budget,
                    pinned: st.pins.len(),
                });
            }
        }
        for (i, m) in missing.iter().enumerate() {
            if let Err(e) = self.protect(ri, m, true) {
                st.views[ri].touched(m);
                // Undo this call: close what it opened, and the part whose
                // outcome is unknown.
                for done in &missing[..=i] {
                    self.close_exact(st, ri, done);
                }
                return Err(e);
            }
            st.views[ri].opened(m.clone());
        }
        Ok(())
    }

    /// The parts of `window` (in region `ri`) not open yet.
    fn missing(&self, st: &State, ri: usize, window: &Range<u64>) -> Vec<Range<u64>> {
        let open: Vec<Range<u64>> = st.views[ri].open().overlapping(window.clone()).collect();
        gaps(window, &open)
    }

    /// Whether opening `parts` of region `ri` keeps the views within budget.
    fn fits(&self, st: &State, ri: usize, parts: &[Range<u64>]) -> bool {
        let view = &st.views[ri];
        let now = view.vmas();
        let after = view.vmas_after(parts);
        st.extra_vmas() - (now - 1) + (after - 1) <= self.0.budget
    }

    /// Closes every open window that no pin holds, and maps afresh each
    /// hugetlb view that `mprotect` split and where no pin is held (hugetlb
    /// VMAs never merge back by themselves).
    pub(super) fn evict(&self, st: &mut State) -> Result<(), GateError> {
        for ri in 0..self.0.regions.len() {
            let open: Vec<Range<u64>> = st.views[ri].open().iter().collect();
            self.close_in(st, ri, &open)?;
            let r = &self.0.regions[ri];
            // A fresh shared hugetlb mapping needs every page of the view
            // reserved or present: where a discarded page could not be
            // reserved again, the view keeps its splits (a pin that needs the
            // entries is refused) rather than fail and poison the VM.
            let reserved = || {
                let core = r.memory.core();
                core.ensure_reserved(r.offset, r.len).is_ok()
            };
            if st.views[ri].can_compact()
                && st.pins.first_pinned(&(r.gpa..r.end())).is_none()
                && reserved()
            {
                match r.remap_view() {
                    Ok(()) => st.views[ri].compacted(),
                    Err(e) => {
                        // MAP_FIXED may have unmapped the view: nothing in it
                        // is reachable now, but the records are lost.
                        self.poison(
                            st,
                            format!(
                                "the view of [{:#x}, {:#x}) could not be mapped afresh: {e}",
                                r.gpa,
                                r.end()
                            ),
                        );
                        return Err(GateError::Map {
                            gpa: r.gpa,
                            source: e,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The most map entries the views could need for the pinned windows
    /// (and `extra`, a window about to be pinned in region `ri`), whatever
    /// opens and closes around them ([`ViewState::pinned_cost`](super::view::ViewState::pinned_cost)).
    /// Kept within the budget at every pin, and never raised by a pin's
    /// drop, it is what makes any close affordable: whatever the guest
    /// converts, closing every unpinned window brings the views within it.
    fn pinned_cost(&self, st: &State, extra: Option<(usize, &Range<u64>)>) -> usize {
        st.views
            .iter()
            .enumerate()
            .map(|(ri, v)| v.pinned_cost(extra.filter(|(i, _)| *i == ri).map(|(_, w)| w)))
            .sum()
    }

    /// Admits a pin of `window` in region `ri`: refused if the pinned
    /// windows alone, this one included, would cost more map entries than
    /// the budget, even after every unpinned window is closed (and split
    /// hugetlb views mapped afresh).
    pub(super) fn admit_pin(
        &self,
        st: &mut State,
        ri: usize,
        window: &Range<u64>,
        gpa: u64,
        len: u64,
    ) -> Result<(), GateError> {
        if self.pinned_cost(st, Some((ri, window))) <= self.0.budget {
            return Ok(());
        }
        self.evict(st)?;
        if self.pinned_cost(st, Some((ri, window))) <= self.0.budget {
            return Ok(());
        }
        let regions = self.0.regions.len();
        Err(GateError::ViewBudget {
            gpa,
            len,
            vmas: regions + st.extra_vmas(),
            budget: regions + self.0.budget,
            pinned: st.pins.len(),
        })
    }

    /// Closes the open windows over the backing pages that `ranges` touch,
    /// except pages a pin holds, within the budget of map entries: a close
    /// inside an open run splits it, so where closing just those pages
    /// would cost more than the budget, every unpinned window closes
    /// instead (the pinned ones alone fit, by [`admit_pin`](Self::admit_pin)).
    /// On hugetlb, whose splits never merge back, whole open runs close
    /// around the pinned windows, whose boundaries were paid for when they
    /// were pinned. Returns what it closed, `(region, range)`, for
    /// [`reopen`](Self::reopen); on failure it has reopened what it closed
    /// (or poisoned the gatekeeper, if it could not).
    pub(super) fn close_over(
        &self,
        st: &mut State,
        ranges: &[Range<u64>],
    ) -> Result<Vec<(usize, Range<u64>)>, GateError> {
        let mut by_region: Vec<(usize, Vec<Range<u64>>)> = Vec::new();
        for range in ranges {
            self.for_each_part(range.start, range.end - range.start, |r, part| {
                let ri = self.region_index(part.start).unwrap_or(0);
                let w = r.window_clipped(&part);
                match by_region.last_mut() {
                    Some((i, parts)) if *i == ri => parts.push(w),
                    _ => by_region.push((ri, vec![w])),
                }
            });
        }
        // hugetlb: whole open runs.
        for (ri, parts) in &mut by_region {
            if st.views[*ri].is_sticky() {
                let runs: Vec<Range<u64>> = parts
                    .iter()
                    .flat_map(|w| {
                        st.views[*ri]
                            .open()
                            .overlapping(w.clone())
                            .collect::<Vec<_>>()
                    })
                    .collect();
                parts.extend(runs);
            }
        }
        // shmem: exactly, if the budget affords the splits.
        let projected: usize = (0..self.0.regions.len())
            .map(|ri| {
                let mut after = st.views[ri].open().clone();
                if let Some((_, parts)) = by_region.iter().find(|(i, _)| *i == ri) {
                    let r = &self.0.regions[ri];
                    for w in parts {
                        after.remove(w.clone());
                    }
                    for p in st.pins.pinned_in(&(r.gpa..r.end())) {
                        let p = r.window_clipped(&p);
                        if st.views[ri].open().contains(p.clone()) {
                            after.insert(p);
                        }
                    }
                }
                st.views[ri].vmas_if_open(&after) - 1
            })
            .sum();
        if projected > self.0.budget {
            by_region = (0..self.0.regions.len())
                .map(|ri| (ri, st.views[ri].open().iter().collect()))
                .collect();
        }
        let mut closed = Vec::new();
        for (ri, parts) in by_region {
            match self.close_in(st, ri, &parts) {
                Ok(done) => closed.extend(done.into_iter().map(|c| (ri, c))),
                Err(e) => {
                    self.reopen(st, &closed);
                    return Err(e);
                }
            }
        }
        Ok(closed)
    }

    /// Closes the open, unpinned parts of `windows` in region `ri`; what it
    /// closed. On failure it has reopened them (or poisoned).
    fn close_in(
        &self,
        st: &mut State,
        ri: usize,
        windows: &[Range<u64>],
    ) -> Result<Vec<Range<u64>>, GateError> {
        let r = &self.0.regions[ri];
        let mut targets = RangeSet::new();
        for w in windows {
            for open in st.views[ri].open().overlapping(w.clone()) {
                targets.insert(open.start.max(w.start)..open.end.min(w.end));
            }
        }
        for w in windows {
            for pinned in st.pins.pinned_in(w) {
                targets.remove(r.window_clipped(&pinned));
            }
        }
        let targets = targets.to_vec();
        for (i, t) in targets.iter().enumerate() {
            if let Err(e) = self.protect(ri, t, false) {
                st.views[ri].touched(t);
                // Put back what this call closed, and the part whose outcome
                // is unknown: all of it was open.
                let back: Vec<(usize, Range<u64>)> =
                    targets[..=i].iter().map(|c| (ri, c.clone())).collect();
                self.reopen(st, &back);
                return Err(e);
            }
            st.views[ri].closed(t.clone());
        }
        Ok(targets)
    }

    /// Reopens windows [`close_over`](Self::close_over) closed (an error
    /// path). A window that cannot be reopened is closed for certain instead
    /// (a cache entry lost); if even that fails, the gatekeeper is poisoned.
    pub(super) fn reopen(&self, st: &mut State, closed: &[(usize, Range<u64>)]) {
        for (ri, c) in closed {
            match self.protect(*ri, c, true) {
                Ok(()) => st.views[*ri].opened(c.clone()),
                Err(_) => {
                    st.views[*ri].touched(c);
                    self.close_exact(st, *ri, c);
                }
            }
        }
    }

    /// Closes `w` of region `ri` for certain, or poisons the gatekeeper.
    fn close_exact(&self, st: &mut State, ri: usize, w: &Range<u64>) {
        match self.protect(ri, w, false) {
            Ok(()) => st.views[ri].closed(w.clone()),
            Err(e) => self.poison(
                st,
                format!(
                    "the view window [{:#x}, {:#x}) is in an unknown state: {e}",
                    w.start, w.end
                ),
            ),
        }
    }

    /// `mprotect` of `w` in region `ri`'s view (with the tests' injected
    /// failures).
    fn protect(&self, ri: usize, w: &Range<u64>, open: bool) -> Result<(), GateError> {
        #[cfg(test)]
        {
            let mut faults = self.0.faults.lock().unwrap();
            let count = if open {
                &mut faults.reopen
            } else {
                &mut faults.close
            };
            let injected = *count > 0;
            *count = count.saturating_sub(1);
            if injected {
                return Err(GateError::Protect {
                    gpa: w.start,
                    len: w.end - w.start,
                    source: std::io::Error::from_raw_os_error(libc::ENOMEM),
                });
            }
        }
        self.0.regions[ri].protect(w, open)
    }

    /// Makes the gatekeeper refuse everything from now on, for `reason`.
    pub(super) fn poison(&self, st: &mut State, reason: String) {
        st.poisoned.get_or_insert(reason);
    }
}
