//! A real `redis-server` on a free port, killed on drop: the one launcher in
//! `corral-testkit`, under the name the tests use.

#[allow(unused_imports)] // not every test target uses it
pub use corral_testkit::RedisServer;
