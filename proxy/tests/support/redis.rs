//! A real `redis-server` on a free port, killed on drop: the one launcher in
//! `corral-testkit`, under the name the tests use.

#[allow(unused_imports)] // not every test target uses it
pub use corral_testkit::RedisServer;

/// One command on `redis` (a connection of its own); its reply as a string, if any.
pub async fn redis_command(redis: &RedisServer, args: &[&str]) -> Option<String> {
    let mut conn = connect(redis).await;
    let mut cmd = ::redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    let reply: ::redis::Value = cmd.query_async(&mut conn).await.unwrap();
    match reply {
        ::redis::Value::Nil => None,
        ::redis::Value::Int(n) => Some(n.to_string()),
        ::redis::Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        ::redis::Value::Double(d) => Some(d.to_string()),
        ::redis::Value::Okay => Some("OK".into()),
        other => Some(format!("{other:?}")),
    }
}

/// Redis's clock, in Unix milliseconds.
pub async fn redis_time_ms(redis: &RedisServer) -> u64 {
    let mut conn = connect(redis).await;
    let (secs, micros): (u64, u64) = ::redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// Calls Redis has answered for `command` (lowercase: `evalsha`), from `INFO
/// commandstats`.
pub async fn command_calls(redis: &RedisServer, command: &str) -> u64 {
    let mut conn = connect(redis).await;
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:");
    info.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn connect(redis: &RedisServer) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}
