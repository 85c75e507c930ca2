//! Where a cached entry's bytes go: builds N entries the way a fill does (headers as
//! slices of a read buffer, the body copied into a buffer of its own), then stores them
//! in the local tier, and reports jemalloc's allocated bytes per entry at each step
//! beside the weigher's count. The end-to-end figure (process RSS, and Varnish beside
//! it) is `benches/memory.sh`; this one says which part of it is what.
//!
//! Run: `cargo bench -p corral --bench entry_memory` (`N=...` to change the count).

use std::sync::Arc;
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

fn allocated() -> usize {
    epoch::advance().unwrap();
    stats::allocated::read().unwrap()
}

/// The headers of `benches/memory.sh`'s origin, as hyper hands them over: values are
/// slices of one read buffer (which `CacheEntry` must not keep).
fn response_head(i: usize) -> http::response::Parts {
    let raw = Bytes::from(format!(
        "max-age=3600\"v1\"text/plainFri, 27 Nov 2026 14:50:32 GMT{i:08}"
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
        ("etag", 4),
        ("content-type", 10),
        ("date", 29),
    ] {
        let value = HeaderValue::from_maybe_shared(raw.slice(at..at + len)).unwrap();
        res.headers.append(HeaderName::from_static(name), value);
        at += len;
    }
    res.headers
        .append("content-length", HeaderValue::from(1024));
    res
}

fn body() -> Bytes {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[b'.'; 1024]);
    buf.freeze()
}

/// What the route's policy makes of `head` (max-age=3600: stored for an hour).
fn lifetime(route: &corral::config::RouteConfig, head: &http::response::Parts) -> Lifetime {
    let (req, ()) = http::Request::get("/k").body(()).unwrap().into_parts();
    match evaluate(route, &req, head, SystemTime::now()) {
        Verdict::Store(lifetime) => *lifetime,
        Verdict::Pass(reason) => panic!("not stored: {reason:?}"),
    }
}

fn main() {
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let config = Config::parse(
        "listen = \"127.0.0.1:1\"\n[[route]]\nname = \"mem\"\nupstream = \"http://u\"\n",
        "entry_memory",
    )
    .unwrap();
    let route = &config.routes[0];
    let none = HeaderMap::new();
    println!("entries: {n} (1 KiB bodies, 5 headers)");
    println!(
        "size_of::<CacheEntry>(): {} bytes",
        std::mem::size_of::<CacheEntry>()
    );

    let start = allocated();
    let entries: Vec<Arc<CacheEntry>> = (0..n)
        .map(|i| {
            let head = response_head(i);
            let lifetime = lifetime(route, &head);
            Arc::new(CacheEntry::new(head, body(), lifetime, &none).unwrap())
        })
        .collect();
    let built = allocated();
    let per_entry = (built - start - n * std::mem::size_of::<usize>()) as f64 / n as f64;
    println!("entry (Arc<CacheEntry>, head, body): {per_entry:.0} bytes allocated per entry");

    let keys: Vec<CacheKey> = (0..n)
        .map(|i| {
            let uri: Uri = format!("/k/{i}").parse().unwrap();
            CacheKey::for_request(route, Some("127.0.0.1:40000"), &uri, &none)
        })
        .collect();
    let keyed = allocated();
    let per_key = (keyed - built - n * std::mem::size_of::<CacheKey>()) as f64 / n as f64;
    println!("key: {per_key:.0} bytes allocated per key");

    let cache = Cache::new(LocalCache::new(4 << 30, None), None);
    let before_store = allocated();
    for (key, entry) in keys.iter().zip(&entries) {
        cache.store(key, Arc::clone(entry));
    }
    cache.local().sync();
    let stored = allocated();
    println!(
        "local tier (moka's own records per entry): {:.0} bytes allocated per entry",
        (stored - before_store) as f64 / n as f64
    );
    drop(keys);
    drop(entries);
    let total = allocated() - start;
    let weighed = cache.local().weighted_size();
    println!(
        "total: {:.0} bytes allocated per entry; weigher: {:.0} per entry ({:.2}x allocated)",
        total as f64 / n as f64,
        weighed as f64 / n as f64,
        weighed as f64 / total as f64
    );
}
