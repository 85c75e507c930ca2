//! Running a scenario: start what it needs, send its load (and its fault), collect the
//! figures.
//!
//! One run is three phases: [`start`] the processes, the load of the scenario's kind
//! ([`cold_herd`], [`holder_crash`], or [`steady`] for the steady-rate kinds, all
//! sending through [`load`]), then the [`summary`] of what the clients and the origin
//! ([`probes`]) saw. [`fleet_scale`] runs its own three phases instead.

mod cold_herd;
mod fleet_scale;
mod holder_crash;
mod load;
mod probes;
mod start;
mod steady;
mod summary;
mod zipf;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressStyle};

use crate::report::{Report, RunReport};
use crate::scenario::{Kind, Scenario};
pub use start::serve;
use summary::{Counts, Seen};

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Where this process writes the configs of the instances it starts; removed when the
/// command ends.
pub fn scratch_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("corral-loadtest-{}", std::process::id()))
}

/// Where the load goes: corral instances this tool starts, or proxies given with
/// `--target` in front of the origin this tool starts.
pub struct Setup {
    pub targets: Vec<SocketAddr>,
    pub origin_port: Option<u16>,
}

/// One request's outcome, as a client saw it.
struct Sample {
    path: String,
    instance: usize,
    sent_ms: u64,
    done: Instant,
    latency: Duration,
    ok: bool,
    cache_status: String,
}

/// How corral runs in one run of a scenario: with its protection (fill lock and
/// coalescing) or without (`None`: the `--target` proxies, not started here), and the
/// route lines a scenario varies between runs, under the run's name.
#[derive(Debug, Clone)]
pub(crate) struct Mode {
    pub(crate) protection: Option<bool>,
    /// The run's name in the report, when the runs differ in more than protection.
    pub(crate) phase: Option<String>,
    /// Lines added to the route's TOML.
    pub(crate) route: String,
    /// The route's `fleet_upstream_concurrency`, when the run sets one.
    pub(crate) fleet_cap: Option<u32>,
}

impl Mode {
    pub(crate) fn protected() -> Mode {
        Mode::plain(Some(true))
    }

    fn plain(protection: Option<bool>) -> Mode {
        Mode {
            protection,
            phase: None,
            route: String::new(),
            fleet_cap: None,
        }
    }

    /// The runs `scenario` asks for: early refresh on and off (with protection), or
    /// protection on and off; one run against `--target` proxies.
    fn runs(scenario: &Scenario, setup: &Setup) -> Vec<Mode> {
        if !setup.targets.is_empty() {
            return vec![Mode::plain(None)];
        }
        if let Some(caps) = scenario.caps {
            return caps
                .runs()
                .iter()
                .map(|on| Mode {
                    protection: Some(true),
                    phase: Some(if *on {
                        format!("fleet cap {}", scenario.fleet_cap)
                    } else {
                        "no cap".into()
                    }),
                    route: if *on {
                        // Waits are bounded by the run (each request by 60 s).
                        format!(
                            "fleet_upstream_concurrency = {}\nupstream_queue_timeout = \"60s\"\n",
                            scenario.fleet_cap
                        )
                    } else {
                        String::new()
                    },
                    fleet_cap: on.then_some(scenario.fleet_cap),
                })
                .collect();
        }
        if let Some(early) = scenario.early_refresh {
            return early
                .runs()
                .iter()
                .map(|on| Mode {
                    protection: Some(true),
                    phase: Some(format!("early refresh {}", if *on { "on" } else { "off" })),
                    route: format!("early_refresh = {on}\n"),
                    fleet_cap: None,
                })
                .collect();
        }
        let runs = scenario.protection.runs().iter();
        runs.map(|p| Mode::plain(Some(*p))).collect()
    }
}

/// What the load phase of a run gives: every sample, how much later than their leader
/// the waiters were answered (cold herds), and the figures measured during the load.
struct Load {
    samples: Vec<Sample>,
    added: Vec<Duration>,
    figures: Vec<(String, f64)>,
}

pub async fn run(
    scenario: &Scenario,
    setup: &Setup,
    command: String,
    out: &Path,
) -> anyhow::Result<Report> {
    let modes = Mode::runs(scenario, setup);
    let (mut runs, mut summary) = (Vec::new(), Vec::new());
    if scenario.kind == Kind::FleetScale {
        (runs, summary) = fleet_scale::run(scenario, setup).await?;
    } else {
        for (i, mode) in modes.iter().enumerate() {
            runs.push(one_run(scenario, setup, mode, i).await?);
        }
    }
    let report = Report {
        scenario: scenario.name.clone(),
        command,
        machine: machine(),
        runs,
        summary,
    };
    report.write(out)?;
    Ok(report)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

fn client(concurrency: usize) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http()
}

fn progress(len: u64, protection: Option<bool>) -> ProgressBar {
    let label = match protection {
        Some(true) => "protection on",
        Some(false) => "protection off",
        None => "targets",
    };
    ProgressBar::new(len)
        .with_style(
            ProgressStyle::with_template("{msg:>16} [{bar:40}] {pos}/{len} requests")
                .expect("valid template"),
        )
        .with_message(label)
}

/// One run (`mode`: protection on, off, or the `--target` proxies): start, load, summary. The
/// processes live until the summary has read corral's metrics.
async fn one_run(
    scenario: &Scenario,
    setup: &Setup,
    mode: &Mode,
    run: usize,
) -> anyhow::Result<RunReport> {
    let protection = mode.protection;
    let mut started = start::start(scenario, setup, mode).await?;
    let client = client(scenario.concurrency);
    let t0 = Instant::now();
    let Load {
        samples,
        added,
        mut figures,
    } = match scenario.kind {
        Kind::ColdHerd => {
            let proxies = &started.proxies;
            cold_herd::load(scenario, proxies, &client, run, t0, protection).await
        }
        Kind::HolderCrash => {
            holder_crash::load(scenario, &mut started, &client, run, t0, protection).await?
        }
        _ => steady::load(scenario, &started, &client, run, t0, protection).await?,
    };
    let elapsed_ms = t0.elapsed().as_millis() as u64;
    let stats = probes::origin_stats(&client, started.origin).await?;
    let counts = Counts::of(&samples, &stats);
    let seen = Seen {
        scenario,
        samples: &samples,
        counts: &counts,
        stats: &stats,
        elapsed_ms,
        fleet_cap: mode.fleet_cap,
    };
    figures.extend(seen.kind_figures(&started, &client).await?);
    let mut report = seen.report(protection, started.proxies.len(), added, figures);
    report.phase = mode.phase.clone();
    Ok(report)
}
