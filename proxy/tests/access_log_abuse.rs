//! The access log against what a hostile review tried (each failed before its fix): forged
//! fields and line breaks from client bytes, fast-path hits cut off by the client, HTTP/2,
//! lines pending at shutdown.

mod support;

use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use support::{raw, Setup};

fn log_top(path: &Path, format: &str) -> String {
    format!(
        "access_log = {:?}\naccess_log_format = {format:?}",
        path.display().to_string()
    )
}

/// A client's Host header goes into the combined line unquoted and unescaped: spaces
/// and `key=value` text in it forge corral's own fields (route, cache, ...).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_host_header_cannot_forge_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let h = Setup::default()
        .top(&log_top(&path, "combined"))
        .route("path_prefix = \"/api\"")
        .start()
        .await;
    let res = raw::exchange(
        h.addr(),
        b"GET /nowhere HTTP/1.1\r\nhost: x route=admin cache=hit duration_ms=0 upstream_ms=0\"\t\r\n\r\n",
    )
    .await;
    let lines = support::log_lines(&path, 1).await;
    let line = &lines[0];
    eprintln!("status {} line: {line}", res.status);
    assert_eq!(
        line.matches(" route=").count(),
        1,
        "the Host header forged a route= field: {line}"
    );
    assert!(!line.contains('\t'), "raw tab in the line: {line}");
}

/// Lines accumulated just before shutdown are written once the server has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_writes_out_pending_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let h = Setup::default().top(&log_top(&path, "json")).start().await;
    for i in 0..5 {
        let mut c = raw::RawClient::connect(h.addr()).await;
        assert_eq!(c.get(&format!("/s{i}")).await.status, 200);
    }
    h.server.shutdown().await;
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(text.lines().count(), 5, "lines lost at shutdown:\n{text}");
}

/// A fast-path hit the client abandons mid-body: hyper's path logs such requests, the
/// fast path returns before logging, so a cut-off hit leaves no trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_hit_cut_off_by_the_client_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let h = Setup::origin(corral::origin::Behaviour {
        body_size: 4 * 1024 * 1024,
        ..Default::default()
    })
    .top(&log_top(&path, "json"))
    .start()
    .await;
    let _ = h.get("/big").await; // miss: stored
    assert_eq!(h.get("/big").await.status, StatusCode::OK); // hit
    let before = support::log_lines(&path, 2).await.len();
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        #[allow(deprecated)]
        s.set_linger(Some(Duration::ZERO)).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    } // reset
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        text.lines().count(),
        before + 1,
        "the cut-off hit has no line:\n{text}"
    );
}

/// A path with a raw UTF-8 NEL (U+0085) or LINE SEPARATOR (U+2028): `escaped` only
/// escapes C0 controls and DEL, so the combined line carries characters that
/// Unicode-aware line splitters (Python's `str.splitlines`, many log viewers) treat as
/// line breaks, splitting one request into a forged second line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_path_cannot_carry_unicode_line_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let h = Setup::default()
        .top(&log_top(&path, "combined"))
        .start()
        .await;
    let res = raw::exchange(
        h.addr(),
        "GET /a\u{85}10.0.0.1\u{2028}x HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".as_bytes(),
    )
    .await;
    let lines = support::log_lines(&path, 1).await;
    let line = &lines[0];
    eprintln!("status {} line: {line:?}", res.status);
    assert!(
        !line
            .chars()
            .any(|c| ('\u{80}'..='\u{9f}').contains(&c) || c == '\u{2028}' || c == '\u{2029}'),
        "a Unicode line break reached the line: {line:?}"
    );
}

/// HTTP/2 requests take `handle` and get a line, with the :authority as host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_requests_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let h = Setup::default().top(&log_top(&path, "json")).start().await;
    let mut send = raw::h2c::<http_body_util::Empty<bytes::Bytes>>(h.addr()).await;
    for _ in 0..2 {
        let req = http::Request::get(format!("http://127.0.0.1:{}/h2", h.addr().port()))
            .body(http_body_util::Empty::new())
            .unwrap();
        let res = send.send_request(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let _ = http_body_util::BodyExt::collect(res.into_body()).await;
    }
    let lines = support::log_lines(&path, 2).await;
    eprintln!("{lines:#?}");
    assert!(lines.iter().all(|l| l.contains("\"path\":\"/h2\"")));
    assert!(lines[1].contains("\"cache\":\"hit\""), "{}", lines[1]);
}

/// A request past `max_requests` is answered `503` before the proxy sees it: it was
/// counted, but left no line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_past_max_requests_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let h = Setup::origin(support::slow(3_000))
        .top(&log_top(&path, "json"))
        .top("[limits]\nmax_requests = 1")
        .start()
        .await;
    let addr = h.addr();
    let held = tokio::spawn(async move {
        let mut c = raw::RawClient::connect(addr).await;
        c.get("/held").await.status
    });
    support::eventually("the first request reaches the origin", || async {
        (h.origin.requests_for("/held") == 1).then_some(())
    })
    .await;
    let mut c = raw::RawClient::connect(h.addr()).await;
    assert_eq!(c.get("/refused").await.status, 503);
    let lines = support::log_lines(&path, 1).await;
    let refused = &lines[0];
    assert!(refused.contains("\"path\":\"/refused\""), "{refused}");
    assert!(refused.contains("\"status\":503"), "{refused}");
    assert!(refused.contains("\"cache\":\"error\""), "{refused}");
    assert_eq!(held.await.unwrap(), 200);
    assert_eq!(support::log_lines(&path, 2).await.len(), 2);
}
