//! `corral demo`: the main job with nothing to install. It starts a slow origin and
//! corral in front of it (single instance, the embedded `config/demo.toml`), fires a
//! herd of concurrent requests at one cold key, and reports how many reached the
//! origin and how long clients waited. Then corral keeps serving for curl.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::{Config, ConfigError};
use crate::origin::{Behaviour, Origin};
use crate::server::{self, RunningServer, ServerError};

/// The demo's config, embedded so the demo runs from any directory.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the embedded demo config is invalid: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot start the demo origin: {0}")]
    Origin(#[source] std::io::Error),
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// What to run.
pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub upstream_delay: Duration,
    /// Fleet mode: this many instances sharing the Redis at `redis` (the first on
    /// `listen`, the others on free ports, without admin listeners).
    pub instances: usize,
    pub redis: Option<String>,
}

/// The origin and corral, running.
pub struct Demo {
    pub origin: Origin,
    pub server: RunningServer,
    /// The other instances of a fleet demo.
    others: Vec<RunningServer>,
}

impl Demo {
    /// Every instance's address.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        std::iter::once(&self.server)
            .chain(&self.others)
            .map(|s| s.listen_addr())
            .collect()
    }

    pub async fn shutdown(self) {
        for server in self.others {
            server.shutdown().await;
        }
        self.server.shutdown().await;
    }
}

/// Starts the origin (with `upstream_delay` per request) and corral in front of it.
pub async fn start(options: &DemoOptions) -> Result<Demo, DemoError> {
    let origin = Origin::start(Behaviour {
        delay: options.upstream_delay,
        cache_control: Some("max-age=30".to_string()),
        etag: true,
        ..Behaviour::default()
    })
    .await
    .map_err(DemoError::Origin)?;
    let mut config = Config::parse(DEMO_CONFIG, "config/demo.toml")?;
    config.listen = options.listen;
    config.admin_listen = options.admin_listen;
    let upstream: http::Uri = origin
        .url()
        .parse()
        .expect("a socket address makes a valid URI");
    for route in &mut config.routes {
        route.upstream = upstream.clone();
    }
    if let Some(url) = &options.redis {
        let redis = crate::config::RedisSettings::from_url(url).map_err(|message| {
            ConfigError::CommandLine {
                option: "--redis",
                message,
            }
        })?;
        config.redis = Some(redis);
    }
    let server = server::start(&config).await?;
    let mut others = Vec::new();
    for _ in 1..options.instances.max(1) {
        let mut other = config.clone();
        other.listen = "127.0.0.1:0".parse().expect("valid address");
        other.admin_listen = None;
        others.push(server::start(&other).await?);
    }
    // Fleet members join once connected to Redis; wait for that (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for s in std::iter::once(&server).chain(&others) {
        while s.proxy().redis().is_some_and(|r| !r.ready())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(Demo {
        origin,
        server,
        others,
    })
}

/// What one herd saw.
#[derive(Debug)]
pub struct HerdReport {
    clients: usize,
    pub upstream_requests: u64,
    ok: usize,
    failed: usize,
    /// Every 200 response carried the same body.
    identical_bodies: bool,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// Responses by `Cache-Status` (without its `ttl`).
    cache_status: BTreeMap<String, usize>,
    /// How much later than the leader's response the waiters' responses completed
    /// (p50, p99): those on the leader's instance, and those on other instances.
    added_same_instance: Option<(Duration, Duration)>,
    added_other_instances: Option<(Duration, Duration)>,
}

impl fmt::Display for HerdReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reduction = self.clients as f64 / self.upstream_requests.max(1) as f64;
        writeln!(
            f,
            "{} concurrent client requests -> {} upstream request(s) (herd reduction {reduction:.0}x)",
            self.clients, self.upstream_requests
        )?;
        writeln!(
            f,
            "{} ok, {} failed; identical bodies: {}",
            self.ok,
            self.failed,
            if self.identical_bodies { "yes" } else { "NO" }
        )?;
        writeln!(
            f,
            "client latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )?;
        let added = |name: &str, v: Option<(Duration, Duration)>| match v {
            Some((p50, p99)) => format!("{name}: p50 {:.2} ms, p99 {:.2} ms", ms(p50), ms(p99)),
            None => format!("{name}: none"),
        };
        writeln!(
            f,
            "waiters finished after the leader by {}; {}",
            added("same instance", self.added_same_instance),
            added("other instances", self.added_other_instances)
        )?;
        for (status, n) in &self.cache_status {
            writeln!(f, "  {n:>5} x Cache-Status: {status}")?;
        }
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sends `clients` concurrent GETs for `path`, spread round-robin over `addrs` as a load
/// balancer would, each on its own connection, and reports what they got.
/// `upstream_requests` is filled by the caller.
pub async fn fire_herd(addrs: &[SocketAddr], path: &str, clients: usize) -> HerdReport {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients)
        .build_http();
    let requests = (0..clients).map(|i| {
        let instance = i % addrs.len();
        let uri: http::Uri = format!("http://{}{path}", addrs[i % addrs.len()])
            .parse()
            .expect("valid URI");
        get(client.clone(), uri, instance)
    });
    let replies = join_all(requests).await;

    let mut report = HerdReport {
        clients,
        upstream_requests: 0,
        ok: 0,
        failed: 0,
        identical_bodies: true,
        p50: Duration::ZERO,
        p99: Duration::ZERO,
        max: Duration::ZERO,
        cache_status: BTreeMap::new(),
        added_same_instance: None,
        added_other_instances: None,
    };
    let leader = replies
        .iter()
        .flatten()
        .find(|r| r.cache_status.contains("fwd=miss") && !r.cache_status.contains("collapsed"));
    if let Some(leader) = leader {
        report.added_same_instance = added_after(&replies, leader, true);
        report.added_other_instances = added_after(&replies, leader, false);
    }
    report.count(replies);
    report
}

/// What one client of the herd got.
struct Reply {
    latency: Duration,
    status: StatusCode,
    /// The `Cache-Status` header without its ttl, which differs by the second.
    cache_status: String,
    body: Bytes,
    /// When the whole body had arrived.
    done: Instant,
    /// Which of the addresses it was sent to.
    instance: usize,
}

/// One client's GET, timed from its start to the end of the body; `None` if it failed.
async fn get(
    client: Client<HttpConnector, Empty<Bytes>>,
    uri: http::Uri,
    instance: usize,
) -> Option<Reply> {
    let started = Instant::now();
    let req = Request::get(uri).body(Empty::new()).expect("valid request");
    let res = client.request(req).await.ok()?;
    let status = res.status();
    let cache_status = res
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        // Without the ttl, which differs by the second.
        .map(|v| {
            v.split(';')
                .map(str::trim)
                .filter(|p| !p.starts_with("ttl="))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    let body = res.into_body().collect().await.ok()?.to_bytes();
    Some(Reply {
        latency: started.elapsed(),
        status,
        cache_status,
        body,
        done: Instant::now(),
        instance,
    })
}

/// How much later than the `leader`'s the collapsed waiters' responses completed
/// (p50, p99): those on the leader's instance (`same`), or those on the others.
fn added_after(
    replies: &[Option<Reply>],
    leader: &Reply,
    same: bool,
) -> Option<(Duration, Duration)> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    for r in replies
        .iter()
        .flatten()
        .filter(|r| r.cache_status.contains("collapsed") && (r.instance == leader.instance) == same)
    {
        let _ = h.record(
            r.done
                .saturating_duration_since(leader.done)
                .as_micros()
                .max(1) as u64,
        );
    }
    (!h.is_empty()).then(|| {
        (
            Duration::from_micros(h.value_at_quantile(0.5)),
            Duration::from_micros(h.value_at_quantile(0.99)),
        )
    })
}

impl HerdReport {
    /// Counts the replies: the 200s (their latencies, `Cache-Status` values and
    /// whether their bodies agree), and every other outcome as failed.
    fn count(&mut self, replies: Vec<Option<Reply>>) {
        let mut latencies =
            Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        let mut first_body: Option<Bytes> = None;
        for reply in replies {
            match reply {
                Some(Reply {
                    latency,
                    status: StatusCode::OK,
                    cache_status,
                    body,
                    ..
                }) => {
                    self.ok += 1;
                    let _ = latencies.record(latency.as_micros().max(1) as u64);
                    *self.cache_status.entry(cache_status).or_default() += 1;
                    match &first_body {
                        Some(first) if *first != body => self.identical_bodies = false,
                        Some(_) => {}
                        None => first_body = Some(body),
                    }
                }
                _ => self.failed += 1,
            }
        }
        if self.ok > 0 {
            self.p50 = Duration::from_micros(latencies.value_at_quantile(0.50));
            self.p99 = Duration::from_micros(latencies.value_at_quantile(0.99));
            self.max = Duration::from_micros(latencies.max());
        }
    }
}
