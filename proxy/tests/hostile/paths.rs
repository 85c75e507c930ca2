//! Route escapes: paths are normalised (RFC 3986) before routing and keying, and
//! forwarded in that form; ambiguous forms are refused with 400.

use crate::support::raw::{exchange, RecordingOrigin};
use crate::support::{Front, Setup};

async fn start(route: &str) -> (RecordingOrigin, Front) {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default()
        .route("path_prefix = \"/pub\"")
        .route(route)
        .start_in_front_of(&origin.url())
        .await;
    (origin, corral)
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn dot_segments_cannot_leave_the_route() {
    let (origin, corral) = start("").await;
    for path in [
        "/pub/../internal",
        "/pub/%2e%2e/internal",
        "/pub/%2E%2E/internal",
        "/pub/.%2e/internal",
        "/pub/x/../../internal",
    ] {
        let res = exchange(corral.addr(), &get(path)).await;
        assert_eq!(res.status, 404, "{path}: {res:?}");
    }
    assert!(origin.received().is_empty(), "{:?}", origin.received());
}

#[tokio::test]
async fn normalised_paths_are_forwarded_and_keyed_in_normal_form() {
    let (origin, corral) = start("").await;
    let res = exchange(corral.addr(), &get("/pub/a/./b/../%63?q=1")).await;
    assert!(res.cache_status().contains("stored"), "{res:?}");
    assert_eq!(origin.wait_for(1).await[0].target, "/pub/a/c?q=1");
    // The same resource however it is spelled: hits, on the fast path or not.
    for path in ["/pub/a/c?q=1", "/pub/%61/c?q=1", "/pub/a/x/../c?q=1"] {
        let res = exchange(corral.addr(), &get(path)).await;
        assert!(
            res.cache_status().starts_with("corral; hit"),
            "{path}: {res:?}"
        );
        assert_eq!(res.text(), "answer to GET /pub/a/c?q=1");
    }
    assert_eq!(origin.received().len(), 1);
}

#[tokio::test]
async fn ambiguous_paths_are_refused() {
    let (origin, corral) = start("").await;
    for path in [
        "/pub/..%2finternal",
        "/pub/..%5cinternal",
        "/pub/..;/internal",
        "/pub/a%00",
        "/pub/a%zz",
        "/pub/a%2",
        "/pub\\..\\internal",
    ] {
        let res = exchange(corral.addr(), &get(path)).await;
        assert_eq!(res.status, 400, "{path}: {res:?}");
    }
    assert!(origin.received().is_empty(), "{:?}", origin.received());
}

#[tokio::test]
async fn encoded_slashes_are_forwarded_encoded_where_the_route_allows() {
    let (origin, corral) = start("encoded_slashes = \"keep\"").await;
    let res = exchange(corral.addr(), &get("/pub/group%2fproject")).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(origin.wait_for(1).await[0].target, "/pub/group%2Fproject");
    let res = exchange(corral.addr(), &get("/pub/group%2Fproject")).await;
    assert!(res.cache_status().starts_with("corral; hit"), "{res:?}");
}

/// A raw UTF-8 path whose escapes are decoded keeps its other bytes as they came.
#[tokio::test]
async fn utf8_paths_keep_their_bytes_when_escapes_are_decoded() {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default().start_in_front_of(&origin.url()).await;
    let res = exchange(
        corral.addr(),
        "GET /caf\u{e9}/%41 HTTP/1.1\r\nhost: a\r\n\r\n".as_bytes(),
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let got = &origin.wait_for(1).await[0];
    assert_eq!(got.target, "/caf\u{e9}/A", "raw: {:?}", got.raw);
}
