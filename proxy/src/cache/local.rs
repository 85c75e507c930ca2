//! The local tier: an in-process cache (moka) bounded by bytes, where each object
//! expires when it can serve no one any more (the end of its stale windows).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::HeaderName;
use moka::sync::Cache as Moka;
use moka::Expiry;

use super::entry::CacheEntry;
use super::key::CacheKey;
use super::policy::PassReason;

/// What the local tier holds under a key.
#[derive(Clone)]
pub enum LocalObject {
    Entry(Arc<CacheEntry>),
    /// Under a primary key whose response varies: the headers whose values select the
    /// variant key ([`CacheKey::variant`]) where the entry itself lives.
    Variants {
        vary: Arc<[HeaderName]>,
        until: SystemTime,
    },
    /// Hit-for-pass: the last response for this key was uncacheable, so requests go
    /// straight upstream, without waiting on one another, until `until`.
    Pass {
        reason: PassReason,
        until: SystemTime,
    },
}

impl LocalObject {
    fn until(&self) -> SystemTime {
        match self {
            LocalObject::Entry(e) => e.keep_until(),
            LocalObject::Variants { until, .. } | LocalObject::Pass { until, .. } => *until,
        }
    }

    fn weight(&self, key: &CacheKey) -> u32 {
        let own = match self {
            LocalObject::Entry(e) => e.weight(),
            LocalObject::Variants { vary, .. } => {
                128 + vary.iter().map(|n| n.as_str().len() as u32).sum::<u32>()
            }
            LocalObject::Pass { .. } => 64,
        };
        own.saturating_add(key.as_str().len() as u32)
    }
}

/// Expires each object at its own `until`, re-evaluated when it is replaced, and no
/// later than `cap` after it was stored (fleet mode: the next read goes to Redis).
struct UntilExpiry {
    cap: Option<Duration>,
}

impl Expiry<CacheKey, LocalObject> for UntilExpiry {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        value: &LocalObject,
        _: Instant,
    ) -> Option<Duration> {
        let left = value
            .until()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        Some(self.cap.map_or(left, |cap| left.min(cap)))
    }

    fn expire_after_update(
        &self,
        key: &CacheKey,
        value: &LocalObject,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, now)
    }
}

/// The in-process tier. Cheap to clone; clones share the cache. moka's synchronous
/// cache: its operations never wait on I/O, and a hit skips the future machinery of
/// the async variant (benches/hot_path.rs: local lookup).
///
/// moka does its own locking (sharded, lock-free reads), so concurrent requests on
/// both cores read without contending; writes are made visible to reads at once.
#[derive(Clone)]
pub struct LocalCache {
    objects: Moka<CacheKey, LocalObject>,
}

impl LocalCache {
    pub fn new(max_bytes: u64, cap: Option<Duration>) -> LocalCache {
        let objects = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &CacheKey, v: &LocalObject| v.weight(k))
            .expire_after(UntilExpiry { cap })
            .support_invalidation_closures()
            .build();
        LocalCache { objects }
    }

    pub fn get(&self, key: &CacheKey) -> Option<LocalObject> {
        let object = self.objects.get(key)?;
        // moka evicts lazily; an object past its end must not be served meanwhile.
        (object.until() > SystemTime::now()).then_some(object)
    }

    pub async fn insert(&self, key: CacheKey, object: LocalObject) {
        self.objects.insert(key, object);
    }

    pub async fn remove(&self, key: &CacheKey) {
        self.objects.invalidate(key);
    }

    /// Drops `primary` and all its variants (hard purge).
    pub fn remove_all_of(&self, primary: &CacheKey) {
        let primary = primary.clone();
        // Lazy in moka, but reads never return an entry the predicate matches.
        if self
            .objects
            .invalidate_entries_if(move |k, _| k.belongs_to(&primary))
            .is_err()
        {
            tracing::error!("local cache built without invalidation closures");
        }
    }

    /// Turns `primary` and all its variants stale in place (soft purge); returns how
    /// many entries it touched.
    pub async fn soft_purge_all_of(&self, primary: &CacheKey, at: SystemTime) -> usize {
        let matching: Vec<(CacheKey, Arc<CacheEntry>)> = self
            .objects
            .iter()
            .filter_map(|(k, v)| match v {
                LocalObject::Entry(e) if k.belongs_to(primary) => Some(((*k).clone(), e)),
                _ => None,
            })
            .collect();
        let count = matching.len();
        for (key, entry) in matching {
            self.objects
                .insert(key, LocalObject::Entry(Arc::new(entry.soft_purged(at))));
        }
        count
    }

    /// Primary keys of the entries whose `tag_header` lists `tag`, per route.
    pub fn keys_tagged(
        &self,
        tag: &str,
        tag_header: impl Fn(&str) -> Option<http::header::HeaderName>,
    ) -> Vec<CacheKey> {
        let mut keys: Vec<CacheKey> = self
            .objects
            .iter()
            .filter_map(|(k, v)| match v {
                LocalObject::Entry(e) => {
                    let header = tag_header(k.route())?;
                    super::tags(&e.headers, &header)
                        .any(|t| t == tag)
                        .then(|| CacheKey::from_raw(k.primary()))
                }
                _ => None,
            })
            .collect();
        keys.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        keys.dedup();
        keys
    }

    /// Removes `key` and, for a variant key, its primary's `Vary` index too.
    pub async fn remove_with_primary(&self, key: &CacheKey) {
        self.objects.invalidate(key);
        if key.primary() != key.as_str() {
            self.objects.invalidate(&CacheKey::from_raw(key.primary()));
        }
    }

    /// Bytes held, by the weigher's count (eventually consistent).
    pub fn weighted_size(&self) -> u64 {
        self.objects.weighted_size()
    }

    pub fn entry_count(&self) -> u64 {
        self.objects.entry_count()
    }

    /// Applies pending evictions so the sizes above are current (for metrics and tests).
    pub async fn sync(&self) {
        self.objects.run_pending_tasks();
    }
}
