//! The request path: every step a request takes, top to bottom.
//!
//! route → key → lookup (local tier) → fresh: serve | stale within SWR: serve and
//! refresh once in the background | hit-for-pass: forward | miss or stale: fill lock →
//! (holder) fetch in a task of its own, store, wake waiters → respond | (waiter) wait
//! for the holder's outcome → respond.
//!
//! The fetch for a fill runs in a spawned `Fill` task, not in the client's request
//! future, so a client that disconnects does not cancel the fetch that others wait on;
//! and if the task dies anyway, its dropped permit wakes the waiters to take over. A
//! panic inside a fill is caught and ends it like an uncacheable response (the key is
//! passed upstream for `hit_for_pass`), so a bug cannot leave a key answering errors.
//!
//! A pass caused by the request itself (its credentials, see `cache::policy`) marks
//! no hit-for-pass, and the waiters without credentials compete for the fill again.

use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::FutureExt as _;
use http::header::{self, HeaderValue};
use http::{request, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tracing::{field, Instrument, Span};

use crate::body::ProxyBody;
use crate::cache::entry::CacheEntry;
use crate::cache::key::vary_values;
use crate::cache::policy::{self, PassReason, Verdict};
use crate::cache::shared::SharedCache;
use crate::cache::{Cache, CacheKey, Freshness, LookupOutcome, TagRules};
use crate::config::{AdminToken, Config, EncodedSlashes, OnWaitTimeout};
use crate::error::{error_response, ProxyError};
use crate::fleet::{Claim, Coordinator, Fleet};
use crate::headers;
use crate::lock::{FillOutcome, FillPermit, LocalFillLock, LockAttempt};
use crate::metrics::{Metrics, UpstreamReason};
use crate::request::{self as client_request, BadRequest};
use crate::route::{Route, RouteTable};
use crate::status::{CacheStatus, Fwd};
use crate::upstream::{BodyRead, FailureKind};

/// How often one request re-runs lookup and lock after a holder failed or a filled
/// variant did not match it, before it goes upstream on its own.
const MAX_ATTEMPTS: usize = 4;

/// A fresh entry in the local cache for a request, found without waiting on anything:
/// what the HTTP/1 fast path answers with.
pub struct LocalHit {
    pub entry: Arc<CacheEntry>,
    pub status: CacheStatus,
    /// The `Age` to send, in seconds.
    pub age: u64,
}

impl LocalHit {
    /// The header lines this response adds to the entry's prebuilt head, through the
    /// blank line: `Age`, `Cache-Status`, `Date` when the origin sent none, and
    /// `Connection: close` when the connection ends after it.
    pub fn write_lines(&self, out: &mut Vec<u8>, closing: bool) {
        use std::io::Write as _;
        // Writing to a Vec cannot fail.
        let _ = write!(
            out,
            "age: {}\r\ncache-status: {}\r\n",
            self.age, self.status
        );
        if !self.entry.headers.contains_key(header::DATE) {
            out.extend_from_slice(b"date: ");
            out.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if closing {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// The proxy: routes, cache tiers and fill locks, shared by all connections.
pub struct Proxy {
    routes: RouteTable,
    cache: Cache,
    /// Fleet mode: the shared tier and the fleet-wide lock. `None`: single instance.
    fleet: Option<Arc<Coordinator>>,
    fills: Arc<LocalFillLock>,
    max_object_bytes: u64,
    trusted_proxies: Vec<ipnet::IpNet>,
    metrics: Arc<Metrics>,
    /// What `POST /purge` requires (admin.rs); here so the admin listener has it.
    admin_token: Option<AdminToken>,
    /// `[limits] body_timeout`: how long a forwarded body may wait on its client.
    body_timeout: std::time::Duration,
}

/// A request as the cache path needs it: the client's head, prepared for forwarding.
struct ClientRequest {
    head: request::Parts,
    original_host: Option<HeaderValue>,
    client: std::net::IpAddr,
}

impl ClientRequest {
    /// The client's headers as the upstream gets them. Built only when a request goes
    /// upstream: a hit never pays for it.
    fn forwarded_headers(&self) -> http::HeaderMap {
        let mut headers = self.head.headers.clone();
        headers::forward_request(&mut headers, self.client, self.original_host.as_ref());
        headers
    }
}

impl Proxy {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Proxy {
        let routes = config
            .routes
            .iter()
            .map(|rc| Route::new(rc.clone(), metrics.for_route(&rc.name)))
            .collect();
        let local_ttl = config.redis.as_ref().map(|r| r.local_ttl);
        let tags = TagRules::from_routes(&config.routes, &metrics);
        let mut cache = Cache::tagged(config.cache.max_bytes, local_ttl, tags);
        let fleet = config.redis.clone().map(|settings| {
            let fleet = Fleet::start(
                settings,
                config.lock.clone(),
                cache.local().clone(),
                metrics.fleet.clone(),
            );
            cache.set_shared(SharedCache::with_max_body(
                Arc::clone(&fleet),
                config.cache.max_object_bytes,
            ));
            Arc::new(Coordinator::new(fleet, cache.clone()))
        });
        Proxy {
            routes: RouteTable::new(routes),
            fleet,
            cache,
            fills: LocalFillLock::new(),
            max_object_bytes: config.cache.max_object_bytes,
            trusted_proxies: config.trusted_proxies.clone(),
            metrics,
            admin_token: config.admin_token.clone(),
            body_timeout: config.limits.body_timeout,
        }
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Fleet mode's coordinator, when configured.
    pub fn fleet(&self) -> Option<&Arc<Coordinator>> {
        self.fleet.as_ref()
    }

    pub fn fills(&self) -> &LocalFillLock {
        &self.fills
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    pub fn admin_token(&self) -> Option<&AdminToken> {
        self.admin_token.as_ref()
    }

    /// Serves one client request. Never fails: every error becomes a response.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        if req.method() == Method::CONNECT {
            // A reverse proxy opens no tunnels.
            return error_response(&ProxyError::MethodNotAllowed);
        }
        let (mut head, body) = req.into_parts();
        let trusted = self.trusts(client.ip());
        let (host, route) = match self.admit(&mut head, trusted) {
            Ok(admitted) => admitted,
            Err(err) => {
                tracing::debug!(path = head.uri.path(), error = %err, "refused");
                return error_response(&err);
            }
        };
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
            let (res, status) = this.serve(&route, req, body, host.as_deref()).await;
            route.metrics.served(status.served);
            Span::current().record("cache", status.served.as_str());
            tracing::debug!(status = res.status().as_u16(), "served");
            finish(res, &status)
        }
        .instrument(span)
        .await
    }

    /// Normalises a request in place (host, path, headers: see `request`) and finds its
    /// route. Everything after this sees the request only as normalised, so what is
    /// routed, what is keyed and what is forwarded cannot differ.
    fn admit(
        &self,
        head: &mut request::Parts,
        trusted_peer: bool,
    ) -> Result<(Option<String>, Arc<Route>), ProxyError> {
        let host = client_request::canonical_host(head.version, &head.uri, &head.headers)?
            .map(std::borrow::Cow::into_owned);
        if let Some(normal) = client_request::normalize_target(&head.uri)? {
            head.uri = http::Uri::from(normal);
        }
        let route = self.routes.find(host.as_deref(), head.uri.path()).cloned();
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
        Ok((host, route))
    }

    /// Whether `peer` is a configured trusted proxy, whose forwarding headers are kept.
    fn trusts(&self, peer: IpAddr) -> bool {
        // A dual-stack listener sees IPv4 peers as IPv4-mapped IPv6 addresses.
        let peer = peer.to_canonical();
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }

    /// The fast path's whole request path: a `GET` or `HEAD` whose route caches, with a
    /// fresh entry in the local cache that the client's conditionals do not turn into a
    /// `304`. Counted as a hit. `None`: the request takes [`Proxy::handle`], which
    /// decides everything else (and may still find a hit, in the shared tier).
    ///
    /// It keys the request exactly as [`Proxy::handle`] would: same host and path
    /// normalisation; requests whose headers `handle` would change before keying
    /// (`Connection`-named headers, forwarding headers a route keys on) or that would
    /// bypass the cache are left to it.
    pub fn local_hit(&self, req: &request::Parts) -> Option<LocalHit> {
        if !(req.method == Method::GET || req.method == Method::HEAD)
            || req.headers.contains_key(header::RANGE)
            || !client_request::already_sanitized(&req.headers)
        {
            return None;
        }
        let host = client_request::canonical_host(req.version, &req.uri, &req.headers).ok()?;
        let normal = client_request::normalize_target(&req.uri).ok()?;
        let uri = match normal {
            Some(pq) => &http::Uri::from(pq),
            None => &req.uri,
        };
        let route = self.routes.find(host.as_deref(), uri.path())?;
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
        let entry = self.cache.local_fresh(&key, &req.headers, now)?;
        if entry.satisfies_conditional(&req.headers) {
            return None;
        }
        let status = CacheStatus::hit(ttl_secs(&entry, now));
        route.metrics.served(status.served);
        Some(LocalHit {
            age: entry.age(now),
            entry,
            status,
        })
    }

    async fn serve(
        self: &Arc<Self>,
        route: &Arc<Route>,
        req: ClientRequest,
        body: Incoming,
        host: Option<&str>,
    ) -> (Response<ProxyBody>, CacheStatus) {
        if let Some(status) = bypass(route, &req.head, &body) {
            // Streamed as it came, with its own framing; never stored, never served
            // from the cache (the key does not see the body or the rewriting header).
            return self
                .pass(
                    route,
                    &req,
                    ProxyBody::from_client(body, self.body_timeout),
                    status,
                )
                .await;
        }
        let key = CacheKey::for_request(&route.config, host, &req.head.uri, &req.head.headers);
        Span::current().record("key", field::display(&key));
        self.serve_cacheable(route, &req, key).await
    }

    /// The cache path for a GET or HEAD.
    async fn serve_cacheable(
        self: &Arc<Self>,
        route: &Arc<Route>,
        req: &ClientRequest,
        key: CacheKey,
    ) -> (Response<ProxyBody>, CacheStatus) {
        let mut collapsed = false;
        for _ in 0..MAX_ATTEMPTS {
            let now = SystemTime::now();
            let lookup = self.cache.lookup(&key, &req.head.headers, now).await;
            let stale = match lookup.outcome {
                LookupOutcome::Fresh(entry) => {
                    return (
                        respond(&req.head, &entry),
                        CacheStatus::hit(ttl_secs(&entry, now)),
                    );
                }
                LookupOutcome::Pass(_) => {
                    return self
                        .pass(
                            route,
                            req,
                            ProxyBody::empty(),
                            CacheStatus::pass(Fwd::UriMiss, "hit-for-pass"),
                        )
                        .await;
                }
                LookupOutcome::Stale(entry) if entry.within_stale_while_revalidate(now) => {
                    self.refresh_in_background(route, req, &key, &lookup.fill_key, &entry);
                    let status = CacheStatus::stale_while_revalidate(-ttl_secs(&entry, now));
                    return (respond(&req.head, &entry), status);
                }
                LookupOutcome::Stale(entry) => Some(entry),
                LookupOutcome::Miss => None,
            };
            let fwd = match (&stale, lookup.vary_miss) {
                (Some(_), _) => Fwd::Stale,
                (None, true) => Fwd::VaryMiss,
                (None, false) => Fwd::Miss,
            };

            // Without coalescing (a baseline to measure it against), every request gets
            // a permit of its own: no one waits, everyone fetches.
            let attempt = if route.config.coalesce {
                self.fills.acquire(&lookup.fill_key)
            } else {
                LocalFillLock::new().acquire(&lookup.fill_key)
            };
            let waiter = match attempt {
                LockAttempt::Acquired(permit) => {
                    // Someone may have filled the key between our lookup and the acquire.
                    let now = SystemTime::now();
                    if let LookupOutcome::Fresh(entry) = self
                        .cache
                        .lookup(&key, &req.head.headers, now)
                        .await
                        .outcome
                    {
                        permit.complete(FillOutcome::Filled(Arc::clone(&entry)));
                        return (
                            respond(&req.head, &entry),
                            CacheStatus::hit(ttl_secs(&entry, now)),
                        );
                    }
                    let mut status = self
                        .lead_fill(route, req, key.clone(), permit, stale, fwd)
                        .await;
                    if collapsed {
                        status.1 = status.1.collapsed();
                    }
                    return status;
                }
                LockAttempt::Held(waiter) => waiter,
            };

            route.metrics.coalesced_waiter();
            collapsed = true;
            let outcome = tokio::time::timeout(route.config.wait_timeout, waiter.wait())
                .instrument(tracing::debug_span!("lock_wait"))
                .await;
            let now = SystemTime::now();
            let stale_if_error = stale.filter(|s| s.within_stale_if_error(now));
            match outcome {
                Ok(FillOutcome::Filled(entry)) if entry.matches_vary(&req.head.headers) => {
                    let status = CacheStatus::fetched(fwd, entry.status.as_u16(), true).collapsed();
                    return (respond(&req.head, &entry), status);
                }
                // A variant for other header values, or the holder died: look again.
                Ok(FillOutcome::Filled(_)) | Ok(FillOutcome::HolderFailed) => continue,
                // The holder's own credentials kept its response out of the cache: a
                // request without them competes for the fill again.
                Ok(FillOutcome::Uncacheable(reason))
                    if reason.waiters_retry()
                        && !policy::has_credentials(&route.config, &req.head.headers) =>
                {
                    continue
                }
                Ok(FillOutcome::Shared(entry)) => {
                    let status =
                        CacheStatus::fetched(fwd, entry.status.as_u16(), false).collapsed();
                    return (respond(&req.head, &entry), status);
                }
                Ok(FillOutcome::Uncacheable(reason)) => {
                    let status = CacheStatus::pass(fwd, reason.as_str()).collapsed();
                    return self.pass(route, req, ProxyBody::empty(), status).await;
                }
                Ok(FillOutcome::Failed(kind)) => {
                    if let Some(stale) = stale_if_error {
                        return (
                            respond(&req.head, &stale),
                            CacheStatus::stale_if_error(None).collapsed(),
                        );
                    }
                    let err = ProxyError::SharedFailure(kind);
                    return (
                        error_response(&err),
                        CacheStatus::error(Some(fwd), err.detail()).collapsed(),
                    );
                }
                Err(_elapsed) => {
                    // Counted, not logged at warn: under a slow upstream every waiter gets here.
                    route.metrics.wait_timeout();
                    tracing::debug!(wait_timeout = ?route.config.wait_timeout, "gave up waiting for another request's fetch");
                    if let Some(stale) = stale_if_error {
                        return (
                            respond(&req.head, &stale),
                            CacheStatus::stale_if_error(None),
                        );
                    }
                    return match route.config.on_wait_timeout {
                        OnWaitTimeout::Fetch => {
                            self.pass(
                                route,
                                req,
                                ProxyBody::empty(),
                                CacheStatus::pass(fwd, "wait-timeout"),
                            )
                            .await
                        }
                        OnWaitTimeout::Error => {
                            let err = ProxyError::WaitTimedOut(route.config.wait_timeout);
                            (
                                error_response(&err),
                                CacheStatus::error(Some(fwd), err.detail()),
                            )
                        }
                    };
                }
            }
        }
        self.pass(
            route,
            req,
            ProxyBody::empty(),
            CacheStatus::pass(Fwd::Miss, "retries-exhausted"),
        )
        .await
    }

    /// This request holds the fill: run the fetch in its own task and answer from its
    /// outcome. If this client goes away, the task still completes for the waiters.
    async fn lead_fill(
        self: &Arc<Self>,
        route: &Arc<Route>,
        req: &ClientRequest,
        key: CacheKey,
        permit: FillPermit,
        stale: Option<Arc<CacheEntry>>,
        fwd: Fwd,
    ) -> (Response<ProxyBody>, CacheStatus) {
        let (reply, answer) = oneshot::channel();
        let reason = if stale.is_some() {
            UpstreamReason::Revalidate
        } else {
            UpstreamReason::Fill
        };
        let fill = Fill::new(self, route, req, key, permit, stale, fwd, reason);
        tokio::spawn(
            fill.run(Some(reply))
                .instrument(tracing::debug_span!("upstream")),
        );
        match answer.await {
            Ok(FillReply::Entry(entry, status)) => (respond(&req.head, &entry), status),
            Ok(FillReply::Pass(status)) => self.pass(route, req, ProxyBody::empty(), status).await,
            Ok(FillReply::Response(mut res, status)) => {
                if req.head.method == Method::HEAD {
                    *res.body_mut() = ProxyBody::empty();
                }
                (res, status)
            }
            // The fill task was aborted (the runtime is shutting down); its dropped
            // permit has already woken the waiters. (A panic in it is caught: a Pass.)
            Err(_) => {
                let err = ProxyError::SharedFailure(FailureKind::Protocol);
                (
                    error_response(&err),
                    CacheStatus::error(Some(fwd), "fill-failed"),
                )
            }
        }
    }

    /// Starts one background refresh of a stale entry, unless one is running.
    fn refresh_in_background(
        self: &Arc<Self>,
        route: &Arc<Route>,
        req: &ClientRequest,
        key: &CacheKey,
        fill_key: &CacheKey,
        stale: &Arc<CacheEntry>,
    ) {
        let Some(permit) = self.fills.try_acquire(fill_key) else {
            return;
        };
        let fill = Fill::new(
            self,
            route,
            req,
            key.clone(),
            permit,
            Some(Arc::clone(stale)),
            Fwd::Stale,
            UpstreamReason::Refresh,
        );
        tokio::spawn(
            fill.run(None)
                .instrument(tracing::debug_span!("background_refresh")),
        );
    }

    /// Forwards a request without caching it, streaming both bodies.
    async fn pass(
        &self,
        route: &Route,
        req: &ClientRequest,
        body: ProxyBody,
        status: CacheStatus,
    ) -> (Response<ProxyBody>, CacheStatus) {
        route.metrics.upstream_request(UpstreamReason::Pass);
        let client_fault = body.client_fault();
        let upstream_req = route.upstream.request(
            req.head.method.clone(),
            req.head.uri.path_and_query(),
            req.forwarded_headers(),
            req.original_host.as_ref(),
            route.config.preserve_host,
            body,
        );
        let sent = route.upstream.send(upstream_req).await;
        // Whether a failure was the client's: its body failed or stalled.
        let blame = match &sent {
            Err(err) => client_fault.and_then(|f| f.blame(err.kind() == FailureKind::Timeout)),
            Ok(_) => None,
        };
        match (sent, blame) {
            (Ok(res), _) => {
                note_upstream_status(route, res.status());
                let (mut head, body) = res.into_parts();
                headers::forward_response(&mut head.headers);
                let body = if req.head.method == Method::HEAD {
                    ProxyBody::empty()
                } else {
                    ProxyBody::streaming(body)
                };
                (Response::from_parts(head, body), status)
            }
            // The client's body failed or stalled: its fault, not the upstream's (no
            // fault log, no upstream error counted), whatever the upstream client said.
            (Err(_), Some(blame)) => {
                let err = ProxyError::from(blame);
                tracing::debug!(error = %err, "client request body failed while forwarded");
                (error_response(&err), CacheStatus::error(None, err.detail()))
            }
            (Err(err), None) => {
                note_upstream_error(route, &err);
                let err = ProxyError::from(err);
                (
                    error_response(&err),
                    CacheStatus::error(Some(Fwd::Miss), err.detail()),
                )
            }
        }
    }
}

/// What a fill hands the request that leads it.
enum FillReply {
    /// Serve this entry (stored, shared, or stale on error) with this status.
    Entry(Arc<CacheEntry>, CacheStatus),
    /// Serve this response as is (streamed, uncacheable, or an error).
    Response(Response<ProxyBody>, CacheStatus),
    /// Another instance found the response uncacheable: fetch it yourself.
    Pass(CacheStatus),
}

/// Aborts a helper task when its owner ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One fetch of a key from the upstream, owned by a spawned task.
struct Fill {
    proxy: Arc<Proxy>,
    route: Arc<Route>,
    /// The primary key (where the entry, or its `Vary` index, is stored).
    key: CacheKey,
    /// Taken by [`Fill::run`], which completes it whatever happens.
    permit: Option<FillPermit>,
    stale: Option<Arc<CacheEntry>>,
    fwd: Fwd,
    reason: UpstreamReason,
    /// The request as the upstream and the cache policy see it: the target as keyed
    /// (query sorted or dropped as the route keys it), forwarded headers.
    policy_req: request::Parts,
    /// The client's headers after clean-up: what lookups match `Vary` against, so
    /// what the entry's `Vary` values are taken from (not the forwarded set, which has
    /// corral's own `X-Forwarded-*`, `Via` and validators).
    client_headers: http::HeaderMap,
    original_host: Option<HeaderValue>,
}

impl Fill {
    #[allow(clippy::too_many_arguments)]
    fn new(
        proxy: &Arc<Proxy>,
        route: &Arc<Route>,
        req: &ClientRequest,
        key: CacheKey,
        permit: FillPermit,
        stale: Option<Arc<CacheEntry>>,
        fwd: Fwd,
        reason: UpstreamReason,
    ) -> Fill {
        let mut headers = req.forwarded_headers();
        headers::strip_conditionals(&mut headers);
        if let Some(stale) = &stale {
            stale.add_validators(&mut headers);
        }
        let target = crate::cache::key::keyed_target(&route.config, &req.head.uri);
        let (mut policy_req, ()) = Request::get(target)
            .body(())
            .expect("a valid URI")
            .into_parts();
        policy_req.headers = headers;
        Fill {
            proxy: Arc::clone(proxy),
            route: Arc::clone(route),
            key,
            permit: Some(permit),
            stale,
            fwd,
            reason,
            policy_req,
            client_headers: req.head.headers.clone(),
            original_host: req.original_host.clone(),
        }
    }

    /// Fetches, decides, stores, and tells the waiters and the leader (if any).
    ///
    /// Order matters: the entry is stored before the permit completes, so a request
    /// that finds the key unlocked finds the entry.
    ///
    /// A panic anywhere in the fill (a bug, or a value nobody foresaw) still ends it
    /// with an outcome: the key is marked hit-for-pass, so requests go upstream
    /// without this code path instead of failing one after another.
    async fn run(mut self, reply: Option<oneshot::Sender<FillReply>>) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let fill_key = permit.key().clone();
        let settled = AssertUnwindSafe(self.settle(&fill_key))
            .catch_unwind()
            .await;
        let (outcome, answer) = match settled {
            Ok(settled) => settled,
            Err(panic) => {
                let panic = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(key = %fill_key, %panic, "fill panicked; the key is passed upstream for hit_for_pass");
                let reason = PassReason::Internal;
                let ttl = self.route.config.hit_for_pass;
                self.proxy.cache.mark_pass(&fill_key, reason, ttl).await;
                let status = CacheStatus::pass(self.fwd, reason.as_str());
                (FillOutcome::Uncacheable(reason), FillReply::Pass(status))
            }
        };
        permit.complete(outcome);
        if let Some(reply) = reply {
            // The leader may have gone; the waiters were told through the permit.
            let _ = reply.send(answer);
        }
    }

    /// The fill itself, in the fleet when there is one: what the waiters and the
    /// leader are told.
    async fn settle(&self, fill_key: &CacheKey) -> (FillOutcome, FillReply) {
        let fleet = self
            .proxy
            .fleet
            .clone()
            .filter(|_| self.route.config.coalesce);
        let lease = match &fleet {
            None => None,
            Some(fleet) => match fleet
                .claim(
                    &self.route,
                    fill_key,
                    self.reason == UpstreamReason::Refresh,
                )
                .await
            {
                Claim::Lead(lease) => lease,
                Claim::Done(outcome) => {
                    if let FillOutcome::Uncacheable(reason) = &outcome {
                        // Hit-for-pass here too: later requests skip both locks.
                        let ttl = self.route.config.hit_for_pass;
                        self.proxy.cache.mark_pass(fill_key, *reason, ttl).await;
                    }
                    let reply = self.remote_reply(&outcome).await;
                    return (outcome, reply);
                }
            },
        };
        // While the fetch runs, keep the fleet lease alive so a slow upstream does not
        // lose it; if it is lost anyway, the fenced write still guards the entry. The
        // guard aborts it however the fetch ends, a panic included.
        let _extender = fleet
            .as_ref()
            .zip(lease.clone())
            .map(|(fleet, lease)| AbortOnDrop(tokio::spawn(Arc::clone(fleet).keep_alive(lease))));

        let (outcome, reply) = self.fetch(fill_key).await;

        if let Some(fleet) = &fleet {
            let fence = lease.as_ref().map_or(0, |l| l.fence);
            let mut lease = lease;
            // A pass this request caused: free the lock before telling the fleet to
            // retry, so the instances that retry find it free.
            if matches!(&outcome, FillOutcome::Uncacheable(r) if r.waiters_retry()) {
                if let Some(lease) = lease.take() {
                    fleet.release(lease).await;
                }
            }
            fleet
                .publish_outcome(&self.route, fill_key, &outcome, fence)
                .await;
            if let Some(lease) = lease {
                fleet.release(lease).await;
            }
        }
        (outcome, reply)
    }

    /// What the leader gets when another instance's fill ended it.
    async fn remote_reply(&self, outcome: &FillOutcome) -> FillReply {
        let status =
            |e: &CacheEntry| CacheStatus::fetched(self.fwd, e.status.as_u16(), true).collapsed();
        match outcome {
            FillOutcome::Filled(entry) | FillOutcome::Shared(entry) => {
                FillReply::Entry(Arc::clone(entry), status(entry))
            }
            FillOutcome::Uncacheable(reason) => {
                FillReply::Pass(CacheStatus::pass(self.fwd, reason.as_str()).collapsed())
            }
            FillOutcome::Failed(_) | FillOutcome::HolderFailed => {
                let kind = match outcome {
                    FillOutcome::Failed(kind) => *kind,
                    _ => FailureKind::Protocol,
                };
                match self
                    .stale
                    .as_ref()
                    .filter(|s| s.within_stale_if_error(SystemTime::now()))
                {
                    Some(stale) => FillReply::Entry(
                        Arc::clone(stale),
                        CacheStatus::stale_if_error(None).collapsed(),
                    ),
                    None => {
                        let err = ProxyError::SharedFailure(kind);
                        FillReply::Response(
                            error_response(&err),
                            CacheStatus::error(Some(self.fwd), err.detail()).collapsed(),
                        )
                    }
                }
            }
        }
    }

    /// Fetches, decides and stores locally; returns what the waiters and the leader get.
    async fn fetch(&self, fill_key: &CacheKey) -> (FillOutcome, FillReply) {
        let Fill {
            proxy,
            route,
            key,
            stale,
            fwd,
            reason,
            policy_req,
            client_headers,
            original_host,
            ..
        } = self;
        let (fwd, reason) = (*fwd, *reason);
        route.metrics.upstream_request(reason);
        let upstream_req = route.upstream.request(
            Method::GET,
            policy_req.uri.path_and_query(),
            policy_req.headers.clone(),
            original_host.as_ref(),
            route.config.preserve_host,
            ProxyBody::empty(),
        );
        let stale_if_error = |now| {
            stale
                .as_ref()
                .filter(|s| s.within_stale_if_error(now))
                .cloned()
        };

        let res = match route.upstream.send(upstream_req).await {
            Ok(res) => res,
            Err(err) => {
                note_upstream_error(route, &err);
                let outcome = FillOutcome::Failed(err.kind());
                return match stale_if_error(SystemTime::now()) {
                    Some(stale) => (
                        outcome,
                        FillReply::Entry(stale, CacheStatus::stale_if_error(None)),
                    ),
                    None => (outcome, error_reply(err, fwd)),
                };
            }
        };
        let received_at = SystemTime::now();
        note_upstream_status(route, res.status());
        let (mut head, body) = res.into_parts();
        // Judged as stored: without the hop-by-hop headers (and those `Connection`
        // names), which the entry will not have. A `Vary` named there would be lost.
        let vary_hidden = policy::connection_names_vary(&head.headers);
        headers::strip_hop_by_hop(&mut head.headers);
        let status_code = head.status.as_u16();

        if let (StatusCode::NOT_MODIFIED, Some(stale)) = (head.status, stale) {
            match stale.renewed(&route.config, policy_req, &head, received_at) {
                Ok(mut renewed) => {
                    renewed.vary_values = vary_values(&renewed.vary, client_headers);
                    let entry = Arc::new(renewed);
                    proxy.cache.store(key, Arc::clone(&entry)).await;
                    return (
                        FillOutcome::Filled(Arc::clone(&entry)),
                        FillReply::Entry(entry, CacheStatus::revalidated()),
                    );
                }
                // The stored body is current, but may not be stored again (for this
                // request's credentials, or for what the 304 said): serve it, since
                // the client asked for no 304.
                Err(Some(reason)) => {
                    if !reason.is_request_specific() {
                        let ttl = route.config.hit_for_pass;
                        proxy.cache.mark_pass(fill_key, reason, ttl).await;
                    }
                    let status =
                        CacheStatus::pass(fwd, reason.as_str()).with_fwd_status(status_code);
                    return (
                        FillOutcome::Uncacheable(reason),
                        FillReply::Entry(Arc::clone(stale), status),
                    );
                }
                Err(None) => {}
            }
        }
        if head.status.is_server_error() {
            if let Some(stale) = stale_if_error(received_at) {
                let status = CacheStatus::stale_if_error(Some(status_code));
                return (
                    FillOutcome::Failed(FailureKind::Status),
                    FillReply::Entry(stale, status),
                );
            }
        }

        let verdict = if vary_hidden {
            Verdict::Pass(PassReason::VaryStar)
        } else {
            policy::evaluate(&route.config, policy_req, &head, received_at)
        };
        let too_large =
            content_length(&head.headers).is_some_and(|len| len > proxy.max_object_bytes);
        let lifetime = match verdict {
            Verdict::Store(lifetime) if !too_large => lifetime,
            Verdict::Pass(reason)
                if head.status.is_server_error() && !too_large && !reason.is_request_specific() =>
            {
                // An error is the same for everyone who asked now: share it, so a failing
                // upstream is not hit once per waiter, but do not store it.
                return match proxy.read_body(route, body).await {
                    Ok(BodyRead::Complete(bytes)) => {
                        let lifetime = policy::Lifetime::none(policy_req, &head, received_at);
                        let entry = match CacheEntry::new(head, bytes, lifetime, client_headers) {
                            Ok(entry) => Arc::new(entry),
                            Err(err) => return unframeable(route, err, fwd),
                        };
                        let status = CacheStatus::fetched(fwd, status_code, false);
                        (
                            FillOutcome::Shared(Arc::clone(&entry)),
                            FillReply::Entry(entry, status),
                        )
                    }
                    Ok(BodyRead::TooLarge(prefix, rest)) => {
                        headers::forward_response(&mut head.headers);
                        let res = Response::from_parts(head, ProxyBody::resumed(prefix, rest));
                        let status = CacheStatus::fetched(fwd, status_code, false);
                        (
                            FillOutcome::Uncacheable(PassReason::TooLarge),
                            FillReply::Response(res, status),
                        )
                    }
                    Err(err) => body_failed(route, err, fwd),
                };
            }
            verdict => {
                let reason = match verdict {
                    Verdict::Pass(reason) => reason,
                    Verdict::Store(_) => PassReason::TooLarge,
                };
                // Hit-for-pass under the fill key: later requests skip the lock. Not for
                // a pass this request caused (its credentials): one client must not
                // turn caching off for everyone.
                if !reason.is_request_specific() {
                    proxy
                        .cache
                        .mark_pass(fill_key, reason, route.config.hit_for_pass)
                        .await;
                }
                headers::forward_response(&mut head.headers);
                let res = Response::from_parts(head, ProxyBody::streaming(body));
                let status = CacheStatus::pass(fwd, reason.as_str()).with_fwd_status(status_code);
                return (
                    FillOutcome::Uncacheable(reason),
                    FillReply::Response(res, status),
                );
            }
        };

        match proxy.read_body(route, body).await {
            Ok(BodyRead::Complete(bytes)) => {
                let entry = match CacheEntry::new(head, bytes, *lifetime, client_headers) {
                    Ok(entry) => Arc::new(entry),
                    Err(err) => return unframeable(route, err, fwd),
                };
                proxy.cache.store(key, Arc::clone(&entry)).await;
                tracing::debug!(status = status_code, bytes = entry.body.len(), "stored");
                let status = CacheStatus::fetched(fwd, status_code, true);
                (
                    FillOutcome::Filled(Arc::clone(&entry)),
                    FillReply::Entry(entry, status),
                )
            }
            Ok(BodyRead::TooLarge(prefix, rest)) => {
                proxy
                    .cache
                    .mark_pass(fill_key, PassReason::TooLarge, route.config.hit_for_pass)
                    .await;
                headers::forward_response(&mut head.headers);
                let res = Response::from_parts(head, ProxyBody::resumed(prefix, rest));
                let status = CacheStatus::pass(fwd, PassReason::TooLarge.as_str())
                    .with_fwd_status(status_code);
                (
                    FillOutcome::Uncacheable(PassReason::TooLarge),
                    FillReply::Response(res, status),
                )
            }
            Err(err) => body_failed(route, err, fwd),
        }
    }
}

impl Proxy {
    async fn read_body(
        &self,
        route: &Route,
        body: Incoming,
    ) -> Result<BodyRead, crate::upstream::UpstreamError> {
        route.upstream.read_body(body, self.max_object_bytes).await
    }
}

/// A fill whose response body broke off: waiters and leader learn it failed.
fn body_failed(
    route: &Route,
    err: crate::upstream::UpstreamError,
    fwd: Fwd,
) -> (FillOutcome, FillReply) {
    note_upstream_error(route, &err);
    (FillOutcome::Failed(err.kind()), error_reply(err, fwd))
}

/// A response no cache may replay (an interim status, or content on a 204 or 304).
/// The policy stores no such status and hyper reads no such content, so this is an
/// upstream breaking HTTP: its waiters and leader get a 502, never its bytes.
fn unframeable(
    route: &Route,
    err: crate::cache::entry::Unframeable,
    fwd: Fwd,
) -> (FillOutcome, FillReply) {
    tracing::warn!(route = %route.config.name, %err, "upstream response cannot be framed");
    route.metrics.upstream_error(FailureKind::Protocol);
    let err = ProxyError::SharedFailure(FailureKind::Protocol);
    let status = CacheStatus::error(Some(fwd), err.detail());
    (
        FillOutcome::Failed(FailureKind::Protocol),
        FillReply::Response(error_response(&err), status),
    )
}

fn error_reply(err: crate::upstream::UpstreamError, fwd: Fwd) -> FillReply {
    let err = ProxyError::from(err);
    let status = CacheStatus::error(Some(fwd), err.detail());
    FillReply::Response(error_response(&err), status)
}

fn note_upstream_error(route: &Route, err: &crate::upstream::UpstreamError) {
    route.metrics.upstream_error(err.kind());
    route
        .upstream
        .faults
        .failure(&route.config.name, route.upstream.display(), err);
}

fn note_upstream_status(route: &Route, status: StatusCode) {
    if status.is_server_error() {
        route.metrics.upstream_error(FailureKind::Status);
        route
            .upstream
            .faults
            .failure(&route.config.name, route.upstream.display(), &status);
    } else {
        route
            .upstream
            .faults
            .success(&route.config.name, route.upstream.display());
    }
}

/// Why a request is not one for the cache at all, if it is not: a method other than
/// GET and HEAD, a route without caching, a `Range`, a body (RFC 9110 §9.3.1 gives a
/// GET body no meaning, but an origin may read it: the key does not), or a header that
/// rewrites the request at the origin.
fn bypass(route: &Route, head: &request::Parts, body: &Incoming) -> Option<CacheStatus> {
    let method_cacheable = head.method == Method::GET || head.method == Method::HEAD;
    if !method_cacheable {
        return Some(CacheStatus::bypass(Fwd::Method));
    }
    let status = CacheStatus::bypass(Fwd::Bypass);
    if !route.config.cache || head.headers.contains_key(header::RANGE) {
        Some(status)
    } else if !http_body::Body::is_end_stream(body) {
        Some(status.with_detail("request-body"))
    } else if client_request::rewrites_request(&head.headers) {
        Some(status.with_detail("rewriting-header"))
    } else {
        None
    }
}

/// Seconds of freshness left; negative when stale.
fn ttl_secs(entry: &CacheEntry, now: SystemTime) -> i64 {
    match entry.freshness(now) {
        Freshness::Fresh { ttl } => ttl.as_secs() as i64,
        Freshness::Stale { by } => -(by.as_secs() as i64),
    }
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A response from a cached entry for this request: `304` when the client's
/// conditions hold, no body for `HEAD`, `Age` always. (Public for the benchmarks.)
pub fn respond(req: &request::Parts, entry: &CacheEntry) -> Response<ProxyBody> {
    let now = SystemTime::now();
    let mut res = if entry.satisfies_conditional(&req.headers) {
        let mut res = Response::new(ProxyBody::empty());
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        *res.headers_mut() = entry.not_modified_headers();
        res
    } else {
        let body = if req.method == Method::HEAD {
            ProxyBody::empty()
        } else {
            ProxyBody::full(entry.body.clone())
        };
        let mut res = Response::new(body);
        *res.status_mut() = entry.status;
        *res.headers_mut() = entry.headers.clone();
        res
    };
    res.headers_mut()
        .insert(header::AGE, HeaderValue::from(entry.age(now)));
    res.headers_mut().append(header::VIA, headers::VIA);
    res
}

/// Adds the `Cache-Status` header; every response passes here once.
fn finish(mut res: Response<ProxyBody>, status: &CacheStatus) -> Response<ProxyBody> {
    res.headers_mut().insert(
        header::HeaderName::from_static("cache-status"),
        status.header_value(),
    );
    res
}
