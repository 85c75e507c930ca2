//! A real `redis-server` on a free port of 127.0.0.1, killed on drop.
//!
//! One launcher for three callers: the tests start it in their runtime (waiting without
//! blocking it, and panicking when redis-server is missing: CI installs it), the
//! benches skip what needs Redis when it is not installed, and the load tool starts it
//! from plain threads and reports errors.

use std::io;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use crate::wait::{eventually, free_port, wait_listening, NotListening, DEADLINE};

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// The port; a free one when `None`.
    pub port: Option<u16>,
    /// Require `AUTH password`.
    pub password: Option<String>,
    /// More command-line arguments, after the launcher's own (so they win).
    pub args: Vec<String>,
}

impl RedisOptions {
    /// On `port` (again, after an outage).
    pub fn on_port(port: u16) -> RedisOptions {
        RedisOptions {
            port: Some(port),
            ..RedisOptions::default()
        }
    }
}

/// Why a redis-server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Port(io::Error),
    /// Most often: redis-server is not installed.
    #[error("starting redis-server (install Debian's redis-server package)")]
    Spawn(#[source] io::Error),
    #[error(transparent)]
    NotListening(#[from] NotListening),
}

/// A running redis-server; killed (SIGKILL) when dropped.
pub struct RedisServer {
    pub port: u16,
    options: RedisOptions,
    child: Option<Child>,
}

/// Whether `redis-server` can be run at all.
pub fn installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl RedisServer {
    /// Starts one and waits until it accepts connections, without blocking the
    /// runtime. Panics when it cannot (the tests' redis-server is installed by CI).
    pub async fn start() -> RedisServer {
        RedisServer::start_with(RedisOptions::default()).await
    }

    /// A server that requires `AUTH password`.
    pub async fn with_password(password: &str) -> RedisServer {
        RedisServer::start_with(RedisOptions {
            password: Some(password.to_string()),
            ..RedisOptions::default()
        })
        .await
    }

    /// [`RedisServer::start`] with `options`.
    pub async fn start_with(options: RedisOptions) -> RedisServer {
        let mut server = RedisServer::unstarted(options).expect("a free port");
        server.spawn_async().await;
        server
    }

    /// Starts one and waits (blocking the thread) until it accepts connections.
    pub fn spawn(options: RedisOptions) -> Result<RedisServer, StartError> {
        let mut server = RedisServer::unstarted(options)?;
        server.launch()?;
        wait_listening(server.addr(), DEADLINE, "redis-server")?;
        Ok(server)
    }

    /// For the benches: `None` when redis-server is not installed.
    pub fn if_installed() -> Option<RedisServer> {
        match RedisServer::spawn(RedisOptions::default()) {
            Ok(server) => Some(server),
            Err(StartError::Port(_) | StartError::Spawn(_)) => None,
            Err(e @ StartError::NotListening(_)) => panic!("{e}"),
        }
    }

    fn unstarted(mut options: RedisOptions) -> Result<RedisServer, StartError> {
        let port = match options.port {
            Some(port) => port,
            None => free_port().map_err(StartError::Port)?,
        };
        options.port = Some(port);
        Ok(RedisServer {
            port,
            options,
            child: None,
        })
    }

    /// Starts the process, without waiting for it.
    fn launch(&mut self) -> Result<(), StartError> {
        let mut args: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .map(String::from)
            .to_vec();
        args.extend(["--port".to_string(), self.port.to_string()]);
        if let Some(password) = &self.options.password {
            args.extend(["--requirepass".to_string(), password.clone()]);
        }
        args.extend(self.options.args.iter().cloned());
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(StartError::Spawn)?;
        self.child = Some(child);
        Ok(())
    }

    async fn spawn_async(&mut self) {
        self.launch()
            .expect("redis-server is installed (the CI script installs it)");
        let port = self.port;
        eventually("redis-server accepts connections", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    pub fn url(&self) -> String {
        match &self.options.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Freezes the process (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port (and with the same password), empty.
    pub async fn restart(&mut self) {
        self.kill();
        // The port is free once the killed process is reaped (`kill` waits for it).
        self.spawn_async().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use std::time::Duration;

    #[test]
    fn a_dropped_server_is_killed() {
        let server = RedisServer::spawn(RedisOptions::default()).expect("redis-server starts");
        let addr = server.addr();
        assert!(TcpStream::connect(addr).is_ok());
        drop(server);
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
            "stopped with its owner"
        );
    }

    #[tokio::test]
    async fn a_restarted_server_listens_on_the_same_port_with_the_same_password() {
        let mut server = RedisServer::with_password("pw").await;
        let port = server.port;
        server.kill();
        assert!(TcpStream::connect_timeout(&server.addr(), Duration::from_millis(200)).is_err());
        server.restart().await;
        assert_eq!(server.port, port);
        assert!(TcpStream::connect(server.addr()).is_ok());
        assert_eq!(server.url(), format!("redis://:pw@127.0.0.1:{port}"));
    }

    #[test]
    fn extra_arguments_reach_the_server() {
        let server = RedisServer::spawn(RedisOptions {
            args: vec!["--databases".into(), "3".into()],
            ..RedisOptions::default()
        })
        .expect("redis-server starts");
        use std::io::{Read, Write};
        let mut conn = TcpStream::connect(server.addr()).unwrap();
        conn.write_all(b"SELECT 3\r\n").unwrap();
        let mut reply = [0u8; 4];
        conn.read_exact(&mut reply).unwrap();
        assert_eq!(
            &reply, b"-ERR",
            "database 3 is out of range with 3 databases"
        );
    }
}
