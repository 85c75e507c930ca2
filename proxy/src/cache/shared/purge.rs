//! Purges in the shared tier: a primary key's entry and every variant its set lists,
//! dropped (hard) or rewritten stale (soft), and the purge event that tells every
//! instance to drop its local copies.
//!
//! The variant set is read from Redis and so untrusted (the prefix may be shared): a
//! set of another type reads as no variants, and only members named like that
//! primary's own entries (`{prefix}{tag}:e:...`) are touched, so a planted set cannot
//! make a purge delete or rewrite anyone else's keys.
//!
//! On one Redis the events ride in the same pipeline, after the writes. On a cluster
//! they go in a request of their own once the writes are done, whatever the writes
//! did: one master's failure must not keep the other masters' purged entries alive in
//! every instance's local tier.

use std::sync::LazyLock;

use bytes::Bytes;
use redis::Value;

use super::SharedCache;
use crate::cache::codec;
use crate::cache::key::CacheKey;
use crate::redis::FillEvent;

/// `KEYS[1]`: the primary's variant set; `KEYS[2]`: the primary's entry; `ARGV[1]`: the
/// name prefix of that primary's entries. Deletes the entry, every entry of that
/// primary the set lists, and the set; returns how many entries existed.
static HARD_PURGE: LazyLock<redis::Script> = LazyLock::new(|| {
    crate::redis::script(
        r"
        local n = redis.call('DEL', KEYS[2])
        local members = redis.pcall('SMEMBERS', KEYS[1])
        if type(members) == 'table' and not members.err then
            for _, k in ipairs(members) do
                if k ~= KEYS[2] and string.sub(k, 1, #ARGV[1]) == ARGV[1] then
                    n = n + redis.call('DEL', k)
                end
            end
        end
        redis.call('DEL', KEYS[1])
        return n",
    )
});

/// Primary keys purged per pipeline: one round trip each, small enough to stay well
/// within the command timeout.
const PURGE_PIPELINE: usize = 256;

impl SharedCache {
    /// Purges every entry tagged `tag` in Redis, and the primaries in `also` (found
    /// tagged in the local tier); returns the primaries Redis listed, and how many
    /// values were removed (`None`: Redis unavailable). A hard purge drops the tag's
    /// set; a soft one keeps it, as the entries stay.
    pub(crate) async fn purge_tag(
        &self,
        tag: &str,
        also: &[CacheKey],
        soft: bool,
    ) -> (Vec<CacheKey>, Option<usize>) {
        let tag_key = self.redis.tag_key(tag);
        // Members as bytes: one that is not text (planted by anything sharing the
        // prefix) is skipped, not a reply error that would read as a Redis outage.
        let members: Option<Vec<Vec<u8>>> = self
            .redis
            .run("tag members", |mut c| async move {
                let mut pipe = redis::pipe();
                pipe.cmd("SMEMBERS").arg(&tag_key);
                if !soft {
                    pipe.cmd("DEL").arg(&tag_key).ignore();
                }
                let (members,): (Vec<Vec<u8>>,) = pipe.query_async(&mut c).await?;
                Ok(members)
            })
            .await;
        let Some(members) = members else {
            return (Vec::new(), None);
        };
        let tagged: Vec<CacheKey> = (members.into_iter())
            .filter_map(|m| String::from_utf8(m).ok())
            .map(|k| CacheKey::from_raw(&k))
            .collect();
        let mut all: Vec<CacheKey> = tagged.iter().chain(also).cloned().collect();
        all.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        all.dedup();
        (tagged, self.purge_many(&all, soft).await)
    }

    /// Drops (hard) or marks stale (soft) `primary` and its variants in Redis, and tells
    /// every instance to drop its local copies; returns how many values it removed
    /// (hard) or marked (soft), `None` when Redis was unavailable.
    pub(crate) async fn purge(&self, primary: &CacheKey, soft: bool) -> Option<usize> {
        self.purge_many(std::slice::from_ref(primary), soft).await
    }

    /// [`SharedCache::purge`] for many primaries, a few round trips per batch.
    /// Every batch is tried; `None` when any failed.
    async fn purge_many(&self, primaries: &[CacheKey], soft: bool) -> Option<usize> {
        let mut total = Some(0);
        for batch in primaries.chunks(PURGE_PIPELINE) {
            let purged = if soft {
                self.soft_purge_batch(batch).await
            } else {
                self.hard_purge_batch(batch).await
            };
            if self.redis.is_cluster() {
                self.publish_purges(batch).await;
            }
            total = total.zip(purged).map(|(t, n)| t + n);
        }
        total
    }

    /// One round trip: every primary's script, then every purge event.
    async fn hard_purge_batch(&self, primaries: &[CacheKey]) -> Option<usize> {
        let mut pipe = redis::pipe();
        // Pipelined scripts are not loaded on demand: load it first, in the same trip.
        pipe.load_script(&HARD_PURGE).ignore();
        for primary in primaries {
            let keys = self.keys(primary);
            let own = entry_prefix(&keys.entry).to_string();
            pipe.invoke_script(HARD_PURGE.key(keys.variants).key(keys.entry).arg(own));
        }
        self.add_purge_events(&mut pipe, primaries);
        let removed: Vec<i64> = self
            .redis
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
        // A set of another type answers an error: read replies as values, not failing.
        members.ignore_errors();
        for primary in primaries {
            members.cmd("SMEMBERS").arg(self.keys(primary).variants);
        }
        let sets: Vec<Value> = self
            .redis
            .run("purge members", |mut c| async move {
                members.query_async(&mut c).await
            })
            .await?;
        // Only the primary's own entries; each value is checked against the primary it
        // was stored for.
        let mut targets: Vec<(String, &CacheKey)> = Vec::new();
        for (primary, set) in primaries.iter().zip(sets) {
            let entry = self.keys(primary).entry;
            let own = entry_prefix(&entry).to_string();
            let variants = text_members(set)
                .into_iter()
                .filter(|m| m.starts_with(&own));
            targets.extend(variants.map(|member| (member, primary)));
            targets.push((entry, primary));
        }
        targets.sort_by(|a, b| a.0.cmp(&b.0));
        targets.dedup_by(|a, b| a.0 == b.0);
        let mut reads = redis::pipe();
        // A value of another type answers an error: skipped like any undecodable one.
        reads.ignore_errors();
        for (target, _) in &targets {
            reads.cmd("GET").arg(target);
        }
        let values: Vec<Value> = self
            .redis
            .run(
                "get",
                |mut c| async move { reads.query_async(&mut c).await },
            )
            .await?;
        let now = std::time::SystemTime::now();
        let mut writes = redis::pipe();
        for ((target, primary), value) in targets.iter().zip(values) {
            let Value::BulkString(value) = value else {
                continue;
            };
            let Ok(entry) = codec::decode(Bytes::from(value), primary, self.max_body) else {
                continue;
            };
            let stale = codec::encode(&entry.soft_purged(now), primary, entry.fence());
            writes
                .cmd("SET")
                .arg(target)
                .arg(stale.as_ref())
                .arg("KEEPTTL")
                .arg("XX");
        }
        self.add_purge_events(&mut writes, primaries);
        let written: Vec<Option<String>> = self
            .redis
            .run("soft purge", |mut c| async move {
                writes.query_async(&mut c).await
            })
            .await?;
        Some(written.iter().filter(|w| w.is_some()).count())
    }

    /// Appends the purge event of each primary (results ignored); on one Redis only (a
    /// cluster's go by [`SharedCache::publish_purges`]).
    fn add_purge_events(&self, pipe: &mut redis::Pipeline, primaries: &[CacheKey]) {
        if self.redis.is_cluster() {
            return;
        }
        for primary in primaries {
            pipe.cmd(self.redis.publish_command())
                .arg(self.redis.purge_channel())
                .arg(
                    self.redis
                        .event_message(primary.as_str(), FillEvent::Purged),
                )
                .ignore();
        }
    }

    /// Tells every instance that `primaries` were purged, in a request of its own.
    async fn publish_purges(&self, primaries: &[CacheKey]) {
        let mut pipe = redis::pipe();
        for primary in primaries {
            let message = self
                .redis
                .event_message(primary.as_str(), FillEvent::Purged);
            pipe.cmd(self.redis.publish_command())
                .arg(self.redis.purge_channel())
                .arg(message)
                .ignore();
        }
        self.redis
            .run("purge events", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await;
    }
}

/// The members of a set reply that are text; corral writes no others. Anything but a
/// set (an error for a key of another type) has none.
fn text_members(reply: Value) -> Vec<String> {
    let Value::Array(members) = reply else {
        return Vec::new();
    };
    members
        .into_iter()
        .filter_map(|m| match m {
            Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
            _ => None,
        })
        .collect()
}

/// The name prefix of the entries of the primary whose own entry is `entry`
/// (`{prefix}{tag}:e:`).
fn entry_prefix(entry: &str) -> &str {
    entry.find("}:e:").map_or(entry, |i| &entry[..i + 4])
}
