//! What stored objects cost the process, for the local tier's byte bound: every
//! allocation counted at the size jemalloc (corral's allocator) really hands out, and
//! moka's records per entry. So `cache.max_bytes` bounds memory, not payload.
//!
//! The constants are measured by `cargo bench --bench entry_memory`, and the test
//! `tests/memory.rs` holds the weigher to jemalloc's own count of allocated bytes.

use http::header::HeaderName;

/// An `Arc`'s counts, before its value.
pub(crate) const ARC_HEADER: usize = 16;

/// The shared header `bytes` allocates the first time a `Bytes` made from a `Vec` is
/// cloned or sliced (every entry's buffer is).
pub(crate) const SHARED_BYTES: usize = 32;

/// moka's records per entry, beside the key and value: its value and entry-info
/// nodes, queue and timer-wheel nodes, hash-table bucket, and the `Arc` around the key
/// (measured by `benches/entry_memory.rs`, moka 0.12 with a weigher and per-entry
/// expiry).
pub(crate) const MOKA_RECORDS: usize = 336;

/// The bytes jemalloc hands out for a request of `n`: its size classes are 8, 16 and
/// then four per doubling (…, 1024, 1280, 1536, 1792, 2048, …), large ones included.
pub(crate) fn allocation(n: usize) -> usize {
    match n {
        0 => 0,
        1..=8 => 8,
        9..=128 => n.next_multiple_of(16),
        _ => {
            let below = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            n.next_multiple_of(below / 4)
        }
    }
}

/// A header name's own allocation: none for a standard name, a shared copy of its
/// bytes for any other.
pub(crate) fn header_name(name: &HeaderName) -> usize {
    // A standard name's text is one static string, whichever value holds it.
    let standard = HeaderName::from_bytes(name.as_str().as_bytes())
        .is_ok_and(|n| n.as_str().as_ptr() == name.as_str().as_ptr());
    if standard {
        0
    } else {
        allocation(name.as_str().len()) + SHARED_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_jemallocs_classes() {
        let classes = [
            (1, 8),
            (8, 8),
            (9, 16),
            (17, 32),
            (100, 112),
            (128, 128),
            (129, 160),
            (257, 320),
            (1024, 1024),
            (1025, 1280),
            (1214, 1280),
            (1281, 1536),
            (14_336, 14_336),
            (14_337, 16_384),
            (16_385, 20_480),
        ];
        for (n, class) in classes {
            assert_eq!(allocation(n), class, "{n}");
        }
    }

    #[test]
    fn standard_header_names_cost_nothing_of_their_own() {
        assert_eq!(header_name(&http::header::ACCEPT_ENCODING), 0);
        let custom = HeaderName::from_bytes(b"x-tenant").unwrap();
        assert_eq!(header_name(&custom), 8 + SHARED_BYTES);
    }
}
