//! Prometheus metrics: what each route served and how, what reached the upstream, and
//! how full the local cache is. Served as text on the admin listener.
//!
//! Per-route counters are created once when the route is built, so counting a request
//! is an atomic add: no label lookup or allocation on the request path.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::http::cache_status::Served;
use crate::upstream::FailureKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    cache_status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    route: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Why a value read from the shared tier was not served: the decoder's reasons
/// (`DecodeError::reason` in the cache codec), a key holding another Redis type,
/// and a value too large to read.
pub const UNREADABLE_REASONS: [&str; 8] = [
    "foreign",
    "version",
    "corrupt",
    "other-key",
    "too-large",
    "unframeable",
    "wrong-type",
    "oversized",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    route: String,
    kind: &'static str,
}

/// Why a request went to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamReason {
    /// A miss, fetched to fill the cache.
    Fill,
    /// A stale entry, revalidated or refetched while clients wait.
    Revalidate,
    /// A stale entry refreshed in the background (stale-while-revalidate).
    Refresh,
    /// Not cacheable: forwarded as is.
    Pass,
}

impl UpstreamReason {
    const ALL: [UpstreamReason; 4] = [
        UpstreamReason::Fill,
        UpstreamReason::Revalidate,
        UpstreamReason::Refresh,
        UpstreamReason::Pass,
    ];

    fn as_str(self) -> &'static str {
        match self {
            UpstreamReason::Fill => "fill",
            UpstreamReason::Revalidate => "revalidate",
            UpstreamReason::Refresh => "refresh",
            UpstreamReason::Pass => "pass",
        }
    }
}

const FAILURE_KINDS: [FailureKind; 4] = [
    FailureKind::Connect,
    FailureKind::Timeout,
    FailureKind::Protocol,
    FailureKind::Status,
];

/// The registry and the metric families.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    coalesced_waiters: Family<RouteLabel, Counter>,
    wait_timeouts: Family<RouteLabel, Counter>,
    stale_served: Family<UpstreamLabels, Counter>,
    upstream_errors: Family<ErrorLabels, Counter>,
    cache_bytes: Gauge<u64, AtomicU64>,
    cache_entries: Gauge<u64, AtomicU64>,
    fills_in_progress: Gauge<u64, AtomicU64>,
    tags_dropped: Family<RouteLabel, Counter>,
    pub fleet: FleetMetrics,
    pub connections: ConnectionMetrics,
}

/// Client connections: how many are open, and why some (or their requests) were refused
/// or cut off.
#[derive(Clone, Default)]
pub struct ConnectionMetrics {
    open: Gauge,
    refused: Counter,
    requests_refused: Counter,
    idle_closed: Counter,
    send_timeouts: Counter,
    client_aborts: Counter,
    accept_errors: Counter,
}

impl ConnectionMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "client_connections",
            "Client connections open on the proxy port",
            self.open.clone(),
        );
        let counters = [
            (
                "requests_refused",
                "Client requests refused (503) because max_requests were in progress",
                &self.requests_refused,
            ),
            (
                "connections_refused",
                "Client connections refused (503) because max_connections were open",
                &self.refused,
            ),
            (
                "connections_idle_closed",
                "Client connections closed after idle_timeout with no request in progress",
                &self.idle_closed,
            ),
            (
                "send_timeouts",
                "Client connections reset because a write made no progress for send_timeout",
                &self.send_timeouts,
            ),
            (
                "client_aborts",
                "Requests dropped because their client left before the response (nginx's 499)",
                &self.client_aborts,
            ),
            (
                "accept_errors",
                "Failed accepts on the proxy port (out of file descriptors and the like)",
                &self.accept_errors,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
    }

    pub fn opened(&self) {
        self.open.inc();
    }
    pub fn closed(&self) {
        self.open.dec();
    }
    pub fn refused(&self) {
        self.refused.inc();
    }
    pub fn request_refused(&self) {
        self.requests_refused.inc();
    }
    pub fn idle_closed(&self) {
        self.idle_closed.inc();
    }
    pub fn send_timeout(&self) {
        self.send_timeouts.inc();
    }
    pub fn client_abort(&self) {
        self.client_aborts.inc();
    }
    pub fn accept_error(&self) {
        self.accept_errors.inc();
    }
}

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
    fallback: Gauge,
    /// Seconds from a fill's event being published to a waiter in another instance
    /// having the entry.
    wake_latency: Histogram,
}

impl FleetMetrics {
    fn new() -> FleetMetrics {
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
            fallback: Gauge::default(),
            // 0.25 ms to ~4 s.
            wake_latency: Histogram::new(exponential_buckets(0.00025, 2.0, 15)),
        }
    }

    fn register(&self, registry: &mut Registry) {
        let counters = [
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
        ];
        for (name, help, counter) in counters {
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

    pub fn lock_acquired(&self) {
        self.lock_acquired.inc();
    }
    pub fn lock_contended(&self) {
        self.lock_contended.inc();
    }
    pub fn lock_extended(&self) {
        self.lock_extended.inc();
    }
    pub fn lock_lost(&self) {
        self.lock_lost.inc();
    }
    pub fn lock_takeover(&self) {
        self.lock_takeovers.inc();
    }
    pub fn lock_no_quorum(&self) {
        self.lock_no_quorum.inc();
    }
    pub fn shared_hit(&self) {
        self.shared_hits.inc();
    }
    pub fn fenced_write(&self) {
        self.fenced_writes.inc();
    }
    pub fn redis_error(&self) {
        self.redis_errors.inc();
    }
    /// A value under an entry key was not served; `reason` is one of
    /// [`UNREADABLE_REASONS`].
    pub fn shared_unreadable(&self, reason: &'static str) {
        self.shared_unreadable
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
    pub fn event_ignored(&self) {
        self.events_ignored.inc();
    }
    pub fn set_fallback(&self, on: bool) {
        self.fallback.set(i64::from(on));
    }
    pub fn wake_latency(&self, seconds: f64) {
        self.wake_latency.observe(seconds);
    }
}

/// One route's counters, ready to increment.
#[derive(Clone)]
pub struct RouteMetrics {
    served: Vec<Counter>,
    upstream: Vec<Counter>,
    errors: Vec<Counter>,
    waiters: Counter,
    wait_timeouts: Counter,
    stale_swr: Counter,
    stale_sie: Counter,
}

impl RouteMetrics {
    pub fn served(&self, served: Served) {
        self.served[served as usize].inc();
        if served == Served::StaleWhileRevalidate {
            self.stale_swr.inc();
        } else if served == Served::StaleIfError {
            self.stale_sie.inc();
        }
    }

    pub fn wait_timeout(&self) {
        self.wait_timeouts.inc();
    }

    pub fn upstream_request(&self, reason: UpstreamReason) {
        self.upstream[reason as usize].inc();
    }

    pub fn upstream_error(&self, kind: FailureKind) {
        let i = FAILURE_KINDS.iter().position(|k| *k == kind).unwrap_or(0);
        self.errors[i].inc();
    }

    pub fn coalesced_waiter(&self) {
        self.waiters.inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("corral");
        let requests = Family::<RequestLabels, Counter>::default();
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        let coalesced_waiters = Family::<RouteLabel, Counter>::default();
        let wait_timeouts = Family::<RouteLabel, Counter>::default();
        let stale_served = Family::<UpstreamLabels, Counter>::default();
        let upstream_errors = Family::<ErrorLabels, Counter>::default();
        let cache_bytes = Gauge::<u64, AtomicU64>::default();
        let cache_entries = Gauge::<u64, AtomicU64>::default();
        let fills_in_progress = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "requests",
            "Client requests by route and cache status",
            requests.clone(),
        );
        registry.register(
            "upstream_requests",
            "Requests sent to the upstream, by route and reason",
            upstream_requests.clone(),
        );
        registry.register(
            "coalesced_waiters",
            "Requests that waited on another request's fetch instead of going upstream",
            coalesced_waiters.clone(),
        );
        registry.register(
            "wait_timeouts",
            "Waiters that gave up on another request's fetch after the route's wait_timeout",
            wait_timeouts.clone(),
        );
        registry.register(
            "stale_served",
            "Responses served from a stale entry, by route and reason",
            stale_served.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures by route and kind",
            upstream_errors.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes held by the local cache",
            cache_bytes.clone(),
        );
        registry.register(
            "cache_entries",
            "Objects held by the local cache",
            cache_entries.clone(),
        );
        registry.register(
            "fills_in_progress",
            "Keys being fetched from the upstream now",
            fills_in_progress.clone(),
        );
        let tags_dropped = Family::<RouteLabel, Counter>::default();
        registry.register(
            "tags_dropped",
            "Purge tags dropped from stored responses (past the route's max_tags, or too long)",
            tags_dropped.clone(),
        );
        let fleet = FleetMetrics::new();
        fleet.register(&mut registry);
        let connections = ConnectionMetrics::default();
        connections.register(&mut registry);
        Metrics {
            tags_dropped,
            fleet,
            connections,
            registry: Mutex::new(registry),
            requests,
            upstream_requests,
            coalesced_waiters,
            wait_timeouts,
            stale_served,
            upstream_errors,
            cache_bytes,
            cache_entries,
            fills_in_progress,
        }
    }

    /// The counter of purge tags dropped from `route`'s stored responses.
    pub fn tags_dropped(&self, route: &str) -> Counter {
        let label = RouteLabel {
            route: route.to_string(),
        };
        self.tags_dropped.get_or_create(&label).clone()
    }

    pub fn for_route(&self, route: &str) -> RouteMetrics {
        // One statement per counter: `get_or_create` returns a read guard on the family,
        // and a second call on the same family while it lives would deadlock on insert.
        fn counter<
            L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
        >(
            family: &Family<L, Counter>,
            labels: L,
        ) -> Counter {
            family.get_or_create(&labels).clone()
        }
        let route = route.to_string();
        let label = || RouteLabel {
            route: route.clone(),
        };
        let by_reason = |reason| UpstreamLabels {
            route: route.clone(),
            reason,
        };
        RouteMetrics {
            served: Served::ALL
                .iter()
                .map(|s| {
                    let labels = RequestLabels {
                        route: route.clone(),
                        cache_status: s.as_str(),
                    };
                    counter(&self.requests, labels)
                })
                .collect(),
            upstream: UpstreamReason::ALL
                .iter()
                .map(|r| counter(&self.upstream_requests, by_reason(r.as_str())))
                .collect(),
            errors: FAILURE_KINDS
                .iter()
                .map(|k| {
                    counter(
                        &self.upstream_errors,
                        ErrorLabels {
                            route: route.clone(),
                            kind: k.as_str(),
                        },
                    )
                })
                .collect(),
            waiters: counter(&self.coalesced_waiters, label()),
            wait_timeouts: counter(&self.wait_timeouts, label()),
            stale_swr: counter(
                &self.stale_served,
                by_reason(Served::StaleWhileRevalidate.as_str()),
            ),
            stale_sie: counter(&self.stale_served, by_reason(Served::StaleIfError.as_str())),
        }
    }

    /// The metrics in the Prometheus/OpenMetrics text format, with the cache gauges
    /// set to the given current values first.
    pub fn encode(&self, cache_bytes: u64, cache_entries: u64, fills_in_progress: u64) -> String {
        self.cache_bytes.set(cache_bytes);
        self.cache_entries.set(cache_entries);
        self.fills_in_progress.set(fills_in_progress);
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_get_every_series_and_counts_show_in_the_text() {
        let metrics = Metrics::new();
        let a = metrics.for_route("a");
        let _b = metrics.for_route("b");
        a.served(Served::StaleIfError);
        a.upstream_error(FailureKind::Timeout);
        let text = metrics.encode(10, 1, 0);
        assert!(
            text.contains("corral_requests_total{route=\"a\",cache_status=\"stale-if-error\"} 1"),
            "{text}"
        );
        assert!(text.contains("corral_stale_served_total{route=\"a\",reason=\"stale-if-error\"} 1"));
        assert!(text.contains("corral_upstream_errors_total{route=\"a\",kind=\"timeout\"} 1"));
        assert!(text.contains("corral_requests_total{route=\"b\",cache_status=\"hit\"} 0"));
        assert!(text.contains("corral_cache_bytes 10"));
    }
}
