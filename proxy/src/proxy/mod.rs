//! The request path, top to bottom: admit (normalise and route), bypass or key, then
//! the cache path (`cacheable`), and the response with its `Cache-Status`.
//!
//! route → key → lookup (local tier, then shared) → fresh: serve | stale within SWR:
//! serve and refresh once in the background | hit-for-pass: forward | miss or stale:
//! fill lock → (leader) the fill task fetches, stores, wakes waiters → respond |
//! (waiter) wait for the leader's outcome → respond. See `fill` for the protocol.
//!
//! A pass caused by the request itself (its credentials, see `cache::policy`) marks
//! no hit-for-pass, and the waiters without credentials compete for the fill again.

mod answer;
mod cacheable;
pub(crate) mod error;
mod pass;
pub(crate) mod purge;
mod reload;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{request, Method, Request, Response};
use hyper::body::Incoming;
use tracing::{field, Instrument, Span};

use crate::access_log::{self, AccessLog};
use crate::cache::entry::CacheEntry;
use crate::cache::local::LocalCache;
use crate::cache::shared::SharedCache;
use crate::cache::{Cache, CacheKey, TagRules};
use crate::config::{Config, EncodedSlashes};
use crate::fill::coordinator::Coordinator;
use crate::fill::{FillKind, Filler, LocalFillLock};
use crate::http::body::ProxyBody;
use crate::http::cache_status::{CacheStatus, Detail, Fwd};
use crate::http::headers;
use crate::http::request::{self as client_request, BadRequest};
use crate::metrics::Metrics;
use crate::redis::Redis;
use crate::route::{Route, RouteTable};
pub use answer::respond;
use answer::{finish, ttl_secs};
use error::{error_response, ProxyError};
pub(crate) use reload::Current;
use reload::RouteBuilder;
pub use reload::RoutesReloaded;

/// A fresh entry in the local cache for a request, found without waiting on anything:
/// what the HTTP/1 fast path answers with.
pub struct LocalHit {
    pub(crate) entry: Arc<CacheEntry>,
    pub(crate) status: CacheStatus,
    /// The `Age` to send, in seconds.
    pub(crate) age: u64,
    /// The route, when an access log wants its name.
    pub(crate) route: Option<Arc<Route>>,
}

/// The proxy: routes, cache tiers and fill locks, shared by all connections.
pub struct Proxy {
    /// Routes and the other settings a reload replaces. Invariant: only
    /// [`Proxy::reload_routes`] stores (reloads come one at a time, from the server);
    /// each request loads it once and keeps what it loaded to its end.
    current: ArcSwap<Current>,
    route_builder: RouteBuilder,
    /// The cache tiers, the fleet's coordinator, and what else a fill needs.
    filler: Arc<Filler>,
    fills: Arc<LocalFillLock>,
    metrics: Arc<Metrics>,
    /// One line per request, when configured.
    access_log: Option<AccessLog>,
}

/// A request as the cache path needs it: the client's head, prepared for forwarding.
struct ClientRequest {
    head: request::Parts,
    original_host: Option<HeaderValue>,
    client: std::net::IpAddr,
}

impl ClientRequest {
    /// A request the fast path took, as [`Proxy::handle`] would have prepared it: the
    /// target normalised (`uri`), the canonical `host`; its headers are as sanitising
    /// would leave them (the fast path takes no other). Built only for a hit that
    /// starts an early refresh.
    fn from_fast_path(
        req: &request::Parts,
        uri: &http::Uri,
        host: Option<&str>,
        client: IpAddr,
    ) -> ClientRequest {
        let (mut head, ()) = Request::new(()).into_parts();
        head.method = req.method.clone();
        head.uri = uri.clone();
        head.version = req.version;
        head.headers = req.headers.clone();
        // The one header the fast path takes that sanitising removes.
        head.headers.remove(header::CONNECTION);
        ClientRequest {
            head,
            original_host: host.and_then(|h| HeaderValue::from_str(h).ok()),
            client,
        }
    }

    /// The client's headers as the upstream gets them. Built only when a request goes
    /// upstream: a hit never pays for it.
    fn forwarded_headers(&self) -> http::HeaderMap {
        let mut headers = self.head.headers.clone();
        headers::forward_request(&mut headers, self.client, self.original_host.as_ref());
        headers
    }
}

impl Proxy {
    /// Builds the tiers bottom up: the local tier, Redis (told to drop local copies on
    /// other instances' events), the shared tier on it, the coordinator on both.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Proxy {
        let local_ttl = config.redis.as_ref().map(|r| r.local_ttl);
        let tags = TagRules::from_routes(&config.routes, &metrics);
        let local = LocalCache::tagged(config.cache.max_bytes, local_ttl, tags);
        let redis = config
            .redis
            .clone()
            .map(|settings| Redis::start(settings, metrics.fleet.clone(), local.fleet_listener()));
        let route_builder = RouteBuilder {
            redis: redis.clone(),
            lease_ttl: config.lock.ttl,
        };
        let routes = config
            .routes
            .iter()
            .map(|rc| Arc::new(route_builder.build(rc, &metrics, None)))
            .collect();
        let max_object_bytes = config.cache.max_object_bytes;
        let shared = redis
            .as_ref()
            .map(|redis| SharedCache::new(Arc::clone(redis), max_object_bytes));
        let cache = Cache::new(local, shared);
        let coordinator = redis
            .and_then(|redis| Coordinator::new(redis, &config.lock, cache.clone()))
            .map(Arc::new);
        Proxy {
            current: ArcSwap::from_pointee(Current::new(config, routes)),
            route_builder,
            filler: Arc::new(Filler::new(cache, coordinator, max_object_bytes)),
            fills: LocalFillLock::new(),
            metrics,
            access_log: None,
        }
    }

    /// Opens the access log's file again, if it writes to one (a reload: logrotate).
    pub(crate) fn reopen_access_log(&self) {
        if let Some(log) = &self.access_log {
            log.reopen();
        }
    }

    /// This proxy, writing `log`'s lines.
    pub(crate) fn logging(mut self, log: Option<AccessLog>) -> Proxy {
        self.access_log = log;
        self
    }

    /// Logs a hit the HTTP/1 fast path answered (`head_only`: to a `HEAD`), when
    /// there is an access log.
    pub(crate) fn log_hit(
        &self,
        parts: &request::Parts,
        peer: SocketAddr,
        hit: &LocalHit,
        head_only: bool,
        started: tokio::time::Instant,
    ) {
        let Some(log) = &self.access_log else { return };
        let p = parts;
        let line = access_log::RequestLine::from_parts(
            &p.method,
            p.version,
            &p.uri,
            &p.headers,
            peer.ip(),
        );
        let route = hit.route.as_ref().map_or("-", |r| r.config.name.as_str());
        let bytes = if head_only {
            0
        } else {
            hit.entry.body().len() as u64
        };
        let status = hit.entry.status().as_u16();
        log.record(&line.fast_hit(status, bytes, route, started.elapsed()));
    }

    pub fn cache(&self) -> &Cache {
        self.filler.cache()
    }

    /// Fleet mode's connection to Redis, when configured.
    pub fn redis(&self) -> Option<&Arc<Redis>> {
        self.filler.coordinator().map(|c| c.redis())
    }

    pub fn fills(&self) -> &LocalFillLock {
        &self.fills
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The routes and other reloadable settings, as they are now.
    pub(crate) fn current(&self) -> Arc<Current> {
        self.current.load_full()
    }

    /// Serves one client request (`over_tls`: it came on a TLS connection). Never
    /// fails: every error becomes a response. With an access log, the request's line is
    /// written once it is answered.
    pub(crate) async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
        over_tls: bool,
    ) -> Response<ProxyBody> {
        let Some(log) = &self.access_log else {
            return self.answer_request(req, client, over_tls).await.0;
        };
        let started = std::time::Instant::now();
        let line = access_log::RequestLine::of(&req, client.ip());
        let (res, route, status) = self.answer_request(req, client, over_tls).await;
        log.record(&line.record(&res, route.as_deref(), &status, started.elapsed()));
        res
    }

    /// The `503` for a request past `max_requests`, which is not served (logged when
    /// there is an access log).
    pub(crate) fn refuse_overloaded<B>(
        &self,
        req: &Request<B>,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        let res = error_response(&ProxyError::Overloaded);
        if let Some(log) = &self.access_log {
            let status = CacheStatus::error(None, ProxyError::Overloaded.detail());
            let line = access_log::RequestLine::of(req, client.ip());
            log.record(&line.record(&res, None, &status, std::time::Duration::ZERO));
        }
        res
    }

    /// The response to a request, with its route (if it has one) and its status.
    async fn answer_request(
        self: &Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
        over_tls: bool,
    ) -> (Response<ProxyBody>, Option<Arc<Route>>, CacheStatus) {
        let refused = |err: &ProxyError| {
            let status = CacheStatus::error(None, err.detail());
            (error_response(err), None, status)
        };
        if req.method() == Method::CONNECT {
            // A reverse proxy opens no tunnels.
            return refused(&ProxyError::MethodNotAllowed);
        }
        let (mut head, body) = req.into_parts();
        let current = self.current.load();
        let trusted = trusts(&current, client.ip());
        let (host, route) = match admit(&current.routes, &mut head, trusted, over_tls) {
            Ok(admitted) => admitted,
            Err(err) => {
                tracing::debug!(path = head.uri.path(), error = %err, "refused");
                return refused(&err);
            }
        };
        // All this request reads of what a reload replaces, read once.
        let body_timeout = current.body_timeout;
        drop(current);
        // Debug level: a span per request costs on every hit; RUST_LOG=corral=debug shows it.
        let span = tracing::debug_span!(
            "request",
            route = %route.config.name,
            method = %head.method,
            path = head.uri.path(),
            key = field::Empty,
            cache = field::Empty,
        );
        let this = Arc::clone(self);
        async move {
            let req = ClientRequest {
                original_host: host.as_deref().and_then(|h| HeaderValue::from_str(h).ok()),
                head,
                client: client.ip(),
            };
            let body = (body, body_timeout);
            let (res, status) = this.serve(&route, req, body, host.as_deref()).await;
            route.metrics.served(status.served);
            Span::current().record("cache", status.served.as_str());
            tracing::debug!(status = res.status().as_u16(), "served");
            (finish(res, &status), Some(route), status)
        }
        .instrument(span)
        .await
    }
}

/// Normalises a request in place (host, path, headers: see `request`) and finds its
/// route. Everything after this sees the request only as normalised, so what is
/// routed, what is keyed and what is forwarded cannot differ.
///
/// A request that came over TLS says so in `X-Forwarded-Proto: https` (unless a
/// trusted proxy before us said how its client came), which is forwarded and keyed
/// like a trusted proxy's: an origin builds its links and redirects from it, so an
/// answer made for `https` is not served to `http` clients sharing the cache, nor the
/// reverse (nginx keys `$scheme` by default for the same reason).
fn admit(
    routes: &RouteTable,
    head: &mut request::Parts,
    trusted_peer: bool,
    over_tls: bool,
) -> Result<(Option<String>, Arc<Route>), ProxyError> {
    let host = client_request::canonical_host(head.version, &head.uri, &head.headers)?
        .map(std::borrow::Cow::into_owned);
    if let Some(normal) = client_request::normalize_target(&head.uri)? {
        head.uri = http::Uri::from(normal);
    }
    let route = routes.find(host.as_deref(), head.uri.path()).cloned();
    let Some(route) = route else {
        tracing::debug!(
            host = host.as_deref().unwrap_or(""),
            path = head.uri.path(),
            "no route"
        );
        return Err(ProxyError::NoRoute);
    };
    if route.config.encoded_slashes == EncodedSlashes::Reject
        && client_request::encoded_slash(head.uri.path())
    {
        return Err(BadRequest::EncodedSlash.into());
    }
    client_request::sanitize_headers(&mut head.headers, trusted_peer);
    if over_tls && !head.headers.contains_key(headers::X_FORWARDED_PROTO) {
        let https = HeaderValue::from_static("https");
        head.headers.insert(headers::X_FORWARDED_PROTO, https);
    }
    Ok((host, route))
}

/// Whether `peer` is a configured trusted proxy, whose forwarding headers are kept.
fn trusts(current: &Current, peer: IpAddr) -> bool {
    // A dual-stack listener sees IPv4 peers as IPv4-mapped IPv6 addresses.
    let peer = peer.to_canonical();
    current
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&peer))
}

impl Proxy {
    /// The fast path's whole request path: a `GET` or `HEAD` whose route caches, with a
    /// fresh entry in the local cache that the client's conditionals do not turn into a
    /// `304`. Counted as a hit. `None`: the request takes [`Proxy::handle`], which
    /// decides everything else (and may still find a hit, in the shared tier).
    ///
    /// It keys the request exactly as [`Proxy::handle`] would: same host and path
    /// normalisation; requests whose headers `handle` would change before keying
    /// (`Connection`-named headers, forwarding headers a route keys on) or that would
    /// bypass the cache are left to it.
    ///
    /// A hit that draws its entry due for an early refresh (`fill::early`) starts it
    /// here, from the request as `handle` would have prepared it (`client`: the peer).
    pub fn local_hit(&self, req: &request::Parts, client: IpAddr) -> Option<LocalHit> {
        if cacheable_request(&req.method, &req.headers).is_err()
            || !client_request::already_sanitized(&req.headers)
        {
            return None;
        }
        self.fresh_local_hit(req, client)
    }

    /// [`Proxy::local_hit`] for a request that came over TLS: keyed, as [`admit`] keys
    /// it, with `X-Forwarded-Proto: https`, which is added to `req` (and so forwarded
    /// by an early refresh it starts).
    pub(crate) fn local_hit_over_tls(
        &self,
        req: &mut request::Parts,
        client: IpAddr,
    ) -> Option<LocalHit> {
        if cacheable_request(&req.method, &req.headers).is_err()
            || !client_request::already_sanitized(&req.headers)
        {
            return None;
        }
        let https = HeaderValue::from_static("https");
        req.headers.insert(headers::X_FORWARDED_PROTO, https);
        self.fresh_local_hit(req, client)
    }

    /// The rest of [`Proxy::local_hit`], for a request whose headers are as sanitising
    /// (and, over TLS, the scheme's header) would leave them.
    fn fresh_local_hit(&self, req: &request::Parts, client: IpAddr) -> Option<LocalHit> {
        let host = client_request::canonical_host(req.version, &req.uri, &req.headers).ok()?;
        let normal = client_request::normalize_target(&req.uri).ok()?;
        let uri = match normal {
            Some(pq) => &http::Uri::from(pq),
            None => &req.uri,
        };
        let current = self.current.load();
        let route = current.routes.find(host.as_deref(), uri.path())?;
        if !route.config.cache || route.keys_forwarding_headers {
            return None;
        }
        if route.config.encoded_slashes == EncodedSlashes::Reject
            && client_request::encoded_slash(uri.path())
        {
            return None;
        }
        let key = CacheKey::for_request(&route.config, host.as_deref(), uri, &req.headers);
        let now = SystemTime::now();
        let (entry, fill_key) = self.cache().local_fresh_keyed(&key, &req.headers, now)?;
        if entry.satisfies_conditional(&req.headers) {
            return None;
        }
        let mut status = CacheStatus::hit(ttl_secs(&entry, now));
        if cacheable::starts_early_refresh(route, &req.headers, &entry, now) {
            let req = ClientRequest::from_fast_path(req, uri, host.as_deref(), client);
            if self.refresh_in_background(
                route,
                &req,
                &key,
                &fill_key,
                &entry,
                FillKind::EarlyRefresh,
            ) {
                status = status.with_detail(Detail::EarlyRefresh);
            }
        }
        route.metrics.served(status.served);
        Some(LocalHit {
            age: entry.age(now),
            entry,
            status,
            route: self.access_log.is_some().then(|| Arc::clone(route)),
        })
    }

    /// `body`: the request's, and how long it may wait on its client between reads.
    async fn serve(
        self: &Arc<Self>,
        route: &Arc<Route>,
        req: ClientRequest,
        (body, body_timeout): (Incoming, std::time::Duration),
        host: Option<&str>,
    ) -> (Response<ProxyBody>, CacheStatus) {
        if let Some(status) = bypass(route, &req.head, &body) {
            // Streamed as it came, with its own framing; never stored, never served
            // from the cache (the key does not see the body or the rewriting header).
            let body = ProxyBody::from_client(body, body_timeout);
            return self.pass(route, &req, body, status).await;
        }
        let key = CacheKey::for_request(&route.config, host, &req.head.uri, &req.head.headers);
        Span::current().record("key", field::display(&key));
        self.serve_cacheable(route, &req, key).await
    }
}

/// Why a request is not one for the cache at all, if it is not: a method other than
/// GET and HEAD, a route without caching, a `Range`, a body (RFC 9110 §9.3.1 gives a
/// GET body no meaning, but an origin may read it: the key does not), or a header that
/// rewrites the request at the origin.
fn bypass(route: &Route, head: &request::Parts, body: &Incoming) -> Option<CacheStatus> {
    if let Err(fwd) = cacheable_request(&head.method, &head.headers) {
        return Some(CacheStatus::bypass(fwd));
    }
    let status = CacheStatus::bypass(Fwd::Bypass);
    if !route.config.cache {
        Some(status)
    } else if !http_body::Body::is_end_stream(body) {
        Some(status.with_detail(Detail::RequestBody))
    } else if client_request::rewrites_request(&head.headers) {
        Some(status.with_detail(Detail::RewritingHeader))
    } else {
        None
    }
}

/// Whether a request's method and `Range` leave it to the cache at all: a `GET` or
/// `HEAD` without `Range` (the fast path asks before routing, `bypass` after); `Err`
/// says how it is forwarded instead.
fn cacheable_request(method: &Method, headers: &http::HeaderMap) -> Result<(), Fwd> {
    if !(method == Method::GET || method == Method::HEAD) {
        Err(Fwd::Method)
    } else if headers.contains_key(header::RANGE) {
        Err(Fwd::Bypass)
    } else {
        Ok(())
    }
}
