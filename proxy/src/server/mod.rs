//! The listeners: accept client connections (HTTP/1.1 and h2c on one port), serve each
//! request through the [`Proxy`], and drain in-flight requests on shutdown.
//!
//! Proxy connections start in `http1`, which answers fresh local hits itself and
//! hands everything else to hyper; the admin port (`admin`) is hyper's alone. Every
//! connection is held to the `[limits]`: admission under `max_connections` (`accept`),
//! requests under `max_requests`, head, idle and send timeouts (`http1`, `io`, `track`).

mod accept;
mod admin;
mod http1;
mod io;
mod reload;
mod tls;
mod track;

pub use http1::write_hit_lines;
pub use reload::ReloadReport;

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::access_log::AccessLog;
use crate::config::{Config, LimitsSettings};
use crate::metrics::{ConnectionMetrics, Metrics};
use crate::proxy::error::{error_response, ProxyError};
use crate::proxy::Proxy;
use accept::Admission;
use track::{Activity, RequestLimit};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the access log {path}: {source}")]
    AccessLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A started proxy (and admin listener): its addresses, and the handles to reload and
/// stop it.
pub struct RunningServer {
    listen_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    proxy: Arc<Proxy>,
    /// What new connections are served with; a reload replaces them.
    listeners: Listeners,
    /// The config it started with (what a reload cannot change is compared to it);
    /// the lock also keeps reloads one at a time.
    started: tokio::sync::Mutex<Config>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The connection settings of both ports, read by each new connection (one atomic
/// load); invariant: only a reload stores them.
#[derive(Clone)]
struct Listeners {
    proxy: Arc<ArcSwap<Http>>,
    admin: Arc<ArcSwap<Http>>,
    /// TLS on the proxy port, when configured.
    tls: Option<tls::TlsConfig>,
    requests: Arc<RequestLimit>,
    metrics: ConnectionMetrics,
}

impl RunningServer {
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Stops accepting, lets in-flight requests finish within the grace period, and
    /// returns when all is closed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// The access log, when configured, opened before anything is served.
fn open_access_log(config: &Config, metrics: &Metrics) -> Result<Option<AccessLog>, ServerError> {
    let Some(settings) = &config.access_log else {
        return Ok(None);
    };
    let dropped = metrics.access_log_dropped.clone();
    AccessLog::start(settings, dropped)
        .map(Some)
        .map_err(|source| ServerError::AccessLog {
            path: settings
                .path
                .as_ref()
                .map_or("stdout".into(), |p| p.display().to_string()),
            source,
        })
}

/// Binds the listeners and starts serving in the background.
pub async fn start(config: &Config) -> Result<RunningServer, ServerError> {
    let metrics = Arc::new(Metrics::new());
    let access_log = open_access_log(config, &metrics)?;
    let proxy = Arc::new(Proxy::new(config, Arc::clone(&metrics)).logging(access_log));
    let listener = bind(config.listen).await?;
    let admin = match config.admin_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let listen_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let (stop, stopped) = watch::channel(false);
    let grace = config.shutdown_grace;
    let max = accept::max_connections(config.limits.max_connections);
    let listeners = Listeners::new(config, &metrics, max);
    let admission = Admission {
        permits: Arc::new(Semaphore::new(max)),
        max,
        metrics: metrics.connections.clone(),
        tls: config.tls.is_some(),
    };
    tracing::debug!(max_connections = max, "connection limit");

    let task = {
        let proxy = Arc::clone(&proxy);
        let listeners = listeners.clone();
        tokio::spawn(async move {
            let admin = admin.map(|listener| {
                let http = Arc::clone(&listeners.admin);
                let serve = admin_service(Arc::clone(&proxy), http);
                tokio::spawn(accept::accept_loop(
                    listener,
                    serve,
                    None,
                    stopped.clone(),
                    grace,
                ))
            });
            let serve = move |stream, peer, stopped| {
                let http = listeners.proxy.load_full();
                let proxy = Arc::clone(&proxy);
                let tls = listeners.tls.as_ref().map(|tls| tls.load_full());
                async move {
                    match tls {
                        Some(tls) => tls::serve(stream, peer, proxy, http, tls, stopped).await,
                        None => http1::serve(stream, peer, proxy, http, stopped).await,
                    }
                }
            };
            accept::accept_loop(listener, serve, Some(admission), stopped, grace).await;
            if let Some(admin) = admin {
                let _ = admin.await;
            }
        })
    };
    Ok(RunningServer {
        listen_addr,
        admin_addr,
        proxy,
        listeners,
        started: tokio::sync::Mutex::new(config.clone()),
        stop,
        task,
    })
}

impl Listeners {
    fn new(config: &Config, metrics: &Metrics, max_connections: usize) -> Listeners {
        // By default as many requests as connections: the connection limit's descriptor
        // budget gives each client connection one upstream socket, and this keeps to it
        // however many streams the connections multiplex.
        let max_requests = config
            .limits
            .max_requests
            .map_or(max_connections, NonZeroUsize::get);
        let requests = RequestLimit::new(max_requests, &metrics.connections);
        let limits = &config.limits;
        Listeners {
            proxy: Arc::new(ArcSwap::from_pointee(Http::new(
                limits,
                &metrics.connections,
                Some(Arc::clone(&requests)),
            ))),
            // The same timeouts, but not counted with the clients' connections and
            // requests, nor refused past their limits.
            admin: Arc::new(ArcSwap::from_pointee(Http::new(
                limits,
                &ConnectionMetrics::default(),
                None,
            ))),
            tls: config
                .tls
                .as_ref()
                .map(|t| Arc::new(ArcSwap::new(Arc::clone(&t.server)))),
            requests,
            metrics: metrics.connections.clone(),
        }
    }
}

/// How the admin port serves a connection: hyper alone, with `http`'s settings as
/// they are when it opens.
fn admin_service(
    proxy: Arc<Proxy>,
    http: Arc<ArcSwap<Http>>,
) -> impl Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> BoxFuture<'static, ()> + Send + 'static
{
    move |stream, peer, stopped| {
        let http = http.load_full();
        let proxy = Arc::clone(&proxy);
        let (activity, open) = Activity::new(&http.metrics, None);
        // No request limit here: nothing is refused.
        let service = track::tracked(
            activity,
            move |req| admin::handle(req, Arc::clone(&proxy)),
            |_| error_response(&ProxyError::Overloaded),
        );
        let conn = http
            .any
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let idle = track::idle(open, Instant::now(), http.limits.idle_timeout);
        Box::pin(serve_hyper(conn, idle, Arc::clone(&http), peer, stopped))
    }
}

/// Serves `config` until `signal` resolves, then drains and returns.
pub async fn run(config: &Config, signal: impl Future<Output = ()>) -> Result<(), ServerError> {
    let server = start(config).await?;
    tracing::info!(
        listen = %server.listen_addr(),
        admin = ?server.admin_addr(),
        routes = config.routes.len(),
        "corral listening"
    );
    signal.await;
    tracing::info!(grace = ?config.shutdown_grace, "shutting down; draining in-flight requests");
    server.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// hyper, configured once: `any` serves whatever a connection speaks (HTTP/1 or h2c)
/// for as long as it lasts; `h1_only` and `h2_only` the same, for TLS connections, which
/// speak what ALPN chose and nothing else; `one_request` serves the single HTTP/1
/// request it is given.
/// With them, the limits every client connection is held to, and (proxy port only) the
/// process-wide request limit.
pub(crate) struct Http {
    any: auto::Builder<TokioExecutor>,
    h1_only: auto::Builder<TokioExecutor>,
    h2_only: auto::Builder<TokioExecutor>,
    one_request: hyper::server::conn::http1::Builder,
    limits: LimitsSettings,
    metrics: ConnectionMetrics,
    requests: Option<Arc<RequestLimit>>,
}

impl Http {
    fn new(
        limits: &LimitsSettings,
        metrics: &ConnectionMetrics,
        requests: Option<Arc<RequestLimit>>,
    ) -> Http {
        let mut any = auto::Builder::new(TokioExecutor::new());
        // The header read timeout (it needs a timer) runs from the end of one response
        // to the end of the next request head: a client that trickles its head
        // (slowloris) or idles cannot hold the connection.
        any.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.head_timeout);
        // hyper's HTTP/2 never times out a connection by itself: pings find dead peers,
        // and `serve_hyper` closes one left idle. Against rapid reset (CVE-2023-44487),
        // at most 20 streams reset by the client may await acceptance, and 1,024 reset
        // by us per connection (hyper's and h2's defaults, set here so that they stay).
        any.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .keep_alive_interval(limits.h2_keepalive_interval)
            .keep_alive_timeout(limits.h2_keepalive_timeout)
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(1024);
        let mut one_request = hyper::server::conn::http1::Builder::new();
        one_request
            .timer(TokioTimer::new())
            .header_read_timeout(limits.head_timeout)
            .half_close(true);
        Http {
            h1_only: any.clone().http1_only(),
            h2_only: any.clone().http2_only(),
            any,
            one_request,
            limits: *limits,
            metrics: metrics.clone(),
            requests,
        }
    }
}

/// Serves a hyper connection to its end. When it has been `idle` (no request in
/// progress for `idle_timeout`), it is told to go away (HTTP/2 GOAWAY; an idle HTTP/1
/// connection closes at once) and given `h2_keepalive_timeout` to take the hint before
/// it is dropped: a client that answers no ping cannot keep it. When `stopped` turns
/// true, the requests in flight finish first (idle connections close at once).
async fn serve_hyper<C>(
    conn: C,
    idle: impl Future<Output = ()>,
    http: Arc<Http>,
    peer: SocketAddr,
    mut stopped: watch::Receiver<bool>,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = until_stopped(&mut stopped) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = idle => {
            http.metrics.idle_closed();
            tracing::debug!(%peer, "idle connection told to go away");
            conn.as_mut().graceful_shutdown();
            let grace = http.limits.h2_keepalive_timeout;
            match tokio::time::timeout(grace, conn.as_mut()).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection closed with an error");
    }
}

/// Resolves once `stopped` turns true (or its sender is gone).
pub(crate) async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here, not across an `.await`.
    let _ = stopped.wait_for(|stop| *stop).await.is_ok();
}
