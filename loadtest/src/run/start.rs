//! The processes of one run: the origin, Redis for fleets and the corral instances,
//! started from the scenario (or the `--target` proxies given instead).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::bail;
use corral_testkit::{RedisCluster, RedisOptions, RedisServer};

use super::{Mode, Setup};
use crate::scenario::{Scenario, Topology};
use crate::supervise::{self, Instance, Process};

/// The origin, Redis and corral processes of one run; all killed when dropped.
pub(super) struct Started {
    pub(super) _origin: Process,
    pub(super) origin: SocketAddr,
    /// Redis for fleets; the outage fault takes the process out and puts a new one in.
    pub(super) redis: Option<(Arc<std::sync::Mutex<Option<RedisServer>>>, SocketAddr)>,
    /// The Redis Cluster of fleets with `redis = "cluster"`.
    pub(super) cluster: Option<RedisCluster>,
    pub(super) instances: Vec<Instance>,
    pub(super) proxies: Vec<SocketAddr>,
}

impl Started {
    /// The process ids of its corral instances.
    pub(super) fn pids(&self) -> Vec<u32> {
        self.instances.iter().map(|i| i.process.pid()).collect()
    }

    /// The process id of its one Redis, if it has one (not a cluster's nodes).
    pub(super) fn redis_pid(&self) -> Vec<u32> {
        let Some((server, _)) = &self.redis else {
            return Vec::new();
        };
        let server = server.lock().unwrap_or_else(|e| e.into_inner());
        server.as_ref().and_then(|s| s.pid()).into_iter().collect()
    }
}

pub(super) async fn start(
    scenario: &Scenario,
    setup: &Setup,
    mode: &Mode,
) -> anyhow::Result<Started> {
    start_sized(scenario, setup, mode, scenario.instances).await
}

/// [`start`] with `instances` corral instances instead of the scenario's (a fleet, sharing
/// the scenario's Redis topology, when more than one).
pub(super) async fn start_sized(
    scenario: &Scenario,
    setup: &Setup,
    mode: &Mode,
    instances: usize,
) -> anyhow::Result<Started> {
    let protection = mode.protection;
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
            cluster: None,
            instances: Vec::new(),
            proxies: setup.targets.clone(),
        });
    };
    let mut config = format!(
        "[cache]\nmax_bytes = {:?}\nmax_object_bytes = \"1MiB\"\n[lock]\nttl = \"{}\"\nwait_timeout = \"30s\"\n",
        scenario.local_cache,
        humantime::format_duration(scenario.lock_ttl)
    );
    let (mut redis, mut cluster) = (None, None);
    match scenario.redis {
        _ if instances < 2 => {}
        Topology::None => {}
        Topology::Single => {
            let process = RedisServer::spawn(RedisOptions::default())?;
            let addr = process.addr();
            config.push_str(&format!(
                "[redis]\nurl = \"redis://{addr}\"\nretry_after = \"500ms\"\n"
            ));
            redis = Some((Arc::new(std::sync::Mutex::new(Some(process))), addr));
        }
        Topology::Cluster => {
            let started = start_cluster().await?;
            let seeds: Vec<String> = started.seeds().iter().map(|s| format!("{s:?}")).collect();
            config.push_str(&format!(
                "[redis]\ncluster = [{}]\nretry_after = \"500ms\"\n",
                seeds.join(", ")
            ));
            cluster = Some(started);
        }
    }
    config.push_str(&format!(
        "[[route]]\nname = \"loadtest\"\nupstream = \"http://{origin}\"\ncoalesce = {protection}\nresponse_timeout = \"{}\"\n{}",
        humantime::format_duration(scenario.response_timeout),
        mode.route
    ));
    // Generated configs hold this run's ports: scratch, not part of the report. A dir
    // per start, as fleet-scale runs two sets of instances at once.
    static STARTS: AtomicUsize = AtomicUsize::new(0);
    let dir = super::scratch_dir().join(STARTS.fetch_add(1, Ordering::Relaxed).to_string());
    let mut started = Vec::new();
    for i in 0..instances {
        started.push(supervise::corral(&config, &dir, i)?);
    }
    let proxies = started.iter().map(|i| i.addr).collect();
    Ok(Started {
        _origin: origin_process,
        origin,
        redis,
        cluster,
        instances: started,
        proxies,
    })
}

/// 3 masters with a replica each. The launcher panics when it cannot start one (as the
/// tests want): check first what it needs, to report an error instead.
async fn start_cluster() -> anyhow::Result<RedisCluster> {
    let cli = std::process::Command::new("redis-cli")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !corral_testkit::redis::installed() || !cli {
        bail!(
            "redis = \"cluster\" needs redis-server and redis-cli (Debian's redis-server package)"
        );
    }
    Ok(RedisCluster::start(3, 1).await)
}

/// Starts the scenario's processes with protection on and leaves them running until
/// the returned value is dropped (the demo's "try it yourself").
pub async fn serve(scenario: &Scenario, setup: &Setup) -> anyhow::Result<Running> {
    let started = start(scenario, setup, &Mode::protected()).await?;
    Ok(Running {
        proxies: started.proxies.clone(),
        admins: started.instances.iter().map(|i| i.admin).collect(),
        _started: started,
    })
}

/// Processes kept running for the user; killed when dropped.
pub struct Running {
    pub proxies: Vec<SocketAddr>,
    /// Each instance's admin listener (metrics, health, purges).
    pub admins: Vec<SocketAddr>,
    _started: Started,
}
