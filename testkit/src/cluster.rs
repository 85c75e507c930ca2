//! A real Redis Cluster on free ports of 127.0.0.1, for the tests of fleet mode on a
//! cluster: masters and replicas each a `redis-server --cluster-enabled yes` in its own
//! temp dir, joined by `redis-cli --cluster create`, all killed and their dirs removed
//! on drop.
//!
//! It owns the faults a cluster test needs and waits until each is over, always with a
//! deadline: a master killed and its replica promoted ([`RedisCluster::kill_master_of`]),
//! a killed node back as a replica ([`RedisCluster::restart`]), a slot migrated to
//! another master at once ([`RedisCluster::migrate_slot`]) or step by step, so that a
//! test can act while the source answers `ASK` ([`RedisCluster::begin_migration`]).
//! What it knows of the cluster ([`RedisCluster::nodes`]) is re-read from `CLUSTER
//! NODES` after each, once every node agrees.

mod slot;
mod view;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

pub use slot::{slot_of, SLOTS};
use view::{NodeLine, View};

use crate::resp::{self, Reply};
use crate::wait::{eventually, free_ports, DEADLINE};

/// `cluster-node-timeout`: how long a silent master takes to be failed over. Short so
/// that failover tests are quick; long enough that a loaded CI machine does not fail
/// over a healthy node.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// What a node is, as the cluster last said (or [`Role::Killed`] by the launcher).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Master,
    Replica,
    Killed,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Replica => "replica",
            Role::Killed => "killed",
        }
    }
}

/// One node, as of the launcher's last look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub port: u16,
    /// The cluster's 40-character node id.
    pub id: String,
    pub role: Role,
    /// A replica's master (its port); `None` for masters and killed nodes.
    pub master: Option<u16>,
}

impl ClusterNode {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// A slot between [`RedisCluster::begin_migration`] and
/// [`RedisCluster::finish_migration`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub slot: u16,
    /// The source master's port.
    pub from: u16,
    /// The destination master's port.
    pub to: u16,
    from_id: String,
    to_id: String,
}

/// One redis-server process of the cluster.
struct Process {
    port: u16,
    bus_port: u16,
    child: Option<Child>,
}

/// A running Redis Cluster; every node is killed (SIGKILL) and the temp dirs removed
/// when dropped (kept, with each node's `redis.log`, when a test panics).
pub struct RedisCluster {
    dir: PathBuf,
    /// More arguments for every node's command line.
    args: Vec<String>,
    processes: Vec<Process>,
    nodes: Vec<ClusterNode>,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// At least 3.
    pub masters: usize,
    pub replicas_per_master: usize,
    /// More arguments for every node, after the launcher's own (so they win), e.g.
    /// `--cluster-require-full-coverage no`: by default every node refuses every key
    /// (`CLUSTERDOWN`) from the moment a master is marked failed until its replica is
    /// promoted (about 1 s here).
    pub args: Vec<String>,
}

impl ClusterOptions {
    pub fn new(masters: usize, replicas_per_master: usize) -> ClusterOptions {
        ClusterOptions {
            masters,
            replicas_per_master,
            args: Vec::new(),
        }
    }
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas_per_master` replicas each and waits, without
    /// blocking the runtime, until every node sees all 16384 slots served, all nodes
    /// agree on who serves and replicates what, and every replica's link to its master
    /// is up. About 2 s for 3 + 3 nodes. Panics when it cannot (CI installs redis).
    pub async fn start(masters: usize, replicas_per_master: usize) -> RedisCluster {
        RedisCluster::start_with(ClusterOptions::new(masters, replicas_per_master)).await
    }

    /// [`RedisCluster::start`] with `options`.
    pub async fn start_with(options: ClusterOptions) -> RedisCluster {
        let ClusterOptions {
            masters,
            replicas_per_master,
            args,
        } = options;
        assert!(masters >= 3, "Redis Cluster needs at least 3 masters");
        let mut cluster = RedisCluster {
            dir: unique_dir(),
            args,
            processes: Vec::new(),
            nodes: Vec::new(),
        };
        std::fs::create_dir_all(&cluster.dir).expect("a temp dir for the cluster");
        let count = masters * (1 + replicas_per_master);
        let ports = free_ports(2 * count).expect("free ports");
        for pair in ports.chunks(2) {
            let process = cluster.launch(pair[0], pair[1]);
            cluster.processes.push(process);
        }
        for i in 0..count {
            cluster.wait_up(i, true).await;
        }
        cluster.create(replicas_per_master).await;
        cluster.wait_consistent().await;
        cluster.refresh().await;
        cluster
    }

    /// Starts one node, without waiting for it.
    fn launch(&self, port: u16, bus_port: u16) -> Process {
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir).expect("a temp dir for a cluster node");
        let config_file = dir.join(format!("nodes-{port}.conf"));
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &config_file.to_string_lossy(),
            "--cluster-node-timeout",
            &NODE_TIMEOUT_MS.to_string(),
            "--port",
            &port.to_string(),
            // Chosen rather than port + 10000, which may be taken or above 65535.
            "--cluster-port",
            &bus_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir.to_string_lossy(),
            "--logfile",
            &dir.join("redis.log").to_string_lossy(),
            "--save",
            "",
            "--appendonly",
            "no",
            // A master otherwise waits 5 s for more replicas before their first sync.
            "--repl-diskless-sync-delay",
            "0",
        ]
        .map(String::from);
        let child = Command::new("redis-server")
            .args(&args)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (the CI script installs it)");
        Process {
            port,
            bus_port,
            child: Some(child),
        }
    }

    /// Waits until node `i` answers as itself (`INFO server` gives its pid). A new node
    /// (`may_move`) whose port or bus port another process took after [`free_ports`]
    /// chose them exits at once; it is started again on other ports.
    async fn wait_up(&mut self, i: usize, may_move: bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let port = self.processes[i].port;
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on port {port} did not start"
            );
            let child = self.processes[i].child.as_mut().expect("launched");
            if child.try_wait().expect("waitpid").is_some() {
                assert!(may_move, "redis-server on port {port} exited (port taken?)");
                let _ = std::fs::remove_dir_all(self.dir.join(port.to_string()));
                let ports = free_ports(2).expect("free ports");
                self.processes[i] = self.launch(ports[0], ports[1]);
                continue;
            }
            let pid = format!("process_id:{}\r\n", child.id());
            let info = resp::command(port, &["INFO", "server"]).await;
            if info
                .ok()
                .and_then(|info| info.text())
                .is_some_and(|i| i.contains(&pid))
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// `redis-cli --cluster create`: assigns the slots, meets the nodes, pairs replicas.
    async fn create(&self, replicas_per_master: usize) {
        let mut cli = tokio::process::Command::new("redis-cli");
        cli.arg("--cluster").arg("create");
        cli.args(
            self.processes
                .iter()
                .map(|p| format!("127.0.0.1:{}", p.port)),
        );
        cli.args(["--cluster-replicas", &replicas_per_master.to_string()]);
        cli.arg("--cluster-yes")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(DEADLINE, cli.output())
            .await
            .expect("redis-cli --cluster create finishes in time")
            .expect("redis-cli is installed (Debian's redis-tools; the CI script installs it)");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }

    /// Waits until every live node reports `cluster_state:ok` with all slots assigned
    /// and knows every node, every replica's link to its master is up, and every node's
    /// view agrees with what each live node says of itself (role, master, slots): until
    /// then, a client may be told of a replica that is not one yet.
    async fn wait_consistent(&self) {
        let ports = self.live_ports();
        let count = self.processes.len();
        eventually("every cluster node is ok and agrees", || {
            let ports = ports.clone();
            async move {
                let mut views = Vec::new();
                for &port in &ports {
                    let view = View::of(port).await?;
                    let ok = node_ok(port, count, view.myself()?.is_master()).await?;
                    ok.then_some(())?;
                    views.push(view);
                }
                let selves: Vec<&NodeLine> =
                    views.iter().map(View::myself).collect::<Option<_>>()?;
                let agree = (views.iter()).all(|view| selves.iter().all(|me| view.agrees(me)));
                agree.then_some(())
            }
        })
        .await;
    }

    /// Re-reads the nodes' roles from a live node's `CLUSTER NODES`.
    async fn refresh(&mut self) {
        let port = self.live_ports()[0];
        let view = eventually("CLUSTER NODES answers", || View::of(port)).await;
        let nodes = self.processes.iter().map(|process| {
            let line = view.by_port(process.port).expect("every node in the view");
            let master = line.master_id.as_deref().and_then(|id| view.by_id(id));
            let role = match (&process.child, line.is_master()) {
                (None, _) => Role::Killed,
                (Some(_), true) => Role::Master,
                (Some(_), false) => Role::Replica,
            };
            ClusterNode {
                port: process.port,
                id: line.id.clone(),
                role,
                master: master.filter(|_| role == Role::Replica).map(|m| m.port),
            }
        });
        self.nodes = nodes.collect();
    }

    /// The nodes, as of the last start, failover or migration.
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// The live masters' ports.
    pub fn masters(&self) -> Vec<u16> {
        let masters = self.nodes.iter().filter(|n| n.role == Role::Master);
        masters.map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:port` of every live master: the seeds a client starts from.
    pub fn seeds(&self) -> Vec<String> {
        let masters = self.nodes.iter().filter(|n| n.role == Role::Master);
        masters.map(ClusterNode::url).collect()
    }

    /// The temp dir holding the nodes' dirs (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The port of the master serving `slot`, as the cluster says now.
    pub async fn master_of(&self, slot: u16) -> u16 {
        let port = self.live_ports()[0];
        let view = eventually("CLUSTER NODES answers", || View::of(port)).await;
        view.owner_of(slot).expect("every slot is served").port
    }

    /// Kills (SIGKILL) the master serving `slot` and waits until one of its replicas is
    /// promoted and every live node agrees; returns the new master's port. Panics when
    /// that master has no replica.
    pub async fn kill_master_of(&mut self, slot: u16) -> u16 {
        let master = self.master_of(slot).await;
        let replicas: Vec<u16> = (self.nodes.iter())
            .filter(|n| n.role == Role::Replica && n.master == Some(master))
            .map(|n| n.port)
            .collect();
        assert!(!replicas.is_empty(), "no replica of {master} to promote");
        self.kill(master);
        let promoted = eventually("a replica is promoted", || {
            let replicas = replicas.clone();
            async move {
                for port in replicas {
                    let role = resp::command(port, &["ROLE"]).await.ok()?.into_array();
                    if role.first().and_then(Reply::text).as_deref() == Some("master") {
                        return Some(port);
                    }
                }
                None
            }
        })
        .await;
        self.wait_owner(slot, promoted).await;
        self.wait_consistent().await;
        self.refresh().await;
        promoted
    }

    /// Kills the node on `port` (SIGKILL, as a crash would) without waiting for the
    /// cluster to notice.
    pub fn kill(&mut self, port: u16) {
        let process = self.processes.iter_mut().find(|p| p.port == port);
        if let Some(mut child) = process.and_then(|p| p.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for node in self.nodes.iter_mut().filter(|n| n.port == port) {
            node.role = Role::Killed;
            node.master = None;
        }
    }

    /// Starts the killed node on `port` again, on the same ports and with its own
    /// `nodes.conf`: it rejoins as a replica of whoever took its slots. Waits until it
    /// is in sync and every node agrees.
    pub async fn restart(&mut self, port: u16) {
        let i =
            (self.processes.iter().position(|p| p.port == port)).expect("a node of this cluster");
        assert!(self.processes[i].child.is_none(), "{port} was killed");
        self.processes[i] = self.launch(port, self.processes[i].bus_port);
        self.wait_up(i, false).await;
        self.wait_consistent().await;
        self.refresh().await;
    }

    /// Moves `slot` and its keys from the master on port `from` to the one on `to`, as
    /// the cluster specification describes: [`RedisCluster::begin_migration`], all of
    /// [`RedisCluster::move_keys`], [`RedisCluster::finish_migration`].
    pub async fn migrate_slot(&mut self, slot: u16, from: u16, to: u16) {
        let migration = self.begin_migration(slot, from, to).await;
        while !self.move_keys(&migration, usize::MAX).await.is_empty() {}
        self.finish_migration(migration).await;
    }

    /// `CLUSTER SETSLOT <slot> IMPORTING` on `to`, then `MIGRATING` on `from`: from now
    /// on `from` answers `ASK` for the slot's keys it no longer has.
    pub async fn begin_migration(&self, slot: u16, from: u16, to: u16) -> Migration {
        let id = |port: u16| {
            let node = self.nodes.iter().find(|n| n.port == port);
            node.expect("a node of this cluster").id.clone()
        };
        let migration = Migration {
            slot,
            from,
            to,
            from_id: id(from),
            to_id: id(to),
        };
        let owner = self.master_of(slot).await;
        assert_eq!(owner, from, "{from} serves slot {slot}");
        let slot = slot.to_string();
        let importing = ["CLUSTER", "SETSLOT", &slot, "IMPORTING", &migration.from_id];
        ok(to, &importing).await;
        let migrating = ["CLUSTER", "SETSLOT", &slot, "MIGRATING", &migration.to_id];
        ok(from, &migrating).await;
        migration
    }

    /// Moves up to `max` of the slot's keys (`MIGRATE ... KEYS` in batches of at most
    /// 100 from `CLUSTER GETKEYSINSLOT`); returns those moved, none once all have been.
    pub async fn move_keys(&self, migration: &Migration, max: usize) -> Vec<Vec<u8>> {
        let (slot, to) = (migration.slot.to_string(), migration.to.to_string());
        let mut moved = Vec::new();
        while moved.len() < max {
            let batch = (max - moved.len()).min(100).to_string();
            let getkeys = ["CLUSTER", "GETKEYSINSLOT", &slot, &batch];
            let keys = expect_reply(migration.from, &getkeys).await.into_array();
            let keys: Vec<Vec<u8>> = (keys.into_iter())
                .filter_map(|key| match key {
                    Reply::Bulk(Some(key)) => Some(key),
                    _ => None,
                })
                .collect();
            if keys.is_empty() {
                break;
            }
            let migrate = ["MIGRATE", "127.0.0.1", &to, "", "0", "5000", "KEYS"];
            let mut migrate: Vec<Vec<u8>> = migrate.map(|a| a.as_bytes().to_vec()).to_vec();
            migrate.extend(keys.iter().cloned());
            ok(migration.from, &migrate).await;
            moved.extend(keys);
        }
        moved
    }

    /// `CLUSTER SETSLOT <slot> NODE <to>` on every master, and waits until every live
    /// node agrees that `to` serves the slot. Keys still on `from` are lost to clients.
    pub async fn finish_migration(&mut self, migration: Migration) {
        let Migration { slot, from, to, .. } = migration;
        let node = [
            "CLUSTER",
            "SETSLOT",
            &slot.to_string(),
            "NODE",
            &migration.to_id,
        ];
        // Destination first, so the slot is never served by nobody.
        let mut masters = vec![to, from];
        masters.extend(self.masters().into_iter().filter(|&m| m != to && m != from));
        for master in masters {
            ok(master, &node).await;
        }
        self.wait_owner(slot, to).await;
        self.wait_consistent().await;
        self.refresh().await;
    }

    /// Waits until every live node says the master on `port` serves `slot`.
    async fn wait_owner(&self, slot: u16, port: u16) {
        let ports = self.live_ports();
        eventually("every node sees the slot's new master", || {
            let ports = ports.clone();
            async move {
                for node in ports {
                    let view = View::of(node).await?;
                    let owner: &NodeLine = view.owner_of(slot)?;
                    if owner.port != port {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
    }

    fn live_ports(&self) -> Vec<u16> {
        let live = self.processes.iter().filter(|p| p.child.is_some());
        live.map(|p| p.port).collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for port in self.live_ports() {
            self.kill(port);
        }
        if std::thread::panicking() {
            // Its nodes' logs say why a cluster test failed.
            eprintln!("testkit: cluster logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether the node on `port` says the cluster is ok with all slots assigned and
/// `count` nodes known, and (a replica) that its link to its master is up.
async fn node_ok(port: u16, count: usize, master: bool) -> Option<bool> {
    let info = resp::command(port, &["CLUSTER", "INFO"])
        .await
        .ok()?
        .text()?;
    let ok = info.contains("cluster_state:ok")
        && info.contains("cluster_slots_assigned:16384")
        && info.contains(&format!("cluster_known_nodes:{count}\r\n"));
    if !ok || master {
        return Some(ok);
    }
    let role = resp::command(port, &["ROLE"]).await.ok()?.into_array();
    Some(role.get(3).and_then(Reply::text).as_deref() == Some("connected"))
}

/// Sends a command that must succeed; panics with the node's error otherwise.
async fn expect_reply<A: AsRef<[u8]>>(port: u16, args: &[A]) -> Reply {
    let reply = resp::command(port, args).await;
    let name = String::from_utf8_lossy(args[0].as_ref()).into_owned();
    match reply {
        Ok(Reply::Error(e)) => panic!("{name} on {port}: {e}"),
        Ok(reply) => reply,
        Err(e) => panic!("{name} on {port}: {e}"),
    }
}

/// [`expect_reply`] for commands that answer `+OK` (or `+NOKEY` for an empty MIGRATE).
async fn ok<A: AsRef<[u8]>>(port: u16, args: &[A]) {
    let reply = expect_reply(port, args).await;
    assert!(matches!(reply, Reply::Status(_)), "unexpected {reply:?}");
}

/// A temp dir no other cluster of this or another process uses.
fn unique_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("corral-cluster-{}-{n}", std::process::id()))
}
