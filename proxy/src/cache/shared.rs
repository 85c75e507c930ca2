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

/// KEYS[1]: the primary's variant set. Deletes every entry it lists, and itself.
static HARD_PURGE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        local keys = redis.call('SMEMBERS', KEYS[1])
        for _, k in ipairs(keys) do redis.call('DEL', k) end
        redis.call('DEL', KEYS[1])
        return #keys",
    )
});

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

    /// Records that `key` (its primary) carries the tags `entry` lists in `header`.
    pub async fn tag(&self, key: &CacheKey, entry: &CacheEntry, header: &http::header::HeaderName) {
        let primary = key.primary().to_string();
        let expires_ms = entry
            .keep_until()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        for tag in super::tags(&entry.headers, header) {
            let tag_key = self.fleet.tag_key(tag);
            let primary = primary.clone();
            self.fleet
                .run("tag", |mut c| async move {
                    redis::pipe()
                        .cmd("SADD")
                        .arg(&tag_key)
                        .arg(primary)
                        .ignore()
                        .cmd("PEXPIREAT")
                        .arg(&tag_key)
                        .arg(expires_ms)
                        .arg("GT")
                        .ignore()
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
        }
    }

    /// Primary keys tagged `tag` in the shared tier.
    pub async fn keys_tagged(&self, tag: &str) -> Vec<CacheKey> {
        let tag_key = self.fleet.tag_key(tag);
        let keys: Option<Vec<String>> = self
            .fleet
            .run("tag members", |mut c| async move {
                redis::cmd("SMEMBERS")
                    .arg(tag_key)
                    .query_async(&mut c)
                    .await
            })
            .await;
        keys.unwrap_or_default()
            .iter()
            .map(|k| CacheKey::from_raw(k))
            .collect()
    }

    /// Drops (hard) or marks stale (soft) `primary` and its variants in Redis, and tells
    /// every instance to drop its local copies.
    pub async fn purge(&self, primary: &CacheKey, soft: bool) {
        let keys = self.fleet.keys(primary);
        if soft {
            let variants_key = keys.variants.clone();
            let mut targets: Vec<String> = self
                .fleet
                .run("purge members", |mut c| async move {
                    redis::cmd("SMEMBERS")
                        .arg(variants_key)
                        .query_async(&mut c)
                        .await
                })
                .await
                .unwrap_or_default();
            if !targets.contains(&keys.entry) {
                targets.push(keys.entry.clone());
            }
            let now = std::time::SystemTime::now();
            for target in targets {
                let read_key = target.clone();
                let value: Option<Option<Vec<u8>>> = self
                    .fleet
                    .run("get", |mut c| async move {
                        redis::cmd("GET").arg(read_key).query_async(&mut c).await
                    })
                    .await;
                let Some(Ok(entry)) = value.flatten().map(|v| codec::decode(Bytes::from(v))) else {
                    continue;
                };
                let stale = codec::encode(&entry.soft_purged(now), entry.fence());
                self.fleet
                    .run("soft purge", |mut c| async move {
                        redis::cmd("SET")
                            .arg(target)
                            .arg(stale.as_ref())
                            .arg("KEEPTTL")
                            .arg("XX")
                            .query_async::<()>(&mut c)
                            .await
                    })
                    .await;
            }
        } else {
            let (entry_key, variants_key) = (keys.entry, keys.variants);
            self.fleet
                .run("purge", |mut c| async move {
                    redis::cmd("DEL")
                        .arg(entry_key)
                        .query_async::<()>(&mut c)
                        .await?;
                    HARD_PURGE
                        .key(variants_key)
                        .invoke_async::<i64>(&mut c)
                        .await
                })
                .await;
        }
        self.fleet
            .publish(primary, crate::fleet::FillEvent::Purged)
            .await;
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
