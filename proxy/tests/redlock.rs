//! Redlock over five real `redis-server` processes: grants never overlap, the lock
//! survives two dead nodes, and without a quorum requests are still answered.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral::cache::shared::{PutOutcome, SharedCache};
use corral::cache::CacheKey;
use corral::config::Config;
use corral::fill::lock::redlock::Redlock;
use corral::fill::lock::LockTry;
use http::StatusCode;
use support::redis::RedisServer;
use support::{eventually, herd_over, Harness, OriginBehaviour, Setup, DEADLINE};

struct Cluster {
    cache: RedisServer,
    nodes: Vec<RedisServer>,
}

impl Cluster {
    async fn start() -> Cluster {
        let cache = RedisServer::start().await;
        let mut nodes = Vec::new();
        for _ in 0..5 {
            nodes.push(RedisServer::start().await);
        }
        Cluster { cache, nodes }
    }

    fn lock_lines(&self, ttl: &str) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{:?}", n.url()))
            .collect();
        format!("mode = \"redlock\"\nnodes = [{}]\nttl = \"{ttl}\"\nnode_timeout = \"50ms\"\nretries = 3\nretry_delay = \"30ms\"", nodes.join(", "))
    }

    fn config(&self, ttl: &str) -> Config {
        let text = format!(
            "listen = \"127.0.0.1:0\"\n[redis]\nurl = {:?}\n[lock]\n{}\n[[route]]\nname = \"t\"\nupstream = \"http://127.0.0.1:1\"\n",
            self.cache.url(),
            self.lock_lines(ttl)
        );
        Config::parse(&text, "redlock.toml").unwrap()
    }

    /// A Redlock client of its own, as one instance of the fleet would have.
    async fn client(&self, ttl: &str) -> (Redlock, SharedCache) {
        let config = self.config(ttl);
        let fleet = support::fleet_client(&config).await;
        let lock = Redlock::new(Arc::clone(&fleet), &config.lock);
        // Nodes connect lazily; the first attempts may find them still connecting.
        let probe = key("/warmup");
        eventually("lock nodes connected", || async {
            match lock.try_acquire(&probe).await {
                LockTry::Acquired(lease) => {
                    lock.release(lease).await;
                    Some(())
                }
                _ => None,
            }
        })
        .await;
        (lock, SharedCache::new(fleet, u64::from(u32::MAX)))
    }
}

fn key(path: &str) -> CacheKey {
    let config = Config::parse(
        "listen = \"127.0.0.1:1\"\n[[route]]\nname = \"t\"\nupstream = \"http://u\"\n",
        "t",
    )
    .unwrap();
    support::key_for(&config, "127.0.0.1", path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contending_grants_never_overlap() {
    let cluster = Cluster::start().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Arc::new(cluster.client("1s").await.0));
    }
    let windows = Arc::new(Mutex::new(Vec::new()));
    let contended = key("/contended");
    let mut tasks = Vec::new();
    for (i, lock) in clients.iter().enumerate() {
        for _ in 0..3 {
            let (lock, windows, contended) =
                (Arc::clone(lock), Arc::clone(&windows), contended.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..15 {
                    if let LockTry::Acquired(lease) = lock.try_acquire(&contended).await {
                        let held_from = Instant::now();
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        let held_until = Instant::now().min(lease.deadline);
                        windows
                            .lock()
                            .unwrap()
                            .push((held_from, held_until, i, lease.fence));
                        lock.release(lease).await;
                    }
                }
            }));
        }
    }
    for task in tasks {
        tokio::time::timeout(DEADLINE * 3, task)
            .await
            .expect("contention ends")
            .unwrap();
    }
    let mut windows = windows.lock().unwrap().clone();
    assert!(windows.len() >= 10, "only {} grants", windows.len());
    windows.sort_by_key(|w| w.0);
    for pair in windows.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "grants overlap: {:?} and {:?}",
            pair[0],
            pair[1]
        );
        assert!(
            pair[0].3 < pair[1].3,
            "fencing tokens increase with each grant"
        );
    }
}

async fn fleet_with_redlock(
    cluster: &Cluster,
    instances: usize,
) -> (Harness, Vec<corral::RunningServer>) {
    let slow = OriginBehaviour {
        delay: Duration::from_millis(300),
        ..OriginBehaviour::default()
    };
    Setup::origin(slow)
        .redis(&cluster.cache.url())
        .lock(&cluster.lock_lines("2s"))
        .start_fleet(instances)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dead_nodes_still_grant_and_the_herd_reaches_upstream_once() {
    let mut cluster = Cluster::start().await;
    let (h, others) = fleet_with_redlock(&cluster, 3).await;
    // Warm the lock nodes' connections, then lose two of five.
    assert_eq!(h.get("/warm").await.status, StatusCode::OK);
    cluster.nodes[0].kill();
    cluster.nodes[3].kill();
    let servers: Vec<_> = std::iter::once(&h.server).chain(&others).collect();
    let replies = herd_over(&servers, "/herd", 150).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(
        h.origin.requests_for("/herd"),
        1,
        "the lock still coordinated the fleet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_dead_nodes_grant_nothing_yet_every_request_is_answered() {
    let mut cluster = Cluster::start().await;
    let (lock, _) = cluster.client("2s").await;
    let (h, others) = fleet_with_redlock(&cluster, 2).await;
    for i in [0, 2, 4] {
        cluster.nodes[i].kill();
    }
    assert!(
        matches!(
            lock.try_acquire(&key("/nolock")).await,
            LockTry::Unavailable
        ),
        "no quorum, no grant"
    );

    let servers: Vec<_> = std::iter::once(&h.server).chain(&others).collect();
    let replies = herd_over(&servers, "/nolock", 60).await;
    assert!(
        replies.iter().all(|r| r.status == StatusCode::OK),
        "answered via the fallback"
    );
    assert!(
        h.origin.requests_for("/nolock") <= 2,
        "still coalesced within each instance"
    );
    assert!(h.metric("corral_lock_no_quorum_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_node_does_not_hold_up_acquisition() {
    let cluster = Cluster::start().await;
    let (lock, _) = cluster.client("2s").await;
    cluster.nodes[1].freeze();
    let attempt =
        tokio::time::timeout(Duration::from_secs(2), lock.try_acquire(&key("/frozen"))).await;
    cluster.nodes[1].thaw();
    let granted = attempt.expect("acquisition is bounded by the node timeout, not the frozen node");
    assert!(
        matches!(granted, LockTry::Acquired(_)),
        "four of five nodes are a quorum"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_fails_to_extend_and_the_write_stays_fenced() {
    let cluster = Cluster::start().await;
    let (lock, shared) = cluster.client("2s").await;
    let (rival, _) = cluster.client("2s").await;
    let k = key("/lease");
    let LockTry::Acquired(mut lease) = lock.try_acquire(&k).await else {
        panic!("free")
    };
    // The lock vanishes under the holder (expiry during a pause, or a failover).
    for node in &cluster.nodes {
        let mut c = redis::Client::open(node.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    }
    assert!(
        !lock.extend(&mut lease).await,
        "the extension sees the lease is lost"
    );
    let LockTry::Acquired(newer) = rival.try_acquire(&k).await else {
        panic!("free again")
    };
    assert!(newer.fence > lease.fence);

    let h = Setup::default().start().await;
    h.get("/lease").await;
    let local_key = support::key_for(&h.config, "127.0.0.1", "/lease");
    let Some(corral::cache::LocalObject::Entry(entry)) =
        h.server.proxy().cache().local().get(&local_key)
    else {
        panic!()
    };
    assert_eq!(
        shared.put(&k, &entry, newer.fence).await,
        PutOutcome::Stored
    );
    assert_eq!(
        shared.put(&k, &entry, lease.fence).await,
        PutOutcome::Fenced,
        "the old holder's write is refused"
    );
}
