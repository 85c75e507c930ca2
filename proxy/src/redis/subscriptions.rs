//! Who in this instance waits for which fill, and the channels it listens on for them.
//!
//! Fill events go out on one channel per primary key (`{prefix}{tag}:ev`, in the slot of
//! the key's other Redis keys), so Redis delivers a fill's event only to the instances
//! that subscribed to that key's channel: those with a waiter. An uncontended fill
//! reaches no other instance; a fill with waiters on k instances costs k messages.
//! Purge events, which every copy holder must hear, go on one channel every instance
//! listens on. On a cluster both are sharded channels (`SSUBSCRIBE`/`SPUBLISH`), so a
//! message stays within the channel's shard instead of crossing the whole cluster bus.
//!
//! A waiter subscribes only after it found the lock held (an uncontended miss never
//! does), then re-checks the entry, so an event sent before the subscription took
//! effect is not needed. A channel without waiters is unsubscribed after
//! [`IDLE_GRACE`], so a hot key's next herd finds it still subscribed.
//!
//! Subscription state comes from what corral asked for and from Redis's pushes, not
//! from redis-rs's own resubscription, which on a cluster loses channels: it resends
//! several slots' channels in one `SSUBSCRIBE` (refused with `CROSSSLOT`) and forgets a
//! channel the server unsubscribed when its slot migrated. So: a `(s)unsubscribe` push
//! for a channel still wanted (slot migrated, or raced with an idle sweep) is answered
//! by subscribing again, one channel per command, and waking its waiters to re-check;
//! a disconnection wakes every waiter and subscribes every wanted channel again. A lost
//! event still costs at most the bounded wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, watch};

use super::events::FillEvent;
use super::Redis;

/// How long a channel stays subscribed after its last waiter left.
const IDLE_GRACE: Duration = Duration::from_secs(5);

/// The connection that listens: it sends only (un)subscriptions, never commands, as
/// an unsolicited `sunsubscribe` (slot migration) is taken by redis-rs as the reply of
/// whatever request is in flight on that connection.
#[derive(Clone)]
pub(super) enum Listener {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Listener {
    async fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Listener::Single(c) => c.subscribe(channel).await,
            Listener::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Listener::Single(c) => c.unsubscribe(channel).await,
            Listener::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }
}

/// One channel this instance listens on (or is about to).
#[derive(Default)]
struct Channel {
    waiters: usize,
    subscribed: bool,
    /// Bumped when Redis drops the subscription, so that a subscription confirmed
    /// before the drop but seen after it does not mark the channel subscribed.
    generation: u64,
    /// Since when no waiter has been left, for the idle sweep.
    idle_since: Option<Instant>,
}

/// One waiting fill: its wake-up and the channel its events come on.
struct Waiter {
    sender: watch::Sender<Option<FillEvent>>,
    channel: String,
}

#[derive(Default)]
struct State {
    by_key: HashMap<String, Waiter>,
    channels: HashMap<String, Channel>,
}

/// The waiters and channels of this instance.
///
/// Invariant: only the local fill task of a key registers (local coalescing stays in
/// front), and its [`EventWait`] removes the registration when dropped; the listening
/// task only sends. A `watch` channel, not `Notify`: an event sent between a
/// registration and the wait is kept, not lost. A channel's entry exists while it has
/// waiters or is idle within the grace; the sweep removes it *before* unsubscribing,
/// so a push for a channel that has an entry was not asked for by the sweep.
pub(super) struct Subscriptions {
    state: Mutex<State>,
    listener: RwLock<Option<Listener>>,
    /// The purge channel is subscribed: this instance hears the fleet's purges.
    purges_heard: AtomicBool,
    timeout: Duration,
}

impl Subscriptions {
    pub(super) fn new(timeout: Duration) -> Subscriptions {
        Subscriptions {
            state: Mutex::default(),
            listener: RwLock::new(None),
            purges_heard: AtomicBool::new(false),
            timeout,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn listener(&self) -> Option<Listener> {
        self.listener
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn purges_heard(&self) -> bool {
        self.purges_heard.load(Ordering::Acquire)
    }

    /// Registers a wait for `key`'s fill, whose events come on `channel`.
    pub(super) fn watch(self: &Arc<Self>, key: &str, channel: String) -> EventWait {
        let (sender, receiver) = watch::channel(None);
        let mut state = self.state();
        let entry = state.channels.entry(channel.clone()).or_default();
        entry.waiters += 1;
        entry.idle_since = None;
        let waiter = Waiter {
            sender,
            channel: channel.clone(),
        };
        if let Some(old) = state.by_key.insert(key.to_string(), waiter) {
            // Not expected (one waiter per key): keep the counts right anyway.
            state.release(&old.channel);
        }
        EventWait {
            subscriptions: Arc::clone(self),
            key: key.to_string(),
            channel,
            receiver,
        }
    }

    /// Tells the waiter of `key`, if any, that `event` happened.
    pub(super) fn notify(&self, key: &str, event: FillEvent) {
        if let Some(waiter) = self.state().by_key.get(key) {
            waiter.sender.send_replace(Some(event));
        }
    }

    /// Wakes every waiter with [`FillEvent::Lost`].
    pub(super) fn wake_all(&self) {
        for waiter in self.state().by_key.values() {
            waiter.sender.send_replace(Some(FillEvent::Lost));
        }
    }

    /// Wakes the waiters on `channel` with [`FillEvent::Lost`]: its events may be lost.
    fn wake_channel(&self, channel: &str) {
        for waiter in self.state().by_key.values() {
            if waiter.channel == channel {
                waiter.sender.send_replace(Some(FillEvent::Lost));
            }
        }
    }

    /// Subscribes to `channel` unless already subscribed. `false` when it failed.
    async fn ensure(&self, channel: &str) -> bool {
        self.subscribe(channel, false).await
    }

    /// Sends the subscription (when `force`, even if it is thought to hold).
    async fn subscribe(&self, channel: &str, force: bool) -> bool {
        let generation = match self.state().channels.get(channel) {
            Some(c) if c.subscribed && !force => return true,
            Some(c) => c.generation,
            None => 0,
        };
        let Some(mut listener) = self.listener() else {
            return false;
        };
        match tokio::time::timeout(self.timeout, listener.subscribe(channel)).await {
            Ok(Ok(())) => {
                // The waiter may have left meanwhile: the entry then stays, idle, for
                // the sweep to unsubscribe.
                let mut state = self.state();
                let c = state
                    .channels
                    .entry(channel.to_string())
                    .or_insert_with(|| Channel {
                        idle_since: Some(Instant::now()),
                        ..Channel::default()
                    });
                // Dropped since it was sent: the resubscription under way settles it.
                if c.generation == generation {
                    c.subscribed = true;
                }
                true
            }
            Ok(Err(error)) => {
                tracing::debug!(channel, %error, "event subscription failed; waiting within the bound");
                false
            }
            Err(_) => false,
        }
    }

    /// Subscribes `channel` again after Redis dropped it, then wakes its waiters to
    /// re-check what they may have missed.
    async fn resubscribe(&self, channel: String) {
        if self.subscribe(&channel, true).await {
            self.wake_channel(&channel);
        }
    }

    /// After a disconnection: every wanted channel is subscribed again (one command
    /// each: channels of several slots may not share one), and every waiter re-checks.
    async fn resubscribe_all(&self, purge_channel: &str) {
        // Idle channels are not subscribed again, but kept for the sweep to unsubscribe:
        // on a cluster only one node's connection may have dropped.
        let wanted: Vec<String> = {
            let mut state = self.state();
            for c in state.channels.values_mut() {
                c.subscribed = false;
                c.generation += 1;
            }
            (state.channels.iter())
                .filter(|(_, c)| c.waiters > 0)
                .map(|(name, _)| name.clone())
                .collect()
        };
        self.wake_all();
        // Not heard (Redis still away): the listening task tries again next tick.
        self.subscribe_purges(purge_channel).await;
        join_all(wanted.into_iter().map(|c| self.resubscribe(c))).await;
    }

    async fn subscribe_purges(&self, channel: &str) -> bool {
        let Some(mut listener) = self.listener() else {
            return false;
        };
        let heard = matches!(
            tokio::time::timeout(self.timeout, listener.subscribe(channel)).await,
            Ok(Ok(()))
        );
        self.purges_heard.store(heard, Ordering::Release);
        heard
    }

    /// A `(s)unsubscribe` push for `channel`: when the channel is still wanted, Redis
    /// dropped it (slot migration) or it raced with the idle sweep; subscribe again.
    fn unsubscribed(self: &Arc<Self>, channel: String, purge_channel: &str) {
        if channel == purge_channel {
            self.purges_heard.store(false, Ordering::Release);
            let (me, purge) = (Arc::clone(self), purge_channel.to_string());
            tokio::spawn(async move { me.subscribe_purges(&purge).await });
            return;
        }
        let wanted = match self.state().channels.get_mut(&channel) {
            Some(c) => {
                c.subscribed = false;
                c.generation += 1;
                c.waiters > 0
            }
            None => false,
        };
        if wanted {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.resubscribe(channel).await });
        }
    }

    /// Subscribes again every wanted channel a failed attempt left unsubscribed (its
    /// node was reconnecting), waking its waiters when that works.
    async fn retry_unsubscribed(&self) {
        let missing: Vec<String> = (self.state().channels.iter())
            .filter(|(_, c)| c.waiters > 0 && !c.subscribed)
            .map(|(name, _)| name.clone())
            .collect();
        join_all(missing.into_iter().map(|c| self.resubscribe(c))).await;
    }

    /// Unsubscribes the channels idle for longer than the grace.
    async fn sweep(&self) {
        let idle: Vec<String> = {
            let mut state = self.state();
            let idle: Vec<String> = state
                .channels
                .iter()
                .filter(|(_, c)| {
                    c.waiters == 0 && c.idle_since.is_some_and(|t| t.elapsed() >= IDLE_GRACE)
                })
                .map(|(name, _)| name.clone())
                .collect();
            for name in &idle {
                state.channels.remove(name);
            }
            idle
        };
        let Some(listener) = self.listener() else {
            return;
        };
        join_all(idle.iter().map(|channel| {
            let mut listener = listener.clone();
            async move {
                let _ = tokio::time::timeout(self.timeout, listener.unsubscribe(channel)).await;
            }
        }))
        .await;
    }
}

impl State {
    /// One waiter of `channel` left. A channel never subscribed (an uncontended fill
    /// registers too) goes at once; a subscribed one idles for the grace.
    fn release(&mut self, channel: &str) {
        if let Some(c) = self.channels.get_mut(channel) {
            c.waiters = c.waiters.saturating_sub(1);
            if c.waiters == 0 && !c.subscribed {
                self.channels.remove(channel);
            } else if c.waiters == 0 {
                c.idle_since = Some(Instant::now());
            }
        }
    }
}

/// A registration for one key's fill events; deregisters on drop.
pub(crate) struct EventWait {
    subscriptions: Arc<Subscriptions>,
    key: String,
    channel: String,
    receiver: watch::Receiver<Option<FillEvent>>,
}

impl EventWait {
    /// Makes sure the key's channel is subscribed (a round trip the first time). Call
    /// it before re-checking Redis, so an event sent after the check is heard. `false`
    /// when the subscription failed: waits then end at their bound.
    pub(crate) async fn listen(&self) -> bool {
        self.subscriptions.ensure(&self.channel).await
    }

    /// The next event, or `None` at the timeout (a lost message looks the same: callers
    /// re-check Redis either way).
    ///
    /// Each event is returned once: `changed` (not a look at the current value, which
    /// keeps the last event and would answer every later call at once, spinning the
    /// waiter through lock attempts) waits for one sent since the last call, or since
    /// the registration for the first.
    pub(crate) async fn next(&mut self, timeout: Duration) -> Option<FillEvent> {
        match tokio::time::timeout(timeout, self.receiver.changed()).await {
            Ok(Ok(())) => *self.receiver.borrow_and_update(),
            // The registration was replaced (not expected: one waiter per key): no
            // event will come, so sleep out the bound rather than spin.
            Ok(Err(_)) => {
                tokio::time::sleep(timeout).await;
                None
            }
            Err(_) => None,
        }
    }
}

impl Drop for EventWait {
    fn drop(&mut self) {
        let mut state = self.subscriptions.state();
        let ours = state
            .by_key
            .get(&self.key)
            .is_some_and(|w| self.receiver.same_channel(&w.sender.subscribe()));
        if ours {
            state.by_key.remove(&self.key);
            state.release(&self.channel);
        }
    }
}

/// Keeps the listening connection up and acts on what arrives on it: event messages
/// to [`Redis::dispatch`], dropped subscriptions subscribed again, idle channels swept.
pub(super) async fn listen(redis: Weak<Redis>) {
    loop {
        let Some(r) = redis.upgrade() else { return };
        let (settings, subs, purge_channel) = (
            r.settings.clone(),
            Arc::clone(&r.subscriptions),
            r.purge_channel(),
        );
        drop(r);
        let (sender, mut pushes) = mpsc::unbounded_channel::<PushInfo>();
        let opened = Instant::now();
        match super::connection::open_listener(&settings, sender).await {
            Ok(listener) => {
                *subs.listener.write().unwrap_or_else(|e| e.into_inner()) = Some(listener);
                subs.resubscribe_all(&purge_channel).await;
            }
            Err(error) => {
                tracing::debug!(%error, "event connection failed; retrying");
                tokio::time::sleep(settings.retry_after).await;
                continue;
            }
        }
        // Each tick: a purge channel not heard (Redis was away) is subscribed again,
        // with every wanted channel, as is any wanted channel a failed attempt left
        // out; idle channels are dropped.
        let mut tick = tokio::time::interval(settings.retry_after.min(IDLE_GRACE));
        loop {
            tokio::select! {
                push = pushes.recv() => {
                    let Some(push) = push else { break };
                    let Some(r) = redis.upgrade() else { return };
                    if on_push(&r, push, &purge_channel) == Listening::Reopen {
                        break;
                    }
                }
                _ = tick.tick() => {
                    if !subs.purges_heard() {
                        subs.resubscribe_all(&purge_channel).await;
                    }
                    subs.retry_unsubscribed().await;
                    subs.sweep().await;
                }
            }
        }
        // Disconnected: messages sent meanwhile are lost. Every waiter re-checks (and,
        // Redis being gone, falls back) instead of sleeping out a TTL, and a new
        // connection subscribes every wanted channel again. A new one, not redis-rs's
        // reconnection of the node, whose own resubscription races corral's and has
        // been seen to leave a channel confirmed but not delivered.
        *subs.listener.write().unwrap_or_else(|e| e.into_inner()) = None;
        subs.purges_heard.store(false, Ordering::Release);
        subs.wake_all();
        // A connection that drops as soon as it opens is not reopened in a tight loop.
        let since = opened.elapsed();
        if since < settings.retry_after {
            tokio::time::sleep(settings.retry_after - since).await;
        }
    }
}

/// What the listening task does after a push.
#[derive(PartialEq)]
enum Listening {
    Continue,
    /// The connection (or one of a cluster's node connections) dropped.
    Reopen,
}

fn on_push(redis: &Arc<Redis>, push: PushInfo, purge_channel: &str) -> Listening {
    let subs = &redis.subscriptions;
    match push.kind {
        PushKind::Message | PushKind::SMessage => match push.data.get(1) {
            Some(Value::BulkString(payload)) => redis.dispatch(payload),
            _ => redis.metrics.event_ignored(),
        },
        PushKind::Unsubscribe | PushKind::SUnsubscribe => {
            if let Some(Value::BulkString(channel)) = push.data.first() {
                if let Ok(channel) = String::from_utf8(channel.clone()) {
                    subs.unsubscribed(channel, purge_channel);
                }
            }
        }
        PushKind::Disconnection => return Listening::Reopen,
        _ => {}
    }
    Listening::Continue
}
