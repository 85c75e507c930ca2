//! Configuration: the TOML file's types, and their validation into typed settings.
//!
//! Parsing happens in two steps. Serde reads the file into `File*` structs that keep
//! every user-written value with its span (`toml::Spanned`), refusing unknown keys. Then
//! `validate` turns them into [`Config`]: durations, byte sizes, URIs and header names,
//! checked for sense (no zero TTL, no duplicate routes). Every error names the file, the
//! line and the key, so an operator can fix it without guessing.
//!
//! - `settings`: the validated types ([`RouteConfig`], [`RedisSettings`], ...) and their
//!   defaults, each written once: validation starts from them, and code that needs a
//!   config without a file (the demo, unit tests) builds one from them.
//! - `file`: the file as written (serde types, unknown keys refused).
//! - `source`: the text being read, and [`ConfigError`] naming file, line and key.
//! - `values`: parsers of single values (durations, byte sizes, addresses, URLs).
//! - `validate`: the document as a whole; `route`, `redis` (with `[lock]`) and
//!   `limits`: their sections; `tls`: `[tls]`, whose files are read and checked here.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

mod file;
mod limits;
mod redis;
mod route;
mod settings;
mod source;
mod tls;
mod validate;
mod values;

pub use limits::LimitsSettings;
pub use settings::AdminToken;
pub use settings::CacheSettings;
pub use settings::LockSettings;
pub use settings::RedisSettings;
pub use settings::RouteConfig;
pub use settings::TokenSource;
pub use settings::UpstreamCaps;
pub use settings::{AccessLogFormat, AccessLogSettings};
pub(crate) use settings::{EncodedSlashes, LockMode, OnWaitTimeout, QueryMode, ADMIN_TOKEN_ENV};
pub use source::ConfigError;
pub use tls::TlsSettings;

use file::FileConfig;
use source::Source;

/// A fully validated configuration.
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(PartialEq))]
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
    pub(crate) trusted_proxies: Vec<ipnet::IpNet>,
    pub cache: CacheSettings,
    /// Fleet mode: the shared tier and fill lock in Redis. `None`: single instance.
    pub redis: Option<RedisSettings>,
    pub lock: LockSettings,
    /// Client connections: how many, and the timeouts that free them.
    pub limits: LimitsSettings,
    pub routes: Vec<RouteConfig>,
    /// One line per request; `None`: off.
    pub(crate) access_log: Option<AccessLogSettings>,
    /// TLS on the proxy port; `None`: plain HTTP (and h2c).
    pub tls: Option<TlsSettings>,
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
    fn from_process() -> Environment {
        Environment {
            admin_token: std::env::var_os(ADMIN_TOKEN_ENV),
        }
    }
}

impl Config {
    /// A config listening on `listen` for `routes`, with every other setting at its
    /// default: single instance, no admin listener.
    pub(crate) fn new(listen: SocketAddr, routes: Vec<RouteConfig>) -> Config {
        Config {
            listen,
            admin_listen: None,
            admin_token: None,
            shutdown_grace: Duration::from_secs(30),
            workers: None,
            trusted_proxies: Vec::new(),
            cache: CacheSettings::default(),
            redis: None,
            lock: LockSettings::default(),
            limits: LimitsSettings::default(),
            routes,
            access_log: None,
            tls: None,
        }
    }

    /// Reads and validates the file at `path`, with this process's environment (what
    /// the `corral` command does).
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        Config::load_with(path, &Environment::from_process())
    }

    /// Reads and validates the file at `path`, with `env` for the environment.
    fn load_with(path: impl AsRef<Path>, env: &Environment) -> Result<Config, ConfigError> {
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

/// The route unit tests key requests by: `r`, to `http://u`, every other setting at its
/// default (tests change the fields they are about).
#[cfg(test)]
pub(crate) fn test_route() -> RouteConfig {
    RouteConfig::new("r", http::Uri::from_static("http://u"))
}

#[cfg(test)]
mod tests;
