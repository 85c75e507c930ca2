//! Prometheus metrics: what each route served and how, what reached the upstream, and
//! how full the local cache is. Served as text on the admin listener.
//!
//! Per-route counters are created once when the route is built, so counting a request
//! is an atomic add: no label lookup or allocation on the request path. The families
//! live by what they count: per route (`route`), fleet mode (`fleet`), client
//! connections (`connection`); this module holds the registry they are registered in.

mod connection;
mod fleet;
mod route;

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub(crate) use connection::ConnectionMetrics;
pub use fleet::FleetMetrics;
#[cfg(test)]
pub(crate) use route::FAILURE_KINDS;
pub(crate) use route::{CapMetrics, RouteMetrics, UpstreamReason};
use route::{RouteFamilies, RouteLabel};

/// The registry and the metric families.
pub struct Metrics {
    registry: Mutex<Registry>,
    routes: RouteFamilies,
    cache: CacheGauges,
    tags_dropped: Family<RouteLabel, Counter>,
    pub(crate) fleet: FleetMetrics,
    pub(crate) connections: ConnectionMetrics,
    /// Access-log lines dropped because the writer fell behind.
    pub(crate) access_log_dropped: Counter,
}

/// The local cache's size and the fills in progress, set when the metrics are read.
#[derive(Default)]
struct CacheGauges {
    bytes: Gauge<u64, AtomicU64>,
    entries: Gauge<u64, AtomicU64>,
    fills_in_progress: Gauge<u64, AtomicU64>,
}

impl CacheGauges {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "cache_bytes",
            "Bytes held by the local cache",
            self.bytes.clone(),
        );
        registry.register(
            "cache_entries",
            "Objects held by the local cache",
            self.entries.clone(),
        );
        registry.register(
            "fills_in_progress",
            "Keys being fetched from the upstream now",
            self.fills_in_progress.clone(),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        // Families appear in the text in the order they are registered here.
        let mut registry = Registry::with_prefix("corral");
        let routes = RouteFamilies::default();
        routes.register(&mut registry);
        let cache = CacheGauges::default();
        cache.register(&mut registry);
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
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer fell behind (never waited for)",
            access_log_dropped.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            routes,
            cache,
            tags_dropped,
            fleet,
            connections,
            access_log_dropped,
        }
    }

    /// The counter of purge tags dropped from `route`'s stored responses.
    pub(crate) fn tags_dropped(&self, route: &str) -> Counter {
        let label = RouteLabel {
            route: route.to_string(),
        };
        self.tags_dropped.get_or_create(&label).clone()
    }

    pub(crate) fn for_route(&self, route: &str) -> RouteMetrics {
        self.routes.for_route(route)
    }

    /// The metrics in the Prometheus/OpenMetrics text format, with the cache gauges
    /// set to the given current values first.
    pub(crate) fn encode(
        &self,
        cache_bytes: u64,
        cache_entries: u64,
        fills_in_progress: u64,
    ) -> String {
        self.cache.bytes.set(cache_bytes);
        self.cache.entries.set(cache_entries);
        self.cache.fills_in_progress.set(fills_in_progress);
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
    use crate::http::cache_status::Served;

    #[test]
    fn routes_get_every_series_and_counts_show_in_the_text() {
        let metrics = Metrics::new();
        let a = metrics.for_route("a");
        let _b = metrics.for_route("b");
        a.served(Served::StaleIfError);
        a.upstream_error("timeout");
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
