//! The gatekeeper frozen for a snapshot or a restore: the state's write
//! lock held (no conversion, discard, copy or new pin meanwhile), and the
//! crate-only access a snapshot needs to every page, private ones
//! included. Nothing here is public: the snapshot module seals private
//! bytes before they leave, and a restore writes only what a snapshot
//! holds.

use std::ops::Range;
use std::sync::RwLockWriteGuard;

use super::error::GateError;
use super::gatekeeper::{Gatekeeper, Phase, State};
use crate::attributes::Attribute;
use crate::backing::mapping::{copy_from_guest, copy_to_guest};
use crate::backing::{BackingError, BackingKind};
use crate::range::FileRange;

/// One bound region, as a snapshot records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RegionLayout {
    pub(crate) gpa: u64,
    pub(crate) len: u64,
    pub(crate) offset: u64,
    pub(crate) kind: BackingKind,
    pub(crate) flags: u64,
}

/// The gatekeeper, frozen (see the module docs).
pub(crate) struct Frozen<'g> {
    gate: &'g Gatekeeper,
    st: RwLockWriteGuard<'g, State>,
}

impl Gatekeeper {
    /// Freezes the gatekeeper: refused while it is poisoned, while a pin
    /// is live (a device could write through it meanwhile), and on a
    /// two-backing slot, whose private side the host cannot read.
    pub(crate) fn freeze(&self) -> Result<Frozen<'_>, GateError> {
        let st = self.write_state();
        self.live(&st)?;
        if let Some(pin) = st.pins.list().first() {
            return Err(GateError::Pinned {
                live: st.pins.len(),
                gpa: pin.range.start,
                len: pin.range.end - pin.range.start,
            });
        }
        if let Some(r) = self.0.regions.iter().find(|r| r.private.is_some()) {
            return Err(GateError::TwoBackings { gpa: r.gpa });
        }
        Ok(Frozen { gate: self, st })
    }
}

impl Frozen<'_> {
    /// The regions, in GPA order.
    pub(crate) fn layout(&self) -> Vec<RegionLayout> {
        self.gate.layout()
    }

    /// The gatekeeper frozen.
    pub(super) fn gate(&self) -> &Gatekeeper {
        self.gate
    }

    /// The private runs, in GPA order.
    pub(crate) fn private_runs(&self) -> Vec<Range<u64>> {
        self.st.attrs.private_runs().collect()
    }

    /// The parts of `range`, in order, each with whether it is private.
    pub(crate) fn split(&self, range: Range<u64>) -> Vec<(Range<u64>, bool)> {
        super::live::split(&self.st.attrs, range)
    }

    /// The populated runs of guest memory, in GPA order: what the files
    /// hold in the bound ranges (4 KiB granules; whole huge pages on
    /// hugetlb).
    pub(crate) fn populated(&self) -> Result<Vec<Range<u64>>, BackingError> {
        self.gate.populated_runs()
    }

    /// Whether `range` is inside one region.
    fn region_of(&self, range: &Range<u64>) -> Option<&super::region::Region> {
        let i = self.gate.region_index(range.start)?;
        let r = &self.gate.0.regions[i];
        (range.end <= r.end()).then_some(r)
    }

    /// Copies guest memory at `gpa` (inside one region, any attribute) into
    /// `buf`: for the snapshot's records, which seal private bytes before
    /// they leave the process.
    pub(crate) fn read_raw(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GateError> {
        let range = gpa..gpa.saturating_add(buf.len() as u64);
        let r = self.region_of(&range).ok_or(GateError::OutsideMemory {
            gpa,
            len: buf.len() as u64,
        })?;
        // SAFETY: the range lies in the region's file mapping (checked just
        // above), which the region keeps alive and which is readable (the
        // file is MMAP|INIT_SHARED, and the host side of a one-file slot);
        // the write lock keeps every other host path off it, and `buf` is a
        // separate buffer.
        unsafe { copy_from_guest(buf, r.file_ptr(gpa)) };
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa` (inside one region): for a
    /// restore, which writes what the snapshot held.
    pub(crate) fn write_raw(&mut self, gpa: u64, data: &[u8]) -> Result<(), GateError> {
        let range = gpa..gpa.saturating_add(data.len() as u64);
        let r = self.region_of(&range).ok_or(GateError::OutsideMemory {
            gpa,
            len: data.len() as u64,
        })?;
        // SAFETY: as in `read_raw`: inside the region's live, writable file
        // mapping, under the write lock; `data` is a separate buffer.
        unsafe { copy_to_guest(r.file_ptr(gpa), data) };
        Ok(())
    }

    /// Refuses a restore outside the launch phase, before anything changes.
    pub(crate) fn check_restorable(&self) -> Result<(), GateError> {
        if self.st.phase != Phase::Loading {
            return Err(GateError::NotRestorable {
                why: "the gatekeeper has left its launch phase: restore onto a new VM",
            });
        }
        Ok(())
    }

    /// Starts a restore: refused outside the launch phase (a restore writes a
    /// whole VM, which must not have run); every region is discarded, so
    /// that what the snapshot does not hold is a hole.
    pub(crate) fn begin_restore(&mut self) -> Result<(), GateError> {
        self.check_restorable()?;
        for r in &self.gate.0.regions {
            // Only what the file holds is punched: a fresh VM's empty file
            // costs nothing, whatever its size (a punch of the whole range
            // would walk it, and KVM's mappings of it, for nothing).
            let held = r
                .memory
                .populated()
                .map_err(|source| GateError::Map { gpa: r.gpa, source })?;
            for run in held {
                let (s, e) = (run.start.max(r.offset), run.end.min(r.offset + r.len));
                if s >= e {
                    continue;
                }
                let range = FileRange::new(s, e - s).map_err(|e| GateError::Map {
                    gpa: r.gpa,
                    source: e.into(),
                })?;
                r.memory
                    .core()
                    .punch(range)
                    .map_err(|source| GateError::Map { gpa: r.gpa, source })?;
            }
        }
        self.st.attrs.set(
            self.gate.0.regions[0].gpa..self.gate.0.regions[self.gate.0.regions.len() - 1].end(),
            Attribute::Shared,
        );
        Ok(())
    }

    /// Ends a restore: the attributes become the snapshot's (in KVM too,
    /// where it has them), and the launch phase is over.
    pub(crate) fn finish_restore(&mut self, private: &[Range<u64>]) -> Result<(), GateError> {
        for r in &self.gate.0.regions {
            self.st.attrs.set(r.gpa..r.end(), Attribute::Shared);
        }
        for run in private {
            self.st.attrs.set(run.clone(), Attribute::Private);
        }
        if let Some(kernel) = &self.gate.0.kernel {
            for r in &self.gate.0.regions {
                let range = r.gpa..r.end();
                let result = kernel.set(&range, Attribute::Shared).and_then(|()| {
                    self.st
                        .attrs
                        .private_runs_in(range.clone())
                        .try_for_each(|run| kernel.set(&run, Attribute::Private))
                });
                if let Err(source) = result {
                    return Err(GateError::Kernel {
                        gpa: range.start,
                        len: range.end - range.start,
                        source,
                    });
                }
            }
        }
        self.st.phase = Phase::Running;
        Ok(())
    }

    /// Makes the gatekeeper refuse everything: a restore stopped part-way,
    /// so the VM's memory is neither the snapshot's nor empty, and it must
    /// never run.
    pub(crate) fn poison(&mut self, reason: String) {
        self.st.poisoned.get_or_insert(reason);
    }
}

/// One region as a lazy restore fills it: its GPA range, its binding's
/// host mapping (KVM's `userspace_addr`, which the restore registers with
/// userfaultfd), its backing page size, and its file.
pub(crate) struct LazyRegion {
    pub(crate) gpa: u64,
    pub(crate) len: u64,
    /// The binding's mapping of `gpa`, as an address.
    pub(crate) host: usize,
    pub(crate) granule: u64,
    pub(crate) memory: std::sync::Arc<dyn crate::backing::RestrictedMemory>,
}

impl Frozen<'_> {
    /// The regions, for a lazy restore.
    pub(crate) fn lazy_regions(&self) -> Vec<LazyRegion> {
        self.gate
            .0
            .regions
            .iter()
            .map(|r| LazyRegion {
                gpa: r.gpa,
                len: r.len,
                host: r.host as usize,
                granule: r.granule,
                memory: std::sync::Arc::clone(&r.memory),
            })
            .collect()
    }
}

/// A gatekeeper that a lazy restore's threads can poison without keeping
/// it alive.
#[derive(Clone)]
pub(crate) struct WeakGate(std::sync::Weak<super::gatekeeper::GateInner>);

impl Gatekeeper {
    pub(crate) fn downgrade(&self) -> WeakGate {
        WeakGate(std::sync::Arc::downgrade(&self.0))
    }
}

impl WeakGate {
    /// Poisons the gatekeeper, if it is alive.
    pub(crate) fn poison(&self, reason: String) {
        if let Some(inner) = self.0.upgrade() {
            let mut st = inner.state.write().unwrap_or_else(|e| e.into_inner());
            st.poisoned.get_or_insert(reason);
        }
    }

    /// Ends the lazy restore's hold on the gatekeeper, if it is alive.
    pub(crate) fn clear_lazy(&self) {
        if let Some(inner) = self.0.upgrade() {
            let mut held = inner.lazy.lock().unwrap_or_else(|e| e.into_inner());
            inner
                .has_lazy
                .store(false, std::sync::atomic::Ordering::Release);
            *held = None;
        }
    }
}
