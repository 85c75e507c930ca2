//! Sending requests: one GET measured as a client sees it, a herd of concurrent GETs,
//! a steady rate with bounded concurrency, and a closed loop of clients for a while.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use indicatif::ProgressBar;
use tokio::sync::Semaphore;

use super::{progress, HttpClient, Sample};
use crate::scenario::Scenario;

pub(super) async fn get(
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
pub(super) async fn herd(
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
pub(super) async fn steady(
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

/// `concurrency` clients, each sending its next request as soon as its last one is
/// answered, until `duration` is over (then the requests in flight finish); client `c`
/// sends to instance `c` mod N. A closed loop: the rate is what the instances sustain.
pub(super) async fn closed_loop(
    client: &HttpClient,
    proxies: &[SocketAddr],
    concurrency: usize,
    duration: Duration,
    t0: Instant,
    path_of: impl Fn(u64) -> String + Send + Sync + 'static,
) -> Vec<Sample> {
    let path_of = Arc::new(path_of);
    let next = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    let clients = (0..concurrency).map(|c| {
        let (client, path_of, next) = (client.clone(), Arc::clone(&path_of), Arc::clone(&next));
        let (instance, proxy) = (c % proxies.len(), proxies[c % proxies.len()]);
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < end {
                let path = path_of(next.fetch_add(1, Ordering::Relaxed));
                samples.push(get(&client, proxy, instance, path, t0).await);
            }
            samples
        })
    });
    let mut samples = Vec::new();
    for done in futures_util::future::join_all(clients.collect::<Vec<_>>()).await {
        samples.extend(done.unwrap_or_default());
    }
    samples
}
