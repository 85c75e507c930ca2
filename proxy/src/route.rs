//! Route selection: which configured route, and so which upstream and cache policy,
//! serves a request.
//!
//! The most specific match wins, whatever the order in the file: a route naming the
//! request's host beats one for any host, then the longest path prefix wins. Prefixes
//! match whole path segments (`/api` matches `/api` and `/api/x`, not `/apix`).

use std::sync::Arc;

use http::StatusCode;

use crate::config::RouteConfig;
use crate::metrics::RouteMetrics;
use crate::upstream::{FailureKind, Upstream, UpstreamError};

/// A route with what serving it needs at run time.
pub(crate) struct Route {
    pub(crate) config: RouteConfig,
    pub(crate) upstream: Upstream,
    pub(crate) metrics: RouteMetrics,
    /// The key names a forwarding header, which corral rewrites before keying: the
    /// fast path, which keys the client's headers as sent, leaves such routes alone.
    pub(crate) keys_forwarding_headers: bool,
}

impl Route {
    pub(crate) fn new(config: RouteConfig, metrics: RouteMetrics) -> Route {
        Route {
            upstream: Upstream::new(&config),
            keys_forwarding_headers: config
                .key_headers
                .iter()
                .any(crate::http::headers::is_forwarding),
            config,
            metrics,
        }
    }

    /// Counts an upstream failure and logs it (once per outage).
    pub(crate) fn note_upstream_error(&self, err: &UpstreamError) {
        self.metrics.upstream_error(err.kind());
        self.upstream
            .faults
            .failure(&self.config.name, self.upstream.display(), err);
    }

    /// Counts a 5xx as an upstream failure; any other status ends an outage.
    pub(crate) fn note_upstream_status(&self, status: StatusCode) {
        let (name, upstream) = (&self.config.name, self.upstream.display());
        if status.is_server_error() {
            self.metrics.upstream_error(FailureKind::Status);
            self.upstream.faults.failure(name, upstream, &status);
        } else {
            self.upstream.faults.success(name, upstream);
        }
    }
}

/// All routes, ordered most specific first so the first match is the best.
pub(crate) struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub(crate) fn new(mut routes: Vec<Route>) -> RouteTable {
        routes.sort_by(|a, b| {
            let specificity = |r: &Route| (r.config.host.is_some(), r.config.path_prefix.len());
            specificity(b).cmp(&specificity(a))
        });
        RouteTable {
            routes: routes.into_iter().map(Arc::new).collect(),
        }
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
