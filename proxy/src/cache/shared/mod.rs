//! The shared tier: entries in Redis, readable by every instance of the fleet.
//!
//! Cache-aside: a local miss reads here before anyone goes upstream; a fill writes
//! here, through a script that refuses a write whose fencing token is older than the
//! newest lock grant for the key, so a holder that paused past its lease cannot
//! overwrite what a newer holder stored. Entries expire in Redis when they can serve
//! no one (the end of their stale and keep windows).
//!
//! What is read back is untrusted (the key prefix may be shared, Redis is another
//! process): a value is read only if it is a string of bounded size, decoded and
//! framed again by the codec, and anything else is a miss that a fill overwrites, as
//! it would overwrite an expired entry (the write stays fenced). Each such miss is
//! counted; it is logged once per key and interval.

use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use redis::Value;

use super::codec;
use super::entry::CacheEntry;
use super::key::CacheKey;
use crate::redis::{Redis, RedisKeys};

mod purge;

/// `KEYS[1]`: the fence counter of the filled key; `KEYS[2]`: the primary's variant set;
/// `KEYS[3]`: the fill's lock; `KEYS[4..]`: where the entry goes. `ARGV[1]`: this write's
/// fencing token; `ARGV[2]`: the encoded entry; `ARGV[3]`: expiry (Unix ms); `ARGV[4]`:
/// the lock token to release after ("": none); `ARGV[5]`, `ARGV[6]`: the channel and
/// message that tell the waiting instances ("": none); `ARGV[7]`: the publish command
/// (`SPUBLISH` on a cluster: the channel is in the script's slot); `ARGV[8]`: "1" when
/// the variant set must list the targets (any target other than the primary's own
/// entry, which purges find without it). Values are read with `pcall`, so a key of
/// another type reads as an error value instead of failing the script. Returns 1 when written, 0 when fenced off
/// (then nothing is told; the lock is still released if it is ours). One script, so a
/// fill ends in one round trip, seen by everyone at once: written, unlocked, told (the
/// `PUBLISH` last, so a refused one, an ACL without channel rights, leaves the write
/// and the release done).
/// A counter that is not a number fences every write off until the next grant
/// repairs it; a variant set or lock of another type is replaced or left (none may
/// fail the script, which would read as a Redis outage).
static FENCED_WRITE: LazyLock<redis::Script> = LazyLock::new(|| {
    crate::redis::script(
        r"
        local function release()
            if ARGV[4] ~= '' and redis.pcall('GET', KEYS[3]) == ARGV[4] then redis.call('DEL', KEYS[3]) end
        end
        local fence = redis.pcall('GET', KEYS[1])
        local granted = 0
        if fence then granted = type(fence) == 'string' and tonumber(fence) end
        if not granted or tonumber(ARGV[1]) < granted then release() return 0 end
        local index = ARGV[8] == '1'
        if index then
            local kind = redis.call('TYPE', KEYS[2])['ok']
            if kind ~= 'none' and kind ~= 'set' then redis.call('DEL', KEYS[2]) end
        end
        for i = 4, #KEYS do
            redis.call('SET', KEYS[i], ARGV[2], 'PXAT', ARGV[3])
            if index then redis.call('SADD', KEYS[2], KEYS[i]) end
        end
        if index and redis.call('PEXPIRETIME', KEYS[2]) < tonumber(ARGV[3]) then redis.call('PEXPIREAT', KEYS[2], ARGV[3]) end
        release()
        if ARGV[6] ~= '' then redis.call(ARGV[7], ARGV[5], ARGV[6]) end
        return 1",
    )
});

/// What a fill's write does in the same script besides writing: tell the fleet the
/// fill ended, and free the fill's lock on this Redis.
#[derive(Default)]
pub(crate) struct AfterWrite<'a> {
    /// The fill event's message (on the fleet's channel).
    pub(crate) message: Option<&'a str>,
    /// The lock key and this holder's token.
    pub(crate) release: Option<(&'a str, &'a str)>,
}

/// Room in a value for what is not body: key, `Vary` values, headers.
const VALUE_HEADROOM: u64 = 1 << 20;

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
    redis: Arc<Redis>,
    /// The largest body an entry read back may have: the local tier's
    /// `max_object_bytes`, as no fill stores a larger one.
    max_body: u64,
    unreadable: Arc<UnreadableLog>,
}

impl SharedCache {
    /// A shared tier on `redis` that reads back bodies up to `max_body` bytes (the
    /// local tier's `max_object_bytes`).
    pub fn new(redis: Arc<Redis>, max_body: u64) -> SharedCache {
        SharedCache {
            redis,
            max_body,
            unreadable: Arc::new(UnreadableLog::new()),
        }
    }

    /// The Redis keys of `key`.
    pub fn keys(&self, key: &CacheKey) -> RedisKeys {
        self.redis.keys(key.primary(), key.as_str())
    }

    /// The entry under `key`, if Redis has a readable one. Anything else found there
    /// is a miss, counted and logged (once per key and interval).
    pub async fn get(&self, key: &CacheKey) -> Option<CacheEntry> {
        let redis_key = self.keys(key).entry;
        let limit = self.max_body.saturating_add(VALUE_HEADROOM);
        // GETRANGE, not GET: Redis sends at most `limit + 1` bytes of a value, so a huge
        // value planted under the key is never transferred whole (a script checking
        // STRLEN first costs a Lua call and a copy of the value on every shared hit).
        // A missing key reads as an empty string; another type as WRONGTYPE.
        let value: Value = self
            .redis
            .run_for(&redis_key.clone(), "get", |mut c| async move {
                let read = redis::cmd("GETRANGE")
                    .arg(redis_key)
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut c)
                    .await;
                match read {
                    Err(error) if error.code() == Some("WRONGTYPE") => Ok(Value::Int(-1)),
                    read => read,
                }
            })
            .await?;
        let (reason, detail) = match value {
            Value::Nil => return None,
            Value::BulkString(bytes) if bytes.is_empty() => return None,
            Value::BulkString(bytes) if bytes.len() as u64 > limit => {
                ("oversized", Unreadable::Oversized { limit })
            }
            Value::BulkString(bytes) => match codec::decode(Bytes::from(bytes), key, self.max_body)
            {
                Ok(entry) => {
                    self.redis.metrics.shared_hit();
                    return Some(entry);
                }
                Err(error) => (error.reason(), Unreadable::Decode(error)),
            },
            _ => ("wrong-type", Unreadable::WrongType),
        };
        self.redis.metrics.shared_unreadable(reason);
        self.unreadable.report(key, reason, &detail);
        None
    }

    /// Writes `entry`, filled under lock key `fill_key` with fencing token `fence`. An
    /// entry that varies is written under its variant key and its primary key (where
    /// other instances, not yet knowing it varies, look first).
    pub async fn put(&self, fill_key: &CacheKey, entry: &CacheEntry, fence: u64) -> PutOutcome {
        self.put_then(fill_key, entry, fence, &AfterWrite::default())
            .await
    }

    /// `put`, then (same script) what `after` says: tell the fleet, free the lock.
    pub(crate) async fn put_then(
        &self,
        fill_key: &CacheKey,
        entry: &CacheEntry,
        fence: u64,
        after: &AfterWrite<'_>,
    ) -> PutOutcome {
        let keys = self.keys(fill_key);
        let (fence_key, variants_key) = (keys.fence, keys.variants);
        let lock_key = after
            .release
            .map_or(keys.lock, |(lock, _)| lock.to_string());
        let token = after.release.map_or("", |(_, token)| token).to_string();
        let (channel, message) = match after.message {
            Some(message) => (
                self.redis.event_channel(fill_key.primary()),
                message.to_string(),
            ),
            None => (String::new(), String::new()),
        };
        let primary_entry = self.keys(&fill_key.primary_key()).entry;
        let mut targets = vec![keys.entry];
        if !entry.vary().is_empty() {
            let primary = fill_key.primary_key();
            for key in [primary.clone(), primary.variant(entry.vary_values())] {
                let target = self.keys(&key).entry;
                if !targets.contains(&target) {
                    targets.push(target);
                }
            }
        }
        // Only a target other than the primary's own entry needs listing for purges.
        let index = targets.iter().any(|t| *t != primary_entry);
        let value = codec::encode(entry, fill_key, fence);
        let expires_ms = entry
            .keep_until()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let publish = self.redis.publish_command();
        let written = self
            .redis
            .run_for(&fence_key.clone(), "fenced write", |mut c| async move {
                let mut call = FENCED_WRITE.key(fence_key);
                call.key(variants_key).key(lock_key);
                for target in targets {
                    call.key(target);
                }
                call.arg(fence).arg(value.as_ref()).arg(expires_ms);
                call.arg(token).arg(channel).arg(message);
                call.arg(publish).arg(if index { "1" } else { "0" });
                call.invoke_async::<i64>(&mut c).await
            })
            .await;
        match written {
            Some(1) => PutOutcome::Stored,
            Some(_) => {
                self.redis.metrics.fenced_write();
                PutOutcome::Fenced
            }
            None => PutOutcome::Unavailable,
        }
    }

    /// Records that `key` (its primary) carries `tags`, in one round trip (one
    /// MULTI/EXEC, however many tags). Each tag's set expires with the last entry it
    /// lists.
    pub(crate) async fn tag(&self, key: &CacheKey, entry: &CacheEntry, tags: &[&str]) {
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
            let tag_key = self.redis.tag_key(tag);
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
        self.redis
            .run("tag", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await;
    }
}

/// What was found instead of an entry.
enum Unreadable {
    Decode(codec::DecodeError),
    WrongType,
    /// Larger than `limit`: only `limit + 1` bytes of it were read.
    Oversized {
        limit: u64,
    },
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unreadable::Decode(error) => error.fmt(f),
            Unreadable::WrongType => f.write_str("the key holds another Redis type"),
            Unreadable::Oversized { limit } => {
                write!(f, "value is over the {limit} bytes read back")
            }
        }
    }
}

/// How long a key whose value was unreadable stays quiet in the log.
const UNREADABLE_LOG_INTERVAL: Duration = Duration::from_secs(300);
/// The most such warnings per interval, over all keys.
const UNREADABLE_LOG_BURST: u32 = 20;

/// Warnings about unreadable values: one per key and interval, and at most a burst per
/// interval in all, so a corrupt hot key or a Redis full of foreign values cannot flood
/// the log (the metric counts every one).
///
/// Any lookup may report. moka's entry API inserts atomically, so one task logs a key
/// per interval; the burst window is a std mutex held for a compare and an add, never
/// across an await.
struct UnreadableLog {
    recent: moka::sync::Cache<CacheKey, ()>,
    /// The current window's start and the warnings logged in it.
    window: Mutex<(Instant, u32)>,
}

impl UnreadableLog {
    fn new() -> UnreadableLog {
        UnreadableLog {
            recent: moka::sync::Cache::builder()
                .max_capacity(4096)
                .time_to_live(UNREADABLE_LOG_INTERVAL)
                .build(),
            window: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Whether a warning about `key` is due now (and, if so, counts it as given).
    fn due(&self, key: &CacheKey) -> bool {
        if !self.recent.entry(key.clone()).or_insert(()).is_fresh() {
            return false;
        }
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if window.0.elapsed() >= UNREADABLE_LOG_INTERVAL {
            *window = (Instant::now(), 0);
        }
        window.1 += 1;
        window.1 <= UNREADABLE_LOG_BURST
    }

    fn report(&self, key: &CacheKey, reason: &'static str, detail: &Unreadable) {
        if !self.due(key) {
            return;
        }
        if reason == "version" {
            // Expected while a fleet runs two versions during an upgrade.
            tracing::info!(%key, %detail, "shared cache entry from another corral version; treated as a miss");
        } else {
            tracing::warn!(%key, reason, %detail, "unreadable value in the shared cache; treated as a miss and counted in corral_shared_unreadable_total, logged once per key every 5 minutes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_key_is_logged_once_per_interval_and_bursts_are_capped() {
        let log = UnreadableLog::new();
        let key = CacheKey::from_raw("r\nh\n/p");
        assert!(log.due(&key));
        assert!(!log.due(&key), "the same key again is quiet");
        let mut logged = 1;
        for i in 0..100 {
            logged += u32::from(log.due(&CacheKey::from_raw(&format!("r\nh\n/{i}"))));
        }
        assert_eq!(logged, UNREADABLE_LOG_BURST);
    }
}
