//! The gatekeeper: the one owner of a VM's private/shared state and the only
//! way host code reaches its guest memory.
//!
//! A [`Gatekeeper`] takes a VM's [`Binding`]s by value and from then on owns:
//!
//! - **the private/shared state** of every bound page: one attribute map per
//!   VM (a second gatekeeper for the same VM is refused while the first
//!   lives, and clones share the one state). When a gatekeeper is dropped,
//!   the file offsets that were private are remembered by the file, and the
//!   next gatekeeper over them starts them private;
//! - **conversions** ([`convert`](Gatekeeper::convert),
//!   [`discard`](Gatekeeper::discard), [`launch`](Gatekeeper::launch)), all
//!   or nothing, with the [`Policy`] of the VM and, where the kernel has
//!   memory attributes, KVM's attributes kept in step;
//! - **every host access path**: safe copies ([`read`](Gatekeeper::read),
//!   [`write`](Gatekeeper::write), [`fill`](Gatekeeper::fill)) that refuse
//!   any private byte, and [`Pin`]s, the direct windows devices use (and,
//!   with the `vm-memory` feature, `DeviceMemory`, vm-memory's
//!   `GuestMemory` over pins).
//!
//! The raw paths to a file ([`RestrictedMemory::map_host`],
//! [`RestrictedMemory::as_fd`]) are `unsafe`, with the gatekeeper's rules as
//! their contract, so no safe public item returns a private byte.
//!
//! # The host view: a page-table cache of the attributes
//!
//! Each region has a second `MAP_SHARED` mapping, the *view*, created
//! `PROT_NONE`. A window of it is opened (read-write) only when a device pins
//! a shared range, and closed again when any of it becomes private, so a
//! stray pointer into guest memory faults unless a device holds that range
//! right now or held it while it was shared. Open windows are a cache: their
//! number is kept under a budget ([`GateOptions::view_budget`], well below
//! `vm.max_map_count`) by closing unpinned windows, so no attribute pattern a
//! guest makes costs the VMM address-space map entries: conversions to
//! shared touch no page table at all, and conversions to private only close
//! windows that are open.
//!
//! Safe copies go through the file's own mapping (the one KVM's memslot
//! uses), after the attribute check and under the state lock, so a copy is
//! one `memcpy` per region and never waits for a window.
//!
//! # Pins
//!
//! While a [`Pin`] holds a range, converting any of it to private or
//! discarding it is refused with [`ConvertError::Pinned`] (`EAGAIN`): the
//! guest's doorbell answers `-EAGAIN` and the guest may retry. A device can
//! therefore never fault on a page the guest took away.
//!
//! # Huge pages
//!
//! Windows open whole backing pages. On hugetlb a pin of a shared 4 KiB page
//! opens its huge page; private 4 KiB pages of that huge page are then
//! reachable by a raw pointer (never by the safe API) until the pin is
//! dropped, when a huge page holding private bytes is closed again. A huge
//! page that the binding covers only in part is never opened (a pin there is
//! refused with [`GateError::PartialHugePage`]; safe copies work): its other
//! part is not this region's to expose.
//!
//! # Concurrency
//!
//! Copies hold the state's read lock for their length; conversions, pins and
//! unpins take the write lock, so a copy sees the state before or after a
//! conversion, never a mix.

mod kernel;
mod pin;
#[cfg(feature = "vm-memory")]
mod vm_memory;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rustix::mm::{MprotectFlags, ProtFlags};
use thiserror::Error;

pub use kernel::{attributes_request, kernel_attributes_supported};
pub use pin::Pin;
#[cfg(feature = "vm-memory")]
pub use vm_memory::DeviceMemory;

use kernel::{KernelAttributes, VmAttributes};

use crate::attributes::{Attribute, AttributeMap};
use crate::backing::mapping::{Mapping, Registration, copy_from_guest, copy_to_guest};
use crate::backing::{BackingError, BackingKind, GmemFlags, PunchReport, RestrictedMemory};
use crate::binding::Binding;
use crate::convert::{ConversionStats, ConvertError, ConvertReport, Policy, validate_range};
use crate::kvm::{Vm, VmId};
use crate::range::{FileRange, PAGE_SIZE};
use crate::range_set::RangeSet;

/// The default budget of open view windows per gatekeeper. Each window costs
/// at most two VMAs; `vm.max_map_count` is 65,530 by default.
pub const DEFAULT_VIEW_BUDGET: usize = 4096;

/// How the gatekeeper's host view works on `kind`, for `gmem probe`.
pub fn view_mechanism(kind: BackingKind) -> String {
    let unit = match kind.page_size() {
        PAGE_SIZE => "4 KiB",
        p if p >= 1 << 30 => "1 GiB",
        _ => "2 MiB",
    };
    format!(
        "PROT_NONE; mprotect windows of {unit} opened by device pins (at most {DEFAULT_VIEW_BUDGET} by default); conversions change no page table unless a window is open"
    )
}

/// How a gatekeeper starts and converts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GateOptions {
    /// The attribute every bound page starts with (pages a previous
    /// gatekeeper left private start private whatever this says).
    pub initial: Attribute,
    /// What a conversion does to the content.
    pub policy: Policy,
    /// The most open view windows (see the module docs); at least 1.
    pub view_budget: usize,
}

impl GateOptions {
    /// Options with `initial`, `policy` and the default view budget.
    pub fn new(initial: Attribute, policy: Policy) -> Self {
        GateOptions {
            initial,
            policy,
            view_budget: DEFAULT_VIEW_BUDGET,
        }
    }

    /// The same options with another view budget.
    pub fn with_view_budget(self, view_budget: usize) -> Self {
        GateOptions {
            view_budget,
            ..self
        }
    }
}

impl Default for GateOptions {
    fn default() -> Self {
        GateOptions::new(Attribute::Shared, Policy::InPlace)
    }
}

/// Why the gatekeeper refused an access, a pin or its own construction.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum GateError {
    /// Some byte of the access lies in private memory.
    #[error(
        "guest range [{gpa:#x}, +{len:#x}) holds private memory from GPA {private:#x}: the host may not access it"
    )]
    Private {
        /// The start of the access.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The first private byte.
        private: u64,
    },
    /// Some byte of the access lies outside every bound region.
    #[error("guest range [{gpa:#x}, +{len:#x}) is not all bound guest memory")]
    OutsideMemory {
        /// The start of the access.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// A pin of zero bytes.
    #[error("a pin at GPA {gpa:#x} has length 0; a pin holds at least one byte")]
    EmptyPin {
        /// The GPA.
        gpa: u64,
    },
    /// A pin must lie in one region (one host mapping).
    #[error(
        "guest range [{gpa:#x}, +{len:#x}) crosses the end of the region [{region_gpa:#x}, +{region_len:#x}); a pin lies in one region"
    )]
    CrossesRegion {
        /// The start of the pin.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The region's GPA.
        region_gpa: u64,
        /// The region's length.
        region_len: u64,
    },
    /// A pin would open a huge page the binding covers only in part.
    #[error(
        "guest range [{gpa:#x}, +{len:#x}) lies in a {granule:#x}-byte page that the region [{region_gpa:#x}, +{region_len:#x}) covers only in part; such pages are never opened (safe copies work)"
    )]
    PartialHugePage {
        /// The start of the pin.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The backing's page size.
        granule: u64,
        /// The region's GPA.
        region_gpa: u64,
        /// The region's length.
        region_len: u64,
    },
    /// Pins hold more windows open than the view budget allows.
    #[error(
        "pinning [{gpa:#x}, +{len:#x}) needs a view window, but pins hold {pinned} of the budget of {budget} open (vm.max_map_count is {max_map_count}); release pins or raise GateOptions::view_budget"
    )]
    ViewBudget {
        /// The start of the pin.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Windows that pins hold open.
        pinned: usize,
        /// The budget.
        budget: usize,
        /// The process's map count limit.
        max_map_count: u64,
    },
    /// The file cannot be shared with the host in place.
    #[error(
        "the file bound at GPA {gpa:#x} has flags {flags:#x}, not MMAP|INIT_SHARED (0x3): the host cannot map it, and this kernel cannot convert its pages in place"
    )]
    NotShareable {
        /// The region's GPA.
        gpa: u64,
        /// The file's flags.
        flags: u64,
    },
    /// Two bindings overlap in guest physical space.
    #[error(
        "bindings [{gpa:#x}, +{len:#x}) and [{other_gpa:#x}, +{other_len:#x}) overlap in guest physical space"
    )]
    Overlap {
        /// One binding's GPA.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The other's GPA.
        other_gpa: u64,
        /// Its length.
        other_len: u64,
    },
    /// A binding of another VM.
    #[error("the binding at GPA {gpa:#x} belongs to {owner}, not to {vm}")]
    ForeignBinding {
        /// The binding's GPA.
        gpa: u64,
        /// Its VM.
        owner: VmId,
        /// The gatekeeper's VM.
        vm: VmId,
    },
    /// No bindings were given.
    #[error("a gatekeeper needs at least one binding")]
    NoBindings,
    /// The VM has a gatekeeper already.
    #[error(
        "{vm} already has a gatekeeper: a VM's memory has one, and clones of it share its state"
    )]
    AlreadyGated {
        /// The VM.
        vm: VmId,
    },
    /// The view budget is zero.
    #[error("view_budget is 0; the view needs at least one window")]
    ZeroBudget,
    /// A view mapping could not be made.
    #[error("mapping the host view of the file bound at GPA {gpa:#x}")]
    Map {
        /// The region's GPA.
        gpa: u64,
        /// The backing's error.
        #[source]
        source: BackingError,
    },
    /// `mprotect` of a view window failed.
    #[error("mprotect of the view window [{gpa:#x}, +{len:#x}) failed")]
    Protect {
        /// The start of the window.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// Kernel memory attributes could not be set for the initial state.
    #[error("KVM_SET_MEMORY_ATTRIBUTES for the initial state failed")]
    Kernel(#[source] Box<ConvertError>),
}

impl GateError {
    /// The errno for the same misuse: `EFAULT` for refused accesses.
    pub fn errno(&self) -> i32 {
        match self {
            GateError::Private { .. } | GateError::OutsideMemory { .. } => libc::EFAULT,
            GateError::EmptyPin { .. }
            | GateError::CrossesRegion { .. }
            | GateError::PartialHugePage { .. }
            | GateError::ForeignBinding { .. }
            | GateError::NoBindings
            | GateError::ZeroBudget => libc::EINVAL,
            GateError::ViewBudget { .. } => libc::ENOMEM,
            GateError::NotShareable { .. } => libc::EOPNOTSUPP,
            GateError::Overlap { .. } => libc::EEXIST,
            GateError::AlreadyGated { .. } => libc::EBUSY,
            GateError::Map { source, .. } => source.errno(),
            GateError::Protect { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            GateError::Kernel(e) => e.errno(),
        }
    }
}

/// One bound range, as the gatekeeper sees it.
struct Region {
    // Field order is drop order: the view's registration, the view, then
    // the binding.
    /// Kept for its `Drop`: the view's entry in the file's mapping registry
    /// (population queries and punches see the view's page tables too).
    _registration: Registration,
    /// The view: the file's `[view_off, view_off + view.len())`, `PROT_NONE`
    /// except where a window is open.
    view: Mapping,
    view_off: u64,
    gpa: u64,
    len: u64,
    /// The file offset of `gpa`.
    offset: u64,
    /// The backing's page size: what a window opens at once.
    granule: u64,
    /// The file's own mapping (KVM's `userspace_addr` for offset 0).
    file_base: *mut u8,
    memory: Arc<dyn RestrictedMemory>,
    binding: Binding,
}

// SAFETY: `file_base` points into the file's own mapping, which the region
// keeps alive through `memory`; it is only used for volatile-tolerant copies
// under the gatekeeper's lock, from any thread.
unsafe impl Send for Region {}
// SAFETY: as for Send: shared references give copies and addresses only.
unsafe impl Sync for Region {}

impl Region {
    fn end(&self) -> u64 {
        self.gpa + self.len
    }

    fn file_off(&self, gpa: u64) -> u64 {
        self.offset + (gpa - self.gpa)
    }

    fn to_gpa(&self, off: u64) -> u64 {
        self.gpa + (off - self.offset)
    }

    /// The file's own mapping at `gpa`, which must lie in the region.
    fn file_ptr(&self, gpa: u64) -> *mut u8 {
        // In bounds: the file mapping covers the whole file, and the region
        // lies inside it.
        self.file_base.wrapping_add(self.file_off(gpa) as usize)
    }

    /// The view at `gpa`, which must lie in the region.
    fn view_ptr(&self, gpa: u64) -> *mut u8 {
        self.view
            .as_ptr()
            .wrapping_add((self.file_off(gpa) - self.view_off) as usize)
    }

    /// The backing pages that `gpas` (inside the region) touches, in GPA;
    /// `None` if one of them is not wholly inside the region.
    fn window(&self, gpas: &Range<u64>) -> Option<Range<u64>> {
        let g = self.granule;
        let start = self.file_off(gpas.start) / g * g;
        let end = self.file_off(gpas.end).next_multiple_of(g);
        (start >= self.offset && end <= self.offset + self.len)
            .then(|| self.to_gpa(start)..self.to_gpa(end))
    }

    /// The backing pages that `gpas` touches, clipped to the region.
    fn window_clipped(&self, gpas: &Range<u64>) -> Range<u64> {
        let g = self.granule;
        let start = (self.file_off(gpas.start) / g * g).max(self.offset);
        let end = self
            .file_off(gpas.end)
            .next_multiple_of(g)
            .min(self.offset + self.len);
        self.to_gpa(start)..self.to_gpa(end)
    }

    fn protect(&self, gpas: &Range<u64>, open: bool) -> Result<(), GateError> {
        let prot = if open {
            MprotectFlags::READ | MprotectFlags::WRITE
        } else {
            MprotectFlags::empty()
        };
        let start = (self.file_off(gpas.start) - self.view_off) as usize;
        let len = (gpas.end - gpas.start) as usize;
        self.view
            .protect(start, len, prot)
            .map_err(|e| GateError::Protect {
                gpa: gpas.start,
                len: len as u64,
                source: e.into(),
            })
    }
}

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
}

impl State {
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
            regions.push(region(vm, b)?);
        }
        regions.sort_by_key(|r| r.gpa);
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
                result.map_err(|source| {
                    GateError::Kernel(Box::new(ConvertError::Kernel {
                        gpa: range.start,
                        len: range.end - range.start,
                        source,
                    }))
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
        Ok(Pin::new(Arc::clone(&self.0), id, gpa, len, r.view_ptr(gpa)))
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
            .punch(std::slice::from_ref(&range))
            .map_err(|(source, done)| ConvertError::Backing {
                gpa,
                len,
                discarded: done,
                source,
            })?;
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

    /// A vm-memory `GuestMemory` over this gatekeeper for one device request:
    /// every slice it hands out is pinned until it is dropped.
    #[cfg(feature = "vm-memory")]
    pub fn device_memory(&self) -> DeviceMemory {
        DeviceMemory::new(self.clone())
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
            match self.punch(&changing) {
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

    /// Punches `ranges` (guest memory) in their files. On failure, the
    /// backing's error and the bytes already punched.
    fn punch(&self, ranges: &[Range<u64>]) -> Result<PunchReport, (BackingError, u64)> {
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
                let file = FileRange::new(r.file_off(part.start), part.end - part.start)
                    .map_err(BackingError::from);
                match file.and_then(|f| r.memory.punch_hole(f)) {
                    Ok(done) => report += done,
                    Err(e) => result = Err(e),
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

impl GateInner {
    /// Drops pin `id`. A backing page of the pin's window that holds private
    /// bytes and no other pin is closed again (huge pages only: a 4 KiB
    /// pinned page cannot have become private).
    pub(crate) fn unpin(self: &Arc<Self>, id: u64) {
        let gate = Gatekeeper(Arc::clone(self));
        let mut st = gate.write_state();
        let Some(range) = st.pins.remove(&id) else {
            return;
        };
        let Some(r) = gate.region_index(range.start).map(|i| &self.regions[i]) else {
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

/// Builds the region of `binding`, checking it belongs to `vm` and may be
/// shared with the host, and maps its view `PROT_NONE`.
fn region(vm: &Vm, binding: Binding) -> Result<Region, GateError> {
    let gpa = binding.guest_phys_addr();
    if binding.vm_id() != vm.id() {
        return Err(GateError::ForeignBinding {
            gpa,
            owner: binding.vm_id(),
            vm: vm.id(),
        });
    }
    let memory = Arc::clone(binding.memory());
    let flags = memory.flags();
    let core = memory.core();
    let file_base = match core.kvm_map() {
        Some(map) if flags.contains(GmemFlags::MMAP | GmemFlags::INIT_SHARED) => map.as_ptr(),
        _ => {
            return Err(GateError::NotShareable {
                gpa,
                flags: flags.bits(),
            });
        }
    };
    let granule = memory.page_size();
    let (offset, len) = (binding.offset(), binding.len());
    let view_off = offset / granule * granule;
    let view_len = (offset + len).next_multiple_of(granule) - view_off;
    let view = Mapping::new(core.fd(), view_off, view_len, ProtFlags::empty())
        .and_then(|map| crate::backing::file::guard(&map, memory.kind()).map(|()| map))
        .map_err(|source| GateError::Map { gpa, source })?;
    let _registration = core.host_maps.register(&view, view_off);
    Ok(Region {
        _registration,
        view,
        view_off,
        gpa,
        len,
        offset,
        granule,
        file_base,
        memory,
        binding,
    })
}

#[cfg(test)]
mod tests;
