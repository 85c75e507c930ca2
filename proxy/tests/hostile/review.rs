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

/// A client's `Cache-Control: no-store` makes the fill unstorable (http-cache-semantics
/// honours the request directive), the pass reason is not request-specific, so the key
/// is marked hit-for-pass for everyone for `hit_for_pass` (30 s).
#[tokio::test]
async fn review_request_no_store_does_not_turn_caching_off_for_others() {
    let (origin, corral) = front(Answer::default(), "").await;
    let attacker = exchange(corral.addr(), &get("/hot", "cache-control: no-store\r\n")).await;
    assert_eq!(attacker.status, 200, "{attacker:?}");
    let first = exchange(corral.addr(), &get("/hot", "")).await;
    let second = exchange(corral.addr(), &get("/hot", "")).await;
    assert!(
        second.cache_status().starts_with("corral; hit"),
        "one client's no-store turned caching off: {first:?} / {second:?}"
    );
    assert!(origin.received_for("/hot").len() <= 2);
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

/// Deception: `Cache-Control: max-age=0` counts as "explicit freshness", so a
/// credentialed answer passes the credentials rule, and then the route's `override_ttl`
/// (or its default stale-while-revalidate window) stores it for everyone.
#[tokio::test]
async fn review_credentialed_max_age_0_is_not_stored_on_override_ttl() {
    let answer = Answer {
        headers: vec![("cache-control".into(), "max-age=0".into())],
        body: Some(b"victim's account page".to_vec()),
        ..Answer::default()
    };
    let (origin, corral) = front(answer, "ttl = \"60s\"\noverride_ttl = true").await;
    exchange(
        corral.addr(),
        &get("/account/x.css", "cookie: session=victim\r\n"),
    )
    .await;
    let attacker = exchange(corral.addr(), &get("/account/x.css", "")).await;
    assert!(
        !attacker.cache_status().starts_with("corral; hit"),
        "the victim's page was served from the cache: {attacker:?}"
    );
    assert_eq!(origin.received_for("/account/x.css").len(), 2);
}

#[tokio::test]
async fn review_credentialed_expired_answer_is_not_served_stale_to_others() {
    let answer = Answer {
        headers: vec![("expires".into(), "0".into())],
        body: Some(b"victim's account page".to_vec()),
        ..Answer::default()
    };
    let (origin, corral) = front(answer, "stale_while_revalidate = \"60s\"").await;
    exchange(
        corral.addr(),
        &get("/account/x.css", "cookie: session=victim\r\n"),
    )
    .await;
    let attacker = exchange(corral.addr(), &get("/account/x.css", "")).await;
    assert!(
        !attacker.cache_status().contains("stale"),
        "the victim's page was served stale: {attacker:?}"
    );
    assert_eq!(origin.received_for("/account/x.css").len(), 2);
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

/// Purging a URL on a route with `key.cookies` builds the key without any cookie: it
/// removes (at most) the cookie-less variant, answers `200 purged`, and the variants
/// keyed on the cookie stay cached.
#[tokio::test]
async fn review_purge_on_a_cookie_keyed_route_purges_or_refuses() {
    let (_origin, corral) = front(Answer::default(), "key = { cookies = [\"lang\"] }").await;
    let lang = "cookie: lang=en\r\n";
    exchange(corral.addr(), &get("/p", lang)).await;
    let hit = exchange(corral.addr(), &get("/p", lang)).await;
    assert!(hit.cache_status().starts_with("corral; hit"), "{hit:?}");
    let mut admin = RawClient::connect(corral.admin_addr()).await;
    let purged = admin
        .exchange(
            b"POST /purge?route=t&host=a&path=/p HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
    let after = exchange(corral.addr(), &get("/p", lang)).await;
    assert!(
        purged.status != 200 || !after.cache_status().starts_with("corral; hit"),
        "purge said {:?} ({}) but the entry is still served: {after:?}",
        purged.text(),
        purged.status
    );
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

/// `key.cookies` trims cookie names and values (`lang =fr` is keyed as `lang=fr`) but
/// the header is forwarded as sent; origins that do not trim (Go's net/http drops a name
/// with a space, PHP reads it as `lang_`) answer the default, which is then stored under
/// the key of every `lang=fr` user.
#[tokio::test]
async fn review_keyed_cookie_is_keyed_as_the_origin_reads_it() {
    let (origin, corral) = front(Answer::default(), "key = { cookies = [\"lang\"] }").await;
    exchange(corral.addr(), &get("/home", "cookie: lang =fr\r\n")).await;
    let victim = exchange(corral.addr(), &get("/home", "cookie: lang=fr\r\n")).await;
    let sent = origin.received_for("/home")[0].header("cookie");
    assert!(
        !victim.cache_status().starts_with("corral; hit"),
        "the answer fetched with cookie {sent:?} is served for lang=fr: {victim:?}"
    );
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

/// README: a credentialed response "is never stored ... for revalidation only". With
/// `max-age=0` and an `ETag` it is stored for `keep` (600 s by default), and its
/// validators are then sent upstream on behalf of the next, anonymous, request.
#[tokio::test]
async fn review_credentialed_max_age_0_is_not_kept_for_revalidation() {
    let answer = Answer {
        headers: vec![
            ("cache-control".into(), "max-age=0".into()),
            ("etag".into(), "\"victim-v1\"".into()),
        ],
        ..Answer::default()
    };
    let (origin, corral) = front(answer, "").await;
    let victim = exchange(
        corral.addr(),
        &get("/account/x.css", "cookie: session=victim\r\n"),
    )
    .await;
    exchange(corral.addr(), &get("/account/x.css", "")).await;
    let anonymous = &origin.received_for("/account/x.css")[1];
    assert_eq!(
        anonymous.header("if-none-match"),
        None,
        "the victim's validator was sent for an anonymous request; victim: {victim:?}"
    );
}

/// ... and when the origin's validator does not depend on the session (a version ETag),
/// its 304 to that anonymous revalidation hands the victim's stored body to the
/// anonymous client.
#[tokio::test]
async fn review_credentialed_body_is_not_served_after_an_anonymous_304() {
    let answer = Answer {
        headers: vec![
            ("cache-control".into(), "max-age=0".into()),
            ("etag".into(), "\"v1\"".into()),
        ],
        body: Some(b"victim's account page".to_vec()),
        ..Answer::default()
    };
    let (origin, corral) = front(answer, "").await;
    exchange(
        corral.addr(),
        &get("/account/x.css", "cookie: session=victim\r\n"),
    )
    .await;
    origin.set_answer(Answer {
        status: 304,
        headers: vec![
            ("cache-control".into(), "max-age=0".into()),
            ("etag".into(), "\"v1\"".into()),
        ],
        body: Some(Vec::new()),
        ..Answer::default()
    });
    let anonymous = exchange(corral.addr(), &get("/account/x.css", "")).await;
    assert!(
        !anonymous.text().contains("victim"),
        "the anonymous client got the victim's page: {anonymous:?}"
    );
}
