//! What the key holds is what the upstream was asked: `Vary` values taken from the
//! headers lookups see, the query forwarded as the route keys it, one `Cookie` field,
//! and the forwarding headers a trusted proxy sent (kept, so keyed).

use std::time::Duration;

use crate::support::raw::{exchange, Answer, RecordingOrigin};
use crate::support::{Front, Setup};

fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: a\r\n{extra}\r\n").into_bytes()
}

async fn front(answer: Answer, route: &str) -> (RecordingOrigin, Front) {
    Setup::default().route(route).in_front_of(answer).await
}

/// An entry's `Vary` values come from the headers lookups match against (the client's,
/// cleaned), not from the forwarded set with corral's own `X-Forwarded-*` and `Via`:
/// a response varying on one of those still hits.
#[tokio::test]
async fn vary_on_a_header_corral_sets_still_hits() {
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

/// ...and a herd on such an object is still one origin request.
#[tokio::test]
async fn vary_on_a_header_corral_sets_still_coalesces() {
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

/// A forged forwarding header (which the full path strips) cannot make the fast path
/// serve a variant the full path would not: such requests take the full path.
#[tokio::test]
async fn forged_forwarding_headers_do_not_choose_a_variant_on_the_fast_path() {
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

/// With `key.query = "ignore"`, a fill forwards no query: the answer to `?lang=evil`
/// cannot be stored for the bare URL.
#[tokio::test]
async fn fills_forward_the_query_as_it_is_keyed() {
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

/// Two `Cookie` fields reach the HTTP/1.1 origin as one, joined with "; " (RFC 9113
/// §8.2.3), which is also the one field the key reads.
#[tokio::test]
async fn cookie_fields_reach_the_origin_as_one() {
    let (origin, corral) = front(Answer::default(), "ignore_cookies = [\"a\", \"b\"]").await;
    exchange(corral.addr(), &get("/c", "cookie: a=1\r\ncookie: b=2\r\n")).await;
    let got = &origin.wait_for(1).await[0];
    assert_eq!(got.header_count("cookie"), 1, "{got:?}");
}

/// Over h2c, browsers split `Cookie` into crumbs (RFC 9113 §8.2.3); the HTTP/1.1 origin
/// gets them joined into one field.
#[tokio::test]
async fn h2_cookie_crumbs_reach_the_origin_as_one_field() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    let (origin, corral) = front(Answer::default(), "ignore_cookies = [\"a\", \"b\"]").await;
    let mut send = crate::support::raw::h2c(corral.addr()).await;
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

/// From a trusted proxy, `X-Forwarded-Proto` / `X-Forwarded-Host` reach the origin
/// (which builds redirects and links from them), so they are in the key: the answer
/// made for `http` (typically a 301 to https) is never served to `https` requests
/// (nginx keys `$scheme` for this reason).
#[tokio::test]
async fn trusted_forwarded_proto_is_part_of_the_key() {
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

/// A trusted proxy that adds its own `X-Forwarded-For` line (HAProxy's
/// `option forwardfor` does) sends two lines: all of them reach the origin, in order,
/// then the peer.
#[tokio::test]
async fn trusted_forwarded_for_keeps_every_line() {
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

/// A cookie named like a keyed one but written otherwise (`lang =x`, `LANG=x`,
/// `la%6Eg=x`) is keyed as if the request had no `lang`, while Express, ASP.NET and PHP
/// read it as `lang`: its answer is never stored, whatever the origin says.
#[tokio::test]
async fn near_miss_keyed_cookie_names_are_never_stored_for_others() {
    for attack in ["lang =evil", "LANG=evil", "la%6Eg=evil"] {
        let answer = Answer {
            headers: vec![("cache-control".into(), "public, max-age=60".into())],
            ..Answer::default()
        };
        let (origin, corral) = front(answer, "key = { cookies = [\"lang\"] }").await;
        let first = exchange(
            corral.addr(),
            &get("/home", &format!("cookie: {attack}\r\n")),
        )
        .await;
        assert_eq!(first.status, 200, "{attack}: {first:?}");
        let victim = exchange(corral.addr(), &get("/home", "")).await;
        assert!(
            victim.cache_status().contains("fwd=miss"),
            "{attack}: {victim:?}"
        );
        assert_eq!(origin.received_for("/home").len(), 2, "{attack}");
    }
}

/// From a trusted proxy, every forwarding header an origin builds URLs from is part of
/// the key, not only `X-Forwarded-Proto`/`-Host` (Spring and Rack read the prefix, port,
/// scheme, `Forwarded`, ...).
#[tokio::test]
async fn trusted_url_shaping_headers_are_part_of_the_key() {
    for header in [
        "x-forwarded-prefix: //evil.example",
        "x-forwarded-port: 6666",
        "x-forwarded-scheme: https",
        "x-forwarded-ssl: on",
        "forwarded: host=evil.example;proto=https",
    ] {
        let origin = RecordingOrigin::start().await;
        let corral = Setup::default()
            .top("trusted_proxies = [\"127.0.0.0/8\"]")
            .start_in_front_of(&origin.url())
            .await;
        exchange(corral.addr(), &get("/login", &format!("{header}\r\n"))).await;
        let victim = exchange(corral.addr(), &get("/login", "")).await;
        assert!(
            victim.cache_status().contains("fwd=miss"),
            "{header}: {victim:?}"
        );
        assert_eq!(origin.received_for("/login").len(), 2, "{header}");
    }
}

/// An answer that varies on the client's address as corral forwarded it
/// (`Vary: X-Forwarded-For`) cannot be matched to later requests: it is not stored, so
/// another client never gets the page made for the first.
#[tokio::test]
async fn vary_on_the_client_address_is_not_stored() {
    let answer = Answer {
        headers: vec![
            ("cache-control".into(), "max-age=60".into()),
            ("vary".into(), "x-forwarded-for".into()),
        ],
        ..Answer::default()
    };
    let (origin, corral) = front(answer, "").await;
    let first = exchange(corral.addr(), &get("/geo", "")).await;
    assert!(
        first.cache_status().contains("detail=vary-star"),
        "{first:?}"
    );
    let second = exchange(corral.addr(), &get("/geo", "")).await;
    assert!(
        !second.cache_status().starts_with("corral; hit"),
        "{second:?}"
    );
    assert_eq!(origin.received_for("/geo").len(), 2);
}

/// A URL that answers 401 to everyone (an API behind auth) is not serialised: the
/// requests that waited on the fill go upstream at once, not one fill per round.
#[tokio::test]
async fn a_herd_on_a_url_that_answers_401_to_everyone_goes_upstream_at_once() {
    let answer = Answer {
        status: 401,
        headers: vec![],
        delay: Duration::from_millis(300),
        ..Answer::default()
    };
    let (origin, corral) = front(answer, "").await;
    let addr = corral.addr();
    let herd: Vec<_> = (0..8)
        .map(|_| tokio::spawn(async move { exchange(addr, &get("/api/me", "")).await }))
        .collect();
    let mut collapsed = 0;
    for reply in herd {
        let reply = reply.await.unwrap();
        assert_eq!(reply.status, 401);
        assert!(
            !reply.cache_status().contains("retries-exhausted"),
            "{reply:?}"
        );
        collapsed += usize::from(reply.cache_status().contains("collapsed"));
    }
    // Every request but the leader waited once, then went upstream itself.
    assert!(collapsed >= 1, "no request waited on the fill");
    assert_eq!(origin.received_for("/api/me").len(), 8);
}

/// Entries filled through a trusted proxy are keyed with its `X-Forwarded-Proto`; a URL
/// purge names it like a keyed header and reaches them.
#[tokio::test]
async fn url_purge_reaches_entries_keyed_by_a_trusted_forwarded_proto() {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default()
        .top("trusted_proxies = [\"127.0.0.0/8\"]")
        .start_in_front_of(&origin.url())
        .await;
    let https = "x-forwarded-proto: https\r\n";
    exchange(corral.addr(), &get("/page", https)).await;
    let hit = exchange(corral.addr(), &get("/page", https)).await;
    assert!(hit.cache_status().starts_with("corral; hit"), "{hit:?}");
    let purged = exchange(
        corral.admin_addr(),
        b"POST /purge?route=t&host=a&path=/page&header=x-forwarded-proto:https HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert!(purged.text().contains("local=1"), "{}", purged.text());
    let after = exchange(corral.addr(), &get("/page", https)).await;
    assert!(after.cache_status().contains("fwd=miss"), "{after:?}");
}
