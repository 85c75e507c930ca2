//! Running a scenario: start what it needs, send its load, collect the figures.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressStyle};

use crate::report::{Report, RunReport, INTERVAL_MS};
use crate::scenario::{Kind, Scenario};
use crate::stats::{cdf, per_interval, Percentiles};
use crate::supervise::{self, Process};

/// Where the load goes: corral instances this tool starts, or proxies given with
/// `--target` in front of the origin this tool starts.
pub struct Setup {
    pub targets: Vec<SocketAddr>,
    pub origin_port: Option<u16>,
}

/// One request's outcome, as a client saw it.
struct Sample {
    sent_ms: u64,
    done: Instant,
    latency: Duration,
    ok: bool,
    cache_status: String,
}

pub async fn run(
    scenario: &Scenario,
    setup: &Setup,
    command: String,
    out: &Path,
) -> anyhow::Result<Report> {
    let mut runs = Vec::new();
    match scenario.kind {
        Kind::ColdHerd => {
            let modes: Vec<Option<bool>> = if setup.targets.is_empty() {
                scenario
                    .protection
                    .runs()
                    .iter()
                    .map(|p| Some(*p))
                    .collect()
            } else {
                vec![None]
            };
            for (i, protection) in modes.into_iter().enumerate() {
                runs.push(cold_herd(scenario, setup, protection, i).await?);
            }
        }
    }
    let report = Report {
        scenario: scenario.name.clone(),
        command,
        machine: machine(),
        runs,
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

/// The origin, Redis and corral processes of one run; all killed when dropped.
struct Started {
    _processes: Vec<Process>,
    origin: SocketAddr,
    proxies: Vec<SocketAddr>,
}

fn start(scenario: &Scenario, setup: &Setup, protection: Option<bool>) -> anyhow::Result<Started> {
    let mut processes = Vec::new();
    let (origin, origin_addr) = supervise::origin(scenario.upstream_delay, setup.origin_port)?;
    processes.push(origin);
    let Some(protection) = protection else {
        return Ok(Started {
            _processes: processes,
            origin: origin_addr,
            proxies: setup.targets.clone(),
        });
    };
    let mut config = String::new();
    if scenario.instances > 1 {
        let (redis, redis_addr) = supervise::redis()?;
        processes.push(redis);
        config.push_str(&format!("[redis]\nurl = \"redis://{redis_addr}\"\n"));
    }
    config.push_str(&format!(
        "[[route]]\nname = \"loadtest\"\nupstream = \"http://{origin_addr}\"\ncoalesce = {protection}\nresponse_timeout = \"60s\"\n"
    ));
    // Generated configs hold this run's ports: scratch, not part of the report.
    let dir = std::env::temp_dir().join(format!("corral-loadtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut proxies = Vec::new();
    for i in 0..scenario.instances {
        let (process, addr) = supervise::corral(&config, &dir, i)?;
        processes.push(process);
        proxies.push(addr);
    }
    Ok(Started {
        _processes: processes,
        origin: origin_addr,
        proxies,
    })
}

async fn cold_herd(
    scenario: &Scenario,
    setup: &Setup,
    protection: Option<bool>,
    run: usize,
) -> anyhow::Result<RunReport> {
    let started = start(scenario, setup, protection)?;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(scenario.concurrency)
        .build_http();
    let label = match protection {
        Some(true) => "protection on",
        Some(false) => "protection off",
        None => "targets",
    };
    let bar = ProgressBar::new((scenario.keys * scenario.concurrency) as u64)
        .with_style(
            ProgressStyle::with_template("{msg:>16} [{bar:40}] {pos}/{len} requests")
                .expect("valid template"),
        )
        .with_message(label);
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut added = Vec::new();
    let mut paths = Vec::new();
    for k in 0..scenario.keys {
        let path = format!("/herd/{run}/{k}");
        let batch = herd(
            &client,
            &started.proxies,
            &path,
            scenario.concurrency,
            t0,
            &bar,
        )
        .await;
        // The leader is the one response fetched without waiting; waiters' responses
        // land after it by the cost of being woken.
        if let Some(leader) = batch
            .iter()
            .find(|s| s.cache_status.contains("fwd=miss") && !s.cache_status.contains("collapsed"))
        {
            added.extend(
                batch
                    .iter()
                    .filter(|s| s.cache_status.contains("collapsed"))
                    .map(|s| s.done.saturating_duration_since(leader.done)),
            );
        }
        samples.extend(batch);
        paths.push(path);
    }
    bar.finish();
    let elapsed_ms = t0.elapsed().as_millis() as u64;
    let stats = origin_stats(&client, started.origin).await?;
    let per_key: Vec<u64> = paths
        .iter()
        .map(|p| stats.per_path.get(p).copied().unwrap_or(0))
        .collect();
    let upstream_requests: u64 = per_key.iter().sum();
    let client_requests = samples.len() as u64;
    let latencies: Vec<Duration> = samples.iter().filter(|s| s.ok).map(|s| s.latency).collect();
    // Origin arrivals are on the origin's clock; align its first herd arrival with ours.
    let first_arrival = stats.arrivals_ms.iter().copied().min().unwrap_or(0);
    let first_sent = samples.iter().map(|s| s.sent_ms).min().unwrap_or(0);
    let upstream_at: Vec<u64> = stats
        .arrivals_ms
        .iter()
        .map(|a| a - first_arrival + first_sent)
        .collect();
    let sent_at: Vec<u64> = samples.iter().map(|s| s.sent_ms).collect();
    Ok(RunReport {
        protection: protection.unwrap_or(true),
        instances: started.proxies.len(),
        keys: scenario.keys,
        concurrency: scenario.concurrency,
        upstream_delay_ms: scenario.upstream_delay.as_millis() as u64,
        client_requests,
        failed_requests: samples.iter().filter(|s| !s.ok).count() as u64,
        upstream_requests,
        upstream_per_key_mean: upstream_requests as f64 / per_key.len().max(1) as f64,
        upstream_per_key_max: per_key.iter().copied().max().unwrap_or(0),
        herd_reduction: client_requests as f64 / upstream_requests.max(1) as f64,
        latency: Percentiles::of(latencies.iter().copied()),
        waiter_added: Percentiles::of(added),
        client_per_interval: per_interval(&sent_at, INTERVAL_MS, elapsed_ms),
        upstream_per_interval: per_interval(&upstream_at, INTERVAL_MS, elapsed_ms),
        cdf: cdf(&latencies),
    })
}

/// `n` concurrent GETs for `path`, round-robin over `proxies`, each on its own connection.
async fn herd(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    proxies: &[SocketAddr],
    path: &str,
    n: usize,
    t0: Instant,
    bar: &ProgressBar,
) -> Vec<Sample> {
    let requests = (0..n).map(|i| {
        let uri: http::Uri = format!("http://{}{path}", proxies[i % proxies.len()])
            .parse()
            .expect("valid URI");
        let client = client.clone();
        async move {
            let sent = Instant::now();
            let sent_ms = sent.duration_since(t0).as_millis() as u64;
            let attempt = async {
                let res = client
                    .request(http::Request::get(uri).body(Empty::new()).ok()?)
                    .await
                    .ok()?;
                let status = res.status();
                let cache_status = res
                    .headers()
                    .get("cache-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                res.into_body().collect().await.ok()?;
                Some((status.is_success(), cache_status))
            };
            // Every request is bounded in time, as every loop here is.
            let outcome = tokio::time::timeout(Duration::from_secs(60), attempt)
                .await
                .ok()
                .flatten();
            bar.inc(1);
            let (ok, cache_status) = outcome.unwrap_or((false, String::new()));
            Sample {
                sent_ms,
                done: Instant::now(),
                latency: sent.elapsed(),
                ok,
                cache_status,
            }
        }
    });
    futures_util::future::join_all(requests).await
}

struct OriginStats {
    per_path: std::collections::HashMap<String, u64>,
    arrivals_ms: Vec<u64>,
}

async fn origin_stats(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    origin: SocketAddr,
) -> anyhow::Result<OriginStats> {
    let uri: http::Uri = format!("http://{origin}/__origin/stats").parse()?;
    let res = client
        .request(http::Request::get(uri).body(Empty::new())?)
        .await
        .context("reading the origin's counts")?;
    let body = res.into_body().collect().await?.to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body)?;
    let per_path = json["per_path"]
        .as_object()
        .context("origin stats: per_path")?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect();
    let arrivals_ms = json["arrivals_ms"]
        .as_array()
        .context("origin stats: arrivals")?
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    Ok(OriginStats {
        per_path,
        arrivals_ms,
    })
}
