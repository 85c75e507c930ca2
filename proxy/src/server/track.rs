//! What is in progress on a connection hyper serves: the requests whose responses are
//! not finished, so that a connection with none for `idle_timeout` is closed (HTTP/2
//! included, whose streams hyper never times out), and the requests dropped because
//! their client left before the response was ready (nginx's 499).
//!
//! A request is in progress from the service call until its response body is done or
//! dropped: a stream sending a long body is not idle.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
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

use crate::body::ProxyBody;
use crate::metrics::ConnectionMetrics;

/// One connection's requests in progress.
///
/// `open` is written by the request guards only (a `watch`, so that the idle timer
/// wakes on every change and needs no lock of its own); the timer only reads it.
pub(super) struct Activity {
    open: watch::Sender<usize>,
    metrics: ConnectionMetrics,
}

impl Activity {
    pub(super) fn new(metrics: &ConnectionMetrics) -> (Arc<Activity>, watch::Receiver<usize>) {
        let (open, watching) = watch::channel(0);
        let activity = Activity {
            open,
            metrics: metrics.clone(),
        };
        (Arc::new(activity), watching)
    }

    fn begin(self: &Arc<Self>) -> InProgress {
        self.open.send_modify(|n| *n += 1);
        InProgress {
            activity: Arc::clone(self),
            answered: false,
        }
    }
}

/// A request in progress; dropped when its response body is done (or never came).
pub(super) struct InProgress {
    activity: Arc<Activity>,
    answered: bool,
}

impl Drop for InProgress {
    fn drop(&mut self) {
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// `handle` as a hyper service whose requests count as in progress on `activity`.
pub(super) fn tracked<F, Fut>(
    activity: Arc<Activity>,
    handle: F,
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
{
    service_fn(move |req| {
        let mut request = activity.begin();
        let response = handle(req);
        async move {
            let response = response.await;
            request.answered = true;
            Ok(response.map(|body| Tracked { body, request }))
        }
    })
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
        let (activity, open) = Activity::new(&ConnectionMetrics::default());
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
        let (_activity, open) = Activity::new(&ConnectionMetrics::default());
        let start = Instant::now();
        idle(open, start, Duration::from_secs(10)).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(10));
    }
}
