//! Opening the connections to Redis: the command connection, opened again whenever a
//! command finds it broken, and the listening connection (RESP3 pushes, on a
//! connection of its own: see `subscriptions`). Each to one Redis or to a cluster.

use std::sync::{Arc, Weak};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{ProtocolVersion, PushInfo};
use tokio::sync::mpsc;

use super::commands::Commands;
use super::subscriptions::Listener;
use super::Redis;
use crate::config::RedisSettings;

/// Keeps the command connection up: opens it, and opens a new one whenever a command
/// found it broken (`broken` is notified). Until then commands are skipped, which is
/// single-instance behaviour.
pub(super) async fn connect(fleet: Weak<Redis>) {
    tokio::spawn(super::subscriptions::listen(fleet.clone()));
    loop {
        let Some(f) = fleet.upgrade() else { return };
        let (settings, metrics, broken) =
            (f.settings.clone(), f.metrics.clone(), Arc::clone(&f.broken));
        let connected = f.conn.read().unwrap_or_else(|e| e.into_inner()).is_some();
        drop(f);
        if connected {
            broken.notified().await;
            continue;
        }
        match open(&settings).await {
            Ok(conn) => {
                let Some(f) = fleet.upgrade() else { return };
                *f.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(conn);
                f.health.success(&metrics);
                tracing::info!(redis = %described(&settings), "connected to redis");
            }
            Err(error) => {
                if let Some(f) = fleet.upgrade() {
                    f.health.failure("connect", &error, &metrics, None);
                }
                tokio::time::sleep(settings.retry_after).await;
            }
        }
    }
}

fn connection_config(settings: &RedisSettings) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(settings.command_timeout))
        .set_number_of_retries(1)
        .set_max_delay(settings.retry_after)
}

/// The cluster client: redis-rs follows `MOVED`/`ASK` and rides out `TRYAGAIN` and
/// `CLUSTERDOWN` with a few quick retries (its defaults wait 1.28 s and more between
/// up to 16 attempts, far beyond a request's patience), every node request bounded by
/// the command timeout. corral's own timeout and breaker stay around each call.
fn cluster_client(
    settings: &RedisSettings,
    push: Option<mpsc::UnboundedSender<PushInfo>>,
) -> redis::RedisResult<redis::cluster::ClusterClient> {
    let builder = ClusterClientBuilder::new(settings.cluster.iter().map(String::as_str))
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(200)
        .connection_timeout(settings.connect_timeout);
    match push {
        None => builder
            .response_timeout(settings.command_timeout)
            .overall_response_timeout(Some(settings.command_timeout)),
        // The listener: no response timeout of redis-rs's. corral bounds each
        // subscription itself, and a slow answer under load is then never taken by
        // redis-rs for a dead node whose connection, replaced while it still holds
        // subscriptions, could deliver a message twice (the likely cause of one
        // duplicate delivery seen on a loaded machine).
        Some(sender) => builder
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(sender),
    }
    .build()
}

pub(super) async fn open(settings: &RedisSettings) -> redis::RedisResult<Commands> {
    if settings.is_cluster() {
        let client = cluster_client(settings, None)?;
        return Ok(Commands::Cluster(client.get_async_connection().await?));
    }
    let client = redis::Client::open(settings.url.as_str())?;
    let conn = client
        .get_connection_manager_with_config(connection_config(settings))
        .await?;
    Ok(Commands::Single(conn))
}

/// The listening connection: RESP3, its pushes (messages, subscription changes,
/// disconnections) sent to `sender`.
pub(super) async fn open_listener(
    settings: &RedisSettings,
    sender: mpsc::UnboundedSender<PushInfo>,
) -> redis::RedisResult<Listener> {
    if settings.is_cluster() {
        let client = cluster_client(settings, Some(sender))?;
        return Ok(Listener::Cluster(client.get_async_connection().await?));
    }
    let info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())?;
    let redis_settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let client = redis::Client::open(info.set_redis_settings(redis_settings))?;
    let config = connection_config(settings)
        .set_push_sender(sender)
        .set_response_timeout(None);
    let conn: ConnectionManager = client.get_connection_manager_with_config(config).await?;
    Ok(Listener::Single(conn))
}

/// Whether a command failed on the value it met (another type under the key, a reply
/// of an unexpected shape) rather than on Redis: no outage, nothing to back off from.
/// (A reply that does not convert, such as a non-UTF-8 string read as `String`, is a
/// parse error, which redis-rs also uses for a broken protocol: read such values as
/// bytes.)
pub(super) fn about_one_value(error: &redis::RedisError) -> bool {
    error.code() == Some("WRONGTYPE") || error.kind() == redis::ErrorKind::UnexpectedReturnType
}

/// Where the cache's Redis is, without passwords, for logs.
pub(super) fn described(settings: &RedisSettings) -> String {
    if settings.is_cluster() {
        let seeds: Vec<String> = settings.cluster.iter().map(|s| redacted(s)).collect();
        format!("cluster [{}]", seeds.join(", "))
    } else {
        redacted(&settings.url)
    }
}

/// The URL without its password, for logs.
pub(super) fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("redis://:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redacted("redis://host:6379"), "redis://host:6379");
        let cluster =
            RedisSettings::new_cluster(vec!["redis://:s1@a:1".into(), "redis://b:2".into()]);
        assert_eq!(
            described(&cluster),
            "cluster [redis://***@a:1, redis://b:2]"
        );
    }
}
