//! Client connections: how many are open, and why some (or their requests) were refused
//! or cut off.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Client connections: how many are open, and why some (or their requests) were refused
/// or cut off.
#[derive(Clone, Default)]
pub(crate) struct ConnectionMetrics {
    open: Gauge,
    refused: Counter,
    requests_refused: Counter,
    idle_closed: Counter,
    send_timeouts: Counter,
    client_aborts: Counter,
    accept_errors: Counter,
    tls_handshake_failures: Counter,
}

impl ConnectionMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
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
            (
                "tls_handshake_failures",
                "TLS connections closed because their handshake failed or timed out",
                &self.tls_handshake_failures,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
    }

    pub(crate) fn opened(&self) {
        self.open.inc();
    }
    pub(crate) fn closed(&self) {
        self.open.dec();
    }
    pub(crate) fn refused(&self) {
        self.refused.inc();
    }
    pub(crate) fn request_refused(&self) {
        self.requests_refused.inc();
    }
    pub(crate) fn idle_closed(&self) {
        self.idle_closed.inc();
    }
    pub(crate) fn send_timeout(&self) {
        self.send_timeouts.inc();
    }
    pub(crate) fn client_abort(&self) {
        self.client_aborts.inc();
    }
    pub(crate) fn accept_error(&self) {
        self.accept_errors.inc();
    }
    pub(crate) fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }
}
