//! Unit tests of the storage policy: storability, lifetimes, credentials, clamping.

use super::*;
use crate::config::test_route;

/// The test route, with 30s of stale-while-revalidate and 5m of stale-if-error.
fn route() -> RouteConfig {
    RouteConfig {
        ttl: Duration::from_secs(60),
        stale_while_revalidate: Duration::from_secs(30),
        stale_if_error: Duration::from_secs(300),
        ..test_route()
    }
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
    let l = lifetime(eval(&route(), &[], 200, &[("cache-control", "max-age=10")]));
    assert_eq!(l.fresh_for, Duration::from_secs(10));
    assert_eq!(l.stale_while_revalidate, Duration::from_secs(30));
}

#[test]
fn route_ttl_applies_without_upstream_freshness_or_with_override() {
    assert_eq!(
        lifetime(eval(&route(), &[], 200, &[])).fresh_for,
        Duration::from_secs(60)
    );
    let forced = RouteConfig {
        override_ttl: true,
        ..route()
    };
    assert_eq!(
        lifetime(eval(&forced, &[], 200, &[("cache-control", "max-age=10")])).fresh_for,
        Duration::from_secs(60)
    );
}

#[test]
fn response_stale_directives_override_route_windows() {
    let l = lifetime(eval(
        &route(),
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
        &route(),
        &[],
        200,
        &[("cache-control", "max-age=1, must-revalidate")],
    ));
    assert_eq!(l.stale_while_revalidate, Duration::ZERO);
    assert_eq!(l.stale_if_error, Duration::ZERO);
}

#[test]
fn unsafe_responses_pass_unless_route_allows() {
    let r = route();
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
    let allowing = RouteConfig {
        allow_set_cookie: true,
        allow_authorization: true,
        allow_private: true,
        ..route()
    };
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
        &route(),
        &[("authorization", "Bearer x")],
        200,
        &[("cache-control", "public, max-age=5")],
    );
    assert_eq!(reason(l), "stored");
}

#[test]
fn no_cache_is_stored_only_to_revalidate() {
    let r = route();
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
        &route(),
        &[],
        200,
        &[("cache-control", "max-age=100"), ("age", "40")],
    ));
    assert_eq!(l.fresh_for, Duration::from_secs(60));
    assert_eq!(l.age, Duration::from_secs(40));
}

#[test]
fn absurd_delta_seconds_are_clamped_not_overflowed() {
    let huge = "18446744073709551615";
    let longer = "99999999999999999999999999";
    for cc in [
        format!("max-age={huge}"),
        format!("s-maxage={huge}"),
        format!("max-age=1, stale-while-revalidate={huge}, stale-if-error={longer}"),
        format!("max-age={longer}"),
        format!("max-age=\"{huge}\""),
    ] {
        let l = lifetime(eval(&route(), &[], 200, &[("cache-control", &cc)]));
        assert!(l.fresh_for <= MAX_DELTA, "{cc}");
        assert!(l.stale_while_revalidate <= MAX_DELTA, "{cc}");
        assert!(l.stale_if_error <= MAX_DELTA, "{cc}");
        // Building the entry adds these to the received time.
        let entry = crate::cache::CacheEntry::new(
            Response::new(()).into_parts().0,
            bytes::Bytes::new(),
            l,
            &HeaderMap::new(),
        )
        .expect("a 200 with an empty body is framed");
        assert!(entry.freshness(SystemTime::now()).is_fresh(), "{cc}");
    }
    assert_eq!(
        lifetime(eval(
            &route(),
            &[],
            200,
            &[("cache-control", &format!("max-age={longer}"))]
        ))
        .fresh_for,
        MAX_DELTA
    );
    // An absurd Age: the response is as old as can be, hence stale, and no panic.
    let l = lifetime(eval(
        &route(),
        &[],
        200,
        &[("cache-control", "max-age=60"), ("age", huge)],
    ));
    assert_eq!((l.fresh_for, l.age), (Duration::ZERO, MAX_DELTA));
    let l = Lifetime::none(
        &Request::get("/").body(()).unwrap().into_parts().0,
        &Response::builder()
            .header("age", huge)
            .body(())
            .unwrap()
            .into_parts()
            .0,
        SystemTime::now(),
    );
    assert_eq!(l.age, MAX_DELTA);
    let far = eval(
        &route(),
        &[],
        200,
        &[("expires", "Fri, 31 Dec 9999 23:59:59 GMT")],
    );
    assert_eq!(lifetime(far).fresh_for, MAX_DELTA);
}

#[test]
fn delta_seconds_parse_digits_only() {
    assert_eq!(delta_seconds("30"), Some(Duration::from_secs(30)));
    assert_eq!(delta_seconds("\"30\""), Some(Duration::from_secs(30)));
    assert_eq!(delta_seconds("18446744073709551616"), Some(MAX_DELTA));
    assert_eq!(delta_seconds("-1"), None);
    assert_eq!(delta_seconds("+1"), None);
    assert_eq!(delta_seconds(""), None);
}

#[test]
fn cookies_keep_heuristic_responses_out_unless_keyed_or_ignored() {
    let r = route();
    let cookie = [("cookie", "session=abc")];
    assert_eq!(reason(eval(&r, &cookie, 200, &[])), "credentials");
    assert!(PassReason::Credentials.is_request_specific());
    // Explicit shared freshness from the origin still stores.
    for cc in ["max-age=5", "s-maxage=5", "public"] {
        assert_eq!(
            reason(eval(&r, &cookie, 200, &[("cache-control", cc)])),
            "stored",
            "{cc}"
        );
    }
    assert_eq!(
        reason(eval(
            &r,
            &cookie,
            200,
            &[("expires", "Fri, 31 Dec 9999 23:59:59 GMT")]
        )),
        "stored"
    );
    // Revalidation-only storage is heuristic too: not for a credentialed request.
    assert_eq!(
        reason(eval(
            &r,
            &cookie,
            200,
            &[("cache-control", "no-cache"), ("etag", "\"a\"")]
        )),
        "credentials"
    );
    // Any other pass of a credentialed request is request-specific as well.
    let private = eval(&r, &cookie, 200, &[("cache-control", "private")]);
    assert_eq!(reason(private), "credentials");
    let opted = RouteConfig {
        key_cookies: vec!["lang".to_string()],
        ignore_cookies: vec!["_ga".to_string()],
        ..route()
    };
    assert_eq!(
        reason(eval(&opted, &[("cookie", "lang=en; _ga=GA1.2")], 200, &[])),
        "stored"
    );
    assert_eq!(
        reason(eval(&opted, &[("cookie", "lang=en; sid=1")], 200, &[])),
        "credentials"
    );
    let whole = RouteConfig {
        key_headers: vec![http::header::COOKIE],
        ..route()
    };
    assert_eq!(reason(eval(&whole, &cookie, 200, &[])), "stored");
    assert_eq!(
        reason(eval(&r, &cookie, 200, &[("vary", "Cookie")])),
        "stored"
    );
    // Authorization without explicit freshness: request-specific too.
    let auth = [("authorization", "Bearer x")];
    assert_eq!(
        reason(eval(
            &r,
            &auth,
            200,
            &[("cache-control", "must-revalidate")]
        )),
        "authorization"
    );
    assert!(PassReason::Authorization.is_request_specific());
    assert!(!PassReason::NoStore.is_request_specific());
}

#[test]
fn unparsable_vary_is_treated_as_star() {
    let r = route();
    assert_eq!(
        reason(eval(&r, &[], 200, &[("vary", "accept, bad name")])),
        "vary-star"
    );
    assert_eq!(reason(eval(&r, &[], 200, &[("vary", "x(y)")])), "vary-star");
    assert_eq!(
        reason(eval(&r, &[], 200, &[("vary", "accept-encoding, ")])),
        "stored"
    );
}

#[test]
fn method_errors_are_not_stored_by_default() {
    let r = route();
    for status in [501, 206] {
        assert_eq!(
            reason(eval(&r, &[], status, &[])),
            "uncacheable-status",
            "{status}"
        );
    }
    assert_eq!(reason(eval(&r, &[], 405, &[])), "uncacheable-client-error");
    assert_eq!(reason(eval(&r, &[], 404, &[])), "stored");
}

#[test]
fn client_errors_outside_the_list_are_request_specific_server_errors_are_not() {
    let r = route();
    for status in [400, 403, 405, 406, 417, 431] {
        match eval(&r, &[], status, &[("cache-control", "max-age=60")]) {
            Verdict::Pass(reason) => assert!(reason.is_request_specific(), "{status}"),
            Verdict::Store(_) => panic!("{status} stored"),
        }
    }
    for status in [500, 502, 503] {
        match eval(&r, &[], status, &[]) {
            Verdict::Pass(reason) => assert!(!reason.is_request_specific(), "{status}"),
            Verdict::Store(_) => panic!("{status} stored"),
        }
    }
}

#[test]
fn request_cache_directives_do_not_decide_storage() {
    let r = route();
    for (name, value) in [
        ("cache-control", "no-store"),
        ("cache-control", "no-cache, max-age=0"),
        ("pragma", "no-cache"),
    ] {
        assert_eq!(
            reason(eval(&r, &[(name, value)], 200, &[])),
            "stored",
            "{value}"
        );
    }
}

#[test]
fn credentialed_responses_are_stored_only_on_the_origin_word() {
    let cookie = [("cookie", "session=abc")];
    let lenient = RouteConfig {
        override_ttl: true,
        keep: Duration::from_secs(600),
        ..route()
    };
    // Zero or past explicit freshness: revalidate every time, so not shared, whatever
    // the route's override, stale windows or keep would add.
    for headers in [
        &[("cache-control", "max-age=0")][..],
        &[("cache-control", "public, max-age=0")],
        &[("cache-control", "s-maxage=0, max-age=60")],
        &[("cache-control", "max-age=60"), ("age", "60")],
        &[("expires", "0")],
        &[("cache-control", "max-age=0"), ("etag", "\"v1\"")],
        &[("cache-control", "public, no-cache"), ("etag", "\"v1\"")],
    ] {
        assert_eq!(
            reason(eval(&lenient, &cookie, 200, headers)),
            "credentials",
            "{headers:?}"
        );
    }
    // Positive freshness is stored with the origin's windows only: no override, no
    // route windows, no keep.
    let l = lifetime(eval(
        &lenient,
        &cookie,
        200,
        &[
            ("cache-control", "max-age=5, stale-if-error=7"),
            ("etag", "\"v1\""),
        ],
    ));
    assert_eq!(l.fresh_for, Duration::from_secs(5));
    assert_eq!(l.stale_while_revalidate, Duration::ZERO);
    assert_eq!(l.stale_if_error, Duration::from_secs(7));
    assert_eq!(l.keep, Duration::ZERO);
    // `public` alone allows heuristic freshness: the route's ttl, nothing more.
    let l = lifetime(eval(&lenient, &cookie, 200, &[("cache-control", "public")]));
    assert_eq!(l.fresh_for, Duration::from_secs(60));
    assert_eq!(
        (l.stale_while_revalidate, l.keep),
        (Duration::ZERO, Duration::ZERO)
    );
    // Without credentials the route's rules apply as before.
    let l = lifetime(eval(
        &lenient,
        &[],
        200,
        &[("cache-control", "max-age=0"), ("etag", "\"v1\"")],
    ));
    assert_eq!(l.fresh_for, Duration::from_secs(60));
}

#[test]
fn cookie_names_are_compared_as_written() {
    let r = RouteConfig {
        key_cookies: vec!["lang".to_string()],
        ignore_cookies: vec!["_ga".to_string()],
        ..route()
    };
    for cookie in ["lang=fr", "lang=fr;_ga=1", "_ga=1; \tlang=fr;", "lang= fr"] {
        assert_eq!(
            reason(eval(&r, &[("cookie", cookie)], 200, &[])),
            "stored",
            "{cookie}"
        );
    }
    for cookie in ["lang =fr", "lang", "=fr", "lang=fr; _ga =1", "Lang=fr"] {
        assert_eq!(
            reason(eval(&r, &[("cookie", cookie)], 200, &[])),
            "credentials",
            "{cookie}"
        );
    }
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
