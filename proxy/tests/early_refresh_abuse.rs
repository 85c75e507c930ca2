//! Early refresh (XFetch) against schedules that would make it cost more than one
//! refresh per key per lifetime, or send upstream what a normal miss would not (found
//! by a hostile review; each failed before the fix). Real origin, real redis-server,
//! real sockets; every wait has a deadline.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::redis::RedisServer;
use support::{client, OriginBehaviour, Reply, Setup, DEADLINE};

/// The `ttl=` of a hit's `Cache-Status`, if it is a fresh hit.
fn hit_ttl(reply: &Reply) -> Option<i64> {
    let status = reply.cache_status();
    let rest = status.strip_prefix("corral; hit; ttl=")?;
    if status.contains("stale") {
        return None;
    }
    rest.split(';').next()?.trim().parse().ok()
}

type TestClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

async fn get(client: &TestClient, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::<Bytes>::default()).unwrap();
    let res = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .expect("response within the deadline")
        .expect("request succeeds");
    Reply::read(res).await
}

/// A refresh that does not renew the entry (here: the origin answers 503 to it) is not
/// started again by the next hits: a failing origin gets one request per copy and
/// lifetime from early refresh, not one per due hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_early_refresh_is_not_retried_before_expiry() {
    let h = Setup::origin(OriginBehaviour {
        // The entry's fetch time (delta): 100 ms, so hits draw in its last 2 s.
        delay: Duration::from_millis(100),
        cache_control: Some("max-age=3".into()),
        ..OriginBehaviour::default()
    })
    .start()
    .await;
    assert_eq!(
        h.get("/hot").await.cache_status(),
        "corral; fwd=miss; fwd-status=200; stored"
    );
    // The origin now fails, quickly.
    h.origin.set(|b| {
        b.status = StatusCode::SERVICE_UNAVAILABLE;
        b.delay = Duration::ZERO;
    });

    // One client hits the key until the entry is no longer a fresh hit.
    let c = client();
    let deadline = tokio::time::Instant::now() + DEADLINE * 2;
    let mut upstream_while_fresh = 0;
    let mut started = 0;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the entry expires in time"
        );
        let before = h.origin.requests_for("/hot");
        let reply = get(&c, h.addr(), "/hot", &[]).await;
        if hit_ttl(&reply).is_none() {
            break;
        }
        if reply.cache_status().contains("early-refresh") {
            started += 1;
        }
        upstream_while_fresh = before.max(upstream_while_fresh);
    }
    let refreshes = upstream_while_fresh - 1;
    assert!(
        refreshes <= 2,
        "while the one entry was fresh, hits sent {refreshes} early refreshes to a failing \
         origin ({started} hits said detail=early-refresh)"
    );
}

/// Fleet: while another instance holds the key's fill lock (for its own early refresh
/// of a slow key: here a lock set in Redis as that instance would), this instance's
/// copy tries once (one lock script, found held, left to the holder), not once per due
/// hit: no spin on Redis, and one `corral_early_refreshes_total` and one
/// `detail=early-refresh` for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_another_instance_holds_the_lock_a_copy_tries_its_refresh_once() {
    let redis = RedisServer::start().await;
    let h = Setup::origin(OriginBehaviour {
        delay: Duration::from_millis(100),
        cache_control: Some("max-age=3".into()),
        ..OriginBehaviour::default()
    })
    .redis(&redis.url())
    .start()
    .await;
    assert!(h.get("/hot").await.cache_status().contains("stored"));
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Another instance has claimed the key for its refresh (a slow origin: for 4 s).
    let key = support::key_for(&h.config, "127.0.0.1", "/hot");
    let lock = h.server.proxy().cache().shared().unwrap().keys(&key).lock;
    redis::cmd("SET")
        .arg(&lock)
        .arg("0123456789abcdef:00000000000000aa")
        .arg("PX")
        .arg(4_000)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let evals_before = support::redis::command_calls(&redis, "evalsha").await;

    let c = client();
    let deadline = tokio::time::Instant::now() + DEADLINE * 2;
    let mut labelled = 0;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the entry expires in time"
        );
        // A hit answers at once; past the entry's expiry the request waits on the
        // held lock: that ends the lifetime under test.
        let Ok(reply) =
            tokio::time::timeout(Duration::from_secs(1), get(&c, h.addr(), "/hot", &[])).await
        else {
            break;
        };
        if hit_ttl(&reply).is_none() {
            break;
        }
        if reply.cache_status().contains("detail=early-refresh") {
            labelled += 1;
        }
    }
    let evals = support::redis::command_calls(&redis, "evalsha").await - evals_before;
    let counted = h.metric("corral_early_refreshes_total{route=\"t\"}").await;
    assert_eq!(
        h.origin.requests_for("/hot"),
        1,
        "nothing fetched: the lock is held"
    );
    assert!(
        counted <= 1.0,
        "corral_early_refreshes_total = {counted} with no fetch and no adoption; \
         {labelled} hits said detail=early-refresh; {evals} lock scripts ran on Redis \
         while the entry was fresh"
    );
}

/// The HTTP/1 fast path rebuilds the request for an early refresh from the headers as
/// sent (it takes `Connection: keep-alive`/`close`); the refresh forwards what a
/// normal miss would, without the client's `Connection` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_path_early_refresh_forwards_no_connection_header() {
    let h = Setup::origin(OriginBehaviour {
        delay: Duration::from_millis(100),
        cache_control: Some("max-age=2".into()),
        ..OriginBehaviour::default()
    })
    .route("early_refresh_beta = 10")
    .start()
    .await;
    let c = client();
    let first = get(&c, h.addr(), "/hot", &[("connection", "keep-alive")]).await;
    assert!(
        first.cache_status().contains("fwd=miss"),
        "{}",
        first.cache_status()
    );
    let miss_headers = h
        .origin
        .last_request_headers("/hot")
        .expect("the miss arrived");
    assert!(
        miss_headers.get("connection").is_none(),
        "a miss strips the client's Connection header"
    );

    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an early refresh in time"
        );
        let reply = get(&c, h.addr(), "/hot", &[("connection", "keep-alive")]).await;
        if reply.cache_status().contains("detail=early-refresh") {
            break;
        }
    }
    let origin = &h.origin;
    support::eventually("the refresh reaches the origin", || async {
        (origin.requests_for("/hot") >= 2).then_some(())
    })
    .await;
    let refresh_headers = h.origin.last_request_headers("/hot").unwrap();
    assert_eq!(
        refresh_headers.get("connection"),
        None,
        "the early refresh sent the client's Connection header upstream: {refresh_headers:?}"
    );
}

/// An early refresh whose answer is not storable leaves the still-fresh entry alone
/// (no hit-for-pass mark over it): clients are served it until its expiry, as without
/// early refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncacheable_early_refresh_keeps_the_fresh_entry() {
    let h = Setup::origin(OriginBehaviour {
        delay: Duration::from_millis(100),
        cache_control: Some("max-age=3".into()),
        ..OriginBehaviour::default()
    })
    .route("early_refresh_beta = 10")
    .start()
    .await;
    h.get("/hot").await;
    // The origin's next answer is not storable (a Set-Cookie the route refuses).
    h.origin
        .set(|b| b.headers = vec![("set-cookie".into(), "s=1".into())]);

    let c = client();
    let deadline = tokio::time::Instant::now() + DEADLINE * 2;
    let ttl_left;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an early refresh in time"
        );
        let reply = get(&c, h.addr(), "/hot", &[]).await;
        let ttl = hit_ttl(&reply).expect("a fresh hit");
        if reply.cache_status().contains("detail=early-refresh") {
            ttl_left = ttl;
            break;
        }
    }
    let origin = &h.origin;
    support::eventually("the refresh reaches the origin", || async {
        (origin.requests_for("/hot") >= 2).then_some(())
    })
    .await;
    // Let the refresh finish (its answer comes at once after the 100 ms delay).
    support::eventually("the refresh is counted", || async {
        (h.metric("corral_upstream_requests_total{route=\"t\",reason=\"early-refresh\"}")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    let mut statuses = Vec::new();
    support::eventually("the fill has ended", || {
        let idle = h.server.proxy().fills().in_progress() == 0;
        async move { idle.then_some(()) }
    })
    .await;
    for _ in 0..5 {
        statuses.push(
            get(&c, h.addr(), "/hot", &[])
                .await
                .cache_status()
                .to_string(),
        );
    }
    assert!(
        statuses.iter().all(|s| s.starts_with("corral; hit")),
        "the entry had {ttl_left} s of freshness left, yet after an uncacheable early \
         refresh: {statuses:?}"
    );
}

/// An upstream that is itself a cache (a CDN, a Varnish in front of the application):
/// its object was made at `born` and lives `max_age` s, so every answer says
/// `Age: <whole seconds since born>`; it answers after `delay`. Counts requests.
struct AgingUpstream {
    addr: SocketAddr,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl AgingUpstream {
    async fn start(max_age: u64, delay: Duration) -> AgingUpstream {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let born = std::time::Instant::now();
        let counter = std::sync::Arc::clone(&requests);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = std::sync::Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            counter.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            let age = born.elapsed().as_secs();
                            let res = format!(
                                "HTTP/1.1 200 OK\r\ncache-control: max-age={max_age}\r\n\
                                 age: {age}\r\ncontent-length: 2\r\n\r\nok"
                            );
                            if stream.write_all(res.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        AgingUpstream { addr, requests }
    }

    fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Behind an upstream cache (`Age` grows with its object), a refresh before the
/// object's expiry gets the same object back, expiring at about the same instant: it
/// is not refreshed again (an entry that arrived with an `Age` is not refreshed early),
/// so the key is fetched at most twice in the upstream object's lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_an_upstream_cache_a_lifetime_is_refreshed_at_most_once() {
    // The upstream object lives 6 s; fetches take 300 ms.
    let upstream = AgingUpstream::start(6, Duration::from_millis(300)).await;
    let front = Setup::default()
        .start_in_front_of(&format!("http://{}", upstream.addr))
        .await;
    let c = client();
    let first = get(&c, front.addr(), "/hot", &[]).await;
    assert!(
        first.cache_status().contains("stored"),
        "{}",
        first.cache_status()
    );

    // Hit until the entry is no longer fresh (the upstream object's lifetime ends).
    let deadline = tokio::time::Instant::now() + DEADLINE * 3;
    let mut fetched_while_fresh = 1;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the entry expires in time"
        );
        let before = upstream.requests();
        let reply = get(&c, front.addr(), "/hot", &[]).await;
        if hit_ttl(&reply).is_none() {
            break;
        }
        fetched_while_fresh = before.max(fetched_while_fresh);
    }
    assert!(
        fetched_while_fresh <= 2,
        "{fetched_while_fresh} fetches of one object lifetime (one miss, then early \
         refreshes that each returned an entry expiring when the last one did)"
    );
}

/// A client with credentials (any `Authorization` header) is served fresh hits, but
/// its hits never start an early refresh: the refresh would carry its header, and the
/// origin's answer to it could not be stored, leaving the entry due for the next of
/// its hits. At most one upstream request while the entry is fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_credentials_never_starts_an_early_refresh() {
    let h = Setup::origin(OriginBehaviour {
        delay: Duration::from_millis(100),
        cache_control: Some("max-age=3".into()),
        ..OriginBehaviour::default()
    })
    .start()
    .await;
    assert!(h.get("/hot").await.cache_status().contains("stored"));

    let c = client();
    let deadline = tokio::time::Instant::now() + DEADLINE * 2;
    let (mut hits, mut last_ttl, mut renewed) = (0, i64::MAX, false);
    let mut upstream_while_fresh = 1;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the entry expires in time"
        );
        let before = h.origin.requests_for("/hot");
        let reply = get(&c, h.addr(), "/hot", &[("authorization", "Bearer junk")]).await;
        let Some(ttl) = hit_ttl(&reply) else { break };
        hits += 1;
        renewed |= ttl > last_ttl;
        last_ttl = ttl;
        upstream_while_fresh = before.max(upstream_while_fresh);
    }
    let sent_auth = h
        .origin
        .last_request_headers("/hot")
        .and_then(|hd| hd.get("authorization").cloned());
    assert!(
        upstream_while_fresh <= 2,
        "{} upstream requests from {hits} hits of one client while the entry was fresh \
         (the last carried authorization: {sent_auth:?}); the entry was renewed: {renewed}",
        upstream_while_fresh - 1
    );
}

/// The same in a fleet: the entry another instance's refresh stored in Redis (read back
/// by every instance) is not refreshed early again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_an_upstream_cache_a_fleet_refreshes_a_lifetime_at_most_once() {
    let redis = RedisServer::start().await;
    let upstream = AgingUpstream::start(6, Duration::from_millis(300)).await;
    let front = Setup::default()
        .redis(&redis.url())
        .start_in_front_of(&format!("http://{}", upstream.addr))
        .await;
    let other = corral::start(&front.config).await.expect("corral starts");
    let addrs = [front.addr(), other.listen_addr()];
    let c = client();
    assert!(get(&c, addrs[0], "/hot", &[])
        .await
        .cache_status()
        .contains("stored"));
    // Both instances ready and holding the entry (the second from Redis).
    support::eventually("the second instance serves the entry", || {
        let c = c.clone();
        async move { hit_ttl(&get(&c, addrs[1], "/hot", &[]).await).map(|_| ()) }
    })
    .await;

    let deadline = tokio::time::Instant::now() + DEADLINE * 3;
    let upstream = &upstream;
    let clients = addrs.iter().map(|addr| async move {
        let c = client();
        let mut fetched_while_fresh = 1;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the entry expires in time"
            );
            let before = upstream.requests();
            let reply = get(&c, *addr, "/hot", &[]).await;
            if hit_ttl(&reply).is_none() {
                return fetched_while_fresh;
            }
            fetched_while_fresh = before.max(fetched_while_fresh);
        }
    });
    let fetched = futures_util::future::join_all(clients).await;
    let fetched = fetched.into_iter().max().unwrap();
    assert!(
        fetched <= 2,
        "the fleet fetched one upstream object lifetime {fetched} times"
    );
}
