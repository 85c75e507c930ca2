//! The processes a run starts: the slow origin and corral instances (redis-servers come
//! from `corral-testkit`), each a real process, all killed when the run ends (also on
//! error or Ctrl-C, since dropping a [`Process`] kills it).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use corral_testkit::free_port;

/// A child process killed on drop.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

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

/// This program, to start its own `origin` and `proxy` subcommands as processes.
fn me() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("locating corral-loadtest itself")
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
    let mut process = Process { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready(admin) {
        // A config it refuses ends it at once: say so rather than wait out the deadline.
        if let Some(status) = process.child.try_wait()? {
            bail!(
                "corral ({}) exited: {status}; its error is above",
                path.display()
            );
        }
        if Instant::now() > deadline {
            bail!("corral at {addr} not ready (listening, Redis connection) within 20s");
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
