//! Cache policy: whether a response may be stored, and for how long it is fresh,
//! servable stale while revalidating, and servable stale on error.
//!
//! RFC 9111 storability and freshness come from `http-cache-semantics` (evaluated as a
//! shared cache); the route's overrides (`allow_*`, `ttl`, `override_ttl`) and the
//! RFC 5861 stale windows, which that crate does not cover, are applied here.

use std::time::{Duration, SystemTime};

use http::header::{AUTHORIZATION, CACHE_CONTROL, ETAG, EXPIRES, LAST_MODIFIED, SET_COOKIE, VARY};
use http::{request, response, HeaderMap, Method, Request, Response};
use http_cache_semantics::{CacheOptions, CachePolicy};

use crate::config::RouteConfig;

/// The outcome of evaluating a response for storage.
pub enum Verdict {
    Store(Box<Lifetime>),
    Pass(PassReason),
}

/// How long a stored response lives, measured from when it was received.
#[derive(Debug, Clone)]
pub struct Lifetime {
    pub received_at: SystemTime,
    /// The response's age when it was received (its `Age` header plus transit).
    pub age: Duration,
    pub fresh_for: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// Kept this long past the stale windows, for revalidation only.
    pub keep: Duration,
}

impl Lifetime {
    /// The lifetime of a response served once and never stored (a shared error).
    pub fn none(req: &request::Parts, res: &response::Parts, received_at: SystemTime) -> Lifetime {
        let policy = CachePolicy::new_options(req, res, received_at, CacheOptions::default());
        Lifetime {
            age: policy.age(received_at),
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
}

impl PassReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PassReason::Status => "uncacheable-status",
            PassReason::NoStore => "no-store",
            PassReason::Private => "private",
            PassReason::Authorization => "authorization",
            PassReason::SetCookie => "set-cookie",
            PassReason::VaryStar => "vary-star",
            PassReason::NotStorable => "not-storable",
            PassReason::ZeroLifetime => "zero-lifetime",
            PassReason::TooLarge => "too-large",
        }
    }
}

/// Decides whether `res`, received at `received_at` for `req`, may be stored on `route`.
pub fn evaluate(
    route: &RouteConfig,
    req: &request::Parts,
    res: &response::Parts,
    received_at: SystemTime,
) -> Verdict {
    if !route.cacheable_statuses.contains(&res.status) {
        return Verdict::Pass(PassReason::Status);
    }
    if res.headers.get_all(VARY).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|n| n.trim() == "*"))
    }) {
        return Verdict::Pass(PassReason::VaryStar);
    }
    if res.headers.contains_key(SET_COOKIE) && !route.allow_set_cookie {
        return Verdict::Pass(PassReason::SetCookie);
    }

    // The crate sees the exchange as the route allows it to be stored: without the
    // Authorization or Set-Cookie the route accepts, and as a private cache when the
    // route accepts `private` responses.
    let mut req_view = Request::builder()
        .method(Method::GET)
        .uri(req.uri.clone())
        .body(())
        .expect("valid parts");
    *req_view.headers_mut() = req.headers.clone();
    if route.allow_authorization {
        req_view.headers_mut().remove(AUTHORIZATION);
    }
    let mut res_view = Response::builder()
        .status(res.status)
        .body(())
        .expect("valid parts");
    *res_view.headers_mut() = res.headers.clone();
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
        return Verdict::Pass(reason);
    }

    let h = &res.headers;
    let must_revalidate = ["no-cache", "must-revalidate", "proxy-revalidate"]
        .iter()
        .any(|d| directive(h, d).is_some());
    let explicit = directive(h, "max-age").is_some()
        || directive(h, "s-maxage").is_some()
        || h.contains_key(EXPIRES);
    let age = policy.age(received_at);
    let fresh_for = if route.override_ttl {
        route.ttl
    } else if directive(h, "no-cache").is_some() {
        Duration::ZERO
    } else if explicit {
        policy.time_to_live(received_at)
    } else {
        route.ttl.saturating_sub(age)
    };
    let window = |name: &str, default: Duration| {
        if must_revalidate && !route.override_ttl {
            return Duration::ZERO;
        }
        directive(h, name)
            .flatten()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(default, Duration::from_secs)
    };
    let stale_while_revalidate = window("stale-while-revalidate", route.stale_while_revalidate);
    let stale_if_error = window("stale-if-error", route.stale_if_error);
    // Without a validator, an entry past its windows can serve no one: keep nothing.
    let keep = if has_validator(h) {
        route.keep
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

/// Whether the response carries a validator for revalidating it later.
pub fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(ETAG) || headers.contains_key(LAST_MODIFIED)
}

/// A `Cache-Control` directive: `None` when absent, `Some(None)` when present without a
/// value, `Some(Some(v))` with one (quotes removed).
pub fn directive<'h>(headers: &'h HeaderMap, name: &str) -> Option<Option<&'h str>> {
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
mod tests {
    use super::*;
    use crate::config::Config;

    fn route(extra: &str) -> RouteConfig {
        let text = format!("listen = \"127.0.0.1:1\"\n[[route]]\nname = \"r\"\nupstream = \"http://u\"\nttl = \"60s\"\nstale_while_revalidate = \"30s\"\nstale_if_error = \"5m\"\n{extra}\n");
        Config::parse(&text, "t").unwrap().routes.remove(0)
    }

    fn eval(
        route: &RouteConfig,
        req_headers: &[(&str, &str)],
        status: u16,
        res_headers: &[(&str, &str)],
    ) -> Verdict {
        let mut req = Request::get("http://h/p").body(()).unwrap();
        for (k, v) in req_headers {
            req.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let mut res = Response::builder().status(status).body(()).unwrap();
        for (k, v) in res_headers {
            res.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        evaluate(
            route,
            &req.into_parts().0,
            &res.into_parts().0,
            SystemTime::now(),
        )
    }

    fn lifetime(v: Verdict) -> Lifetime {
        match v {
            Verdict::Store(l) => *l,
            Verdict::Pass(r) => panic!("expected storable, got {}", r.as_str()),
        }
    }

    fn reason(v: Verdict) -> &'static str {
        match v {
            Verdict::Store(_) => "stored",
            Verdict::Pass(r) => r.as_str(),
        }
    }

    #[test]
    fn upstream_max_age_wins_over_route_ttl() {
        let l = lifetime(eval(
            &route(""),
            &[],
            200,
            &[("cache-control", "max-age=10")],
        ));
        assert_eq!(l.fresh_for, Duration::from_secs(10));
        assert_eq!(l.stale_while_revalidate, Duration::from_secs(30));
    }

    #[test]
    fn route_ttl_applies_without_upstream_freshness_or_with_override() {
        assert_eq!(
            lifetime(eval(&route(""), &[], 200, &[])).fresh_for,
            Duration::from_secs(60)
        );
        let forced = route("override_ttl = true");
        assert_eq!(
            lifetime(eval(&forced, &[], 200, &[("cache-control", "max-age=10")])).fresh_for,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn response_stale_directives_override_route_windows() {
        let l = lifetime(eval(
            &route(""),
            &[],
            200,
            &[(
                "cache-control",
                "max-age=1, stale-while-revalidate=7, stale-if-error=9",
            )],
        ));
        assert_eq!(l.stale_while_revalidate, Duration::from_secs(7));
        assert_eq!(l.stale_if_error, Duration::from_secs(9));
        let l = lifetime(eval(
            &route(""),
            &[],
            200,
            &[("cache-control", "max-age=1, must-revalidate")],
        ));
        assert_eq!(l.stale_while_revalidate, Duration::ZERO);
        assert_eq!(l.stale_if_error, Duration::ZERO);
    }

    #[test]
    fn unsafe_responses_pass_unless_route_allows() {
        let r = route("");
        assert_eq!(
            reason(eval(&r, &[], 200, &[("cache-control", "no-store")])),
            "no-store"
        );
        assert_eq!(
            reason(eval(
                &r,
                &[],
                200,
                &[("cache-control", "private, max-age=60")]
            )),
            "private"
        );
        assert_eq!(
            reason(eval(&r, &[], 200, &[("set-cookie", "a=b")])),
            "set-cookie"
        );
        assert_eq!(
            reason(eval(&r, &[("authorization", "Bearer x")], 200, &[])),
            "authorization"
        );
        assert_eq!(reason(eval(&r, &[], 200, &[("vary", "*")])), "vary-star");
        assert_eq!(reason(eval(&r, &[], 500, &[])), "uncacheable-status");
        let allowing =
            route("allow_set_cookie = true\nallow_authorization = true\nallow_private = true");
        assert_eq!(
            reason(eval(&allowing, &[], 200, &[("set-cookie", "a=b")])),
            "stored"
        );
        assert_eq!(
            reason(eval(&allowing, &[("authorization", "Bearer x")], 200, &[])),
            "stored"
        );
        assert_eq!(
            reason(eval(
                &allowing,
                &[],
                200,
                &[("cache-control", "private, max-age=60")]
            )),
            "stored"
        );
    }

    #[test]
    fn public_response_to_authorized_request_is_stored() {
        let l = eval(
            &route(""),
            &[("authorization", "Bearer x")],
            200,
            &[("cache-control", "public, max-age=5")],
        );
        assert_eq!(reason(l), "stored");
    }

    #[test]
    fn no_cache_is_stored_only_to_revalidate() {
        let r = route("");
        let l = lifetime(eval(
            &r,
            &[],
            200,
            &[("cache-control", "no-cache"), ("etag", "\"a\"")],
        ));
        assert_eq!(l.fresh_for, Duration::ZERO);
        assert_eq!(l.stale_while_revalidate, Duration::ZERO);
        assert_eq!(l.keep, Duration::from_secs(600));
        // Without a validator there is nothing to revalidate with: not stored.
        assert_eq!(
            reason(eval(&r, &[], 200, &[("cache-control", "no-cache")])),
            "zero-lifetime"
        );
    }

    #[test]
    fn age_header_shortens_freshness() {
        let l = lifetime(eval(
            &route(""),
            &[],
            200,
            &[("cache-control", "max-age=100"), ("age", "40")],
        ));
        assert_eq!(l.fresh_for, Duration::from_secs(60));
        assert_eq!(l.age, Duration::from_secs(40));
    }

    #[test]
    fn directive_parsing() {
        let mut h = HeaderMap::new();
        h.append(CACHE_CONTROL, "public, Max-Age=\"30\"".parse().unwrap());
        h.append(CACHE_CONTROL, "no-transform".parse().unwrap());
        assert_eq!(directive(&h, "max-age"), Some(Some("30")));
        assert_eq!(directive(&h, "public"), Some(None));
        assert_eq!(directive(&h, "no-transform"), Some(None));
        assert_eq!(directive(&h, "private"), None);
    }
}
