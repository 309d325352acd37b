//! What a gatekeeper tells its subscribers: ranges that changed sides or
//! were discarded, for devices that map guest memory themselves (VFIO DMA
//! maps, vhost-user memory tables) and must follow the guest.

use std::ops::Range;

use crate::attributes::Attribute;

/// A change to guest memory, sent after it is complete.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryEvent {
    /// The pages of `range` (a run that changed sides) are now `to`.
    Converted {
        /// The guest range.
        range: Range<u64>,
        /// What it became.
        to: Attribute,
    },
    /// `range` was discarded: it reads as zero, and its memory was freed.
    Discarded {
        /// The guest range.
        range: Range<u64>,
    },
}
