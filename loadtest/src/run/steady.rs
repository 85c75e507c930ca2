//! The steady-load scenarios (`expiry-under-load`, `zipf`, `redis-outage`,
//! `upstream-outage`): which path each request asks for, and the fault on its schedule.

use std::time::Instant;

use anyhow::Context;
use corral_testkit::{RedisOptions, RedisServer};
use tokio::task::JoinHandle;

use super::load::steady;
use super::probes::origin_set;
use super::start::Started;
use super::zipf::Zipf;
use super::{HttpClient, Load};
use crate::scenario::{Kind, Scenario};

pub(super) async fn load(
    scenario: &Scenario,
    started: &Started,
    client: &HttpClient,
    run: usize,
    t0: Instant,
    protection: Option<bool>,
) -> anyhow::Result<Load> {
    let kind = scenario.kind;
    let keys = scenario.keys as u64;
    let zipf = (kind == Kind::Zipf).then(|| Zipf::new(scenario.keys, scenario.zipf_exponent));
    let per_key = (2 * started.proxies.len()) as u64;
    let path_of = move |i: u64| match kind {
        Kind::Zipf => format!("/zipf/{run}/{}", zipf.as_ref().map_or(0, Zipf::sample)),
        // Each key is cold once and then asked a few times across instances, so
        // misses keep happening all through the Redis outage.
        Kind::RedisOutage => format!("/fresh/{run}/{}", i / per_key),
        // Every request a key of its own, cold.
        Kind::ColdRestart => format!("/cold/{run}/{i}"),
        _ => format!("/hot/{run}/{}", i % keys),
    };
    let fault = spawn_fault(scenario, started, client);
    let samples = steady(client, &started.proxies, scenario, t0, protection, path_of).await;
    if let Some(fault) = fault {
        fault.await.context("fault task")??;
    }
    Ok(Load {
        samples,
        added: Vec::new(),
        figures: Vec::new(),
    })
}

/// The scenario's fault, on its schedule: the upstream failing (500s, then timeouts),
/// or Redis going away and coming back on the same port.
fn spawn_fault(
    scenario: &Scenario,
    started: &Started,
    client: &HttpClient,
) -> Option<JoinHandle<anyhow::Result<()>>> {
    let (after, length) = (scenario.fault_after, scenario.fault_for);
    match scenario.kind {
        Kind::UpstreamOutage => {
            let (client, origin) = (client.clone(), started.origin);
            // Milliseconds: a formatted duration may hold a space, which a URI may not.
            let hang = format!("{}ms", (scenario.response_timeout * 3).as_millis());
            let normal = format!("{}ms", scenario.upstream_delay.as_millis());
            Some(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                origin_set(&client, origin, "status=500").await?;
                tokio::time::sleep(length / 2).await;
                origin_set(&client, origin, &format!("status=200&delay={hang}")).await?;
                tokio::time::sleep(length / 2).await;
                origin_set(&client, origin, &format!("delay={normal}")).await
            }))
        }
        Kind::RedisOutage => {
            let (slot, addr) = started.redis.clone()?;
            Some(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                drop(slot.lock().unwrap_or_else(|e| e.into_inner()).take()); // SIGKILL
                tokio::time::sleep(length).await;
                let options = RedisOptions::on_port(addr.port());
                let process =
                    tokio::task::spawn_blocking(move || RedisServer::spawn(options)).await??;
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(process);
                Ok(())
            }))
        }
        _ => None,
    }
}
