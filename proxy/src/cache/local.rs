//! The local tier: an in-process cache (moka) bounded by bytes, where each object
//! expires when it can serve no one any more (the end of its stale windows), with an
//! index of its entries by purge tag and by primary key.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::header::HeaderName;
use moka::sync::Cache as Moka;
use moka::Expiry;

use super::entry::CacheEntry;
use super::index::{KeyIndex, Label};
use super::key::CacheKey;
use super::policy::PassReason;
use super::tags::TagRules;
use super::weight;
use crate::redis::{EventListener, FillEvent};

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

    /// What the object costs the process under `key`: its own allocations, the key's
    /// text, and moka's records for it (see [`weight`]).
    fn weight(&self, key: &CacheKey) -> u32 {
        let own = match self {
            LocalObject::Entry(e) => e.weight() as usize,
            LocalObject::Variants { vary, .. } => {
                weight::allocation(weight::ARC_HEADER + std::mem::size_of_val(&**vary))
                    + vary.iter().map(weight::header_name).sum::<usize>()
            }
            LocalObject::Pass { .. } => 0,
        };
        let key = weight::allocation(weight::ARC_HEADER + key.as_str().len());
        u32::try_from(own + key + weight::MOKA_RECORDS).unwrap_or(u32::MAX)
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

/// What an index record costs beside its label's text, added to its entry's weight so
/// that the byte bound of the cache also bounds the index: counted as a label of its
/// own (a slot in the outer map, and a map holding the one record), which is what an
/// object's own tag and every variant's record cost (measured by `tests/memory.rs`). A
/// tag shared by many entries costs less, so those are somewhat overcounted.
const LABEL_WEIGHT: usize = 256;

/// What the index records of `entry` stored under `key` cost: a label and a copy of its
/// text (a tag, or for a variant its primary key) each; see [`labels`].
fn index_weight(rules: &TagRules, key: &CacheKey, entry: &CacheEntry) -> usize {
    let label = |text: usize| LABEL_WEIGHT + weight::allocation(weight::ARC_HEADER + text);
    let tags: usize = if rules.is_empty() {
        0
    } else {
        let tags = rules.tags_of(key.scope(), entry);
        tags.iter().map(|t| label(t.len())).sum()
    };
    let variant = if key.is_variant() {
        label(key.primary().len())
    } else {
        0
    };
    tags + variant
}

/// The in-process tier. Cheap to clone; clones share the cache. moka's synchronous
/// cache: its operations never wait on I/O, and a hit skips the future machinery of
/// the async variant (benches/hot_path.rs: local lookup).
///
/// moka does its own locking (sharded, lock-free reads), so concurrent requests on
/// both cores read without contending; writes are made visible to reads at once.
/// Beside it, `KeyIndex` files every entry under its tags and (for a variant) its
/// primary key, so purges find their entries without a scan.
#[derive(Clone)]
pub struct LocalCache {
    objects: Moka<CacheKey, LocalObject>,
    index: Arc<KeyIndex>,
    rules: TagRules,
    /// Scopes of routes a reload changed or removed (`CacheKey::scope`): nothing is
    /// stored under them any more (a fill in flight across the reload finishes for its
    /// waiters, but its entry is not kept). Only a reload writes it.
    retired: Arc<ArcSwap<HashSet<String>>>,
}

/// The identity of a stored entry, for [`KeyIndex`]'s records.
fn stamp(entry: &Arc<CacheEntry>) -> usize {
    Arc::as_ptr(entry) as usize
}

/// The index labels of `entry` stored under `key`; `storing`: count dropped tags.
fn labels(rules: &TagRules, key: &CacheKey, entry: &CacheEntry, storing: bool) -> Vec<Label> {
    let tags = if storing {
        rules.tags_to_store(key.scope(), entry)
    } else {
        rules.tags_of(key.scope(), entry)
    };
    let mut labels: Vec<Label> = tags.into_iter().map(|t| Label::Tag(t.into())).collect();
    if key.is_variant() {
        labels.push(Label::Variants(key.primary_key()));
    }
    labels
}

impl LocalCache {
    /// A local tier without purge tags.
    pub fn new(max_bytes: u64, cap: Option<Duration>) -> LocalCache {
        LocalCache::tagged(max_bytes, cap, TagRules::default())
    }

    /// A local tier that indexes its entries by the tags `rules` find in them.
    pub(crate) fn tagged(max_bytes: u64, cap: Option<Duration>, rules: TagRules) -> LocalCache {
        let index = Arc::new(KeyIndex::default());
        let (weigh_rules, listen_rules, listen_index) =
            (rules.clone(), rules.clone(), Arc::clone(&index));
        let objects = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(move |k: &CacheKey, v: &LocalObject| {
                let records = match v {
                    LocalObject::Entry(e) => index_weight(&weigh_rules, k, e),
                    _ => 0,
                };
                v.weight(k)
                    .saturating_add(u32::try_from(records).unwrap_or(u32::MAX))
            })
            .expire_after(UntilExpiry { cap })
            // Runs once for every object that leaves, on the thread that removed it,
            // while moka holds that key's lock: it must not call into the cache.
            .eviction_listener(move |key: Arc<CacheKey>, value, _cause| {
                if let LocalObject::Entry(e) = value {
                    listen_index.remove(&key, stamp(&e), labels(&listen_rules, &key, &e, false));
                }
            })
            .build();
        LocalCache {
            objects,
            index,
            rules,
            retired: Arc::default(),
        }
    }

    pub fn get(&self, key: &CacheKey) -> Option<LocalObject> {
        let object = self.objects.get(key)?;
        // moka evicts lazily; an object past its end must not be served meanwhile.
        (object.until() > SystemTime::now()).then_some(object)
    }

    pub(crate) fn insert(&self, key: CacheKey, object: LocalObject) {
        let retired = self.retired.load();
        if !retired.is_empty() && retired.contains(key.scope()) {
            return;
        }
        if let LocalObject::Entry(e) = &object {
            let labels = labels(&self.rules, &key, e, true);
            if !labels.is_empty() {
                if matches!(self.objects.get(&key), Some(LocalObject::Entry(old)) if Arc::ptr_eq(&old, e))
                {
                    // Already there: replacing it with itself would run the listener
                    // for the same stamp and drop the records just added.
                    return;
                }
                // Records first (see [`KeyIndex`]'s invariant).
                self.index.add(&key, stamp(e), labels);
            }
        }
        self.objects.insert(key, object);
    }

    /// Drops `primary` and all its variants (hard purge); returns how many entries
    /// (not `Vary` indexes or hit-for-pass marks) it removed.
    pub(crate) fn remove_all_of(&self, primary: &CacheKey) -> usize {
        let mut removed = 0;
        let variants = self.index.keys(&Label::Variants(primary.clone()));
        for key in std::iter::once(primary.clone()).chain(variants) {
            if let Some(LocalObject::Entry(_)) = self.objects.remove(&key) {
                removed += 1;
            }
        }
        removed
    }

    /// Turns `primary` and all its variants stale in place (soft purge); returns how
    /// many entries it touched.
    pub(crate) fn soft_purge_all_of(&self, primary: &CacheKey, at: SystemTime) -> usize {
        let variants = self.index.keys(&Label::Variants(primary.clone()));
        let mut count = 0;
        for key in std::iter::once(primary.clone()).chain(variants) {
            if let Some(LocalObject::Entry(e)) = self.get(&key) {
                self.insert(key, LocalObject::Entry(Arc::new(e.soft_purged(at))));
                count += 1;
            }
        }
        count
    }

    /// Primary keys of the entries tagged `tag`, from the index (no scan).
    pub(crate) fn primaries_tagged(&self, tag: &str) -> Vec<CacheKey> {
        let keys = self.index.keys(&Label::Tag(tag.into()));
        if !keys.iter().any(CacheKey::is_variant) {
            // Index keys are distinct: without variants, nothing to merge.
            return keys;
        }
        let primaries: std::collections::HashSet<CacheKey> =
            keys.iter().map(|k| k.primary_key()).collect();
        primaries.into_iter().collect()
    }

    /// Retires the scopes of routes a reload changed or removed (`retired`: all of
    /// them so far, less those in use again): nothing more is stored under them, and
    /// every object already stored under them (entries, `Vary` indexes, hit-for-pass
    /// marks) is dropped. A walk over the whole tier: for reloads, not requests.
    /// Returns how many entries it dropped.
    pub(crate) fn retire_scopes(&self, retired: HashSet<String>) -> usize {
        self.retired.store(Arc::new(retired));
        let retired = self.retired.load();
        let mut removed = 0;
        for (key, object) in self.objects.iter() {
            if retired.contains(key.scope()) {
                self.objects.invalidate(&*key);
                removed += usize::from(matches!(object, LocalObject::Entry(_)));
            }
        }
        removed
    }

    /// The scopes retired so far.
    pub(crate) fn retired_scopes(&self) -> Arc<HashSet<String>> {
        self.retired.load_full()
    }

    /// The tag rules entries are indexed by.
    pub(crate) fn tag_rules(&self) -> &TagRules {
        &self.rules
    }

    /// Records in the tag and variant index (for tests of its bound).
    #[doc(hidden)]
    pub fn index_records(&self) -> usize {
        self.index.records()
    }

    /// What this tier does when another instance replaced or purged an entry: drop the
    /// local copy, so the next request reads the new one from Redis.
    pub(crate) fn fleet_listener(&self) -> EventListener {
        let local = self.clone();
        Box::new(move |event, key| {
            let key = CacheKey::from_raw(key);
            match event {
                FillEvent::Filled(_) => local.remove_with_primary(&key),
                FillEvent::Purged => {
                    local.remove_all_of(&key);
                }
                // Nothing stored changed.
                FillEvent::Uncacheable | FillEvent::Retry | FillEvent::Failed | FillEvent::Lost => {
                }
            }
        })
    }

    /// Removes `key` and, for a variant key, its primary's `Vary` index too.
    fn remove_with_primary(&self, key: &CacheKey) {
        self.objects.invalidate(key);
        if key.is_variant() {
            self.objects.invalidate(&key.primary_key());
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
    pub fn sync(&self) {
        self.objects.run_pending_tasks();
    }
}
