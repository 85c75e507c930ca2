//! The names corral gives things in Redis: per cache key its entry, lock, fence counter
//! and variant set; per tag its set; per capped route its leases; the event channels. Every name starts with the
//! configured prefix, so fleets can share one Redis.

use xxhash_rust::xxh3::xxh3_128;

/// The Redis keys of one cache key. All share the hash tag of the *primary* key, so
/// the scripts that touch several of them also run on Redis Cluster.
pub struct RedisKeys {
    pub entry: String,
    pub lock: String,
    pub fence: String,
    /// The set of entry keys holding variants of the primary key (for purges).
    pub(crate) variants: String,
}

impl RedisKeys {
    /// The keys of the cache key `key`, whose primary key is `primary` (the same for
    /// a key without variants).
    pub(super) fn new(prefix: &str, primary: &str, key: &str) -> RedisKeys {
        let tag = xxh3_128(primary.as_bytes());
        let id = xxh3_128(key.as_bytes());
        RedisKeys {
            entry: format!("{prefix}{{{tag:032x}}}:e:{id:032x}"),
            lock: format!("{prefix}{{{tag:032x}}}:l:{id:032x}"),
            fence: format!("{prefix}{{{tag:032x}}}:f:{id:032x}"),
            variants: format!("{prefix}{{{tag:032x}}}:v"),
        }
    }
}

/// A route's upstream cap: its set of leases, the line of waiting instances and their
/// liveness, in one hash slot (route names are letters, digits, '-' and '_').
pub(super) fn upstream_cap_keys(prefix: &str, route: &str) -> [String; 3] {
    [
        format!("{prefix}{{cap:{route}}}:leases"),
        format!("{prefix}{{cap:{route}}}:line"),
        format!("{prefix}{{cap:{route}}}:alive"),
    ]
}

/// The set of primary keys whose responses carried `tag`.
pub(super) fn tag_key(prefix: &str, tag: &str) -> String {
    format!("{prefix}tag:{tag}")
}

/// The channel a primary key's fill events go out on: in the slot of its keys, so the
/// script that writes the entry can publish on it, also on a cluster.
pub(super) fn event_channel(prefix: &str, primary: &str) -> String {
    let tag = xxh3_128(primary.as_bytes());
    format!("{prefix}{{{tag:032x}}}:ev")
}

/// The channel purge events go out on; every instance listens to it.
pub(super) fn purge_channel(prefix: &str) -> String {
    format!("{prefix}events")
}
