//! The fleet's event messages: how an instance tells the others that a key's fill
//! ended or that it was purged, as one Redis pub/sub message, and how a message is read
//! back. Anything on a channel is untrusted (the key prefix may be shared).

use std::fmt;

/// What another instance said about a key's fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillEvent {
    /// The entry was stored in the shared tier under this fencing token.
    Filled(u64),
    /// The response was not cacheable: fetch it yourself.
    Uncacheable,
    /// The filler's own credentials kept its response out of the cache: compete for
    /// the fill again (the lock is already free).
    Retry,
    /// The upstream failed.
    Failed,
    /// The key was purged.
    Purged,
    /// The event connection dropped: events may have been lost, so every waiter
    /// re-checks now instead of sleeping out its bound. Never sent over Redis.
    Lost,
}

/// The event's code on the wire: `F{fence}`, `U`, `R`, `E`, `P` (`L` never leaves).
impl fmt::Display for FillEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FillEvent::Filled(fence) => write!(f, "F{fence}"),
            FillEvent::Uncacheable => f.write_str("U"),
            FillEvent::Retry => f.write_str("R"),
            FillEvent::Failed => f.write_str("E"),
            FillEvent::Purged => f.write_str("P"),
            FillEvent::Lost => f.write_str("L"),
        }
    }
}

impl FillEvent {
    fn parse(code: &str) -> Option<FillEvent> {
        match code.as_bytes() {
            [b'F', fence @ ..] if !fence.is_empty() && fence.iter().all(u8::is_ascii_digit) => {
                code[1..].parse().ok().map(FillEvent::Filled)
            }
            b"U" => Some(FillEvent::Uncacheable),
            b"R" => Some(FillEvent::Retry),
            b"E" => Some(FillEvent::Failed),
            b"P" => Some(FillEvent::Purged),
            _ => None,
        }
    }
}

/// The longest event message read: an event code, an instance id and a cache key,
/// whose request head hyper bounds well below this. Anything on the channel is
/// untrusted (the prefix may be shared); longer messages are ignored.
pub(super) const MAX_EVENT_BYTES: usize = 1 << 20;

/// The message that tells the fleet `event` happened to the cache key `key`.
pub(super) fn message(event: FillEvent, instance: &str, key: &str) -> String {
    format!("{event} {instance} {key}")
}

/// An event message as another instance publishes it: `{code} {instance} {key}`, the
/// instance being 16 hex digits. `None` for anything else.
pub(super) fn parse_event(payload: &[u8]) -> Option<(FillEvent, &str, &str)> {
    if payload.len() > MAX_EVENT_BYTES {
        return None;
    }
    let message = std::str::from_utf8(payload).ok()?;
    let mut parts = message.splitn(3, ' ');
    let event = FillEvent::parse(parts.next()?)?;
    let from = parts.next()?;
    if from.len() != 16 || !from.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let key = parts.next().filter(|k| !k.is_empty())?;
    Some((event, from, key))
}

/// What the cache layer does with another instance's event (drop a local copy); called
/// on the event task, so it must not block.
pub(crate) type EventListener = Box<dyn Fn(FillEvent, &str) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        for e in [
            FillEvent::Filled(42),
            FillEvent::Uncacheable,
            FillEvent::Retry,
            FillEvent::Failed,
            FillEvent::Purged,
        ] {
            assert_eq!(FillEvent::parse(&e.to_string()), Some(e));
        }
        assert_eq!(FillEvent::parse("Fx"), None);
        assert_eq!(FillEvent::parse(""), None);
    }

    #[test]
    fn malformed_events_are_refused() {
        let ok = parse_event(b"F7 0123456789abcdef t\nh\n/p").unwrap();
        assert_eq!(ok.0, FillEvent::Filled(7));
        assert_eq!(ok.2, "t\nh\n/p");
        for bad in [
            &b""[..],
            b"F",
            b"F+7 0123456789abcdef k",
            b"F-1 0123456789abcdef k",
            b"F99999999999999999999 0123456789abcdef k",
            b"Fx 0123456789abcdef k",
            b"L 0123456789abcdef k",
            b"Purged 0123456789abcdef k",
            b"P 0123 k",
            b"P 0123456789abcdeg k",
            b"P 0123456789abcdef",
            b"P 0123456789abcdef ",
            b"P\xff 0123456789abcdef k",
            b"\xc3\x28 0123456789abcdef k",
        ] {
            assert!(
                parse_event(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut huge = b"P 0123456789abcdef ".to_vec();
        huge.resize(MAX_EVENT_BYTES + 1, b'k');
        assert!(parse_event(&huge).is_none());
    }

    proptest::proptest! {
        #[test]
        fn any_event_payload_parses_or_is_refused_without_panic(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = parse_event(&payload);
        }
    }
}
