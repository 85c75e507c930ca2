//! The shared tier: entries in Redis, readable by every instance of the fleet.
//!
//! Cache-aside: a local miss reads here before anyone goes upstream; a fill writes
//! here, through a script that refuses a write whose fencing token is older than the
//! newest lock grant for the key, so a holder that paused past its lease cannot
//! overwrite what a newer holder stored. Entries expire in Redis when they can serve
//! no one (the end of their stale and keep windows).

use std::sync::{Arc, LazyLock};
use std::time::UNIX_EPOCH;

use bytes::Bytes;

use super::codec;
use super::entry::CacheEntry;
use super::key::CacheKey;
use crate::fleet::Fleet;

/// KEYS[1]: the fence counter of the filled key; KEYS[2]: the primary's variant set;
/// KEYS[3..]: where the entry goes. ARGV[1]: this write's fencing token; ARGV[2]: the
/// encoded entry; ARGV[3]: expiry (Unix ms). Returns 1 when written, 0 when fenced off.
static FENCED_WRITE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        local granted = tonumber(redis.call('GET', KEYS[1]) or '0')
        if tonumber(ARGV[1]) < granted then return 0 end
        for i = 3, #KEYS do
            redis.call('SET', KEYS[i], ARGV[2], 'PXAT', ARGV[3])
            redis.call('SADD', KEYS[2], KEYS[i])
        end
        if redis.call('PEXPIRETIME', KEYS[2]) < tonumber(ARGV[3]) then redis.call('PEXPIREAT', KEYS[2], ARGV[3]) end
        return 1",
    )
});

/// KEYS[1]: the primary's variant set; KEYS[2]: the primary's entry. Deletes the entry,
/// every entry the set lists, and the set; returns how many entries existed.
static HARD_PURGE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        local n = redis.call('DEL', KEYS[2])
        for _, k in ipairs(redis.call('SMEMBERS', KEYS[1])) do
            if k ~= KEYS[2] then n = n + redis.call('DEL', k) end
        end
        redis.call('DEL', KEYS[1])
        return n",
    )
});

/// Primary keys purged per pipeline: one round trip each, small enough to stay well
/// within the command timeout.
const PURGE_PIPELINE: usize = 256;

/// How a write to the shared tier went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    /// A newer lock grant exists: this holder's lease had expired.
    Fenced,
    /// Redis is unavailable; the entry lives in this instance only.
    Unavailable,
}

#[derive(Clone)]
pub struct SharedCache {
    fleet: Arc<Fleet>,
}

impl SharedCache {
    pub fn new(fleet: Arc<Fleet>) -> SharedCache {
        SharedCache { fleet }
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// The entry under `key`, if Redis has a readable one. A value that does not
    /// decode is a miss, logged with the key.
    pub async fn get(&self, key: &CacheKey) -> Option<CacheEntry> {
        let redis_key = self.fleet.keys(key).entry;
        let value: Option<Vec<u8>> = self
            .fleet
            .run("get", |mut c| async move {
                redis::cmd("GET").arg(redis_key).query_async(&mut c).await
            })
            .await?;
        match codec::decode(Bytes::from(value?)) {
            Ok(entry) => {
                self.fleet.metrics.shared_hit();
                Some(entry)
            }
            Err(error) => {
                tracing::warn!(%key, %error, "unreadable value in the shared cache; treated as a miss");
                None
            }
        }
    }

    /// Writes `entry`, filled under lock key `fill_key` with fencing token `fence`. An
    /// entry that varies is written under its variant key and its primary key (where
    /// other instances, not yet knowing it varies, look first).
    pub async fn put(&self, fill_key: &CacheKey, entry: &CacheEntry, fence: u64) -> PutOutcome {
        let fence_key = self.fleet.keys(fill_key).fence;
        let variants_key = self.fleet.keys(fill_key).variants;
        let mut targets = vec![self.fleet.keys(fill_key).entry];
        if !entry.vary.is_empty() {
            let primary = CacheKey::from_raw(fill_key.primary());
            for key in [primary.clone(), primary.variant(&entry.vary_values)] {
                let target = self.fleet.keys(&key).entry;
                if !targets.contains(&target) {
                    targets.push(target);
                }
            }
        }
        let value = codec::encode(entry, fence);
        let expires_ms = entry
            .keep_until()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let written = self
            .fleet
            .run("fenced write", |mut c| async move {
                let mut call = FENCED_WRITE.key(fence_key);
                call.key(variants_key);
                for target in targets {
                    call.key(target);
                }
                call.arg(fence).arg(value.as_ref()).arg(expires_ms);
                call.invoke_async::<i64>(&mut c).await
            })
            .await;
        match written {
            Some(1) => PutOutcome::Stored,
            Some(_) => {
                self.fleet.metrics.fenced_write();
                PutOutcome::Fenced
            }
            None => PutOutcome::Unavailable,
        }
    }

    /// Records that `key` (its primary) carries `tags`, in one round trip (one
    /// MULTI/EXEC, however many tags). Each tag's set expires with the last entry it
    /// lists.
    pub async fn tag(&self, key: &CacheKey, entry: &CacheEntry, tags: &[&str]) {
        if tags.is_empty() {
            return;
        }
        let primary = key.primary();
        let expires_ms = entry
            .keep_until()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for tag in tags {
            let tag_key = self.fleet.tag_key(tag);
            // NX sets the first expiry (GT alone never sets one on a key without
            // any: it counts as infinite), GT extends it for longer-lived entries.
            pipe.cmd("SADD").arg(&tag_key).arg(primary).ignore();
            for mode in ["NX", "GT"] {
                pipe.cmd("PEXPIREAT")
                    .arg(&tag_key)
                    .arg(expires_ms)
                    .arg(mode)
                    .ignore();
            }
        }
        self.fleet
            .run("tag", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await;
    }

    /// Purges every entry tagged `tag` in Redis, and the primaries in `also` (found
    /// tagged in the local tier); returns the primaries Redis listed, and how many
    /// values were removed (`None`: Redis unavailable). A hard purge drops the tag's
    /// set; a soft one keeps it, as the entries stay.
    pub async fn purge_tag(
        &self,
        tag: &str,
        also: &[CacheKey],
        soft: bool,
    ) -> (Vec<CacheKey>, Option<usize>) {
        let tag_key = self.fleet.tag_key(tag);
        let members: Option<Vec<String>> = self
            .fleet
            .run("tag members", |mut c| async move {
                let mut pipe = redis::pipe();
                pipe.cmd("SMEMBERS").arg(&tag_key);
                if !soft {
                    pipe.cmd("DEL").arg(&tag_key).ignore();
                }
                let (members,): (Vec<String>,) = pipe.query_async(&mut c).await?;
                Ok(members)
            })
            .await;
        let Some(members) = members else {
            return (Vec::new(), None);
        };
        let tagged: Vec<CacheKey> = members.iter().map(|k| CacheKey::from_raw(k)).collect();
        let mut all: Vec<CacheKey> = tagged.iter().chain(also).cloned().collect();
        all.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        all.dedup();
        (tagged, self.purge_many(&all, soft).await)
    }

    /// Drops (hard) or marks stale (soft) `primary` and its variants in Redis, and tells
    /// every instance to drop its local copies; returns how many values it removed
    /// (hard) or marked (soft), `None` when Redis was unavailable.
    pub async fn purge(&self, primary: &CacheKey, soft: bool) -> Option<usize> {
        self.purge_many(std::slice::from_ref(primary), soft).await
    }

    /// [`SharedCache::purge`] for many primaries, a few round trips per batch.
    async fn purge_many(&self, primaries: &[CacheKey], soft: bool) -> Option<usize> {
        let mut total = 0;
        for batch in primaries.chunks(PURGE_PIPELINE) {
            total += if soft {
                self.soft_purge_batch(batch).await?
            } else {
                self.hard_purge_batch(batch).await?
            };
        }
        Some(total)
    }

    /// One round trip: every primary's script, then every purge event.
    async fn hard_purge_batch(&self, primaries: &[CacheKey]) -> Option<usize> {
        let mut pipe = redis::pipe();
        // Pipelined scripts are not loaded on demand: load it first, in the same trip.
        pipe.load_script(&HARD_PURGE).ignore();
        for primary in primaries {
            let keys = self.fleet.keys(primary);
            pipe.invoke_script(HARD_PURGE.key(keys.variants).key(keys.entry));
        }
        self.add_purge_events(&mut pipe, primaries);
        let removed: Vec<i64> = self
            .fleet
            .run(
                "purge",
                |mut c| async move { pipe.query_async(&mut c).await },
            )
            .await?;
        Some(removed.iter().map(|n| *n as usize).sum())
    }

    /// Three round trips: the variant sets, the entries, the stale rewrites (with the
    /// purge events).
    async fn soft_purge_batch(&self, primaries: &[CacheKey]) -> Option<usize> {
        let mut members = redis::pipe();
        for primary in primaries {
            members
                .cmd("SMEMBERS")
                .arg(self.fleet.keys(primary).variants);
        }
        let sets: Vec<Vec<String>> = self
            .fleet
            .run("purge members", |mut c| async move {
                members.query_async(&mut c).await
            })
            .await?;
        let mut targets: Vec<String> = Vec::new();
        for (primary, set) in primaries.iter().zip(sets) {
            targets.push(self.fleet.keys(primary).entry);
            targets.extend(set);
        }
        targets.sort();
        targets.dedup();
        let mut reads = redis::pipe();
        for target in &targets {
            reads.cmd("GET").arg(target);
        }
        let values: Vec<Option<Vec<u8>>> = self
            .fleet
            .run(
                "get",
                |mut c| async move { reads.query_async(&mut c).await },
            )
            .await?;
        let now = std::time::SystemTime::now();
        let mut writes = redis::pipe();
        for (target, value) in targets.iter().zip(values) {
            let Some(Ok(entry)) = value.map(|v| codec::decode(Bytes::from(v))) else {
                continue;
            };
            let stale = codec::encode(&entry.soft_purged(now), entry.fence());
            writes
                .cmd("SET")
                .arg(target)
                .arg(stale.as_ref())
                .arg("KEEPTTL")
                .arg("XX");
        }
        self.add_purge_events(&mut writes, primaries);
        let written: Vec<Option<String>> = self
            .fleet
            .run("soft purge", |mut c| async move {
                writes.query_async(&mut c).await
            })
            .await?;
        Some(written.iter().filter(|w| w.is_some()).count())
    }

    /// Appends the purge event of each primary (results ignored).
    fn add_purge_events(&self, pipe: &mut redis::Pipeline, primaries: &[CacheKey]) {
        for primary in primaries {
            pipe.cmd("PUBLISH")
                .arg(self.fleet.channel())
                .arg(
                    self.fleet
                        .event_message(primary, crate::fleet::FillEvent::Purged),
                )
                .ignore();
        }
    }

    /// Plants raw bytes under `key`'s entry (for tests of corrupt values).
    #[doc(hidden)]
    pub async fn put_raw(&self, key: &CacheKey, value: &'static [u8]) -> bool {
        let redis_key = self.fleet.keys(key).entry;
        self.fleet
            .run("set", |mut c| async move {
                redis::cmd("SET")
                    .arg(redis_key)
                    .arg(value)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
            .is_some()
    }
}
