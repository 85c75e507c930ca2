//! Fleet mode: instances sharing one real `redis-server` share the cache and the fill
//! lock, so a herd spread across them reaches the upstream once.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use corral::cache::shared::{PutOutcome, SharedCache};
use corral::cache::CacheKey;
use corral::fill::lock::single::RedisLock;
use corral::fill::lock::{Lease, LockTry};
use corral::redis::Redis;
use corral::RunningServer;
use http::StatusCode;
use support::redis::RedisServer;
use support::{eventually, herd_over, Harness, OriginBehaviour, Setup, DEADLINE};

fn slow(ms: u64) -> OriginBehaviour {
    OriginBehaviour {
        delay: Duration::from_millis(ms),
        ..OriginBehaviour::default()
    }
}

fn caching(cache_control: &str) -> OriginBehaviour {
    OriginBehaviour {
        cache_control: Some(cache_control.into()),
        ..OriginBehaviour::default()
    }
}

fn all<'a>(h: &'a Harness, others: &'a [RunningServer]) -> Vec<&'a RunningServer> {
    std::iter::once(&h.server).chain(others.iter()).collect()
}

/// A client of the same Redis, outside any instance: a fake holder or a paused one.
async fn outsider(h: &Harness) -> (Arc<Redis>, RedisLock, SharedCache) {
    let fleet = support::fleet_client(&h.config).await;
    (
        Arc::clone(&fleet),
        RedisLock::new(Arc::clone(&fleet), h.config.lock.ttl),
        SharedCache::new(fleet, u64::from(u32::MAX)),
    )
}

/// One instance whose fleet lock lasts `ttl`, and the lock of `path` taken by another
/// instance that will never fill it (held while the returned lease and client live).
async fn with_orphaned_lock(
    redis: &RedisServer,
    ttl: &str,
    path: &str,
) -> (Harness, (Arc<Redis>, Lease)) {
    let h = Setup::default()
        .redis(&redis.url())
        .lock(&format!("ttl = \"{ttl}\""))
        .start()
        .await;
    let (fleet, lock, _) = outsider(&h).await;
    let LockTry::Acquired(lease) = lock.try_acquire(&key_of(&h, path)).await else {
        panic!("lock free")
    };
    (h, (fleet, lease))
}

/// The cache key corral derives for a plain GET of `path` on the test route.
fn key_of(h: &Harness, path: &str) -> CacheKey {
    support::key_for(&h.config, "127.0.0.1", path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_send_one_upstream_request_for_a_cold_herd() {
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(slow(300))
        .redis(&redis.url())
        .start_fleet(3)
        .await;
    let replies = herd_over(&all(&h, &others), "/cold", 300).await;

    assert_eq!(
        h.origin.requests_for("/cold"),
        1,
        "one upstream request fleet-wide"
    );
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert!(
        replies.iter().all(|r| r.body == replies[0].body),
        "all 300 got the same body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entry_means_no_waiting_and_one_refresh_fleet_wide() {
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(caching("max-age=1, stale-while-revalidate=60"))
        .route("early_refresh = false")
        .redis(&redis.url())
        .start_fleet(3)
        .await;
    let instances = all(&h, &others);
    herd_over(&instances, "/s", 3).await; // every instance has the entry
                                          // The refreshed response stays fresh past its 1.5 s trip (a max-age=1 one would
                                          // arrive stale and be refreshed again by the next request that sees it): the
                                          // instances still holding the stale copy find it at their next lock attempt.
    h.origin.set(|b| {
        b.version = 2;
        b.delay = Duration::from_millis(1500);
        b.cache_control = Some("max-age=60, stale-while-revalidate=60".into());
    });
    h.until(
        "staleness",
        || h.get("/s"),
        |r| r.cache_status().contains("stale-while-revalidate"),
    )
    .await;

    let replies = herd_over(&instances, "/s", 60).await;
    assert!(
        replies.iter().all(|r| r.text().starts_with("/s v1")),
        "everyone served the stale copy at once"
    );
    eventually("the refreshed copy", || async {
        (h.get("/s").await.text().starts_with("/s v2")).then_some(())
    })
    .await;
    assert_eq!(
        h.origin.requests_for("/s"),
        2,
        "exactly one background refresh across the fleet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_holder_is_taken_over_after_the_lock_ttl() {
    let redis = RedisServer::start().await;
    // An instance took the lock for /orphan and died before filling it.
    let (h, _holder) = with_orphaned_lock(&redis, "1s", "/orphan").await;

    let reply = h.get("/orphan").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(h.origin.requests_for("/orphan"), 1);
    assert_eq!(h.metric("corral_lock_takeovers_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_holder_cannot_overwrite_a_newer_entry() {
    let redis = RedisServer::start().await;
    let h = Setup::default()
        .redis(&redis.url())
        .lock("ttl = \"300ms\"")
        .start()
        .await;
    let (_fleet, lock, shared) = outsider(&h).await;
    let key = key_of(&h, "/fenced");
    let LockTry::Acquired(paused) = lock.try_acquire(&key).await else {
        panic!()
    };
    // The holder pauses past its lease; an instance takes over and stores v1.
    let reply = h.get("/fenced").await;
    assert!(reply.text().starts_with("/fenced v1"));
    let stored = shared
        .get(&key)
        .await
        .expect("the instance stored its entry");
    assert!(stored.fence() > paused.fence);

    // The paused holder wakes up and writes what it fetched: refused.
    h.origin.set(|b| b.version = 9);
    let stale_write = corral::cache::codec::decode(
        corral::cache::codec::encode(&stored, &key, 0),
        &key,
        u64::MAX,
    )
    .unwrap();
    assert_eq!(
        shared.put(&key, &stale_write, paused.fence).await,
        PutOutcome::Fenced
    );
    assert_eq!(
        shared.get(&key).await.unwrap().fence(),
        stored.fence(),
        "the newer entry stands"
    );
    assert_eq!(h.metric("corral_lock_takeovers_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_notification_still_ends_in_a_response_within_the_wait_bound() {
    let redis = RedisServer::start().await;
    let h = Setup::default()
        .redis(&redis.url())
        .lock("ttl = \"1s\"")
        .start()
        .await;
    let (_fleet, lock, shared) = outsider(&h).await;
    let key = key_of(&h, "/quiet");
    let LockTry::Acquired(lease) = lock.try_acquire(&key).await else {
        panic!()
    };

    let waiting = tokio::spawn(support::get_url(h.url("/quiet")));
    // The holder fills the key but its message is lost (it never publishes).
    let other = Setup::default().start().await;
    let filled = other.get("/quiet").await;
    let entry = other.server.proxy().cache().local().get(&support::key_for(
        &other.config,
        "127.0.0.1",
        "/quiet",
    ));
    let Some(corral::cache::LocalObject::Entry(entry)) = entry else {
        panic!("filled")
    };
    assert_eq!(
        shared.put(&key, &entry, lease.fence).await,
        PutOutcome::Stored
    );
    lock.release(lease).await;

    let reply = tokio::time::timeout(DEADLINE, waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        reply.body, filled.body,
        "the waiter found the entry by re-checking Redis"
    );
    assert_eq!(
        h.origin.requests_for("/quiet"),
        0,
        "and did not fetch it again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_redis_is_a_miss() {
    let redis = RedisServer::start().await;
    let h = Setup::default().redis(&redis.url()).start().await;
    let (_fleet, _, shared) = outsider(&h).await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("SET")
        .arg(shared.keys(&key_of(&h, "/g")).entry)
        .arg(&b"\x00not an entry"[..])
        .query_async::<()>(&mut conn)
        .await
        .expect("planted");
    let reply = h.get("/g").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.text().starts_with("/g v1"));
    assert_eq!(h.origin.requests_for("/g"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_no_request_and_fleet_mode_resumes() {
    let mut redis = RedisServer::start().await;
    let (h, others) = Setup::origin(slow(100))
        .redis(&redis.url())
        .start_fleet(2)
        .await;
    let instances = all(&h, &others);
    redis.kill();
    let replies = herd_over(&instances, "/outage", 100).await;
    assert!(
        replies.iter().all(|r| r.status == StatusCode::OK),
        "no request failed"
    );
    assert!(
        h.origin.requests_for("/outage") <= 2,
        "coalesced per instance meanwhile"
    );
    assert_eq!(h.metric("corral_redis_fallback").await, 1.0);

    redis.restart().await;
    for server in &instances {
        h.wait_for_fleet(server).await;
    }
    assert_eq!(
        h.metric("corral_redis_fallback").await,
        0.0,
        "fleet mode resumed by itself"
    );
    assert_eq!(h.get("/after").await.status, StatusCode::OK);
    // Back in the fleet: what one instance stores, the other reads from Redis.
    let second = Harness::get_from(&others[0], "/after").await;
    assert!(
        second.cache_status().starts_with("corral; hit"),
        "{}",
        second.cache_status()
    );
    assert_eq!(h.origin.requests_for("/after"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_key_reaches_every_instance() {
    let redis = RedisServer::start().await;
    let behaviour = OriginBehaviour {
        headers: vec![("vary".into(), "accept-language".into())],
        ..OriginBehaviour::default()
    };
    let (h, others) = Setup::origin(behaviour)
        .redis(&redis.url())
        .start_fleet(3)
        .await;
    let instances = all(&h, &others);
    herd_over(&instances, "/p", 3).await;
    assert!(Harness::get_from(&others[1], "/p")
        .await
        .cache_status()
        .starts_with("corral; hit"));
    h.origin.set(|b| b.version = 2);

    let purged = h
        .admin_post(Some(&others[0]), "/purge?route=t&host=127.0.0.1&path=/p")
        .await;
    assert_eq!(purged.status, StatusCode::OK, "{}", purged.text());
    for server in &instances {
        eventually("the purge reaches the instance", || async {
            Harness::get_from(server, "/p")
                .await
                .text()
                .starts_with("/p v2")
                .then_some(())
        })
        .await;
    }
    assert_eq!(
        h.origin.requests_for("/p"),
        2,
        "one refill fleet-wide after the purge"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_marks_stale_everywhere_instead_of_stampeding() {
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(caching("max-age=600, stale-while-revalidate=600"))
        .redis(&redis.url())
        .start_fleet(3)
        .await;
    let instances = all(&h, &others);
    herd_over(&instances, "/soft", 3).await;
    h.origin.set(|b| {
        b.version = 2;
        b.delay = Duration::from_millis(500);
    });

    let purged = h
        .admin_post(None, "/purge?route=t&host=127.0.0.1&path=/soft&soft=true")
        .await;
    assert_eq!(purged.status, StatusCode::OK);
    // Every instance now serves the stale copy at once (no waiting, no herd) while one
    // refresh runs, then the new one.
    let replies = herd_over(&instances, "/soft", 30).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    for server in &instances {
        eventually("the refreshed copy", || async {
            Harness::get_from(server, "/soft")
                .await
                .text()
                .starts_with("/soft v2")
                .then_some(())
        })
        .await;
    }
    assert_eq!(h.origin.requests_for("/soft"), 2, "one refresh fleet-wide");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_tag_reaches_tagged_entries_only() {
    let redis = RedisServer::start().await;
    let behaviour = OriginBehaviour {
        headers: vec![("surrogate-key".into(), "product-7 catalog".into())],
        ..OriginBehaviour::default()
    };
    let (h, others) = Setup::origin(behaviour)
        .redis(&redis.url())
        .route("tag_header = \"surrogate-key\"")
        .start_fleet(2)
        .await;
    h.get("/a").await;
    h.get("/b").await;
    h.origin.set(|b| b.headers.clear());
    h.get("/untagged").await;
    h.origin.set(|b| b.version = 2);

    let purged = h.admin_post(Some(&others[0]), "/purge?tag=product-7").await;
    assert_eq!(purged.text(), "purged tag=product-7 local=0 shared=2\n");
    for path in ["/a", "/b"] {
        eventually("the tagged entry is gone", || async {
            Harness::get_from(&others[0], path)
                .await
                .text()
                .contains(" v2")
                .then_some(())
        })
        .await;
    }
    assert!(
        Harness::get_from(&others[0], "/untagged")
            .await
            .text()
            .contains(" v1"),
        "untagged entries stay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_answer_reaches_other_instances_without_serializing_them() {
    let redis = RedisServer::start().await;
    let behaviour = OriginBehaviour {
        cache_control: Some("private".into()),
        ..slow(300)
    };
    let (h, others) = Setup::origin(behaviour)
        .redis(&redis.url())
        .start_fleet(3)
        .await;
    let replies = herd_over(&all(&h, &others), "/mine", 30).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(
        h.origin.requests_for("/mine"),
        30,
        "nobody was handed another client's private response"
    );
    assert!(
        h.origin.max_in_flight() >= 2,
        "the other instances went upstream together, not one by one"
    );
    for server in std::iter::once(&h.server).chain(&others) {
        assert_eq!(
            Harness::get_from(server, "/mine").await.cache_status(),
            "corral; fwd=uri-miss; detail=hit-for-pass"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_in_the_redis_url_is_used() {
    let redis = RedisServer::with_password("s3cret").await;
    let (h, others) = Setup::origin(slow(200))
        .redis(&redis.url())
        .start_fleet(2)
        .await;
    let replies = herd_over(&all(&h, &others), "/auth", 20).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(
        h.origin.requests_for("/auth"),
        1,
        "the instances coordinated through the password-protected Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_another_instance_after_a_failed_fleet_fill_gets_its_error_without_a_body() {
    let redis = RedisServer::start().await;
    let failing = OriginBehaviour {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        delay: Duration::from_secs(2),
        ..OriginBehaviour::default()
    };
    let (h, others) = Setup::origin(failing)
        .redis(&redis.url())
        .start_fleet(2)
        .await;
    let a = h.addr();
    let first = tokio::spawn(async move {
        support::raw::exchange(a, b"GET /remote HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await
    });
    eventually("instance A's fetch reaches the origin", || async {
        (h.origin.requests_for("/remote") == 1).then_some(())
    })
    .await;
    let head = support::raw::exchange(
        others[0].listen_addr(),
        b"HEAD /remote HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
    )
    .await;
    let first = first.await.unwrap();
    assert_eq!(first.status, 500, "{first:?}");
    assert_eq!(head.status, 502, "{head:?}");
    assert!(head.cache_status().contains("collapsed"), "{head:?}");
    assert_eq!(head.header("content-length"), None, "{head:?}");
    assert_eq!(h.origin.requests(), 1, "one upstream request fleet-wide");
}

/// The commands `redis` runs, from a `MONITOR` connection, until the `ECHO` of a
/// sentinel sent by the test itself shows up.
struct Monitor {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
}

impl Monitor {
    async fn start(redis: &RedisServer) -> Monitor {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(redis.addr()).await.unwrap();
        stream.write_all(b"MONITOR\r\n").await.unwrap();
        let mut lines = tokio::io::BufReader::new(stream).lines();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));
        Monitor { lines }
    }

    /// Every command seen until `sentinel` (echoed by `conn`), in order; those scripts
    /// ran are marked `[0 lua]`.
    async fn until(
        &mut self,
        conn: &mut redis::aio::MultiplexedConnection,
        sentinel: &str,
    ) -> Vec<String> {
        let _: String = redis::cmd("ECHO")
            .arg(sentinel)
            .query_async(conn)
            .await
            .unwrap();
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .expect("the sentinel shows up in MONITOR")
                .unwrap()
                .expect("MONITOR stays open");
            if line.contains("\"ECHO\"") && line.contains(sentinel) {
                return seen;
            }
            seen.push(line);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncontended_miss_costs_at_most_three_redis_round_trips() {
    let redis = RedisServer::start().await;
    let h = Setup::default().redis(&redis.url()).start().await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut monitor = Monitor::start(&redis).await;
    // The first fill loads the scripts; the one measured runs them by hash.
    assert_eq!(h.get("/warm").await.status, StatusCode::OK);
    monitor.until(&mut conn, "warm").await;

    let reply = h.get("/cold").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.cache_status().contains("stored"),
        "{}",
        reply.cache_status()
    );
    let commands: Vec<String> = monitor
        .until(&mut conn, "after-miss")
        .await
        .into_iter()
        .filter(|line| !line.contains("[0 lua]"))
        .collect();
    assert!(
        commands.len() <= 3,
        "one GET, one script to lock, one to write, tell and unlock: {commands:#?}"
    );
    // And the fill was whole: stored, told, unlocked.
    let key = key_of(&h, "/cold");
    let keys = h.server.proxy().cache().shared().unwrap().keys(&key);
    let entry: Option<Vec<u8>> = redis::cmd("GET")
        .arg(&keys.entry)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(entry.is_some(), "the entry is in Redis");
    let lock: Option<String> = redis::cmd("GET")
        .arg(&keys.lock)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(lock, None, "the lock is free");
    assert!(
        commands.iter().any(|c| c.contains("EVALSHA")),
        "{commands:#?}"
    );
    assert_eq!(h.origin.requests_for("/cold"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_attempt_finds_a_fresh_entry_stored_since_the_lookup_and_leaves_the_lock() {
    let redis = RedisServer::start().await;
    let h = Setup::default().redis(&redis.url()).start().await;
    let (_fleet, lock, shared) = outsider(&h).await;
    let key = key_of(&h, "/landed");
    assert!(
        matches!(
            lock.try_acquire_unless_filled(&key, (SystemTime::now(), UNIX_EPOCH))
                .await,
            LockTry::Acquired(_)
        ),
        "nothing stored: the attempt takes the lock"
    );
    // Another fill's entry lands under a key (fresh for the origin's hour).
    assert_eq!(h.get("/landed-source").await.status, StatusCode::OK);
    let source = key_of(&h, "/landed-source");
    let stored = shared
        .get(&source)
        .await
        .expect("the source entry is in Redis");
    let key = key_of(&h, "/fresh");
    assert_eq!(
        shared.put(&key, &stored, 0).await,
        PutOutcome::Stored,
        "written under a key never locked"
    );
    assert!(
        matches!(
            lock.try_acquire_unless_filled(&key, (SystemTime::now(), UNIX_EPOCH))
                .await,
            LockTry::Filled
        ),
        "a fresh entry there: the attempt says so and takes no lock"
    );
    // An early refresh asks for an entry fetched after the copy it replaces: the same
    // entry is not, one received later is.
    let copy_received = stored.received_at() - Duration::from_millis(1);
    assert!(
        matches!(
            lock.try_acquire_unless_filled(&key, (SystemTime::now(), copy_received))
                .await,
            LockTry::Filled
        ),
        "an entry fetched after the caller's copy: adopted"
    );
    let keys = shared.keys(&key);
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let held: Option<String> = redis::cmd("GET")
        .arg(&keys.lock)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(held, None, "the lock was left alone");
    assert!(
        matches!(
            lock.try_acquire_unless_filled(&key, (SystemTime::now(), stored.received_at()))
                .await,
            LockTry::Acquired(_)
        ),
        "the caller's own copy is what Redis holds: the refresh takes the lock"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fill_event_goes_out_only_after_the_purge_tags_are_written() {
    let redis = RedisServer::start().await;
    let tagged = OriginBehaviour {
        headers: vec![("surrogate-key".into(), "product-7".into())],
        ..OriginBehaviour::default()
    };
    let h = Setup::origin(tagged)
        .redis(&redis.url())
        .route("tag_header = \"surrogate-key\"")
        .start()
        .await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut monitor = Monitor::start(&redis).await;
    monitor.until(&mut conn, "start").await;
    assert_eq!(h.get("/tagged").await.status, StatusCode::OK);
    let seen = monitor.until(&mut conn, "after-fill").await;
    let position = |what: &dyn Fn(&str) -> bool| seen.iter().position(|l| what(l));
    let published = position(&|l| l.contains("\"PUBLISH\""))
        .unwrap_or_else(|| panic!("the fill was published: {seen:#?}"));
    let tagged = position(&|l| l.contains("\"SADD\"") && l.contains("tag:product-7"))
        .unwrap_or_else(|| panic!("the tag was written: {seen:#?}"));
    assert!(
        tagged < published,
        "a client woken to the entry can purge it by its tag: {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_does_not_know_a_response_varies_fetches_its_own_variant() {
    let redis = RedisServer::start().await;
    let varying = OriginBehaviour {
        headers: vec![("vary".into(), "accept-language".into())],
        ..OriginBehaviour::default()
    };
    let (h, others) = Setup::origin(varying)
        .redis(&redis.url())
        .start_fleet(2)
        .await;
    let en = Harness::get_with_from(&h.server, "/v", &[("accept-language", "en")]).await;
    assert_eq!(en.status, StatusCode::OK);
    assert_eq!(h.origin.requests_for("/v"), 1);
    // The other instance never saw /v: it looks under the primary key, where Redis
    // holds the en variant.
    let fr = Harness::get_with_from(&others[0], "/v", &[("accept-language", "fr")]).await;
    assert_eq!(fr.status, StatusCode::OK);
    assert_eq!(
        h.origin.requests_for("/v"),
        2,
        "the fr variant was fetched, not served from the en entry (cache-status: {})",
        fr.cache_status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_events_reach_only_the_instances_that_wait() {
    const EVENTS: &str = "corral_fleet_events_received_total";
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(slow(500))
        .redis(&redis.url())
        .start_fleet(3)
        .await;
    // Uncontended fills: no other instance hears of them.
    for i in 0..5 {
        assert_eq!(h.get(&format!("/alone{i}")).await.status, StatusCode::OK);
    }
    for server in &others {
        assert_eq!(support::metric_of(server, EVENTS).await, 0.0);
    }
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let channels = |mut c: redis::aio::MultiplexedConnection| async move {
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .query_async(&mut c)
            .await
            .unwrap();
        channels
    };
    assert_eq!(
        channels(conn.clone()).await,
        ["corral:events"],
        "only the purge channel"
    );
    // One instance waits on another's fill: it alone is told.
    let leader = tokio::spawn(support::get_url(h.url("/awaited")));
    eventually("the fill reached the origin", || async {
        (h.origin.requests_for("/awaited") == 1).then_some(())
    })
    .await;
    let waited = Harness::get_from(&others[0], "/awaited").await;
    assert_eq!(waited.status, StatusCode::OK);
    assert_eq!(leader.await.unwrap().status, StatusCode::OK);
    assert_eq!(h.origin.requests_for("/awaited"), 1);
    assert_eq!(support::metric_of(&others[0], EVENTS).await, 1.0);
    assert_eq!(support::metric_of(&others[1], EVENTS).await, 0.0);
    assert_eq!(support::metric_of(&h.server, EVENTS).await, 0.0);
    // The waiter's channel is dropped once idle.
    assert_eq!(channels(conn.clone()).await.len(), 2);
    eventually("the idle channel is unsubscribed", || {
        let conn = conn.clone();
        async move { (channels(conn).await.len() == 1).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_woken_by_an_event_that_ends_nothing_waits_again_instead_of_spinning() {
    let redis = RedisServer::start().await;
    // Another instance holds /held's lock (and will never fill it).
    let (h, _holder) = with_orphaned_lock(&redis, "2s", "/held").await;
    let waiting = tokio::spawn(support::get_url(h.url("/held")));
    eventually("the request waits on the holder", || async {
        (h.metric("corral_lock_contended_total").await >= 1.0).then_some(())
    })
    .await;
    // A purge of the key wakes the waiter; it looks again, finds the lock still held,
    // and must wait for the next event or its bound, not loop on the old event.
    let purge = "/purge?route=t&host=127.0.0.1&path=/held";
    assert_eq!(h.admin_post(None, purge).await.status, StatusCode::OK);
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "taken over after the TTL");
    let attempts = h.metric("corral_lock_contended_total").await;
    assert!(attempts <= 6.0, "{attempts} lock attempts found it held");
}

/// After a Redis restart every instance listens for purges again (and says so in
/// `/readyz` only then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_are_heard_again_after_a_redis_restart() {
    let mut redis = RedisServer::start().await;
    let (h, others) = Setup::origin(caching("max-age=60"))
        .redis(&redis.url())
        .start_fleet(2)
        .await;
    let entry = shared_entry_name(&h, "/rr");
    let purge_channel = format!("{}events", &entry[..entry.find('{').expect("hash tag")]);
    let port = redis.addr().port();
    let numsub = |channel: String| async move {
        let reply = corral_testkit::resp::command(port, &["PUBSUB", "NUMSUB", &channel]).await;
        match reply.map(|r| r.into_array()).unwrap_or_default().get(1) {
            Some(corral_testkit::resp::Reply::Int(n)) => *n,
            _ => -1,
        }
    };
    assert_eq!(numsub(purge_channel.clone()).await, 2);
    redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart().await;
    for server in all(&h, &others) {
        h.wait_for_fleet(server).await;
    }
    eventually("both instances listen for purges again", || {
        let c = purge_channel.clone();
        async move { (numsub(c).await == 2).then_some(()) }
    })
    .await;
    // A purge on one instance reaches the other's local copy.
    assert!(Harness::get_from(&others[0], "/rr")
        .await
        .text()
        .starts_with("/rr v1"));
    assert!(Harness::get_from(&others[0], "/rr")
        .await
        .cache_status()
        .contains("hit"));
    h.origin.set(|b| b.version = 2);
    eventually("a purge goes through", || async {
        let purged = h
            .admin_post(None, "/purge?route=t&host=127.0.0.1&path=/rr")
            .await;
        (purged.status == StatusCode::OK).then_some(())
    })
    .await;
    eventually("the purge reaches the other instance", || async {
        Harness::get_from(&others[0], "/rr")
            .await
            .text()
            .starts_with("/rr v2")
            .then_some(())
    })
    .await;
}

fn shared_entry_name(h: &Harness, path: &str) -> String {
    h.server
        .proxy()
        .cache()
        .shared()
        .expect("fleet mode")
        .keys(&key_of(h, path))
        .entry
}

/// An entry keeps how long its fetch took (what early refresh weighs its odds by), on
/// the instance that filled it and on one that read it from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_keeps_its_fetch_time_through_redis() {
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(slow(300))
        .redis(&redis.url())
        .start_fleet(2)
        .await;
    assert_eq!(h.get("/timed").await.status, StatusCode::OK);
    let reader = &others[0];
    assert_eq!(
        Harness::get_from(reader, "/timed").await.status,
        StatusCode::OK
    );
    assert_eq!(h.origin.requests_for("/timed"), 1, "the second read Redis");
    for server in [&h.server, reader] {
        let local = server.proxy().cache().local().get(&key_of(&h, "/timed"));
        let Some(corral::cache::LocalObject::Entry(entry)) = local else {
            panic!("stored")
        };
        let took = entry.fetch_time();
        assert!(
            took >= Duration::from_millis(300) && took < DEADLINE,
            "fetch time {took:?}"
        );
    }
}
