//! Fleet mode: the Redis connection that instances share a cache and a fill lock
//! through, its outage state, and the event channel that wakes waiters across
//! instances.
//!
//! Redis faults never fail a request. Every command runs under the configured timeout;
//! a failure opens a breaker for `retry_after`, during which corral behaves as a single
//! instance (local cache, local coalescing) without touching Redis, then tries again.
//! The outage is logged when it starts and when it ends, and counted in between.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, watch};
use xxhash_rust::xxh3::xxh3_128;

use crate::cache::shared::{PutOutcome, SharedCache};
use crate::cache::{Cache, CacheKey, LocalCache, PassReason};
use crate::config::LockMode;
use crate::config::{LockSettings, OnWaitTimeout, RedisSettings};
use crate::lock::redlock::Redlock;
use crate::lock::single::RedisLock;
use crate::lock::FillOutcome;
use crate::lock::{FleetLock, Lease, LockTry};
use crate::metrics::FleetMetrics;
use crate::route::Route;
use crate::upstream::FailureKind;

mod events;
use events::parse_event;
pub use events::FillEvent;

/// The Redis keys of one cache key. All share the hash tag of the *primary* key, so
/// the scripts that touch several of them also run on Redis Cluster.
pub struct RedisKeys {
    pub entry: String,
    pub lock: String,
    pub fence: String,
    /// The set of entry keys holding variants of the primary key (for purges).
    pub variants: String,
}

/// The fleet's connection to Redis.
pub struct Fleet {
    settings: RedisSettings,
    pub lock: LockSettings,
    /// Set once the first connection succeeds; the manager reconnects by itself after.
    conn: RwLock<Option<ConnectionManager>>,
    health: RedisHealth,
    /// Fills this instance waits on, by key. Invariant: only the local fill task for a
    /// key registers (local coalescing stays in front), and it removes its entry when
    /// done (see [`EventWait`]); the event task only sends.
    waiting: Mutex<HashMap<CacheKey, watch::Sender<Option<FillEvent>>>>,
    pub instance: String,
    pub metrics: FleetMetrics,
    /// The event subscription is up (fill events from other instances arrive).
    subscribed: AtomicBool,
    /// Notified when a command finds the connection broken, to open a new one.
    broken: Arc<tokio::sync::Notify>,
}

impl Fleet {
    /// Starts connecting in the background; until connected, corral runs single-instance.
    pub fn start(
        settings: RedisSettings,
        lock: LockSettings,
        local: LocalCache,
        metrics: FleetMetrics,
    ) -> Arc<Fleet> {
        let retry_after = settings.retry_after;
        let fleet = Arc::new(Fleet {
            settings,
            lock: lock.clone(),
            conn: RwLock::new(None),
            health: RedisHealth::new(retry_after),
            waiting: Mutex::new(HashMap::new()),
            instance: format!("{:016x}", rand::random::<u64>()),
            metrics,
            subscribed: AtomicBool::new(false),
            broken: Arc::new(tokio::sync::Notify::new()),
        });
        tokio::spawn(connect(Arc::downgrade(&fleet), local));
        fleet
    }

    pub fn keys(&self, key: &CacheKey) -> RedisKeys {
        let tag = xxh3_128(key.primary().as_bytes());
        let id = xxh3_128(key.as_str().as_bytes());
        let p = &self.settings.key_prefix;
        RedisKeys {
            entry: format!("{p}{{{tag:032x}}}:e:{id:032x}"),
            lock: format!("{p}{{{tag:032x}}}:l:{id:032x}"),
            fence: format!("{p}{{{tag:032x}}}:f:{id:032x}"),
            variants: format!("{p}{{{tag:032x}}}:v"),
        }
    }

    /// The set of primary keys whose responses carried `tag`.
    pub fn tag_key(&self, tag: &str) -> String {
        format!("{}tag:{tag}", self.settings.key_prefix)
    }

    /// The channel fill and purge events go out on.
    pub(crate) fn channel(&self) -> String {
        format!("{}events", self.settings.key_prefix)
    }

    /// The message that tells the fleet `event` happened to `key`.
    pub(crate) fn event_message(&self, key: &CacheKey, event: FillEvent) -> String {
        format!("{} {} {}", event.code(), self.instance, key.as_str())
    }

    /// Connected for commands and subscribed to events.
    pub fn ready(&self) -> bool {
        self.available() && self.subscribed.load(Ordering::Acquire)
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
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if self.health.is_open() {
            return None;
        }
        let conn = self
            .conn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
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
                self.health.failure(op, &error, &self.metrics);
                if error.is_io_error()
                    || error.is_connection_dropped()
                    || error.is_connection_refusal()
                    || error.is_timeout()
                {
                    self.drop_connection();
                }
                None
            }
            Err(_) => {
                let error = format!("no reply within {:?}", self.settings.command_timeout);
                self.health.failure(op, &error, &self.metrics);
                self.drop_connection();
                None
            }
        }
    }

    fn wake_all(&self) {
        for waiter in self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            waiter.send_replace(Some(FillEvent::Lost));
        }
    }

    /// Forgets a broken connection; the connect task opens a new one.
    fn drop_connection(&self) {
        *self.conn.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.broken.notify_one();
    }

    /// Tells the fleet how a fill of `key` ended.
    pub async fn publish(&self, key: &CacheKey, event: FillEvent) {
        let message = self.event_message(key, event);
        let channel = self.channel();
        self.run("publish", |mut c| async move {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(message)
                .query_async::<i64>(&mut c)
                .await
        })
        .await;
    }

    /// Registers interest in `key`'s fill events. Register *before* re-checking Redis,
    /// so that an event sent between the check and the wait is not missed.
    pub fn watch(self: &Arc<Self>, key: &CacheKey) -> EventWait {
        let (sender, receiver) = watch::channel(None);
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), sender);
        EventWait {
            fleet: Arc::clone(self),
            key: key.clone(),
            receiver,
        }
    }

    /// Acts on one message from the event channel; a malformed one is counted and
    /// ignored.
    fn dispatch(&self, local: &LocalCache, payload: &[u8]) {
        let Some((event, from, key)) = parse_event(payload) else {
            self.metrics.event_ignored();
            return;
        };
        if from != self.instance {
            // Another instance replaced or purged the entry: drop our copy, so the next
            // request reads the new one from Redis.
            match event {
                FillEvent::Filled(_) => {
                    let (local, key) = (local.clone(), key.clone());
                    tokio::spawn(async move { local.remove_with_primary(&key).await });
                }
                FillEvent::Purged => {
                    local.remove_all_of(&key);
                }
                FillEvent::Uncacheable | FillEvent::Retry | FillEvent::Failed | FillEvent::Lost => {
                    // Nothing stored changed.
                }
            }
        }
        if let Some(waiter) = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            waiter.send_replace(Some(event));
        }
    }
}

/// A registration for one key's fill events; deregisters on drop.
pub struct EventWait {
    fleet: Arc<Fleet>,
    key: CacheKey,
    receiver: watch::Receiver<Option<FillEvent>>,
}

impl EventWait {
    /// The next event, or `None` at the timeout (a lost message looks the same: callers
    /// re-check Redis either way).
    pub async fn next(&mut self, timeout: Duration) -> Option<FillEvent> {
        let event =
            match tokio::time::timeout(timeout, self.receiver.wait_for(Option::is_some)).await {
                Ok(Ok(event)) => *event,
                _ => None,
            };
        // Seen: the next call waits for a new event.
        self.receiver.mark_unchanged();
        event
    }
}

impl Drop for EventWait {
    fn drop(&mut self) {
        let mut waiting = self.fleet.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if waiting
            .get(&self.key)
            .is_some_and(|s| self.receiver.same_channel(&s.subscribe()))
        {
            waiting.remove(&self.key);
        }
    }
}

/// Keeps the command connection up: opens it, and opens a new one whenever a command
/// found it broken (`broken` is notified). Until then commands are skipped, which is
/// single-instance behaviour.
async fn connect(fleet: std::sync::Weak<Fleet>, local: LocalCache) {
    tokio::spawn(listen(fleet.clone(), local));
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
async fn listen(fleet: std::sync::Weak<Fleet>, local: LocalCache) {
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
                        Some(Value::BulkString(payload)) => f.dispatch(&local, payload),
                        _ => f.metrics.event_ignored(),
                    },
                    // Messages sent meanwhile are lost: wake every waiter to re-check
                    // (and, Redis being gone, fall back) instead of sleeping out a TTL.
                    PushKind::Disconnection => {
                        f.wake_all();
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
fn about_one_value(error: &redis::RedisError) -> bool {
    error.code() == Some("WRONGTYPE") || error.kind() == redis::ErrorKind::UnexpectedReturnType
}

/// The URL without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// The breaker: after a failure Redis is left alone for `retry_after`.
///
/// Any task may report; `failing` flips once per transition, so exactly one task logs
/// the start and one the end of an outage.
struct RedisHealth {
    retry_after: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` before which Redis is not tried.
    open_until_ms: AtomicU64,
    failing: AtomicBool,
    failures: AtomicU64,
}

impl RedisHealth {
    fn new(retry_after: Duration) -> RedisHealth {
        RedisHealth {
            retry_after,
            epoch: Instant::now(),
            open_until_ms: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            failures: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn is_open(&self) -> bool {
        self.now_ms() < self.open_until_ms.load(Ordering::Relaxed)
    }

    fn failure(&self, op: &'static str, error: &dyn std::fmt::Display, metrics: &FleetMetrics) {
        self.open_until_ms.store(
            self.now_ms() + self.retry_after.as_millis() as u64,
            Ordering::Relaxed,
        );
        self.failures.fetch_add(1, Ordering::Relaxed);
        metrics.redis_error();
        if !self.failing.swap(true, Ordering::AcqRel) {
            metrics.set_fallback(true);
            tracing::warn!(op, %error, retry_after = ?self.retry_after, "redis unavailable: running single-instance until it answers again");
        }
    }

    fn success(&self, metrics: &FleetMetrics) {
        if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::AcqRel) {
            metrics.set_fallback(false);
            let failures = self.failures.swap(0, Ordering::Relaxed);
            tracing::info!(failures, "redis answers again: fleet mode resumed");
        }
    }
}

/// How a fleet-wide claim on a fill ended.
pub enum Claim {
    /// Fetch it: with the lease, or without one when Redis is unavailable (the fill is
    /// then coalesced only within this instance).
    Lead(Option<Lease>),
    /// Another instance's fill ended it.
    Done(FillOutcome),
}

/// Fleet-wide fills: who fetches a key across instances, and how the others learn.
pub struct Coordinator {
    fleet: Arc<Fleet>,
    lock: FleetLock,
    cache: Cache,
}

/// Extra wait past a lock's TTL before a waiter concludes the holder died.
const TAKEOVER_MARGIN: Duration = Duration::from_millis(250);

impl Coordinator {
    pub fn new(fleet: Arc<Fleet>, cache: Cache) -> Coordinator {
        Coordinator {
            lock: match fleet.lock.mode {
                LockMode::Single => FleetLock::Single(RedisLock::new(Arc::clone(&fleet))),
                LockMode::Redlock => FleetLock::Redlock(Redlock::new(Arc::clone(&fleet))),
            },
            fleet,
            cache,
        }
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// The cache's own shared tier (its read bound and log of unreadable values).
    fn shared(&self) -> SharedCache {
        self.cache
            .shared()
            .cloned()
            .unwrap_or_else(|| SharedCache::new(Arc::clone(&self.fleet)))
    }

    /// Becomes the fleet's filler of `key`, or waits for the one that is. Called only by
    /// this instance's local permit holder. A `background` refresh does not wait: if
    /// another instance holds the lock, that one refreshes.
    ///
    /// Order: register for events, then re-check Redis, then try the lock, then wait;
    /// so a fill that lands between the check and the wait still wakes us. Every wait
    /// is bounded by the lock TTL (a dead holder's lock expires) and the route's
    /// `wait_timeout`.
    pub async fn claim(&self, route: &Route, key: &CacheKey, background: bool) -> Claim {
        let deadline = Instant::now() + route.config.wait_timeout;
        let mut events = self.fleet.watch(key);
        let mut waited = false;
        loop {
            // Re-check first, every round: the holder writes the entry before it
            // releases the lock, so a free lock with a fresh entry means "filled".
            let started = Instant::now();
            if let Some(entry) = self.shared().get(key).await {
                if entry.freshness(std::time::SystemTime::now()).is_fresh() {
                    if waited {
                        self.fleet
                            .metrics
                            .wake_latency(started.elapsed().as_secs_f64());
                    }
                    let entry = Arc::new(entry);
                    self.cache
                        .store(&CacheKey::from_raw(key.primary()), Arc::clone(&entry))
                        .await;
                    return Claim::Done(FillOutcome::Filled(entry));
                }
            }
            match self.lock.try_acquire(key).await {
                LockTry::Acquired(lease) => {
                    if waited {
                        self.fleet.metrics.lock_takeover();
                    }
                    return Claim::Lead(Some(lease));
                }
                LockTry::Unavailable => return Claim::Lead(None),
                LockTry::Held if background => return Claim::Done(FillOutcome::HolderFailed),
                LockTry::Held => {}
            }
            let now = Instant::now();
            if now >= deadline {
                route.metrics.wait_timeout();
                return match route.config.on_wait_timeout {
                    OnWaitTimeout::Fetch => Claim::Lead(None),
                    OnWaitTimeout::Error => Claim::Done(FillOutcome::Failed(FailureKind::Timeout)),
                };
            }
            waited = true;
            match events
                .next((deadline - now).min(self.lock.ttl() + TAKEOVER_MARGIN))
                .await
            {
                Some(FillEvent::Uncacheable) => {
                    return Claim::Done(FillOutcome::Uncacheable(PassReason::NotStorable))
                }
                Some(FillEvent::Failed) => {
                    return Claim::Done(FillOutcome::Failed(FailureKind::Protocol))
                }
                // Filled: read it at the top. Purged or nothing (timeout, lost
                // message, dead holder): re-check and try the lock again.
                Some(FillEvent::Filled(_))
                | Some(FillEvent::Retry)
                | Some(FillEvent::Purged)
                | Some(FillEvent::Lost)
                | None => {}
            }
        }
    }

    /// Extends `lease` every third of the TTL until aborted or lost.
    pub async fn keep_alive(self: Arc<Self>, mut lease: Lease) {
        loop {
            tokio::time::sleep(self.lock.ttl() / 3).await;
            if !self.lock.extend(&mut lease).await {
                tracing::debug!("fleet lock lease lost during the fetch; the fenced write still guards the entry");
                return;
            }
        }
    }

    /// Writes a filled entry to the shared tier under `fence` and tells the fleet how
    /// the fill ended. The write comes first, so an instance woken by the event finds it.
    pub async fn publish_outcome(
        &self,
        route: &Route,
        key: &CacheKey,
        outcome: &FillOutcome,
        fence: u64,
    ) {
        let event = match outcome {
            FillOutcome::Filled(entry) => match self.shared().put(key, entry, fence).await {
                PutOutcome::Stored => {
                    let rules = self.cache.local().tag_rules();
                    let tags = rules.tags_of(&route.config.name, &entry.headers);
                    self.shared().tag(key, entry, &tags).await;
                    FillEvent::Filled(fence)
                }
                PutOutcome::Fenced => {
                    tracing::info!(%key, fence, "a newer lock holder exists; this fill's entry was not written to the shared cache");
                    return;
                }
                PutOutcome::Unavailable => return,
            },
            FillOutcome::Uncacheable(r) if r.waiters_retry() => FillEvent::Retry,
            FillOutcome::Uncacheable(_) => FillEvent::Uncacheable,
            FillOutcome::Shared(_) | FillOutcome::Failed(_) => FillEvent::Failed,
            FillOutcome::HolderFailed => return,
        };
        self.fleet.publish(key, event).await;
    }

    pub async fn release(&self, lease: Lease) {
        self.lock.release(lease).await;
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
