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
}

/// Command-line overrides of a scenario's settings.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub instances: Option<usize>,
    pub concurrency: Option<usize>,
    pub upstream_delay: Option<Duration>,
    pub protection: Option<Protection>,
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
        };
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
        if !(1..=1000).contains(&scenario.keys) {
            bail!("keys must be 1 to 1000, not {}", scenario.keys);
        }
        if scenario.upstream_delay > Duration::from_secs(30) {
            bail!("upstream_delay must be at most 30s");
        }
        Ok(scenario)
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
