//! The `Cache-Status` response header (RFC 9211), and the outcome class each response
//! is counted under in metrics.
//!
//! | what happened | header |
//! |---|---|
//! | fresh hit | `corral; hit; ttl=42` |
//! | fresh hit that started the entry's early refresh | `corral; hit; ttl=1; detail=early-refresh` |
//! | stale served while one background refresh runs | `corral; hit; ttl=-3; detail=stale-while-revalidate` |
//! | miss, fetched and stored | `corral; fwd=miss; fwd-status=200; stored` |
//! | waited on another request's fetch | `...; collapsed` added |
//! | stale revalidated, upstream said 304 | `corral; fwd=stale; fwd-status=304; stored` |
//! | upstream failed, stale served | `corral; fwd=stale; detail=stale-if-error` |
//! | not cacheable | `corral; fwd=miss; fwd-status=200; detail=no-store` (the reason) |
//! | hit-for-pass | `corral; fwd=uri-miss; detail=hit-for-pass` |
//! | method or route not cached | `corral; fwd=method` / `corral; fwd=bypass` |

use std::fmt;

use http::HeaderValue;

/// How a response was produced, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    Hit,
    StaleWhileRevalidate,
    StaleIfError,
    Revalidated,
    Miss,
    Collapsed,
    Pass,
    Bypass,
    Error,
}

impl Served {
    pub(crate) const ALL: [Served; 9] = [
        Served::Hit,
        Served::StaleWhileRevalidate,
        Served::StaleIfError,
        Served::Revalidated,
        Served::Miss,
        Served::Collapsed,
        Served::Pass,
        Served::Bypass,
        Served::Error,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::StaleWhileRevalidate => "stale-while-revalidate",
            Served::StaleIfError => "stale-if-error",
            Served::Revalidated => "revalidated",
            Served::Miss => "miss",
            Served::Collapsed => "collapsed",
            Served::Pass => "pass",
            Served::Bypass => "bypass",
            Served::Error => "error",
        }
    }
}

/// RFC 9211 `fwd` values: why the request went forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fwd {
    Bypass,
    Method,
    UriMiss,
    VaryMiss,
    Miss,
    Stale,
}

impl Fwd {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Fwd::Bypass => "bypass",
            Fwd::Method => "method",
            Fwd::UriMiss => "uri-miss",
            Fwd::VaryMiss => "vary-miss",
            Fwd::Miss => "miss",
            Fwd::Stale => "stale",
        }
    }
}

/// What `detail=` says: corral's own word for a decision of the request path, or the
/// token of the layer that decided (a pass reason, an upstream failure, a refused
/// request), which converts into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detail {
    StaleWhileRevalidate,
    StaleIfError,
    /// A fresh hit that started its entry's refresh before expiry.
    EarlyRefresh,
    /// The key was recently uncacheable: forwarded without waiting.
    HitForPass,
    /// The wait for another request's fill ran out (`on_wait_timeout = "fetch"`).
    WaitTimeout,
    /// Every fill this request waited on left nothing for it; it went upstream itself.
    RetriesExhausted,
    /// The fill task was gone without a reply (the runtime shutting down).
    FillFailed,
    /// A GET or HEAD with a body: not the cache's.
    RequestBody,
    /// A header that rewrites the request at the origin: not the cache's.
    RewritingHeader,
    /// A token another layer names for its own reason.
    Reason(&'static str),
}

impl Detail {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Detail::StaleWhileRevalidate => "stale-while-revalidate",
            Detail::StaleIfError => "stale-if-error",
            Detail::EarlyRefresh => "early-refresh",
            Detail::HitForPass => "hit-for-pass",
            Detail::WaitTimeout => "wait-timeout",
            Detail::RetriesExhausted => "retries-exhausted",
            Detail::FillFailed => "fill-failed",
            Detail::RequestBody => "request-body",
            Detail::RewritingHeader => "rewriting-header",
            Detail::Reason(token) => token,
        }
    }
}

fn secs(s: i64) -> i32 {
    s.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

/// One response's cache status.
#[derive(Debug, Clone)]
pub struct CacheStatus {
    pub(crate) served: Served,
    hit: bool,
    fwd: Option<Fwd>,
    /// Seconds (entries' lifetimes are clamped to 2^31 s, so 32 bits hold any).
    ttl: Option<i32>,
    fwd_status: Option<u16>,
    stored: bool,
    collapsed: bool,
    detail: Option<Detail>,
    /// How long the upstream took to answer this response, in microseconds (for the
    /// access log; 32 bits keep every response as small as before).
    upstream_us: Option<u32>,
}

impl CacheStatus {
    fn new(served: Served) -> CacheStatus {
        CacheStatus {
            served,
            hit: false,
            fwd: None,
            ttl: None,
            fwd_status: None,
            stored: false,
            collapsed: false,
            detail: None,
            upstream_us: None,
        }
    }

    /// The same status, for a response the upstream took `took` to answer.
    pub(crate) fn with_upstream_time(mut self, took: std::time::Duration) -> CacheStatus {
        self.upstream_us = Some(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
        self
    }

    pub(crate) fn upstream_time(&self) -> Option<std::time::Duration> {
        self.upstream_us
            .map(|us| std::time::Duration::from_micros(u64::from(us)))
    }

    pub fn hit(ttl_secs: i64) -> CacheStatus {
        CacheStatus {
            hit: true,
            ttl: Some(secs(ttl_secs)),
            ..CacheStatus::new(Served::Hit)
        }
    }

    pub(crate) fn stale_while_revalidate(stale_secs: i64) -> CacheStatus {
        CacheStatus {
            hit: true,
            ttl: Some(secs(-stale_secs)),
            detail: Some(Detail::StaleWhileRevalidate),
            ..CacheStatus::new(Served::StaleWhileRevalidate)
        }
    }

    pub(crate) fn stale_if_error(fwd_status: Option<u16>) -> CacheStatus {
        CacheStatus {
            fwd: Some(Fwd::Stale),
            fwd_status,
            detail: Some(Detail::StaleIfError),
            ..CacheStatus::new(Served::StaleIfError)
        }
    }

    pub(crate) fn revalidated() -> CacheStatus {
        CacheStatus {
            fwd: Some(Fwd::Stale),
            fwd_status: Some(304),
            stored: true,
            ..CacheStatus::new(Served::Revalidated)
        }
    }

    /// A response fetched for a miss (`Fwd::Miss`, `VaryMiss`) or a stale entry
    /// (`Fwd::Stale`) whose upstream answer is served.
    pub(crate) fn fetched(fwd: Fwd, status: u16, stored: bool) -> CacheStatus {
        CacheStatus {
            fwd: Some(fwd),
            fwd_status: Some(status),
            stored,
            ..CacheStatus::new(Served::Miss)
        }
    }

    /// Sent upstream without caching, for `detail`.
    pub(crate) fn pass(fwd: Fwd, detail: impl Into<Detail>) -> CacheStatus {
        CacheStatus {
            fwd: Some(fwd),
            detail: Some(detail.into()),
            ..CacheStatus::new(Served::Pass)
        }
    }

    /// Not handled by the cache at all (method, route switch, range request).
    pub(crate) fn bypass(fwd: Fwd) -> CacheStatus {
        CacheStatus {
            fwd: Some(fwd),
            ..CacheStatus::new(Served::Bypass)
        }
    }

    /// Adds why the cache stood aside (`request-body`, `rewriting-header`), or what a
    /// hit started (`early-refresh`).
    pub(crate) fn with_detail(mut self, detail: Detail) -> CacheStatus {
        self.detail = Some(detail);
        self
    }

    /// No response could be had; `detail` says why.
    pub(crate) fn error(fwd: Option<Fwd>, detail: impl Into<Detail>) -> CacheStatus {
        CacheStatus {
            fwd,
            detail: Some(detail.into()),
            ..CacheStatus::new(Served::Error)
        }
    }

    /// This request waited on another's fetch and got its outcome.
    pub(crate) fn collapsed(mut self) -> CacheStatus {
        self.collapsed = true;
        if self.served == Served::Miss {
            self.served = Served::Collapsed;
        }
        self
    }

    pub(crate) fn with_fwd_status(mut self, status: u16) -> CacheStatus {
        self.fwd_status = Some(status);
        self
    }

    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::try_from(self.to_string()).expect("tokens and numbers only")
    }
}

/// The `Cache-Status` field value, as RFC 9211 writes it.
impl fmt::Display for CacheStatus {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        out.write_str("corral")?;
        if self.hit {
            out.write_str("; hit")?;
        }
        if let Some(fwd) = self.fwd {
            write!(out, "; fwd={}", fwd.as_str())?;
        }
        if let Some(status) = self.fwd_status {
            write!(out, "; fwd-status={status}")?;
        }
        if let Some(ttl) = self.ttl {
            write!(out, "; ttl={ttl}")?;
        }
        if self.stored {
            out.write_str("; stored")?;
        }
        if self.collapsed {
            out.write_str("; collapsed")?;
        }
        if let Some(detail) = self.detail {
            write!(out, "; detail={}", detail.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values() {
        assert_eq!(CacheStatus::hit(42).header_value(), "corral; hit; ttl=42");
        assert_eq!(
            CacheStatus::fetched(Fwd::Miss, 200, true)
                .collapsed()
                .header_value(),
            "corral; fwd=miss; fwd-status=200; stored; collapsed"
        );
        assert_eq!(
            CacheStatus::stale_while_revalidate(3).header_value(),
            "corral; hit; ttl=-3; detail=stale-while-revalidate"
        );
        assert_eq!(
            CacheStatus::hit(1)
                .with_detail(Detail::EarlyRefresh)
                .header_value(),
            "corral; hit; ttl=1; detail=early-refresh"
        );
        assert_eq!(
            CacheStatus::revalidated().header_value(),
            "corral; fwd=stale; fwd-status=304; stored"
        );
        assert_eq!(
            CacheStatus::fetched(Fwd::Miss, 200, true)
                .collapsed()
                .served,
            Served::Collapsed
        );
    }
}
