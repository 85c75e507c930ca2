//! The binary encoding of a cache entry in the shared tier (Redis).
//!
//! Versioned, so instances of different versions sharing one Redis read each other's
//! entries or treat them as misses, never as garbage. Layout (integers big-endian):
//!
//! ```text
//! "CRL" version:u8(=3) status:u16 received_at_ms:u64 age_ms:u64 fresh_for_ms:u64
//! swr_ms:u64 sie_ms:u64 keep_ms:u64 fence:u64 fetch_ms:u32 primary_key:(u32 len, bytes)
//! vary_values:(u32 len, bytes)
//! headers:(u32 count, [u16 name len, name, u32 value len, value]...) body:(u32 len, bytes)
//! ```
//!
//! The timings are stored as durations from `received_at`, so an entry means the same
//! on every instance whatever its clock reads now. The first 30 bytes are read by the
//! fleet lock's script too (`fill/lock/single.rs`: is a fresh entry there already?):
//! a new version must keep `received_at` and `fresh_for` where they are, or change the
//! script with it. Version 2 (without `fetch_ms`) is still read, as an entry whose fetch
//! time is unknown; an instance of an older version reads a version 3 entry as a miss
//! (during a rolling upgrade, its fills are not shared with the newer instances).
//!
//! A value read back is untrusted: the key prefix may be shared with other software,
//! and Redis is another process. Decoding checks every length against what is left
//! (a declared length allocates nothing), refuses an entry written for another key or
//! with a body over the local tier's `max_object_bytes`, caps its timings, and frames
//! what it serves again exactly as a response from the upstream is framed
//! ([`entry::frame`](super::entry)): status, headers and `Content-Length` never come
//! from the stored bytes as they are.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use super::entry::{CacheEntry, Unframeable};
use super::key::CacheKey;
use super::policy::Lifetime;

const MAGIC: &[u8; 3] = b"CRL";
/// 2: the primary key is stored, so an entry found under another key is refused.
/// 3: how long the fetch took (`fetch_ms`, for early refresh), after the fence.
const VERSION: u8 = 3;
/// More header fields than any upstream response corral stores (hyper's client reads at
/// most 100); a value declaring more is not an entry.
const MAX_HEADERS: u32 = 256;
/// Timings above this (about 317 years, in ms) are read as this: beyond any real
/// lifetime, and far below where adding them to an instant could overflow.
const MAX_MS: u64 = 10_000_000_000_000;

/// Why a stored value could not be read as an entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a corral entry (bad magic)")]
    Foreign,
    #[error("entry encoding version {0} is not known to this corral")]
    UnknownVersion(u8),
    #[error("entry is truncated or corrupt at {0}")]
    Corrupt(&'static str),
    #[error("entry was written for another cache key")]
    OtherKey,
    #[error("entry body of {len} bytes is over max_object_bytes ({max})")]
    TooLarge { len: u64, max: u64 },
    #[error("entry cannot be served: {0}")]
    Unframeable(#[from] Unframeable),
}

impl DecodeError {
    /// The metric label of this kind of failure.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            DecodeError::Foreign => "foreign",
            DecodeError::UnknownVersion(_) => "version",
            DecodeError::Corrupt(_) => "corrupt",
            DecodeError::OtherKey => "other-key",
            DecodeError::TooLarge { .. } => "too-large",
            DecodeError::Unframeable(_) => "unframeable",
        }
    }
}

/// Encodes `entry`, filled for `key` (its primary key is stored) and written under the
/// lock grant with fencing token `fence`.
pub fn encode(entry: &CacheEntry, key: &CacheKey, fence: u64) -> Bytes {
    let l = entry.lifetime();
    let primary = key.primary().as_bytes();
    let mut out = BytesMut::with_capacity(entry.body().len() + primary.len() + 512);
    out.put_slice(MAGIC);
    out.put_u8(VERSION);
    out.put_u16(entry.status().as_u16());
    out.put_u64(unix_ms(l.received_at));
    for d in [
        l.age,
        l.fresh_for,
        l.stale_while_revalidate,
        l.stale_if_error,
        l.keep,
    ] {
        out.put_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    }
    out.put_u64(fence);
    out.put_u32(u32::try_from(entry.fetch_time().as_millis()).unwrap_or(u32::MAX));
    put_bytes(&mut out, primary);
    put_bytes(&mut out, entry.vary_values().as_bytes());
    out.put_u32(entry.fields().len() as u32);
    for (name, value) in entry.fields() {
        out.put_u16(name.len() as u16);
        out.put_slice(name);
        put_bytes(&mut out, value);
    }
    put_bytes(&mut out, entry.body());
    out.freeze()
}

/// Reads the value found under `key`'s entry: an entry for `key` (or its primary)
/// whose body is at most `max_body` bytes, framed for serving.
pub fn decode(mut buf: Bytes, key: &CacheKey, max_body: u64) -> Result<CacheEntry, DecodeError> {
    if buf.len() < 4 || &buf[..3] != MAGIC {
        return Err(DecodeError::Foreign);
    }
    buf.advance(3);
    let version = buf.get_u8();
    if version != VERSION && version != 2 {
        return Err(DecodeError::UnknownVersion(version));
    }
    let status = StatusCode::from_u16(u16_(&mut buf, "status")?)
        .map_err(|_| DecodeError::Corrupt("status"))?;
    let mut ms = |what| u64_(&mut buf, what).map(|ms| Duration::from_millis(ms.min(MAX_MS)));
    let received_at = UNIX_EPOCH + ms("received_at")?;
    let (age, fresh_for) = (ms("age")?, ms("fresh_for")?);
    let (swr, sie, keep) = (ms("swr")?, ms("sie")?, ms("keep")?);
    let fence = u64_(&mut buf, "fence")?;
    let fetch_time = if version == 2 {
        Duration::ZERO
    } else {
        Duration::from_millis(u64::from(u32_(&mut buf, "fetch_ms")?))
    };
    if bytes_(&mut buf, "key")? != key.primary().as_bytes() {
        return Err(DecodeError::OtherKey);
    }
    let vary_values = std::str::from_utf8(&bytes_(&mut buf, "vary")?)
        .map_err(|_| DecodeError::Corrupt("vary"))?
        .into();
    let headers = headers(&mut buf)?;
    let body = bytes_(&mut buf, "body")?;
    if buf.has_remaining() {
        return Err(DecodeError::Corrupt("trailing bytes"));
    }
    if body.len() as u64 > max_body {
        return Err(DecodeError::TooLarge {
            len: body.len() as u64,
            max: max_body,
        });
    }
    let lifetime = Lifetime {
        received_at,
        age,
        fresh_for,
        stale_while_revalidate: swr,
        stale_if_error: sie,
        keep,
    };
    let entry = CacheEntry::restored(status, headers, body, lifetime, vary_values, fence)?;
    Ok(entry.fetched_in(fetch_time))
}

/// The header fields, each name and value checked as hyper checks a received one (no
/// CR, LF or NUL can reach a response head).
fn headers(buf: &mut Bytes) -> Result<HeaderMap, DecodeError> {
    let count = u32_(buf, "header count")?;
    if count > MAX_HEADERS {
        return Err(DecodeError::Corrupt("header count"));
    }
    let mut headers = HeaderMap::with_capacity(count as usize);
    for _ in 0..count {
        let len = u16_(buf, "header name")? as usize;
        let name = take(buf, len, "header name")?;
        let name =
            HeaderName::from_bytes(&name).map_err(|_| DecodeError::Corrupt("header name"))?;
        let value = HeaderValue::from_maybe_shared(bytes_(buf, "header value")?)
            .map_err(|_| DecodeError::Corrupt("header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

fn unix_ms(t: SystemTime) -> u64 {
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

fn u16_(buf: &mut Bytes, what: &'static str) -> Result<u16, DecodeError> {
    (buf.remaining() >= 2)
        .then(|| buf.get_u16())
        .ok_or(DecodeError::Corrupt(what))
}

fn u32_(buf: &mut Bytes, what: &'static str) -> Result<u32, DecodeError> {
    (buf.remaining() >= 4)
        .then(|| buf.get_u32())
        .ok_or(DecodeError::Corrupt(what))
}

fn u64_(buf: &mut Bytes, what: &'static str) -> Result<u64, DecodeError> {
    (buf.remaining() >= 8)
        .then(|| buf.get_u64())
        .ok_or(DecodeError::Corrupt(what))
}

fn take(buf: &mut Bytes, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
    (buf.remaining() >= len)
        .then(|| buf.split_to(len))
        .ok_or(DecodeError::Corrupt(what))
}

fn bytes_(buf: &mut Bytes, what: &'static str) -> Result<Bytes, DecodeError> {
    let len = u32_(buf, what)? as usize;
    take(buf, len, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::{evaluate, Verdict};
    use crate::config::{test_route, RouteConfig};
    use http::{Request, Response};
    use proptest::prelude::*;

    const MAX: u64 = 1 << 20;

    fn key() -> CacheKey {
        CacheKey::from_raw("r\nh\n/p")
    }

    fn entry() -> CacheEntry {
        let route = RouteConfig {
            stale_if_error: Duration::from_secs(60),
            ..test_route()
        };
        let (req, ()) = Request::get("/p")
            .header("accept-language", "fr")
            .body(())
            .unwrap()
            .into_parts();
        let (res, ()) = Response::builder()
            .header("cache-control", "max-age=30")
            .header("etag", "\"x\"")
            .header("vary", "accept-language")
            .body(())
            .unwrap()
            .into_parts();
        let Verdict::Store(lifetime) = evaluate(&route, &req, &res, SystemTime::now()) else {
            panic!()
        };
        CacheEntry::new(res, Bytes::from_static(b"hello"), *lifetime, &req.headers)
            .unwrap()
            .with_fence(7)
            .fetched_in(Duration::from_millis(1234))
    }

    #[test]
    fn round_trip_keeps_what_serving_needs() {
        let original = entry();
        let decoded = decode(encode(&original, &key(), original.fence()), &key(), MAX).unwrap();
        assert_eq!(decoded.status(), original.status());
        assert_eq!(decoded.headers(), original.headers());
        assert_eq!(decoded.http1_head(), original.http1_head());
        assert_eq!(decoded.body(), original.body());
        assert_eq!(decoded.vary(), original.vary());
        assert_eq!(decoded.vary_values(), original.vary_values());
        assert_eq!(decoded.fence(), 7);
        assert_eq!(decoded.fetch_time(), Duration::from_millis(1234));
        let now = SystemTime::now();
        assert_eq!(
            decoded.freshness(now).is_fresh(),
            original.freshness(now).is_fresh()
        );
        assert_eq!(
            unix_ms(decoded.keep_until()),
            unix_ms(original.keep_until())
        );
        assert_eq!(
            decoded.within_stale_if_error(now),
            original.within_stale_if_error(now)
        );
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        let read = |v: Bytes| decode(v, &key(), MAX);
        assert_eq!(
            read(Bytes::from_static(b"hello world")).unwrap_err(),
            DecodeError::Foreign
        );
        assert_eq!(
            read(Bytes::from_static(b"CRL\x09rest")).unwrap_err(),
            DecodeError::UnknownVersion(9)
        );
        let full = encode(&entry(), &key(), 1);
        for cut in [4, 10, 40, full.len() - 1] {
            assert!(
                matches!(read(full.slice(..cut)), Err(DecodeError::Corrupt(_))),
                "cut at {cut}"
            );
        }
        let mut extra = BytesMut::from(&full[..]);
        extra.put_u8(0);
        assert!(read(extra.freeze()).is_err());
    }

    #[test]
    fn an_entry_is_read_for_its_own_key_and_its_variants_only() {
        let value = encode(&entry(), &key(), 1);
        assert!(decode(value.clone(), &key().variant("accept-language:fr\n"), MAX).is_ok());
        let other = CacheKey::from_raw("r\nh\n/q");
        assert_eq!(
            decode(value, &other, MAX).unwrap_err(),
            DecodeError::OtherKey
        );
    }

    #[test]
    fn a_body_over_the_object_bound_is_refused() {
        let value = encode(&entry(), &key(), 1);
        assert_eq!(
            decode(value, &key(), 4).unwrap_err(),
            DecodeError::TooLarge { len: 5, max: 4 }
        );
    }

    /// An entry an instance of the previous version wrote (version 2, no fetch time)
    /// is still read, its fetch time unknown.
    #[test]
    fn a_version_2_entry_is_read_without_a_fetch_time() {
        let received = unix_ms(SystemTime::now());
        let old = Crafted {
            status: 200,
            times: [received, 0, 60_000, 0, 0, 0],
            headers: vec![("etag".into(), b"\"v\"".to_vec())],
            declared_body: None,
            body: b"old".to_vec(),
        };
        let entry = decode(old.bytes(), &key(), MAX).unwrap();
        assert_eq!(entry.fetch_time(), Duration::ZERO);
        assert_eq!(entry.body(), b"old");
        assert!(entry.freshness(SystemTime::now()).is_fresh());
    }

    /// A value as anything else might write it: every field chosen by the writer.
    #[derive(Debug, Clone)]
    struct Crafted {
        status: u16,
        times: [u64; 6],
        headers: Vec<(String, Vec<u8>)>,
        declared_body: Option<u32>,
        body: Vec<u8>,
    }

    impl Crafted {
        fn bytes(&self) -> Bytes {
            let mut out = BytesMut::new();
            out.put_slice(b"CRL\x02");
            out.put_u16(self.status);
            for t in self.times {
                out.put_u64(t);
            }
            out.put_u64(1);
            put_bytes(&mut out, key().primary().as_bytes());
            put_bytes(&mut out, b"");
            out.put_u32(self.headers.len() as u32);
            for (name, value) in &self.headers {
                out.put_u16(name.len() as u16);
                out.put_slice(name.as_bytes());
                put_bytes(&mut out, value);
            }
            out.put_u32(self.declared_body.unwrap_or(self.body.len() as u32));
            out.put_slice(&self.body);
            out.freeze()
        }
    }

    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("content-length".to_string()),
            Just("transfer-encoding".to_string()),
            Just("connection".to_string()),
            Just("upgrade".to_string()),
            Just("keep-alive".to_string()),
            Just("te".to_string()),
            Just("trailer".to_string()),
            Just("proxy-connection".to_string()),
            Just("set-cookie".to_string()),
            Just("x-a".to_string()),
            "[a-zA-Z-]{1,12}",
            "[ -~]{0,8}",
        ]
    }

    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"chunked".to_vec()),
            Just(b"close, x-a".to_vec()),
            Just(b"0".to_vec()),
            Just(b"18446744073709551616".to_vec()),
            "[ -~]{0,16}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..16),
        ]
    }

    fn crafted() -> impl Strategy<Value = Crafted> {
        (
            prop_oneof![Just(101u16), Just(204), Just(304), 0u16..1100],
            any::<[u64; 6]>(),
            proptest::collection::vec((header_name(), header_value()), 0..8),
            proptest::option::weighted(0.1, any::<u32>()),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(status, times, headers, declared_body, body)| Crafted {
                status,
                times,
                headers,
                declared_body,
                body,
            })
    }

    /// The head as a client parses it: its `Content-Length`, and whether it carries any
    /// other framing or hop-by-hop field.
    fn parsed_head(head: &[u8]) -> (u16, Vec<(String, String)>) {
        let mut wire = head.to_vec();
        wire.extend_from_slice(b"\r\n");
        let mut fields = [httparse::EMPTY_HEADER; 300];
        let mut res = httparse::Response::new(&mut fields);
        let status = res.parse(&wire).expect("the head parses");
        assert!(status.is_complete());
        let fields = res
            .headers
            .iter()
            .map(|h| {
                let value = String::from_utf8_lossy(h.value).into_owned();
                (h.name.to_ascii_lowercase(), value)
            })
            .collect();
        (res.code.expect("a status"), fields)
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut with_magic = b"CRL\x02".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = decode(Bytes::from(bytes), &key(), MAX);
            let _ = decode(Bytes::from(with_magic), &key(), MAX);
        }

        #[test]
        fn decoding_a_mutated_entry_never_panics(at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut value = encode(&entry(), &key(), 3).to_vec();
            let i = at.index(value.len());
            value[i] = byte;
            value.truncate(cut.index(value.len() + 1).max(i));
            let _ = decode(Bytes::from(value), &key(), MAX);
        }

        #[test]
        fn any_decoded_entry_has_a_well_framed_head(c in crafted()) {
            let Ok(entry) = decode(c.bytes(), &key(), MAX) else { return Ok(()) };
            let (status, fields) = parsed_head(entry.http1_head());
            prop_assert!((200..=599).contains(&status));
            let lengths: Vec<&str> = fields
                .iter()
                .filter(|(n, _)| n == "content-length")
                .map(|(_, v)| v.as_str())
                .collect();
            if status == 204 || status == 304 {
                prop_assert!(lengths.is_empty());
                prop_assert!(entry.body().is_empty());
            } else {
                let body_len = entry.body().len().to_string();
                prop_assert_eq!(lengths, vec![body_len.as_str()]);
            }
            for banned in ["transfer-encoding", "connection", "upgrade", "keep-alive", "te", "trailer", "proxy-connection", "set-cookie"] {
                prop_assert!(fields.iter().all(|(n, _)| n != banned), "{} in {:?}", banned, fields);
            }
            let now = SystemTime::now();
            let _ = (entry.freshness(now), entry.age(now), entry.keep_until(), entry.weight());
        }

        #[test]
        fn encoding_then_decoding_returns_the_entry(
            status in prop_oneof![200u16..=203, 205u16..=303, 305u16..=599],
            headers in proptest::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,20}"), 0..6),
            body in proptest::collection::vec(any::<u8>(), 0..256),
            fresh_s in 0u64..10_000_000,
        ) {
            let mut res = Response::builder().status(status);
            for (n, v) in &headers {
                res = res.header(n.as_str(), v.trim());
            }
            let (head, ()) = res.body(()).unwrap().into_parts();
            let lifetime = Lifetime {
                received_at: UNIX_EPOCH + Duration::from_millis(1_800_000_000_000),
                age: Duration::from_secs(3),
                fresh_for: Duration::from_secs(fresh_s),
                stale_while_revalidate: Duration::from_secs(5),
                stale_if_error: Duration::from_secs(6),
                keep: Duration::from_secs(7),
            };
            let original = CacheEntry::new(head, Bytes::from(body), lifetime, &HeaderMap::new()).unwrap();
            let decoded = decode(encode(&original, &key(), 9), &key(), MAX).unwrap();
            prop_assert_eq!(decoded.status(), original.status());
            prop_assert_eq!(decoded.headers(), original.headers());
            prop_assert_eq!(&decoded.http1_head(), &original.http1_head());
            prop_assert_eq!(&decoded.body(), &original.body());
            prop_assert_eq!(decoded.keep_until(), original.keep_until());
            prop_assert_eq!(decoded.fence(), 9);
        }
    }
}
