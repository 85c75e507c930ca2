//! What is in progress on a connection hyper serves: the requests whose responses are
//! not finished, so that a connection with none for `idle_timeout` is closed (HTTP/2
//! included, whose streams hyper never times out), and the requests dropped because
//! their client left before the response was ready (nginx's 499).
//!
//! A request is in progress from the service call until its response body is done or
//! dropped: a stream sending a long body is not idle.
//!
//! Requests in progress on the proxy port are also counted process-wide against
//! `max_requests` ([`RequestLimit`]): one HTTP/2 connection carries up to
//! `h2_max_concurrent_streams` requests, each of which may hold an upstream connection,
//! so the connection limit alone does not bound what clients make corral hold.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::{service_fn, Service};
use pin_project_lite::pin_project;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::http::body::{BodyError, ProxyBody};
use crate::metrics::ConnectionMetrics;
use crate::proxy::Proxy;

/// The process-wide bound on requests in progress on the proxy port.
///
/// `open` is taken with a compare-and-swap by whichever connection task begins a
/// request, never waiting (past the limit a request is refused at once), and given back
/// by the request's [`RequestSeat`] when its response ends, however it ends. An atomic,
/// not a semaphore: nothing ever waits for a seat. `refused` counts the refusals of the
/// episode in progress: the first logs its start, the next admission its end.
pub(crate) struct RequestLimit {
    /// Set at start and by a reload.
    max: AtomicUsize,
    open: AtomicUsize,
    refused: AtomicU64,
    metrics: ConnectionMetrics,
}

impl RequestLimit {
    pub(crate) fn new(max: usize, metrics: &ConnectionMetrics) -> Arc<RequestLimit> {
        Arc::new(RequestLimit {
            max: AtomicUsize::new(max),
            open: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            metrics: metrics.clone(),
        })
    }

    /// A new limit (a reload): requests in progress past it keep their seats; new ones
    /// wait for the count to fall below it.
    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// A seat for one more request, or `None` past the limit (counted, and logged when
    /// refusals start and when they end).
    fn seat(self: &Arc<Self>) -> Option<RequestSeat> {
        let max = self.max.load(Ordering::Relaxed);
        let below = |n: usize| (n < max).then_some(n + 1);
        if self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, below)
            .is_err()
        {
            self.metrics.request_refused();
            if self.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    max_requests = max,
                    "request limit reached; answering new requests 503 until some finish"
                );
            }
            return None;
        }
        // A load first: the common case (no episode) writes nothing shared.
        if self.refused.load(Ordering::Relaxed) > 0 {
            let refused = self.refused.swap(0, Ordering::Relaxed);
            if refused > 0 {
                tracing::info!(refused, "below max_requests again");
            }
        }
        Some(RequestSeat(Arc::clone(self)))
    }
}

/// One request's place under [`RequestLimit`], given back when dropped.
struct RequestSeat(Arc<RequestLimit>);

impl Drop for RequestSeat {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection's requests in progress.
///
/// `open` is written by the request guards only (a `watch`, so that the idle timer
/// wakes on every change and needs no lock of its own); the timer only reads it.
pub(super) struct Activity {
    open: watch::Sender<usize>,
    metrics: ConnectionMetrics,
    /// The process-wide limit its requests count against (none on the admin port).
    limit: Option<Arc<RequestLimit>>,
}

impl Activity {
    pub(super) fn new(
        metrics: &ConnectionMetrics,
        limit: Option<&Arc<RequestLimit>>,
    ) -> (Arc<Activity>, watch::Receiver<usize>) {
        let (open, watching) = watch::channel(0);
        let activity = Activity {
            open,
            metrics: metrics.clone(),
            limit: limit.cloned(),
        };
        (Arc::new(activity), watching)
    }

    fn begin(self: &Arc<Self>) -> InProgress {
        self.open.send_modify(|n| *n += 1);
        let seat = self.limit.as_ref().map(RequestLimit::seat);
        InProgress {
            activity: Arc::clone(self),
            answered: false,
            admitted: !matches!(seat, Some(None)),
            seat: seat.flatten(),
        }
    }
}

/// A request in progress; dropped when its response body is done (or never came).
struct InProgress {
    activity: Arc<Activity>,
    answered: bool,
    /// Under the request limit; a request past it is only answered `503`.
    admitted: bool,
    seat: Option<RequestSeat>,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        // Its place under the request limit first, so that whoever sees it counted
        // below as ended or aborted finds the place free.
        drop(self.seat.take());
        if !self.answered {
            // The request future was dropped before it produced a response: hyper
            // does that when the client resets its stream or closes the connection.
            self.activity.metrics.client_abort();
        }
        self.activity.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}

pin_project! {
    /// A response body that keeps its request in progress while it lives.
    pub(super) struct Tracked {
        #[pin]
        body: ProxyBody,
        request: InProgress,
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// `handle` as a hyper service whose requests count as in progress on `activity`. A
/// request past the request limit is answered by `refuse` (a `503`, at once, logged
/// where the port has an access log): `handle` never sees it.
pub(super) fn tracked<F, Fut, R>(
    activity: Arc<Activity>,
    handle: F,
    refuse: R,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Tracked>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Tracked>, Infallible>> + Send + 'static,
> + Send
       + 'static
where
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
    R: Fn(Request<Incoming>) -> Response<ProxyBody> + Send + 'static,
{
    service_fn(move |req| {
        let mut request = activity.begin();
        let response = if request.admitted {
            Ok(handle(req))
        } else {
            Err(refuse(req))
        };
        async move {
            let response = match response {
                Ok(response) => response.await,
                Err(refused) => refused,
            };
            request.answered = true;
            Ok(response.map(|body| Tracked { body, request }))
        }
    })
}

/// The proxy as a hyper service for requests from `peer` (`over_tls`: on a TLS
/// connection), in progress on `activity`.
pub(super) fn proxy_service(
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    over_tls: bool,
    activity: Arc<Activity>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Tracked>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Tracked>, Infallible>> + Send + 'static,
> + Send
       + 'static {
    let refuser = Arc::clone(&proxy);
    tracked(
        activity,
        move |req| {
            let proxy = Arc::clone(&proxy);
            async move { proxy.handle(req, peer, over_tls).await }
        },
        move |req| refuser.refuse_overloaded(&req, peer),
    )
}

/// Resolves once the connection has had no request in progress for `idle`, counting
/// from `since` (its accept) while none has begun.
pub(super) async fn idle(mut open: watch::Receiver<usize>, since: Instant, idle: Duration) {
    let mut deadline = since + idle;
    loop {
        if *open.borrow_and_update() == 0 {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                changed = open.changed() => {
                    if changed.is_err() {
                        return std::future::pending().await;
                    }
                }
            }
        } else if open.changed().await.is_err() {
            // The connection (which holds the sender) is gone: nothing left to time.
            return std::future::pending().await;
        }
        // A request began or ended: idleness, if it is back, counts from now.
        deadline = Instant::now() + idle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_no_request_in_progress() {
        let (activity, open) = Activity::new(&ConnectionMetrics::default(), None);
        let start = Instant::now();
        let timer = tokio::spawn(idle(open, start, Duration::from_secs(10)));
        let request = activity.begin();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!timer.is_finished(), "a request in progress is not idle");
        drop(request);
        let ended = Instant::now();
        timer.await.unwrap();
        assert_eq!(Instant::now() - ended, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_sends_a_request_is_idle_from_its_start() {
        let (_activity, open) = Activity::new(&ConnectionMetrics::default(), None);
        let start = Instant::now();
        idle(open, start, Duration::from_secs(10)).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(10));
    }

    #[test]
    fn requests_past_the_limit_are_refused_until_one_ends() {
        let limit = RequestLimit::new(2, &ConnectionMetrics::default());
        let (one, _) = Activity::new(&ConnectionMetrics::default(), Some(&limit));
        let (other, _) = Activity::new(&ConnectionMetrics::default(), Some(&limit));
        let first = one.begin();
        let second = other.begin();
        let third = one.begin();
        assert!(first.admitted && second.admitted);
        assert!(
            !third.admitted,
            "the limit is process-wide, not per connection"
        );
        assert_eq!(limit.refused.load(Ordering::Relaxed), 1);
        drop(third);
        assert!(!other.begin().admitted, "a refused request holds no seat");
        drop(first);
        assert!(one.begin().admitted, "an ended request frees its seat");
        assert_eq!(
            limit.refused.load(Ordering::Relaxed),
            0,
            "the episode ended"
        );
        drop(second);
        assert_eq!(limit.open.load(Ordering::Relaxed), 0);
    }
}
