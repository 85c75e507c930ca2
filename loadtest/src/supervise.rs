//! The processes a run starts: the slow origin, redis-servers and corral instances,
//! each a real process, all killed when the run ends (also on error or Ctrl-C, since
//! dropping a [`Fleet`] kills them).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process killed on drop.
pub struct Process {
    child: Child,
}

impl Process {
    /// SIGKILL now, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `addr` accepts connections, or fails after `timeout`.
pub fn wait_listening(addr: SocketAddr, timeout: Duration, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not start listening on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// This program, to start its own `origin` and `proxy` subcommands as processes.
fn me() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("locating corral-loadtest itself")
}

/// Starts `redis-server` on a free port.
pub fn redis() -> anyhow::Result<(Process, SocketAddr)> {
    redis_on(free_port()?)
}

/// Starts `redis-server` on `port` (again, after an outage).
pub fn redis_on(port: u16) -> anyhow::Result<(Process, SocketAddr)> {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (install Debian's redis-server package)")?;
    let process = Process { child };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_listening(addr, Duration::from_secs(10), "redis-server")?;
    Ok((process, addr))
}

/// Starts the slow origin (`corral-loadtest origin`) and reads the address it bound.
/// On `port` when given (so proxies configured beforehand can point at it).
pub fn origin(
    delay: Duration,
    port: Option<u16>,
    cache_control: &str,
    body_size: usize,
) -> anyhow::Result<(Process, SocketAddr)> {
    let listen = format!("127.0.0.1:{}", port.unwrap_or(0));
    let delay = humantime::format_duration(delay).to_string();
    let body_size = body_size.to_string();
    let mut child = Command::new(me()?)
        .args([
            "origin",
            "--listen",
            &listen,
            "--delay",
            &delay,
            "--cache-control",
            cache_control,
            "--body-size",
            &body_size,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the origin process")?;
    let stdout = child.stdout.take().context("origin stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("origin said {line:?}"))?;
    Ok((Process { child }, addr))
}

/// A corral instance started by [`corral`]: the process, its proxy and admin addresses.
pub struct Instance {
    pub process: Process,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

/// Starts a corral instance (`corral-loadtest proxy --config FILE`) on free ports with
/// the given config text (it fills in `listen` and `admin_listen`), and waits until it
/// is ready (in fleet mode: connected to Redis).
pub fn corral(config: &str, dir: &std::path::Path, index: usize) -> anyhow::Result<Instance> {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("corral-{index}.toml"));
    std::fs::write(
        &path,
        format!("listen = \"{addr}\"\nadmin_listen = \"{admin}\"\n{config}"),
    )?;
    let child = Command::new(me()?)
        .args(["proxy", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .context("starting a corral instance")?;
    let process = Process { child };
    wait_listening(admin, Duration::from_secs(10), "corral")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready(admin) {
        if Instant::now() > deadline {
            bail!("corral at {addr} not ready (Redis connection) within 10s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Instance {
        process,
        addr,
        admin,
    })
}

fn ready(admin: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect_timeout(&admin, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_process_is_killed() {
        let (process, addr) = redis().expect("redis-server starts");
        assert!(TcpStream::connect(addr).is_ok());
        drop(process);
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
            "stopped with its owner"
        );
    }

    #[test]
    fn waiting_for_a_port_nobody_opens_fails_with_the_reason() {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
        let err = wait_listening(addr, Duration::from_millis(100), "nothing").unwrap_err();
        assert!(err.to_string().contains("nothing did not start listening"));
    }
}
