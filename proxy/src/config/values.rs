//! Parsers of single values: durations, byte sizes, addresses, URLs, host and cookie
//! names. Each names the key and points at the value when it refuses one.

use std::net::SocketAddr;
use std::time::Duration;

use bytesize::ByteSize;
use http::header::HeaderName;
use http::Uri;
use toml::Spanned;

use super::source::Text;
use super::source::{ConfigError, Source};

/// The longest duration any setting accepts: past it a value is a typo, and time
/// arithmetic on it could overflow.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub(super) fn duration(src: &Source, key: &str, value: &Text) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(value.get_ref().trim()).map_err(|e| {
        src.error(
            value.span(),
            key,
            format_args!(
                "invalid duration {:?} ({e}); write e.g. \"500ms\", \"30s\", \"10m\"",
                value.get_ref()
            ),
        )
    })?;
    if d > MAX_DURATION {
        return Err(src.error(value.span(), key, "must be at most 10 years"));
    }
    Ok(d)
}

pub(super) fn positive_duration(
    src: &Source,
    key: &str,
    value: &Text,
) -> Result<Duration, ConfigError> {
    let d = duration(src, key, value)?;
    if d.is_zero() {
        return Err(src.error(value.span(), key, "must be greater than zero"));
    }
    Ok(d)
}

pub(super) fn optional(
    src: &Source,
    key: &str,
    value: &Option<Text>,
    default: Duration,
    parse: fn(&Source, &str, &Text) -> Result<Duration, ConfigError>,
) -> Result<Duration, ConfigError> {
    value.as_ref().map_or(Ok(default), |v| parse(src, key, v))
}

pub(super) fn byte_size(src: &Source, key: &str, value: &Text) -> Result<u64, ConfigError> {
    let size: ByteSize = value.get_ref().trim().parse().map_err(|e| {
        src.error(
            value.span(),
            key,
            format_args!(
                "invalid byte size {:?} ({e}); write e.g. \"256MiB\"",
                value.get_ref()
            ),
        )
    })?;
    if size.as_u64() == 0 {
        return Err(src.error(value.span(), key, "must be greater than zero"));
    }
    Ok(size.as_u64())
}

pub(super) fn socket_addr(
    src: &Source,
    key: &str,
    value: &Text,
) -> Result<SocketAddr, ConfigError> {
    value.get_ref().trim().parse().map_err(|e| {
        src.error(
            value.span(),
            key,
            format_args!(
                "invalid address {:?} ({e}); write e.g. \"127.0.0.1:8080\"",
                value.get_ref()
            ),
        )
    })
}

/// `trusted_proxies`: addresses (`10.0.0.1`) or networks (`10.0.0.0/8`).
pub(super) fn trusted_proxies(
    src: &Source,
    list: &Spanned<Vec<String>>,
) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    list.get_ref()
        .iter()
        .map(|entry| {
            let entry = entry.trim();
            entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    src.error(
                        list.span(),
                        "trusted_proxies",
                        format_args!(
                            "{entry:?} is not an IP address or network (e.g. \"10.0.0.0/8\")"
                        ),
                    )
                })
        })
        .collect()
}

/// `url` with any `user:password@` replaced by `***@`, for messages.
pub(super) fn without_userinfo(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}***@{}", &url[..start], &url[start + at + 1..]),
        None => url.to_string(),
    }
}

pub(super) fn upstream_uri(src: &Source, key: &str, value: &Text) -> Result<Uri, ConfigError> {
    let fail = |why: &str| {
        src.error(
            value.span(),
            key,
            format_args!(
                "invalid upstream URL {:?}: {why}",
                without_userinfo(value.get_ref())
            ),
        )
    };
    let uri: Uri = value
        .get_ref()
        .trim()
        .parse()
        .map_err(|e: http::uri::InvalidUri| fail(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(fail("the scheme must be http or https")),
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        // Credentials in the URL would be sent inside `Host` and printed in logs.
        return Err(fail(
            "it may not contain credentials (user:password@); corral never sends or logs them",
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(fail("it has no host"));
    }
    if uri.query().is_some() {
        return Err(fail("it may not have a query string"));
    }
    Ok(uri)
}

/// A route's host as requests are matched against it: lowercase, without the one
/// trailing dot of a fully qualified name. `None` unless it is a plain host name or
/// IPv4 address: non-empty dot-separated labels of letters, digits, '-' and '_'.
pub(super) fn route_host(text: &str) -> Option<String> {
    let host = text.trim().to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    let valid = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then(|| host.to_string())
}

/// Cookie names (RFC 6265 tokens), for `key.cookies` and `ignore_cookies`.
pub(super) fn cookie_names(
    src: &Source,
    key: &str,
    names: &[Text],
) -> Result<Vec<String>, ConfigError> {
    names
        .iter()
        .map(|name| {
            let trimmed = name.get_ref().trim();
            // A token: visible ASCII without separators (RFC 9110 §5.6.2).
            let token = !trimmed.is_empty()
                && trimmed
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"\"(),/:;<=>?@[\\]{}".contains(&b));
            if token {
                Ok(trimmed.to_string())
            } else {
                Err(src.error(
                    name.span(),
                    key,
                    format_args!("{:?} is not a cookie name", name.get_ref()),
                ))
            }
        })
        .collect()
}

/// A header name (`key.headers`, `tag_header`).
pub(super) fn header_name(
    src: &Source,
    key: &str,
    value: &Text,
) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(value.get_ref().trim().as_bytes()).map_err(|_| {
        src.error(
            value.span(),
            key,
            format_args!("{:?} is not a valid header name", value.get_ref()),
        )
    })
}

/// Whether redis-rs can connect to `url` (`[redis] url`, `[lock] nodes`). The error
/// does not repeat the URL, which may carry a password.
pub(super) fn redis_url(url: &str) -> Result<(), String> {
    // A TOML string cannot hold a control character; a command-line one can.
    if url.chars().any(char::is_control) {
        return Err("it contains a control character".into());
    }
    ::redis::IntoConnectionInfo::into_connection_info(url)
        .map(drop)
        .map_err(|e| e.to_string())
}
