//! How a gatekeeper starts and converts, and what `gmem probe` says of its
//! host view.

use crate::attributes::Attribute;
use crate::backing::BackingKind;
use crate::convert::Policy;
use crate::range::PAGE_SIZE;

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
