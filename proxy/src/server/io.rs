//! The client socket as hyper sees it ([`HandedIo`]), and the end of a connection whose
//! client stopped reading.
//!
//! The socket is shared (`Arc<TcpStream>`) between hyper and the connection's own task,
//! which watches it for the client leaving while a request waits (see `http1`). Both
//! sides use tokio's readiness API on `&TcpStream`; hyper alone reads and writes.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::Http;

/// The client connection as hyper sees it: first the bytes the HTTP/1 path already
/// read, then the socket, up to `limit` bytes more (after which reads see the end).
///
/// A write that stays pending for the send timeout fails with `TimedOut`, and the
/// socket is set to reset on close, so a client that stops reading frees the connection
/// and its send buffer at once.
pub(super) struct HandedIo {
    stream: Arc<TcpStream>,
    prefix: Bytes,
    limit: Option<u64>,
    http: Arc<Http>,
    /// Started when a write first finds the socket full; cleared by any progress.
    /// Boxed once per connection that ever waits, not per write.
    stalled: Option<Pin<Box<Sleep>>>,
    stalling: bool,
    /// Told once the last of `limit` has been read.
    body_read: Option<Arc<Notify>>,
}

impl HandedIo {
    pub(super) fn new(
        stream: Arc<TcpStream>,
        prefix: Bytes,
        limit: Option<u64>,
        http: Arc<Http>,
    ) -> HandedIo {
        HandedIo {
            stream,
            prefix,
            limit,
            http,
            stalled: None,
            stalling: false,
            body_read: None,
        }
    }

    /// Notifies `body_read` once the request's body has been read to its end.
    pub(super) fn notifying(mut self, body_read: Option<Arc<Notify>>) -> HandedIo {
        self.body_read = body_read;
        self
    }

    /// Whether hyper consumed exactly the request's bytes: the prefix and the body.
    pub(super) fn consumed_all(&self) -> bool {
        self.prefix.is_empty() && self.limit == Some(0)
    }

    /// Whether a pending write has been pending for longer than the send timeout.
    fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let timeout = self.http.limits.send_timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if !self.stalling {
            self.stalling = true;
            sleep.as_mut().reset(Instant::now() + timeout);
        }
        ready!(sleep.as_mut().poll(cx));
        self.http.metrics.send_timeout();
        Poll::Ready(send_timed_out(&self.stream, timeout))
    }

    /// A write's result: progress clears the stall timer, a wait runs it.
    fn wrote<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.stalling = false;
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_stalled(cx).map(Err),
        }
    }
}

/// Sets `stream` to reset (RST) when closed, dropping what it still had to send, and
/// returns the error that ends the connection.
pub(super) fn send_timed_out(stream: &TcpStream, timeout: Duration) -> io::Error {
    let _ = rustix::net::sockopt::set_socket_linger(stream, Some(Duration::ZERO));
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the client read nothing for {timeout:?}"),
    )
}

/// Writes with `write` once the socket is writable, retrying when readiness was stale.
fn poll_write_with<T>(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    mut write: impl FnMut(&TcpStream) -> io::Result<T>,
) -> Poll<io::Result<T>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match write(stream) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

fn poll_read_into(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        // Into the unfilled part as it is: hyper's buffers are not zeroed first.
        match stream.try_read_buf(buf) {
            Ok(_) => return Poll::Ready(Ok(())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for HandedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        match this.limit {
            None => poll_read_into(&this.stream, cx, buf),
            Some(0) => Poll::Ready(Ok(())),
            Some(limit) => {
                let max = usize::try_from(limit).unwrap_or(usize::MAX);
                let dst = buf.initialize_unfilled_to(buf.remaining().min(max));
                let mut limited = ReadBuf::new(dst);
                ready!(poll_read_into(&this.stream, cx, &mut limited))?;
                let n = limited.filled().len();
                buf.advance(n);
                this.limit = Some(limit - n as u64);
                if this.limit == Some(0) {
                    if let Some(body_read) = &this.body_read {
                        // `notify_one` keeps the permit if no one waits yet.
                        body_read.notify_one();
                    }
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for HandedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = poll_write_with(&this.stream, cx, |s| s.try_write(buf));
        this.wrote(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = poll_write_with(&this.stream, cx, |s| s.try_write_vectored(bufs));
        this.wrote(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TCP socket has no user-space buffer to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = rustix::net::shutdown(&*self.stream, rustix::net::Shutdown::Write);
        Poll::Ready(match result {
            Err(rustix::io::Errno::NOTCONN) => Ok(()),
            other => other.map_err(io::Error::from),
        })
    }
}

/// A stream with bytes already read from it in front: reads take those first. What a
/// TLS connection is when the HTTP/1.1 path hands it to hyper with a request it read.
pub(super) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(super) fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
