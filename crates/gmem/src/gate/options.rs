//! How a gatekeeper starts and converts, and what `gmem probe` says of its
//! host view.

use crate::attributes::Attribute;
use crate::backing::BackingKind;
use crate::convert::Policy;
use crate::range::PAGE_SIZE;

/// The default budget of a gatekeeper's view: the map entries (VMAs) its
/// views may add beyond one each. An isolated window costs two on shmem
/// and guest_memfd; on hugetlb every boundary ever made costs one until the
/// view is mapped afresh. Each gatekeeper reserves this much of the
/// process-wide budget ([`process_view_budget`](super::process_view_budget),
/// half of `vm.max_map_count`) when it is created: 127 gatekeepers fit in
/// one process by default.
pub const DEFAULT_VIEW_BUDGET: usize = 256;

/// The default bound on a gatekeeper's live pins.
pub const DEFAULT_MAX_PINS: usize = 16384;

/// How the gatekeeper's host view works on `kind`, for `gmem probe`.
pub fn view_mechanism(kind: BackingKind) -> String {
    let unit = match kind.page_size() {
        PAGE_SIZE => "4 KiB",
        p if p >= 1 << 30 => "1 GiB",
        _ => "2 MiB",
    };
    let merge = if kind.is_hugetlb() {
        "split VMAs stay split until the view is mapped afresh with no pin held"
    } else {
        "closed windows merge back"
    };
    format!(
        "PROT_NONE; mprotect windows of {unit} opened by device pins, at most {DEFAULT_VIEW_BUDGET} extra VMAs per VM by default, reserved from a process-wide budget of half vm.max_map_count ({merge}); conversions change no page table unless a window is open"
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
    /// The map entries (VMAs) the views may add beyond one per region (see
    /// the module docs); at least 1. Reserved from the process-wide budget
    /// at creation.
    pub view_budget: usize,
    /// The most live pins; at least 1. A pin cannot be revoked (its holder
    /// may be using its pointer), so the bound is what keeps a device that
    /// forgets its pins from growing the gatekeeper's records.
    pub max_pins: usize,
}

impl GateOptions {
    /// Options with `initial`, `policy` and the default view budget.
    pub fn new(initial: Attribute, policy: Policy) -> Self {
        GateOptions {
            initial,
            policy,
            view_budget: DEFAULT_VIEW_BUDGET,
            max_pins: DEFAULT_MAX_PINS,
        }
    }

    /// The same options with another bound on live pins.
    pub fn with_max_pins(self, max_pins: usize) -> Self {
        GateOptions { max_pins, ..self }
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
