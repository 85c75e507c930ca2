//! The processes of one run: the origin, Redis for fleets and the corral instances,
//! started from the scenario (or the `--target` proxies given instead).

use std::net::SocketAddr;
use std::sync::Arc;

use corral_testkit::{RedisOptions, RedisServer};

use super::Setup;
use crate::scenario::Scenario;
use crate::supervise::{self, Instance, Process};

/// The origin, Redis and corral processes of one run; all killed when dropped.
pub(super) struct Started {
    pub(super) _origin: Process,
    pub(super) origin: SocketAddr,
    /// Redis for fleets; the outage fault takes the process out and puts a new one in.
    pub(super) redis: Option<(Arc<std::sync::Mutex<Option<RedisServer>>>, SocketAddr)>,
    pub(super) instances: Vec<Instance>,
    pub(super) proxies: Vec<SocketAddr>,
}

pub(super) fn start(
    scenario: &Scenario,
    setup: &Setup,
    protection: Option<bool>,
) -> anyhow::Result<Started> {
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
        let process = RedisServer::spawn(RedisOptions::default())?;
        let addr = process.addr();
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
