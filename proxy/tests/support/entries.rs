//! Entries built the way a fill builds them, for the memory test and the
//! `entry_memory` bench (included by path by both; not part of `support/mod.rs`).

use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use corral::cache::entry::CacheEntry;
use corral::cache::policy::{evaluate, Lifetime, Verdict};
use corral::cache::CacheKey;
use corral::config::RouteConfig;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response, Uri};

/// jemalloc's count of bytes allocated by the process, now.
pub fn allocated() -> usize {
    tikv_jemalloc_ctl::epoch::advance().unwrap();
    tikv_jemalloc_ctl::stats::allocated::read().unwrap()
}

/// A response's shape: body size, header fields beside the usual five, whether it
/// varies on `Accept-Language`, and how many purge tags of its own it carries in
/// `Surrogate-Key` (an object id each, as that header is commonly used).
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub body: usize,
    pub extra_fields: usize,
    pub vary: bool,
    pub unique_tags: usize,
}

impl Shape {
    pub const SMALL: Shape = Shape {
        body: 1024,
        extra_fields: 0,
        vary: false,
        unique_tags: 0,
    };
}

/// The `i`th entry shaped `shape` for `route`, as a fill builds it: header values are
/// slices of one read buffer (as hyper hands them over), the body is copied out of its
/// frames into a buffer of its own.
pub fn sample_entry(route: &RouteConfig, shape: Shape, i: usize) -> CacheEntry {
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
        let value = HeaderValue::from_maybe_shared(raw.slice(at..at + len)).unwrap();
        res.headers.append(name, value);
        at += len;
    }
    for f in 0..shape.extra_fields {
        let name = HeaderName::from_bytes(format!("x-field-{f}").as_bytes()).unwrap();
        let value = HeaderValue::from_str(&format!("value {i} {f}")).unwrap();
        res.headers.append(name, value);
    }
    if shape.unique_tags > 0 {
        let tags: Vec<String> = (0..shape.unique_tags)
            .map(|t| format!("obj-{i:06}-{t:02}"))
            .collect();
        let value = HeaderValue::from_str(&tags.join(" ")).unwrap();
        res.headers.append("surrogate-key", value);
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
    let lifetime: Lifetime = match evaluate(route, &req, &res, SystemTime::now()) {
        Verdict::Store(lifetime) => *lifetime,
        Verdict::Pass(reason) => panic!("not stored: {reason:?}"),
    };
    CacheEntry::new(res, body.freeze(), lifetime, &req_headers).unwrap()
}

/// The `i`th object's key on `route`.
pub fn sample_key(route: &RouteConfig, i: usize) -> CacheKey {
    let uri: Uri = format!("/objects/{i}").parse().unwrap();
    CacheKey::for_request(route, Some("api.example.com"), &uri, &HeaderMap::new())
}
