//! The outage breaker: after a Redis fault, Redis is left alone for `retry_after`, and
//! the outage is logged once when it starts and once when it ends.
//!
//! On a cluster one node's fault is not an outage: the other nodes' slots still answer,
//! and a failover ends it within seconds. There the breaker is per hash slot: a failed
//! command on a key leaves that key's slot alone for `retry_after` (its keys run
//! single-instance meanwhile), and every other slot keeps working. A whole cluster
//! away costs one failed command per slot touched per `retry_after`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::FleetMetrics;

/// Redis Cluster's hash slots.
const SLOTS: usize = 16384;

/// The breaker: after a failure Redis (on a cluster, the failed key's slot) is left
/// alone for `retry_after`.
///
/// Any task may report; `failing` flips once per transition, so exactly one task logs
/// the start and one the end of an outage.
pub(super) struct RedisHealth {
    retry_after: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` before which Redis is not tried.
    open_until_ms: AtomicU64,
    /// On a cluster, the same per slot (`open_until_ms` stays 0).
    slots: Option<Box<[AtomicU64]>>,
    /// Milliseconds since `epoch` of the last failure.
    last_failure_ms: AtomicU64,
    failing: AtomicBool,
    failures: AtomicU64,
}

impl RedisHealth {
    pub(super) fn new(retry_after: Duration, cluster: bool) -> RedisHealth {
        RedisHealth {
            retry_after,
            epoch: Instant::now(),
            open_until_ms: AtomicU64::new(0),
            slots: cluster.then(|| (0..SLOTS).map(|_| AtomicU64::new(0)).collect()),
            last_failure_ms: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            failures: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether Redis as a whole is left alone now (never on a cluster).
    pub(super) fn is_open(&self) -> bool {
        self.now_ms() < self.open_until_ms.load(Ordering::Relaxed)
    }

    /// Whether commands on `slot` are left alone now.
    pub(super) fn is_open_for(&self, slot: Option<u16>) -> bool {
        match (&self.slots, slot) {
            (Some(slots), Some(slot)) => {
                self.now_ms() < slots[usize::from(slot)].load(Ordering::Relaxed)
            }
            _ => self.is_open(),
        }
    }

    /// A command failed (`slot`: its key's, on a cluster).
    pub(super) fn failure(
        &self,
        op: &'static str,
        error: &dyn std::fmt::Display,
        metrics: &FleetMetrics,
        slot: Option<u16>,
    ) {
        let now = self.now_ms();
        let until = now + self.retry_after.as_millis() as u64;
        match (&self.slots, slot) {
            (Some(slots), Some(slot)) => slots[usize::from(slot)].store(until, Ordering::Relaxed),
            // A cluster command without one key (a purge, tag sets): counted only.
            (Some(_), None) => {}
            (None, _) => self.open_until_ms.store(until, Ordering::Relaxed),
        }
        self.last_failure_ms.store(now, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
        metrics.redis_error();
        if !self.failing.swap(true, Ordering::AcqRel) {
            metrics.set_fallback(true);
            if self.slots.is_some() {
                tracing::warn!(op, %error, retry_after = ?self.retry_after, "redis cluster commands failing: the keys of the failing slots run single-instance until they answer again");
            } else {
                tracing::warn!(op, %error, retry_after = ?self.retry_after, "redis unavailable: running single-instance until it answers again");
            }
        }
    }

    /// A command succeeded. On a cluster the outage ends once no command failed for
    /// `retry_after`.
    pub(super) fn success(&self, metrics: &FleetMetrics) {
        if !self.failing.load(Ordering::Relaxed) {
            return;
        }
        if self.slots.is_some() {
            let quiet = self.now_ms() - self.last_failure_ms.load(Ordering::Relaxed);
            if quiet < self.retry_after.as_millis() as u64 {
                return;
            }
        }
        if self.failing.swap(false, Ordering::AcqRel) {
            metrics.set_fallback(false);
            let failures = self.failures.swap(0, Ordering::Relaxed);
            tracing::info!(failures, "redis answers again: fleet mode resumed");
        }
    }
}

/// The hash slot of `key` on a Redis Cluster: CRC16 (XMODEM) of its hash tag.
pub(super) fn slot_of(key: &str) -> u16 {
    let tag = super::commands::hash_tag(key.as_bytes());
    crc16::State::<crc16::XMODEM>::calculate(tag) % SLOTS as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        assert_eq!(slot_of("123456789"), 12739);
    }

    #[test]
    fn on_a_cluster_a_failure_opens_only_its_slot() {
        let metrics = crate::metrics::Metrics::new().fleet.clone();
        let health = RedisHealth::new(Duration::from_secs(60), true);
        health.failure("get", &"down", &metrics, Some(7));
        assert!(health.is_open_for(Some(7)));
        assert!(!health.is_open_for(Some(8)));
        assert!(!health.is_open());
        let single = RedisHealth::new(Duration::from_secs(60), false);
        single.failure("get", &"down", &metrics, Some(7));
        assert!(single.is_open_for(Some(8)) && single.is_open());
    }
}
