//! The accept loop: admission under the connection limit, a `503` for connections past
//! it, backoff when `accept` itself fails, and the drain on shutdown.
//!
//! Repeating faults (accept errors, refusals) are logged when they start and when they
//! end, with a count, not once per connection.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::until_stopped;
use crate::metrics::ConnectionMetrics;

/// Descriptors kept for everything that is not a client connection or its upstream
/// socket: listeners, Redis and Redlock connections, the runtime's own, logs.
const RESERVED_FDS: u64 = 256;
/// A floor for tiny open-file limits, so corral still serves a few clients.
const MIN_CONNECTIONS: usize = 16;

/// The answer to a connection past the limit: sent at once, before reading a request.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncache-status: corral; detail=overloaded\r\ncontent-length: 0\r\n\
connection: close\r\nretry-after: 1\r\n\r\n";

/// The default connection limit for an open-file limit of `nofile` (`None`: unlimited):
/// half of what is left after the cached-body files (up to half the descriptors, see
/// `cache::body_file`) and a reserve, since each client connection may hold an
/// upstream connection too. HAProxy derives its `maxconn` the same way.
fn default_max_connections(nofile: Option<u64>) -> usize {
    let Some(nofile) = nofile else {
        return 1 << 20;
    };
    let body_files = (nofile / 2).min(crate::cache::body_file::MAX_FILES as u64);
    let clients = nofile.saturating_sub(body_files + RESERVED_FDS) / 2;
    usize::try_from(clients)
        .unwrap_or(usize::MAX)
        .clamp(MIN_CONNECTIONS, 1 << 20)
}

/// The limit `configured`, or the default for this process's open-file limit.
pub(crate) fn max_connections(configured: Option<NonZeroUsize>) -> usize {
    configured.map_or_else(
        || {
            let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
            default_max_connections(nofile)
        },
        NonZeroUsize::get,
    )
}

/// How the proxy port admits connections: permits for the limit, and the counters.
///
/// A semaphore, taken with `try_acquire_owned` by the accept loop alone (admission
/// never waits: past the limit is refused at once); each permit moves into its
/// connection's task and is released when the task ends, however it ends.
pub(crate) struct Admission {
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) max: usize,
    pub(crate) metrics: ConnectionMetrics,
    /// The port speaks TLS: a connection past the limit is closed without an answer
    /// (a plain-text `503` would reach a TLS client as a corrupt record).
    pub(crate) tls: bool,
}

/// Backoff between failed accepts: exponential from [`AcceptBackoff::FIRST`] up to
/// [`AcceptBackoff::MAX`], reset by the next success. Out of descriptors, the pending
/// connection stays queued and `accept` fails at once: without a wait it would spin.
#[derive(Debug)]
struct AcceptBackoff {
    failures: u64,
    delay: Duration,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn new() -> AcceptBackoff {
        AcceptBackoff {
            failures: 0,
            delay: Duration::ZERO,
        }
    }

    /// A failed accept: how long to wait before the next, and whether this failure
    /// starts an episode (the one to log).
    fn failed(&mut self) -> (Duration, bool) {
        self.failures += 1;
        self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MAX);
        (self.delay, self.failures == 1)
    }

    /// A successful accept: how many failures the episode it ends had, if one did.
    fn succeeded(&mut self) -> Option<u64> {
        self.delay = Duration::ZERO;
        (self.failures > 0).then(|| std::mem::take(&mut self.failures))
    }
}

/// Answers a connection past the limit with [`REFUSAL`] and closes it.
fn refuse(stream: TcpStream) {
    answer_and_close(&stream, REFUSAL);
}

/// Writes `answer` to a connection and closes it, without waiting on the client: what
/// it already sent is read first, so that closing does not reset the connection
/// before the client reads the answer.
pub(super) fn answer_and_close(stream: &TcpStream, answer: &[u8]) {
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        match stream.try_read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = stream.try_write(answer);
    let _ = rustix::net::shutdown(stream, rustix::net::Shutdown::Write);
}

/// Accepts connections until `stopped` turns true, then waits up to `grace` for open
/// connections to finish their requests (idle ones close at once).
pub(crate) async fn accept_loop<S, F>(
    listener: TcpListener,
    serve: S,
    admission: Option<Admission>,
    mut stopped: watch::Receiver<bool>,
    grace: Duration,
) where
    S: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    // Every connection task holds a sender; the channel closes when the last one ends.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    let mut backoff = AcceptBackoff::new();
    let mut refused = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if let Some(a) = &admission {
                        a.metrics.accept_error();
                    }
                    let (delay, first) = backoff.failed();
                    if first {
                        tracing::warn!(%error, "accept failing; backing off, failures are counted until it recovers");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        _ = until_stopped(&mut stopped) => break,
                    }
                }
            },
            _ = until_stopped(&mut stopped) => break,
        };
        if let Some(failures) = backoff.succeeded() {
            tracing::info!(failures, "accept recovered");
        }
        let seat = match admit(admission.as_ref(), &mut refused) {
            Ok(seat) => seat,
            Err(()) => {
                if !admission.as_ref().is_some_and(|a| a.tls) {
                    refuse(stream);
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = serve(stream, peer, stopped.clone());
        let open = open.clone();
        tokio::spawn(async move {
            conn.await;
            drop(seat);
            drop(open);
        });
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

/// One admitted connection's place under the limit, given back (and uncounted) when
/// its task ends, however it ends.
struct Seat {
    _permit: OwnedSemaphorePermit,
    metrics: ConnectionMetrics,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.metrics.closed();
    }
}

/// A place for one more connection, or `Err` past the limit; logs when refusals start
/// and when they end (`refused` counts them in between).
fn admit(admission: Option<&Admission>, refused: &mut u64) -> Result<Option<Seat>, ()> {
    let Some(a) = admission else {
        return Ok(None);
    };
    match Arc::clone(&a.permits).try_acquire_owned() {
        Ok(permit) => {
            if *refused > 0 {
                tracing::info!(
                    refused = std::mem::take(refused),
                    "below max_connections again"
                );
            }
            a.metrics.opened();
            Ok(Some(Seat {
                _permit: permit,
                metrics: a.metrics.clone(),
            }))
        }
        Err(_) => {
            a.metrics.refused();
            *refused += 1;
            if *refused == 1 {
                tracing::warn!(
                    max_connections = a.max,
                    "connection limit reached; refusing new connections with 503 until some close"
                );
            }
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_exponentially_up_to_a_cap_and_log_once() {
        let mut backoff = AcceptBackoff::new();
        assert_eq!(backoff.succeeded(), None, "no episode yet");
        let (delay, first) = backoff.failed();
        assert_eq!((delay, first), (AcceptBackoff::FIRST, true));
        let (delay, first) = backoff.failed();
        assert_eq!((delay, first), (AcceptBackoff::FIRST * 2, false));
        let mut last = delay;
        for _ in 0..30 {
            let (delay, first) = backoff.failed();
            assert!(!first, "logged once per episode");
            assert!(delay >= last && delay <= AcceptBackoff::MAX);
            last = delay;
        }
        assert_eq!(last, AcceptBackoff::MAX);
        assert_eq!(backoff.succeeded(), Some(32), "the end logs the count");
        assert_eq!(backoff.succeeded(), None);
        assert_eq!(
            backoff.failed(),
            (AcceptBackoff::FIRST, true),
            "a new episode"
        );
    }

    #[test]
    fn default_connection_limit_leaves_room_for_upstreams_and_files() {
        // 1024: 512 for body files, 256 reserved, half of the rest for clients.
        assert_eq!(default_max_connections(Some(1024)), 128);
        assert_eq!(
            default_max_connections(Some(20_000)),
            (20_000 - 10_000 - 256) / 2
        );
        let big = default_max_connections(Some(1 << 20));
        assert_eq!(big, ((1 << 20) - 32 * 1024 - 256) / 2);
        assert_eq!(default_max_connections(Some(100)), MIN_CONNECTIONS);
        assert_eq!(default_max_connections(None), 1 << 20);
    }
}
