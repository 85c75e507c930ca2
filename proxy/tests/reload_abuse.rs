//! Reloads against what a hostile review tried over real sockets (each `D` test failed
//! before its fix; the `P` ones held from the start).

mod support;

use std::time::Duration;

use corral::origin::{Behaviour, Origin};
use corral::Config;
use support::raw::exchange;
use support::redis::RedisServer;

/// A config for `origin`: route `t` on `/` with `route` lines, `top` lines, optional
/// `[redis]` section (same shape as the support harness).
fn text(origin: &str, route: &str, redis: Option<&str>) -> String {
    let redis = redis
        .map(|url| {
            format!(
                "[redis]\nurl = \"{url}\"\ncommand_timeout = \"500ms\"\nretry_after = \"200ms\"\n"
            )
        })
        .unwrap_or_default();
    format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\
         {redis}\n[[route]]\nname = \"t\"\nupstream = \"{origin}\"\n{route}\n"
    )
}

fn cfg(t: &str) -> Config {
    Config::parse(t, "t.toml").unwrap()
}

async fn get(addr: std::net::SocketAddr, path: &str) -> support::raw::Wire {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
    )
    .await
}

/// Waits until `server` is connected to Redis and subscribed (as the harness does).
async fn joined(server: &corral::RunningServer) {
    if let Some(fleet) = server.proxy().redis() {
        let fleet = std::sync::Arc::clone(fleet);
        support::eventually("the instance joins the fleet", || {
            let ready = fleet.ready();
            async move { ready.then_some(()) }
        })
        .await;
    }
}

/// Waits until `server` has no fill in progress (what a fill stores is stored).
async fn fills_done(server: &corral::RunningServer) {
    support::eventually("no fill in progress", || async {
        let n = support::metric_of(server, "corral_fills_in_progress").await;
        (n == 0.0).then_some(())
    })
    .await;
}

fn no_freshness() -> Behaviour {
    Behaviour {
        cache_control: None,
        ..Behaviour::default()
    }
}

/// Was a defect (D1): `RunningServer::reload(&Config)` with a config cloned from one the server
/// already used (here: the one given to `start`) and then changed. `cache_scope` is
/// memoised in a `OnceLock` that `Clone` copies, so the changed route keeps the old
/// digest: the report says `changed`, yet the old upstream's entries are kept and
/// served for the new upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_clone_of_the_config_gets_new_keys() {
    let a = Origin::start(no_freshness()).await.unwrap();
    let b = Origin::start(no_freshness()).await.unwrap();
    let first = cfg(&text(&a.url(), "", None));
    let server = corral::start(&first).await.unwrap();
    let addr = server.listen_addr();
    assert_eq!(get(addr, "/x").await.status, 200);
    assert_eq!(a.requests_for("/x"), 1);

    let mut second = first.clone();
    second.routes[0].upstream = b.url().parse().unwrap();
    let report = server.reload(&second).await;
    assert_eq!(report.routes.changed, ["t"]);

    let after = get(addr, "/x").await;
    assert!(
        after.cache_status().contains("fwd=miss"),
        "route t now goes to b, yet served {:?} (entries dropped: {})",
        after.cache_status(),
        report.routes.entries_dropped
    );
    assert_eq!(b.requests_for("/x"), 1);
    server.shutdown().await;
}

/// Was a defect (D2): `upstream_concurrency = 1`, one request in flight, then a reload that changes
/// only a timeout (README: caps change in place). The route is rebuilt with a fresh
/// cap, so the next request goes upstream at once: two in flight against a cap of 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_cap_holds_across_a_reload_with_requests_in_flight() {
    let origin = Origin::start(Behaviour {
        delay: Duration::from_millis(1500),
        ..no_freshness()
    })
    .await
    .unwrap();
    let route =
        |timeout: &str| format!("upstream_concurrency = 1\nresponse_timeout = \"{timeout}\"");
    let server = corral::start(&cfg(&text(&origin.url(), &route("30s"), None)))
        .await
        .unwrap();
    let addr = server.listen_addr();
    let first = tokio::spawn(async move { get(addr, "/a").await });
    support::eventually("/a reaches the origin", || async {
        (origin.requests_for("/a") == 1).then_some(())
    })
    .await;
    let report = server
        .reload(&cfg(&text(&origin.url(), &route("20s"), None)))
        .await;
    assert_eq!(report.routes.changed, ["t"]);
    let second = get(addr, "/b").await;
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(second.status, 200);
    assert_eq!(
        origin.max_in_flight(),
        1,
        "upstream_concurrency = 1, but the reload let a second request through"
    );
    server.shutdown().await;
}

/// Was a defect (D3): fleet cap 2; one request in flight holds lease `<instance>:0`. A reload that
/// changes only a timeout builds a new `FleetCap` whose token counter restarts at 0:
/// its first lease is the same ZSET member as the one in flight, so Redis counts two
/// requests as one and a third goes upstream: 3 in flight against a fleet cap of 2
/// (and when the old request ends it removes the new request's lease too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_cap_holds_across_a_reload_lease_tokens_stay_unique() {
    let redis = RedisServer::start().await;
    let origin = Origin::start(Behaviour {
        delay: Duration::from_millis(2000),
        ..no_freshness()
    })
    .await
    .unwrap();
    let route = |timeout: &str| {
        format!(
            "upstream_concurrency = 10\nfleet_upstream_concurrency = 2\nresponse_timeout = \"{timeout}\""
        )
    };
    let url = redis.url();
    let server = corral::start(&cfg(&text(&origin.url(), &route("30s"), Some(&url))))
        .await
        .unwrap();
    let addr = server.listen_addr();
    // Connected to Redis before the first request (as the harness waits), so that
    // `/a` takes lease token 0 of the first cap.
    joined(&server).await;
    let first = tokio::spawn(async move { get(addr, "/a").await });
    support::eventually("/a reaches the origin", || async {
        (origin.requests_for("/a") == 1).then_some(())
    })
    .await;
    let report = server
        .reload(&cfg(&text(&origin.url(), &route("20s"), Some(&url))))
        .await;
    assert_eq!(report.routes.changed, ["t"]);
    let (b, c) = (
        tokio::spawn(async move { get(addr, "/b").await }),
        tokio::spawn(async move { get(addr, "/c").await }),
    );
    support::eventually("/b or /c reaches the origin", || async {
        (origin.requests_for("/b") + origin.requests_for("/c") >= 1).then_some(())
    })
    .await;
    // A look at the leases while they are held, for the failure message.
    let leases =
        support::redis::redis_command(&redis, &["ZRANGE", "corral:{cap:t}:leases", "0", "-1"])
            .await;
    let in_flight = origin.requests() - u64::from(first.is_finished());
    let (b, c) = (b.await.unwrap(), c.await.unwrap());
    assert_eq!((b.status, c.status), (200, 200));
    eprintln!("while {in_flight} requests were at the origin, leases in Redis: {leases:?}");
    assert_eq!(first.await.unwrap().status, 200);
    assert!(
        origin.max_in_flight() <= 2,
        "fleet_upstream_concurrency = 2, yet {} were in flight; leases then: {leases:?}",
        origin.max_in_flight()
    );
    server.shutdown().await;
}

/// Was a defect (D4): purge by URL reaches only the key under the route's *current* settings digest.
/// Fleet mode: an entry stored in Redis under settings A; reload to B; the content
/// changes and is purged (200); reload back to A (a config rollback): the purged copy
/// is served again from Redis. The same holds during a rollout: an instance still on
/// A keeps serving what a purge through an instance on B "removed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_url_reaches_entries_under_earlier_settings() {
    let redis = RedisServer::start().await;
    let origin = Origin::start(no_freshness()).await.unwrap();
    let url = redis.url();
    let a = text(&origin.url(), "ttl = \"300s\"", Some(&url));
    let b = text(&origin.url(), "ttl = \"600s\"", Some(&url));
    let server = corral::start(&cfg(&a)).await.unwrap();
    let addr = server.listen_addr();
    let admin = server.admin_addr().unwrap();
    joined(&server).await;
    support::eventually("stored in redis", || async {
        let r = get(addr, "/p").await;
        (r.cache_status().contains("hit")).then_some(())
    })
    .await;
    support::eventually("the copy reached Redis", || async {
        let keys = support::redis::redis_command(&redis, &["KEYS", "corral:*:e:*"]).await;
        keys.is_some_and(|k| k.contains(":e:")).then_some(())
    })
    .await;

    server.reload(&cfg(&b)).await;
    origin.set(|o| o.version = 2);
    let purge = exchange(
        admin,
        b"POST /purge?route=t&host=x&path=/p HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(purge.status, 200, "{purge:?}");
    assert!(get(addr, "/p").await.text().contains(" v2 "));

    // Roll back.
    server.reload(&cfg(&a)).await;
    let after = get(addr, "/p").await;
    assert!(
        !after.text().contains(" v1 "),
        "purged content served again after the rollback: {:?} body {:?}",
        after.cache_status(),
        after.text()
    );
    server.shutdown().await;
}

/// Was a mismatch (D5) between the README and the code: `[lock] wait_timeout` and
/// `on_wait_timeout` are the routes' defaults, and a reload applies them (the README
/// said `[lock]` needed a restart). Now documented: a coalesced waiter after a reload to
/// 300ms is answered 504 after 300ms, and nothing is reported as needing a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_wait_timeout_is_applied_by_a_reload() {
    let origin = Origin::start(Behaviour {
        delay: Duration::from_millis(1500),
        ..no_freshness()
    })
    .await
    .unwrap();
    let with_lock = |wait: &str| {
        text(&origin.url(), "", None).replace(
            "[[route]]",
            &format!("[lock]\nwait_timeout = \"{wait}\"\non_wait_timeout = \"error\"\n[[route]]"),
        )
    };
    let server = corral::start(&cfg(&with_lock("10s"))).await.unwrap();
    let report = server.reload(&cfg(&with_lock("300ms"))).await;
    assert!(report.needs_restart.is_empty(), "{report:?}");
    let addr = server.listen_addr();
    let leader = tokio::spawn(async move { get(addr, "/k").await });
    support::eventually("the leader's fetch reaches the origin", || async {
        (origin.requests_for("/k") == 1).then_some(())
    })
    .await;
    let waiter = get(addr, "/k").await;
    assert_eq!(waiter.status, 504, "{waiter:?}");
    assert_eq!(leader.await.unwrap().status, 200);
    server.shutdown().await;
}

/// Was a defect (D6): the sweep of a changed route's local entries is not a barrier: a fill in
/// flight across the reload stores its entry under the old scope after the sweep ran.
/// No route can reach it (nor does `local_entries_dropped` count it); it occupies the
/// local tier until evicted or it expires (ttl + stale windows + `keep`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_in_flight_across_a_reload_stores_nothing_unreachable() {
    let origin = Origin::start(Behaviour {
        delay: Duration::from_millis(1000),
        ..no_freshness()
    })
    .await
    .unwrap();
    let a = text(&origin.url(), "ttl = \"300s\"", None);
    let b = text(&origin.url(), "ttl = \"600s\"", None);
    let server = corral::start(&cfg(&a)).await.unwrap();
    let addr = server.listen_addr();
    let slow = tokio::spawn(async move { get(addr, "/s").await });
    support::eventually("/s reaches the origin", || async {
        (origin.requests_for("/s") == 1).then_some(())
    })
    .await;
    let report = server.reload(&cfg(&b)).await;
    assert_eq!(report.routes.changed, ["t"]);
    assert_eq!(slow.await.unwrap().status, 200);
    fills_done(&server).await;
    let entries = support::metric_of(&server, "corral_cache_entries").await;
    assert_eq!(
        entries, 0.0,
        "an entry of route t's old settings was stored after the sweep"
    );
    server.shutdown().await;
}

/// Was a defect (D7): after a reload rebuilds a capped route, the old cap (still finishing its
/// requests) and the new one write the same `corral_upstream_in_flight{route}` gauge
/// with their own counts: when the old one's last request ends it sets 0 while the
/// new one has a request in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_gauge_stays_right_across_a_reload() {
    in_flight_gauge_after_a_reload("20s").await;
}

/// Probe (holds): D7's control: the same steps with the route unchanged by the reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_gauge_of_an_unchanged_route() {
    in_flight_gauge_after_a_reload("30s").await;
}

/// A capped route (`response_timeout` 30s) with /a in flight is reloaded with
/// `response_timeout = new_timeout`; /b goes upstream, /a ends: the gauge reads 1.
async fn in_flight_gauge_after_a_reload(new_timeout: &str) {
    let origin = Origin::start(Behaviour {
        delay: Duration::from_millis(1000),
        ..no_freshness()
    })
    .await
    .unwrap();
    let route =
        |timeout: &str| format!("upstream_concurrency = 4\nresponse_timeout = \"{timeout}\"");
    let server = corral::start(&cfg(&text(&origin.url(), &route("30s"), None)))
        .await
        .unwrap();
    let addr = server.listen_addr();
    let first = tokio::spawn(async move { get(addr, "/a").await });
    support::eventually("/a reaches the origin", || async {
        (origin.requests_for("/a") == 1).then_some(())
    })
    .await;
    server
        .reload(&cfg(&text(&origin.url(), &route(new_timeout), None)))
        .await;
    origin.set(|b| b.delay = Duration::from_millis(4000));
    let second = tokio::spawn(async move { get(addr, "/b").await });
    support::eventually("/b reaches the origin", || async {
        (origin.requests_for("/b") == 1).then_some(())
    })
    .await;
    assert_eq!(first.await.unwrap().status, 200);
    // /a's slot is released just after its response; the gauge must read 1 (/b)
    // throughout, checked over 200 ms while /b is still at the origin.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let gauge = support::metric_of(&server, "corral_upstream_in_flight{route=\"t\"}").await;
        assert_eq!(gauge, 1.0, "one request (/b) is in flight upstream");
    }
    assert!(!second.is_finished());
    assert_eq!(second.await.unwrap().status, 200);
    server.shutdown().await;
}

/// Probe (expected to hold): a reload that gives a route a `tag_header` (none had one
/// at start, so the tag rules started empty) indexes new entries; a tag purge finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_header_added_by_a_reload_is_indexed_and_purged() {
    let origin = Origin::start(Behaviour {
        headers: vec![("surrogate-key".into(), "foo bar".into())],
        ..no_freshness()
    })
    .await
    .unwrap();
    let server = corral::start(&cfg(&text(&origin.url(), "", None)))
        .await
        .unwrap();
    let addr = server.listen_addr();
    assert_eq!(get(addr, "/t").await.status, 200);
    server
        .reload(&cfg(&text(
            &origin.url(),
            "tag_header = \"Surrogate-Key\"",
            None,
        )))
        .await;
    assert!(get(addr, "/t").await.cache_status().contains("fwd=miss"));
    assert!(get(addr, "/t").await.cache_status().contains("hit"));
    let purge = exchange(
        server.admin_addr().unwrap(),
        b"POST /purge?tag=foo HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(purge.status, 200, "{purge:?}");
    let after = get(addr, "/t").await;
    assert!(after.cache_status().contains("fwd=miss"), "{after:?}");
    server.shutdown().await;
}

/// Probe (expected to hold): `trusted_proxies` added by a reload applies to the next
/// request on a connection opened before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_apply_to_an_open_connection() {
    let origin = Origin::start(no_freshness()).await.unwrap();
    let plain = text(&origin.url(), "cache = false", None);
    let trusting = plain.replace(
        "shutdown_grace = \"5s\"\n",
        "shutdown_grace = \"5s\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    );
    let server = corral::start(&cfg(&plain)).await.unwrap();
    let mut kept = support::raw::RawClient::connect(server.listen_addr()).await;
    let req = b"GET /h HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 9.9.9.9\r\n\r\n";
    assert_eq!(kept.exchange(req).await.status, 200);
    let xff = |o: &Origin| {
        o.last_request_headers("/h")
            .and_then(|h| {
                h.get("x-forwarded-for")
                    .map(|v| v.to_str().unwrap().to_string())
            })
            .unwrap_or_default()
    };
    assert!(!xff(&origin).contains("9.9.9.9"), "{}", xff(&origin));
    server.reload(&cfg(&trusting)).await;
    assert_eq!(kept.exchange(req).await.status, 200);
    assert!(xff(&origin).contains("9.9.9.9"), "{}", xff(&origin));
    server.shutdown().await;
}

/// Probe (expected to hold): a reload storm (100 reloads flipping a route's ttl)
/// while clients keep requesting: every request answers 200, and afterwards the
/// local tier holds only entries of the running settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_storm_under_load() {
    let origin = Origin::start(no_freshness()).await.unwrap();
    let configs = [
        cfg(&text(&origin.url(), "ttl = \"60s\"", None)),
        cfg(&text(&origin.url(), "ttl = \"61s\"", None)),
    ];
    let server = corral::start(&configs[0]).await.unwrap();
    let addr = server.listen_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let stop = std::sync::Arc::clone(&stop);
        clients.push(tokio::spawn(async move {
            let mut kept = support::raw::RawClient::connect(addr).await;
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = kept.get(&format!("/k{}", (n + c) % 8)).await;
                assert_eq!(r.status, 200, "{r:?}");
                n += 1;
            }
            n
        }));
    }
    for i in 0..100 {
        server.reload(&configs[(i + 1) % 2]).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        assert!(c.await.unwrap() > 0);
    }
    // Final config is configs[0] (100 reloads); at most 8 keys of it.
    fills_done(&server).await;
    let entries = support::metric_of(&server, "corral_cache_entries").await;
    assert!(entries <= 8.0, "{entries} entries for 8 keys");
    server.shutdown().await;
}

/// Was a defect (D4b): the rollout form of D4. Two instances share Redis; one is reloaded (ttl
/// changed), the other not yet. A purge by URL through the reloaded one answers 200,
/// yet the other keeps serving the purged copy (its local entry and its Redis key are
/// under the old digest, which the purge never names).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_during_a_rollout_reaches_instances_on_the_old_settings() {
    let redis = RedisServer::start().await;
    let origin = Origin::start(no_freshness()).await.unwrap();
    let url = redis.url();
    let a = text(&origin.url(), "ttl = \"300s\"", Some(&url));
    let b = text(&origin.url(), "ttl = \"600s\"", Some(&url));
    let x = corral::start(&cfg(&a)).await.unwrap();
    let y = corral::start(&cfg(&a)).await.unwrap();
    joined(&x).await;
    joined(&y).await;
    assert_eq!(get(x.listen_addr(), "/p").await.status, 200);
    support::eventually("x has a local hit", || async {
        let r = get(x.listen_addr(), "/p").await;
        r.cache_status().contains("hit").then_some(())
    })
    .await;

    y.reload(&cfg(&b)).await; // the rollout reaches y first
    origin.set(|o| o.version = 2);
    let purge = exchange(
        y.admin_addr().unwrap(),
        b"POST /purge?route=t&host=x&path=/p HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(purge.status, 200, "{purge:?}");
    // The purge event reaches x, which drops its copy and fetches the new content.
    support::eventually("x serves the new content", || async {
        let from_x = get(x.listen_addr(), "/p").await;
        from_x.text().contains(" v2 ").then_some(())
    })
    .await;
    x.shutdown().await;
    y.shutdown().await;
}
