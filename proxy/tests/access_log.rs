//! The access log end to end: a real corral writing to a file, a real origin, requests
//! over real sockets; a line for a miss, a hit (the HTTP/1 fast path's), a pass and a
//! refused request, with the documented fields.

mod support;

use http::{Method, StatusCode};
use support::Setup;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_for_a_miss_a_hit_a_pass_and_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let h = Setup::default()
        .top(&format!(
            "access_log = {:?}\naccess_log_format = \"json\"",
            path.display().to_string()
        ))
        .route("path_prefix = \"/api\"")
        .start()
        .await;

    assert_eq!(h.get("/api/a?x=1").await.status, StatusCode::OK); // miss
    assert_eq!(h.get("/api/a?x=1").await.status, StatusCode::OK); // hit (fast path)
    let pass = h.request(Method::POST, "/api/p", b"body").await;
    assert_eq!(pass.status, StatusCode::OK);
    assert_eq!(h.get("/elsewhere").await.status, StatusCode::NOT_FOUND);

    let lines = support::log_lines(&path, 4).await;
    let field = |line: &str, name: &str| -> String {
        let start = line
            .find(&format!("\"{name}\":"))
            .unwrap_or_else(|| panic!("no {name} in {line}"));
        let rest = &line[start + name.len() + 3..];
        let end = rest.find([',', '}']).unwrap();
        rest[..end].trim_matches('"').to_string()
    };
    let (miss, hit, pass, refused) = (&lines[0], &lines[1], &lines[2], &lines[3]);
    for line in [miss, hit, pass, refused] {
        assert!(
            line.starts_with("{\"time\":\"") && line.ends_with('}'),
            "{line}"
        );
        assert_eq!(field(line, "client"), "127.0.0.1");
        assert!(field(line, "duration_ms").parse::<f64>().is_ok(), "{line}");
    }
    assert_eq!(
        (
            field(miss, "method"),
            field(miss, "path"),
            field(miss, "status")
        ),
        ("GET".into(), "/api/a?x=1".into(), "200".into())
    );
    assert_eq!(field(miss, "route"), "t");
    assert_eq!(field(miss, "cache"), "miss");
    assert!(field(miss, "upstream_ms").parse::<f64>().is_ok(), "{miss}");
    assert!(field(miss, "host").starts_with("127.0.0.1"), "{miss}");
    assert_eq!(field(hit, "cache"), "hit");
    assert_eq!(field(hit, "upstream_ms"), "null");
    assert_eq!(field(hit, "bytes"), field(miss, "bytes"));
    assert_eq!(
        (field(pass, "method"), field(pass, "cache")),
        ("POST".into(), "bypass".into())
    );
    assert!(field(pass, "upstream_ms").parse::<f64>().is_ok(), "{pass}");
    assert_eq!(
        (
            field(refused, "status"),
            field(refused, "route"),
            field(refused, "cache")
        ),
        ("404".into(), "-".into(), "error".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_lines_are_what_log_tools_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let h = Setup::default()
        .top(&format!("access_log = {:?}", path.display().to_string()))
        .start()
        .await;

    h.get_with(
        "/c",
        &[("user-agent", "probe/1"), ("referer", "http://r/\"x")],
    )
    .await;
    h.get("/c").await;

    let lines = support::log_lines(&path, 2).await;
    let miss = &lines[0];
    assert!(miss.starts_with("127.0.0.1 - - ["), "{miss}");
    assert!(
        miss.contains("] \"GET /c HTTP/1.1\" 200 "),
        "request line and status: {miss}"
    );
    assert!(
        miss.contains(" \"http://r/\\\"x\" \"probe/1\" "),
        "referer (quote escaped) and agent: {miss}"
    );
    assert!(miss.contains(" route=t cache=miss duration_ms="), "{miss}");
    assert!(
        lines[1].contains(" cache=hit ") && lines[1].ends_with(" upstream_ms=-"),
        "{}",
        lines[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_forge_fields_through_its_host() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let h = Setup::default()
        .top(&format!("access_log = {:?}", path.display().to_string()))
        .start()
        .await;
    // Refused (400: not a valid host), and logged as sent, but escaped.
    let reply = h
        .get_with("/f", &[("host", "x route=admin cache=hit")])
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    let line = support::log_lines(&path, 1).await.remove(0);
    assert!(
        line.contains(" host=x\\x20route=admin\\x20cache=hit route=- cache=error "),
        "{line}"
    );
}

/// Log rotation: after logrotate moves the file away, a reload opens the path again;
/// lines before it are in the moved file, lines after it in the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reopens_the_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let h = Setup::default()
        .top(&format!(
            "access_log = {:?}\naccess_log_format = \"json\"",
            path.display().to_string()
        ))
        .start()
        .await;
    assert_eq!(h.get("/before").await.status, StatusCode::OK);
    support::log_lines(&path, 1).await;
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();

    let report = h.server.reload(&h.config).await;
    assert!(report.needs_restart.is_empty(), "{report:?}");
    assert_eq!(h.get("/after").await.status, StatusCode::OK);
    let after = support::log_lines(&path, 1).await;
    assert!(after[0].contains("\"path\":\"/after\""), "{after:?}");
    let before = std::fs::read_to_string(&rotated).unwrap();
    assert_eq!(before.lines().count(), 1, "{before}");
    assert!(before.contains("\"path\":\"/before\""), "{before}");
}
