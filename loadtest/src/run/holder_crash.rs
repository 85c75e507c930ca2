//! The `holder-crash` load: a request leads a fill of one key on instance 0 (slow
//! upstream); once the fetch is under way, a herd for the key goes to the other
//! instances and instance 0 is SIGKILLed. Reports the time until the key is served
//! again and the failures.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use tokio::task::JoinHandle;

use super::load::get;
use super::probes::origin_stats;
use super::start::Started;
use super::{progress, HttpClient, Load, Sample};
use crate::scenario::Scenario;

pub(super) async fn load(
    scenario: &Scenario,
    started: &mut Started,
    client: &HttpClient,
    run: usize,
    t0: Instant,
    protection: Option<bool>,
) -> anyhow::Result<Load> {
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
    leader_fetching(client, started.origin, &path).await?;
    let others = started.proxies[1..].to_vec();
    let herd = spawn_herd(client, others, &path, scenario.concurrency, t0, &bar);
    tokio::time::sleep(Duration::from_millis(50)).await; // let the herd arrive and wait
    let killed_at = Instant::now();
    started.instances[0].process.kill();
    let mut samples = herd.await?;
    let leader = leader.await?;
    bar.inc(1);
    bar.finish();
    let figures = figures(&samples, &leader, killed_at);
    samples.push(leader);
    Ok(Load {
        samples,
        added: Vec::new(),
        figures,
    })
}

/// Waits (bounded) until the leader's fetch reached the origin: instance 0 holds the lock.
async fn leader_fetching(
    client: &HttpClient,
    origin: SocketAddr,
    path: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin_stats(client, origin)
        .await?
        .per_path
        .get(path)
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
    Ok(())
}

/// `n` concurrent GETs for `path`, round-robin over `others` (instances 1 and up).
fn spawn_herd(
    client: &HttpClient,
    others: Vec<SocketAddr>,
    path: &str,
    n: usize,
    t0: Instant,
    bar: &ProgressBar,
) -> JoinHandle<Vec<Sample>> {
    let (client, path, bar) = (client.clone(), path.to_string(), bar.clone());
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
}

fn figures(herd: &[Sample], leader: &Sample, killed_at: Instant) -> Vec<(String, f64)> {
    let served_again = herd
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.done.saturating_duration_since(killed_at))
        .min();
    vec![
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
            herd.iter().filter(|s| !s.ok).count() as f64,
        ),
    ]
}
