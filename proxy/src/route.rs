//! Route selection: which configured route, and so which upstream and cache policy,
//! serves a request.
//!
//! The most specific match wins, whatever the order in the file: a route naming the
//! request's host beats one for any host, then the longest path prefix wins. Prefixes
//! match whole path segments (`/api` matches `/api` and `/api/x`, not `/apix`).

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::config::{RouteConfig, UpstreamCaps};
use crate::metrics::{CapMetrics, RouteMetrics};
use crate::redis::Redis;
use crate::upstream::cap::UpstreamCap;
use crate::upstream::fleet_cap::FleetCap;
use crate::upstream::{FailureKind, Upstream, UpstreamError};

/// A route with what serving it needs at run time.
pub(crate) struct Route {
    pub(crate) config: RouteConfig,
    pub(crate) upstream: Upstream,
    pub(crate) metrics: RouteMetrics,
    /// The key names a forwarding header, which corral rewrites before keying: the
    /// fast path, which keys the client's headers as sent, leaves such routes alone.
    pub(crate) keys_forwarding_headers: bool,
    /// The caps on its upstream requests, when it has any.
    cap: Option<Arc<UpstreamCap>>,
}

impl Route {
    /// `redis`: the fleet's, where a fleet cap keeps its leases (each lasting
    /// `lease_ttl` unless renewed). `earlier`: the route of the same name a reload
    /// replaces, whose cap is kept (with the new numbers) when it can take them, so
    /// that the requests it has in flight still count against the new settings.
    pub(crate) fn new(
        config: RouteConfig,
        metrics: RouteMetrics,
        redis: Option<&Arc<Redis>>,
        lease_ttl: Duration,
        earlier: Option<&Route>,
    ) -> Route {
        let kept = earlier.and_then(|r| r.cap.as_ref());
        let cap = config.upstream_caps.map(|caps| {
            let fleet = caps.fleet.is_some() && redis.is_some();
            match kept {
                Some(cap) if cap.fits(fleet) => {
                    cap.set_limits(&effective(caps, redis.is_some()));
                    Arc::clone(cap)
                }
                _ => upstream_cap(&config.name, caps, redis, lease_ttl, metrics.cap.clone()),
            }
        });
        Route {
            upstream: Upstream::new(&config, cap.clone()),
            cap,
            keys_forwarding_headers: config
                .key_headers
                .iter()
                .any(crate::http::headers::is_forwarding),
            config,
            metrics,
        }
    }

    /// Counts an upstream failure and logs it (once per outage). A request the caps
    /// refused never reached the upstream: counted by the cap, not here.
    pub(crate) fn note_upstream_error(&self, err: &UpstreamError) {
        if let UpstreamError::Shed(_) = err {
            return;
        }
        self.metrics.upstream_error(err.kind().as_str());
        self.upstream
            .faults
            .failure(&self.config.name, self.upstream.display(), err);
    }

    /// Counts a 5xx as an upstream failure; any other status ends an outage.
    pub(crate) fn note_upstream_status(&self, status: StatusCode) {
        let (name, upstream) = (&self.config.name, self.upstream.display());
        if status.is_server_error() {
            self.metrics.upstream_error(FailureKind::Status.as_str());
            self.upstream.faults.failure(name, upstream, &status);
        } else {
            self.upstream.faults.success(name, upstream);
        }
    }
}

/// The cap of route `name`: in the fleet when there is one (leases in Redis); without
/// Redis the fleet is this instance, so its share is the fleet's whole cap.
fn upstream_cap(
    name: &str,
    caps: UpstreamCaps,
    redis: Option<&Arc<Redis>>,
    lease_ttl: Duration,
    metrics: CapMetrics,
) -> Arc<UpstreamCap> {
    let fleet = match (caps.fleet, redis) {
        (Some(n), Some(redis)) => Some(FleetCap::new(Arc::clone(redis), name, n, lease_ttl)),
        _ => None,
    };
    UpstreamCap::new(&effective(caps, redis.is_some()), fleet, metrics)
}

/// `caps` as this instance applies them: without Redis, a fleet cap bounds the
/// instance alone.
fn effective(mut caps: UpstreamCaps, fleet_mode: bool) -> UpstreamCaps {
    if let (Some(n), false) = (caps.fleet, fleet_mode) {
        caps.instance = caps.instance.min(n);
    }
    caps
}

/// All routes, ordered most specific first so the first match is the best.
pub(crate) struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub(crate) fn new(mut routes: Vec<Arc<Route>>) -> RouteTable {
        routes.sort_by(|a, b| {
            let specificity = |r: &Route| (r.config.host.is_some(), r.config.path_prefix.len());
            specificity(b).cmp(&specificity(a))
        });
        RouteTable { routes }
    }

    /// The route for `host` (lowercase, without port) and `path`, if any.
    pub(crate) fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| {
            let host_ok = match (&r.config.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want == got,
                (Some(_), None) => false,
            };
            host_ok && prefix_matches(&r.config.path_prefix, path)
        })
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(!prefix_matches("/api/", "/api"));
    }
}
