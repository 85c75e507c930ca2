//! A cached response: what is served for it, and the instants at which it turns stale
//! and stops being servable at all.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{request, response, HeaderMap, StatusCode};
use http_cache_semantics::{AfterResponse, CacheOptions, CachePolicy};

use super::body_file::BodyFile;
use super::key::vary_values;
use super::policy::{self, Lifetime, PassReason, Verdict};
use crate::config::RouteConfig;
use crate::http::headers::strip_hop_by_hop;

/// A stored response. Immutable once built; a refresh builds a new one.
#[derive(Debug)]
pub struct CacheEntry {
    pub(crate) status: StatusCode,
    /// Headers as served: no hop-by-hop headers, `Content-Length` set. `Age` and
    /// `Cache-Status` are added per response.
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// For a large body, the sealed file it lives in (and `body` maps), which a hit
    /// sends without copying.
    pub(crate) body_file: Option<Arc<BodyFile>>,
    /// The status line and `headers` as HTTP/1.1 writes them, plus `Via`: what a hit
    /// on the HTTP/1 fast path sends before its `Age` and `Cache-Status`. Built once,
    /// here, so a hit encodes no stored header again.
    pub(crate) http1_head: Bytes,
    /// The headers this response varies on (lowercase), and the filling request's
    /// values of them, as [`vary_values`] writes them.
    pub(crate) vary: Vec<HeaderName>,
    pub(crate) vary_values: String,
    lifetime: Lifetime,
    fresh_until: SystemTime,
    swr_until: SystemTime,
    sie_until: SystemTime,
    keep_until: SystemTime,
    last_modified: Option<SystemTime>,
    fence: u64,
}

fn vary_names(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// `headers` in a map that lives as long as the entry, every name and value in memory
/// of its own. Headers parsed by hyper are slices of its connection's read buffer:
/// kept as they are, each entry would keep that whole buffer alive (8 KiB and more,
/// shared with the responses read after it), which `benches/memory.sh` measured at
/// 8,237 bytes of RSS per cached 1 KiB object, against 3,794 with the copy. No spare
/// room but for the three headers every hit adds (Age, Via, Cache-Status), so a hit's
/// copy never reallocates.
fn owned_headers(headers: HeaderMap) -> HeaderMap {
    let mut owned = HeaderMap::with_capacity(headers.len() + 3);
    for (name, value) in headers.iter() {
        // Standard names are static; others, and every value, are copied.
        let name =
            HeaderName::from_bytes(name.as_str().as_bytes()).unwrap_or_else(|_| name.clone());
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        owned.append(name, copy);
    }
    owned
}

fn http1_head(status: StatusCode, headers: &HeaderMap) -> Bytes {
    let len = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>();
    let mut out = Vec::with_capacity(len + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"via: ");
    out.extend_from_slice(crate::http::headers::VIA.as_bytes());
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

/// Why a response cannot be a cache entry: replaying it would not be one well-framed
/// HTTP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unframeable {
    #[error("status {0} is not a final status (200-599)")]
    Status(u16),
    #[error("a {status} response has no content, yet {len} body bytes came with it")]
    BodyNotAllowed { status: u16, len: usize },
}

/// Framing and hop-by-hop headers, whoever set them. `Proxy-*` headers are about one
/// hop too (RFC 9110 §11.7, §7.6.1), and stored entries are never sent to a proxy.
fn is_per_hop(name: &HeaderName) -> bool {
    name.as_str().starts_with("proxy-")
}

/// The one place a stored response's framing is decided, for responses from the
/// upstream and for entries read back from Redis alike: a final status; no
/// hop-by-hop, `Proxy-*` or framing header, wherever the headers came from; no `Age`
/// (added per response) or `Set-Cookie` (the filling client's); and `Content-Length`
/// computed from the body, or absent for 204 and 304, which have no content (RFC 9110
/// §8.6, §15.3.5, §15.4.5). So `http1_head`, which the fast path writes verbatim, frames
/// exactly the body written after it, and hyper's path sends the same.
pub(crate) fn frame(
    status: StatusCode,
    headers: &mut HeaderMap,
    body_len: usize,
) -> Result<(), Unframeable> {
    let code = status.as_u16();
    if !(200..=599).contains(&code) {
        return Err(Unframeable::Status(code));
    }
    let bodiless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    if bodiless && body_len != 0 {
        return Err(Unframeable::BodyNotAllowed {
            status: code,
            len: body_len,
        });
    }
    strip_hop_by_hop(headers);
    if headers.keys().any(is_per_hop) {
        let named: Vec<HeaderName> = headers.keys().filter(|n| is_per_hop(n)).cloned().collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in [header::CONTENT_LENGTH, header::AGE, header::SET_COOKIE] {
        headers.remove(name);
    }
    if !bodiless {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    }
    Ok(())
}

/// Where an entry stands at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Servable as is, for `ttl` more.
    Fresh { ttl: Duration },
    /// Past its freshness by `by`.
    Stale { by: Duration },
}

impl Freshness {
    pub(crate) fn is_fresh(self) -> bool {
        matches!(self, Freshness::Fresh { .. })
    }
}

impl CacheEntry {
    /// Builds an entry from a response's head and full body. `req_headers` are the
    /// filling request's, for `Vary`. Fails only for a response no cache may replay:
    /// an interim status, or content on a 204 or 304 (see [`Unframeable`]).
    pub fn new(
        mut head: response::Parts,
        body: Bytes,
        lifetime: Lifetime,
        req_headers: &HeaderMap,
    ) -> Result<CacheEntry, Unframeable> {
        frame(head.status, &mut head.headers, body.len())?;
        let vary = vary_names(&head.headers);
        let vary_values = vary_values(&vary, req_headers);
        Ok(CacheEntry::from_parts(
            head.status,
            head.headers,
            (body, None),
            lifetime,
            vary_values,
            0,
        ))
    }

    /// An entry from parts read back from the shared tier, which may have been written
    /// by anything: framed again exactly as a response from the upstream is.
    pub(crate) fn restored(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        lifetime: Lifetime,
        vary_values: String,
        fence: u64,
    ) -> Result<CacheEntry, Unframeable> {
        frame(status, &mut headers, body.len())?;
        Ok(CacheEntry::from_parts(
            status,
            headers,
            (body, None),
            lifetime,
            vary_values,
            fence,
        ))
    }

    /// An entry from parts whose headers went through [`frame`] (by [`CacheEntry::new`],
    /// [`CacheEntry::restored`], or for the entry being copied). A large body without
    /// its file gets one.
    fn from_parts(
        status: StatusCode,
        headers: HeaderMap,
        (body, body_file): (Bytes, Option<Arc<BodyFile>>),
        lifetime: Lifetime,
        vary_values: String,
        fence: u64,
    ) -> CacheEntry {
        let (body, body_file) = match body_file {
            Some(file) => (body, Some(file)),
            None => match BodyFile::store(&body) {
                Some((file, mapped)) => (mapped, Some(file)),
                None => (body, None),
            },
        };
        let headers = owned_headers(headers);
        // Every span is clamped (an entry may come from Redis, written by anything), so
        // no sum below can overflow a SystemTime.
        let span = |d: Duration| d.min(policy::MAX_DELTA);
        let at = |d: Duration| {
            lifetime
                .received_at
                .checked_add(d)
                .unwrap_or(lifetime.received_at)
        };
        let fresh_for = span(lifetime.fresh_for);
        let swr = span(lifetime.stale_while_revalidate);
        let sie = span(lifetime.stale_if_error);
        let last_modified = headers
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        CacheEntry {
            status,
            vary: vary_names(&headers),
            http1_head: http1_head(status, &headers),
            headers,
            body,
            body_file,
            vary_values,
            fresh_until: at(fresh_for),
            swr_until: at(fresh_for + swr),
            sie_until: at(fresh_for + sie),
            keep_until: at(fresh_for + swr.max(sie) + span(lifetime.keep)),
            last_modified,
            lifetime,
            fence,
        }
    }

    /// The fencing token of the lock grant under which this entry was written to the
    /// shared tier; 0 for an entry that never was.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    #[cfg(test)]
    pub(crate) fn with_fence(mut self, fence: u64) -> CacheEntry {
        self.fence = fence;
        self
    }

    pub fn lifetime(&self) -> &Lifetime {
        &self.lifetime
    }

    /// A copy that turned stale at `at` (soft purge): still servable within its stale
    /// windows and revalidatable, but never again fresh without asking the upstream.
    pub(crate) fn soft_purged(&self, at: SystemTime) -> CacheEntry {
        let mut lifetime = self.lifetime.clone();
        lifetime.fresh_for = at
            .duration_since(lifetime.received_at)
            .unwrap_or_default()
            .min(lifetime.fresh_for);
        CacheEntry::from_parts(
            self.status,
            self.headers.clone(),
            (self.body.clone(), self.body_file.clone()),
            lifetime,
            self.vary_values.clone(),
            self.fence,
        )
    }

    pub fn freshness(&self, now: SystemTime) -> Freshness {
        match self.fresh_until.duration_since(now) {
            Ok(ttl) if !ttl.is_zero() => Freshness::Fresh { ttl },
            Ok(_) => Freshness::Stale { by: Duration::ZERO },
            Err(e) => Freshness::Stale { by: e.duration() },
        }
    }

    /// Whether a stale copy may be served at once while a refresh runs.
    pub(crate) fn within_stale_while_revalidate(&self, now: SystemTime) -> bool {
        now < self.swr_until
    }

    /// Whether a stale copy may be served when the upstream fails.
    pub(crate) fn within_stale_if_error(&self, now: SystemTime) -> bool {
        now < self.sie_until
    }

    /// After this instant the entry can serve no one, nor be revalidated: drop it.
    pub(crate) fn keep_until(&self) -> SystemTime {
        self.keep_until
    }

    /// The `Age` to send, in seconds.
    pub fn age(&self, now: SystemTime) -> u64 {
        let resident = now
            .duration_since(self.lifetime.received_at)
            .unwrap_or_default();
        self.lifetime.age.saturating_add(resident).as_secs()
    }

    /// What the entry costs the local cache, in bytes (body, headers, bookkeeping).
    pub fn weight(&self) -> u32 {
        // Measured by benches/memory.sh: a header costs its bytes plus about 112 bytes of
        // map bucket and index; the entry, its Arc and moka's node about 700 more.
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 112)
            .sum();
        let file = self.body_file.as_ref().map_or(0, |f| f.overhead());
        let total =
            self.body.len() + file + headers + self.http1_head.len() + self.vary_values.len() + 700;
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// Whether this entry is the variant for a request with `req_headers`.
    pub(crate) fn matches_vary(&self, req_headers: &HeaderMap) -> bool {
        self.vary.is_empty() || vary_values(&self.vary, req_headers) == self.vary_values
    }

    /// Whether a client's conditional request is satisfied by this entry, so that it
    /// gets `304 Not Modified` (RFC 9110 §13.1.2 and §13.1.3; `If-None-Match` wins).
    pub(crate) fn satisfies_conditional(&self, req_headers: &HeaderMap) -> bool {
        if !self.status.is_success() {
            return false;
        }
        if let Some(inm) = req_headers.get(header::IF_NONE_MATCH) {
            let Some(etag) = self.headers.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
                return false;
            };
            let etag = etag.trim_start_matches("W/");
            return inm.to_str().is_ok_and(|inm| {
                inm.split(',')
                    .any(|t| t.trim() == "*" || t.trim().trim_start_matches("W/") == etag)
            });
        }
        if let Some(ims) = req_headers.get(header::IF_MODIFIED_SINCE) {
            let since = ims
                .to_str()
                .ok()
                .and_then(|v| httpdate::parse_http_date(v).ok());
            return matches!((self.last_modified, since), (Some(lm), Some(since)) if lm <= since);
        }
        false
    }

    /// The headers a `304 Not Modified` for this entry carries (RFC 9110 §15.4.5).
    pub(crate) fn not_modified_headers(&self) -> HeaderMap {
        let mut out = HeaderMap::new();
        for name in [
            header::CACHE_CONTROL,
            header::CONTENT_LOCATION,
            header::DATE,
            header::ETAG,
            header::EXPIRES,
            header::LAST_MODIFIED,
            header::VARY,
        ] {
            for v in self.headers.get_all(&name) {
                out.append(name.clone(), v.clone());
            }
        }
        out
    }

    /// Adds this entry's validators to a revalidation request.
    pub(crate) fn add_validators(&self, headers: &mut HeaderMap) {
        if let Some(etag) = self.headers.get(header::ETAG) {
            headers.insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(lm) = self.headers.get(header::LAST_MODIFIED) {
            headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
        }
    }

    /// The entry renewed by a `304 Not Modified` from the upstream: the stored body under
    /// the updated headers and a new lifetime. `Err(None)` when the 304 does not match
    /// this entry's validators, `Err(Some(reason))` when the updated response may not
    /// be stored (for a request-specific reason, the body is still current for `req`).
    pub fn renewed(
        &self,
        route: &RouteConfig,
        req: &request::Parts,
        not_modified: &response::Parts,
        received_at: SystemTime,
    ) -> Result<CacheEntry, Option<PassReason>> {
        // The stored exchange as the policy crate sees it, rebuilt here rather than kept
        // with every entry: only this rare merge needs it, and it costs kilobytes.
        let mut stored = http::Response::new(());
        *stored.status_mut() = self.status;
        *stored.headers_mut() = policy::clamped(&self.headers);
        let mut not_modified = not_modified.clone();
        not_modified.headers = policy::clamped(&not_modified.headers);
        let original = http::Request::get("/").body(()).expect("a static request");
        let policy = CachePolicy::new_options(
            &original,
            &stored,
            self.lifetime.received_at,
            CacheOptions::default(),
        );
        let AfterResponse::NotModified(_, mut merged) =
            policy.after_response(req, &not_modified, received_at)
        else {
            return Err(None);
        };
        merged.status = self.status;
        // The crate adds the Age it computed; our own Age is added per response.
        merged.headers.remove(header::AGE);
        match policy::evaluate(route, req, &merged, received_at) {
            Verdict::Store(lifetime) => {
                CacheEntry::new(merged, self.body.clone(), *lifetime, &req.headers)
                    .map_err(|_| None)
            }
            Verdict::Pass(reason) => Err(Some(reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Response;

    fn head(status: u16, headers: &[(&str, &str)]) -> response::Parts {
        let mut res = Response::builder().status(status);
        for (name, value) in headers {
            res = res.header(*name, *value);
        }
        res.body(()).unwrap().into_parts().0
    }

    fn lifetime() -> Lifetime {
        Lifetime {
            received_at: SystemTime::now(),
            age: Duration::ZERO,
            fresh_for: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            keep: Duration::ZERO,
        }
    }

    fn build(status: u16, headers: &[(&str, &str)], body: &'static [u8]) -> CacheEntry {
        CacheEntry::new(
            head(status, headers),
            Bytes::from_static(body),
            lifetime(),
            &HeaderMap::new(),
        )
        .unwrap()
    }

    /// Headers as hyper parses them: slices of one read buffer. The entry keeps none
    /// of that buffer (it would pin the whole buffer for as long as it lives).
    #[test]
    fn stored_headers_do_not_point_into_the_buffer_they_were_parsed_from() {
        let buffer = Bytes::from_static(b"x-custom-name: shared value\r\nx-other: 2\r\n");
        let within = |p: *const u8| {
            let start = buffer.as_ptr() as usize;
            (start..start + buffer.len()).contains(&(p as usize))
        };
        let mut res = head(200, &[]);
        let name = HeaderName::from_bytes(&buffer[..13]).unwrap();
        let value = HeaderValue::from_maybe_shared(buffer.slice(15..27)).unwrap();
        assert!(
            within(value.as_bytes().as_ptr()),
            "the test's value is a slice"
        );
        res.headers.append(name, value);
        let entry =
            CacheEntry::new(res, Bytes::from_static(b"b"), lifetime(), &HeaderMap::new()).unwrap();
        let stored = entry.headers.get("x-custom-name").expect("kept");
        assert_eq!(stored, "shared value");
        assert!(!within(stored.as_bytes().as_ptr()));
        for (name, value) in &entry.headers {
            assert!(!within(name.as_str().as_ptr()) && !within(value.as_bytes().as_ptr()));
        }
    }

    #[test]
    fn upstream_framing_is_replaced_by_the_bodys_length() {
        let entry = build(
            200,
            &[
                ("transfer-encoding", "chunked"),
                ("content-length", "999"),
                ("content-length", "3"),
                ("connection", "close, x-hop"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("upgrade", "h2c"),
                ("trailer", "x-sum"),
                ("proxy-authenticate", "Basic"),
                ("proxy-status", "origin; error=x"),
                ("age", "100"),
                ("x-kept", "yes"),
            ],
            b"hello",
        );
        let mut names: Vec<&str> = entry.headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-kept"]);
        assert_eq!(entry.headers[header::CONTENT_LENGTH], "5");
        let head = std::str::from_utf8(&entry.http1_head).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(head.matches("content-length").count(), 1, "{head}");
    }

    #[test]
    fn interim_statuses_are_refused() {
        for status in [100, 101, 103] {
            let res = CacheEntry::new(
                head(status, &[("upgrade", "websocket")]),
                Bytes::new(),
                lifetime(),
                &HeaderMap::new(),
            );
            assert_eq!(res.unwrap_err(), Unframeable::Status(status));
        }
    }

    #[test]
    fn responses_without_content_carry_no_length_and_no_body() {
        for status in [204, 304] {
            let entry = build(status, &[("content-length", "10")], b"");
            assert!(!entry.headers.contains_key(header::CONTENT_LENGTH));
            let res = CacheEntry::new(
                head(status, &[]),
                Bytes::from_static(b"x"),
                lifetime(),
                &HeaderMap::new(),
            );
            assert!(matches!(res, Err(Unframeable::BodyNotAllowed { .. })));
        }
    }

    proptest::proptest! {
        /// Whatever framing the upstream sent, the prebuilt head frames the body.
        #[test]
        fn any_upstream_head_is_framed_by_the_body(
            status in 200u16..=599,
            fields in proptest::collection::vec((
                proptest::prop_oneof![
                    proptest::strategy::Just("content-length"),
                    proptest::strategy::Just("transfer-encoding"),
                    proptest::strategy::Just("connection"),
                    proptest::strategy::Just("upgrade"),
                    proptest::strategy::Just("x-a"),
                ],
                "[ -~]{0,12}",
            ), 0..6),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32),
        ) {
            let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.trim())).collect();
            let bodiless = status == 204 || status == 304;
            let body = if bodiless { Bytes::new() } else { Bytes::from(body) };
            let entry = CacheEntry::new(head(status, &fields), body, lifetime(), &HeaderMap::new()).unwrap();
            let mut wire = entry.http1_head.to_vec();
            wire.extend_from_slice(b"\r\n");
            let mut parsed = [httparse::EMPTY_HEADER; 16];
            let mut res = httparse::Response::new(&mut parsed);
            proptest::prop_assert!(res.parse(&wire).unwrap().is_complete());
            let lengths: Vec<&[u8]> = res.headers.iter().filter(|h| h.name == "content-length").map(|h| h.value).collect();
            let expected = entry.body.len().to_string();
            if bodiless {
                proptest::prop_assert!(lengths.is_empty());
            } else {
                proptest::prop_assert_eq!(lengths, vec![expected.as_bytes()]);
            }
            proptest::prop_assert!(res.headers.iter().all(|h| !["transfer-encoding", "connection", "upgrade"].contains(&h.name)));
        }
    }
}
