//! The fleet-wide fill lock on one Redis: `SET key token NX PX ttl`, a fencing token
//! from `INCR` on each grant, extension and release by compare-and-set scripts.
//!
//! Only a local permit holder asks for it (local coalescing stays in front), so one
//! instance contends with at most one task per key. A fill's first attempt also looks
//! for a fresh entry in the same script, and a fill that stores its entry frees the lock
//! in the write's own script (`cache::shared`), so the lock costs no round trip of its
//! own on an uncontended miss.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Lease, LockTry};
use crate::cache::CacheKey;
use crate::redis::Redis;

/// How long a fence counter outlives its last grant. A holder paused longer than this
/// could see the counter restart below its token; a day is far beyond any fill.
pub(crate) const FENCE_RETENTION_MS: u64 = 24 * 3600 * 1000;

/// Lua: `next_fence(key, retention_ms)` increments a fence counter and returns it.
/// The counter is read from Redis and so untrusted (the key prefix may be shared): one
/// that is not a count corral wrote (another type, not decimal digits, near overflow)
/// would make `INCR` fail, which would read as a Redis outage. It restarts instead at
/// the current time in ms, above any count a grant can have reached, so no older
/// holder's token passes the fenced write.
pub(crate) const NEXT_FENCE_LUA: &str = r"
local function next_fence(k, retention)
    local n = redis.pcall('GET', k)
    if n and not (type(n) == 'string' and #n <= 15 and string.match(n, '^%d+$')) then
        local now = redis.call('TIME')
        redis.call('DEL', k)
        redis.call('SET', k, string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000)))
    end
    local fence = redis.call('INCR', k)
    redis.call('PEXPIRE', k, retention)
    return fence
end
";

/// KEYS: lock, fence, entry. ARGV: token, ttl ms, fence retention ms, check ("1": first
/// look at the entry), two instants by the caller's clock (Unix ms): now, and a receipt
/// (0 for any). Returns the fencing token of the grant, 0 when the lock is held, or -1
/// (with `check`) when the entry holds a value another fill stored that is fresh now
/// (by the caller's clock, the one every other freshness decision of the instance uses)
/// and was received after that receipt (for an early refresh, the copy it replaces):
/// the caller reads it instead of taking the lock, which spares it a separate read
/// before every attempt. The freshness read relies on the codec's
/// fixed layout (`cache::codec`): "CRL", version 2 or 3, status, then `received_at` and,
/// 8 bytes on, `fresh_for` as big-endian milliseconds. Every grant expires, so a lock
/// without an expiry was not set by corral: it is given the TTL, and ends.
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| {
    crate::redis::script(&format!(
        r"{NEXT_FENCE_LUA}
        if ARGV[4] == '1' then
            local h = redis.pcall('GETRANGE', KEYS[3], 0, 29)
            local v = type(h) == 'string' and #h == 30 and string.sub(h, 1, 3) == 'CRL' and string.byte(h, 4)
            if v == 2 or v == 3 then
                local function ms(at)
                    local hi, lo = struct.unpack('>I4I4', string.sub(h, at, at + 7))
                    return hi * 4294967296 + lo
                end
                if ms(7) + ms(23) > tonumber(ARGV[5]) and ms(7) > tonumber(ARGV[6]) then return -1 end
            end
        end
        if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
            if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
            return 0
        end
        return next_fence(KEYS[2], ARGV[3])"
    ))
});

/// KEYS: lock. ARGV: token, ttl ms. 1 when extended, 0 when the lock is no longer ours.
pub(crate) static EXTEND: LazyLock<redis::Script> = LazyLock::new(|| {
    crate::redis::script(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
        return 0",
    )
});

/// KEYS: lock. ARGV: token. Deletes the lock only if it is still ours.
pub(crate) static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    crate::redis::script(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0",
    )
});

/// KEYS: lock. ARGV: token, channel, message, publish command. Deletes the lock if it is
/// still ours and tells the waiting instances how the fill ended (when `message` is not
/// empty): one round trip,
/// the release first, so the instances told to retry find the lock free, and a refused
/// `PUBLISH` leaves it released.
static NOTIFY_RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    crate::redis::script(
        r"
        local released = 0
        if redis.call('TYPE', KEYS[1])['ok'] == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
            released = redis.call('DEL', KEYS[1])
        end
        if ARGV[3] ~= '' then redis.call(ARGV[4], ARGV[2], ARGV[3]) end
        return released",
    )
});

/// The fleet lock on the cache's own Redis.
#[derive(Clone)]
pub struct RedisLock {
    redis: Arc<Redis>,
    ttl: Duration,
}

impl RedisLock {
    /// A lock on `redis` whose grants last `ttl` unless extended.
    pub fn new(redis: Arc<Redis>, ttl: Duration) -> RedisLock {
        RedisLock { redis, ttl }
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    pub async fn try_acquire(&self, key: &CacheKey) -> LockTry {
        self.attempt(key, None).await
    }

    /// Like `try_acquire`, but first looks at the entry in the same script: one fresh
    /// beyond the first instant (say, now) and received after the second (the epoch:
    /// any), stored since the caller looked, ends the attempt with `Filled`, lock
    /// untouched.
    pub async fn try_acquire_unless_filled(
        &self,
        key: &CacheKey,
        filled: (SystemTime, SystemTime),
    ) -> LockTry {
        self.attempt(key, Some(filled)).await
    }

    async fn attempt(&self, key: &CacheKey, check: Option<(SystemTime, SystemTime)>) -> LockTry {
        let keys = self.redis.keys(key.primary(), key.as_str());
        let token = format!("{}:{:016x}", self.redis.instance, rand::random::<u64>());
        let started = Instant::now();
        let ttl_ms = self.ttl.as_millis() as u64;
        let (lock_key, fence_key, entry_key, t) =
            (keys.lock.clone(), keys.fence, keys.entry, token.clone());
        let unix_ms = |at: SystemTime| {
            at.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64
        };
        let (beyond_ms, after_ms) = check.map_or((0, 0), |(fresh, received)| {
            (unix_ms(fresh), unix_ms(received))
        });
        let fence = self
            .redis
            .run_for(&keys.lock, "lock acquire", |mut c| async move {
                ACQUIRE
                    .key(lock_key)
                    .key(fence_key)
                    .key(entry_key)
                    .arg(t)
                    .arg(ttl_ms)
                    .arg(FENCE_RETENTION_MS)
                    .arg(if check.is_some() { "1" } else { "0" })
                    .arg(beyond_ms)
                    .arg(after_ms)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
        match fence {
            None => LockTry::Unavailable,
            Some(-1) => LockTry::Filled,
            Some(fence) if fence <= 0 => {
                self.redis.metrics.lock_contended();
                LockTry::Held
            }
            Some(fence) => {
                self.redis.metrics.lock_acquired();
                LockTry::Acquired(Lease {
                    lock_key: keys.lock,
                    token,
                    fence: fence as u64,
                    // Counted from before the request: the lease may have started then.
                    deadline: started + self.ttl,
                })
            }
        }
    }

    /// Extends the lease by the TTL; `false` if it is no longer ours (or Redis is away).
    pub(crate) async fn extend(&self, lease: &mut Lease) -> bool {
        let started = Instant::now();
        let ttl_ms = self.ttl.as_millis() as u64;
        let (key, token) = (lease.lock_key.clone(), lease.token.clone());
        let extended = self
            .redis
            .run_for(&lease.lock_key, "lock extend", |mut c| async move {
                EXTEND
                    .key(key)
                    .arg(token)
                    .arg(ttl_ms)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
        if extended == Some(1) {
            lease.deadline = started + self.ttl;
            self.redis.metrics.lock_extended();
            true
        } else {
            self.redis.metrics.lock_lost();
            false
        }
    }

    /// Publishes `message` (if any) on `channel`, then releases `lease`: one script.
    pub(crate) async fn release_telling(&self, lease: Lease, channel: String, message: String) {
        let Lease {
            lock_key, token, ..
        } = lease;
        let publish = self.redis.publish_command();
        self.redis
            .run_for(&lock_key.clone(), "lock release", |mut c| async move {
                NOTIFY_RELEASE
                    .key(lock_key)
                    .arg(token)
                    .arg(channel)
                    .arg(message)
                    .arg(publish)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    pub async fn release(&self, lease: Lease) {
        let Lease {
            lock_key, token, ..
        } = lease;
        self.redis
            .run_for(&lock_key.clone(), "lock release", |mut c| async move {
                RELEASE
                    .key(lock_key)
                    .arg(token)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }
}
