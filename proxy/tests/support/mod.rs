//! Test support: a real corral on 127.0.0.1:0 in front of a real origin, and a
//! client that talks to both over real sockets.
#![allow(dead_code)]

pub mod raw;
pub mod redis;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use corral::config::Config;
use corral::origin::{Behaviour, Origin};
use corral::RunningServer;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[allow(unused_imports)] // not every test target uses it
pub use corral::origin::Behaviour as OriginBehaviour;

/// How long any awaited condition may take before a test fails, and the wait for one.
#[allow(unused_imports)] // not every test target uses both
pub use corral_testkit::{eventually, DEADLINE};

/// A response as the client got it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub async fn read(res: http::Response<hyper::body::Incoming>) -> Reply {
        let (head, body) = res.into_parts();
        let body = body.collect().await.expect("body arrives").to_bytes();
        Reply {
            status: head.status,
            headers: head.headers,
            body,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A corral and its origin.
pub struct Harness {
    pub origin: Origin,
    pub server: RunningServer,
    pub config: Config,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// What to start: the origin's behaviour and TOML lines added to the config.
#[derive(Default)]
pub struct Setup {
    pub origin: Behaviour,
    /// Lines for the `[cache]` section.
    pub cache: String,
    /// Lines for the `[lock]` section.
    pub lock: String,
    /// Lines for the one `[[route]]` (named `t`, on every path).
    pub route: String,
    /// A `[redis]` section (fleet mode).
    pub redis: String,
    /// Top-level lines (before any section).
    pub top: String,
}

impl Setup {
    pub fn origin(behaviour: Behaviour) -> Setup {
        Setup {
            origin: behaviour,
            ..Setup::default()
        }
    }

    pub fn route(mut self, lines: &str) -> Setup {
        self.route.push_str(lines);
        self.route.push('\n');
        self
    }

    pub fn top(mut self, lines: &str) -> Setup {
        self.top.push_str(lines);
        self.top.push('\n');
        self
    }

    pub fn cache(mut self, lines: &str) -> Setup {
        self.cache.push_str(lines);
        self.cache.push('\n');
        self
    }

    pub fn lock(mut self, lines: &str) -> Setup {
        self.lock.push_str(lines);
        self.lock.push('\n');
        self
    }

    /// Fleet mode on the given Redis.
    pub fn redis(mut self, url: &str) -> Setup {
        self.redis = format!(
            "[redis]\nurl = \"{url}\"\ncommand_timeout = \"500ms\"\nretry_after = \"200ms\"\n"
        );
        self
    }

    /// Fleet mode on the Redis Cluster reached through `seeds`.
    pub fn redis_cluster(mut self, seeds: &[String]) -> Setup {
        let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
        self.redis = format!(
            "[redis]\ncluster = [{}]\ncommand_timeout = \"500ms\"\nretry_after = \"200ms\"\n",
            seeds.join(", ")
        );
        self
    }

    fn config(&self, upstream: &str) -> Config {
        let text = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n{}\n\
             [cache]\n{}\n[lock]\n{}\n{}\n[[route]]\nname = \"t\"\nupstream = \"{}\"\n{}\n",
            self.top,
            self.cache, self.lock, self.redis, upstream, self.route
        );
        Config::parse(&text, "test.toml").expect("test config is valid")
    }

    pub async fn start(self) -> Harness {
        let origin = Origin::start(self.origin.clone())
            .await
            .expect("origin starts");
        let config = self.config(&origin.url());
        let server = corral::start(&config).await.expect("corral starts");
        let h = Harness {
            origin,
            server,
            config,
            client: client(),
        };
        h.wait_for_fleet(&h.server).await;
        h
    }

    /// corral alone in front of `upstream` (such as a [`raw::RecordingOrigin`]).
    pub async fn start_in_front_of(self, upstream: &str) -> Front {
        let config = self.config(upstream);
        let server = corral::start(&config).await.expect("corral starts");
        Front { server, config }
    }

    /// corral in front of a fresh [`raw::RecordingOrigin`] that answers with `answer`.
    pub async fn in_front_of(self, answer: raw::Answer) -> (raw::RecordingOrigin, Front) {
        let origin = raw::RecordingOrigin::answering(answer).await;
        let front = self.start_in_front_of(&origin.url()).await;
        (origin, front)
    }

    /// `n` instances in front of one origin (sharing Redis, with `.redis(..)`).
    pub async fn start_fleet(self, n: usize) -> (Harness, Vec<RunningServer>) {
        let h = self.start().await;
        let mut others = Vec::new();
        for _ in 1..n {
            let server = corral::start(&h.config).await.expect("corral starts");
            h.wait_for_fleet(&server).await;
            others.push(server);
        }
        (h, others)
    }
}

/// A corral in front of an upstream the test started itself.
pub struct Front {
    pub server: RunningServer,
    pub config: Config,
}

impl Front {
    pub fn addr(&self) -> SocketAddr {
        self.server.listen_addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.server.admin_addr().expect("admin listener configured")
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http()
}

impl Harness {
    /// In fleet mode, waits until `server` is connected to Redis and subscribed.
    pub async fn wait_for_fleet(&self, server: &RunningServer) {
        if let Some(fleet) = server.proxy().redis() {
            let fleet = std::sync::Arc::clone(fleet);
            eventually("the instance joins the fleet", || {
                let ready = fleet.ready();
                async move { ready.then_some(()) }
            })
            .await;
        }
    }

    /// A GET sent to another instance of the fleet.
    pub async fn get_from(server: &RunningServer, path: &str) -> Reply {
        get_url(format!("http://{}{}", server.listen_addr(), path)).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.listen_addr()
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Request::get(self.url(path)).body(Full::default()).unwrap())
            .await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(get_request(&self.url(path), headers)).await
    }

    /// A GET with `headers` sent to another instance of the fleet.
    pub async fn get_with_from(
        server: &RunningServer,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let url = format!("http://{}{}", server.listen_addr(), path);
        let res = tokio::time::timeout(DEADLINE, client().request(get_request(&url, headers)))
            .await
            .expect("response within the deadline")
            .expect("request succeeds at the HTTP level");
        Reply::read(res).await
    }

    pub async fn request(&self, method: Method, path: &str, body: &'static [u8]) -> Reply {
        let req = Request::builder()
            .method(method)
            .uri(self.url(path))
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        self.send(req).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        let res = tokio::time::timeout(DEADLINE, self.client.request(req))
            .await
            .expect("response within the deadline")
            .expect("request succeeds at the HTTP level");
        Reply::read(res).await
    }

    /// `n` concurrent GETs for `path`, each on a fresh connection.
    pub async fn herd(&self, path: &str, n: usize) -> Vec<Reply> {
        let requests = (0..n).map(|_| {
            let client = client();
            let req = Request::get(self.url(path)).body(Full::default()).unwrap();
            async move { Reply::read(client.request(req).await.expect("request succeeds")).await }
        });
        tokio::time::timeout(DEADLINE, futures_util::future::join_all(requests))
            .await
            .expect("herd answered in time")
    }

    /// The admin endpoint's answer for `path`.
    pub async fn admin(&self, path: &str) -> Reply {
        let addr = self.server.admin_addr().expect("admin listener configured");
        self.send(
            Request::get(format!("http://{addr}{path}"))
                .body(Full::default())
                .unwrap(),
        )
        .await
    }

    /// POSTs to the admin endpoint of `server` (this harness's own when `None`).
    pub async fn admin_post(&self, server: Option<&RunningServer>, path: &str) -> Reply {
        let addr = server
            .unwrap_or(&self.server)
            .admin_addr()
            .expect("admin listener configured");
        self.send(
            Request::post(format!("http://{addr}{path}"))
                .body(Full::default())
                .unwrap(),
        )
        .await
    }

    /// The value of the metric line that starts with `series` (name and labels).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.admin("/metrics").await.text();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }

    /// Repeats `probe` until `done` holds for its result, up to the deadline.
    pub async fn until<F, Fut>(
        &self,
        what: &str,
        mut probe: F,
        done: impl Fn(&Reply) -> bool,
    ) -> Reply
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Reply>,
    {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let reply = probe().await;
            if done(&reply) {
                return reply;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what}; last reply {reply:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A GET of `url` on a connection of its own.
pub async fn get_url(url: String) -> Reply {
    let res = client()
        .request(Request::get(url).body(Full::default()).unwrap())
        .await
        .expect("request succeeds");
    Reply::read(res).await
}

/// The value of the metric line of `server` that starts with `series`.
pub async fn metric_of(server: &RunningServer, series: &str) -> f64 {
    let addr = server.admin_addr().expect("admin listener configured");
    let text = get_url(format!("http://{addr}/metrics")).await.text();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// `n` GETs for `path`, spread round-robin over `servers` as a load balancer would,
/// all at once.
pub async fn herd_over(servers: &[&RunningServer], path: &str, n: usize) -> Vec<Reply> {
    let requests = (0..n).map(|i| {
        get_url(format!(
            "http://{}{}",
            servers[i % servers.len()].listen_addr(),
            path
        ))
    });
    tokio::time::timeout(DEADLINE, futures_util::future::join_all(requests))
        .await
        .expect("herd answered")
}

/// A connection to a config's Redis from outside any instance (a fake holder, a paused
/// one, or a Redlock client of its own), once it is connected.
pub async fn fleet_client(config: &Config) -> std::sync::Arc<corral::redis::Redis> {
    let fleet = corral::redis::Redis::client(config.redis.clone().expect("a fleet config"));
    let ready = std::sync::Arc::clone(&fleet);
    eventually("the client connects to Redis", || {
        let ok = ready.ready();
        async move { ok.then_some(()) }
    })
    .await;
    fleet
}

/// The cache key corral derives for a plain `GET path` with `Host: host` on `config`'s
/// first route (what the tests plant, lock or look up).
pub fn key_for(config: &Config, host: &str, path: &str) -> corral::cache::CacheKey {
    corral::cache::CacheKey::for_request(
        &config.routes[0],
        Some(host),
        &path.parse().expect("a path"),
        &HeaderMap::new(),
    )
}

/// A GET of `url` with `headers`.
fn get_request(url: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut req = Request::get(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Full::default()).unwrap()
}

/// `n` distinct cold keys `/{prefix}/{i}`, all requested at once, spread over
/// `servers` (each request on a connection of its own).
pub async fn cold_keys(servers: &[&RunningServer], prefix: &str, n: usize) -> Vec<Reply> {
    let requests = (0..n).map(|i| {
        let server = servers[i % servers.len()];
        let path = format!("/{prefix}/{i}");
        async move { Harness::get_from(server, &path).await }
    });
    futures_util::future::join_all(requests).await
}

/// An origin that answers after `ms` milliseconds.
pub fn slow(ms: u64) -> Behaviour {
    Behaviour {
        delay: Duration::from_millis(ms),
        ..Behaviour::default()
    }
}

/// The lines of the log file at `path`, once it has at least `n` of them.
pub async fn log_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    eventually("the log has its lines", || async {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (lines.len() >= n).then_some(lines)
    })
    .await
}
