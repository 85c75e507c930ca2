//! Reloading a running server with a new config (`SIGHUP`, see the binary): routes,
//! upstreams, cache policy, trusted proxies, the admin token and the limits change in
//! place, without dropping a connection or the cache; settings a running process cannot
//! change are reported and keep their running values.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;

use super::{accept, Http, RunningServer};
use crate::config::{Config, ConfigError};
use crate::proxy::RoutesReloaded;

/// What a reload did. (With `[tls]`, the certificate and key files are read again and
/// used for new connections, whether or not their paths changed.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub routes: RoutesReloaded,
    /// The settings that differ from the running ones but need a restart (their
    /// config keys); they keep the values the process started with.
    pub needs_restart: Vec<&'static str>,
}

impl RunningServer {
    /// Reads the config at `file` again and applies it, logging what changed. A file
    /// that does not load (unreadable, invalid: the error names the file, line and key)
    /// changes nothing: the running config keeps serving.
    pub async fn reload_file(&self, file: &Path) -> Result<ReloadReport, ConfigError> {
        let config = match Config::load(file) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%error, "config reload refused; still serving the running config");
                return Err(error);
            }
        };
        let report = self.reload(&config).await;
        let r = &report.routes;
        tracing::info!(
            file = %file.display(),
            added = ?r.added,
            changed = ?r.changed,
            removed = ?r.removed,
            local_entries_dropped = r.entries_dropped,
            "config reloaded"
        );
        if !report.needs_restart.is_empty() {
            tracing::warn!(
                settings = ?report.needs_restart,
                "these settings changed in the file but need a restart; they keep their running values"
            );
        }
        Ok(report)
    }

    /// Applies `config` (already validated) to the running server. Requests in flight
    /// finish with the settings they started with; the next request on any connection
    /// gets the new routes, and new connections the new timeouts. Reloads run one at a
    /// time.
    pub async fn reload(&self, config: &Config) -> ReloadReport {
        let started = self.started.lock().await;
        let needs_restart = needs_restart(&started, config);
        let routes = self.proxy.reload_routes(config).await;
        // The file its path names now (logrotate moved the old one away).
        self.proxy.reopen_access_log();
        let l = &self.listeners;
        let max = accept::max_connections(started.limits.max_connections);
        l.requests
            .set_max(config.limits.max_requests.map_or(max, NonZeroUsize::get));
        l.proxy.store(Arc::new(Http::new(
            &config.limits,
            &l.metrics,
            Some(Arc::clone(&l.requests)),
        )));
        if let (Some(running), Some(new)) = (&l.tls, &config.tls) {
            running.store(Arc::clone(&new.server));
        }
        let admin_metrics = l.admin.load().metrics.clone();
        l.admin
            .store(Arc::new(Http::new(&config.limits, &admin_metrics, None)));
        ReloadReport {
            routes,
            needs_restart,
        }
    }
}

/// The settings whose new values differ from the running ones but cannot change
/// without a restart: the listeners and runtime are built once, the cache's capacity
/// and the Redis connections are set when they start, the access log's file is open.
fn needs_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    let checks: [(&'static str, bool); 10] = [
        ("listen", running.listen != new.listen),
        ("admin_listen", running.admin_listen != new.admin_listen),
        ("workers", running.workers != new.workers),
        (
            "shutdown_grace",
            running.shutdown_grace != new.shutdown_grace,
        ),
        ("[cache]", running.cache != new.cache),
        ("[redis]", running.redis != new.redis),
        ("[lock]", running.lock != new.lock),
        ("access_log", running.access_log != new.access_log),
        // On or off: the listener speaks TLS or not. New files are applied.
        ("[tls]", running.tls.is_some() != new.tls.is_some()),
        (
            "[limits] max_connections",
            running.limits.max_connections != new.limits.max_connections,
        ),
    ];
    checks
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect()
}
