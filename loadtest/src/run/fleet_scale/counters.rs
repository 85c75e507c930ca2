//! What a fleet did between two moments: corral's own counters summed over its
//! instances (Redis round trips, fleet events received), and Redis's command counts
//! summed over its nodes (the masters of a cluster).

use std::collections::HashMap;
use std::time::Duration;

use super::super::probes::{admin_metrics, metric_sum, redis_commandstats};
use super::super::start::Started;
use super::super::HttpClient;

/// corral's counter of requests to the cache's Redis (commands, pipelines and script
/// calls: one round trip each; subscriptions excluded).
const ROUND_TRIPS: &str = "corral_redis_round_trips_total";
/// corral's counter of Redis commands that failed or timed out.
const ERRORS: &str = "corral_redis_errors_total";
/// corral's counter of fleet event messages an instance received.
const EVENTS: &str = "corral_fleet_events_received_total";
/// Commands Redis counts that are not corral's: the load tool's own reads, and a
/// cluster's replicas acknowledging replication to their masters.
const NOT_CORRALS: [&str; 2] = ["info", "replconf"];

/// Counter values, or their growth over a phase.
#[derive(Debug, Clone, Default)]
pub(super) struct Counters {
    pub(super) round_trips: f64,
    pub(super) events: f64,
    pub(super) errors: f64,
    /// Calls per Redis command name (commands inside Lua scripts included).
    pub(super) commands: HashMap<String, u64>,
}

impl Counters {
    async fn read(started: &Started, client: &HttpClient) -> anyhow::Result<Counters> {
        let mut counters = Counters::default();
        for instance in &started.instances {
            let text = admin_metrics(client, instance.admin).await?;
            counters.round_trips += metric_sum(&text, ROUND_TRIPS);
            counters.events += metric_sum(&text, EVENTS);
            counters.errors += metric_sum(&text, ERRORS);
        }
        for port in redis_ports(started) {
            for (name, calls) in redis_commandstats(port).await? {
                *counters.commands.entry(name).or_default() += calls;
            }
        }
        for name in NOT_CORRALS {
            counters.commands.remove(name);
        }
        Ok(counters)
    }

    /// The counters once they stop moving: a fill's event reaches the other instances
    /// after its response, so the last ones of a phase may still be on their way when
    /// the clients are done. Two equal reads 100 ms apart, within 10 s (past that, the
    /// last read: a figure of a busy machine, not a failure).
    pub(super) async fn settled(
        started: &Started,
        client: &HttpClient,
    ) -> anyhow::Result<Counters> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut last = Counters::read(started, client).await?;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = Counters::read(started, client).await?;
            let still = now.round_trips == last.round_trips
                && now.events == last.events
                && now.errors == last.errors
                && now.commands == last.commands;
            if still || tokio::time::Instant::now() > deadline {
                return Ok(now);
            }
            last = now;
        }
    }

    /// The growth from `before` to `self`.
    pub(super) fn since(&self, before: &Counters) -> Counters {
        let commands = self.commands.iter().map(|(name, calls)| {
            let was = before.commands.get(name).copied().unwrap_or(0);
            (name.clone(), calls.saturating_sub(was))
        });
        Counters {
            round_trips: self.round_trips - before.round_trips,
            events: self.events - before.events,
            errors: self.errors - before.errors,
            commands: commands.filter(|(_, calls)| *calls > 0).collect(),
        }
    }

    /// Calls of the named commands.
    pub(super) fn calls(&self, names: &[&str]) -> u64 {
        names.iter().filter_map(|n| self.commands.get(*n)).sum()
    }

    /// Every command's calls, most called first.
    pub(super) fn by_calls(&self) -> Vec<(&str, u64)> {
        let mut all: Vec<(&str, u64)> = self
            .commands
            .iter()
            .map(|(n, c)| (n.as_str(), *c))
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        all
    }
}

/// The Redis nodes that serve the fleet's commands: the one redis-server, or the
/// cluster's masters (replicas only replicate).
fn redis_ports(started: &Started) -> Vec<u16> {
    match (&started.redis, &started.cluster) {
        (Some((_, addr)), _) => vec![addr.port()],
        (None, Some(cluster)) => cluster.masters(),
        (None, None) => Vec::new(),
    }
}
