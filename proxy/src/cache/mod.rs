//! The cache: keys, entries, storage policy, and the tiers a lookup walks.
//!
//! Today there is one tier, the local in-process cache. [`Cache::lookup`] is where a
//! shared tier slots in behind it: local first, then shared, filling local on a
//! shared hit.

pub mod entry;
pub mod key;
pub mod local;
pub mod policy;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;

pub use entry::{CacheEntry, Freshness};
pub use key::CacheKey;
pub use local::{LocalCache, LocalObject};
pub use policy::PassReason;

/// What a lookup found.
pub enum LookupOutcome {
    Fresh(Arc<CacheEntry>),
    /// Past freshness but still within a stale window: servable in some cases, and
    /// worth revalidating.
    Stale(Arc<CacheEntry>),
    /// Hit-for-pass: go upstream without coalescing.
    Pass(PassReason),
    Miss,
}

impl LookupOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            LookupOutcome::Fresh(_) => "fresh",
            LookupOutcome::Stale(_) => "stale",
            LookupOutcome::Pass(_) => "pass",
            LookupOutcome::Miss => "miss",
        }
    }
}

/// A lookup's outcome and the key that a fill for this request must use: the variant
/// key when the object is known to vary, else the primary key.
pub struct Lookup {
    pub outcome: LookupOutcome,
    pub fill_key: CacheKey,
    /// The primary key was found, but not this request's variant.
    pub vary_miss: bool,
}

/// The cache tiers, walked in order.
#[derive(Clone)]
pub struct Cache {
    local: LocalCache,
}

impl Cache {
    pub fn new(max_bytes: u64) -> Cache {
        Cache {
            local: LocalCache::new(max_bytes),
        }
    }

    pub fn local(&self) -> &LocalCache {
        &self.local
    }

    /// Looks `key` up for a request with `req_headers`, following a `Vary` index to the
    /// request's variant.
    pub async fn lookup(&self, key: &CacheKey, req_headers: &HeaderMap, now: SystemTime) -> Lookup {
        let found = self.local.get(key).await;
        let (object, fill_key, vary_miss) = match found {
            Some(LocalObject::Variants { vary, .. }) => {
                let variant = key.variant(&key::vary_values(&vary, req_headers));
                let object = self.local.get(&variant).await;
                let vary_miss = object.is_none();
                (object, variant, vary_miss)
            }
            other => (other, key.clone(), false),
        };
        let outcome = match object {
            Some(LocalObject::Entry(entry)) => match entry.freshness(now) {
                Freshness::Fresh { .. } => LookupOutcome::Fresh(entry),
                Freshness::Stale { .. } => LookupOutcome::Stale(entry),
            },
            Some(LocalObject::Pass { reason, .. }) => LookupOutcome::Pass(reason),
            Some(LocalObject::Variants { .. }) | None => LookupOutcome::Miss,
        };
        Lookup {
            outcome,
            fill_key,
            vary_miss,
        }
    }

    /// Stores `entry` for the primary `key`: directly, or under its variant key with a
    /// `Vary` index at the primary key.
    pub async fn store(&self, key: &CacheKey, entry: Arc<CacheEntry>) {
        if entry.vary.is_empty() {
            self.local
                .insert(key.clone(), LocalObject::Entry(entry))
                .await;
            return;
        }
        let mut until = entry.keep_until();
        if let Some(LocalObject::Variants {
            until: existing, ..
        }) = self.local.get(key).await
        {
            until = until.max(existing);
        }
        let index = LocalObject::Variants {
            vary: entry.vary.clone().into(),
            until,
        };
        let variant = key.variant(&entry.vary_values);
        // The variant first: a reader that sees the index must find the entry.
        self.local.insert(variant, LocalObject::Entry(entry)).await;
        self.local.insert(key.clone(), index).await;
    }

    /// Remembers that `key`'s response was uncacheable, for `ttl`.
    pub async fn mark_pass(&self, key: &CacheKey, reason: PassReason, ttl: Duration) {
        let until = SystemTime::now() + ttl;
        self.local
            .insert(key.clone(), LocalObject::Pass { reason, until })
            .await;
    }
}
