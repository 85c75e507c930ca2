//! Reverse-proxy behaviour around the cache: routing, errors, headers, bodies,
//! protocols, the admin listener and shutdown.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{OriginBehaviour, Setup, DEADLINE};

#[tokio::test]
async fn unmatched_path_is_404_with_a_cache_status() {
    let h = Setup::default()
        .route("path_prefix = \"/api\"")
        .start()
        .await;
    let res = h.get("/apix").await;
    assert_eq!(res.status, StatusCode::NOT_FOUND);
    // Like every response, it says what the cache made of it.
    assert_eq!(res.cache_status(), "corral; detail=no-route");
    assert_eq!(h.get("/api/x").await.status, StatusCode::OK);
    assert_eq!(h.origin.requests(), 1);
}

#[tokio::test]
async fn upstream_timeout_is_504_and_refused_is_502() {
    let slow = OriginBehaviour {
        delay: Duration::from_secs(5),
        ..OriginBehaviour::default()
    };
    let h = Setup::origin(slow)
        .route("response_timeout = \"200ms\"")
        .start()
        .await;
    let res = h.get("/slow").await;
    assert_eq!(res.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(res.text(), "upstream timed out\n");
    h.origin.stop();
    let res = h.request(Method::POST, "/gone", b"x").await;
    assert_eq!(res.status, StatusCode::BAD_GATEWAY);
    assert_eq!(res.text(), "upstream unavailable\n");
}

#[tokio::test]
async fn other_methods_pass_through_with_their_bodies() {
    let h = Setup::default().start().await;
    let res = h.request(Method::POST, "/p", b"hello upstream").await;
    assert_eq!(res.status, StatusCode::OK);
    assert!(res.text().contains("received=14"), "{}", res.text());
    assert_eq!(res.cache_status(), "corral; fwd=method");
    h.request(Method::POST, "/p", b"again").await;
    assert_eq!(h.origin.requests_for("/p"), 2, "never served from cache");
}

#[tokio::test]
async fn connect_method_is_refused() {
    let h = Setup::default().start().await;
    let res = h
        .send(
            Request::builder()
                .method(Method::CONNECT)
                .uri(h.addr().to_string())
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(res.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn bypass_route_never_caches() {
    let h = Setup::default().route("cache = false").start().await;
    h.get("/b").await;
    let res = h.get("/b").await;
    assert_eq!(res.cache_status(), "corral; fwd=bypass");
    assert_eq!(h.origin.requests_for("/b"), 2);
}

#[tokio::test]
async fn hop_by_hop_headers_stay_and_forwarding_headers_go_upstream() {
    let h = Setup::default().start().await;
    h.get_with(
        "/hdr",
        &[
            ("connection", "x-private"),
            ("x-private", "secret"),
            ("x-kept", "1"),
            ("host", "example.com"),
        ],
    )
    .await;
    let sent = h.origin.last_request_headers("/hdr").unwrap();
    assert!(
        !sent.contains_key("x-private"),
        "headers named by Connection are hop-by-hop"
    );
    assert_eq!(sent["x-kept"], "1");
    assert_eq!(sent["x-forwarded-for"], "127.0.0.1");
    assert_eq!(sent["x-forwarded-host"], "example.com");
    assert_eq!(sent["x-forwarded-proto"], "http");
    assert_eq!(sent["via"], "1.1 corral");
    assert_eq!(
        sent["host"],
        h.origin.addr().to_string().as_str(),
        "Host names the upstream by default"
    );
}

#[tokio::test]
async fn preserve_host_keeps_the_clients_host() {
    let h = Setup::default().route("preserve_host = true").start().await;
    h.get_with("/hdr", &[("host", "example.com")]).await;
    assert_eq!(
        h.origin.last_request_headers("/hdr").unwrap()["host"],
        "example.com"
    );
}

#[tokio::test]
async fn host_routes_win_over_catch_all() {
    let origin2 = corral::origin::Origin::start(OriginBehaviour {
        version: 2,
        ..OriginBehaviour::default()
    })
    .await
    .unwrap();
    let extra = format!(
        "[[route]]\nname = \"special\"\nhost = \"special.example\"\nupstream = \"{}\"",
        origin2.url()
    );
    let h = Setup::default().route(&extra).start().await;
    assert!(h
        .get_with("/x", &[("host", "special.example:8080")])
        .await
        .text()
        .starts_with("/x v2"));
    assert!(h
        .get_with("/x", &[("host", "other.example")])
        .await
        .text()
        .starts_with("/x v1"));
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let h = Setup::default().start().await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    for _ in 0..2 {
        let res = client
            .request(Request::get(h.url("/h2")).body(Full::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.version(), http::Version::HTTP_2);
    }
    assert_eq!(
        h.origin.requests_for("/h2"),
        1,
        "h2 requests share the cache"
    );
}

#[tokio::test]
async fn admin_serves_health_and_metrics() {
    let h = Setup::default().start().await;
    h.get("/m").await;
    h.get("/m").await;
    let health = h.admin("/healthz").await;
    assert_eq!(
        (health.status, health.text().as_str()),
        (StatusCode::OK, "ok\n")
    );
    assert_eq!(
        h.metric("corral_requests_total{route=\"t\",cache_status=\"hit\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("corral_requests_total{route=\"t\",cache_status=\"miss\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("corral_upstream_requests_total{route=\"t\",reason=\"fill\"}")
            .await,
        1.0
    );
    assert_eq!(h.metric("corral_cache_entries").await, 1.0);
    assert_eq!(h.admin("/nope").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_then_refuses() {
    let slow = OriginBehaviour {
        delay: Duration::from_millis(500),
        ..OriginBehaviour::default()
    };
    let h = Setup::origin(slow).start().await;
    let addr = h.addr();
    let in_flight = {
        let url = h.url("/drain");
        tokio::spawn(async move {
            let res = support::client()
                .request(Request::get(url).body(Full::default()).unwrap())
                .await
                .unwrap();
            let status = res.status();
            (status, res.into_body().collect().await.unwrap().to_bytes())
        })
    };
    assert_eq!(h.origin.wait_for_requests(1, DEADLINE).await, 1);
    let support::Harness { server, origin, .. } = h;
    tokio::time::timeout(DEADLINE, server.shutdown())
        .await
        .expect("shutdown completes");
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK, "the in-flight request finished");
    assert!(body.starts_with(b"/drain v1"));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    drop(origin);
}

/// An upstream nobody listens on: connections are refused.
fn refusing_upstream() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

#[tokio::test]
async fn head_leading_a_failed_fill_gets_its_error_without_a_body_over_http1() {
    let front = Setup::default()
        .start_in_front_of(&refusing_upstream())
        .await;
    let mut client = support::raw::RawClient::connect(front.addr()).await;
    let head = client
        .exchange(b"HEAD /head-fail HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await;
    assert_eq!(head.status, 502, "{head:?}");
    assert!(
        head.cache_status().contains("detail=upstream-connect"),
        "{head:?}"
    );
    assert_eq!(head.header("content-length"), None, "{head:?}");
    // The connection carries on with the next request.
    let next = client.get("/after").await;
    assert_eq!(next.status, 502, "{next:?}");
    assert_eq!(next.text(), "upstream unavailable\n");
}

#[tokio::test]
async fn head_leading_a_failed_fill_gets_its_error_without_a_body_over_h2() {
    let front = Setup::default()
        .start_in_front_of(&refusing_upstream())
        .await;
    let mut h2 = support::raw::h2c::<http_body_util::Empty<Bytes>>(front.addr()).await;
    let req = Request::builder()
        .method(Method::HEAD)
        .uri("http://127.0.0.1/head-fail-h2")
        .body(http_body_util::Empty::new())
        .unwrap();
    let res = h2.send_request(req).await.expect("an h2 response");
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(res.headers().get("content-length"), None);
    let body = res
        .into_body()
        .collect()
        .await
        .expect("a well-formed h2 body");
    assert!(body.to_bytes().is_empty());
}
