//! Early refresh (XFetch) end to end: a real origin that counts and timestamps what it
//! receives, one corral or a fleet of three on a real redis-server, clients over real
//! sockets hitting one hot key without a stale window.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use corral::origin::Origin;
use corral::RunningServer;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::redis::RedisServer;
use support::{client, metric_of, OriginBehaviour, Reply, Setup, DEADLINE};

/// The origin's fetch time: what the entries measure as `delta`.
const FETCH: Duration = Duration::from_millis(50);

/// A 3 s lifetime, no stale window: an expiry nobody refreshed makes clients wait.
fn hot_origin() -> OriginBehaviour {
    OriginBehaviour {
        delay: FETCH,
        cache_control: Some("max-age=3".into()),
        ..OriginBehaviour::default()
    }
}

/// Clients on keep-alive connections (`per_instance` to each address) asking for
/// `path` back to back until the origin has received `fetches` requests for it; every
/// reply, in no particular order.
async fn hammer(
    addrs: &[SocketAddr],
    per_instance: usize,
    origin: &Origin,
    path: &str,
    fetches: u64,
) -> Vec<Reply> {
    let deadline = tokio::time::Instant::now() + DEADLINE * 2;
    let clients = addrs
        .iter()
        .flat_map(|addr| std::iter::repeat_n(*addr, per_instance))
        .map(|addr| async move {
            let client = client();
            let mut replies = Vec::new();
            while origin.requests_for(path) < fetches {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the origin saw {} of {fetches} fetches in time",
                    origin.requests_for(path)
                );
                let req = Request::get(format!("http://{addr}{path}"))
                    .body(Full::<Bytes>::default())
                    .unwrap();
                let res = client.request(req).await.expect("request succeeds");
                replies.push(Reply::read(res).await);
            }
            replies
        });
    futures_util::future::join_all(clients)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Every reply a fresh hit: nobody waited on the upstream, nothing stale was served.
fn assert_all_fresh_hits(replies: &[Reply]) {
    assert!(!replies.is_empty());
    for reply in replies {
        assert_eq!(reply.status, StatusCode::OK);
        let status = reply.cache_status();
        assert!(
            status.starts_with("corral; hit; ttl=") && !status.contains("stale"),
            "a request was not a fresh hit: {status}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_entry_is_refreshed_before_it_expires_and_nobody_waits() {
    let h = Setup::origin(hot_origin())
        .route("early_refresh_beta = 2")
        .start()
        .await;
    assert_eq!(
        h.get("/hot").await.cache_status(),
        "corral; fwd=miss; fwd-status=200; stored"
    );

    // Three lifetimes' worth: the entry is replaced three times.
    let replies = hammer(&[h.addr()], 4, &h.origin, "/hot", 4).await;

    assert_all_fresh_hits(&replies);
    let started = replies
        .iter()
        .filter(|r| r.cache_status().ends_with("; detail=early-refresh"))
        .count();
    assert!(
        started >= 3,
        "the hits that started a refresh say so ({started})"
    );
    support::eventually("the third refresh is counted", || async {
        (h.metric("corral_upstream_requests_total{route=\"t\",reason=\"early-refresh\"}")
            .await
            >= 3.0)
            .then_some(())
    })
    .await;
    // One refresh per lifetime: each hit that started one is counted once, and
    // the origin saw no more fetches than those and the first.
    let early = h.metric("corral_early_refreshes_total{route=\"t\"}").await;
    assert_eq!(early as usize, started);
    support::eventually("every refresh started reaches the origin", || async {
        (h.origin.requests_for("/hot") == 1 + started as u64).then_some(())
    })
    .await;
    assert_eq!(
        h.origin.max_in_flight(),
        1,
        "one fetch of the key at a time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_early_refresh_an_expiry_makes_clients_wait() {
    let h = Setup::origin(hot_origin())
        .route("early_refresh = false")
        .start()
        .await;
    h.get("/hot").await;

    let replies = hammer(&[h.addr()], 4, &h.origin, "/hot", 2).await;

    assert!(
        replies
            .iter()
            .all(|r| !r.cache_status().contains("early-refresh")),
        "no hit starts a refresh"
    );
    let waited = replies
        .iter()
        .filter(|r| r.cache_status().contains("; fwd="))
        .count();
    let mut seen: Vec<&str> = replies.iter().map(|r| r.cache_status()).collect();
    seen.sort();
    seen.dedup();
    assert!(
        waited >= 1,
        "the expiry sent a request upstream, its client waiting: {seen:?}"
    );
    assert_eq!(
        h.metric("corral_early_refreshes_total{route=\"t\"}").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_refreshes_a_hot_key_once_per_lifetime() {
    let redis = RedisServer::start().await;
    let (h, others) = Setup::origin(hot_origin())
        .route("early_refresh_beta = 2")
        .redis(&redis.url())
        .start_fleet(3)
        .await;
    let servers: Vec<&RunningServer> = std::iter::once(&h.server).chain(others.iter()).collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.listen_addr()).collect();
    h.get("/hot").await;
    for server in &servers[1..] {
        // Every instance holds the entry (from Redis) before the load starts.
        support::Harness::get_from(server, "/hot").await;
    }

    let replies = hammer(&addrs, 2, &h.origin, "/hot", 4).await;

    assert_all_fresh_hits(&replies);
    // Each instance holds its own copy and draws on its own hits; the first due one
    // refreshes and the others adopt its entry from Redis. A second fetch of one
    // lifetime would follow the first within a few fetch times; the next legitimate
    // one comes when the new entry nears its expiry (2 s on at the earliest: with
    // beta 2, an entry more than 40 fetch times from expiry draws nothing).
    let arrivals = h.origin.arrivals_ms();
    assert_eq!(arrivals.len(), 4);
    for pair in arrivals.windows(2) {
        assert!(
            pair[1] - pair[0] >= 1000,
            "two fetches of one lifetime: arrivals {arrivals:?}"
        );
    }
    assert_eq!(h.origin.max_in_flight(), 1);
    let mut early = 0.0;
    for server in &servers {
        early += metric_of(
            server,
            "corral_upstream_requests_total{route=\"t\",reason=\"early-refresh\"}",
        )
        .await;
    }
    assert_eq!(
        early, 3.0,
        "every fetch after the first was an early refresh"
    );
}
