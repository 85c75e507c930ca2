//! The fleet-wide fill lock on one Redis: `SET key token NX PX ttl`, a fencing token
//! from `INCR` on each grant, extension and release by compare-and-set scripts.
//!
//! Only a local permit holder asks for it (local coalescing stays in front), so one
//! instance contends with at most one task per key.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

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
    local kind = redis.call('TYPE', k)['ok']
    local n = kind == 'string' and redis.call('GET', k)
    if kind ~= 'none' and not (n and #n <= 15 and string.match(n, '^%d+$')) then
        local now = redis.call('TIME')
        redis.call('DEL', k)
        redis.call('SET', k, string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000)))
    end
    local fence = redis.call('INCR', k)
    redis.call('PEXPIRE', k, retention)
    return fence
end
";

/// KEYS: lock, fence. ARGV: token, ttl ms, fence retention ms. Returns the fencing
/// token of the grant, or 0 when the lock is held. Every grant expires, so a lock
/// without an expiry was not set by corral: it is given the TTL, and ends.
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{NEXT_FENCE_LUA}
        if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
            if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
            return 0
        end
        return next_fence(KEYS[2], ARGV[3])"
    ))
});

/// KEYS: lock. ARGV: token, ttl ms. 1 when extended, 0 when the lock is no longer ours.
pub(crate) static EXTEND: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
        return 0",
    )
});

/// KEYS: lock. ARGV: token. Deletes the lock only if it is still ours.
pub(crate) static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0",
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
        let keys = self.redis.keys(key.primary(), key.as_str());
        let token = format!("{}:{:016x}", self.redis.instance, rand::random::<u64>());
        let started = Instant::now();
        let ttl_ms = self.ttl.as_millis() as u64;
        let (lock_key, fence_key, t) = (keys.lock.clone(), keys.fence, token.clone());
        let fence = self
            .redis
            .run("lock acquire", |mut c| async move {
                ACQUIRE
                    .key(lock_key)
                    .key(fence_key)
                    .arg(t)
                    .arg(ttl_ms)
                    .arg(FENCE_RETENTION_MS)
                    .invoke_async::<u64>(&mut c)
                    .await
            })
            .await;
        match fence {
            None => LockTry::Unavailable,
            Some(0) => {
                self.redis.metrics.lock_contended();
                LockTry::Held
            }
            Some(fence) => {
                self.redis.metrics.lock_acquired();
                LockTry::Acquired(Lease {
                    lock_key: keys.lock,
                    token,
                    fence,
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
            .run("lock extend", |mut c| async move {
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

    pub async fn release(&self, lease: Lease) {
        let Lease {
            lock_key, token, ..
        } = lease;
        self.redis
            .run("lock release", |mut c| async move {
                RELEASE
                    .key(lock_key)
                    .arg(token)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }
}
