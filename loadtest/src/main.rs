//! `corral-loadtest`: measures how much of a request herd corral absorbs.
//!
//! `run SCENARIO` starts what the scenario needs as real processes (the slow origin
//! and corral instances are this same program's `origin` and `proxy` commands;
//! redis-server for fleets), sends the load, and writes a JSON file, a Markdown
//! report and SVG charts.

mod report;
mod run;
mod scenario;
mod stats;
mod supervise;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use corral::origin::{Behaviour, Origin};
use scenario::{Overrides, Protection, Scenario, Topology};

#[derive(Parser)]
#[command(
    name = "corral-loadtest",
    version,
    about = "Measures the herd corral absorbs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario file (see loadtest/scenarios/).
    Run(RunArgs),
    /// The main job in one command: a slow origin and corral in front of it (a fleet of
    /// 3 when redis-server is installed), a herd with and without protection, the
    /// reduction; then corral keeps running for curl until Ctrl-C.
    Demo(DemoArgs),
    /// Serve the slow origin (started by `run`; prints "listening on ADDR").
    Origin(OriginArgs),
    /// Run a corral instance (started by `run`): the same as `corral --config FILE`.
    Proxy {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    scenario: PathBuf,
    /// corral instances (a fleet sharing one Redis when more than one).
    #[arg(long)]
    instances: Option<usize>,
    /// Concurrent clients per key.
    #[arg(long)]
    concurrency: Option<usize>,
    /// How long the origin takes per request.
    #[arg(long, value_parser = humantime::parse_duration)]
    upstream_delay: Option<Duration>,
    /// How long the steady-load scenarios run.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Run corral with its fill lock and coalescing, without, or both.
    #[arg(long, value_enum)]
    protection: Option<Protection>,
    /// What a fleet shares: one redis-server, or a Redis Cluster (3 masters, 3 replicas).
    #[arg(long, value_enum)]
    redis: Option<Topology>,
    /// Send the load to these proxies (started by you, in front of the origin on
    /// --origin-port) instead of corral instances started here.
    #[arg(long = "target")]
    targets: Vec<SocketAddr>,
    /// Port for the origin (for --target setups configured beforehand).
    #[arg(long)]
    origin_port: Option<u16>,
    /// Where the report goes.
    #[arg(long, default_value = "loadtest/results")]
    out: PathBuf,
}

#[derive(Args)]
struct DemoArgs {
    /// Concurrent clients in the herd.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// How long the origin takes per request.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    upstream_delay: Duration,
    /// Exit after the herds instead of serving until Ctrl-C.
    #[arg(long)]
    no_serve: bool,
    #[arg(long, default_value = "loadtest/results/demo")]
    out: PathBuf,
}

#[derive(Args)]
struct OriginArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    delay: Duration,
    #[arg(long, default_value = "max-age=60")]
    cache_control: String,
    #[arg(long, default_value_t = 1024)]
    body_size: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let done = match Cli::parse().command {
        Command::Run(args) => run_scenario(args).await,
        Command::Demo(args) => demo(args).await,
        Command::Origin(args) => origin(args).await,
        Command::Proxy { config } => proxy(&config).await,
    };
    // The generated configs of this run's instances (scratch, not part of a report):
    // their processes are gone by now.
    let _ = std::fs::remove_dir_all(run::scratch_dir());
    done
}

/// `run SCENARIO`: the scenario's runs, the table on stdout, the report on disk.
async fn run_scenario(args: RunArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        instances: args.instances,
        concurrency: args.concurrency,
        upstream_delay: args.upstream_delay,
        protection: args.protection,
        duration: args.duration,
        redis: args.redis,
    };
    let loaded = Scenario::load(&args.scenario, &overrides)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let out = args.out.join(&loaded.name);
    let setup = run::Setup {
        targets: args.targets,
        origin_port: args.origin_port,
    };
    let report = run_until_ctrl_c(&loaded, &setup, command, &out).await?;
    println!("\n{}", report.table());
    println!("report: {}", out.join("report.md").display());
    Ok(())
}

/// Runs `scenario`; Ctrl-C ends the run, and dropping it kills every process it started.
async fn run_until_ctrl_c(
    scenario: &Scenario,
    setup: &run::Setup,
    command: String,
    out: &Path,
) -> anyhow::Result<report::Report> {
    tokio::select! {
        report = run::run(scenario, setup, command, out) => report,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; every started process was stopped"),
    }
}

/// `demo`: a cold herd with and without protection, then corral left running for curl.
async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let DemoArgs {
        concurrency,
        upstream_delay,
        no_serve,
        out,
    } = args;
    let fleet = corral_testkit::redis::installed();
    let instances = if fleet { 3 } else { 1 };
    let text = format!("name = \"demo\"\nkind = \"cold-herd\"\ninstances = {instances}\nkeys = 1\nconcurrency = {concurrency}\nprotection = \"both\"\n");
    let overrides = Overrides {
        upstream_delay: Some(upstream_delay),
        ..Overrides::default()
    };
    let scenario = Scenario::parse(&text, &overrides)?;
    let where_ = if fleet {
        "a fleet of 3 corral instances sharing one Redis"
    } else {
        "one corral instance (install redis-server for a fleet of 3)"
    };
    println!("{concurrency} concurrent clients, one cold key, {where_}, a {upstream_delay:?} upstream:\n");
    let setup = run::Setup {
        targets: Vec::new(),
        origin_port: None,
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let report = run_until_ctrl_c(&scenario, &setup, command, &out).await?;
    println!("\n{}", report.table());
    for r in &report.runs {
        println!(
            "protection {}: {} client requests -> {} upstream request(s) (herd reduction {:.0}x)",
            if r.protection { "on " } else { "off" },
            r.client_requests,
            r.upstream_requests,
            r.herd_reduction
        );
    }
    if no_serve {
        return Ok(());
    }
    serve_until_ctrl_c(&scenario, &setup).await
}

/// The demo's "try it yourself": corral keeps running, with curl lines to try, until Ctrl-C.
async fn serve_until_ctrl_c(scenario: &Scenario, setup: &run::Setup) -> anyhow::Result<()> {
    let running = run::serve(scenario, setup).await?;
    println!("\ncorral is running (Ctrl-C to stop). Try it:");
    println!("  curl -si http://{}/demo/hello | grep -iE '^(HTTP|age|cache-status)'   # run twice: miss, then hit", running.proxies[0]);
    for proxy in &running.proxies[1..] {
        println!("  curl -si http://{proxy}/demo/hello | grep -iE '^(HTTP|cache-status)'   # another instance: a hit from Redis");
    }
    if let Some(admin) = running.admins.first() {
        println!("  curl -s http://{admin}/metrics | grep -E '^corral_(requests|upstream_requests)_total'   # metrics (admin listener)");
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// `origin`: the slow origin, until Ctrl-C (or until `run` kills it).
async fn origin(args: OriginArgs) -> anyhow::Result<()> {
    let behaviour = Behaviour {
        delay: args.delay,
        cache_control: Some(args.cache_control),
        body_size: args.body_size,
        etag: true,
        ..Behaviour::default()
    };
    let origin = Origin::start_on(args.listen, behaviour)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!("listening on {}", origin.addr());
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// `proxy --config FILE`: one corral instance, until Ctrl-C (or until `run` kills it).
async fn proxy(config: &Path) -> anyhow::Result<()> {
    let config = corral::Config::load(config)?;
    corral::run(&config, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
