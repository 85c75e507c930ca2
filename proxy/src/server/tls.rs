//! TLS on the proxy port: the handshake (bounded by the head timeout), then HTTP/2
//! (ALPN `h2`) by hyper, or HTTP/1.1 with fresh local hits answered without hyper, as
//! `http1` answers them on plain connections (benches/tls.sh measures what that saves).

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::Method;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::http1::{next_head, next_wait, write_hit_lines, Next, Wait};
use super::io::{HandedIo, Prefixed};
use super::track::{self, Activity};
use super::{serve_hyper, until_stopped, Http};
use crate::proxy::{LocalHit, Proxy};

/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The answer to plain HTTP sent to the TLS port.
const PLAIN_HTTP: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncache-status: corral; detail=plain-http-on-tls-port\r\n\
content-type: text/plain\r\ncontent-length: 38\r\nconnection: close\r\n\r\n\
plain HTTP was sent to the HTTPS port\n";

/// The certificate and key handshakes use; a reload replaces them (new connections get
/// the new ones, open ones keep theirs). Invariant: only a reload stores.
pub(super) type TlsConfig = Arc<ArcSwap<rustls::ServerConfig>>;

/// A TLS client connection, as the proxy reads and writes it.
type TlsConn = tokio_rustls::server::TlsStream<HandedIo>;

/// The largest body written in one piece with its head (about one TLS record);
/// larger ones follow it in writes of their own, so no buffer grows with them.
const INLINE_BODY: usize = 16 * 1024;

/// Serves one TLS client connection to its end: HTTP/2 (ALPN `h2`) by hyper,
/// HTTP/1.1 by [`serve_http1`]. The TLS layer sits on the same [`HandedIo`] plain
/// connections use, so a client that stops reading times out the same way.
pub(super) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    http: Arc<Http>,
    tls: Arc<rustls::ServerConfig>,
    mut stopped: watch::Receiver<bool>,
) {
    // A client that trickles its handshake is held to the head timeout, as one that
    // trickles its request head; the first head (or HTTP/2 preface) must arrive within
    // the same bound. Until then nothing is in progress: a shutdown closes it at once.
    let deadline = Instant::now() + http.limits.head_timeout;
    let Some(mut conn) = handshake(stream, peer, &http, tls, deadline, &mut stopped).await else {
        return;
    };
    if conn.get_ref().1.alpn_protocol() == Some(b"h2") {
        let mut preface = [0u8; H2_PREFACE.len()];
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, conn.read_exact(&mut preface)) => read,
            () = until_stopped(&mut stopped) => return,
        };
        // ALPN chose HTTP/2: anything but its preface is not served (RFC 9113 3.3).
        if !matches!(read, Ok(Ok(_))) || &preface != H2_PREFACE {
            return;
        }
        let (since, prefix) = (Instant::now(), Bytes::from_static(H2_PREFACE));
        let h2 = Protocol::H2;
        return hand_over(conn, prefix, peer, proxy, &http, stopped, since, h2).await;
    }
    serve_http1(conn, peer, proxy, http, stopped, deadline).await;
}

/// What ALPN chose, and so all a TLS connection is served as.
#[derive(Clone, Copy)]
enum Protocol {
    Http1,
    H2,
}

/// The first bytes of every HTTP/2 connection (RFC 9113 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The TLS handshake, by `deadline`; `None` (counted, logged at debug) when it fails.
async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    http: &Arc<Http>,
    tls: Arc<rustls::ServerConfig>,
    deadline: Instant,
    stopped: &mut watch::Receiver<bool>,
) -> Option<TlsConn> {
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)) => peeked,
        () = until_stopped(stopped) => return None,
    };
    match peeked {
        Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD => {
            // nginx's courtesy: say what is wrong rather than an alert an HTTP
            // client cannot read.
            http.metrics.tls_handshake_failed();
            super::accept::answer_and_close(&stream, PLAIN_HTTP);
            return None;
        }
        Ok(Ok(1)) => {}
        _ => return None,
    }
    let io = HandedIo::new(Arc::new(stream), Bytes::new(), None, Arc::clone(http));
    let handshake = TlsAcceptor::from(tls).accept(io);
    let done = tokio::select! {
        done = tokio::time::timeout_at(deadline, handshake) => done,
        () = until_stopped(stopped) => return None,
    };
    match done {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(error)) => {
            http.metrics.tls_handshake_failed();
            tracing::debug!(%peer, %error, "TLS handshake failed");
            None
        }
        Err(_) => {
            http.metrics.tls_handshake_failed();
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// HTTP/1.1 over TLS. Fresh local hits are answered here, as `http1` answers them on
/// plain connections (the same head parser, the same prebuilt response heads; written
/// through TLS, so no `sendfile`); the first request that is not one goes to hyper with
/// the rest of the connection. Timeouts as in `http1::serve`.
async fn serve_http1(
    mut conn: TlsConn,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    http: Arc<Http>,
    mut stopped: watch::Receiver<bool>,
    first_head_by: Instant,
) {
    let limits = http.limits;
    let mut buf = BytesMut::with_capacity(8 * 1024);
    // The response being written, reused from one hit to the next.
    let mut out = Vec::with_capacity(4 * 1024);
    let deadline = tokio::time::sleep_until(first_head_by);
    tokio::pin!(deadline);
    let mut idle = false;
    let mut since = Instant::now();
    loop {
        let wait = Wait {
            deadline: deadline.as_mut(),
            idle: &mut idle,
            stopped: &mut stopped,
        };
        let mut head = match next_head(&mut conn, &mut buf, wait, &http).await {
            Next::Head(head) => head,
            Next::NotPlain => {
                let (prefix, h1) = (buf.split().freeze(), Protocol::Http1);
                return hand_over(conn, prefix, peer, proxy, &http, stopped, since, h1).await;
            }
            Next::End => return,
        };
        let closing = !head.keep_alive || *stopped.borrow();
        let started = Instant::now();
        let hit = if head.body_len == 0 && !head.expects {
            proxy.local_hit_over_tls(&mut head.parts, peer.ip())
        } else {
            None
        };
        let Some(hit) = hit else {
            // hyper reads this request from its head's bytes as the client sent them.
            let mut prefix = BytesMut::from(&head.bytes[..]);
            prefix.extend_from_slice(&buf);
            let (prefix, h1) = (prefix.freeze(), Protocol::Http1);
            return hand_over(conn, prefix, peer, proxy, &http, stopped, since, h1).await;
        };
        let head_only = head.parts.method == Method::HEAD;
        let written = write_hit(&mut conn, &hit, head_only, closing, &mut out).await;
        // Logged however the write ended (a client that cut it off included).
        proxy.log_hit(&head.parts, peer, &hit, head_only, started);
        if written.is_err() {
            return;
        }
        if closing {
            let _ = conn.shutdown().await;
            return;
        }
        since = Instant::now();
        idle = next_wait(&buf, deadline.as_mut(), since, &limits);
    }
}

/// Writes a hit: prebuilt head, this response's own header lines, body; a small body
/// in the same write (one TLS record), a large one after it.
async fn write_hit(
    conn: &mut TlsConn,
    hit: &LocalHit,
    head_only: bool,
    closing: bool,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    out.clear();
    out.extend_from_slice(hit.entry.http1_head());
    write_hit_lines(hit, out, closing);
    let body: &[u8] = if head_only { &[] } else { hit.entry.body() };
    if body.len() <= INLINE_BODY {
        out.extend_from_slice(body);
        conn.write_all(out).await?;
    } else {
        conn.write_all(out).await?;
        conn.write_all(body).await?;
    }
    conn.flush().await
}

/// Gives the connection to hyper for good, `prefix` (bytes already read) first, to be
/// served as `protocol` only.
#[allow(clippy::too_many_arguments)] // One call site per protocol; a struct would only rename them.
async fn hand_over(
    conn: TlsConn,
    prefix: Bytes,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    http: &Arc<Http>,
    stopped: watch::Receiver<bool>,
    since: Instant,
    protocol: Protocol,
) {
    let (activity, open) = Activity::new(&http.metrics, http.requests.as_ref());
    let service = track::proxy_service(proxy, peer, true, activity);
    let io = TokioIo::new(Prefixed::new(prefix, conn));
    let builder = match protocol {
        Protocol::Http1 => &http.h1_only,
        Protocol::H2 => &http.h2_only,
    };
    let conn = builder.serve_connection(io, service);
    let idle = track::idle(open, since, http.limits.idle_timeout);
    serve_hyper(conn, idle, Arc::clone(http), peer, stopped).await;
}
