//! Resource exhaustion: idle and silent connections are closed, a client that stops
//! reading is cut off, connections and requests past their limits are refused, and
//! requests whose clients left never reach the origin.
//!
//! Timeouts are set short in these configs; every wait is on a condition (a closed
//! socket, a metric) with the suite's deadline, never a measured duration.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use corral::config::Config;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::raw::{exchange, Answer, RawClient, RecordingOrigin};
use crate::support::{eventually, Front, DEADLINE};

/// corral in front of `upstream`, with `limits` in its `[limits]` section and `route`
/// lines in its one route.
async fn start(limits: &str, lock: &str, route: &str, upstream: &str) -> Front {
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n\
         [limits]\n{limits}\n[lock]\n{lock}\n\
         [[route]]\nname = \"t\"\nupstream = \"{upstream}\"\n{route}\n"
    );
    let config = Config::parse(&text, "exhaustion.toml").expect("test config is valid");
    let server = corral::start(&config).await.expect("corral starts");
    Front { server, config }
}

/// The value of the series `name` (with its labels, if it has any).
async fn metric(front: &Front, name: &str) -> u64 {
    let res = exchange(
        front.admin_addr(),
        b"GET /metrics HTTP/1.1\r\nhost: admin\r\n\r\n",
    )
    .await;
    let text = res.text();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().expect("a number") as u64)
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Waits until the metric `name` satisfies `ok`; returns its value.
async fn wait_for_metric(front: &Front, name: &str, ok: impl Fn(u64) -> bool) -> u64 {
    eventually(&format!("{name} to reach the expected value"), || async {
        let value = metric(front, name).await;
        ok(value).then_some(value)
    })
    .await
}

/// Reads `stream` until the server closes or resets it; the bytes read.
async fn read_until_closed(stream: &mut TcpStream) -> usize {
    let mut total = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .expect("the server closes the connection in time")
        {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

/// An h2c (prior knowledge) client connection, the task driving it, and a handle on
/// its socket to close it with (hyper keeps it open while any stream lives).
async fn h2c(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
    std::net::TcpStream,
) {
    let tcp = TcpStream::connect(addr).await.expect("connects");
    let tcp = tcp.into_std().expect("a std socket");
    let socket = tcp.try_clone().expect("a second handle on the socket");
    let tcp = TcpStream::from_std(tcp).expect("back to tokio");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    (send, tokio::spawn(conn), socket)
}

fn get(path: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(format!("http://a{path}"))
        .body(Empty::new())
        .expect("a valid request")
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let origin = RecordingOrigin::start().await;
    let corral = start("idle_timeout = \"300ms\"", "", "", &origin.url()).await;
    let mut client = RawClient::connect(corral.addr()).await;
    // A miss (served through hyper), then a hit (served by the fast path): the
    // connection is kept alive after each, and idle after the second.
    for _ in 0..2 {
        let res = client
            .exchange(b"GET /idle HTTP/1.1\r\nhost: a\r\n\r\n")
            .await;
        assert_eq!(res.status, 200);
        assert!(res.header("connection").is_none(), "{res:?}");
    }
    // The head timeout (30 s by default) is past the deadline: only the idle timeout
    // can close it in time.
    assert!(client.closed().await, "an idle connection is closed");
    assert!(metric(&corral, "corral_connections_idle_closed_total").await >= 1);
}

#[tokio::test]
async fn slow_head_is_cut_off_by_the_head_timeout_not_the_idle_one() {
    let origin = RecordingOrigin::start().await;
    // The idle timeout (60 s by default) is past the deadline.
    let corral = start("head_timeout = \"300ms\"", "", "", &origin.url()).await;
    // From the start of a connection...
    let mut first = RawClient::connect(corral.addr()).await;
    first.send(b"GET /slow HTTP/1.1\r\nhost:").await;
    assert!(
        first.closed().await,
        "a head not sent in time closes the connection"
    );
    // ...and on a kept-alive connection, once the next head's first byte came.
    let mut client = RawClient::connect(corral.addr()).await;
    let res = client
        .exchange(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
        .await;
    assert_eq!(res.status, 200);
    client.send(b"GET /slow HTTP/1.1\r\nhost:").await;
    assert!(
        client.closed().await,
        "a head not sent in time closes the connection"
    );
    assert_eq!(origin.received_for("/slow").len(), 1);
}

#[tokio::test]
async fn idle_h2c_connection_gets_goaway_and_is_closed() {
    let origin = RecordingOrigin::start().await;
    let limits = "idle_timeout = \"300ms\"\nh2_keepalive_timeout = \"300ms\"";
    let corral = start(limits, "", "", &origin.url()).await;
    let (mut send, conn, _) = h2c(corral.addr()).await;
    let res = send.send_request(get("/h2")).await.expect("a response");
    assert_eq!(res.status(), 200);
    drop(res);
    // The connection task ends when corral closes the connection.
    let ended = tokio::time::timeout(DEADLINE, conn)
        .await
        .expect("an idle h2c connection is closed");
    assert!(
        ended.expect("the connection task ran").is_ok(),
        "a clean close"
    );
    wait_for_metric(&corral, "corral_client_connections", |n| n == 0).await;
}

#[tokio::test]
async fn preface_only_h2c_connections_are_closed_after_the_idle_timeout() {
    let origin = RecordingOrigin::start().await;
    let limits = "idle_timeout = \"300ms\"\nh2_keepalive_timeout = \"300ms\"";
    let corral = start(limits, "", "", &origin.url()).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(corral.addr()).await.expect("connects");
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("preface written");
        silent.push(stream);
    }
    wait_for_metric(&corral, "corral_client_connections", |n| n == 20).await;
    // They never send a request, nor read or answer anything corral sends.
    wait_for_metric(&corral, "corral_client_connections", |n| n == 0).await;
    for mut stream in silent {
        read_until_closed(&mut stream).await;
    }
    assert!(metric(&corral, "corral_connections_idle_closed_total").await >= 20);
}

#[tokio::test]
async fn connection_past_the_limit_is_refused_with_503_and_counted() {
    let origin = RecordingOrigin::start().await;
    let corral = start("max_connections = 2", "", "", &origin.url()).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = RawClient::connect(corral.addr()).await;
        let res = client.exchange(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n").await;
        assert_eq!(res.status, 200);
        held.push(client);
    }
    let mut third = RawClient::connect(corral.addr()).await;
    let res = third.exchange(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(res.status, 503, "{res:?}");
    assert_eq!(res.header("connection"), Some("close"));
    assert!(third.closed().await);
    assert_eq!(metric(&corral, "corral_connections_refused_total").await, 1);
    assert_eq!(metric(&corral, "corral_client_connections").await, 2);
    // A connection that closes frees its place.
    drop(held.pop());
    wait_for_metric(&corral, "corral_client_connections", |n| n == 1).await;
    let res = exchange(corral.addr(), b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(res.status, 200);
}

/// A client with a small receive buffer that sends `requests` and never reads.
async fn non_reader(addr: SocketAddr, requests: &[u8]) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(addr).await.expect("connects");
    stream.write_all(requests).await.expect("requests written");
    stream
}

const BIG: usize = 2 * 1024 * 1024;

fn big_answer() -> Answer {
    Answer {
        body: Some(vec![b'x'; BIG]),
        ..Answer::default()
    }
}

#[tokio::test]
async fn client_that_never_reads_cached_hits_is_reset_after_the_send_timeout() {
    let origin = RecordingOrigin::answering(big_answer()).await;
    let corral = start("send_timeout = \"200ms\"", "", "", &origin.url()).await;
    let warm = exchange(corral.addr(), b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(warm.body.len(), BIG);
    let hit = exchange(corral.addr(), b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(hit.cache_status().starts_with("corral; hit"), "{hit:?}");
    // Twenty hits, 40 MiB: far more than the socket buffers on both sides hold.
    let requests = b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n".repeat(20);
    let mut stream = non_reader(corral.addr(), &requests).await;
    wait_for_metric(&corral, "corral_send_timeouts_total", |n| n >= 1).await;
    wait_for_metric(&corral, "corral_client_connections", |n| n == 0).await;
    let read = read_until_closed(&mut stream).await;
    assert!(read < 20 * BIG, "the connection was cut off ({read} bytes)");
}

#[tokio::test]
async fn client_that_never_reads_a_proxied_response_is_reset_after_the_send_timeout() {
    let origin = RecordingOrigin::answering(Answer {
        body: Some(vec![b'x'; 8 * BIG]),
        ..Answer::default()
    })
    .await;
    // Not cached: the response streams through hyper, whose writes the timeout bounds.
    let corral = start(
        "send_timeout = \"200ms\"",
        "",
        "cache = false",
        &origin.url(),
    )
    .await;
    let mut stream = non_reader(corral.addr(), b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n").await;
    wait_for_metric(&corral, "corral_send_timeouts_total", |n| n >= 1).await;
    wait_for_metric(&corral, "corral_client_connections", |n| n == 0).await;
    let read = read_until_closed(&mut stream).await;
    assert!(read < 8 * BIG, "the connection was cut off ({read} bytes)");
}

/// A slow origin and a wait timeout well under its delay: a waiter still waiting when
/// the timeout passes goes upstream on its own.
async fn slow_fill() -> (RecordingOrigin, Front) {
    let origin = RecordingOrigin::answering(Answer {
        delay: Duration::from_secs(1),
        ..Answer::default()
    })
    .await;
    let lock = "wait_timeout = \"200ms\"\non_wait_timeout = \"fetch\"";
    let corral = start("", lock, "", &origin.url()).await;
    (origin, corral)
}

/// Sends `requests` raw clients' requests, each closed right after it is sent, while a
/// leader's fill runs; asserts none of them reaches the origin, even after the wait
/// timeout passed (the fill outlasts it), and the leader gets its answer.
async fn waiters_that_leave(raw: &[u8], n: u64) {
    let (origin, corral) = slow_fill().await;
    let mut leader = RawClient::connect(corral.addr()).await;
    leader.send(b"GET /w HTTP/1.1\r\nhost: a\r\n\r\n").await;
    origin.wait_for(1).await;
    for _ in 0..n {
        let mut client = RawClient::connect(corral.addr()).await;
        client.send(raw).await;
    }
    // Every one of them was dropped, not left waiting for the timeout.
    wait_for_metric(&corral, "corral_client_aborts_total", |a| a == n).await;
    let res = leader.response(false).await;
    assert_eq!(res.status, 200);
    assert_eq!(
        origin.received_for("/w").len(),
        1,
        "{:?}",
        origin.received()
    );
    assert_eq!(
        metric(&corral, "corral_wait_timeouts_total{route=\"t\"}").await,
        0
    );
}

#[tokio::test]
async fn waiters_whose_http1_clients_left_never_go_upstream() {
    waiters_that_leave(b"GET /w HTTP/1.1\r\nhost: a\r\n\r\n", 20).await;
}

#[tokio::test]
async fn waiters_whose_http10_clients_left_never_go_upstream() {
    // HTTP/1.0 is served by hyper for the whole connection, not one request at a time.
    waiters_that_leave(b"GET /w HTTP/1.0\r\nhost: a\r\n\r\n", 20).await;
}

#[tokio::test]
async fn waiters_whose_h2c_clients_left_never_go_upstream() {
    let (origin, corral) = slow_fill().await;
    let (mut send, _leader, _) = h2c(corral.addr()).await;
    let lead = tokio::spawn(async move { send.send_request(get("/w")).await });
    origin.wait_for(1).await;
    // Streams the client resets, then a connection it closes with streams open.
    let (mut send, _conn, socket) = h2c(corral.addr()).await;
    let mut streams = Vec::new();
    for _ in 0..10 {
        streams.push(tokio::spawn(send.send_request(get("/w"))));
    }
    wait_for_metric(
        &corral,
        "corral_coalesced_waiters_total{route=\"t\"}",
        |w| w == 10,
    )
    .await;
    for stream in streams.drain(..5) {
        stream.abort();
    }
    wait_for_metric(&corral, "corral_client_aborts_total", |a| a == 5).await;
    socket
        .shutdown(std::net::Shutdown::Both)
        .expect("the client closes its connection");
    wait_for_metric(&corral, "corral_client_aborts_total", |a| a == 10).await;
    let res = lead.await.expect("leader task").expect("leader's response");
    assert_eq!(res.status(), 200);
    assert_eq!(
        origin.received_for("/w").len(),
        1,
        "{:?}",
        origin.received()
    );
    assert_eq!(
        metric(&corral, "corral_wait_timeouts_total{route=\"t\"}").await,
        0
    );
    drop(streams);
}

#[tokio::test]
async fn fill_led_by_a_client_that_left_still_fills_the_cache() {
    let (origin, corral) = slow_fill().await;
    let mut leader = RawClient::connect(corral.addr()).await;
    leader.send(b"GET /w HTTP/1.1\r\nhost: a\r\n\r\n").await;
    origin.wait_for(1).await;
    drop(leader);
    wait_for_metric(&corral, "corral_client_aborts_total", |a| a == 1).await;
    wait_for_metric(&corral, "corral_fills_in_progress", |f| f == 0).await;
    let res = exchange(corral.addr(), b"GET /w HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(res.cache_status().starts_with("corral; hit"), "{res:?}");
    assert_eq!(origin.received_for("/w").len(), 1);
}

#[tokio::test]
async fn forwarded_request_whose_client_left_after_its_body_is_dropped() {
    // The origin would answer long after the deadline: only the client leaving ends
    // the request in time.
    let origin = RecordingOrigin::answering(Answer {
        delay: Duration::from_secs(60),
        ..Answer::default()
    })
    .await;
    let corral = start("", "", "", &origin.url()).await;
    let mut client = RawClient::connect(corral.addr()).await;
    // Half the body with the head, so the request is handed over before the rest.
    client
        .send(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n01234")
        .await;
    wait_for_metric(&corral, "corral_client_connections", |n| n == 1).await;
    client.send(b"56789").await;
    origin.wait_for(1).await;
    drop(client);
    wait_for_metric(&corral, "corral_client_aborts_total", |a| a == 1).await;
    assert_eq!(origin.received_for("/upload")[0].body, b"0123456789");
}

/// One h2c connection multiplexes up to 100 streams, each of which may hold an upstream
/// connection, so the connection limit alone does not bound the upstream sockets a
/// client makes corral hold. Requests in progress are bounded process-wide by
/// `max_requests` (by default the connection limit): a stream or HTTP/1 request past it
/// is answered `503` with `Retry-After` at once, counted, and never forwarded.
#[tokio::test]
async fn streams_of_one_h2_connection_are_held_to_the_request_limit() {
    // The admitted requests stay in progress at the origin for the whole test.
    let origin = RecordingOrigin::answering(Answer {
        delay: Duration::from_secs(60),
        ..Answer::default()
    })
    .await;
    let corral = start("max_connections = 2", "", "", &origin.url()).await;
    let (send, _conn, socket) = h2c(corral.addr()).await;
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..100 {
        let mut send = send.clone();
        streams.spawn(async move { send.send_request(get(&format!("/slow/{i}"))).await });
    }
    let mut refused = 0;
    while refused < 98 {
        let res = tokio::time::timeout(DEADLINE, streams.join_next())
            .await
            .expect("the streams past the limit are answered at once")
            .expect("a stream is left")
            .expect("stream task")
            .expect("a response");
        assert_eq!(res.status(), 503, "{res:?}");
        assert!(res.headers().contains_key("retry-after"), "{res:?}");
        refused += 1;
    }
    let got = origin.wait_for(2).await;
    let mut conns: Vec<usize> = got.iter().map(|r| r.conn).collect();
    conns.dedup();
    assert_eq!(got.len(), 2, "only the admitted requests reach the origin");
    assert_eq!(conns.len(), 2, "{got:?}");
    assert_eq!(metric(&corral, "corral_requests_refused_total").await, 98);
    // The limit is process-wide: an HTTP/1 request on another connection is refused too.
    let res = exchange(corral.addr(), b"GET /other HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(res.status, 503, "{res:?}");
    assert_eq!(res.header("retry-after"), Some("1"));
    assert_eq!(origin.received().len(), 2, "{:?}", origin.received());
    assert_eq!(metric(&corral, "corral_requests_refused_total").await, 99);
    // Requests that end (here, their client left) free their places.
    origin.set_answer(Answer::default());
    socket
        .shutdown(std::net::Shutdown::Both)
        .expect("the client closes its connection");
    wait_for_metric(&corral, "corral_client_aborts_total", |n| n == 2).await;
    let res = exchange(corral.addr(), b"GET /other HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(res.status, 200, "{res:?}");
}
