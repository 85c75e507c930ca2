//! The listeners: accept client connections (HTTP/1.1 and h2c on one port), serve each
//! request through the [`Proxy`], and drain in-flight requests on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::body::ProxyBody;
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
            let admin = admin.map(|listener| {
                let proxy = Arc::clone(&proxy);
                let handler = move |req, _| admin::handle(req, Arc::clone(&proxy));
                tokio::spawn(accept_loop(listener, handler, stopped.clone(), grace))
            });
            let handler = move |req, peer| {
                let proxy = Arc::clone(&proxy);
                async move { proxy.handle(req, peer).await }
            };
            accept_loop(listener, handler, stopped, grace).await;
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

/// Accepts connections until `stopped` turns true, then waits up to `grace` for open
/// connections to finish their requests (idle ones are closed at once).
async fn accept_loop<H, F>(
    listener: TcpListener,
    handler: H,
    mut stopped: watch::Receiver<bool>,
    grace: Duration,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A timer enables hyper's header read timeout (30 s), so a client that trickles
    // its request head (slowloris) cannot hold a connection forever.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
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
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let response = handler(req, peer);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
                tokio::spawn(async move {
                    if let Err(error) = conn.await {
                        tracing::debug!(%peer, %error, "connection closed with an error");
                    }
                });
            }
            _ = until_stopped(&mut stopped) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
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
