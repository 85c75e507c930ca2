//! One client connection on the proxy port, HTTP/1.1 first.
//!
//! A fresh hit in the local cache is answered here: the entry's prebuilt status line
//! and headers, then `Age` and `Cache-Status` (and `Date` when the origin sent none),
//! then the shared body, in one `writev` (a large body goes by `sendfile` from its
//! sealed file, without a copy). No response is built and no stored header is encoded
//! again. Every other request is handed to hyper one request at a time: hyper
//! reads exactly that request's bytes, the proxy answers it ([`Proxy::handle`]), and
//! the connection comes back here for the next one. What is not plain HTTP/1.1 request
//! and response (HTTP/2 prior knowledge, HTTP/1.0, chunked request bodies, upgrades,
//! heads that do not parse or are too large) is given to hyper for good, which serves
//! or rejects it exactly as it would without this path.

use std::convert::Infallible;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{request, HeaderMap, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::service::{service_fn, Service};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{serve_gracefully, until_stopped, Http};
use crate::body::ProxyBody;
use crate::cache::body_file::BodyFile;
use crate::proxy::{LocalHit, Proxy};

/// hyper's default: a head with more fields goes to hyper, which refuses it.
const MAX_HEADERS: usize = 100;
/// Heads larger than this are rare enough to leave to hyper, whose own limit (about
/// 400 KiB) then applies.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How long a client may take to send a request head, idle keep-alive time included
/// (hyper's header read timeout): a slow or silent client cannot hold the connection.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one accepted connection until the client closes it, a timeout or error ends
/// it, or shutdown finds it idle.
pub(super) async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    http: Arc<Http>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    // The per-hit header lines, reused from one response to the next.
    let mut tail = Vec::with_capacity(256);
    let deadline = tokio::time::sleep(HEAD_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        deadline.as_mut().reset(Instant::now() + HEAD_TIMEOUT);
        let head = loop {
            match parse(&mut buf) {
                Parse::Complete(head) => break head,
                Parse::Partial if buf.len() < MAX_HEAD_BYTES => {}
                Parse::Partial | Parse::NotPlainHttp1 => {
                    let prefix = buf.split().freeze();
                    return hand_over(stream, prefix, peer, proxy, &http, stopped).await;
                }
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            let idle = buf.is_empty();
            let read = tokio::select! {
                biased;
                read = stream.read_buf(&mut buf) => read,
                _ = until_stopped(&mut stopped), if idle => return,
                _ = &mut deadline => return,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };

        let closing = !head.keep_alive || *stopped.borrow();
        let hit = if head.body_len == 0 && !head.expects {
            proxy.local_hit(&head.parts)
        } else {
            None
        };
        match hit {
            Some(hit) => {
                let head_only = head.parts.method == Method::HEAD;
                if write_hit(&mut stream, &hit, head_only, closing, &mut tail)
                    .await
                    .is_err()
                {
                    return;
                }
                if closing {
                    let _ = stream.shutdown().await;
                    return;
                }
            }
            None => {
                // The request's bytes: its head, and its body as far as it has come.
                let in_buf = buf.len().min(head.body_len as usize);
                let prefix = if in_buf == 0 {
                    head.bytes
                } else {
                    let mut prefix = BytesMut::with_capacity(head.bytes.len() + in_buf);
                    prefix.extend_from_slice(&head.bytes);
                    prefix.extend_from_slice(&buf.split_to(in_buf));
                    prefix.freeze()
                };
                let io = HandedIo {
                    stream,
                    prefix,
                    limit: Some(head.body_len - in_buf as u64),
                };
                match serve_one(io, peer, &proxy, &http).await {
                    Some(back) if !closing && !*stopped.borrow() => stream = back,
                    _ => return,
                }
            }
        }
    }
}

/// A parsed request head that this path can serve or hand over one request at a time.
struct Head {
    parts: request::Parts,
    /// The head's bytes, as hyper must see them if the request is handed over.
    bytes: Bytes,
    body_len: u64,
    keep_alive: bool,
    /// `Expect: 100-continue` and the like: hyper's to answer.
    expects: bool,
}

// Returned once per head and matched at once: boxing would cost an allocation a request.
#[allow(clippy::large_enum_variant)]
enum Parse {
    Complete(Head),
    Partial,
    NotPlainHttp1,
}

/// Parses the head at the front of `buf`, taking its bytes out of `buf` when complete.
fn parse(buf: &mut BytesMut) -> Parse {
    if buf.is_empty() {
        return Parse::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::NotPlainHttp1,
    };
    if req.version != Some(1) {
        return Parse::NotPlainHttp1;
    }
    let Ok(method) = Method::from_bytes(req.method.unwrap_or("").as_bytes()) else {
        return Parse::NotPlainHttp1;
    };
    if method == Method::CONNECT {
        return Parse::NotPlainHttp1;
    }
    // Where each piece sits in the head, so the values can share its bytes.
    let base = buf.as_ptr() as usize;
    let range = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let path = range(req.path.unwrap_or("").as_bytes());
    let mut fields = Vec::with_capacity(req.headers.len());
    let mut body_len = None;
    let mut keep_alive = true;
    let mut expects = false;
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Parse::NotPlainHttp1;
        };
        if name == header::TRANSFER_ENCODING || name == header::UPGRADE {
            return Parse::NotPlainHttp1;
        }
        if name == header::CONTENT_LENGTH {
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(len) if body_len.is_none() => body_len = Some(len),
                _ => return Parse::NotPlainHttp1,
            }
        }
        if name == header::CONNECTION {
            let value = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if value.split(',').any(|t| t.trim() == "close") {
                keep_alive = false;
            }
            if value.split(',').any(|t| t.trim() == "upgrade") {
                return Parse::NotPlainHttp1;
            }
        }
        expects |= name == header::EXPECT;
        fields.push((name, range(h.value)));
    }
    let bytes = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(bytes.slice(path)) else {
        put_back(buf, bytes);
        return Parse::NotPlainHttp1;
    };
    let mut map = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        let Ok(value) = HeaderValue::from_maybe_shared(bytes.slice(value)) else {
            put_back(buf, bytes);
            return Parse::NotPlainHttp1;
        };
        map.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = map;
    let (parts, ()) = request.into_parts();
    Parse::Complete(Head {
        parts,
        bytes,
        body_len: body_len.unwrap_or(0),
        keep_alive,
        expects,
    })
}

/// Puts bytes split off the front of `buf` back in front of it.
fn put_back(buf: &mut BytesMut, front: Bytes) {
    let mut joined = BytesMut::with_capacity(front.len() + buf.len());
    joined.extend_from_slice(&front);
    joined.extend_from_slice(buf);
    *buf = joined;
}

/// Writes a hit: prebuilt head, this response's own header lines, body.
async fn write_hit(
    stream: &mut TcpStream,
    hit: &LocalHit,
    head_only: bool,
    closing: bool,
    tail: &mut Vec<u8>,
) -> io::Result<()> {
    tail.clear();
    hit.write_lines(tail, closing);
    match &hit.entry.body_file {
        Some(file) if !head_only => {
            // The head with MSG_MORE, so it leaves in the body's first segment.
            write_all(
                stream,
                &mut [IoSlice::new(&hit.entry.http1_head), IoSlice::new(tail)],
                true,
            )
            .await?;
            send_file(stream, file).await
        }
        _ => {
            let body: &[u8] = if head_only { &[] } else { &hit.entry.body };
            let mut slices = [
                IoSlice::new(&hit.entry.http1_head),
                IoSlice::new(tail),
                IoSlice::new(body),
            ];
            write_all(stream, &mut slices, false).await
        }
    }
}

/// Writes all of `slices`; with `more`, tells the kernel more data follows at once.
async fn write_all(stream: &TcpStream, slices: &mut [IoSlice<'_>], more: bool) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendFlags};
    let flags = if more {
        SendFlags::MORE | SendFlags::NOSIGNAL
    } else {
        SendFlags::NOSIGNAL
    };
    let mut slices = slices;
    while !slices.is_empty() {
        let n = stream
            .async_io(Interest::WRITABLE, || {
                let mut control = SendAncillaryBuffer::default();
                Ok(rustix::net::sendmsg(stream, slices, &mut control, flags)?)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// Sends a body file with `sendfile`: the socket takes the file's pages, no copy.
async fn send_file(stream: &TcpStream, file: &BodyFile) -> io::Result<()> {
    let mut offset = 0u64;
    while offset < file.size() {
        let left = usize::try_from(file.size() - offset).unwrap_or(usize::MAX);
        let n = stream
            .async_io(Interest::WRITABLE, || {
                Ok(rustix::fs::sendfile(stream, file, Some(&mut offset), left)?)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

/// The proxy as a hyper service for requests from `peer`.
fn proxy_service(
    proxy: Arc<Proxy>,
    peer: SocketAddr,
) -> impl Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
> + Send
       + 'static {
    service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
    })
}

/// Lets hyper serve the one request whose bytes `io` holds. The connection comes back
/// when hyper finished it cleanly and read nothing past it.
async fn serve_one(
    io: HandedIo,
    peer: SocketAddr,
    proxy: &Arc<Proxy>,
    http: &Http,
) -> Option<TcpStream> {
    let service = proxy_service(Arc::clone(proxy), peer);
    // Half-close on: the end of the request's bytes is not the client leaving.
    let conn = http.one_request.serve_connection(TokioIo::new(io), service);
    match conn.without_shutdown().await {
        Ok(parts) => {
            let io = parts.io.into_inner();
            let whole = parts.read_buf.is_empty() && io.prefix.is_empty() && io.limit == Some(0);
            whole.then_some(io.stream)
        }
        Err(error) => {
            tracing::debug!(%peer, %error, "request closed with an error");
            None
        }
    }
}

/// Gives the connection to hyper for good, with the bytes already read from it.
async fn hand_over(
    stream: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    http: &Http,
    stopped: watch::Receiver<bool>,
) {
    let io = HandedIo {
        stream,
        prefix,
        limit: None,
    };
    let service = proxy_service(proxy, peer);
    let conn = http.any.serve_connection(TokioIo::new(io), service);
    serve_gracefully(conn, peer, stopped).await;
}

/// The client connection as hyper sees it: first the bytes this path already read,
/// then the socket, up to `limit` bytes more (after which reads see the end).
struct HandedIo {
    stream: TcpStream,
    prefix: Bytes,
    limit: Option<u64>,
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
            None => Pin::new(&mut this.stream).poll_read(cx, buf),
            Some(0) => Poll::Ready(Ok(())),
            Some(limit) => {
                let max = usize::try_from(limit).unwrap_or(usize::MAX);
                let dst = buf.initialize_unfilled_to(buf.remaining().min(max));
                let mut limited = ReadBuf::new(dst);
                ready!(Pin::new(&mut this.stream).poll_read(cx, &mut limited))?;
                let n = limited.filled().len();
                buf.advance(n);
                this.limit = Some(limit - n as u64);
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
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[path = "http1_props.rs"]
mod props;
