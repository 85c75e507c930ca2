//! Findings of the hostile review of issue 10's changes. Each test asserts the
//! behaviour corral should have; on the reviewed commit each one fails, which is what
//! confirms the finding.

use std::time::Duration;

use crate::support::raw::{exchange, Answer, RawClient, RecordingOrigin};
use crate::support::{Front, Setup};

fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: a\r\n{extra}\r\n").into_bytes()
}

async fn front(answer: Answer, route: &str) -> (RecordingOrigin, Front) {
    let origin = RecordingOrigin::answering(answer).await;
    let corral = Setup::default()
        .route(route)
        .start_in_front_of(&origin.url())
        .await;
    (origin, corral)
}

/// `Vary` values are stored from the *forwarded* headers (with corral's own
/// X-Forwarded-Proto, X-Forwarded-For, Via) but looked up with the client's sanitized
/// headers: a response varying on one of them never hits again, and every waiter goes
/// upstream after the retries.
#[tokio::test]
async fn review_vary_on_a_forwarding_header_still_caches() {
    let answer = Answer {
        headers: vec![
            ("cache-control".into(), "max-age=60".into()),
            ("vary".into(), "X-Forwarded-Proto".into()),
        ],
        ..Answer::default()
    };
    let (origin, corral) = front(answer, "").await;
    exchange(corral.addr(), &get("/v", "")).await;
    let second = exchange(corral.addr(), &get("/v", "")).await;
    let third = exchange(corral.addr(), &get("/v", "")).await;
    assert!(
        third.cache_status().starts_with("corral; hit"),
        "never a hit: {second:?} / {third:?}"
    );
    assert_eq!(origin.received_for("/v").len(), 1);
}

/// The same mismatch makes coalescing useless: a herd on a `Vary: X-Forwarded-Proto`
/// object sends every waiter upstream (after up to 4 fills in a row).
#[tokio::test]
async fn review_vary_on_a_forwarding_header_still_coalesces() {
    let answer = Answer {
        headers: vec![
            ("cache-control".into(), "max-age=60".into()),
            ("vary".into(), "X-Forwarded-Proto".into()),
        ],
        delay: Duration::from_millis(300),
        ..Answer::default()
    };
    let (origin, corral) = front(answer, "").await;
    let addr = corral.addr();
    let herd: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { exchange(addr, &get("/herd", "")).await }))
        .collect();
    for h in herd {
        assert_eq!(h.await.unwrap().status, 200);
    }
    let n = origin.received_for("/herd").len();
    assert_eq!(n, 1, "20 clients, {n} origin requests");
}

/// The fast path matches `Vary` against the client's raw headers, the full path against
/// the sanitized ones: a client that forges `X-Forwarded-For` (a header corral strips)
/// is answered from a variant the full path never serves.
#[tokio::test]
async fn review_fast_path_and_full_path_agree_on_vary_with_forged_forwarding_headers() {
    let answer = Answer {
        headers: vec![
            ("cache-control".into(), "max-age=60".into()),
            ("vary".into(), "X-Forwarded-For".into()),
        ],
        ..Answer::default()
    };
    let (_origin, corral) = front(answer, "").await;
    exchange(corral.addr(), &get("/ip", "")).await;
    let plain = exchange(corral.addr(), &get("/ip", "")).await;
    let forged = exchange(corral.addr(), &get("/ip", "x-forwarded-for: 127.0.0.1\r\n")).await;
    assert_eq!(
        plain.cache_status().starts_with("corral; hit"),
        forged.cache_status().starts_with("corral; hit"),
        "a forged, stripped header changes what the cache serves: plain {plain:?} / forged {forged:?}"
    );
}

/// A raw UTF-8 path with any escape goes through `decode_unreserved`, which pushes each
/// byte as a Latin-1 `char`: the origin gets the path double-encoded (mojibake).
#[tokio::test]
async fn review_utf8_path_with_an_escape_is_forwarded_unchanged() {
    let (origin, corral) = front(Answer::default(), "").await;
    let res = exchange(
        corral.addr(),
        "GET /caf\u{e9}/%41 HTTP/1.1\r\nhost: a\r\n\r\n".as_bytes(),
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let got = &origin.wait_for(1).await[0];
    assert_eq!(got.target, "/caf\u{e9}/A", "raw: {:?}", got.raw);
}

/// The fast path reads `Content-Length` with `u64::from_str`, which takes `+0`; hyper
/// refuses that head with 400. A cached URL answers it, an uncached one refuses it.
#[tokio::test]
async fn review_fast_path_refuses_what_hyper_refuses() {
    let (_origin, corral) = front(Answer::default(), "").await;
    exchange(corral.addr(), &get("/cl", "")).await;
    let uncached = exchange(corral.addr(), &get("/other", "content-length: +0\r\n")).await;
    let cached = exchange(corral.addr(), &get("/cl", "content-length: +0\r\n")).await;
    assert_eq!(uncached.status, 400, "{uncached:?}");
    assert_eq!(cached.status, uncached.status, "{cached:?}");
}

/// `X-Original-URL` / `X-Rewrite-URL` bypass the cache but still reach the origin, where
/// IIS/Symfony-style frameworks serve the path they name: a client of the `/pub` route
/// reaches any path of that upstream.
#[tokio::test]
async fn review_rewriting_headers_do_not_reach_the_origin() {
    let (origin, corral) = front(Answer::default(), "path_prefix = \"/pub\"").await;
    let res = exchange(
        corral.addr(),
        &get("/pub/x", "x-original-url: /internal/admin\r\n"),
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let got = &origin.wait_for(1).await[0];
    assert_eq!(got.header("x-original-url"), None, "{got:?}");
}

/// With `key.query = "ignore"`, the query is not keyed but is forwarded as sent: the
/// answer to `?lang=evil` is stored for the bare URL.
#[tokio::test]
async fn review_ignored_query_is_not_forwarded() {
    let (origin, corral) = front(Answer::default(), "key = { query = \"ignore\" }").await;
    let poison = exchange(corral.addr(), &get("/page?lang=evil", "")).await;
    assert_eq!(poison.status, 200);
    let victim = exchange(corral.addr(), &get("/page", "")).await;
    let got = &origin.wait_for(1).await[0];
    assert!(
        got.target == "/page" || !victim.text().contains("evil"),
        "the origin answered {:?} and everyone gets it: {:?}",
        got.target,
        victim.text()
    );
}

/// Two `Cookie` headers (what an HTTP/2 client sends as crumbs) are forwarded to the
/// HTTP/1.1 origin as two header lines; RFC 9113 §8.2.3 says join them with "; ".
#[tokio::test]
async fn review_cookie_crumbs_are_joined_when_forwarded() {
    let (origin, corral) = front(Answer::default(), "ignore_cookies = [\"a\", \"b\"]").await;
    exchange(corral.addr(), &get("/c", "cookie: a=1\r\ncookie: b=2\r\n")).await;
    let got = &origin.wait_for(1).await[0];
    assert_eq!(got.header_count("cookie"), 1, "{got:?}");
}

/// From a trusted proxy, `X-Forwarded-Proto` / `X-Forwarded-Host` reach the origin
/// (which builds redirects and links from them) but are not in the key: the answer made
/// for `http` (typically a 301 to https, cacheable by default) is served to `https`
/// requests. nginx keys `$scheme` by default for this reason.
#[tokio::test]
async fn review_trusted_forwarded_proto_is_keyed() {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default()
        .top("trusted_proxies = [\"127.0.0.0/8\"]")
        .start_in_front_of(&origin.url())
        .await;
    exchange(corral.addr(), &get("/login", "x-forwarded-proto: http\r\n")).await;
    let https = exchange(
        corral.addr(),
        &get("/login", "x-forwarded-proto: https\r\n"),
    )
    .await;
    assert!(
        !https.cache_status().starts_with("corral; hit"),
        "the answer the origin made for http is served to https: {https:?}"
    );
}

/// Over h2c, browsers split `Cookie` into crumbs (RFC 9113 §8.2.3); forwarded to an
/// HTTP/1.1 origin they must be joined with "; " into one field.
#[tokio::test]
async fn review_h2_cookie_crumbs_reach_the_origin_as_one_field() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let (origin, corral) = front(Answer::default(), "ignore_cookies = [\"a\", \"b\"]").await;
    let stream = tokio::net::TcpStream::connect(corral.addr()).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/crumbs", corral.addr()))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = send.send_request(req).await.expect("h2 response");
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    let got = &origin.wait_for(1).await[0];
    assert_eq!(got.header_count("cookie"), 1, "{:?}", got.headers);
}

/// A trusted proxy that adds its own `X-Forwarded-For` line (HAProxy's
/// `option forwardfor` does) sends two lines; corral extends only the first (the
/// client's, possibly forged) and drops the second, which held the real client address.
#[tokio::test]
async fn review_trusted_forwarded_for_keeps_every_line() {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default()
        .top("trusted_proxies = [\"127.0.0.0/8\"]")
        .start_in_front_of(&origin.url())
        .await;
    exchange(
        corral.addr(),
        &get(
            "/xff",
            "x-forwarded-for: 6.6.6.6\r\nx-forwarded-for: 10.1.2.3\r\n",
        ),
    )
    .await;
    let got = &origin.wait_for(1).await[0];
    assert_eq!(
        got.header("x-forwarded-for").as_deref(),
        Some("6.6.6.6, 10.1.2.3, 127.0.0.1"),
        "{:?}",
        got.headers
    );
}

/// A client that trickles its POST body past `response_timeout` makes corral count an
/// upstream timeout (and log "upstream failing"): anyone can raise the upstream alert,
/// the class of false alarm issue 10 item 10 asked to remove for malformed bodies.
#[tokio::test]
async fn review_slow_client_body_is_not_an_upstream_failure() {
    let (_origin, corral) = front(Answer::default(), "response_timeout = \"1s\"").await;
    let mut client = RawClient::connect(corral.addr()).await;
    client
        .send(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nx")
        .await;
    let res = client.response(false).await;
    let mut admin = RawClient::connect(corral.admin_addr()).await;
    let metrics = admin
        .exchange(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .text();
    let upstream_errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("corral_upstream_errors_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(
        upstream_errors.is_empty(),
        "a slow client counted as an upstream failure ({}): {upstream_errors:?}",
        res.status
    );
}

/// The connection limit counts client connections, but one h2c connection carries up to
/// 100 streams, each with an upstream connection of its own: with `max_connections = 2`
/// a single client still holds 100 upstream sockets (fd exhaustion by multiplexing).
#[tokio::test]
async fn review_one_h2_connection_cannot_hold_a_hundred_upstream_connections() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let origin = RecordingOrigin::answering(Answer {
        delay: Duration::from_secs(2),
        ..Answer::default()
    })
    .await;
    let corral = Setup::default()
        .top("[limits]\nmax_connections = 2")
        .start_in_front_of(&origin.url())
        .await;
    let stream = tokio::net::TcpStream::connect(corral.addr()).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let addr = corral.addr();
    let streams: Vec<_> = (0..100)
        .map(|i| {
            let mut send = send.clone();
            tokio::spawn(async move {
                let req = http::Request::get(format!("http://{addr}/slow/{i}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                if let Ok(res) = send.send_request(req).await {
                    let _ = res.into_body().collect().await;
                }
            })
        })
        .collect();
    let got = origin.wait_for(100).await;
    let mut conns: Vec<usize> = got.iter().map(|r| r.conn).collect();
    conns.sort_unstable();
    conns.dedup();
    for s in streams {
        let _ = s.await;
    }
    assert!(
        conns.len() <= 2,
        "one client connection (limit 2) held {} upstream connections at once",
        conns.len()
    );
}
