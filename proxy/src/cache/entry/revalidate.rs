//! Validators: a client's conditional request answered from an entry (`304`), and an
//! entry renewed by the upstream's `304` to corral's own conditional request.

use std::time::SystemTime;

use http::header::{self, HeaderValue};
use http::{request, response, HeaderMap};
use http_cache_semantics::{AfterResponse, CacheOptions, CachePolicy};

use super::CacheEntry;
use crate::cache::policy::{self, PassReason, Verdict};
use crate::config::RouteConfig;

/// The fields a `304 Not Modified` for an entry carries (RFC 9110 §15.4.5).
const NOT_MODIFIED_FIELDS: [header::HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::LAST_MODIFIED,
    header::VARY,
];

impl CacheEntry {
    /// Whether a client's conditional request is satisfied by this entry, so that it
    /// gets `304 Not Modified` (RFC 9110 §13.1.2 and §13.1.3; `If-None-Match` wins).
    pub(crate) fn satisfies_conditional(&self, req_headers: &HeaderMap) -> bool {
        if !self.status().is_success() {
            return false;
        }
        if let Some(inm) = req_headers.get(header::IF_NONE_MATCH) {
            let Some(etag) = self
                .header(&header::ETAG)
                .and_then(|v| std::str::from_utf8(v).ok())
            else {
                return false;
            };
            let etag = etag.trim_start_matches("W/");
            return inm.to_str().is_ok_and(|inm| {
                inm.split(',')
                    .any(|t| t.trim() == "*" || t.trim().trim_start_matches("W/") == etag)
            });
        }
        if let Some(ims) = req_headers.get(header::IF_MODIFIED_SINCE) {
            let date = |v: &[u8]| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| httpdate::parse_http_date(v).ok())
            };
            let last_modified = self.header(&header::LAST_MODIFIED).and_then(date);
            let since = date(ims.as_bytes());
            return matches!((last_modified, since), (Some(lm), Some(since)) if lm <= since);
        }
        false
    }

    /// The headers a `304 Not Modified` for this entry carries (RFC 9110 §15.4.5).
    pub(crate) fn not_modified_headers(&self) -> HeaderMap {
        let mut out = HeaderMap::new();
        for (name, value) in self.fields() {
            let wanted = NOT_MODIFIED_FIELDS
                .iter()
                .find(|n| n.as_str().as_bytes() == name);
            if let (Some(name), Ok(value)) = (wanted, HeaderValue::from_bytes(value)) {
                out.append(name.clone(), value);
            }
        }
        out
    }

    /// Adds this entry's validators to a revalidation request.
    pub(crate) fn add_validators(&self, headers: &mut HeaderMap) {
        let value = |name| {
            self.header(&name)
                .and_then(|v| HeaderValue::from_bytes(v).ok())
        };
        if let Some(etag) = value(header::ETAG) {
            headers.insert(header::IF_NONE_MATCH, etag);
        }
        if let Some(lm) = value(header::LAST_MODIFIED) {
            headers.insert(header::IF_MODIFIED_SINCE, lm);
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
        *stored.status_mut() = self.status();
        *stored.headers_mut() = policy::clamped(&self.headers());
        let mut not_modified = not_modified.clone();
        not_modified.headers = policy::clamped(&not_modified.headers);
        let original = http::Request::get("/").body(()).expect("a static request");
        let policy = CachePolicy::new_options(
            &original,
            &stored,
            self.times.received_at(),
            CacheOptions::default(),
        );
        let AfterResponse::NotModified(_, mut merged) =
            policy.after_response(req, &not_modified, received_at)
        else {
            return Err(None);
        };
        merged.status = self.status();
        // The crate adds the Age it computed; our own Age is added per response.
        merged.headers.remove(header::AGE);
        match policy::evaluate(route, req, &merged, received_at) {
            Verdict::Store(lifetime) => {
                CacheEntry::new(merged, self.body_bytes(), *lifetime, &req.headers)
                    .map_err(|_| None)
            }
            Verdict::Pass(reason) => Err(Some(reason)),
        }
    }
}
