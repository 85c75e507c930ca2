//! The outage breaker: after a Redis fault, Redis is left alone for `retry_after`, and
//! the outage is logged once when it starts and once when it ends.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::FleetMetrics;

/// The breaker: after a failure Redis is left alone for `retry_after`.
///
/// Any task may report; `failing` flips once per transition, so exactly one task logs
/// the start and one the end of an outage.
pub(super) struct RedisHealth {
    retry_after: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` before which Redis is not tried.
    open_until_ms: AtomicU64,
    failing: AtomicBool,
    failures: AtomicU64,
}

impl RedisHealth {
    pub(super) fn new(retry_after: Duration) -> RedisHealth {
        RedisHealth {
            retry_after,
            epoch: Instant::now(),
            open_until_ms: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            failures: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(super) fn is_open(&self) -> bool {
        self.now_ms() < self.open_until_ms.load(Ordering::Relaxed)
    }

    pub(super) fn failure(
        &self,
        op: &'static str,
        error: &dyn std::fmt::Display,
        metrics: &FleetMetrics,
    ) {
        self.open_until_ms.store(
            self.now_ms() + self.retry_after.as_millis() as u64,
            Ordering::Relaxed,
        );
        self.failures.fetch_add(1, Ordering::Relaxed);
        metrics.redis_error();
        if !self.failing.swap(true, Ordering::AcqRel) {
            metrics.set_fallback(true);
            tracing::warn!(op, %error, retry_after = ?self.retry_after, "redis unavailable: running single-instance until it answers again");
        }
    }

    pub(super) fn success(&self, metrics: &FleetMetrics) {
        if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::AcqRel) {
            metrics.set_fallback(false);
            let failures = self.failures.swap(0, Ordering::Relaxed);
            tracing::info!(failures, "redis answers again: fleet mode resumed");
        }
    }
}
