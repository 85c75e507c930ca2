//! Request smuggling: what the origin receives is always a correctly framed message,
//! whatever framing the client tried. A GET or HEAD with a body is forwarded with its
//! bytes (and bypasses the cache); a length never travels without its bytes.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::support::raw::{exchange, RawClient, Received, RecordingOrigin};
use crate::support::{Front, Setup};

/// A request whose body is a whole second request: if corral forwarded the length
/// without the bytes, the origin would read the next request into it, or wait.
const SMUGGLED: &[u8] = b"GET /internal HTTP/1.1\r\nhost: x\r\n\r\n";

async fn start() -> (RecordingOrigin, Front) {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default().start_in_front_of(&origin.url()).await;
    (origin, corral)
}

/// Every request the origin got declared exactly the bytes it carried, and nothing
/// reached it that the client did not ask for as a request of its own.
fn assert_framed(origin: &RecordingOrigin) {
    assert!(origin.garbled().is_empty(), "{:?}", origin.received());
    assert!(origin.received_for("/internal").is_empty());
    for r in origin.received() {
        assert!(r.header_count("content-length") <= 1, "{r:?}");
        assert!(
            !(r.header("content-length").is_some() && r.header("transfer-encoding").is_some()),
            "{r:?}"
        );
        if let Some(declared) = r.header("content-length") {
            assert_eq!(declared.parse::<usize>().unwrap(), r.body.len(), "{r:?}");
        }
    }
}

fn with_body(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    raw
}

async fn only(origin: &RecordingOrigin, path: &str) -> Received {
    let got = origin.received_for(path);
    assert_eq!(got.len(), 1, "{got:?}");
    got.into_iter().next().unwrap()
}

#[tokio::test]
async fn get_body_is_forwarded_with_its_bytes_and_bypasses_the_cache() {
    let (origin, corral) = start().await;
    let mut conn = RawClient::connect(corral.addr()).await;
    let res = conn.exchange(&with_body("GET", "/x", SMUGGLED)).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        res.cache_status(),
        "corral; fwd=bypass; detail=request-body"
    );
    // The same connection, and a fresh one, carry on in step.
    let next = conn.exchange(b"GET /y HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(next.text(), "answer to GET /y");
    origin.wait_for(2).await;
    assert_eq!(only(&origin, "/x").await.body, SMUGGLED);
    assert_framed(&origin);
    // Not stored: a plain GET of /x goes to the origin, which answers it afresh.
    let plain = exchange(corral.addr(), b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(plain.cache_status().contains("fwd=miss"), "{plain:?}");
    assert_eq!(origin.received_for("/x").len(), 2);
}

#[tokio::test]
async fn head_body_is_forwarded_with_its_bytes() {
    let (origin, corral) = start().await;
    let res = exchange(corral.addr(), &with_body("HEAD", "/h", SMUGGLED)).await;
    assert_eq!(res.status, 200);
    origin.wait_for(1).await;
    assert_eq!(only(&origin, "/h").await.body, SMUGGLED);
    assert_framed(&origin);
}

#[tokio::test]
async fn chunked_get_body_is_forwarded_chunked() {
    let (origin, corral) = start().await;
    let mut raw = b"GET /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    raw.extend_from_slice(format!("{:x}\r\n", SMUGGLED.len()).as_bytes());
    raw.extend_from_slice(SMUGGLED);
    raw.extend_from_slice(b"\r\n0\r\n\r\n");
    let res = exchange(corral.addr(), &raw).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        res.cache_status(),
        "corral; fwd=bypass; detail=request-body"
    );
    origin.wait_for(1).await;
    assert_eq!(only(&origin, "/c").await.body, SMUGGLED);
    assert_framed(&origin);
}

#[tokio::test]
async fn a_bodiless_get_keeps_the_cache_and_sends_no_length() {
    let (origin, corral) = start().await;
    let raw = b"GET /z HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n";
    let first = exchange(corral.addr(), raw).await;
    assert!(first.cache_status().contains("stored"), "{first:?}");
    let second = exchange(corral.addr(), raw).await;
    assert!(
        second.cache_status().starts_with("corral; hit"),
        "{second:?}"
    );
    let got = only(&origin, "/z").await;
    assert_eq!(got.header("content-length"), None, "{got:?}");
    assert!(got.body.is_empty());
}

#[tokio::test]
async fn post_bodies_keep_their_framing() {
    let (origin, corral) = start().await;
    let res = exchange(corral.addr(), &with_body("POST", "/p", b"hello")).await;
    assert_eq!(res.status, 200);
    let got = only(&origin, "/p").await;
    assert_eq!(got.header("content-length").as_deref(), Some("5"));
    assert_eq!(got.body, b"hello");
    assert_framed(&origin);
}

#[tokio::test]
async fn h2c_get_body_is_forwarded_with_its_bytes() {
    let (origin, corral) = start().await;
    let mut send = crate::support::raw::h2c(corral.addr()).await;
    let req = http::Request::get(format!("http://{}/h2", corral.addr()))
        .header("content-length", SMUGGLED.len())
        .body(Full::new(Bytes::from_static(SMUGGLED)))
        .unwrap();
    let res = send.send_request(req).await.expect("h2 response");
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["cache-status"],
        "corral; fwd=bypass; detail=request-body"
    );
    res.into_body().collect().await.unwrap();
    assert_eq!(only(&origin, "/h2").await.body, SMUGGLED);
    assert_framed(&origin);
}

/// The fast path reads `Content-Length` as hyper does (digits only): a `+0` is refused
/// whether the URL is cached or not.
#[tokio::test]
async fn fast_path_refuses_a_signed_content_length_as_hyper_does() {
    let (_origin, corral) = start().await;
    exchange(corral.addr(), b"GET /cl HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let uncached = exchange(
        corral.addr(),
        b"GET /other HTTP/1.1\r\nhost: a\r\ncontent-length: +0\r\n\r\n",
    )
    .await;
    let cached = exchange(
        corral.addr(),
        b"GET /cl HTTP/1.1\r\nhost: a\r\ncontent-length: +0\r\n\r\n",
    )
    .await;
    assert_eq!(uncached.status, 400, "{uncached:?}");
    assert_eq!(cached.status, uncached.status, "{cached:?}");
}

/// One request as a hostile client might frame it.
#[derive(Debug, Clone)]
enum Framing {
    None,
    Length(Vec<u8>),
    Chunked(Vec<u8>),
    /// A zero length, then bytes that are no request at all.
    ZeroThenGarbage,
}

fn render(method: &str, path: &str, framing: &Framing) -> Vec<u8> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nhost: a\r\n").into_bytes();
    match framing {
        Framing::None => raw.extend_from_slice(b"\r\n"),
        Framing::Length(body) => {
            raw.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
            raw.extend_from_slice(body);
        }
        Framing::Chunked(body) => {
            raw.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            if !body.is_empty() {
                raw.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
                raw.extend_from_slice(body);
                raw.extend_from_slice(b"\r\n");
            }
            raw.extend_from_slice(b"0\r\n\r\n");
        }
        Framing::ZeroThenGarbage => {
            raw.extend_from_slice(b"content-length: 0\r\n\r\n\x01garbage\r\n\r\n");
        }
    }
    raw
}

fn framing() -> impl proptest::strategy::Strategy<Value = Framing> {
    use proptest::prelude::*;
    let body = || proptest::collection::vec(any::<u8>(), 0..48);
    prop_oneof![
        Just(Framing::None),
        body().prop_map(Framing::Length),
        body().prop_map(Framing::Chunked),
        Just(Framing::ZeroThenGarbage),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Pipelined pairs of requests, framed any way a client may: every request the
    /// origin receives carries exactly the bytes its framing declares, and nothing
    /// reaches it that was not sent as a request of its own.
    #[test]
    fn forwarded_requests_stay_framed(
        first in (proptest::prelude::prop_oneof!["GET", "HEAD", "POST"], framing()),
        second in (proptest::prelude::prop_oneof!["GET", "HEAD", "POST"], framing()),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (origin, corral) = start().await;
            let mut conn = RawClient::connect(corral.addr()).await;
            let mut raw = render(&first.0, "/one", &first.1);
            raw.extend(render(&second.0, "/two", &second.1));
            conn.send(&raw).await;
            conn.response(first.0 == "HEAD").await;
            // After a request with trailing garbage corral may answer 400 and close.
            if !matches!(first.1, Framing::ZeroThenGarbage) {
                conn.response(second.0 == "HEAD").await;
            }
            assert_framed(&origin);
            corral.server.shutdown().await;
        });
    }
}
