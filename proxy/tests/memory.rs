//! The local tier's byte bound is a memory bound: the weigher counts what an entry
//! really costs (held against jemalloc's own count of allocated bytes, corral's
//! allocator), and a cache filled far past `max_bytes` holds no more than that.
//! Process RSS, and Varnish beside it, are measured by `benches/memory.sh`.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use corral::cache::entry::CacheEntry;
use corral::cache::policy::{evaluate, Lifetime, Verdict};
use corral::cache::{Cache, CacheKey, LocalCache};
use corral::config::Config;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response, Uri};
use tikv_jemalloc_ctl::{epoch, stats};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's counts are per process: one measurement at a time.
static MEASURING: Mutex<()> = Mutex::new(());

fn allocated() -> usize {
    epoch::advance().unwrap();
    stats::allocated::read().unwrap()
}

/// A response's shape: body size and extra header fields beside the usual four.
#[derive(Clone, Copy)]
struct Shape {
    body: usize,
    extra_fields: usize,
    vary: bool,
}

fn config() -> Config {
    Config::parse(
        "listen = \"127.0.0.1:1\"\n[[route]]\nname = \"mem\"\nupstream = \"http://u\"\n",
        "memory test",
    )
    .unwrap()
}

/// An entry shaped `shape` for the `i`th key, built as a fill builds it: header values
/// as slices of one read buffer, the body copied out of frames.
fn entry(config: &Config, shape: Shape, i: usize) -> CacheEntry {
    let raw = Bytes::from(format!(
        "max-age=3600\"v{i:08}\"text/plainFri, 27 Nov 2026 14:50:32 GMT"
    ));
    let mut res = Response::builder()
        .status(200)
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let mut at = 0;
    for (name, len) in [
        ("cache-control", 12),
        ("etag", 11),
        ("content-type", 10),
        ("date", 29),
    ] {
        res.headers.append(
            name,
            HeaderValue::from_maybe_shared(raw.slice(at..at + len)).unwrap(),
        );
        at += len;
    }
    for f in 0..shape.extra_fields {
        let name = HeaderName::from_bytes(format!("x-field-{f}").as_bytes()).unwrap();
        res.headers.append(
            name,
            HeaderValue::from_str(&format!("value {i} {f}")).unwrap(),
        );
    }
    let mut req_headers = HeaderMap::new();
    if shape.vary {
        res.headers
            .append("vary", HeaderValue::from_static("accept-language"));
        req_headers.insert("accept-language", HeaderValue::from_static("en-GB"));
    }
    let mut body = BytesMut::new();
    body.extend_from_slice(&vec![b'.'; shape.body]);
    let (req, ()) = http::Request::get("/k").body(()).unwrap().into_parts();
    let lifetime: Lifetime = match evaluate(&config.routes[0], &req, &res, SystemTime::now()) {
        Verdict::Store(lifetime) => *lifetime,
        Verdict::Pass(reason) => panic!("not stored: {reason:?}"),
    };
    CacheEntry::new(res, body.freeze(), lifetime, &req_headers).unwrap()
}

fn key(config: &Config, i: usize) -> CacheKey {
    let uri: Uri = format!("/objects/{i}").parse().unwrap();
    CacheKey::for_request(
        &config.routes[0],
        Some("api.example.com"),
        &uri,
        &HeaderMap::new(),
    )
}

/// Stores `n` entries shaped `shape` in `cache`; returns the bytes allocated for them.
fn fill(cache: &Cache, shape: Shape, n: usize) -> usize {
    let config = config();
    let before = allocated();
    for i in 0..n {
        cache.store(&key(&config, i), Arc::new(entry(&config, shape, i)));
    }
    cache.local().sync();
    allocated() - before
}

#[test]
fn the_weigher_counts_what_entries_really_cost() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let shapes = [
        Shape {
            body: 1024,
            extra_fields: 0,
            vary: false,
        },
        Shape {
            body: 100,
            extra_fields: 0,
            vary: false,
        },
        Shape {
            body: 3000,
            extra_fields: 12,
            vary: false,
        },
        Shape {
            body: 1024,
            extra_fields: 2,
            vary: true,
        },
    ];
    for shape in shapes {
        let cache = Cache::new(LocalCache::new(1 << 30, None), None);
        let n = 20_000;
        let used = fill(&cache, shape, n);
        let weighed = cache.local().weighted_size() as usize;
        let ratio = weighed as f64 / used as f64;
        assert_eq!(
            cache.local().entry_count() as usize,
            if shape.vary { 2 * n } else { n }
        );
        println!(
            "body {} bytes, {} extra fields, vary {}: weigher {} bytes/entry, jemalloc {} ({ratio:.2}x)",
            shape.body,
            shape.extra_fields,
            shape.vary,
            weighed / n,
            used / n,
        );
        assert!(
            (0.9..=1.1).contains(&ratio),
            "body {} bytes, {} extra fields, vary {}: weigher {} bytes/entry, jemalloc {} ({ratio:.2}x)",
            shape.body,
            shape.extra_fields,
            shape.vary,
            weighed / n,
            used / n,
        );
    }
}

#[test]
fn a_full_cache_holds_no_more_memory_than_max_bytes() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let max_bytes = 16 << 20;
    let cache = Cache::new(LocalCache::new(max_bytes, None), None);
    let shape = Shape {
        body: 1024,
        extra_fields: 0,
        vary: false,
    };
    // About three times what fits.
    let used = fill(&cache, shape, 3 * max_bytes as usize / 1500);
    let held = cache.local().entry_count() as usize;
    println!("{used} bytes allocated for a cache of {max_bytes} bytes holding {held} entries");
    assert!(held > 0 && cache.local().weighted_size() <= max_bytes);
    assert!(
        used as f64 <= 1.2 * max_bytes as f64,
        "{used} bytes allocated for a cache of {max_bytes} (holding {held} entries)"
    );
}
