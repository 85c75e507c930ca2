//! Header rules of a reverse proxy: hop-by-hop headers removed both ways (RFC 9110
//! §7.6.1), `Via` added, and the client's address and the original host and scheme
//! passed upstream in `X-Forwarded-*`. Forwarding headers are corral's own: those a
//! client sent are removed unless it is a trusted proxy (see `request`).

use std::net::IpAddr;

use http::header::{self, HeaderName, HeaderValue};
use http::HeaderMap;

/// The `Via` entry this proxy adds.
pub(crate) const VIA: HeaderValue = HeaderValue::from_static("1.1 corral");

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers through which proxies tell an upstream who the client was, what it asked
/// for, or which URL to serve instead (`X-Original-URL`: IIS, Symfony). Frameworks build
/// links, redirects, access decisions and even the path served from them, and the cache
/// key does not see them: only corral (or a trusted proxy) may set them.
const FORWARDING: [&str; 25] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-scheme",
    "x-forwarded-server",
    "x-forwarded-ssl",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-original-uri",
    "x-original-url",
    "x-rewrite-url",
    "x-real-ip",
    "x-host",
    "x-original-host",
    "x-url-scheme",
    "front-end-https",
    "true-client-ip",
    "x-client-ip",
    "client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
];

/// The forwarding headers whose value corral derives from the peer's address (or, in
/// `Forwarded`, may): the origin sees corral's value, lookups cannot, so a response
/// that varies on one cannot be matched to its requests.
const CLIENT_ADDRESS: [&str; 9] = [
    "forwarded",
    "x-forwarded-for",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
];

/// Whether `name` carries the client's address as corral (or a trusted proxy) sets it.
pub(crate) fn is_client_address(name: &HeaderName) -> bool {
    CLIENT_ADDRESS.contains(&name.as_str())
}

/// Whether `name` is a forwarding header (see `FORWARDING`).
pub(crate) fn is_forwarding(name: &HeaderName) -> bool {
    FORWARDING.contains(&name.as_str())
}

/// Removes every forwarding header a client sent.
pub(crate) fn strip_forwarding(headers: &mut HeaderMap) {
    for name in FORWARDING {
        headers.remove(name);
    }
}

/// Joins several `Cookie` fields into one, as RFC 9113 §8.2.3 requires before a request
/// goes to an HTTP/1.1 upstream (HTTP/2 clients send cookies as separate crumbs); the
/// key and the upstream then see the same single field.
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    let mut fields = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (fields.next(), fields.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for value in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Removes the hop-by-hop headers, including those that `Connection` names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Adds corral's forwarding headers to a client's request headers, which
/// `request::sanitize_headers` already cleaned: `X-Forwarded-For` extended with the
/// client, `X-Forwarded-Proto` and `X-Forwarded-Host` set unless a trusted proxy
/// before us set them (from anyone else they were removed), `Via` appended.
pub(crate) fn forward_request(
    headers: &mut HeaderMap,
    client: IpAddr,
    original_host: Option<&HeaderValue>,
) {
    // A dual-stack listener sees IPv4 peers as IPv4-mapped IPv6 addresses.
    let client = client.to_canonical().to_string();
    // Every line a trusted proxy sent (HAProxy adds its own), in order, then the peer.
    let mut xff = String::new();
    for earlier in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(earlier) = earlier.to_str() {
            xff.push_str(earlier);
            xff.push_str(", ");
        }
    }
    xff.push_str(&client);
    if let Ok(v) = HeaderValue::try_from(xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if let Some(host) = original_host {
        if !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
    }
    headers.append(header::VIA, VIA);
}

/// Prepares an upstream response's headers for the client.
pub(crate) fn forward_response(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.append(header::VIA, VIA);
}

/// Conditional and range headers a fill must not pass on: a fill fetches the whole
/// representation, to store it; the client's own conditions are answered from it.
pub(crate) fn strip_conditionals(headers: &mut HeaderMap) {
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
        header::RANGE,
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        forward_request(
            &mut h,
            "127.0.0.2".parse().unwrap(),
            Some(&HeaderValue::from_static("example.com")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["via"], "1.1 corral");
    }
}
