//! Validation of the document as a whole: listeners, admin token, `[cache]`, and the
//! routes together (names and matches unique). The config starts as [`Config::new`]
//! (every default) and takes what the file sets.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use toml::Spanned;

use super::file::{FileCache, FileConfig, FileRoute};
use super::settings::{
    AccessLogFormat, AccessLogSettings, AdminToken, CacheSettings, OnWaitTimeout, RouteConfig,
    TokenSource, ADMIN_TOKEN_ENV, DEFAULT_WAIT_TIMEOUT,
};
use super::source::Text;
use super::source::{validated_span, ConfigError, Source};
use super::values::{
    byte_size, duration, optional, positive_duration, socket_addr, trusted_proxies,
};
use super::{Config, Environment};

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
    pub(super) fn validate(self, src: &Source, env: &Environment) -> Result<Config, ConfigError> {
        // Checked in the order the file's keys have always been, so that a file with
        // several mistakes reports the same one first.
        let listen = socket_addr(src, "listen", &self.listen)?;
        let mut config = Config::new(listen, Vec::new());
        config.admin_token = admin_token(src, self.admin_token.as_ref(), env)?;
        config.admin_listen = admin_listen(
            src,
            self.admin_listen.as_ref(),
            listen,
            config.admin_token.as_ref(),
        )?;
        config.shutdown_grace = optional(
            src,
            "shutdown_grace",
            &self.shutdown_grace,
            config.shutdown_grace,
            duration,
        )?;
        config.workers = workers(src, self.workers.as_ref())?;
        if let Some(list) = &self.trusted_proxies {
            config.trusted_proxies = trusted_proxies(src, list)?;
        }
        config.access_log = access_log(src, &self)?;
        config.cache = self.cache.validate(src)?;
        let wait_timeout = optional(
            src,
            "lock.wait_timeout",
            &self.lock.wait_timeout,
            DEFAULT_WAIT_TIMEOUT,
            positive_duration,
        )?;
        let on_wait_timeout = self.lock.on_wait_timeout.unwrap_or_default();
        config.redis = self.redis.as_ref().map(|r| r.validate(src)).transpose()?;
        config.lock = self.lock.validate(src, config.redis.is_some())?;
        config.limits = self.limits.validate(src)?;
        config.tls = self.tls.as_ref().map(|t| t.validate(src)).transpose()?;
        if self.routes.is_empty() {
            return Err(src.error(
                self.listen.span(),
                "route",
                "the config has no [[route]]: nothing would be served",
            ));
        }
        config.routes = routes(src, self.routes, wait_timeout, on_wait_timeout)?;
        Ok(config)
    }
}

/// `access_log`: "stdout" or a file path; `access_log_format` only with it.
fn access_log(src: &Source, file: &FileConfig) -> Result<Option<AccessLogSettings>, ConfigError> {
    let format = file.access_log_format.as_ref();
    let Some(to) = &file.access_log else {
        return match format {
            Some(f) => Err(src.error(f.span(), "access_log_format", "needs access_log")),
            None => Ok(None),
        };
    };
    let path = match to.get_ref().trim() {
        "" => return Err(src.error(to.span(), "access_log", "must be \"stdout\" or a file path")),
        "stdout" => None,
        path => Some(std::path::PathBuf::from(path)),
    };
    Ok(Some(AccessLogSettings {
        path,
        format: format.map_or_else(AccessLogFormat::default, |f| *f.get_ref()),
    }))
}

/// `workers`: a thread count, or `None` for one per core.
fn workers(src: &Source, workers: Option<&Spanned<u32>>) -> Result<Option<usize>, ConfigError> {
    match workers {
        Some(n) if !(1..=1024).contains(n.get_ref()) => {
            Err(src.error(n.span(), "workers", "must be between 1 and 1024"))
        }
        Some(n) => Ok(Some(*n.get_ref() as usize)),
        None => Ok(None),
    }
}

impl FileCache {
    fn validate(&self, src: &Source) -> Result<CacheSettings, ConfigError> {
        let default = CacheSettings::default();
        let max_bytes = match &self.max_bytes {
            Some(v) => byte_size(src, "cache.max_bytes", v)?,
            None => default.max_bytes,
        };
        let max_object_bytes = match &self.max_object_bytes {
            Some(v) => byte_size(src, "cache.max_object_bytes", v)?,
            None => default.max_object_bytes.min(max_bytes),
        };
        if max_object_bytes > max_bytes || max_object_bytes > u64::from(u32::MAX) {
            let span = self.max_object_bytes.as_ref().map_or(0..0, |v| v.span());
            return Err(src.error(
                span,
                "cache.max_object_bytes",
                "must be at most cache.max_bytes (and at most 4GiB)",
            ));
        }
        Ok(CacheSettings {
            max_bytes,
            max_object_bytes,
        })
    }
}

/// Every route, each reachable: no two match the same host and path prefix.
fn routes(
    src: &Source,
    files: Vec<FileRoute>,
    wait_timeout: Duration,
    on_wait_timeout: OnWaitTimeout,
) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut routes: Vec<RouteConfig> = Vec::with_capacity(files.len());
    let mut names = HashSet::new();
    for (i, route) in files.into_iter().enumerate() {
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
    Ok(routes)
}
