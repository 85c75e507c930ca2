//! The one place a stored response's framing is decided, for responses from the
//! upstream and for entries read back from Redis alike.

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use crate::http::headers::strip_hop_by_hop;

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
