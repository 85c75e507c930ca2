//! The cluster launcher against real redis-server processes: it starts a usable
//! cluster, fails a master over, migrates a slot, and leaves nothing behind.

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::time::Duration;

use corral_testkit::resp::{self, Reply};
use corral_testkit::{slot_of, ClusterOptions, RedisCluster, Role};

/// Sends `args` to the cluster as a client would: to any master first, then wherever
/// `MOVED` points. Returns the reply and how many redirects it took.
async fn send(cluster: &RedisCluster, args: &[&str]) -> (Reply, usize) {
    let mut port = cluster.masters()[0];
    for redirects in 0..4 {
        let reply = resp::command(port, args).await.expect("the node answers");
        match &reply {
            Reply::Error(e) if e.starts_with("MOVED ") => {
                let target = e.rsplit(':').next().expect("MOVED slot host:port");
                port = target.parse().expect("a port");
            }
            _ => return (reply, redirects),
        }
    }
    panic!("{args:?} redirected too often");
}

/// [`send`] of `SET key value`, which must succeed.
async fn set(cluster: &RedisCluster, key: &str, value: &str) {
    let (reply, _) = send(cluster, &["SET", key, value]).await;
    assert_eq!(reply, Reply::Status("OK".into()), "SET {key}");
}

fn bulk(text: &str) -> Reply {
    Reply::Bulk(Some(text.as_bytes().to_vec()))
}

/// A key whose slot the master on `port` serves.
async fn key_on(cluster: &RedisCluster, port: u16) -> String {
    for i in 0.. {
        let key = format!("key:{i}");
        if cluster.master_of(slot_of(&key)).await == port {
            return key;
        }
    }
    unreachable!()
}

#[tokio::test]
async fn a_cluster_serves_keys_on_every_master() {
    let cluster = RedisCluster::start(3, 1).await;
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    assert_eq!(cluster.seeds().len(), 3);
    assert!(cluster.seeds()[0].starts_with("redis://127.0.0.1:"));
    let replicas: Vec<_> = (cluster.nodes().iter())
        .filter(|n| n.role == Role::Replica)
        .collect();
    assert_eq!(replicas.len(), 3);
    let replicated: BTreeSet<u16> = replicas.iter().filter_map(|n| n.master).collect();
    assert_eq!(
        replicated,
        masters.iter().copied().collect(),
        "one replica each"
    );

    for &master in &masters {
        let key = key_on(&cluster, master).await;
        set(&cluster, &key, "v").await;
        assert_eq!(
            resp::command(master, &["GET", &key]).await.unwrap(),
            bulk("v")
        );
        let keyslot = resp::command(master, &["CLUSTER", "KEYSLOT", &key]).await;
        assert_eq!(keyslot.unwrap(), Reply::Int(slot_of(&key).into()));
    }
    for key in ["foo", "bar", "{user1000}.following", "foo{}{bar}"] {
        let keyslot = resp::command(masters[0], &["CLUSTER", "KEYSLOT", key]).await;
        assert_eq!(keyslot.unwrap(), Reply::Int(slot_of(key).into()), "{key}");
    }
}

#[tokio::test]
async fn killing_a_master_promotes_its_replica_and_its_slot_serves_again() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let slot = slot_of("{fail}key");
    let master = cluster.master_of(slot).await;
    let replica = (cluster.nodes().iter())
        .find(|n| n.master == Some(master))
        .expect("the master has a replica")
        .port;
    let mut writer = resp::Conn::connect(master).await.unwrap();
    let reply = writer.cmd(&["SET", "{fail}key", "kept"]).await.unwrap();
    assert_eq!(reply, Reply::Status("OK".into()));
    // Replication is asynchronous: wait until the replica has the write. On the
    // writer's connection: WAIT waits for that client's last write, and on another
    // connection returns at once.
    let acked = writer.cmd(&["WAIT", "1", "5000"]).await.unwrap();
    assert_eq!(acked, Reply::Int(1));

    let promoted = cluster.kill_master_of(slot).await;

    assert_eq!(promoted, replica);
    assert_eq!(cluster.master_of(slot).await, promoted);
    let killed = cluster.nodes().iter().find(|n| n.port == master).unwrap();
    assert_eq!(killed.role, Role::Killed);
    assert_eq!(cluster.masters().len(), 3, "the replica took its place");
    assert!(!cluster
        .seeds()
        .contains(&format!("redis://127.0.0.1:{master}")));
    assert_eq!(send(&cluster, &["GET", "{fail}key"]).await.0, bulk("kept"));
    set(&cluster, "{fail}key", "new").await;
}

#[tokio::test]
async fn a_killed_master_restarts_as_a_replica_of_its_successor() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let slot = slot_of("{back}");
    let master = cluster.master_of(slot).await;
    let promoted = cluster.kill_master_of(slot).await;

    cluster.restart(master).await;

    let node = cluster.nodes().iter().find(|n| n.port == master).unwrap();
    assert_eq!((node.role, node.master), (Role::Replica, Some(promoted)));
    assert_eq!(cluster.master_of(slot).await, promoted);
    assert_eq!(cluster.masters().len(), 3);
    let role = resp::command(master, &["ROLE"]).await.unwrap().into_array();
    assert_eq!(role[0].text().as_deref(), Some("slave"));
}

#[tokio::test]
async fn a_migrated_slot_takes_its_keys_and_clients_follow_moved() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let keys: Vec<String> = (0..250).map(|i| format!("{{moving}}{i}")).collect();
    let slot = slot_of(&keys[0]);
    for key in &keys {
        set(&cluster, key, key).await;
    }
    let from = cluster.master_of(slot).await;
    let to = *cluster.masters().iter().find(|&&m| m != from).unwrap();

    cluster.migrate_slot(slot, from, to).await;

    assert_eq!(cluster.master_of(slot).await, to);
    let count = resp::command(to, &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]).await;
    assert_eq!(count.unwrap(), Reply::Int(250), "every key moved");
    let old = resp::command(from, &["GET", &keys[0]]).await.unwrap();
    assert!(
        matches!(&old, Reply::Error(e) if e.starts_with(&format!("MOVED {slot} "))),
        "the old master redirects: {old:?}"
    );
    for key in &keys {
        let mut port = from;
        let mut reply = resp::command(port, &["GET", key]).await.unwrap();
        if let Reply::Error(e) = &reply {
            port = e.rsplit(':').next().unwrap().parse().unwrap();
            reply = resp::command(port, &["GET", key]).await.unwrap();
        }
        assert_eq!((port, reply), (to, bulk(key)));
    }
}

#[tokio::test]
async fn mid_migration_the_source_answers_ask_for_moved_keys_only() {
    let mut cluster = RedisCluster::start(3, 0).await;
    let keys: Vec<String> = (0..10).map(|i| format!("{{ask}}{i}")).collect();
    let slot = slot_of(&keys[0]);
    for key in &keys {
        set(&cluster, key, key).await;
    }
    let from = cluster.master_of(slot).await;
    let to = *cluster.masters().iter().find(|&&m| m != from).unwrap();

    let migration = cluster.begin_migration(slot, from, to).await;
    let moved: Vec<String> = (cluster.move_keys(&migration, 3).await.into_iter())
        .map(|key| String::from_utf8(key).unwrap())
        .collect();
    assert_eq!(moved.len(), 3);
    let kept = keys.iter().find(|&k| !moved.contains(k)).unwrap();
    let moved = &moved[0];

    let ask = resp::command(from, &["GET", moved]).await.unwrap();
    assert_eq!(ask, Reply::Error(format!("ASK {slot} 127.0.0.1:{to}")));
    assert_eq!(
        resp::command(from, &["GET", kept]).await.unwrap(),
        bulk(kept)
    );
    let mut target = resp::Conn::connect(to).await.unwrap();
    target.cmd(&["ASKING"]).await.unwrap();
    assert_eq!(target.cmd(&["GET", moved]).await.unwrap(), bulk(moved));

    while !cluster.move_keys(&migration, usize::MAX).await.is_empty() {}
    cluster.finish_migration(migration).await;
    assert_eq!(cluster.master_of(slot).await, to);
    for key in &keys {
        assert_eq!(send(&cluster, &["GET", key]).await.0, bulk(key));
    }
}

#[tokio::test]
async fn extra_arguments_reach_every_node() {
    let mut options = ClusterOptions::new(3, 1);
    options.args = ["--cluster-require-full-coverage", "no"]
        .map(String::from)
        .to_vec();
    let cluster = RedisCluster::start_with(options).await;
    for node in cluster.nodes() {
        let config = ["CONFIG", "GET", "cluster-require-full-coverage"];
        let reply = resp::command(node.port, &config).await.unwrap();
        assert_eq!(reply.into_array()[1], bulk("no"), "node {}", node.port);
    }
}

#[tokio::test]
async fn a_dropped_cluster_leaves_no_process_or_dir_behind() {
    let cluster = RedisCluster::start(3, 1).await;
    let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.port).collect();
    let dir = cluster.dir().to_path_buf();
    assert_eq!(ports.len(), 6);
    assert!(dir.join(ports[0].to_string()).is_dir());

    drop(cluster);

    for port in ports {
        let addr = ([127, 0, 0, 1], port).into();
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
            "node {port} stopped with its owner"
        );
    }
    assert!(!dir.exists(), "{} removed", dir.display());
}
