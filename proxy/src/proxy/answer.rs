//! Responses from what the cache path found: an entry served (with `Age`, `Via`, a
//! `304` when the client's conditions hold, no body for `HEAD`), a fill's reply to its
//! leader, and the `Cache-Status` header every response gets.

use std::time::SystemTime;

use http::header::{self, HeaderValue};
use http::{request, Method, Response, StatusCode};

use super::error::{error_response, ProxyError};
use crate::cache::{CacheEntry, Freshness};
use crate::fill::LeaderReply;
use crate::http::body::ProxyBody;
use crate::http::cache_status::{CacheStatus, Served};
use crate::http::headers;

/// Seconds of freshness left; negative when stale.
pub(super) fn ttl_secs(entry: &CacheEntry, now: SystemTime) -> i64 {
    match entry.freshness(now) {
        Freshness::Fresh { ttl } => ttl.as_secs() as i64,
        Freshness::Stale { by } => -(by.as_secs() as i64),
    }
}

/// The response for a fill's reply; `Err` with its status for `Pass` (go upstream).
pub(super) fn reply_response(
    req: &request::Parts,
    reply: LeaderReply,
) -> Result<(Response<ProxyBody>, CacheStatus), CacheStatus> {
    match reply {
        LeaderReply::Entry(entry, status) => {
            // A fetched entry's fetch time is this response's upstream time.
            let status = match status.served {
                Served::Miss | Served::Collapsed | Served::Revalidated => {
                    status.with_upstream_time(entry.fetch_time())
                }
                _ => status,
            };
            Ok((respond(req, &entry), status))
        }
        LeaderReply::Response(res, status) => Ok((for_method(req, res), status)),
        LeaderReply::Failed(kind, status) => {
            let res = error_response(&ProxyError::SharedFailure(kind));
            Ok((for_method(req, res), status))
        }
        LeaderReply::Pass(status) => Err(status),
    }
}

/// `res` without its body when the request was a `HEAD`.
fn for_method(req: &request::Parts, mut res: Response<ProxyBody>) -> Response<ProxyBody> {
    if req.method == Method::HEAD {
        *res.body_mut() = ProxyBody::empty();
    }
    res
}

/// A response from a cached entry for this request: `304` when the client's
/// conditions hold, no body for `HEAD`, `Age` always. (Public for the benchmarks.)
pub fn respond(req: &request::Parts, entry: &CacheEntry) -> Response<ProxyBody> {
    let now = SystemTime::now();
    let mut res = if entry.satisfies_conditional(&req.headers) {
        let mut res = Response::new(ProxyBody::empty());
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        *res.headers_mut() = entry.not_modified_headers();
        res
    } else {
        let body = if req.method == Method::HEAD {
            ProxyBody::empty()
        } else {
            ProxyBody::full(entry.body_bytes())
        };
        let mut res = Response::new(body);
        *res.status_mut() = entry.status();
        *res.headers_mut() = entry.headers();
        res
    };
    res.headers_mut()
        .insert(header::AGE, HeaderValue::from(entry.age(now)));
    res.headers_mut().append(header::VIA, headers::VIA);
    res
}

/// Adds the `Cache-Status` header; every response passes here once.
pub(super) fn finish(mut res: Response<ProxyBody>, status: &CacheStatus) -> Response<ProxyBody> {
    res.headers_mut().insert(
        header::HeaderName::from_static("cache-status"),
        status.header_value(),
    );
    res
}
