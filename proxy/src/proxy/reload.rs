//! The part of the proxy a reload replaces ([`Current`]), and how a new config's routes
//! replace the old: unchanged routes are kept as they are (their upstream connections,
//! caps and counters), changed and new ones are built, and the local entries of removed
//! or changed routes are dropped.
//!
//! Requests read `Current` once, as they start: a request in flight finishes with the
//! routes it started with, the next one on the same connection gets the new ones.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{AdminToken, Config};
use crate::metrics::Metrics;
use crate::redis::Redis;
use crate::route::{Route, RouteTable};

use super::Proxy;

/// What a reload changes in place, read by each request.
pub(crate) struct Current {
    pub(crate) routes: RouteTable,
    /// Peers whose forwarding headers are kept.
    pub(crate) trusted_proxies: Vec<ipnet::IpNet>,
    /// What `POST /purge` requires (server/admin.rs).
    pub(crate) admin_token: Option<AdminToken>,
    /// `[limits] body_timeout`: how long a forwarded body may wait on its client.
    pub(crate) body_timeout: Duration,
}

impl Current {
    pub(super) fn new(config: &Config, routes: Vec<Arc<Route>>) -> Current {
        Current {
            routes: RouteTable::new(routes),
            trusted_proxies: config.trusted_proxies.clone(),
            admin_token: config.admin_token.clone(),
            body_timeout: config.limits.body_timeout,
        }
    }
}

/// What builds a route's run-time parts: the fleet's Redis (fleet caps keep their
/// leases there) and the lease lifetime.
pub(super) struct RouteBuilder {
    pub(super) redis: Option<Arc<Redis>>,
    pub(super) lease_ttl: Duration,
}

impl RouteBuilder {
    /// The route for `config`; `earlier`: the one of that name it replaces.
    pub(super) fn build(
        &self,
        config: &crate::config::RouteConfig,
        metrics: &Metrics,
        earlier: Option<&Route>,
    ) -> Route {
        let route_metrics = metrics.for_route(&config.name);
        Route::new(
            config.clone(),
            route_metrics,
            self.redis.as_ref(),
            self.lease_ttl,
            earlier,
        )
    }
}

/// What a reload did to the routes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoutesReloaded {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// Entries dropped from the local tier (those of changed and removed routes).
    pub entries_dropped: usize,
}

impl Proxy {
    /// Applies `config`'s routes, trusted proxies, admin token and body timeout. A
    /// route whose settings are all unchanged is kept as it is; one whose settings
    /// changed is built anew (a new upstream client and caps; requests in flight finish
    /// on the old one). When a route's caching settings changed its keys changed with
    /// them (`RouteConfig::cache_scope`), so its entries in Redis are not served under
    /// the new settings; its local entries, and those of removed routes, are dropped.
    ///
    /// Settings this cannot change (listeners, workers, the cache's size, Redis, the
    /// lock) are the caller's to report: see `server::reload`, which also runs reloads
    /// one at a time (two at once could retire each other's scopes).
    pub(crate) async fn reload_routes(&self, config: &Config) -> RoutesReloaded {
        let old = self.current.load_full();
        let mut report = RoutesReloaded::default();
        let mut routes = Vec::with_capacity(config.routes.len());
        for rc in &config.routes {
            match old.routes.iter().find(|r| r.config.name == rc.name) {
                Some(route) if route.config == *rc => routes.push(Arc::clone(route)),
                found => {
                    let list = if found.is_some() {
                        &mut report.changed
                    } else {
                        &mut report.added
                    };
                    list.push(rc.name.clone());
                    let route = self
                        .route_builder
                        .build(rc, &self.metrics, found.map(|r| &**r));
                    routes.push(Arc::new(route));
                }
            }
        }
        report.removed = old
            .routes
            .iter()
            .filter(|r| !config.routes.iter().any(|rc| rc.name == r.config.name))
            .map(|r| r.config.name.clone())
            .collect();
        // Rules first: an entry stored under a new scope finds its tags to index.
        self.cache()
            .local()
            .tag_rules()
            .add_routes(&config.routes, &self.metrics);
        let live: HashSet<&str> = routes.iter().map(|r| r.config.cache_scope()).collect();
        let local = self.cache().local().clone();
        let mut retired: HashSet<String> = HashSet::clone(&local.retired_scopes());
        retired.extend(
            old.routes
                .iter()
                .map(|r| r.config.cache_scope().to_string()),
        );
        retired.retain(|scope| !live.contains(scope.as_str()));
        let changes = !(report.changed.is_empty() && report.removed.is_empty());
        self.current.store(Arc::new(Current::new(config, routes)));
        drop(old);
        if changes {
            let sweep = move || local.retire_scopes(retired);
            report.entries_dropped = tokio::task::spawn_blocking(sweep).await.unwrap_or(0);
        }
        report
    }
}
