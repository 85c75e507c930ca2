//! The fleet-wide fill lock: on the cache's Redis ([`single`]) or by Redlock over
//! independent Redis masters ([`redlock`]). Grants carry a fencing token that the
//! shared tier's write checks, so a holder whose lease expired cannot overwrite a
//! newer holder's entry.

mod compare_delete;
pub mod redlock;
pub mod single;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::cache::CacheKey;
use crate::config::{LockMode, LockSettings};
use crate::redis::Redis;

/// A granted fleet lock: ours until `deadline` unless extended.
#[derive(Debug, Clone)]
pub struct Lease {
    pub(crate) lock_key: String,
    pub(crate) token: String,
    /// The grant's fencing token; the entry write carries it.
    pub fence: u64,
    /// Past this instant the holder must not assume it still holds the lock.
    pub deadline: Instant,
}

/// The result of one attempt at the fleet lock.
pub enum LockTry {
    Acquired(Lease),
    /// Another instance holds it.
    Held,
    /// Redis is unavailable (for Redlock: no quorum of nodes answered).
    Unavailable,
    /// A fresh entry is in the shared tier (another fill stored it since the caller
    /// looked): the lock was not tried.
    Filled,
}

/// The fleet-wide lock, on the cache's Redis or by Redlock over independent nodes.
pub enum FleetLock {
    Single(single::RedisLock),
    Redlock(redlock::Redlock),
}

impl FleetLock {
    /// The lock `settings` ask for; `redis` is the cache's (where fences are kept).
    pub fn new(redis: Arc<Redis>, settings: &LockSettings) -> FleetLock {
        match settings.mode {
            LockMode::Single => FleetLock::Single(single::RedisLock::new(redis, settings.ttl)),
            LockMode::Redlock => FleetLock::Redlock(redlock::Redlock::new(redis, settings)),
        }
    }

    pub(crate) fn ttl(&self) -> Duration {
        match self {
            FleetLock::Single(l) => l.ttl(),
            FleetLock::Redlock(l) => l.ttl(),
        }
    }

    pub async fn try_acquire(&self, key: &CacheKey) -> LockTry {
        match self {
            FleetLock::Single(l) => l.try_acquire(key).await,
            FleetLock::Redlock(l) => l.try_acquire(key).await,
        }
    }

    /// One attempt of a fill's claim: on the single Redis the same script first looks
    /// for an entry fresh beyond `fresh_beyond` and received after `received_after`
    /// (`LockTry::Filled`); Redlock's nodes hold no entries, so its caller reads the
    /// shared tier itself (`checks_entry`).
    pub(crate) async fn claim_attempt(
        &self,
        key: &CacheKey,
        fresh_beyond: SystemTime,
        received_after: SystemTime,
    ) -> LockTry {
        match self {
            FleetLock::Single(l) => {
                let filled = (fresh_beyond, received_after);
                l.try_acquire_unless_filled(key, filled).await
            }
            FleetLock::Redlock(l) => l.try_acquire(key).await,
        }
    }

    /// Whether `claim_attempt` looks at the entry itself.
    pub(crate) fn checks_entry(&self) -> bool {
        matches!(self, FleetLock::Single(_))
    }

    /// Extends the lease by the TTL; `false` once it is lost.
    pub(crate) async fn extend(&self, lease: &mut Lease) -> bool {
        match self {
            FleetLock::Single(l) => l.extend(lease).await,
            FleetLock::Redlock(l) => l.extend(lease).await,
        }
    }

    pub async fn release(&self, lease: Lease) {
        match self {
            FleetLock::Single(l) => l.release(lease).await,
            FleetLock::Redlock(l) => l.release(lease).await,
        }
    }
}
