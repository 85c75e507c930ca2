//! The `cold-herd` load: for each cold key, one herd of concurrent clients across the
//! instances; how much later than the leader the waiters were answered.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::load::herd;
use super::{progress, HttpClient, Load, Sample};
use crate::scenario::Scenario;
use crate::stats::Percentiles;

pub(super) async fn load(
    scenario: &Scenario,
    proxies: &[SocketAddr],
    client: &HttpClient,
    run: usize,
    t0: Instant,
    protection: Option<bool>,
) -> Load {
    let bar = progress((scenario.keys * scenario.concurrency) as u64, protection);
    let mut samples = Vec::new();
    let (mut added, mut across) = (Vec::new(), Vec::new());
    for k in 0..scenario.keys {
        let path = format!("/herd/{run}/{k}");
        let batch = herd(client, proxies, &path, scenario.concurrency, t0, &bar).await;
        added.extend(added_over_leader(&batch, false));
        across.extend(added_over_leader(&batch, true));
        samples.extend(batch);
    }
    bar.finish();
    let mut figures = Vec::new();
    if proxies.len() > 1 {
        let across = Percentiles::of(across);
        figures.push(("other-instance waiters added p99 ms".into(), across.p99_ms));
    }
    Load {
        samples,
        added,
        figures,
    }
}

/// How much later than the leader's (the one response fetched without waiting) the
/// waiters' responses completed.
/// With `other_instances`, only the waiters on instances other than the leader's
/// (woken through Redis).
pub(super) fn added_over_leader(batch: &[Sample], other_instances: bool) -> Vec<Duration> {
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
