//! A real `redis-server` on a free port, killed on drop.

use std::process::{Child, Command, Stdio};

pub struct RedisServer {
    pub port: u16,
    password: Option<String>,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        RedisServer::spawned(None).await
    }

    /// A server that requires `AUTH password`.
    pub async fn with_password(password: &str) -> RedisServer {
        RedisServer::spawned(Some(password.to_string())).await
    }

    async fn spawned(password: Option<String>) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            password,
            child: None,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let mut args: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .map(String::from)
            .to_vec();
        args.extend(["--port".to_string(), self.port.to_string()]);
        if let Some(password) = &self.password {
            args.extend(["--requirepass".to_string(), password.clone()]);
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (the CI script installs it)");
        self.child = Some(child);
        super::eventually("redis-server accepts connections", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
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

    /// Starts again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        // The port is free once the killed process is reaped (`kill` waits for it).
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
