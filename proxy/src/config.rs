//! Configuration: the TOML file's types, and their validation into typed settings.
//!
//! Parsing happens in two steps. Serde reads the file into `File*` structs that keep
//! every user-written value with its span (`toml::Spanned`), refusing unknown keys. Then
//! `validate` turns them into [`Config`]: durations, byte sizes, URIs and header names,
//! checked for sense (no zero TTL, no duplicate routes). Every error names the file, the
//! line and the key, so an operator can fix it without guessing.

use std::collections::HashSet;
use std::ffi::OsString;
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
    /// The bearer token `POST /purge` requires; `None`: purges need none (then the
    /// admin listener must be on a loopback address).
    pub admin_token: Option<AdminToken>,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Runtime worker threads; `None`: one per core this process may use.
    pub workers: Option<usize>,
    /// Peers whose forwarding headers (`X-Forwarded-*`, `Forwarded`, ...) are kept and
    /// extended; from anyone else they are removed. Empty: no one is trusted.
    pub trusted_proxies: Vec<ipnet::IpNet>,
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
    /// How long the upstream may take to answer (head, or a body to cache), counted
    /// from the request's send or, while a client's body is forwarded, its last move.
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
    /// Cookies whose values are part of the key (`key.cookies`). A request whose
    /// cookies are all keyed or ignored counts as carrying no credentials.
    pub key_cookies: Vec<String>,
    /// Cookies that are not credentials (`ignore_cookies`, e.g. analytics): forwarded
    /// unchanged, not keyed, and no obstacle to storing a response.
    pub ignore_cookies: Vec<String>,
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
    /// At most this many tags of one response are kept (the first ones); the rest are
    /// dropped, so that a response cannot make corral do unbounded work per fill.
    pub max_tags: usize,
    pub wait_timeout: Duration,
    pub on_wait_timeout: OnWaitTimeout,
    /// Whether paths may carry encoded slashes (`%2F`, `%5C`), forwarded as they are;
    /// refused with `400` otherwise.
    pub encoded_slashes: EncodedSlashes,
}

/// What a route does with a path that has an encoded slash or backslash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodedSlashes {
    /// Refuse the request (`400`): origins disagree on whether `%2F` separates segments,
    /// so `/pub/..%2Finternal` could reach a path the route does not expose.
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
pub const ADMIN_TOKEN_ENV: &str = "CORRAL_ADMIN_TOKEN";

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
    fn new(secret: &str, source: TokenSource) -> Result<AdminToken, String> {
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

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminToken(*** from {:?})", self.source)
    }
}

/// The settings corral reads from its environment rather than the file. Passed in, not
/// read where used, so that tests (one process, many threads) need not touch the real
/// environment.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// [`ADMIN_TOKEN_ENV`]'s value, if set.
    pub admin_token: Option<OsString>,
}

impl Environment {
    /// This process's environment.
    pub fn from_process() -> Environment {
        Environment {
            admin_token: std::env::var_os(ADMIN_TOKEN_ENV),
        }
    }
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
    #[error("{var} (environment): {message}")]
    Environment { var: &'static str, message: String },
}

impl ConfigError {
    /// The key the error is about, as `route[1].ttl`.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Environment { var, .. } => Some(var),
            ConfigError::Read { .. } => None,
        }
    }

    /// The 1-based line the error points at.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => Some(*line),
            ConfigError::Read { .. } | ConfigError::Environment { .. } => None,
        }
    }
}

/// Tags kept per response by default: more than any real page needs (Fastly's
/// pages carry a handful), few enough that a fill's tag writes stay one small batch.
const DEFAULT_MAX_TAGS: usize = 64;
/// The most `max_tags` may be set to.
const MAX_TAGS_LIMIT: u32 = 4096;

/// Status codes RFC 9110 §15.1 calls heuristically cacheable, but for 405 and 501:
/// those answer the method (or an `X-HTTP-Method-Override` the key does not see),
/// not the resource, so storing them lets one client turn a URL off for everyone.
const DEFAULT_CACHEABLE_STATUSES: &[u16] = &[200, 203, 204, 300, 301, 308, 404, 410, 414];

/// The longest duration any setting accepts: past it a value is a typo, and time
/// arithmetic on it could overflow.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl Config {
    /// Reads and validates the file at `path`, with this process's environment (what
    /// the `corral` command does).
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        Config::load_with(path, &Environment::from_process())
    }

    /// Reads and validates the file at `path`, with `env` for the environment.
    pub fn load_with(path: impl AsRef<Path>, env: &Environment) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse_with(&text, &path.display().to_string(), env)
    }

    /// Validates `text` alone (no environment); `path` only names the source in errors.
    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, path, &Environment::default())
    }

    /// Validates `text` with `env` for the environment.
    pub fn parse_with(text: &str, path: &str, env: &Environment) -> Result<Config, ConfigError> {
        let source = Source { path, text };
        let file: FileConfig = toml::from_str(text).map_err(|e| source.toml_error(&e))?;
        file.validate(&source, env)
    }
}

// ---- the file as written -------------------------------------------------------------

type Text = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Text,
    admin_listen: Option<Text>,
    admin_token: Option<Text>,
    shutdown_grace: Option<Text>,
    workers: Option<Spanned<u32>>,
    trusted_proxies: Option<Spanned<Vec<String>>>,
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
    #[serde(default)]
    ignore_cookies: Vec<Text>,
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
    max_tags: Option<Spanned<u32>>,
    wait_timeout: Option<Text>,
    on_wait_timeout: Option<OnWaitTimeout>,
    encoded_slashes: Option<EncodedSlashes>,
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
    #[serde(default)]
    cookies: Vec<Text>,
}

fn keep() -> QueryMode {
    QueryMode::Keep
}

impl Default for FileKey {
    fn default() -> Self {
        FileKey {
            query: QueryMode::Keep,
            headers: Vec::new(),
            cookies: Vec::new(),
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

/// `trusted_proxies`: addresses (`10.0.0.1`) or networks (`10.0.0.0/8`).
fn trusted_proxies(
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
fn without_userinfo(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}***@{}", &url[..start], &url[start + at + 1..]),
        None => url.to_string(),
    }
}

fn upstream_uri(src: &Source, key: &str, value: &Text) -> Result<Uri, ConfigError> {
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

/// The admin token from the environment (which wins) or the file.
fn admin_token(
    src: &Source,
    file: Option<&Text>,
    env: &Environment,
) -> Result<Option<AdminToken>, ConfigError> {
    if let Some(value) = &env.admin_token {
        let fail = |message: String| ConfigError::Environment {
            var: ADMIN_TOKEN_ENV,
            message,
        };
        let text = value
            .to_str()
            .ok_or_else(|| fail("is not valid UTF-8".to_string()))?;
        return AdminToken::new(text, TokenSource::Environment)
            .map(Some)
            .map_err(fail);
    }
    file.map(|t| {
        AdminToken::new(t.get_ref(), TokenSource::File)
            .map_err(|message| src.error(t.span(), "admin_token", message))
    })
    .transpose()
}

/// The admin listener's address, refused on a non-loopback address without a token:
/// purges would then be open to whoever can reach the port.
fn admin_listen(
    src: &Source,
    text: Option<&Text>,
    listen: SocketAddr,
    token: Option<&AdminToken>,
) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(text) = text else { return Ok(None) };
    let admin = socket_addr(src, "admin_listen", text)?;
    // Port 0 asks the OS for a free port each, so those never collide.
    if admin == listen && admin.port() != 0 {
        return Err(src.error(text.span(), "admin_listen", "must differ from `listen`"));
    }
    if token.is_none() && !admin.ip().to_canonical().is_loopback() {
        return Err(src.error(
            text.span(),
            "admin_listen",
            format_args!(
                "{admin} is not a loopback address, and no admin token is set: anyone who \
                 can reach it could purge the cache. Set admin_token (or {ADMIN_TOKEN_ENV}), \
                 or listen on 127.0.0.1"
            ),
        ));
    }
    Ok(Some(admin))
}

impl FileConfig {
    fn validate(self, src: &Source, env: &Environment) -> Result<Config, ConfigError> {
        let listen = socket_addr(src, "listen", &self.listen)?;
        let admin_token = admin_token(src, self.admin_token.as_ref(), env)?;
        let admin_listen = admin_listen(
            src,
            self.admin_listen.as_ref(),
            listen,
            admin_token.as_ref(),
        )?;
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

        let trusted_proxies = match &self.trusted_proxies {
            Some(list) => trusted_proxies(src, list)?,
            None => Vec::new(),
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
            admin_token,
            shutdown_grace,
            workers,
            trusted_proxies,
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
                            format_args!("invalid Redis URL {:?} ({e})", without_userinfo(url)),
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

/// A route's host as requests are matched against it: lowercase, without the one
/// trailing dot of a fully qualified name. `None` unless it is a plain host name or
/// IPv4 address: non-empty dot-separated labels of letters, digits, '-' and '_'.
fn route_host(text: &str) -> Option<String> {
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
fn cookie_names(src: &Source, key: &str, names: &[Text]) -> Result<Vec<String>, ConfigError> {
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
    fn trusted_proxies_are_addresses_or_networks() {
        let c = Config::parse(
            &format!("trusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n{MINIMAL}"),
            "test.toml",
        )
        .unwrap();
        assert_eq!(c.trusted_proxies.len(), 2);
        assert!(c.trusted_proxies[0].contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
        let e = err(&format!("trusted_proxies = [\"10.0.0.0/33\"]\n{MINIMAL}"));
        assert_eq!(e.key(), Some("trusted_proxies"));
        assert_eq!(e.line(), Some(1));
    }

    #[test]
    fn encoded_slashes_are_refused_unless_kept() {
        let c = Config::parse(MINIMAL, "test.toml").unwrap();
        assert_eq!(c.routes[0].encoded_slashes, EncodedSlashes::Reject);
        let c = Config::parse(&format!("{MINIMAL}encoded_slashes = \"keep\"\n"), "t").unwrap();
        assert_eq!(c.routes[0].encoded_slashes, EncodedSlashes::Keep);
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

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn env(token: &str) -> Environment {
        Environment {
            admin_token: Some(token.into()),
        }
    }

    #[test]
    fn public_admin_listen_needs_a_token() {
        let public = format!("admin_listen = \"0.0.0.0:9090\"\n{MINIMAL}");
        let e = err(&public);
        assert_eq!((e.key(), e.line()), (Some("admin_listen"), Some(1)), "{e}");
        assert!(e.to_string().starts_with("test.toml:1:"), "{e}");
        assert!(e.to_string().contains(ADMIN_TOKEN_ENV), "{e}");
        for addr in ["[::]:9090", "10.0.0.1:9090", "[::ffff:10.0.0.1]:9090"] {
            let e = err(&format!("admin_listen = \"{addr}\"\n{MINIMAL}"));
            assert_eq!(e.key(), Some("admin_listen"), "{addr}: {e}");
        }
        for addr in [
            "127.0.0.1:9090",
            "127.1.2.3:0",
            "[::1]:9090",
            "[::ffff:127.0.0.1]:1",
        ] {
            Config::parse(&format!("admin_listen = \"{addr}\"\n{MINIMAL}"), "t")
                .unwrap_or_else(|e| panic!("{addr}: {e}"));
        }
        let with_file = format!("admin_token = \"{TOKEN}\"\n{public}");
        let c = Config::parse(&with_file, "t").unwrap();
        assert_eq!(c.admin_token.unwrap().source, TokenSource::File);
        let c = Config::parse_with(&public, "t", &env(TOKEN)).unwrap();
        let token = c.admin_token.unwrap();
        assert_eq!(token.source, TokenSource::Environment);
        assert!(token.matches(TOKEN.as_bytes()));
    }

    #[test]
    fn the_environment_token_wins_and_is_checked() {
        let text = format!("admin_token = \"{TOKEN}\"\n{MINIMAL}");
        let other = "fedcba9876543210fedcba9876543210";
        let token = Config::parse_with(&text, "t", &env(other))
            .unwrap()
            .admin_token
            .unwrap();
        assert!(token.matches(other.as_bytes()) && !token.matches(TOKEN.as_bytes()));
        let e = Config::parse_with(&text, "t", &env("short")).unwrap_err();
        assert_eq!(e.key(), Some(ADMIN_TOKEN_ENV), "{e}");
        assert!(!e.to_string().contains("short"), "never echo a token: {e}");
    }

    #[test]
    fn bad_file_tokens_are_refused_without_being_echoed() {
        for bad in ["tooshort", "has a space in it, sixteen+", ""] {
            let e = err(&format!("admin_token = \"{bad}\"\n{MINIMAL}"));
            assert_eq!((e.key(), e.line()), (Some("admin_token"), Some(1)), "{e}");
            assert!(bad.is_empty() || !e.to_string().contains(bad), "{e}");
        }
        let c = Config::parse(&format!("admin_token = \"{TOKEN}\"\n{MINIMAL}"), "t").unwrap();
        assert!(!format!("{c:?}").contains(TOKEN), "Debug hides the token");
    }

    #[test]
    fn max_tags_defaults_to_64_and_is_bounded() {
        assert_eq!(Config::parse(MINIMAL, "t").unwrap().routes[0].max_tags, 64);
        let c = Config::parse(&format!("{MINIMAL}max_tags = 8\n"), "t").unwrap();
        assert_eq!(c.routes[0].max_tags, 8);
        for bad in ["0", "5000", "-1"] {
            let e = err(&format!("{MINIMAL}max_tags = {bad}\n"));
            assert_eq!(
                (e.key(), e.line()),
                (Some("route[0].max_tags"), Some(5)),
                "{e}"
            );
        }
    }

    #[test]
    fn absurd_durations_are_refused_with_their_key() {
        for bad in ["11years", "100000000000000h", "18446744073709551615s"] {
            let e = err(&format!("{MINIMAL}ttl = \"{bad}\"\n"));
            assert_eq!(e.key(), Some("route[0].ttl"), "{bad}: {e}");
            assert_eq!(e.line(), Some(5), "{bad}: {e}");
        }
        let ok = Config::parse(&format!("{MINIMAL}ttl = \"9years\"\n"), "t").unwrap();
        assert!(ok.routes[0].ttl > Duration::from_secs(9 * 365 * 86400));
        let route = &MINIMAL[MINIMAL.find('[').unwrap()..];
        let e = err(&format!(
            "listen = \"127.0.0.1:8080\"\n[lock]\nttl = \"20years\"\n{route}"
        ));
        assert_eq!(e.key(), Some("lock.ttl"), "{e}");
    }

    #[test]
    fn upstream_credentials_are_refused_without_printing_them() {
        for url in [
            "http://user:s3cret@127.0.0.1:9000",
            "https://:s3cret@x/base",
            "ftp://user:s3cret@x",
        ] {
            let e = err(&MINIMAL.replace("http://127.0.0.1:9000", url));
            assert_eq!(e.key(), Some("route[0].upstream"), "{url}: {e}");
            assert!(!e.to_string().contains("s3cret"), "{url}: {e}");
        }
        let e = err(&MINIMAL.replace("http://127.0.0.1:9000", "http://user:s3cret@x"));
        assert!(e.to_string().contains("credentials"), "{e}");
        assert_eq!(without_userinfo("http://u:p@h:1/a@b"), "http://***@h:1/a@b");
    }

    #[test]
    fn route_hosts_are_normalised_or_refused() {
        let host = |h: &str| {
            Config::parse(&format!("{MINIMAL}host = \"{h}\"\n"), "t")
                .map(|c| c.routes[0].host.clone())
        };
        assert_eq!(
            host("Example.COM.").unwrap().as_deref(),
            Some("example.com")
        );
        assert_eq!(
            host("a_b-1.example").unwrap().as_deref(),
            Some("a_b-1.example")
        );
        for bad in [
            "",
            ".",
            "a..b",
            "x.com:80",
            "x.com/p",
            "http://x.com",
            "a b",
            "x.com..",
            "[::1]",
            "é.com",
        ] {
            let e = host(bad).expect_err(bad);
            assert_eq!(e.key(), Some("route[0].host"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn cookie_settings_are_cookie_names() {
        let c = Config::parse(
            &format!(
                "{MINIMAL}key = {{ cookies = [\"lang\"] }}\nignore_cookies = [\"_ga\", \"_gid\"]\n"
            ),
            "t",
        )
        .unwrap();
        assert_eq!(c.routes[0].key_cookies, ["lang"]);
        assert_eq!(c.routes[0].ignore_cookies, ["_ga", "_gid"]);
        let e = err(&format!("{MINIMAL}ignore_cookies = [\"a=b\"]\n"));
        assert_eq!(e.key(), Some("route[0].ignore_cookies"), "{e}");
        let e = err(&format!("{MINIMAL}key = {{ cookies = [\"\"] }}\n"));
        assert_eq!(e.key(), Some("route[0].key.cookies"), "{e}");
    }

    #[test]
    fn default_statuses_leave_method_errors_out_and_206_is_refused() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        let codes: Vec<u16> = c.routes[0]
            .cacheable_statuses
            .iter()
            .map(|s| s.as_u16())
            .collect();
        assert!(!codes.contains(&405) && !codes.contains(&501), "{codes:?}");
        let e = err(&format!("{MINIMAL}cacheable_statuses = [200, 206]\n"));
        assert_eq!(e.key(), Some("route[0].cacheable_statuses"), "{e}");
    }

    #[test]
    fn no_routes_is_refused() {
        assert_eq!(err("listen = \"127.0.0.1:8080\"\n").key(), Some("route"));
    }
}
