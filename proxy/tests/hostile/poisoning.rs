//! Cache poisoning through unkeyed inputs: what corral keys is what it forwards. The
//! host is normalised once (absolute-form target first, lowercase, no port, no
//! trailing dot); forwarding headers are corral's own unless the peer is a trusted
//! proxy; headers that rewrite a request at the origin bypass the cache; headers that
//! `Connection` names are gone before the key is made.

use crate::support::raw::{exchange, RecordingOrigin};
use crate::support::{Front, Setup};

async fn start(setup: Setup) -> (RecordingOrigin, Front) {
    let origin = RecordingOrigin::start().await;
    let corral = setup.start_in_front_of(&origin.url()).await;
    (origin, corral)
}

fn get(path: &str, headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\n{headers}\r\n").into_bytes()
}

#[tokio::test]
async fn client_forwarding_headers_are_replaced_by_corrals_own() {
    let (origin, corral) = start(Setup::default()).await;
    let headers = "host: shop.example\r\nx-forwarded-host: evil.example\r\n\
                   x-forwarded-proto: https\r\nx-forwarded-for: 10.9.9.9\r\n\
                   forwarded: for=10.9.9.9;host=evil.example\r\nx-real-ip: 10.9.9.9\r\n\
                   x-forwarded-port: 8443\r\nx-host: evil.example\r\n";
    let res = exchange(corral.addr(), &get("/f", headers)).await;
    assert_eq!(res.status, 200);
    let got = &origin.wait_for(1).await[0];
    assert_eq!(
        got.header("x-forwarded-host").as_deref(),
        Some("shop.example")
    );
    assert_eq!(got.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(got.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    for gone in ["forwarded", "x-real-ip", "x-forwarded-port", "x-host"] {
        assert_eq!(got.header(gone), None, "{gone} reached the origin: {got:?}");
    }
}

#[tokio::test]
async fn trusted_proxies_keep_their_forwarding_headers() {
    let (origin, corral) = start(Setup::default().top("trusted_proxies = [\"127.0.0.0/8\"]")).await;
    let headers = "host: shop.example\r\nx-forwarded-host: www.example\r\n\
                   x-forwarded-proto: https\r\nx-forwarded-for: 10.9.9.9\r\n";
    exchange(corral.addr(), &get("/t", headers)).await;
    let got = &origin.wait_for(1).await[0];
    assert_eq!(
        got.header("x-forwarded-host").as_deref(),
        Some("www.example")
    );
    assert_eq!(got.header("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(
        got.header("x-forwarded-for").as_deref(),
        Some("10.9.9.9, 127.0.0.1")
    );
}

#[tokio::test]
async fn absolute_form_target_is_keyed_and_forwarded_with_its_own_host() {
    let (origin, corral) = start(Setup::default().route("preserve_host = true")).await;
    let res = exchange(
        corral.addr(),
        &get("http://a.example/p", "host: b.example\r\n"),
    )
    .await;
    assert!(res.cache_status().contains("stored"), "{res:?}");
    let got = &origin.wait_for(1).await[0];
    assert_eq!(got.target, "/p");
    assert_eq!(got.header("host").as_deref(), Some("a.example"));
    // Stored under a.example, where it was fetched from; b.example is another key.
    let a = exchange(corral.addr(), &get("/p", "host: a.example\r\n")).await;
    assert!(a.cache_status().starts_with("corral; hit"), "{a:?}");
    let b = exchange(corral.addr(), &get("/p", "host: b.example\r\n")).await;
    assert!(b.cache_status().contains("fwd=miss"), "{b:?}");
    assert_eq!(
        origin.received()[1].header("host").as_deref(),
        Some("b.example")
    );
}

#[tokio::test]
async fn host_port_case_and_trailing_dot_share_the_key_and_are_forwarded_canonical() {
    let (origin, corral) = start(Setup::default().route("preserve_host = true")).await;
    let first = exchange(corral.addr(), &get("/h", "host: Shop.Example.:8080\r\n")).await;
    assert!(first.cache_status().contains("stored"), "{first:?}");
    let got = &origin.wait_for(1).await[0];
    assert_eq!(got.header("host").as_deref(), Some("shop.example"));
    assert_eq!(
        got.header("x-forwarded-host").as_deref(),
        Some("shop.example")
    );
    for host in ["shop.example", "SHOP.example:1", "shop.example."] {
        let res = exchange(corral.addr(), &get("/h", &format!("host: {host}\r\n"))).await;
        assert!(
            res.cache_status().starts_with("corral; hit"),
            "{host}: {res:?}"
        );
    }
    assert_eq!(origin.received().len(), 1);
}

#[tokio::test]
async fn missing_duplicate_and_invalid_hosts_are_refused() {
    let (origin, corral) = start(Setup::default()).await;
    for headers in [
        "",
        "host: a.example\r\nhost: b.example\r\n",
        "host: a.example\r\nhost: a.example\r\n",
        "host: a b\r\n",
        "host: a/b\r\n",
        "host: a..example\r\n",
        "host: a.example:99999999\r\n",
        "host: \r\n",
    ] {
        let res = exchange(corral.addr(), &get("/x", headers)).await;
        assert_eq!(res.status, 400, "{headers:?}: {res:?}");
    }
    let res = exchange(
        corral.addr(),
        &get("http://u:p@a.example/x", "host: a.example\r\n"),
    )
    .await;
    assert_eq!(res.status, 400, "userinfo: {res:?}");
    // HTTP/1.0 may go without a Host.
    let res = exchange(corral.addr(), b"GET /ten HTTP/1.0\r\n\r\n").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(origin.received_for("/x").is_empty());
}

#[tokio::test]
async fn method_override_headers_bypass_the_cache() {
    let (origin, corral) = start(Setup::default()).await;
    for header in [
        "x-http-method-override: DELETE",
        "x-http-method: DELETE",
        "x-method-override: DELETE",
    ] {
        let res = exchange(
            corral.addr(),
            &get("/o", &format!("host: a\r\n{header}\r\n")),
        )
        .await;
        assert_eq!(
            res.cache_status(),
            "corral; fwd=bypass; detail=rewriting-header",
            "{header}"
        );
    }
    // Nothing of those was stored: the plain request is a miss, then a hit.
    let plain = exchange(corral.addr(), &get("/o", "host: a\r\n")).await;
    assert!(plain.cache_status().contains("fwd=miss"), "{plain:?}");
    let again = exchange(corral.addr(), &get("/o", "host: a\r\n")).await;
    assert!(again.cache_status().starts_with("corral; hit"), "{again:?}");
    // The header reaches the origin: the application still decides what it means.
    assert_eq!(
        origin.received()[0]
            .header("x-http-method-override")
            .as_deref(),
        Some("DELETE")
    );
}

/// `X-Original-URL` / `X-Rewrite-URL` make IIS- and Symfony-style origins serve the path
/// they name: from a client they would reach any path of the upstream through any route.
#[tokio::test]
async fn url_rewriting_headers_never_reach_the_origin() {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default()
        .route("path_prefix = \"/pub\"")
        .start_in_front_of(&origin.url())
        .await;
    for header in [
        "x-original-url: /internal/admin",
        "x-rewrite-url: /internal/admin",
    ] {
        let res = exchange(
            corral.addr(),
            &get("/pub/x", &format!("host: a\r\n{header}\r\n")),
        )
        .await;
        assert_eq!(res.status, 200, "{res:?}");
    }
    for got in origin.wait_for(1).await {
        assert_eq!(got.header("x-original-url"), None, "{got:?}");
        assert_eq!(got.header("x-rewrite-url"), None, "{got:?}");
    }
}

#[tokio::test]
async fn connection_named_headers_are_removed_before_the_key_is_made() {
    let (origin, corral) =
        start(Setup::default().route("key = { headers = [\"x-tenant\"] }")).await;
    let res = exchange(
        corral.addr(),
        &get(
            "/k",
            "host: a\r\nx-tenant: acme\r\nconnection: x-tenant\r\n",
        ),
    )
    .await;
    assert!(res.cache_status().contains("stored"), "{res:?}");
    let got = &origin.wait_for(1).await[0];
    assert_eq!(got.header("x-tenant"), None, "{got:?}");
    // That tenant-less page is not acme's: acme's request goes to the origin...
    let acme = exchange(corral.addr(), &get("/k", "host: a\r\nx-tenant: acme\r\n")).await;
    assert!(acme.cache_status().contains("fwd=miss"), "{acme:?}");
    assert_eq!(
        origin.received()[1].header("x-tenant").as_deref(),
        Some("acme")
    );
    // ...and the tenant-less request is the one it was stored for.
    let none = exchange(corral.addr(), &get("/k", "host: a\r\n")).await;
    assert!(none.cache_status().starts_with("corral; hit"), "{none:?}");
}
