//! TLS on the proxy port end to end: a self-signed certificate made here, a real client
//! (rustls) speaking HTTP/1.1 and HTTP/2 over real sockets, a recording origin.

mod support;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::raw::{Answer, RecordingOrigin};
use support::tls::{
    certificate, closed, config_text, connect, next_response, response, start_tls, TlsFront,
};
use tokio::io::AsyncWriteExt;

/// A client trusting only `root`, speaking HTTP/2 when `h2`, else HTTP/1.1 (each
/// offered alone in ALPN).
fn client(
    root: &rustls::pki_types::CertificateDer<'static>,
    h2: bool,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    // The connector sets ALPN itself.
    let tls = support::tls::client_config(root, &[]);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if h2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build(connector)
}

/// A GET of `path` on `server` by `client`: status, version, `Cache-Status`, body.
async fn get<C>(
    client: &Client<C, Full<Bytes>>,
    server: &corral::RunningServer,
    path: &str,
) -> Result<(u16, Version, String, Bytes), String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let url = format!("https://localhost:{}{path}", server.listen_addr().port());
    let res = client
        .request(Request::get(url).body(Full::default()).unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let (status, version) = (res.status().as_u16(), res.version());
    let cache_status = res
        .headers()
        .get("cache-status")
        .map_or(String::new(), |v| v.to_str().unwrap().to_string());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Ok((status, version, cache_status, body))
}

/// HTTP/1.1 and HTTP/2 over TLS, as ALPN chooses; a miss then a hit on each; the
/// origin told the client came over `https`, and the scheme is part of the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2_over_tls_with_cache_hits() {
    let TlsFront {
        dir: _dir,
        root,
        origin,
        server,
    } = start_tls(Answer::default(), "", "").await;

    for (h2, version, path) in [
        (false, Version::HTTP_11, "/one"),
        (true, Version::HTTP_2, "/two"),
    ] {
        let client = client(&root, h2);
        let miss = get(&client, &server, path).await.unwrap();
        assert_eq!((miss.0, miss.1), (200, version), "{miss:?}");
        assert!(miss.2.contains("fwd=miss"), "{miss:?}");
        let hit = get(&client, &server, path).await.unwrap();
        assert_eq!((hit.0, hit.1), (200, version), "{hit:?}");
        assert!(hit.2.starts_with("corral; hit"), "{hit:?}");
        assert_eq!(hit.3, miss.3);
        let sent = origin.received_for(path);
        assert_eq!(sent.len(), 1, "one fetch, then hits");
        assert_eq!(
            sent[0].header("x-forwarded-proto").as_deref(),
            Some("https")
        );
    }
    server.shutdown().await;
}

/// A reload reads the certificate files again: new connections get the new
/// certificate, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_a_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let old = certificate(dir.path());
    let origin = RecordingOrigin::answering(Answer::default()).await;
    let text = config_text(dir.path(), &origin.url(), "");
    let server = corral::start(&corral::Config::parse(&text, "t.toml").unwrap())
        .await
        .unwrap();
    assert!(get(&client(&old, false), &server, "/a").await.is_ok());

    let new = certificate(dir.path());
    assert!(
        get(&client(&new, false), &server, "/a").await.is_err(),
        "the renewed certificate is not served before the reload"
    );
    let report = server
        .reload(&corral::Config::parse(&text, "t.toml").unwrap())
        .await;
    assert!(report.needs_restart.is_empty(), "{report:?}");
    let renewed = get(&client(&new, false), &server, "/a").await;
    assert_eq!(renewed.unwrap().0, 200);
    assert!(get(&client(&old, false), &server, "/b").await.is_err());
    server.shutdown().await;
}

/// Plain HTTP sent to the TLS port is not served: it is told so (`400`, as nginx does),
/// counted as a failed handshake, and the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_tls_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    certificate(dir.path());
    let origin = RecordingOrigin::answering(Answer::default()).await;
    let config =
        corral::Config::parse(&config_text(dir.path(), &origin.url(), ""), "t.toml").unwrap();
    let server = corral::start(&config).await.unwrap();
    let mut c = support::raw::RawClient::connect(server.listen_addr()).await;
    let res = c.exchange(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(res.text(), "plain HTTP was sent to the HTTPS port\n");
    assert!(c.closed().await);
    assert!(origin.received().is_empty());
    support::eventually("the failed handshake is counted", || async {
        let n = support::metric_of(&server, "corral_tls_handshake_failures_total").await;
        (n == 1.0).then_some(())
    })
    .await;
    server.shutdown().await;
}

/// Bad files are refused when the config loads (so `corral check` and a reload catch
/// them), naming the file, line and key.
#[test]
fn bad_certificate_files_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    certificate(dir.path());
    let base = config_text(dir.path(), "http://127.0.0.1:9", "");
    let error = |text: &str| {
        corral::Config::parse(text, "t.toml")
            .unwrap_err()
            .to_string()
    };

    let missing = error(&base.replace("cert.pem", "missing.pem"));
    assert!(missing.starts_with("t.toml:5:"), "{missing}");
    assert!(
        missing.contains("tls.cert: cannot read certificates from"),
        "{missing}"
    );

    std::fs::write(dir.path().join("empty.pem"), "nothing here\n").unwrap();
    let empty = error(&base.replace("cert.pem", "empty.pem"));
    assert!(empty.contains("tls.cert: no certificate in"), "{empty}");

    let no_key = error(&base.replace("key.pem", "cert.pem"));
    assert!(
        no_key.contains("tls.key: cannot read a private key"),
        "{no_key}"
    );

    // The key of another certificate.
    let other = tempfile::tempdir().unwrap();
    certificate(other.path());
    let mismatched = base.replace(
        &dir.path().join("key.pem").display().to_string(),
        &other.path().join("key.pem").display().to_string(),
    );
    let mismatched = error(&mismatched);
    assert!(mismatched.contains("tls.key: cannot serve"), "{mismatched}");

    let missing_key = error(&base.replace("key = ", "# key = "));
    assert!(missing_key.contains("tls"), "{missing_key}");
}

/// HTTP/1.1 over TLS on one connection as a client uses it: a miss, hits (answered
/// without hyper), a pipelined pair, a HEAD, a POST (which hands the connection to
/// hyper for the rest), a hit after it, and `Connection: close`. Every response is
/// whole and in order, and the origin sees each request once, marked `https`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_keep_alive_pipelining_and_hand_over() {
    let dir = tempfile::tempdir().unwrap();
    let root = certificate(dir.path());
    let origin = RecordingOrigin::answering(Answer {
        body: Some(vec![b'x'; 40_000]),
        ..Answer::default()
    })
    .await;
    let config =
        corral::Config::parse(&config_text(dir.path(), &origin.url(), ""), "t.toml").unwrap();
    let server = corral::start(&config).await.unwrap();
    let mut c = connect(server.listen_addr(), &root, &[b"http/1.1"]).await;
    let mut buf = Vec::new();
    let get =
        |path: &str, extra: &str| format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{extra}\r\n");

    c.write_all(get("/a", "").as_bytes()).await.unwrap();
    let miss = response(&mut c, &mut buf).await;
    assert!(miss.cache_status().contains("fwd=miss"), "{miss:?}");
    assert_eq!(miss.body.len(), 40_000);
    // Two hits in one write (pipelined), then a HEAD.
    c.write_all(format!("{}{}", get("/a", ""), get("/a", "")).as_bytes())
        .await
        .unwrap();
    for _ in 0..2 {
        let hit = response(&mut c, &mut buf).await;
        assert!(hit.cache_status().starts_with("corral; hit"), "{hit:?}");
        assert_eq!(hit.body, miss.body);
    }
    c.write_all(b"HEAD /a HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let head = next_response(&mut c, &mut buf, true).await;
    assert!(head.cache_status().starts_with("corral; hit"), "{head:?}");
    assert_eq!(head.header("content-length"), Some("40000"));
    // A POST goes to hyper with the rest of the connection.
    c.write_all(b"POST /p HTTP/1.1\r\nhost: localhost\r\ncontent-length: 4\r\n\r\nbody")
        .await
        .unwrap();
    let pass = response(&mut c, &mut buf).await;
    assert_eq!(pass.status, 200, "{pass:?}");
    c.write_all(get("/a", "connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let last = response(&mut c, &mut buf).await;
    assert!(last.cache_status().starts_with("corral; hit"), "{last:?}");
    assert_eq!(last.body, miss.body);
    assert!(closed(&mut c, &buf).await, "closed after Connection: close");

    assert_eq!(origin.received_for("/a").len(), 1);
    let post = &origin.received_for("/p")[0];
    assert_eq!(post.body, b"body");
    assert_eq!(post.header("x-forwarded-proto").as_deref(), Some("https"));
    server.shutdown().await;
}

/// A hit over TLS is keyed with the scheme: a client sending its own
/// `X-Forwarded-Proto` (not a trusted proxy) cannot choose the key or what the origin
/// is told, on either path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_set_the_scheme_over_tls() {
    let TlsFront {
        dir: _dir,
        root,
        origin,
        server,
    } = start_tls(Answer::default(), "", "").await;
    let mut c = connect(server.listen_addr(), &root, &[b"http/1.1"]).await;
    let mut buf = Vec::new();
    c.write_all(b"GET /s HTTP/1.1\r\nhost: localhost\r\nx-forwarded-proto: http\r\n\r\n")
        .await
        .unwrap();
    assert!(response(&mut c, &mut buf)
        .await
        .cache_status()
        .contains("fwd=miss"));
    c.write_all(b"GET /s HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let hit = response(&mut c, &mut buf).await;
    assert!(hit.cache_status().starts_with("corral; hit"), "{hit:?}");
    let sent = origin.received_for("/s");
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].header("x-forwarded-proto").as_deref(),
        Some("https")
    );
    server.shutdown().await;
}
