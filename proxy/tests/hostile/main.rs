//! The hostile-client suite: raw bytes from clients (and crafted values from origins
//! and Redis) against a real corral in front of an origin that records exactly what it
//! received. Each module is one class of attack from the README's Security section.

#[path = "../support/mod.rs"]
#[allow(unused_imports)] // not every re-export is used by this suite
mod support;

mod admin;
mod config_values;
mod deception;
mod exhaustion;
mod freshness;
mod keying;
mod paths;
mod poisoning;
mod redis_entries;
mod smuggling;
