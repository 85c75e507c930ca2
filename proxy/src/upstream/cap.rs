//! Upstream concurrency caps: at most `upstream_concurrency` requests in flight to a
//! route's upstream from this instance (with `fleet_upstream_concurrency`, also at most
//! that many from the whole fleet: leases in Redis, [`super::fleet_cap`]). The rest
//! wait in a bounded queue, refreshes of cached entries ahead of new keys, each for at
//! most the queue timeout; a request refused ([`Shed`]) is never sent.
//!
//! A slot is held until the upstream's response body ends (its connection is busy
//! until then), not only until its head arrives.
//!
//! Invariant (who writes, what wakes whom): [`CapState`] changes only under its mutex.
//! `in_flight` counts the slots granted and not yet dropped. A waiter is woken only
//! with a slot in hand: without a fleet cap, the thread that drops a slot hands it to
//! the next live waiter under the lock; with one, the dispatcher task hands out the
//! leases Redis granted. A slot sent to a waiter that has gone comes back and is
//! passed on (or freed), so no slot is lost to a cancelled or timed-out request.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use super::fleet_cap::FleetCap;
use crate::config::UpstreamCaps;
use crate::metrics::CapMetrics;

/// Which requests go first when slots are scarce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Priority {
    /// Refreshes and revalidations of cached entries: each keeps a key served.
    Refresh = 0,
    /// Misses and passes.
    #[default]
    Request = 1,
}

/// Why a request was refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Shed {
    #[error("the upstream queue is full")]
    QueueFull,
    #[error("no upstream slot came free within the queue timeout")]
    QueueTimeout,
}

/// One route's cap: its slots, its queue, and (fleet cap) its leases in Redis. The
/// numbers are set at start and by a reload ([`UpstreamCap::set_limits`]), which keeps
/// the cap (and so its count of requests in flight) when a route's settings change.
pub(crate) struct UpstreamCap {
    limit: AtomicUsize,
    queue_max: AtomicUsize,
    /// Nanoseconds.
    queue_timeout: AtomicU64,
    state: Mutex<CapState>,
    pub(super) fleet: Option<FleetCap>,
    pub(super) metrics: CapMetrics,
}

/// What the cap's mutex guards.
#[derive(Default)]
pub(super) struct CapState {
    pub(super) in_flight: usize,
    /// Waiters by [`Priority`], oldest first. A waiter that gave up leaves a closed
    /// sender behind, skipped when its turn comes.
    queues: [VecDeque<oneshot::Sender<Slot>>; 2],
    /// Fleet leases this instance's slots hold (renewed by the dispatcher).
    pub(super) leases: HashSet<String>,
    /// Leases of dropped slots, to be released in Redis by the dispatcher.
    pub(super) freed: Vec<String>,
    /// Leases taken, once Redis was back, for slots let through without one during an
    /// outage (so the fleet counts them); one is freed as each such slot drops.
    pub(super) backfill: Vec<String>,
}

impl CapState {
    /// Slots in flight without a lease counted for them in Redis (let through while
    /// Redis was away, and not yet backfilled).
    pub(super) fn unleased(&self) -> usize {
        self.in_flight.saturating_sub(self.leases.len())
    }

    fn queued(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Waiters still waiting (after dropping those that gave up).
    pub(super) fn live_waiters(&mut self) -> usize {
        for queue in &mut self.queues {
            queue.retain(|w| !w.is_closed());
        }
        self.queued()
    }

    fn next_waiter(&mut self) -> Option<oneshot::Sender<Slot>> {
        self.queues.iter_mut().find_map(VecDeque::pop_front)
    }
}

/// Permission to have one request in flight to the upstream; freed when dropped.
pub(crate) struct Slot {
    cap: Option<Arc<UpstreamCap>>,
    lease: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(cap) = self.cap.take() {
            cap.release(self.lease.take());
        }
    }
}

impl Slot {
    /// A slot that frees nothing when dropped (its count was passed on).
    fn disarm(mut self) -> Option<String> {
        self.cap = None;
        self.lease.take()
    }
}

/// A request waiting in the queue; however its wait ends (a slot, the timeout, its
/// client gone), the queue forgets it and the gauge says so.
struct Queued<'a> {
    cap: &'a UpstreamCap,
    grant: Option<oneshot::Receiver<Slot>>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        // Dropped first: a slot sent meanwhile is released, and the sender is closed.
        drop(self.grant.take());
        let waiting = self.cap.lock().live_waiters();
        self.cap.metrics.queued.set(waiting as i64);
    }
}

impl UpstreamCap {
    pub(crate) fn new(
        caps: &UpstreamCaps,
        fleet: Option<FleetCap>,
        metrics: CapMetrics,
    ) -> Arc<UpstreamCap> {
        let cap = Arc::new(UpstreamCap {
            limit: AtomicUsize::new(caps.instance as usize),
            queue_max: AtomicUsize::new(caps.queue as usize),
            queue_timeout: AtomicU64::new(nanos(caps.queue_timeout)),
            state: Mutex::new(CapState::default()),
            fleet,
            metrics,
        });
        if cap.fleet.is_some() {
            tokio::spawn(super::fleet_cap::dispatch(Arc::downgrade(&cap)));
        }
        cap
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, CapState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Whether this cap can take `caps` in place: it counts leases in Redis exactly when
    /// they ask for a fleet cap (`fleet`: and Redis is configured).
    pub(crate) fn fits(&self, fleet: bool) -> bool {
        self.fleet.is_some() == fleet
    }

    /// New numbers (a reload). Requests in flight stay counted: lowering the limit
    /// admits nobody until the count is below it; raising it admits waiters at once.
    pub(crate) fn set_limits(self: &Arc<Self>, caps: &UpstreamCaps) {
        self.limit.store(caps.instance as usize, Ordering::Relaxed);
        self.queue_max.store(caps.queue as usize, Ordering::Relaxed);
        let timeout = nanos(caps.queue_timeout);
        self.queue_timeout.store(timeout, Ordering::Relaxed);
        match &self.fleet {
            Some(fleet) => {
                fleet.set_cap(caps.fleet.unwrap_or(caps.instance));
                fleet.kick.notify_one();
            }
            None => {
                let mut state = self.lock();
                while state.in_flight < self.limit() {
                    state.in_flight += 1;
                    if self.hand_over(&mut state, None).is_err() {
                        state.in_flight -= 1;
                        break;
                    }
                }
                self.metrics.in_flight.set(state.in_flight as i64);
            }
        }
    }

    /// A slot: at once when one is free and nobody waits (without a fleet cap), else
    /// after waiting in the queue, at most the queue timeout.
    ///
    /// The queue bound counts the requests waiting beyond the free local slots (with a
    /// fleet cap every request passes the queue for its lease); refreshes of cached
    /// entries may wait in as many again, so that new keys filling the queue do not
    /// shut them out.
    pub(crate) async fn admit(self: &Arc<Self>, priority: Priority) -> Result<Slot, Shed> {
        let grant = {
            let mut state = self.lock();
            let room = self.limit().saturating_sub(state.in_flight);
            let queue_max = self.queue_max.load(Ordering::Relaxed);
            if self.fleet.is_none() && state.queued() == 0 && room > 0 {
                state.in_flight += 1;
                self.metrics.in_flight.set(state.in_flight as i64);
                return Ok(self.slot(None));
            }
            let bound = room
                + match priority {
                    Priority::Refresh => queue_max * 2,
                    Priority::Request => queue_max,
                };
            if state.queued() >= bound && state.live_waiters() >= bound {
                self.metrics.queue_full();
                return Err(Shed::QueueFull);
            }
            let (grant, waiting) = oneshot::channel();
            state.queues[priority as usize].push_back(grant);
            self.metrics.queued.set(state.queued() as i64);
            waiting
        };
        if let Some(fleet) = &self.fleet {
            fleet.kick.notify_one();
        }
        let mut queued = Queued {
            cap: self,
            grant: Some(grant),
        };
        let grant = queued.grant.as_mut().expect("set above");
        let timeout = Duration::from_nanos(self.queue_timeout.load(Ordering::Relaxed));
        match tokio::time::timeout(timeout, grant).await {
            Ok(Ok(slot)) => Ok(slot),
            // The grant is dropped only with the cap (its routes are gone), or timed out.
            Ok(Err(_)) | Err(_) => {
                self.metrics.queue_timeout();
                Err(Shed::QueueTimeout)
            }
        }
    }

    pub(super) fn slot(self: &Arc<Self>, lease: Option<String>) -> Slot {
        Slot {
            cap: Some(Arc::clone(self)),
            lease,
        }
    }

    /// Hands out a slot already counted in `in_flight` (with its lease, if any) to the
    /// next live waiter; `Err` gives it back when nobody waits.
    pub(super) fn hand_over(
        self: &Arc<Self>,
        state: &mut CapState,
        lease: Option<String>,
    ) -> Result<(), Option<String>> {
        let mut lease = lease;
        while let Some(waiter) = state.next_waiter() {
            match waiter.send(self.slot(lease)) {
                Ok(()) => {
                    self.metrics.queued.set(state.queued() as i64);
                    return Ok(());
                }
                Err(slot) => lease = slot.disarm(),
            }
        }
        self.metrics.queued.set(0);
        Err(lease)
    }

    /// A slot was dropped: without a fleet cap it goes to the next waiter at once;
    /// with one, its lease is released (and the freed place handed out) by the
    /// dispatcher.
    fn release(self: &Arc<Self>, lease: Option<String>) {
        let mut state = self.lock();
        match &self.fleet {
            None => {
                // Past a limit a reload lowered, the slot is not passed on.
                if state.in_flight > self.limit() || self.hand_over(&mut state, None).is_err() {
                    state.in_flight -= 1;
                }
            }
            Some(fleet) => {
                state.in_flight -= 1;
                // An unleased slot gives back a lease taken for it when Redis returned.
                let lease = lease.or_else(|| state.backfill.pop());
                if let Some(lease) = lease {
                    state.leases.remove(&lease);
                    state.freed.push(lease);
                }
                fleet.kick.notify_one();
            }
        }
        self.metrics.in_flight.set(state.in_flight as i64);
    }
}

/// `d` in nanoseconds (saturating; validated timeouts are far below the bound).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
