//! Crate-only access for a live migration's rounds: the layout and the
//! population without a freeze, and copies of any attribute under the
//! state's read lock, one chunk at a time, so that the guest runs (and
//! converts) between them. Nothing here is public: the migration module
//! seals private bytes before they leave the process.

use std::ops::Range;

use super::error::GateError;
use super::frozen::{Frozen, RegionLayout};
use super::gatekeeper::Gatekeeper;
use crate::attributes::AttributeMap;
use crate::backing::BackingError;
use crate::backing::mapping::copy_from_guest;

/// The parts of `range`, in order, each with whether it is private.
pub(super) fn split(attrs: &AttributeMap, range: Range<u64>) -> Vec<(Range<u64>, bool)> {
    let mut out = Vec::new();
    let mut pos = range.start;
    for run in attrs.private_runs_in(range.clone()) {
        if run.start > pos {
            out.push((pos..run.start, false));
        }
        pos = run.end;
        out.push((run, true));
    }
    if range.end > pos {
        out.push((pos..range.end, false));
    }
    out
}

impl Gatekeeper {
    /// The regions, in GPA order.
    pub(crate) fn layout(&self) -> Vec<RegionLayout> {
        self.0
            .regions
            .iter()
            .map(|r| RegionLayout {
                gpa: r.gpa,
                len: r.len,
                offset: r.offset,
                kind: r.memory.kind(),
                flags: r.memory.flags().bits(),
            })
            .collect()
    }

    /// The populated runs of guest memory, in GPA order (see
    /// [`Frozen::populated`]).
    pub(crate) fn populated_runs(&self) -> Result<Vec<Range<u64>>, BackingError> {
        let mut out = Vec::new();
        for r in &self.0.regions {
            for run in r.memory.populated()? {
                let (s, e) = (run.start.max(r.offset), run.end.min(r.offset + r.len));
                if s < e {
                    out.push(r.to_gpa(s)..r.to_gpa(e));
                }
            }
        }
        Ok(out)
    }

    /// Refuses a migration source that cannot be read: poisoned, or a
    /// two-backing slot, whose private side the host cannot read.
    pub(crate) fn check_readable(&self) -> Result<(), GateError> {
        let st = self.read_state();
        self.live(&st)?;
        if let Some(r) = self.0.regions.iter().find(|r| r.private.is_some()) {
            return Err(GateError::TwoBackings { gpa: r.gpa });
        }
        Ok(())
    }

    /// The private runs now, in GPA order.
    pub(crate) fn private_runs_now(&self) -> Vec<Range<u64>> {
        self.read_state().attrs.private_runs().collect()
    }

    /// Copies guest memory at `gpa` (inside one region, any attribute)
    /// into `buf` under the state's read lock, and sets `parts` to its
    /// attribute split at that moment: a migration round's chunk. Pins may
    /// be live: what a device writes through one is marked dirty when it
    /// is released, and sent again.
    pub(crate) fn read_live(
        &self,
        gpa: u64,
        buf: &mut [u8],
        parts: &mut Vec<(Range<u64>, bool)>,
    ) -> Result<(), GateError> {
        let st = self.read_state();
        self.live(&st)?;
        let range = gpa..gpa.saturating_add(buf.len() as u64);
        let r = self
            .region_index(gpa)
            .map(|i| &self.0.regions[i])
            .filter(|r| range.end <= r.end())
            .ok_or(GateError::OutsideMemory {
                gpa,
                len: buf.len() as u64,
            })?;
        *parts = split(&st.attrs, range);
        // SAFETY: the range lies in the region's file mapping (checked
        // above), which the region keeps alive and which is readable (the
        // file is MMAP|INIT_SHARED, the host side of a one-file slot); the
        // read lock keeps conversions and discards off it, and `buf` is a
        // separate buffer. The guest may write it meanwhile: the copy is
        // volatile-tolerant, and KVM's dirty log sends such pages again.
        unsafe { copy_from_guest(buf, r.file_ptr(gpa)) };
        Ok(())
    }
}

impl Frozen<'_> {
    /// Discards `range` (inside the layout): what a migration's source
    /// holds no page for reads zero here too. Whole backing pages are
    /// freed, parts of huge pages zeroed.
    pub(crate) fn discard_raw(&mut self, range: Range<u64>) -> Result<(), GateError> {
        let gpa = range.start;
        self.gate()
            .punch(std::slice::from_ref(&range), None)
            .map(|_| ())
            .map_err(|(source, _)| GateError::Map { gpa, source })
    }
}
