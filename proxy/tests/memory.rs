//! The local tier's byte bound is a memory bound: the weigher counts what an entry
//! really costs (held against jemalloc's own count of allocated bytes, corral's
//! allocator), and a cache filled far past `max_bytes` holds no more than that.
//! Process RSS, and Varnish beside it, are measured by `benches/memory.sh`.

#[path = "support/entries.rs"]
mod entries;

use std::sync::{Arc, Mutex};

use corral::cache::{Cache, LocalCache};
use corral::config::Config;
use entries::{allocated, sample_entry, sample_key, Shape};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's counts are per process: one measurement at a time.
static MEASURING: Mutex<()> = Mutex::new(());

fn config() -> Config {
    Config::parse(
        "listen = \"127.0.0.1:1\"\n[[route]]\nname = \"mem\"\nupstream = \"http://u\"\n",
        "memory test",
    )
    .unwrap()
}

/// Stores `n` entries shaped `shape` in `cache`; returns the bytes allocated for them.
fn fill(cache: &Cache, shape: Shape, n: usize) -> usize {
    let config = config();
    let route = &config.routes[0];
    let before = allocated();
    for i in 0..n {
        cache.store(
            &sample_key(route, i),
            Arc::new(sample_entry(route, shape, i)),
        );
    }
    cache.local().sync();
    allocated() - before
}

#[test]
fn the_weigher_counts_what_entries_really_cost() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let shapes = [
        Shape::SMALL,
        Shape {
            body: 100,
            extra_fields: 0,
            vary: false,
        },
        Shape {
            body: 3000,
            extra_fields: 12,
            vary: false,
        },
        Shape {
            body: 1024,
            extra_fields: 2,
            vary: true,
        },
    ];
    for shape in shapes {
        let cache = Cache::new(LocalCache::new(1 << 30, None), None);
        let n = 20_000;
        let used = fill(&cache, shape, n);
        let weighed = cache.local().weighted_size() as usize;
        let ratio = weighed as f64 / used as f64;
        assert_eq!(
            cache.local().entry_count() as usize,
            if shape.vary { 2 * n } else { n }
        );
        let figures = format!(
            "{shape:?}: weigher {} bytes/entry, jemalloc {} ({ratio:.2}x)",
            weighed / n,
            used / n
        );
        println!("{figures}");
        assert!((0.9..=1.1).contains(&ratio), "{figures}");
    }
}

#[test]
fn a_full_cache_holds_no_more_memory_than_max_bytes() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let max_bytes = 16 << 20;
    let cache = Cache::new(LocalCache::new(max_bytes, None), None);
    let shape = Shape::SMALL;
    // About three times what fits.
    let used = fill(&cache, shape, 3 * max_bytes as usize / 1500);
    let held = cache.local().entry_count() as usize;
    println!("{used} bytes allocated for a cache of {max_bytes} bytes holding {held} entries");
    assert!(held > 0 && cache.local().weighted_size() <= max_bytes);
    assert!(
        used as f64 <= 1.2 * max_bytes as f64,
        "{used} bytes allocated for a cache of {max_bytes} (holding {held} entries)"
    );
}
