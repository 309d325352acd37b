//! [`Gatekeeper`]: the state, its lifecycle, the queries, the copies and the
//! pins. The conversions are in `conversion.rs`, the view's windows in
//! `windows.rs` (both `impl Gatekeeper`); see the module docs of
//! [`crate::gate`].

use std::fmt;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::error::GateError;
use super::event::MemoryEvent;
use super::kernel::{KernelAttributes, VmAttributes, kernel_attributes_supported};
use super::options::GateOptions;
use super::pin::{Pin, PinHolder};
use super::pins::{PinInfo, PinTable};
use super::region::Region;
use super::view::{Reservation, ViewState};
use crate::attributes::{Attribute, AttributeMap};
use crate::backing::mapping::{copy_from_guest, copy_to_guest};
use crate::convert::{ConversionStats, ConvertError, ConvertReport, Policy, validate_range};
use crate::kvm::Vm;
use crate::kvm::vm::Binding;
use crate::range::PAGE_SIZE;

/// Where a gatekeeper is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Created: the VMM loads the guest (host writes to shared memory);
    /// [`Gatekeeper::launch`] may run, once.
    Loading,
    /// Launched, or converted: the guest's. `launch` is refused.
    Running,
}

/// What the state lock guards.
#[derive(Debug)]
pub(super) struct State {
    pub(super) attrs: AttributeMap,
    pub(super) phase: Phase,
    /// Each region's view windows, by region index.
    pub(super) views: Vec<ViewState>,
    pub(super) pins: PinTable,
    pub(super) stats: ConversionStats,
    /// Where events go; a closed or full one is dropped on the next event.
    pub(super) subscribers: Vec<SyncSender<MemoryEvent>>,
    /// Why the gatekeeper refuses everything, if it does: its records and
    /// the page tables (or KVM's attributes) may disagree.
    pub(super) poisoned: Option<String>,
    /// Whether construction finished: a gatekeeper refused part-way never
    /// held the guest, and leaves the files' retained pages as it found
    /// them.
    pub(super) built: bool,
}

impl State {
    pub(super) fn notify(&mut self, events: impl Iterator<Item = MemoryEvent>) {
        if self.subscribers.is_empty() {
            return;
        }
        for event in events {
            // A subscriber that fell a whole queue behind is cut off (its
            // receiver sees the channel close once drained) rather than
            // growing the VMM's memory without bound.
            self.subscribers.retain(|s| {
                !matches!(
                    s.try_send(event.clone()),
                    Err(TrySendError::Full(_) | TrySendError::Disconnected(_))
                )
            });
        }
    }

    /// The VMAs the views cost beyond one each.
    pub(super) fn extra_vmas(&self) -> usize {
        self.views.iter().map(|v| v.vmas() - 1).sum()
    }
}

/// Failure injection for the all-or-nothing tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub(super) struct Faults {
    /// Fail the next this many mprotects that close a window.
    pub(super) close: u32,
    /// Fail the next this many mprotects that open a window (a failed
    /// rollback, when a close failed first).
    pub(super) reopen: u32,
    /// Fail the next punch.
    pub(super) punch: bool,
}

/// What a lazy restore offers the gatekeeper: host paths fill what they
/// touch first, discards forget what they drop, and a snapshot fills it
/// all. Defined here, implemented by `snapshot::lazy`, so that the gate
/// does not depend on the snapshot module.
pub(crate) trait LazyFill: Send + Sync {
    /// Fills every not-yet-restored page of `range` (guest addresses).
    fn resolve(&self, range: Range<u64>) -> Result<(), GateError>;
    /// The range is being discarded: its pages are not to be filled.
    fn forget(&self, range: Range<u64>);
    /// Fills every page not yet restored.
    fn fill_all(&self) -> Result<(), GateError>;
    /// Why the restore failed, if it did: the gatekeeper refuses everything.
    fn failure(&self) -> Option<String>;
}

pub(crate) struct GateInner {
    pub(super) state: RwLock<State>,
    pub(super) policy: Policy,
    /// The VMAs the views may add beyond one each.
    pub(super) budget: usize,
    pub(super) max_pins: usize,
    pub(super) kernel: Option<Box<dyn KernelAttributes>>,
    pub(super) vm: Vm,
    /// A lazy restore filling the memory, while one is.
    pub(super) lazy: std::sync::Mutex<Option<Arc<dyn LazyFill>>>,
    /// Whether `lazy` holds one: the host paths' lock-free check, so that a
    /// gatekeeper no restore fills takes no extra lock per call.
    pub(super) has_lazy: std::sync::atomic::AtomicBool,
    /// What the host dirtied since the last take, while dirty tracking is
    /// on (`gate/dirty.rs`).
    pub(super) dirty: std::sync::Mutex<Option<crate::range_set::RangeSet>>,
    /// Whether `dirty` holds a set: the host paths' lock-free check.
    pub(super) dirty_on: std::sync::atomic::AtomicBool,
    /// Whether a migration owns dirty tracking (the public take and stop
    /// are refused then).
    pub(super) dirty_owned: std::sync::atomic::AtomicBool,
    #[cfg(test)]
    pub(super) faults: std::sync::Mutex<Faults>,
    // Last: dropped after `Drop::drop` has read the state.
    pub(super) regions: Vec<Region>,
    /// This gatekeeper's share of the process-wide view budget.
    _reservation: Reservation,
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
        let poisoned = self.state.is_poisoned();
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for r in self.regions.iter().filter(|_| state.built) {
            let mut retained = r.memory.core().retained_private();
            if poisoned || state.poisoned.is_some() {
                // The map may be wrong: every page stays private.
                retained.insert(r.offset..r.offset + r.len);
                continue;
            }
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
/// // The launch phase ended with the first conversion: launch is refused now.
/// assert!(gate.launch(Attribute::Private).is_err());
/// # Ok::<(), gmem::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Gatekeeper(pub(super) Arc<GateInner>);

impl Gatekeeper {
    /// Takes `bindings` of `vm` and becomes the one way host code reaches
    /// them.
    ///
    /// Every bound file must have been created with `MMAP|INIT_SHARED` (on
    /// this kernel only gmem can keep private pages out of reach). Pages
    /// start as `opts.initial`, except those a previous gatekeeper left
    /// private. Where the VM has kernel memory attributes, they are set to
    /// match. The gatekeeper starts in its launch phase: the VMM writes the
    /// guest into shared memory, then [`launch`](Self::launch)es.
    ///
    /// Its views' map entries are reserved from the process-wide budget now
    /// (one per region and [`GateOptions::view_budget`]), so that a VM that
    /// cannot have them is refused here, not starved later.
    ///
    /// # Errors
    /// [`GateError::NoBindings`], [`GateError::ZeroBudget`],
    /// [`GateError::ForeignBinding`], [`GateError::Overlap`],
    /// [`GateError::NotShareable`] (`EOPNOTSUPP`),
    /// [`GateError::AlreadyGated`] (`EBUSY`) if the VM has a gatekeeper;
    /// [`GateError::ProcessViewBudget`] (`ENOMEM`) if the process's live
    /// gatekeepers hold the budget;
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

    pub(super) fn with_kernel(
        vm: &Vm,
        bindings: Vec<Binding>,
        opts: GateOptions,
        kernel: Option<Box<dyn KernelAttributes>>,
    ) -> Result<Gatekeeper, GateError> {
        if bindings.is_empty() {
            return Err(GateError::NoBindings);
        }
        if opts.view_budget == 0 || opts.max_pins == 0 {
            return Err(GateError::ZeroBudget);
        }
        let reservation = Reservation::take(bindings.len().saturating_add(opts.view_budget))?;
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
            let retained = r.memory.core().retained_private().clone();
            for run in retained.overlapping(r.offset..r.offset + r.len) {
                let (s, e) = (run.start.max(r.offset), run.end.min(r.offset + r.len));
                attrs.set(r.to_gpa(s)..r.to_gpa(e), Attribute::Private);
            }
        }
        let views = regions.iter().map(Region::view_state).collect();
        let gate = Gatekeeper(Arc::new(GateInner {
            state: RwLock::new(State {
                attrs,
                phase: Phase::Loading,
                views,
                pins: PinTable::default(),
                stats: ConversionStats::default(),
                subscribers: Vec::new(),
                poisoned: None,
                built: false,
            }),
            policy: opts.policy,
            budget: opts.view_budget,
            max_pins: opts.max_pins,
            kernel,
            vm: vm.clone(),
            lazy: std::sync::Mutex::new(None),
            has_lazy: std::sync::atomic::AtomicBool::new(false),
            dirty: std::sync::Mutex::new(None),
            dirty_on: std::sync::atomic::AtomicBool::new(false),
            dirty_owned: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            faults: Default::default(),
            regions,
            _reservation: reservation,
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
        gate.write_state().built = true;
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

    /// Whether the launch phase is over ([`launch`](Self::launch) ran, or a
    /// conversion or discard did).
    pub fn is_launched(&self) -> bool {
        self.read_state().phase == Phase::Running
    }

    /// Why the gatekeeper refuses every access and conversion, if it does:
    /// a view update or a restore of KVM's attributes failed in a way that
    /// left gmem's records and the kernel's state possibly apart. The guest
    /// keeps its memory; the host reaches none of it.
    pub fn poisoned(&self) -> Option<String> {
        let st = self.read_state();
        self.live(&st).err().map(|e| e.to_string())
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
    /// sides and every discard, sent once the change is complete, in order,
    /// into a queue of [`DEFAULT_EVENT_QUEUE`] events. A subscriber that
    /// falls a whole queue behind is dropped: its receiver sees the channel
    /// close once it has drained it, and knows it lost events. Drop the
    /// receiver to unsubscribe.
    pub fn subscribe(&self) -> Receiver<MemoryEvent> {
        self.subscribe_with_capacity(DEFAULT_EVENT_QUEUE)
    }

    /// As [`subscribe`](Self::subscribe), with a queue of `capacity` events
    /// (1 to 2^20). A gatekeeper keeps at most 64 subscribers: a 65th
    /// replaces the oldest, whose receiver then sees the channel close.
    pub fn subscribe_with_capacity(&self, capacity: usize) -> Receiver<MemoryEvent> {
        let (tx, rx) = sync_channel(capacity.clamp(1, MAX_EVENT_QUEUE));
        let mut st = self.write_state();
        if st.subscribers.len() >= MAX_SUBSCRIBERS {
            // The oldest goes (its receiver sees the channel close): the list
            // is bounded even if receivers are dropped while no event comes.
            st.subscribers.remove(0);
        }
        st.subscribers.push(tx);
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
        let open = st.views.iter().map(|v| v.open().run_count()).sum();
        (open, st.pins.len())
    }

    /// The map entries (VMAs) the views cost now, as the kernel counts them,
    /// and the most they may cost (one per region plus
    /// [`GateOptions::view_budget`]).
    pub fn view_vmas(&self) -> (usize, usize) {
        let st = self.read_state();
        let regions = self.0.regions.len();
        (regions + st.extra_vmas(), regions + self.0.budget)
    }

    /// The live pins: who holds which range, and for how long, so that a VMM
    /// can find a device that holds memory too long (a pin cannot be
    /// revoked: its holder may be using its pointer).
    pub fn pins(&self) -> Vec<PinInfo> {
        self.read_state().pins.list()
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
    /// private (both `EFAULT`); [`GateError::NoHugePage`] (`ENOMEM`) where a
    /// discarded huge page could not be reserved again;
    /// [`GateError::Poisoned`] (`EIO`). Nothing is copied then.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GateError> {
        let st = self.read_state();
        let len = buf.len() as u64;
        self.check_access(&st, gpa, len)?;
        self.resolve_lazy(gpa, len)?;
        let mut done = 0;
        self.for_each_part(gpa, len, |r, part| {
            let n = (part.end - part.start) as usize;
            // SAFETY: the part lies inside the region's file mapping, which
            // the region keeps alive and which is readable (the file is
            // MMAP|INIT_SHARED); it is all shared and (hugetlb) backed or
            // reserved, and the read lock keeps a conversion off it for the
            // copy; `buf` is a separate buffer.
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
        self.check_access(&st, gpa, len)?;
        self.resolve_lazy(gpa, len)?;
        let mut done = 0;
        self.for_each_part(gpa, len, |r, part| {
            let n = (part.end - part.start) as usize;
            // SAFETY: as in `read`: inside a live, writable file mapping, all
            // shared and backed, held by the read lock; `data` is a separate
            // buffer.
            unsafe { copy_to_guest(r.file_ptr(part.start), &data[done..done + n]) };
            done += n;
        });
        self.mark_dirty(gpa..gpa + len);
        Ok(())
    }

    /// Fills `len` bytes of guest memory at `gpa` with `byte`.
    ///
    /// # Errors
    /// As [`read`](Self::read); nothing is written then.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<(), GateError> {
        let st = self.read_state();
        self.check_access(&st, gpa, len)?;
        self.resolve_lazy(gpa, len)?;
        self.for_each_part(gpa, len, |r, part| {
            // SAFETY: as in `write`: inside a live, writable file mapping,
            // all shared and backed, held by the read lock. The fill writes
            // raw bytes through the pointer, never through a reference.
            unsafe {
                std::ptr::write_bytes(
                    r.file_ptr(part.start),
                    byte,
                    (part.end - part.start) as usize,
                )
            };
        });
        self.mark_dirty(gpa..gpa + len);
        Ok(())
    }

    /// Pins `[gpa, gpa + len)` for direct access: opens its view window and
    /// holds it open, and refuses conversions to private and discards of it
    /// (`EAGAIN`) until the pin is dropped.
    ///
    /// # Errors
    /// [`GateError::EmptyPin`]; [`GateError::OutsideMemory`],
    /// [`GateError::Private`] (`EFAULT`); [`GateError::CrossesRegion`],
    /// [`GateError::PartialHugePage`] (`EINVAL`); [`GateError::TooManyPins`]
    /// and [`GateError::ViewBudget`] (`ENOMEM`) if pins already hold the
    /// gatekeeper's pin bound or view budget; [`GateError::NoHugePage`]
    /// (`ENOMEM`); [`GateError::Protect`] if `mprotect` fails;
    /// [`GateError::Poisoned`] (`EIO`). Nothing changes then.
    pub fn pin(&self, gpa: u64, len: u64) -> Result<Pin, GateError> {
        if len == 0 {
            return Err(GateError::EmptyPin { gpa });
        }
        let mut st = self.write_state();
        let end = self.check_access(&st, gpa, len)?;
        let ri = self
            .region_index(gpa)
            .ok_or(GateError::OutsideMemory { gpa, len })?;
        let r = &self.0.regions[ri];
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
        if st.pins.len() >= self.0.max_pins {
            return Err(GateError::TooManyPins {
                gpa,
                len,
                live: st.pins.len(),
                max: self.0.max_pins,
            });
        }
        self.resolve_lazy(gpa, len)?;
        self.admit_pin(&mut st, ri, &window, gpa, len)?;
        self.open(&mut st, ri, window.clone(), gpa, len)?;
        st.views[ri].pin_window(&window);
        let id = st.pins.add(gpa..end);
        let holder: Arc<dyn PinHolder> = Arc::clone(&self.0) as Arc<dyn PinHolder>;
        Ok(Pin::new(holder, id, gpa, len, r.view_ptr(gpa)))
    }

    /// Converts `[gpa, gpa + len)` to `to`, all or nothing, under the
    /// policy. A successful conversion ends the launch phase.
    ///
    /// Steps, under the state's write lock: to private, the view windows
    /// over the range close first; then KVM's attributes (where the kernel
    /// has them); then gmem's map; under [`Policy::Discard`] the pages that
    /// change sides are punched **last**, after everything that can be
    /// undone. If a step fails, the steps before it are undone: the view
    /// reopened, KVM's attributes restored run by run. A punch cannot be
    /// undone: if the punch itself fails part-way, the range keeps its old
    /// attribute and the error says which bytes were already discarded. If
    /// an undo itself fails, the gatekeeper is poisoned
    /// ([`poisoned`](Self::poisoned)) rather than left inconsistent.
    ///
    /// # Errors
    /// `EINVAL` for a bad range ([`ConvertError::Empty`],
    /// [`ConvertError::Unaligned`], [`ConvertError::Overflow`],
    /// [`ConvertError::OutsideMemory`]), before anything changes;
    /// [`ConvertError::Pinned`] (`EAGAIN`) if a device holds any of it and it
    /// is to become private; [`ConvertError::Poisoned`] (`EIO`); the kernel's
    /// errno if a step fails.
    pub fn convert(
        &self,
        gpa: u64,
        len: u64,
        to: Attribute,
    ) -> Result<ConvertReport, ConvertError> {
        let range = validate_range(gpa, len)?;
        let mut st = self.write_state();
        self.covered(gpa, len)
            .map_err(|_| ConvertError::OutsideMemory { gpa, len })?;
        let report = self.convert_ranges(
            &mut st,
            std::slice::from_ref(&range),
            to,
            self.0.policy,
            gpa,
            len,
        )?;
        self.mark_dirty(range);
        self.count(&mut st, &report);
        st.phase = Phase::Running;
        Ok(report)
    }

    /// Ends the launch phase: every shared page becomes `initial`, keeping
    /// its content whatever the policy (the VMM wrote the boot structures
    /// and payload into shared memory; this is where SEV-SNP's launch update
    /// would encrypt them in place). A page that is private stays private:
    /// launch never shares a page (only the guest's conversions do, under
    /// the policy), so pages a previous gatekeeper left private stay out of
    /// the host's reach. All or nothing across regions; not counted in
    /// [`stats`](Self::stats).
    ///
    /// Launch happens once, in the launch phase: after a launch, or after a
    /// conversion or discard ended that phase, it is refused.
    ///
    /// # Errors
    /// [`ConvertError::AlreadyLaunched`] (`EINVAL`) outside the launch
    /// phase; as [`convert`](Self::convert) otherwise (a pin anywhere in
    /// memory refuses a launch to private with `EAGAIN`, and nothing
    /// changes).
    pub fn launch(&self, initial: Attribute) -> Result<(), ConvertError> {
        let mut st = self.write_state();
        if st.phase != Phase::Loading {
            return Err(ConvertError::AlreadyLaunched);
        }
        if initial == Attribute::Private {
            let all: Vec<Range<u64>> = self.regions().collect();
            let (gpa, end) = (all[0].start, all[all.len() - 1].end);
            self.convert_ranges(
                &mut st,
                &all,
                Attribute::Private,
                Policy::InPlace,
                gpa,
                end - gpa,
            )?;
        } else {
            self.live(&st)
                .map_err(|source| ConvertError::Poisoned { source })?;
        }
        st.phase = Phase::Running;
        Ok(())
    }

    /// Discards `[gpa, gpa + len)` whatever its attribute (free page
    /// reporting): the guest reads zeroes there afterwards. Whole backing
    /// pages are freed; parts of huge pages are zeroed in place. A
    /// successful discard ends the launch phase.
    ///
    /// # Errors
    /// As [`convert`](Self::convert) for a bad range; [`ConvertError::Pinned`]
    /// (`EAGAIN`) if a device holds any of it; the backing's errno if a punch
    /// fails.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<crate::PunchReport, ConvertError> {
        let range = validate_range(gpa, len)?;
        let mut st = self.write_state();
        self.covered(gpa, len)
            .map_err(|_| ConvertError::OutsideMemory { gpa, len })?;
        self.live(&st)
            .map_err(|source| ConvertError::Poisoned { source })?;
        if let Some(pin) = st.pins.first_pinned(&range) {
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
        self.mark_dirty(range.clone());
        st.notify(std::iter::once(MemoryEvent::Discarded { range }));
        st.stats.discards += 1;
        st.stats.bytes_freed += report.bytes_freed;
        st.stats.bytes_zeroed += report.bytes_zeroed;
        st.phase = Phase::Running;
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

    /// Counts a conversion in the stats.
    fn count(&self, st: &mut State, report: &ConvertReport) {
        let stats = &mut st.stats;
        match report.to {
            Attribute::Private => {
                stats.to_private += 1;
                stats.pages_to_private += report.changed_bytes / PAGE_SIZE;
            }
            Attribute::Shared => {
                stats.to_shared += 1;
                stats.pages_to_shared += report.changed_bytes / PAGE_SIZE;
            }
        }
        stats.bytes_freed += report.punched.bytes_freed;
        stats.bytes_zeroed += report.punched.bytes_zeroed;
    }

    /// The bound range holding `gpa` (a binary search).
    #[cfg(feature = "vm-memory")]
    pub(crate) fn region_of(&self, gpa: u64) -> Option<Range<u64>> {
        let r = &self.0.regions[self.region_index(gpa)?];
        Some(r.gpa..r.end())
    }

    /// The index of the region holding `gpa`.
    pub(super) fn region_index(&self, gpa: u64) -> Option<usize> {
        let regions = &self.0.regions;
        let i = regions.partition_point(|r| r.end() <= gpa);
        (i < regions.len() && regions[i].gpa <= gpa).then_some(i)
    }

    /// Checks that `[gpa, gpa + len)` is all bound memory; returns its end.
    pub(super) fn covered(&self, gpa: u64, len: u64) -> Result<u64, GateError> {
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

    /// The lazy restore filling this memory, if one is.
    pub(crate) fn lazy_fill(&self) -> Option<Arc<dyn LazyFill>> {
        if !self.0.has_lazy.load(Ordering::Acquire) {
            return None;
        }
        self.0
            .lazy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts (`Some`) or ends (`None`) a lazy restore's hold on the
    /// memory.
    pub(crate) fn set_lazy_fill(&self, lazy: Option<Arc<dyn LazyFill>>) {
        let mut held = self.0.lazy.lock().unwrap_or_else(|e| e.into_inner());
        self.0.has_lazy.store(lazy.is_some(), Ordering::Release);
        *held = lazy;
    }

    /// Fills what a lazy restore has not yet restored of `[gpa, gpa + len)`
    /// before a host path touches it: a host access never reads a page
    /// the snapshot holds as zero.
    fn resolve_lazy(&self, gpa: u64, len: u64) -> Result<(), GateError> {
        match self.lazy_fill() {
            Some(lazy) => lazy.resolve(gpa..gpa.saturating_add(len)),
            None => Ok(()),
        }
    }

    /// Refuses everything once the gatekeeper is poisoned (or a panic
    /// poisoned its lock).
    pub(super) fn live(&self, st: &State) -> Result<(), GateError> {
        if let Some(reason) = &st.poisoned {
            return Err(GateError::Poisoned {
                reason: reason.clone(),
            });
        }
        if self.0.state.is_poisoned() {
            return Err(GateError::Poisoned {
                reason: "a panic while the gatekeeper's state lock was held".into(),
            });
        }
        if let Some(reason) = self.lazy_fill().and_then(|l| l.failure()) {
            return Err(GateError::Poisoned { reason });
        }
        Ok(())
    }

    /// Checks that `[gpa, gpa + len)` may be touched by the host: the
    /// gatekeeper is live, it is bound and shared, and (hugetlb) every huge
    /// page of it has its page or a reservation. Returns its end.
    fn check_access(&self, st: &State, gpa: u64, len: u64) -> Result<u64, GateError> {
        self.live(st)?;
        let end = self.covered(gpa, len)?;
        if let Some(private) = st.attrs.first_private(gpa..end) {
            return Err(GateError::Private { gpa, len, private });
        }
        let mut result = Ok(());
        self.for_each_part(gpa, len, |r, part| {
            if result.is_ok() && r.granule != PAGE_SIZE {
                let off = r.file_off(part.start);
                if let Err(source) = r.memory.core().ensure_reserved(off, part.end - part.start) {
                    result = Err(GateError::NoHugePage { gpa, len, source });
                }
            }
        });
        result.map(|()| end)
    }

    /// Calls `f` with each region part of `[gpa, gpa + len)`, which must be
    /// [`covered`](Self::covered).
    pub(super) fn for_each_part(&self, gpa: u64, len: u64, mut f: impl FnMut(&Region, Range<u64>)) {
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

    /// The state, for reading. A poisoned lock still gives it (queries
    /// answer), but [`live`](Self::live) refuses every access then.
    pub(super) fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.0.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, for writing; see [`read_state`](Self::read_state).
    pub(super) fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.0.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// How many events a subscriber's queue holds by default.
pub const DEFAULT_EVENT_QUEUE: usize = 4096;

/// The largest queue a subscriber may ask for.
const MAX_EVENT_QUEUE: usize = 1 << 20;

/// The most subscribers a gatekeeper keeps; a new one past it replaces the
/// oldest.
const MAX_SUBSCRIBERS: usize = 64;

impl PinHolder for GateInner {
    /// Drops pin `id`. A backing page of the pin's window that holds private
    /// bytes and no other pin is closed again (huge pages only: a 4 KiB
    /// pinned page cannot have become private).
    fn release(self: Arc<Self>, id: u64) {
        let gate = Gatekeeper(self);
        let mut st = gate.write_state();
        let Some(range) = st.pins.remove(id) else {
            return;
        };
        // The device is done with it: what it wrote is dirty.
        gate.mark_dirty(range.clone());
        let Some(ri) = gate.region_index(range.start) else {
            return;
        };
        let r = &gate.0.regions[ri];
        if let Some(w) = r.window(&range) {
            st.views[ri].unpin_window(&w);
        }
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
        if !mixed.is_empty() && gate.close_over(&mut st, &mixed).is_err() {
            // A window over private bytes could not be closed: poisoned
            // already by close_over's failed restore, or still open and
            // listed open, which the next conversion retries; a stray
            // pointer could reach it meanwhile, so refuse everything.
            if st.poisoned.is_none() {
                st.poisoned = Some(format!(
                    "a huge page window over private bytes at [{:#x}, {:#x}) could not be closed",
                    window.start, window.end
                ));
            }
        }
    }
}

/// The parts of `range` not covered by `runs` (sorted, inside `range`).
pub(super) fn gaps(range: &Range<u64>, runs: &[Range<u64>]) -> Vec<Range<u64>> {
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

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
