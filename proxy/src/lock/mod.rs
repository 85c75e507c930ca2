//! Fill locks: who fetches a missing or stale key from the upstream, and how everyone
//! else learns the outcome.
//!
//! A lock attempt either grants a [`FillPermit`] (this request fills the key) or
//! returns a [`FillWaiter`] (another request already does). The permit holder ends the
//! fill with a [`FillOutcome`] that every waiter receives. A permit dropped without an
//! outcome (its task panicked or was aborted) tells the waiters `HolderFailed`, so one
//! of them takes over instead of hanging.
//!
//! [`local`] coalesces requests inside this process. A fleet-wide lock stands behind
//! it: only a local permit holder contends for the distributed one.

pub mod local;
pub mod redlock;
pub mod single;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::{CacheEntry, PassReason};
use crate::upstream::FailureKind;

pub use local::{FillPermit, FillWaiter, LocalFillLock};

/// The result of asking to fill a key.
pub enum LockAttempt {
    Acquired(FillPermit),
    Held(FillWaiter),
}

/// How a fill ended, as told to the requests that waited on it.
#[derive(Clone, Debug)]
pub enum FillOutcome {
    /// The entry was stored; serve it.
    Filled(Arc<CacheEntry>),
    /// The response may not be stored but is the same for everyone who asked at the
    /// same time (an upstream error response); serve it, do not store it.
    Shared(Arc<CacheEntry>),
    /// The response is not cacheable (and possibly personal): go upstream yourself.
    Uncacheable(PassReason),
    /// The upstream could not be reached or did not answer in time.
    Failed(FailureKind),
    /// The filling task went away without an outcome; try to fill again.
    HolderFailed,
}

impl FillOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            FillOutcome::Filled(_) => "filled",
            FillOutcome::Shared(_) => "shared",
            FillOutcome::Uncacheable(_) => "uncacheable",
            FillOutcome::Failed(_) => "failed",
            FillOutcome::HolderFailed => "holder-failed",
        }
    }
}

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
}

/// The fleet-wide lock, on the cache's Redis or by Redlock over independent nodes.
pub enum FleetLock {
    Single(single::RedisLock),
    Redlock(redlock::Redlock),
}

impl FleetLock {
    pub fn ttl(&self) -> Duration {
        match self {
            FleetLock::Single(l) => l.ttl(),
            FleetLock::Redlock(l) => l.ttl(),
        }
    }

    pub async fn try_acquire(&self, key: &crate::cache::CacheKey) -> LockTry {
        match self {
            FleetLock::Single(l) => l.try_acquire(key).await,
            FleetLock::Redlock(l) => l.try_acquire(key).await,
        }
    }

    /// Extends the lease by the TTL; `false` once it is lost.
    pub async fn extend(&self, lease: &mut Lease) -> bool {
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
