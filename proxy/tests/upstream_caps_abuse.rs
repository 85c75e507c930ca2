//! The upstream caps against what a hostile review found (each test failed before its
//! fix): a valid config refusing everything, slow clients holding slots, starved
//! instances, leases nobody uses, coalescing lost under a full queue, refusals read as
//! upstream failures, outage requests not counted, planted Redis values, a drifting
//! gauge. Real origin, real redis-server, real sockets.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use support::raw::RawClient;
use support::redis::{redis_command, RedisServer};
use support::{cold_keys, slow, Harness, OriginBehaviour, Setup};
use tokio::io::AsyncWriteExt;

/// A client that starts a POST of `len` bytes to `path` and sends one byte of it every
/// 100 ms until `stop` is set (a slow upload, well within any body timeout).
fn trickling_upload(
    addr: std::net::SocketAddr,
    path: &'static str,
    len: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = RawClient::connect(addr).await;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\n\r\n"
        );
        client.send(head.as_bytes()).await;
        for _ in 0..len {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            if client.stream.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Was a defect: with a fleet cap every request waits in the queue (even with slots and
/// leases free), so `upstream_queue = 0` (accepted by the config: 0..=100000) refuses
/// every request of the route, with Redis up and nothing in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_cap_with_upstream_queue_0_still_serves_an_idle_route() {
    let redis = RedisServer::start().await;
    let h = Setup::origin(slow(0))
        .redis(&redis.url())
        .route("fleet_upstream_concurrency = 4\nupstream_queue = 0")
        .start()
        .await;

    let reply = h.get("/idle").await;

    assert_eq!(
        reply.status,
        StatusCode::OK,
        "nothing in flight, four places free; got {:?}",
        reply.cache_status()
    );
}

/// Was a defect: fair shares are `ceil(cap / waiting instances) - mine`, and an instance's
/// release and its next grant happen in one script. With a fleet cap below the number
/// of busy instances (here 1 for 2), the instance that holds the lease frees it and takes
/// it back in the same round every time: the other instance never gets a place and its
/// requests all time out in the queue, while the first is served continuously.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_cap_below_the_instance_count_does_not_starve_an_instance() {
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(slow(30))
        .redis(&redis.url())
        .route("fleet_upstream_concurrency = 1\nupstream_queue_timeout = \"2s\"")
        .start_fleet(2)
        .await;
    let (a, b) = (&h.server, &others[0]);

    // Instance A is kept busy: four clients, each asking for a new cold key as soon as
    // its last one is answered.
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let stop = Arc::clone(&stop);
            let addr = a.listen_addr();
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    support::get_url(format!("http://{addr}/a/{w}/{i}")).await;
                    i += 1;
                }
            })
        })
        .collect();
    support::eventually("instance A's requests reach the origin", || async {
        (h.origin.requests() >= 4).then_some(())
    })
    .await;

    // Instance B asks for one key, and has 2 s in its queue to get a place.
    let from_b = Harness::get_from(b, "/b").await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.await;
    }

    assert_eq!(
        from_b.status,
        StatusCode::OK,
        "instance B starved while A was served {} requests: {}",
        h.origin.requests(),
        from_b.cache_status()
    );
}

/// Was a defect: a slot is taken before the request body is sent and
/// held while it uploads. One client trickling a POST body (one byte per 100 ms, far
/// inside `body_timeout`) holds a route with `upstream_concurrency = 1` for as long as it
/// likes: every other request of the route, GETs of other keys included, waits out the
/// queue timeout and gets 503. Without the cap the same upload harms nobody else (see
/// the control below). `upstream_concurrency` slow connections take any capped route
/// down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_does_not_take_a_capped_route_down_for_everyone() {
    let h = Setup::origin(slow(0))
        .route("upstream_concurrency = 1\nupstream_queue_timeout = \"1s\"")
        .start()
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let upload = trickling_upload(h.addr(), "/upload", 10_000, Arc::clone(&stop));
    support::eventually("the upload is at the origin", || async {
        (h.origin.requests_for("/upload") == 1).then_some(())
    })
    .await;

    let other = h.get("/other-key").await;
    stop.store(true, Ordering::SeqCst);
    let _ = upload.await;

    assert_eq!(
        other.status,
        StatusCode::OK,
        "one slow client denied the route to everyone: {}",
        other.cache_status()
    );
}

/// Control for the test above: without a cap the same slow upload harms nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_without_a_cap_a_slow_upload_harms_nobody() {
    let h = Setup::origin(slow(0)).start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let upload = trickling_upload(h.addr(), "/upload", 10_000, Arc::clone(&stop));
    support::eventually("the upload is at the origin", || async {
        (h.origin.requests_for("/upload") == 1).then_some(())
    })
    .await;

    let other = h.get("/other-key").await;
    stop.store(true, Ordering::SeqCst);
    let _ = upload.await;

    assert_eq!(other.status, StatusCode::OK);
}

/// Was a defect: the queue wait counts against the followers' `wait_timeout` (the README
/// says it does not count against the response timeout, but coalesced followers still
/// give up on a leader that is only queued). Each follower then fetches on its own
/// (`on_wait_timeout = fetch`, the default) and joins the queue too: under exactly the
/// overload the cap is for, one hot key becomes as many upstream requests as it had
/// clients. Defaults are `wait_timeout` 10 s and `upstream_queue_timeout` 10 s, so
/// any queue wait near the limit does this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_of_a_queued_fill_do_not_each_fetch_the_hot_key() {
    let h = Setup::origin(slow(0))
        .route(
            "upstream_concurrency = 1\nupstream_queue_timeout = \"5s\"\nwait_timeout = \"300ms\"",
        )
        .start()
        .await;
    // The one slot is held by a slow request for about 1.5 s; the origin is fast again
    // for everything after it.
    h.origin.set(|b| b.delay = Duration::from_millis(1500));
    let (busy, hot) = tokio::join!(h.get("/busy"), async {
        support::eventually("the slow request is at the origin", || async {
            (h.origin.requests_for("/busy") == 1).then_some(())
        })
        .await;
        h.origin.set(|b| b.delay = Duration::ZERO);
        h.herd("/hot", 8).await
    });

    assert_eq!(busy.status, StatusCode::OK);
    assert!(hot.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(
        h.origin.requests_for("/hot"),
        1,
        "one hot key, coalesced: the leader was only waiting for its turn"
    );
}

/// Was a defect: a value of another type at the route's
/// leases key makes every round fail with WRONGTYPE, which is taken for "Redis
/// unavailable": every request goes unleased, each instance up to the whole fleet cap,
/// for ever (the script fails before its PEXPIRE, and nothing removes the key). The
/// fleet cap is silently off while Redis is up and healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_of_another_type_at_the_leases_key_does_not_turn_the_fleet_cap_off() {
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(slow(300))
        .redis(&redis.url())
        .route("fleet_upstream_concurrency = 2")
        .start_fleet(2)
        .await;
    redis_command(&redis, &["SET", "corral:{cap:t}:leases", "planted"]).await;
    let servers = [&h.server, &others[0]];

    let replies = cold_keys(&servers, "k", 8).await;

    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert!(
        h.origin.max_in_flight() <= 2,
        "fleet cap of 2, {} in flight at once (unleased: {})",
        h.origin.max_in_flight(),
        h.metric("corral_upstream_unleased_total{route=\"t\"}")
            .await
    );
}

/// The same starvation with a cap above one: fleet cap 4 over 3 instances gives each a
/// share of ceil(4/3) = 2, so two busy instances holding 2 each take their places back
/// on every release and the third never gets one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_cap_of_4_over_3_instances_does_not_starve_the_third() {
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(slow(30))
        .redis(&redis.url())
        .route("fleet_upstream_concurrency = 4\nupstream_queue_timeout = \"2s\"")
        .start_fleet(3)
        .await;
    let busy = [h.server.listen_addr(), others[0].listen_addr()];

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let stop = Arc::clone(&stop);
            let addr = busy[w % 2];
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    support::get_url(format!("http://{addr}/busy/{w}/{i}")).await;
                    i += 1;
                }
            })
        })
        .collect();
    support::eventually("the busy instances' requests reach the origin", || async {
        (h.origin.requests() >= 16).then_some(())
    })
    .await;

    let from_third = Harness::get_from(&others[1], "/third").await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.await;
    }

    assert_eq!(
        from_third.status,
        StatusCode::OK,
        "the third instance starved while the others were served {} requests: {}",
        h.origin.requests(),
        from_third.cache_status()
    );
}

/// Was a metric drift: passes (not detached like fills) whose clients disconnect while queued
/// leave closed senders in the queue, and `corral_upstream_queued` keeps counting them
/// until a slot frees or another waiter times out (here for seconds): the gauge says
/// requests wait when none does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queued_gauge_drops_when_queued_clients_disconnect() {
    let h = Setup::origin(slow(0))
        .route("upstream_concurrency = 1\nupstream_queue_timeout = \"20s\"")
        .start()
        .await;
    // The one slot is held by a slow fetch.
    h.origin.set(|b| b.delay = Duration::from_secs(3));
    let slow = tokio::spawn(support::get_url(format!("http://{}/slow", h.addr())));
    support::eventually("the slow fetch is at the origin", || async {
        (h.origin.requests_for("/slow") == 1).then_some(())
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = RawClient::connect(h.addr()).await;
        c.send(format!("POST /q/{i} HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n").as_bytes())
            .await;
        clients.push(c);
    }
    support::eventually("three requests queue", || async {
        (h.metric("corral_upstream_queued{route=\"t\"}").await == 3.0).then_some(())
    })
    .await;
    drop(clients);

    // Give the server 2 s to notice the closed connections.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut queued;
    loop {
        queued = h.metric("corral_upstream_queued{route=\"t\"}").await;
        if queued == 0.0 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.origin.set(|b| b.delay = Duration::ZERO);
    let _ = slow.await;
    // The queued passes were cancelled with their connections: none reaches the origin.
    let after = h.get("/after").await;
    assert_eq!(after.status, StatusCode::OK);
    let sent: u64 = (0..3)
        .map(|i| h.origin.requests_for(&format!("/q/{i}")))
        .sum();
    assert_eq!(
        queued, 0.0,
        "nobody waits any more ({sent} of the 3 were sent)"
    );
}

/// HEAD, 304 and empty-bodied passes on a route with
/// one slot each free it; the next request is served and the gauge returns to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sound_bodiless_responses_free_their_slot() {
    let h = Setup::origin(OriginBehaviour {
        cache_control: Some("no-store".into()),
        etag: true,
        ..slow(0)
    })
    .route("upstream_concurrency = 1\nupstream_queue_timeout = \"1s\"")
    .start()
    .await;
    let mut c = RawClient::connect(h.addr()).await;
    let head = c.exchange(b"HEAD /h HTTP/1.1\r\nhost: t\r\n\r\n").await;
    assert_eq!(head.status, 200);
    let cond = c
        .exchange(b"GET /c HTTP/1.1\r\nhost: t\r\nif-none-match: \"v0\"\r\n\r\n")
        .await;
    assert!(cond.status == 304 || cond.status == 200, "{}", cond.status);
    for i in 0..3 {
        let r = h.get(&format!("/after/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.cache_status());
    }
    support::eventually("the gauge returns to 0", || async {
        (h.metric("corral_upstream_in_flight{route=\"t\"}").await == 0.0).then_some(())
    })
    .await;
}

/// Was a defect: a fill refused by one instance's cap tells the fleet's waiters `Failed`, which
/// they read as an upstream protocol failure: the other instance answers `502
/// detail=upstream-protocol` (no Retry-After) for an upstream that was never asked,
/// although its own slots were free, and counts an upstream protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_refused_on_one_instance_is_not_a_502_protocol_failure_on_another() {
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(slow(0))
        .redis(&redis.url())
        .route("upstream_concurrency = 1\nupstream_queue_timeout = \"500ms\"")
        .start_fleet(2)
        .await;
    let (a, b) = (&h.server, &others[0]);
    // A's one slot is held by a slow fetch; A's fill of /hot then waits in A's queue
    // holding the fleet's fill lock, and B's request for /hot waits on that lock.
    h.origin.set(|b| b.delay = Duration::from_secs(2));
    let slow = tokio::spawn(support::get_url(format!("http://{}/slow", a.listen_addr())));
    support::eventually("the slow fetch is at the origin", || async {
        (h.origin.requests_for("/slow") == 1).then_some(())
    })
    .await;
    let (from_a, from_b) = tokio::join!(Harness::get_from(a, "/hot"), async {
        support::eventually("A's fill of /hot is queued", || async {
            (support::metric_of(a, "corral_upstream_queued{route=\"t\"}").await >= 1.0)
                .then_some(())
        })
        .await;
        Harness::get_from(b, "/hot").await
    });
    let _ = slow.await;

    assert_eq!(from_a.status, StatusCode::SERVICE_UNAVAILABLE);
    let b_protocol_errors = support::metric_of(
        b,
        "corral_upstream_errors_total{route=\"t\",kind=\"protocol\"}",
    )
    .await;
    assert_ne!(
        from_b.status,
        StatusCode::BAD_GATEWAY,
        "B: {} (protocol errors counted on B: {b_protocol_errors}); /hot requests at the origin: {}",
        from_b.cache_status(),
        h.origin.requests_for("/hot")
    );
    assert_eq!(b_protocol_errors, 0.0);
}

/// Requests let through without a lease during a Redis outage are counted once Redis
/// is back (leases are taken for them): the fleet keeps to its cap (here A's two outage
/// requests, then B's three cold keys one at a time in the one place left).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_unleased_during_an_outage_count_against_the_cap_once_redis_is_back() {
    let mut redis = RedisServer::start().await;
    let (h, others) = Setup::origin(slow(0))
        .redis(&redis.url())
        .route("fleet_upstream_concurrency = 3")
        .start_fleet(2)
        .await;
    let (a, b) = (&h.server, &others[0]);
    redis.kill();
    h.origin.set(|o| o.delay = Duration::from_secs(4));

    let only_a = [a];
    let (from_a, from_b) = tokio::join!(cold_keys(&only_a, "outage", 2), async {
        support::eventually("A's unleased requests are at the origin", || async {
            (h.origin.requests() == 2).then_some(())
        })
        .await;
        redis.restart().await;
        h.wait_for_fleet(a).await;
        h.wait_for_fleet(b).await;
        // B's first rounds may still find its old connection broken: wait until one of
        // its requests takes a lease.
        h.origin.set(|o| o.delay = Duration::ZERO);
        let mut i = 0;
        support::eventually("B takes leases again", || {
            i += 1;
            let path = format!("/warm/{i}");
            async move {
                let before =
                    support::metric_of(b, "corral_upstream_unleased_total{route=\"t\"}").await;
                Harness::get_from(b, &path).await;
                let after =
                    support::metric_of(b, "corral_upstream_unleased_total{route=\"t\"}").await;
                (after == before).then_some(())
            }
        })
        .await;
        // A counts its outage requests in Redis within a round of reconnecting (until
        // then no instance can know of them: the fleet may exceed its cap that long).
        support::eventually("A's outage requests hold leases", || async {
            let leases = redis_command(&redis, &["ZCARD", "corral:{cap:t}:leases"]).await;
            (leases.as_deref() == Some("2")).then_some(())
        })
        .await;
        h.origin.set(|o| o.delay = Duration::from_millis(500));
        // B, idle through the outage, gets whatever the fleet has free.
        let only_b = [b];
        cold_keys(&only_b, "b", 3).await
    });

    assert!(from_a.iter().all(|r| r.status == StatusCode::OK));
    assert!(from_b.iter().all(|r| r.status == StatusCode::OK));
    assert!(
        h.origin.max_in_flight() <= 3,
        "fleet cap 3: {} at once after Redis came back (A's outage request still running)",
        h.origin.max_in_flight()
    );
    eprintln!(
        "max {} unleased a {} b {}",
        h.origin.max_in_flight(),
        support::metric_of(a, "corral_upstream_unleased_total{route=\"t\"}").await,
        support::metric_of(b, "corral_upstream_unleased_total{route=\"t\"}").await
    );
}

/// Was a defect: a lease Redis grants for a waiter that gave up while the round was in
/// flight goes to `freed`, but nothing wakes the dispatcher: the place stays taken in
/// Redis, by nobody, until the dispatcher's next timed round (a third of the lock TTL,
/// here 3 s), and the rest of the fleet is refused meanwhile. (Redis is made slow for
/// one round with CLIENT PAUSE, shorter than the command timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_granted_to_a_waiter_that_left_is_released_at_once() {
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(slow(0))
        .redis(&redis.url())
        .lock("ttl = \"9s\"")
        .route("fleet_upstream_concurrency = 1\nupstream_queue_timeout = \"150ms\"")
        .start_fleet(2)
        .await;
    let (a, b) = (&h.server, &others[0]);
    // Warm both dispatchers (scripts loaded, connections up).
    assert_eq!(Harness::get_from(a, "/warm-a").await.status, StatusCode::OK);
    assert_eq!(Harness::get_from(b, "/warm-b").await.status, StatusCode::OK);

    redis_command(&redis, &["CLIENT", "PAUSE", "400", "ALL"]).await;
    // A pass (no fill lock to wait for in Redis first) waits in A's queue.
    let from_a = RawClient::connect(a.listen_addr())
        .await
        .exchange(b"POST /a HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n")
        .await;
    assert_eq!(
        from_a.cache_status(),
        "corral; fwd=miss; detail=upstream-queue-timeout",
        "A's waiter gave up while Redis was paused"
    );
    // The pause ends (a command of ours waits for it); A's round, sent during the
    // pause and so ahead of anything B asks, is granted the lease for the waiter that
    // left. (Waiting to see that lease held was flaky: released at once, as it should
    // be, it is held for a few milliseconds.)
    let leases = "corral:{cap:t}:leases";
    redis_command(&redis, &["PING"]).await;
    // Nothing is in flight anywhere; B asks for one key.
    let from_b = Harness::get_from(b, "/b").await;
    let held = redis_command(&redis, &["ZCARD", leases]).await;

    assert_eq!(
        from_b.status,
        StatusCode::OK,
        "B refused: {} (leases held in Redis by nobody: {held:?}; in flight on A: {})",
        from_b.cache_status(),
        support::metric_of(a, "corral_upstream_in_flight{route=\"t\"}").await
    );
}
