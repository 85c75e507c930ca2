//! From a run's samples and the origin's counts to its [`RunReport`]: the common
//! figures, and what each scenario kind measures beyond them.

use std::collections::HashMap;
use std::time::Duration;

use super::probes::{admin_metrics, metric_sum, OriginStats};
use super::start::Started;
use super::{HttpClient, Sample};
use crate::report::{RunReport, INTERVAL_MS};
use crate::scenario::{Kind, Scenario};
use crate::stats::{cdf, per_interval, Percentiles};

/// The upstream requests for the paths the clients asked for.
pub(super) struct Counts<'a> {
    /// Every path requested, sorted, once each.
    requested: Vec<&'a str>,
    /// Upstream requests per path of `requested`.
    pub(super) per_key: Vec<u64>,
    pub(super) upstream_requests: u64,
}

impl Counts<'_> {
    pub(super) fn of<'a>(samples: &'a [Sample], stats: &OriginStats) -> Counts<'a> {
        let mut requested: Vec<&str> = samples.iter().map(|s| s.path.as_str()).collect();
        requested.sort_unstable();
        requested.dedup();
        let per_key: Vec<u64> = requested
            .iter()
            .map(|p| stats.per_path.get(*p).copied().unwrap_or(0))
            .collect();
        let upstream_requests: u64 = per_key.iter().sum();
        Counts {
            requested,
            per_key,
            upstream_requests,
        }
    }
}

/// What one run saw: its samples, the origin's counts, how long the load took.
pub(super) struct Seen<'a> {
    pub(super) scenario: &'a Scenario,
    pub(super) samples: &'a [Sample],
    pub(super) counts: &'a Counts<'a>,
    pub(super) stats: &'a OriginStats,
    pub(super) elapsed_ms: u64,
    /// The fleet's cap on requests in flight to the origin, if the run has one.
    pub(super) fleet_cap: Option<u32>,
}

impl Seen<'_> {
    /// The share (in %) of the samples matching `within` that also match `pred`.
    fn share(&self, pred: &dyn Fn(&Sample) -> bool, within: &dyn Fn(&Sample) -> bool) -> f64 {
        let considered: Vec<&Sample> = self.samples.iter().filter(|s| within(s)).collect();
        100.0 * considered.iter().filter(|s| pred(s)).count() as f64
            / considered.len().max(1) as f64
    }

    /// Whether `sent_ms` falls within the scenario's fault.
    fn in_fault(&self, sent_ms: u64) -> bool {
        let fault_from = self.scenario.fault_after.as_millis() as u64;
        let fault_to = fault_from + self.scenario.fault_for.as_millis() as u64;
        (fault_from..fault_to).contains(&sent_ms)
    }

    /// What the scenario's kind measures beyond the common figures.
    pub(super) async fn kind_figures(
        &self,
        started: &Started,
        client: &HttpClient,
    ) -> anyhow::Result<Vec<(String, f64)>> {
        Ok(match self.scenario.kind {
            Kind::ExpiryUnderLoad => self.expiry_under_load(),
            Kind::UpstreamOutage => self.upstream_outage(),
            Kind::RedisOutage => self.redis_outage(started.proxies.len()),
            Kind::Zipf => self.zipf(started, client).await?,
            Kind::ColdRestart => self.cold_restart(),
            Kind::ColdHerd | Kind::HolderCrash | Kind::FleetScale => Vec::new(),
        })
    }

    /// Refetches per key per TTL once every key was filled (the origin's arrivals from
    /// the first to the last: a run's edges would otherwise weigh a whole refetch
    /// more or less); how many requests after the first lifetime went to the
    /// upstream or waited on it; the share served from a stale copy.
    fn expiry_under_load(&self) -> Vec<(String, f64)> {
        let scenario = self.scenario;
        let ttl_ms = scenario.max_age().unwrap_or(1.0) * 1000.0;
        let arrivals = &self.stats.arrivals_ms;
        let span = match (arrivals.iter().min(), arrivals.iter().max()) {
            (Some(first), Some(last)) => (last - first) as f64,
            _ => 0.0,
        };
        let keys = self.counts.requested.len().max(1) as f64;
        let refetches = (self.counts.upstream_requests as f64 - keys).max(0.0);
        let per_ttl = refetches * ttl_ms / (keys * span.max(1.0));
        let warm = ttl_ms as u64;
        let waited = self
            .samples
            .iter()
            .filter(|s| s.sent_ms >= warm && (!s.ok || s.cache_status.contains("fwd=")))
            .count();
        vec![
            ("upstream per key per TTL".into(), per_ttl),
            ("waited after warm-up".into(), waited as f64),
            (
                "served stale %".into(),
                self.share(&|s| s.cache_status.contains("detail=stale-"), &|_| true),
            ),
        ]
    }

    /// The origin's peak concurrency; the time from the first request sent to the
    /// last answered, against the best the run allows (every key one origin delay, at
    /// most the fleet cap at a time, none before it is sent); the throughput.
    fn cold_restart(&self) -> Vec<(String, f64)> {
        let scenario = self.scenario;
        let first = self.samples.iter().map(|s| s.sent_ms).min().unwrap_or(0) as f64;
        let last = self
            .samples
            .iter()
            .map(|s| s.sent_ms as f64 + s.latency.as_secs_f64() * 1000.0)
            .fold(0.0, f64::max);
        let total_ms = (last - first).max(1.0);
        let keys = self.counts.requested.len() as f64;
        let delay_ms = scenario.upstream_delay.as_secs_f64() * 1000.0;
        let sent_ms = self.samples.iter().map(|s| s.sent_ms).max().unwrap_or(0) as f64 - first;
        let capped_ms = self
            .fleet_cap
            .map_or(0.0, |cap| (keys / f64::from(cap)).ceil() * delay_ms);
        let ideal_ms = capped_ms.max(sent_ms + delay_ms);
        let answered = self.samples.iter().filter(|s| s.ok).count() as f64;
        vec![
            (
                "origin peak in flight".into(),
                self.stats.max_in_flight as f64,
            ),
            ("total ms".into(), total_ms),
            ("ideal ms".into(), ideal_ms),
            ("total / ideal".into(), total_ms / ideal_ms),
            ("throughput req/s".into(), answered * 1000.0 / total_ms),
        ]
    }

    fn upstream_outage(&self) -> Vec<(String, f64)> {
        let in_fault = |s: &Sample| self.in_fault(s.sent_ms);
        let from_cache = |s: &Sample| {
            s.ok && (s.cache_status.contains("hit") || s.cache_status.contains("stale"))
        };
        vec![
            (
                "answered during outage %".into(),
                self.share(&|s| s.ok, &in_fault),
            ),
            (
                "from cache during outage %".into(),
                self.share(&from_cache, &in_fault),
            ),
            (
                "stale-if-error during outage %".into(),
                self.share(&|s| s.cache_status.contains("stale-if-error"), &in_fault),
            ),
        ]
    }

    fn redis_outage(&self, instances: usize) -> Vec<(String, f64)> {
        let mut first_sent: HashMap<&str, u64> = HashMap::new();
        for s in self.samples {
            first_sent.entry(&s.path).or_insert(s.sent_ms);
        }
        let during = self
            .counts
            .requested
            .iter()
            .filter(|p| first_sent.get(*p).is_some_and(|t| self.in_fault(*t)));
        let fan_out = during
            .map(|p| self.stats.per_path.get(*p).copied().unwrap_or(0))
            .max()
            .unwrap_or(0);
        let failed = || self.samples.iter().filter(|s| !s.ok);
        vec![
            ("errors".into(), failed().count() as f64),
            (
                "errors during outage".into(),
                failed().filter(|s| self.in_fault(s.sent_ms)).count() as f64,
            ),
            ("max upstream per key during outage".into(), fan_out as f64),
            ("instances".into(), instances as f64),
        ]
    }

    async fn zipf(
        &self,
        started: &Started,
        client: &HttpClient,
    ) -> anyhow::Result<Vec<(String, f64)>> {
        let (mut requests, mut hits, mut shared) = (0.0, 0.0, 0.0);
        for instance in &started.instances {
            let text = admin_metrics(client, instance.admin).await?;
            requests += metric_sum(&text, "corral_requests_total{");
            hits += metric_sum(
                &text,
                "corral_requests_total{route=\"loadtest\",cache_status=\"hit\"}",
            );
            shared += metric_sum(&text, "corral_shared_hits_total");
        }
        let secs = self.elapsed_ms as f64 / 1000.0;
        let answered = self.samples.iter().filter(|s| s.ok).count();
        Ok(vec![
            (
                "local hit %".into(),
                100.0 * (hits - shared).max(0.0) / requests.max(1.0),
            ),
            ("shared hit %".into(), 100.0 * shared / requests.max(1.0)),
            (
                "upstream req/s".into(),
                self.counts.upstream_requests as f64 / secs,
            ),
            ("throughput req/s".into(), answered as f64 / secs),
        ])
    }

    /// The run's report, with `figures` (those of the load, then those of the kind).
    pub(super) fn report(
        &self,
        protection: Option<bool>,
        instances: usize,
        added: Vec<Duration>,
        figures: Vec<(String, f64)>,
    ) -> RunReport {
        let (samples, counts) = (self.samples, self.counts);
        let latencies: Vec<Duration> = samples.iter().filter(|s| s.ok).map(|s| s.latency).collect();
        let client_requests = samples.len() as u64;
        let upstream_requests = counts.upstream_requests;
        let sent_at: Vec<u64> = samples.iter().map(|s| s.sent_ms).collect();
        RunReport {
            phase: None,
            protection: protection.unwrap_or(true),
            instances,
            keys: counts.requested.len(),
            concurrency: self.scenario.concurrency,
            upstream_delay_ms: self.scenario.upstream_delay.as_millis() as u64,
            client_requests,
            failed_requests: samples.iter().filter(|s| !s.ok).count() as u64,
            upstream_requests,
            upstream_per_key_mean: upstream_requests as f64 / counts.per_key.len().max(1) as f64,
            upstream_per_key_max: counts.per_key.iter().copied().max().unwrap_or(0),
            herd_reduction: client_requests as f64 / upstream_requests.max(1) as f64,
            latency: Percentiles::of(latencies.iter().copied()),
            waiter_added: Percentiles::of(added),
            client_per_interval: per_interval(&sent_at, INTERVAL_MS, self.elapsed_ms),
            upstream_per_interval: per_interval(&self.upstream_at(), INTERVAL_MS, self.elapsed_ms),
            figures,
            cdf: cdf(&latencies),
        }
    }

    /// When each upstream request arrived, on the clients' clock: origin arrivals are
    /// on the origin's clock, so its first arrival is aligned with the first request sent.
    fn upstream_at(&self) -> Vec<u64> {
        let first_arrival = self.stats.arrivals_ms.iter().copied().min().unwrap_or(0);
        let first_sent = self.samples.iter().map(|s| s.sent_ms).min().unwrap_or(0);
        self.stats
            .arrivals_ms
            .iter()
            .map(|a| a - first_arrival + first_sent)
            .collect()
    }
}
