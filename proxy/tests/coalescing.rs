//! Concurrent misses for one key collapse into one upstream request, and nothing a
//! leader or the upstream does can leave the waiters hanging.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{eventually, OriginBehaviour, Setup, DEADLINE};

fn slow(ms: u64) -> OriginBehaviour {
    OriginBehaviour {
        delay: Duration::from_millis(ms),
        ..OriginBehaviour::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_fetch_upstream_once() {
    let h = Setup::origin(slow(200)).start().await;
    let replies = h.herd("/herd", 500).await;

    assert_eq!(
        h.origin.requests_for("/herd"),
        1,
        "the upstream sees exactly one request"
    );
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert!(
        replies.iter().all(|r| r.body == replies[0].body),
        "every client gets the same body"
    );
    let collapsed = replies
        .iter()
        .filter(|r| r.cache_status().contains("collapsed"))
        .count();
    let hits = replies
        .iter()
        .filter(|r| r.cache_status().starts_with("corral; hit"))
        .count();
    assert_eq!(
        collapsed + hits,
        499,
        "all but the leader waited or hit: {:?}",
        replies.iter().map(|r| r.cache_status()).collect::<Vec<_>>()
    );
    assert_eq!(
        h.metric("corral_upstream_requests_total{route=\"t\",reason=\"fill\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_response_does_not_serialize_waiters() {
    let behaviour = OriginBehaviour {
        cache_control: Some("no-store".into()),
        ..slow(300)
    };
    let h = Setup::origin(behaviour).start().await;
    let replies = h.herd("/private", 20).await;

    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(
        h.origin.requests_for("/private"),
        20,
        "every client got its own response"
    );
    // The waiters learned at once that the response is uncacheable and went upstream
    // together, instead of one after another behind a lock.
    assert!(
        h.origin.max_in_flight() >= 2,
        "waiters went upstream concurrently"
    );
    assert!(replies
        .iter()
        .any(|r| r.cache_status().contains("detail=no-store")));

    // Hit-for-pass: later requests go straight upstream, without waiting on each other.
    let later = h.get("/private").await;
    assert_eq!(
        later.cache_status(),
        "corral; fwd=uri-miss; detail=hit-for-pass"
    );
    assert_eq!(h.origin.requests_for("/private"), 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_leader_does_not_strand_waiters() {
    let h = Setup::origin(slow(500)).start().await;
    let leader = {
        let client = support::client();
        let url = h.url("/leader");
        tokio::spawn(async move {
            client
                .request(http::Request::get(url).body(Default::default()).unwrap())
                .await
        })
    };
    assert_eq!(
        h.origin.wait_for_requests(1, DEADLINE).await,
        1,
        "the leader's fetch started"
    );

    let waiters = tokio::spawn({
        let url_path = "/leader";
        let h_addr = h.url(url_path);
        async move {
            let requests = (0..10).map(|_| {
                let client = support::client();
                let url = h_addr.clone();
                async move {
                    let res = client
                        .request(http::Request::get(url).body(Default::default()).unwrap())
                        .await
                        .unwrap();
                    let status = res.status();
                    let body = http_body_util::BodyExt::collect(res.into_body())
                        .await
                        .unwrap()
                        .to_bytes();
                    (status, body)
                }
            });
            futures_util::future::join_all(requests).await
        }
    });
    eventually("ten requests wait on the leader", || async {
        (h.metric("corral_coalesced_waiters_total{route=\"t\"}")
            .await
            == 10.0)
            .then_some(())
    })
    .await;
    leader.abort(); // the leading client disconnects mid-fetch

    let replies = tokio::time::timeout(DEADLINE, waiters)
        .await
        .expect("waiters answered")
        .unwrap();
    assert!(replies
        .iter()
        .all(|(s, b)| *s == StatusCode::OK && b.starts_with(b"/leader v1")));
    assert_eq!(
        h.origin.requests_for("/leader"),
        1,
        "the fetch finished for the waiters; nobody refetched"
    );
    assert!(
        h.get("/leader")
            .await
            .cache_status()
            .starts_with("corral; hit"),
        "and the entry was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_upstream_error_is_shared_not_refetched_per_waiter() {
    let behaviour = OriginBehaviour {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        cache_control: None,
        ..slow(300)
    };
    let h = Setup::origin(behaviour).start().await;
    let replies = h.herd("/broken", 50).await;

    assert!(replies
        .iter()
        .all(|r| r.status == StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(
        h.origin.requests_for("/broken"),
        1,
        "one request reached the failing upstream"
    );
    assert!(replies
        .iter()
        .any(|r| r.cache_status().contains("collapsed")));
    // Errors are not stored: the next request asks again.
    let _ = h.get("/broken").await;
    assert_eq!(h.origin.requests_for("/broken"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_fails_waiters_fast_with_502() {
    let h = Setup::default().start().await;
    h.origin.stop();
    let replies = h.herd("/down", 20).await;
    assert!(
        replies.iter().all(|r| r.status == StatusCode::BAD_GATEWAY),
        "{:?}",
        replies[0]
    );
    assert!(replies
        .iter()
        .all(|r| r.cache_status().contains("detail=upstream-connect")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_past_wait_timeout_fetches_by_itself() {
    let h = Setup::origin(slow(1500))
        .lock("wait_timeout = \"200ms\"")
        .start()
        .await;
    let replies = h.herd("/slow", 2).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(
        h.origin.requests_for("/slow"),
        2,
        "the waiter gave up and fetched itself"
    );
    assert!(
        replies
            .iter()
            .any(|r| r.cache_status().contains("detail=wait-timeout")),
        "{replies:?}"
    );
    assert_eq!(
        h.metric("corral_wait_timeouts_total{route=\"t\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_past_wait_timeout_can_be_told_to_fail() {
    let h = Setup::origin(slow(1500))
        .lock("wait_timeout = \"200ms\"\non_wait_timeout = \"error\"")
        .start()
        .await;
    let replies = h.herd("/slow", 2).await;
    let statuses: Vec<_> = replies.iter().map(|r| r.status).collect();
    assert!(
        statuses.contains(&StatusCode::OK) && statuses.contains(&StatusCode::GATEWAY_TIMEOUT),
        "{statuses:?}"
    );
    assert_eq!(
        h.origin.requests_for("/slow"),
        1,
        "the upstream was protected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesce_off_lets_the_herd_through_as_a_baseline() {
    let h = Setup::origin(slow(300))
        .route("coalesce = false")
        .start()
        .await;
    let replies = h.herd("/naive", 20).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(
        h.origin.requests_for("/naive"),
        20,
        "every concurrent miss went upstream"
    );
    assert!(
        h.get("/naive")
            .await
            .cache_status()
            .starts_with("corral; hit"),
        "but responses are still cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_waiting_on_a_failed_fill_gets_its_error_without_a_body() {
    let slow = OriginBehaviour {
        delay: Duration::from_secs(5),
        ..OriginBehaviour::default()
    };
    let h = Setup::origin(slow)
        .route("response_timeout = \"2s\"")
        .start()
        .await;
    let addr = h.addr();
    let leader = tokio::spawn(async move {
        support::raw::exchange(addr, b"GET /slow HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await
    });
    eventually("the leader's fetch reaches the origin", || async {
        (h.origin.requests_for("/slow") == 1).then_some(())
    })
    .await;
    let head =
        support::raw::exchange(addr, b"HEAD /slow HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await;
    let leader = leader.await.unwrap();
    assert_eq!(leader.status, 504, "{leader:?}");
    assert_eq!(head.status, 504, "{head:?}");
    assert!(head.cache_status().contains("collapsed"), "{head:?}");
    assert_eq!(head.header("content-length"), None, "{head:?}");
    assert_eq!(h.origin.requests_for("/slow"), 1);
}
