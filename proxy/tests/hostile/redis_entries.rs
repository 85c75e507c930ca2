//! Trusting Redis: values planted under corral's entry keys by anything else (the key
//! prefix may be shared, Redis may be compromised) never reach a client's connection
//! as they are. A readable entry is served framed from its own body; anything else is
//! a miss, fetched from the origin and counted.
//!
//! The values are written with a plain Redis client in the layout `cache::codec`
//! documents, as another program would write them.

use std::time::{SystemTime, UNIX_EPOCH};

use corral::cache::CacheKey;
use redis::aio::MultiplexedConnection;

use crate::support::raw::{exchange, RawClient, RecordingOrigin, Wire};
use crate::support::redis::RedisServer;
use crate::support::{eventually, Front, Setup};

/// A fleet-mode corral in front of a recording origin, and a Redis client of its own.
struct Planting {
    front: Front,
    origin: RecordingOrigin,
    redis: MultiplexedConnection,
    _server: RedisServer,
}

impl Planting {
    async fn start(setup: Setup) -> Planting {
        let server = RedisServer::start().await;
        let origin = RecordingOrigin::start().await;
        let front = setup
            .redis(&server.url())
            .start_in_front_of(&origin.url())
            .await;
        let fleet = std::sync::Arc::clone(front.server.proxy().redis().expect("fleet mode"));
        eventually("corral joins the fleet", || {
            let ready = fleet.ready();
            async move { ready.then_some(()) }
        })
        .await;
        let redis = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("the test connects to Redis");
        Planting {
            front,
            origin,
            redis,
            _server: server,
        }
    }

    /// The cache key corral derives for `GET path` with `host: a`.
    fn key(&self, path: &str) -> CacheKey {
        crate::support::key_for(&self.front.config, "a", path)
    }

    /// Writes `value` where corral looks for `path`'s entry.
    async fn plant(&mut self, path: &str, value: &[u8]) {
        let redis_key = self.entry_key(path);
        redis::cmd("SET")
            .arg(redis_key)
            .arg(value)
            .query_async::<()>(&mut self.redis)
            .await
            .unwrap();
    }

    fn entry_key(&self, path: &str) -> String {
        let proxy = self.front.server.proxy();
        proxy.cache().shared().unwrap().keys(&self.key(path)).entry
    }

    /// A metric's value, from the admin listener.
    async fn metric(&self, series: &str) -> f64 {
        let text = exchange(
            self.front.admin_addr(),
            b"GET /metrics HTTP/1.1\r\nhost: admin\r\n\r\n",
        )
        .await
        .text();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }

    async fn unreadable(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "corral_shared_unreadable_total{{reason=\"{reason}\"}}"
        ))
        .await
    }
}

/// An entry value as another writer might craft it: fresh for a minute, every field
/// its own choice.
struct Crafted<'a> {
    key: &'a str,
    version: u8,
    status: u16,
    headers: Vec<(&'a str, &'a [u8])>,
    body: Vec<u8>,
    /// Overrides the body's length field.
    declared_body: Option<u32>,
    /// Overrides the header count field.
    declared_headers: Option<u32>,
}

impl<'a> Crafted<'a> {
    fn new(key: &'a CacheKey, status: u16, headers: &[(&'a str, &'a str)], body: &[u8]) -> Self {
        Crafted {
            key: key.primary(),
            version: 2,
            status,
            headers: headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect(),
            body: body.to_vec(),
            declared_body: None,
            declared_headers: None,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        fn field(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let mut out = b"CRL".to_vec();
        out.push(self.version);
        out.extend_from_slice(&self.status.to_be_bytes());
        // received_at, age, fresh_for, swr, sie, keep, fence
        for n in [now.as_millis() as u64, 0, 60_000, 0, 0, 0, 1] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        field(&mut out, self.key.as_bytes());
        field(&mut out, b"");
        let count = self.declared_headers.unwrap_or(self.headers.len() as u32);
        out.extend_from_slice(&count.to_be_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(&(name.len() as u16).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            field(&mut out, value);
        }
        let len = self.declared_body.unwrap_or(self.body.len() as u32);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n").into_bytes()
}

/// The response frames exactly its body and carries no hop-by-hop field.
fn assert_framed(res: &Wire) {
    assert_eq!(
        res.header("content-length"),
        Some(res.body.len().to_string().as_str()),
        "{res:?}"
    );
    for name in [
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "trailer",
        "te",
        "x-hop",
        "proxy-authenticate",
        "set-cookie",
    ] {
        assert!(res.header(name).is_none(), "{name} in {res:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_entries_are_served_framed_from_their_own_body() {
    let mut p = Planting::start(Setup::default().route("ttl = \"60s\"")).await;
    let framings: [&[(&str, &str)]; 6] = [
        &[("content-length", "1000")],
        &[],
        &[("transfer-encoding", "chunked")],
        &[("content-length", "2"), ("transfer-encoding", "chunked")],
        &[("content-length", "5"), ("content-length", "7")],
        &[
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=1"),
            ("upgrade", "h2c"),
            ("trailer", "x-sum"),
            ("te", "trailers"),
            ("proxy-authenticate", "Basic"),
            ("set-cookie", "session=planted"),
        ],
    ];
    for (i, headers) in framings.iter().enumerate() {
        let path = format!("/planted/{i}");
        let key = p.key(&path);
        let body = format!("planted body {i}");
        p.plant(
            &path,
            &Crafted::new(&key, 200, headers, body.as_bytes()).bytes(),
        )
        .await;
        let mut client = RawClient::connect(p.front.addr()).await;
        // From Redis, then from the local tier (the fast path's prebuilt head).
        for _ in 0..2 {
            let res = client.exchange(&get(&path)).await;
            assert_eq!(res.status, 200, "{headers:?}: {res:?}");
            assert_eq!(res.text(), body, "{headers:?}");
            assert_framed(&res);
        }
        let next = client.exchange(&get(&format!("/after/{i}"))).await;
        assert!(next.text().contains(&format!("GET /after/{i}")), "{next:?}");
        assert!(p.origin.received_for(&path).is_empty());
    }
}

/// How a case writes its value for a key.
type Craft = Box<dyn Fn(&CacheKey) -> Vec<u8>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unservable_values_are_misses_fetched_from_the_origin_and_counted() {
    let mut p = Planting::start(Setup::default().route("ttl = \"60s\"")).await;
    let other = p.key("/somewhere/else");
    let cases: Vec<(&str, Craft)> = vec![
        (
            "unframeable",
            Box::new(|k| Crafted::new(k, 101, &[("upgrade", "websocket")], b"").bytes()),
        ),
        (
            "unframeable",
            Box::new(|k| Crafted::new(k, 204, &[], b"a body after a 204").bytes()),
        ),
        ("foreign", Box::new(|_| b"\x00not an entry".to_vec())),
        (
            "version",
            Box::new(|k| {
                let mut c = Crafted::new(k, 200, &[], b"x");
                c.version = 1;
                c.bytes()
            }),
        ),
        (
            "corrupt",
            Box::new(|k| {
                let mut c = Crafted::new(k, 200, &[], b"short");
                c.declared_body = Some(u32::MAX);
                c.bytes()
            }),
        ),
        (
            "corrupt",
            Box::new(|k| {
                let mut c = Crafted::new(k, 200, &[], b"x");
                c.declared_headers = Some(u32::MAX);
                c.bytes()
            }),
        ),
        (
            "corrupt",
            Box::new(|k| Crafted::new(k, 200, &[("x-a", "1\r\nset-cookie: a=b")], b"x").bytes()),
        ),
        (
            "other-key",
            Box::new(move |_| Crafted::new(&other, 200, &[], b"someone else's page").bytes()),
        ),
    ];
    for (i, (reason, value)) in cases.iter().enumerate() {
        let path = format!("/unservable/{i}");
        let before = p.unreadable(reason).await;
        let value = value(&p.key(&path));
        p.plant(&path, &value).await;
        let mut client = RawClient::connect(p.front.addr()).await;
        let res = client.exchange(&get(&path)).await;
        assert_eq!(res.status, 200, "{reason}: {res:?}");
        assert!(
            res.text().contains(&format!("GET {path}")),
            "{reason}: {res:?}"
        );
        assert_framed(&res);
        let again = client.exchange(&get(&path)).await;
        assert_eq!(
            again.text(),
            res.text(),
            "{reason}: the fill replaced the value"
        );
        assert_eq!(p.origin.received_for(&path).len(), 1, "{reason}");
        assert!(p.unreadable(reason).await > before, "{reason} counted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_the_object_bound_are_refused_unread_or_unserved() {
    let setup = Setup::default()
        .route("ttl = \"60s\"")
        .cache("max_object_bytes = \"1KiB\"");
    let mut p = Planting::start(setup).await;
    // Over max_object_bytes but small enough to read: decoded, then refused.
    let key = p.key("/big");
    p.plant("/big", &Crafted::new(&key, 200, &[], &[b'x'; 4096]).bytes())
        .await;
    // Past the read bound: Redis answers with its length only.
    let key = p.key("/huge");
    p.plant(
        "/huge",
        &Crafted::new(&key, 200, &[], &vec![b'x'; 2 << 20]).bytes(),
    )
    .await;
    for (path, reason) in [("/big", "too-large"), ("/huge", "oversized")] {
        let res = exchange(p.front.addr(), &get(path)).await;
        assert!(res.text().contains(&format!("GET {path}")), "{res:?}");
        assert_framed(&res);
        assert!(p.unreadable(reason).await >= 1.0, "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holding_another_redis_type_is_a_miss_not_an_outage() {
    let mut p = Planting::start(Setup::default().route("ttl = \"60s\"")).await;
    let redis_key = p.entry_key("/hash");
    redis::cmd("HSET")
        .arg(redis_key)
        .arg("field")
        .arg("value")
        .query_async::<()>(&mut p.redis)
        .await
        .unwrap();
    let res = exchange(p.front.addr(), &get("/hash")).await;
    assert!(res.text().contains("GET /hash"), "{res:?}");
    assert!(p.unreadable("wrong-type").await >= 1.0);
    assert_eq!(p.metric("corral_redis_errors_total").await, 0.0);
    assert_eq!(p.metric("corral_redis_fallback").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_fleet_events_are_ignored_and_counted() {
    let mut p = Planting::start(Setup::default().route("ttl = \"60s\"")).await;
    let messages: [&[u8]; 5] = [
        b"",
        b"F",
        b"Fnot-a-number 0123456789abcdef t\na\n/x",
        b"P short-instance t\na\n/x",
        b"\xff\xfe binary",
    ];
    for message in messages {
        redis::cmd("PUBLISH")
            .arg("corral:events")
            .arg(message)
            .query_async::<i64>(&mut p.redis)
            .await
            .unwrap();
    }
    let front = &p;
    eventually("every malformed event is counted", || async move {
        (front.metric("corral_fleet_events_ignored_total").await >= messages.len() as f64)
            .then_some(())
    })
    .await;
    let res = exchange(p.front.addr(), &get("/still-serving")).await;
    assert_eq!(res.status, 200);
    assert_eq!(p.metric("corral_redis_fallback").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_fence_counter_is_repaired_not_taken_for_an_outage() {
    let mut p = Planting::start(Setup::default().route("ttl = \"60s\"")).await;
    let proxy = p.front.server.proxy();
    let keys = proxy.cache().shared().unwrap().keys(&p.key("/fenced"));
    let entry_key = keys.entry.clone();
    redis::cmd("SET")
        .arg(&keys.fence)
        .arg("not a count")
        .query_async::<()>(&mut p.redis)
        .await
        .unwrap();
    let res = exchange(p.front.addr(), &get("/fenced")).await;
    assert!(res.text().contains("GET /fenced"), "{res:?}");
    let stored: bool = redis::cmd("EXISTS")
        .arg(&entry_key)
        .query_async(&mut p.redis)
        .await
        .unwrap();
    assert!(
        stored,
        "the fill's fenced write went through the repaired counter"
    );
    assert_eq!(p.metric("corral_redis_errors_total").await, 0.0);
    assert_eq!(p.metric("corral_redis_fallback").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_planted_without_expiry_ends_within_one_lock_ttl() {
    let setup = Setup::default()
        .route("ttl = \"60s\"")
        .lock("ttl = \"300ms\"\nwait_timeout = \"8s\"");
    let mut p = Planting::start(setup).await;
    let proxy = p.front.server.proxy();
    let lock_key = proxy.cache().shared().unwrap().keys(&p.key("/locked")).lock;
    redis::cmd("SET")
        .arg(&lock_key)
        .arg("held forever")
        .query_async::<()>(&mut p.redis)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let res = exchange(p.front.addr(), &get("/locked")).await;
    assert!(res.text().contains("GET /locked"), "{res:?}");
    // The lock's TTL and a takeover margin, not the 8 s wait bound.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(p.origin.received_for("/locked").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_refused_for_one_keys_value_does_not_switch_the_fleet_off() {
    let mut p = Planting::start(Setup::default().route("ttl = \"60s\"")).await;
    let proxy = p.front.server.proxy();
    let fleet = std::sync::Arc::clone(proxy.redis().unwrap());
    // A tag set that is not a set.
    let tag_key = fleet.tag_key("planted");
    redis::cmd("SET")
        .arg(&tag_key)
        .arg("not a set")
        .query_async::<()>(&mut p.redis)
        .await
        .unwrap();
    let members: Option<Vec<String>> = fleet
        .run("tag members", |mut c| async move {
            redis::cmd("SMEMBERS")
                .arg(tag_key)
                .query_async(&mut c)
                .await
        })
        .await;
    assert_eq!(members, None);
    assert!(fleet.available(), "the breaker stays closed");
    let res = exchange(p.front.addr(), &get("/after-refusal")).await;
    assert_eq!(res.status, 200);
    assert_eq!(p.metric("corral_redis_fallback").await, 0.0);
}

/// A non-set planted under a primary's variant set key (it has no TTL, and a fill
/// stored under the primary's own entry does not touch the set) does not make purges
/// of that URL fail: it reads as no variants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variant_set_of_another_type_does_not_fail_purges_after_a_fill() {
    let mut p = Planting::start(Setup::default().route("ttl = \"60s\"")).await;
    let proxy = p.front.server.proxy();
    let keys = proxy.cache().shared().unwrap().keys(&p.key("/plain"));
    // `RedisKeys::variants` is crate-private: `{prefix}{tag}:v`, next to the entry.
    let variants = format!("{}:v", &keys.entry[..keys.entry.find("}:").unwrap() + 1]);
    redis::cmd("SET")
        .arg(&variants)
        .arg("not a set")
        .query_async::<()>(&mut p.redis)
        .await
        .unwrap();
    let res = exchange(p.front.addr(), &get("/plain")).await;
    assert!(res.text().contains("GET /plain"), "{res:?}");
    let stored: bool = redis::cmd("EXISTS")
        .arg(&keys.entry)
        .query_async(&mut p.redis)
        .await
        .unwrap();
    assert!(stored, "the fill reached Redis");
    for query in [
        "route=t&host=a&path=/plain&soft=true",
        "route=t&host=a&path=/plain",
    ] {
        let raw =
            format!("POST /purge?{query} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\n\r\n");
        let purged = exchange(p.front.admin_addr(), raw.as_bytes()).await;
        assert_eq!(purged.status, 200, "{query}: {}", purged.text());
    }
}

/// A set planted under a primary's variant set key (the prefix may be shared) cannot
/// make a purge of that URL delete keys that are not that primary's entries: only
/// members named `{prefix}{tag}:e:...` are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_deletes_only_corrals_entries_of_that_key() {
    let mut p = Planting::start(Setup::default().route("ttl = \"60s\"")).await;
    let proxy = p.front.server.proxy();
    let keys = proxy.cache().shared().unwrap().keys(&p.key("/plain"));
    let variants = format!("{}:v", &keys.entry[..keys.entry.find("}:").unwrap() + 1]);
    redis::cmd("SET")
        .arg("someone-elses:precious")
        .arg("data")
        .query_async::<()>(&mut p.redis)
        .await
        .unwrap();
    redis::cmd("SADD")
        .arg(&variants)
        .arg("someone-elses:precious")
        .query_async::<()>(&mut p.redis)
        .await
        .unwrap();
    let raw = "POST /purge?route=t&host=a&path=/plain HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\n\r\n";
    let purged = exchange(p.front.admin_addr(), raw.as_bytes()).await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    let kept: bool = redis::cmd("EXISTS")
        .arg("someone-elses:precious")
        .query_async(&mut p.redis)
        .await
        .unwrap();
    assert!(
        kept,
        "a purge deleted a key outside corral's prefix ({})",
        purged.text()
    );
}
