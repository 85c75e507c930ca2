//! The cache path of a `GET` or `HEAD`, as explicit phases (as Pingora's `CachePhase`):
//! look up → serve what is servable, or → miss: lead the fill or wait for it → serve
//! its outcome, or look up again (a fill that left nothing for this request).

use std::sync::Arc;
use std::time::SystemTime;

use http::{Request, Response};
use tracing::Instrument;

use super::answer::{reply_response, respond, ttl_secs};
use super::error::{error_response, ProxyError};
use super::{ClientRequest, Proxy};
use crate::cache::key::keyed_target;
use crate::cache::policy;
use crate::cache::{CacheEntry, CacheKey, LookupOutcome};
use crate::config::OnWaitTimeout;
use crate::fill::early::EarlyRefresh;
use crate::fill::{
    stale_if_error, FillJob, FillKind, FillOutcome, FillPermit, FillWaiter, LeaderReply,
    LocalFillLock, LockAttempt, WaitPolicy,
};
use crate::http::body::ProxyBody;
use crate::http::cache_status::{CacheStatus, Detail, Fwd};
use crate::http::headers;
use crate::route::Route;
use crate::upstream::FailureKind;

/// How often one request looks the key up (again after a holder failed or a filled
/// variant did not match it) before it goes upstream on its own.
const MAX_ATTEMPTS: usize = 4;

/// Where a cacheable request stands; each step takes a phase and returns the next.
enum CachePhase {
    /// Look the key up: first, or again after a fill it waited on left nothing for it
    /// (`waited`: it has waited on a fill already, so its answer is `collapsed`).
    Lookup { waited: bool },
    /// Nothing servable found: lead the fill, or wait for the one running.
    Miss(Miss),
    /// Waiting on another request's fill.
    Waiting(Miss, FillWaiter),
    /// Answered.
    Done(Response<ProxyBody>, CacheStatus),
}

/// What a miss knows.
struct Miss {
    /// The key a fill uses: the variant's when the object is known to vary.
    fill_key: CacheKey,
    /// The expired entry, revalidated by the fill and served if it fails.
    stale: Option<Arc<CacheEntry>>,
    fwd: Fwd,
    waited: bool,
}

impl Proxy {
    /// The cache path for a GET or HEAD.
    pub(super) async fn serve_cacheable(
        self: &Arc<Self>,
        route: &Arc<Route>,
        req: &ClientRequest,
        key: CacheKey,
    ) -> (Response<ProxyBody>, CacheStatus) {
        let mut phase = CachePhase::Lookup { waited: false };
        let mut lookups = 0;
        loop {
            phase = match phase {
                CachePhase::Lookup { .. } if lookups == MAX_ATTEMPTS => {
                    let status = CacheStatus::pass(Fwd::Miss, Detail::RetriesExhausted);
                    return self.pass(route, req, ProxyBody::empty(), status).await;
                }
                CachePhase::Lookup { waited } => {
                    lookups += 1;
                    self.look_up(route, req, &key, waited).await
                }
                CachePhase::Miss(miss) => self.take_fill(route, req, &key, miss).await,
                CachePhase::Waiting(miss, waiter) => {
                    self.await_fill(route, req, miss, waiter).await
                }
                CachePhase::Done(res, status) => return (res, status),
            };
        }
    }

    /// Looks the key up in the tiers: a fresh entry, a hit-for-pass mark and a stale
    /// entry within `stale-while-revalidate` answer at once; anything else is a miss.
    async fn look_up(
        self: &Arc<Self>,
        route: &Arc<Route>,
        req: &ClientRequest,
        key: &CacheKey,
        waited: bool,
    ) -> CachePhase {
        let now = SystemTime::now();
        let lookup = self.cache().lookup(key, &req.head.headers, now).await;
        let stale = match lookup.outcome {
            LookupOutcome::Fresh(entry) => {
                let mut status = CacheStatus::hit(ttl_secs(&entry, now));
                if starts_early_refresh(route, &req.head.headers, &entry, now) {
                    let kind = FillKind::EarlyRefresh;
                    if self.refresh_in_background(route, req, key, &lookup.fill_key, &entry, kind) {
                        status = status.with_detail(Detail::EarlyRefresh);
                    }
                }
                return CachePhase::Done(respond(&req.head, &entry), status);
            }
            LookupOutcome::Pass => {
                let status = CacheStatus::pass(Fwd::UriMiss, Detail::HitForPass);
                let (res, status) = self.pass(route, req, ProxyBody::empty(), status).await;
                return CachePhase::Done(res, status);
            }
            LookupOutcome::Stale(entry) if entry.within_stale_while_revalidate(now) => {
                let kind = FillKind::Refresh;
                self.refresh_in_background(route, req, key, &lookup.fill_key, &entry, kind);
                let status = CacheStatus::stale_while_revalidate(-ttl_secs(&entry, now));
                return CachePhase::Done(respond(&req.head, &entry), status);
            }
            LookupOutcome::Stale(entry) => Some(entry),
            LookupOutcome::Miss => None,
        };
        let fwd = match (&stale, lookup.vary_miss) {
            (Some(_), _) => Fwd::Stale,
            (None, true) => Fwd::VaryMiss,
            (None, false) => Fwd::Miss,
        };
        CachePhase::Miss(Miss {
            fill_key: lookup.fill_key,
            stale,
            fwd,
            waited,
        })
    }

    /// Takes the fill lock: leads the fill, or waits for the one running.
    async fn take_fill(
        self: &Arc<Self>,
        route: &Arc<Route>,
        req: &ClientRequest,
        key: &CacheKey,
        miss: Miss,
    ) -> CachePhase {
        // Without coalescing (a baseline to measure it against), every request gets
        // a permit of its own: no one waits, everyone fetches.
        let attempt = if route.config.coalesce {
            self.fills.acquire(&miss.fill_key)
        } else {
            LocalFillLock::new().acquire(&miss.fill_key)
        };
        let permit = match attempt {
            LockAttempt::Acquired(permit) => permit,
            LockAttempt::Held(waiter) => return CachePhase::Waiting(miss, waiter),
        };
        // A fill of this instance may have ended between our lookup and the acquire
        // (it stores before it frees the key). The local tier is enough: a fill of
        // another instance is found by the fleet claim's first attempt, in the same
        // round trip as the lock. (Without coalescing there is no claim, and every
        // request fetches anyway.)
        let now = SystemTime::now();
        if let Some(entry) = self.cache().local_fresh(key, &req.head.headers, now) {
            permit.complete(FillOutcome::Filled(Arc::clone(&entry)));
            let status = CacheStatus::hit(ttl_secs(&entry, now));
            return CachePhase::Done(respond(&req.head, &entry), status);
        }
        let waited = miss.waited;
        let (res, status) = self.lead(route, req, key, permit, miss).await;
        CachePhase::Done(res, if waited { status.collapsed() } else { status })
    }

    /// This request holds the fill: the fill task fetches, and this request answers
    /// from its reply. If this client goes away, the task still completes for the
    /// waiters.
    async fn lead(
        self: &Arc<Self>,
        route: &Arc<Route>,
        req: &ClientRequest,
        key: &CacheKey,
        permit: FillPermit,
        miss: Miss,
    ) -> (Response<ProxyBody>, CacheStatus) {
        let kind = match miss.stale {
            Some(_) => FillKind::Revalidate,
            None => FillKind::Miss,
        };
        let job = fill_job(route, req, key, miss.stale, miss.fwd, kind);
        match self.filler.spawn(job, permit).await {
            Ok(reply) => self.answer(route, req, reply).await,
            // The fill task was aborted (the runtime is shutting down); its dropped
            // permit has already woken the waiters. (A panic in it is caught: a Pass.)
            Err(_) => {
                let err = ProxyError::SharedFailure(FailureKind::Protocol);
                let status = CacheStatus::error(Some(miss.fwd), Detail::FillFailed);
                (error_response(&err), status)
            }
        }
    }

    /// The response for a fill's reply: the entry or response it names, its error, or
    /// (`Pass`) the request forwarded.
    async fn answer(
        &self,
        route: &Route,
        req: &ClientRequest,
        reply: LeaderReply,
    ) -> (Response<ProxyBody>, CacheStatus) {
        match reply_response(&req.head, reply) {
            Ok(answer) => answer,
            Err(status) => self.pass(route, req, ProxyBody::empty(), status).await,
        }
    }

    /// Waits for another request's fill, within the route's `wait_timeout`.
    async fn await_fill(
        self: &Arc<Self>,
        route: &Arc<Route>,
        req: &ClientRequest,
        miss: Miss,
        waiter: FillWaiter,
    ) -> CachePhase {
        route.metrics.coalesced_waiter();
        let wait = WaitPolicy::of(route);
        let outcome = tokio::time::timeout(wait.timeout, waiter.wait())
            .instrument(tracing::debug_span!("lock_wait"))
            .await;
        let Ok(outcome) = outcome else {
            let (res, status) = self.wait_timed_out(route, req, &miss, &wait).await;
            return CachePhase::Done(res, status);
        };
        let fwd = miss.fwd;
        let (res, status) = match outcome {
            FillOutcome::Filled(entry) if entry.matches_vary(&req.head.headers) => {
                let status = CacheStatus::fetched(fwd, entry.status().as_u16(), true);
                (respond(&req.head, &entry), status.collapsed())
            }
            // A variant for other header values, or the holder died (or left the key
            // to another instance): look again.
            FillOutcome::Filled(_) | FillOutcome::HolderFailed | FillOutcome::Elsewhere => {
                return CachePhase::Lookup { waited: true }
            }
            // The holder's own credentials kept its response out of the cache: a
            // request without them competes for the fill again.
            FillOutcome::Uncacheable(reason)
                if reason.waiters_retry()
                    && !policy::has_credentials(&route.config, &req.head.headers) =>
            {
                return CachePhase::Lookup { waited: true }
            }
            FillOutcome::Shared(entry) => {
                let status = CacheStatus::fetched(fwd, entry.status().as_u16(), false);
                (respond(&req.head, &entry), status.collapsed())
            }
            FillOutcome::Uncacheable(reason) => {
                let status = CacheStatus::pass(fwd, reason).collapsed();
                self.pass(route, req, ProxyBody::empty(), status).await
            }
            FillOutcome::Failed(kind) => {
                let reply = LeaderReply::stale_or_failed(miss.stale.as_ref(), kind, fwd, None);
                self.answer(route, req, reply.collapsed()).await
            }
        };
        CachePhase::Done(res, status)
    }

    /// The wait ran out: the stale entry within `stale-if-error`, else what the route's
    /// `on_wait_timeout` says.
    async fn wait_timed_out(
        &self,
        route: &Route,
        req: &ClientRequest,
        miss: &Miss,
        wait: &WaitPolicy<'_>,
    ) -> (Response<ProxyBody>, CacheStatus) {
        let decision = wait.timed_out();
        if let Some(stale) = stale_if_error(miss.stale.as_ref(), SystemTime::now()) {
            return (
                respond(&req.head, &stale),
                CacheStatus::stale_if_error(None),
            );
        }
        match decision {
            OnWaitTimeout::Fetch => {
                let status = CacheStatus::pass(miss.fwd, Detail::WaitTimeout);
                self.pass(route, req, ProxyBody::empty(), status).await
            }
            OnWaitTimeout::Error => {
                let err = ProxyError::WaitTimedOut(wait.timeout);
                let status = CacheStatus::error(Some(miss.fwd), err.detail());
                (error_response(&err), status)
            }
        }
    }

    /// Starts one background refresh (`kind`) of an entry, stale or (early refresh)
    /// about to be, unless a fill of its key is running here; whether it started.
    pub(super) fn refresh_in_background(
        &self,
        route: &Arc<Route>,
        req: &ClientRequest,
        key: &CacheKey,
        fill_key: &CacheKey,
        current: &Arc<CacheEntry>,
        kind: FillKind,
    ) -> bool {
        let Some(permit) = self.fills.try_acquire(fill_key) else {
            return false;
        };
        if kind == FillKind::EarlyRefresh {
            route.metrics.early_refresh();
        }
        // Its validators go with the fetch (a 304 renews it); a failure serves it.
        let current = Some(Arc::clone(current));
        let job = fill_job(route, req, key, current, Fwd::Stale, kind);
        // Nobody waits on its reply: the client was served the entry.
        drop(self.filler.spawn(job, permit));
        true
    }
}

/// Whether this hit starts `entry`'s early refresh: drawn due, from a request without
/// credentials (a refresh must be one anyone could make: a pass for this request
/// alone would leave the entry due), and the first to start this copy's.
pub(super) fn starts_early_refresh(
    route: &Route,
    headers: &http::HeaderMap,
    entry: &CacheEntry,
    now: SystemTime,
) -> bool {
    EarlyRefresh::of(&route.config).due_for(entry, now)
        && !policy::has_credentials(&route.config, headers)
        && entry.start_early_refresh()
}

/// The fill of `key` for this request: the request as the upstream gets it (the
/// target as keyed, forwarded headers without the client's conditionals, the stale
/// entry's validators).
fn fill_job(
    route: &Arc<Route>,
    req: &ClientRequest,
    key: &CacheKey,
    stale: Option<Arc<CacheEntry>>,
    fwd: Fwd,
    kind: FillKind,
) -> FillJob {
    let mut headers = req.forwarded_headers();
    headers::strip_conditionals(&mut headers);
    if let Some(stale) = &stale {
        stale.add_validators(&mut headers);
    }
    let (mut upstream, ()) = Request::new(()).into_parts();
    upstream.uri = keyed_target(&route.config, &req.head.uri);
    upstream.headers = headers;
    FillJob {
        route: Arc::clone(route),
        key: key.clone(),
        stale,
        fwd,
        kind,
        upstream,
        client_headers: req.head.headers.clone(),
        original_host: req.original_host.clone(),
    }
}
