//! Values that must not break corral: absurd freshness from an origin (clamped, never
//! an overflow that panics a fill and leaves the key answering 502), and a malformed or
//! stalled client body (the client's fault, not an upstream failure).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::StreamBody;

use crate::support::raw::{exchange, Answer, RawClient, RecordingOrigin};
use crate::support::{eventually, Front, Setup, DEADLINE};

const HUGE: &str = "18446744073709551615";

/// Panics raised outside test code (in corral or a crate it calls), counted by a panic
/// hook that leaves the default report in place.
static NON_TEST_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_non_test_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tests = info.location().is_some_and(|l| l.file().contains("tests/"));
            if !in_tests {
                NON_TEST_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
}

#[tokio::test]
async fn absurd_freshness_values_never_break_a_key() {
    count_non_test_panics();
    let cases: Vec<Vec<(String, String)>> = vec![
        vec![("cache-control".into(), format!("max-age={HUGE}"))],
        vec![("cache-control".into(), format!("public, s-maxage={HUGE}"))],
        vec![(
            "cache-control".into(),
            format!("max-age=60, stale-while-revalidate={HUGE}"),
        )],
        vec![(
            "cache-control".into(),
            format!("max-age=60, stale-if-error={HUGE}"),
        )],
        vec![(
            "cache-control".into(),
            "max-age=999999999999999999999999999999".into(),
        )],
        vec![
            ("cache-control".into(), "max-age=60".into()),
            ("age".into(), HUGE.into()),
        ],
        vec![("expires".into(), "Fri, 31 Dec 9999 23:59:59 GMT".into())],
        vec![
            ("cache-control".into(), format!("max-age={HUGE}")),
            ("age".into(), HUGE.into()),
            ("etag".into(), "\"v1\"".into()),
        ],
    ];
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default()
        .route("stale_while_revalidate = \"30s\"\nstale_if_error = \"5m\"")
        .start_in_front_of(&origin.url())
        .await;
    for (i, headers) in cases.into_iter().enumerate() {
        origin.set_answer(Answer {
            headers: headers.clone(),
            ..Answer::default()
        });
        let path = format!("/absurd/{i}");
        let req = format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n");
        let first = exchange(corral.addr(), req.as_bytes()).await;
        assert_eq!(first.status, 200, "{headers:?}: {first:?}");
        assert_eq!(first.text(), format!("answer to GET {path}"), "{headers:?}");
        let second = exchange(corral.addr(), req.as_bytes()).await;
        assert_eq!(second.status, 200, "{headers:?}: {second:?}");
        assert_eq!(
            second.text(),
            format!("answer to GET {path}"),
            "{headers:?}"
        );
        // What the client is told stays within what a header can say.
        if let Some(age) = second.header("age") {
            assert!(age.parse::<u64>().is_ok(), "{headers:?}: {second:?}");
        }
    }
    // Every fill ended, background refreshes of stale answers included.
    eventually("every fill ends", || async {
        (corral.server.proxy().fills().in_progress() == 0).then_some(())
    })
    .await;
    assert_eq!(NON_TEST_PANICS.load(Ordering::SeqCst), 0, "corral panicked");
}

#[tokio::test]
async fn malformed_chunked_client_body_is_a_client_error_not_an_upstream_failure() {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default().start_in_front_of(&origin.url()).await;
    let res = exchange(
        corral.addr(),
        b"POST /form HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\nhello\r\nzz\r\nbroken\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 400, "{res:?}");
    assert!(res.cache_status().contains("client-body"), "{res:?}");

    let metrics = exchange(
        corral.admin_addr(),
        b"GET /metrics HTTP/1.1\r\nhost: admin\r\n\r\n",
    )
    .await
    .text();
    let upstream_errors: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("corral_upstream_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(upstream_errors, 0.0, "{metrics}");
    // The upstream is not reported failing: the next request is simply served.
    let next = exchange(corral.addr(), b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(next.status, 200);
}

/// The sum of `corral_upstream_errors_total` over every route and kind.
async fn upstream_errors(corral: &Front) -> f64 {
    let metrics = exchange(
        corral.admin_addr(),
        b"GET /metrics HTTP/1.1\r\nhost: admin\r\n\r\n",
    )
    .await
    .text();
    metrics
        .lines()
        .filter(|l| l.starts_with("corral_upstream_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A client that stops sending its body while the upstream waits for it is the one at
/// fault: it is answered `408` (nginx's `client_body_timeout`), and neither counted nor
/// logged as an upstream failure, which anyone could otherwise raise at will.
#[tokio::test]
async fn stalled_client_body_is_a_408_not_an_upstream_timeout() {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default()
        .route("response_timeout = \"1s\"")
        .start_in_front_of(&origin.url())
        .await;
    let mut client = RawClient::connect(corral.addr()).await;
    client
        .send(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nx")
        .await;
    let res = client.response(false).await;
    assert_eq!(res.status, 408, "{res:?}");
    assert!(
        res.cache_status().contains("client-body-timeout"),
        "{res:?}"
    );
    assert!(client.closed().await, "the rest of its body is not awaited");
    assert_eq!(upstream_errors(&corral).await, 0.0);
}

/// The body has a timer of its own, between two reads: a client that trickles slower
/// than `body_timeout` is cut off long before the route's response timeout.
#[tokio::test]
async fn client_body_slower_than_the_body_timeout_is_cut_with_408() {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default()
        .top("[limits]\nbody_timeout = \"300ms\"")
        .route("response_timeout = \"60s\"")
        .start_in_front_of(&origin.url())
        .await;
    let mut client = RawClient::connect(corral.addr()).await;
    client
        .send(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nx")
        .await;
    // Over h2c too, where the body is a stream's DATA frames.
    let mut send = crate::support::raw::h2c(corral.addr()).await;
    // One byte, then nothing.
    let first = Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"x")));
    let stalled = futures_util::stream::iter([first]).chain(futures_util::stream::pending());
    let req = http::Request::post("http://a/h2-upload")
        .body(StreamBody::new(stalled))
        .unwrap();
    let h2 = tokio::time::timeout(DEADLINE, send.send_request(req))
        .await
        .expect("the stalled stream is answered in time")
        .expect("a response");
    assert_eq!(h2.status(), 408, "{h2:?}");

    let res = client.response(false).await;
    assert_eq!(res.status, 408, "{res:?}");
    assert_eq!(upstream_errors(&corral).await, 0.0);
}

/// The response timeout counts from the body's last move: an upload that keeps moving
/// is not cut for taking longer than the timeout as a whole.
#[tokio::test]
async fn upload_that_keeps_moving_outlasts_the_response_timeout() {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default()
        .route("response_timeout = \"1s\"")
        .start_in_front_of(&origin.url())
        .await;
    let mut client = RawClient::connect(corral.addr()).await;
    client
        .send(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 15\r\n\r\n")
        .await;
    // 1.5 s of upload, a byte each 100 ms: ten times the margin on every pause.
    for byte in b"abcdefghijklmno".chunks(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.send(byte).await;
    }
    let res = client.response(false).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(origin.received_for("/upload")[0].body, b"abcdefghijklmno");
    assert_eq!(upstream_errors(&corral).await, 0.0);
}
