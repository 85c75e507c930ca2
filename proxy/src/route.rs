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
    pub config: RouteConfig,
    pub upstream: Upstream,
    pub metrics: RouteMetrics,
}

/// All routes, ordered most specific first so the first match is the best.
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> RouteTable {
        routes.sort_by(|a, b| {
            let specificity = |r: &Route| (r.config.host.is_some(), r.config.path_prefix.len());
            specificity(b).cmp(&specificity(a))
        });
        RouteTable {
            routes: routes.into_iter().map(Arc::new).collect(),
        }
    }

    /// The route for `host` (lowercase, without port) and `path`, if any.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| {
            let host_ok = match (&r.config.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want == got,
                (Some(_), None) => false,
            };
            host_ok && prefix_matches(&r.config.path_prefix, path)
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// The request's host, lowercase and without port: from the URI when absolute-form or
/// HTTP/2, else from the `Host` header.
pub fn request_host(uri: &http::Uri, headers: &http::HeaderMap) -> Option<String> {
    let raw = match uri.host() {
        Some(h) => h,
        None => headers.get(http::header::HOST)?.to_str().ok()?,
    };
    let host = if raw.starts_with('[') {
        // An IPv6 literal keeps its colons inside the brackets.
        raw.split_inclusive(']').next().unwrap_or(raw)
    } else {
        raw.rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map_or(raw, |(h, _)| h)
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
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

    fn host_of(req: &http::Request<()>) -> Option<String> {
        request_host(req.uri(), req.headers())
    }

    #[test]
    fn host_is_lowercased_without_port() {
        let req = |host: &str| {
            http::Request::builder()
                .uri("/")
                .header("host", host)
                .body(())
                .unwrap()
        };
        assert_eq!(
            host_of(&req("Example.COM:8080")).as_deref(),
            Some("example.com")
        );
        assert_eq!(host_of(&req("example.com")).as_deref(), Some("example.com"));
        assert_eq!(host_of(&req("[::1]:80")).as_deref(), Some("[::1]"));
    }
}
