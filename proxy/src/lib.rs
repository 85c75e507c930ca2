//! corral: a stampede-protecting caching HTTP reverse proxy.
//!
//! When a popular entry is missing or expires, corral sends one request upstream and
//! makes every other request for it wait for that one (or serves them the stale copy),
//! instead of letting the whole herd through.
//!
//! # Layout
//!
//! - [`config`]: the TOML file's types and their validation into typed settings.
//! - [`request`]: what corral accepts from a client: host, path and headers normalised
//!   once, for routing, keying and forwarding alike; ambiguous requests refused.
//! - [`route`]: which route (upstream and cache policy) serves a request.
//! - [`cache`]: keys, entries (with their prebuilt HTTP/1.1 heads, and large bodies in
//!   sealed memory files), storage policy, and the tiers a lookup walks (local, then
//!   shared in Redis in fleet mode).
//! - [`lock`]: fill locks: who fetches a key (in this process, then across the fleet),
//!   and how waiters learn the outcome.
//! - [`fleet`]: fleet mode's Redis connection, outage breaker and cross-instance events.
//! - [`upstream`]: the pooled client per route, timeouts, bounded body reads, outage logs.
//! - [`proxy`]: the request path, top to bottom, in one place.
//! - [`status`]: the `Cache-Status` header and the outcome classes counted in metrics.
//! - [`error`]: request-path errors and the one function that turns them into responses.
//! - [`headers`]: hop-by-hop removal, `Via`, forwarding headers (corral's own unless
//!   the peer is a trusted proxy), `Cookie` fields joined.
//! - [`body`]: the one body type for responses and forwarded requests.
//! - [`server`]: listeners, connection and request limits, client timeouts, graceful
//!   shutdown, and each connection's HTTP/1.1 fast path for fresh local hits
//!   (everything else goes to hyper).
//!   Its `admin` listener: `/healthz`, `/readyz`, `/metrics`, and `POST /purge` behind
//!   its guard.
//! - [`purge`]: a purge request resolved to cache keys as requests are keyed.
//! - [`metrics`]: the Prometheus registry and per-route counters.
//! - [`origin`]: a slow, scriptable upstream for the demo, the tests and the load tool.
//! - [`demo`]: `corral demo`, a herd against corral in front of that upstream.

pub mod body;
pub mod cache;
pub mod config;
pub mod demo;
pub mod error;
pub mod fleet;
pub mod headers;
pub mod lock;
pub mod metrics;
pub mod origin;
pub mod proxy;
pub mod purge;
pub mod request;
pub mod route;
pub mod server;
pub mod status;
pub mod upstream;

pub use config::Config;
pub use server::{run, start, RunningServer};
