//! TLS on the proxy port: the handshake (bounded by the head timeout), then hyper on
//! the decrypted stream, HTTP/2 or HTTP/1.1 as ALPN chose.
//!
//! TLS connections do not take the HTTP/1 fast path (`http1`): its hits are written
//! with `sendfile` and raw socket writes, which TLS cannot use; hits are served from the
//! same local cache through hyper. The encryption, not the framing, dominates a TLS
//! hit's cost (README, TLS figures).

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::io::HandedIo;
use super::track::{self, Activity};
use super::{serve_hyper, Http};
use crate::proxy::Proxy;

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

/// Serves one TLS client connection to its end. The TLS layer sits on the same
/// [`HandedIo`] plain connections use, so a client that stops reading times out the
/// same way.
pub(super) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    http: Arc<Http>,
    tls: Arc<rustls::ServerConfig>,
    stopped: watch::Receiver<bool>,
) {
    // A client that trickles its handshake is held to the head timeout, as one that
    // trickles its request head.
    let deadline = Instant::now() + http.limits.head_timeout;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD => {
            // nginx's courtesy: say what is wrong rather than an alert an HTTP
            // client cannot read.
            http.metrics.tls_handshake_failed();
            super::accept::answer_and_close(&stream, PLAIN_HTTP);
            return;
        }
        Ok(Ok(1)) => {}
        _ => return,
    }
    let io = HandedIo::new(Arc::new(stream), Bytes::new(), None, Arc::clone(&http));
    let handshake = TlsAcceptor::from(tls).accept(io);
    let stream = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            http.metrics.tls_handshake_failed();
            tracing::debug!(%peer, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            http.metrics.tls_handshake_failed();
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let (activity, open) = Activity::new(&http.metrics, http.requests.as_ref());
    let service = track::proxy_service(proxy, peer, true, activity);
    let conn = http.any.serve_connection(TokioIo::new(stream), service);
    let idle = track::idle(open, Instant::now(), http.limits.idle_timeout);
    serve_hyper(conn, idle, Arc::clone(&http), peer, stopped).await;
}
