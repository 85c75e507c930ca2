//! Route selection: which configured route, and so which upstream and cache policy,
//! serves a request.
//!
//! The most specific match wins, whatever the order in the file: a route naming the
//! request's host beats one for any host, then the longest path prefix wins. Prefixes
//! match whole path segments (`/api` matches `/api` and `/api/x`, not `/apix`).

use std::sync::Arc;

use crate::config::RouteConfig;
use crate::metrics::RouteMetrics;
use crate::upstream::Upstream;

/// A route with what serving it needs at run time.
pub struct Route {
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
            keys_forwarding_headers: config.key_headers.iter().any(crate::headers::is_forwarding),
            config,
            metrics,
        }
    }
}

/// All routes, ordered most specific first so the first match is the best.
pub struct RouteTable {
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
