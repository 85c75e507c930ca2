//! The validated settings: what the rest of corral reads, typed and checked, and their
//! defaults. Each default is written here once: validation starts from these values
//! and replaces only what the file sets, and code that needs a config without a file
//! (the demo, unit tests) builds one from them.

use std::fmt;
use std::time::Duration;

use http::header::HeaderName;
use http::{StatusCode, Uri};
use serde::Deserialize;

/// Where the fleet's shared cache and fill lock live.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS. Empty for a
    /// cluster.
    pub(crate) url: String,
    /// Seed nodes of a Redis Cluster (same URL form, database 0); empty for one Redis.
    pub(crate) cluster: Vec<String>,
    /// Prefixed to every key and channel, so fleets can share one Redis.
    pub(crate) key_prefix: String,
    pub(crate) connect_timeout: Duration,
    /// A Redis command that takes longer counts as a Redis fault.
    pub(crate) command_timeout: Duration,
    /// After a Redis fault, how long corral runs single-instance before trying again.
    pub(crate) retry_after: Duration,
    /// The longest an instance serves an entry from its local tier before reading
    /// Redis again: the bound on version skew when an invalidation message is lost.
    pub(crate) local_ttl: Duration,
}

impl RedisSettings {
    /// The Redis at `url` (not checked here), with every other setting at its default.
    pub(crate) fn new(url: impl Into<String>) -> RedisSettings {
        RedisSettings {
            url: url.into(),
            cluster: Vec::new(),
            key_prefix: "corral:".to_string(),
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_millis(250),
            retry_after: Duration::from_secs(1),
            local_ttl: Duration::from_secs(5),
        }
    }
}

impl RedisSettings {
    /// The Redis Cluster reached through `seeds` (not checked here), with every other
    /// setting at its default.
    pub(crate) fn new_cluster(seeds: Vec<String>) -> RedisSettings {
        RedisSettings {
            cluster: seeds,
            ..RedisSettings::new("")
        }
    }

    /// Whether the cache lives on a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        !self.cluster.is_empty()
    }
}

/// Which fill lock protects a fill across the fleet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LockMode {
    /// One Redis: the cache's own.
    #[default]
    Single,
    /// The Redlock algorithm over `nodes`, N independent Redis masters (N odd, >= 3):
    /// the lock survives the loss of a minority of them.
    Redlock,
}

/// The fleet-wide fill lock.
#[derive(Debug, Clone, PartialEq)]
pub struct LockSettings {
    pub(crate) mode: LockMode,
    /// Lease of a lock grant; the holder extends it while its fetch runs, so this only
    /// bounds how long a dead holder blocks the key.
    pub ttl: Duration,
    /// Redlock: the independent Redis masters.
    pub(crate) nodes: Vec<String>,
    /// Redlock: how long one node may take to answer one command.
    pub(crate) node_timeout: Duration,
    /// Redlock: attempts after a failed acquisition (no quorum), each after a random
    /// delay up to `retry_delay`.
    pub(crate) retries: u32,
    pub(crate) retry_delay: Duration,
}

impl Default for LockSettings {
    fn default() -> LockSettings {
        LockSettings {
            mode: LockMode::Single,
            ttl: Duration::from_secs(10),
            nodes: Vec::new(),
            node_timeout: Duration::from_millis(50),
            retries: 3,
            retry_delay: Duration::from_millis(50),
        }
    }
}

/// Bounds of the local (in-process) cache tier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheSettings {
    /// Total weight of the local cache: bodies, headers and keys.
    pub max_bytes: u64,
    /// A response body larger than this is streamed through and never stored.
    pub max_object_bytes: u64,
}

impl Default for CacheSettings {
    /// 256MiB in all, objects up to 8MiB. (Validation lowers the object bound to
    /// `max_bytes` when only that is set below 8MiB.)
    fn default() -> CacheSettings {
        CacheSettings {
            max_bytes: 256 * 1024 * 1024,
            max_object_bytes: 8 * 1024 * 1024,
        }
    }
}

/// How the query string takes part in the cache key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum QueryMode {
    /// The query string as the client sent it.
    #[default]
    Keep,
    /// Parameters sorted, so `?b=1&a=2` and `?a=2&b=1` share an entry.
    Sort,
    /// The query string plays no part.
    Ignore,
}

/// The access log: where its lines go and how they are written (`access_log`,
/// `access_log_format`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogSettings {
    /// `None`: standard output; else the file, appended to.
    pub(crate) path: Option<std::path::PathBuf>,
    pub(crate) format: AccessLogFormat,
}

/// How access-log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// NCSA combined, then corral's fields as `key=value`.
    #[default]
    Combined,
    /// One JSON object per line.
    Json,
}

/// What a request that waited on another's fill for too long does then.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OnWaitTimeout {
    /// Go to the upstream itself, without coalescing (the default).
    #[default]
    Fetch,
    /// Answer `504 Gateway Timeout`, protecting the upstream at the client's expense.
    Error,
}

/// One validated route: what it matches, where it goes and how it caches.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    /// Lowercase host name without port; `None` matches any host.
    pub host: Option<String>,
    pub path_prefix: String,
    pub upstream: Uri,
    pub(crate) connect_timeout: Duration,
    /// How long the upstream may take to answer (head, or a body to cache), counted
    /// from the request's send or, while a client's body is forwarded, its last move.
    pub(crate) response_timeout: Duration,
    /// Freshness when the upstream gives none (or always, with `override_ttl`).
    pub ttl: Duration,
    pub override_ttl: bool,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// How long past its stale windows an entry with a validator is kept, so that a
    /// refresh can revalidate it (a 304 without a body) instead of refetching it.
    pub(crate) keep: Duration,
    pub(crate) key_query: QueryMode,
    pub(crate) key_headers: Vec<HeaderName>,
    /// Cookies whose values are part of the key (`key.cookies`). A request whose
    /// cookies are all keyed or ignored counts as carrying no credentials.
    pub(crate) key_cookies: Vec<String>,
    /// Cookies that are not credentials (`ignore_cookies`, e.g. analytics): forwarded
    /// unchanged, not keyed, and no obstacle to storing a response.
    pub(crate) ignore_cookies: Vec<String>,
    pub(crate) cacheable_statuses: Vec<StatusCode>,
    /// `false` turns caching (and coalescing) off for the route: a plain reverse proxy.
    pub cache: bool,
    /// `false` keeps caching but turns coalescing and the fill lock off: every miss
    /// goes upstream. Only useful as a baseline to measure the herd corral absorbs.
    pub(crate) coalesce: bool,
    /// How early hot entries are refreshed before they expire (XFetch's beta; the
    /// `early_refresh` and `early_refresh_beta` keys): 0 is off.
    pub(crate) early_refresh_beta: f64,
    /// Caps on the requests in flight to the upstream; `None`: uncapped.
    pub(crate) upstream_caps: Option<UpstreamCaps>,
    pub(crate) allow_authorization: bool,
    pub(crate) allow_set_cookie: bool,
    pub(crate) allow_private: bool,
    /// How long a key whose response was uncacheable is passed straight upstream.
    pub(crate) hit_for_pass: Duration,
    pub(crate) preserve_host: bool,
    /// The response header listing an entry's tags for purging (e.g. `Surrogate-Key`).
    pub(crate) tag_header: Option<HeaderName>,
    /// At most this many tags of one response are kept (the first ones); the rest are
    /// dropped, so that a response cannot make corral do unbounded work per fill.
    pub(crate) max_tags: usize,
    pub(crate) wait_timeout: Duration,
    pub(crate) on_wait_timeout: OnWaitTimeout,
    /// Whether paths may carry encoded slashes (`%2F`, `%5C`), forwarded as they are;
    /// refused with `400` otherwise.
    pub(crate) encoded_slashes: EncodedSlashes,
    /// [`RouteConfig::cache_scope`], once asked for.
    pub(crate) scope: ScopeCell,
}

/// A route's caps on requests in flight to its upstream (`upstream_concurrency`,
/// `fleet_upstream_concurrency`, `upstream_queue`, `upstream_queue_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamCaps {
    /// In flight from this instance; also each instance's bound while Redis is away.
    pub(crate) instance: u32,
    /// In flight from the whole fleet, counted in Redis.
    pub(crate) fleet: Option<u32>,
    /// Requests that may wait for a slot; more are refused at once.
    pub(crate) queue: u32,
    /// How long a request may wait for a slot.
    pub(crate) queue_timeout: Duration,
}

/// Requests that may wait for an upstream slot, unless the route says.
pub(super) const DEFAULT_UPSTREAM_QUEUE: u32 = 1024;

/// How long a request waits for an upstream slot, unless the route says.
pub(super) const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request waits on another's fill, unless its route or `[lock]` says.
pub(super) const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Tags kept per response by default: more than any real page needs (Fastly's
/// pages carry a handful), few enough that a fill's tag writes stay one small batch.
const DEFAULT_MAX_TAGS: usize = 64;

/// Status codes RFC 9110 §15.1 calls heuristically cacheable, but for 405 and 501:
/// those answer the method (or an `X-HTTP-Method-Override` the key does not see),
/// not the resource, so storing them lets one client turn a URL off for everyone.
const DEFAULT_CACHEABLE_STATUSES: [StatusCode; 9] = [
    StatusCode::OK,
    StatusCode::NON_AUTHORITATIVE_INFORMATION,
    StatusCode::NO_CONTENT,
    StatusCode::MULTIPLE_CHOICES,
    StatusCode::MOVED_PERMANENTLY,
    StatusCode::PERMANENT_REDIRECT,
    StatusCode::NOT_FOUND,
    StatusCode::GONE,
    StatusCode::URI_TOO_LONG,
];

impl RouteConfig {
    /// A route named `name` to `upstream` for every host and path, with every other
    /// setting at its default.
    pub(crate) fn new(name: impl Into<String>, upstream: Uri) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            host: None,
            path_prefix: "/".to_string(),
            upstream,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(30),
            ttl: Duration::from_secs(60),
            override_ttl: false,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            keep: Duration::from_secs(600),
            key_query: QueryMode::default(),
            key_headers: Vec::new(),
            key_cookies: Vec::new(),
            ignore_cookies: Vec::new(),
            cacheable_statuses: DEFAULT_CACHEABLE_STATUSES.to_vec(),
            cache: true,
            coalesce: true,
            early_refresh_beta: 1.0,
            upstream_caps: None,
            allow_authorization: false,
            allow_set_cookie: false,
            allow_private: false,
            hit_for_pass: Duration::from_secs(30),
            preserve_host: false,
            tag_header: None,
            max_tags: DEFAULT_MAX_TAGS,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            on_wait_timeout: OnWaitTimeout::default(),
            encoded_slashes: EncodedSlashes::default(),
            scope: ScopeCell::default(),
        }
    }

    /// What the route's cache keys start with: its name and a digest of the settings
    /// that decide what is stored under them and how it is served (upstream, lifetimes,
    /// what is keyed and what may be stored). A reload that changes any of them gives
    /// the route new keys in both tiers: nothing stored under the old settings is
    /// served under the new, and in a fleet instances share entries only while they
    /// agree on them. Settings about how requests are sent or coalesced (timeouts,
    /// caps, early refresh) leave the keys, and so the cache, alone.
    ///
    /// Computed once per value, on first use: a route's settings do not change once it
    /// serves (a clone computes its own).
    pub(crate) fn cache_scope(&self) -> &str {
        self.scope.0.get_or_init(|| {
            // Written out field by field in forms no crate or compiler update changes
            // (numbers, names), so that every build of one config agrees on the keys.
            let ns = |d: Duration| d.as_nanos().to_string();
            let names = |v: &[HeaderName]| {
                v.iter()
                    .map(HeaderName::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let statuses: Vec<u16> = self.cacheable_statuses.iter().map(|s| s.as_u16()).collect();
            let query = match self.key_query {
                QueryMode::Keep => "keep",
                QueryMode::Sort => "sort",
                QueryMode::Ignore => "ignore",
            };
            let stored = [
                self.upstream.to_string(),
                self.preserve_host.to_string(),
                ns(self.ttl),
                self.override_ttl.to_string(),
                ns(self.stale_while_revalidate),
                ns(self.stale_if_error),
                ns(self.keep),
                query.to_string(),
                names(&self.key_headers),
                self.key_cookies.join(","),
                self.ignore_cookies.join(","),
                format!("{statuses:?}"),
                ns(self.hit_for_pass),
                self.cache.to_string(),
                self.allow_authorization.to_string(),
                self.allow_set_cookie.to_string(),
                self.allow_private.to_string(),
                self.tag_header
                    .as_ref()
                    .map_or("", HeaderName::as_str)
                    .to_string(),
                self.max_tags.to_string(),
            ]
            .join("\n");
            let digest = xxhash_rust::xxh3::xxh3_64(stored.as_bytes());
            format!("{}\n{:08x}", self.name, digest as u32).into()
        })
    }
}

/// A route's [`RouteConfig::cache_scope`], computed once. Derived from the settings,
/// so not itself one: any two compare equal, and a clone starts empty (a clone may be
/// changed before it is used).
#[derive(Debug, Default)]
pub(crate) struct ScopeCell(std::sync::OnceLock<std::sync::Arc<str>>);

impl Clone for ScopeCell {
    fn clone(&self) -> ScopeCell {
        ScopeCell::default()
    }
}

impl PartialEq for ScopeCell {
    fn eq(&self, _: &ScopeCell) -> bool {
        true
    }
}

/// What a route does with a path that has an encoded slash or backslash.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum EncodedSlashes {
    /// Refuse the request (`400`): origins disagree on whether `%2F` separates segments,
    /// so `/pub/..%2Finternal` could reach a path the route does not expose.
    #[default]
    Reject,
    /// Forward the path with the slash still encoded, for APIs that put identifiers
    /// such as `group%2Fproject` in one segment.
    Keep,
}

/// The admin token: a secret that is never logged, printed or formatted (`Debug`
/// shows where it came from, not what it is).
#[derive(Clone)]
pub struct AdminToken {
    secret: String,
    pub source: TokenSource,
}

/// Where the admin token was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    File,
    /// [`ADMIN_TOKEN_ENV`], which wins over the file.
    Environment,
}

/// The environment variable that sets the admin token, over `admin_token` in the file
/// (so the secret can stay out of a file that is checked in or widely readable).
pub(crate) const ADMIN_TOKEN_ENV: &str = "CORRAL_ADMIN_TOKEN";

/// Shortest admin token accepted: a guessable token on a public port is no token.
const MIN_TOKEN_LEN: usize = 16;
const MAX_TOKEN_LEN: usize = 4096;

impl AdminToken {
    /// Whether `presented` is the token, in time that does not depend on where they
    /// differ (only on the length, which is not secret enough to matter).
    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq as _;
        bool::from(self.secret.as_bytes().ct_eq(presented))
    }

    /// Checks a token's form; the error says what is wrong, never the token.
    pub(super) fn new(secret: &str, source: TokenSource) -> Result<AdminToken, String> {
        if secret.len() < MIN_TOKEN_LEN || secret.len() > MAX_TOKEN_LEN {
            return Err(format!(
                "must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters long (e.g. `openssl rand -hex 32`), not {}",
                secret.len()
            ));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be printable ASCII without spaces (it is sent as `Authorization: Bearer <token>`)".to_string());
        }
        Ok(AdminToken {
            secret: secret.to_string(),
            source,
        })
    }
}

/// Tests compare whole configs; the comparison takes constant time like [`AdminToken::matches`].
#[cfg(test)]
impl PartialEq for AdminToken {
    fn eq(&self, other: &AdminToken) -> bool {
        self.source == other.source && self.matches(other.secret.as_bytes())
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminToken(*** from {:?})", self.source)
    }
}
