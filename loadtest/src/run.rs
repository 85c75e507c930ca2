//! Running a scenario: start what it needs, send its load (and its fault), collect the
//! figures.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;

use crate::report::{Report, RunReport, INTERVAL_MS};
use crate::scenario::{Kind, Scenario};
use crate::stats::{cdf, per_interval, Percentiles};
use crate::supervise::{self, Instance, Process};

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

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

pub async fn run(
    scenario: &Scenario,
    setup: &Setup,
    command: String,
    out: &Path,
) -> anyhow::Result<Report> {
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
    let mut runs = Vec::new();
    for (i, protection) in modes.into_iter().enumerate() {
        runs.push(one_run(scenario, setup, protection, i).await?);
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
    _origin: Process,
    origin: SocketAddr,
    /// Redis for fleets; the outage fault takes the process out and puts a new one in.
    redis: Option<(Arc<std::sync::Mutex<Option<Process>>>, SocketAddr)>,
    instances: Vec<Instance>,
    proxies: Vec<SocketAddr>,
}

fn start(scenario: &Scenario, setup: &Setup, protection: Option<bool>) -> anyhow::Result<Started> {
    let (origin_process, origin) = supervise::origin(
        scenario.upstream_delay,
        setup.origin_port,
        &scenario.cache_control,
        scenario.body_size,
    )?;
    let Some(protection) = protection else {
        return Ok(Started {
            _origin: origin_process,
            origin,
            redis: None,
            instances: Vec::new(),
            proxies: setup.targets.clone(),
        });
    };
    let mut config = format!(
        "[cache]\nmax_bytes = {:?}\nmax_object_bytes = \"1MiB\"\n[lock]\nttl = \"{}\"\nwait_timeout = \"30s\"\n",
        scenario.local_cache,
        humantime::format_duration(scenario.lock_ttl)
    );
    let redis = if scenario.instances > 1 {
        let (process, addr) = supervise::redis()?;
        config.push_str(&format!(
            "[redis]\nurl = \"redis://{addr}\"\nretry_after = \"500ms\"\n"
        ));
        Some((Arc::new(std::sync::Mutex::new(Some(process))), addr))
    } else {
        None
    };
    config.push_str(&format!(
        "[[route]]\nname = \"loadtest\"\nupstream = \"http://{origin}\"\ncoalesce = {protection}\nresponse_timeout = \"{}\"\n",
        humantime::format_duration(scenario.response_timeout)
    ));
    // Generated configs hold this run's ports: scratch, not part of the report.
    let dir = std::env::temp_dir().join(format!("corral-loadtest-{}", std::process::id()));
    let mut instances = Vec::new();
    for i in 0..scenario.instances {
        instances.push(supervise::corral(&config, &dir, i)?);
    }
    let proxies = instances.iter().map(|i| i.addr).collect();
    Ok(Started {
        _origin: origin_process,
        origin,
        redis,
        instances,
        proxies,
    })
}

/// Starts the scenario's processes with protection on and leaves them running until
/// the returned value is dropped (the demo's "try it yourself").
pub fn serve(scenario: &Scenario, setup: &Setup) -> anyhow::Result<Running> {
    let started = start(scenario, setup, Some(true))?;
    Ok(Running {
        proxies: started.proxies.clone(),
        _started: started,
    })
}

/// Processes kept running for the user; killed when dropped.
pub struct Running {
    pub proxies: Vec<SocketAddr>,
    _started: Started,
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

async fn one_run(
    scenario: &Scenario,
    setup: &Setup,
    protection: Option<bool>,
    run: usize,
) -> anyhow::Result<RunReport> {
    let mut started = start(scenario, setup, protection)?;
    let client = client(scenario.concurrency);
    let t0 = Instant::now();
    let mut figures = Vec::new();
    let (samples, added) = match scenario.kind {
        Kind::ColdHerd => {
            let bar = progress((scenario.keys * scenario.concurrency) as u64, protection);
            let mut samples = Vec::new();
            let (mut added, mut across) = (Vec::new(), Vec::new());
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
                added.extend(added_over_leader(&batch, false));
                across.extend(added_over_leader(&batch, true));
                samples.extend(batch);
            }
            bar.finish();
            if started.proxies.len() > 1 {
                let across = Percentiles::of(across);
                figures.push(("other-instance waiters added p99 ms".into(), across.p99_ms));
            }
            (samples, added)
        }
        Kind::HolderCrash => {
            let (samples, crash) =
                holder_crash(scenario, &mut started, &client, run, t0, protection).await?;
            figures.extend(crash);
            (samples, Vec::new())
        }
        kind => {
            let keys = scenario.keys as u64;
            let zipf =
                (kind == Kind::Zipf).then(|| Zipf::new(scenario.keys, scenario.zipf_exponent));
            let per_key = (2 * started.proxies.len()) as u64;
            let path_of = move |i: u64| match kind {
                Kind::Zipf => format!("/zipf/{run}/{}", zipf.as_ref().map_or(0, Zipf::sample)),
                // Each key is cold once and then asked a few times across instances, so
                // misses keep happening all through the Redis outage.
                Kind::RedisOutage => format!("/fresh/{run}/{}", i / per_key),
                _ => format!("/hot/{run}/{}", i % keys),
            };
            let fault = spawn_fault(scenario, &started, &client);
            let samples =
                steady(&client, &started.proxies, scenario, t0, protection, path_of).await;
            if let Some(fault) = fault {
                fault.await.context("fault task")??;
            }
            (samples, Vec::new())
        }
    };
    let elapsed_ms = t0.elapsed().as_millis() as u64;
    let stats = origin_stats(&client, started.origin).await?;

    let mut requested: Vec<&str> = samples.iter().map(|s| s.path.as_str()).collect();
    requested.sort_unstable();
    requested.dedup();
    let per_key: Vec<u64> = requested
        .iter()
        .map(|p| stats.per_path.get(*p).copied().unwrap_or(0))
        .collect();
    let upstream_requests: u64 = per_key.iter().sum();
    let client_requests = samples.len() as u64;
    let latencies: Vec<Duration> = samples.iter().filter(|s| s.ok).map(|s| s.latency).collect();
    let share = |pred: &dyn Fn(&Sample) -> bool, within: &dyn Fn(&Sample) -> bool| {
        let considered: Vec<&Sample> = samples.iter().filter(|s| within(s)).collect();
        100.0 * considered.iter().filter(|s| pred(s)).count() as f64
            / considered.len().max(1) as f64
    };
    let fault_from = scenario.fault_after.as_millis() as u64;
    let fault_to = fault_from + scenario.fault_for.as_millis() as u64;
    let in_fault = |s: &Sample| (fault_from..fault_to).contains(&s.sent_ms);
    match scenario.kind {
        Kind::ExpiryUnderLoad => {
            let periods = scenario
                .max_age()
                .map_or(1.0, |ttl| scenario.duration.as_secs_f64() / ttl.max(0.001));
            figures.push((
                "upstream per key per TTL".into(),
                upstream_requests as f64 / (requested.len().max(1) as f64 * periods),
            ));
            figures.push((
                "served stale %".into(),
                share(&|s| s.cache_status.contains("stale"), &|_| true),
            ));
        }
        Kind::UpstreamOutage => {
            figures.push((
                "answered during outage %".into(),
                share(&|s| s.ok, &in_fault),
            ));
            let from_cache = |s: &Sample| {
                s.ok && (s.cache_status.contains("hit") || s.cache_status.contains("stale"))
            };
            figures.push((
                "from cache during outage %".into(),
                share(&from_cache, &in_fault),
            ));
            figures.push((
                "stale-if-error during outage %".into(),
                share(&|s| s.cache_status.contains("stale-if-error"), &in_fault),
            ));
        }
        Kind::RedisOutage => {
            let mut first_sent: HashMap<&str, u64> = HashMap::new();
            for s in &samples {
                first_sent.entry(&s.path).or_insert(s.sent_ms);
            }
            let during = requested.iter().filter(|p| {
                first_sent
                    .get(*p)
                    .is_some_and(|t| (fault_from..fault_to).contains(t))
            });
            let fan_out = during
                .map(|p| stats.per_path.get(*p).copied().unwrap_or(0))
                .max()
                .unwrap_or(0);
            figures.push((
                "errors".into(),
                samples.iter().filter(|s| !s.ok).count() as f64,
            ));
            figures.push((
                "errors during outage".into(),
                samples.iter().filter(|s| !s.ok && in_fault(s)).count() as f64,
            ));
            figures.push(("max upstream per key during outage".into(), fan_out as f64));
            figures.push(("instances".into(), started.proxies.len() as f64));
        }
        Kind::Zipf => {
            let (mut requests, mut hits, mut shared) = (0.0, 0.0, 0.0);
            for instance in &started.instances {
                let text = admin_metrics(&client, instance.admin).await?;
                requests += metric_sum(&text, "corral_requests_total{");
                hits += metric_sum(
                    &text,
                    "corral_requests_total{route=\"loadtest\",cache_status=\"hit\"}",
                );
                shared += metric_sum(&text, "corral_shared_hits_total");
            }
            let secs = elapsed_ms as f64 / 1000.0;
            figures.push((
                "local hit %".into(),
                100.0 * (hits - shared).max(0.0) / requests.max(1.0),
            ));
            figures.push(("shared hit %".into(), 100.0 * shared / requests.max(1.0)));
            figures.push(("upstream req/s".into(), upstream_requests as f64 / secs));
            figures.push(("throughput req/s".into(), latencies.len() as f64 / secs));
        }
        Kind::ColdHerd | Kind::HolderCrash => {}
    }

    // Origin arrivals are on the origin's clock; align its first arrival with ours.
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
        keys: requested.len(),
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
        figures,
        cdf: cdf(&latencies),
    })
}

/// How much later than the leader's (the one response fetched without waiting) the
/// waiters' responses completed.
/// With `other_instances`, only the waiters on instances other than the leader's
/// (woken through Redis).
fn added_over_leader(batch: &[Sample], other_instances: bool) -> Vec<Duration> {
    let Some(leader) = batch
        .iter()
        .find(|s| s.cache_status.contains("fwd=miss") && !s.cache_status.contains("collapsed"))
    else {
        return Vec::new();
    };
    batch
        .iter()
        .filter(|s| {
            s.cache_status.contains("collapsed")
                && (!other_instances || s.instance != leader.instance)
        })
        .map(|s| s.done.saturating_duration_since(leader.done))
        .collect()
}

async fn get(
    client: &HttpClient,
    proxy: SocketAddr,
    instance: usize,
    path: String,
    t0: Instant,
) -> Sample {
    let sent = Instant::now();
    let uri: http::Uri = format!("http://{proxy}{path}").parse().expect("valid URI");
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
    let (ok, cache_status) = outcome.unwrap_or((false, String::new()));
    Sample {
        path,
        instance,
        sent_ms: sent.duration_since(t0).as_millis() as u64,
        done: Instant::now(),
        latency: sent.elapsed(),
        ok,
        cache_status,
    }
}

/// `n` concurrent GETs for `path`, round-robin over `proxies`, each on its own connection.
async fn herd(
    client: &HttpClient,
    proxies: &[SocketAddr],
    path: &str,
    n: usize,
    t0: Instant,
    bar: &ProgressBar,
) -> Vec<Sample> {
    let requests = (0..n).map(|i| async move {
        let sample = get(
            client,
            proxies[i % proxies.len()],
            i % proxies.len(),
            path.to_string(),
            t0,
        )
        .await;
        bar.inc(1);
        sample
    });
    futures_util::future::join_all(requests).await
}

/// `rate` requests per second for `duration`, round-robin over `proxies`, at most
/// `concurrency` in flight (past that the schedule waits: bounded, not open-ended).
async fn steady(
    client: &HttpClient,
    proxies: &[SocketAddr],
    scenario: &Scenario,
    t0: Instant,
    protection: Option<bool>,
    path_of: impl Fn(u64) -> String,
) -> Vec<Sample> {
    let total = (scenario.rate as f64 * scenario.duration.as_secs_f64()) as u64;
    let bar = progress(total, protection);
    let limit = Arc::new(Semaphore::new(scenario.concurrency));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / scenario.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        ticker.tick().await;
        let permit = Arc::clone(&limit)
            .acquire_owned()
            .await
            .expect("semaphore open");
        let (client, bar) = (client.clone(), bar.clone());
        let instance = i as usize % proxies.len();
        let (proxy, path) = (proxies[instance], path_of(i));
        tasks.push(tokio::spawn(async move {
            let sample = get(&client, proxy, instance, path, t0).await;
            bar.inc(1);
            drop(permit);
            sample
        }));
    }
    let mut samples = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(sample) = task.await {
            samples.push(sample);
        }
    }
    bar.finish();
    samples
}

/// The scenario's fault, on its schedule: the upstream failing (500s, then timeouts),
/// or Redis going away and coming back on the same port.
fn spawn_fault(
    scenario: &Scenario,
    started: &Started,
    client: &HttpClient,
) -> Option<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let (after, length) = (scenario.fault_after, scenario.fault_for);
    match scenario.kind {
        Kind::UpstreamOutage => {
            let (client, origin) = (client.clone(), started.origin);
            // Milliseconds: a formatted duration may hold a space, which a URI may not.
            let hang = format!("{}ms", (scenario.response_timeout * 3).as_millis());
            let normal = format!("{}ms", scenario.upstream_delay.as_millis());
            Some(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                origin_set(&client, origin, "status=500").await?;
                tokio::time::sleep(length / 2).await;
                origin_set(&client, origin, &format!("status=200&delay={hang}")).await?;
                tokio::time::sleep(length / 2).await;
                origin_set(&client, origin, &format!("delay={normal}")).await
            }))
        }
        Kind::RedisOutage => {
            let (slot, addr) = started.redis.clone()?;
            Some(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                drop(slot.lock().unwrap_or_else(|e| e.into_inner()).take()); // SIGKILL
                tokio::time::sleep(length).await;
                let (process, _) =
                    tokio::task::spawn_blocking(move || supervise::redis_on(addr.port())).await??;
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(process);
                Ok(())
            }))
        }
        _ => None,
    }
}

async fn origin_set(client: &HttpClient, origin: SocketAddr, query: &str) -> anyhow::Result<()> {
    let uri: http::Uri = format!("http://{origin}/__origin/set?{query}").parse()?;
    let res = client
        .request(http::Request::post(uri).body(Empty::new())?)
        .await?;
    anyhow::ensure!(res.status().is_success(), "origin refused {query}");
    Ok(())
}

/// A request leads a fill of one key on instance 0 (slow upstream); once the fetch is
/// under way, a herd for the key goes to the other instances and instance 0 is
/// SIGKILLed. Reports the time until the key is served again and the failures.
async fn holder_crash(
    scenario: &Scenario,
    started: &mut Started,
    client: &HttpClient,
    run: usize,
    t0: Instant,
    protection: Option<bool>,
) -> anyhow::Result<(Vec<Sample>, Vec<(String, f64)>)> {
    anyhow::ensure!(
        started.instances.len() >= 2,
        "holder-crash needs corral instances it started"
    );
    let path = format!("/crash/{run}");
    let bar = progress(scenario.concurrency as u64 + 1, protection);
    let leader = {
        let (client, proxy, path) = (client.clone(), started.proxies[0], path.clone());
        tokio::spawn(async move { get(&client, proxy, 0, path, t0).await })
    };
    // Wait (bounded) until the leader's fetch reached the origin: instance 0 holds the lock.
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin_stats(client, started.origin)
        .await?
        .per_path
        .get(&path)
        .copied()
        .unwrap_or(0)
        == 0
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the leader's fetch never reached the origin"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let others = started.proxies[1..].to_vec();
    let herd = {
        let (client, path, bar) = (client.clone(), path.clone(), bar.clone());
        let n = scenario.concurrency;
        tokio::spawn(async move {
            let requests = (0..n).map(move |i| {
                let (client, path, bar, proxy) = (
                    client.clone(),
                    path.clone(),
                    bar.clone(),
                    others[i % others.len()],
                );
                let instance = 1 + i % others.len();
                async move {
                    let sample = get(&client, proxy, instance, path, t0).await;
                    bar.inc(1);
                    sample
                }
            });
            futures_util::future::join_all(requests).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await; // let the herd arrive and wait
    let killed_at = Instant::now();
    started.instances[0].process.kill();
    let mut samples = herd.await?;
    let leader = leader.await?;
    bar.inc(1);
    bar.finish();
    let served_again = samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.done.saturating_duration_since(killed_at))
        .min();
    let figures = vec![
        (
            "time to serve again ms".to_string(),
            served_again.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
        ),
        (
            "failed (killed instance)".to_string(),
            if leader.ok { 0.0 } else { 1.0 },
        ),
        (
            "failed (others)".to_string(),
            samples.iter().filter(|s| !s.ok).count() as f64,
        ),
    ];
    samples.push(leader);
    Ok((samples, figures))
}

/// Zipf(s) over ranks 1..=n, sampled by inverting the cumulative weights.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|k| {
                total += 1.0 / (k as f64).powf(s);
                total
            })
            .collect::<Vec<_>>();
        Zipf {
            cumulative: cumulative.iter().map(|c| c / total).collect(),
        }
    }

    fn sample(&self) -> usize {
        let u: f64 = rand::random();
        self.cumulative
            .partition_point(|c| *c < u)
            .min(self.cumulative.len() - 1)
    }
}

struct OriginStats {
    per_path: HashMap<String, u64>,
    arrivals_ms: Vec<u64>,
}

async fn origin_stats(client: &HttpClient, origin: SocketAddr) -> anyhow::Result<OriginStats> {
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

async fn admin_metrics(client: &HttpClient, admin: SocketAddr) -> anyhow::Result<String> {
    let uri: http::Uri = format!("http://{admin}/metrics").parse()?;
    let res = client
        .request(http::Request::get(uri).body(Empty::new())?)
        .await?;
    Ok(String::from_utf8_lossy(&res.into_body().collect().await?.to_bytes()).into_owned())
}

/// The sum of every sample line starting with `prefix`.
fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_low_ranks_and_stays_in_range() {
        let z = Zipf::new(100, 1.0);
        let mut counts = [0u32; 100];
        for _ in 0..20_000 {
            counts[z.sample()] += 1;
        }
        assert!(
            counts[0] > counts[9] && counts[9] > counts[99],
            "{:?}",
            &counts[..10]
        );
        // Rank 1 has weight 1/H(100) ≈ 19%.
        assert!((3000..5000).contains(&counts[0]), "{}", counts[0]);
    }

    #[test]
    fn metric_sums_add_matching_lines() {
        let text = "a_total{x=\"1\"} 2\na_total{x=\"2\"} 3\nb_total 7\n# EOF\n";
        assert_eq!(metric_sum(text, "a_total{"), 5.0);
        assert_eq!(metric_sum(text, "b_total"), 7.0);
    }
}
