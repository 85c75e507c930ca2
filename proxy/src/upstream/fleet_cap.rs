//! The fleet-wide cap (`fleet_upstream_concurrency`): leases in Redis. Each route has a
//! sorted set of lease tokens scored by their expiry on Redis's clock, so a crashed
//! instance's leases lapse by themselves (after the `[lock] ttl`), and a lease that
//! lapsed cannot be renewed back into existence (its token is gone: renewal finds it
//! missing and reports it lost). Instances whose requests wait for a place stand in a
//! line (a second set, scored by when each began to wait; a third keeps each one's
//! liveness): a place freed goes to those ahead first, so no instance starves, and an
//! instance holding its share of the cap gets no more while others wait.
//!
//! One dispatcher task per capped route and instance talks to Redis for all of the
//! instance's requests: each round is one script that releases the leases of finished
//! requests, renews the held ones (every third of the TTL) and asks for as many new
//! leases as there are waiters with a local slot free. While the fleet is full it asks
//! again every [`POLL`]; a local release or a new waiter wakes it at once. When Redis
//! is unavailable the waiters are let through without a lease: each instance keeps to
//! its own `upstream_concurrency`, and no request fails because Redis is down. Once it
//! is back, leases are taken for the requests still in flight without one, so the
//! fleet counts them again.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::cap::UpstreamCap;
use crate::redis::Redis;

/// How often an instance whose waiters found the fleet full asks again.
const POLL: Duration = Duration::from_millis(5);

/// How often an instance with requests running unleased (Redis was away) tries to
/// count them in Redis again.
const BACKFILL_RETRY: Duration = Duration::from_millis(100);

/// How long an instance counts as alive after it last asked (so that a crashed
/// waiter leaves the line).
const WAITING_MARK: Duration = Duration::from_millis(500);

/// KEYS: leases, line, alive (one hash slot). ARGV: lease ttl ms, cap, this instance,
/// new leases wanted, leases this instance holds, alive-mark ms, #freed, #held, then
/// the freed tokens, the held tokens, and a token for each lease wanted.
///
/// Values that are not corral's (another type: the prefix may be shared; a line of
/// absurd length) are dropped, as are leases scored beyond a TTL from now (none can
/// be) and lapsed ones; then the freed are released and the held renewed. New leases go
/// to this instance up to the free places less one for each instance ahead of it in
/// the line, and up to its fair share (the cap split among the instances in line). An
/// instance given all it asked for leaves the line (and joins at its end next time).
/// Returns the number granted, then the held tokens found lapsed.
static EXCHANGE: LazyLock<redis::Script> = LazyLock::new(|| {
    crate::redis::script(
        r"
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        local ttl, cap, me = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
        local want, mine, mark = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
        local nfreed, nheld = tonumber(ARGV[7]), tonumber(ARGV[8])
        for k = 1, 3 do
            local kind = redis.call('TYPE', KEYS[k])['ok']
            if kind ~= 'zset' and kind ~= 'none' then redis.call('DEL', KEYS[k]) end
        end
        if redis.call('ZCARD', KEYS[2]) > 10000 then redis.call('DEL', KEYS[2]) end
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '(' .. (now + ttl), '+inf')
        redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
        redis.call('ZREMRANGEBYSCORE', KEYS[3], '(' .. (now + mark), '+inf')
        for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
            if not redis.call('ZSCORE', KEYS[3], m) then redis.call('ZREM', KEYS[2], m) end
        end
        local i = 9
        for _ = 1, nfreed do redis.call('ZREM', KEYS[1], ARGV[i]); i = i + 1 end
        local out = {'0'}
        for _ = 1, nheld do
            if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
                redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
            else
                table.insert(out, ARGV[i])
            end
            i = i + 1
        end
        if want > 0 then
            redis.call('ZADD', KEYS[2], 'NX', now, me)
            redis.call('ZADD', KEYS[3], now + mark, me)
            local ahead = redis.call('ZRANK', KEYS[2], me)
            local share = math.ceil(cap / redis.call('ZCARD', KEYS[2])) - mine
            local free = cap - redis.call('ZCARD', KEYS[1]) - ahead
            local n = math.max(0, math.min(want, free, share))
            for _ = 1, n do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]); i = i + 1 end
            out[1] = tostring(n)
            if n >= want then redis.call('ZREM', KEYS[2], me) end
        else
            redis.call('ZREM', KEYS[2], me)
            redis.call('ZREM', KEYS[3], me)
        end
        for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ttl * 2) end
        return out",
    )
});

/// A route's fleet cap, as one instance sees it.
pub(crate) struct FleetCap {
    redis: Arc<Redis>,
    /// The leases, the line of waiting instances, and their liveness.
    keys: [String; 3],
    /// Set at start and by a reload.
    cap: AtomicU32,
    ttl: Duration,
    /// Wakes the dispatcher: a slot was freed or a request began to wait.
    pub(super) kick: Arc<Notify>,
}

/// Lease tokens are `<instance>:<n>`, `n` from one counter for the process: a route's
/// cap rebuilt while the old one's leases are still held must not reuse their tokens
/// (Redis would count two requests as one).
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(0);

/// What one exchange with Redis gave: new leases, and held ones found lapsed.
struct Granted {
    leases: Vec<String>,
    lost: Vec<String>,
}

impl FleetCap {
    /// `cap` leases for `route` across the fleet, each lasting `ttl` unless renewed.
    pub(crate) fn new(redis: Arc<Redis>, route: &str, cap: u32, ttl: Duration) -> FleetCap {
        FleetCap {
            keys: redis.upstream_cap_keys(route),
            redis,
            cap: AtomicU32::new(cap),
            ttl,
            kick: Arc::new(Notify::new()),
        }
    }

    /// A new fleet-wide bound (a reload).
    pub(super) fn set_cap(&self, cap: u32) {
        self.cap.store(cap, Ordering::Relaxed);
    }

    /// One round trip (see [`EXCHANGE`]); `None` when Redis is unavailable.
    async fn exchange(
        &self,
        want: usize,
        mine: usize,
        freed: &[String],
        held: &[String],
    ) -> Option<Granted> {
        let tokens: Vec<String> = (0..want)
            .map(|_| {
                let n = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
                format!("{}:{n}", self.redis.instance)
            })
            .collect();
        let [leases, line, alive] = self.keys.clone();
        let (ttl, cap, me) = (
            self.ttl.as_millis() as u64,
            self.cap.load(Ordering::Relaxed),
            self.redis.instance.clone(),
        );
        let mark = WAITING_MARK.as_millis() as u64;
        let lists = (freed.to_vec(), held.to_vec(), tokens.clone());
        let reply: Vec<String> = self
            .redis
            .run_for(&self.keys[0], "upstream cap", |mut c| async move {
                let (freed, held, tokens) = lists;
                EXCHANGE
                    .key(leases)
                    .key(line)
                    .key(alive)
                    .arg(ttl)
                    .arg(cap)
                    .arg(me)
                    .arg(want)
                    .arg(mine)
                    .arg(mark)
                    .arg(freed.len())
                    .arg(held.len())
                    .arg(freed)
                    .arg(held)
                    .arg(tokens)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let granted = reply
            .first()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        Some(Granted {
            leases: tokens.into_iter().take(granted.min(want)).collect(),
            lost: reply.into_iter().skip(1).collect(),
        })
    }
}

/// The dispatcher of one capped route: rounds with Redis whenever kicked, every
/// [`POLL`] while waiters find the fleet full, and every third of the lease TTL to
/// renew. Ends when the cap is dropped.
pub(super) async fn dispatch(cap: Weak<UpstreamCap>) {
    let Some((kick, ttl)) = cap
        .upgrade()
        .and_then(|c| c.fleet.as_ref().map(|f| (Arc::clone(&f.kick), f.ttl)))
    else {
        return;
    };
    let mut renewed = Instant::now();
    let mut marked = false;
    loop {
        let pause = {
            let Some(cap) = cap.upgrade() else { return };
            let renew = renewed.elapsed() >= ttl / 3;
            if renew {
                renewed = Instant::now();
            }
            round(&cap, renew, &mut marked).await
        };
        tokio::select! {
            () = kick.notified() => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// One round: what waits gets leases (or, Redis away, goes without), freed leases are
/// released, held ones renewed when `renew`, and slots let through during an outage
/// get leases once Redis is back. Returns how long to wait for the next round unless
/// kicked. `marked`: this instance stands in the line in Redis.
async fn round(cap: &Arc<UpstreamCap>, renew: bool, marked: &mut bool) -> Duration {
    let Some(fleet) = cap.fleet.as_ref() else {
        return Duration::MAX;
    };
    let (waiters, backfill, mine, freed, held) = {
        let mut state = cap.lock();
        let room = cap.limit().saturating_sub(state.in_flight);
        let waiters = state.live_waiters().min(room);
        let held: Vec<String> = if renew {
            state.leases.iter().cloned().collect()
        } else {
            Vec::new()
        };
        let freed = std::mem::take(&mut state.freed);
        (waiters, state.unleased(), state.leases.len(), freed, held)
    };
    let want = waiters + backfill;
    if want == 0 && freed.is_empty() && held.is_empty() && !*marked {
        return fleet.ttl / 3;
    }
    let Some(mut granted) = fleet.exchange(want, mine, &freed, &held).await else {
        // Redis is away (its layer logs the outage once): the waiters go with the
        // local slots alone; freed and held leases lapse by themselves.
        grant(cap, (0..waiters).map(|_| None));
        cap.metrics.unleased(waiters);
        *marked = false;
        // While requests run without a lease, look again soon: once Redis is back
        // they are counted before the fleet hands their places out.
        return if cap.lock().unleased() > 0 {
            BACKFILL_RETRY
        } else {
            fleet.ttl / 3
        };
    };
    *marked = want > 0;
    if !granted.lost.is_empty() {
        cap.metrics.leases_lost(granted.lost.len());
        tracing::info!(lost = granted.lost.len(), "upstream cap leases lapsed while their requests were in flight (a pause longer than the lock TTL)");
        let mut state = cap.lock();
        for lease in &granted.lost {
            state.leases.remove(lease);
        }
    }
    // The slots let through during an outage are counted first.
    let backfilled: Vec<String> = granted
        .leases
        .drain(..backfill.min(granted.leases.len()))
        .collect();
    if !backfilled.is_empty() {
        let mut state = cap.lock();
        state.leases.extend(backfilled.iter().cloned());
        state.backfill.extend(backfilled);
    }
    let blocked = granted.leases.len() < waiters;
    if grant(cap, granted.leases.into_iter().map(Some)) {
        // A lease nobody waits for any more: released at once, not a round later.
        Duration::ZERO
    } else if blocked || backfill > 0 {
        POLL
    } else {
        fleet.ttl / 3
    }
}

/// Hands a slot with each lease to the next waiters; a lease nobody waits for any more
/// goes back to be released (`true` when one did).
fn grant(cap: &Arc<UpstreamCap>, leases: impl Iterator<Item = Option<String>>) -> bool {
    let mut returned = false;
    let mut state = cap.lock();
    for lease in leases {
        state.in_flight += 1;
        if let Some(lease) = &lease {
            state.leases.insert(lease.clone());
        }
        if let Err(back) = cap.hand_over(&mut state, lease) {
            state.in_flight -= 1;
            if let Some(lease) = back {
                state.leases.remove(&lease);
                state.freed.push(lease);
                returned = true;
            }
        }
    }
    cap.metrics.in_flight.set(state.in_flight as i64);
    returned
}
