//! The fill protocol: who fetches a missing or stale key from the upstream, and how
//! everyone else learns the outcome.
//!
//! In this process, a lock attempt on a key either grants a [`FillPermit`] (this
//! request leads the fill) or returns a [`FillWaiter`] (another request already does)
//! ([`permit`]). The leader's fill runs in a task of its own ([`task`]), so a client
//! that disconnects does not cancel the fetch that others wait on. In fleet mode the
//! task first claims the key across the fleet ([`coordinator`], over the fleet lock of
//! [`lock`]): only a local permit holder contends for the distributed lock. The task
//! fetches ([`fetch`]), stores, and ends the fill with one [`FillOutcome`] that every
//! waiter receives; its leader gets a [`LeaderReply`] besides, which may hold what
//! cannot be shared (the upstream's response when it was not stored).
//!
//! A permit dropped without an outcome (its task panicked or was aborted) tells the
//! waiters `HolderFailed`, so one of them takes over instead of hanging.

pub(crate) mod coordinator;
pub(crate) mod early;
mod fetch;
pub mod lock;
pub(crate) mod permit;
mod task;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Response;

use crate::cache::{CacheEntry, PassReason};
use crate::config::OnWaitTimeout;
use crate::http::body::ProxyBody;
use crate::http::cache_status::{CacheStatus, Fwd};
use crate::metrics::{RouteMetrics, UpstreamReason};
use crate::route::Route;
use crate::upstream::cap::Priority;
use crate::upstream::FailureKind;

pub use permit::FillPermit;
pub use permit::FillWaiter;
pub use permit::LocalFillLock;
pub(crate) use task::{FillJob, Filler};

/// The result of asking to fill a key.
pub(crate) enum LockAttempt {
    Acquired(FillPermit),
    Held(FillWaiter),
}

/// How a fill ended, as told to the requests that waited on it.
#[derive(Clone, Debug)]
pub(crate) enum FillOutcome {
    /// The entry was stored; serve it.
    Filled(Arc<CacheEntry>),
    /// The response may not be stored but is the same for everyone who asked at the
    /// same time (an upstream error response); serve it, do not store it.
    Shared(Arc<CacheEntry>),
    /// The response is not cacheable (and possibly personal): go upstream yourself.
    Uncacheable(PassReason),
    /// The upstream could not be reached or did not answer in time.
    Failed(FailureKind),
    /// The filling task went away without an outcome; try to fill again.
    HolderFailed,
    /// A background refresh found another instance filling the key and left it to
    /// that one; try to fill again (and so wait for it).
    Elsewhere,
}

/// What the request that led a fill serves.
pub(crate) enum LeaderReply {
    /// This entry (stored, shared, or stale on error) with this status.
    Entry(Arc<CacheEntry>, CacheStatus),
    /// This response as is (the upstream's, not stored), with this status.
    Response(Response<ProxyBody>, CacheStatus),
    /// The fill failed this way: an error response, with this status.
    Failed(FailureKind, CacheStatus),
    /// Another instance found the response uncacheable: fetch it yourself.
    Pass(CacheStatus),
}

impl LeaderReply {
    /// The reply when the fill failed: the stale entry within its `stale-if-error`
    /// window, else the error. `fwd_status`: the upstream's status, if it sent one.
    pub(crate) fn stale_or_failed(
        stale: Option<&Arc<CacheEntry>>,
        kind: FailureKind,
        fwd: Fwd,
        fwd_status: Option<u16>,
    ) -> LeaderReply {
        match stale_if_error(stale, SystemTime::now()) {
            Some(stale) => LeaderReply::Entry(stale, CacheStatus::stale_if_error(fwd_status)),
            None => LeaderReply::Failed(kind, CacheStatus::error(Some(fwd), kind)),
        }
    }

    /// The same reply, for a request that waited on another's fill.
    pub(crate) fn collapsed(self) -> LeaderReply {
        match self {
            LeaderReply::Entry(entry, status) => LeaderReply::Entry(entry, status.collapsed()),
            LeaderReply::Response(res, status) => LeaderReply::Response(res, status.collapsed()),
            LeaderReply::Failed(kind, status) => LeaderReply::Failed(kind, status.collapsed()),
            LeaderReply::Pass(status) => LeaderReply::Pass(status.collapsed()),
        }
    }
}

/// The stale entry, if `now` is within its `stale-if-error` window: what a request
/// whose fill failed serves instead of the error.
pub(crate) fn stale_if_error(
    stale: Option<&Arc<CacheEntry>>,
    now: SystemTime,
) -> Option<Arc<CacheEntry>> {
    stale.filter(|s| s.within_stale_if_error(now)).cloned()
}

/// Why a fill goes upstream; a background refresh does not wait for another instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FillKind {
    /// A miss, fetched while its clients wait.
    Miss,
    /// A stale entry, revalidated or refetched while its clients wait.
    Revalidate,
    /// A stale entry refreshed in the background (stale-while-revalidate).
    Refresh,
    /// A fresh entry refreshed in the background before it expires (`early`): in
    /// the fleet, an entry newer than it in the shared tier is adopted instead.
    EarlyRefresh,
}

impl FillKind {
    fn upstream_reason(self) -> UpstreamReason {
        match self {
            FillKind::Miss => UpstreamReason::Fill,
            FillKind::Revalidate => UpstreamReason::Revalidate,
            FillKind::Refresh => UpstreamReason::Refresh,
            FillKind::EarlyRefresh => UpstreamReason::EarlyRefresh,
        }
    }

    /// Where the fill waits under the route's upstream caps: refreshes of cached
    /// entries go before new keys.
    pub(crate) fn priority(self) -> Priority {
        match self {
            FillKind::Miss => Priority::Request,
            FillKind::Revalidate | FillKind::Refresh | FillKind::EarlyRefresh => Priority::Refresh,
        }
    }

    /// Whether nobody waits on the fill (its client was served already).
    pub(crate) fn is_background(self) -> bool {
        matches!(self, FillKind::Refresh | FillKind::EarlyRefresh)
    }
}

/// How long a request waits on another's fill, and what it does when that runs out:
/// one route's settings, decided in one place for local and fleet-wide waits.
pub(crate) struct WaitPolicy<'a> {
    pub(crate) timeout: Duration,
    on_timeout: OnWaitTimeout,
    metrics: &'a RouteMetrics,
}

impl WaitPolicy<'_> {
    pub(crate) fn of(route: &Route) -> WaitPolicy<'_> {
        WaitPolicy {
            // A fill may first wait for its upstream slot: its followers wait as long
            // again, or under a full queue each would give up and fetch on its own.
            timeout: route.config.wait_timeout
                + route
                    .config
                    .upstream_caps
                    .map_or(Duration::ZERO, |caps| caps.queue_timeout),
            on_timeout: route.config.on_wait_timeout,
            metrics: &route.metrics,
        }
    }

    /// The wait ran out: counted, and what the route says to do.
    pub(crate) fn timed_out(&self) -> OnWaitTimeout {
        // Counted, not logged at warn: under a slow upstream every waiter gets here.
        self.metrics.wait_timeout();
        tracing::debug!(wait_timeout = ?self.timeout, "gave up waiting for another request's fetch");
        self.on_timeout
    }
}
