//! The fill task: one fetch of a key from the upstream, run in a task of its own, so a
//! client that disconnects does not cancel the fetch that others wait on; in fleet
//! mode claimed across the fleet first, its outcome published after.
//!
//! A panic inside a fill is caught and ends it like an uncacheable response (the key is
//! passed upstream for `hit_for_pass`), so a bug cannot leave a key answering errors.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt as _;
use http::header::HeaderValue;
use http::{request, HeaderMap};
use tokio::sync::oneshot;
use tracing::Instrument;

use super::coordinator::{Adopt, Claim, Coordinator};
use super::{FillKind, FillOutcome, FillPermit, LeaderReply, WaitPolicy};
use crate::cache::{Cache, CacheEntry, CacheKey, PassReason};
use crate::http::cache_status::{CacheStatus, Fwd};
use crate::route::Route;
use crate::upstream::FailureKind;

/// What fills need from the proxy, and nothing else: the cache tiers, the fleet's
/// coordinator (fleet mode), and the largest body that may be stored.
pub(crate) struct Filler {
    pub(super) cache: Cache,
    fleet: Option<Arc<Coordinator>>,
    pub(super) max_object_bytes: u64,
}

/// One fill's request, as the proxy prepared it.
pub(crate) struct FillJob {
    pub(crate) route: Arc<Route>,
    /// The primary key (where the entry, or its `Vary` index, is stored).
    pub(crate) key: CacheKey,
    pub(crate) stale: Option<Arc<CacheEntry>>,
    pub(crate) fwd: Fwd,
    pub(crate) kind: FillKind,
    /// The request as the upstream and the cache policy see it: the target as keyed
    /// (query sorted or dropped as the route keys it), forwarded headers.
    pub(crate) upstream: request::Parts,
    /// The client's headers after clean-up: what lookups match `Vary` against, so
    /// what the entry's `Vary` values are taken from (not the forwarded set, which has
    /// corral's own `X-Forwarded-*`, `Via` and validators).
    pub(crate) client_headers: HeaderMap,
    pub(crate) original_host: Option<HeaderValue>,
}

/// How a fill ended: what its waiters are told, and what its leader serves.
pub(super) struct FillEnd {
    pub(super) outcome: FillOutcome,
    pub(super) reply: LeaderReply,
}

impl FillEnd {
    pub(super) fn new(outcome: FillOutcome, reply: LeaderReply) -> FillEnd {
        FillEnd { outcome, reply }
    }
}

/// Aborts a helper task when its owner ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Filler {
    pub(crate) fn new(
        cache: Cache,
        fleet: Option<Arc<Coordinator>>,
        max_object_bytes: u64,
    ) -> Filler {
        Filler {
            cache,
            fleet,
            max_object_bytes,
        }
    }

    pub(crate) fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Fleet mode's coordinator, when configured.
    pub(crate) fn coordinator(&self) -> Option<&Arc<Coordinator>> {
        self.fleet.as_ref()
    }

    /// Starts the fill of `job` under `permit` in a task of its own; the receiver gets
    /// the leader's reply (dropped unanswered only if the runtime aborts the task).
    pub(crate) fn spawn(
        self: &Arc<Self>,
        job: FillJob,
        permit: FillPermit,
    ) -> oneshot::Receiver<LeaderReply> {
        let (reply, answer) = oneshot::channel();
        let span = match job.kind {
            FillKind::Refresh => tracing::debug_span!("background_refresh"),
            FillKind::EarlyRefresh => tracing::debug_span!("early_refresh"),
            FillKind::Miss | FillKind::Revalidate => tracing::debug_span!("upstream"),
        };
        tokio::spawn(Arc::clone(self).run(job, permit, reply).instrument(span));
        answer
    }

    /// Fetches, decides, stores, and tells the waiters and the leader.
    ///
    /// Order matters: the entry is stored before the permit completes, so a request
    /// that finds the key unlocked finds the entry.
    ///
    /// A panic anywhere in the fill (a bug, or a value nobody foresaw) still ends it
    /// with an outcome: the key is marked hit-for-pass, so requests go upstream
    /// without this code path instead of failing one after another.
    async fn run(
        self: Arc<Self>,
        job: FillJob,
        permit: FillPermit,
        reply: oneshot::Sender<LeaderReply>,
    ) {
        let fill_key = permit.key().clone();
        let settled = AssertUnwindSafe(self.settle(&job, &fill_key))
            .catch_unwind()
            .await;
        let end = match settled {
            Ok(end) => end,
            Err(panic) => {
                let panic = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(key = %fill_key, %panic, "fill panicked; the key is passed upstream for hit_for_pass");
                let reason = PassReason::Internal;
                self.cache
                    .mark_pass(&fill_key, reason, job.route.config.hit_for_pass);
                let status = CacheStatus::pass(job.fwd, reason);
                FillEnd::new(FillOutcome::Uncacheable(reason), LeaderReply::Pass(status))
            }
        };
        permit.complete(end.outcome);
        // The leader may have gone (or never waited: a background refresh); the
        // waiters were told through the permit.
        let _ = reply.send(end.reply);
    }

    /// The fill itself, in the fleet when there is one.
    async fn settle(&self, job: &FillJob, fill_key: &CacheKey) -> FillEnd {
        let fleet = self.fleet.as_ref().filter(|_| job.route.config.coalesce);
        let Some(fleet) = fleet else {
            return self.fetch(job, fill_key).await;
        };
        let adopt = match (job.kind, &job.stale) {
            (FillKind::EarlyRefresh, Some(current)) => Adopt::NewerThan(Arc::clone(current)),
            _ => Adopt::FreshNow,
        };
        let lease = match fleet
            .claim(
                fill_key,
                &job.client_headers,
                &WaitPolicy::of(&job.route),
                job.kind.is_background(),
                adopt,
            )
            .await
        {
            Claim::Lead(lease) => lease,
            Claim::Done(outcome) => {
                if let FillOutcome::Uncacheable(reason) = &outcome {
                    // Hit-for-pass here too: later requests skip both locks.
                    self.mark_pass(job, fill_key, *reason);
                }
                let reply = remote_reply(&outcome, job);
                return FillEnd::new(outcome, reply);
            }
        };
        // While the fetch runs, keep the fleet lease alive so a slow upstream does not
        // lose it; if it is lost anyway, the fenced write still guards the entry. The
        // guard aborts it however the fetch ends, a panic included.
        let _extender = lease
            .clone()
            .map(|lease| AbortOnDrop(tokio::spawn(Arc::clone(fleet).keep_alive(lease))));

        let end = self.fetch(job, fill_key).await;

        fleet.finish(fill_key, &end.outcome, lease).await;
        end
    }
}

/// What the leader gets when another instance's fill ended it: what that instance's
/// waiters get.
fn remote_reply(outcome: &FillOutcome, job: &FillJob) -> LeaderReply {
    let fwd = job.fwd;
    match outcome {
        FillOutcome::Filled(entry) | FillOutcome::Shared(entry) => {
            let status = CacheStatus::fetched(fwd, entry.status().as_u16(), true).collapsed();
            LeaderReply::Entry(Arc::clone(entry), status)
        }
        FillOutcome::Uncacheable(reason) => {
            LeaderReply::Pass(CacheStatus::pass(fwd, *reason).collapsed())
        }
        FillOutcome::Failed(_) | FillOutcome::HolderFailed | FillOutcome::Elsewhere => {
            let kind = match outcome {
                FillOutcome::Failed(kind) => *kind,
                _ => FailureKind::Protocol,
            };
            LeaderReply::stale_or_failed(job.stale.as_ref(), kind, fwd, None).collapsed()
        }
    }
}
