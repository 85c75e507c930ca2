//! The HTTP/1 connection path over raw sockets: hits answered from the entry's
//! prebuilt bytes, every other request handed to hyper on the same connection, and
//! what is not plain HTTP/1.1 given to hyper for good.

mod support;

use std::time::Duration;

use support::raw::RawClient;
use support::{Harness, OriginBehaviour, Setup};

/// Opens client connections that read responses one by one, pipelined or not.
struct Conn;

impl Conn {
    async fn open(h: &Harness) -> RawClient {
        RawClient::connect(h.addr()).await
    }
}

#[tokio::test]
async fn hits_misses_and_bodies_share_one_keep_alive_connection() {
    let h = Setup::default().start().await;
    let mut conn = Conn::open(&h).await;

    let miss = conn.get("/a").await;
    assert_eq!(miss.status, 200);
    assert!(miss.header("cache-status").unwrap().contains("fwd=miss"));

    let hit = conn.get("/a").await;
    assert_eq!(hit.status, 200);
    assert!(
        hit.header("cache-status")
            .unwrap()
            .starts_with("corral; hit; ttl="),
        "{hit:?}"
    );
    assert_eq!(hit.body, miss.body, "the stored body, byte for byte");
    assert_eq!(hit.header("content-length"), miss.header("content-length"));
    assert_eq!(hit.header("via"), Some("1.1 corral"));
    assert!(hit.header("age").is_some() && hit.header("date").is_some());

    // A request with a body goes through hyper and the connection comes back.
    conn.send(b"POST /p HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 5\r\n\r\nhello")
        .await;
    let post = conn.response(false).await;
    assert_eq!(post.status, 200);
    assert!(post.text().contains("received=5"), "{}", post.text());

    // HEAD on a hit: the length of the body, and no body on the wire.
    conn.send(b"HEAD /a HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await;
    let head = conn.response(true).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), miss.header("content-length"));

    let again = conn.get("/a").await;
    assert_eq!(again.body, miss.body);
    assert!(again
        .header("cache-status")
        .unwrap()
        .starts_with("corral; hit"));
    assert_eq!(h.origin.requests_for("/a"), 1);
    assert_eq!(h.origin.requests_for("/p"), 1);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let h = Setup::default().start().await;
    let mut conn = Conn::open(&h).await;
    conn.get("/a").await;
    // A hit, a miss (through hyper), a hit again, all in one write.
    conn.send(
        b"GET /a HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\nGET /b HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\nGET /a HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
    )
    .await;
    let answers = [
        conn.response(false).await,
        conn.response(false).await,
        conn.response(false).await,
    ];
    let paths: Vec<String> = answers
        .iter()
        .map(|w| w.text().split(' ').next().unwrap_or("").to_string())
        .collect();
    assert_eq!(paths, ["/a", "/b", "/a"]);
    assert!(answers[0]
        .header("cache-status")
        .unwrap()
        .starts_with("corral; hit"));
    assert!(answers[1]
        .header("cache-status")
        .unwrap()
        .contains("fwd=miss"));
}

#[tokio::test]
async fn connection_close_on_a_hit_closes_after_the_response() {
    let h = Setup::default().start().await;
    h.get("/a").await;
    let mut conn = Conn::open(&h).await;
    conn.send(b"GET /a HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .await;
    let hit = conn.response(false).await;
    assert!(hit
        .header("cache-status")
        .unwrap()
        .starts_with("corral; hit"));
    assert_eq!(hit.header("connection"), Some("close"));
    assert!(conn.closed().await, "the server closes the connection");
}

#[tokio::test]
async fn a_head_arriving_byte_by_byte_is_served() {
    let h = Setup::default().start().await;
    h.get("/a").await;
    let mut conn = Conn::open(&h).await;
    for byte in b"GET /a HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n" {
        conn.send(&[*byte]).await;
        // Separate segments, so the server sees the head in pieces.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let hit = conn.response(false).await;
    assert_eq!(hit.status, 200);
    assert!(hit
        .header("cache-status")
        .unwrap()
        .starts_with("corral; hit"));
}

#[tokio::test]
async fn what_is_not_plain_http11_is_answered_by_hyper() {
    let h = Setup::default().start().await;
    h.get("/a").await;

    // HTTP/1.0.
    let mut conn = Conn::open(&h).await;
    conn.send(b"GET /a HTTP/1.0\r\nhost: 127.0.0.1\r\n\r\n")
        .await;
    let old = conn.response(false).await;
    assert_eq!(old.status, 200);
    assert!(old.text().starts_with("/a "), "{}", old.text());

    // A chunked request body, then a hit on the same connection.
    let mut conn = Conn::open(&h).await;
    conn.send(
        b"POST /c HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
    )
    .await;
    let chunked = conn.response(false).await;
    assert_eq!(chunked.status, 200);
    assert!(chunked.text().contains("received=7"), "{}", chunked.text());
    let hit = conn.get("/a").await;
    assert!(hit
        .header("cache-status")
        .unwrap()
        .starts_with("corral; hit"));

    // A head larger than this path buffers (64 KiB), within hyper's limit.
    let mut conn = Conn::open(&h).await;
    let big = "x".repeat(70 * 1024);
    conn.send(format!("GET /a HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await;
    let large = conn.response(false).await;
    assert_eq!(large.status, 200);
    assert!(large.text().starts_with("/a "), "{}", large.text());

    // Not HTTP at all.
    let mut conn = Conn::open(&h).await;
    conn.send(b"HELLO THERE\r\n\r\n").await;
    assert_eq!(conn.response(false).await.status, 400);
    assert_eq!(h.origin.requests_for("/a"), 1);
}

#[tokio::test]
async fn a_hit_is_the_requests_own_variant() {
    let varying = OriginBehaviour {
        headers: vec![("vary".to_string(), "accept-language".to_string())],
        ..OriginBehaviour::default()
    };
    let h = Setup::origin(varying).start().await;
    let mut conn = Conn::open(&h).await;
    let get = |lang: &str| {
        format!("GET /v HTTP/1.1\r\nhost: 127.0.0.1\r\naccept-language: {lang}\r\n\r\n")
    };
    conn.send(get("en").as_bytes()).await;
    let en = conn.response(false).await;
    conn.send(get("en").as_bytes()).await;
    let en_hit = conn.response(false).await;
    conn.send(get("fr").as_bytes()).await;
    let fr = conn.response(false).await;
    assert!(en_hit
        .header("cache-status")
        .unwrap()
        .starts_with("corral; hit"));
    assert_eq!(en_hit.body, en.body);
    assert!(
        fr.header("cache-status").unwrap().contains("miss"),
        "{fr:?}"
    );
    assert!(fr.text().contains("lang=fr"), "{}", fr.text());
    assert_eq!(h.origin.requests_for("/v"), 2);
}

#[tokio::test]
async fn a_large_body_is_sent_from_its_file_intact() {
    let large = OriginBehaviour {
        body_size: 300 * 1024,
        ..OriginBehaviour::default()
    };
    let h = Setup::origin(large).start().await;
    let mut conn = Conn::open(&h).await;
    let miss = conn.get("/big").await;
    assert_eq!(miss.body.len(), 300 * 1024);
    let hit = conn.get("/big").await;
    assert!(hit
        .header("cache-status")
        .unwrap()
        .starts_with("corral; hit"));
    assert_eq!(hit.body, miss.body, "byte for byte");
    conn.send(b"HEAD /big HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await;
    let head = conn.response(true).await;
    assert_eq!(head.header("content-length"), Some("307200"));
    // hyper's path reads the same stored body (HTTP/1.0 goes there).
    let mut old = Conn::open(&h).await;
    old.send(b"GET /big HTTP/1.0\r\nhost: 127.0.0.1\r\n\r\n")
        .await;
    assert_eq!(old.response(false).await.body, miss.body);
    // The connection is still in step after all that.
    assert_eq!(conn.get("/big").await.body, miss.body);
    assert_eq!(h.origin.requests_for("/big"), 1);
}
