//! Fleet lock acquire latency, single Redis vs Redlock over five nodes, under
//! contention; then a herd against a 3-instance fleet with two of the five lock nodes
//! dead. Spawns its own redis-server processes on free ports of 127.0.0.1 and stops
//! them at the end.
//!
//! Run: `cargo bench -p corral --bench lock_latency` (needs `redis-server`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral::cache::CacheKey;
use corral::config::Config;
use corral::fill::lock::{FleetLock, LockTry};
use corral::origin::{Behaviour, Origin};
use corral::redis::Redis as RedisClient;
use corral_testkit::RedisServer as Redis;
use hdrhistogram::Histogram;

const CONTENDERS: usize = 8;
const RUN_FOR: Duration = Duration::from_secs(3);

fn redis() -> Redis {
    Redis::if_installed().expect("redis-server is installed")
}

fn config(cache: &Redis, nodes: &[Redis], mode: &str, upstream: &str) -> Config {
    let nodes: Vec<String> = nodes.iter().map(|n| format!("{:?}", n.url())).collect();
    let lock = match mode {
        "redlock" => format!(
            "mode = \"redlock\"\nnodes = [{}]\nnode_timeout = \"50ms\"",
            nodes.join(", ")
        ),
        _ => "mode = \"single\"".to_string(),
    };
    let text = format!(
        "listen = \"127.0.0.1:0\"\n[redis]\nurl = {:?}\n[lock]\nttl = \"2s\"\n{lock}\n[[route]]\nname = \"bench\"\nupstream = {upstream:?}\n",
        cache.url()
    );
    Config::parse(&text, "bench").unwrap()
}

async fn lock_for(config: &Config) -> Arc<FleetLock> {
    let redis = RedisClient::client(config.redis.clone().unwrap());
    while !redis.ready() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lock = FleetLock::new(redis, &config.lock);
    // Let lazily connected nodes come up.
    let warm = key("/warm");
    for _ in 0..100 {
        if let LockTry::Acquired(lease) = lock.try_acquire(&warm).await {
            lock.release(lease).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Arc::new(lock)
}

fn key(path: &str) -> CacheKey {
    let c = Config::parse(
        "listen = \"127.0.0.1:1\"\n[[route]]\nname = \"bench\"\nupstream = \"http://u\"\n",
        "k",
    )
    .unwrap();
    CacheKey::for_request(
        &c.routes[0],
        Some("bench"),
        &path.parse().unwrap(),
        &http::HeaderMap::new(),
    )
}

/// `CONTENDERS` tasks acquire and release one key over and over for `RUN_FOR`.
async fn contend(lock: Arc<FleetLock>) -> (Histogram<u64>, Histogram<u64>) {
    let contended = key("/contended");
    let stop = Instant::now() + RUN_FOR;
    let tasks: Vec<_> = (0..CONTENDERS)
        .map(|_| {
            let (lock, contended) = (Arc::clone(&lock), contended.clone());
            tokio::spawn(async move {
                let mut granted = Histogram::<u64>::new(3).unwrap();
                let mut held = Histogram::<u64>::new(3).unwrap();
                while Instant::now() < stop {
                    let started = Instant::now();
                    let attempt = lock.try_acquire(&contended).await;
                    let micros = started.elapsed().as_micros() as u64;
                    match attempt {
                        LockTry::Acquired(lease) => {
                            granted.record(micros).unwrap();
                            lock.release(lease).await;
                        }
                        _ => held.record(micros).unwrap(),
                    }
                }
                (granted, held)
            })
        })
        .collect();
    let mut granted = Histogram::<u64>::new(3).unwrap();
    let mut held = Histogram::<u64>::new(3).unwrap();
    for task in tasks {
        let (g, h) = task.await.unwrap();
        granted.add(g).unwrap();
        held.add(h).unwrap();
    }
    (granted, held)
}

fn line(name: &str, h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return format!("{name}: none");
    }
    let ms = |q| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "{name}: {} attempts, p50 {:.2} ms, p99 {:.2} ms",
        h.len(),
        ms(0.5),
        ms(0.99)
    )
}

#[tokio::main]
async fn main() {
    let cache = redis();
    let mut nodes: Vec<Redis> = (0..5).map(|_| redis()).collect();
    println!("fleet lock acquire latency, {CONTENDERS} tasks contending for one key for {RUN_FOR:?} (acquire, then release at once)");
    for mode in ["single", "redlock"] {
        let lock = lock_for(&config(&cache, &nodes, mode, "http://127.0.0.1:1")).await;
        let (granted, held) = contend(lock).await;
        let label = if mode == "single" {
            "single Redis     "
        } else {
            "Redlock, 5 nodes "
        };
        println!(
            "  {label} {}; {}",
            line("granted", &granted),
            line("found held", &held)
        );
    }

    let origin = Origin::start(Behaviour {
        delay: Duration::from_millis(200),
        ..Behaviour::default()
    })
    .await
    .unwrap();
    let config = config(&cache, &nodes, "redlock", &origin.url());
    let mut servers = Vec::new();
    for _ in 0..3 {
        let server = corral::start(&config).await.unwrap();
        while !server.proxy().redis().unwrap().ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        servers.push(server);
    }
    // Let each instance's lock nodes connect before two of them die.
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.listen_addr()).collect();
    corral::demo::fire_herd(&addrs, "/warm", 3).await;
    drop(nodes.remove(3));
    drop(nodes.remove(0));
    println!("\nherd of 300 across 3 instances, Redlock with 2 of 5 nodes dead, 200 ms upstream:");
    let mut report = corral::demo::fire_herd(&addrs, "/herd", 300).await;
    report.upstream_requests = origin.requests_for("/herd");
    print!("{report}");
    for server in servers {
        server.shutdown().await;
    }
}
