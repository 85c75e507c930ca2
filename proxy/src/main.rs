//! The `corral` command: run the proxy, check a config, or run the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use corral::config::{Config, TokenSource};
use corral::demo::{self, DemoOptions};

#[derive(Parser)]
#[command(
    name = "corral",
    version,
    about = "A stampede-protecting caching HTTP reverse proxy",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Run the proxy with this config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and print the routes it resolves to.
    Check { file: PathBuf },
    /// Start a slow origin and corral in front of it, fire a herd, report, keep serving.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Where corral listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where /healthz and /metrics are served.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,
    /// Concurrent requests in the herd (0: no herd).
    #[arg(long, default_value_t = 500)]
    herd: usize,
    /// How long the origin takes per request.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    upstream_delay: Duration,
    /// Run this many instances sharing the Redis of --redis (fleet mode).
    #[arg(long, default_value_t = 1, requires = "redis")]
    instances: usize,
    /// Redis URL for fleet mode, e.g. redis://127.0.0.1:6379.
    #[arg(long)]
    redis: Option<String>,
    /// Exit after the herd instead of serving until Ctrl-C.
    #[arg(long)]
    no_serve: bool,
}

// jemalloc keeps size classes apart: the per-request buffers of cache misses do not
// leave holes among long-lived entries (benches/memory.sh: 8.0 KB of RSS per 1 KiB
// entry against 10.5 KB with the system allocator, at the same throughput).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line, no backtrace (a config mistake is not a crash, whatever
            // RUST_BACKTRACE says), each cause once.
            eprintln!("Error: {}", error_line(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `err` and its causes on one line, leaving out a cause its message already states.
fn error_line(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

fn run(cli: Cli) -> anyhow::Result<()> {
    init_logs()?;
    match (cli.command, cli.config) {
        (Some(Command::Check { file }), _) => check(&file),
        (Some(Command::Demo(args)), _) => {
            raise_open_file_limit();
            runtime(None)?.block_on(run_demo(args))
        }
        (None, Some(file)) => {
            let config = Config::load(&file)?;
            raise_open_file_limit();
            runtime(config.workers)?.block_on(serve(&file, &config))
        }
        (None, None) => {
            anyhow::bail!("nothing to do: pass --config FILE, or a command (see --help)")
        }
    }
}

/// Logs on stderr, filtered by `RUST_LOG` (default `info`): plain text, in colour only
/// on a terminal (a file or a journal gets no escape codes), or one JSON object per
/// line with `LOG_FORMAT=json` (for log shippers).
fn init_logs() -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match std::env::var("LOG_FORMAT").as_deref() {
        Ok("json") => logs.json().init(),
        Ok("text") | Err(_) => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        Ok(other) => anyhow::bail!("LOG_FORMAT={other:?}: use \"text\" (the default) or \"json\""),
    }
    Ok(())
}

/// The multi-threaded runtime, with `workers` threads (default: one per core this
/// process may use).
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    Ok(builder.build()?)
}

/// Client connections and large cached bodies (one sealed file each) both take file
/// descriptors; the soft limit is often 1024 while the hard one is far higher. The
/// default `limits.max_connections` is derived from the raised limit.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let from = limit.current;
        limit.current = limit.maximum;
        match setrlimit(Resource::Nofile, limit) {
            Ok(()) => tracing::debug!(?from, to = ?limit.current, "raised the open file limit"),
            Err(error) => tracing::warn!(%error, "cannot raise the open file limit"),
        }
    }
}

fn check(file: &PathBuf) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    println!("{}: ok", file.display());
    println!(
        "listen {}, admin {}, workers {}, local cache {} (objects up to {})",
        config.listen,
        config
            .admin_listen
            .map_or("off".to_string(), |a| a.to_string()),
        config
            .workers
            .map_or("one per core".to_string(), |n| n.to_string()),
        bytesize::ByteSize(config.cache.max_bytes).display().iec(),
        bytesize::ByteSize(config.cache.max_object_bytes)
            .display()
            .iec(),
    );
    match &config.tls {
        Some(tls) => println!(
            "tls: on (cert {}, key {}; ALPN h2, http/1.1)",
            tls.cert.display(),
            tls.key.display()
        ),
        None => println!("tls: off (plain HTTP/1.1 and h2c)"),
    }
    // Where the token came from, never the token.
    println!(
        "admin token: {}",
        match config.admin_token.as_ref().map(|t| t.source) {
            None => "none (purges need no credentials; admin_listen must be loopback)",
            Some(TokenSource::File) => "set (admin_token)",
            Some(TokenSource::Environment) => "set (CORRAL_ADMIN_TOKEN, over the file)",
        }
    );
    let l = &config.limits;
    let d = |d: Duration| humantime::format_duration(d).to_string();
    println!(
        "limits: max_connections {}, head {}, idle {}, send {}, h2 streams {}, h2 ping {} (timeout {})",
        l.max_connections
            .map_or("auto (from the open file limit)".to_string(), |n| n.to_string()),
        d(l.head_timeout),
        d(l.idle_timeout),
        d(l.send_timeout),
        l.h2_max_concurrent_streams,
        d(l.h2_keepalive_interval),
        d(l.h2_keepalive_timeout),
    );
    println!(
        "{:<16} {:<32} {:<28} {:>8} {:>8} {:>8} {:>6}",
        "route", "match", "upstream", "ttl", "swr", "sie", "cache"
    );
    for r in &config.routes {
        let matched = format!("{}{}", r.host.as_deref().unwrap_or("*"), r.path_prefix);
        println!(
            "{:<16} {:<32} {:<28} {:>8} {:>8} {:>8} {:>6}",
            r.name,
            matched,
            r.upstream.to_string(),
            d(r.ttl) + if r.override_ttl { "!" } else { "" },
            d(r.stale_while_revalidate),
            d(r.stale_if_error),
            if r.cache { "on" } else { "off" }
        );
    }
    Ok(())
}

async fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    // The demo sets no admin token, so its purges must stay on this machine.
    if !args.admin_listen.ip().to_canonical().is_loopback() {
        anyhow::bail!(
            "--admin-listen {}: the demo's admin port has no token; keep it on a loopback address",
            args.admin_listen
        );
    }
    let options = DemoOptions {
        listen: args.listen,
        admin_listen: Some(args.admin_listen),
        upstream_delay: args.upstream_delay,
        instances: args.instances,
        redis: args.redis.clone(),
    };
    let demo = demo::start(&options).await.context("starting the demo")?;
    let addr = demo.server.listen_addr();
    println!(
        "corral listening on http://{addr} in front of a slow origin ({:?} per request)",
        args.upstream_delay
    );
    if args.herd > 0 {
        // A key no earlier run (or other fleet member) has cached.
        let path = &format!(
            "/demo/herd/{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis()
        );
        println!(
            "\nfiring {} concurrent requests at the cold key {path} ...",
            args.herd
        );
        let addrs = demo.addrs();
        if addrs.len() > 1 {
            println!(
                "({} instances sharing {}; clients spread round-robin)",
                addrs.len(),
                args.redis.as_deref().unwrap_or("")
            );
        }
        let mut report = demo::fire_herd(&addrs, path, args.herd).await;
        report.upstream_requests = demo.origin.requests_for(path);
        print!("{report}");
    }
    if args.no_serve {
        demo.shutdown().await;
        return Ok(());
    }
    println!("\ntry it (Ctrl-C to stop):");
    println!("  curl -si http://{addr}/demo/hello | grep -iE '^(HTTP|age|cache-status)'   # run twice: miss, then hit");
    println!(
        "  curl -s http://{}/metrics | grep corral_requests",
        args.admin_listen
    );
    shutdown_signal().await;
    demo.shutdown().await;
    Ok(())
}

/// Serves `config` until Ctrl-C or SIGTERM; on each SIGHUP, reads `file` again and
/// applies it (an invalid file is logged and changes nothing).
async fn serve(file: &std::path::Path, config: &Config) -> anyhow::Result<()> {
    // Before anything is served: SIGHUP's default action would end the process.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let server = corral::start(config).await?;
    tracing::info!(
        listen = %server.listen_addr(),
        admin = ?server.admin_addr(),
        routes = config.routes.len(),
        pid = std::process::id(),
        "corral listening"
    );
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = hangups.recv() => {
                // Refusals are logged by reload_file; the old config keeps serving.
                let _ = server.reload_file(file).await;
            }
        }
    }
    tracing::info!(grace = ?config.shutdown_grace, "shutting down; draining in-flight requests");
    server.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("can install a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
