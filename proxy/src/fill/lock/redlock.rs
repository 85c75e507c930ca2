//! The Redlock algorithm: one fill lock over N independent Redis masters, granted only
//! by a majority, so it keeps working while a minority of the nodes is down.
//!
//! Acquire: the same key and a random token on all N nodes at once, each bounded by
//! `node_timeout`; a grant needs N/2+1 nodes and positive validity, where validity =
//! ttl − elapsed − drift and drift = ttl/100 + 2 ms (elapsed on the monotonic clock).
//! A reply that times out after the command was sent is ambiguous: it is settled by
//! reading the key on that node, not by guessing. A failed attempt releases on all
//! nodes, including those that seemed to fail, then retries after a random delay.
//!
//! What it does not promise: a holder paused past its validity, a clock that jumps on
//! a node, or a node that restarts without persistence inside a TTL can let two
//! holders overlap. Nodes should stay down for a TTL after a crash. For a cache fill
//! the cost is bounded anyway: the entry write is fenced, so an overlap costs one
//! extra upstream request, never an older entry over a newer one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::compare_delete::{unknown_command, CompareDelete, DetectedCompareDelete};
use super::single::{EXTEND, NEXT_FENCE_LUA, RELEASE};
use super::{Lease, LockTry};
use crate::cache::CacheKey;
use crate::config::LockSettings;
use crate::redis::Redis;

/// KEYS: fence. ARGV: retention ms. The next fencing token (see [`NEXT_FENCE_LUA`]).
static FENCE: LazyLock<redis::Script> = LazyLock::new(|| {
    crate::redis::script(&format!(
        "{NEXT_FENCE_LUA}\nreturn next_fence(KEYS[1], ARGV[1])"
    ))
});

/// One independent Redis master, connected lazily and reconnected after failures.
struct Node {
    url: String,
    timeout: Duration,
    conn: RwLock<Option<ConnectionManager>>,
    connecting: AtomicBool,
    /// The node's own compare-and-delete, found when the connection opens.
    compare_delete: DetectedCompareDelete,
}

/// How one node answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Yes,
    No,
    /// No answer within the node timeout, or an error.
    Unreachable,
}

impl Node {
    fn connection(self: &Arc<Self>) -> Option<ConnectionManager> {
        if let Some(conn) = self.conn.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(conn);
        }
        if !self.connecting.swap(true, Ordering::AcqRel) {
            let node = Arc::clone(self);
            tokio::spawn(async move {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(node.timeout * 4))
                    .set_response_timeout(Some(node.timeout))
                    .set_number_of_retries(0);
                let mut conn = match redis::Client::open(node.url.as_str()) {
                    Ok(client) => client.get_connection_manager_with_config(config).await.ok(),
                    Err(_) => None,
                };
                if let Some(conn) = conn.as_mut() {
                    let found = tokio::time::timeout(node.timeout, CompareDelete::detect(conn));
                    node.compare_delete
                        .set(found.await.unwrap_or(CompareDelete::Lua));
                }
                *node.conn.write().unwrap_or_else(|e| e.into_inner()) = conn;
                node.connecting.store(false, Ordering::Release);
            });
        }
        None
    }

    fn forget(&self) {
        *self.conn.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Runs a script returning 1 for yes, under the node timeout.
    async fn script(self: &Arc<Self>, script: &redis::Script, key: &str, args: &[&str]) -> Reply {
        let Some(mut conn) = self.connection() else {
            return Reply::Unreachable;
        };
        let mut call = script.key(key);
        for arg in args {
            call.arg(*arg);
        }
        match tokio::time::timeout(self.timeout, call.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(1)) => Reply::Yes,
            Ok(Ok(_)) => Reply::No,
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                    self.forget();
                }
                Reply::Unreachable
            }
            Err(_) => Reply::Unreachable,
        }
    }

    /// Deletes `key` if it holds `token`: natively where the node can, else by script.
    async fn release(self: &Arc<Self>, key: &str, token: &str) -> Reply {
        let Some(native) = self.compare_delete.get().command(key, token) else {
            return self.script(&RELEASE, key, &[token]).await;
        };
        let Some(mut conn) = self.connection() else {
            return Reply::Unreachable;
        };
        match tokio::time::timeout(self.timeout, native.query_async::<i64>(&mut conn)).await {
            Ok(Ok(1)) => Reply::Yes,
            Ok(Ok(_)) => Reply::No,
            Ok(Err(e)) if unknown_command(&e) => {
                self.compare_delete.set(CompareDelete::Lua);
                self.script(&RELEASE, key, &[token]).await
            }
            Ok(Err(_)) | Err(_) => Reply::Unreachable,
        }
    }

    /// `SET key token NX PX ttl`; an ambiguous outcome is settled by reading the key.
    async fn set_nx(self: &Arc<Self>, key: &str, token: &str, ttl_ms: u64) -> Reply {
        let Some(mut conn) = self.connection() else {
            return Reply::Unreachable;
        };
        let mut set = redis::cmd("SET");
        set.arg(key).arg(token).arg("NX").arg("PX").arg(ttl_ms);
        match tokio::time::timeout(self.timeout, set.query_async::<Option<String>>(&mut conn)).await
        {
            Ok(Ok(Some(_))) => Reply::Yes,
            Ok(Ok(None)) => Reply::No,
            // Sent, maybe applied, answer lost: look.
            Ok(Err(_)) | Err(_) => {
                let mut get = redis::cmd("GET");
                get.arg(key);
                match tokio::time::timeout(
                    self.timeout,
                    get.query_async::<Option<String>>(&mut conn),
                )
                .await
                {
                    Ok(Ok(Some(holder))) if holder == token => Reply::Yes,
                    Ok(Ok(_)) => Reply::No,
                    _ => Reply::Unreachable,
                }
            }
        }
    }
}

/// The fleet lock by Redlock over `[lock] nodes`; fences come from the cache's Redis.
#[derive(Clone)]
pub struct Redlock {
    redis: Arc<Redis>,
    nodes: Arc<[Arc<Node>]>,
    ttl: Duration,
    retries: u32,
    retry_delay: Duration,
    /// Logged once when quorum is lost and once when it is back.
    no_quorum: Arc<AtomicBool>,
}

impl Redlock {
    /// A lock over `settings.nodes` whose fencing tokens come from `redis`, where the
    /// fenced write runs.
    pub fn new(redis: Arc<Redis>, settings: &LockSettings) -> Redlock {
        let nodes: Vec<Arc<Node>> = settings
            .nodes
            .iter()
            .map(|url| {
                let node = Arc::new(Node {
                    url: url.clone(),
                    timeout: settings.node_timeout,
                    conn: RwLock::new(None),
                    connecting: AtomicBool::new(false),
                    compare_delete: DetectedCompareDelete::default(),
                });
                node.connection(); // start connecting now
                node
            })
            .collect();
        Redlock {
            redis,
            nodes: nodes.into(),
            ttl: settings.ttl,
            retries: settings.retries,
            retry_delay: settings.retry_delay,
            no_quorum: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    fn quorum(&self) -> usize {
        self.nodes.len() / 2 + 1
    }

    fn drift(&self) -> Duration {
        self.ttl / 100 + Duration::from_millis(2)
    }

    /// What is left of a lease taken at `started`, or `None` if nothing is.
    fn validity(&self, started: Instant) -> Option<Duration> {
        self.ttl
            .checked_sub(started.elapsed() + self.drift())
            .filter(|v| !v.is_zero())
    }

    pub async fn try_acquire(&self, key: &CacheKey) -> LockTry {
        let keys = self.redis.keys(key.primary(), key.as_str());
        let token = format!("{}:{:016x}", self.redis.instance, rand::random::<u64>());
        let ttl_ms = self.ttl.as_millis() as u64;
        let mut answered = 0;
        for attempt in 0..=self.retries {
            let started = Instant::now();
            let replies = join_all(
                self.nodes
                    .iter()
                    .map(|n| n.set_nx(&keys.lock, &token, ttl_ms)),
            )
            .await;
            let granted = replies.iter().filter(|r| **r == Reply::Yes).count();
            answered = replies.iter().filter(|r| **r != Reply::Unreachable).count();
            if granted >= self.quorum() {
                if let Some(validity) = self.validity(started) {
                    let Some(fence) = self.fence(&keys.fence).await else {
                        self.release_all(&keys.lock, &token).await;
                        return LockTry::Unavailable;
                    };
                    self.quorum_back();
                    self.redis.metrics.lock_acquired();
                    return LockTry::Acquired(Lease {
                        lock_key: keys.lock,
                        token,
                        fence,
                        deadline: started + validity,
                    });
                }
            }
            // No grant: undo everywhere, including where the reply was lost.
            self.release_all(&keys.lock, &token).await;
            if answered < self.quorum() {
                break; // no majority reachable: retrying now will not help
            }
            if attempt < self.retries {
                let jitter = rand::random_range(0..=self.retry_delay.as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
        }
        if answered < self.quorum() {
            if !self.no_quorum.swap(true, Ordering::AcqRel) {
                tracing::warn!(reachable = answered, needed = self.quorum(), "redlock: no quorum of lock nodes; fills go unlocked across the fleet (still coalesced per instance)");
            }
            self.redis.metrics.lock_no_quorum();
            return LockTry::Unavailable;
        }
        self.redis.metrics.lock_contended();
        LockTry::Held
    }

    /// Extends on all nodes; counts only with a quorum within the remaining validity.
    pub async fn extend(&self, lease: &mut Lease) -> bool {
        let started = Instant::now();
        let ttl_ms = self.ttl.as_millis().to_string();
        let args = [lease.token.as_str(), ttl_ms.as_str()];
        let replies = join_all(
            self.nodes
                .iter()
                .map(|n| n.script(&EXTEND, &lease.lock_key, &args)),
        )
        .await;
        let extended = replies.iter().filter(|r| **r == Reply::Yes).count();
        match self.validity(started) {
            Some(validity) if extended >= self.quorum() && Instant::now() < lease.deadline => {
                lease.deadline = started + validity;
                self.redis.metrics.lock_extended();
                true
            }
            _ => {
                self.redis.metrics.lock_lost();
                false
            }
        }
    }

    pub async fn release(&self, lease: Lease) {
        self.release_all(&lease.lock_key, &lease.token).await;
    }

    async fn release_all(&self, key: &str, token: &str) {
        join_all(self.nodes.iter().map(|n| n.release(key, token))).await;
    }

    /// The grant's fencing token, from the cache's Redis, where the fenced write runs.
    async fn fence(&self, fence_key: &str) -> Option<u64> {
        let key = fence_key.to_string();
        self.redis
            .run_for(fence_key, "fence", |mut c| async move {
                FENCE
                    .key(&key)
                    .arg(super::single::FENCE_RETENTION_MS)
                    .invoke_async::<u64>(&mut c)
                    .await
            })
            .await
    }

    fn quorum_back(&self) {
        if self.no_quorum.load(Ordering::Relaxed) && self.no_quorum.swap(false, Ordering::AcqRel) {
            tracing::info!("redlock: quorum of lock nodes is back");
        }
    }
}
