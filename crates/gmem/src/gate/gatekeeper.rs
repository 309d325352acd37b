//! [`Gatekeeper`]: the state, the conversions, the copies, the pins and the
//! view's windows. See the module docs of [`crate::gate`].

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::error::GateError;
use super::event::MemoryEvent;
use super::kernel::{self, KernelAttributes, VmAttributes, kernel_attributes_supported};
use super::options::GateOptions;
use super::pin::{Pin, PinHolder};
use super::region::Region;
use crate::attributes::{Attribute, AttributeMap};
use crate::backing::mapping::{copy_from_guest, copy_to_guest};
use crate::backing::{BackingError, PunchReport, RestrictedMemory};
use crate::convert::{ConversionStats, ConvertError, ConvertReport, Policy, validate_range};
use crate::kvm::Vm;
use crate::kvm::vm::Binding;
use crate::range::{FileRange, PAGE_SIZE};
use crate::range_set::RangeSet;

/// What the state lock guards.
#[derive(Debug, Default)]
struct State {
    attrs: AttributeMap,
    /// Open view windows, in GPA, whole backing pages inside one region each.
    open: RangeSet,
    /// Live pins by id.
    pins: BTreeMap<u64, Range<u64>>,
    next_pin: u64,
    stats: ConversionStats,
    /// Where events go; closed receivers are dropped on the next event.
    subscribers: Vec<Sender<MemoryEvent>>,
}

impl State {
    fn notify(&mut self, events: impl Iterator<Item = MemoryEvent>) {
        if self.subscribers.is_empty() {
            return;
        }
        for event in events {
            self.subscribers.retain(|s| s.send(event.clone()).is_ok());
        }
    }

    fn pinned(&self, range: &Range<u64>) -> Option<Range<u64>> {
        self.pins
            .values()
            .find(|p| p.start < range.end && range.start < p.end)
            .cloned()
    }
}

/// Failure injection for the all-or-nothing tests.
#[cfg(test)]
#[derive(Debug, Default)]
struct Faults {
    /// Fail the next mprotect that closes a window.
    close: bool,
    /// Fail the next punch.
    punch: bool,
}

pub(crate) struct GateInner {
    state: RwLock<State>,
    policy: Policy,
    budget: usize,
    kernel: Option<Box<dyn KernelAttributes>>,
    vm: Vm,
    #[cfg(test)]
    faults: std::sync::Mutex<Faults>,
    // Last: dropped after `Drop::drop` has read the state.
    regions: Vec<Region>,
}

impl fmt::Debug for GateInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gatekeeper")
            .field("vm", &self.vm.id())
            .field("policy", &self.policy)
            .field(
                "regions",
                &self
                    .regions
                    .iter()
                    .map(|r| format!("[{:#x}, +{:#x})", r.gpa, r.len))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Drop for GateInner {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for r in &self.regions {
            let mut retained = r
                .memory
                .core()
                .retained_private
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            retained.remove(r.offset..r.offset + r.len);
            for run in state.attrs.private_runs_in(r.gpa..r.end()) {
                retained.insert(r.file_off(run.start)..r.file_off(run.end));
            }
        }
        self.vm.inner.gated.store(false, Ordering::Release);
    }
}

/// The gatekeeper of one VM's guest memory. Cheap to clone: clones share the
/// one state. See the module docs.
///
/// ```
/// use gmem::{Attribute, BackingKind, GateError, GateOptions, Gatekeeper, MemoryOptions, Policy};
/// use gmem::{SlotRequest, Vm, create_memory};
///
/// let Ok(vm) = Vm::new() else { return Ok(()) }; // no /dev/kvm here: nothing to show
/// let mem = create_memory(MemoryOptions::new(BackingKind::Memfd, 2 << 20), Some(&vm))?;
/// let ram = vm.bind(&mem, SlotRequest::new(0, 0, 2 << 20))?;
/// let gate = Gatekeeper::new(&vm, vec![ram], GateOptions::new(Attribute::Shared, Policy::InPlace))?;
/// gate.write(0x1000, b"secret")?;
/// gate.convert(0x1000, 0x1000, Attribute::Private)?;
/// let mut buf = [0u8; 6];
/// assert!(matches!(gate.read(0x1000, &mut buf), Err(GateError::Private { .. })));
/// // A device's pin holds a shared page; the guest cannot take it back meanwhile.
/// let pin = gate.pin(0x2000, 16)?;
/// assert_eq!(gate.convert(0x2000, 0x1000, Attribute::Private).unwrap_err().errno(), libc::EAGAIN);
/// drop(pin);
/// gate.convert(0x2000, 0x1000, Attribute::Private)?;
/// # Ok::<(), gmem::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Gatekeeper(Arc<GateInner>);

impl Gatekeeper {
    /// Takes `bindings` of `vm` and becomes the one way host code reaches
    /// them.
    ///
    /// Every bound file must have been created with `MMAP|INIT_SHARED` (on
    /// this kernel only gmem can keep private pages out of reach). Pages
    /// start as `opts.initial`, except those a previous gatekeeper left
    /// private. Where the VM has kernel memory attributes, they are set to
    /// match.
    ///
    /// # Errors
    /// [`GateError::NoBindings`], [`GateError::ZeroBudget`],
    /// [`GateError::ForeignBinding`], [`GateError::Overlap`],
    /// [`GateError::NotShareable`] (`EOPNOTSUPP`),
    /// [`GateError::AlreadyGated`] (`EBUSY`) if the VM has a gatekeeper;
    /// [`GateError::Map`] if a view cannot be mapped;
    /// [`GateError::Kernel`] if KVM refuses the initial attributes. The
    /// bindings are dropped (their slots deleted) on error.
    pub fn new(
        vm: &Vm,
        bindings: Vec<Binding>,
        opts: GateOptions,
    ) -> Result<Gatekeeper, GateError> {
        let kernel = kernel_attributes_supported(vm.memory_attributes())
            .then(|| Box::new(VmAttributes(vm.clone())) as Box<dyn KernelAttributes>);
        Gatekeeper::with_kernel(vm, bindings, opts, kernel)
    }

    fn with_kernel(
        vm: &Vm,
        bindings: Vec<Binding>,
        opts: GateOptions,
        kernel: Option<Box<dyn KernelAttributes>>,
    ) -> Result<Gatekeeper, GateError> {
        if bindings.is_empty() {
            return Err(GateError::NoBindings);
        }
        if opts.view_budget == 0 {
            return Err(GateError::ZeroBudget);
        }
        let mut regions = Vec::with_capacity(bindings.len());
        for b in bindings {
            regions.push(Region::new(vm, b)?);
        }
        regions.sort_by_key(|r| r.gpa);
        if opts.policy == Policy::InPlace
            && let Some(r) = regions.iter().find(|r| r.private.is_some())
        {
            return Err(GateError::InPlaceOnTwoBackings { gpa: r.gpa });
        }
        if let Some(w) = regions.windows(2).find(|w| w[0].end() > w[1].gpa) {
            return Err(GateError::Overlap {
                gpa: w[0].gpa,
                len: w[0].len,
                other_gpa: w[1].gpa,
                other_len: w[1].len,
            });
        }
        if vm.inner.gated.swap(true, Ordering::AcqRel) {
            return Err(GateError::AlreadyGated { vm: vm.id() });
        }
        let mut attrs = AttributeMap::new();
        for r in &regions {
            attrs.set(r.gpa..r.end(), opts.initial);
            let retained = r
                .memory
                .core()
                .retained_private
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for run in retained.overlapping(r.offset..r.offset + r.len) {
                let (s, e) = (run.start.max(r.offset), run.end.min(r.offset + r.len));
                attrs.set(r.to_gpa(s)..r.to_gpa(e), Attribute::Private);
            }
        }
        let gate = Gatekeeper(Arc::new(GateInner {
            state: RwLock::new(State {
                attrs,
                ..State::default()
            }),
            policy: opts.policy,
            budget: opts.view_budget,
            kernel,
            vm: vm.clone(),
            #[cfg(test)]
            faults: Default::default(),
            regions,
        }));
        if let Some(kernel) = &gate.0.kernel {
            let st = gate.read_state();
            for r in &gate.0.regions {
                let range = r.gpa..r.end();
                let result = kernel.set(&range, Attribute::Shared).and_then(|()| {
                    st.attrs
                        .private_runs_in(range.clone())
                        .try_for_each(|run| kernel.set(&run, Attribute::Private))
                });
                result.map_err(|source| GateError::Kernel {
                    gpa: range.start,
                    len: range.end - range.start,
                    source,
                })?;
            }
        }
        Ok(gate)
    }

    /// The conversion policy.
    pub fn policy(&self) -> Policy {
        self.0.policy
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.0.vm
    }

    /// Whether KVM's memory attributes are kept in step too.
    pub fn uses_kernel_attributes(&self) -> bool {
        self.0.kernel.is_some()
    }

    /// The bound guest ranges, in GPA order.
    pub fn regions(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.0.regions.iter().map(|r| r.gpa..r.end())
    }

    /// The bindings, in GPA order.
    pub fn bindings(&self) -> impl Iterator<Item = &Binding> + '_ {
        self.0.regions.iter().map(|r| &r.binding)
    }

    /// The attribute of the page at `gpa`; `None` outside guest memory.
    pub fn attribute(&self, gpa: u64) -> Option<Attribute> {
        self.region_index(gpa)?;
        Some(self.read_state().attrs.get(gpa))
    }

    /// The attribute of all of `[gpa, gpa + len)` if it is bound memory of
    /// one attribute throughout; `None` if it is mixed, empty or not all
    /// guest memory.
    pub fn uniform(&self, gpa: u64, len: u64) -> Option<Attribute> {
        let end = self.covered(gpa, len).ok()?;
        if len == 0 {
            return None;
        }
        self.read_state().attrs.uniform(gpa..end)
    }

    /// Whether all of `[gpa, gpa + len)` is bound, shared memory.
    pub fn is_shared(&self, gpa: u64, len: u64) -> bool {
        len > 0 && self.uniform(gpa, len) == Some(Attribute::Shared)
    }

    /// The private runs, in GPA order.
    pub fn private_runs(&self) -> Vec<Range<u64>> {
        self.read_state().attrs.private_runs().collect()
    }

    /// The runs of `[gpa, gpa + len)`, each with its attribute, in order.
    ///
    /// # Errors
    /// [`GateError::OutsideMemory`] unless all of it is bound memory.
    pub fn runs(&self, gpa: u64, len: u64) -> Result<Vec<(Range<u64>, Attribute)>, GateError> {
        let end = self.covered(gpa, len)?;
        let st = self.read_state();
        let mut out = Vec::new();
        let mut pos = gpa;
        for run in st.attrs.private_runs_in(gpa..end) {
            if run.start > pos {
                out.push((pos..run.start, Attribute::Shared));
            }
            pos = run.end;
            out.push((run, Attribute::Private));
        }
        if end > pos {
            out.push((pos..end, Attribute::Shared));
        }
        Ok(out)
    }

    /// Subscribes to what happens to guest memory: every run that changes
    /// sides and every discard, sent once the change is complete, in order.
    /// The channel is unbounded; drop the receiver to unsubscribe.
    pub fn subscribe(&self) -> Receiver<MemoryEvent> {
        let (tx, rx) = channel();
        self.write_state().subscribers.push(tx);
        rx
    }

    /// A copy of the attribute map.
    pub fn attributes(&self) -> AttributeMap {
        self.read_state().attrs.clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> ConversionStats {
        self.read_state().stats
    }

    /// How many windows of the view are open, and how many pins are live.
    pub fn view_windows(&self) -> (usize, usize) {
        let st = self.read_state();
        (st.open.run_count(), st.pins.len())
    }

    /// The view's address of `gpa`, for code that must show what a stray
    /// pointer meets (a test, a fault-injection harness). Dereferencing it
    /// faults unless a [`Pin`] holds a window over it open.
    pub fn view_addr(&self, gpa: u64) -> Option<*const u8> {
        let r = &self.0.regions[self.region_index(gpa)?];
        Some(r.view_ptr(gpa).cast_const())
    }

    /// Copies guest memory at `gpa` into `buf`.
    ///
    /// # Errors
    /// [`GateError::OutsideMemory`] unless all of it is guest memory;
    /// [`GateError::Private`], naming the first private GPA, if any of it is
    /// private (both `EFAULT`). Nothing is copied then.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GateError> {
        let st = self.read_state();
        let len = buf.len() as u64;
        self.check_shared(&st, gpa, len)?;
        let mut done = 0;
        self.for_each_part(gpa, len, |r, part| {
            let n = (part.end - part.start) as usize;
            // SAFETY: the part lies inside the region's file mapping, which
            // the region keeps alive and which is readable (the file is
            // MMAP|INIT_SHARED); it is all shared, and the read lock keeps a
            // conversion off it for the copy; `buf` is a separate buffer.
            unsafe { copy_from_guest(&mut buf[done..done + n], r.file_ptr(part.start)) };
            done += n;
        });
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`.
    ///
    /// # Errors
    /// As [`read`](Self::read); nothing is written then.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GateError> {
        let st = self.read_state();
        let len = data.len() as u64;
        self.check_shared(&st, gpa, len)?;
        let mut done = 0;
        self.for_each_part(gpa, len, |r, part| {
            let n = (part.end - part.start) as usize;
            // SAFETY: as in `read`: inside a live, writable file mapping, all
            // shared, held by the read lock; `data` is a separate buffer.
            unsafe { copy_to_guest(r.file_ptr(part.start), &data[done..done + n]) };
            done += n;
        });
        Ok(())
    }

    /// Fills `len` bytes of guest memory at `gpa` with `byte`.
    ///
    /// # Errors
    /// As [`read`](Self::read); nothing is written then.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<(), GateError> {
        let st = self.read_state();
        self.check_shared(&st, gpa, len)?;
        self.for_each_part(gpa, len, |r, part| {
            // SAFETY: as in `write`: inside a live, writable file mapping,
            // all shared, held by the read lock.
            unsafe {
                std::ptr::write_bytes(
                    r.file_ptr(part.start),
                    byte,
                    (part.end - part.start) as usize,
                )
            };
        });
        Ok(())
    }

    /// Pins `[gpa, gpa + len)` for direct access: opens its view window and
    /// holds it open, and refuses conversions to private and discards of it
    /// (`EAGAIN`) until the pin is dropped.
    ///
    /// # Errors
    /// [`GateError::EmptyPin`]; [`GateError::OutsideMemory`],
    /// [`GateError::Private`] (`EFAULT`); [`GateError::CrossesRegion`],
    /// [`GateError::PartialHugePage`] (`EINVAL`); [`GateError::ViewBudget`]
    /// (`ENOMEM`) if pins already hold the whole budget open;
    /// [`GateError::Protect`] if `mprotect` fails. Nothing changes then.
    pub fn pin(&self, gpa: u64, len: u64) -> Result<Pin, GateError> {
        if len == 0 {
            return Err(GateError::EmptyPin { gpa });
        }
        let mut st = self.write_state();
        let end = self.check_shared(&st, gpa, len)?;
        let r = &self.0.regions[self
            .region_index(gpa)
            .ok_or(GateError::OutsideMemory { gpa, len })?];
        if end > r.end() {
            return Err(GateError::CrossesRegion {
                gpa,
                len,
                region_gpa: r.gpa,
                region_len: r.len,
            });
        }
        let window = r.window(&(gpa..end)).ok_or(GateError::PartialHugePage {
            gpa,
            len,
            granule: r.granule,
            region_gpa: r.gpa,
            region_len: r.len,
        })?;
        self.open(&mut st, r, window, gpa, len)?;
        let id = st.next_pin;
        st.next_pin += 1;
        st.pins.insert(id, gpa..end);
        let holder: Arc<dyn PinHolder> = Arc::clone(&self.0) as Arc<dyn PinHolder>;
        Ok(Pin::new(holder, id, gpa, len, r.view_ptr(gpa)))
    }

    /// Converts `[gpa, gpa + len)` to `to`, all or nothing, under the
    /// policy.
    ///
    /// Steps, under the state's write lock: to private, the view windows
    /// over the range close first; then KVM's attributes (where the kernel
    /// has them); then gmem's map; under [`Policy::Discard`] the pages that
    /// change sides are punched **last**, after everything that can be
    /// undone. If a step fails, the steps before it are undone: the view
    /// reopened, KVM's attributes restored run by run. A punch cannot be
    /// undone: if the punch itself fails part-way, the range keeps its old
    /// attribute and the error says which bytes were already discarded.
    ///
    /// # Errors
    /// `EINVAL` for a bad range ([`ConvertError::Empty`],
    /// [`ConvertError::Unaligned`], [`ConvertError::Overflow`],
    /// [`ConvertError::OutsideMemory`]), before anything changes;
    /// [`ConvertError::Pinned`] (`EAGAIN`) if a device holds any of it and it
    /// is to become private; the kernel's errno if a step fails.
    pub fn convert(
        &self,
        gpa: u64,
        len: u64,
        to: Attribute,
    ) -> Result<ConvertReport, ConvertError> {
        self.convert_with(gpa, len, to, self.0.policy, true)
    }

    /// Ends the launch: every region becomes `initial`, keeping its content
    /// whatever the policy (the VMM wrote the boot structures and payload
    /// into shared memory; this is where SEV-SNP's launch update would
    /// encrypt them in place). Not counted in [`stats`](Self::stats).
    ///
    /// # Errors
    /// As [`convert`](Self::convert).
    pub fn launch(&self, initial: Attribute) -> Result<(), ConvertError> {
        for r in &self.0.regions {
            self.convert_with(r.gpa, r.len, initial, Policy::InPlace, false)?;
        }
        Ok(())
    }

    /// Discards `[gpa, gpa + len)` whatever its attribute (free page
    /// reporting): the guest reads zeroes there afterwards. Whole backing
    /// pages are freed; parts of huge pages are zeroed in place.
    ///
    /// # Errors
    /// As [`convert`](Self::convert) for a bad range; [`ConvertError::Pinned`]
    /// (`EAGAIN`) if a device holds any of it; the backing's errno if a punch
    /// fails.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<PunchReport, ConvertError> {
        let range = validate_range(gpa, len)?;
        let mut st = self.write_state();
        self.covered(gpa, len)
            .map_err(|_| ConvertError::OutsideMemory { gpa, len })?;
        if let Some(pin) = st.pinned(&range) {
            return Err(ConvertError::Pinned { gpa, len, pin });
        }
        let report = self
            .punch(std::slice::from_ref(&range), None)
            .map_err(|(source, done)| ConvertError::Backing {
                gpa,
                len,
                discarded: done,
                source,
            })?;
        st.notify(std::iter::once(MemoryEvent::Discarded { range }));
        st.stats.discards += 1;
        st.stats.bytes_freed += report.bytes_freed;
        st.stats.bytes_zeroed += report.bytes_zeroed;
        Ok(report)
    }

    /// Handles a `KVM_EXIT_MEMORY_FAULT`: converts the page to the kind of
    /// access the guest made, so the vCPU can re-enter.
    ///
    /// # Errors
    /// [`ConvertError::UnknownFaultFlags`] for unknown flags; as
    /// [`convert`](Self::convert) otherwise.
    pub fn handle_memory_fault(
        &self,
        flags: u64,
        gpa: u64,
        size: u64,
    ) -> Result<ConvertReport, ConvertError> {
        let (range, to) = crate::convert::decode_memory_fault(flags, gpa, size)?;
        self.convert(range.start, range.end - range.start, to)
    }

    fn convert_with(
        &self,
        gpa: u64,
        len: u64,
        to: Attribute,
        policy: Policy,
        count: bool,
    ) -> Result<ConvertReport, ConvertError> {
        let range = validate_range(gpa, len)?;
        let mut st = self.write_state();
        self.covered(gpa, len)
            .map_err(|_| ConvertError::OutsideMemory { gpa, len })?;
        if to == Attribute::Private
            && let Some(pin) = st.pinned(&range)
        {
            return Err(ConvertError::Pinned { gpa, len, pin });
        }
        let before: Vec<Range<u64>> = st.attrs.private_runs_in(range.clone()).collect();
        let changing = match to {
            Attribute::Shared => before.clone(),
            Attribute::Private => gaps(&range, &before),
        };
        let changed_bytes: u64 = changing.iter().map(|r| r.end - r.start).sum();
        // 1. To private: close the view over what changes.
        let closed = match to {
            Attribute::Private => self
                .close_over(&mut st, &changing)
                .map_err(|source| ConvertError::View { gpa, len, source })?,
            Attribute::Shared => Vec::new(),
        };
        // 2. KVM's attributes.
        if let Some(kernel) = &self.0.kernel
            && let Err(source) = kernel.set(&range, to)
        {
            kernel::restore(kernel.as_ref(), &range, &before);
            self.reopen(&mut st, &closed);
            return Err(ConvertError::Kernel { gpa, len, source });
        }
        // 3. gmem's map.
        st.attrs.set(range.clone(), to);
        // 4. The punch, last.
        let mut punched = PunchReport::default();
        if policy == Policy::Discard && !changing.is_empty() {
            match self.punch(&changing, Some(to)) {
                Ok(report) => punched = report,
                Err((source, done)) => {
                    st.attrs.set(range.clone(), Attribute::Shared);
                    for run in &before {
                        st.attrs.set(run.clone(), Attribute::Private);
                    }
                    if let Some(kernel) = &self.0.kernel {
                        kernel::restore(kernel.as_ref(), &range, &before);
                    }
                    self.reopen(&mut st, &closed);
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
        let report = ConvertReport {
            to,
            changed_bytes,
            punched,
        };
        if count {
            let stats = &mut st.stats;
            match to {
                Attribute::Private => {
                    stats.to_private += 1;
                    stats.pages_to_private += changed_bytes / PAGE_SIZE;
                }
                Attribute::Shared => {
                    stats.to_shared += 1;
                    stats.pages_to_shared += changed_bytes / PAGE_SIZE;
                }
            }
            stats.bytes_freed += punched.bytes_freed;
            stats.bytes_zeroed += punched.bytes_zeroed;
        }
        Ok(report)
    }

    /// Punches `ranges` (guest memory) in the files whose pages `to` leaves
    /// unused (both sides of a two-backing slot if `to` is `None`, an
    /// explicit discard). On failure, the backing's error and the bytes
    /// already punched.
    fn punch(
        &self,
        ranges: &[Range<u64>],
        to: Option<Attribute>,
    ) -> Result<PunchReport, (BackingError, u64)> {
        let mut report = PunchReport::default();
        let mut result = Ok(());
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
                    Some(to) => vec![r.unused_side(to)],
                    None => std::iter::once(&r.memory)
                        .chain(r.private.as_ref())
                        .collect(),
                };
                for file in files {
                    let range = FileRange::new(r.file_off(part.start), part.end - part.start)
                        .map_err(BackingError::from);
                    match range.and_then(|f| file.punch_hole(f)) {
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

    /// Opens `window` (whole backing pages in `r`) in the view, evicting
    /// unpinned windows first if the budget would be exceeded.
    fn open(
        &self,
        st: &mut State,
        r: &Region,
        window: Range<u64>,
        gpa: u64,
        len: u64,
    ) -> Result<(), GateError> {
        if st.open.contains(window.clone()) {
            return Ok(());
        }
        if st.open.run_count() >= self.0.budget {
            self.evict(st)?;
            if st.open.run_count() >= self.0.budget {
                return Err(GateError::ViewBudget {
                    gpa,
                    len,
                    pinned: st.open.run_count(),
                    budget: self.0.budget,
                    max_map_count: max_map_count(),
                });
            }
        }
        let missing = gaps(
            &window,
            &st.open.overlapping(window.clone()).collect::<Vec<_>>(),
        );
        for (i, m) in missing.iter().enumerate() {
            if let Err(e) = r.protect(m, true) {
                for done in &missing[..i] {
                    let _ = r.protect(done, false);
                }
                return Err(e);
            }
        }
        st.open.insert(window);
        Ok(())
    }

    /// Closes every open window that no pin holds.
    fn evict(&self, st: &mut State) -> Result<(), GateError> {
        let open: Vec<Range<u64>> = st.open.iter().collect();
        let closed = self.close_over(st, &open)?;
        drop(closed);
        Ok(())
    }

    /// Closes the open windows over the backing pages that `ranges` touch,
    /// except pages a pin holds. Returns what it closed, for
    /// [`reopen`](Self::reopen); on failure it has reopened what it closed.
    fn close_over(
        &self,
        st: &mut State,
        ranges: &[Range<u64>],
    ) -> Result<Vec<Range<u64>>, GateError> {
        let mut targets = RangeSet::new();
        for range in ranges {
            self.for_each_part(range.start, range.end - range.start, |r, part| {
                let w = r.window_clipped(&part);
                for open in st.open.overlapping(w.clone()) {
                    targets.insert(open.start.max(w.start)..open.end.min(w.end));
                }
            });
        }
        for pin in st.pins.values() {
            self.for_each_part(pin.start, pin.end - pin.start, |r, part| {
                targets.remove(r.window_clipped(&part));
            });
        }
        let targets = targets.to_vec();
        for (i, t) in targets.iter().enumerate() {
            let r = &self.0.regions[self.region_index(t.start).unwrap_or(0)];
            #[cfg(test)]
            let injected = std::mem::take(&mut self.0.faults.lock().unwrap().close);
            #[cfg(not(test))]
            let injected = false;
            let result = if injected {
                Err(GateError::Protect {
                    gpa: t.start,
                    len: t.end - t.start,
                    source: std::io::Error::from_raw_os_error(libc::ENOMEM),
                })
            } else {
                r.protect(t, false)
            };
            if let Err(e) = result {
                for done in &targets[..i] {
                    let r = &self.0.regions[self.region_index(done.start).unwrap_or(0)];
                    let _ = r.protect(done, true);
                }
                return Err(e);
            }
        }
        for t in &targets {
            st.open.remove(t.clone());
        }
        Ok(targets)
    }

    /// Reopens windows [`close_over`](Self::close_over) closed (error path).
    fn reopen(&self, st: &mut State, closed: &[Range<u64>]) {
        for c in closed {
            let r = &self.0.regions[self.region_index(c.start).unwrap_or(0)];
            if r.protect(c, true).is_ok() {
                st.open.insert(c.clone());
            }
        }
    }

    /// The bound range holding `gpa` (a binary search).
    #[cfg(feature = "vm-memory")]
    pub(crate) fn region_of(&self, gpa: u64) -> Option<Range<u64>> {
        let r = &self.0.regions[self.region_index(gpa)?];
        Some(r.gpa..r.end())
    }

    /// The index of the region holding `gpa`.
    fn region_index(&self, gpa: u64) -> Option<usize> {
        let regions = &self.0.regions;
        let i = regions.partition_point(|r| r.end() <= gpa);
        (i < regions.len() && regions[i].gpa <= gpa).then_some(i)
    }

    /// Checks that `[gpa, gpa + len)` is all bound memory; returns its end.
    fn covered(&self, gpa: u64, len: u64) -> Result<u64, GateError> {
        let outside = GateError::OutsideMemory { gpa, len };
        let end = gpa
            .checked_add(len)
            .ok_or(GateError::OutsideMemory { gpa, len })?;
        if len == 0 {
            return Ok(end);
        }
        let mut i = self
            .region_index(gpa)
            .ok_or(GateError::OutsideMemory { gpa, len })?;
        let regions = &self.0.regions;
        while regions[i].end() < end {
            if i + 1 >= regions.len() || regions[i + 1].gpa != regions[i].end() {
                return Err(outside);
            }
            i += 1;
        }
        Ok(end)
    }

    /// Checks that `[gpa, gpa + len)` is bound and shared; returns its end.
    fn check_shared(&self, st: &State, gpa: u64, len: u64) -> Result<u64, GateError> {
        let end = self.covered(gpa, len)?;
        if let Some(private) = st.attrs.first_private(gpa..end) {
            return Err(GateError::Private { gpa, len, private });
        }
        Ok(end)
    }

    /// Calls `f` with each region part of `[gpa, gpa + len)`, which must be
    /// [`covered`](Self::covered).
    fn for_each_part(&self, gpa: u64, len: u64, mut f: impl FnMut(&Region, Range<u64>)) {
        let end = gpa.saturating_add(len);
        let Some(mut i) = self.region_index(gpa) else {
            return;
        };
        let mut pos = gpa;
        while pos < end && i < self.0.regions.len() {
            let r = &self.0.regions[i];
            if r.gpa > pos {
                return;
            }
            let stop = end.min(r.end());
            f(r, pos..stop);
            pos = stop;
            i += 1;
        }
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.0.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.0.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl PinHolder for GateInner {
    /// Drops pin `id`. A backing page of the pin's window that holds private
    /// bytes and no other pin is closed again (huge pages only: a 4 KiB
    /// pinned page cannot have become private).
    fn release(self: Arc<Self>, id: u64) {
        let gate = Gatekeeper(self);
        let mut st = gate.write_state();
        let Some(range) = st.pins.remove(&id) else {
            return;
        };
        let Some(r) = gate.region_index(range.start).map(|i| &gate.0.regions[i]) else {
            return;
        };
        if r.granule == PAGE_SIZE {
            return;
        }
        let window = r.window_clipped(&range);
        let mut mixed = Vec::new();
        let mut page = window.start;
        while page < window.end {
            let next = page + r.granule;
            if st.attrs.first_private(page..next).is_some() {
                mixed.push(page..next);
            }
            page = next;
        }
        // Best effort: a window left open past its pin stays under the
        // safe API's check, and the next conversion over it retries.
        let _ = gate.close_over(&mut st, &mixed);
    }
}

/// The parts of `range` not covered by `runs` (sorted, inside `range`).
fn gaps(range: &Range<u64>, runs: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut pos = range.start;
    for run in runs {
        let start = run.start.max(range.start);
        if start > pos {
            out.push(pos..start);
        }
        pos = pos.max(run.end.min(range.end));
    }
    if range.end > pos {
        out.push(pos..range.end);
    }
    out
}

/// `vm.max_map_count`, for error messages (0 if unreadable).
fn max_map_count() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
