//! Validation of one `[[route]]`: what it matches, where it goes and how it caches.
//! A route starts as [`RouteConfig::new`] (every default) and takes what the file sets.

use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::time::Duration;

use http::StatusCode;

use super::file::FileRoute;
use super::settings::{
    OnWaitTimeout, RouteConfig, UpstreamCaps, DEFAULT_QUEUE_TIMEOUT, DEFAULT_UPSTREAM_QUEUE,
};
use super::source::Text;
use super::source::{ConfigError, Source};
use super::values::{
    cookie_names, duration, header_name, optional, positive_duration, route_host, upstream_uri,
};
use toml::Spanned;

/// The largest `early_refresh_beta`: at 10, a hit 200 fetch times before expiry may
/// already refresh; more would refresh nearly always.
const MAX_BETA: f64 = 10.0;

/// The most an upstream cap or queue may be set to.
const MAX_CAP: u32 = 100_000;

/// The most `max_tags` may be set to.
const MAX_TAGS_LIMIT: u32 = 4096;

/// A route's keys in error messages: `route[2].ttl`.
type Keys<'a> = &'a dyn Fn(&str) -> String;

impl FileRoute {
    /// The `i`th route; `wait_timeout` and `on_wait_timeout` are `[lock]`'s, which the
    /// route's own override. `names` are the routes' names so far (each is unique).
    pub(super) fn validate(
        self,
        src: &Source,
        i: usize,
        wait_timeout: Duration,
        on_wait_timeout: OnWaitTimeout,
        names: &mut HashSet<String>,
    ) -> Result<RouteConfig, ConfigError> {
        let k = |field: &str| format!("route[{i}].{field}");
        // Checked in the order the file's keys have always been, so that a file with
        // several mistakes reports the same one first.
        let name = unique_name(src, &k("name"), &self.name, names)?;
        let host = match &self.host {
            Some(h) => Some(host(src, &k("host"), h)?),
            None => None,
        };
        let path_prefix = match &self.path_prefix {
            Some(p) if !p.get_ref().starts_with('/') => {
                return Err(src.error(p.span(), k("path_prefix"), "must start with '/'"));
            }
            Some(p) => Some(p.get_ref().clone()),
            None => None,
        };
        let upstream = upstream_uri(src, &k("upstream"), &self.upstream)?;
        let mut route = RouteConfig::new(name, upstream);
        route.host = host;
        route.path_prefix = path_prefix.unwrap_or(route.path_prefix);
        route.wait_timeout = wait_timeout;
        self.timings(src, &k, &mut route)?;
        self.keying(src, &k, &mut route)?;
        self.storing(src, &k, &mut route)?;
        route.upstream_caps = self.caps(src, &k)?;
        route.on_wait_timeout = self.on_wait_timeout.unwrap_or(on_wait_timeout);
        route.encoded_slashes = self.encoded_slashes.unwrap_or(route.encoded_slashes);
        Ok(route)
    }

    /// Timeouts, freshness and how long entries are kept.
    fn timings(&self, src: &Source, k: Keys, route: &mut RouteConfig) -> Result<(), ConfigError> {
        let positive = |field: &str, value: &Option<Text>, default: Duration| {
            optional(src, &k(field), value, default, positive_duration)
        };
        let any = |field: &str, value: &Option<Text>, default: Duration| {
            optional(src, &k(field), value, default, duration)
        };
        route.connect_timeout = positive(
            "connect_timeout",
            &self.connect_timeout,
            route.connect_timeout,
        )?;
        route.response_timeout = positive(
            "response_timeout",
            &self.response_timeout,
            route.response_timeout,
        )?;
        route.ttl = positive("ttl", &self.ttl, route.ttl)?;
        route.override_ttl = self.override_ttl.unwrap_or(route.override_ttl);
        route.stale_while_revalidate = any(
            "stale_while_revalidate",
            &self.stale_while_revalidate,
            route.stale_while_revalidate,
        )?;
        route.stale_if_error = any("stale_if_error", &self.stale_if_error, route.stale_if_error)?;
        route.keep = any("keep", &self.keep, route.keep)?;
        route.hit_for_pass = positive("hit_for_pass", &self.hit_for_pass, route.hit_for_pass)?;
        route.wait_timeout = positive("wait_timeout", &self.wait_timeout, route.wait_timeout)?;
        Ok(())
    }

    /// What the cache key is made of, and which cookies are not credentials.
    fn keying(&self, src: &Source, k: Keys, route: &mut RouteConfig) -> Result<(), ConfigError> {
        route.key_query = self.key.query.unwrap_or(route.key_query);
        route.key_headers = self
            .key
            .headers
            .iter()
            .map(|h| header_name(src, &k("key.headers"), h))
            .collect::<Result<_, _>>()?;
        route.key_cookies = cookie_names(src, &k("key.cookies"), &self.key.cookies)?;
        route.ignore_cookies = cookie_names(src, &k("ignore_cookies"), &self.ignore_cookies)?;
        Ok(())
    }

    /// Whether and what the route stores, coalesces and forwards.
    fn storing(&self, src: &Source, k: Keys, route: &mut RouteConfig) -> Result<(), ConfigError> {
        if let Some(n) = &self.max_tags {
            if !(1..=MAX_TAGS_LIMIT).contains(n.get_ref()) {
                return Err(src.error(
                    n.span(),
                    k("max_tags"),
                    format_args!("must be between 1 and {MAX_TAGS_LIMIT}"),
                ));
            }
            route.max_tags = *n.get_ref() as usize;
        }
        if let Some(list) = &self.cacheable_statuses {
            route.cacheable_statuses = list
                .get_ref()
                .iter()
                .map(|code| cacheable_status(*code).ok_or_else(|| {
                    src.error(
                        list.span(),
                        k("cacheable_statuses"),
                        format_args!("{code} is not a final HTTP status (200-599) that can be stored whole (not 206)"),
                    )
                }))
                .collect::<Result<_, _>>()?;
        }
        if let Some(h) = &self.tag_header {
            route.tag_header = Some(header_name(src, &k("tag_header"), h)?);
        }
        route.cache = self.cache.unwrap_or(route.cache);
        route.coalesce = self.coalesce.unwrap_or(route.coalesce);
        if let Some(beta) = &self.early_refresh_beta {
            if !(0.0..=MAX_BETA).contains(beta.get_ref()) {
                return Err(src.error(
                    beta.span(),
                    k("early_refresh_beta"),
                    format_args!("must be a number from 0 (off) to {MAX_BETA}"),
                ));
            }
        }
        let beta = self
            .early_refresh_beta
            .as_ref()
            .map_or(route.early_refresh_beta, |b| *b.get_ref());
        route.early_refresh_beta = if self.early_refresh == Some(false) {
            0.0
        } else {
            beta
        };
        route.allow_authorization = self
            .allow_authorization
            .unwrap_or(route.allow_authorization);
        route.allow_set_cookie = self.allow_set_cookie.unwrap_or(route.allow_set_cookie);
        route.allow_private = self.allow_private.unwrap_or(route.allow_private);
        route.preserve_host = self.preserve_host.unwrap_or(route.preserve_host);
        Ok(())
    }
}

impl FileRoute {
    /// The caps on requests in flight to the upstream: none unless a concurrency is
    /// set. With only the fleet's, an instance may use all of it (and keeps to it
    /// alone while Redis is away).
    fn caps(&self, src: &Source, k: Keys) -> Result<Option<UpstreamCaps>, ConfigError> {
        let count =
            |field: &str, value: &Option<Spanned<u32>>, range: RangeInclusive<u32>| match value {
                Some(n) if !range.contains(n.get_ref()) => Err(src.error(
                    n.span(),
                    k(field),
                    format_args!("must be between {} and {}", range.start(), range.end()),
                )),
                Some(n) => Ok(Some(*n.get_ref())),
                None => Ok(None),
            };
        let instance = count(
            "upstream_concurrency",
            &self.upstream_concurrency,
            1..=MAX_CAP,
        )?;
        let fleet = count(
            "fleet_upstream_concurrency",
            &self.fleet_upstream_concurrency,
            1..=MAX_CAP,
        )?;
        let queue = count("upstream_queue", &self.upstream_queue, 0..=MAX_CAP)?;
        let queue_timeout = optional(
            src,
            &k("upstream_queue_timeout"),
            &self.upstream_queue_timeout,
            DEFAULT_QUEUE_TIMEOUT,
            positive_duration,
        )?;
        let Some(instance) = instance.or(fleet) else {
            if let Some(n) = &self.upstream_queue {
                return Err(src.error(
                    n.span(),
                    k("upstream_queue"),
                    "needs upstream_concurrency or fleet_upstream_concurrency",
                ));
            }
            return Ok(None);
        };
        Ok(Some(UpstreamCaps {
            instance,
            fleet,
            queue: queue.unwrap_or(DEFAULT_UPSTREAM_QUEUE),
            queue_timeout,
        }))
    }
}

/// The route's name: letters, digits, '-' and '_', not used by an earlier route.
fn unique_name(
    src: &Source,
    key: &str,
    name: &Text,
    names: &mut HashSet<String>,
) -> Result<String, ConfigError> {
    let trimmed = name.get_ref().trim().to_string();
    if trimmed.is_empty()
        || !trimmed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(src.error(
            name.span(),
            key,
            "must be non-empty and use only letters, digits, '-' and '_'",
        ));
    }
    if !names.insert(trimmed.clone()) {
        return Err(src.error(
            name.span(),
            key,
            format_args!("route name {trimmed:?} is used twice"),
        ));
    }
    Ok(trimmed)
}

fn host(src: &Source, key: &str, host: &Text) -> Result<String, ConfigError> {
    route_host(host.get_ref()).ok_or_else(|| {
        src.error(
            host.span(),
            key,
            "must be a bare host name (letters, digits, '-', '_' and dots between non-empty labels), without scheme, port or path",
        )
    })
}

/// A status a route may store: final (200-599), and not 206, which answers a Range
/// request, which is never cached: stored, it would serve a part as the whole.
fn cacheable_status(code: u16) -> Option<StatusCode> {
    StatusCode::from_u16(code)
        .ok()
        .filter(|s| (200..600).contains(&s.as_u16()) && s.as_u16() != 206)
}
