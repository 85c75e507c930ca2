//! Support shared by corral's tests, benches and load tool, written once.
//!
//! # Layout
//! - [`cluster`]: a real Redis Cluster (masters and replicas) on free ports, killed on
//!   drop; a master can be killed until its replica is promoted, a slot migrated.
//! - [`redis`]: a real `redis-server` on a free port of 127.0.0.1, killed on drop; it
//!   can be frozen, killed and restarted as the fault tests need.
//! - [`resp`]: a minimal RESP2 client, enough to drive and inspect a node.
//! - [`wait`]: waiting for a condition or a listening port, always with a deadline.
//!
//! This crate does not depend on `corral`: corral's tests use it, and would otherwise
//! build a second copy of corral's types.

pub mod cluster;
pub mod redis;
pub mod resp;
pub mod wait;

pub use cluster::{slot_of, ClusterNode, ClusterOptions, Migration, RedisCluster, Role};
pub use redis::{RedisOptions, RedisServer, StartError};
pub use wait::{eventually, free_port, free_ports, wait_listening, NotListening, DEADLINE};
