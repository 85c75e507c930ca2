//! Fleet-wide fills: which instance fetches a key, and how the others learn its outcome
//! (the shared tier re-checked, the fleet lock tried, fill events awaited).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::lock::{FleetLock, Lease, LockTry};
use super::{FillOutcome, WaitPolicy};
use crate::cache::shared::{PutOutcome, SharedCache};
use crate::cache::{Cache, CacheKey, PassReason};
use crate::config::{LockSettings, OnWaitTimeout};
use crate::redis::{FillEvent, Redis};
use crate::upstream::FailureKind;

/// How a fleet-wide claim on a fill ended.
pub(crate) enum Claim {
    /// Fetch it: with the lease, or without one when Redis is unavailable (the fill is
    /// then coalesced only within this instance).
    Lead(Option<Lease>),
    /// Another instance's fill ended it.
    Done(FillOutcome),
}

/// Fleet-wide fills: who fetches a key across instances, and how the others learn.
pub(crate) struct Coordinator {
    redis: Arc<Redis>,
    lock: FleetLock,
    /// The tiers: the shared one is re-checked before and while waiting; what it
    /// holds is copied to the local one.
    cache: Cache,
    shared: SharedCache,
}

/// Extra wait past a lock's TTL before a waiter concludes the holder died.
const TAKEOVER_MARGIN: Duration = Duration::from_millis(250);

impl Coordinator {
    /// `None` when `cache` has no shared tier (single instance): nothing to coordinate.
    pub(crate) fn new(redis: Arc<Redis>, lock: &LockSettings, cache: Cache) -> Option<Coordinator> {
        let shared = cache.shared()?.clone();
        Some(Coordinator {
            lock: FleetLock::new(Arc::clone(&redis), lock),
            redis,
            cache,
            shared,
        })
    }

    /// The connection to Redis the fleet shares.
    pub(crate) fn redis(&self) -> &Arc<Redis> {
        &self.redis
    }

    /// Becomes the fleet's filler of `key`, or waits for the one that is. Called only by
    /// this instance's local permit holder. A `background` refresh does not wait: if
    /// another instance holds the lock, that one refreshes.
    ///
    /// Order: register for events, then re-check Redis, then try the lock, then wait;
    /// so a fill that lands between the check and the wait still wakes us. Every wait
    /// is bounded by the lock TTL (a dead holder's lock expires) and the route's
    /// `wait_timeout`.
    pub(crate) async fn claim(
        &self,
        key: &CacheKey,
        wait: &WaitPolicy<'_>,
        background: bool,
    ) -> Claim {
        let deadline = Instant::now() + wait.timeout;
        let mut events = self.redis.watch(key.as_str());
        let mut waited = false;
        loop {
            if let Some(entry) = self.filled(key, waited).await {
                return Claim::Done(FillOutcome::Filled(entry));
            }
            match self.lock.try_acquire(key).await {
                LockTry::Acquired(lease) => {
                    if waited {
                        self.redis.metrics.lock_takeover();
                    }
                    return Claim::Lead(Some(lease));
                }
                LockTry::Unavailable => return Claim::Lead(None),
                LockTry::Held if background => return Claim::Done(FillOutcome::Elsewhere),
                LockTry::Held => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return match wait.timed_out() {
                    OnWaitTimeout::Fetch => Claim::Lead(None),
                    OnWaitTimeout::Error => Claim::Done(FillOutcome::Failed(FailureKind::Timeout)),
                };
            }
            waited = true;
            let bound = (deadline - now).min(self.lock.ttl() + TAKEOVER_MARGIN);
            match events.next(bound).await {
                Some(FillEvent::Uncacheable) => {
                    return Claim::Done(FillOutcome::Uncacheable(PassReason::NotStorable))
                }
                Some(FillEvent::Failed) => {
                    return Claim::Done(FillOutcome::Failed(FailureKind::Protocol))
                }
                // Filled: read it at the top. Purged or nothing (timeout, lost
                // message, dead holder): re-check and try the lock again.
                Some(FillEvent::Filled(_))
                | Some(FillEvent::Retry)
                | Some(FillEvent::Purged)
                | Some(FillEvent::Lost)
                | None => {}
            }
        }
    }

    /// A fresh entry another instance stored for `key`, copied to the local tier.
    ///
    /// Re-checked first, every round: the holder writes the entry before it releases
    /// the lock, so a free lock with a fresh entry means "filled".
    async fn filled(&self, key: &CacheKey, waited: bool) -> Option<Arc<crate::cache::CacheEntry>> {
        let started = Instant::now();
        let entry = self.shared.get(key).await?;
        if !entry.freshness(SystemTime::now()).is_fresh() {
            return None;
        }
        if waited {
            self.redis
                .metrics
                .wake_latency(started.elapsed().as_secs_f64());
        }
        let entry = Arc::new(entry);
        self.cache.store(&key.primary_key(), Arc::clone(&entry));
        Some(entry)
    }

    /// Extends `lease` every third of the TTL until aborted or lost.
    pub(crate) async fn keep_alive(self: Arc<Self>, mut lease: Lease) {
        loop {
            tokio::time::sleep(self.lock.ttl() / 3).await;
            if !self.lock.extend(&mut lease).await {
                tracing::debug!("fleet lock lease lost during the fetch; the fenced write still guards the entry");
                return;
            }
        }
    }

    /// Writes a filled entry to the shared tier under `fence` and tells the fleet how
    /// the fill ended. The write comes first, so an instance woken by the event finds it.
    pub(crate) async fn publish_outcome(&self, key: &CacheKey, outcome: &FillOutcome, fence: u64) {
        let event = match outcome {
            FillOutcome::Filled(entry) => match self.shared.put(key, entry, fence).await {
                PutOutcome::Stored => {
                    let rules = self.cache.local().tag_rules();
                    let tags = rules.tags_of(key.route(), &entry.headers);
                    self.shared.tag(key, entry, &tags).await;
                    FillEvent::Filled(fence)
                }
                PutOutcome::Fenced => {
                    tracing::info!(%key, fence, "a newer lock holder exists; this fill's entry was not written to the shared cache");
                    return;
                }
                PutOutcome::Unavailable => return,
            },
            FillOutcome::Uncacheable(r) if r.waiters_retry() => FillEvent::Retry,
            FillOutcome::Uncacheable(_) => FillEvent::Uncacheable,
            FillOutcome::Shared(_) | FillOutcome::Failed(_) => FillEvent::Failed,
            FillOutcome::HolderFailed | FillOutcome::Elsewhere => return,
        };
        self.redis.publish(key.as_str(), event).await;
    }

    pub(crate) async fn release(&self, lease: Lease) {
        self.lock.release(lease).await;
    }
}
