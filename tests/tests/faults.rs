//! Faults: Redis killed, restarted and frozen under a read/write workload; crashes between `COMMIT` and the
//! store call; backends terminated; several pools and relays on one database; a relay started after a
//! backlog; the relay's `LISTEN` connection terminated. The kill/restart and the crash tests run on PostgreSQL
//! and on SQLite (one body, `on_both_backends!`); the others use PostgreSQL-only machinery (row locks,
//! backend pids, `LISTEN`, several relays sharing batches).
//!
//! Every test has its own database and its own `redis-server` (never the shared one), and prints its figures
//! with `eprintln!` (run with `--nocapture` to see them).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::health::BreakerConfig;
use cache_runtime::outbox::{Relay, RelayConfig};
use cache_runtime::{
    Cache, CachedEntity, CachedPool, CachedPoolOptions, RedisStore, Registry, key,
};
use serde::{Deserialize, Serialize};
use sqlx::Pool;
use sqlx::pool::PoolOptions;
use tests::{RecordingStore, RedisServer};

/// A versioned row.
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", ttl = "10m")]
struct Item {
    id: i64,
    version: i64,
}

fn registry() -> Registry {
    Registry::new([Item::META])
}

tests::on_both_backends! {
/// A database with `items(id, version)` for ids `1..=rows`, all at version 0.
pub(crate) async fn database(hint: &str, rows: i64) -> (TestDatabase, Pool<Db>) {
    let db = TestDatabase::create(hint).await;
    let admin = db.pool().await;
    let values: Vec<String> = (1..=rows).map(|i| format!("({i}, 0)")).collect();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL);
         INSERT INTO items VALUES {};",
        values.join(", ")
    )))
    .execute(&admin)
    .await
    .unwrap();
    // Install the triggers the way an application does, then leave.
    let installer = CachedPool::<Db>::options()
        .registry(registry())
        .auto_install(true)
        .run_relay(false)
        .connect(&db.url, cache_runtime::MemoryStore::new(16))
        .await
        .unwrap();
    installer.close().await;
    (db, admin)
}

/// Delivery settings for fault tests: short grace, sweeps and store timeout.
pub(crate) fn relay() -> RelayConfig {
    RelayConfig::new()
        .wrapped_grace(Duration::from_millis(300))
        .sweep_interval(Duration::from_millis(100))
        .store_timeout(Duration::from_millis(200))
}

/// Options for fault tests: short grace, sweeps, store timeout and breaker backoff.
pub(crate) fn options() -> CachedPoolOptions<Db> {
    CachedPool::<Db>::options()
        .registry(registry())
        .pool_options(PoolOptions::<Db>::new().max_connections(8))
        .relay_config(relay())
        .breaker(
            BreakerConfig::default()
                .failure_threshold(2)
                .open_min(Duration::from_millis(20))
                .open_max(Duration::from_millis(200)),
        )
}

pub(crate) async fn version(pool: &Pool<Db>, id: i64) -> i64 {
    sqlx::query_scalar("SELECT version FROM items WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A read through `cache`, loading from `db`.
pub(crate) async fn read(cache: &Cache, db: &Pool<Db>, id: i64) -> i64 {
    let db = db.clone();
    cache
        .get_or_load(key!("item:<id>", id), || async move {
            sqlx::query_scalar::<_, i64>("SELECT version FROM items WHERE id = $1")
                .bind(id)
                .fetch_one(&db)
                .await
        })
        .await
        .unwrap()
}

/// A write through the pool (autocommit, or a transaction for odd ids); returns the committed version.
pub(crate) async fn write(pool: &CachedPool<Db>, id: i64) -> i64 {
    if id % 2 == 0 {
        sqlx::query_scalar("UPDATE items SET version = version + 1 WHERE id = $1 RETURNING version")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap()
    } else {
        let mut tx = pool.begin().await.unwrap();
        let v: i64 = sqlx::query_scalar(
            "UPDATE items SET version = version + 1 WHERE id = $1 RETURNING version",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        v
    }
}

/// Waits (bounded) until `cond` holds.
pub(crate) async fn wait_until<F, Fut>(what: &str, within: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

pub(crate) async fn outbox_rows(admin: &Pool<Db>) -> i64 {
    let sql = if BACKEND == "postgres" {
        "SELECT count(*) FROM cache_invalidation.outbox"
    } else {
        "SELECT count(*) FROM cache_invalidation_outbox"
    };
    sqlx::query_scalar(sql)
        .fetch_one(admin)
        .await
        .unwrap()
}

/// Reads every row through a cache that never saw a fault (a new connection: another process), and counts
/// the values served from the store that differ from the database: stale entries, i.e. lost invalidations.
/// Returns (entries found in the store, stale ones).
pub(crate) async fn audit(url: &str, prefix: &str, admin: &Pool<Db>, rows: i64) -> (u64, u64) {
    let cache = Cache::new(RedisStore::connect(url, prefix).await.unwrap());
    let (mut cached, mut stale) = (0, 0);
    for id in 1..=rows {
        let truth = version(admin, id).await;
        let loaded = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&loaded);
        let db = admin.clone();
        let got: i64 = cache
            .get_or_load(key!("item:<id>", id), || async move {
                flag.store(true, Ordering::SeqCst);
                sqlx::query_scalar::<_, i64>("SELECT version FROM items WHERE id = $1")
                    .bind(id)
                    .fetch_one(&db)
                    .await
            })
            .await
            .unwrap();
        if !loaded.load(Ordering::SeqCst) {
            cached += 1;
            if got != truth {
                stale += 1;
                eprintln!("stale entry item:{id}: cached {got}, database {truth}");
            }
        }
    }
    (cached, stale)
}

/// The workload's freshness check: per row, the highest version whose write had returned. A read that
/// began after that and returns less is stale (contract 1).
pub(crate) struct Workload {
    pub(crate) latest: Vec<AtomicI64>,
    pub(crate) reads: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) stale: AtomicU64,
    pub(crate) stop: AtomicBool,
}

impl Workload {
    pub(crate) fn new(rows: i64) -> Arc<Self> {
        Arc::new(Self {
            latest: (0..=rows).map(|_| AtomicI64::new(0)).collect(),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    pub(crate) fn spawn(
        self: &Arc<Self>,
        pool: &CachedPool<Db>,
        rows: i64,
        readers: usize,
        writers: usize,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for _ in 0..writers {
            let (w, pool) = (Arc::clone(self), pool.clone());
            tasks.push(tokio::spawn(async move {
                while !w.stop.load(Ordering::SeqCst) {
                    let id = fastrand::i64(1..=rows);
                    let v = write(&pool, id).await;
                    w.latest[id as usize].fetch_max(v, Ordering::SeqCst);
                    w.writes.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        for _ in 0..readers {
            let (w, pool) = (Arc::clone(self), pool.clone());
            tasks.push(tokio::spawn(async move {
                while !w.stop.load(Ordering::SeqCst) {
                    let id = fastrand::i64(1..=rows);
                    let floor = w.latest[id as usize].load(Ordering::SeqCst);
                    let got = read(pool.cache(), pool.sqlx_pool(), id).await;
                    w.reads.fetch_add(1, Ordering::Relaxed);
                    if got < floor {
                        w.stale.fetch_add(1, Ordering::Relaxed);
                        eprintln!("stale read item:{id}: {got} < {floor}");
                    }
                }
            }));
        }
        tasks
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_under_load_loses_nothing() {
    const ROWS: i64 = 40;
    const ROUNDS: usize = 5;
    let mut server = RedisServer::start();
    let (db, admin) = database("faults_kill", ROWS).await;
    let prefix = "kill:";
    let store = RedisStore::connect(&server.url(), prefix).await.unwrap();
    let pool = options().connect(&db.url, store).await.unwrap();
    let workload = Workload::new(ROWS);
    let tasks = workload.spawn(&pool, ROWS, 4, 2);
    let mut gated_rounds = 0;
    for _ in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.kill();
        tokio::time::sleep(Duration::from_millis(400)).await;
        gated_rounds += usize::from(pool.cache().gate_closed());
        server.restart();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Converge on its own, under load: the gate opens; then the workload fills the cache again.
    let recovered = wait_until("gate open", Duration::from_secs(10), || async {
        !pool.cache().gate_closed()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    workload.stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    wait_until("outbox empty", Duration::from_secs(10), || async {
        outbox_rows(&admin).await == 0
    })
    .await;
    let (cached, stale_entries) = audit(&server.url(), prefix, &admin, ROWS).await;
    let stats = pool.cache().stats();
    eprintln!(
        "kill/restart ({BACKEND}): rounds {ROUNDS} (gate closed in {gated_rounds}), writes {}, reads checked {}, stale reads {}, \
         bypassed reads {}, store errors {}, gate open {recovered:?} after the last round; \
         audit: {cached} cached entries checked, stale values found {stale_entries}, invalidations lost {stale_entries}",
        workload.writes.load(Ordering::Relaxed),
        workload.reads.load(Ordering::Relaxed),
        workload.stale.load(Ordering::Relaxed),
        stats.bypassed,
        stats.store_errors,
    );
    assert_eq!(workload.stale.load(Ordering::Relaxed), 0, "stale reads");
    assert_eq!(stale_entries, 0, "stale entries after recovery");
    assert!(workload.reads.load(Ordering::Relaxed) > 0);
    assert!(gated_rounds > 0, "the outages were seen");
    assert!(cached > 0, "the audit found cached entries to check");
    pool.close().await;
}


    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_between_commit_and_the_store_call_is_delivered_within_the_grace() {
        let server = RedisServer::start();
        let (db, admin) = database("faults_crash", 4).await;
        let prefix = "crash:";
        let grace = Duration::from_millis(300);
        // The crashing process: commits, never calls the store, runs no relay.
        let crashing = options()
            .run_relay(false)
            .crash_after_commit(true)
            .connect(
                &db.url,
                RedisStore::connect(&server.url(), prefix).await.unwrap(),
            )
            .await
            .unwrap();
        // A healthy process with a relay.
        let healthy = options()
            .relay_config(relay().wrapped_grace(grace).sweep_interval(Duration::from_millis(50)))
            .connect(
                &db.url,
                RedisStore::connect(&server.url(), prefix).await.unwrap(),
            )
            .await
            .unwrap();
        for id in 1..=4 {
            read(healthy.cache(), healthy.sqlx_pool(), id).await;
        }
        let started = Instant::now();
        write(&crashing, 1).await; // a transaction
        write(&crashing, 2).await; // autocommit
        let raw = redis::Client::open(server.url().as_str()).unwrap();
        let raw = raw.get_multiplexed_async_connection().await.unwrap();
        let exists = |key: String| {
            let mut raw = raw.clone();
            async move {
                redis::cmd("EXISTS")
                    .arg(key)
                    .query_async::<bool>(&mut raw)
                    .await
                    .unwrap()
            }
        };
        // Not delivered by the writer...
        assert!(exists(format!("{prefix}item:1")).await);
        // ...but by another process's relay, after the grace period (PostgreSQL: rows of wrapped sessions;
        // SQLite: rows cannot tell their writer, the relay leaves every row to it for a 100 ms settle time).
        let took = wait_until("crashed writes delivered", Duration::from_secs(5), || {
            let (a, b) = (
                exists(format!("{prefix}item:1")),
                exists(format!("{prefix}item:2")),
            );
            async move { !a.await && !b.await }
        })
        .await;
        let took = started.elapsed().max(took);
        let wait = if BACKEND == "postgres" {
            grace
        } else {
            Duration::from_millis(100)
        };
        eprintln!(
            "crash between COMMIT and the store call ({BACKEND}): delivered {took:?} after the writes (waits {wait:?})"
        );
        assert!(
            took >= wait.saturating_sub(Duration::from_millis(50)),
            "not before the wait: {took:?}"
        );
        assert!(
            exists(format!("{prefix}item:3")).await,
            "other keys untouched"
        );
        assert_eq!(read(healthy.cache(), healthy.sqlx_pool(), 1).await, 1);
        assert_eq!(read(healthy.cache(), healthy.sqlx_pool(), 2).await, 1);
        drop(admin);
    }

}

use postgres::{audit, database, options, outbox_rows, read, relay, version, wait_until, write};

/// Redis frozen (SIGSTOP) keeps its data: entries cached before the outage survive it (but those whose
/// invalidation a breaker probe sent into the frozen server's socket, which it runs when it resumes). Writes
/// during the freeze lose their invalidation; the gate keeps them from being served until the outbox is
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_redis_keeps_stale_entries_that_the_gate_never_serves() {
    const ROWS: i64 = 20;
    const ROUNDS: usize = 3;
    let server = RedisServer::start();
    let (db, admin) = database("faults_freeze", ROWS).await;
    let prefix = "freeze:";
    let store = RedisStore::connect(&server.url(), prefix).await.unwrap();
    // No sweep delivers during the freeze (only breaker probes of writes do): the recovery after it
    // delivers every row, whatever its age.
    let pool = options()
        .relay_config(relay().wrapped_grace(Duration::from_secs(60)))
        .connect(&db.url, store)
        .await
        .unwrap();
    let raw = redis::Client::open(server.url().as_str()).unwrap();
    let mut raw = raw.get_multiplexed_async_connection().await.unwrap();
    let (mut reads_checked, mut stale_reads, mut survivors) = (0_u64, 0_u64, 0_u64);
    for round in 0..ROUNDS {
        // Every row cached.
        for id in 1..=ROWS {
            read(pool.cache(), pool.sqlx_pool(), id).await;
        }
        assert_eq!(
            pool.cache().breaker_state(),
            cache_runtime::health::BreakerState::Closed
        );
        server.pause();
        // Writes during the freeze: commit, return Ok, keys stay in the outbox.
        let started = Instant::now();
        for id in 1..=ROWS {
            write(&pool, id).await;
        }
        let writes_took = started.elapsed();
        // Reads during the freeze go to the database.
        for id in 1..=ROWS {
            let got = read(pool.cache(), pool.sqlx_pool(), id).await;
            reads_checked += 1;
            stale_reads += u64::from(got != version(&admin, id).await);
        }
        assert!(pool.cache().gate_closed());
        // Hold every outbox row: the recovery cannot finish until they are released.
        let mut holder = admin.begin().await.unwrap();
        let held: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM cache_invalidation.outbox ORDER BY id FOR UPDATE")
                .fetch_all(&mut *holder)
                .await
                .unwrap();
        assert!(
            !held.is_empty(),
            "round {round}: the freeze's rows are in the outbox"
        );
        server.resume();
        // Pre-outage entries are still in Redis: all but those whose invalidation a breaker probe sent to
        // the frozen server (it runs them when it resumes)...
        let mut surviving = Vec::new();
        for id in 1..=ROWS {
            let entry: Option<Vec<u8>> = redis::cmd("GET")
                .arg(format!("{prefix}item:{id}"))
                .query_async(&mut raw)
                .await
                .unwrap();
            if entry.is_some() {
                surviving.push(id);
            }
        }
        survivors += surviving.len() as u64;
        let Some(&survivor) = surviving.first() else {
            panic!("round {round}: no pre-outage entry survived the freeze");
        };
        // ...and are stale, but this process never serves them while the gate is closed.
        for _ in 0..3 {
            for id in 1..=ROWS {
                let got = read(pool.cache(), pool.sqlx_pool(), id).await;
                reads_checked += 1;
                stale_reads += u64::from(got != version(&admin, id).await);
            }
        }
        assert!(
            pool.cache().gate_closed(),
            "held rows {held:?} keep the gate closed"
        );
        // Another read side of the same pool shares the gate.
        let sibling = pool.cache_builder().build();
        assert!(sibling.gate_closed());
        assert_eq!(
            read(&sibling, pool.sqlx_pool(), survivor).await,
            version(&admin, survivor).await
        );
        // Control: a cache without the gate (a process that saw no failure) is served the stale entry.
        let ungated = Cache::new(RedisStore::connect(&server.url(), prefix).await.unwrap());
        let served = read(&ungated, pool.sqlx_pool(), survivor).await;
        assert!(
            served < version(&admin, survivor).await,
            "the surviving entry is stale: only the gate keeps it from being served"
        );
        holder.rollback().await.unwrap();
        let reopened = wait_until("gate open", Duration::from_secs(10), || async {
            !pool.cache().gate_closed()
        })
        .await;
        for id in 1..=ROWS {
            let got = read(pool.cache(), pool.sqlx_pool(), id).await;
            reads_checked += 1;
            stale_reads += u64::from(got != version(&admin, id).await);
        }
        eprintln!(
            "freeze round {round}: {ROWS} writes during the freeze took {writes_took:?}, gate open {reopened:?} after release"
        );
    }
    wait_until("outbox empty", Duration::from_secs(10), || async {
        outbox_rows(&admin).await == 0
    })
    .await;
    let (cached, stale_entries) = audit(&server.url(), prefix, &admin, ROWS).await;
    eprintln!(
        "freeze: rounds {ROUNDS}, reads checked {reads_checked}, stale reads {stale_reads}, pre-outage entries \
         that survived {survivors}; audit: {cached} cached entries checked, stale values found {stale_entries}, \
         invalidations lost {stale_entries}"
    );
    assert_eq!(stale_reads, 0);
    assert_eq!(stale_entries, 0);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_terminated_mid_transaction_publishes_nothing_and_loses_nothing() {
    let server = RedisServer::start();
    let (db, admin) = database("faults_terminate", 4).await;
    let prefix = "term:";
    let pool = options()
        .connect(
            &db.url,
            RedisStore::connect(&server.url(), prefix).await.unwrap(),
        )
        .await
        .unwrap();
    for id in 1..=4 {
        read(pool.cache(), pool.sqlx_pool(), id).await;
    }
    let raw = redis::Client::open(server.url().as_str()).unwrap();
    let mut raw = raw.get_multiplexed_async_connection().await.unwrap();

    // Terminated before COMMIT: rolled back, nothing in the outbox, nothing published.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE items SET version = 100 WHERE id = 1")
        .execute(&mut tx)
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(terminated);
    assert!(
        tx.commit().await.is_err(),
        "the commit of a terminated backend fails"
    );
    assert_eq!(version(&admin, 1).await, 0);
    assert_eq!(
        outbox_rows(&admin).await,
        0,
        "no outbox row of the rolled-back work"
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // a grace period and sweeps
    let cached: bool = redis::cmd("EXISTS")
        .arg(format!("{prefix}item:1"))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(cached, "nothing published for the rolled-back work");
    assert_eq!(read(pool.cache(), pool.sqlx_pool(), 1).await, 0);

    // Terminated right after COMMIT, before the keys were sent (a crashed writer): the relay delivers.
    let crashing = options()
        .run_relay(false)
        .crash_after_commit(true)
        .connect(
            &db.url,
            RedisStore::connect(&server.url(), prefix).await.unwrap(),
        )
        .await
        .unwrap();
    let mut tx = crashing.begin().await.unwrap();
    sqlx::query("UPDATE items SET version = 7 WHERE id = 2")
        .execute(&mut tx)
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let _: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&admin)
        .await
        .unwrap();
    let took = wait_until("committed work delivered", Duration::from_secs(5), || {
        let mut raw = raw.clone();
        async move {
            !redis::cmd("EXISTS")
                .arg(format!("{prefix}item:2"))
                .query_async::<bool>(&mut raw)
                .await
                .unwrap()
        }
    })
    .await;
    eprintln!(
        "terminated writer: rolled-back work published nothing; committed work delivered after {took:?}"
    );
    assert_eq!(read(pool.cache(), pool.sqlx_pool(), 2).await, 7);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pools_and_two_relays_share_the_work_and_deliver_each_row_once() {
    const FOREIGN: i64 = 300;
    const WRAPPED: i64 = 100;
    let server = RedisServer::start();
    let (db, admin) = database("faults_shared", FOREIGN + WRAPPED).await;
    let prefix = "shared:";
    let record = RecordingStore::new(RedisStore::connect(&server.url(), prefix).await.unwrap());
    let counting = || async {
        RecordingStore::sharing(
            RedisStore::connect(&server.url(), prefix).await.unwrap(),
            &record,
        )
    };
    let grace = Duration::from_millis(400);
    let pool_options = || {
        options().relay_config(
            relay()
                .wrapped_grace(grace)
                .sweep_interval(Duration::from_millis(50)),
        )
    };
    let p1 = pool_options()
        .connect(&db.url, counting().await)
        .await
        .unwrap();
    let p2 = pool_options()
        .connect(&db.url, counting().await)
        .await
        .unwrap();
    let standalone = Relay::builder(db.pool().await, counting().await)
        .config(
            RelayConfig::new()
                .wrapped_grace(grace)
                .sweep_interval(Duration::from_millis(50)),
        )
        .build();
    let relay_task = {
        let relay = standalone.clone();
        tokio::spawn(async move { relay.run().await })
    };
    // Foreign writes (each row once, so each key belongs to one outbox row) and wrapped writes, at once.
    let foreign = {
        let admin = admin.clone();
        tokio::spawn(async move {
            for id in 1..=FOREIGN {
                sqlx::query("UPDATE items SET version = version + 1 WHERE id = $1")
                    .bind(id)
                    .execute(&admin)
                    .await
                    .unwrap();
            }
        })
    };
    let wrapped = {
        let (p1, p2) = (p1.clone(), p2.clone());
        tokio::spawn(async move {
            for id in FOREIGN + 1..=FOREIGN + WRAPPED {
                write(if id % 2 == 0 { &p1 } else { &p2 }, id).await;
            }
        })
    };
    foreign.await.unwrap();
    wrapped.await.unwrap();
    wait_until("outbox empty", Duration::from_secs(10), || async {
        outbox_rows(&admin).await == 0
    })
    .await;
    // Past the grace period: a wrapped row delivered by its writer must not come back through a relay.
    tokio::time::sleep(grace + Duration::from_millis(200)).await;
    let counts = record.delivered();
    let missing: Vec<i64> = (1..=FOREIGN + WRAPPED)
        .filter(|id| !counts.contains_key(&format!("item:{id}")))
        .collect();
    let twice: Vec<(&String, &u32)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "shared: {FOREIGN} foreign + {WRAPPED} wrapped writes, 2 pools + 1 standalone relay: {} keys invalidated, \
         {} missing, {} delivered more than once",
        counts.len(),
        missing.len(),
        twice.len()
    );
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    relay_task.abort();
    p1.close().await;
    p2.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_after_a_backlog_drains_it_in_batches() {
    const ROWS: i64 = 20_000;
    let server = RedisServer::start();
    let (db, admin) = database("faults_backlog", ROWS).await;
    let prefix = "backlog:";
    // Cached entries that the backlog must invalidate.
    let raw = redis::Client::open(server.url().as_str()).unwrap();
    let mut raw = raw.get_multiplexed_async_connection().await.unwrap();
    let mut set = redis::pipe();
    for id in 1..=ROWS {
        set.set(format!("{prefix}item:{id}"), "stale").ignore();
    }
    set.query_async::<()>(&mut raw).await.unwrap();
    // The backlog: one outbox row per statement, written while no relay runs.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DO $$ BEGIN FOR i IN 1..{ROWS} LOOP UPDATE items SET version = version + 1 WHERE id = i; END LOOP; END $$"
    )))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query("UPDATE items SET version = version + 1")
        .execute(&admin)
        .await
        .unwrap(); // one more row with every key
    assert_eq!(outbox_rows(&admin).await, ROWS + 1);
    let relay = Relay::builder(
        db.pool().await,
        RedisStore::connect(&server.url(), prefix).await.unwrap(),
    )
    .build();
    let backlog = relay.backlog().await.unwrap();
    assert_eq!(backlog.depth, u64::try_from(ROWS + 1).unwrap());
    let started = Instant::now();
    let task = {
        let relay = relay.clone();
        tokio::spawn(async move { relay.run().await })
    };
    wait_until("backlog drained", Duration::from_secs(30), || async {
        outbox_rows(&admin).await == 0
    })
    .await;
    let took = started.elapsed();
    task.abort();
    // Every slot but the store's own (its consumer id and its sequence).
    let slots: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut raw)
        .await
        .unwrap();
    let left = slots
        .iter()
        .filter(|s| !s.ends_with("<consumer>") && !s.ends_with("<sequence>"))
        .count();
    eprintln!(
        "backlog: {} rows ({} keys) drained by a relay started afterwards in {took:?}: {:.0} rows/s, {:.0} keys/s",
        ROWS + 1,
        2 * ROWS,
        (ROWS + 1) as f64 / took.as_secs_f64(),
        (2 * ROWS) as f64 / took.as_secs_f64(),
    );
    assert_eq!(left, 0, "every cached entry invalidated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listen_connection_reconnects_after_pg_terminate_backend() {
    let server = RedisServer::start();
    let (db, admin) = database("faults_listen", 4).await;
    let prefix = "listen:";
    // Sweeps almost never: only notifications can deliver quickly.
    let pool = options()
        .relay_config(relay().sweep_interval(Duration::from_secs(60)))
        .connect(
            &db.url,
            RedisStore::connect(&server.url(), prefix).await.unwrap(),
        )
        .await
        .unwrap();
    let raw = redis::Client::open(server.url().as_str()).unwrap();
    let raw = raw.get_multiplexed_async_connection().await.unwrap();
    let listener = || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
        )
        .bind(cache_runtime::backend::postgres::LISTEN_APPLICATION_NAME)
        .fetch_optional(&admin)
        .await
        .unwrap()
    };
    let foreign_write_is_relayed = |id: i64| {
        let (admin, pool, raw) = (admin.clone(), pool.clone(), raw.clone());
        async move {
            read(pool.cache(), pool.sqlx_pool(), id).await;
            sqlx::query("UPDATE items SET version = version + 1 WHERE id = $1")
                .bind(id)
                .execute(&admin)
                .await
                .unwrap();
            wait_until("foreign write relayed", Duration::from_secs(3), || {
                let mut raw = raw.clone();
                async move {
                    !redis::cmd("EXISTS")
                        .arg(format!("{prefix}item:{id}"))
                        .query_async::<bool>(&mut raw)
                        .await
                        .unwrap()
                }
            })
            .await;
        }
    };
    wait_until("listener connected", Duration::from_secs(5), || async {
        listener().await.is_some()
    })
    .await;
    foreign_write_is_relayed(1).await;
    let old = listener().await.unwrap();
    let _: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(old)
        .fetch_one(&admin)
        .await
        .unwrap();
    let took = wait_until("listener reconnected", Duration::from_secs(5), || async {
        listener().await.is_some_and(|pid| pid != old)
    })
    .await;
    foreign_write_is_relayed(2).await;
    foreign_write_is_relayed(3).await;
    eprintln!(
        "LISTEN connection terminated: a new one after {took:?}; foreign writes relayed by notification"
    );
    pool.close().await;
}

/// One process loses Redis while another keeps it: the cut-off writer's commits succeed, its reads bypass
/// the cache, and the other process's relay delivers its keys at once (not after the grace period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_cut_off_from_redis_has_its_keys_delivered_by_another_process_at_once() {
    let server = RedisServer::start();
    let (db, admin) = database("faults_partition", 4).await;
    let prefix = "part:";
    let partitioned =
        RecordingStore::new(RedisStore::connect(&server.url(), prefix).await.unwrap());
    let cut = options()
        .run_relay(false)
        .connect(&db.url, partitioned.clone())
        .await
        .unwrap();
    // The other process: a long grace period and rare sweeps, so only the drain request delivers quickly.
    let other = options()
        .relay_config(
            relay()
                .wrapped_grace(Duration::from_secs(30))
                .sweep_interval(Duration::from_secs(30)),
        )
        .connect(
            &db.url,
            RedisStore::connect(&server.url(), prefix).await.unwrap(),
        )
        .await
        .unwrap();
    wait_until("relay listening", Duration::from_secs(5), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
        )
        .bind(cache_runtime::backend::postgres::LISTEN_APPLICATION_NAME)
        .fetch_one(&admin)
        .await
        .unwrap()
            > 0
    })
    .await;
    for id in 1..=4 {
        assert_eq!(read(other.cache(), other.sqlx_pool(), id).await, 0);
    }
    partitioned.cut_off(true);
    let started = Instant::now();
    assert_eq!(write(&cut, 1).await, 1);
    assert_eq!(write(&cut, 2).await, 1);
    assert!(cut.cache().gate_closed());
    // Reads of the cut-off process bypass the cache and see the writes.
    assert_eq!(read(cut.cache(), cut.sqlx_pool(), 1).await, 1);
    // The other process serves the new values well before its 30 s grace period.
    let took = wait_until(
        "delivered by the other process",
        Duration::from_secs(3),
        || async {
            read(other.cache(), other.sqlx_pool(), 1).await == 1
                && read(other.cache(), other.sqlx_pool(), 2).await == 1
        },
    )
    .await;
    let took = took.max(started.elapsed());
    // Reconnected: the cut-off process's gate opens again.
    partitioned.cut_off(false);
    let reopened = wait_until("gate open", Duration::from_secs(10), || async {
        !cut.cache().gate_closed()
    })
    .await;
    eprintln!(
        "partition: keys of the cut-off writer delivered by the other process {took:?} after the writes; \
         gate of the cut-off process open {reopened:?} after it reconnected"
    );
    assert_eq!(read(cut.cache(), cut.sqlx_pool(), 2).await, 1);
    cut.close().await;
    other.close().await;
}

/// A dead store: reads are answered by the loader without error, only the first few reach the store, then
/// the breaker lets one probe through per backoff period; when the server is back, reads use it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_skips_a_dead_store_and_probes_it_with_backoff() {
    let mut server = RedisServer::start();
    let cache = Cache::builder(
        RedisStore::connect(&server.url(), "breaker:")
            .await
            .unwrap(),
    )
    .breaker(
        BreakerConfig::default()
            .failure_threshold(3)
            .open_min(Duration::from_millis(200))
            .open_max(Duration::from_secs(1)),
    )
    .build();
    let value = |id: i64| {
        let cache = cache.clone();
        async move {
            cache
                .get_or_load(key!("item:<id>", id), || async move {
                    Ok::<_, std::io::Error>(id * 10)
                })
                .await
                .unwrap()
        }
    };
    assert_eq!(value(1).await, 10);
    server.kill();
    let started = Instant::now();
    let mut reads = 0;
    while started.elapsed() < Duration::from_millis(500) {
        assert_eq!(
            value(reads % 5 + 1).await,
            (reads % 5 + 1) * 10,
            "no error for the user"
        );
        reads += 1;
    }
    let stats = cache.stats();
    eprintln!(
        "breaker: {reads} reads in 500 ms against a dead server: {} store errors, {} bypassed",
        stats.store_errors, stats.bypassed
    );
    // 3 failures open it; in 500 ms at most a couple of probes (backoff 200 ms, then 400 ms).
    assert!(stats.store_errors <= 6, "{stats:?}");
    assert!(
        stats.bypassed >= u64::try_from(reads).unwrap() - 6,
        "{stats:?}"
    );
    assert_eq!(
        cache.breaker_state(),
        cache_runtime::health::BreakerState::Open
    );
    server.restart();
    wait_until("breaker closed", Duration::from_secs(5), || async {
        value(1).await;
        cache.breaker_state() == cache_runtime::health::BreakerState::Closed
    })
    .await;
    let fills = cache.stats().fills;
    value(2).await;
    value(2).await;
    assert_eq!(cache.stats().fills, fills + 1, "the store caches again");
}

/// `Relay::drain_once` (what a benchmark times) reports rows, distinct keys and batches.
#[tokio::test]
async fn drain_once_reports_rows_keys_and_batches() {
    let server = RedisServer::start();
    let (db, admin) = database("faults_drain_once", 12).await;
    for id in 1..=12_i64 {
        sqlx::query("UPDATE items SET version = 1 WHERE id = $1")
            .bind(id)
            .execute(&admin)
            .await
            .unwrap();
    }
    let relay = Relay::builder(
        db.pool().await,
        RedisStore::connect(&server.url(), "drain:").await.unwrap(),
    )
    .config(RelayConfig::new().batch_rows(5))
    .build();
    let backlog = relay.backlog().await.unwrap();
    assert_eq!(backlog.depth, 12);
    let drained = relay.deliver_pending().await.unwrap();
    eprintln!("drain_once: {drained:?}");
    assert_eq!((drained.rows, drained.keys, drained.batches), (12, 12, 3));
    assert_eq!(relay.backlog().await.unwrap().depth, 0);
    assert_eq!(relay.deliver_pending().await.unwrap().rows, 0);
}
