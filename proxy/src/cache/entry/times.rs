//! An entry's [`Lifetime`], packed into milliseconds: 48 bytes instead of 96, for an
//! object kept by the hundred thousand. Milliseconds are what the shared tier's
//! encoding keeps too, so a copy read back from Redis has the same instants as the
//! entry that was written.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cache::policy::{Lifetime, MAX_DELTA};

/// When the entry was received, its age then, and its spans, in milliseconds; every
/// span clamped to [`MAX_DELTA`] (an entry may come from Redis, written by anything),
/// so no instant below can overflow.
#[derive(Debug, Clone, Copy)]
pub(super) struct Times {
    received_at: u64,
    age: u64,
    fresh_for: u64,
    stale_while_revalidate: u64,
    stale_if_error: u64,
    keep: u64,
}

fn ms(d: Duration) -> u64 {
    // MAX_DELTA is 2^31 s: well within u64 milliseconds.
    d.min(MAX_DELTA).as_millis() as u64
}

impl Times {
    pub(super) fn pack(l: &Lifetime) -> Times {
        let since_epoch = l.received_at.duration_since(UNIX_EPOCH).unwrap_or_default();
        Times {
            received_at: u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX / 2),
            age: ms(l.age),
            fresh_for: ms(l.fresh_for),
            stale_while_revalidate: ms(l.stale_while_revalidate),
            stale_if_error: ms(l.stale_if_error),
            keep: ms(l.keep),
        }
    }

    pub(super) fn lifetime(&self) -> Lifetime {
        Lifetime {
            received_at: self.received_at(),
            age: Duration::from_millis(self.age),
            fresh_for: Duration::from_millis(self.fresh_for),
            stale_while_revalidate: Duration::from_millis(self.stale_while_revalidate),
            stale_if_error: Duration::from_millis(self.stale_if_error),
            keep: Duration::from_millis(self.keep),
        }
    }

    pub(super) fn received_at(&self) -> SystemTime {
        self.after(0)
    }

    pub(super) fn age(&self) -> Duration {
        Duration::from_millis(self.age)
    }

    /// `span` milliseconds after the entry was received.
    fn after(&self, span: u64) -> SystemTime {
        let at = Duration::from_millis(self.received_at.saturating_add(span));
        UNIX_EPOCH.checked_add(at).unwrap_or(UNIX_EPOCH)
    }

    /// How long after `now` the instant `span` milliseconds after receipt is (`Ok`),
    /// or how long before `now` it was (`Err`). Asked on every hit, so reckoned in
    /// durations since the epoch: building a `SystemTime` per instant cost a hit about
    /// 55 ns (hot_path bench).
    fn left(&self, span: u64, now: SystemTime) -> Result<Duration, Duration> {
        let until = Duration::from_millis(self.received_at.saturating_add(span));
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        until.checked_sub(now).ok_or_else(|| now - until)
    }

    /// See [`Times::left`]: until the entry stops being fresh.
    pub(super) fn fresh_left(&self, now: SystemTime) -> Result<Duration, Duration> {
        self.left(self.fresh_for, now)
    }

    /// How long the entry has been here at `now`.
    pub(super) fn resident(&self, now: SystemTime) -> Duration {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        now.saturating_sub(Duration::from_millis(self.received_at))
    }

    /// When the entry stops being fresh (as the shared tier's encoding reckons it:
    /// receipt plus freshness lifetime, in milliseconds).
    pub(super) fn fresh_until(&self) -> SystemTime {
        self.after(self.fresh_for)
    }

    pub(super) fn stale_while_revalidate_until(&self) -> SystemTime {
        self.after(self.fresh_for + self.stale_while_revalidate)
    }

    pub(super) fn stale_if_error_until(&self) -> SystemTime {
        self.after(self.fresh_for + self.stale_if_error)
    }

    /// After this the entry can serve no one, nor be revalidated.
    pub(super) fn keep_until(&self) -> SystemTime {
        let stale = self.stale_while_revalidate.max(self.stale_if_error);
        self.after(self.fresh_for + stale + self.keep)
    }

    /// The same times, fresh no longer than until `at`.
    pub(super) fn stale_from(mut self, at: SystemTime) -> Times {
        let at = ms(at.duration_since(self.received_at()).unwrap_or_default());
        self.fresh_for = self.fresh_for.min(at);
        self
    }
}
