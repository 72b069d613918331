//! A Redis Cluster of the test's own: 6 `redis-server` processes on free loopback ports (3 primaries,
//! 3 replicas, made by `redis-cli --cluster create`), killed when the guard drops. Never the shared
//! server.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running cluster.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes' ports, in creation order (the first three start as primaries).
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: std::path::PathBuf,
}

/// A free port whose cluster bus port (+10000) is free too.
fn free_port_pair() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("no free port for a cluster node: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        if port > 0
            && port < 55_000
            && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

/// A node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Its id.
    pub id: String,
    /// Its port.
    pub port: u16,
    /// Whether it is a primary.
    pub primary: bool,
    /// The id of its primary (replicas).
    pub primary_id: Option<String>,
    /// Its slot ranges (primaries).
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// Starts 6 nodes and creates the cluster; waits until every node reports `cluster_state:ok` and
    /// every replica is in sync.
    ///
    /// # Panics
    ///
    /// When `redis-server` or `redis-cli` is missing (with how to install them) or the cluster does not
    /// form within 30 s.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(crate::unique("redis_cluster"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cluster dir: {e}"));
        let ports: Vec<u16> = (0..6).map(|_| free_port_pair()).collect();
        let mut cluster = Self {
            children: Vec::new(),
            ports: ports.clone(),
            dir,
        };
        for port in &ports {
            let child = cluster.spawn(*port);
            cluster.children.push(Some(child));
        }
        for port in &ports {
            cluster.wait_until(*port, Duration::from_secs(10), |c, p| {
                c.try_command(p, &["PING"]).is_some_and(|s| s == "PONG")
            });
        }
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-cli ({e}): install it (Debian: apt-get install redis-server)"
                )
            });
        assert!(
            status.success(),
            "redis-cli --cluster create failed: {status}"
        );
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    fn spawn(&self, port: u16) -> Child {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args(["--cluster-node-timeout", "2000"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): install it (Debian: apt-get install redis-server)"
                )
            })
    }

    /// Waits until every live node reports `cluster_state:ok` and every live replica's link is up.
    ///
    /// # Panics
    ///
    /// After `timeout`.
    pub fn wait_healthy(&self, timeout: Duration) {
        let live: Vec<u16> = self.live();
        for port in live {
            self.wait_until(port, timeout, |c, p| {
                let info = c.try_command(p, &["CLUSTER", "INFO"]).unwrap_or_default();
                let repl = c
                    .try_command(p, &["INFO", "replication"])
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"))
            });
        }
    }

    fn wait_until(&self, port: u16, timeout: Duration, ok: impl Fn(&Self, u16) -> bool) {
        let deadline = Instant::now() + timeout;
        while !ok(self, port) {
            assert!(
                Instant::now() < deadline,
                "cluster node {port} not ready in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The ports of the nodes that run.
    pub fn live(&self) -> Vec<u16> {
        self.ports
            .iter()
            .zip(&self.children)
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// The nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.live()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    fn try_command(&self, port: u16, args: &[&str]) -> Option<String> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        // Replicas answer reads of their own keys (instead of redirecting them).
        let _ = redis::cmd("READONLY").query::<()>(&mut conn);
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        match cmd.query::<redis::Value>(&mut conn).ok()? {
            redis::Value::SimpleString(s) => Some(s),
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
            redis::Value::VerbatimString { text, .. } => Some(text),
            redis::Value::Okay => Some("OK".to_owned()),
            other => Some(format!("{other:?}")),
        }
    }

    /// Runs a command on the node at `port`; the answer as text (`int(1)` for integers).
    ///
    /// # Panics
    ///
    /// When the node does not answer.
    pub fn command(&self, port: u16, args: &[&str]) -> String {
        self.try_command(port, args)
            .unwrap_or_else(|| panic!("cluster node {port}: {args:?} failed"))
    }

    /// The nodes, as a live node sees them.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let any = self.live()[0];
        self.command(any, &["CLUSTER", "NODES"])
            .lines()
            .filter(|l| !l.contains("fail"))
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                let primary = fields.get(2)?.contains("master");
                let slots = fields
                    .iter()
                    .skip(8)
                    .filter_map(|r| {
                        let (a, b) = r.split_once('-').unwrap_or((r, r));
                        Some((a.parse().ok()?, b.parse().ok()?))
                    })
                    .collect();
                Some(NodeInfo {
                    id: (*fields.first()?).to_owned(),
                    port,
                    primary,
                    primary_id: (!primary)
                        .then(|| fields.get(3).map(|s| (*s).to_owned()))
                        .flatten(),
                    slots,
                })
            })
            .collect()
    }

    /// The port of the primary that serves `key`'s slot.
    pub fn primary_of(&self, key: &str) -> u16 {
        let slot: u16 = self
            .command(self.live()[0], &["CLUSTER", "KEYSLOT", key])
            .trim_start_matches("int(")
            .trim_end_matches(')')
            .parse()
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT: {e}"));
        self.nodes()
            .into_iter()
            .find(|n| n.primary && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"))
    }

    /// The port of a replica of the primary at `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let nodes = self.nodes();
        let id = nodes
            .iter()
            .find(|n| n.port == port)
            .map(|n| n.id.clone())
            .unwrap_or_default();
        nodes
            .into_iter()
            .find(|n| n.primary_id.as_deref() == Some(id.as_str()))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no replica of {port}"))
    }

    fn index(&self, port: u16) -> usize {
        self.ports
            .iter()
            .position(|p| *p == port)
            .unwrap_or_else(|| panic!("no node {port}"))
    }

    /// Kills the node at `port` (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        let i = self.index(port);
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the node at `port`.
    pub fn signal(&self, port: u16, signal: &str) {
        if let Some(child) = &self.children[self.index(port)] {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
            assert!(
                matches!(status, Ok(s) if s.success()),
                "kill {signal}: {status:?}"
            );
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
