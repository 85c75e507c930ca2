//! Fleet-wide fills: which instance fetches a key, and how the others learn its outcome
//! (the shared tier re-checked, the fleet lock tried, fill events awaited).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::lock::{FleetLock, Lease, LockTry};
use super::{early, FillOutcome, WaitPolicy};
use crate::cache::shared::{AfterWrite, PutOutcome, SharedCache};
use crate::cache::{Cache, CacheEntry, CacheKey, PassReason};
use crate::config::{LockSettings, OnWaitTimeout};
use crate::redis::{EventWait, FillEvent, Redis};
use crate::upstream::FailureKind;

/// How a fleet-wide claim on a fill ended.
pub(crate) enum Claim {
    /// Fetch it: with the lease, or without one when Redis is unavailable (the fill is
    /// then coalesced only within this instance).
    Lead(Option<Lease>),
    /// Another instance's fill ended it.
    Done(FillOutcome),
}

/// Which entry in the shared tier a claim takes instead of fetching: for a miss or a
/// stale entry, any that is fresh now; for an early refresh, only one fetched after
/// the copy it replaces (that copy is still fresh, and is what Redis holds until some
/// instance refreshes it: once one has, the others adopt its entry, so the fleet
/// fetches a key once per lifetime).
#[derive(Debug, Clone)]
pub(crate) enum Adopt {
    FreshNow,
    /// Fetched after `copy` was.
    NewerThan(Arc<CacheEntry>),
}

impl Adopt {
    /// The receipt an entry must come after to be adopted (the epoch: any).
    pub(crate) fn received_after(&self) -> SystemTime {
        match self {
            Adopt::FreshNow => SystemTime::UNIX_EPOCH,
            Adopt::NewerThan(copy) => copy.received_at(),
        }
    }

    fn accepts(&self, entry: &CacheEntry) -> bool {
        entry.freshness(SystemTime::now()).is_fresh() && entry.received_at() > self.received_after()
    }

    /// An adopted entry, counted as refreshed already when it does not renew the copy
    /// an early refresh was to replace ([`early::renews`]): it is that refresh's
    /// result, and a due hit must not fetch it again.
    fn adopted(&self, entry: CacheEntry) -> CacheEntry {
        match self {
            Adopt::NewerThan(copy) if !early::renews(copy, &entry) => entry.early_refreshed(),
            _ => entry,
        }
    }
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

/// How often a waiter that cannot count on an event looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Where a claim stands between its attempts.
#[derive(Default)]
struct Round {
    /// Read the shared tier before the next attempt.
    read_first: bool,
    /// A wait has happened: the next look is a re-check after it.
    waited: bool,
    /// When the lock was last seen held by another instance.
    held_at: Option<Instant>,
    /// Asked to listen on the key's channel; `subscribed` when that worked.
    listening: bool,
    subscribed: bool,
    /// The last attempt found the key's Redis node away: poll.
    poll: bool,
}

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

    /// Becomes the fleet's filler of `key` for a request with `headers`, or waits for
    /// the one that is. Called only by this instance's local permit holder. A
    /// `background` refresh does not wait: if another instance holds the lock, that one
    /// refreshes. An entry of another variant found under the key is not this request's
    /// fill; an entry is taken instead of fetching as `adopt` says.
    ///
    /// Order: try the lock (the first attempt also looks for a fresh entry, in the same
    /// script: an uncontended miss costs one round trip here); when it is held, listen
    /// on the key's channel, then re-check and try again, then wait; so a fill that
    /// lands between the check and the wait still wakes us. Every wait is bounded by
    /// the lock TTL (a dead holder's lock expires) and the route's `wait_timeout`.
    pub(crate) async fn claim(
        &self,
        key: &CacheKey,
        headers: &http::HeaderMap,
        wait: &WaitPolicy<'_>,
        background: bool,
        adopt: Adopt,
    ) -> Claim {
        let deadline = Instant::now() + wait.timeout;
        let mut events = self.redis.watch(key.as_str(), key.primary());
        // The single Redis lock looks at the entry in the same script as the attempt
        // (no window between a look and the attempt in which a fill can end). Redlock
        // cannot: the shared tier is read before each of its attempts.
        let checks = self.lock.checks_entry();
        let mut round = Round {
            read_first: !checks,
            ..Round::default()
        };
        loop {
            let read = std::mem::replace(&mut round.read_first, !checks);
            if read {
                if let Some(entry) = self.filled(key, headers, round.waited, &adopt).await {
                    return Claim::Done(FillOutcome::Filled(entry));
                }
            }
            // After a read that found nothing to serve, a plain attempt: the entry the
            // script would call fresh is not this request's (stale by this instance's
            // clock, another variant).
            let attempt = if read {
                self.lock.try_acquire(key).await
            } else {
                let received_after = adopt.received_after();
                self.lock
                    .claim_attempt(key, SystemTime::now(), received_after)
                    .await
            };
            round.poll = false;
            match attempt {
                LockTry::Acquired(lease) => {
                    if round.waited {
                        self.redis.metrics.lock_takeover();
                    }
                    return Claim::Lead(Some(lease));
                }
                // Read it at the top (once: the next attempt takes the lock if the
                // entry turns out unreadable or stale by this instance's clock).
                LockTry::Filled => {
                    round.read_first = true;
                    continue;
                }
                // The key's cluster node away while a holder was seen (a failover:
                // the holder's lock and entry reach the promoted replica): keep
                // polling for up to a lock TTL, as for a holder that died. One Redis
                // away is an outage: fall back at once.
                LockTry::Unavailable if self.holder_may_finish(&round) => round.poll = true,
                LockTry::Unavailable => return Claim::Lead(None),
                LockTry::Held if background => return Claim::Done(FillOutcome::Elsewhere),
                LockTry::Held => round.held_at = Some(Instant::now()),
            }
            // Listen on the key's channel from now on, then look again: a fill that
            // ended before the subscription took effect is found there.
            if !round.listening {
                round.listening = true;
                round.subscribed = events.listen().await;
                if round.subscribed {
                    continue;
                }
            }
            if let Some(ended) = self
                .wait_round(&mut events, &mut round, deadline, wait)
                .await
            {
                return ended;
            }
        }
    }

    /// On a cluster, whether a holder seen recently may still store its entry although
    /// the key's node does not answer now.
    fn holder_may_finish(&self, round: &Round) -> bool {
        self.redis.is_cluster()
            && round
                .held_at
                .is_some_and(|at| at.elapsed() < self.lock.ttl() + TAKEOVER_MARGIN)
    }

    /// Waits for the next event of the key (or the bound): `Some` when the wait ended
    /// the claim, `None` to look again.
    async fn wait_round(
        &self,
        events: &mut EventWait,
        round: &mut Round,
        deadline: Instant,
        wait: &WaitPolicy<'_>,
    ) -> Option<Claim> {
        // Still subscribed? (A disconnection may have dropped it; cheap when it holds.)
        round.subscribed = events.listen().await;
        let now = Instant::now();
        if now >= deadline {
            return Some(match wait.timed_out() {
                OnWaitTimeout::Fetch => Claim::Lead(None),
                OnWaitTimeout::Error => Claim::Done(FillOutcome::Failed(FailureKind::Timeout)),
            });
        }
        round.waited = true;
        let mut bound = (deadline - now).min(self.lock.ttl() + TAKEOVER_MARGIN);
        if round.poll || !round.subscribed {
            // No event will come (no subscription, or the key's node is away): look
            // again soon instead.
            bound = bound.min(POLL_INTERVAL);
        }
        match events.next(bound).await {
            Some(FillEvent::Uncacheable) => Some(Claim::Done(FillOutcome::Uncacheable(
                PassReason::NotStorable,
            ))),
            Some(FillEvent::Failed) => {
                Some(Claim::Done(FillOutcome::Failed(FailureKind::Protocol)))
            }
            // Filled: read it at the top. Purged or nothing (timeout, lost message,
            // dead holder): re-check and try the lock again.
            Some(FillEvent::Filled(_))
            | Some(FillEvent::Retry)
            | Some(FillEvent::Purged)
            | Some(FillEvent::Lost)
            | None => None,
        }
    }

    /// An entry (fresh as `adopt` says) another instance stored for `key` that serves a request with
    /// `headers` (an instance that does not yet know the response varies looks under
    /// the primary key, where any variant may be), copied to the local tier.
    ///
    /// Re-checked first, every round: the holder writes the entry before it releases
    /// the lock, so a free lock with a fresh entry means "filled".
    async fn filled(
        &self,
        key: &CacheKey,
        headers: &http::HeaderMap,
        waited: bool,
        adopt: &Adopt,
    ) -> Option<Arc<CacheEntry>> {
        let started = Instant::now();
        let entry = self.shared.get(key).await?;
        if !adopt.accepts(&entry) || !entry.matches_vary(headers) {
            return None;
        }
        let entry = adopt.adopted(entry);
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

    /// Ends a fleet-wide fill: writes a filled entry to the shared tier (fenced by the
    /// lease), tells the fleet how the fill ended, and frees the lock. The write comes
    /// before the event, so an instance woken by it finds the entry. On the single Redis
    /// the three are one script (one round trip); Redlock's lock is freed on its own
    /// nodes after. Without a lease (Redis was unavailable at the claim) the entry is
    /// written with fence 0 and the fleet told, as far as Redis answers now.
    pub(crate) async fn finish(&self, key: &CacheKey, outcome: &FillOutcome, lease: Option<Lease>) {
        let fence = lease.as_ref().map_or(0, |l| l.fence);
        let event = match outcome {
            FillOutcome::Filled(_) => Some(FillEvent::Filled(fence)),
            FillOutcome::Uncacheable(r) if r.waiters_retry() => Some(FillEvent::Retry),
            FillOutcome::Uncacheable(_) => Some(FillEvent::Uncacheable),
            // Refused by this instance's upstream caps, not failed upstream: the other
            // instances' waiters compete for the fill again (under their own caps).
            FillOutcome::Failed(FailureKind::QueueFull | FailureKind::QueueTimeout) => {
                Some(FillEvent::Retry)
            }
            FillOutcome::Shared(_) | FillOutcome::Failed(_) => Some(FillEvent::Failed),
            FillOutcome::HolderFailed | FillOutcome::Elsewhere => None,
        };
        let message = event.map(|e| self.redis.event_message(key.as_str(), e));
        match (outcome, &self.lock, lease) {
            (FillOutcome::Filled(entry), FleetLock::Single(_), lease) => {
                self.write(key, entry, fence, message.as_deref(), lease.as_ref())
                    .await;
            }
            (FillOutcome::Filled(entry), FleetLock::Redlock(_), lease) => {
                self.write(key, entry, fence, message.as_deref(), None)
                    .await;
                if let Some(lease) = lease {
                    self.lock.release(lease).await;
                }
            }
            (_, FleetLock::Single(lock), Some(lease)) => {
                let message = message.unwrap_or_default();
                lock.release_telling(lease, self.redis.event_channel(key.primary()), message)
                    .await;
            }
            (_, _, mut lease) => {
                // A pass this request caused frees the lock before telling the fleet to
                // retry, so the instances that retry find it free.
                if event == Some(FillEvent::Retry) {
                    if let Some(lease) = lease.take() {
                        self.lock.release(lease).await;
                    }
                }
                if let Some(event) = event {
                    self.redis.publish(key.as_str(), key.primary(), event).await;
                }
                if let Some(lease) = lease {
                    self.lock.release(lease).await;
                }
            }
        }
    }

    /// The purge tags of a filled entry, then its fenced write, telling the fleet
    /// (`message`) and freeing `release` (a lease on this Redis) in the same script.
    async fn write(
        &self,
        key: &CacheKey,
        entry: &CacheEntry,
        fence: u64,
        message: Option<&str>,
        release: Option<&Lease>,
    ) {
        // Tags first: once the entry can be read (and waiters are woken to it), a purge
        // of its tags finds it.
        let rules = self.cache.local().tag_rules();
        let tags = rules.tags_of(key.scope(), entry);
        self.shared.tag(key, entry, &tags).await;
        let after = AfterWrite {
            message,
            release: release.map(|l| (l.lock_key.as_str(), l.token.as_str())),
        };
        match self.shared.put_then(key, entry, fence, &after).await {
            PutOutcome::Stored => {}
            PutOutcome::Fenced => {
                tracing::info!(%key, fence, "a newer lock holder exists; this fill's entry was not written to the shared cache");
            }
            PutOutcome::Unavailable => {}
        }
    }
}
