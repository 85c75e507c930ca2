//! Configuration: the TOML file's types, and their validation into typed settings.
//!
//! Parsing happens in two steps. Serde reads the file into `File*` structs that keep
//! every user-written value with its span (`toml::Spanned`), refusing unknown keys. Then
//! `validate` turns them into [`Config`]: durations, byte sizes, URIs and header names,
//! checked for sense (no zero TTL, no duplicate routes). Every error names the file, the
//! line and the key, so an operator can fix it without guessing.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;
use http::header::HeaderName;
use http::{StatusCode, Uri};
use serde::Deserialize;
use toml::Spanned;

mod limits;
pub use limits::LimitsSettings;

/// A fully validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the proxy accepts client connections.
    pub listen: SocketAddr,
    /// Where `/healthz` and `/metrics` are served; none when absent.
    pub admin_listen: Option<SocketAddr>,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Runtime worker threads; `None`: one per core this process may use.
    pub workers: Option<usize>,
    pub cache: CacheSettings,
    /// Fleet mode: the shared tier and fill lock in Redis. `None`: single instance.
    pub redis: Option<RedisSettings>,
    pub lock: LockSettings,
    /// Client connections: how many, and the timeouts that free them.
    pub limits: LimitsSettings,
    pub routes: Vec<RouteConfig>,
}

/// Where the fleet's shared cache and fill lock live.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: String,
    /// Prefixed to every key and channel, so fleets can share one Redis.
    pub key_prefix: String,
    pub connect_timeout: Duration,
    /// A Redis command that takes longer counts as a Redis fault.
    pub command_timeout: Duration,
    /// After a Redis fault, how long corral runs single-instance before trying again.
    pub retry_after: Duration,
    /// The longest an instance serves an entry from its local tier before reading
    /// Redis again: the bound on version skew when an invalidation message is lost.
    pub local_ttl: Duration,
}

/// Which fill lock protects a fill across the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// One Redis: the cache's own.
    Single,
    /// The Redlock algorithm over `nodes`, N independent Redis masters (N odd, >= 3):
    /// the lock survives the loss of a minority of them.
    Redlock,
}

/// The fleet-wide fill lock.
#[derive(Debug, Clone)]
pub struct LockSettings {
    pub mode: LockMode,
    /// Lease of a lock grant; the holder extends it while its fetch runs, so this only
    /// bounds how long a dead holder blocks the key.
    pub ttl: Duration,
    /// Redlock: the independent Redis masters.
    pub nodes: Vec<String>,
    /// Redlock: how long one node may take to answer one command.
    pub node_timeout: Duration,
    /// Redlock: attempts after a failed acquisition (no quorum), each after a random
    /// delay up to `retry_delay`.
    pub retries: u32,
    pub retry_delay: Duration,
}

/// Bounds of the local (in-process) cache tier.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// Total weight of the local cache: bodies, headers and keys.
    pub max_bytes: u64,
    /// A response body larger than this is streamed through and never stored.
    pub max_object_bytes: u64,
}

/// How the query string takes part in the cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueryMode {
    /// The query string as the client sent it.
    Keep,
    /// Parameters sorted, so `?b=1&a=2` and `?a=2&b=1` share an entry.
    Sort,
    /// The query string plays no part.
    Ignore,
}

/// What a request that waited on another's fill for too long does then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnWaitTimeout {
    /// Go to the upstream itself, without coalescing (the default).
    Fetch,
    /// Answer `504 Gateway Timeout`, protecting the upstream at the client's expense.
    Error,
}

/// One validated route: what it matches, where it goes and how it caches.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// Lowercase host name without port; `None` matches any host.
    pub host: Option<String>,
    pub path_prefix: String,
    pub upstream: Uri,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Freshness when the upstream gives none (or always, with `override_ttl`).
    pub ttl: Duration,
    pub override_ttl: bool,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// How long past its stale windows an entry with a validator is kept, so that a
    /// refresh can revalidate it (a 304 without a body) instead of refetching it.
    pub keep: Duration,
    pub key_query: QueryMode,
    pub key_headers: Vec<HeaderName>,
    pub cacheable_statuses: Vec<StatusCode>,
    /// `false` turns caching (and coalescing) off for the route: a plain reverse proxy.
    pub cache: bool,
    /// `false` keeps caching but turns coalescing and the fill lock off: every miss
    /// goes upstream. Only useful as a baseline to measure the herd corral absorbs.
    pub coalesce: bool,
    pub allow_authorization: bool,
    pub allow_set_cookie: bool,
    pub allow_private: bool,
    /// How long a key whose response was uncacheable is passed straight upstream.
    pub hit_for_pass: Duration,
    pub preserve_host: bool,
    /// The response header listing an entry's tags for purging (e.g. `Surrogate-Key`).
    pub tag_header: Option<HeaderName>,
    pub wait_timeout: Duration,
    pub on_wait_timeout: OnWaitTimeout,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {key}: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The key the error is about, as `route[1].ttl`.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } => None,
        }
    }

    /// The 1-based line the error points at.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => Some(*line),
            ConfigError::Read { .. } => None,
        }
    }
}

/// Status codes RFC 9110 §15.1 calls heuristically cacheable; the default list.
const DEFAULT_CACHEABLE_STATUSES: &[u16] = &[200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Validates `text`; `path` only names the source in errors.
    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let source = Source { path, text };
        let file: FileConfig = toml::from_str(text).map_err(|e| source.toml_error(&e))?;
        file.validate(&source)
    }
}

// ---- the file as written -------------------------------------------------------------

type Text = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Text,
    admin_listen: Option<Text>,
    shutdown_grace: Option<Text>,
    workers: Option<Spanned<u32>>,
    #[serde(default)]
    cache: FileCache,
    #[serde(default)]
    lock: FileLock,
    redis: Option<FileRedis>,
    #[serde(default)]
    limits: limits::FileLimits,
    #[serde(default, rename = "route")]
    routes: Vec<FileRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCache {
    max_bytes: Option<Text>,
    max_object_bytes: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLock {
    wait_timeout: Option<Text>,
    on_wait_timeout: Option<OnWaitTimeout>,
    mode: Option<LockMode>,
    ttl: Option<Text>,
    nodes: Option<Spanned<Vec<String>>>,
    node_timeout: Option<Text>,
    retries: Option<u32>,
    retry_delay: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRedis {
    url: Text,
    key_prefix: Option<Text>,
    connect_timeout: Option<Text>,
    command_timeout: Option<Text>,
    retry_after: Option<Text>,
    local_ttl: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    name: Text,
    host: Option<Text>,
    path_prefix: Option<Text>,
    upstream: Text,
    connect_timeout: Option<Text>,
    response_timeout: Option<Text>,
    ttl: Option<Text>,
    #[serde(default)]
    override_ttl: bool,
    stale_while_revalidate: Option<Text>,
    stale_if_error: Option<Text>,
    keep: Option<Text>,
    #[serde(default)]
    key: FileKey,
    cacheable_statuses: Option<Spanned<Vec<u16>>>,
    #[serde(default = "yes")]
    cache: bool,
    #[serde(default = "yes")]
    coalesce: bool,
    #[serde(default)]
    allow_authorization: bool,
    #[serde(default)]
    allow_set_cookie: bool,
    #[serde(default)]
    allow_private: bool,
    hit_for_pass: Option<Text>,
    #[serde(default)]
    preserve_host: bool,
    tag_header: Option<Text>,
    wait_timeout: Option<Text>,
    on_wait_timeout: Option<OnWaitTimeout>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    #[serde(default = "keep")]
    query: QueryMode,
    #[serde(default)]
    headers: Vec<Text>,
}

fn keep() -> QueryMode {
    QueryMode::Keep
}

impl Default for FileKey {
    fn default() -> Self {
        FileKey {
            query: QueryMode::Keep,
            headers: Vec::new(),
        }
    }
}

// ---- validation ----------------------------------------------------------------------

/// The text being validated, to turn spans into lines for error messages.
struct Source<'a> {
    path: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn error(
        &self,
        span: Range<usize>,
        key: impl fmt::Display,
        message: impl fmt::Display,
    ) -> ConfigError {
        let (line, column) = self.position(span.start);
        ConfigError::Invalid {
            path: self.path.to_string(),
            line,
            column,
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    }

    /// A TOML or serde error, with the key worked out from the text at its span: the
    /// enclosing table (`route[2]`) and the key on that line.
    fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        let span = err.span().unwrap_or(0..0);
        let message = err.message().trim().to_string();
        let start = span.start.min(self.text.len());
        let mut table = String::new();
        let mut route_index: Option<usize> = None;
        for header in self.text[..start].lines().map(str::trim) {
            if header == "[[route]]" {
                route_index = Some(route_index.map_or(0, |i| i + 1));
                table = format!("route[{}]", route_index.unwrap_or(0));
            } else if header.starts_with('[') && header.ends_with(']') {
                table = header
                    .trim_matches(|c| c == '[' || c == ']')
                    .trim()
                    .to_string();
            }
        }
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[start..]
            .find('\n')
            .map_or(self.text.len(), |i| start + i);
        let line = &self.text[line_start..line_end];
        let name = match line.split_once('=') {
            Some((k, _)) if !line.trim_start().starts_with('[') => {
                k.trim().trim_matches('"').to_string()
            }
            _ => String::new(),
        };
        let key = match (table.is_empty(), name.is_empty()) {
            (true, true) => "(document)".to_string(),
            (true, false) => name,
            (false, true) => table,
            (false, false) => format!("{table}.{name}"),
        };
        self.error(span, key, message)
    }
}

fn duration(src: &Source, key: &str, value: &Text) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.get_ref().trim()).map_err(|e| {
        src.error(
            value.span(),
            key,
            format_args!(
                "invalid duration {:?} ({e}); write e.g. \"500ms\", \"30s\", \"10m\"",
                value.get_ref()
            ),
        )
    })
}

fn positive_duration(src: &Source, key: &str, value: &Text) -> Result<Duration, ConfigError> {
    let d = duration(src, key, value)?;
    if d.is_zero() {
        return Err(src.error(value.span(), key, "must be greater than zero"));
    }
    Ok(d)
}

fn optional(
    src: &Source,
    key: &str,
    value: &Option<Text>,
    default: Duration,
    parse: fn(&Source, &str, &Text) -> Result<Duration, ConfigError>,
) -> Result<Duration, ConfigError> {
    value.as_ref().map_or(Ok(default), |v| parse(src, key, v))
}

fn byte_size(src: &Source, key: &str, value: &Text) -> Result<u64, ConfigError> {
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

fn socket_addr(src: &Source, key: &str, value: &Text) -> Result<SocketAddr, ConfigError> {
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

fn upstream_uri(src: &Source, key: &str, value: &Text) -> Result<Uri, ConfigError> {
    let fail = |why: &str| {
        src.error(
            value.span(),
            key,
            format_args!("invalid upstream URL {:?}: {why}", value.get_ref()),
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
    if uri.host().is_none_or(str::is_empty) {
        return Err(fail("it has no host"));
    }
    if uri.query().is_some() {
        return Err(fail("it may not have a query string"));
    }
    Ok(uri)
}

impl FileConfig {
    fn validate(self, src: &Source) -> Result<Config, ConfigError> {
        let listen = socket_addr(src, "listen", &self.listen)?;
        let admin_listen = self
            .admin_listen
            .as_ref()
            .map(|v| socket_addr(src, "admin_listen", v))
            .transpose()?;
        if let (Some(admin), Some(text)) = (admin_listen, &self.admin_listen) {
            // Port 0 asks the OS for a free port each, so those never collide.
            if admin == listen && admin.port() != 0 {
                return Err(src.error(text.span(), "admin_listen", "must differ from `listen`"));
            }
        }
        let shutdown_grace = optional(
            src,
            "shutdown_grace",
            &self.shutdown_grace,
            Duration::from_secs(30),
            duration,
        )?;

        let workers = match &self.workers {
            Some(n) if !(1..=1024).contains(n.get_ref()) => {
                return Err(src.error(n.span(), "workers", "must be between 1 and 1024"));
            }
            Some(n) => Some(*n.get_ref() as usize),
            None => None,
        };

        let max_bytes = match &self.cache.max_bytes {
            Some(v) => byte_size(src, "cache.max_bytes", v)?,
            None => 256 * 1024 * 1024,
        };
        let max_object_bytes = match &self.cache.max_object_bytes {
            Some(v) => byte_size(src, "cache.max_object_bytes", v)?,
            None => (8 * 1024 * 1024).min(max_bytes),
        };
        if max_object_bytes > max_bytes || max_object_bytes > u64::from(u32::MAX) {
            let span = self
                .cache
                .max_object_bytes
                .as_ref()
                .map_or(0..0, |v| v.span());
            return Err(src.error(
                span,
                "cache.max_object_bytes",
                "must be at most cache.max_bytes (and at most 4GiB)",
            ));
        }

        let wait_timeout = optional(
            src,
            "lock.wait_timeout",
            &self.lock.wait_timeout,
            Duration::from_secs(10),
            positive_duration,
        )?;
        let on_wait_timeout = self.lock.on_wait_timeout.unwrap_or(OnWaitTimeout::Fetch);
        let redis = self.redis.as_ref().map(|r| r.validate(src)).transpose()?;
        let lock = self.lock.validate(src, redis.is_some())?;
        let limits = self.limits.validate(src)?;

        if self.routes.is_empty() {
            return Err(src.error(
                self.listen.span(),
                "route",
                "the config has no [[route]]: nothing would be served",
            ));
        }
        let mut routes: Vec<RouteConfig> = Vec::with_capacity(self.routes.len());
        let mut names = HashSet::new();
        for (i, route) in self.routes.into_iter().enumerate() {
            let validated = route.validate(src, i, wait_timeout, on_wait_timeout, &mut names)?;
            if let Some(earlier) = routes
                .iter()
                .find(|r| r.host == validated.host && r.path_prefix == validated.path_prefix)
            {
                return Err(src.error(
                    validated_span(src, i),
                    format_args!("route[{i}]"),
                    format_args!(
                        "route {:?} matches the same host and path_prefix as route {:?}; it could never be reached",
                        validated.name, earlier.name
                    ),
                ));
            }
            routes.push(validated);
        }
        Ok(Config {
            listen,
            admin_listen,
            shutdown_grace,
            workers,
            cache: CacheSettings {
                max_bytes,
                max_object_bytes,
            },
            redis,
            lock,
            limits,
            routes,
        })
    }
}

impl FileLock {
    fn validate(&self, src: &Source, fleet: bool) -> Result<LockSettings, ConfigError> {
        let mode = self.mode.unwrap_or(LockMode::Single);
        let ttl = optional(
            src,
            "lock.ttl",
            &self.ttl,
            Duration::from_secs(10),
            positive_duration,
        )?;
        let nodes: Vec<String> = self
            .nodes
            .as_ref()
            .map_or_else(Vec::new, |n| n.get_ref().clone());
        let span = self.nodes.as_ref().map_or(0..0, |n| n.span());
        match mode {
            LockMode::Single if !nodes.is_empty() => {
                return Err(src.error(
                    span,
                    "lock.nodes",
                    "nodes are for mode = \"redlock\"; mode \"single\" locks on [redis]",
                ));
            }
            LockMode::Redlock => {
                if !fleet {
                    return Err(src.error(
                        span,
                        "lock.mode",
                        "redlock needs a [redis] section: the shared cache the lock protects",
                    ));
                }
                if nodes.len() < 3 || nodes.len().is_multiple_of(2) {
                    return Err(src.error(
                        span,
                        "lock.nodes",
                        format_args!("redlock needs an odd number of at least 3 independent Redis nodes, not {}", nodes.len()),
                    ));
                }
                for url in &nodes {
                    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
                        return Err(src.error(
                            span.clone(),
                            "lock.nodes",
                            format_args!("invalid Redis URL {url:?} ({e})"),
                        ));
                    }
                }
            }
            LockMode::Single => {}
        }
        let node_timeout = optional(
            src,
            "lock.node_timeout",
            &self.node_timeout,
            Duration::from_millis(50),
            positive_duration,
        )?;
        if mode == LockMode::Redlock && node_timeout * 4 > ttl {
            let span = self.node_timeout.as_ref().map_or(span, |t| t.span());
            return Err(src.error(
                span,
                "lock.node_timeout",
                "must be well under lock.ttl (at most a quarter), or no grant has validity left",
            ));
        }
        Ok(LockSettings {
            mode,
            ttl,
            nodes,
            node_timeout,
            retries: self.retries.unwrap_or(3),
            retry_delay: optional(
                src,
                "lock.retry_delay",
                &self.retry_delay,
                Duration::from_millis(50),
                positive_duration,
            )?,
        })
    }
}

impl FileRedis {
    fn validate(&self, src: &Source) -> Result<RedisSettings, ConfigError> {
        let url = self.url.get_ref().trim().to_string();
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
            return Err(src.error(
                self.url.span(),
                "redis.url",
                format_args!("invalid Redis URL ({e}); write e.g. \"redis://127.0.0.1:6379\" or \"rediss://:password@host:6380\""),
            ));
        }
        let key_prefix = self
            .key_prefix
            .as_ref()
            .map_or("corral:".to_string(), |p| p.get_ref().clone());
        if key_prefix.contains(['{', '}']) {
            let span = self.key_prefix.as_ref().map_or(0..0, |p| p.span());
            return Err(src.error(
                span,
                "redis.key_prefix",
                "may not contain '{' or '}' (corral adds its own hash tags)",
            ));
        }
        Ok(RedisSettings {
            url,
            key_prefix,
            connect_timeout: optional(
                src,
                "redis.connect_timeout",
                &self.connect_timeout,
                Duration::from_secs(1),
                positive_duration,
            )?,
            command_timeout: optional(
                src,
                "redis.command_timeout",
                &self.command_timeout,
                Duration::from_millis(250),
                positive_duration,
            )?,
            retry_after: optional(
                src,
                "redis.retry_after",
                &self.retry_after,
                Duration::from_secs(1),
                positive_duration,
            )?,
            local_ttl: optional(
                src,
                "redis.local_ttl",
                &self.local_ttl,
                Duration::from_secs(5),
                positive_duration,
            )?,
        })
    }
}

/// The span of the `i`th `[[route]]` header, for errors about the route as a whole.
fn validated_span(src: &Source, i: usize) -> Range<usize> {
    let mut offset = 0;
    let mut seen = 0;
    for line in src.text.split_inclusive('\n') {
        if line.trim() == "[[route]]" {
            if seen == i {
                return offset..offset + line.len();
            }
            seen += 1;
        }
        offset += line.len();
    }
    0..0
}

impl FileRoute {
    fn validate(
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
            Some(h) => {
                let host = h.get_ref().trim().to_ascii_lowercase();
                if host.is_empty() || host.contains(['/', ':', ' ']) {
                    return Err(src.error(
                        h.span(),
                        k("host"),
                        "must be a bare host name, without scheme, port or path",
                    ));
                }
                Some(host)
            }
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

        let cacheable_statuses = match &self.cacheable_statuses {
            Some(list) => {
                let mut statuses = Vec::new();
                for code in list.get_ref() {
                    let status = StatusCode::from_u16(*code)
                        .ok()
                        .filter(|s| (200..600).contains(&s.as_u16()))
                        .ok_or_else(|| {
                            src.error(
                                list.span(),
                                k("cacheable_statuses"),
                                format_args!("{code} is not a final HTTP status (200-599)"),
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
            wait_timeout,
            on_wait_timeout: self.on_wait_timeout.unwrap_or(on_wait_timeout),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listen = \"127.0.0.1:8080\"\n[[route]]\nname = \"api\"\nupstream = \"http://127.0.0.1:9000\"\n";

    fn err(text: &str) -> ConfigError {
        Config::parse(text, "test.toml").expect_err("config should be refused")
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "test.toml").unwrap();
        let r = &c.routes[0];
        assert_eq!(r.path_prefix, "/");
        assert_eq!(r.ttl, Duration::from_secs(60));
        assert_eq!(r.key_query, QueryMode::Keep);
        assert!(r.cache);
        assert_eq!(c.cache.max_bytes, 256 * 1024 * 1024);
        assert_eq!(r.on_wait_timeout, OnWaitTimeout::Fetch);
    }

    #[test]
    fn workers_default_to_the_cores_and_must_be_sensible() {
        assert_eq!(Config::parse(MINIMAL, "test.toml").unwrap().workers, None);
        let c = Config::parse(&format!("workers = 3\n{MINIMAL}"), "test.toml").unwrap();
        assert_eq!(c.workers, Some(3));
        for bad in ["0", "5000", "-1", "\"two\""] {
            let e = err(&format!("workers = {bad}\n{MINIMAL}"));
            assert_eq!(e.line(), Some(1), "{bad}: {e}");
            assert!(e.to_string().contains("workers"), "{bad}: {e}");
        }
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let e = err("listen = \"127.0.0.1:8080\"\n[[route]]\nname = \n");
        assert_eq!(e.line(), Some(3), "{e}");
        assert!(e.to_string().starts_with("test.toml:3:"), "{e}");
    }

    #[test]
    fn unknown_key_names_the_key_and_line() {
        let e = err(&format!("{MINIMAL}tll = \"5s\"\n"));
        assert_eq!(e.key(), Some("route[0].tll"), "{e}");
        assert_eq!(e.line(), Some(5));
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn unknown_top_level_section_is_refused() {
        let e = err(&format!("[cahce]\nmax_bytes = \"1MiB\"\n{MINIMAL}"));
        assert_eq!(e.line(), Some(1), "{e}");
    }

    #[test]
    fn bad_duration_names_route_key() {
        let e = err(&format!("{MINIMAL}ttl = \"soon\"\n"));
        assert_eq!(e.key(), Some("route[0].ttl"));
        assert_eq!(e.line(), Some(5));
        assert!(e.to_string().contains("invalid duration"), "{e}");
    }

    #[test]
    fn zero_and_negative_ttl_are_refused() {
        assert_eq!(
            err(&format!("{MINIMAL}ttl = \"0s\"\n")).key(),
            Some("route[0].ttl")
        );
        assert_eq!(
            err(&format!("{MINIMAL}ttl = \"-5s\"\n")).key(),
            Some("route[0].ttl")
        );
    }

    #[test]
    fn bad_size_and_object_larger_than_cache_are_refused() {
        let e = err("listen = \"127.0.0.1:8080\"\n[cache]\nmax_bytes = \"lots\"\n[[route]]\nname = \"a\"\nupstream = \"http://x\"\n");
        assert_eq!(e.key(), Some("cache.max_bytes"), "{e}");
        let text = "listen = \"127.0.0.1:8080\"\n[cache]\nmax_bytes = \"1MiB\"\nmax_object_bytes = \"2MiB\"\n[[route]]\nname = \"a\"\nupstream = \"http://x\"\n";
        let e = err(text);
        assert_eq!(e.key(), Some("cache.max_object_bytes"));
        assert_eq!(e.line(), Some(4));
    }

    #[test]
    fn bad_upstream_urls_are_refused() {
        for bad in ["ftp://x", "not a url", "http://x/?q=1", "/just/a/path"] {
            let e = err(&MINIMAL.replace("http://127.0.0.1:9000", bad));
            assert_eq!(e.key(), Some("route[0].upstream"), "{bad}: {e}");
            assert_eq!(e.line(), Some(4));
        }
    }

    #[test]
    fn duplicate_routes_are_unreachable() {
        let text = format!("{MINIMAL}path_prefix = \"/a\"\n[[route]]\nname = \"b\"\npath_prefix = \"/a\"\nupstream = \"http://x\"\n");
        let e = err(&text);
        assert_eq!(e.key(), Some("route[1]"));
        assert_eq!(e.line(), Some(6));
        assert!(e.to_string().contains("never be reached"), "{e}");
    }

    #[test]
    fn same_prefix_on_different_hosts_is_fine() {
        let text = format!("{MINIMAL}host = \"a.example\"\n[[route]]\nname = \"b\"\nhost = \"b.example\"\nupstream = \"http://x\"\n");
        assert_eq!(Config::parse(&text, "t").unwrap().routes.len(), 2);
    }

    #[test]
    fn bad_enum_and_status_are_refused() {
        let e = err(&format!("{MINIMAL}key = {{ query = \"shuffle\" }}\n"));
        assert_eq!(e.line(), Some(5), "{e}");
        assert!(e.to_string().contains("shuffle"), "{e}");
        let e = err(&format!("{MINIMAL}cacheable_statuses = [200, 99]\n"));
        assert_eq!(e.key(), Some("route[0].cacheable_statuses"));
    }

    #[test]
    fn redis_section_turns_fleet_mode_on() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        assert!(c.redis.is_none());
        let text =
            format!("[redis]\nurl = \"redis://127.0.0.1:6379\"\n[lock]\nttl = \"3s\"\n{MINIMAL}")
                .replacen(MINIMAL.lines().next().unwrap(), "", 1);
        let text = format!("listen = \"127.0.0.1:8080\"\n{text}");
        let c = Config::parse(&text, "t").unwrap();
        let r = c.redis.unwrap();
        assert_eq!(
            (r.url.as_str(), r.key_prefix.as_str()),
            ("redis://127.0.0.1:6379", "corral:")
        );
        assert_eq!(c.lock.ttl, Duration::from_secs(3));
        assert_eq!(c.lock.mode, LockMode::Single);
    }

    #[test]
    fn redlock_needs_an_odd_number_of_nodes_and_a_cache() {
        let head = "listen = \"127.0.0.1:8080\"\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n[lock]\nmode = \"redlock\"\n";
        let route = &MINIMAL[MINIMAL.find('[').unwrap()..];
        let nodes = |n: usize| {
            let list: Vec<String> = (0..n)
                .map(|i| format!("\"redis://127.0.0.1:{}\"", 7001 + i))
                .collect();
            format!("{head}nodes = [{}]\n{route}", list.join(", "))
        };
        assert_eq!(Config::parse(&nodes(5), "t").unwrap().lock.nodes.len(), 5);
        for n in [0, 1, 2, 4] {
            let e = err(&nodes(n));
            assert_eq!(e.key(), Some("lock.nodes"), "{n} nodes: {e}");
        }
        let e = err(&nodes(3).replace("[redis]\nurl = \"redis://127.0.0.1:6379\"\n", ""));
        assert_eq!(e.key(), Some("lock.mode"), "{e}");
        let e = err(&nodes(3).replace("mode = \"redlock\"", "mode = \"single\""));
        assert_eq!(e.key(), Some("lock.nodes"), "{e}");
    }

    #[test]
    fn bad_redis_url_is_refused() {
        let e = err(&format!(
            "listen = \"127.0.0.1:8080\"\n[redis]\nurl = \"http://nope\"\n{}",
            &MINIMAL[MINIMAL.find('[').unwrap()..]
        ));
        assert_eq!(e.key(), Some("redis.url"), "{e}");
        assert_eq!(e.line(), Some(3));
    }

    #[test]
    fn no_routes_is_refused() {
        assert_eq!(err("listen = \"127.0.0.1:8080\"\n").key(), Some("route"));
    }
}
