//! Shared helpers of the integration tests: isolated databases and Redis key prefixes on the real servers.
//!
//! Entities used by several test binaries live in this crate too, so that the tests, which are separate
//! crates, exercise `key!` across crates.
//!
//! Servers come from `DATABASE_URL` (any database on the server; default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `REDIS_URL` (default `redis://127.0.0.1:6379`). When a
//! server is not reachable the test fails with a message that says how to provide it.

pub mod checker;
pub mod cluster;
pub mod model;
mod recording;
mod sqlite;

pub use recording::RecordingStore;
pub use sqlite::{TestDir, TestSqlite};

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection, PgPool};

/// The admin URL of the PostgreSQL server the tests use.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The URL of the Redis server the tests use.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub(crate) fn unique(hint: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{hint}_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A database of its own on the test server, dropped (with its connections) when this guard drops.
#[derive(Debug)]
pub struct TestDb {
    /// The database name.
    pub name: String,
    /// Its connection URL.
    pub url: String,
    admin_url: String,
}

impl TestDb {
    /// Creates a fresh, empty database.
    ///
    /// # Panics
    ///
    /// When PostgreSQL is not reachable, with a message that says how to provide it.
    pub async fn create(hint: &str) -> Self {
        let admin_url = database_url();
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {admin_url} ({e}). Start it (e.g. `pg_ctlcluster 15 main start`) \
                 or set DATABASE_URL to a server where user may CREATE DATABASE."
            )
        });
        let name = unique(&format!("cache_test_{hint}")).to_lowercase();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {e}"));
        let url = with_database(&admin_url, &name);
        Self {
            name,
            url,
            admin_url,
        }
    }

    /// A pool on this database.
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(8)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime: drop the database from a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await
                .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

/// `url` with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// A Redis key prefix of its own, whose keys are deleted when this guard drops.
#[derive(Debug)]
pub struct TestPrefix {
    /// The prefix, ending in `:`.
    pub prefix: String,
    /// A plain connection, for assertions on raw keys.
    pub conn: redis::aio::MultiplexedConnection,
}

impl TestPrefix {
    /// A fresh prefix on the test Redis.
    ///
    /// # Panics
    ///
    /// When Redis is not reachable, with a message that says how to provide it.
    pub async fn create(hint: &str) -> Self {
        let url = redis_url();
        let unreachable = |e: redis::RedisError| -> ! {
            panic!(
                "Redis is not reachable at {url} ({e}). Start it (e.g. `redis-server --daemonize yes --port 6379`) \
                 or set REDIS_URL."
            )
        };
        let client = redis::Client::open(url.as_str()).unwrap_or_else(|e| unreachable(e));
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| unreachable(e));
        Self {
            prefix: format!("{}:", unique(&format!("t_{hint}"))),
            conn,
        }
    }

    /// Whether `key` (without the prefix) exists.
    pub async fn exists(&self, key: &str) -> bool {
        let mut conn = self.conn.clone();
        redis::cmd("EXISTS")
            .arg(format!("{}{key}", self.prefix))
            .query_async::<bool>(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("EXISTS: {e}"))
    }

    /// Sets `key` (without the prefix) to `value`.
    pub async fn set(&self, key: &str, value: &str) {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(format!("{}{key}", self.prefix))
            .arg(value)
            .query_async::<()>(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("SET: {e}"));
    }

    /// The keys under this prefix (without it), sorted. Uses SCAN: for tests only.
    pub async fn keys(&self) -> Vec<String> {
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = 0_u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("SCAN: {e}"));
            keys.extend(batch.into_iter().map(|k| k[self.prefix.len()..].to_owned()));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys
    }
}

impl Drop for TestPrefix {
    fn drop(&mut self) {
        let (url, prefix) = (redis_url(), self.prefix.clone());
        let _ = std::thread::spawn(move || -> redis::RedisResult<()> {
            let mut conn = redis::Client::open(url.as_str())?.get_connection()?;
            let mut cursor = 0_u64;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{prefix}*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query(&mut conn)?;
                if !batch.is_empty() {
                    redis::cmd("DEL").arg(batch).query::<()>(&mut conn)?;
                }
                if next == 0 {
                    return Ok(());
                }
                cursor = next;
            }
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn with_database_replaces_the_path() {
        assert_eq!(
            super::with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            super::with_database("postgres://u@h:5432", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            super::with_database("postgres://h/db?sslmode=disable", "x"),
            "postgres://h/x?sslmode=disable"
        );
    }
}

/// A `redis-server` process of the test's own, on a free loopback port, for fault tests (kill, restart)
/// that must never touch the shared server. Killed (and its directory removed) when this guard drops.
#[derive(Debug)]
pub struct RedisServer {
    /// The port it listens on (kept across restarts).
    pub port: u16,
    child: Option<std::process::Child>,
    /// Arguments after the port: persistence, replication.
    args: Vec<String>,
    /// The working directory of a persistent server (its RDB file).
    dir: Option<std::path::PathBuf>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port for a test server: {e}"))
}

impl RedisServer {
    /// Starts a server with no persistence on a free port, and waits until it answers.
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed or does not start, with a message that says how to provide it.
    pub fn start() -> Self {
        Self::start_with(&["--save", "", "--appendonly", "no"], None)
    }

    /// Starts a server that keeps an RDB snapshot in a directory of its own, written only by `SAVE`
    /// (no automatic saves, no AOF), and loaded again by [`restart`](Self::restart).
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn start_persistent() -> Self {
        let dir = std::env::temp_dir().join(unique("redis_rdb"));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let args = [
            "--save",
            "",
            "--appendonly",
            "no",
            "--dbfilename",
            "dump.rdb",
        ];
        Self::start_with(&args, Some(dir))
    }

    /// Starts a replica of the primary on loopback port `primary` (a server, or a [`TcpProxy`] in front of
    /// one, which can cut the link), with no persistence, and waits until it answers and has synchronized.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start), or when it does not synchronize within 10 s.
    pub fn start_replica_of(primary: u16) -> Self {
        let port = primary.to_string();
        let replica = Self::start_with(
            &[
                "--save",
                "",
                "--appendonly",
                "no",
                "--replicaof",
                "127.0.0.1",
                &port,
            ],
            None,
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !replica
            .command(&["INFO", "replication"])
            .contains("master_link_status:up")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "replica did not synchronize"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        replica
    }

    fn start_with(args: &[&str], dir: Option<std::path::PathBuf>) -> Self {
        let mut server = Self {
            port: free_port(),
            child: None,
            args: args.iter().map(|&a| a.to_owned()).collect(),
            dir,
        };
        server.restart();
        server
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command (blocking) and returns its answer as text (`Debug` of the value for non-strings).
    ///
    /// # Panics
    ///
    /// When the server cannot be reached or answers with an error.
    pub fn command(&self, args: &[&str]) -> String {
        let mut conn = redis::Client::open(self.url().as_str())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("redis on port {}: {e}", self.port));
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        match cmd.query::<redis::Value>(&mut conn) {
            Ok(redis::Value::Okay) => "OK".to_owned(),
            Ok(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            Ok(redis::Value::SimpleString(s))
            | Ok(redis::Value::VerbatimString { text: s, .. }) => s,
            Ok(other) => format!("{other:?}"),
            Err(e) => panic!("redis {args:?} on port {}: {e}", self.port),
        }
    }

    /// Kills the server (SIGKILL): connections drop; a persistent server keeps its last `SAVE`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process (SIGSTOP): it keeps its data and its connections, but answers nothing, and new
    /// connections hang, until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Resumes a [paused](Self::pause) server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = std::process::Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
            assert!(
                matches!(status, Ok(s) if s.success()),
                "kill {signal} failed: {status:?}"
            );
        }
    }

    /// Starts the server again on the same port (empty, or from its last `SAVE` when persistent), and
    /// waits until it answers.
    ///
    /// # Panics
    ///
    /// When it does not start within 10 s.
    pub fn restart(&mut self) {
        self.kill();
        let mut command = std::process::Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(&self.args)
            .stdout(std::process::Stdio::null());
        if let Some(dir) = &self.dir {
            command.arg("--dir").arg(dir);
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start redis-server ({e}): install it (Debian: apt-get install redis-server)"
            )
        });
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let up = redis::Client::open(self.url().as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if up.is_ok() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A TCP proxy on a free loopback port that forwards every connection to a target port, which a test can
/// switch (dropping every open connection): a Redis address that moves to a promoted replica, as a
/// failover behind a DNS name or a load balancer does. Stops when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    /// The port it listens on.
    pub port: u16,
    target: std::sync::Arc<std::sync::atomic::AtomicU16>,
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// A proxy to `target` (a loopback port); runs on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// When no port can be bound.
    pub async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind a proxy port: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let target = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(target));
        let (generation, _) = tokio::sync::watch::channel(0_u64);
        let held = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (to, generations) = (std::sync::Arc::clone(&target), generation.subscribe());
        let holding = std::sync::Arc::clone(&held);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let port = to.load(std::sync::atomic::Ordering::SeqCst);
                let mut switched = generations.clone();
                switched.mark_unchanged();
                let holding = std::sync::Arc::clone(&holding);
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = forward(client_read, server_write, std::sync::Arc::clone(&holding)) => {}
                        _ = forward(server_read, client_write, holding) => {}
                        _ = switched.changed() => {}
                    }
                });
            }
        });
        Self {
            port,
            target,
            held,
            generation,
            task,
        }
    }

    /// Holds every byte in flight (both directions, every connection) until [`release`](Self::release):
    /// a connection that stalls without dropping, as a congested network or a paused peer does.
    pub fn hold(&self) {
        self.held.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets the held bytes through, in order.
    pub fn release(&self) {
        self.held.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Its URL, as a Redis URL.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends new connections to `target` and drops every open one.
    pub fn switch(&self, target: u16) {
        self.target
            .store(target, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }
}

/// Copies `from` to `to` until either closes, waiting while `held` before writing each read.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while held.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A PostgreSQL cluster of the test's own (`initdb` into a temporary directory, a free loopback port), for
/// tests that need settings the shared server does not have (`wal_level = logical`,
/// `max_prepared_transactions`). Stopped and removed when this guard drops.
#[derive(Debug)]
pub struct PgCluster {
    /// The port it listens on.
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl PgCluster {
    /// Creates and starts a cluster with `settings` (`name=value` for `postgres -c`), trust authentication
    /// for the `postgres` user, and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// When the PostgreSQL server binaries are missing or the cluster does not start, with a message that
    /// says how to provide them.
    pub fn start(settings: &[&str]) -> Self {
        let cluster = Self::empty();
        let data = cluster.dir.join("data");
        cluster.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        cluster.launch(settings);
        cluster
    }

    /// Creates and starts a streaming standby of `primary` (`pg_basebackup -R`) with `settings` (e.g.
    /// `recovery_min_apply_delay=1500ms`), and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start), or when the base backup fails.
    pub fn standby_of(primary: &PgCluster, settings: &[&str]) -> Self {
        let cluster = Self::empty();
        let data = cluster.dir.join("data");
        let port = primary.port.to_string();
        cluster.run(
            "pg_basebackup",
            &[
                "-D",
                &data.to_string_lossy(),
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        );
        cluster.launch(settings);
        cluster
    }

    /// A free port and an empty directory owned by the server's user.
    fn empty() -> Self {
        let bin = Self::bin_dir();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port for a test cluster: {e}"));
        let dir = std::env::temp_dir().join(unique("pgcluster"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {dir:?}: {e}"));
        let cluster = Self { port, dir, bin };
        if Self::is_root() {
            // The server runs as `postgres` (initdb refuses root): it must own the directory.
            let chown = std::process::Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&cluster.dir)
                .status();
            assert!(
                matches!(chown, Ok(s) if s.success()),
                "chown {:?}: {chown:?}",
                cluster.dir
            );
        }
        cluster
    }

    /// Starts the server on the data directory with `settings`.
    fn launch(&self, settings: &[&str]) {
        let data = self.dir.join("data");
        let mut options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.to_string_lossy()
        );
        for setting in settings {
            options.push_str(&format!(" -c {setting}"));
        }
        let log = self.dir.join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-o",
                &options,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "start",
            ],
        );
    }

    /// The URL of `database` in this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn bin_dir() -> std::path::PathBuf {
        let from_env = std::env::var_os("PG_BIN").map(std::path::PathBuf::from);
        let found = from_env.into_iter().chain(
            ["17", "16", "15", "14", "13"]
                .iter()
                .map(|v| std::path::PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"))),
        );
        found
            .into_iter()
            .find(|d| d.join("initdb").exists())
            .unwrap_or_else(|| {
                panic!(
                    "this test starts a PostgreSQL cluster of its own and needs the server binaries (initdb, \
                     pg_ctl): install them (Debian: apt-get install postgresql) or set PG_BIN to their directory"
                )
            })
    }

    /// Runs a server binary as the `postgres` user when this process is root (`initdb` refuses root).
    fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let mut command = vec![program.to_string_lossy().into_owned()];
        command.extend(args.iter().map(|a| (*a).to_owned()));
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        self.as_postgres(&command);
    }

    fn is_root() -> bool {
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"))
    }

    /// `command`, run as the `postgres` user when this process is root.
    fn command(command: &[&str]) -> std::process::Command {
        if Self::is_root() {
            let mut cmd = std::process::Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).args(command);
            cmd
        } else {
            let mut cmd = std::process::Command::new(command[0]);
            cmd.args(&command[1..]);
            cmd
        }
    }

    fn as_postgres(&self, command: &[&str]) {
        let out = Self::command(command)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
        assert!(
            out.status.success(),
            "{command:?} failed:\n{}\n{}\nlog: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let (data, pg_ctl) = (self.dir.join("data"), self.bin.join("pg_ctl"));
        let _ = Self::command(&[
            &pg_ctl.to_string_lossy(),
            "-D",
            &data.to_string_lossy(),
            "-m",
            "immediate",
            "stop",
        ])
        .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `pgbouncer` process of the test's own in transaction mode, on a free loopback port, in front of the
/// PostgreSQL at [`database_url`] (trust authentication, 2 server connections per database so that
/// clients share sessions). Killed when this guard drops.
#[derive(Debug)]
pub struct PgBouncer {
    /// The port it listens on.
    pub port: u16,
    dir: std::path::PathBuf,
    child: std::process::Child,
}

impl PgBouncer {
    /// Starts pgbouncer and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// When pgbouncer is not installed or does not start, with a message that says how to provide it.
    pub fn start() -> Self {
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!(
                    "this test runs a real pgbouncer in transaction mode: install it (Debian: `apt-get install \
                     pgbouncer`, or run `tests/setup.sh`)"
                )
            });
        let server: sqlx::postgres::PgConnectOptions = database_url()
            .parse()
            .unwrap_or_else(|e| panic!("DATABASE_URL: {e}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port for a test pgbouncer: {e}"));
        let dir = std::env::temp_dir().join(unique("pgbouncer"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {dir:?}: {e}"));
        let config = format!(
            "[databases]\n* = host={} port={}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {auth}\npool_mode = transaction\n\
             default_pool_size = 2\nmax_client_conn = 200\n\
             ignore_startup_parameters = extra_float_digits\nlogfile = {log}\npidfile = {pid}\n",
            server.get_host(),
            server.get_port(),
            auth = dir.join("users.txt").display(),
            log = dir.join("log").display(),
            pid = dir.join("pid").display(),
        );
        let user = server.get_username();
        std::fs::write(dir.join("users.txt"), format!("\"{user}\" \"\"\n"))
            .and_then(|()| std::fs::write(dir.join("pgbouncer.ini"), config))
            .unwrap_or_else(|e| panic!("cannot write the pgbouncer config: {e}"));
        let ini = dir.join("pgbouncer.ini");
        // pgbouncer refuses to run as root.
        let mut command = if PgCluster::is_root() {
            let chown = std::process::Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status();
            assert!(
                matches!(chown, Ok(s) if s.success()),
                "chown {dir:?}: {chown:?}"
            );
            let mut cmd = std::process::Command::new("runuser");
            cmd.args(["-u", "postgres", "--", binary]);
            cmd
        } else {
            std::process::Command::new(binary)
        };
        let child = command
            .arg(&ini)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        let bouncer = Self { port, dir, child };
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "pgbouncer did not start: {}",
                std::fs::read_to_string(bouncer.dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        bouncer
    }

    /// The URL of `database` through this pgbouncer.
    pub fn url(&self, database: &str) -> String {
        let server: sqlx::postgres::PgConnectOptions = database_url()
            .parse()
            .unwrap_or_else(|e| panic!("DATABASE_URL: {e}"));
        format!(
            "postgres://{}@127.0.0.1:{}/{database}",
            server.get_username(),
            self.port
        )
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // The process runs under `runuser`, which a kill of the child alone would leave behind.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = std::process::Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
