//! A set of byte ranges, kept as disjoint, non-adjacent runs: memory is
//! O(runs), and insert, remove and queries are O(log runs + runs touched).
//! It makes no system call.

use std::collections::BTreeMap;
use std::ops::Range;

/// A set of `u64` ranges, merged into maximal runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end of each run; runs neither overlap nor touch.
    runs: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `r`, merging it with the runs it overlaps or touches.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // A run starting at or before `start` that reaches it.
        if let Some((&s, &e)) = self.runs.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        // Runs starting inside [start, end] are swallowed (no allocation: one
        // B-tree lookup per swallowed run).
        while let Some((&s, &e)) = self.runs.range(start..=end).next() {
            self.runs.remove(&s);
            end = end.max(e);
        }
        self.runs.insert(start, end);
    }

    /// Removes `r` from the set, splitting runs it cuts.
    pub fn remove(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        // A run starting before r.start that reaches into r.
        if let Some((&s, &e)) = self.runs.range(..r.start).next_back()
            && e > r.start
        {
            self.runs.insert(s, r.start);
            if e > r.end {
                self.runs.insert(r.end, e);
                return;
            }
        }
        while let Some((&s, &e)) = self.runs.range(r.start..r.end).next() {
            self.runs.remove(&s);
            if e > r.end {
                self.runs.insert(r.end, e);
                break;
            }
        }
    }

    /// Whether every byte of `r` is in the set.
    pub fn contains(&self, r: Range<u64>) -> bool {
        r.is_empty()
            || self
                .runs
                .range(..=r.start)
                .next_back()
                .is_some_and(|(_, &e)| e >= r.end)
    }

    /// Whether the byte at `x` is in the set.
    pub fn contains_point(&self, x: u64) -> bool {
        self.runs
            .range(..=x)
            .next_back()
            .is_some_and(|(_, &e)| e > x)
    }

    /// The runs that overlap `r`, in order (not clipped to `r`).
    pub fn overlapping(&self, r: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let first = self
            .runs
            .range(..=r.start)
            .next_back()
            .filter(|(_, e)| **e > r.start)
            .map(|(&s, _)| s)
            .unwrap_or(r.start);
        self.runs
            .range(first..r.end.max(first))
            .map(|(&s, &e)| s..e)
            .filter(move |run| run.end > r.start && run.start < r.end)
    }

    /// The runs, in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.runs.iter().map(|(&s, &e)| s..e)
    }

    /// How many runs the set has.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// The total bytes in the set.
    pub fn total(&self) -> u64 {
        self.iter().map(|r| r.end - r.start).sum()
    }

    /// The runs, as a vector.
    pub fn to_vec(&self) -> Vec<Range<u64>> {
        self.iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn insert_merges_and_remove_splits() {
        let mut s = RangeSet::new();
        s.insert(0..10);
        s.insert(20..30);
        s.insert(10..20);
        assert_eq!(s.to_vec(), vec![0..30]);
        s.remove(5..25);
        assert_eq!(s.to_vec(), vec![0..5, 25..30]);
        s.remove(0..100);
        assert_eq!(s.run_count(), 0);
    }

    proptest! {
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 0u64..64), 0..64)) {
            let mut set = RangeSet::new();
            let mut bits = [false; 128];
            for (add, a, len) in ops {
                let r = a..a + len;
                if add { set.insert(r.clone()) } else { set.remove(r.clone()) }
                for b in &mut bits[a as usize..(a + len) as usize] { *b = add; }
            }
            let mut expect = RangeSet::new();
            for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
                expect.runs.insert(i as u64, i as u64 + 1);
            }
            // Rebuild expect's runs merged.
            let mut merged = RangeSet::new();
            for r in expect.iter() { merged.insert(r); }
            prop_assert_eq!(set.to_vec(), merged.to_vec());
            let runs: Vec<_> = set.iter().collect();
            for w in runs.windows(2) { prop_assert!(w[0].end < w[1].start); }
        }
    }
}
