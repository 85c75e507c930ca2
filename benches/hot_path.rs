//! Criterion benchmarks of the pieces of a cache hit, so a regression shows per
//! function: key derivation, local lookup, the HTTP/1 fast path's hit decision and
//! per-hit header lines, hyper's path's response assembly, entry encode/decode for the
//! shared tier, and the fleet lock's acquire/release against a real Redis.
//!
//! Run: `cargo bench -p corral --bench hot_path` (the lock group needs `redis-server`
//! and is skipped without it).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use corral::cache::codec;
use corral::cache::entry::CacheEntry;
use corral::cache::policy::{evaluate, Verdict};
use corral::cache::{Cache, CacheKey, LocalCache};
use corral::config::Config;
use corral::http::cache_status::CacheStatus;
use corral::metrics::Metrics;
use corral::proxy::Proxy;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, Request, Response};

/// The peer the fast path is asked for.
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn config() -> Config {
    Config::parse(
        "listen = \"127.0.0.1:1\"\n[[route]]\nname = \"bench\"\nupstream = \"http://u\"\nkey = { query = \"sort\", headers = [\"x-tenant\"] }\n",
        "bench",
    )
    .unwrap()
}

fn entry(body_size: usize) -> (CacheEntry, http::request::Parts) {
    let route = &config().routes[0];
    let (req, ()) = Request::get("/catalog/item?b=2&a=1")
        .body(())
        .unwrap()
        .into_parts();
    let (res, ()) = Response::builder()
        .header("cache-control", "max-age=3600")
        .header("content-type", "application/json")
        .header("etag", "\"v1\"")
        .header("date", "Thu, 26 Nov 2026 04:00:00 GMT")
        .body(())
        .unwrap()
        .into_parts();
    let Verdict::Store(lifetime) = evaluate(route, &req, &res, SystemTime::now()) else {
        panic!("storable")
    };
    (
        CacheEntry::new(
            res,
            Bytes::from(vec![b'x'; body_size]),
            *lifetime,
            &req.headers,
        )
        .expect("a final status"),
        req,
    )
}

fn hit_path(c: &mut Criterion) {
    let config = config();
    let route = &config.routes[0];
    let uri: http::Uri = "/catalog/item?b=2&a=1".parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", "acme".parse().unwrap());
    c.bench_function("key derivation (sorted query, one key header)", |b| {
        b.iter(|| CacheKey::for_request(route, Some("api.example.com"), &uri, &headers))
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache = Cache::new(LocalCache::new(64 << 20, None), None);
    let key = CacheKey::for_request(route, Some("api.example.com"), &uri, &headers);
    let (stored, req) = entry(1024);
    cache.store(&key, Arc::new(stored));
    c.bench_function(
        "local lookup through the async tiers (fresh 1 KiB entry)",
        |b| b.iter(|| runtime.block_on(cache.lookup(&key, &headers, SystemTime::now()))),
    );

    c.bench_function("local lookup, fast path (fresh 1 KiB entry)", |b| {
        b.iter(|| cache.local_fresh(&key, &headers, SystemTime::now()))
    });

    // The fast path's whole decision for a request head: route, key, lookup,
    // conditionals, metrics.
    let proxy = Proxy::new(&config, Arc::new(Metrics::new()));
    let (mut head, ()) = Request::get("/catalog/item?b=2&a=1")
        .header("host", "api.example.com")
        .header("x-tenant", "acme")
        .body(())
        .unwrap()
        .into_parts();
    head.version = http::Version::HTTP_11;
    let (stored, _) = entry(1024);
    proxy.cache().store(&key, Arc::new(stored));
    c.bench_function("request host normalisation (Host header)", |b| {
        b.iter(|| corral::http::request::canonical_host(head.version, &head.uri, &head.headers))
    });
    c.bench_function("request path normalisation (already normal)", |b| {
        b.iter(|| corral::http::request::normalize_target(&head.uri))
    });
    c.bench_function(
        "request header check (nothing the full path would change)",
        |b| b.iter(|| corral::http::request::already_sanitized(&head.headers)),
    );
    c.bench_function(
        "fast path hit decision (route, key, lookup, conditionals)",
        |b| b.iter(|| proxy.local_hit(&head, CLIENT).expect("a hit")),
    );
    let hit = proxy.local_hit(&head, CLIENT).expect("a hit");
    let mut lines = Vec::with_capacity(256);
    c.bench_function("fast path per-hit header lines (Age, Cache-Status)", |b| {
        b.iter(|| {
            lines.clear();
            corral::server::write_hit_lines(&hit, &mut lines, false);
        })
    });

    let (hit, _) = entry(1024);
    c.bench_function(
        "hyper path response assembly for a hit (headers, Age, Cache-Status)",
        |b| {
            b.iter(|| {
                let mut res = corral::proxy::respond(&req, &hit);
                res.headers_mut()
                    .insert("cache-status", CacheStatus::hit(3599).header_value());
                res
            })
        },
    );

    for size in [1024, 64 * 1024] {
        let (e, _) = entry(size);
        let key = CacheKey::from_raw("catalog\napi.example.com\n/catalog/item");
        let encoded = codec::encode(&e, &key, 7);
        c.bench_function(&format!("entry encode ({} KiB)", size / 1024), |b| {
            b.iter(|| codec::encode(&e, &key, 7))
        });
        c.bench_function(&format!("entry decode ({} KiB)", size / 1024), |b| {
            b.iter_batched(
                || encoded.clone(),
                |v| codec::decode(v, &key, u64::from(u32::MAX)).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
}

fn fleet_lock(c: &mut Criterion) {
    let Some(redis) = corral_testkit::RedisServer::if_installed() else {
        eprintln!("redis-server not installed: skipping the fleet lock benchmark");
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = format!("listen = \"127.0.0.1:1\"\n[redis]\nurl = \"{}\"\n[[route]]\nname = \"bench\"\nupstream = \"http://u\"\n", redis.url());
    let config = Config::parse(&text, "bench").unwrap();
    let lock = runtime.block_on(async {
        let redis = corral::redis::Redis::client(config.redis.clone().unwrap());
        while !redis.ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        corral::fill::lock::single::RedisLock::new(redis, config.lock.ttl)
    });
    let key = CacheKey::for_request(
        &config.routes[0],
        Some("h"),
        &"/k".parse().unwrap(),
        &HeaderMap::new(),
    );
    c.bench_function(
        "fleet lock acquire + release (single Redis, loopback)",
        |b| {
            b.iter(|| {
                runtime.block_on(async {
                    if let corral::fill::lock::LockTry::Acquired(lease) =
                        lock.try_acquire(&key).await
                    {
                        lock.release(lease).await;
                    }
                })
            })
        },
    );
}

criterion_group!(benches, hit_path, fleet_lock);
criterion_main!(benches);
