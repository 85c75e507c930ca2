//! HTTP caching semantics: freshness, stale windows, validators, Vary, what is never
//! stored, and the local cache's byte bound.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::{OriginBehaviour, Setup};

fn cc(value: &str) -> OriginBehaviour {
    OriginBehaviour {
        cache_control: Some(value.to_string()),
        ..OriginBehaviour::default()
    }
}

#[tokio::test]
async fn second_request_is_a_hit_with_age() {
    let h = Setup::origin(cc("max-age=60")).start().await;
    let first = h.get("/a").await;
    assert_eq!(
        first.cache_status(),
        "corral; fwd=miss; fwd-status=200; stored"
    );
    let second = h.get("/a").await;
    assert!(
        second.cache_status().starts_with("corral; hit; ttl="),
        "{}",
        second.cache_status()
    );
    assert_eq!(second.body, first.body);
    assert!(second.headers.contains_key("age"));
    assert_eq!(second.headers["via"], "1.1 corral");
    assert_eq!(h.origin.requests_for("/a"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    // Early refresh off: this is about what happens at expiry.
    let h = Setup::origin(cc("max-age=1, stale-while-revalidate=60"))
        .route("early_refresh = false")
        .start()
        .await;
    h.get("/swr").await;
    // The refresh will be slow, so the herd below arrives while it runs.
    h.origin.set(|b| {
        b.version = 2;
        b.delay = Duration::from_millis(1500);
    });
    let first_stale = h
        .until(
            "the entry to turn stale",
            || h.get("/swr"),
            |r| r.cache_status().contains("stale-while-revalidate"),
        )
        .await;
    assert!(first_stale.text().starts_with("/swr v1"));

    let herd = h.herd("/swr", 50).await;
    assert!(
        herd.iter()
            .all(|r| r.cache_status().contains("detail=stale-while-revalidate")),
        "all served stale at once, none waited"
    );
    assert!(herd.iter().all(|r| r.text().starts_with("/swr v1")));

    let refreshed = h
        .until(
            "the refreshed copy",
            || h.get("/swr"),
            |r| r.text().starts_with("/swr v2"),
        )
        .await;
    assert!(refreshed.cache_status().starts_with("corral; hit"));
    assert_eq!(
        h.origin.requests_for("/swr"),
        2,
        "exactly one background refresh"
    );
    assert_eq!(
        h.metric("corral_upstream_requests_total{route=\"t\",reason=\"refresh\"}")
            .await,
        1.0
    );
    let stale_served = h
        .metric("corral_stale_served_total{route=\"t\",reason=\"stale-while-revalidate\"}")
        .await;
    assert!(stale_served >= 51.0, "{stale_served}");
}

/// Primes `path`, breaks the origin with `fault`, and waits until corral serves the
/// stale copy because of it.
async fn serves_stale_if_error(
    setup: Setup,
    path: &str,
    fault: impl FnOnce(&support::Harness),
) -> support::Harness {
    let h = setup.start().await;
    assert_eq!(h.get(path).await.status, StatusCode::OK);
    fault(&h);
    let stale = h
        .until(
            "stale-if-error",
            || h.get(path),
            |r| r.cache_status().contains("stale-if-error"),
        )
        .await;
    assert_eq!(stale.status, StatusCode::OK);
    assert!(stale.text().starts_with(&format!("{path} v1")));
    h
}

#[tokio::test]
async fn stale_if_error_on_upstream_500() {
    let setup = Setup::origin(cc("max-age=1, stale-if-error=60")).route("early_refresh = false");
    let h = serves_stale_if_error(setup, "/sie", |h| {
        h.origin
            .set(|b| b.status = StatusCode::INTERNAL_SERVER_ERROR)
    })
    .await;
    let fresh_key = h.get("/never-cached").await;
    assert_eq!(
        fresh_key.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "without a stale copy the error passes"
    );
}

#[tokio::test]
async fn stale_if_error_on_upstream_timeout() {
    let setup = Setup::origin(cc("max-age=1, stale-if-error=60"))
        .route("response_timeout = \"300ms\"\nearly_refresh = false");
    let h = serves_stale_if_error(setup, "/sie", |h| {
        h.origin.set(|b| b.delay = Duration::from_secs(5))
    })
    .await;
    assert_eq!(
        h.get("/never-cached").await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
}

#[tokio::test]
async fn stale_if_error_on_refused_connection() {
    let setup = Setup::origin(cc("max-age=1, stale-if-error=60")).route("early_refresh = false");
    let h = serves_stale_if_error(setup, "/sie", |h| h.origin.stop()).await;
    assert_eq!(h.get("/never-cached").await.status, StatusCode::BAD_GATEWAY);
    // The upstream comes back: the next request revalidates and stores again.
    h.origin.restart().await.unwrap();
    h.until(
        "recovery",
        || h.get("/sie"),
        |r| {
            r.cache_status()
                .contains("fwd=stale; fwd-status=200; stored")
        },
    )
    .await;
}

#[tokio::test]
async fn vary_splits_entries() {
    let behaviour = OriginBehaviour {
        headers: vec![("vary".into(), "accept-language".into())],
        ..cc("max-age=60")
    };
    let h = Setup::origin(behaviour).start().await;
    let en = h.get_with("/v", &[("accept-language", "en")]).await;
    let fr = h.get_with("/v", &[("accept-language", "fr")]).await;
    assert!(en.text().contains("lang=en"));
    assert!(fr.text().contains("lang=fr"));
    assert_eq!(
        fr.cache_status(),
        "corral; fwd=vary-miss; fwd-status=200; stored"
    );
    let en_again = h.get_with("/v", &[("accept-language", "en")]).await;
    let fr_again = h.get_with("/v", &[("accept-language", "fr")]).await;
    assert!(
        en_again.cache_status().starts_with("corral; hit") && en_again.text().contains("lang=en")
    );
    assert!(
        fr_again.cache_status().starts_with("corral; hit") && fr_again.text().contains("lang=fr")
    );
    assert_eq!(h.origin.requests_for("/v"), 2);
}

#[tokio::test]
async fn no_store_is_not_stored() {
    let h = Setup::origin(cc("no-store")).start().await;
    let first = h.get("/ns").await;
    assert!(
        first.cache_status().contains("detail=no-store"),
        "{}",
        first.cache_status()
    );
    h.get("/ns").await;
    assert_eq!(h.origin.requests_for("/ns"), 2);
}

#[tokio::test]
async fn set_cookie_is_not_stored_and_each_client_gets_its_own() {
    let behaviour = OriginBehaviour {
        headers: vec![("set-cookie".into(), "session=abc".into())],
        ..cc("max-age=60")
    };
    let h = Setup::origin(behaviour).start().await;
    let first = h.get("/c").await;
    let second = h.get("/c").await;
    assert!(first.cache_status().contains("detail=set-cookie"));
    assert_eq!(second.headers["set-cookie"], "session=abc");
    assert_eq!(h.origin.requests_for("/c"), 2);
}

#[tokio::test]
async fn set_cookie_route_stores_without_the_cookie() {
    let behaviour = OriginBehaviour {
        headers: vec![("set-cookie".into(), "session=abc".into())],
        ..cc("max-age=60")
    };
    let h = Setup::origin(behaviour)
        .route("allow_set_cookie = true")
        .start()
        .await;
    h.get("/c").await;
    let hit = h.get("/c").await;
    assert!(hit.cache_status().starts_with("corral; hit"));
    assert!(
        !hit.headers.contains_key("set-cookie"),
        "one client's cookie is never served to another"
    );
}

#[tokio::test]
async fn authorization_requests_are_not_stored_unless_public() {
    let h = Setup::origin(cc("max-age=60")).start().await;
    h.get_with("/auth", &[("authorization", "Bearer a")]).await;
    let second = h.get_with("/auth", &[("authorization", "Bearer b")]).await;
    assert!(
        second.cache_status().contains("authorization")
            || second.cache_status().contains("hit-for-pass")
    );
    assert_eq!(h.origin.requests_for("/auth"), 2);
}

#[tokio::test]
async fn head_is_served_from_the_cached_get() {
    let h = Setup::origin(OriginBehaviour {
        body_size: 1000,
        ..cc("max-age=60")
    })
    .start()
    .await;
    let head = h.request(Method::HEAD, "/h", b"").await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.headers["content-length"], "1000");
    let get = h.get("/h").await;
    assert!(
        get.cache_status().starts_with("corral; hit"),
        "the HEAD miss filled the entry with the full body"
    );
    assert_eq!(get.body.len(), 1000);
    let head_hit = h.request(Method::HEAD, "/h", b"").await;
    assert!(head_hit.cache_status().starts_with("corral; hit") && head_hit.body.is_empty());
    assert_eq!(h.origin.requests_for("/h"), 1);
}

#[tokio::test]
async fn client_conditional_requests_get_304_from_cache() {
    let behaviour = OriginBehaviour {
        etag: true,
        headers: vec![(
            "last-modified".into(),
            "Tue, 01 Sep 2026 10:00:00 GMT".into(),
        )],
        ..cc("max-age=60")
    };
    let h = Setup::origin(behaviour).start().await;
    let full = h.get("/cond").await;
    let etag = full.headers["etag"].to_str().unwrap().to_string();

    let by_etag = h.get_with("/cond", &[("if-none-match", &etag)]).await;
    assert_eq!(by_etag.status, StatusCode::NOT_MODIFIED);
    assert!(by_etag.body.is_empty());
    assert_eq!(by_etag.headers["etag"], etag.as_str());

    let by_date = h
        .get_with(
            "/cond",
            &[("if-modified-since", "Wed, 02 Sep 2026 10:00:00 GMT")],
        )
        .await;
    assert_eq!(by_date.status, StatusCode::NOT_MODIFIED);
    let older = h
        .get_with(
            "/cond",
            &[("if-modified-since", "Mon, 31 Aug 2026 10:00:00 GMT")],
        )
        .await;
    assert_eq!(older.status, StatusCode::OK);
    let other_tag = h.get_with("/cond", &[("if-none-match", "\"other\"")]).await;
    assert_eq!(other_tag.status, StatusCode::OK);
    assert_eq!(
        h.origin.requests_for("/cond"),
        1,
        "all answered from the cache"
    );
}

#[tokio::test]
async fn upstream_304_renews_the_entry_without_the_body() {
    let behaviour = OriginBehaviour {
        etag: true,
        body_size: 5000,
        ..cc("max-age=1")
    };
    // Early refresh off: the 304 must come from the revalidation at expiry.
    let h = Setup::origin(behaviour)
        .route("early_refresh = false")
        .start()
        .await;
    let first = h.get("/r").await;
    let renewed = h
        .until(
            "revalidation",
            || h.get("/r"),
            |r| r.cache_status().contains("fwd=stale"),
        )
        .await;
    assert_eq!(
        renewed.cache_status(),
        "corral; fwd=stale; fwd-status=304; stored"
    );
    assert_eq!(renewed.status, StatusCode::OK);
    assert_eq!(
        renewed.body, first.body,
        "the stored body is served under renewed headers"
    );
    assert_eq!(
        h.origin.not_modified(),
        1,
        "the upstream answered 304, not a new body"
    );
    let sent = h.origin.last_request_headers("/r").unwrap();
    assert_eq!(sent["if-none-match"], "\"v1\"");
    assert!(
        h.get("/r").await.cache_status().starts_with("corral; hit"),
        "fresh again after renewal"
    );
}

#[tokio::test]
async fn body_over_max_object_size_streams_through_uncached() {
    for chunked in [false, true] {
        let behaviour = OriginBehaviour {
            body_size: 1024 * 1024,
            chunked,
            ..cc("max-age=60")
        };
        let h = Setup::origin(behaviour)
            .cache("max_object_bytes = \"64KiB\"")
            .start()
            .await;
        let big = h.get("/big").await;
        assert_eq!(big.status, StatusCode::OK);
        assert_eq!(
            big.body.len(),
            1024 * 1024,
            "the whole body arrives (chunked: {chunked})"
        );
        assert!(
            big.cache_status().contains("detail=too-large"),
            "{}",
            big.cache_status()
        );
        let again = h.get("/big").await;
        assert_eq!(again.body.len(), 1024 * 1024);
        assert_eq!(
            h.origin.requests_for("/big"),
            2,
            "never stored (chunked: {chunked})"
        );
    }
}

#[tokio::test]
async fn local_cache_stays_within_its_byte_bound() {
    let behaviour = OriginBehaviour {
        body_size: 100 * 1024,
        ..cc("max-age=60")
    };
    let h = Setup::origin(behaviour)
        .cache("max_bytes = \"1MiB\"\nmax_object_bytes = \"512KiB\"")
        .start()
        .await;
    for i in 0..40 {
        assert_eq!(h.get(&format!("/o{i}")).await.status, StatusCode::OK);
    }
    let local = h.server.proxy().cache().local();
    local.sync();
    assert!(
        local.weighted_size() <= 1024 * 1024,
        "weighted size {}",
        local.weighted_size()
    );
    assert!(local.entry_count() < 40, "older entries were evicted");
    assert!(h.metric("corral_cache_bytes").await <= 1024.0 * 1024.0);
}

#[tokio::test]
async fn query_sort_mode_shares_entries() {
    let h = Setup::origin(cc("max-age=60"))
        .route("key = { query = \"sort\" }")
        .start()
        .await;
    h.get("/q?a=1&b=2").await;
    let hit = h.get("/q?b=2&a=1").await;
    assert!(hit.cache_status().starts_with("corral; hit"));
}

#[tokio::test]
async fn route_ttl_applies_when_upstream_gives_no_freshness() {
    let h = Setup::origin(OriginBehaviour {
        cache_control: None,
        ..OriginBehaviour::default()
    })
    .route("ttl = \"5m\"")
    .start()
    .await;
    h.get("/t").await;
    let hit = h.get("/t").await;
    let ttl: i64 = hit
        .cache_status()
        .rsplit("ttl=")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((295..=300).contains(&ttl), "ttl {ttl}");
}

#[tokio::test]
async fn purge_without_a_fleet_drops_or_staleifies_locally() {
    let h = Setup::origin(cc("max-age=600, stale-while-revalidate=600"))
        .route("tag_header = \"surrogate-key\"")
        .start()
        .await;
    h.get("/x").await;
    h.origin.set(|b| b.version = 2);
    let soft = h
        .admin_post(None, "/purge?route=t&host=127.0.0.1&path=/x&soft=1")
        .await;
    assert_eq!(soft.status, StatusCode::OK);
    let stale = h.get("/x").await;
    assert!(
        stale.cache_status().contains("stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    h.until(
        "the refresh",
        || h.get("/x"),
        |r| r.text().starts_with("/x v2"),
    )
    .await;

    assert_eq!(
        h.admin_post(None, "/purge?route=t&host=127.0.0.1&path=/x")
            .await
            .status,
        StatusCode::OK
    );
    h.origin.set(|b| b.version = 3);
    assert!(
        h.get("/x").await.text().starts_with("/x v3"),
        "hard purge drops the entry"
    );
    assert_eq!(
        h.admin_post(None, "/purge?route=nope&path=/x&host=h")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.admin_post(None, "/purge?route=t&path=/x").await.status,
        StatusCode::BAD_REQUEST,
        "host needed on a catch-all route"
    );
    assert_eq!(
        h.admin_post(None, "/purge").await.status,
        StatusCode::BAD_REQUEST
    );
}
