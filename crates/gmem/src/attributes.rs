//! The private/shared attribute of every guest page, per VM, as a range map.
//!
//! Only the private runs are stored (everything else is shared), in a
//! [`RangeSet`]: memory is O(runs), not O(pages), and queries and updates are
//! O(log runs). A 1 TiB guest with a thousand conversions costs kilobytes.
//! This module makes no system call.

use std::fmt;
use std::ops::Range;

use crate::range_set::RangeSet;

/// A guest page's attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Attribute {
    /// Only the guest may access it; the host view faults on it.
    Private,
    /// Guest and host may access it.
    Shared,
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attribute::Private => "private",
            Attribute::Shared => "shared",
        })
    }
}

/// The attribute of every guest physical address: private where a private
/// run covers it, shared elsewhere.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttributeMap {
    private: RangeSet,
}

impl AttributeMap {
    /// A map in which everything is shared.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `range` to `attribute`.
    pub fn set(&mut self, range: Range<u64>, attribute: Attribute) {
        match attribute {
            Attribute::Private => self.private.insert(range),
            Attribute::Shared => self.private.remove(range),
        }
    }

    /// The attribute of the byte at `gpa`.
    pub fn get(&self, gpa: u64) -> Attribute {
        if self.private.contains_point(gpa) {
            Attribute::Private
        } else {
            Attribute::Shared
        }
    }

    /// The attribute of all of `range`, if it is the same throughout.
    pub fn uniform(&self, range: Range<u64>) -> Option<Attribute> {
        if self.private.contains(range.clone()) {
            Some(Attribute::Private)
        } else if self.private_bytes(range) == 0 {
            Some(Attribute::Shared)
        } else {
            None
        }
    }

    /// How many bytes of `range` are private.
    pub fn private_bytes(&self, range: Range<u64>) -> u64 {
        self.private
            .overlapping(range.clone())
            .map(|r| r.end.min(range.end) - r.start.max(range.start))
            .sum()
    }

    /// The first private byte in `range`, if any.
    pub fn first_private(&self, range: Range<u64>) -> Option<u64> {
        self.private
            .overlapping(range.clone())
            .next()
            .map(|r| r.start.max(range.start))
    }

    /// The private runs inside `range`, clipped to it, in order.
    pub fn private_runs_in(&self, range: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        self.private
            .overlapping(range.clone())
            .map(move |r| r.start.max(range.start)..r.end.min(range.end))
    }

    /// The private runs, in order.
    pub fn private_runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.private.iter()
    }

    /// How many private runs there are.
    pub fn run_count(&self) -> usize {
        self.private.run_count()
    }

    /// An estimate of the map's heap use, in bytes: a B-tree entry per run.
    pub fn heap_bytes(&self) -> usize {
        // Two u64 per run plus B-tree node overhead (about 50% slack).
        self.private.run_count() * 2 * std::mem::size_of::<u64>() * 3 / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: u64 = 4096;

    #[test]
    fn starts_shared_and_tracks_conversions() {
        let mut m = AttributeMap::new();
        assert_eq!(m.get(0), Attribute::Shared);
        m.set(0..4 * P, Attribute::Private);
        m.set(P..2 * P, Attribute::Shared);
        assert_eq!(m.get(0), Attribute::Private);
        assert_eq!(m.get(P), Attribute::Shared);
        assert_eq!(m.uniform(0..P), Some(Attribute::Private));
        assert_eq!(m.uniform(0..2 * P), None);
        assert_eq!(m.uniform(P..2 * P), Some(Attribute::Shared));
        assert_eq!(m.private_bytes(0..4 * P), 3 * P);
        assert_eq!(m.first_private(P..4 * P), Some(2 * P));
        assert_eq!(m.run_count(), 2);
    }

    /// Found by the `attributes` fuzz target: `get(u64::MAX)` built the range
    /// `u64::MAX..0`, which overflowed (debug) or was empty and so "contained"
    /// (release): the last byte of the address space read as private.
    #[test]
    fn the_top_of_the_address_space_is_shared_until_converted() {
        let mut m = AttributeMap::new();
        assert_eq!(m.get(u64::MAX), Attribute::Shared);
        m.set(u64::MAX - P + 1..u64::MAX, Attribute::Private);
        assert_eq!(m.get(u64::MAX - 1), Attribute::Private);
        assert_eq!(m.get(u64::MAX), Attribute::Shared);
    }

    #[test]
    fn a_terabyte_guest_with_a_thousand_conversions_is_small() {
        let mut m = AttributeMap::new();
        m.set(0..1 << 40, Attribute::Private);
        for i in 0..1000u64 {
            let at = i * (1 << 30);
            m.set(at..at + P, Attribute::Shared);
        }
        assert_eq!(m.run_count(), 1000);
        assert!(m.heap_bytes() < 100 << 10, "{} bytes", m.heap_bytes());
    }

    proptest! {
        /// Random conversions against a naive per-page model, with slot
        /// edges at pages 16 and 48 to split and merge across.
        #[test]
        fn matches_a_per_page_model(
            initial in any::<bool>(),
            ops in proptest::collection::vec((any::<bool>(), 0u64..64, 1u64..32), 1..80),
        ) {
            const PAGES: u64 = 64;
            let mut map = AttributeMap::new();
            let mut model = [Attribute::Shared; PAGES as usize];
            if initial {
                map.set(0..PAGES * P, Attribute::Private);
                model = [Attribute::Private; PAGES as usize];
            }
            for (private, first, count) in ops {
                let end = (first + count).min(PAGES);
                let attr = if private { Attribute::Private } else { Attribute::Shared };
                map.set(first * P..end * P, attr);
                for page in &mut model[first as usize..end as usize] {
                    *page = attr;
                }
            }
            for (i, &want) in model.iter().enumerate() {
                prop_assert_eq!(map.get(i as u64 * P), want);
                prop_assert_eq!(map.get(i as u64 * P + P - 1), want);
            }
            for (a, b) in [(0u64, 16u64), (16, 48), (48, 64), (0, 64)] {
                let uniform = model[a as usize..b as usize].iter().all(|&x| x == model[a as usize]);
                let got = map.uniform(a * P..b * P);
                prop_assert_eq!(got.is_some(), uniform);
                let private = model[a as usize..b as usize].iter().filter(|&&x| x == Attribute::Private).count() as u64;
                prop_assert_eq!(map.private_bytes(a * P..b * P), private * P);
            }
        }
    }
}
