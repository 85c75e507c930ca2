//! Validation of one `[[route]]`: what it matches, where it goes and how it caches.

use std::collections::HashSet;
use std::time::Duration;

use http::header::HeaderName;
use http::StatusCode;

use super::file::FileRoute;
use super::settings::{EncodedSlashes, OnWaitTimeout, RouteConfig};
use super::source::{ConfigError, Source};
use super::values::{
    cookie_names, duration, optional, positive_duration, route_host, upstream_uri,
};

/// Tags kept per response by default: more than any real page needs (Fastly's
/// pages carry a handful), few enough that a fill's tag writes stay one small batch.
const DEFAULT_MAX_TAGS: usize = 64;
/// The most `max_tags` may be set to.
const MAX_TAGS_LIMIT: u32 = 4096;

/// Status codes RFC 9110 §15.1 calls heuristically cacheable, but for 405 and 501:
/// those answer the method (or an `X-HTTP-Method-Override` the key does not see),
/// not the resource, so storing them lets one client turn a URL off for everyone.
const DEFAULT_CACHEABLE_STATUSES: &[u16] = &[200, 203, 204, 300, 301, 308, 404, 410, 414];

impl FileRoute {
    pub(super) fn validate(
        self,
        src: &Source,
        i: usize,
        wait_timeout: Duration,
        on_wait_timeout: OnWaitTimeout,
        names: &mut HashSet<String>,
    ) -> Result<RouteConfig, ConfigError> {
        let k = |field: &str| format!("route[{i}].{field}");
        let name = self.name.get_ref().trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(src.error(
                self.name.span(),
                k("name"),
                "must be non-empty and use only letters, digits, '-' and '_'",
            ));
        }
        if !names.insert(name.clone()) {
            return Err(src.error(
                self.name.span(),
                k("name"),
                format_args!("route name {name:?} is used twice"),
            ));
        }
        let host = match &self.host {
            Some(h) => Some(route_host(h.get_ref()).ok_or_else(|| {
                src.error(
                    h.span(),
                    k("host"),
                    "must be a bare host name (letters, digits, '-', '_' and dots between non-empty labels), without scheme, port or path",
                )
            })?),
            None => None,
        };
        let path_prefix = match &self.path_prefix {
            Some(p) if !p.get_ref().starts_with('/') => {
                return Err(src.error(p.span(), k("path_prefix"), "must start with '/'"));
            }
            Some(p) => p.get_ref().clone(),
            None => "/".to_string(),
        };
        let upstream = upstream_uri(src, &k("upstream"), &self.upstream)?;
        let connect_timeout = optional(
            src,
            &k("connect_timeout"),
            &self.connect_timeout,
            Duration::from_secs(5),
            positive_duration,
        )?;
        let response_timeout = optional(
            src,
            &k("response_timeout"),
            &self.response_timeout,
            Duration::from_secs(30),
            positive_duration,
        )?;
        let ttl = optional(
            src,
            &k("ttl"),
            &self.ttl,
            Duration::from_secs(60),
            positive_duration,
        )?;
        let stale_while_revalidate = optional(
            src,
            &k("stale_while_revalidate"),
            &self.stale_while_revalidate,
            Duration::ZERO,
            duration,
        )?;
        let stale_if_error = optional(
            src,
            &k("stale_if_error"),
            &self.stale_if_error,
            Duration::ZERO,
            duration,
        )?;
        let keep = optional(
            src,
            &k("keep"),
            &self.keep,
            Duration::from_secs(600),
            duration,
        )?;
        let hit_for_pass = optional(
            src,
            &k("hit_for_pass"),
            &self.hit_for_pass,
            Duration::from_secs(30),
            positive_duration,
        )?;
        let wait_timeout = optional(
            src,
            &k("wait_timeout"),
            &self.wait_timeout,
            wait_timeout,
            positive_duration,
        )?;

        let mut key_headers = Vec::with_capacity(self.key.headers.len());
        for h in &self.key.headers {
            let name = HeaderName::from_bytes(h.get_ref().trim().as_bytes()).map_err(|_| {
                src.error(
                    h.span(),
                    k("key.headers"),
                    format_args!("{:?} is not a valid header name", h.get_ref()),
                )
            })?;
            key_headers.push(name);
        }
        let key_cookies = cookie_names(src, &k("key.cookies"), &self.key.cookies)?;
        let ignore_cookies = cookie_names(src, &k("ignore_cookies"), &self.ignore_cookies)?;

        let max_tags = match &self.max_tags {
            Some(n) if !(1..=MAX_TAGS_LIMIT).contains(n.get_ref()) => {
                return Err(src.error(
                    n.span(),
                    k("max_tags"),
                    format_args!("must be between 1 and {MAX_TAGS_LIMIT}"),
                ));
            }
            Some(n) => *n.get_ref() as usize,
            None => DEFAULT_MAX_TAGS,
        };

        let cacheable_statuses = match &self.cacheable_statuses {
            Some(list) => {
                let mut statuses = Vec::new();
                for code in list.get_ref() {
                    // A 206 answers a Range request, which is never cached: stored, it
                    // would serve a part as the whole.
                    let status = StatusCode::from_u16(*code)
                        .ok()
                        .filter(|s| (200..600).contains(&s.as_u16()) && s.as_u16() != 206)
                        .ok_or_else(|| {
                            src.error(
                                list.span(),
                                k("cacheable_statuses"),
                                format_args!("{code} is not a final HTTP status (200-599) that can be stored whole (not 206)"),
                            )
                        })?;
                    statuses.push(status);
                }
                statuses
            }
            None => DEFAULT_CACHEABLE_STATUSES
                .iter()
                .map(|c| StatusCode::from_u16(*c).expect("static status codes are valid"))
                .collect(),
        };

        Ok(RouteConfig {
            name,
            host,
            path_prefix,
            upstream,
            connect_timeout,
            response_timeout,
            ttl,
            override_ttl: self.override_ttl,
            stale_while_revalidate,
            stale_if_error,
            keep,
            key_query: self.key.query,
            key_headers,
            key_cookies,
            ignore_cookies,
            cacheable_statuses,
            cache: self.cache,
            coalesce: self.coalesce,
            allow_authorization: self.allow_authorization,
            allow_set_cookie: self.allow_set_cookie,
            allow_private: self.allow_private,
            hit_for_pass,
            preserve_host: self.preserve_host,
            tag_header: match &self.tag_header {
                Some(h) => Some(
                    HeaderName::from_bytes(h.get_ref().trim().as_bytes()).map_err(|_| {
                        src.error(
                            h.span(),
                            k("tag_header"),
                            format_args!("{:?} is not a valid header name", h.get_ref()),
                        )
                    })?,
                ),
                None => None,
            },
            max_tags,
            wait_timeout,
            on_wait_timeout: self.on_wait_timeout.unwrap_or(on_wait_timeout),
            encoded_slashes: self.encoded_slashes.unwrap_or(EncodedSlashes::Reject),
        })
    }
}
