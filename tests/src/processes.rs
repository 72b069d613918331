//! The randomized freshness checker across OS processes: each process (a `checker-node`, see
//! `src/bin/checker_node.rs`) runs readers and writers on one database through its own `CachedPool` and
//! in-process tier over one Redis, and logs every read and write with a timestamp of the machine's clock;
//! the test merges the logs and checks them (see [`check`]).
//!
//! Two rules, both counted per read:
//! - **read-your-writes**: a read that began after a write *of its own process* returned must not return
//!   an older version (no grace);
//! - **bound**: a read that began more than the writer's bound after any write returned must not return an
//!   older version (the fan-out bound for writes through a pool, the relay's for plain-pool writes).
//!
//! Reads older than a write of another process that returned less than the bound before are counted as
//! lagging, with their staleness (how long after the write returned they still saw the old version).
//!
//! Not part of the `tests` library: its entity would join the registry of every test binary. The
//! `checker_node` binary and the `processes_checker` test include this file as a module of their own
//! (`#[path]`), and each uses a part of it.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cache_runtime::{CachedEntity, CachedPool, Registry, TieredStore, key};
use sqlx::{PgPool, Postgres};

/// The checker's row, as every node declares it (one registry, one fingerprint).
#[derive(Debug, Clone, CachedEntity, serde::Serialize, serde::Deserialize)]
#[cached_entity(table = "items", key = "checked:<id>", ttl = "1m")]
pub struct NodeItem {
    /// Row id.
    pub id: i64,
    /// Version, bumped by every write.
    pub version: i64,
}

/// The registry every node and the test use.
pub fn registry() -> Registry {
    Registry::new([NodeItem::META])
}

/// The writer id of the plain-pool writer (no process of the checker).
pub const PLAIN: u32 = u32::MAX;

/// Microseconds of the machine's clock (the same in every process).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// One logged operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A read by process `node` of row `id`, that began at `at` and returned `version`.
    Read {
        /// The process.
        node: u32,
        /// The row.
        id: i64,
        /// The version it returned.
        version: i64,
        /// When it began (µs).
        at: u64,
    },
    /// A write by `node` ([`PLAIN`]: the plain pool) of row `id` to `version`, returned at `at`.
    Write {
        /// The process.
        node: u32,
        /// The row.
        id: i64,
        /// The version written.
        version: i64,
        /// When it returned (µs).
        at: u64,
    },
}

impl Event {
    /// The log line.
    pub fn line(&self) -> String {
        match *self {
            Self::Read {
                node,
                id,
                version,
                at,
            } => format!("R {node} {id} {version} {at}"),
            Self::Write {
                node,
                id,
                version,
                at,
            } => format!("W {node} {id} {version} {at}"),
        }
    }

    /// Parses a log line (`None` for other output).
    pub fn parse(line: &str) -> Option<Self> {
        let mut parts = line.split(' ');
        let kind = parts.next()?;
        let mut num = || parts.next()?.parse::<u64>().ok();
        let (node, id, version, at) = (num()?, num()?, num()?, num()?);
        let (node, id, version) = (
            u32::try_from(node).ok()?,
            i64::try_from(id).ok()?,
            i64::try_from(version).ok()?,
        );
        match kind {
            "R" => Some(Self::Read {
                node,
                id,
                version,
                at,
            }),
            "W" => Some(Self::Write {
                node,
                id,
                version,
                at,
            }),
            _ => None,
        }
    }
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Reads checked.
    pub reads: u64,
    /// Writes logged (every process and the plain pool).
    pub writes: u64,
    /// Reads older than a write of their own process that returned before they began.
    pub own_violations: u64,
    /// Reads older than a write that returned more than its bound before they began.
    pub bound_violations: u64,
    /// Reads older than a write of another writer that returned less than its bound before.
    pub lagging: u64,
    /// The staleness of lagging reads (µs), sorted.
    pub staleness_us: Vec<u64>,
}

impl Verdict {
    /// The `q` quantile of the staleness of lagging reads, in ms (0 when none lagged).
    pub fn staleness_ms(&self, q: f64) -> f64 {
        if self.staleness_us.is_empty() {
            return 0.0;
        }
        let i = ((self.staleness_us.len() - 1) as f64 * q).round() as usize;
        self.staleness_us[i] as f64 / 1000.0
    }
}

/// Checks merged logs: `bound(writer)` is how long after a write of `writer` returned every read must
/// see it.
pub fn check(events: &[Event], bound: impl Fn(u32) -> Duration) -> Verdict {
    // Per row, the write of each version (versions are consecutive: one write per version).
    let mut writes: HashMap<i64, HashMap<i64, (u32, u64)>> = HashMap::new();
    let mut verdict = Verdict::default();
    for e in events {
        if let Event::Write {
            node,
            id,
            version,
            at,
        } = *e
        {
            writes.entry(id).or_default().insert(version, (node, at));
            verdict.writes += 1;
        }
    }
    for e in events {
        let Event::Read {
            node,
            id,
            version,
            at,
        } = *e
        else {
            continue;
        };
        verdict.reads += 1;
        let Some(row) = writes.get(&id) else {
            continue;
        };
        let (mut own, mut over, mut lag) = (false, false, None::<u64>);
        let last = row.keys().copied().max().unwrap_or(version);
        for v in version + 1..=last {
            let Some(&(writer, returned)) = row.get(&v) else {
                continue;
            };
            if returned > at {
                continue;
            }
            let age = at - returned;
            if writer == node {
                own = true;
            } else if age > bound(writer).as_micros() as u64 {
                over = true;
            } else {
                lag = Some(lag.map_or(age, |l| l.max(age)));
            }
        }
        if own {
            verdict.own_violations += 1;
        } else if over {
            verdict.bound_violations += 1;
        } else if let Some(age) = lag {
            verdict.lagging += 1;
            verdict.staleness_us.push(age);
        }
    }
    verdict.staleness_us.sort_unstable();
    verdict
}

/// How a node caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `TieredStore`: the in-process tier kept consistent by the fan-out.
    Tiered,
    /// The control: a moka map in front of the pool's cache, cleared by this process's writes only.
    Naive,
}

/// What a node is told, through its environment.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its number (0, 1, …).
    pub node: u32,
    /// The database.
    pub database_url: String,
    /// The Redis server.
    pub redis_url: String,
    /// The Redis prefix.
    pub prefix: String,
    /// How long to run.
    pub duration: Duration,
    /// Rows of `items`.
    pub rows: i64,
    /// How it caches.
    pub mode: Mode,
    /// The tier's `max_lag`.
    pub max_lag: Duration,
    /// The nodes of a Redis Cluster to use instead of `redis_url` (empty: standalone).
    pub cluster: Vec<String>,
}

impl Node {
    /// The environment that describes this node to a `checker-node` process.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CHECKER_NODE", self.node.to_string()),
            ("CHECKER_DATABASE_URL", self.database_url.clone()),
            ("CHECKER_REDIS_URL", self.redis_url.clone()),
            ("CHECKER_PREFIX", self.prefix.clone()),
            ("CHECKER_DURATION_MS", self.duration.as_millis().to_string()),
            ("CHECKER_ROWS", self.rows.to_string()),
            (
                "CHECKER_MODE",
                if self.mode == Mode::Naive {
                    "naive"
                } else {
                    "tiered"
                }
                .to_owned(),
            ),
            ("CHECKER_MAX_LAG_MS", self.max_lag.as_millis().to_string()),
            ("CHECKER_CLUSTER", self.cluster.join(",")),
        ]
    }

    /// The node described by this process's environment.
    ///
    /// # Panics
    ///
    /// When a variable is missing or malformed.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
        let num =
            |name: &str| -> u64 { var(name).parse().unwrap_or_else(|e| panic!("{name}: {e}")) };
        Self {
            node: u32::try_from(num("CHECKER_NODE")).unwrap_or(0),
            database_url: var("CHECKER_DATABASE_URL"),
            redis_url: var("CHECKER_REDIS_URL"),
            prefix: var("CHECKER_PREFIX"),
            duration: Duration::from_millis(num("CHECKER_DURATION_MS")),
            rows: i64::try_from(num("CHECKER_ROWS")).unwrap_or(4),
            mode: if var("CHECKER_MODE") == "naive" {
                Mode::Naive
            } else {
                Mode::Tiered
            },
            max_lag: Duration::from_millis(num("CHECKER_MAX_LAG_MS")),
            cluster: var("CHECKER_CLUSTER")
                .split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }
}

/// The pool of a node: a `CachedPool` on a `TieredStore` (or, for the naive control, a plain
/// `RedisStore`); its relay delivers plain-pool writes.
async fn pool(node: &Node) -> (CachedPool<Postgres>, Option<TieredStore>) {
    let options = CachedPool::<Postgres>::options()
        .registry(registry())
        .pool_options(sqlx::pool::PoolOptions::<Postgres>::new().max_connections(4));
    if !node.cluster.is_empty() {
        return cluster_pool(node, options).await;
    }
    let l2 = cache_runtime::RedisStore::connect(&node.redis_url, node.prefix.clone())
        .await
        .expect("connect Redis");
    match node.mode {
        Mode::Tiered => {
            let client = redis::Client::open(node.redis_url.as_str()).expect("Redis URL");
            let store = TieredStore::builder()
                .max_lag(node.max_lag)
                .heartbeat(node.max_lag / 5)
                .build(l2, client);
            assert!(store.ready(Duration::from_secs(5)).await, "the tier serves");
            let pool = options.connect(&node.database_url, store.clone()).await;
            (pool.expect("connect CachedPool"), Some(store))
        }
        Mode::Naive => {
            let pool = options.connect(&node.database_url, l2).await;
            (pool.expect("connect CachedPool"), None)
        }
    }
}

/// [`pool`] on a Redis Cluster (the tiered mode only).
async fn cluster_pool(
    node: &Node,
    options: cache_runtime::CachedPoolOptions<Postgres>,
) -> (CachedPool<Postgres>, Option<TieredStore>) {
    assert_eq!(node.mode, Mode::Tiered, "the cluster checker runs tiers");
    let nodes: Vec<&str> = node.cluster.iter().map(String::as_str).collect();
    let l2 = cache_runtime::RedisClusterStore::connect(&nodes, node.prefix.clone())
        .await
        .expect("connect the cluster");
    let store = TieredStore::builder()
        .max_lag(node.max_lag)
        .heartbeat(node.max_lag / 5)
        .build_cluster(l2, &nodes)
        .expect("cluster tier");
    assert!(
        store.ready(Duration::from_secs(10)).await,
        "the tier serves"
    );
    let pool = options.connect(&node.database_url, store.clone()).await;
    (pool.expect("connect CachedPool"), Some(store))
}

/// Runs one node: 6 readers (pausing a millisecond every fourth read or so) and a writer for `node.duration`; returns its log.
///
/// # Panics
///
/// When a connection or statement fails.
pub async fn run_node(node: &Node) -> Vec<Event> {
    let (pool, tier) = pool(node).await;
    let naive = Arc::new(moka::sync::Cache::<i64, i64>::new(10_000));
    let log = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + node.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for reader in 0..7 {
        let (pool, naive, log, node) = (pool.clone(), naive.clone(), log.clone(), node.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let id = fastrand::i64(1..=node.rows);
                let at = now_us();
                let event = if reader == 0 {
                    let version = write(&pool, &naive, id).await;
                    let at = now_us();
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..3))).await;
                    Event::Write {
                        node: node.node,
                        id,
                        version,
                        at,
                    }
                } else {
                    let version = read(&pool, &naive, node.mode, id).await;
                    // A service that is not saturated: a pause now and then (tokio sleeps ≥ 1 ms).
                    if fastrand::u8(..4) == 0 {
                        tokio::time::sleep(Duration::from_micros(500)).await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                    Event::Read {
                        node: node.node,
                        id,
                        version,
                        at,
                    }
                };
                log.lock().unwrap_or_else(|e| e.into_inner()).push(event);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a node task panicked");
    }
    if let Some(tier) = tier {
        eprintln!(
            "checker-node {}: in-process tier {:?}",
            node.node,
            tier.stats()
        );
    }
    pool.close().await;
    log.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

async fn read(
    pool: &CachedPool<Postgres>,
    naive: &moka::sync::Cache<i64, i64>,
    mode: Mode,
    id: i64,
) -> i64 {
    if mode == Mode::Naive
        && let Some(version) = naive.get(&id)
    {
        return version;
    }
    let db: PgPool = pool.sqlx_pool().clone();
    let version = pool
        .cache()
        .get_or_load(key!("checked:<id>", id = id), || async move {
            let version = tests::checker::select_version(&db, id).await?;
            tests::checker::jitter().await;
            Ok::<_, sqlx::Error>(version)
        })
        .await
        .unwrap_or_else(|e| panic!("read: {e}"));
    if mode == Mode::Naive {
        naive.insert(id, version);
    }
    version
}

async fn write(pool: &CachedPool<Postgres>, naive: &moka::sync::Cache<i64, i64>, id: i64) -> i64 {
    let version: i64 = sqlx::query_scalar(
        "UPDATE items SET version = version + 1 WHERE id = $1 RETURNING version",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("UPDATE through CachedPool: {e}"));
    naive.invalidate(&id);
    version
}
