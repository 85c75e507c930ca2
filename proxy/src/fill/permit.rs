//! In-process coalescing: at most one fill per key at a time in this process, and a
//! wake-up for every request waiting on it as soon as it ends.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::{FillOutcome, LockAttempt};
use crate::cache::CacheKey;

/// The table of fills in progress.
///
/// Invariant: a key is in `fills` exactly while one [`FillPermit`] for it is alive, and
/// only that permit writes its channel. The permit removes the key *before* it
/// publishes the outcome, and the outcome is published only after the entry is stored,
/// so a request that finds no fill in progress finds the stored entry instead (the
/// permit holder re-checks the cache after acquiring, for requests that looked up
/// before the store and acquire after the removal).
///
/// A `std` mutex, not tokio's: the critical sections are a hash-map operation with no
/// `.await` inside. A `watch` channel, not `Notify`: the outcome stays readable, so a
/// waiter that subscribes an instant before it is sent still sees it, and every
/// waiter gets its own copy.
#[derive(Default)]
pub struct LocalFillLock {
    fills: Mutex<HashMap<CacheKey, watch::Sender<Option<FillOutcome>>>>,
}

impl LocalFillLock {
    pub(crate) fn new() -> Arc<LocalFillLock> {
        Arc::new(LocalFillLock::default())
    }

    /// Grants the fill of `key`, or a waiter on the fill already running.
    pub(crate) fn acquire(self: &Arc<Self>, key: &CacheKey) -> LockAttempt {
        let mut fills = self.fills.lock().unwrap_or_else(|e| e.into_inner());
        match fills.entry(key.clone()) {
            Entry::Occupied(fill) => LockAttempt::Held(FillWaiter {
                outcome: fill.get().subscribe(),
            }),
            Entry::Vacant(slot) => {
                let (sender, _) = watch::channel(None);
                slot.insert(sender.clone());
                LockAttempt::Acquired(FillPermit {
                    key: key.clone(),
                    sender,
                    lock: Arc::clone(self),
                    done: false,
                })
            }
        }
    }

    /// Grants the fill of `key` only if nobody fills it now (background refreshes).
    pub(crate) fn try_acquire(self: &Arc<Self>, key: &CacheKey) -> Option<FillPermit> {
        match self.acquire(key) {
            LockAttempt::Acquired(permit) => Some(permit),
            LockAttempt::Held(_) => None,
        }
    }

    /// Fills in progress (for metrics and tests).
    pub fn in_progress(&self) -> usize {
        self.fills.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The right, and the duty, to fill one key. End it with [`FillPermit::complete`];
/// dropping it unfinished tells the waiters `HolderFailed`.
pub struct FillPermit {
    key: CacheKey,
    sender: watch::Sender<Option<FillOutcome>>,
    lock: Arc<LocalFillLock>,
    done: bool,
}

impl FillPermit {
    pub(crate) fn key(&self) -> &CacheKey {
        &self.key
    }

    /// Ends the fill and wakes every waiter with `outcome`. Store the entry first.
    pub(crate) fn complete(mut self, outcome: FillOutcome) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: FillOutcome) {
        self.done = true;
        {
            let mut fills = self.lock.fills.lock().unwrap_or_else(|e| e.into_inner());
            if fills
                .get(&self.key)
                .is_some_and(|s| s.same_channel(&self.sender))
            {
                fills.remove(&self.key);
            }
        }
        self.sender.send_replace(Some(outcome));
    }
}

impl Drop for FillPermit {
    fn drop(&mut self) {
        if !self.done {
            self.finish(FillOutcome::HolderFailed);
        }
    }
}

/// A request waiting on another's fill.
pub struct FillWaiter {
    outcome: watch::Receiver<Option<FillOutcome>>,
}

impl FillWaiter {
    /// Waits until the fill ends. Cancel-safe: dropping the future just stops waiting.
    pub(crate) async fn wait(mut self) -> FillOutcome {
        match self.outcome.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(FillOutcome::HolderFailed),
            // The permit is gone without a word; cannot happen (Drop sends) but do not hang.
            Err(_) => FillOutcome::HolderFailed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::PassReason;

    fn key(s: &str) -> CacheKey {
        let route = crate::config::test_route();
        CacheKey::for_request(&route, None, &s.parse().unwrap(), &http::HeaderMap::new())
    }

    #[tokio::test]
    async fn second_attempt_waits_and_sees_the_outcome() {
        let lock = LocalFillLock::new();
        let LockAttempt::Acquired(permit) = lock.acquire(&key("/a")) else {
            panic!("first attempt must acquire")
        };
        let LockAttempt::Held(waiter) = lock.acquire(&key("/a")) else {
            panic!("second attempt must wait")
        };
        assert!(
            lock.try_acquire(&key("/b")).is_some(),
            "other keys are independent"
        );
        let waiting = tokio::spawn(waiter.wait());
        permit.complete(FillOutcome::Uncacheable(PassReason::NoStore));
        assert!(matches!(
            waiting.await.unwrap(),
            FillOutcome::Uncacheable(PassReason::NoStore)
        ));
        assert_eq!(lock.in_progress(), 0);
        assert!(
            lock.try_acquire(&key("/a")).is_some(),
            "the key is free again"
        );
    }

    #[tokio::test]
    async fn dropped_permit_tells_waiters_holder_failed() {
        let lock = LocalFillLock::new();
        let LockAttempt::Acquired(permit) = lock.acquire(&key("/a")) else {
            panic!()
        };
        let LockAttempt::Held(waiter) = lock.acquire(&key("/a")) else {
            panic!()
        };
        let holder = tokio::spawn(async move {
            let _permit = permit;
            std::future::pending::<()>().await;
        });
        holder.abort();
        assert!(matches!(waiter.wait().await, FillOutcome::HolderFailed));
        assert_eq!(lock.in_progress(), 0);
    }

    #[tokio::test]
    async fn waiter_subscribing_before_completion_never_misses_it() {
        let lock = LocalFillLock::new();
        let LockAttempt::Acquired(permit) = lock.acquire(&key("/a")) else {
            panic!()
        };
        let LockAttempt::Held(waiter) = lock.acquire(&key("/a")) else {
            panic!()
        };
        permit.complete(FillOutcome::HolderFailed);
        // Completed before the waiter started waiting: the value is still there.
        assert!(matches!(waiter.wait().await, FillOutcome::HolderFailed));
    }
}
