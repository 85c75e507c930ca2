//! The connections to Redis: the command connection, opened again whenever a command
//! finds it broken, and the event subscription (RESP3 pushes on a connection of its
//! own), opened again after every disconnection.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::Redis;
use crate::config::RedisSettings;

/// Keeps the command connection up: opens it, and opens a new one whenever a command
/// found it broken (`broken` is notified). Until then commands are skipped, which is
/// single-instance behaviour.
pub(super) async fn connect(fleet: Weak<Redis>) {
    tokio::spawn(listen(fleet.clone()));
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
                tracing::info!(url = %redacted(&settings.url), "connected to redis");
            }
            Err(error) => {
                if let Some(f) = fleet.upgrade() {
                    f.health.failure("connect", &error, &metrics);
                }
                tokio::time::sleep(settings.retry_after).await;
            }
        }
    }
}

/// Keeps the event subscription up: RESP3 push messages on a connection of its own,
/// opened again after every disconnection.
async fn listen(fleet: Weak<Redis>) {
    loop {
        let Some(f) = fleet.upgrade() else { return };
        let settings = f.settings.clone();
        let channel = f.channel();
        drop(f);
        let (sender, mut pushes) = mpsc::unbounded_channel::<PushInfo>();
        if let Ok(events) = open_events(&settings, sender, &channel).await {
            if let Some(f) = fleet.upgrade() {
                f.subscribed.store(true, Ordering::Release);
            }
            while let Some(push) = pushes.recv().await {
                let Some(f) = fleet.upgrade() else { return };
                match push.kind {
                    PushKind::Message => match push.data.get(1) {
                        Some(Value::BulkString(payload)) => f.dispatch(payload),
                        _ => f.metrics.event_ignored(),
                    },
                    // Messages sent meanwhile are lost: wake every waiter to re-check
                    // (and, Redis being gone, fall back) instead of sleeping out a TTL.
                    PushKind::Disconnection => {
                        f.waiters.wake_all();
                        break;
                    }
                    _ => {}
                }
            }
            drop(events);
            if let Some(f) = fleet.upgrade() {
                f.subscribed.store(false, Ordering::Release);
            }
        }
        tokio::time::sleep(settings.retry_after).await;
    }
}

fn connection_config(settings: &RedisSettings) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(settings.command_timeout))
        .set_number_of_retries(1)
        .set_max_delay(settings.retry_after)
}

async fn open(settings: &RedisSettings) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(settings.url.as_str())?;
    client
        .get_connection_manager_with_config(connection_config(settings))
        .await
}

async fn open_events(
    settings: &RedisSettings,
    sender: mpsc::UnboundedSender<PushInfo>,
    channel: &str,
) -> redis::RedisResult<ConnectionManager> {
    let info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())?;
    let redis_settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let client = redis::Client::open(info.set_redis_settings(redis_settings))?;
    let config = connection_config(settings)
        .set_push_sender(sender)
        .set_automatic_resubscription()
        .set_response_timeout(None);
    let mut conn = client.get_connection_manager_with_config(config).await?;
    conn.subscribe(channel).await?;
    Ok(conn)
}

/// Whether a command failed on the value it met (another type under the key, a reply
/// of an unexpected shape) rather than on Redis: no outage, nothing to back off from.
/// (A reply that does not convert, such as a non-UTF-8 string read as `String`, is a
/// parse error, which redis-rs also uses for a broken protocol: read such values as
/// bytes.)
pub(super) fn about_one_value(error: &redis::RedisError) -> bool {
    error.code() == Some("WRONGTYPE") || error.kind() == redis::ErrorKind::UnexpectedReturnType
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
    }
}
