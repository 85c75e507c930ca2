//! The body type of every response corral sends and every request it forwards: either
//! bytes in memory (cached bodies, error messages) or a stream passed through from the
//! other side, possibly after a prefix already read. One enum, so no boxing per response.
//!
//! A client's request body streamed upstream is timed and watched: a client that sends
//! nothing for `body_timeout` while corral waits on it is cut off (nginx's
//! `client_body_timeout`), and the body records what the *client's* stream did (failed,
//! stalled, completed, last moved). The upstream client reports any of these as its
//! own error; only this record tells the client's fault from the upstream's.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// Why a body stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The stream itself broke (a malformed chunk, a connection cut mid-body).
    #[error(transparent)]
    Stream(#[from] hyper::Error),
    /// The client sent nothing for `body_timeout` while corral waited on its body.
    #[error("the client sent no request body bytes for {0:?}")]
    ClientStalled(Duration),
}

pin_project! {
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Full { data: Option<Bytes> },
        Streaming { prefix: Option<Bytes>, #[pin] rest: UpstreamBody },
        /// A client's request body, watched by `state`; `timer` is armed while the body
        /// waits on the client (boxed: only client bodies pay for it).
        FromClient {
            #[pin] rest: Incoming,
            state: Arc<ClientBodyState>,
            timer: Option<Pin<Box<Sleep>>>,
        },
    }
}

impl ProxyBody {
    pub(crate) fn empty() -> ProxyBody {
        ProxyBody::Full { data: None }
    }

    pub(crate) fn full(data: impl Into<Bytes>) -> ProxyBody {
        let data: Bytes = data.into();
        ProxyBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    /// An upstream's body streamed to a client. It moves at the client's pace, so what
    /// its exchange held (an upstream slot) is let go now: a slow reader must not hold
    /// a capped route's slot.
    pub(crate) fn streaming(rest: UpstreamBody) -> ProxyBody {
        ProxyBody::Streaming {
            prefix: None,
            rest: rest.released(),
        }
    }

    /// A client's request body, to forward upstream; the client may wait at most
    /// `timeout` between two reads of it.
    pub(crate) fn from_client(rest: Incoming, timeout: Duration) -> ProxyBody {
        let state = ClientBodyState::new(timeout, rest.is_end_stream());
        ProxyBody::FromClient {
            rest,
            state: Arc::new(state),
            timer: None,
        }
    }

    /// For a client's body, the record of what its stream did; read it after the
    /// upstream exchange to tell whose fault an error was.
    pub(crate) fn client_fault(&self) -> Option<ClientFault> {
        match self {
            ProxyBody::FromClient { state, .. } => Some(ClientFault(Arc::clone(state))),
            _ => None,
        }
    }

    /// A stream of which `prefix` was already read (see [`ProxyBody::streaming`]).
    pub(crate) fn resumed(prefix: Bytes, rest: UpstreamBody) -> ProxyBody {
        ProxyBody::Streaming {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest: rest.released(),
        }
    }
}

pin_project! {
    /// A response body from the upstream, holding what its exchange holds (its slot
    /// under the route's upstream caps) while corral reads it itself (a fill), until it
    /// ends, fails or is dropped: the upstream's connection is busy until then.
    pub(crate) struct UpstreamBody {
        #[pin]
        body: Incoming,
        // Boxed twice: a thin pointer keeps every response body as small as before.
        held: Option<Box<Box<dyn Send + Sync>>>,
    }
}

impl UpstreamBody {
    pub(crate) fn holding<T: Send + Sync + 'static>(
        body: Incoming,
        held: Option<T>,
    ) -> UpstreamBody {
        UpstreamBody {
            body,
            held: held.map(|h| Box::new(Box::new(h) as Box<dyn Send + Sync>)),
        }
    }
}

impl UpstreamBody {
    /// The same body, holding nothing any more.
    fn released(mut self) -> UpstreamBody {
        self.held = None;
        self
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.body.as_mut().poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) || this.body.is_end_stream() {
            *this.held = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project() {
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Streaming { prefix, rest } => match prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => rest.poll_frame(cx).map_err(BodyError::Stream),
            },
            ProxyBodyProj::FromClient { rest, state, timer } => poll_client(rest, state, timer, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full { data } => data.is_none(),
            ProxyBody::Streaming { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            ProxyBody::FromClient { rest, .. } => rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Streaming { prefix, rest } => {
                let done = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let hint = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower() + done);
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper + done);
                }
                out
            }
            ProxyBody::FromClient { rest, .. } => rest.size_hint(),
        }
    }
}

/// Reads a client's body, timing the waits on the client: the timer starts when a read
/// finds nothing and stops when bytes come. It never runs while the upstream side does
/// not ask for more (an upstream that reads slowly is not the client's doing).
fn poll_client(
    mut rest: Pin<&mut Incoming>,
    state: &ClientBodyState,
    timer: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    let frame = match rest.as_mut().poll_frame(cx) {
        Poll::Pending => {
            let deadline = Instant::now() + state.timeout;
            let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if !state.waiting.swap(true, Ordering::AcqRel) {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            state.timed_out.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(BodyError::ClientStalled(state.timeout))));
        }
        Poll::Ready(frame) => frame,
    };
    state.waiting.store(false, Ordering::Release);
    match &frame {
        Some(Err(_)) => state.failed.store(true, Ordering::Release),
        // hyper stops reading a body of known length at its last byte, without a
        // final `None`: `is_end_stream` says it is complete.
        None => state.finished(),
        Some(Ok(_)) if rest.is_end_stream() => state.finished(),
        Some(Ok(_)) => state.moved(),
    }
    Poll::Ready(frame.map(|f| f.map_err(BodyError::Stream)))
}

/// What a client's request body did, shared by the body (the only writer, from the
/// upstream client's task) and the request that forwards it (which reads it once the
/// exchange is over or its timeout fires). Plain atomics: each field is a fact on its
/// own, and a reader that sees a stale one only delays an attribution by one timer.
#[derive(Debug)]
struct ClientBodyState {
    timeout: Duration,
    /// Clock origin for `moved_at`.
    start: Instant,
    /// When the body last moved (a frame, or its end), in nanoseconds after `start`,
    /// plus one: 0 is "never".
    moved_at: AtomicU64,
    /// The last read found nothing: the body waits on the client.
    waiting: AtomicBool,
    complete: AtomicBool,
    failed: AtomicBool,
    timed_out: AtomicBool,
}

impl ClientBodyState {
    fn new(timeout: Duration, complete: bool) -> ClientBodyState {
        ClientBodyState {
            timeout,
            start: Instant::now(),
            moved_at: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            complete: AtomicBool::new(complete),
            failed: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
        }
    }

    fn moved(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.moved_at.store(nanos + 1, Ordering::Release);
    }

    fn finished(&self) {
        self.moved();
        self.complete.store(true, Ordering::Release);
    }
}

/// What the client did to a request that failed upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientBlame {
    /// Its body was malformed or cut off (`400`).
    Malformed,
    /// It stopped sending its body (`408`).
    Stalled,
}

/// The record of a client's request body (see [`ProxyBody::client_fault`]).
#[derive(Debug, Clone)]
pub(crate) struct ClientFault(Arc<ClientBodyState>);

impl ClientFault {
    /// Whether the client sent its whole body.
    pub(crate) fn complete(&self) -> bool {
        self.0.complete.load(Ordering::Acquire)
    }

    /// When the body last moved (a frame passed upstream, or its end), if it has.
    pub(crate) fn moved_at(&self) -> Option<Instant> {
        match self.0.moved_at.load(Ordering::Acquire) {
            0 => None,
            nanos => Some(self.0.start + Duration::from_nanos(nanos - 1)),
        }
    }

    /// Whose fault an upstream exchange that ended without a response was, if the
    /// client's: its body failed or hit `body_timeout`, or (`timed_out`: the exchange
    /// ran out of time) the body was still incomplete and waiting on the client. A body
    /// the upstream side had stopped asking for is not the client's doing.
    pub(crate) fn blame(&self, timed_out: bool) -> Option<ClientBlame> {
        let s = &self.0;
        if s.timed_out.load(Ordering::Acquire) {
            Some(ClientBlame::Stalled)
        } else if s.failed.load(Ordering::Acquire) {
            Some(ClientBlame::Malformed)
        } else if timed_out && !self.complete() && s.waiting.load(Ordering::Acquire) {
            Some(ClientBlame::Stalled)
        } else {
            None
        }
    }
}
