//! The listeners: accept client connections (HTTP/1.1 and h2c on one port), serve each
//! request through the [`Proxy`], and drain in-flight requests on shutdown.
//!
//! Proxy connections start in `http1`, which answers fresh local hits itself and
//! hands everything else to hyper; the admin port is hyper's alone.

mod http1;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Proxy;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A started proxy (and admin listener): its addresses, and the handle to stop it.
pub struct RunningServer {
    listen_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    proxy: Arc<Proxy>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
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

/// Binds the listeners and starts serving in the background.
pub async fn start(config: &Config) -> Result<RunningServer, ServerError> {
    let proxy = Arc::new(Proxy::new(config, Arc::new(Metrics::new())));
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

    let task = {
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            let http = Arc::new(Http::new());
            let admin = admin.map(|listener| {
                let (proxy, http) = (Arc::clone(&proxy), Arc::clone(&http));
                let serve = move |stream: TcpStream, peer, stopped| {
                    let proxy = Arc::clone(&proxy);
                    let service = service_fn(move |req| {
                        let proxy = Arc::clone(&proxy);
                        async move { Ok::<_, Infallible>(admin::handle(req, proxy).await) }
                    });
                    let conn = http
                        .any
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    serve_gracefully(conn, peer, stopped)
                };
                tokio::spawn(accept_loop(listener, serve, stopped.clone(), grace))
            });
            let serve = move |stream, peer, stopped| {
                http1::serve(stream, peer, Arc::clone(&proxy), Arc::clone(&http), stopped)
            };
            accept_loop(listener, serve, stopped, grace).await;
            if let Some(admin) = admin {
                let _ = admin.await;
            }
        })
    };
    Ok(RunningServer {
        listen_addr,
        admin_addr,
        proxy,
        stop,
        task,
    })
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
/// for as long as it lasts; `one_request` serves the single HTTP/1 request it is given.
pub(crate) struct Http {
    any: auto::Builder<TokioExecutor>,
    one_request: hyper::server::conn::http1::Builder,
}

impl Http {
    fn new() -> Http {
        let mut any = auto::Builder::new(TokioExecutor::new());
        // A timer enables hyper's header read timeout (30 s), so a client that trickles
        // its request head (slowloris) cannot hold a connection forever.
        any.http1().timer(TokioTimer::new());
        any.http2().timer(TokioTimer::new());
        let mut one_request = hyper::server::conn::http1::Builder::new();
        one_request.timer(TokioTimer::new()).half_close(true);
        Http { any, one_request }
    }
}

/// Serves a hyper connection to its end; when `stopped` turns true, lets the request in
/// flight finish and closes (idle connections at once).
async fn serve_gracefully<C>(conn: C, peer: SocketAddr, mut stopped: watch::Receiver<bool>)
where
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
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection closed with an error");
    }
}

/// Accepts connections until `stopped` turns true, then waits up to `grace` for open
/// connections to finish their requests (idle ones close at once).
async fn accept_loop<S, F>(
    listener: TcpListener,
    serve: S,
    mut stopped: watch::Receiver<bool>,
    grace: Duration,
) where
    S: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    // Every connection task holds a sender; the channel closes when the last one ends.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off, do not spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = serve(stream, peer, stopped.clone());
                let open = open.clone();
                tokio::spawn(async move {
                    conn.await;
                    drop(open);
                });
            }
            _ = until_stopped(&mut stopped) => break,
        }
    }
    drop(listener);
    drop(open);
    if tokio::time::timeout(grace, all_closed.recv())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "requests still in flight at the end of the grace period were cut off"
        );
    }
}

/// Resolves once `stopped` turns true (or its sender is gone).
pub(crate) async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here, not across an `.await`.
    let _ = stopped.wait_for(|stop| *stop).await.is_ok();
}
