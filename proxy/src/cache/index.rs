//! The local tier's index: which keys carry each purge tag, and which variant keys
//! each primary key has, so that a purge touches only its own entries instead of
//! scanning the whole cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::key::CacheKey;

/// What an index record is filed under.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) enum Label {
    /// Entries whose response carried this tag.
    Tag(Arc<str>),
    /// Entries stored under a variant key of this primary key.
    Variants(CacheKey),
}

/// Records `label -> key -> stamp`, where the stamp identifies the object stored under
/// the key (the address of its `Arc<CacheEntry>`).
///
/// Invariant: a record exists from just before its object enters the local cache
/// until the object leaves it. The writer adds a record *before* it inserts the object;
/// moka's eviction listener, which runs once for every object that leaves (replaced,
/// evicted, expired, invalidated), removes the records *with that object's stamp*
/// only. So when an object is replaced, the listener for the old one leaves the new
/// one's records alone, whatever the order in which two threads get there. A purge
/// that reads a record of an object not yet (or no longer) stored finds nothing to
/// remove under its key, which is harmless.
///
/// A std mutex: every critical section is a few hash-map operations, never held across
/// an `.await`, and there is nothing to wait for inside.
#[derive(Default)]
pub(crate) struct KeyIndex {
    labels: Mutex<HashMap<Label, HashMap<CacheKey, usize>>>,
}

impl KeyIndex {
    pub(crate) fn add(&self, key: &CacheKey, stamp: usize, labels: Vec<Label>) {
        let mut map = self.labels.lock().unwrap_or_else(|e| e.into_inner());
        for label in labels {
            map.entry(label).or_default().insert(key.clone(), stamp);
        }
    }

    /// Removes `key`'s records under `labels` that carry `stamp`.
    pub(crate) fn remove(&self, key: &CacheKey, stamp: usize, labels: Vec<Label>) {
        let mut map = self.labels.lock().unwrap_or_else(|e| e.into_inner());
        for label in labels {
            if let Some(keys) = map.get_mut(&label) {
                if keys.get(key) == Some(&stamp) {
                    keys.remove(key);
                    if keys.is_empty() {
                        map.remove(&label);
                    }
                }
            }
        }
    }

    /// The keys filed under `label`, now.
    pub(crate) fn keys(&self, label: &Label) -> Vec<CacheKey> {
        let map = self.labels.lock().unwrap_or_else(|e| e.into_inner());
        map.get(label)
            .map(|keys| keys.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// How many records the index holds (for tests of its bound).
    pub(crate) fn records(&self) -> usize {
        let map = self.labels.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(t: &str) -> Label {
        Label::Tag(t.into())
    }

    #[test]
    fn a_replaced_objects_removal_keeps_the_new_objects_records() {
        let index = KeyIndex::default();
        let k = CacheKey::from_raw("r\nh\n/p");
        index.add(&k, 1, vec![tag("a"), tag("b")]);
        // The new object (stamp 2) carries only `a`; its records go in first.
        index.add(&k, 2, vec![tag("a")]);
        index.remove(&k, 1, vec![tag("a"), tag("b")]);
        assert_eq!(index.keys(&tag("a")), vec![k.clone()]);
        assert!(index.keys(&tag("b")).is_empty());
        index.remove(&k, 2, vec![tag("a")]);
        assert_eq!(index.records(), 0);
    }
}
