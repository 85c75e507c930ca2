//! Validation of the `[redis]` and `[lock]` sections: fleet mode's Redis and its lock.
//! Each starts from its settings' defaults and takes what the file sets.

use std::ops::Range;

use super::file::{FileLock, FileRedis};
use super::settings::{LockMode, LockSettings, RedisSettings};
use super::source::{ConfigError, Source};
use super::values::{optional, positive_duration, redis_url, without_userinfo};

impl FileLock {
    /// `fleet`: whether there is a `[redis]` section (Redlock protects its cache).
    pub(super) fn validate(&self, src: &Source, fleet: bool) -> Result<LockSettings, ConfigError> {
        let mut lock = LockSettings::default();
        lock.mode = self.mode.unwrap_or(lock.mode);
        lock.ttl = optional(src, "lock.ttl", &self.ttl, lock.ttl, positive_duration)?;
        let span = self.nodes.as_ref().map_or(0..0, |n| n.span());
        if let Some(nodes) = &self.nodes {
            lock.nodes = nodes.get_ref().clone();
        }
        check_nodes(src, &lock, fleet, span.clone())?;
        lock.node_timeout = optional(
            src,
            "lock.node_timeout",
            &self.node_timeout,
            lock.node_timeout,
            positive_duration,
        )?;
        if lock.mode == LockMode::Redlock && lock.node_timeout * 4 > lock.ttl {
            let span = self.node_timeout.as_ref().map_or(span, |t| t.span());
            return Err(src.error(
                span,
                "lock.node_timeout",
                "must be well under lock.ttl (at most a quarter), or no grant has validity left",
            ));
        }
        lock.retries = self.retries.unwrap_or(lock.retries);
        lock.retry_delay = optional(
            src,
            "lock.retry_delay",
            &self.retry_delay,
            lock.retry_delay,
            positive_duration,
        )?;
        Ok(lock)
    }
}

/// Nodes only for Redlock, and then an odd number (at least 3) of Redis URLs.
fn check_nodes(
    src: &Source,
    lock: &LockSettings,
    fleet: bool,
    span: Range<usize>,
) -> Result<(), ConfigError> {
    let nodes = &lock.nodes;
    match lock.mode {
        LockMode::Single if !nodes.is_empty() => Err(src.error(
            span,
            "lock.nodes",
            "nodes are for mode = \"redlock\"; mode \"single\" locks on [redis]",
        )),
        LockMode::Single => Ok(()),
        LockMode::Redlock if !fleet => Err(src.error(
            span,
            "lock.mode",
            "redlock needs a [redis] section: the shared cache the lock protects",
        )),
        LockMode::Redlock if nodes.len() < 3 || nodes.len().is_multiple_of(2) => Err(src.error(
            span,
            "lock.nodes",
            format_args!(
                "redlock needs an odd number of at least 3 independent Redis nodes, not {}",
                nodes.len()
            ),
        )),
        LockMode::Redlock => {
            for url in nodes {
                if let Err(e) = redis_url(url) {
                    return Err(src.error(
                        span,
                        "lock.nodes",
                        format_args!("invalid Redis URL {:?} ({e})", without_userinfo(url)),
                    ));
                }
            }
            Ok(())
        }
    }
}

impl FileRedis {
    pub(super) fn validate(&self, src: &Source) -> Result<RedisSettings, ConfigError> {
        let mut redis = match (&self.url, &self.cluster) {
            (Some(url), None) => RedisSettings::from_url(url.get_ref())
                .map_err(|message| src.error(url.span(), "redis.url", message))?,
            (None, Some(seeds)) => RedisSettings::from_seeds(seeds.get_ref())
                .map_err(|message| src.error(seeds.span(), "redis.cluster", message))?,
            (Some(_), Some(seeds)) => {
                return Err(src.error(
                    seeds.span(),
                    "redis.cluster",
                    "set either url (one Redis) or cluster (seed nodes of a Redis Cluster), not both",
                ))
            }
            (None, None) => {
                return Err(src.error(
                    section_span(src, "[redis]"),
                    "redis",
                    "needs url = \"redis://host:port\" (one Redis) or cluster = [\"redis://host:port\", ...] (seed nodes of a Redis Cluster)",
                ))
            }
        };
        if let Some(prefix) = &self.key_prefix {
            if prefix.get_ref().contains(['{', '}']) {
                return Err(src.error(
                    prefix.span(),
                    "redis.key_prefix",
                    "may not contain '{' or '}' (corral adds its own hash tags)",
                ));
            }
            redis.key_prefix = prefix.get_ref().clone();
        }
        let timeout = |key: &str, value, default| {
            optional(
                src,
                &format!("redis.{key}"),
                value,
                default,
                positive_duration,
            )
        };
        redis.connect_timeout = timeout(
            "connect_timeout",
            &self.connect_timeout,
            redis.connect_timeout,
        )?;
        redis.command_timeout = timeout(
            "command_timeout",
            &self.command_timeout,
            redis.command_timeout,
        )?;
        redis.retry_after = timeout("retry_after", &self.retry_after, redis.retry_after)?;
        redis.local_ttl = timeout("local_ttl", &self.local_ttl, redis.local_ttl)?;
        Ok(redis)
    }
}

impl RedisSettings {
    /// The Redis at `url` (trimmed), checked, with every other setting at its default;
    /// for `[redis] url` and the demo's `--redis`. The error says what is wrong with
    /// the URL without repeating it (it may carry a password).
    pub(crate) fn from_url(url: &str) -> Result<RedisSettings, String> {
        let url = url.trim();
        redis_url(url).map_err(|e| {
            format!("invalid Redis URL ({e}); write e.g. \"redis://127.0.0.1:6379\" or \"rediss://:password@host:6380\"")
        })?;
        Ok(RedisSettings::new(url))
    }

    /// The Redis Cluster reached through `seeds` (each trimmed and checked as for
    /// `url`). They must agree on scheme (TLS or not) and credentials, as one cluster's
    /// nodes do, and name database 0: a cluster has no other.
    pub(crate) fn from_seeds(seeds: &[String]) -> Result<RedisSettings, String> {
        if seeds.is_empty() {
            return Err("lists no seed node; write e.g. [\"redis://10.0.0.1:6379\", \"redis://10.0.0.2:6379\"]".into());
        }
        let seeds: Vec<String> = seeds.iter().map(|s| s.trim().to_string()).collect();
        let mut first = None;
        for (i, seed) in seeds.iter().enumerate() {
            redis_url(seed).map_err(|e| format!("seed {} is not a Redis URL ({e})", i + 1))?;
            let info = ::redis::IntoConnectionInfo::into_connection_info(seed.as_str())
                .map_err(|e| format!("seed {} is not a Redis URL ({e})", i + 1))?;
            let settings = info.redis_settings();
            if settings.db() != 0 {
                return Err(format!(
                    "seed {} names database {}; a Redis Cluster has only database 0",
                    i + 1,
                    settings.db()
                ));
            }
            let identity = (
                seed.starts_with("rediss:"),
                settings.username().map(str::to_string),
                settings.password().map(str::to_string),
            );
            match &first {
                None => first = Some(identity),
                Some(first) if *first != identity => {
                    return Err(format!("seed {} differs from seed 1 in TLS or credentials; the seeds of one cluster share both", i + 1));
                }
                Some(_) => {}
            }
        }
        Ok(RedisSettings::new_cluster(seeds))
    }
}

/// The span of the line `header` (a table header such as `[redis]`), for errors about
/// the table as a whole.
fn section_span(src: &Source, header: &str) -> Range<usize> {
    let mut offset = 0;
    for line in src.text.split_inclusive('\n') {
        if line.trim() == header {
            return offset..offset + line.len();
        }
        offset += line.len();
    }
    0..0
}
