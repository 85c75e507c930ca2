//! A slow, scriptable HTTP origin: the upstream that `corral demo`, the end-to-end
//! tests and the load tool put corral in front of.
//!
//! It answers every path with a small text body after a configurable delay, with
//! configurable status, `Cache-Control`, validators and extra headers, and counts the
//! requests it receives per path. Its behaviour can be changed while it runs, and it
//! can be stopped (connections refused) and started again on the same port.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::server::until_stopped;

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// How the origin answers. Change it with [`Origin::set`].
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Time before the response head is sent.
    pub delay: Duration,
    pub status: StatusCode,
    /// The `Cache-Control` header, if any.
    pub cache_control: Option<String>,
    /// Send `ETag: "v{version}"` and answer a matching `If-None-Match` with 304.
    pub etag: bool,
    /// Body length in bytes (the text is padded with '.').
    pub body_size: usize,
    /// Send the body in chunks without `Content-Length`.
    pub chunked: bool,
    /// Extra response headers (`Set-Cookie`, `Vary`, ...).
    pub headers: Vec<(String, String)>,
    /// Appears in the body and the ETag; bump it to tell a refreshed copy from an old one.
    pub version: u64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            delay: Duration::ZERO,
            status: StatusCode::OK,
            cache_control: Some("max-age=60".to_string()),
            etag: false,
            body_size: 0,
            chunked: false,
            headers: Vec::new(),
            version: 1,
        }
    }
}

struct State {
    behaviour: Mutex<Behaviour>,
    per_path: Mutex<HashMap<String, u64>>,
    last_headers: Mutex<HashMap<String, http::HeaderMap>>,
    total: AtomicU64,
    not_modified: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// Woken on every request, for tests that wait for a count.
    arrived: Notify,
    started: std::time::Instant,
    /// Milliseconds since `started` at which each request arrived.
    arrivals: Mutex<Vec<u64>>,
}

/// A running origin.
pub struct Origin {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Mutex<Option<watch::Sender<bool>>>,
}

impl Origin {
    /// Starts an origin on a free port of 127.0.0.1.
    pub async fn start(behaviour: Behaviour) -> std::io::Result<Origin> {
        Origin::start_on("127.0.0.1:0".parse().expect("valid address"), behaviour).await
    }

    /// Starts an origin on `addr`.
    pub async fn start_on(addr: SocketAddr, behaviour: Behaviour) -> std::io::Result<Origin> {
        let listener = TcpListener::bind(addr).await?;
        let state = Arc::new(State {
            behaviour: Mutex::new(behaviour),
            per_path: Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
            arrivals: Mutex::new(Vec::new()),
            last_headers: Mutex::new(HashMap::new()),
            total: AtomicU64::new(0),
            not_modified: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            arrived: Notify::new(),
        });
        let origin = Origin {
            addr: listener.local_addr()?,
            state,
            stop: Mutex::new(None),
        };
        origin.serve(listener);
        Ok(origin)
    }

    fn serve(&self, listener: TcpListener) {
        let (stop, stopped) = watch::channel(false);
        *self.stop.lock().unwrap_or_else(|e| e.into_inner()) = Some(stop);
        let state = Arc::clone(&self.state);
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let mut accept_stopped = stopped.clone();
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    _ = until_stopped(&mut accept_stopped) => return,
                };
                let state = Arc::clone(&state);
                let service = service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(answer(&state, req).await) }
                });
                let conn = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let mut conn_stopped = stopped.clone();
                tokio::spawn(async move {
                    // Stopping drops open connections too, so the port refuses everything.
                    tokio::select! {
                        _ = conn => {}
                        _ = until_stopped(&mut conn_stopped) => {}
                    }
                });
            }
        });
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes how the origin answers from now on.
    pub fn set(&self, change: impl FnOnce(&mut Behaviour)) {
        change(
            &mut self
                .state
                .behaviour
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
    }

    /// Requests received, over all paths.
    pub fn requests(&self) -> u64 {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Requests received for `path` (with its query string, if any).
    pub fn requests_for(&self, path: &str) -> u64 {
        self.state
            .per_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Requests answered `304 Not Modified`.
    pub fn not_modified(&self) -> u64 {
        self.state.not_modified.load(Ordering::SeqCst)
    }

    /// When each request arrived, in milliseconds since the origin started, in order.
    pub fn arrivals_ms(&self) -> Vec<u64> {
        self.state
            .arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The most requests that were in progress at once.
    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// The headers of the last request for `path`, as the origin received them.
    pub fn last_request_headers(&self, path: &str) -> Option<http::HeaderMap> {
        self.state
            .last_headers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .cloned()
    }

    /// Waits until at least `n` requests have arrived in all, or `timeout` passes;
    /// returns the count then.
    pub async fn wait_for_requests(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.state.arrived.notified();
            let count = self.requests();
            if count >= n {
                return count;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.requests();
            }
        }
    }

    /// Closes the port and every open connection: requests are refused until
    /// [`Origin::restart`].
    pub fn stop(&self) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(true);
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn answer(state: &State, req: Request<Incoming>) -> Response<OriginBody> {
    let in_flight = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(in_flight, Ordering::SeqCst);
    // Counted down however the request ends: answered, or dropped with its connection.
    struct Done<'a>(&'a AtomicU64);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _done = Done(&state.in_flight);
    respond(state, req).await
}

/// The control API of an origin run as a process of its own (by the load tool):
/// `GET /__origin/stats` answers the counts as JSON; `POST /__origin/set?status=500&delay=2s`
/// changes the behaviour.
async fn control(state: &State, req: Request<Incoming>) -> Response<OriginBody> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body)).boxed())
            .expect("valid response")
    };
    match req.uri().path() {
        "/__origin/stats" => {
            let per_path = state
                .per_path
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let arrivals = state
                .arrivals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let paths: Vec<String> = per_path
                .iter()
                .map(|(p, n)| format!("{}:{n}", json_string(p)))
                .collect();
            let arrivals: Vec<String> = arrivals.iter().map(u64::to_string).collect();
            let body = format!(
                "{{\"total\":{},\"max_in_flight\":{},\"per_path\":{{{}}},\"arrivals_ms\":[{}]}}",
                state.total.load(Ordering::SeqCst),
                state.max_in_flight.load(Ordering::SeqCst),
                paths.join(","),
                arrivals.join(",")
            );
            text(StatusCode::OK, body)
        }
        "/__origin/set" => {
            let mut b = state.behaviour.lock().unwrap_or_else(|e| e.into_inner());
            for pair in req.uri().query().unwrap_or("").split('&') {
                match pair.split_once('=') {
                    Some(("status", v)) => match v
                        .parse::<u16>()
                        .ok()
                        .and_then(|s| StatusCode::from_u16(s).ok())
                    {
                        Some(status) => b.status = status,
                        None => return text(StatusCode::BAD_REQUEST, format!("bad status {v}\n")),
                    },
                    Some(("delay", v)) => match humantime::parse_duration(v) {
                        Ok(delay) => b.delay = delay,
                        Err(_) => return text(StatusCode::BAD_REQUEST, format!("bad delay {v}\n")),
                    },
                    _ => return text(StatusCode::BAD_REQUEST, format!("unknown setting {pair}\n")),
                }
            }
            text(StatusCode::OK, "ok\n".into())
        }
        _ => text(StatusCode::NOT_FOUND, "unknown control path\n".into()),
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

async fn respond(state: &State, req: Request<Incoming>) -> Response<OriginBody> {
    if req.uri().path().starts_with("/__origin/") {
        return control(state, req).await;
    }
    let path = state.record(&req);
    let b = state
        .behaviour
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (head, body) = req.into_parts();
    let received = body.collect().await.map_or(0, |b| b.to_bytes().len());
    if !b.delay.is_zero() {
        tokio::time::sleep(b.delay).await;
    }

    let mut res = Response::builder().status(b.status);
    if let Some(cc) = &b.cache_control {
        res = res.header(header::CACHE_CONTROL, cc.as_str());
    }
    for (name, value) in &b.headers {
        res = res.header(name.as_str(), value.as_str());
    }
    let etag = format!("\"v{}\"", b.version);
    if b.etag {
        res = res.header(header::ETAG, etag.as_str());
        let matches = head
            .headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
        if matches && b.status == StatusCode::OK {
            state.not_modified.fetch_add(1, Ordering::SeqCst);
            return res
                .status(StatusCode::NOT_MODIFIED)
                .body(Full::new(Bytes::new()).boxed())
                .expect("valid response");
        }
    }

    let lang = head
        .headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let text = format!("{path} v{} lang={lang} received={received}\n", b.version);
    res = res.header(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    res.body(text_body(text, &b)).expect("valid response")
}

impl State {
    /// Counts a request that arrived (when, for which path, with which headers) and
    /// wakes whoever waits for a count; returns its path with its query string.
    fn record(&self, req: &Request<Incoming>) -> String {
        let arrived_ms = self.started.elapsed().as_millis() as u64;
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(arrived_ms);
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *self
            .per_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(path.clone())
            .or_default() += 1;
        self.last_headers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.clone(), req.headers().clone());
        self.total.fetch_add(1, Ordering::SeqCst);
        self.arrived.notify_waiters();
        path
    }
}

/// The response body: `text` padded with '.' to the body size, whole or in chunks.
fn text_body(text: String, b: &Behaviour) -> OriginBody {
    let mut text = text.into_bytes();
    if text.len() < b.body_size {
        text.resize(b.body_size, b'.');
    }
    let body = Bytes::from(text);
    if b.chunked {
        let chunks: Vec<Result<Frame<Bytes>, Infallible>> = body
            .chunks(16 * 1024)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        StreamBody::new(futures_util::stream::iter(chunks)).boxed()
    } else {
        Full::new(body).boxed()
    }
}
