//! The request path: every step a request takes, top to bottom.
//!
//! route → key → lookup (local tier) → fresh: serve | stale within SWR: serve and
//! refresh once in the background | hit-for-pass: forward | miss or stale: fill lock →
//! (holder) fetch in a task of its own, store, wake waiters → respond | (waiter) wait
//! for the holder's outcome → respond.
//!
//! The fetch for a fill runs in a spawned `Fill` task, not in the client's request
//! future, so a client that disconnects does not cancel the fetch that others wait on;
//! and if the task dies anyway, its dropped permit wakes the waiters to take over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::header::{self, HeaderValue};
use http::{request, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tracing::{field, Instrument, Span};

use crate::body::ProxyBody;
use crate::cache::entry::CacheEntry;
use crate::cache::policy::{self, PassReason, Verdict};
use crate::cache::shared::SharedCache;
use crate::cache::{Cache, CacheKey, Freshness, LookupOutcome};
use crate::config::{Config, OnWaitTimeout};
use crate::error::{error_response, ProxyError};
use crate::fleet::{Claim, Coordinator, Fleet};
use crate::headers;
use crate::lock::{FillOutcome, FillPermit, LocalFillLock, LockAttempt};
use crate::metrics::{Metrics, UpstreamReason};
use crate::route::{self, Route, RouteTable};
use crate::status::{CacheStatus, Fwd};
use crate::upstream::{BodyRead, FailureKind, Upstream};

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
    metrics: Arc<Metrics>,
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
            .map(|rc| Route {
                config: rc.clone(),
                upstream: Upstream::new(rc),
                metrics: metrics.for_route(&rc.name),
            })
            .collect();
        let local_ttl = config.redis.as_ref().map(|r| r.local_ttl);
        let mut cache = Cache::new(config.cache.max_bytes, local_ttl);
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
            metrics,
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

    /// Purges what a GET of `path_and_query` on route `route` (for `host`) would be
    /// served from, in every tier and every instance of the fleet.
    pub async fn purge_url(
        &self,
        route: &str,
        host: Option<&str>,
        path_and_query: &str,
        soft: bool,
    ) -> Result<(), PurgeError> {
        let route = self
            .routes
            .iter()
            .find(|r| r.config.name == route)
            .ok_or_else(|| PurgeError::UnknownRoute(route.to_string()))?;
        let uri: http::Uri = path_and_query
            .parse()
            .map_err(|_| PurgeError::BadPath(path_and_query.to_string()))?;
        if !uri.path().starts_with('/') {
            return Err(PurgeError::BadPath(path_and_query.to_string()));
        }
        let host = match (host, &route.config.host) {
            (Some(h), _) => Some(h.to_ascii_lowercase()),
            (None, Some(h)) => Some(h.clone()),
            (None, None) => return Err(PurgeError::HostRequired),
        };
        let key = CacheKey::for_request(
            &route.config,
            host.as_deref(),
            &uri,
            &http::HeaderMap::new(),
        );
        tracing::info!(%key, soft, "purge");
        self.cache.purge(&key, soft).await;
        Ok(())
    }

    /// Purges every entry whose route's `tag_header` listed `tag`; returns how many
    /// cache keys that was.
    pub async fn purge_tag(&self, tag: &str, soft: bool) -> usize {
        let tag_header = |route: &str| {
            self.routes
                .iter()
                .find(|r| r.config.name == route)
                .and_then(|r| r.config.tag_header.clone())
        };
        let mut keys = self.cache.local().keys_tagged(tag, tag_header);
        if let Some(shared) = self.cache.shared() {
            keys.extend(shared.keys_tagged(tag).await);
        }
        keys.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        keys.dedup();
        for key in &keys {
            self.cache.purge(key, soft).await;
        }
        tracing::info!(tag, soft, keys = keys.len(), "purge by tag");
        keys.len()
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
        let host = route::request_host(req.uri(), req.headers());
        let Some(route) = self.routes.find(host.as_deref(), req.uri().path()).cloned() else {
            tracing::debug!(
                host = host.as_deref().unwrap_or(""),
                path = req.uri().path(),
                "no route"
            );
            return error_response(&ProxyError::NoRoute);
        };
        // Debug level: a span per request costs on every hit; RUST_LOG=corral=debug shows it.
        let span = tracing::debug_span!(
            "request",
            route = %route.config.name,
            method = %req.method(),
            path = req.uri().path(),
            key = field::Empty,
            cache = field::Empty,
        );
        let this = Arc::clone(self);
        async move {
            let (res, status) = this.serve(&route, req, host.as_deref(), client).await;
            route.metrics.served(status.served);
            Span::current().record("cache", status.served.as_str());
            tracing::debug!(status = res.status().as_u16(), "served");
            finish(res, &status)
        }
        .instrument(span)
        .await
    }

    /// The fast path's whole request path: a `GET` or `HEAD` whose route caches, with a
    /// fresh entry in the local cache that the client's conditionals do not turn into a
    /// `304`. Counted as a hit. `None`: the request takes [`Proxy::handle`], which
    /// decides everything else (and may still find a hit, in the shared tier).
    pub fn local_hit(&self, req: &request::Parts) -> Option<LocalHit> {
        if !(req.method == Method::GET || req.method == Method::HEAD)
            || req.headers.contains_key(header::RANGE)
        {
            return None;
        }
        let host = route::request_host(&req.uri, &req.headers);
        let route = self.routes.find(host.as_deref(), req.uri.path())?;
        if !route.config.cache {
            return None;
        }
        let key = CacheKey::for_request(&route.config, host.as_deref(), &req.uri, &req.headers);
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
        req: Request<Incoming>,
        host: Option<&str>,
        client: SocketAddr,
    ) -> (Response<ProxyBody>, CacheStatus) {
        let (head, body) = req.into_parts();
        let original_host = head.headers.get(header::HOST).cloned().or_else(|| {
            head.uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let req = ClientRequest {
            head,
            original_host,
            client: client.ip(),
        };

        let method_cacheable = req.head.method == Method::GET || req.head.method == Method::HEAD;
        if !route.config.cache || !method_cacheable || req.head.headers.contains_key(header::RANGE)
        {
            let fwd = if method_cacheable {
                Fwd::Bypass
            } else {
                Fwd::Method
            };
            return self
                .pass(
                    route,
                    &req,
                    ProxyBody::streaming(body),
                    CacheStatus::bypass(fwd),
                )
                .await;
        }
        drop(body); // a GET or HEAD body has no meaning for the cache (RFC 9110 §9.3.1)

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
            // The fill task panicked; its permit has already woken the waiters.
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
        let upstream_req = route.upstream.request(
            req.head.method.clone(),
            req.head.uri.path_and_query(),
            req.forwarded_headers(),
            req.original_host.as_ref(),
            route.config.preserve_host,
            body,
        );
        match route.upstream.send(upstream_req).await {
            Ok(res) => {
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
            Err(err) => {
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

/// Why a purge request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("no route named {0:?}")]
    UnknownRoute(String),
    #[error("{0:?} is not a path (with optional query) starting with '/'")]
    BadPath(String),
    #[error("host= is required: the route matches any host, and the host is part of the key")]
    HostRequired,
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

/// One fetch of a key from the upstream, owned by a spawned task.
struct Fill {
    proxy: Arc<Proxy>,
    route: Arc<Route>,
    /// The primary key (where the entry, or its `Vary` index, is stored).
    key: CacheKey,
    permit: FillPermit,
    stale: Option<Arc<CacheEntry>>,
    fwd: Fwd,
    reason: UpstreamReason,
    /// The request as the cache policy sees it (the client's URI, forwarded headers).
    policy_req: request::Parts,
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
        let (mut policy_req, ()) = Request::get(req.head.uri.clone())
            .body(())
            .expect("a valid URI")
            .into_parts();
        policy_req.headers = headers;
        Fill {
            proxy: Arc::clone(proxy),
            route: Arc::clone(route),
            key,
            permit,
            stale,
            fwd,
            reason,
            policy_req,
            original_host: req.original_host.clone(),
        }
    }

    /// Fetches, decides, stores, and tells the waiters and the leader (if any).
    ///
    /// Order matters: the entry is stored before the permit completes, so a request
    /// that finds the key unlocked finds the entry.
    async fn run(self, reply: Option<oneshot::Sender<FillReply>>) {
        let send = |r: FillReply| {
            if let Some(reply) = reply {
                // The leader may have gone; the waiters were told through the permit.
                let _ = reply.send(r);
            }
        };
        let fill_key = self.permit.key().clone();
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
                    &fill_key,
                    self.reason == UpstreamReason::Refresh,
                )
                .await
            {
                Claim::Lead(lease) => lease,
                Claim::Done(outcome) => {
                    if let FillOutcome::Uncacheable(reason) = &outcome {
                        // Hit-for-pass here too: later requests skip both locks.
                        let ttl = self.route.config.hit_for_pass;
                        self.proxy.cache.mark_pass(&fill_key, *reason, ttl).await;
                    }
                    let reply = self.remote_reply(&outcome).await;
                    self.permit.complete(outcome);
                    return send(reply);
                }
            },
        };
        // While the fetch runs, keep the fleet lease alive so a slow upstream does not
        // lose it; if it is lost anyway, the fenced write still guards the entry.
        let extender = fleet
            .as_ref()
            .zip(lease.clone())
            .map(|(fleet, lease)| tokio::spawn(Arc::clone(fleet).keep_alive(lease)));

        let (outcome, reply) = self.fetch(&fill_key).await;

        if let Some(extender) = extender {
            extender.abort();
        }
        if let Some(fleet) = &fleet {
            let fence = lease.as_ref().map_or(0, |l| l.fence);
            fleet
                .publish_outcome(&self.route, &fill_key, &outcome, fence)
                .await;
            if let Some(lease) = lease {
                fleet.release(lease).await;
            }
        }
        self.permit.complete(outcome);
        send(reply);
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
        let status_code = head.status.as_u16();

        if head.status == StatusCode::NOT_MODIFIED {
            if let Some(renewed) = stale
                .as_ref()
                .and_then(|s| s.renewed(&route.config, policy_req, &head, received_at))
            {
                let entry = Arc::new(renewed);
                proxy.cache.store(key, Arc::clone(&entry)).await;
                return (
                    FillOutcome::Filled(Arc::clone(&entry)),
                    FillReply::Entry(entry, CacheStatus::revalidated()),
                );
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

        let verdict = policy::evaluate(&route.config, policy_req, &head, received_at);
        let too_large =
            content_length(&head.headers).is_some_and(|len| len > proxy.max_object_bytes);
        let lifetime = match verdict {
            Verdict::Store(lifetime) if !too_large => lifetime,
            Verdict::Pass(_) if head.status.is_server_error() && !too_large => {
                // An error is the same for everyone who asked now: share it, so a failing
                // upstream is not hit once per waiter, but do not store it.
                return match proxy.read_body(route, body).await {
                    Ok(BodyRead::Complete(bytes)) => {
                        let lifetime = policy::Lifetime::none(policy_req, &head, received_at);
                        let entry =
                            match CacheEntry::new(head, bytes, lifetime, &policy_req.headers) {
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
                // Hit-for-pass under the fill key: later requests skip the lock.
                proxy
                    .cache
                    .mark_pass(fill_key, reason, route.config.hit_for_pass)
                    .await;
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
                let entry = match CacheEntry::new(head, bytes, *lifetime, &policy_req.headers) {
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
