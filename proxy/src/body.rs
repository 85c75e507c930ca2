//! The body type of every response corral sends and every request it forwards: either
//! bytes in memory (cached bodies, error messages) or a stream passed through from the
//! other side, possibly after a prefix already read. One enum, so no boxing per response.
//!
//! A client's request body streamed upstream remembers whether the *client's* stream
//! failed (a malformed chunk, a connection cut mid-body): the upstream client reports
//! that as its own error, and only this flag tells the client's fault from the
//! upstream's.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

pin_project! {
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Full { data: Option<Bytes> },
        Streaming { prefix: Option<Bytes>, #[pin] rest: Incoming },
        /// A client's request body; `failed` is set when reading it fails.
        FromClient { #[pin] rest: Incoming, failed: Arc<AtomicBool> },
    }
}

impl ProxyBody {
    pub fn empty() -> ProxyBody {
        ProxyBody::Full { data: None }
    }

    pub fn full(data: impl Into<Bytes>) -> ProxyBody {
        let data: Bytes = data.into();
        ProxyBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    pub fn streaming(rest: Incoming) -> ProxyBody {
        ProxyBody::Streaming { prefix: None, rest }
    }

    /// A client's request body, to forward upstream.
    pub fn from_client(rest: Incoming) -> ProxyBody {
        ProxyBody::FromClient {
            rest,
            failed: Arc::default(),
        }
    }

    /// For a client's body, the flag its stream sets when it fails; read it after the
    /// upstream exchange to tell whose fault an error was.
    pub fn client_fault(&self) -> Option<ClientFault> {
        match self {
            ProxyBody::FromClient { failed, .. } => Some(ClientFault(Arc::clone(failed))),
            _ => None,
        }
    }

    /// A stream of which `prefix` was already read.
    pub fn resumed(prefix: Bytes, rest: Incoming) -> ProxyBody {
        ProxyBody::Streaming {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Streaming { prefix, rest } => match prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => rest.poll_frame(cx),
            },
            ProxyBodyProj::FromClient { rest, failed } => {
                let frame = rest.poll_frame(cx);
                if let Poll::Ready(Some(Err(_))) = &frame {
                    failed.store(true, Ordering::Release);
                }
                frame
            }
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

/// Whether a client's request body failed while it was read (see [`ProxyBody::client_fault`]).
#[derive(Debug, Clone)]
pub struct ClientFault(Arc<AtomicBool>);

impl ClientFault {
    pub fn happened(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}
