//! The `[limits]` section: how many client connections and requests corral holds, and
//! how long a client may keep one without making progress.
//!
//! The defaults are what nginx, HAProxy and Envoy ship or recommend for a public
//! listener: a slow or silent client is cut off within a minute, and the connection
//! count stays under what the open-file limit allows.

use std::num::NonZeroUsize;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::source::Text;
use super::source::{ConfigError, Source};
use super::values::{optional, positive_duration};

/// Client connection limits and timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsSettings {
    /// Client connections served at once on the proxy port; past it a connection is
    /// answered `503` and closed. `None`: derived from the open-file limit at start.
    pub max_connections: Option<NonZeroUsize>,
    /// Requests in progress at once on the proxy port, HTTP/1 and HTTP/2 streams alike
    /// (each may hold an upstream connection); past it a request is answered `503`.
    /// `None`: the connection limit.
    pub(crate) max_requests: Option<NonZeroUsize>,
    /// How long a client may take to send a request head, from the connection's start
    /// or from the head's first byte (nginx `client_header_timeout`).
    pub head_timeout: Duration,
    /// How long a forwarded request body may wait on its client between two reads
    /// (nginx `client_body_timeout`); past it the request is answered `408`.
    pub(crate) body_timeout: Duration,
    /// How long a connection may sit with no request in progress: HTTP/1 keep-alive
    /// between requests, HTTP/2 with no open stream (nginx `keepalive_timeout`).
    pub idle_timeout: Duration,
    /// How long one write to a client may make no progress before the connection is
    /// reset (nginx `send_timeout`): a client that stops reading cannot pin it.
    pub send_timeout: Duration,
    /// Streams one HTTP/2 connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// How often an HTTP/2 connection is pinged, to find peers that are gone...
    pub h2_keepalive_interval: Duration,
    /// ...and how long the client has to answer (or, once told to go away, to close).
    pub h2_keepalive_timeout: Duration,
}

impl Default for LimitsSettings {
    fn default() -> LimitsSettings {
        LimitsSettings {
            max_connections: None,
            max_requests: None,
            head_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            h2_max_concurrent_streams: 100,
            h2_keepalive_interval: Duration::from_secs(30),
            h2_keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// The section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLimits {
    max_connections: Option<Spanned<i64>>,
    max_requests: Option<Spanned<i64>>,
    head_timeout: Option<Text>,
    body_timeout: Option<Text>,
    idle_timeout: Option<Text>,
    send_timeout: Option<Text>,
    h2_max_concurrent_streams: Option<Spanned<i64>>,
    h2_keepalive_interval: Option<Text>,
    h2_keepalive_timeout: Option<Text>,
}

/// Bounds that keep a typo from turning a limit off: ten million connections (or
/// requests) is past any open-file limit, and HTTP/2 peers rarely use more than a few
/// hundred streams.
const MAX_CONNECTIONS: i64 = 10_000_000;
const MAX_STREAMS: i64 = 10_000;

fn count(
    src: &Source,
    key: &str,
    value: &Option<Spanned<i64>>,
    max: i64,
) -> Result<Option<usize>, ConfigError> {
    match value {
        None => Ok(None),
        Some(n) if (1..=max).contains(n.get_ref()) => Ok(usize::try_from(*n.get_ref()).ok()),
        Some(n) => Err(src.error(n.span(), key, format_args!("must be between 1 and {max}"))),
    }
}

impl FileLimits {
    pub(super) fn validate(&self, src: &Source) -> Result<LimitsSettings, ConfigError> {
        let d = LimitsSettings::default();
        let timeout = |key: &str, value: &Option<Text>, default| {
            optional(
                src,
                &format!("limits.{key}"),
                value,
                default,
                positive_duration,
            )
        };
        let streams = count(
            src,
            "limits.h2_max_concurrent_streams",
            &self.h2_max_concurrent_streams,
            MAX_STREAMS,
        )?;
        Ok(LimitsSettings {
            max_connections: count(
                src,
                "limits.max_connections",
                &self.max_connections,
                MAX_CONNECTIONS,
            )?
            .and_then(NonZeroUsize::new),
            max_requests: count(
                src,
                "limits.max_requests",
                &self.max_requests,
                MAX_CONNECTIONS,
            )?
            .and_then(NonZeroUsize::new),
            head_timeout: timeout("head_timeout", &self.head_timeout, d.head_timeout)?,
            body_timeout: timeout("body_timeout", &self.body_timeout, d.body_timeout)?,
            idle_timeout: timeout("idle_timeout", &self.idle_timeout, d.idle_timeout)?,
            send_timeout: timeout("send_timeout", &self.send_timeout, d.send_timeout)?,
            h2_max_concurrent_streams: streams
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(d.h2_max_concurrent_streams),
            h2_keepalive_interval: timeout(
                "h2_keepalive_interval",
                &self.h2_keepalive_interval,
                d.h2_keepalive_interval,
            )?,
            h2_keepalive_timeout: timeout(
                "h2_keepalive_timeout",
                &self.h2_keepalive_timeout,
                d.h2_keepalive_timeout,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const ROUTE: &str = "[[route]]\nname = \"a\"\nupstream = \"http://127.0.0.1:9000\"\n";

    fn parse(limits: &str) -> Result<Config, ConfigError> {
        Config::parse(
            &format!("listen = \"127.0.0.1:8080\"\n[limits]\n{limits}\n{ROUTE}"),
            "test.toml",
        )
    }

    #[test]
    fn limits_default_to_safe_values() {
        let c = parse("").unwrap();
        assert_eq!(c.limits, LimitsSettings::default());
        assert_eq!(c.limits.max_connections, None);
        assert_eq!(c.limits.max_requests, None);
        assert_eq!(c.limits.body_timeout, Duration::from_secs(60));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.limits.send_timeout, Duration::from_secs(30));
        assert_eq!(c.limits.h2_max_concurrent_streams, 100);
    }

    #[test]
    fn limits_are_read_and_typed() {
        let c = parse(
            "max_connections = 500\nmax_requests = 800\nhead_timeout = \"5s\"\n\
             body_timeout = \"20s\"\nidle_timeout = \"2m\"\n\
             send_timeout = \"10s\"\nh2_max_concurrent_streams = 50\n\
             h2_keepalive_interval = \"15s\"\nh2_keepalive_timeout = \"5s\"",
        )
        .unwrap();
        let l = c.limits;
        assert_eq!(l.max_connections.map(NonZeroUsize::get), Some(500));
        assert_eq!(l.max_requests.map(NonZeroUsize::get), Some(800));
        assert_eq!(l.head_timeout, Duration::from_secs(5));
        assert_eq!(l.body_timeout, Duration::from_secs(20));
        assert_eq!(l.idle_timeout, Duration::from_secs(120));
        assert_eq!(l.send_timeout, Duration::from_secs(10));
        assert_eq!(l.h2_max_concurrent_streams, 50);
        assert_eq!(l.h2_keepalive_interval, Duration::from_secs(15));
        assert_eq!(l.h2_keepalive_timeout, Duration::from_secs(5));
    }

    #[test]
    fn bad_limits_name_their_key_and_line() {
        let cases = [
            ("max_connections = 0", "limits.max_connections"),
            ("max_connections = -3", "limits.max_connections"),
            ("max_connections = 99999999999", "limits.max_connections"),
            ("max_requests = 0", "limits.max_requests"),
            ("max_requests = 10000001", "limits.max_requests"),
            ("body_timeout = \"0s\"", "limits.body_timeout"),
            ("body_timeout = \"later\"", "limits.body_timeout"),
            ("idle_timeout = \"0s\"", "limits.idle_timeout"),
            ("send_timeout = \"soon\"", "limits.send_timeout"),
            ("head_timeout = \"-1s\"", "limits.head_timeout"),
            (
                "h2_max_concurrent_streams = 0",
                "limits.h2_max_concurrent_streams",
            ),
            (
                "h2_keepalive_timeout = \"0ms\"",
                "limits.h2_keepalive_timeout",
            ),
            ("idle_timout = \"5s\"", "limits.idle_timout"),
        ];
        for (line, key) in cases {
            let e = parse(line).expect_err(line);
            assert_eq!(e.key(), Some(key), "{line}: {e}");
            assert_eq!(e.line(), Some(3), "{line}: {e}");
        }
    }
}
