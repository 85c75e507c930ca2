//! Purges: what a `POST /purge` asks for, resolved to cache keys exactly as requests
//! are keyed, and carried out in every tier.
//!
//! A purge never reports success for a key that no request could have: the route must
//! be the one that serves the host and path, the host is normalised as request hosts
//! are, and a route that keys on request headers or cookies needs their values.

use http::header::{HeaderName, HeaderValue, COOKIE};
use http::{HeaderMap, Uri};

use crate::cache::tags::MAX_TAG_LEN;
use crate::cache::{CacheKey, Purged};
use crate::http::headers::X_FORWARDED_PROTO;
use crate::proxy::Proxy;

/// What to purge, as the query string of `POST /purge` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PurgeRequest {
    pub(crate) target: PurgeTarget,
    /// Mark stale instead of dropping.
    pub(crate) soft: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PurgeTarget {
    /// What a GET of `path` on `route` (for `host`, with `headers`) is served from.
    Url {
        route: String,
        host: Option<String>,
        path: String,
        /// `header=NAME:VALUE` parameters, for routes with `key.headers`.
        headers: Vec<(String, String)>,
        /// `cookie=NAME:VALUE` parameters, for routes with `key.cookies`.
        cookies: Vec<(String, String)>,
    },
    /// Every entry tagged `tag`.
    Tag(String),
}

/// Why a purge was refused; each says what to send instead.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PurgeError {
    #[error("no route named {0:?}")]
    UnknownRoute(String),
    #[error("give either tag=T, or route=NAME and path=/p (with host=H when the route has no host, header=NAME:VALUE for each header and cookie=NAME:VALUE for each cookie the route keys on); add soft=true to mark stale instead")]
    Usage,
    #[error("unknown parameter {0:?}")]
    UnknownParameter(String),
    #[error("parameter {0:?} given twice")]
    Repeated(String),
    #[error("bad soft={0:?}: write soft=true or soft=false")]
    BadSoft(String),
    #[error("bad tag {0:?}: a tag is 1 to {MAX_TAG_LEN} bytes without spaces or commas")]
    BadTag(String),
    #[error("bad path {0:?}: give the path and query a request would have, starting with '/'")]
    BadPath(String),
    #[error("bad host {0:?}")]
    BadHost(String),
    #[error("route {0:?} matches any host: give host=H, the host requests are sent to")]
    HostRequired(String),
    #[error("a request for {host}{path} is served by {serving}, not by route {route:?}: no entry of route {route:?} has that key")]
    NotServedBy {
        route: String,
        host: String,
        path: String,
        serving: String,
    },
    #[error("route {route:?} keys on the request headers {needed}: give each as header=NAME:VALUE (header=NAME: for requests without it)")]
    HeadersRequired { route: String, needed: String },
    #[error("route {route:?} does not key on header {name:?} (it keys on: {keyed})")]
    UnkeyedHeader {
        route: String,
        name: String,
        keyed: String,
    },
    #[error("bad header parameter {0:?}: write header=NAME:VALUE")]
    BadHeader(String),
    #[error("route {route:?} keys on the cookies {needed}: give each as cookie=NAME:VALUE, the value as requests send it (cookie=NAME: for requests without it)")]
    CookiesRequired { route: String, needed: String },
    #[error("route {route:?} does not key on cookie {name:?} (it keys on: {keyed})")]
    UnkeyedCookie {
        route: String,
        name: String,
        keyed: String,
    },
    #[error("bad cookie parameter {0:?}: write cookie=NAME:VALUE, the value without ';'")]
    BadCookie(String),
}

impl PurgeError {
    /// 404 for a route that does not exist, 400 for everything else.
    pub(crate) fn status(&self) -> http::StatusCode {
        match self {
            PurgeError::UnknownRoute(_) => http::StatusCode::NOT_FOUND,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }
}

impl PurgeRequest {
    /// Reads the query string of `POST /purge`.
    pub(crate) fn parse(query: &str) -> Result<PurgeRequest, PurgeError> {
        let mut one: [(&str, Option<String>); 5] = [
            ("tag", None),
            ("route", None),
            ("path", None),
            ("host", None),
            ("soft", None),
        ];
        let mut headers = Vec::new();
        let mut cookies = Vec::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            if name == "header" {
                let (n, v) = value
                    .split_once(':')
                    .ok_or_else(|| PurgeError::BadHeader(value.to_string()))?;
                headers.push((n.trim().to_string(), v.trim().to_string()));
                continue;
            }
            if name == "cookie" {
                // Cookie values are keyed exactly as sent: not trimmed.
                let (n, v) = value
                    .split_once(':')
                    .ok_or_else(|| PurgeError::BadCookie(value.to_string()))?;
                cookies.push((n.to_string(), v.to_string()));
                continue;
            }
            let slot = one
                .iter_mut()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| PurgeError::UnknownParameter(name.to_string()))?;
            if slot.1.replace(value.into_owned()).is_some() {
                return Err(PurgeError::Repeated(name.into_owned()));
            }
        }
        let [(_, tag), (_, route), (_, path), (_, host), (_, soft)] = one;
        let soft = match soft.as_deref() {
            None | Some("0" | "false" | "no") => false,
            Some("1" | "true" | "yes") => true,
            Some(other) => return Err(PurgeError::BadSoft(other.to_string())),
        };
        let target = match (tag, route, path) {
            (Some(tag), None, None)
                if host.is_none() && headers.is_empty() && cookies.is_empty() =>
            {
                if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains([' ', ',']) {
                    return Err(PurgeError::BadTag(tag));
                }
                PurgeTarget::Tag(tag)
            }
            (None, Some(route), Some(path)) => PurgeTarget::Url {
                route,
                host,
                path,
                headers,
                cookies,
            },
            _ => return Err(PurgeError::Usage),
        };
        Ok(PurgeRequest { target, soft })
    }
}

/// Carries out `req` in every tier (and, in fleet mode, every instance).
pub(crate) async fn purge(proxy: &Proxy, req: &PurgeRequest) -> Result<Purged, PurgeError> {
    let purged = match &req.target {
        PurgeTarget::Tag(tag) => proxy.cache().purge_tag(tag, req.soft).await,
        PurgeTarget::Url {
            route,
            host,
            path,
            headers,
            cookies,
        } => {
            let keys = url_keys(proxy, route, host.as_deref(), path, headers, cookies)?;
            // And the same URL under the route's earlier settings (a reload changed
            // them): in Redis, and on instances not yet reloaded, those copies serve.
            let retired = proxy.cache().local().retired_scopes();
            let prefix = format!("{route}\n");
            let scopes: Vec<&String> = retired.iter().filter(|s| s.starts_with(&prefix)).collect();
            let mut purged: Option<Purged> = None;
            for key in &keys {
                let earlier = scopes.iter().map(|scope| key.with_scope(scope));
                for key in std::iter::once(key.clone()).chain(earlier) {
                    let this = proxy.cache().purge(&key, req.soft).await;
                    purged = Some(purged.map_or(this, |p| p.and(this)));
                }
            }
            let purged = purged.expect("at least one key");
            let key = &keys[0];
            tracing::info!(%key, soft = req.soft, local = purged.local, shared = ?purged.shared, "purge");
            return Ok(purged);
        }
    };
    tracing::info!(target = ?req.target, soft = req.soft, local = purged.local, shared = ?purged.shared, "purge by tag");
    Ok(purged)
}

/// The primary key a GET of `path_and_query` on `route_name` has, checked to be one
/// that a request can have.
fn url_keys(
    proxy: &Proxy,
    route_name: &str,
    host: Option<&str>,
    path_and_query: &str,
    params: &[(String, String)],
    cookie_params: &[(String, String)],
) -> Result<Vec<CacheKey>, PurgeError> {
    let current = proxy.current();
    let routes = &current.routes;
    let route = routes
        .iter()
        .find(|r| r.config.name == route_name)
        .ok_or_else(|| PurgeError::UnknownRoute(route_name.to_string()))?;
    let bad_path = || PurgeError::BadPath(path_and_query.to_string());
    let mut uri: Uri = path_and_query.parse().map_err(|_| bad_path())?;
    if !uri.path().starts_with('/') || uri.authority().is_some() {
        return Err(bad_path());
    }
    // Keyed as a request for it would be: in normal form.
    if let Some(normal) = crate::http::request::normalize_target(&uri).map_err(|_| bad_path())? {
        uri = Uri::from(normal);
    }
    let host = match (host, &route.config.host) {
        (Some(h), _) => Some(normalised_host(h)?),
        (None, Some(h)) => Some(h.clone()),
        (None, None) => return Err(PurgeError::HostRequired(route_name.to_string())),
    };
    let serving = routes.find(host.as_deref(), uri.path());
    if serving.is_none_or(|s| s.config.name != route_name) {
        return Err(PurgeError::NotServedBy {
            route: route_name.to_string(),
            host: host.unwrap_or_default(),
            path: uri.path().to_string(),
            serving: serving.map_or("no route".to_string(), |s| {
                format!("route {:?}", s.config.name)
            }),
        });
    }
    let mut headers = keyed_headers(route_name, &route.config.key_headers, params)?;
    if let Some(cookie) = keyed_cookies(route_name, &route.config.key_cookies, cookie_params)? {
        headers.append(COOKIE, cookie);
    }
    let key =
        |headers: &HeaderMap| CacheKey::for_request(&route.config, host.as_deref(), &uri, headers);
    let mut keys = vec![key(&headers)];
    // Requests over TLS are keyed with `X-Forwarded-Proto: https` (see `admit`); a
    // purge that does not name the scheme purges the URL as both kinds of clients
    // (plain and TLS instances may share Redis) are served it.
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        keys.push(key(&headers));
    }
    Ok(keys)
}

/// `raw` as request hosts are keyed: through the same function.
fn normalised_host(raw: &str) -> Result<String, PurgeError> {
    crate::http::request::normalize_host(raw)
        .map(std::borrow::Cow::into_owned)
        .ok_or_else(|| PurgeError::BadHost(raw.to_string()))
}

/// The request headers the key is made of, from `header=NAME:VALUE` parameters: each
/// header the route keys on must be given (requests without it have an empty value),
/// and no other.
fn keyed_headers(
    route: &str,
    keyed: &[HeaderName],
    params: &[(String, String)],
) -> Result<HeaderMap, PurgeError> {
    let names = || {
        keyed
            .iter()
            .map(HeaderName::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut headers = HeaderMap::new();
    for (name, value) in params {
        let bad = || PurgeError::BadHeader(format!("{name}:{value}"));
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
        // A trusted proxy's URL-shaping forwarding headers are part of the keys of what
        // it sent: a purge may name them like keyed headers (none when absent).
        if !keyed.contains(&name) && !crate::cache::key::is_url_shaping(&name) {
            return Err(PurgeError::UnkeyedHeader {
                route: route.to_string(),
                name: name.to_string(),
                keyed: if keyed.is_empty() {
                    "none".to_string()
                } else {
                    names()
                },
            });
        }
        // An empty value stands for a request without the header (keyed as empty).
        if !value.is_empty() {
            headers.append(name, HeaderValue::from_str(value).map_err(|_| bad())?);
        }
    }
    if keyed.iter().any(|k| !params_name(params, k)) {
        return Err(PurgeError::HeadersRequired {
            route: route.to_string(),
            needed: names(),
        });
    }
    Ok(headers)
}

/// The `Cookie` header the key is made of, from `cookie=NAME:VALUE` parameters: each
/// cookie the route keys on must be given (`cookie=NAME:` stands for requests without
/// it, keyed as empty), and no other. `None` when no value is given.
fn keyed_cookies(
    route: &str,
    keyed: &[String],
    params: &[(String, String)],
) -> Result<Option<HeaderValue>, PurgeError> {
    let names = || keyed.join(", ");
    let mut pairs = Vec::new();
    for (name, value) in params {
        if !keyed.contains(name) {
            return Err(PurgeError::UnkeyedCookie {
                route: route.to_string(),
                name: name.clone(),
                keyed: if keyed.is_empty() {
                    "none".to_string()
                } else {
                    names()
                },
            });
        }
        // A `;` would be read as the start of another cookie.
        if value.contains(';') {
            return Err(PurgeError::BadCookie(format!("{name}:{value}")));
        }
        if !value.is_empty() {
            pairs.push(format!("{name}={value}"));
        }
    }
    if keyed.iter().any(|k| !params.iter().any(|(n, _)| n == k)) {
        return Err(PurgeError::CookiesRequired {
            route: route.to_string(),
            needed: names(),
        });
    }
    if pairs.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(&pairs.join("; "))
        .map(Some)
        .map_err(|_| PurgeError::BadCookie(pairs.join("; ")))
}

fn params_name(params: &[(String, String)], name: &HeaderName) -> bool {
    params
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_and_tag_purges() {
        let req = PurgeRequest::parse(
            "route=t&path=%2Fp%3Fq%3D1&host=A.example:8080&header=x-tenant:a&soft=true",
        )
        .unwrap();
        assert!(req.soft);
        assert_eq!(
            req.target,
            PurgeTarget::Url {
                route: "t".into(),
                host: Some("A.example:8080".into()),
                path: "/p?q=1".into(),
                headers: vec![("x-tenant".into(), "a".into())],
                cookies: vec![],
            }
        );
        assert_eq!(
            PurgeRequest::parse("tag=product-7").unwrap().target,
            PurgeTarget::Tag("product-7".into())
        );
    }

    #[test]
    fn cookie_parameters_make_the_keyed_cookie_header() {
        let req = PurgeRequest::parse("route=t&path=/p&cookie=lang:fr&cookie=cur:").unwrap();
        let PurgeTarget::Url { cookies, .. } = req.target else {
            panic!("a URL purge");
        };
        assert_eq!(
            cookies,
            [("lang".into(), "fr".into()), ("cur".into(), "".into())]
        );
        let keyed = ["lang".to_string(), "cur".to_string()];
        let cookie = keyed_cookies("t", &keyed, &cookies).unwrap();
        assert_eq!(cookie, Some(HeaderValue::from_static("lang=fr")));
        let missing = keyed_cookies("t", &keyed, &cookies[..1]).unwrap_err();
        assert!(missing.to_string().contains("lang, cur"), "{missing}");
        let other = [("sid".to_string(), "1".to_string())];
        let unkeyed = keyed_cookies("t", &keyed, &other).unwrap_err();
        assert!(unkeyed.to_string().contains("\"sid\""), "{unkeyed}");
        let split = [("lang".to_string(), "fr; sid=1".to_string())];
        assert!(keyed_cookies("t", &keyed, &split).is_err());
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for (query, want) in [
            ("", "give either"),
            ("tag=a&route=t", "give either"),
            ("tag=a&host=h", "give either"),
            ("tags=a", "unknown parameter"),
            ("tag=a&tag=b", "given twice"),
            ("tag=a%20b", "bad tag"),
            ("tag=a&soft=maybe", "bad soft"),
            ("route=t&path=/p&header=x-tenant", "bad header"),
            ("route=t&path=/p&cookie=lang", "bad cookie"),
            ("tag=a&cookie=lang:en", "give either"),
        ] {
            let e = PurgeRequest::parse(query).expect_err(query);
            assert!(e.to_string().contains(want), "{query}: {e}");
        }
    }
}
