//! Web cache deception and what gets stored: a response to a request with credentials
//! is not stored on heuristic freshness, such a request never turns caching off for
//! others, routes opt in by naming cookies, and only responses that answer the
//! resource (not the method, not an unknowable `Vary`) are stored heuristically. A
//! revalidation whose result may not be stored still answers with the body.

use std::time::{Duration, Instant};

use crate::support::raw::{exchange, Answer, RecordingOrigin};
use crate::support::redis::RedisServer;
use crate::support::{eventually, herd_over, Harness, OriginBehaviour, Setup};

/// An answer without any freshness of its own: stored only on the route's ttl.
fn heuristic() -> Answer {
    Answer {
        headers: vec![],
        ..Answer::default()
    }
}

fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: a\r\n{extra}\r\n").into_bytes()
}

#[tokio::test]
async fn cookie_request_answered_without_cache_control_is_not_served_to_others() {
    let origin = RecordingOrigin::answering(heuristic()).await;
    let corral = Setup::default()
        .route("ttl = \"60s\"")
        .start_in_front_of(&origin.url())
        .await;
    let victim = exchange(
        corral.addr(),
        &get("/account/x.css", "cookie: session=victim\r\n"),
    )
    .await;
    assert_eq!(victim.status, 200, "{victim:?}");
    assert!(victim.cache_status().contains("credentials"), "{victim:?}");

    let attacker = exchange(corral.addr(), &get("/account/x.css", "")).await;
    assert_eq!(origin.received_for("/account/x.css").len(), 2);
    assert!(!attacker.cache_status().contains("hit"), "{attacker:?}");
    // The anonymous answer is stored as usual: no hit-for-pass was left behind.
    let next = exchange(corral.addr(), &get("/account/x.css", "")).await;
    assert!(next.cache_status().starts_with("corral; hit"), "{next:?}");
    assert_eq!(origin.received_for("/account/x.css").len(), 2);
}

#[tokio::test]
async fn explicit_shared_freshness_still_stores_a_credentialed_response() {
    for cache_control in ["max-age=60", "s-maxage=60", "public"] {
        let (origin, corral) = Setup::default()
            .in_front_of(Answer {
                headers: vec![("cache-control".into(), cache_control.into())],
                ..Answer::default()
            })
            .await;
        let first = exchange(corral.addr(), &get("/logo.png", "cookie: session=1\r\n")).await;
        assert_eq!(first.status, 200, "{cache_control}: {first:?}");
        let second = exchange(corral.addr(), &get("/logo.png", "")).await;
        assert!(
            second.cache_status().starts_with("corral; hit"),
            "{cache_control}: {second:?}"
        );
        assert_eq!(origin.received().len(), 1, "{cache_control}");
    }
}

#[tokio::test]
async fn keyed_and_ignored_cookies_opt_a_route_in_and_split_its_keys() {
    let origin = RecordingOrigin::answering(heuristic()).await;
    let corral = Setup::default()
        .route("key = { cookies = [\"lang\"] }\nignore_cookies = [\"_ga\"]")
        .start_in_front_of(&origin.url())
        .await;
    let en = exchange(
        corral.addr(),
        &get("/home", "cookie: lang=en; _ga=GA1.1\r\n"),
    )
    .await;
    assert!(!en.cache_status().contains("credentials"), "{en:?}");
    // Forwarded unchanged, the ignored cookie included.
    let sent = origin.received_for("/home");
    assert_eq!(
        sent[0].header("cookie").as_deref(),
        Some("lang=en; _ga=GA1.1")
    );

    // The HTTP/1 fast path keys the same way: same lang, other _ga -> hit.
    let again = exchange(
        corral.addr(),
        &get("/home", "cookie: _ga=GA1.2; lang=en\r\n"),
    )
    .await;
    assert!(again.cache_status().starts_with("corral; hit"), "{again:?}");
    let fr = exchange(corral.addr(), &get("/home", "cookie: lang=fr\r\n")).await;
    assert!(!fr.cache_status().contains("hit"), "{fr:?}");
    let none = exchange(corral.addr(), &get("/home", "")).await;
    assert!(!none.cache_status().contains("hit"), "{none:?}");
    assert_eq!(origin.received_for("/home").len(), 3);

    // Any other cookie is a credential again.
    let session = exchange(corral.addr(), &get("/home", "cookie: lang=de; sid=1\r\n")).await;
    assert!(
        session.cache_status().contains("credentials"),
        "{session:?}"
    );
}

/// One request with credentials leads the fill while a herd waits on it: the herd must
/// neither inherit its pass (all going upstream) nor find the key hit-for-pass later.
async fn credentialed_leader_does_not_release_the_herd(credential: (&str, &str)) {
    let h = Setup::origin(OriginBehaviour {
        delay: Duration::from_millis(300),
        cache_control: None,
        ..OriginBehaviour::default()
    })
    .route("ttl = \"60s\"")
    .start()
    .await;
    let path = "/popular";
    let credentials = [credential];
    let attacker = h.get_with(path, &credentials);
    let herd = async {
        eventually("the attacker's fetch reaches the origin", || async {
            (h.origin.requests_for(path) == 1).then_some(())
        })
        .await;
        h.herd(path, 20).await
    };
    let (attacker, herd) = tokio::join!(attacker, herd);
    assert_eq!(attacker.status, 200);
    assert!(
        attacker
            .cache_status()
            .contains(credential_reason(credential.0)),
        "{attacker:?}"
    );
    assert!(herd.iter().all(|r| r.status == 200), "{herd:?}");
    // The attacker's fetch, then one fill for the whole herd.
    assert_eq!(h.origin.requests_for(path), 2);
    let next = h.get(path).await;
    assert!(next.cache_status().starts_with("corral; hit"), "{next:?}");
    assert_eq!(h.origin.requests_for(path), 2);
}

fn credential_reason(header: &str) -> &'static str {
    if header == "authorization" {
        "authorization"
    } else {
        "credentials"
    }
}

#[tokio::test]
async fn an_authorization_request_does_not_turn_caching_off_for_the_herd() {
    credentialed_leader_does_not_release_the_herd(("authorization", "x")).await;
}

#[tokio::test]
async fn a_cookie_request_does_not_turn_caching_off_for_the_herd() {
    credentialed_leader_does_not_release_the_herd(("cookie", "session=attacker")).await;
}

#[tokio::test]
async fn method_override_405_is_not_stored_for_the_url() {
    let (origin, corral) = Setup::default()
        .in_front_of(Answer {
            status: 405,
            ..heuristic()
        })
        .await;
    let poisoned = exchange(
        corral.addr(),
        &get("/items/1", "x-http-method-override: DELETE\r\n"),
    )
    .await;
    assert_eq!(poisoned.status, 405);
    origin.set_answer(heuristic());
    let next = exchange(corral.addr(), &get("/items/1", "")).await;
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(origin.received_for("/items/1").len(), 2);
}

#[tokio::test]
async fn unparsable_vary_is_not_stored_as_if_it_did_not_vary() {
    let (origin, corral) = Setup::default()
        .in_front_of(Answer {
            headers: vec![
                ("cache-control".into(), "max-age=60".into()),
                ("vary".into(), "accept-language, x(user)".into()),
            ],
            ..Answer::default()
        })
        .await;
    let first = exchange(corral.addr(), &get("/v", "")).await;
    assert!(first.cache_status().contains("vary-star"), "{first:?}");
    exchange(corral.addr(), &get("/v", "")).await;
    assert_eq!(origin.received_for("/v").len(), 2);
}

#[tokio::test]
async fn route_host_written_with_case_and_trailing_dot_matches_requests() {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default()
        .route("host = \"Example.COM.\"")
        .start_in_front_of(&origin.url())
        .await;
    let res = exchange(
        corral.addr(),
        b"GET /p HTTP/1.1\r\nhost: example.com\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(origin.received_for("/p").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentialed_fill_elsewhere_in_the_fleet_does_not_release_the_herd() {
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(OriginBehaviour {
        delay: Duration::from_millis(300),
        cache_control: None,
        ..OriginBehaviour::default()
    })
    .redis(&redis.url())
    .start_fleet(2)
    .await;
    let path = "/popular";
    let attacker = h.get_with(path, &[("authorization", "x")]);
    let herd = async {
        eventually("the attacker's fetch reaches the origin", || async {
            (h.origin.requests_for(path) == 1).then_some(())
        })
        .await;
        let started = Instant::now();
        let replies = herd_over(&[&others[0]], path, 10).await;
        (replies, started.elapsed())
    };
    let (attacker, (herd, took)) = tokio::join!(attacker, herd);
    assert_eq!(attacker.status, 200);
    assert!(herd.iter().all(|r| r.status == 200), "{herd:?}");
    // The other instance fills once for its herd, as soon as the lock is free: it
    // neither passes every request upstream nor waits out the lock's TTL.
    assert_eq!(h.origin.requests_for(path), 2);
    assert!(took < Duration::from_secs(3), "the herd waited {took:?}");
    let next = Harness::get_from(&h.server, path).await;
    assert!(next.cache_status().starts_with("corral; hit"), "{next:?}");
}

#[tokio::test]
async fn credentialed_revalidation_gets_the_stored_body_not_a_bare_304() {
    // Stored by an anonymous request for revalidation only (no-cache + validator).
    let revalidate_only = vec![
        ("cache-control".to_string(), "no-cache".to_string()),
        ("etag".to_string(), "\"v1\"".to_string()),
    ];
    let (origin, corral) = Setup::default()
        .in_front_of(Answer {
            headers: revalidate_only.clone(),
            ..Answer::default()
        })
        .await;
    let first = exchange(corral.addr(), &get("/doc", "")).await;
    assert_eq!(first.text(), "answer to GET /doc");

    // A request with a session cookie revalidates it; the origin says 304.
    origin.set_answer(Answer {
        status: 304,
        headers: revalidate_only,
        body: Some(Vec::new()),
        ..Answer::default()
    });
    let res = exchange(corral.addr(), &get("/doc", "cookie: session=1\r\n")).await;
    let sent = origin.received_for("/doc");
    assert_eq!(sent[1].header("if-none-match").as_deref(), Some("\"v1\""));
    // The client asked for no condition: it gets the body, not a bare 304.
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.text(), "answer to GET /doc");
    assert!(res.cache_status().contains("credentials"), "{res:?}");
}

#[tokio::test]
async fn revalidation_made_unstorable_by_the_304_still_gets_the_body() {
    let (origin, corral) = Setup::default()
        .in_front_of(Answer {
            headers: vec![
                ("cache-control".into(), "no-cache".into()),
                ("etag".into(), "\"v1\"".into()),
            ],
            ..Answer::default()
        })
        .await;
    exchange(corral.addr(), &get("/doc", "")).await;
    origin.set_answer(Answer {
        status: 304,
        headers: vec![
            ("cache-control".into(), "no-store".into()),
            ("etag".into(), "\"v1\"".into()),
        ],
        body: Some(Vec::new()),
        ..Answer::default()
    });
    let res = exchange(corral.addr(), &get("/doc", "")).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.text(), "answer to GET /doc");
    assert!(res.cache_status().contains("no-store"), "{res:?}");
}

/// A client's own `Cache-Control: no-store` (or `Pragma: no-cache`) asks nothing of what
/// a shared cache stores (nginx and Varnish ignore it there too): it must not make the
/// key hit-for-pass for everyone.
#[tokio::test]
async fn a_request_no_store_does_not_turn_caching_off_for_others() {
    for directive in ["cache-control: no-store\r\n", "pragma: no-cache\r\n"] {
        let origin = RecordingOrigin::answering(Answer::default()).await;
        let corral = Setup::default().start_in_front_of(&origin.url()).await;
        let attacker = exchange(corral.addr(), &get("/hot", directive)).await;
        assert_eq!(attacker.status, 200, "{attacker:?}");
        let next = exchange(corral.addr(), &get("/hot", "")).await;
        assert!(
            next.cache_status().starts_with("corral; hit"),
            "{directive:?} turned caching off: {attacker:?} / {next:?}"
        );
        assert_eq!(origin.received_for("/hot").len(), 1);
    }
}

/// A 4xx outside `cacheable_statuses` may answer something of the request the key does
/// not see (`Expect`, an oversized header, a method override): it passes for that
/// request only, and the next request fills and stores as usual.
#[tokio::test]
async fn a_client_error_caused_by_unkeyed_input_does_not_turn_caching_off_for_others() {
    for status in [400, 403, 417, 431] {
        let (origin, corral) = Setup::default()
            .in_front_of(Answer {
                status,
                ..Answer::default()
            })
            .await;
        let attacker = exchange(corral.addr(), &get("/hot", "expect: x\r\n")).await;
        assert_eq!(attacker.status, status, "{attacker:?}");
        origin.set_answer(Answer::default());
        let filled = exchange(corral.addr(), &get("/hot", "")).await;
        assert_eq!(filled.status, 200, "{status}: {filled:?}");
        let next = exchange(corral.addr(), &get("/hot", "")).await;
        assert!(
            next.cache_status().starts_with("corral; hit"),
            "{status} turned caching off: {filled:?} / {next:?}"
        );
        assert_eq!(origin.received_for("/hot").len(), 2, "{status}");
    }
}

/// What the origin answers a request without the victim's session.
fn anonymous_page() -> Answer {
    Answer {
        body: Some(b"sign in".to_vec()),
        ..Answer::default()
    }
}

/// `max-age=0` is explicit freshness, but zero: for a credentialed request it must not
/// let the route's `override_ttl` store the victim's page for everyone.
#[tokio::test]
async fn credentialed_max_age_0_is_not_stored_on_the_route_override_ttl() {
    let (origin, corral) = Setup::default()
        .route("ttl = \"60s\"\noverride_ttl = true")
        .in_front_of(Answer {
            headers: vec![("cache-control".into(), "max-age=0".into())],
            body: Some(b"victim's account page".to_vec()),
            ..Answer::default()
        })
        .await;
    let victim = exchange(
        corral.addr(),
        &get("/account/x.css", "cookie: session=victim\r\n"),
    )
    .await;
    assert!(victim.cache_status().contains("credentials"), "{victim:?}");
    origin.set_answer(anonymous_page());
    let attacker = exchange(corral.addr(), &get("/account/x.css", "")).await;
    assert!(
        !attacker.text().contains("victim"),
        "the victim's page was served from the cache: {attacker:?}"
    );
    assert_eq!(origin.received_for("/account/x.css").len(), 2);
}

/// An already expired credentialed answer is not stored for the route's default
/// stale windows either.
#[tokio::test]
async fn credentialed_expired_answer_is_not_served_stale_to_others() {
    for expired in [("expires", "0"), ("cache-control", "max-age=0")] {
        let (origin, corral) = Setup::default()
            .route("stale_while_revalidate = \"60s\"\nstale_if_error = \"60s\"")
            .in_front_of(Answer {
                headers: vec![(expired.0.into(), expired.1.into())],
                body: Some(b"victim's account page".to_vec()),
                ..Answer::default()
            })
            .await;
        exchange(
            corral.addr(),
            &get("/account/x.css", "cookie: session=victim\r\n"),
        )
        .await;
        origin.set_answer(anonymous_page());
        let attacker = exchange(corral.addr(), &get("/account/x.css", "")).await;
        assert!(
            !attacker.text().contains("victim"),
            "{expired:?}: the victim's page was served stale: {attacker:?}"
        );
        assert_eq!(
            origin.received_for("/account/x.css").len(),
            2,
            "{expired:?}"
        );
    }
}

/// Nor is it kept for revalidation (`keep`): its validator would be sent upstream for
/// the next, anonymous, request.
#[tokio::test]
async fn credentialed_max_age_0_is_not_kept_for_revalidation() {
    let (origin, corral) = Setup::default()
        .in_front_of(Answer {
            headers: vec![
                ("cache-control".into(), "max-age=0".into()),
                ("etag".into(), "\"victim-v1\"".into()),
            ],
            ..Answer::default()
        })
        .await;
    let victim = exchange(
        corral.addr(),
        &get("/account/x.css", "cookie: session=victim\r\n"),
    )
    .await;
    assert!(victim.cache_status().contains("credentials"), "{victim:?}");
    exchange(corral.addr(), &get("/account/x.css", "")).await;
    let anonymous = &origin.received_for("/account/x.css")[1];
    assert_eq!(
        anonymous.header("if-none-match"),
        None,
        "the victim's validator was sent for an anonymous request: {anonymous:?}"
    );
}

/// ... so an origin whose validator does not depend on the session (a version ETag)
/// cannot, by answering 304 to an anonymous request, hand it the victim's body.
#[tokio::test]
async fn credentialed_body_is_not_served_after_an_anonymous_304() {
    let versioned = vec![
        ("cache-control".to_string(), "max-age=0".to_string()),
        ("etag".to_string(), "\"v1\"".to_string()),
    ];
    let (origin, corral) = Setup::default()
        .in_front_of(Answer {
            headers: versioned.clone(),
            body: Some(b"victim's account page".to_vec()),
            ..Answer::default()
        })
        .await;
    exchange(
        corral.addr(),
        &get("/account/x.css", "cookie: session=victim\r\n"),
    )
    .await;
    origin.set_answer(Answer {
        status: 304,
        headers: versioned,
        body: Some(Vec::new()),
        ..Answer::default()
    });
    let anonymous = exchange(corral.addr(), &get("/account/x.css", "")).await;
    assert!(
        !anonymous.text().contains("victim"),
        "the anonymous client got the victim's page: {anonymous:?}"
    );
}

/// `key.cookies` keys a cookie only as written `name=value`: `lang =fr` reaches the
/// origin as a cookie named `lang ` (Go drops it, PHP reads `lang_`), so its answer
/// must not be stored under the key of `lang=fr`. Being an unknown cookie, it is a
/// credential.
#[tokio::test]
async fn keyed_cookie_written_with_spaces_is_not_keyed_as_that_cookie() {
    let origin = RecordingOrigin::answering(heuristic()).await;
    let corral = Setup::default()
        .route("key = { cookies = [\"lang\"] }")
        .start_in_front_of(&origin.url())
        .await;
    let spaced = exchange(corral.addr(), &get("/home", "cookie: lang =fr\r\n")).await;
    assert!(spaced.cache_status().contains("credentials"), "{spaced:?}");
    let victim = exchange(corral.addr(), &get("/home", "cookie: lang=fr\r\n")).await;
    assert!(
        !victim.cache_status().starts_with("corral; hit"),
        "the answer to `lang =fr` is served for lang=fr: {victim:?}"
    );
    // A value written with a space is another value.
    exchange(corral.addr(), &get("/home", "cookie: lang= fr\r\n")).await;
    let again = exchange(corral.addr(), &get("/home", "cookie: lang=fr\r\n")).await;
    assert!(again.cache_status().starts_with("corral; hit"), "{again:?}");
    assert_eq!(origin.received_for("/home").len(), 3);
}

/// An origin that names `Vary` in `Connection` has corral drop that `Vary` (RFC 9110
/// §7.6.1): the variants could no longer be told apart, so the answer is not stored
/// (judged on the head as it would be stored, not on the raw one).
#[tokio::test]
async fn vary_named_in_connection_is_not_stored_without_its_vary() {
    let (origin, corral) = Setup::default()
        .in_front_of(Answer {
            headers: vec![
                ("cache-control".into(), "max-age=60".into()),
                ("vary".into(), "accept-language".into()),
                ("connection".into(), "vary".into()),
            ],
            ..Answer::default()
        })
        .await;
    let en = exchange(corral.addr(), &get("/v", "accept-language: en\r\n")).await;
    assert!(en.cache_status().contains("vary-star"), "{en:?}");
    let fr = exchange(corral.addr(), &get("/v", "accept-language: fr\r\n")).await;
    assert!(
        !fr.cache_status().starts_with("corral; hit"),
        "the English answer was served for fr: {fr:?}"
    );
    assert_eq!(origin.received_for("/v").len(), 2);
}
