//! Waiting with deadlines: for a condition (async, polled) or for a port to accept
//! connections (blocking, for code outside a runtime); and a free port to listen on.

use std::future::Future;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long any awaited condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `check` every 20 ms until it yields a value, or fails the test at the deadline.
///
/// Uses tokio's clock, so a test that paused time still reaches its deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port of 127.0.0.1 that nobody listened on a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `n` distinct ports of 127.0.0.1 that nobody listened on a moment ago (all held at
/// once while chosen, so none is handed out twice).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// A process that did not start listening in time.
#[derive(Debug, thiserror::Error)]
#[error("{what} did not start listening on {addr} within {timeout:?}")]
pub struct NotListening {
    pub what: String,
    pub addr: SocketAddr,
    pub timeout: Duration,
}

/// Waits (blocking the thread) until `addr` accepts connections, or fails after `timeout`.
pub fn wait_listening(addr: SocketAddr, timeout: Duration, what: &str) -> Result<(), NotListening> {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        if Instant::now() > deadline {
            return Err(NotListening {
                what: what.to_string(),
                addr,
                timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_for_a_port_nobody_opens_fails_with_the_reason() {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
        let err = wait_listening(addr, Duration::from_millis(100), "nothing").unwrap_err();
        assert!(err.to_string().contains("nothing did not start listening"));
    }

    #[tokio::test]
    async fn eventually_returns_the_first_value() {
        let mut polls = 0;
        let value = eventually("the third poll", || {
            polls += 1;
            let n = polls;
            async move { (n == 3).then_some(n) }
        })
        .await;
        assert_eq!(value, 3);
    }

    #[test]
    fn free_ports_are_distinct() {
        let mut ports = free_ports(12).unwrap();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 12);
    }
}
