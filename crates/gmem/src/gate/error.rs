//! Why the gatekeeper refused an access, a pin or its own construction.

use thiserror::Error;

use crate::backing::BackingError;
use crate::kvm::VmId;

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
    /// The view would cost more map entries than the gatekeeper's budget,
    /// with every unpinned window closed.
    #[error(
        "pinning [{gpa:#x}, +{len:#x}) needs a view window, but the views cost {vmas} map entries of a budget of {budget} with every unpinned window closed ({pinned} pins live); release pins or raise GateOptions::view_budget"
    )]
    ViewBudget {
        /// The start of the pin.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The map entries the views cost now.
        vmas: usize,
        /// The most they may cost.
        budget: usize,
        /// Live pins.
        pinned: usize,
    },
    /// The process's live gatekeepers hold its whole view budget.
    #[error(
        "a new gatekeeper needs {wanted} map entries for its views, but the live gatekeepers of this process hold {reserved} of its budget of {limit} (half of vm.max_map_count, {max_map_count}); drop a VM, lower GateOptions::view_budget, or raise the budget (gmem::gate::set_process_view_budget) with vm.max_map_count"
    )]
    ProcessViewBudget {
        /// What this gatekeeper asked for.
        wanted: usize,
        /// What the live gatekeepers hold.
        reserved: usize,
        /// The process-wide limit.
        limit: usize,
        /// `vm.max_map_count`.
        max_map_count: u64,
    },
    /// The gatekeeper holds as many live pins as it may.
    #[error(
        "pinning [{gpa:#x}, +{len:#x}) refused: {live} pins are live, the most GateOptions::max_pins allows is {max}; a device is holding pins it should have released (Gatekeeper::pins lists them)"
    )]
    TooManyPins {
        /// The start of the pin.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Live pins.
        live: usize,
        /// The bound.
        max: usize,
    },
    /// A snapshot or restore while pins are live: a device could write
    /// through them meanwhile.
    #[error(
        "{live} pins are live (the first holds [{gpa:#x}, +{len:#x})): a snapshot or restore needs every device request finished"
    )]
    Pinned {
        /// Live pins.
        live: usize,
        /// The first pin's GPA.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// A snapshot of a two-backing slot, whose private side (a guest_memfd
    /// without `MMAP`) the host cannot read.
    #[error(
        "the slot at GPA {gpa:#x} has two backings: its private side cannot be read by the host, so it cannot be snapshotted"
    )]
    TwoBackings {
        /// The slot's GPA.
        gpa: u64,
    },
    /// A restore onto a gatekeeper that cannot take one.
    #[error("cannot restore into this gatekeeper: {why}")]
    NotRestorable {
        /// Why.
        why: &'static str,
    },
    /// A device request would pin more than its `DeviceMemory` allows.
    #[error(
        "a device request's access to [{gpa:#x}, +{len:#x}) refused: it holds {pins} pins of {pinned_bytes:#x} bytes, and may hold at most {max_pins} pins of {max_bytes:#x} bytes"
    )]
    RequestBound {
        /// The start of the access.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Bytes the request holds pinned.
        pinned_bytes: u64,
        /// The most it may.
        max_bytes: u64,
        /// Pins it holds.
        pins: usize,
        /// The most it may.
        max_pins: usize,
    },
    /// A discarded huge page could not be reserved again, so a host access
    /// would find no page to fault in.
    #[error("guest range [{gpa:#x}, +{len:#x}) has no huge page to fault in")]
    NoHugePage {
        /// The start of the access.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The backing's error ([`BackingError::Unreserved`]).
        #[source]
        source: BackingError,
    },
    /// The gatekeeper refuses everything: its records and the kernel's
    /// state may disagree.
    #[error("the gatekeeper refuses every host access: {reason}")]
    Poisoned {
        /// What happened.
        reason: String,
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
    /// A two-backing slot cannot keep content across a conversion.
    #[error(
        "the two-backing slot at GPA {gpa:#x} converts by freeing the side that becomes unused: use Policy::Discard (in place would need a copy, and one copy of each page is the rule)"
    )]
    InPlaceOnTwoBackings {
        /// The slot's GPA.
        gpa: u64,
    },
    /// A budget or bound is zero.
    #[error("view_budget and max_pins must be at least 1 (and a process view budget too)")]
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
    #[error("KVM_SET_MEMORY_ATTRIBUTES on [{gpa:#x}, +{len:#x}) for the initial state failed")]
    Kernel {
        /// The range.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
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
            | GateError::InPlaceOnTwoBackings { .. }
            | GateError::ZeroBudget => libc::EINVAL,
            GateError::ViewBudget { .. }
            | GateError::ProcessViewBudget { .. }
            | GateError::TooManyPins { .. }
            | GateError::RequestBound { .. } => libc::ENOMEM,
            GateError::NoHugePage { source, .. } => source.errno(),
            GateError::Poisoned { .. } => libc::EIO,
            GateError::Pinned { .. } => libc::EAGAIN,
            GateError::TwoBackings { .. } => libc::EOPNOTSUPP,
            GateError::NotRestorable { .. } => libc::EINVAL,
            GateError::NotShareable { .. } => libc::EOPNOTSUPP,
            GateError::Overlap { .. } => libc::EEXIST,
            GateError::AlreadyGated { .. } => libc::EBUSY,
            GateError::Map { source, .. } => source.errno(),
            GateError::Protect { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            GateError::Kernel { source, .. } => source.errno(),
        }
    }
}

/// Why dirty tracking was refused or failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DirtyError {
    /// Tracking is on already.
    #[error("dirty tracking is already on for this gatekeeper; stop it before starting it again")]
    AlreadyTracking,
    /// Tracking is not on.
    #[error("dirty tracking is not on: start it first")]
    NotTracking,
    /// A migration owns tracking: a set taken, or a stop, by anyone else
    /// would lose pages the migration must send.
    #[error(
        "a migration owns this gatekeeper's dirty tracking until it completes or is dropped: taking or stopping it now would lose pages the migration must send"
    )]
    Migrating,
    /// A guest_memfd slot: the kernel logs no dirty pages there
    /// (`KVM_MEM_LOG_DIRTY_PAGES` is refused with `KVM_MEM_GUEST_MEMFD`).
    #[error(
        "the binding at GPA {gpa:#x} (slot {slot}) is a guest_memfd slot, where KVM logs no dirty pages; dirty tracking needs memfd or hugetlb bindings"
    )]
    GuestMemfd {
        /// The binding's GPA.
        gpa: u64,
        /// Its slot.
        slot: u16,
    },
    /// KVM refused an ioctl.
    #[error("{op} failed for the binding at GPA {gpa:#x}: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The binding's GPA.
        gpa: u64,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The gatekeeper refused (poisoned).
    #[error(transparent)]
    Gate(GateError),
}

impl DirtyError {
    /// The errno the kernel gives for the same misuse.
    pub fn errno(&self) -> i32 {
        match self {
            DirtyError::AlreadyTracking | DirtyError::Migrating => libc::EBUSY,
            DirtyError::NotTracking | DirtyError::GuestMemfd { .. } => libc::EINVAL,
            DirtyError::Kvm { source, .. } => source.errno(),
            DirtyError::Gate(e) => e.errno(),
        }
    }
}
