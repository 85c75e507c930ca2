//! Cache keys: what makes two requests the same cached object.
//!
//! A key is the route (its name and a digest of its caching settings, see
//! `RouteConfig::cache_scope`), the host, the path, the query string (kept, sorted or ignored
//! per route), any request headers the route names and the values of the cookies it
//! names (`key.cookies`). A response with `Vary` is
//! stored under a *variant* key: the primary key plus the values of the varying headers.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::header::HeaderName;
use http::{HeaderMap, Uri};

use crate::config::{QueryMode, RouteConfig};

/// The identity of a cached object. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(Arc<str>);

/// The forwarding headers an origin builds URLs and redirects from (the client-address
/// ones are left out: keyed, they would give every client its own entry).
const URL_SHAPING: [&str; 15] = [
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-server",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-original-uri",
    "x-url-scheme",
    "front-end-https",
    "x-host",
    "x-original-host",
];

// Fields are separated by a newline, which cannot occur in a URI or header value.
const SEP: char = '\n';
/// Separates a variant key's primary key from its `Vary` values.
const VARY_MARKER: &str = "\nvary\n";

impl CacheKey {
    /// The primary key of a request on `route`.
    pub fn for_request(
        route: &RouteConfig,
        host: Option<&str>,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> CacheKey {
        let mut key = String::with_capacity(64);
        key.push_str(route.cache_scope());
        key.push(SEP);
        key.push_str(host.unwrap_or(""));
        key.push(SEP);
        key.push_str(uri.path());
        if let Some(query) = keyed_query(route.key_query, uri.query()) {
            key.push('?');
            key.push_str(&query);
        }
        for name in &route.key_headers {
            key.push(SEP);
            key.push_str(name.as_str());
            key.push(':');
            push_header_values(&mut key, headers, name);
        }
        for name in &route.key_cookies {
            key.push(SEP);
            key.push_str("cookie:");
            key.push_str(name);
            key.push('=');
            push_cookie_values(&mut key, headers, name);
        }
        // Present only when a trusted proxy sent them (from anyone else they were
        // removed): the origin builds redirects and links from these, so an answer made
        // for `http`, another host, port or prefix must not be served to the others
        // (nginx keys `$scheme` for this reason). In a fixed order, whatever the
        // order of the fields.
        let mut shaping: Vec<(usize, &HeaderName)> = headers
            .keys()
            // Every such name starts with `x-` or `f`: most fields are passed at once.
            .filter(|n| n.as_str().starts_with("x-") || n.as_str().starts_with('f'))
            .filter_map(|n| {
                URL_SHAPING
                    .iter()
                    .position(|s| *s == n.as_str())
                    .map(|i| (i, n))
            })
            .collect();
        shaping.sort_unstable_by_key(|(i, _)| *i);
        for (_, name) in shaping {
            key.push(SEP);
            key.push_str(name.as_str());
            key.push(':');
            push_header_values(&mut key, headers, name);
        }
        CacheKey(key.into())
    }

    /// The key of the variant that `vary_values` (from [`vary_values`]) selects.
    pub(crate) fn variant(&self, vary_values: &str) -> CacheKey {
        CacheKey(format!("{}{VARY_MARKER}{vary_values}", self.0).into())
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The primary key of a variant key (itself for a primary key).
    pub fn primary(&self) -> &str {
        self.0
            .split_once(VARY_MARKER)
            .map_or(&self.0, |(primary, _)| primary)
    }

    /// The primary key of a variant key (a clone of itself for a primary key): where
    /// the entry, or the `Vary` index of its variants, is stored.
    pub(crate) fn primary_key(&self) -> CacheKey {
        match self.0.split_once(VARY_MARKER) {
            Some((primary, _)) => CacheKey(primary.into()),
            None => self.clone(),
        }
    }

    /// Whether this is a variant key (of a response that varies).
    pub(crate) fn is_variant(&self) -> bool {
        self.0.contains(VARY_MARKER)
    }

    /// The scope of the route the key was made for: its name and settings digest.
    pub(crate) fn scope(&self) -> &str {
        let mut seps = self.0.match_indices(SEP).map(|(i, _)| i);
        let end = seps.nth(1).unwrap_or(self.0.len());
        &self.0[..end]
    }

    /// The same key under another scope of its route (one a reload retired).
    pub(crate) fn with_scope(&self, scope: &str) -> CacheKey {
        let rest = &self.0[self.scope().len()..];
        CacheKey(format!("{scope}{rest}").into())
    }

    /// A key as another instance sent it.
    pub fn from_raw(key: &str) -> CacheKey {
        CacheKey(key.into())
    }
}

/// Whether `name` is one of the forwarding headers keyed when a trusted proxy sends it.
pub(crate) fn is_url_shaping(name: &HeaderName) -> bool {
    URL_SHAPING.contains(&name.as_str())
}

/// The query string as `mode` keys it: as sent, parameters sorted, or none.
fn keyed_query(mode: QueryMode, query: Option<&str>) -> Option<Cow<'_, str>> {
    match (mode, query) {
        (QueryMode::Keep, Some(q)) => Some(Cow::Borrowed(q)),
        (QueryMode::Sort, Some(q)) => {
            let mut params: Vec<&str> = q.split('&').filter(|p| !p.is_empty()).collect();
            params.sort_unstable();
            Some(Cow::Owned(params.join("&")))
        }
        (QueryMode::Ignore, _) | (_, None) => None,
    }
}

/// The request target a fill sends upstream: the path, and the query exactly as the
/// route keys it (sorted, or dropped), so that what is stored under a key is the answer
/// to what the key holds: `?lang=evil` cannot be stored for a route that ignores the
/// query.
pub(crate) fn keyed_target(route: &RouteConfig, uri: &Uri) -> Uri {
    if route.key_query == QueryMode::Keep || uri.query().is_none() {
        return uri.clone();
    }
    let mut target = uri.path().to_string();
    if let Some(query) = keyed_query(route.key_query, uri.query()) {
        target.push('?');
        target.push_str(&query);
    }
    target.parse().unwrap_or_else(|_| uri.clone())
}

/// The request's values of the headers a response varies on, in one comparable string.
pub(crate) fn vary_values(names: &[HeaderName], headers: &HeaderMap) -> String {
    let mut out = String::new();
    for name in names {
        out.push_str(name.as_str());
        out.push(':');
        push_header_values(&mut out, headers, name);
        out.push(SEP);
    }
    out
}

fn push_header_values(out: &mut String, headers: &HeaderMap, name: &HeaderName) {
    for (i, value) in headers.get_all(name).iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_escaped(out, value.as_bytes().trim_ascii());
    }
}

/// `bytes` into a key, unambiguously: visible ASCII as it is, `%` and every other byte
/// as `%XX`. (A lossy conversion would give two different non-UTF-8 values one key, so
/// one client's variant could be served to another.)
fn push_escaped(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if (b' '..=b'~').contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The values of cookie `name` in the request's `Cookie` headers, in order, as the
/// origin receives them (see [`cookie_pairs`]).
fn push_cookie_values(out: &mut String, headers: &HeaderMap, name: &str) {
    let values = headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| cookie_pairs(v.as_bytes()))
        .filter(|(n, _)| *n == name.as_bytes())
        .filter_map(|(_, value)| value);
    for (i, value) in values.enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_escaped(out, value);
    }
}

/// The pairs of one `Cookie` header value, written exactly as the origin receives them:
/// split on `;`, skipping only the optional whitespace after each separator (RFC 6265
/// §4.2.1 writes `"; "`) and empty pairs. A pair is `(name, Some(value))` when written
/// `name=value`, `(pair, None)` without `=`. Nothing else is trimmed: `lang =fr` is a
/// cookie named `lang ` (with a space), which some origins read as `lang`, others as
/// `lang_` or not at all, so it must never be taken for the keyed `lang`.
pub(crate) fn cookie_pairs(value: &[u8]) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
    value
        .split(|b| *b == b';')
        .map(|pair| {
            let start = pair
                .iter()
                .position(|b| *b != b' ' && *b != b'\t')
                .unwrap_or(pair.len());
            &pair[start..]
        })
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.iter().position(|b| *b == b'=') {
            Some(eq) => (&pair[..eq], Some(&pair[eq + 1..])),
            None => (pair, None),
        })
}

impl fmt::Display for CacheKey {
    /// Shown with `|` for the separator, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, part) in self.0.split(SEP).enumerate() {
            if i > 0 {
                f.write_str("|")?;
            }
            f.write_str(part)?;
        }
        Ok(())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_route;

    fn key(route: &RouteConfig, uri: &str, headers: &[(&str, &str)]) -> CacheKey {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        CacheKey::for_request(route, Some("h"), &uri.parse().unwrap(), &map)
    }

    #[test]
    fn query_modes() {
        let keep = test_route();
        assert_ne!(key(&keep, "/p?a=1&b=2", &[]), key(&keep, "/p?b=2&a=1", &[]));
        let sort = RouteConfig {
            key_query: QueryMode::Sort,
            ..test_route()
        };
        assert_eq!(key(&sort, "/p?a=1&b=2", &[]), key(&sort, "/p?b=2&a=1", &[]));
        assert_ne!(key(&sort, "/p?a=1", &[]), key(&sort, "/p?a=2", &[]));
        let ignore = RouteConfig {
            key_query: QueryMode::Ignore,
            ..test_route()
        };
        assert_eq!(key(&ignore, "/p?a=1", &[]), key(&ignore, "/p", &[]));
    }

    #[test]
    fn header_values_that_are_not_text_keep_distinct_keys() {
        let r = RouteConfig {
            key_headers: vec![HeaderName::from_static("x-tenant")],
            ..test_route()
        };
        let raw = |bytes: &[u8]| {
            let mut map = HeaderMap::new();
            map.insert("x-tenant", http::HeaderValue::from_bytes(bytes).unwrap());
            CacheKey::for_request(&r, Some("h"), &"/p".parse().unwrap(), &map)
        };
        assert_ne!(raw(b"\xff"), raw(b"\xfe"));
        assert_ne!(raw(b"\xff"), raw(b"%FF"));
        assert_eq!(raw(b"a b"), raw(b"a b"));
    }

    #[test]
    fn named_headers_split_keys() {
        let r = RouteConfig {
            key_headers: vec![HeaderName::from_static("x-tenant")],
            ..test_route()
        };
        assert_ne!(
            key(&r, "/p", &[("x-tenant", "a")]),
            key(&r, "/p", &[("x-tenant", "b")])
        );
        assert_eq!(key(&r, "/p", &[("x-other", "a")]), key(&r, "/p", &[]));
    }

    #[test]
    fn named_cookies_split_keys_and_others_do_not() {
        let r = RouteConfig {
            key_cookies: vec!["lang".to_string()],
            ..test_route()
        };
        let en = key(&r, "/p", &[("cookie", "lang=en; _ga=1")]);
        assert_ne!(en, key(&r, "/p", &[("cookie", "lang=fr")]));
        assert_eq!(
            en,
            key(&r, "/p", &[("cookie", "_ga=2"), ("cookie", "lang=en")])
        );
        assert_ne!(en, key(&r, "/p", &[]));
        // A cookie named like the keyed one as a prefix is another cookie.
        assert_eq!(
            key(&r, "/p", &[("cookie", "language=en")]),
            key(&r, "/p", &[])
        );
        let plain = test_route();
        assert_eq!(
            key(&plain, "/p", &[("cookie", "lang=en")]),
            key(&plain, "/p", &[])
        );
    }

    #[test]
    fn cookies_are_keyed_as_written_not_trimmed() {
        let r = RouteConfig {
            key_cookies: vec!["lang".to_string()],
            ..test_route()
        };
        let fr = key(&r, "/p", &[("cookie", "lang=fr")]);
        let none = key(&r, "/p", &[]);
        // Only the whitespace after a separator is skipped.
        assert_eq!(fr, key(&r, "/p", &[("cookie", "a=1;lang=fr")]));
        assert_eq!(fr, key(&r, "/p", &[("cookie", "a=1; \tlang=fr;")]));
        // A name or value written with spaces is another cookie, or another value.
        assert_eq!(none, key(&r, "/p", &[("cookie", "lang =fr")]));
        assert_ne!(fr, key(&r, "/p", &[("cookie", "lang= fr")]));
        assert_ne!(fr, key(&r, "/p", &[("cookie", "lang=fr ; a=1")]));
        assert_eq!(none, key(&r, "/p", &[("cookie", "lang")]));
        // Crumbs (one pair per header line) key as the joined header does.
        assert_eq!(
            key(&r, "/p", &[("cookie", "a=1; lang=fr; lang=en")]),
            key(
                &r,
                "/p",
                &[
                    ("cookie", "a=1"),
                    ("cookie", "lang=fr"),
                    ("cookie", "lang=en")
                ]
            )
        );
    }

    proptest::proptest! {
        /// Crumbs key as the joined header does (the fast path sees crumbs, the full
        /// path may see them joined), and a keyed cookie's value is keyed as written.
        #[test]
        fn cookie_keys_depend_on_pairs_not_on_header_lines(
            pairs in proptest::collection::vec(("lang|lang |a| lang", "[ -:<-~]{0,8}"), 1..5)
        ) {
            let r = RouteConfig { key_cookies: vec!["lang".to_string()], ..test_route() };
            let written: Vec<String> = pairs.iter().map(|(n, v)| format!("{n}={v}")).collect();
            let joined = written.join("; ");
            let crumbs: Vec<(&str, &str)> = written.iter().map(|p| ("cookie", p.as_str())).collect();
            let one = key(&r, "/p", &[("cookie", &joined)]);
            proptest::prop_assert_eq!(&one, &key(&r, "/p", &crumbs));
            // A value with trailing spaces ends where the next `;` starts.
            let values: Vec<String> = pairs
                .iter()
                .filter(|(n, _)| n.trim_start() == "lang")
                .map(|(_, v)| v.replace('%', "%25"))
                .collect();
            // Keyed unambiguously: `%` escaped like any byte that is not plain text.
            let want = format!("{}\nh\n/p\ncookie:lang={}", r.cache_scope(), values.join(","));
            proptest::prop_assert_eq!(one.as_str(), want.as_str());
        }
    }

    #[test]
    fn variants_differ_by_vary_values() {
        let names = [HeaderName::from_static("accept-language")];
        let mut en = HeaderMap::new();
        en.insert("accept-language", "en".parse().unwrap());
        let mut fr = HeaderMap::new();
        fr.insert("accept-language", "fr".parse().unwrap());
        let base = key(&test_route(), "/p", &[]);
        assert_ne!(
            base.variant(&vary_values(&names, &en)),
            base.variant(&vary_values(&names, &fr))
        );
        assert_eq!(
            base.variant(&vary_values(&names, &en)),
            base.variant(&vary_values(&names, &en))
        );
    }
}
