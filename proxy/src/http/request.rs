//! What corral accepts from a client, normalised once so that routing, the cache key
//! and what the upstream receives all see the same request.
//!
//! - **Host**: from the absolute-form target or HTTP/2 `:authority` when there is one
//!   (RFC 9112 §3.2.2: the `Host` header is then ignored), else the single `Host`
//!   header; lowercase, without port or trailing dot (nginx's `$host`). HTTP/1.1
//!   without exactly one valid `Host`, userinfo in the authority, or an HTTP/2
//!   `Host` that names another host than `:authority`: `400`.
//! - **Path**: RFC 3986 normal form: percent-encoded unreserved characters decoded
//!   (`%2e` is a dot, `%41` an `A`), other escapes in upper case, dot segments
//!   removed. Ambiguous forms that origins read differently are refused with `400`:
//!   a bad or `%00` escape, a backslash, a `..;` / `.;` segment (Tomcat reads it as a
//!   dot segment). Encoded slashes (`%2F`, `%5C`) are kept encoded and refused unless
//!   the route allows them ([`encoded_slash`]).
//! - **Headers**: hop-by-hop headers, and those `Connection` names, are removed before
//!   anything is keyed; from peers that are not trusted proxies, every forwarding
//!   header (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`, ...) is removed too, so the
//!   upstream sees only the ones corral sets itself.

use std::borrow::Cow;

use http::header;
use http::uri::PathAndQuery;
use http::{HeaderMap, Uri, Version};

use crate::http::headers;

/// Why a request was refused before routing: the client's fault, answered with `400`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("an HTTP/1.1 request needs a Host header")]
    MissingHost,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("the host is not a valid host name or address")]
    InvalidHost,
    #[error("the Host header names another host than the request target")]
    ConflictingHost,
    #[error("the path is not a valid origin-form path")]
    InvalidPath,
    #[error("the path has an encoded slash, which this route does not accept")]
    EncodedSlash,
}

impl BadRequest {
    /// A short token for `Cache-Status` details and logs.
    pub(crate) fn detail(self) -> &'static str {
        match self {
            BadRequest::MissingHost => "missing-host",
            BadRequest::DuplicateHost => "duplicate-host",
            BadRequest::InvalidHost => "invalid-host",
            BadRequest::ConflictingHost => "conflicting-host",
            BadRequest::InvalidPath => "invalid-path",
            BadRequest::EncodedSlash => "encoded-slash",
        }
    }
}

/// Headers whose presence makes a GET or HEAD answer depend on more than the cache
/// key sees: frameworks that honour them serve another method or another path than
/// the request names. Such requests are forwarded, never served from or stored in the
/// cache.
/// (`X-Original-URL` and `X-Rewrite-URL` are also forwarding headers: from a peer that
/// is not a trusted proxy they are removed, not forwarded.)
const REWRITING_HEADERS: [&str; 5] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

/// The request's host: lowercase, without port or trailing dot; `None` for an
/// HTTP/1.0 request without one. Borrowed from the request when already canonical.
pub fn canonical_host<'a>(
    version: Version,
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Result<Option<Cow<'a, str>>, BadRequest> {
    let mut values = headers.get_all(header::HOST).iter();
    let host_header = values.next();
    if values.next().is_some() {
        return Err(BadRequest::DuplicateHost);
    }
    let from_header = match host_header {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(normalize_host)
                .ok_or(BadRequest::InvalidHost)?,
        ),
        None => None,
    };
    let Some(authority) = uri.authority() else {
        return match from_header {
            None if version == Version::HTTP_11 => Err(BadRequest::MissingHost),
            host => Ok(host),
        };
    };
    if authority.as_str().contains('@') {
        return Err(BadRequest::InvalidHost);
    }
    let from_target = normalize_host(authority.as_str()).ok_or(BadRequest::InvalidHost)?;
    match from_header {
        None if version == Version::HTTP_11 => Err(BadRequest::MissingHost),
        // HTTP/2 (RFC 9113 §8.3.1): a Host for another host than :authority is malformed.
        Some(h) if version == Version::HTTP_2 && h != from_target => {
            Err(BadRequest::ConflictingHost)
        }
        _ => Ok(Some(from_target)),
    }
}

/// `host[:port]` as a client wrote it, in canonical form: lowercase, without port or
/// trailing dot. `None` when it is not a host name, IPv4 or bracketed IPv6 address.
pub(crate) fn normalize_host(raw: &str) -> Option<Cow<'_, str>> {
    let (host, port) = if raw.starts_with('[') {
        let end = raw.find(']')?;
        let (literal, rest) = raw.split_at(end + 1);
        (
            literal,
            rest.strip_prefix(':').or(rest.is_empty().then_some("")),
        )
    } else {
        match raw.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (raw, Some("")),
        }
    };
    let port = port?;
    if port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']')?;
        let ok = !inner.is_empty()
            && inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        return ok.then(|| lowercase(host));
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 || host.ends_with('.') {
        return None;
    }
    // One pass (this runs on every request): allowed bytes, no leading dot, no "..".
    let mut previous = b'.';
    for &b in host.as_bytes() {
        match b {
            b'.' if previous == b'.' => return None,
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => previous = b,
            _ => return None,
        }
    }
    Some(lowercase(host))
}

/// `s` in lower case, borrowed when it already is.
fn lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// The request target's path and query in the form corral routes, keys and forwards;
/// `None` when the target is already in that form (no allocation).
pub fn normalize_target(uri: &Uri) -> Result<Option<PathAndQuery>, BadRequest> {
    let path = uri.path();
    if path == "*" {
        // `OPTIONS *`: no path to normalise; no route will match it.
        return Ok(None);
    }
    match normalize_path(path)? {
        Cow::Borrowed(_) if uri.authority().is_none() => Ok(None),
        normal => {
            let mut pq = normal.into_owned();
            if let Some(query) = uri.query() {
                pq.push('?');
                pq.push_str(query);
            }
            PathAndQuery::try_from(pq)
                .map(Some)
                .map_err(|_| BadRequest::InvalidPath)
        }
    }
}

/// `path` in RFC 3986 normal form (see the module doc), borrowed when it already is.
pub(crate) fn normalize_path(path: &str) -> Result<Cow<'_, str>, BadRequest> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(BadRequest::InvalidPath);
    }
    // One pass: a path with no escape and no segment starting with a dot is already
    // in normal form (the common case, borrowed as it is).
    let suspect = bytes
        .windows(2)
        .any(|w| w[0] == b'%' || w[0] == b'\\' || (w[0] == b'/' && w[1] == b'.'))
        || matches!(bytes.last(), Some(b'%' | b'\\'));
    if !suspect {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut stack: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded[1..].split('/') {
        match segment {
            "." => trailing_slash = true,
            ".." => {
                stack.pop();
                trailing_slash = true;
            }
            s if is_dot_like(s) => return Err(BadRequest::InvalidPath),
            s => {
                stack.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &stack {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// A dot segment, or one that some servers read as one (`..;jsessionid`).
fn is_dot_like(segment: &str) -> bool {
    segment == "." || segment == ".." || segment.starts_with(".;") || segment.starts_with("..;")
}

/// Decodes escapes of unreserved characters, writes the others in upper case, and
/// refuses malformed escapes, `%00` and backslashes. Other bytes (UTF-8 included) are
/// kept as they are.
fn decode_unreserved(path: &str) -> Result<String, BadRequest> {
    let bytes = path.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(BadRequest::InvalidPath),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(BadRequest::InvalidPath)?;
                let hex = std::str::from_utf8(hex).map_err(|_| BadRequest::InvalidPath)?;
                let byte = u8::from_str_radix(hex, 16).map_err(|_| BadRequest::InvalidPath)?;
                if byte == 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(BadRequest::InvalidPath);
                }
                if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                    out.push(byte);
                } else {
                    out.extend_from_slice(format!("%{byte:02X}").as_bytes());
                }
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII was decoded, and the rest copied byte for byte from a `str`.
    String::from_utf8(out).map_err(|_| BadRequest::InvalidPath)
}

/// Whether a normalised path carries an encoded slash or backslash.
pub(crate) fn encoded_slash(path: &str) -> bool {
    path.contains("%2F") || path.contains("%5C")
}

/// Prepares a client's headers for keying and forwarding, in place: hop-by-hop
/// headers removed (with those `Connection` names), and, unless the peer is a trusted
/// proxy, every forwarding header too.
pub(crate) fn sanitize_headers(headers: &mut HeaderMap, trusted_peer: bool) {
    headers::strip_hop_by_hop(headers);
    if !trusted_peer {
        headers::strip_forwarding(headers);
    }
    headers::join_cookies(headers);
}

/// Whether a GET or HEAD carries a header that would make its answer depend on more
/// than the cache key (see `REWRITING_HEADERS`).
pub(crate) fn rewrites_request(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|name| REWRITING_HEADERS.contains(&name.as_str()))
}

/// Whether [`sanitize_headers`] would leave these headers as they are, whoever the peer:
/// no hop-by-hop header beyond `Connection: keep-alive`/`close`, no forwarding or
/// rewriting header, at most one `Cookie` field. Only then may the fast path key and
/// match `Vary` on the headers as sent; anything else takes the full path. One pass
/// over the fields (this runs on every fast-path hit).
pub fn already_sanitized(headers: &HeaderMap) -> bool {
    let mut cookies = 0;
    for (name, value) in headers {
        let clean = match name.as_str() {
            "connection" => value.to_str().is_ok_and(|v| {
                v.split(',').all(|t| {
                    let t = t.trim();
                    t.is_empty()
                        || t.eq_ignore_ascii_case("keep-alive")
                        || t.eq_ignore_ascii_case("close")
                })
            }),
            "cookie" => {
                cookies += 1;
                cookies == 1
            }
            "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade" => false,
            other => !(headers::is_forwarding(name) || REWRITING_HEADERS.contains(&other)),
        };
        if !clean {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderName;
    use proptest::prelude::*;

    fn norm(path: &str) -> Result<String, BadRequest> {
        normalize_path(path).map(Cow::into_owned)
    }

    #[test]
    fn dot_segments_are_removed_as_rfc_3986_says() {
        assert_eq!(norm("/a/b/c/./../../g").unwrap(), "/a/g");
        assert_eq!(norm("/pub/../internal").unwrap(), "/internal");
        assert_eq!(norm("/pub/%2e%2e/internal").unwrap(), "/internal");
        assert_eq!(norm("/pub/%2E./internal").unwrap(), "/internal");
        assert_eq!(norm("/..").unwrap(), "/");
        assert_eq!(norm("/a/..").unwrap(), "/");
        assert_eq!(norm("/a/b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/a//b/").unwrap(), "/a//b/");
        assert!(matches!(normalize_path("/a/b"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn escapes_are_decoded_or_upper_cased() {
        assert_eq!(norm("/%41%7e%5f").unwrap(), "/A~_");
        assert_eq!(norm("/a%2fb").unwrap(), "/a%2Fb");
        assert_eq!(norm("/a%20b").unwrap(), "/a%20b");
        assert!(encoded_slash(&norm("/pub/..%2finternal").unwrap()));
        assert!(encoded_slash(&norm("/pub/..%5cinternal").unwrap()));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for bad in [
            "/a%",
            "/a%4",
            "/a%zz",
            "/a%00b",
            "/a\\b",
            "/pub/..;/x",
            "/pub/.;x/y",
            "x",
        ] {
            assert_eq!(norm(bad), Err(BadRequest::InvalidPath), "{bad}");
        }
    }

    #[test]
    fn hosts_are_lowercase_without_port_or_trailing_dot() {
        let n = |h: &str| normalize_host(h).map(Cow::into_owned);
        assert_eq!(n("Example.COM:8080").as_deref(), Some("example.com"));
        assert_eq!(n("example.com.").as_deref(), Some("example.com"));
        assert_eq!(n("example.com.:80").as_deref(), Some("example.com"));
        assert_eq!(n("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(n("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(n("127.0.0.1:1").as_deref(), Some("127.0.0.1"));
        for bad in [
            "", ".", "a..b", "a..", "-..", ".a", "a b", "a/b", "a:x", "a:123456", "[::1", "[zz]",
            "a\\b", "a:1:2",
        ] {
            assert_eq!(n(bad), None, "{bad:?}");
        }
    }

    fn host_of(version: Version, uri: &str, hosts: &[&str]) -> Result<Option<String>, BadRequest> {
        let mut headers = HeaderMap::new();
        for h in hosts {
            headers.append(header::HOST, h.parse().unwrap());
        }
        let uri = uri.parse().unwrap();
        canonical_host(version, &uri, &headers).map(|h| h.map(Cow::into_owned))
    }

    #[test]
    fn host_comes_from_the_target_when_absolute_and_must_be_single() {
        use Version as V;
        assert_eq!(
            host_of(V::HTTP_11, "http://a/p", &["b"]),
            Ok(Some("a".into()))
        );
        assert_eq!(host_of(V::HTTP_11, "/p", &["B:81"]), Ok(Some("b".into())));
        assert_eq!(host_of(V::HTTP_11, "/p", &[]), Err(BadRequest::MissingHost));
        assert_eq!(
            host_of(V::HTTP_11, "http://a/p", &[]),
            Err(BadRequest::MissingHost)
        );
        assert_eq!(
            host_of(V::HTTP_11, "/p", &["a", "a"]),
            Err(BadRequest::DuplicateHost)
        );
        assert_eq!(
            host_of(V::HTTP_11, "/p", &["a b"]),
            Err(BadRequest::InvalidHost)
        );
        assert_eq!(
            host_of(V::HTTP_11, "http://u@a/p", &["a"]),
            Err(BadRequest::InvalidHost)
        );
        assert_eq!(host_of(V::HTTP_10, "/p", &[]), Ok(None));
        assert_eq!(host_of(V::HTTP_2, "http://a/p", &[]), Ok(Some("a".into())));
        assert_eq!(
            host_of(V::HTTP_2, "http://a/p", &["A:1"]),
            Ok(Some("a".into()))
        );
        assert_eq!(
            host_of(V::HTTP_2, "http://a/p", &["b"]),
            Err(BadRequest::ConflictingHost)
        );
    }

    #[test]
    fn headers_the_full_path_would_change_are_seen() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "a".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, Close".parse().unwrap());
        h.insert(header::COOKIE, "a=1".parse().unwrap());
        assert!(already_sanitized(&h));
        for (name, value) in [
            ("connection", "keep-alive, x-tenant"),
            ("cookie", "b=2"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-original-url", "/x"),
            ("x-http-method-override", "DELETE"),
            ("te", "trailers"),
        ] {
            let mut h = h.clone();
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
            assert!(!already_sanitized(&h), "{name}");
        }
    }

    #[test]
    fn utf8_paths_keep_their_bytes() {
        assert_eq!(norm("/caf\u{e9}/%41").unwrap(), "/caf\u{e9}/A");
    }

    proptest! {
        /// Any path either is refused or comes out in a normal form that normalises to
        /// itself, parses as a URI path, starts with '/' and has no dot segment.
        #[test]
        fn normal_paths_are_fixed_points(path in "/[a-zA-Z0-9%./;\\\\_~-]{0,40}") {
            if let Ok(normal) = normalize_path(&path) {
                let normal = normal.into_owned();
                prop_assert!(normal.starts_with('/'));
                prop_assert!(!normal.split('/').any(is_dot_like), "{}", normal);
                prop_assert_eq!(norm(&normal), Ok(normal.clone()));
                prop_assert!(PathAndQuery::try_from(normal.as_str()).is_ok());
            }
        }

        #[test]
        fn normal_hosts_are_fixed_points(host in "[a-zA-Z0-9.:\\[\\]_-]{0,30}") {
            if let Some(normal) = normalize_host(&host).map(Cow::into_owned) {
                prop_assert_eq!(normalize_host(&normal).map(Cow::into_owned), Some(normal.clone()));
                prop_assert!(!normal.contains(':') || normal.starts_with('['));
            }
        }
    }
}
