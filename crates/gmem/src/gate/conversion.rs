//! The conversion engine of [`Gatekeeper`]: one or more guest ranges change
//! sides all or nothing, under one write lock, with the punch last.

use std::ops::Range;
use std::sync::Arc;

use super::event::MemoryEvent;
use super::gatekeeper::{Gatekeeper, State, gaps};
use crate::attributes::Attribute;
use crate::backing::{BackingError, PunchReport, RestrictedMemory};
use crate::convert::{ConvertError, ConvertReport, Policy};
use crate::range::FileRange;

impl Gatekeeper {
    /// Converts `ranges` (covered, sorted, disjoint) to `to` under `policy`,
    /// all or nothing; `gpa`/`len` name the request in errors. The caller
    /// holds the write lock, counts the stats and moves the phase on.
    pub(super) fn convert_ranges(
        &self,
        st: &mut State,
        ranges: &[Range<u64>],
        to: Attribute,
        policy: Policy,
        gpa: u64,
        len: u64,
    ) -> Result<ConvertReport, ConvertError> {
        self.live(st)
            .map_err(|source| ConvertError::Poisoned { source })?;
        if to == Attribute::Private
            && let Some(pin) = ranges.iter().find_map(|r| st.pins.first_pinned(r))
        {
            return Err(ConvertError::Pinned { gpa, len, pin });
        }
        // What each range was, and what changes sides.
        let before: Vec<Vec<Range<u64>>> = ranges
            .iter()
            .map(|r| st.attrs.private_runs_in(r.clone()).collect())
            .collect();
        let changing: Vec<Range<u64>> = ranges
            .iter()
            .zip(&before)
            .flat_map(|(r, b)| match to {
                Attribute::Shared => b.clone(),
                Attribute::Private => gaps(r, b),
            })
            .collect();
        let changed_bytes: u64 = changing.iter().map(|r| r.end - r.start).sum();
        // 1. To private: close the view over what changes.
        let closed = match to {
            Attribute::Private => self
                .close_over(st, &changing)
                .map_err(|source| ConvertError::View { gpa, len, source })?,
            Attribute::Shared => Vec::new(),
        };
        // 2. KVM's attributes, range by range; a failure restores every
        // range set so far (and the one that failed, which may be half set).
        if let Some(kernel) = &self.0.kernel {
            for (i, r) in ranges.iter().enumerate() {
                if let Err(source) = kernel.set(r, to) {
                    self.restore_kernel(st, &ranges[..=i], &before[..=i]);
                    self.reopen(st, &closed);
                    return Err(ConvertError::Kernel { gpa, len, source });
                }
            }
        }
        // 3. gmem's map.
        for r in ranges {
            st.attrs.set(r.clone(), to);
        }
        // 4. The punch, last.
        let mut punched = PunchReport::default();
        if policy == Policy::Discard && !changing.is_empty() {
            match self.punch(&changing, Some(to)) {
                Ok(report) => punched = report,
                Err((source, done)) => {
                    for (r, b) in ranges.iter().zip(&before) {
                        st.attrs.set(r.clone(), Attribute::Shared);
                        for run in b {
                            st.attrs.set(run.clone(), Attribute::Private);
                        }
                    }
                    if self.0.kernel.is_some() {
                        self.restore_kernel(st, ranges, &before);
                    }
                    self.reopen(st, &closed);
                    return Err(ConvertError::Backing {
                        gpa,
                        len,
                        discarded: done,
                        source,
                    });
                }
            }
        }
        st.notify(changing.iter().map(|range| MemoryEvent::Converted {
            range: range.clone(),
            to,
        }));
        Ok(ConvertReport {
            to,
            changed_bytes,
            punched,
        })
    }

    /// Puts KVM's attributes of `ranges` back to `before` (each range's
    /// private runs before a failed conversion). If KVM refuses, KVM and gmem
    /// may disagree about which pages are private: the gatekeeper is
    /// poisoned, and refuses every host access from then on.
    fn restore_kernel(&self, st: &mut State, ranges: &[Range<u64>], before: &[Vec<Range<u64>>]) {
        let Some(kernel) = &self.0.kernel else {
            return;
        };
        for (r, b) in ranges.iter().zip(before) {
            if let Err(e) = super::kernel::restore(kernel.as_ref(), r, b) {
                st.poisoned.get_or_insert_with(|| {
                    format!(
                        "KVM_SET_MEMORY_ATTRIBUTES could not restore [{:#x}, {:#x}) after a failed conversion ({e}): KVM's attributes and gmem's may disagree",
                        r.start, r.end
                    )
                });
            }
        }
    }

    /// Punches `ranges` (guest memory) in the files whose pages `to` leaves
    /// unused (both sides of a two-backing slot if `to` is `None`, an
    /// explicit discard). On failure, the backing's error and the bytes
    /// already punched.
    pub(super) fn punch(
        &self,
        ranges: &[Range<u64>],
        to: Option<Attribute>,
    ) -> Result<PunchReport, (BackingError, u64)> {
        let mut report = PunchReport::default();
        let mut result = Ok(());
        let kernel_routes_private = self.0.kernel.is_some();
        if let Some(lazy) = self.lazy_fill() {
            // What is punched reads zero: a lazy restore must not fill it
            // later.
            for range in ranges {
                lazy.forget(range.clone());
            }
        }
        for range in ranges {
            self.for_each_part(range.start, range.end - range.start, |r, part| {
                if result.is_err() {
                    return;
                }
                #[cfg(test)]
                if std::mem::take(&mut self.0.faults.lock().unwrap().punch) {
                    result = Err(BackingError::syscall(
                        "fallocate(PUNCH_HOLE) (injected)",
                        rustix::io::Errno::INTR,
                    ));
                    return;
                }
                let files: Vec<&Arc<dyn RestrictedMemory>> = match to {
                    Some(to) => vec![r.unused_side(to, kernel_routes_private)],
                    None => std::iter::once(&r.memory)
                        .chain(r.private.as_ref())
                        .collect(),
                };
                for file in files {
                    let range = FileRange::new(r.file_off(part.start), part.end - part.start)
                        .map_err(BackingError::from);
                    match range.and_then(|f| file.core().punch(f)) {
                        Ok(done) => report += done,
                        Err(e) => {
                            result = Err(e);
                            return;
                        }
                    }
                }
            });
        }
        result
            .map(|()| report)
            .map_err(|e| (e, report.bytes_freed + report.bytes_zeroed))
    }
}
