//! Cache policy: whether a response may be stored, and for how long it is fresh,
//! servable stale while revalidating, and servable stale on error.
//!
//! RFC 9111 storability and freshness come from `http-cache-semantics` (evaluated as a
//! shared cache); the route's overrides (`allow_*`, `ttl`, `override_ttl`) and the
//! RFC 5861 stale windows, which that crate does not cover, are applied here.
//!
//! Three rules guard against what a hostile client or origin can send. Delta-seconds
//! (`max-age`, `s-maxage`, the stale windows, `Age`) are clamped to 2^31 seconds
//! (RFC 9111 §1.2.2) before any arithmetic, so no value overflows a time. A request's
//! own `Cache-Control` and `Pragma` play no part in what is stored (as in nginx and
//! Varnish): one client's `no-store` must not keep a response from everyone else. And
//! a request carrying credentials (a `Cookie` the route neither keys nor ignores, or
//! an `Authorization` the route does not allow) is stored only on the origin's word:
//! positive explicit shared freshness (`s-maxage`, `max-age`, `Expires`) or `public`,
//! with no route `ttl` override, no route stale windows and no keeping for
//! revalidation. Its passes are request-specific: they mark no hit-for-pass; so are
//! passes for a 4xx status outside `cacheable_statuses`, which unkeyed request input
//! (`Expect`, a huge header, a method override) can cause.

use std::time::{Duration, SystemTime};

use http::header::{
    HeaderName, HeaderValue, AGE, AUTHORIZATION, CACHE_CONTROL, CONNECTION, COOKIE, ETAG, EXPIRES,
    LAST_MODIFIED, PRAGMA, SET_COOKIE, VARY,
};
use http::{request, response, HeaderMap, Method, Request, Response};
use http_cache_semantics::{CacheOptions, CachePolicy};

use super::key::cookie_pairs;
use crate::config::RouteConfig;
use crate::http::cache_status::Detail;

/// The greatest delta-seconds value corral computes with (RFC 9111 §1.2.2): larger
/// values, and values too large to parse, count as this.
pub(crate) const MAX_DELTA: Duration = Duration::from_secs(1 << 31);

/// The outcome of evaluating a response for storage.
pub enum Verdict {
    Store(Box<Lifetime>),
    Pass(PassReason),
}

/// How long a stored response lives, measured from when it was received.
#[derive(Debug, Clone)]
pub struct Lifetime {
    pub(crate) received_at: SystemTime,
    /// The response's age when it was received (its `Age` header plus transit).
    pub(crate) age: Duration,
    pub(crate) fresh_for: Duration,
    pub(crate) stale_while_revalidate: Duration,
    pub(crate) stale_if_error: Duration,
    /// Kept this long past the stale windows, for revalidation only.
    pub(crate) keep: Duration,
}

impl Lifetime {
    /// The lifetime of a response served once and never stored (a shared error).
    pub(crate) fn none(
        req: &request::Parts,
        res: &response::Parts,
        received_at: SystemTime,
    ) -> Lifetime {
        let mut res_view = Response::new(());
        *res_view.status_mut() = res.status;
        *res_view.headers_mut() = clamped(&res.headers);
        let policy = CachePolicy::new_options(req, &res_view, received_at, CacheOptions::default());
        Lifetime {
            age: policy.age(received_at).min(MAX_DELTA),
            received_at,
            fresh_for: Duration::ZERO,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            keep: Duration::ZERO,
        }
    }
}

/// Why a response was not stored; shown in `Cache-Status` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassReason {
    Status,
    NoStore,
    Private,
    Authorization,
    SetCookie,
    VaryStar,
    NotStorable,
    ZeroLifetime,
    TooLarge,
    /// The fill failed inside corral (a bug): requests go upstream for a while.
    Internal,
    /// The request carried a cookie the route neither keys nor ignores, and the
    /// response had no positive explicit shared freshness.
    Credentials,
    /// A 4xx status outside `cacheable_statuses`: unkeyed parts of this request
    /// (`Expect`, a huge header, a method override) may have caused it.
    ClientErrorStatus,
}

impl PassReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PassReason::Status => "uncacheable-status",
            PassReason::ClientErrorStatus => "uncacheable-client-error",
            PassReason::NoStore => "no-store",
            PassReason::Private => "private",
            PassReason::Authorization => "authorization",
            PassReason::SetCookie => "set-cookie",
            PassReason::VaryStar => "vary-star",
            PassReason::NotStorable => "not-storable",
            PassReason::ZeroLifetime => "zero-lifetime",
            PassReason::TooLarge => "too-large",
            PassReason::Credentials => "credentials",
            PassReason::Internal => "internal-error",
        }
    }

    /// Whether the pass may have been caused by this request (its credentials, or
    /// unkeyed input answered with a client error) rather than by the resource: then
    /// the next request for the key may well be storable, so the key is not marked
    /// hit-for-pass and waiters compete for the fill again.
    pub(crate) fn is_request_specific(self) -> bool {
        matches!(
            self,
            PassReason::Credentials | PassReason::Authorization | PassReason::ClientErrorStatus
        )
    }

    /// Whether the requests that waited on such a fill compete for it again, rather
    /// than all going upstream at once: only when the filler's credentials made the
    /// difference, which a request without them does not share. A client error for
    /// everyone (an API behind auth answering 401) would otherwise hold each herd for a
    /// fill per round.
    pub(crate) fn waiters_retry(self) -> bool {
        matches!(self, PassReason::Credentials | PassReason::Authorization)
    }
}

impl From<PassReason> for Detail {
    fn from(reason: PassReason) -> Detail {
        Detail::Reason(reason.as_str())
    }
}

/// Whether a request with `headers` carries credentials on `route`: an `Authorization`
/// the route does not allow, or a cookie the route neither keys nor ignores.
pub(crate) fn has_credentials(route: &RouteConfig, headers: &HeaderMap) -> bool {
    credential_authorization(route, headers) || credential_cookie(route, headers)
}

fn credential_authorization(route: &RouteConfig, headers: &HeaderMap) -> bool {
    headers.contains_key(AUTHORIZATION) && !route.allow_authorization
}

/// Whether the request sends a cookie that is not in `key.cookies` or `ignore_cookies`
/// (none does when the route keys on the whole `Cookie` header). Names are compared as
/// written ([`cookie_pairs`]): `lang =fr` is not the keyed `lang`, and a pair without `=`
/// names nothing corral knows, so both are credentials.
fn credential_cookie(route: &RouteConfig, headers: &HeaderMap) -> bool {
    if route.key_headers.contains(&COOKIE) {
        return false;
    }
    let known = |name: &[u8]| {
        route
            .key_cookies
            .iter()
            .chain(&route.ignore_cookies)
            .any(|c| c.as_bytes() == name)
    };
    headers.get_all(COOKIE).iter().any(|value| {
        // A value that is not text is keyed lossily (two values could share a
        // key): a credential.
        value.to_str().is_err()
            || cookie_pairs(value.as_bytes()).any(|(name, v)| v.is_none() || !known(name))
    })
}

/// Whether the request sends a cookie whose name is not a keyed or ignored name as
/// written, but is one as some origin reads it: trimmed (Django, Express), in another
/// case (ASP.NET), percent-decoded or with `.`/space read as `_` (PHP). Such a request
/// is keyed as if it lacked the cookie while the origin may answer as if it had it, so
/// its answer is never stored, whatever the origin says.
pub(crate) fn near_miss_cookie(route: &RouteConfig, headers: &HeaderMap) -> bool {
    if route.key_cookies.is_empty() && route.ignore_cookies.is_empty() {
        return false;
    }
    let loose = |name: &[u8]| -> Vec<u8> {
        let mut out = Vec::with_capacity(name.len());
        let mut i = 0;
        let name = name.trim_ascii();
        while i < name.len() {
            let decoded = (name[i] == b'%')
                .then(|| name.get(i + 1..i + 3))
                .flatten()
                .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
            let (b, used) = decoded.map_or((name[i], 1), |b| (b, 3));
            out.push(match b.to_ascii_lowercase() {
                b'.' | b' ' => b'_',
                b => b,
            });
            i += used;
        }
        out
    };
    let names: Vec<(&[u8], Vec<u8>)> = route
        .key_cookies
        .iter()
        .chain(&route.ignore_cookies)
        .map(|c| (c.as_bytes(), loose(c.as_bytes())))
        .collect();
    headers.get_all(COOKIE).iter().any(|value| {
        cookie_pairs(value.as_bytes()).any(|(name, _)| {
            let folded = loose(name);
            names
                .iter()
                .any(|(exact, loose)| *loose == folded && *exact != name)
        })
    })
}

/// A delta-seconds value (RFC 9111 §1.2.2): digits only, clamped to [`MAX_DELTA`]
/// (a value too long to parse counts as the maximum). `None` when not a number.
pub(crate) fn delta_seconds(value: &str) -> Option<Duration> {
    let value = value.trim().trim_matches('"');
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        value
            .parse::<u64>()
            .map_or(MAX_DELTA, Duration::from_secs)
            .min(MAX_DELTA),
    )
}

/// `headers` with every delta-seconds value in `Cache-Control` and `Age` clamped to
/// [`MAX_DELTA`], so that neither the policy crate nor corral overflows on them.
pub(crate) fn clamped(headers: &HeaderMap) -> HeaderMap {
    let too_big = |v: &str| delta_seconds(v).is_some_and(|d| d >= MAX_DELTA);
    let mut out = headers.clone();
    let directives_too_big = headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.split_once('=').is_some_and(|(_, v)| too_big(v)));
    if directives_too_big {
        out.remove(CACHE_CONTROL);
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(text) = value.to_str() else {
                out.append(CACHE_CONTROL, value.clone());
                continue;
            };
            let rewritten: Vec<String> = text
                .split(',')
                .map(|d| match d.split_once('=') {
                    Some((k, v)) if too_big(v) => format!("{}={}", k.trim(), MAX_DELTA.as_secs()),
                    _ => d.trim().to_string(),
                })
                .collect();
            if let Ok(v) = HeaderValue::from_str(&rewritten.join(", ")) {
                out.append(CACHE_CONTROL, v);
            }
        }
    }
    if headers
        .get_all(AGE)
        .iter()
        .any(|v| v.to_str().is_ok_and(too_big))
    {
        out.insert(AGE, HeaderValue::from(MAX_DELTA.as_secs()));
    }
    out
}

/// Whether `Vary` names `name`.
fn varies_on(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim().eq_ignore_ascii_case(name.as_str()))
}

/// Whether `Connection` names `Vary`: the proxy must drop that `Vary` (RFC 9110
/// §7.6.1), after which the variants cannot be told apart, so the response is not
/// stored (as with `Vary: *`).
pub(crate) fn connection_names_vary(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim().eq_ignore_ascii_case(VARY.as_str()))
}

/// Whether `Vary` names `*` or anything that is not a header name: a response whose
/// variants corral cannot tell apart, so it is not stored.
fn varies_unknowably(headers: &HeaderMap) -> bool {
    headers.get_all(VARY).iter().any(|v| match v.to_str() {
        Err(_) => true,
        Ok(v) => v
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .any(|n| match HeaderName::from_bytes(n.as_bytes()) {
                Err(_) => true,
                // A header whose value corral derives from the peer (`Via`,
                // `X-Forwarded-For`, ...): the origin saw corral's value, lookups cannot,
                // so the variants could not be told apart. (`X-Forwarded-Proto`/`-Host`
                // follow from the key, so varying on them is fine.)
                Ok(name) => {
                    n == "*"
                        || name == http::header::VIA
                        || crate::http::headers::is_client_address(&name)
                }
            }),
    })
}

/// Decides whether `res`, received at `received_at` for `req`, may be stored on `route`.
///
/// Any pass for a request with credentials is request-specific (`Credentials` or
/// `Authorization`): the origin may well have answered differently because of them
/// (`private` for a signed-in user, a 403 for a bad token), so the pass says nothing
/// about what others would get.
pub fn evaluate(
    route: &RouteConfig,
    req: &request::Parts,
    res: &response::Parts,
    received_at: SystemTime,
) -> Verdict {
    if near_miss_cookie(route, &req.headers) {
        return Verdict::Pass(PassReason::Credentials);
    }
    match evaluate_response(route, req, res, received_at) {
        Verdict::Pass(_) if has_credentials(route, &req.headers) => {
            Verdict::Pass(credentials_reason(route, &req.headers))
        }
        verdict => verdict,
    }
}

/// Which credentials a request carries, as a pass reason.
fn credentials_reason(route: &RouteConfig, headers: &HeaderMap) -> PassReason {
    if credential_authorization(route, headers) {
        PassReason::Authorization
    } else {
        PassReason::Credentials
    }
}

fn evaluate_response(
    route: &RouteConfig,
    req: &request::Parts,
    res: &response::Parts,
    received_at: SystemTime,
) -> Verdict {
    match storable(route, req, res, received_at) {
        Ok(policy) => lifetime(route, &req.headers, &res.headers, &policy, received_at),
        Err(reason) => Verdict::Pass(reason),
    }
}

/// Whether the response may be stored at all (RFC 9111 §3 and the route's rules);
/// the crate's view of it when it may.
fn storable(
    route: &RouteConfig,
    req: &request::Parts,
    res: &response::Parts,
    received_at: SystemTime,
) -> Result<CachePolicy, PassReason> {
    if !route.cacheable_statuses.contains(&res.status) {
        // A 5xx is the upstream's state, the same for everyone; a 4xx may answer
        // something of this request the key does not see.
        return Err(if res.status.is_client_error() {
            PassReason::ClientErrorStatus
        } else {
            PassReason::Status
        });
    }
    if varies_unknowably(&res.headers) {
        return Err(PassReason::VaryStar);
    }
    if res.headers.contains_key(SET_COOKIE) && !route.allow_set_cookie {
        return Err(PassReason::SetCookie);
    }

    // The crate sees the exchange as the route allows it to be stored: without the
    // Authorization or Set-Cookie the route accepts, and as a private cache when the
    // route accepts `private` responses. The request's `Cache-Control` and `Pragma`
    // are left out: they ask for this client's answer (RFC 9111 §5.2.1), and a
    // shared cache that let `no-store` there decide would let any client turn
    // caching off for a key (nginx and Varnish ignore them for storage too).
    let mut req_view = Request::builder()
        .method(Method::GET)
        .uri(req.uri.clone())
        .body(())
        .expect("valid parts");
    *req_view.headers_mut() = req.headers.clone();
    req_view.headers_mut().remove(CACHE_CONTROL);
    req_view.headers_mut().remove(PRAGMA);
    if route.allow_authorization {
        req_view.headers_mut().remove(AUTHORIZATION);
    }
    let mut res_view = Response::builder()
        .status(res.status)
        .body(())
        .expect("valid parts");
    *res_view.headers_mut() = clamped(&res.headers);
    if route.allow_set_cookie {
        res_view.headers_mut().remove(SET_COOKIE);
    }
    let options = CacheOptions {
        shared: !route.allow_private,
        cache_heuristic: 0.0,
        ..CacheOptions::default()
    };
    let policy = CachePolicy::new_options(&req_view, &res_view, received_at, options);
    if !policy.is_storable() {
        let reason = if directive(&res.headers, "no-store").is_some() {
            PassReason::NoStore
        } else if directive(&res.headers, "private").is_some() {
            PassReason::Private
        } else if req_view.headers().contains_key(AUTHORIZATION) {
            PassReason::Authorization
        } else {
            PassReason::NotStorable
        };
        return Err(reason);
    }
    Ok(policy)
}

/// How long a storable response `h` lives, for a request with `req_headers`.
fn lifetime(
    route: &RouteConfig,
    req_headers: &HeaderMap,
    h: &HeaderMap,
    policy: &CachePolicy,
    received_at: SystemTime,
) -> Verdict {
    let must_revalidate = ["no-cache", "must-revalidate", "proxy-revalidate"]
        .iter()
        .any(|d| directive(h, d).is_some());
    let explicit = directive(h, "max-age").is_some()
        || directive(h, "s-maxage").is_some()
        || h.contains_key(EXPIRES);
    // `Expires` far in the future is not delta-seconds: clamp it the same way.
    let explicit_ttl = explicit.then(|| policy.time_to_live(received_at).min(MAX_DELTA));
    // Web cache deception: `/account/x.css` with the victim's cookie, answered without
    // Cache-Control (or with `max-age=0`), must not be stored for everyone on the
    // route's ttl, stale windows or revalidation keep. (A response that varies on
    // `Cookie` is stored for that exact `Cookie` only: no risk.)
    let credentials = credential_authorization(route, req_headers)
        || (credential_cookie(route, req_headers) && !varies_on(h, &COOKIE));
    if credentials && !origin_shares(h, explicit_ttl) {
        return Verdict::Pass(credentials_reason(route, req_headers));
    }
    // What the route adds to the origin's word; nothing for a credentialed request.
    let override_ttl = route.override_ttl && !credentials;
    let route_window = |default: Duration| if credentials { Duration::ZERO } else { default };
    let age = policy.age(received_at).min(MAX_DELTA);
    let fresh_for = if override_ttl {
        route.ttl
    } else if directive(h, "no-cache").is_some() {
        Duration::ZERO
    } else if let Some(ttl) = explicit_ttl {
        ttl
    } else {
        route.ttl.saturating_sub(age)
    };
    let window = |name: &str, default: Duration| {
        if must_revalidate && !override_ttl {
            return Duration::ZERO;
        }
        directive(h, name)
            .flatten()
            .and_then(delta_seconds)
            .unwrap_or(route_window(default))
    };
    let stale_while_revalidate = window("stale-while-revalidate", route.stale_while_revalidate);
    let stale_if_error = window("stale-if-error", route.stale_if_error);
    // Without a validator, an entry past its windows can serve no one: keep nothing.
    let keep = if has_validator(h) {
        route_window(route.keep)
    } else {
        Duration::ZERO
    };
    if fresh_for.is_zero()
        && stale_while_revalidate.is_zero()
        && stale_if_error.is_zero()
        && keep.is_zero()
    {
        return Verdict::Pass(PassReason::ZeroLifetime);
    }
    Verdict::Store(Box::new(Lifetime {
        received_at,
        age,
        fresh_for,
        stale_while_revalidate,
        stale_if_error,
        keep,
    }))
}

/// Whether the origin said a response may be shared with others although the request
/// carried credentials: positive explicit shared freshness (`explicit_ttl`, from
/// `s-maxage`, `max-age` or `Expires`), or, without any, `public` (which allows
/// heuristic freshness, RFC 9111 §4.2.2) without `no-cache`. `max-age=0` or an
/// `Expires` in the past says the opposite: revalidate every time.
fn origin_shares(h: &HeaderMap, explicit_ttl: Option<Duration>) -> bool {
    match explicit_ttl {
        Some(ttl) => !ttl.is_zero(),
        None => directive(h, "public").is_some() && directive(h, "no-cache").is_none(),
    }
}

/// Whether the response carries a validator for revalidating it later.
pub(crate) fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(ETAG) || headers.contains_key(LAST_MODIFIED)
}

/// A `Cache-Control` directive: `None` when absent, `Some(None)` when present without a
/// value, `Some(Some(v))` with one (quotes removed).
pub(crate) fn directive<'h>(headers: &'h HeaderMap, name: &str) -> Option<Option<&'h str>> {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|d| {
            let (k, v) = match d.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
                None => (d.trim(), None),
            };
            k.eq_ignore_ascii_case(name).then_some(v)
        })
}

#[cfg(test)]
mod tests;
