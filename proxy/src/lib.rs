//! corral: a stampede-protecting caching HTTP reverse proxy.
//!
//! When a popular entry is missing or expires, corral sends one request upstream and
//! makes every other request for it wait for that one (or serves them the stale copy),
//! instead of letting the whole herd through.
//!
//! # Layout
//!
//! Layers depend one way: `server` → `proxy` → `fill` → `cache` → `redis` → `config`,
//! with the leaves `http`, `route`, `upstream` and `metrics` beside them.
//!
//! - [`config`]: the TOML file's types, their validation into typed settings (each
//!   with its `Default`), and `file:line:key` errors.
//! - [`http`]: what every layer shares: the one body type, header rules (hop-by-hop,
//!   forwarding, `Via`), what a client request becomes once admitted (host, path and
//!   headers normalised once, ambiguous requests refused), and `Cache-Status`.
//! - [`route`]: which route (upstream and cache policy) serves a request.
//! - [`upstream`]: the pooled client per route, timeouts, bounded body reads, outage logs.
//! - [`metrics`]: the Prometheus registry and per-route counters.
//! - [`redis`]: fleet mode's connection to one Redis or a Redis Cluster: commands
//!   behind an outage breaker (per hash slot on a cluster), key names, and the event
//!   channels with who listens on which (purges reach the cache by a callback).
//! - [`cache`]: keys, entries (with their prebuilt HTTP/1.1 heads, and large bodies in
//!   sealed memory files), storage policy, the Redis codec, and the tiers a lookup
//!   walks (local, then shared in Redis in fleet mode).
//! - [`fill`]: the fill protocol: the local permit and its waiters, the fleet lock
//!   (single Redis or Redlock), the coordinator that claims a key across the fleet,
//!   and the fill task that fetches, stores and tells everyone the one outcome.
//! - [`proxy`]: the request path, top to bottom: admission, bypass, the cache path as
//!   explicit phases, passes, purges, and the one place errors become responses.
//! - [`server`]: listeners, connection and request limits, client timeouts, graceful
//!   shutdown, each connection's HTTP/1.1 fast path for fresh local hits (everything
//!   else goes to hyper), and the admin listener.
//! - [`origin`]: a slow, scriptable upstream for the demo, the tests and the load tool.
//! - [`demo`]: `corral demo`, a herd against corral in front of that upstream.

// The module docs are written for corral's developers and link to crate-private items:
// read them with `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod access_log;
pub mod cache;
pub mod config;
pub mod demo;
pub mod fill;
pub mod http;
pub mod metrics;
pub mod origin;
pub mod proxy;
pub mod redis;
pub(crate) mod route;
pub mod server;
pub(crate) mod upstream;

pub use config::Config;
pub use server::{run, start, RunningServer};
