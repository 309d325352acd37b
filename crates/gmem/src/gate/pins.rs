//! The live pins of a gatekeeper: who holds what since when, and an index of
//! what they cover, so that "is any of this range pinned?" and "which parts
//! of this window are pinned?" cost O(log pins + pins touched), never a walk
//! over every live pin (a walk per pin drop made pins quadratic in the live
//! pins, which a guest's descriptor chains choose).

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

/// A live pin, as [`Gatekeeper::pins`](super::Gatekeeper::pins) reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PinInfo {
    /// The pin's id (unique for the gatekeeper's life).
    pub id: u64,
    /// The guest range it holds.
    pub range: Range<u64>,
    /// How long it has been held.
    pub held_for: Duration,
}

#[derive(Debug)]
struct Record {
    range: Range<u64>,
    since: Instant,
}

/// The pins, by id, and what they cover.
#[derive(Debug, Default)]
pub(crate) struct PinTable {
    records: BTreeMap<u64, Record>,
    next: u64,
    /// A step function: `counts[b]` pins cover `[b, next boundary)`. Only
    /// boundaries where the count changes are kept.
    counts: BTreeMap<u64, u32>,
}

impl PinTable {
    /// How many pins are live.
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// Records a pin of `range`; its id.
    pub(crate) fn add(&mut self, range: Range<u64>) -> u64 {
        let id = self.next;
        self.next += 1;
        self.bump(&range, true);
        self.records.insert(
            id,
            Record {
                range,
                since: Instant::now(),
            },
        );
        id
    }

    /// Drops pin `id`; the range it held, if it was live.
    pub(crate) fn remove(&mut self, id: u64) -> Option<Range<u64>> {
        let record = self.records.remove(&id)?;
        self.bump(&record.range, false);
        Some(record.range)
    }

    /// The live pins, by id.
    pub(crate) fn list(&self) -> Vec<PinInfo> {
        let now = Instant::now();
        self.records
            .iter()
            .map(|(&id, r)| PinInfo {
                id,
                range: r.range.clone(),
                held_for: now.saturating_duration_since(r.since),
            })
            .collect()
    }

    /// The count of pins at `x`.
    fn count_at(&self, x: u64) -> u32 {
        self.counts.range(..=x).next_back().map_or(0, |(_, &c)| c)
    }

    /// Adds (or takes away) one pin over `range`.
    fn bump(&mut self, range: &Range<u64>, up: bool) {
        if range.is_empty() {
            return;
        }
        // Boundaries at both ends, carrying the counts they start.
        for b in [range.start, range.end] {
            let c = self.count_at(b);
            self.counts.entry(b).or_insert(c);
        }
        for (_, c) in self.counts.range_mut(range.start..range.end) {
            *c = if up { *c + 1 } else { c.saturating_sub(1) };
        }
        // Drop boundaries that no longer change the count.
        for b in [range.start, range.end] {
            let before = b.checked_sub(1).map_or(0, |x| self.count_at(x));
            if self.counts.get(&b) == Some(&before) {
                self.counts.remove(&b);
            }
        }
        let inside: Vec<u64> = self
            .counts
            .range(range.start.saturating_add(1)..range.end)
            .map(|(&b, _)| b)
            .collect();
        for b in inside {
            if self.count_at(b - 1) == self.counts[&b] {
                self.counts.remove(&b);
            }
        }
    }

    /// The pinned parts of `range`, in order and merged.
    pub(crate) fn pinned_in(&self, range: &Range<u64>) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        if range.is_empty() {
            return out;
        }
        let mut start = range.start;
        let mut count = self.count_at(range.start);
        for (&b, &c) in self.counts.range(range.start + 1..range.end) {
            if count > 0 {
                push_merged(&mut out, start..b);
            }
            start = b;
            count = c;
        }
        if count > 0 {
            push_merged(&mut out, start..range.end);
        }
        out
    }

    /// A pinned part of `range`, if any.
    pub(crate) fn first_pinned(&self, range: &Range<u64>) -> Option<Range<u64>> {
        self.pinned_in(range).into_iter().next()
    }
}

fn push_merged(out: &mut Vec<Range<u64>>, r: Range<u64>) {
    match out.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => out.push(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn overlapping_pins_count_and_release() {
        let mut t = PinTable::default();
        let a = t.add(0x1000..0x3000);
        let b = t.add(0x2000..0x5000);
        assert_eq!(t.pinned_in(&(0..0x10000)), vec![0x1000..0x5000]);
        assert_eq!(t.remove(a), Some(0x1000..0x3000));
        assert_eq!(t.pinned_in(&(0..0x10000)), vec![0x2000..0x5000]);
        assert_eq!(t.first_pinned(&(0..0x2000)), None);
        assert_eq!(t.remove(b), Some(0x2000..0x5000));
        assert!(t.counts.is_empty(), "{:?}", t.counts);
        assert_eq!(t.remove(b), None);
    }

    proptest! {
        /// The index agrees with a walk over every pin.
        #[test]
        fn the_index_agrees_with_a_walk(ops in proptest::collection::vec((0u64..64, 1u64..16, any::<bool>()), 1..64),
                                        query in (0u64..80, 1u64..32)) {
            let mut t = PinTable::default();
            let mut live: Vec<(u64, Range<u64>)> = Vec::new();
            for (start, len, drop_one) in ops {
                if drop_one && !live.is_empty() {
                    let (id, _) = live.remove(start as usize % live.len());
                    t.remove(id);
                } else {
                    let r = start..start + len;
                    live.push((t.add(r.clone()), r));
                }
            }
            let q = query.0..query.0 + query.1;
            let mut walk: Vec<Range<u64>> = Vec::new();
            for x in q.clone() {
                if live.iter().any(|(_, r)| r.contains(&x)) {
                    push_merged(&mut walk, x..x + 1);
                }
            }
            prop_assert_eq!(t.pinned_in(&q), walk);
            prop_assert_eq!(t.len(), live.len());
        }
    }
}
