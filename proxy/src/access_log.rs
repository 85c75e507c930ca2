//! The access log: one line per request (fast-path hits included), written off the
//! request path. A request formats its line and hands it to a bounded channel without
//! waiting; one thread writes the lines through a buffer and flushes when the channel
//! runs dry. When the writer falls behind (a full disk, a stalled pipe) lines are
//! dropped and counted, never waited for: logging must not slow serving.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Method, Version};
use prometheus_client::metrics::counter::Counter;

use crate::config::{AccessLogFormat, AccessLogSettings};

/// Lines waiting for the writer at most; past this they are dropped.
const BACKLOG: usize = 64 * 1024;

/// How long the writer waits for more lines before it flushes what it has.
const FLUSH_AFTER: Duration = Duration::from_millis(100);

/// The running access log.
pub(crate) struct AccessLog {
    lines: SyncSender<String>,
    format: AccessLogFormat,
    pub(crate) dropped: Counter,
}

/// What the log keeps of a request, taken before it is served (and only when logging).
pub(crate) struct RequestLine {
    client: IpAddr,
    method: Method,
    version: Version,
    host: String,
    /// Path and query as requested.
    target: String,
    referer: Option<String>,
    user_agent: Option<String>,
}

/// One request's line: the request, and how it was answered.
pub(crate) struct Record<'a> {
    line: &'a RequestLine,
    status: u16,
    /// Response body bytes, when known.
    bytes: Option<u64>,
    duration: Duration,
    /// The route's name; `-` when none matched.
    route: &'a str,
    /// How the response was produced (the metrics' `cache_status` label).
    cache: &'a str,
    /// How long the upstream took to answer, when this response came from it.
    upstream: Option<Duration>,
}

impl RequestLine {
    pub(crate) fn of<B>(req: &http::Request<B>, client: IpAddr) -> RequestLine {
        RequestLine::from_parts(
            req.method(),
            req.version(),
            req.uri(),
            req.headers(),
            client,
        )
    }

    pub(crate) fn from_parts(
        method: &Method,
        version: Version,
        uri: &http::Uri,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> RequestLine {
        let text = |name| header(headers, name).map(str::to_string);
        RequestLine {
            client,
            method: method.clone(),
            version,
            host: uri
                .host()
                .map(str::to_string)
                .or_else(|| text(http::header::HOST))
                .unwrap_or_default(),
            target: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
            referer: text(http::header::REFERER),
            user_agent: text(http::header::USER_AGENT),
        }
    }

    /// The line for this request answered with `res` (by `route`, as `status` says),
    /// `duration` after it came.
    pub(crate) fn record<'a>(
        &'a self,
        res: &http::Response<crate::http::body::ProxyBody>,
        route: Option<&'a crate::route::Route>,
        status: &'a crate::http::cache_status::CacheStatus,
        duration: Duration,
    ) -> Record<'a> {
        Record {
            line: self,
            status: res.status().as_u16(),
            bytes: http_body::Body::size_hint(res.body()).exact(),
            duration,
            route: route.map_or("-", |r| r.config.name.as_str()),
            cache: status.served.as_str(),
            upstream: status.upstream_time(),
        }
    }

    /// The line for a hit the HTTP/1 fast path answered.
    pub(crate) fn fast_hit<'a>(
        &'a self,
        status: u16,
        bytes: u64,
        route: &'a str,
        duration: Duration,
    ) -> Record<'a> {
        Record {
            line: self,
            status,
            bytes: Some(bytes),
            duration,
            route,
            cache: "hit",
            upstream: None,
        }
    }
}

impl AccessLog {
    /// Opens the log's file (appending; created when missing) or standard output, and
    /// starts its writer thread.
    pub(crate) fn start(
        settings: &AccessLogSettings,
        dropped: Counter,
    ) -> std::io::Result<AccessLog> {
        let out: Box<dyn std::io::Write + Send> = match &settings.path {
            None => Box::new(std::io::stdout()),
            Some(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (lines, received) = sync_channel(BACKLOG);
        std::thread::Builder::new()
            .name("corral-access-log".into())
            .spawn(move || write_lines(&received, out))?;
        Ok(AccessLog {
            lines,
            format: settings.format,
            dropped,
        })
    }

    /// Logs `record`, without waiting.
    pub(crate) fn record(&self, record: &Record<'_>) {
        let line = match self.format {
            AccessLogFormat::Combined => combined(record),
            AccessLogFormat::Json => json(record),
        };
        if let Err(TrySendError::Full(_)) = self.lines.try_send(line) {
            self.dropped.inc();
        }
    }
}

/// The writer: lines through a buffer, flushed whenever none came for a moment; ends
/// when every sender is gone.
fn write_lines(lines: &Receiver<String>, out: Box<dyn std::io::Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut failed = false;
    loop {
        let line = match lines.recv_timeout(FLUSH_AFTER) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                let _ = out.flush();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if let Err(error) = out.write_all(line.as_bytes()) {
            if !failed {
                tracing::warn!(%error, "cannot write the access log; lines are lost until it works again");
            }
            failed = true;
        } else {
            failed = false;
        }
    }
    let _ = out.flush();
}

fn header(headers: &HeaderMap, name: http::header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

/// NCSA combined (`client - - [time] "request" status bytes "referer" "agent"`), then
/// corral's fields: `host= route= cache= duration_ms= upstream_ms=`.
fn combined(r: &Record<'_>) -> String {
    let mut line = String::with_capacity(256);
    let quoted = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let _ =
        write!(
        line,
        "{} - - [{}] \"{} {} {:?}\" {} {} \"{}\" \"{}\" host={} route={} cache={} duration_ms={}",
        r.line.client,
        clf_time(SystemTime::now()),
        r.line.method,
        quoted(&r.line.target),
        r.line.version,
        r.status,
        r.bytes.map_or("-".to_string(), |b| b.to_string()),
        quoted(r.line.referer.as_deref().unwrap_or("-")),
        quoted(r.line.user_agent.as_deref().unwrap_or("-")),
        if r.line.host.is_empty() { "-" } else { &r.line.host },
        r.route,
        r.cache,
        millis(r.duration),
    );
    match r.upstream {
        Some(up) => {
            let _ = writeln!(line, " upstream_ms={}", millis(up));
        }
        None => line.push_str(" upstream_ms=-\n"),
    }
    line
}

/// One JSON object.
fn json(r: &Record<'_>) -> String {
    let mut line = String::with_capacity(320);
    let time = humantime::format_rfc3339_millis(SystemTime::now());
    let _ = write!(
        line,
        "{{\"time\":\"{time}\",\"client\":\"{}\",",
        r.line.client
    );
    for (name, value) in [
        ("method", r.line.method.as_str()),
        ("host", r.line.host.as_str()),
        ("path", r.line.target.as_str()),
        ("route", r.route),
        ("cache", r.cache),
        ("referer", r.line.referer.as_deref().unwrap_or("")),
        ("user_agent", r.line.user_agent.as_deref().unwrap_or("")),
    ] {
        let _ = write!(line, "\"{name}\":");
        json_string(&mut line, value);
        line.push(',');
    }
    let _ = write!(line, "\"status\":{},\"bytes\":", r.status);
    match r.bytes {
        Some(b) => {
            let _ = write!(line, "{b}");
        }
        None => line.push_str("null"),
    }
    let _ = write!(
        line,
        ",\"duration_ms\":{},\"upstream_ms\":",
        millis(r.duration)
    );
    match r.upstream {
        Some(up) => {
            let _ = write!(line, "{}", millis(up));
        }
        None => line.push_str("null"),
    }
    line.push_str("}\n");
    line
}

/// `s` as a JSON string (quotes, backslashes and control characters escaped).
pub(crate) fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `10/Oct/2000:13:55:36 +0000`, the common log format's time, in UTC.
fn clf_time(at: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000",
        MONTHS[(m - 1) as usize],
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The calendar date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clf_times_are_calendar_dates() {
        let at = UNIX_EPOCH + Duration::from_secs(971_186_136); // 2000-10-10T13:55:36Z
        assert_eq!(clf_time(at), "10/Oct/2000:13:55:36 +0000");
        assert_eq!(clf_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(clf_time(leap), "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    fn json_strings_escape_what_json_must() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\nd\u{1}");
        assert_eq!(out, r#""a\"b\\c\nd\u0001""#.replace("\\n", "\\u000a"));
    }
}
