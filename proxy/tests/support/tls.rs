//! TLS for the tests: a self-signed certificate for `localhost`, a config serving it,
//! and a raw HTTP/1.1 client over TLS that reads responses off the wire.

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::raw::{parse_response, Wire};
use super::DEADLINE;

/// A client TLS connection.
pub type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A self-signed certificate for `localhost`, written as `cert.pem` and `key.pem` into
/// `dir`; returns the certificate (for a client to trust).
pub fn certificate(dir: &Path) -> rustls::pki_types::CertificateDer<'static> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), made.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem()).unwrap();
    made.cert.der().clone()
}

/// A config serving TLS with `dir`'s certificate, an admin listener, `top` lines, and
/// the route `t` on `/` to `origin`.
pub fn config_text(dir: &Path, origin: &str, top: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{top}\n\
         [tls]\ncert = {:?}\nkey = {:?}\n\
         [[route]]\nname = \"t\"\nupstream = \"{origin}\"\n",
        dir.join("cert.pem").display().to_string(),
        dir.join("key.pem").display().to_string(),
    )
}

/// A client config trusting only `root`, offering `alpn`.
pub fn client_config(
    root: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tls
}

/// A TLS connection to `addr` as `localhost`, trusting `root`, offering `alpn`.
pub async fn connect(
    addr: std::net::SocketAddr,
    root: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[&[u8]],
) -> Tls {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(client_config(root, alpn)))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// The next response off `conn` (`head_only`: to a HEAD), `buf` keeping what follows.
pub async fn next_response(conn: &mut Tls, buf: &mut Vec<u8>, head_only: bool) -> Wire {
    loop {
        if let Some((wire, used)) = parse_response(buf, head_only) {
            buf.drain(..used);
            return wire;
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(DEADLINE, conn.read(&mut chunk))
            .await
            .expect("answered in time")
            .unwrap_or(0);
        assert!(n > 0, "closed before a whole response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The next response to a request that is not a HEAD.
pub async fn response(conn: &mut Tls, buf: &mut Vec<u8>) -> Wire {
    next_response(conn, buf, false).await
}

/// A GET of `path` (host `localhost`) on `conn`, and its response.
pub async fn get(conn: &mut Tls, buf: &mut Vec<u8>, path: &str) -> Wire {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    response(conn, buf).await
}

/// Whether the server closed `conn` (with nothing left unread in `buf`).
pub async fn closed(conn: &mut Tls, buf: &[u8]) -> bool {
    let mut chunk = [0u8; 64];
    let read = tokio::time::timeout(DEADLINE, conn.read(&mut chunk)).await;
    buf.is_empty() && matches!(read.expect("closed in time"), Ok(0) | Err(_))
}

/// corral serving TLS with a fresh self-signed certificate, in front of a recording
/// origin; `dir` holds the certificate files (deleted when this is dropped).
pub struct TlsFront {
    pub dir: tempfile::TempDir,
    pub root: rustls::pki_types::CertificateDer<'static>,
    pub origin: super::raw::RecordingOrigin,
    pub server: corral::RunningServer,
}

/// Starts a [`TlsFront`]: the origin gives `answer`; `top` lines go before the
/// sections, `tail` lines after the route (`[limits]` and the like).
pub async fn start_tls(answer: super::raw::Answer, top: &str, tail: &str) -> TlsFront {
    let dir = tempfile::tempdir().unwrap();
    let root = certificate(dir.path());
    let origin = super::raw::RecordingOrigin::answering(answer).await;
    let text = config_text(dir.path(), &origin.url(), top) + tail;
    let config = corral::Config::parse(&text, "t.toml").unwrap();
    let server = corral::start(&config).await.unwrap();
    TlsFront {
        dir,
        root,
        origin,
        server,
    }
}
