//! Per-route metrics: the families labelled by route, and the counters each route is
//! handed once when it is built.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::http::cache_status::Served;

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
pub(super) struct RouteLabel {
    pub(super) route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    route: String,
    kind: &'static str,
}

/// Why a request went to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamReason {
    /// A miss, fetched to fill the cache.
    Fill,
    /// A stale entry, revalidated or refetched while clients wait.
    Revalidate,
    /// A stale entry refreshed in the background (stale-while-revalidate).
    Refresh,
    /// A fresh entry refreshed in the background before it expires (early refresh).
    EarlyRefresh,
    /// Not cacheable: forwarded as is.
    Pass,
}

impl UpstreamReason {
    const ALL: [UpstreamReason; 5] = [
        UpstreamReason::Fill,
        UpstreamReason::Revalidate,
        UpstreamReason::Refresh,
        UpstreamReason::EarlyRefresh,
        UpstreamReason::Pass,
    ];

    fn as_str(self) -> &'static str {
        match self {
            UpstreamReason::Fill => "fill",
            UpstreamReason::Revalidate => "revalidate",
            UpstreamReason::Refresh => "refresh",
            UpstreamReason::EarlyRefresh => "early-refresh",
            UpstreamReason::Pass => "pass",
        }
    }
}

/// The upstream failures counted, by their labels (`upstream::FailureKind::as_str` of
/// the kinds that reached the upstream; a test there checks each is here). Labels, not
/// the enum: the upstream layer counts into metrics, so metrics must not depend on it.
pub(crate) const FAILURE_KINDS: [&str; 4] = ["connect", "timeout", "protocol", "status"];

/// Why the caps refused a request, by label.
const SHED_REASONS: [&str; 2] = ["queue-full", "queue-timeout"];

/// The families labelled by route, registered once; each route takes its counters
/// from them ([`RouteFamilies::for_route`]).
#[derive(Default)]
pub(super) struct RouteFamilies {
    requests: Family<RequestLabels, Counter>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    coalesced_waiters: Family<RouteLabel, Counter>,
    wait_timeouts: Family<RouteLabel, Counter>,
    early_refreshes: Family<RouteLabel, Counter>,
    stale_served: Family<UpstreamLabels, Counter>,
    upstream_errors: Family<ErrorLabels, Counter>,
    caps: CapFamilies,
}

/// The upstream caps' families (`upstream_concurrency`, `fleet_upstream_concurrency`).
#[derive(Default)]
struct CapFamilies {
    in_flight: Family<RouteLabel, Gauge>,
    queued: Family<RouteLabel, Gauge>,
    shed: Family<UpstreamLabels, Counter>,
    unleased: Family<RouteLabel, Counter>,
    leases_lost: Family<RouteLabel, Counter>,
}

impl RouteFamilies {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "requests",
            "Client requests by route and cache status",
            self.requests.clone(),
        );
        registry.register(
            "upstream_requests",
            "Requests sent to the upstream, by route and reason",
            self.upstream_requests.clone(),
        );
        registry.register(
            "coalesced_waiters",
            "Requests that waited on another request's fetch instead of going upstream",
            self.coalesced_waiters.clone(),
        );
        registry.register(
            "wait_timeouts",
            "Waiters that gave up on another request's fetch after the route's wait_timeout",
            self.wait_timeouts.clone(),
        );
        registry.register(
            "early_refreshes",
            "Early refreshes started by hits before their entry expired, at most one per cached copy (each fetches, adopts a newer entry another instance stored, or leaves the key to the instance refreshing it)",
            self.early_refreshes.clone(),
        );
        registry.register(
            "stale_served",
            "Responses served from a stale entry, by route and reason",
            self.stale_served.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures by route and kind",
            self.upstream_errors.clone(),
        );
        let caps = &self.caps;
        registry.register(
            "upstream_in_flight",
            "Requests in flight to a capped route's upstream from this instance",
            caps.in_flight.clone(),
        );
        registry.register(
            "upstream_queued",
            "Requests waiting for a slot under a route's upstream caps",
            caps.queued.clone(),
        );
        registry.register(
            "upstream_shed",
            "Requests refused a slot under a route's upstream caps, by reason (queue-full, queue-timeout)",
            caps.shed.clone(),
        );
        registry.register(
            "upstream_unleased",
            "Requests let through without a fleet lease because Redis was unavailable (each instance then keeps to its own cap)",
            caps.unleased.clone(),
        );
        registry.register(
            "upstream_leases_lost",
            "Fleet leases that lapsed while their requests were still in flight",
            caps.leases_lost.clone(),
        );
    }

    pub(super) fn for_route(&self, route: &str) -> RouteMetrics {
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
                            kind: k,
                        },
                    )
                })
                .collect(),
            waiters: counter(&self.coalesced_waiters, label()),
            wait_timeouts: counter(&self.wait_timeouts, label()),
            early_refreshes: counter(&self.early_refreshes, label()),
            stale_swr: counter(
                &self.stale_served,
                by_reason(Served::StaleWhileRevalidate.as_str()),
            ),
            stale_sie: counter(&self.stale_served, by_reason(Served::StaleIfError.as_str())),
            cap: CapMetrics {
                in_flight: self.caps.in_flight.get_or_create(&label()).clone(),
                queued: self.caps.queued.get_or_create(&label()).clone(),
                queue_full: counter(&self.caps.shed, by_reason(SHED_REASONS[0])),
                queue_timeout: counter(&self.caps.shed, by_reason(SHED_REASONS[1])),
                unleased: counter(&self.caps.unleased, label()),
                leases_lost: counter(&self.caps.leases_lost, label()),
            },
        }
    }
}

/// One route's counters, ready to increment.
#[derive(Clone)]
pub(crate) struct RouteMetrics {
    served: Vec<Counter>,
    upstream: Vec<Counter>,
    errors: Vec<Counter>,
    waiters: Counter,
    wait_timeouts: Counter,
    early_refreshes: Counter,
    stale_swr: Counter,
    stale_sie: Counter,
    pub(crate) cap: CapMetrics,
}

/// One route's upstream cap counters.
#[derive(Clone)]
pub(crate) struct CapMetrics {
    pub(crate) in_flight: Gauge,
    pub(crate) queued: Gauge,
    queue_full: Counter,
    queue_timeout: Counter,
    unleased: Counter,
    leases_lost: Counter,
}

impl CapMetrics {
    /// The queue was full.
    pub(crate) fn queue_full(&self) {
        self.queue_full.inc();
    }

    /// No slot came free within the queue timeout.
    pub(crate) fn queue_timeout(&self) {
        self.queue_timeout.inc();
    }

    pub(crate) fn unleased(&self, n: usize) {
        self.unleased.inc_by(n as u64);
    }

    pub(crate) fn leases_lost(&self, n: usize) {
        self.leases_lost.inc_by(n as u64);
    }
}

impl RouteMetrics {
    pub(crate) fn served(&self, served: Served) {
        self.served[served as usize].inc();
        if served == Served::StaleWhileRevalidate {
            self.stale_swr.inc();
        } else if served == Served::StaleIfError {
            self.stale_sie.inc();
        }
    }

    pub(crate) fn wait_timeout(&self) {
        self.wait_timeouts.inc();
    }

    pub(crate) fn upstream_request(&self, reason: UpstreamReason) {
        self.upstream[reason as usize].inc();
    }

    /// An upstream failure, by its label (one of [`FAILURE_KINDS`]).
    pub(crate) fn upstream_error(&self, kind: &str) {
        if let Some(i) = FAILURE_KINDS.iter().position(|k| *k == kind) {
            self.errors[i].inc();
        }
    }

    pub(crate) fn early_refresh(&self) {
        self.early_refreshes.inc();
    }

    pub(crate) fn coalesced_waiter(&self) {
        self.waiters.inc();
    }
}
