//! Reloading a running corral: a real origin, requests over real sockets, connections
//! kept open across the reload; and the binary itself, reloaded with SIGHUP.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use corral::origin::{Behaviour, Origin};
use corral::Config;
use support::raw::{exchange, RawClient};

/// A config for `origin` with the route `t` on `/` (whose `ttl` applies: the origin
/// sends no freshness of its own), an admin listener, and `extra` lines in the route.
fn config_text(origin: &str, route: &str, top: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n{top}\n\
         [[route]]\nname = \"t\"\nupstream = \"{origin}\"\n{route}\n"
    )
}

/// The `ttl=` of a fresh hit's `Cache-Status`.
fn ttl(cache_status: &str) -> Option<u64> {
    cache_status
        .strip_prefix("corral; hit; ttl=")?
        .split(';')
        .next()?
        .parse()
        .ok()
}

fn no_freshness() -> Behaviour {
    Behaviour {
        cache_control: None,
        ..Behaviour::default()
    }
}

/// The test: a TTL changed by a reload shows in the next hit's `Cache-Status`
/// on a connection opened before it, and a request in flight across the reload
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_ttl_shows_on_a_kept_alive_connection_and_in_flight_requests_complete() {
    let origin = Origin::start(no_freshness()).await.unwrap();
    let text = |ttl: &str| config_text(&origin.url(), &format!("ttl = \"{ttl}\""), "");
    let server = corral::start(&Config::parse(&text("60s"), "t.toml").unwrap())
        .await
        .unwrap();
    let mut kept = RawClient::connect(server.listen_addr()).await;
    assert_eq!(kept.get("/a").await.status, 200);
    let hit = kept.get("/a").await;
    assert!(matches!(ttl(hit.cache_status()), Some(55..=60)), "{hit:?}");

    // A slow request in flight while the config changes.
    origin.set(|b| b.delay = Duration::from_millis(1500));
    let addr = server.listen_addr();
    let in_flight =
        tokio::spawn(async move { exchange(addr, b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n").await });
    support::eventually("the slow request reaches the origin", || async {
        (origin.requests_for("/slow") == 1).then_some(())
    })
    .await;
    let report = server
        .reload(&Config::parse(&text("600s"), "t.toml").unwrap())
        .await;
    assert_eq!(report.routes.changed, ["t"]);
    assert!(report.routes.entries_dropped >= 1, "{report:?}");
    assert!(report.needs_restart.is_empty(), "{report:?}");
    origin.set(|b| b.delay = Duration::ZERO);

    // The entry stored under the old TTL is gone: the next request fetches again.
    let miss = kept.get("/a").await;
    assert!(miss.cache_status().contains("fwd=miss"), "{miss:?}");
    let hit = kept.get("/a").await;
    assert!(
        matches!(ttl(hit.cache_status()), Some(595..=600)),
        "{hit:?}"
    );
    assert_eq!(origin.requests_for("/a"), 2);
    let slow = in_flight.await.unwrap();
    assert_eq!(slow.status, 200, "{slow:?}");
    server.shutdown().await;
}

/// Routes come and go, an upstream moves, the admin token changes; a setting that needs
/// a restart is reported and keeps its running value; an unchanged route keeps its
/// entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_upstreams_and_the_admin_token_change_in_place() {
    let (a, b) = (
        Origin::start(no_freshness()).await.unwrap(),
        Origin::start(no_freshness()).await.unwrap(),
    );
    let stay = "[[route]]\nname = \"stay\"\npath_prefix = \"/stay\"\n";
    let first = format!(
        "{}{stay}upstream = \"{}\"\n[[route]]\nname = \"gone\"\npath_prefix = \"/gone\"\nupstream = \"{}\"\n",
        config_text(&a.url(), "", "admin_token = \"old-token-0123456789\""),
        a.url(),
        a.url()
    );
    let server = corral::start(&Config::parse(&first, "t.toml").unwrap())
        .await
        .unwrap();
    let addr = server.listen_addr();
    let get = |path: &'static str| async move {
        exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
        )
        .await
    };
    assert_eq!(get("/x").await.status, 200);
    assert_eq!(get("/stay/1").await.status, 200);
    assert_eq!(get("/gone/1").await.status, 200);

    let second = format!(
        "{}{stay}upstream = \"{}\"\n[[route]]\nname = \"new\"\npath_prefix = \"/new\"\nupstream = \"{}\"\n",
        config_text(&b.url(), "", "admin_token = \"new-token-0123456789\"")
            .replace("listen = \"127.0.0.1:0\"\nadmin", "listen = \"127.0.0.1:1\"\nadmin"),
        a.url(),
        b.url()
    );
    let report = server
        .reload(&Config::parse(&second, "t.toml").unwrap())
        .await;
    assert_eq!(
        (
            report.routes.added,
            report.routes.changed,
            report.routes.removed
        ),
        (
            vec!["new".to_string()],
            vec!["t".to_string()],
            vec!["gone".to_string()]
        )
    );
    assert_eq!(report.needs_restart, ["listen"]);
    assert_eq!(server.listen_addr(), addr, "still on the running address");

    // `t` now goes to b and starts over; `stay` kept its entry.
    assert!(get("/x").await.cache_status().contains("fwd=miss"));
    assert_eq!((a.requests_for("/x"), b.requests_for("/x")), (1, 1));
    let stay_hit = get("/stay/1").await;
    assert!(
        stay_hit.cache_status().starts_with("corral; hit"),
        "{stay_hit:?}"
    );
    // `t` (on `/`) serves what `gone` did, from its own upstream.
    let gone = get("/gone/1").await;
    assert!(gone.cache_status().contains("fwd=miss"), "{gone:?}");
    assert_eq!(b.requests_for("/gone/1"), 1);
    assert_eq!(get("/new/1").await.status, 200);
    assert_eq!(b.requests_for("/new/1"), 1);

    let admin = server.admin_addr().unwrap();
    let purge = |token: &'static str| async move {
        let req = format!(
            "POST /purge?route=stay&host=x&path=/stay/1 HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {token}\r\ncontent-length: 0\r\n\r\n"
        );
        exchange(admin, req.as_bytes()).await.status
    };
    assert_eq!(purge("old-token-0123456789").await, 401);
    assert_eq!(purge("new-token-0123456789").await, 200);
    server.shutdown().await;
}

/// The binary on SIGHUP: an invalid file is refused with its file, line and key, and
/// the running config keeps serving; a valid one is applied.
#[test]
fn sighup_applies_a_valid_file_and_refuses_an_invalid_one() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(Origin::start(no_freshness())).unwrap();
    let port = corral_testkit::free_port().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("corral.toml");
    let text = |ttl: &str| {
        config_text(&origin.url(), &format!("ttl = {ttl}"), "").replace(
            "127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
            &format!("127.0.0.1:{port}\""),
        )
    };
    std::fs::write(&file, text("\"60s\"")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_corral"))
        .arg("--config")
        .arg(&file)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, logged) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let wait_log = |needle: &str| loop {
        match logged.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no log line with {needle:?}: {e}"),
        }
    };
    wait_log("corral listening");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let get = |path: &str| {
        rt.block_on(exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
        ))
    };
    let hup = || {
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    };

    std::fs::write(&file, text("\"forever\"")).unwrap();
    hup();
    let refused = wait_log("config reload refused");
    assert!(refused.contains("corral.toml:"), "{refused}");
    assert!(refused.contains("route[0].ttl"), "{refused}");
    assert_eq!(get("/a").status, 200);
    assert!(matches!(ttl(get("/a").cache_status()), Some(55..=60)));

    std::fs::write(&file, text("\"600s\"")).unwrap();
    hup();
    wait_log("config reloaded");
    assert_eq!(get("/b").status, 200);
    assert!(matches!(ttl(get("/b").cache_status()), Some(595..=600)));
    let _ = child.kill();
    let _ = child.wait();
}
