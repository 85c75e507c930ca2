//! Fleet mode's counters: the distributed lock, the shared tier and Redis faults.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Why a value read from the shared tier was not served: the decoder's reasons
/// (`DecodeError::reason` in the cache codec), a key holding another Redis type,
/// and a value too large to read.
const UNREADABLE_REASONS: [&str; 8] = [
    "foreign",
    "version",
    "corrupt",
    "other-key",
    "too-large",
    "unframeable",
    "wrong-type",
    "oversized",
];

/// Fleet mode's counters: the distributed lock, the shared tier and Redis faults.
#[derive(Clone)]
pub struct FleetMetrics {
    lock_acquired: Counter,
    lock_contended: Counter,
    lock_extended: Counter,
    lock_lost: Counter,
    lock_takeovers: Counter,
    lock_no_quorum: Counter,
    shared_hits: Counter,
    fenced_writes: Counter,
    redis_errors: Counter,
    /// Values under corral's entry keys that were not served, by reason.
    shared_unreadable: Family<ReasonLabel, Counter>,
    /// Messages on the event channel that were not corral's and were ignored.
    events_ignored: Counter,
    /// Event messages this instance received (fills, purges; malformed ones too).
    events_received: Counter,
    /// Requests to the cache's Redis (one per command, pipeline or script call: each is
    /// one round trip), subscriptions excluded.
    redis_round_trips: Counter,
    fallback: Gauge,
    /// Seconds from a fill's event being published to a waiter in another instance
    /// having the entry.
    wake_latency: Histogram,
}

impl FleetMetrics {
    pub(super) fn new() -> FleetMetrics {
        FleetMetrics {
            lock_acquired: Counter::default(),
            lock_contended: Counter::default(),
            lock_extended: Counter::default(),
            lock_lost: Counter::default(),
            lock_takeovers: Counter::default(),
            lock_no_quorum: Counter::default(),
            shared_hits: Counter::default(),
            fenced_writes: Counter::default(),
            redis_errors: Counter::default(),
            shared_unreadable: Family::default(),
            events_ignored: Counter::default(),
            events_received: Counter::default(),
            redis_round_trips: Counter::default(),
            fallback: Gauge::default(),
            // 0.25 ms to ~4 s.
            wake_latency: Histogram::new(exponential_buckets(0.00025, 2.0, 15)),
        }
    }

    /// Every plain counter: name, help, counter.
    fn counters(&self) -> [(&'static str, &'static str, &Counter); 12] {
        [
            (
                "lock_acquired",
                "Fleet fill locks granted to this instance",
                &self.lock_acquired,
            ),
            (
                "lock_contended",
                "Fleet fill lock attempts that found the lock held",
                &self.lock_contended,
            ),
            (
                "lock_extended",
                "Fleet fill lock leases extended during slow fetches",
                &self.lock_extended,
            ),
            (
                "lock_lost",
                "Fleet fill lock leases found lost when extending",
                &self.lock_lost,
            ),
            (
                "lock_takeovers",
                "Fills taken over after another instance's lock expired",
                &self.lock_takeovers,
            ),
            (
                "lock_no_quorum",
                "Redlock acquisitions that found no majority of lock nodes reachable",
                &self.lock_no_quorum,
            ),
            (
                "shared_hits",
                "Entries read from the shared (Redis) tier",
                &self.shared_hits,
            ),
            (
                "fenced_writes",
                "Shared-tier writes refused because a newer lock grant exists",
                &self.fenced_writes,
            ),
            (
                "redis_errors",
                "Redis commands that failed or timed out",
                &self.redis_errors,
            ),
            (
                "fleet_events_ignored",
                "Messages on the fleet event channel that were malformed and ignored",
                &self.events_ignored,
            ),
            (
                "fleet_events_received",
                "Fleet event messages this instance received (fill and purge events)",
                &self.events_received,
            ),
            (
                "redis_round_trips",
                "Requests sent to the cache's Redis: commands, pipelines and script calls",
                &self.redis_round_trips,
            ),
        ]
    }

    pub(super) fn register(&self, registry: &mut Registry) {
        for (name, help, counter) in self.counters() {
            registry.register(name, help, counter.clone());
        }
        for reason in UNREADABLE_REASONS {
            // Every series exists from the start, at 0.
            let _ = self
                .shared_unreadable
                .get_or_create(&ReasonLabel { reason });
        }
        registry.register(
            "shared_unreadable",
            "Values under shared-tier entry keys treated as misses, by reason",
            self.shared_unreadable.clone(),
        );
        registry.register(
            "redis_fallback",
            "1 while Redis is unavailable and this instance runs alone",
            self.fallback.clone(),
        );
        registry.register(
            "fleet_wake_latency_seconds",
            "From a fill's event to a waiting instance holding the entry",
            self.wake_latency.clone(),
        );
    }

    pub(crate) fn lock_acquired(&self) {
        self.lock_acquired.inc();
    }
    pub(crate) fn lock_contended(&self) {
        self.lock_contended.inc();
    }
    pub(crate) fn lock_extended(&self) {
        self.lock_extended.inc();
    }
    pub(crate) fn lock_lost(&self) {
        self.lock_lost.inc();
    }
    pub(crate) fn lock_takeover(&self) {
        self.lock_takeovers.inc();
    }
    pub(crate) fn lock_no_quorum(&self) {
        self.lock_no_quorum.inc();
    }
    pub(crate) fn shared_hit(&self) {
        self.shared_hits.inc();
    }
    pub(crate) fn fenced_write(&self) {
        self.fenced_writes.inc();
    }
    pub(crate) fn redis_error(&self) {
        self.redis_errors.inc();
    }
    /// A value under an entry key was not served; `reason` is one of
    /// [`UNREADABLE_REASONS`].
    pub(crate) fn shared_unreadable(&self, reason: &'static str) {
        self.shared_unreadable
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
    pub(crate) fn event_ignored(&self) {
        self.events_ignored.inc();
    }
    pub(crate) fn event_received(&self) {
        self.events_received.inc();
    }
    pub(crate) fn redis_round_trip(&self) {
        self.redis_round_trips.inc();
    }
    pub(crate) fn set_fallback(&self, on: bool) {
        self.fallback.set(i64::from(on));
    }
    pub(crate) fn wake_latency(&self, seconds: f64) {
        self.wake_latency.observe(seconds);
    }
}
