//! Validation of the `[redis]` and `[lock]` sections: fleet mode's Redis and its lock.

use std::time::Duration;

use super::file::{FileLock, FileRedis};
use super::settings::{LockMode, LockSettings, RedisSettings};
use super::source::{ConfigError, Source};
use super::values::{optional, positive_duration, without_userinfo};

impl FileLock {
    pub(super) fn validate(&self, src: &Source, fleet: bool) -> Result<LockSettings, ConfigError> {
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
    pub(super) fn validate(&self, src: &Source) -> Result<RedisSettings, ConfigError> {
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
