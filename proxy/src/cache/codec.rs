//! The binary encoding of a cache entry in the shared tier (Redis).
//!
//! Versioned, so instances of different versions sharing one Redis read each other's
//! entries or treat them as misses, never as garbage. Layout (integers big-endian):
//!
//! ```text
//! "CRL" version:u8(=1) status:u16 received_at_ms:u64 age_ms:u64 fresh_for_ms:u64
//! swr_ms:u64 sie_ms:u64 keep_ms:u64 fence:u64 vary_values:(u32 len, bytes)
//! headers:(u32 count, [u16 name len, name, u32 value len, value]...) body:(u32 len, bytes)
//! ```
//!
//! The timings are stored as durations from `received_at`, so an entry means the same
//! on every instance whatever its clock reads now.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use super::entry::CacheEntry;
use super::policy::Lifetime;

const MAGIC: &[u8; 3] = b"CRL";
const VERSION: u8 = 1;

/// Why a stored value could not be read as an entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a corral entry (bad magic)")]
    Foreign,
    #[error("entry encoding version {0} is not known to this corral")]
    UnknownVersion(u8),
    #[error("entry is truncated or corrupt at {0}")]
    Corrupt(&'static str),
}

/// Encodes `entry` as written under the lock grant with fencing token `fence`.
pub fn encode(entry: &CacheEntry, fence: u64) -> Bytes {
    let l = entry.lifetime();
    let mut out = BytesMut::with_capacity(entry.body.len() + 512);
    out.put_slice(MAGIC);
    out.put_u8(VERSION);
    out.put_u16(entry.status.as_u16());
    out.put_u64(unix_ms(l.received_at));
    for d in [
        l.age,
        l.fresh_for,
        l.stale_while_revalidate,
        l.stale_if_error,
        l.keep,
    ] {
        out.put_u64(d.as_millis() as u64);
    }
    out.put_u64(fence);
    put_bytes(&mut out, entry.vary_values.as_bytes());
    out.put_u32(entry.headers.len() as u32);
    for (name, value) in &entry.headers {
        out.put_u16(name.as_str().len() as u16);
        out.put_slice(name.as_str().as_bytes());
        put_bytes(&mut out, value.as_bytes());
    }
    put_bytes(&mut out, &entry.body);
    out.freeze()
}

pub fn decode(mut buf: Bytes) -> Result<CacheEntry, DecodeError> {
    if buf.len() < 4 || &buf[..3] != MAGIC {
        return Err(DecodeError::Foreign);
    }
    buf.advance(3);
    let version = buf.get_u8();
    if version != VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let status = StatusCode::from_u16(u16_(&mut buf, "status")?)
        .map_err(|_| DecodeError::Corrupt("status"))?;
    let received_at = UNIX_EPOCH + Duration::from_millis(u64_(&mut buf, "received_at")?);
    let mut ms = || u64_(&mut buf, "lifetime").map(Duration::from_millis);
    let (age, fresh_for, swr, sie, keep) = (ms()?, ms()?, ms()?, ms()?, ms()?);
    let fence = u64_(&mut buf, "fence")?;
    let vary_values = String::from_utf8(bytes_(&mut buf, "vary")?.to_vec())
        .map_err(|_| DecodeError::Corrupt("vary"))?;
    let count = u32_(&mut buf, "header count")?;
    let mut headers = HeaderMap::with_capacity(count.min(256) as usize);
    for _ in 0..count {
        let len = u16_(&mut buf, "header name")? as usize;
        let name = take(&mut buf, len, "header name")?;
        let name =
            HeaderName::from_bytes(&name).map_err(|_| DecodeError::Corrupt("header name"))?;
        let value = HeaderValue::from_maybe_shared(bytes_(&mut buf, "header value")?)
            .map_err(|_| DecodeError::Corrupt("header value"))?;
        headers.append(name, value);
    }
    let body = bytes_(&mut buf, "body")?;
    if buf.has_remaining() {
        return Err(DecodeError::Corrupt("trailing bytes"));
    }

    let lifetime = Lifetime {
        received_at,
        age,
        fresh_for,
        stale_while_revalidate: swr,
        stale_if_error: sie,
        keep,
    };
    Ok(CacheEntry::from_parts(
        status,
        headers,
        (body, None),
        lifetime,
        vary_values,
        fence,
    ))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
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
    use crate::config::Config;
    use http::{Request, Response};

    fn entry() -> CacheEntry {
        let route = Config::parse(
            "listen = \"127.0.0.1:1\"\n[[route]]\nname = \"r\"\nupstream = \"http://u\"\nstale_if_error = \"1m\"\n",
            "t",
        )
        .unwrap()
        .routes
        .remove(0);
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
        CacheEntry::new(res, Bytes::from_static(b"hello"), *lifetime, &req.headers).with_fence(7)
    }

    #[test]
    fn round_trip_keeps_what_serving_needs() {
        let original = entry();
        let decoded = decode(encode(&original, original.fence())).unwrap();
        assert_eq!(decoded.status, original.status);
        assert_eq!(decoded.headers, original.headers);
        assert_eq!(decoded.body, original.body);
        assert_eq!(decoded.vary, original.vary);
        assert_eq!(decoded.vary_values, original.vary_values);
        assert_eq!(decoded.fence(), 7);
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
        assert_eq!(
            decode(Bytes::from_static(b"hello world")).unwrap_err(),
            DecodeError::Foreign
        );
        assert_eq!(
            decode(Bytes::from_static(b"CRL\x09rest")).unwrap_err(),
            DecodeError::UnknownVersion(9)
        );
        let full = encode(&entry(), 1);
        for cut in [4, 10, 40, full.len() - 1] {
            assert!(
                matches!(decode(full.slice(..cut)), Err(DecodeError::Corrupt(_))),
                "cut at {cut}"
            );
        }
        let mut extra = BytesMut::from(&full[..]);
        extra.put_u8(0);
        assert!(decode(extra.freeze()).is_err());
    }
}
