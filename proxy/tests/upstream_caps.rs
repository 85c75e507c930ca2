//! Upstream concurrency caps end to end: a real origin that reports the most requests
//! it had in progress at once, one corral or a fleet on a real redis-server, distinct
//! cold keys requested all at once over real sockets.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::redis::{redis_command, redis_time_ms, RedisServer};
use support::{cold_keys, slow, OriginBehaviour, Reply, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_of_n_is_never_exceeded_and_every_queued_request_is_served() {
    let h = Setup::origin(slow(150))
        .route("upstream_concurrency = 4")
        .start()
        .await;

    let replies = cold_keys(&[&h.server], "k", 40).await;

    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(h.origin.requests(), 40, "every key fetched once");
    assert_eq!(
        h.origin.max_in_flight(),
        4,
        "the cap is used and never exceeded"
    );
    assert_eq!(
        h.metric("corral_upstream_in_flight{route=\"t\"}").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cap_every_cold_key_goes_upstream_at_once() {
    let h = Setup::origin(slow(300)).start().await;

    let replies = cold_keys(&[&h.server], "k", 20).await;

    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(h.origin.max_in_flight(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_queue_bound_requests_are_refused_at_once_with_retry_after() {
    let h = Setup::origin(slow(500))
        .route("upstream_concurrency = 1\nupstream_queue = 1")
        .start()
        .await;

    let replies = cold_keys(&[&h.server], "k", 5).await;

    let served = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    let refused: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert_eq!((served, refused.len()), (2, 3), "one in flight, one queued");
    for reply in refused {
        assert_eq!(reply.headers["retry-after"], "1");
        assert_eq!(
            reply.cache_status(),
            "corral; fwd=miss; detail=upstream-queue-full"
        );
    }
    assert_eq!(h.origin.requests(), 2, "refused requests are never sent");
    assert_eq!(
        h.metric("corral_upstream_shed_total{route=\"t\",reason=\"queue-full\"}")
            .await,
        3.0
    );
    // Refusals are the cap's, not the upstream's failures.
    assert_eq!(
        h.metric("corral_upstream_errors_total{route=\"t\",kind=\"connect\"}")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_timeout_serves_the_stale_copy_where_allowed_and_503_otherwise() {
    let h = Setup::origin(OriginBehaviour {
        cache_control: Some("max-age=0, stale-if-error=60".into()),
        ..slow(0)
    })
    .route("upstream_concurrency = 1\nupstream_queue_timeout = \"150ms\"")
    .start()
    .await;
    assert_eq!(h.get("/s").await.status, StatusCode::OK); // stored, stale at once
    h.origin.set(|b| b.delay = Duration::from_millis(800));

    // The slot is taken by a slow cold key; the stale entry's revalidation and another
    // cold key wait behind it and run out of time.
    let (busy, stale, cold) = tokio::join!(
        h.get("/busy"),
        async {
            support::eventually("the slow request is at the origin", || async {
                (h.origin.requests_for("/busy") == 1).then_some(())
            })
            .await;
            h.get("/s").await
        },
        async {
            support::eventually("the slow request is at the origin", || async {
                (h.origin.requests_for("/busy") == 1).then_some(())
            })
            .await;
            h.get("/cold").await
        }
    );

    assert_eq!(busy.status, StatusCode::OK);
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(
        stale.cache_status(),
        "corral; fwd=stale; detail=stale-if-error"
    );
    assert_eq!(cold.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        cold.cache_status(),
        "corral; fwd=miss; detail=upstream-queue-timeout"
    );
    assert_eq!(h.origin.requests_for("/cold"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entrys_refresh_goes_before_new_keys_in_the_queue() {
    let h = Setup::origin(OriginBehaviour {
        cache_control: Some("max-age=0, stale-if-error=60".into()),
        ..slow(0)
    })
    .route("upstream_concurrency = 1")
    .start()
    .await;
    h.get("/s").await; // stored, stale at once
    h.origin.set(|b| b.delay = Duration::from_millis(300));

    // While /busy holds the slot, a new key queues first, then the stale entry's
    // revalidation; the revalidation is sent first all the same.
    let at_origin = |path: &'static str, n: u64| {
        let origin = &h.origin;
        async move {
            support::eventually("a request reached the origin", || async {
                (origin.requests_for(path) >= n).then_some(())
            })
            .await
        }
    };
    let new_queued = async {
        at_origin("/busy", 1).await;
        h.get("/new").await
    };
    let stale_queued = async {
        at_origin("/busy", 1).await;
        support::eventually("the new key waits in the queue", || async {
            let queued = h.metric("corral_upstream_queued{route=\"t\"}").await;
            (queued >= 1.0).then_some(())
        })
        .await;
        h.get("/s").await
    };
    let order = async {
        at_origin("/s", 2).await;
        h.origin.requests_for("/new")
    };
    let (_, new, stale, new_when_stale_sent) =
        tokio::join!(h.get("/busy"), new_queued, stale_queued, order);

    assert_eq!(new_when_stale_sent, 0, "the refresh went first");
    assert_eq!(new.status, StatusCode::OK);
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(h.origin.max_in_flight(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_cap_holds_across_instances() {
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(slow(150))
        .redis(&redis.url())
        .route("fleet_upstream_concurrency = 3")
        .start_fleet(3)
        .await;
    let servers: Vec<&corral::RunningServer> =
        std::iter::once(&h.server).chain(others.iter()).collect();

    let replies = cold_keys(&servers, "k", 36).await;

    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(h.origin.requests(), 36);
    assert_eq!(
        h.origin.max_in_flight(),
        3,
        "three instances, three in flight at most"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_left_by_a_dead_instance_hold_their_places_until_they_lapse() {
    let redis = RedisServer::start().await;
    let h = Setup::origin(slow(100))
        .redis(&redis.url())
        .lock("ttl = \"2s\"")
        .route("fleet_upstream_concurrency = 3")
        .start()
        .await;
    // An instance that died holding two leases left them in Redis, each lapsing with
    // the lock TTL from its last renewal (on Redis's clock).
    let leases = format!("{}{{cap:t}}:leases", "corral:");
    let now_ms = redis_time_ms(&redis).await;
    for token in ["dead:1", "dead:2"] {
        redis_command(
            &redis,
            &["ZADD", &leases, &(now_ms + 2000).to_string(), token],
        )
        .await;
    }

    let replies = cold_keys(&[&h.server], "k", 6).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(
        h.origin.max_in_flight(),
        1,
        "the dead instance's places stay taken"
    );

    // Once they lapse, the whole cap is this instance's.
    support::eventually("the dead leases lapse", || async {
        let left = redis_command(&redis, &["ZSCORE", &leases, "dead:1"]).await;
        left.is_none().then_some(())
    })
    .await;
    let replies = cold_keys(&[&h.server], "after", 9).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(h.origin.max_in_flight(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_each_instance_keeps_to_its_own_cap() {
    let mut redis = RedisServer::start().await;
    let h = Setup::origin(slow(150))
        .redis(&redis.url())
        .route("fleet_upstream_concurrency = 6\nupstream_concurrency = 2")
        .start()
        .await;
    redis.kill();

    let replies = cold_keys(&[&h.server], "k", 10).await;

    assert!(
        replies.iter().all(|r| r.status == StatusCode::OK),
        "no request fails for Redis"
    );
    assert_eq!(h.origin.max_in_flight(), 2);
    assert!(
        h.metric("corral_upstream_unleased_total{route=\"t\"}")
            .await
            >= 10.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_holding_leases_keeps_the_fleet_under_its_cap() {
    let redis = RedisServer::start().await;
    let h = Setup::origin(slow(1500))
        .redis(&redis.url())
        .lock("ttl = \"2s\"")
        .route("fleet_upstream_concurrency = 3")
        .start()
        .await;
    // A second instance on a runtime of its own, so that it can die at once: its tasks
    // stop where they are, nothing is released in Redis.
    let doomed = tokio::runtime::Runtime::new().unwrap();
    let config = h.config.clone();
    let addr = doomed
        .spawn(async move {
            let server = corral::start(&config).await.expect("corral starts");
            let fleet = std::sync::Arc::clone(server.proxy().redis().expect("fleet mode"));
            support::eventually("the instance joins the fleet", || {
                let ready = fleet.ready();
                async move { ready.then_some(()) }
            })
            .await;
            let addr = server.listen_addr();
            std::mem::forget(server);
            addr
        })
        .await
        .unwrap();
    for i in 0..3 {
        // Never answered (the instance dies first): the requests just need to be sent.
        drop(tokio::spawn(async move {
            let url: http::Uri = format!("http://{addr}/doomed/{i}").parse().unwrap();
            let req = http::Request::get(url)
                .body(http_body_util::Full::default())
                .unwrap();
            let _ = support::client().request(req).await;
        }));
    }
    support::eventually(
        "the doomed instance's requests are at the origin",
        || async { (h.origin.requests() == 3).then_some(()) },
    )
    .await;
    doomed.shutdown_background();

    // Its three leases stay in Redis until they lapse (the lock TTL after their last
    // renewal): the survivor's requests wait for those places, then have the cap.
    let leases = "corral:{cap:t}:leases";
    assert_eq!(
        redis_command(&redis, &["ZCARD", leases]).await.as_deref(),
        Some("3")
    );
    let only = [&h.server];
    let survivor = cold_keys(&only, "after", 6);
    let watch = async {
        support::eventually("the survivor's requests wait", || async {
            (h.metric("corral_upstream_queued{route=\"t\"}").await >= 1.0).then_some(())
        })
        .await;
        let sent = h.origin.requests();
        let dead = redis_command(&redis, &["ZCARD", leases]).await;
        (sent, dead)
    };
    let (replies, (sent_while_waiting, dead_leases)) = tokio::join!(survivor, watch);

    assert_eq!(
        (sent_while_waiting, dead_leases.as_deref()),
        (3, Some("3")),
        "nothing sent while the dead instance's leases held the cap"
    );
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(h.origin.requests(), 9);
    assert!(h.origin.max_in_flight() <= 3);
}
