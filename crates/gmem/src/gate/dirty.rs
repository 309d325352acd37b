//! Dirty tracking: which guest pages changed since the last look, on every
//! write path, for pre-copy migration.
//!
//! - **The guest's writes**: KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES`
//!   on each binding's memslot, read and cleared with `KVM_GET_DIRTY_LOG`).
//!   guest_memfd slots log nothing in the kernel, so tracking is refused
//!   there ([`DirtyError::GuestMemfd`]).
//! - **The host's writes**, which KVM's log does not see: the gatekeeper's
//!   copies ([`write`](Gatekeeper::write), [`fill`](Gatekeeper::fill)),
//!   and every [`Pin`](super::Pin) (so every `DeviceMemory` slice, which
//!   pins) when it is released, as vm-memory's bitmaps mark a slice once
//!   its access is done.
//! - **Conversions and discards**: the pages whose attribute or content
//!   they changed.
//!
//! Host writes are marked once they are done, under the state lock they
//! hold, so a page a reader copies after [`take_dirty`](Gatekeeper::take_dirty)
//! returned is either already in that copy or in the next take.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::error::DirtyError;
use super::gatekeeper::Gatekeeper;
use crate::range::PAGE_SIZE;
use crate::range_set::RangeSet;

impl Gatekeeper {
    /// Starts dirty tracking: KVM's dirty log on every binding, and the
    /// gatekeeper's own record of host writes, conversions and discards.
    /// All or nothing: a binding KVM refuses turns the others off again.
    ///
    /// ```
    /// use gmem::{BackingKind, GateOptions, Gatekeeper, MemoryOptions, SlotRequest, Vm};
    ///
    /// let Ok(vm) = Vm::new() else { return Ok(()) }; // no /dev/kvm here
    /// let mem = gmem::create_memory(MemoryOptions::new(BackingKind::Memfd, 2 << 20), Some(&vm))?;
    /// let b = vm.bind(&mem, SlotRequest::new(0, 0, 2 << 20))?;
    /// let gate = Gatekeeper::new(&vm, vec![b], GateOptions::default())?;
    /// gate.start_dirty_tracking()?;
    /// gate.write(0x3010, b"changed")?;
    /// assert_eq!(gate.take_dirty()?, vec![0x3000..0x4000]);
    /// assert!(gate.take_dirty()?.is_empty()); // taken
    /// gate.stop_dirty_tracking()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`DirtyError::AlreadyTracking`] (`EBUSY`);
    /// [`DirtyError::GuestMemfd`] (`EINVAL`) if any binding is a
    /// guest_memfd slot; [`DirtyError::Kvm`] if KVM refuses the flag;
    /// [`DirtyError::Gate`] for a poisoned gatekeeper. Nothing changes
    /// then.
    pub fn start_dirty_tracking(&self) -> Result<(), DirtyError> {
        self.start_tracking(false)
    }

    /// [`start_dirty_tracking`](Self::start_dirty_tracking), owned by a
    /// migration if `for_migration`: then the public
    /// [`take_dirty`](Self::take_dirty) and
    /// [`stop_dirty_tracking`](Self::stop_dirty_tracking) are refused
    /// ([`DirtyError::Migrating`]) until the migration stops it, since a
    /// set taken by anyone else is a set the migration never resends.
    pub(crate) fn start_tracking(&self, for_migration: bool) -> Result<(), DirtyError> {
        // Under the state's write lock: a host write either finished
        // before (a reader that starts after this sees it) or marks.
        let st = self.write_state();
        self.live(&st).map_err(DirtyError::Gate)?;
        let mut dirty = self.lock_dirty();
        if dirty.is_some() {
            return Err(DirtyError::AlreadyTracking);
        }
        if let Some(r) = self.0.regions.iter().find(|r| r.binding.is_guest_memfd()) {
            return Err(DirtyError::GuestMemfd {
                gpa: r.gpa,
                slot: r.binding.slot().0,
            });
        }
        for (i, r) in self.0.regions.iter().enumerate() {
            if let Err(source) = r.binding.set_dirty_logging(true) {
                for done in &self.0.regions[..i] {
                    // Best effort: a slot left logging costs KVM a bitmap,
                    // and the next start sets it again.
                    let _ = done.binding.set_dirty_logging(false);
                }
                return Err(DirtyError::Kvm {
                    op: "KVM_SET_USER_MEMORY_REGION2 (KVM_MEM_LOG_DIRTY_PAGES)",
                    gpa: r.gpa,
                    source,
                });
            }
        }
        *dirty = Some(RangeSet::new());
        self.0.dirty_owned.store(for_migration, Ordering::Release);
        self.0.dirty_on.store(true, Ordering::Release);
        Ok(())
    }

    /// Refuses the public take and stop while a migration owns tracking.
    fn refuse_if_migrating(&self) -> Result<(), DirtyError> {
        if self.0.dirty_owned.load(Ordering::Acquire) {
            return Err(DirtyError::Migrating);
        }
        Ok(())
    }

    /// The pages written since tracking started or since the last take,
    /// as sorted, merged, page-aligned GPA runs: the guest's (KVM's dirty
    /// log, which this reads and clears), the host's, and those a
    /// conversion or discard changed. Taken: the next call returns what is
    /// dirtied after this one.
    ///
    /// # Errors
    /// [`DirtyError::NotTracking`] (`EINVAL`); [`DirtyError::Migrating`]
    /// (`EBUSY`) while a migration owns tracking
    /// ([`migrate_to`](Self::migrate_to)); [`DirtyError::Kvm`] if
    /// `KVM_GET_DIRTY_LOG` fails (what the host marked is kept for the
    /// next take).
    pub fn take_dirty(&self) -> Result<Vec<Range<u64>>, DirtyError> {
        self.refuse_if_migrating()?;
        self.take_tracked()
    }

    /// [`take_dirty`](Self::take_dirty) for the owner of tracking (a
    /// migration).
    pub(crate) fn take_tracked(&self) -> Result<Vec<Range<u64>>, DirtyError> {
        let mut runs = {
            let mut dirty = self.lock_dirty();
            let host = dirty.as_mut().ok_or(DirtyError::NotTracking)?;
            std::mem::take(host)
        };
        for r in &self.0.regions {
            let words = match r.binding.take_dirty_log() {
                Ok(w) => w,
                Err(source) => {
                    // Keep what was taken, so that nothing is lost.
                    if let Some(host) = self.lock_dirty().as_mut() {
                        for run in runs.iter() {
                            host.insert(run);
                        }
                    }
                    return Err(DirtyError::Kvm {
                        op: "KVM_GET_DIRTY_LOG",
                        gpa: r.gpa,
                        source,
                    });
                }
            };
            for run in bitmap_runs(&words, r.len / PAGE_SIZE) {
                runs.insert(r.gpa + run.start * PAGE_SIZE..r.gpa + run.end * PAGE_SIZE);
            }
        }
        Ok(runs.to_vec())
    }

    /// Stops dirty tracking: the bindings' memslots lose the flag (unless
    /// the VMM bound them with it), and what was not taken is dropped.
    ///
    /// # Errors
    /// [`DirtyError::NotTracking`] (`EINVAL`); [`DirtyError::Migrating`]
    /// (`EBUSY`) while a migration owns tracking (drop or complete it);
    /// [`DirtyError::Kvm`] if KVM refuses to drop the flag on a slot
    /// (tracking has stopped anyway: that slot keeps a log nobody reads).
    pub fn stop_dirty_tracking(&self) -> Result<(), DirtyError> {
        self.refuse_if_migrating()?;
        self.stop_tracking()
    }

    /// [`stop_dirty_tracking`](Self::stop_dirty_tracking) for the owner of
    /// tracking (a migration).
    pub(crate) fn stop_tracking(&self) -> Result<(), DirtyError> {
        let _st = self.write_state();
        let mut dirty = self.lock_dirty();
        if dirty.take().is_none() {
            return Err(DirtyError::NotTracking);
        }
        self.0.dirty_owned.store(false, Ordering::Release);
        self.0.dirty_on.store(false, Ordering::Release);
        let mut first = Ok(());
        for r in &self.0.regions {
            if let Err(source) = r.binding.set_dirty_logging(false) {
                first = first.and(Err(DirtyError::Kvm {
                    op: "KVM_SET_USER_MEMORY_REGION2 (dirty logging off)",
                    gpa: r.gpa,
                    source,
                }));
            }
        }
        first
    }

    /// Whether dirty tracking is on.
    pub fn is_tracking_dirty(&self) -> bool {
        self.0.dirty_on.load(Ordering::Acquire)
    }

    /// Records that the host changed `range` (rounded out to whole pages),
    /// if tracking is on: one atomic load otherwise.
    pub(super) fn mark_dirty(&self, range: Range<u64>) {
        if range.is_empty() || !self.0.dirty_on.load(Ordering::Acquire) {
            return;
        }
        let start = range.start / PAGE_SIZE * PAGE_SIZE;
        let end = range.end.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE);
        if let Some(host) = self.lock_dirty().as_mut() {
            host.insert(start..end);
        }
    }

    fn lock_dirty(&self) -> std::sync::MutexGuard<'_, Option<RangeSet>> {
        self.0.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The runs of set bits among the first `bits` bits of `words` (bit `i`
/// is bit `i % 64` of word `i / 64`), as bit-index ranges.
pub(crate) fn bitmap_runs(words: &[u64], bits: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (wi, &w) in words.iter().enumerate() {
        let mut w = w;
        let base = wi as u64 * 64;
        while w != 0 {
            let lo = u64::from(w.trailing_zeros());
            // The run of ones starting at `lo`.
            let ones = u64::from((w >> lo).trailing_ones());
            let (s, e) = (base + lo, (base + lo + ones).min(bits));
            if s >= bits {
                break;
            }
            match out.last_mut() {
                Some(last) if last.end == s => last.end = e,
                _ => out.push(s..e),
            }
            w = if lo + ones >= 64 {
                0
            } else {
                w & !(((1u64 << ones) - 1) << lo)
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::bitmap_runs;

    #[test]
    fn bitmap_runs_merge_across_words_and_stop_at_the_length() {
        assert!(bitmap_runs(&[0, 0], 128).is_empty());
        assert_eq!(bitmap_runs(&[0b1011], 64), vec![0..2, 3..4]);
        assert_eq!(bitmap_runs(&[1 << 63, 1], 128), vec![63..65]);
        assert_eq!(bitmap_runs(&[u64::MAX, u64::MAX], 100), vec![0..100]);
        assert_eq!(bitmap_runs(&[u64::MAX], 64), vec![0..64]);
        assert_eq!(
            bitmap_runs(&[0, 1 << 5], 64),
            Vec::<std::ops::Range<u64>>::new()
        );
    }
}
