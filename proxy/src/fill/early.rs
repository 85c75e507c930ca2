//! Early refresh: a hot entry refreshed shortly *before* it expires, so that nobody
//! waits for it and nothing stale is served. Each hit draws once: the entry is due
//! when `now - delta * beta * ln(rand()) >= expiry` (XFetch: Vattani, Chierichetti and
//! Lowenstein, "Optimal Probabilistic Cache Stampede Prevention", VLDB 2015), `delta`
//! being how long the entry's own fetch took. A hit `ttl` before expiry is thus due
//! with probability `exp(-ttl / (delta * beta))`: negligible while the entry is young,
//! rising as expiry nears, sooner for entries that are slow to make. One refresh per
//! key runs at a time, fleet-wide, under the fill lock.

use std::time::{Duration, SystemTime};

use crate::cache::{CacheEntry, Freshness};
use crate::config::RouteConfig;

/// A route's early-refresh setting: `beta` scales how early (0: never).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct EarlyRefresh {
    beta: f64,
}

/// Past this many `delta * beta` before expiry, a hit is due with probability below
/// `exp(-20)` (2e-9): it draws nothing.
const HORIZON: f64 = 20.0;

/// The fetch time assumed for an entry whose own is unknown (written by an older
/// instance) or under a millisecond.
const MIN_DELTA: Duration = Duration::from_millis(1);

impl EarlyRefresh {
    /// The route's setting (`early_refresh`, `early_refresh_beta`).
    pub(crate) fn of(route: &RouteConfig) -> EarlyRefresh {
        EarlyRefresh::new(route.early_refresh_beta)
    }

    /// `beta` must be finite and not negative (checked by the config).
    pub(crate) fn new(beta: f64) -> EarlyRefresh {
        EarlyRefresh {
            beta: if beta.is_finite() { beta.max(0.0) } else { 0.0 },
        }
    }

    pub(crate) fn is_on(self) -> bool {
        self.beta > 0.0
    }

    /// Whether a hit at `now` draws `entry` due for its early refresh (a fresh copy
    /// whose refresh has not started; the caller starts it with
    /// [`CacheEntry::start_early_refresh`]).
    pub(crate) fn due_for(self, entry: &CacheEntry, now: SystemTime) -> bool {
        if !self.is_on() {
            return false;
        }
        match entry.freshness(now) {
            Freshness::Fresh { ttl } => {
                self.due(ttl, entry.fetch_time(), draw)
                    && !entry.early_refresh_started()
                    && !from_another_cache(entry)
            }
            Freshness::Stale { .. } => false,
        }
    }

    /// Whether a hit on an entry fresh for `ttl` more, whose fetch took `delta`,
    /// refreshes it now. `draw` gives a uniform number in (0, 1]; it is called only
    /// when the odds are not negligible, so most hits pay one division.
    pub(crate) fn due(self, ttl: Duration, delta: Duration, draw: impl FnOnce() -> f64) -> bool {
        if !self.is_on() {
            return false;
        }
        let scale = delta.max(MIN_DELTA).as_secs_f64() * self.beta;
        let distance = ttl.as_secs_f64() / scale;
        if distance > HORIZON {
            return false;
        }
        // now - scale * ln(u) >= now + ttl  <=>  -ln(u) >= distance  <=>  u <= e^-distance
        draw() <= (-distance).exp()
    }
}

/// Whether `new`, the result of `old`'s early refresh, is a lifetime of its own: it
/// expires later, and is fresh for at least half as long as `old` was. Otherwise (an
/// upstream that is itself a cache, whose `Age` grows; a fixed `Expires`; a lifetime
/// cut to a boundary) refreshing it again would fetch the same thing: it counts as
/// refreshed already ([`CacheEntry::early_refreshed`]), and the key waits for expiry.
pub(crate) fn renews(old: &CacheEntry, new: &CacheEntry) -> bool {
    let span = |e: &CacheEntry| {
        e.fresh_until()
            .duration_since(e.received_at())
            .unwrap_or_default()
    };
    new.fresh_until() > old.fresh_until() && span(new) * 2 >= span(old)
}

/// Whether `entry` came from another cache (a CDN, a Varnish in front of the origin):
/// it arrived with an `Age` of a second or more (beyond its own fetch time, which the
/// received age includes). Its expiry is that cache's copy's: a refresh before it
/// would fetch the same copy, expiring at the same instant, so it is not refreshed
/// early. Read from the entry itself, this holds across the fleet and Redis.
fn from_another_cache(entry: &CacheEntry) -> bool {
    entry.age_at_receipt().saturating_sub(entry.fetch_time()) >= Duration::from_secs(1)
}

/// A uniform draw in (0, 1] from the thread's generator.
pub(crate) fn draw() -> f64 {
    1.0 - rand::random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn off_never_refreshes_and_draws_nothing() {
        for off in [
            EarlyRefresh::new(0.0),
            EarlyRefresh::new(-1.0),
            EarlyRefresh::new(f64::NAN),
        ] {
            assert!(!off.due(Duration::ZERO, SEC, || panic!("no draw")));
        }
    }

    #[test]
    fn far_from_expiry_nothing_is_drawn() {
        let on = EarlyRefresh::new(1.0);
        // 100 ms fetch, 60 s left: 600 deltas away.
        assert!(!on.due(60 * SEC, SEC / 10, || panic!("no draw")));
    }

    #[test]
    fn the_odds_follow_xfetch() {
        let on = EarlyRefresh::new(1.0);
        let delta = SEC / 5;
        // At expiry every hit is due; one delta before it, those that draw e^-1 or less.
        assert!(on.due(Duration::ZERO, delta, || 1.0));
        let limit = (-1.0f64).exp();
        assert!(on.due(delta, delta, || limit - 1e-9));
        assert!(!on.due(delta, delta, || limit + 1e-9));
        // A larger beta refreshes earlier: two deltas away with beta 2 is one "scaled".
        assert!(EarlyRefresh::new(2.0).due(2 * delta, delta, || limit - 1e-9));
    }

    #[test]
    fn the_share_of_due_hits_matches_the_probability() {
        let on = EarlyRefresh::new(1.0);
        let (delta, ttl) = (SEC / 10, SEC / 10 * 2);
        let n = 200_000;
        let due = (0..n).filter(|_| on.due(ttl, delta, draw)).count();
        let share = due as f64 / n as f64;
        let expected = (-2.0f64).exp();
        assert!((share - expected).abs() < 0.005, "{share} vs {expected}");
    }

    #[test]
    fn an_unknown_fetch_time_is_one_millisecond() {
        let on = EarlyRefresh::new(1.0);
        assert!(!on.due(SEC, Duration::ZERO, || panic!("no draw")));
        assert!(on.due(Duration::from_micros(500), Duration::ZERO, || 0.5));
    }
}
