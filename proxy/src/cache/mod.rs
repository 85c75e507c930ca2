//! The cache: keys, entries, storage policy, and the tiers a lookup walks: the local
//! in-process cache first, then (fleet mode) the shared one in Redis, whose hits fill
//! the local tier; and what a stored object costs in memory (`weight`), which bounds
//! the local tier.

pub(crate) mod body_file;
pub mod codec;
pub mod entry;
mod index;
pub(crate) mod key;
pub mod local;
pub mod policy;
pub mod shared;
pub mod tags;
mod tiers;
pub(crate) mod weight;

use std::sync::Arc;

pub use entry::CacheEntry;
pub use entry::Freshness;
pub use key::CacheKey;
pub use local::{LocalCache, LocalObject};
pub use policy::PassReason;

pub use tags::tags;
pub use tags::TagRules;
pub use tiers::Cache;

/// What a purge removed (or, soft, marked stale), in entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Purged {
    /// In this instance's local tier (other instances drop theirs on the purge event).
    pub(crate) local: usize,
    pub(crate) shared: SharedPurged,
}

impl Purged {
    /// Both purges together (a shared count is unknown if either is).
    pub(crate) fn and(self, other: Purged) -> Purged {
        let shared = match (self.shared, other.shared) {
            (SharedPurged::Counted(Some(a)), SharedPurged::Counted(Some(b))) => {
                SharedPurged::Counted(Some(a + b))
            }
            (SharedPurged::NoFleet, SharedPurged::NoFleet) => SharedPurged::NoFleet,
            _ => SharedPurged::Counted(None),
        };
        Purged {
            local: self.local + other.local,
            shared,
        }
    }
}

/// What a purge did in the shared tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SharedPurged {
    /// Single instance: there is no shared tier.
    NoFleet,
    /// Values removed from Redis; `None` when Redis was unavailable.
    Counted(Option<usize>),
}

/// What a lookup found.
pub(crate) enum LookupOutcome {
    Fresh(Arc<CacheEntry>),
    /// Past freshness but still within a stale window: servable in some cases, and
    /// worth revalidating.
    Stale(Arc<CacheEntry>),
    /// Hit-for-pass: go upstream without coalescing.
    Pass,
    Miss,
}

/// A lookup's outcome and the key that a fill for this request must use: the variant
/// key when the object is known to vary, else the primary key.
pub struct Lookup {
    pub(crate) outcome: LookupOutcome,
    pub(crate) fill_key: CacheKey,
    /// The primary key was found, but not this request's variant.
    pub(crate) vary_miss: bool,
}
