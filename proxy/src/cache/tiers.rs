//! The tiers a lookup walks: the local in-process cache first, then (fleet mode) the
//! shared one in Redis, whose hits fill the local tier; and the stores and purges
//! that keep both in step.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;

use super::key::{self, CacheKey};
use super::local::{LocalCache, LocalObject};
use super::shared::SharedCache;
use super::{CacheEntry, Freshness, Lookup, LookupOutcome, PassReason, Purged, SharedPurged};

/// Local entries purged between two yields to the scheduler.
const PURGE_BATCH: usize = 256;

/// The cache tiers, walked in order.
#[derive(Clone)]
pub struct Cache {
    local: LocalCache,
    shared: Option<SharedCache>,
}

impl Cache {
    /// The local tier, and the shared one behind it in fleet mode.
    pub fn new(local: LocalCache, shared: Option<SharedCache>) -> Cache {
        Cache { local, shared }
    }

    pub fn local(&self) -> &LocalCache {
        &self.local
    }

    pub fn shared(&self) -> Option<&SharedCache> {
        self.shared.as_ref()
    }

    /// Looks `key` up for a request with `req_headers`, following a `Vary` index to the
    /// request's variant.
    pub async fn lookup(&self, key: &CacheKey, req_headers: &HeaderMap, now: SystemTime) -> Lookup {
        let (mut object, mut fill_key, vary_miss) = self.local_lookup(key, req_headers);
        let fresh_locally =
            matches!(&object, Some(LocalObject::Entry(e)) if e.freshness(now).is_fresh());
        if let (Some(shared), false, false) = (
            &self.shared,
            fresh_locally,
            matches!(object, Some(LocalObject::Pass { .. })),
        ) {
            if let Some((found, key)) = self.shared_lookup(shared, &fill_key, req_headers).await {
                let newer = match &object {
                    Some(LocalObject::Entry(local)) => found.fence() >= local.fence(),
                    _ => true,
                };
                if newer {
                    let found = Arc::new(found);
                    self.store(&key.primary_key(), Arc::clone(&found));
                    object = Some(LocalObject::Entry(found));
                    fill_key = key;
                }
            }
        }
        let outcome = match object {
            Some(LocalObject::Entry(entry)) => match entry.freshness(now) {
                Freshness::Fresh { .. } => LookupOutcome::Fresh(entry),
                Freshness::Stale { .. } => LookupOutcome::Stale(entry),
            },
            Some(LocalObject::Pass { .. }) => LookupOutcome::Pass,
            Some(LocalObject::Variants { .. }) | None => LookupOutcome::Miss,
        };
        Lookup {
            outcome,
            fill_key,
            vary_miss,
        }
    }

    /// The entry the local tier holds for this request if it is fresh: the whole
    /// lookup for a hit, without waiting on anything (the HTTP/1 fast path's).
    pub fn local_fresh(
        &self,
        key: &CacheKey,
        req_headers: &HeaderMap,
        now: SystemTime,
    ) -> Option<Arc<CacheEntry>> {
        self.local_fresh_keyed(key, req_headers, now)
            .map(|(entry, _)| entry)
    }

    /// [`Cache::local_fresh`], with the key a fill of the entry uses (its variant's).
    pub(crate) fn local_fresh_keyed(
        &self,
        key: &CacheKey,
        req_headers: &HeaderMap,
        now: SystemTime,
    ) -> Option<(Arc<CacheEntry>, CacheKey)> {
        match self.local_lookup(key, req_headers) {
            (Some(LocalObject::Entry(entry)), fill_key, _) if entry.freshness(now).is_fresh() => {
                Some((entry, fill_key))
            }
            _ => None,
        }
    }

    /// The local tier's object for this request (following a `Vary` index to the
    /// request's variant), the key a fill must use, and whether only the variant was
    /// missing.
    fn local_lookup(
        &self,
        key: &CacheKey,
        req_headers: &HeaderMap,
    ) -> (Option<LocalObject>, CacheKey, bool) {
        match self.local.get(key) {
            Some(LocalObject::Variants { vary, .. }) => {
                let variant = key.variant(&key::vary_values(&vary, req_headers));
                let object = self.local.get(&variant);
                let vary_miss = object.is_none();
                (object, variant, vary_miss)
            }
            other => (other, key.clone(), false),
        }
    }

    /// The shared tier's entry for `key` and this request, following its `Vary` to the
    /// request's variant when the entry found varies on other values.
    async fn shared_lookup(
        &self,
        shared: &SharedCache,
        key: &CacheKey,
        req_headers: &HeaderMap,
    ) -> Option<(CacheEntry, CacheKey)> {
        let entry = shared.get(key).await?;
        if entry.matches_vary(req_headers) {
            return Some((entry, key.clone()));
        }
        let primary = key.primary_key();
        let variant = primary.variant(&key::vary_values(entry.vary(), req_headers));
        let entry = shared.get(&variant).await?;
        entry.matches_vary(req_headers).then_some((entry, variant))
    }

    /// Stores `entry` for the primary `key`: directly, or under its variant key with a
    /// `Vary` index at the primary key.
    pub fn store(&self, key: &CacheKey, entry: Arc<CacheEntry>) {
        if entry.vary().is_empty() {
            self.local.insert(key.clone(), LocalObject::Entry(entry));
            return;
        }
        let mut until = entry.keep_until();
        if let Some(LocalObject::Variants {
            until: existing, ..
        }) = self.local.get(key)
        {
            until = until.max(existing);
        }
        let index = LocalObject::Variants {
            vary: entry.vary().into(),
            until,
        };
        let variant = key.variant(entry.vary_values());
        // The variant first: a reader that sees the index must find the entry.
        self.local.insert(variant, LocalObject::Entry(entry));
        self.local.insert(key.clone(), index);
    }

    /// Purges `primary` and its variants from every tier: hard drops them, soft turns
    /// them stale (the next request revalidates, or is served stale while one refresh
    /// runs, instead of stampeding). Other instances drop their local copies on the
    /// event the shared tier publishes.
    ///
    /// Redis first: were the local copy dropped first, a request in between could
    /// read the old entry back from Redis, and this instance ignores its own events.
    pub(crate) async fn purge(&self, primary: &CacheKey, soft: bool) -> Purged {
        let shared = match &self.shared {
            Some(shared) => SharedPurged::Counted(shared.purge(primary, soft).await),
            None => SharedPurged::NoFleet,
        };
        let local = self.purge_local(primary, soft);
        Purged { local, shared }
    }

    /// Purges every entry tagged `tag` (with all its variants) from every tier: the
    /// local tier finds them through its index, the shared tier through the tag's set.
    /// Yields between batches, so that a purge of many entries never holds a worker.
    pub(crate) async fn purge_tag(&self, tag: &str, soft: bool) -> Purged {
        let mut primaries = self.local.primaries_tagged(tag);
        let shared = match &self.shared {
            Some(shared) => {
                let (from_redis, counted) = shared.purge_tag(tag, &primaries, soft).await;
                primaries.extend(from_redis);
                primaries.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                primaries.dedup();
                SharedPurged::Counted(counted)
            }
            None => SharedPurged::NoFleet,
        };
        let mut local = 0;
        for batch in primaries.chunks(PURGE_BATCH) {
            for primary in batch {
                local += self.purge_local(primary, soft);
            }
            tokio::task::yield_now().await;
        }
        Purged { local, shared }
    }

    fn purge_local(&self, primary: &CacheKey, soft: bool) -> usize {
        if soft {
            self.local.soft_purge_all_of(primary, SystemTime::now())
        } else {
            self.local.remove_all_of(primary)
        }
    }

    /// Remembers that `key`'s response was uncacheable, for `ttl`.
    pub(crate) fn mark_pass(&self, key: &CacheKey, reason: PassReason, ttl: Duration) {
        let until = SystemTime::now() + ttl;
        self.local
            .insert(key.clone(), LocalObject::Pass { reason, until });
    }
}
