//! The command connection, to one Redis or to a Redis Cluster, behind one type that the
//! rest of corral sends commands, pipelines and scripts through.
//!
//! On a cluster two things differ from one Redis, and this module hides both:
//! - A script unknown to a node (`NOSCRIPT`: first use, a promoted replica, a restarted
//!   node) is sent again as `EVAL` with its body, to the same slot. redis-rs would run
//!   `SCRIPT LOAD` on every node of the cluster instead, which fails as a whole while any
//!   node is down, that is, exactly during a failover.
//! - A pipeline whose commands name keys of several slots (a purge of many keys, the
//!   tag sets of one response) is split by hash slot: each slot's commands run in their
//!   order (as a `MULTI` when the pipeline was atomic), the slots at once, and the
//!   replies are put back in the pipeline's order. Atomicity then holds per slot, which
//!   is all corral relies on (one tag set's `SADD` and expiry).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use futures_util::future::join_all;
use futures_util::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// corral's Lua scripts by SHA1, for the `EVAL` retry on a cluster node that lacks one.
static SCRIPTS: LazyLock<Mutex<HashMap<String, String>>> = LazyLock::new(Mutex::default);

/// A script corral runs, known by body to the cluster retry above.
pub(crate) fn script(code: &str) -> redis::Script {
    let script = redis::Script::new(code);
    SCRIPTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(script.get_hash().to_string(), code.to_string());
    script
}

/// A connection that carries commands (never subscriptions) to the cache's Redis.
#[derive(Clone)]
pub enum Commands {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Commands::Single(c) => c.req_packed_command(cmd),
            Commands::Cluster(c) => cluster_command(c, cmd).boxed(),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Commands::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Commands::Cluster(c) => cluster_pipeline(c.clone(), pipeline).boxed(),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// One command on the cluster, a script sent again with its body when the node lacks it.
async fn cluster_command(conn: &mut ClusterConnection, cmd: &Cmd) -> RedisResult<Value> {
    let reply = conn.req_packed_command(cmd).await;
    // A server error comes back as a value here (a command's caller turns it into an
    // error), or as an error from some paths of the cluster client: catch both.
    let no_script = match &reply {
        Ok(Value::ServerError(e)) => e.code() == "NOSCRIPT",
        Err(e) => e.code() == Some("NOSCRIPT"),
        Ok(_) => false,
    };
    match no_script.then(|| with_body(cmd)).flatten() {
        Some(eval) => conn.req_packed_command(&eval).await,
        None => reply,
    }
}

/// `EVALSHA sha n keys.. args..` as `EVAL body n keys.. args..`, for a corral script.
fn with_body(cmd: &Cmd) -> Option<Cmd> {
    let mut args = cmd.args_iter().map(arg_bytes);
    if !args.next()?.eq_ignore_ascii_case(b"EVALSHA") {
        return None;
    }
    let sha = String::from_utf8(args.next()?.to_vec()).ok()?;
    let body = SCRIPTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&sha)?
        .clone();
    let mut eval = redis::cmd("EVAL");
    eval.arg(body);
    for arg in args {
        eval.arg(arg);
    }
    Some(eval)
}

fn arg_bytes(arg: redis::Arg<&[u8]>) -> &[u8] {
    match arg {
        redis::Arg::Simple(bytes) => bytes,
        // Cursor arguments are for SCAN, which corral does not send.
        _ => b"",
    }
}

/// The hash slot group of a command: the hash tag of its first key (`{...}`), else
/// the whole key. Commands of one group share a slot; two groups may too, which only
/// costs a separate request. `None` for a command without a key.
fn slot_group(cmd: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd.args_iter().map(arg_bytes).collect();
    let name = args.first()?.to_ascii_uppercase();
    let key = match name.as_slice() {
        b"EVAL" | b"EVALSHA" => {
            let keys: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            (keys > 0).then(|| args.get(3)).flatten()?
        }
        b"SCRIPT" | b"MULTI" | b"EXEC" | b"PING" | b"INFO" => return None,
        _ => args.get(1)?,
    };
    Some(hash_tag(key).to_vec())
}

/// The part of `key` Redis Cluster hashes: the first non-empty `{...}`, else all of it.
pub(super) fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// A pipeline on the cluster, split by slot (see the module doc). Keyless commands
/// (`SCRIPT LOAD` put in front of scripts) are not sent: a script the node lacks is
/// sent again with its body instead; their replies are `OK`. Publications go last, once
/// every other group has answered: on one Redis a pipeline's `PUBLISH` after its
/// writes is only delivered after them, and an instance told of a purge must not read
/// the entry it purges.
async fn cluster_pipeline(conn: ClusterConnection, pipeline: &Pipeline) -> RedisResult<Vec<Value>> {
    let cmds: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let mut groups: Vec<(Vec<u8>, Vec<usize>)> = Vec::new();
    for (i, cmd) in cmds.iter().enumerate() {
        let Some(group) = slot_group(cmd) else {
            continue;
        };
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, members)) => members.push(i),
            None => groups.push((group, vec![i])),
        }
    }
    let atomic = pipeline.is_transaction();
    let (last, first): (Vec<_>, Vec<_>) = groups
        .into_iter()
        .partition(|(_, members)| members.iter().all(|&i| is_publish(cmds[i])));
    let mut replies = vec![Value::Okay; cmds.len()];
    for stage in [first, last] {
        let runs = stage.iter().map(|(_, members)| {
            let members: Vec<Cmd> = members.iter().map(|&i| cmds[i].clone()).collect();
            run_group(conn.clone(), members, atomic)
        });
        for ((_, members), group_replies) in stage.iter().zip(join_all(runs).await) {
            for (&i, reply) in members.iter().zip(group_replies?) {
                replies[i] = reply;
            }
        }
    }
    Ok(if atomic {
        vec![Value::Array(replies)]
    } else {
        replies
    })
}

/// One slot's commands in their order: one `MULTI` when the pipeline was atomic.
async fn run_group(
    mut conn: ClusterConnection,
    members: Vec<Cmd>,
    atomic: bool,
) -> RedisResult<Vec<Value>> {
    if atomic {
        let mut multi = redis::pipe();
        multi.atomic();
        for cmd in members {
            multi.add_command(cmd);
        }
        return multi.query_async::<Vec<Value>>(&mut conn).await;
    }
    let mut replies = Vec::with_capacity(members.len());
    for cmd in &members {
        replies.push(cluster_command(&mut conn, cmd).await?);
    }
    Ok(replies)
}

fn is_publish(cmd: &Cmd) -> bool {
    cmd.args_iter().next().map(arg_bytes).is_some_and(|name| {
        name.eq_ignore_ascii_case(b"PUBLISH") || name.eq_ignore_ascii_case(b"SPUBLISH")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_group_by_the_hash_tag_of_their_first_key() {
        let get = |k: &str| redis::cmd("GET").arg(k).clone();
        assert_eq!(slot_group(&get("p{ab}:e:1")), Some(b"ab".to_vec()));
        assert_eq!(slot_group(&get("p{}x")), Some(b"p{}x".to_vec()));
        assert_eq!(slot_group(&get("plain")), Some(b"plain".to_vec()));
        let eval = redis::cmd("EVALSHA")
            .arg("sha")
            .arg(2)
            .arg("p{t}:l")
            .arg("x")
            .clone();
        assert_eq!(slot_group(&eval), Some(b"t".to_vec()));
        let keyless = redis::cmd("EVALSHA").arg("sha").arg(0).arg("a").clone();
        assert_eq!(slot_group(&keyless), None);
        assert_eq!(
            slot_group(&redis::cmd("SCRIPT").arg("LOAD").arg("x").clone()),
            None
        );
    }

    #[test]
    fn a_known_script_is_sent_again_with_its_body() {
        let s = script("return 7");
        let call = redis::cmd("EVALSHA")
            .arg(s.get_hash())
            .arg(1)
            .arg("k")
            .arg("a")
            .clone();
        let eval = with_body(&call).unwrap();
        let args: Vec<Vec<u8>> = eval.args_iter().map(|a| arg_bytes(a).to_vec()).collect();
        assert_eq!(args, [&b"EVAL"[..], b"return 7", b"1", b"k", b"a"]);
        let unknown = redis::cmd("EVALSHA").arg("0000").arg(0).clone();
        assert!(with_body(&unknown).is_none());
        assert!(with_body(&redis::cmd("GET").arg("k").clone()).is_none());
    }
}
