//! Fleet mode's connection to Redis (one server or a cluster): commands under a
//! timeout behind an outage breaker, the names of corral's keys, and the event channels
//! that tell instances about each other's fills and purges.
//!
//! Redis faults never fail a request. Every command runs under the configured timeout;
//! a failure opens a breaker for `retry_after`, during which corral behaves as a single
//! instance (local cache, local coalescing) without touching Redis, then tries again.
//! The outage is logged when it starts and when it ends, and counted in between.
//!
//! This layer knows keys only as strings: it sits below the cache, which hands it an
//! [`EventListener`] for the events that concern cached copies.

mod commands;
mod connection;
mod events;
mod health;
mod keys;
mod subscriptions;

use std::future::Future;
use std::sync::{Arc, RwLock};

use crate::config::RedisSettings;
use crate::metrics::FleetMetrics;
use connection::about_one_value;
use events::parse_event;
use health::RedisHealth;
use subscriptions::Subscriptions;

pub(crate) use commands::script;
pub use commands::Commands;
pub(crate) use events::EventListener;
pub use events::FillEvent;
pub use keys::RedisKeys;
pub(crate) use subscriptions::EventWait;

/// The fleet's connection to Redis.
pub struct Redis {
    settings: RedisSettings,
    /// Set once the first connection succeeds; the manager reconnects by itself after.
    conn: RwLock<Option<Commands>>,
    health: RedisHealth,
    subscriptions: Arc<Subscriptions>,
    /// Told about every event another instance sends.
    listener: EventListener,
    /// This instance's id in event messages and lock tokens: 16 hex digits.
    pub(crate) instance: String,
    pub(crate) metrics: FleetMetrics,
    /// Notified when a command finds the connection broken, to open a new one.
    broken: Arc<tokio::sync::Notify>,
}

impl Redis {
    /// Starts connecting in the background; until connected, corral runs single-instance.
    /// `listener` hears every event other instances send.
    pub(crate) fn start(
        settings: RedisSettings,
        metrics: FleetMetrics,
        listener: EventListener,
    ) -> Arc<Redis> {
        let health = RedisHealth::new(settings.retry_after, settings.is_cluster());
        let subscriptions = Arc::new(Subscriptions::new(settings.command_timeout));
        let redis = Arc::new(Redis {
            settings,
            conn: RwLock::new(None),
            health,
            subscriptions,
            listener,
            instance: format!("{:016x}", rand::random::<u64>()),
            metrics,
            broken: Arc::new(tokio::sync::Notify::new()),
        });
        tokio::spawn(connection::connect(Arc::downgrade(&redis)));
        redis
    }

    /// A connection for a process that is no instance (a test's fake holder, a
    /// benchmark's lock client): events from the fleet reach no cache.
    pub fn client(settings: RedisSettings) -> Arc<Redis> {
        let metrics = crate::metrics::Metrics::new().fleet.clone();
        Redis::start(settings, metrics, Box::new(|_, _| {}))
    }

    /// The Redis keys of the cache key `key` whose primary key is `primary`.
    pub(crate) fn keys(&self, primary: &str, key: &str) -> RedisKeys {
        RedisKeys::new(&self.settings.key_prefix, primary, key)
    }

    /// A route's upstream cap leases, waiting line and liveness marks.
    pub(crate) fn upstream_cap_keys(&self, route: &str) -> [String; 3] {
        keys::upstream_cap_keys(&self.settings.key_prefix, route)
    }

    /// The set of primary keys whose responses carried `tag`.
    pub fn tag_key(&self, tag: &str) -> String {
        keys::tag_key(&self.settings.key_prefix, tag)
    }

    /// The channel the fill events of `primary`'s keys go out on.
    pub(crate) fn event_channel(&self, primary: &str) -> String {
        keys::event_channel(&self.settings.key_prefix, primary)
    }

    /// The channel purge events go out on.
    pub(crate) fn purge_channel(&self) -> String {
        keys::purge_channel(&self.settings.key_prefix)
    }

    /// The command that publishes on corral's channels: sharded on a cluster, so a
    /// message stays in its channel's shard (and can be sent from a script there).
    pub(crate) fn publish_command(&self) -> &'static str {
        if self.settings.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// The message that tells the fleet `event` happened to the cache key `key`.
    pub(crate) fn event_message(&self, key: &str, event: FillEvent) -> String {
        events::message(event, &self.instance, key)
    }

    /// Whether the cache's Redis is a cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.settings.is_cluster()
    }

    /// Connected for commands and listening for purges.
    pub fn ready(&self) -> bool {
        self.available() && self.subscriptions.purges_heard()
    }

    /// Whether Redis is usable now (connected, breaker closed).
    pub fn available(&self) -> bool {
        !self.health.is_open()
            && self
                .conn
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    /// Runs one Redis operation under the command timeout. `None` when Redis is
    /// unavailable or the operation failed (which opens the breaker).
    pub async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(Commands) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_on(None, op, f).await
    }

    /// [`Redis::run`] for an operation on `key` (and keys of its slot): on a cluster,
    /// its failure leaves only that slot alone.
    pub async fn run_for<T, F, Fut>(&self, key: &str, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(Commands) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let slot = self.settings.is_cluster().then(|| health::slot_of(key));
        self.run_on(slot, op, f).await
    }

    async fn run_on<T, F, Fut>(&self, slot: Option<u16>, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(Commands) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if self.health.is_open_for(slot) {
            return None;
        }
        let conn = self
            .conn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        self.metrics.redis_round_trip();
        match tokio::time::timeout(self.settings.command_timeout, f(conn)).await {
            Ok(Ok(value)) => {
                self.health.success(&self.metrics);
                Some(value)
            }
            Ok(Err(error)) if about_one_value(&error) => {
                // One key's value (planted by anything sharing the prefix), not Redis:
                // it must not switch the whole fleet off. Counted, and the caller
                // treats it as nothing found.
                self.metrics.redis_error();
                tracing::debug!(op, %error, "redis refused a command on one key's value");
                None
            }
            Ok(Err(error)) => {
                self.health.failure(op, &error, &self.metrics, slot);
                // A cluster connection reconnects its nodes by itself.
                let broken = error.is_io_error()
                    || error.is_connection_dropped()
                    || error.is_connection_refusal()
                    || error.is_timeout();
                if broken && !self.settings.is_cluster() {
                    self.drop_connection();
                }
                None
            }
            Err(_) => {
                let error = format!("no reply within {:?}", self.settings.command_timeout);
                self.health.failure(op, &error, &self.metrics, slot);
                if !self.settings.is_cluster() {
                    self.drop_connection();
                }
                None
            }
        }
    }

    /// Forgets a broken connection; the connect task opens a new one.
    fn drop_connection(&self) {
        *self.conn.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.broken.notify_one();
    }

    /// Tells the instances waiting on `key` (of primary key `primary`) that `event`
    /// happened.
    pub(crate) async fn publish(&self, key: &str, primary: &str, event: FillEvent) {
        let message = self.event_message(key, event);
        let channel = self.event_channel(primary);
        let command = self.publish_command();
        self.run_for(&channel.clone(), "publish", |mut c| async move {
            redis::cmd(command)
                .arg(channel)
                .arg(message)
                .query_async::<i64>(&mut c)
                .await
        })
        .await;
    }

    /// Registers interest in `key`'s fill events (`primary`: its primary key, whose
    /// channel carries them). Register, and [`EventWait::listen`], *before* re-checking
    /// Redis, so that an event sent between the check and the wait is not missed.
    pub(crate) fn watch(&self, key: &str, primary: &str) -> EventWait {
        self.subscriptions.watch(key, self.event_channel(primary))
    }

    /// Acts on one message from the event channel; a malformed one is counted and
    /// ignored. Another instance's events go to the listener (its cached copies), and
    /// every event to this instance's waiter on the key.
    fn dispatch(&self, payload: &[u8]) {
        self.metrics.event_received();
        let Some((event, from, key)) = parse_event(payload) else {
            self.metrics.event_ignored();
            return;
        };
        if from != self.instance {
            (self.listener)(event, key);
        }
        self.subscriptions.notify(key, event);
    }
}
