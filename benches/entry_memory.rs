//! Where a cached entry's bytes go: builds N entries the way a fill does (headers as
//! slices of a read buffer, the body copied into a buffer of its own), then stores them
//! in the local tier, and reports jemalloc's allocated bytes per entry at each step
//! beside the weigher's count. The end-to-end figure (process RSS, and Varnish beside
//! it) is `benches/memory.sh`; this one says which part of it is what.
//!
//! Run: `cargo bench -p corral --bench entry_memory` (`N=...` to change the count).

#[path = "../proxy/tests/support/entries.rs"]
mod entries;

use std::sync::Arc;

use corral::cache::entry::CacheEntry;
use corral::cache::{Cache, CacheKey, LocalCache};
use corral::config::Config;
use entries::{allocated, sample_entry, sample_key, Shape};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let config = Config::parse(
        "listen = \"127.0.0.1:1\"\n[[route]]\nname = \"mem\"\nupstream = \"http://u\"\n",
        "entry_memory",
    )
    .unwrap();
    let route = &config.routes[0];
    println!("entries: {n} (1 KiB bodies, 5 stored fields)");
    println!(
        "size_of::<CacheEntry>(): {} bytes",
        std::mem::size_of::<CacheEntry>()
    );
    let per = |bytes: usize| bytes as f64 / n as f64;

    let start = allocated();
    let entries: Vec<Arc<CacheEntry>> = (0..n)
        .map(|i| Arc::new(sample_entry(route, Shape::SMALL, i)))
        .collect();
    let built = allocated();
    let vec = n * std::mem::size_of::<usize>();
    println!(
        "entry (Arc<CacheEntry>, head and body): {:.0} bytes allocated per entry",
        per(built - start - vec)
    );

    let keys: Vec<CacheKey> = (0..n).map(|i| sample_key(route, i)).collect();
    let keyed = allocated();
    let vec = n * std::mem::size_of::<CacheKey>();
    println!(
        "key: {:.0} bytes allocated per key",
        per(keyed - built - vec)
    );

    let cache = Cache::new(LocalCache::new(4 << 30, None), None);
    let before_store = allocated();
    for (key, entry) in keys.iter().zip(&entries) {
        cache.store(key, Arc::clone(entry));
    }
    cache.local().sync();
    println!(
        "local tier (moka's own records): {:.0} bytes allocated per entry",
        per(allocated() - before_store)
    );
    drop(keys);
    drop(entries);
    let total = allocated() - start;
    let weighed = cache.local().weighted_size() as usize;
    println!(
        "total: {:.0} bytes allocated per entry; weigher: {:.0} per entry ({:.2}x allocated)",
        per(total),
        per(weighed),
        weighed as f64 / total as f64
    );
}
