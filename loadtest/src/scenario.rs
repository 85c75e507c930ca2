//! Scenario files: what a run starts and sends, read from TOML and overridable from
//! the command line.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// Which measurement a scenario makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// K cold keys, each hit by C concurrent clients across N instances.
    ColdHerd,
    /// A steady rate on a few hot keys with a short TTL.
    ExpiryUnderLoad,
    /// Many keys with Zipf popularity, a local cache smaller than the working set.
    Zipf,
    /// The instance holding a key's lock is SIGKILLed mid-fetch.
    HolderCrash,
    /// Redis is stopped for a while under load.
    RedisOutage,
    /// The upstream fails (500s, then timeouts) for a while under load.
    UpstreamOutage,
    /// Distinct-key misses on one instance, then on a fleet; then hot-key herds on the
    /// fleet: miss throughput, Redis round trips per miss, messages per fill.
    FleetScale,
    /// Many distinct cold keys at once (a restart, a flush, a crawler): the origin's
    /// peak concurrency, with and without upstream caps.
    ColdRestart,
}

/// The Redis a fleet shares: one redis-server, a Redis Cluster (3 masters with a
/// replica each), or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    Single,
    Cluster,
    /// No Redis: the instances run independently (for fleet-scale, what many
    /// instances on one machine cost without any coordination).
    None,
}

impl Topology {
    pub fn as_str(self) -> &'static str {
        match self {
            Topology::Single => "single",
            Topology::Cluster => "cluster",
            Topology::None => "none",
        }
    }
}

/// Whether corral runs with its fill lock and coalescing, without, or both in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protection {
    On,
    Off,
    Both,
}

impl Protection {
    pub fn runs(self) -> &'static [bool] {
        match self {
            Protection::On => &[true],
            Protection::Off => &[false],
            Protection::Both => &[true, false],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: String,
    kind: Kind,
    #[serde(default = "one")]
    instances: usize,
    #[serde(default = "one")]
    keys: usize,
    concurrency: usize,
    #[serde(default = "delay")]
    upstream_delay: String,
    #[serde(default = "both")]
    protection: Protection,
    rate: Option<u32>,
    duration: Option<String>,
    cache_control: Option<String>,
    zipf_exponent: Option<f64>,
    local_cache: Option<String>,
    body_size: Option<usize>,
    fault_after: Option<String>,
    fault_for: Option<String>,
    lock_ttl: Option<String>,
    response_timeout: Option<String>,
    redis: Option<Topology>,
    herd: Option<usize>,
    herd_delay: Option<String>,
    early_refresh: Option<Protection>,
    caps: Option<Protection>,
    fleet_cap: Option<u32>,
}

fn duration_of(what: &str, value: Option<&String>, default: &str) -> anyhow::Result<Duration> {
    let text = value.map_or(default, String::as_str);
    humantime::parse_duration(text).with_context(|| format!("{what} {text:?}"))
}

fn one() -> usize {
    1
}

fn delay() -> String {
    "200ms".into()
}

fn both() -> Protection {
    Protection::Both
}

/// A validated scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub kind: Kind,
    pub instances: usize,
    pub keys: usize,
    pub concurrency: usize,
    pub upstream_delay: Duration,
    pub protection: Protection,
    /// Requests per second, for the steady-load kinds.
    pub rate: u32,
    pub duration: Duration,
    /// The origin's `Cache-Control`.
    pub cache_control: String,
    pub zipf_exponent: f64,
    /// corral's local cache size (`[cache] max_bytes`).
    pub local_cache: String,
    pub body_size: usize,
    pub fault_after: Duration,
    pub fault_for: Duration,
    pub lock_ttl: Duration,
    pub response_timeout: Duration,
    /// What the fleet shares (fleets only).
    pub redis: Topology,
    /// `fleet-scale`: concurrent clients per hot key.
    pub herd: usize,
    /// `fleet-scale`: the origin's delay during the hot-key herds, so that a herd forms.
    pub herd_delay: Duration,
    /// Runs with corral's early refresh on, off, or both (then instead of protection
    /// on and off); `None`: corral's default (on).
    pub early_refresh: Option<Protection>,
    /// Runs with the upstream caps on, off, or both (then instead of protection on
    /// and off).
    pub caps: Option<Protection>,
    /// The route's `fleet_upstream_concurrency` when caps are on.
    pub fleet_cap: u32,
}

impl Scenario {
    /// The origin's max-age, in seconds, if its `Cache-Control` has one.
    pub fn max_age(&self) -> Option<f64> {
        self.cache_control
            .split(',')
            .find_map(|d| d.trim().strip_prefix("max-age=")?.parse().ok())
    }
}

/// Command-line overrides of a scenario's settings.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub instances: Option<usize>,
    pub concurrency: Option<usize>,
    pub upstream_delay: Option<Duration>,
    pub protection: Option<Protection>,
    pub duration: Option<Duration>,
    pub redis: Option<Topology>,
}

impl Scenario {
    pub fn load(path: &Path, overrides: &Overrides) -> anyhow::Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Scenario::parse(&text, overrides).with_context(|| format!("in scenario {}", path.display()))
    }

    pub fn parse(text: &str, overrides: &Overrides) -> anyhow::Result<Scenario> {
        let file: File = toml::from_str(text)?;
        let scenario = Scenario {
            name: file.name,
            kind: file.kind,
            instances: overrides.instances.unwrap_or(file.instances),
            keys: file.keys,
            concurrency: overrides.concurrency.unwrap_or(file.concurrency),
            upstream_delay: match overrides.upstream_delay {
                Some(d) => d,
                None => humantime::parse_duration(&file.upstream_delay)
                    .with_context(|| format!("upstream_delay {:?}", file.upstream_delay))?,
            },
            protection: overrides.protection.unwrap_or(file.protection),
            rate: file.rate.unwrap_or(200),
            duration: match overrides.duration {
                Some(d) => d,
                None => duration_of("duration", file.duration.as_ref(), "10s")?,
            },
            cache_control: file.cache_control.unwrap_or_else(|| "max-age=60".into()),
            zipf_exponent: file.zipf_exponent.unwrap_or(1.0),
            local_cache: file.local_cache.unwrap_or_else(|| "256MiB".into()),
            body_size: file.body_size.unwrap_or(1024),
            fault_after: duration_of("fault_after", file.fault_after.as_ref(), "2s")?,
            fault_for: duration_of("fault_for", file.fault_for.as_ref(), "3s")?,
            lock_ttl: duration_of("lock_ttl", file.lock_ttl.as_ref(), "10s")?,
            response_timeout: duration_of(
                "response_timeout",
                file.response_timeout.as_ref(),
                "30s",
            )?,
            redis: overrides.redis.or(file.redis).unwrap_or(Topology::Single),
            herd: file.herd.unwrap_or(200),
            herd_delay: duration_of("herd_delay", file.herd_delay.as_ref(), "100ms")?,
            early_refresh: file.early_refresh,
            caps: file.caps,
            fleet_cap: file.fleet_cap.unwrap_or(50),
        };
        scenario.check()?;
        Ok(scenario)
    }

    /// Refuses settings out of bounds (every run must end by itself) or that do not
    /// fit the kind.
    fn check(&self) -> anyhow::Result<()> {
        let scenario = self;
        if !(1..=5000).contains(&scenario.rate) {
            bail!(
                "rate must be 1 to 5000 requests per second, not {}",
                scenario.rate
            );
        }
        if scenario.duration > Duration::from_secs(120) || scenario.duration.is_zero() {
            bail!("duration must be more than 0 and at most 120s");
        }
        let outage = matches!(scenario.kind, Kind::RedisOutage | Kind::UpstreamOutage);
        if outage && scenario.fault_after + scenario.fault_for >= scenario.duration {
            bail!("the fault (fault_after + fault_for) must end before the run (duration)");
        }
        let fleet_kinds = [Kind::RedisOutage, Kind::HolderCrash, Kind::FleetScale];
        if fleet_kinds.contains(&scenario.kind) && scenario.instances < 2 {
            bail!("{:?} needs at least 2 instances", scenario.kind);
        }
        if scenario.kind == Kind::RedisOutage && scenario.redis == Topology::Cluster {
            bail!("redis-outage stops one redis-server: it needs redis = \"single\"");
        }
        if !(1..=2000).contains(&scenario.herd) {
            bail!("herd must be 1 to 2000 clients, not {}", scenario.herd);
        }
        if !(0.0..=5.0).contains(&scenario.zipf_exponent) {
            bail!("zipf_exponent must be between 0 and 5");
        }
        // Bounded runs only: every loop stops by itself.
        if !(1..=16).contains(&scenario.instances) {
            bail!("instances must be 1 to 16, not {}", scenario.instances);
        }
        if !(1..=2000).contains(&scenario.concurrency) {
            bail!(
                "concurrency must be 1 to 2000, not {}",
                scenario.concurrency
            );
        }
        if !(1..=100_000).contains(&scenario.fleet_cap) {
            bail!("fleet_cap must be 1 to 100000, not {}", scenario.fleet_cap);
        }
        if !(1..=100_000).contains(&scenario.keys) {
            bail!("keys must be 1 to 100000, not {}", scenario.keys);
        }
        if scenario.upstream_delay.max(scenario.herd_delay) > Duration::from_secs(30) {
            bail!("upstream_delay and herd_delay must be at most 30s");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COLD: &str =
        "name = \"cold\"\nkind = \"cold-herd\"\ninstances = 3\nkeys = 4\nconcurrency = 100\n";

    #[test]
    fn scenario_with_defaults_and_overrides() {
        let s = Scenario::parse(COLD, &Overrides::default()).unwrap();
        assert_eq!((s.instances, s.keys, s.concurrency), (3, 4, 100));
        assert_eq!(s.upstream_delay, Duration::from_millis(200));
        assert_eq!(s.protection, Protection::Both);
        let o = Overrides {
            instances: Some(1),
            upstream_delay: Some(Duration::from_millis(50)),
            ..Overrides::default()
        };
        let s = Scenario::parse(COLD, &o).unwrap();
        assert_eq!(
            (s.instances, s.upstream_delay),
            (1, Duration::from_millis(50))
        );
    }

    #[test]
    fn unbounded_or_unknown_settings_are_refused() {
        assert!(Scenario::parse(&COLD.replace("100", "100000"), &Overrides::default()).is_err());
        assert!(Scenario::parse(&format!("{COLD}surprise = 1\n"), &Overrides::default()).is_err());
        assert!(Scenario::parse(
            &COLD.replace("cold-herd", "warm-herd"),
            &Overrides::default()
        )
        .is_err());
    }

    #[test]
    fn redis_topology_from_file_or_command_line() {
        let s = Scenario::parse(COLD, &Overrides::default()).unwrap();
        assert_eq!(s.redis, Topology::Single);
        let text = format!("{COLD}redis = \"cluster\"\n");
        assert_eq!(
            Scenario::parse(&text, &Overrides::default()).unwrap().redis,
            Topology::Cluster
        );
        let o = Overrides {
            redis: Some(Topology::Single),
            ..Overrides::default()
        };
        assert_eq!(Scenario::parse(&text, &o).unwrap().redis, Topology::Single);
        let outage = text.replace("cold-herd", "redis-outage");
        assert!(
            Scenario::parse(&outage, &Overrides::default()).is_err(),
            "the outage stops one redis-server"
        );
    }

    #[test]
    fn every_scenario_file_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            Scenario::load(&entry.unwrap().path(), &Overrides::default()).unwrap();
            n += 1;
        }
        assert!(n >= 1);
    }
}
