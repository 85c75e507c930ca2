//! One fetch from the upstream and what it comes to: stored, shared with the waiters
//! but not stored (an error response), passed to the leader alone (not storable), or
//! failed (served stale within `stale-if-error` where there is a stale copy).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::http::body::UpstreamBody;
use http::{response, Method, Response, StatusCode};

use super::task::{FillEnd, FillJob, Filler};
use super::{early, stale_if_error, FillKind, FillOutcome, LeaderReply};
use crate::cache::policy::{self, Lifetime, PassReason, Verdict};
use crate::cache::{CacheEntry, CacheKey};
use crate::http::body::ProxyBody;
use crate::http::cache_status::CacheStatus;
use crate::http::headers;
use crate::upstream::{BodyRead, FailureKind, UpstreamError};

impl Filler {
    /// Fetches `job` from its upstream, decides, and stores locally (under the primary
    /// key; a hit-for-pass mark under `fill_key`).
    pub(super) async fn fetch(&self, job: &FillJob, fill_key: &CacheKey) -> FillEnd {
        let route = &job.route;
        route.metrics.upstream_request(job.kind.upstream_reason());
        // How long the entry takes to make (request to whole body), kept with it.
        let started = Instant::now();
        let upstream_req = route.upstream.request(
            Method::GET,
            job.upstream.uri.path_and_query(),
            job.upstream.headers.clone(),
            job.original_host.as_ref(),
            route.config.preserve_host,
            ProxyBody::empty(),
        );
        let res = match route
            .upstream
            .send(upstream_req, Some(job.kind.priority()))
            .await
        {
            Ok(res) => res,
            Err(err) => {
                route.note_upstream_error(&err);
                let kind = err.kind();
                let reply = LeaderReply::stale_or_failed(job.stale.as_ref(), kind, job.fwd, None);
                return FillEnd::new(FillOutcome::Failed(kind), reply);
            }
        };
        let received_at = SystemTime::now();
        route.note_upstream_status(res.status());
        let (mut head, body) = res.into_parts();
        // Judged as stored: without the hop-by-hop headers (and those `Connection`
        // names), which the entry will not have. A `Vary` named there would be lost.
        let vary_hidden = policy::connection_names_vary(&head.headers);
        headers::strip_hop_by_hop(&mut head.headers);

        if head.status == StatusCode::NOT_MODIFIED {
            if let Some(end) = self.revalidated(job, fill_key, &head, (received_at, started)) {
                return end;
            }
        }
        if head.status.is_server_error() {
            if let Some(stale) = stale_if_error(job.stale.as_ref(), received_at) {
                let status = CacheStatus::stale_if_error(Some(head.status.as_u16()));
                let reply = LeaderReply::Entry(stale, status);
                return FillEnd::new(FillOutcome::Failed(FailureKind::Status), reply);
            }
        }
        let verdict = if vary_hidden {
            Verdict::Pass(PassReason::VaryStar)
        } else {
            policy::evaluate(&route.config, &job.upstream, &head, received_at)
        };
        let too_large =
            content_length(&head.headers).is_some_and(|len| len > self.max_object_bytes);
        match verdict {
            Verdict::Store(lifetime) if !too_large => {
                self.store(job, fill_key, head, body, (*lifetime, started))
                    .await
            }
            Verdict::Pass(reason)
                if head.status.is_server_error() && !too_large && !reason.is_request_specific() =>
            {
                self.share_error(job, head, body, (received_at, started))
                    .await
            }
            Verdict::Pass(reason) => self.pass_on(job, fill_key, head, body, reason),
            Verdict::Store(_) => self.pass_on(job, fill_key, head, body, PassReason::TooLarge),
        }
    }

    /// A `304` for the stale entry: the entry renewed and stored, or (when it may not
    /// be stored again, for this request's credentials or for what the 304 said)
    /// served once to the leader, since its client asked for no 304. `None`: the 304
    /// renews nothing; it is judged like any response.
    fn revalidated(
        &self,
        job: &FillJob,
        fill_key: &CacheKey,
        head: &response::Parts,
        (received_at, started): (SystemTime, Instant),
    ) -> Option<FillEnd> {
        let stale = job.stale.as_ref()?;
        match stale.renewed(&job.route.config, &job.upstream, head, received_at) {
            Ok(renewed) => {
                let renewed = refreshed(job, renewed.fetched_in(started.elapsed()));
                let entry = Arc::new(renewed.for_request(&job.client_headers));
                self.cache.store(&job.key, Arc::clone(&entry));
                let reply = LeaderReply::Entry(Arc::clone(&entry), CacheStatus::revalidated());
                Some(FillEnd::new(FillOutcome::Filled(entry), reply))
            }
            Err(Some(reason)) => {
                self.mark_pass(job, fill_key, reason);
                let status =
                    CacheStatus::pass(job.fwd, reason).with_fwd_status(head.status.as_u16());
                let reply = LeaderReply::Entry(Arc::clone(stale), status);
                Some(FillEnd::new(FillOutcome::Uncacheable(reason), reply))
            }
            Err(None) => None,
        }
    }

    /// A storable response: read whole, stored, served to all.
    async fn store(
        &self,
        job: &FillJob,
        fill_key: &CacheKey,
        head: response::Parts,
        body: UpstreamBody,
        (lifetime, started): (Lifetime, Instant),
    ) -> FillEnd {
        let code = head.status.as_u16();
        match self.read_body(job, body).await {
            Ok(BodyRead::Complete(bytes)) => {
                let Some(entry) = entry(job, head, bytes, (lifetime, started)) else {
                    return unframeable(job);
                };
                self.cache.store(&job.key, Arc::clone(&entry));
                tracing::debug!(status = code, bytes = entry.body().len(), "stored");
                let status = CacheStatus::fetched(job.fwd, code, true);
                let reply = LeaderReply::Entry(Arc::clone(&entry), status);
                FillEnd::new(FillOutcome::Filled(entry), reply)
            }
            Ok(BodyRead::TooLarge(prefix, rest)) => {
                let reason = PassReason::TooLarge;
                self.mark_pass(job, fill_key, reason);
                let status = CacheStatus::pass(job.fwd, reason).with_fwd_status(code);
                let res = forwarded(head, ProxyBody::resumed(prefix, rest));
                FillEnd::new(
                    FillOutcome::Uncacheable(reason),
                    LeaderReply::Response(res, status),
                )
            }
            Err(err) => body_failed(job, err),
        }
    }

    /// An error response is the same for everyone who asked now: share it, so a failing
    /// upstream is not hit once per waiter, but do not store it.
    async fn share_error(
        &self,
        job: &FillJob,
        head: response::Parts,
        body: UpstreamBody,
        (received_at, started): (SystemTime, Instant),
    ) -> FillEnd {
        let code = head.status.as_u16();
        let status = CacheStatus::fetched(job.fwd, code, false);
        match self.read_body(job, body).await {
            Ok(BodyRead::Complete(bytes)) => {
                let lifetime = Lifetime::none(&job.upstream, &head, received_at);
                let Some(entry) = entry(job, head, bytes, (lifetime, started)) else {
                    return unframeable(job);
                };
                let reply = LeaderReply::Entry(Arc::clone(&entry), status);
                FillEnd::new(FillOutcome::Shared(entry), reply)
            }
            Ok(BodyRead::TooLarge(prefix, rest)) => {
                let res = forwarded(head, ProxyBody::resumed(prefix, rest));
                let outcome = FillOutcome::Uncacheable(PassReason::TooLarge);
                FillEnd::new(outcome, LeaderReply::Response(res, status))
            }
            Err(err) => body_failed(job, err),
        }
    }

    /// A response that may not be stored: streamed to the leader alone; the waiters go
    /// upstream themselves (or compete again).
    fn pass_on(
        &self,
        job: &FillJob,
        fill_key: &CacheKey,
        head: response::Parts,
        body: UpstreamBody,
        reason: PassReason,
    ) -> FillEnd {
        self.mark_pass(job, fill_key, reason);
        let status = CacheStatus::pass(job.fwd, reason).with_fwd_status(head.status.as_u16());
        let res = forwarded(head, ProxyBody::streaming(body));
        FillEnd::new(
            FillOutcome::Uncacheable(reason),
            LeaderReply::Response(res, status),
        )
    }

    /// The response body, read into memory up to `max_object_bytes`.
    async fn read_body(
        &self,
        job: &FillJob,
        body: UpstreamBody,
    ) -> Result<BodyRead, UpstreamError> {
        job.route
            .upstream
            .read_body(body, self.max_object_bytes)
            .await
    }

    /// Hit-for-pass under the fill key: later requests skip the lock. Not for a pass
    /// this request caused (its credentials): one client must not turn caching off for
    /// everyone. Not for an early refresh either: the copy it was to replace is still
    /// fresh, and serves until it expires (the miss then finds out again).
    pub(super) fn mark_pass(&self, job: &FillJob, fill_key: &CacheKey, reason: PassReason) {
        if !reason.is_request_specific() && job.kind != FillKind::EarlyRefresh {
            self.cache
                .mark_pass(fill_key, reason, job.route.config.hit_for_pass);
        }
    }
}

/// The upstream's response as the client gets it when it is not stored.
fn forwarded(mut head: response::Parts, body: ProxyBody) -> Response<ProxyBody> {
    headers::forward_response(&mut head.headers);
    Response::from_parts(head, body)
}

/// The entry for a response read whole; `None` for a response no cache may replay (an
/// interim status, or content on a 204 or 304). The policy stores no such status and
/// hyper reads no such content, so this is an upstream breaking HTTP: logged, counted.
fn entry(
    job: &FillJob,
    head: response::Parts,
    body: bytes::Bytes,
    (lifetime, started): (Lifetime, Instant),
) -> Option<Arc<CacheEntry>> {
    match CacheEntry::new(head, body, lifetime, &job.client_headers) {
        Ok(entry) => Some(Arc::new(refreshed(
            job,
            entry.fetched_in(started.elapsed()),
        ))),
        Err(err) => {
            tracing::warn!(route = %job.route.config.name, %err, "upstream response cannot be framed");
            job.route
                .metrics
                .upstream_error(FailureKind::Protocol.as_str());
            None
        }
    }
}

/// An early refresh's entry that does not renew the copy it replaces (see
/// [`early::renews`]) counts as refreshed already: otherwise every due hit would fetch
/// it again.
fn refreshed(job: &FillJob, entry: CacheEntry) -> CacheEntry {
    match (&job.stale, job.kind) {
        (Some(old), FillKind::EarlyRefresh) if !early::renews(old, &entry) => {
            entry.early_refreshed()
        }
        _ => entry,
    }
}

/// A fill whose response body broke off: waiters and leader learn it failed.
fn body_failed(job: &FillJob, err: UpstreamError) -> FillEnd {
    job.route.note_upstream_error(&err);
    let kind = err.kind();
    let reply = LeaderReply::Failed(kind, CacheStatus::error(Some(job.fwd), kind));
    FillEnd::new(FillOutcome::Failed(kind), reply)
}

/// A fill whose response no cache may replay: its waiters and leader get a 502, never
/// its bytes.
fn unframeable(job: &FillJob) -> FillEnd {
    let kind = FailureKind::Protocol;
    let reply = LeaderReply::Failed(kind, CacheStatus::error(Some(job.fwd), kind));
    FillEnd::new(FillOutcome::Failed(kind), reply)
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
