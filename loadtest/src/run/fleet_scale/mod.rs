//! The `fleet-scale` run: what a miss costs as the fleet grows.
//!
//! Phase A: one instance without Redis; `concurrency` clients ask for keys never asked
//! before (every request a miss) for `duration`, from an origin without delay, so that
//! corral's own cost dominates. Phase B: the same clients, spread over the fleet
//! (`instances`, sharing the scenario's Redis topology), the same way; A and B take
//! turns, so that a machine shared with others weighs on both alike. Phase C, on the
//! same fleet: `keys` hot keys one after another, each asked by `herd` clients at once
//! across the instances, from an origin slowed to `herd_delay` so that they wait.
//! Between phases the [`counters`] give Redis round trips per miss (corral's count,
//! Redis's commandstats as a cross-check) and fleet messages per fill.

mod counters;
mod cpu;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::ensure;

use super::cold_herd::added_over_leader;
use super::load::{closed_loop, herd};
use super::probes::{origin_set, origin_stats, OriginStats};
use super::start::{start_sized, Started};
use super::summary::{Counts, Seen};
use super::{client, progress, HttpClient, Mode, Sample, Setup};
use crate::report::RunReport;
use crate::scenario::Scenario;
use counters::Counters;

/// The commands that are calls of a Lua script: one round trip each, whatever the
/// script runs inside.
const SCRIPTS: [&str; 5] = ["evalsha", "eval", "evalsha_ro", "eval_ro", "fcall"];

/// Which phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    /// A: distinct-key misses on one instance.
    Single,
    /// B: distinct-key misses on the fleet.
    Fleet,
    /// C: hot-key herds on the fleet.
    Herds,
}

impl Which {
    fn as_str(self) -> &'static str {
        match self {
            Which::Single => "A: 1 instance, misses",
            Which::Fleet => "B: fleet, misses",
            Which::Herds => "C: fleet, hot-key herds",
        }
    }
}

/// Phases A and B take turns, this many each.
const TURNS: u32 = 4;

/// What one phase saw.
struct Phase {
    which: Which,
    instances: usize,
    samples: Vec<Sample>,
    /// How much later than their key's leader the waiters were answered (herds).
    added: Vec<Duration>,
    stats: OriginStats,
    /// From the phase's first request to its last answer (its charts' time axis).
    elapsed_ms: u64,
    /// The time its clients were sending (its own turns, for A and B).
    busy_ms: u64,
    /// The fleet's counters' growth over the phase; `None` without Redis (phase A).
    counters: Option<Counters>,
    /// CPU milliseconds used in the phase's turns by its corral processes, and by its
    /// Redis (one server; `NaN` for a cluster or none).
    corral_cpu_ms: f64,
    redis_cpu_ms: f64,
}

/// The three phases' reports and the findings against the targets.
pub(super) async fn run(
    scenario: &Scenario,
    setup: &Setup,
) -> anyhow::Result<(Vec<RunReport>, Vec<String>)> {
    ensure!(
        setup.targets.is_empty(),
        "fleet-scale starts its own instances: it takes no --target"
    );
    let client = client(scenario.concurrency.max(scenario.herd));
    let n = scenario.instances;
    let topology = scenario.redis.as_str();
    eprintln!("phases A and B in turns: 1 instance, then {n} on Redis ({topology}); distinct keys");
    let single = start_sized(scenario, setup, &Mode::protected(), 1).await?;
    let fleet = start_sized(scenario, setup, &Mode::protected(), n).await?;
    let (a, b) = misses(scenario, &single, &fleet, &client).await?;
    drop(single);

    eprintln!("phase C: {n} instances, {} hot-key herds", scenario.keys);
    let before_c = Counters::settled(&fleet, &client).await?;
    let c = herds(scenario, &fleet, &client, &b.stats, &before_c).await?;

    let a_rate = a.misses_per_s();
    let reports = [&a, &b, &c]
        .iter()
        .map(|p| p.report(scenario, a_rate))
        .collect();
    Ok((reports, findings(scenario, &a, &b, &c)))
}

/// Phases A and B: `concurrency` clients asking for distinct keys, each new, on the
/// single instance and on the fleet in turns of `duration` / [`TURNS`] each (both
/// running throughout, the one not loaded idle), so that whatever else loads the
/// machine meanwhile weighs on both alike. The fleet's counters grow in B's turns only.
async fn misses(
    scenario: &Scenario,
    single: &Started,
    fleet: &Started,
    client: &HttpClient,
) -> anyhow::Result<(Phase, Phase)> {
    let start = Counters::settled(fleet, client).await?;
    let (mut a, mut b) = (
        Phase::new(Which::Single, 1),
        Phase::new(Which::Fleet, fleet.proxies.len()),
    );
    let turn = scenario.duration / TURNS;
    let t0 = Instant::now();
    for round in 0..TURNS {
        for (phase, started) in [(&mut a, single), (&mut b, fleet)] {
            let which = phase.which;
            let path_of = move |i: u64| format!("/miss/{which:?}/{round}/{i}");
            let (proxies, concurrency) = (&started.proxies, scenario.concurrency);
            let (corral, redis) = (started.pids(), started.redis_pid());
            let cpu = (cpu::used_ms(&corral), cpu::used_ms(&redis));
            let begun = Instant::now();
            let samples = closed_loop(client, proxies, concurrency, turn, t0, path_of).await;
            phase.busy_ms += begun.elapsed().as_millis() as u64;
            phase.corral_cpu_ms += cpu::used_ms(&corral) - cpu.0;
            phase.redis_cpu_ms += cpu::used_ms(&redis) - cpu.1;
            phase.samples.extend(samples);
        }
    }
    b.counters = Some(Counters::settled(fleet, client).await?.since(&start));
    for (phase, started) in [(&mut a, single), (&mut b, fleet)] {
        phase.elapsed_ms = t0.elapsed().as_millis() as u64;
        phase.stats = origin_stats(client, started.origin).await?;
    }
    Ok((a, b))
}

/// Phase C: a herd per hot key, one key after another, from a slowed origin. The
/// origin counted phase B's requests too (`before`): they are left out.
async fn herds(
    scenario: &Scenario,
    fleet: &Started,
    client: &HttpClient,
    before: &OriginStats,
    start: &Counters,
) -> anyhow::Result<Phase> {
    let delay = format!("delay={}ms", scenario.herd_delay.as_millis());
    origin_set(client, fleet.origin, &delay).await?;
    let bar = progress((scenario.keys * scenario.herd) as u64, Some(true));
    let t0 = Instant::now();
    let (mut samples, mut added) = (Vec::new(), Vec::new());
    for k in 0..scenario.keys {
        let path = format!("/hot/{k}");
        let batch = herd(client, &fleet.proxies, &path, scenario.herd, t0, &bar).await;
        added.extend(added_over_leader(&batch, false));
        samples.extend(batch);
    }
    bar.finish();
    let elapsed_ms = t0.elapsed().as_millis() as u64;
    let counters = Counters::settled(fleet, client).await?.since(start);
    Ok(Phase {
        which: Which::Herds,
        instances: fleet.proxies.len(),
        samples,
        added,
        stats: origin_stats(client, fleet.origin).await?.after(before),
        elapsed_ms,
        busy_ms: elapsed_ms,
        counters: Some(counters),
        corral_cpu_ms: f64::NAN,
        redis_cpu_ms: f64::NAN,
    })
}

impl Phase {
    fn new(which: Which, instances: usize) -> Phase {
        Phase {
            which,
            instances,
            samples: Vec::new(),
            added: Vec::new(),
            stats: OriginStats::default(),
            elapsed_ms: 0,
            busy_ms: 0,
            counters: None,
            corral_cpu_ms: 0.0,
            redis_cpu_ms: 0.0,
        }
    }

    fn herds(&self) -> bool {
        self.which == Which::Herds
    }

    /// Upstream requests (fills: every one a miss) for the phase's paths.
    fn fills(&self) -> f64 {
        Counts::of(&self.samples, &self.stats).upstream_requests as f64
    }

    fn misses_per_s(&self) -> f64 {
        self.fills() / (self.busy_ms as f64 / 1000.0).max(0.001)
    }

    /// Per fill, from the counters; NaN without them (no Redis).
    fn per_fill(&self, of: impl Fn(&Counters) -> f64) -> f64 {
        self.counters
            .as_ref()
            .map_or(f64::NAN, |c| of(c) / self.fills().max(1.0))
    }

    /// The phase's row: the common figures, then this scenario's (NaN where one does
    /// not apply: throughput for the herds, Redis for the single instance).
    fn report(&self, scenario: &Scenario, a_rate: f64) -> RunReport {
        let (rate, ratio) = if self.herds() {
            (f64::NAN, f64::NAN)
        } else {
            let rate = self.misses_per_s();
            (rate, rate / a_rate.max(f64::MIN_POSITIVE))
        };
        let waiting = if self.herds() {
            self.other_instances_waiting()
        } else {
            f64::NAN
        };
        let figures = vec![
            ("misses/s".into(), rate),
            ("x one instance".into(), ratio),
            (
                "Redis round trips / miss".into(),
                self.per_fill(|c| c.round_trips),
            ),
            (
                "Redis script calls / miss".into(),
                self.per_fill(|c| c.calls(&SCRIPTS) as f64),
            ),
            (
                "Redis commands / miss".into(),
                self.per_fill(|c| c.commands.values().sum::<u64>() as f64),
            ),
            ("messages / fill".into(), self.per_fill(|c| c.events)),
            (
                "Redis errors".into(),
                self.counters.as_ref().map_or(f64::NAN, |c| c.errors),
            ),
            ("other instances waiting / key".into(), waiting),
            (
                "corral CPU µs / miss".into(),
                self.cpu_per_miss(self.corral_cpu_ms),
            ),
            ("Redis CPU µs / miss".into(), self.redis_cpu_per_miss()),
        ];
        let counts = Counts::of(&self.samples, &self.stats);
        let seen = Seen {
            scenario,
            samples: &self.samples,
            counts: &counts,
            stats: &self.stats,
            elapsed_ms: self.elapsed_ms,
            fleet_cap: None,
        };
        let mut report = seen.report(Some(true), self.instances, self.added.clone(), figures);
        report.phase = Some(self.which.as_str().into());
        if self.herds() {
            report.concurrency = scenario.herd;
            report.upstream_delay_ms = scenario.herd_delay.as_millis() as u64;
        }
        report
    }

    /// Microseconds of `cpu_ms` per miss (phases A and B).
    fn cpu_per_miss(&self, cpu_ms: f64) -> f64 {
        if self.herds() {
            return f64::NAN;
        }
        cpu_ms * 1000.0 / self.fills().max(1.0)
    }

    /// Phase A has no Redis; a cluster's nodes are not counted.
    fn redis_cpu_per_miss(&self) -> f64 {
        match self.which {
            Which::Fleet if self.redis_cpu_ms > 0.0 => self.cpu_per_miss(self.redis_cpu_ms),
            _ => f64::NAN,
        }
    }

    /// Per key, how many instances other than the leader's had waiters: those a fill
    /// must tell.
    fn other_instances_waiting(&self) -> f64 {
        let mut leader: HashMap<&str, usize> = HashMap::new();
        let mut waiting: HashMap<&str, HashSet<usize>> = HashMap::new();
        for s in &self.samples {
            if s.cache_status.contains("collapsed") {
                waiting.entry(&s.path).or_default().insert(s.instance);
            } else if s.cache_status.contains("fwd=miss") {
                leader.insert(&s.path, s.instance);
            }
        }
        let keys: HashSet<&str> = self.samples.iter().map(|s| s.path.as_str()).collect();
        let others: usize = waiting
            .iter()
            .map(|(path, on)| {
                on.len() - leader.get(path).map_or(0, |l| usize::from(on.contains(l)))
            })
            .sum();
        others as f64 / keys.len().max(1) as f64
    }

    /// Redis's own count per miss, most called first: `getrange 1.00, evalsha 2.00, ...`.
    fn commandstats(&self) -> String {
        let Some(counters) = &self.counters else {
            return String::new();
        };
        let fills = self.fills().max(1.0);
        let each = counters.by_calls().into_iter().take(12);
        let each = each.map(|(name, calls)| format!("{name} {:.2}", calls as f64 / fills));
        each.collect::<Vec<_>>().join(", ")
    }
}

/// The figures in sentences, each against the target.
fn findings(scenario: &Scenario, a: &Phase, b: &Phase, c: &Phase) -> Vec<String> {
    let (n, topology) = (scenario.instances, scenario.redis.as_str());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rate_b = b.misses_per_s();
    let per_miss = |of: &dyn Fn(&Counters) -> f64| b.per_fill(of);
    let counts_c = Counts::of(&c.samples, &c.stats);
    let per_key = counts_c.upstream_requests as f64 / scenario.keys.max(1) as f64;
    vec![
        format!(
            "Fleet miss throughput: {rate_b:.0} misses/s on {n} instances (Redis: {topology}) vs {:.0} on one instance: {:.2}x (target >= 0.8). {} clients, distinct keys, origin delay {}; both phases on this machine's {cores} cores, shared with the clients, the origin and Redis.",
            a.misses_per_s(),
            rate_b / a.misses_per_s().max(f64::MIN_POSITIVE),
            scenario.concurrency,
            humantime::format_duration(scenario.upstream_delay),
        ),
        format!(
            "Redis round trips per uncontended miss (phase B, corral's {}): {:.2} (target <= 3). Redis's INFO commandstats per miss (calls; a script's commands counted under their own names as well as the script call): {}. Script calls per miss: {:.2}. Redis commands that failed or timed out (corral_redis_errors_total): {:.0} (a miss that meets a failing or slow Redis may make fewer calls).",
            "corral_redis_round_trips_total",
            per_miss(&|c| c.round_trips),
            b.commandstats(),
            per_miss(&|c| c.calls(&SCRIPTS) as f64),
            b.counters.as_ref().map_or(0.0, |c| c.errors),
        ),
        format!(
            "CPU per miss (from /proc, the phases' turns only): corral's own processes {:.1} µs on one instance, {:.1} µs summed over the {n} instances ({:.2}x; the fleet's figure includes what {n} runtimes cost when idle); Redis {:.1} µs (one server; not counted for a cluster).",
            a.cpu_per_miss(a.corral_cpu_ms),
            b.cpu_per_miss(b.corral_cpu_ms),
            b.cpu_per_miss(b.corral_cpu_ms) / a.cpu_per_miss(a.corral_cpu_ms).max(f64::MIN_POSITIVE),
            b.redis_cpu_per_miss(),
        ),
        format!(
            "Messages delivered per uncontended fill (phase B, corral_fleet_events_received_total over the {n} instances): {:.2} (target ~0).",
            per_miss(&|c| c.events),
        ),
        format!(
            "Hot keys (phase C): {} keys, each asked by {} clients at once across {n} instances, origin delay {}: {per_key:.2} upstream requests per key (max {}); {:.2} messages per fill for {:.2} other instances waiting per key; {:.2} Redis round trips per fill. Commandstats per fill: {}.",
            scenario.keys,
            scenario.herd,
            humantime::format_duration(scenario.herd_delay),
            counts_c.per_key.iter().max().copied().unwrap_or(0),
            c.per_fill(|c| c.events),
            c.other_instances_waiting(),
            c.per_fill(|c| c.round_trips),
            c.commandstats(),
        ),
    ]
}
