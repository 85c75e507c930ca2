//! The upstream side: a pooled HTTP/1.1 client per route (plain or rustls) behind the
//! route's concurrency caps ([`cap`], [`fleet_cap`]; composed as tower layers in
//! [`service`]), request timeouts, reading a body into memory up to a bound, and
//! logging upstream outages once when they start and once when they end.

pub(crate) mod cap;
pub(crate) mod fleet_cap;
mod service;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::config::RouteConfig;
use crate::http::body::{ClientFault, ProxyBody, UpstreamBody};
use crate::http::cache_status::Detail;
use cap::{Priority, Shed, UpstreamCap};
use service::{CapLayer, Capped, Exchange};
use std::sync::Arc;
use tower::ServiceExt as _;

/// What kind of upstream failure a fill ended with; what waiters are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// No connection could be made.
    Connect,
    /// No response (or no complete body) within the route's response timeout.
    Timeout,
    /// The connection broke or the response was malformed.
    Protocol,
    /// The upstream answered with a 5xx status.
    Status,
    /// Not sent: the route's upstream queue was full.
    QueueFull,
    /// Not sent: no upstream slot came free within the route's queue timeout.
    QueueTimeout,
}

impl FailureKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Protocol => "protocol",
            FailureKind::Status => "status",
            FailureKind::QueueFull => "queue-full",
            FailureKind::QueueTimeout => "queue-timeout",
        }
    }

    /// The `Cache-Status` detail (and log token) of a request that failed this way.
    pub(crate) fn detail(self) -> &'static str {
        match self {
            FailureKind::Connect => "upstream-connect",
            FailureKind::Timeout => "upstream-timeout",
            FailureKind::Protocol => "upstream-protocol",
            FailureKind::Status => "upstream-status",
            FailureKind::QueueFull => "upstream-queue-full",
            FailureKind::QueueTimeout => "upstream-queue-timeout",
        }
    }
}

impl From<FailureKind> for Detail {
    fn from(kind: FailureKind) -> Detail {
        Detail::Reason(kind.detail())
    }
}

/// A request to the upstream that got no usable response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("cannot connect to upstream {upstream}: {source}")]
    Connect {
        upstream: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("upstream {upstream} did not answer within {timeout:?}")]
    Timeout { upstream: String, timeout: Duration },
    #[error("upstream {upstream} failed: {source}")]
    Request {
        upstream: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("upstream {upstream} broke off the response body: {source}")]
    Body {
        upstream: String,
        #[source]
        source: hyper::Error,
    },
    /// Refused by the route's caps before anything was sent.
    #[error("not sent upstream: {0}")]
    Shed(Shed),
}

impl UpstreamError {
    pub(crate) fn kind(&self) -> FailureKind {
        match self {
            UpstreamError::Connect { .. } => FailureKind::Connect,
            UpstreamError::Timeout { .. } => FailureKind::Timeout,
            UpstreamError::Request { .. } | UpstreamError::Body { .. } => FailureKind::Protocol,
            UpstreamError::Shed(Shed::QueueFull) => FailureKind::QueueFull,
            UpstreamError::Shed(Shed::QueueTimeout) => FailureKind::QueueTimeout,
        }
    }
}

/// A body read into memory, or found too large to be.
pub(crate) enum BodyRead {
    Complete(Bytes),
    /// Over the limit: what was read so far, and the rest still to stream.
    TooLarge(Bytes, UpstreamBody),
}

/// One route's upstream.
pub(crate) struct Upstream {
    /// The client behind the route's caps.
    service: Capped<Exchange>,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    host: HeaderValue,
    response_timeout: Duration,
    display: Arc<str>,
    pub(crate) faults: FaultLog,
}

impl Upstream {
    /// The upstream of `route`, behind `cap` when the route has one.
    pub(crate) fn new(route: &RouteConfig, cap: Option<Arc<UpstreamCap>>) -> Upstream {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(route.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        let parts = route.upstream.clone().into_parts();
        let authority = parts.authority.expect("validated: upstream has a host");
        let base_path = parts
            .path_and_query
            .map(|p| p.path().trim_end_matches('/').to_string())
            .unwrap_or_default();
        let display: Arc<str> = route.upstream.to_string().into();
        let exchange = Exchange {
            client,
            response_timeout: route.response_timeout,
            display: Arc::clone(&display),
        };
        Upstream {
            service: tower::Layer::layer(&CapLayer(cap), exchange),
            scheme: parts.scheme.expect("validated: upstream has a scheme"),
            host: HeaderValue::from_str(authority.as_str())
                .expect("an authority is a valid header value"),
            authority,
            base_path,
            response_timeout: route.response_timeout,
            display,
            faults: FaultLog::default(),
        }
    }

    /// The upstream request for a client's `path_and_query`, with `headers` already
    /// prepared for forwarding. `original_host` is kept as `Host` when the route
    /// preserves it; otherwise `Host` names the upstream.
    pub(crate) fn request(
        &self,
        method: Method,
        path_and_query: Option<&PathAndQuery>,
        mut headers: HeaderMap,
        original_host: Option<&HeaderValue>,
        preserve_host: bool,
        body: ProxyBody,
    ) -> Request<ProxyBody> {
        let pq = path_and_query.map_or("/", |p| p.as_str());
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{pq}", self.base_path))
            .build()
            .unwrap_or_else(|_| Uri::from_static("/"));
        let host = match (preserve_host, original_host) {
            (true, Some(h)) => h.clone(),
            _ => self.host.clone(),
        };
        headers.insert(header::HOST, host);
        set_framing(&mut headers, &method, &body);
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        req
    }

    /// Sends `req` once a slot under the route's caps is free (`priority` orders the
    /// queue; `None` sends it uncapped), waiting at most the response timeout for the
    /// response head; the slot is held by the response body while corral reads it.
    pub(crate) async fn send(
        &self,
        mut req: Request<ProxyBody>,
        priority: Option<Priority>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        if let Some(priority) = priority {
            req.extensions_mut().insert(priority);
        }
        self.service.clone().oneshot(req).await
    }

    /// Reads `body` into memory up to `limit` bytes, within the response timeout; past
    /// the limit the prefix and the unread rest come back, so the response can still
    /// be streamed.
    pub(crate) async fn read_body(
        &self,
        body: UpstreamBody,
        limit: u64,
    ) -> Result<BodyRead, UpstreamError> {
        read_bounded(body, limit, self.response_timeout, &self.display).await
    }

    pub(crate) fn display(&self) -> &str {
        &self.display
    }
}

/// Runs `exchange` until it has made no progress for `timeout` (`None`): progress is
/// the client's body moving, if one is sent.
pub(super) async fn within<F: Future>(
    timeout: Duration,
    exchange: F,
    client_body: Option<&ClientFault>,
) -> Option<F::Output> {
    tokio::pin!(exchange);
    let mut deadline = Instant::now() + timeout;
    loop {
        if let Ok(out) = tokio::time::timeout_at(deadline, exchange.as_mut()).await {
            return Some(out);
        }
        let moved = client_body.and_then(ClientFault::moved_at)?;
        if moved + timeout <= Instant::now() {
            return None;
        }
        deadline = moved + timeout;
    }
}

/// Frames an upstream request from the body it carries, never from the client's
/// headers: a length can then never travel without its bytes (the smuggling a GET whose
/// body was dropped would otherwise open). Set explicitly, because hyper's client sends
/// no chunked body for a GET of unknown length.
fn set_framing(headers: &mut HeaderMap, method: &Method, body: &ProxyBody) {
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::TRANSFER_ENCODING);
    match body.size_hint().exact() {
        Some(0) if method == Method::GET || method == Method::HEAD => {}
        Some(len) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        None => {
            headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
    }
}

async fn read_bounded(
    body: UpstreamBody,
    limit: u64,
    timeout: Duration,
    upstream: &str,
) -> Result<BodyRead, UpstreamError> {
    let mut body = body;
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if body.is_end_stream() {
            return Ok(BodyRead::Complete(buf.freeze()));
        }
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    upstream: upstream.to_string(),
                    timeout,
                })
            }
            Ok(None) => return Ok(BodyRead::Complete(buf.freeze())),
            Ok(Some(Err(source))) => {
                return Err(UpstreamError::Body {
                    upstream: upstream.to_string(),
                    source,
                })
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() as u64 > limit {
                return Ok(BodyRead::TooLarge(buf.freeze(), body));
            }
        }
    }
}

/// An upstream outage, logged when it starts and when it ends, counted in between, so
/// a dead upstream under load writes two log lines, not one per request.
///
/// An outage ends only after [`FaultLog::QUIET`] without a failure: an upstream that
/// fails some requests and answers others (one broken URL among working ones, which a
/// client can alternate) stays in one outage, so the lines come at most one pair per
/// `QUIET`, the end line with the failures and successes in between.
///
/// Any request task may report. `failing` is the lock-free fast path of a success with
/// no outage (every upstream response passes here); the episode itself is a std mutex,
/// held for a few field updates and never across an `.await`, so exactly one task
/// logs each edge.
#[derive(Default)]
pub(crate) struct FaultLog {
    failing: AtomicBool,
    episode: Mutex<Episode>,
}

#[derive(Default)]
struct Episode {
    /// The last failure of the outage in progress; `None`: no outage.
    last_failure: Option<Instant>,
    failures: u64,
    successes: u64,
}

/// A line [`FaultLog`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultLine {
    Failing,
    Recovered { failures: u64, successes: u64 },
}

impl FaultLog {
    /// How long an upstream must go without a failure for its outage to end.
    const QUIET: Duration = Duration::from_secs(10);

    pub(crate) fn failure(
        &self,
        route: &str,
        upstream: &str,
        error: &dyn fmt::Display,
    ) -> Option<FaultLine> {
        let mut episode = self.episode.lock().unwrap_or_else(|e| e.into_inner());
        episode.failures += 1;
        let started = episode.last_failure.replace(Instant::now()).is_none();
        if !started {
            return None;
        }
        self.failing.store(true, Ordering::Release);
        tracing::warn!(route, upstream, %error, "upstream failing; further failures are counted until it recovers");
        Some(FaultLine::Failing)
    }

    pub(crate) fn success(&self, route: &str, upstream: &str) -> Option<FaultLine> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        let mut episode = self.episode.lock().unwrap_or_else(|e| e.into_inner());
        let last = episode.last_failure?;
        if last.elapsed() < Self::QUIET {
            episode.successes += 1;
            return None;
        }
        let Episode {
            failures,
            successes,
            ..
        } = std::mem::take(&mut *episode);
        self.failing.store(false, Ordering::Release);
        tracing::info!(route, upstream, failures, successes, "upstream recovered");
        Some(FaultLine::Recovered {
            failures,
            successes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_that_reached_the_upstream_has_its_metric() {
        let reached = [
            FailureKind::Connect,
            FailureKind::Timeout,
            FailureKind::Protocol,
            FailureKind::Status,
        ];
        let labels: Vec<&str> = reached.iter().map(|k| k.as_str()).collect();
        assert_eq!(labels, crate::metrics::FAILURE_KINDS);
    }

    fn is_failing(log: &FaultLog) -> bool {
        log.failing.load(Ordering::Relaxed)
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_alternates_failing_and_working_logs_one_pair_per_quiet_period() {
        let log = FaultLog::default();
        let fail = || log.failure("r", "u", &"boom");
        let step = Duration::from_millis(100);
        assert_eq!(fail(), Some(FaultLine::Failing));
        let mut lines = Vec::new();
        // A minute of a failing URL and a working one, alternated.
        for _ in 0..300 {
            tokio::time::advance(step).await;
            lines.extend(log.success("r", "u"));
            tokio::time::advance(step).await;
            lines.extend(fail());
        }
        assert_eq!(lines, [], "one outage while failures keep coming");
        assert!(is_failing(&log));
        tokio::time::advance(FaultLog::QUIET - step).await;
        assert_eq!(log.success("r", "u"), None, "not yet quiet");
        tokio::time::advance(step).await;
        assert_eq!(
            log.success("r", "u"),
            Some(FaultLine::Recovered {
                failures: 301,
                successes: 301
            })
        );
        assert!(!is_failing(&log));
        assert_eq!(log.success("r", "u"), None);
        assert_eq!(fail(), Some(FaultLine::Failing), "a new outage");
    }
}
