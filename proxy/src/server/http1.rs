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

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{request, HeaderMap, Method, Request, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, Sleep};

use super::io::{send_timed_out, HandedIo};
use super::track::{self, Activity};
use super::{serve_hyper, until_stopped, Http};
use crate::cache::body_file::BodyFile;
use crate::config::LimitsSettings;
use crate::proxy::{LocalHit, Proxy};

/// hyper's default: a head with more fields goes to hyper, which refuses it.
const MAX_HEADERS: usize = 100;
/// Heads larger than this are rare enough to leave to hyper, whose own limit (about
/// 400 KiB) then applies.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves one accepted connection until the client closes it, a timeout or error ends
/// it, or shutdown finds it idle.
///
/// Timeouts: the first request head must arrive within `head_timeout` of the accept;
/// after a response the connection may idle for `idle_timeout`, and the next head then
/// gets `head_timeout` from its first byte (nginx's `client_header_timeout` and
/// `keepalive_timeout`). A hit whose write makes no progress for `send_timeout` resets
/// the connection.
pub(super) async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    http: Arc<Http>,
    mut stopped: watch::Receiver<bool>,
) {
    let limits = http.limits;
    let mut buf = BytesMut::with_capacity(8 * 1024);
    // The per-hit header lines, reused from one response to the next.
    let mut tail = Vec::with_capacity(256);
    let deadline = tokio::time::sleep(limits.head_timeout);
    tokio::pin!(deadline);
    // Idle: between two requests, before the next one's first byte.
    let mut idle = false;
    let mut since = Instant::now();
    loop {
        let wait = Wait {
            deadline: deadline.as_mut(),
            idle: &mut idle,
            stopped: &mut stopped,
        };
        let head = match next_head(&mut stream, &mut buf, wait, &http).await {
            Next::Head(head) => head,
            Next::NotPlain => {
                let prefix = buf.split().freeze();
                return hand_over(stream, prefix, peer, proxy, &http, stopped, since).await;
            }
            Next::End => return,
        };

        let closing = !head.keep_alive || *stopped.borrow();
        let started = Instant::now();
        let hit = if head.body_len == 0 && !head.expects {
            proxy.local_hit(&head.parts, peer.ip())
        } else {
            None
        };
        match hit {
            Some(hit) => {
                let head_only = head.parts.method == Method::HEAD;
                let written = write_hit(&stream, &hit, head_only, closing, &mut tail, &http).await;
                // Logged however the write ended (a client that cut it off included).
                proxy.log_hit(&head.parts, peer, &hit, head_only, started);
                if written.is_err() {
                    return;
                }
                if closing {
                    let _ = stream.shutdown().await;
                    return;
                }
            }
            None => {
                let request = Handed::split_from(head, &mut buf);
                match serve_one(stream, request, peer, &proxy, &http).await {
                    Some(back) if !closing && !*stopped.borrow() => stream = back,
                    _ => return,
                }
            }
        }
        since = Instant::now();
        idle = next_wait(&buf, deadline.as_mut(), since, &limits);
    }
}

/// After a response, at `now`: sets `deadline` for the next head and returns whether
/// the wait is idle. Pipelined bytes in `buf` already started the next head (it gets
/// `head_timeout`); otherwise the connection idles (`idle_timeout`).
pub(super) fn next_wait(
    buf: &BytesMut,
    deadline: Pin<&mut Sleep>,
    now: Instant,
    limits: &LimitsSettings,
) -> bool {
    let idle = buf.is_empty();
    let timeout = if idle {
        limits.idle_timeout
    } else {
        limits.head_timeout
    };
    deadline.reset(now + timeout);
    idle
}

/// How the wait for the next head may end besides a head: its deadline, shutdown.
pub(super) struct Wait<'a> {
    pub(super) deadline: Pin<&'a mut Sleep>,
    /// Between two requests, before the next one's first byte; cleared by that byte,
    /// which restarts the deadline at `head_timeout`.
    pub(super) idle: &'a mut bool,
    pub(super) stopped: &'a mut watch::Receiver<bool>,
}

/// What the wait for the next request ended with.
// Returned once per head and matched at once, as `Parse`.
#[allow(clippy::large_enum_variant)]
pub(super) enum Next {
    Head(Head),
    /// Not plain HTTP/1.1, or a head too large for this path: hyper's to serve.
    NotPlain,
    /// The client closed, its time ran out, or shutdown found it idle.
    End,
}

/// Reads until a whole head is at the front of `buf`, taking it out of `buf`. (From a
/// plain socket here, or from a TLS stream: `tls`.)
pub(super) async fn next_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    wait: Wait<'_>,
    http: &Http,
) -> Next {
    let Wait {
        mut deadline,
        idle,
        stopped,
    } = wait;
    loop {
        match parse(buf) {
            Parse::Complete(head) => return Next::Head(head),
            Parse::Partial if buf.len() < MAX_HEAD_BYTES => {}
            Parse::Partial | Parse::NotPlainHttp1 => return Next::NotPlain,
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let read = tokio::select! {
            biased;
            read = stream.read_buf(buf) => read,
            _ = until_stopped(stopped), if buf.is_empty() => return Next::End,
            _ = &mut deadline => {
                if *idle {
                    http.metrics.idle_closed();
                }
                return Next::End;
            }
        };
        match read {
            Ok(0) | Err(_) => return Next::End,
            Ok(_) if *idle => {
                *idle = false;
                let head_timeout = http.limits.head_timeout;
                deadline.as_mut().reset(Instant::now() + head_timeout);
            }
            Ok(_) => {}
        }
    }
}

/// A parsed request head that this path can serve or hand over one request at a time.
pub(super) struct Head {
    pub(super) parts: request::Parts,
    /// The head's bytes, as hyper must see them if the request is handed over.
    pub(super) bytes: Bytes,
    pub(super) body_len: u64,
    pub(super) keep_alive: bool,
    /// `Expect: 100-continue` and the like: hyper's to answer.
    pub(super) expects: bool,
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
    let Some(method) = plain_method(&req) else {
        return Parse::NotPlainHttp1;
    };
    // Where each piece sits in the head, so the values can share its bytes.
    let base = buf.as_ptr() as usize;
    let range = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let path = range(req.path.unwrap_or("").as_bytes());
    let Some(fields) = Fields::read(req.headers, range) else {
        return Parse::NotPlainHttp1;
    };
    let bytes = buf.split_to(len).freeze();
    let Some(parts) = request_parts(method, &bytes, path, fields.values) else {
        put_back(buf, bytes);
        return Parse::NotPlainHttp1;
    };
    Parse::Complete(Head {
        parts,
        bytes,
        body_len: fields.body_len.unwrap_or(0),
        keep_alive: fields.keep_alive,
        expects: fields.expects,
    })
}

/// The method of an HTTP/1.1 request this path may take, or `None` for hyper's.
fn plain_method(req: &httparse::Request<'_, '_>) -> Option<Method> {
    if req.version != Some(1) {
        return None;
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes()).ok()?;
    (method != Method::CONNECT).then_some(method)
}

/// A head's header fields, checked for what this path cannot serve, with where each
/// value sits in the head and what the fields say about the request.
struct Fields {
    values: Vec<(HeaderName, Range<usize>)>,
    body_len: Option<u64>,
    keep_alive: bool,
    expects: bool,
}

impl Fields {
    /// `None` when a field makes the request hyper's: a name that is not one, a
    /// transfer coding, an upgrade, or a `Content-Length` that is not one number.
    fn read(
        headers: &[httparse::Header<'_>],
        range: impl Fn(&[u8]) -> Range<usize>,
    ) -> Option<Fields> {
        let mut fields = Fields {
            values: Vec::with_capacity(headers.len()),
            body_len: None,
            keep_alive: true,
            expects: false,
        };
        for h in headers {
            let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
            if name == header::TRANSFER_ENCODING || name == header::UPGRADE {
                return None;
            }
            if name == header::CONTENT_LENGTH {
                match std::str::from_utf8(h.value)
                    .ok()
                    .map(str::trim)
                    // Digits only, as hyper reads it (`u64::from_str` would take `+0`).
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse().ok())
                {
                    Some(len) if fields.body_len.is_none() => fields.body_len = Some(len),
                    _ => return None,
                }
            }
            if name == header::CONNECTION {
                let value = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                if value.split(',').any(|t| t.trim() == "close") {
                    fields.keep_alive = false;
                }
                if value.split(',').any(|t| t.trim() == "upgrade") {
                    return None;
                }
            }
            fields.expects |= name == header::EXPECT;
            fields.values.push((name, range(h.value)));
        }
        Some(fields)
    }
}

/// The request's parts, their URI and header values sharing the head's `bytes`;
/// `None` when one of them is not valid as such.
fn request_parts(
    method: Method,
    bytes: &Bytes,
    path: Range<usize>,
    values: Vec<(HeaderName, Range<usize>)>,
) -> Option<request::Parts> {
    let uri = Uri::from_maybe_shared(bytes.slice(path)).ok()?;
    let mut map = HeaderMap::with_capacity(values.len());
    for (name, value) in values {
        map.append(
            name,
            HeaderValue::from_maybe_shared(bytes.slice(value)).ok()?,
        );
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = map;
    Some(request.into_parts().0)
}

/// Puts bytes split off the front of `buf` back in front of it.
fn put_back(buf: &mut BytesMut, front: Bytes) {
    let mut joined = BytesMut::with_capacity(front.len() + buf.len());
    joined.extend_from_slice(&front);
    joined.extend_from_slice(buf);
    *buf = joined;
}

/// Writes a hit: prebuilt head, this response's own header lines, body. A write that
/// makes no progress for the send timeout resets the connection.
async fn write_hit(
    stream: &TcpStream,
    hit: &LocalHit,
    head_only: bool,
    closing: bool,
    tail: &mut Vec<u8>,
    http: &Http,
) -> io::Result<()> {
    tail.clear();
    write_hit_lines(hit, tail, closing);
    match &hit.entry.body_file {
        Some(file) if !head_only => {
            // The head with MSG_MORE, so it leaves in the body's first segment.
            let mut head = [IoSlice::new(hit.entry.http1_head()), IoSlice::new(tail)];
            write_all(stream, &mut head, true, http).await?;
            send_file(stream, file, http).await
        }
        _ => {
            let body: &[u8] = if head_only { &[] } else { hit.entry.body() };
            let mut slices = [
                IoSlice::new(hit.entry.http1_head()),
                IoSlice::new(tail),
                IoSlice::new(body),
            ];
            write_all(stream, &mut slices, false, http).await
        }
    }
}

/// Runs the non-blocking write `f` once the socket takes more; waiting longer than the
/// send timeout for that resets the connection. The timer is only armed if the write
/// has to wait: a socket with room costs no timer.
async fn when_writable<T>(
    stream: &TcpStream,
    http: &Http,
    mut f: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    match stream.try_io(Interest::WRITABLE, &mut f) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        done => return done,
    }
    let timeout = http.limits.send_timeout;
    match tokio::time::timeout(timeout, stream.async_io(Interest::WRITABLE, f)).await {
        Ok(result) => result,
        Err(_) => {
            http.metrics.send_timeout();
            Err(send_timed_out(stream, timeout))
        }
    }
}

/// Writes all of `slices`; with `more`, tells the kernel more data follows at once.
async fn write_all(
    stream: &TcpStream,
    slices: &mut [IoSlice<'_>],
    more: bool,
    http: &Http,
) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendFlags};
    let flags = if more {
        SendFlags::MORE | SendFlags::NOSIGNAL
    } else {
        SendFlags::NOSIGNAL
    };
    let mut slices = slices;
    while !slices.is_empty() {
        let n = when_writable(stream, http, || {
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
async fn send_file(stream: &TcpStream, file: &BodyFile, http: &Http) -> io::Result<()> {
    let mut offset = 0u64;
    while offset < file.size() {
        let left = usize::try_from(file.size() - offset).unwrap_or(usize::MAX);
        let n = when_writable(stream, http, || {
            Ok(rustix::fs::sendfile(stream, file, Some(&mut offset), left)?)
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

/// A request handed to hyper on its own.
struct Handed {
    /// Its head, and its body as far as this path read it.
    prefix: Bytes,
    /// Body bytes still on the socket.
    remaining: u64,
    /// Whether bytes past the request were already read (the next request).
    pipelined: bool,
}

impl Handed {
    /// The request of `head`: its bytes, and its body's as far as `buf` holds them.
    fn split_from(head: Head, buf: &mut BytesMut) -> Handed {
        let in_buf = buf
            .len()
            .min(usize::try_from(head.body_len).unwrap_or(usize::MAX));
        let prefix = if in_buf == 0 {
            head.bytes
        } else {
            let mut prefix = BytesMut::with_capacity(head.bytes.len() + in_buf);
            prefix.extend_from_slice(&head.bytes);
            prefix.extend_from_slice(&buf.split_to(in_buf));
            prefix.freeze()
        };
        Handed {
            prefix,
            remaining: head.body_len - in_buf as u64,
            pipelined: !buf.is_empty(),
        }
    }
}

/// Lets hyper serve the one request whose bytes `io` holds. The connection comes back
/// when hyper finished it cleanly and read nothing past it.
///
/// hyper is told the request's end is not the client leaving (half-close), so while
/// the request waits (on the upstream, or on another request's fill) this task watches
/// the socket itself, once hyper has read the request's body to its end: the client
/// closing it drops the request, so that a waiter whose client left never goes
/// upstream, nor a forwarded request stays there. Data is not an end: a pipelined
/// request is served after this one, as nginx does. A fill the request leads runs in
/// its own task and carries on for the others.
async fn serve_one(
    stream: TcpStream,
    request: Handed,
    peer: SocketAddr,
    proxy: &Arc<Proxy>,
    http: &Arc<Http>,
) -> Option<TcpStream> {
    let stream = Arc::new(stream);
    let (activity, _) = Activity::new(&http.metrics, http.requests.as_ref());
    let service = track::proxy_service(Arc::clone(proxy), peer, false, activity);
    let body_read = (request.remaining > 0).then(|| Arc::new(Notify::new()));
    let io = HandedIo::new(
        Arc::clone(&stream),
        request.prefix,
        Some(request.remaining),
        Arc::clone(http),
    )
    .notifying(body_read.clone());
    let conn = http
        .one_request
        .serve_connection(TokioIo::new(io), service)
        .without_shutdown();
    // Only once hyper has all the request's bytes is whatever comes next not its body.
    let left = async {
        if let Some(body_read) = &body_read {
            body_read.notified().await;
        }
        client_left(&stream).await;
    };
    let served = tokio::select! {
        biased;
        served = conn => served,
        () = left, if !request.pipelined => {
            tracing::debug!(%peer, "client left before its response");
            return None;
        }
    };
    match served {
        Ok(parts) => {
            let whole = parts.read_buf.is_empty() && parts.io.inner().consumed_all();
            drop(parts);
            if whole {
                Arc::into_inner(stream)
            } else {
                None
            }
        }
        Err(error) => {
            tracing::debug!(%peer, %error, "request closed with an error");
            None
        }
    }
}

/// Resolves when the client closed (or reset) its side of `stream`; never while it
/// only sends more data.
async fn client_left(stream: &TcpStream) {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Gives the connection to hyper for good, with the bytes already read from it. The
/// connection's idle time counts from `since`: its accept, or its last response.
async fn hand_over(
    stream: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    http: &Arc<Http>,
    stopped: watch::Receiver<bool>,
    since: Instant,
) {
    let io = HandedIo::new(Arc::new(stream), prefix, None, Arc::clone(http));
    let (activity, open) = Activity::new(&http.metrics, http.requests.as_ref());
    let service = track::proxy_service(proxy, peer, false, activity);
    let conn = http.any.serve_connection(TokioIo::new(io), service);
    let idle = track::idle(open, since, http.limits.idle_timeout);
    serve_hyper(conn, idle, Arc::clone(http), peer, stopped).await;
}

/// The header lines a hit adds to its entry's prebuilt head, through the blank line:
/// `Age`, `Cache-Status`, `Date` when the origin sent none, and `Connection: close`
/// when the connection ends after it.
pub fn write_hit_lines(hit: &LocalHit, out: &mut Vec<u8>, closing: bool) {
    use std::io::Write as _;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "age: {}\r\ncache-status: {}\r\n", hit.age, hit.status);
    if !hit.entry.has_date() {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if closing {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
#[path = "http1_props.rs"]
mod props;
