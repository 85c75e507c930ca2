//! The local tier's byte bound is a memory bound: the weigher counts what an entry
//! really costs (held against jemalloc's own count of allocated bytes, corral's
//! allocator), and a cache filled far past `max_bytes` holds no more than that.
//! Process RSS, and Varnish beside it, are measured by `benches/memory.sh`.

#[path = "support/entries.rs"]
mod entries;

use std::sync::{Arc, Mutex};

use corral::cache::{Cache, CacheKey, LocalCache};
use corral::config::{Config, RouteConfig};
use entries::{allocated, sample_entry, sample_key, Shape};
use http::{HeaderMap, Uri};

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

/// Stores `n` objects in `cache` by `store(i)`; returns the bytes allocated for them.
fn fill(cache: &Cache, n: usize, mut store: impl FnMut(usize)) -> usize {
    let before = allocated();
    for i in 0..n {
        store(i);
    }
    cache.local().sync();
    allocated() - before
}

/// Stores `n` entries shaped `shape` on `route`; returns the bytes allocated for them.
fn fill_shaped(cache: &Cache, route: &RouteConfig, shape: Shape, n: usize) -> usize {
    fill(cache, n, |i| {
        let entry = Arc::new(sample_entry(route, shape, i));
        cache.store(&sample_key(route, i), entry);
    })
}

/// What the weigher counts per object and jemalloc allocated, and their ratio, after
/// `used` bytes were allocated for `n` objects.
fn figures(cache: &Cache, n: usize, used: usize) -> (String, f64) {
    let weighed = cache.local().weighted_size() as usize;
    let ratio = weighed as f64 / used as f64;
    let text = format!(
        "weigher {} bytes/entry, jemalloc {} ({ratio:.2}x)",
        weighed / n,
        used / n
    );
    println!("{text}");
    (text, ratio)
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
            unique_tags: 0,
        },
        Shape {
            body: 3000,
            extra_fields: 12,
            vary: false,
            unique_tags: 0,
        },
        Shape {
            body: 1024,
            extra_fields: 2,
            vary: true,
            unique_tags: 0,
        },
    ];
    let config = config();
    for shape in shapes {
        let cache = Cache::new(LocalCache::new(1 << 30, None), None);
        let n = 20_000;
        let used = fill_shaped(&cache, &config.routes[0], shape, n);
        assert_eq!(
            cache.local().entry_count() as usize,
            if shape.vary { 2 * n } else { n }
        );
        let (text, ratio) = figures(&cache, n, used);
        assert!((0.9..=1.1).contains(&ratio), "{shape:?}: {text}");
    }
}

#[test]
fn a_full_cache_holds_no_more_memory_than_max_bytes() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let max_bytes = 16 << 20;
    let cache = Cache::new(LocalCache::new(max_bytes, None), None);
    let shape = Shape::SMALL;
    // About three times what fits.
    let used = fill_shaped(
        &cache,
        &config().routes[0],
        shape,
        3 * max_bytes as usize / 1500,
    );
    let held = cache.local().entry_count() as usize;
    println!("{used} bytes allocated for a cache of {max_bytes} bytes holding {held} entries");
    assert!(held > 0 && cache.local().weighted_size() <= max_bytes);
    assert!(
        used as f64 <= 1.2 * max_bytes as f64,
        "{used} bytes allocated for a cache of {max_bytes} (holding {held} entries)"
    );
}

/// A route with purge tags, and an origin that gives every object tags of its own:
/// the index keeps each tag's text, a slot in its outer map and a map of its own per
/// tag, all counted (review of issue 13: they were a flat 64 bytes a tag, 0.47x).
#[test]
fn the_weigher_counts_what_unique_purge_tags_cost() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let config = Config::parse(
        "listen = \"127.0.0.1:1\"\n[[route]]\nname = \"mem\"\nupstream = \"http://u\"\n\
         tag_header = \"surrogate-key\"\n",
        "memory test",
    )
    .unwrap();
    let route = &config.routes[0];
    let proxy = corral::proxy::Proxy::new(&config, Arc::new(corral::metrics::Metrics::new()));
    let cache = proxy.cache().clone();
    let n = 5_000;
    let shape = Shape {
        unique_tags: 16,
        ..Shape::SMALL
    };
    let used = fill_shaped(&cache, route, shape, n);
    assert_eq!(cache.local().index_records(), 16 * n);
    let (text, ratio) = figures(&cache, n, used);
    assert!(
        (0.9..=1.1).contains(&ratio),
        "16 unique tags per entry: {text}"
    );
}

/// A response with `Vary` stored for a long URL (a client chooses the URL): the
/// variant's index label holds its own copy of the primary key's text, counted (review
/// of issue 13: a flat 256 bytes, 0.73x).
#[test]
fn the_weigher_counts_variant_records_of_long_urls() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let config = config();
    let cache = Cache::new(LocalCache::new(1 << 30, None), None);
    let path = "p".repeat(4000);
    let n = 5_000;
    let shape = Shape {
        vary: true,
        ..Shape::SMALL
    };
    let route = &config.routes[0];
    let used = fill(&cache, n, |i| {
        let uri: Uri = format!("/{path}/{i}").parse().unwrap();
        let key = CacheKey::for_request(route, Some("api.example.com"), &uri, &HeaderMap::new());
        cache.store(&key, Arc::new(sample_entry(route, shape, i)));
    });
    assert_eq!(cache.local().entry_count() as usize, 2 * n);
    let (text, ratio) = figures(&cache, n, used);
    assert!((0.9..=1.1).contains(&ratio), "4 KB URLs with Vary: {text}");
}
