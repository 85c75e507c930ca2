//! The access log: one line per request (fast-path hits included), written off the
//! request path. A request formats its line in a buffer of its thread, then appends it
//! to the log's shared buffer under a short lock; a thread of its own swaps that buffer
//! out every [`FLUSH_EVERY`] and writes it. No request waits on a write or wakes the
//! writer. When the writer falls behind (a full disk, a stalled pipe) and the buffer
//! holds [`MAX_PENDING`] bytes, lines are dropped and counted, never waited for.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Method, Version};
use prometheus_client::metrics::counter::Counter;

use crate::config::{AccessLogFormat, AccessLogSettings};

/// How often the writer writes out what accumulated.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// The most bytes waiting for the writer; past this, lines are dropped.
const MAX_PENDING: usize = 16 * 1024 * 1024;

/// The running access log.
pub(crate) struct AccessLog {
    shared: Arc<Shared>,
    format: AccessLogFormat,
    dropped: Counter,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// What the requests and the writer share. Invariant: requests only append whole
/// lines to `pending` (under its lock); only the writer takes them out.
struct Shared {
    pending: Mutex<Vec<u8>>,
    /// Set when the log is dropped: the writer writes what is left and ends.
    closed: AtomicBool,
    /// Set by a reload: the writer opens the file's path again (log rotation).
    reopen: AtomicBool,
}

thread_local! {
    /// This thread's line being formatted, and the last second's time text.
    static SCRATCH: RefCell<(String, u64, String)> = const { RefCell::new((String::new(), u64::MAX, String::new())) };
}

/// What the log keeps of a request, taken before it is served (and only when logging).
/// Borrowed from the request where it outlives the line (the fast path), owned where
/// the request is consumed before the answer (hyper's path: [`RequestLine::of`]).
pub(crate) struct RequestLine<'a> {
    client: IpAddr,
    method: Method,
    version: Version,
    host: Cow<'a, str>,
    /// Path and query as requested.
    target: Cow<'a, str>,
    referer: Option<Cow<'a, str>>,
    user_agent: Option<Cow<'a, str>>,
}

/// One request's line: the request, and how it was answered.
pub(crate) struct Record<'a> {
    line: &'a RequestLine<'a>,
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

impl RequestLine<'static> {
    /// The line of a request that is consumed before it is answered.
    pub(crate) fn of<B>(req: &http::Request<B>, client: IpAddr) -> RequestLine<'static> {
        let line = RequestLine::from_parts(
            req.method(),
            req.version(),
            req.uri(),
            req.headers(),
            client,
        );
        let owned = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
        RequestLine {
            host: owned(line.host),
            target: owned(line.target),
            referer: line.referer.map(owned),
            user_agent: line.user_agent.map(owned),
            ..line
        }
    }
}

impl<'a> RequestLine<'a> {
    pub(crate) fn from_parts(
        method: &Method,
        version: Version,
        uri: &'a http::Uri,
        headers: &'a HeaderMap,
        client: IpAddr,
    ) -> RequestLine<'a> {
        let text = |name| header(headers, name).map(Cow::Borrowed);
        RequestLine {
            client,
            method: method.clone(),
            version,
            host: uri
                .host()
                .map(Cow::Borrowed)
                .or_else(|| text(http::header::HOST))
                .unwrap_or_default(),
            target: Cow::Borrowed(uri.path_and_query().map_or("/", |p| p.as_str())),
            referer: text(http::header::REFERER),
            user_agent: text(http::header::USER_AGENT),
        }
    }

    /// The line for this request answered with `res` (by `route`, as `status` says),
    /// `duration` after it came.
    pub(crate) fn record(
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
    pub(crate) fn fast_hit(
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
        let out = open(settings.path.as_deref())?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::with_capacity(64 * 1024)),
            closed: AtomicBool::new(false),
            reopen: AtomicBool::new(false),
        });
        let writer = {
            let shared = Arc::clone(&shared);
            let path = settings.path.clone();
            std::thread::Builder::new()
                .name("corral-access-log".into())
                .spawn(move || write_out(&shared, out, path.as_deref()))?
        };
        Ok(AccessLog {
            shared,
            format: settings.format,
            dropped,
            writer: Some(writer),
        })
    }

    /// Opens the log's file again (after logrotate moved it away), at the writer's
    /// next round; lines before that go to the file as it was.
    pub(crate) fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
        if let Some(writer) = &self.writer {
            writer.thread().unpark();
        }
    }

    /// Logs `record`, without waiting on the writer.
    pub(crate) fn record(&self, record: &Record<'_>) {
        SCRATCH.with(|scratch| {
            let (line, second, time) = &mut *scratch.borrow_mut();
            line.clear();
            match self.format {
                AccessLogFormat::Combined => combined(line, record, (second, time)),
                AccessLogFormat::Json => json(line, record),
            }
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if pending.len() + line.len() > MAX_PENDING {
                drop(pending);
                self.dropped.inc();
            } else {
                pending.extend_from_slice(line.as_bytes());
            }
        });
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        if let Some(writer) = self.writer.take() {
            writer.thread().unpark();
            let _ = writer.join();
        }
    }
}

/// Where lines go: the file at `path` (appended to; created when missing), or
/// standard output.
fn open(path: Option<&Path>) -> std::io::Result<Box<dyn std::io::Write + Send>> {
    Ok(match path {
        None => Box::new(std::io::stdout()),
        Some(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
    })
}

/// The writer: every [`FLUSH_EVERY`] (or when the log closes), takes what accumulated
/// and writes it; a failure is logged once until writing works again. Asked to, opens
/// `path` again once what was pending is written.
fn write_out(shared: &Shared, mut out: Box<dyn std::io::Write + Send>, path: Option<&Path>) {
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut failed = false;
    loop {
        std::thread::park_timeout(FLUSH_EVERY);
        let closed = shared.closed.load(Ordering::Acquire);
        std::mem::swap(
            &mut batch,
            &mut *shared.pending.lock().unwrap_or_else(|e| e.into_inner()),
        );
        if !batch.is_empty() {
            match out.write_all(&batch).and_then(|()| out.flush()) {
                Ok(()) => failed = false,
                Err(error) => {
                    if !failed {
                        tracing::warn!(%error, "cannot write the access log; lines are lost until it works again");
                    }
                    failed = true;
                }
            }
            batch.clear();
        }
        if closed {
            return;
        }
        if shared.reopen.swap(false, Ordering::AcqRel) && path.is_some() {
            match open(path) {
                Ok(file) => out = file,
                Err(error) => {
                    tracing::warn!(%error, "cannot open the access log again; still writing to the file it had open");
                }
            }
        }
    }
}

fn header(headers: &HeaderMap, name: http::header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `d` in milliseconds with three decimals (integer formatting: no float printing on
/// every line).
struct Millis(Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let micros = self.0.as_micros();
        write!(f, "{}.{:03}", micros / 1000, micros % 1000)
    }
}

fn millis(d: Duration) -> Millis {
    Millis(d)
}

/// NCSA combined (`client - - [time] "request" status bytes "referer" "agent"`), then
/// corral's fields: `host= route= cache= duration_ms= upstream_ms=`. Written into
/// `line` with no allocation (`clock`: the last second's time text, reused).
fn combined(line: &mut String, r: &Record<'_>, clock: (&mut u64, &mut String)) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (second, time) = clock;
    if *second != now {
        *second = now;
        time.clear();
        clf_time(time, now);
    }
    let l = r.line;
    let _ = write!(line, "{} - - [{time}] \"{} ", l.client, l.method);
    escaped(line, &l.target);
    let _ = write!(line, " {:?}\" {} ", l.version, r.status);
    match r.bytes {
        Some(b) => {
            let _ = write!(line, "{b}");
        }
        None => line.push('-'),
    }
    line.push_str(" \"");
    escaped(line, l.referer.as_deref().unwrap_or("-"));
    line.push_str("\" \"");
    escaped(line, l.user_agent.as_deref().unwrap_or("-"));
    line.push_str("\" host=");
    if l.host.is_empty() {
        line.push('-');
    } else {
        // Unquoted: a space would start a field of the client's making.
        let plain = |b: u8| (0x21..0x7f).contains(&b) && b != b'"' && b != b'\\';
        if l.host.bytes().all(plain) {
            line.push_str(&l.host);
        } else {
            for c in l.host.chars() {
                match c {
                    ' ' | '"' | '\\' => {
                        let _ = write!(line, "\\x{:02x}", c as u32);
                    }
                    c => escaped(line, c.encode_utf8(&mut [0; 4])),
                }
            }
        }
    }
    let _ = write!(
        line,
        " route={} cache={} duration_ms={}",
        r.route,
        r.cache,
        millis(r.duration)
    );
    match r.upstream {
        Some(up) => {
            let _ = writeln!(line, " upstream_ms={}", millis(up));
        }
        None => line.push_str(" upstream_ms=-\n"),
    }
}

/// `s` inside a quoted field: quotes and backslashes escaped, control characters and
/// every byte beyond ASCII as `\xNN`, as nginx does (a client's bytes must not forge
/// or break a line, Unicode line separators included).
fn escaped(line: &mut String, s: &str) {
    // Most values need no escape: copied in one go.
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        line.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            c if c.is_ascii() && !c.is_ascii_control() => line.push(c),
            c => {
                for byte in c.encode_utf8(&mut [0; 4]).bytes() {
                    let _ = write!(line, "\\x{byte:02x}");
                }
            }
        }
    }
}

/// One JSON object, written into `line`.
fn json(line: &mut String, r: &Record<'_>) {
    let time = humantime::format_rfc3339_millis(SystemTime::now());
    let _ = write!(
        line,
        "{{\"time\":\"{time}\",\"client\":\"{}\",",
        r.line.client
    );
    for (name, value) in [
        ("method", r.line.method.as_str()),
        ("host", &*r.line.host),
        ("path", &*r.line.target),
        ("route", r.route),
        ("cache", r.cache),
        ("referer", r.line.referer.as_deref().unwrap_or("")),
        ("user_agent", r.line.user_agent.as_deref().unwrap_or("")),
    ] {
        let _ = write!(line, "\"{name}\":");
        json_string(line, value);
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

/// `10/Oct/2000:13:55:36 +0000`, the common log format's time (UTC) of Unix second
/// `secs`, appended to `out`.
fn clf_time(out: &mut String, secs: u64) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let _ = write!(
        out,
        "{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000",
        MONTHS[(m - 1) as usize],
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    );
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
        let clf = |secs| {
            let mut out = String::new();
            clf_time(&mut out, secs);
            out
        };
        assert_eq!(clf(971_186_136), "10/Oct/2000:13:55:36 +0000");
        assert_eq!(clf(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(clf(951_782_400), "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    fn quoted_fields_cannot_break_a_line() {
        let mut out = String::new();
        escaped(&mut out, "a\"b\\c\nd");
        assert_eq!(out, "a\\\"b\\\\c\\x0ad");
    }

    #[test]
    fn json_strings_escape_what_json_must() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\nd\u{1}");
        assert_eq!(out, r#""a\"b\\c\nd\u0001""#.replace("\\n", "\\u000a"));
    }
}
