//! Compare-and-delete of a lock key ("delete it only if it still holds my token"): the
//! server's own command where it has one, Redis 8.4's `DELEX key IFEQ token` or Valkey
//! 9's `DELIFEQ key token`, else the Lua script every Redis runs.
//!
//! Which one a server has is asked once per connection with `COMMAND INFO`, not read
//! from the version (Valkey reports `redis_version:7.2.4`). A server that stops knowing
//! the command (a rolling downgrade) answers "unknown command": the release falls back
//! to Lua at once and the connection is asked again when it is next opened.
//!
//! Used where a release publishes nothing: on Redlock's independent masters. On the
//! cache's own Redis the release rides in the script that also writes the entry or
//! tells the waiters (one round trip either way), so a native command saves nothing.

use std::sync::atomic::{AtomicU8, Ordering};

use redis::aio::ConnectionLike;
use redis::Value;

/// How a server deletes a key only if it holds a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CompareDelete {
    Lua,
    /// `DELEX key IFEQ value` (Redis 8.4).
    Delex,
    /// `DELIFEQ key value` (Valkey 9).
    Delifeq,
}

impl CompareDelete {
    /// Asks the server on `conn` which it has; `Lua` when it has neither or does not say.
    pub(crate) async fn detect(conn: &mut impl ConnectionLike) -> CompareDelete {
        let mut info = redis::cmd("COMMAND");
        info.arg("INFO").arg("DELEX").arg("DELIFEQ");
        match info.query_async::<Value>(conn).await {
            Ok(reply) => CompareDelete::from_command_info(&reply),
            Err(_) => CompareDelete::Lua,
        }
    }

    /// `COMMAND INFO DELEX DELIFEQ`: one entry per name, nil for an unknown command.
    fn from_command_info(reply: &Value) -> CompareDelete {
        let Value::Array(entries) = reply else {
            return CompareDelete::Lua;
        };
        let known = |i: usize| matches!(entries.get(i), Some(Value::Array(a)) if !a.is_empty());
        if known(0) {
            CompareDelete::Delex
        } else if known(1) {
            CompareDelete::Delifeq
        } else {
            CompareDelete::Lua
        }
    }

    /// The native command deleting `key` if it holds `token`; `None` for Lua.
    pub(crate) fn command(self, key: &str, token: &str) -> Option<redis::Cmd> {
        match self {
            CompareDelete::Lua => None,
            CompareDelete::Delex => {
                Some(redis::cmd("DELEX").arg(key).arg("IFEQ").arg(token).clone())
            }
            CompareDelete::Delifeq => Some(redis::cmd("DELIFEQ").arg(key).arg(token).clone()),
        }
    }

    fn to_u8(self) -> u8 {
        self as u8
    }

    fn from_u8(n: u8) -> CompareDelete {
        match n {
            1 => CompareDelete::Delex,
            2 => CompareDelete::Delifeq,
            _ => CompareDelete::Lua,
        }
    }
}

/// What one connection's server was found to have; any task may read or downgrade it.
#[derive(Default)]
pub(crate) struct DetectedCompareDelete(AtomicU8);

impl DetectedCompareDelete {
    pub(crate) fn get(&self) -> CompareDelete {
        CompareDelete::from_u8(self.0.load(Ordering::Relaxed))
    }

    pub(crate) fn set(&self, found: CompareDelete) {
        self.0.store(found.to_u8(), Ordering::Relaxed);
    }
}

/// Whether `error` says the server does not know the command.
pub(crate) fn unknown_command(error: &redis::RedisError) -> bool {
    error.code() == Some("ERR")
        && error
            .detail()
            .is_some_and(|d| d.to_ascii_lowercase().contains("unknown command"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Value {
        Value::Array(vec![Value::SimpleString("delex".into()), Value::Int(-2)])
    }

    #[test]
    fn command_info_picks_the_native_command() {
        let info = |a, b| Value::Array(vec![a, b]);
        let cases = [
            (info(entry(), Value::Nil), CompareDelete::Delex),
            (info(Value::Nil, entry()), CompareDelete::Delifeq),
            (info(entry(), entry()), CompareDelete::Delex),
            (info(Value::Nil, Value::Nil), CompareDelete::Lua),
            (Value::Nil, CompareDelete::Lua),
        ];
        for (reply, expected) in cases {
            assert_eq!(
                CompareDelete::from_command_info(&reply),
                expected,
                "{reply:?}"
            );
        }
    }

    #[test]
    fn native_commands_have_the_documented_shape() {
        let args = |cmd: redis::Cmd| -> Vec<Vec<u8>> {
            cmd.args_iter()
                .map(|a| match a {
                    redis::Arg::Simple(b) => b.to_vec(),
                    _ => Vec::new(),
                })
                .collect()
        };
        let delex = CompareDelete::Delex.command("k", "t").unwrap();
        assert_eq!(args(delex), [&b"DELEX"[..], b"k", b"IFEQ", b"t"]);
        let delifeq = CompareDelete::Delifeq.command("k", "t").unwrap();
        assert_eq!(args(delifeq), [&b"DELIFEQ"[..], b"k", b"t"]);
        assert!(CompareDelete::Lua.command("k", "t").is_none());
        for n in 0..3 {
            let found = CompareDelete::from_u8(n);
            assert_eq!(CompareDelete::from_u8(found.to_u8()), found);
        }
    }

    /// Against the real redis-server the tests run (Debian's 7.0, which has neither
    /// command): detection says Lua, and a native command sent anyway is refused in the
    /// way the fallback recognises.
    #[tokio::test]
    async fn a_server_without_native_compare_delete_is_detected_and_falls_back() {
        let server = corral_testkit::RedisServer::start().await;
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let version: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .unwrap();
        let has_native = version.contains("redis_version:8.4")
            || version.lines().any(|l| l.starts_with("valkey_version:9"));
        let found = CompareDelete::detect(&mut conn).await;
        if has_native {
            assert_ne!(found, CompareDelete::Lua);
            return;
        }
        assert_eq!(found, CompareDelete::Lua);
        for native in [CompareDelete::Delex, CompareDelete::Delifeq] {
            let cmd = native.command("k", "t").unwrap();
            let error = cmd.query_async::<i64>(&mut conn).await.unwrap_err();
            assert!(unknown_command(&error), "{error}");
        }
    }
}
