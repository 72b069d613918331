//! The benchmark: this library against hand-written cache-aside, raw sqlx and TTL-free naive caching, side by
//! side in one run, against real PostgreSQL and Redis.
//!
//! Creates a database of its own on `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! with two identical tables of 10,000 products: `products` (registered, with the capture triggers) and
//! `plain_products` (no triggers), and uses the Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`) under
//! a key prefix of its own. Variants alternate within each iteration (the order rotates), so drift on the
//! machine hits all alike. Sections (see `BENCHMARKS.md` for what each row means):
//!
//! - write path: single-row autocommit `UPDATE`, a 5-statement transaction and a 10k-row `UPDATE`, each
//!   through `CachedPool`, as hand-written `UPDATE` + `DEL`, and as raw sqlx with no cache;
//! - read path: `get_or_load` hit on Redis vs raw `GET` + MessagePack decode; in-process store hit; a miss
//!   (invalidated key, load from PostgreSQL) vs the bare `SELECT`;
//! - stampede: 1,000 concurrent cold reads of one key, loader calls and p99, vs naive cache-aside;
//! - mixed 95/5 read/write, zipf keys over 10k rows, 16 clients: no cache, naive cache-aside, this library;
//!   throughput, p99, stale reads (a read is stale if it returns a version older than one whose write
//!   returned before the read began);
//! - foreign writes: commit through a plain `PgPool` → key gone from Redis, through the relay;
//! - backlog drain: outbox rows written by a plain pool while no relay runs, then drained;
//! - hot key: 8 readers of one key written every 100 ms through the pool, delete on write against
//!   `refresh = "1m"`: read latency and the share of reads not answered by the store; and the consistency
//!   SLI's cost: `pool.get` hits with 1% sampling against none (`--hot-only` runs just these rows);
//! - SQLite (a temporary database file in WAL mode, the in-process store): the three writes through
//!   `CachedSqlitePool`, as hand-written `UPDATE` + store invalidate, and as raw sqlx; a `get_or_load` hit
//!   and a miss against SQLite's primary-key `SELECT`. Needs no server; `--sqlite-only` runs just this.
//!
//! Prints a Markdown table and writes JSON (default `target/bench.json`).
//!
//! Run: `cargo run --release -p examples --bin bench [-- --quick] [-- --sqlite-only] [-- --hot-only] [-- --out PATH]`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::backend::Backend;
use cache_runtime::{
    Cache, CachedEntity, CachedPgPool, CachedPool, CachedSqlitePool, CachedTransaction,
    MemoryStore, RedisStore, Registry, TieredStore,
};
use examples::{Report, Samples, Zipf};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection as _, PgConnection, PgPool, Pool, Postgres, Sqlite};

mod cluster;
mod hot;
mod load;
mod tiered;

/// The benchmarked entity and the cached value.
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "products", key = "product:<id>", depends = ["category:<category_id>:products"], ttl = "10m")]
struct Product {
    id: i64,
    category_id: i64,
    name: String,
    price_cents: i64,
    version: i64,
}

/// The same rows in a table of their own, cached by a `CachedPool` on an in-process store (the mixed
/// workload's L1 variant; its own table, so that writes delivered to Redis never have to reach it).
#[derive(CachedEntity)]
#[cached_entity(table = "l1_products", key = "l1:product:<id>", depends = ["l1:category:<category_id>:products"])]
struct L1Product {
    id: i64,
    category_id: i64,
}

const ROWS: i64 = 10_000;
const CATEGORIES: i64 = 100;
const CLIENTS: usize = 16;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sizes of a run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    single: usize,
    tx: usize,
    bulk: usize,
    reads: usize,
    misses: usize,
    mixed: Duration,
    foreign: usize,
    backlog: usize,
    /// Only the hot-key and SLI rows (`--hot-only`).
    hot_only: bool,
}

impl Sizes {
    const DEFAULT: Self = Self {
        single: 2_000,
        tx: 500,
        bulk: 9,
        reads: 5_000,
        misses: 1_000,
        mixed: Duration::from_secs(30),
        foreign: 1_000,
        backlog: 5_000,
        hot_only: false,
    };
    const QUICK: Self = Self {
        single: 200,
        tx: 60,
        bulk: 3,
        reads: 500,
        misses: 100,
        mixed: Duration::from_secs(6),
        foreign: 100,
        backlog: 1_000,
        hot_only: false,
    };
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    if std::env::args().nth(1).as_deref() == Some(tiered::LISTENER) {
        return tiered::listen().await;
    }
    let mut sizes = Sizes::DEFAULT;
    let mut sqlite_only = false;
    let mut out = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench.json").to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => {
                sizes = Sizes {
                    hot_only: sizes.hot_only,
                    ..Sizes::QUICK
                }
            }
            "--hot-only" => sizes.hot_only = true,
            "--sqlite-only" => sqlite_only = true,
            "--out" => out = args.next().ok_or("--out needs a path")?,
            "--only" => {
                let groups = args
                    .next()
                    .ok_or("--only needs a comma-separated list of groups")?;
                let groups: Vec<String> = groups.split(',').map(str::to_owned).collect();
                if let Some(unknown) = groups.iter().find(|g| !GROUPS.contains(&g.as_str())) {
                    return Err(format!(
                        "unknown group {unknown:?}; the groups: {}",
                        GROUPS.join(", ")
                    )
                    .into());
                }
                ONLY.set(groups).map_err(|_| "--only given twice")?;
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; use --quick, --sqlite-only, --hot-only, --only GROUPS and/or --out PATH"
                )
                .into());
            }
        }
    }
    let mut report = if sqlite_only {
        Report::default()
    } else {
        postgres_section(sizes).await?
    };
    if !sizes.hot_only && wanted("sqlite") {
        eprintln!("SQLite…");
        sqlite_section(sizes, &mut report).await?;
    }
    report.fact("mode", if sizes.quick() { "--quick" } else { "default" });
    report.finish(&out)?;
    Ok(())
}

/// The PostgreSQL + Redis sections, on a database and a key prefix of their own, removed afterwards.
async fn postgres_section(sizes: Sizes) -> Result<Report, BoxError> {
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let mut admin = PgConnection::connect(&admin_url).await.map_err(|e| {
        format!(
            "PostgreSQL is not reachable at {admin_url} ({e}); start it or set DATABASE_URL to a server where \
             the user may CREATE DATABASE"
        )
    })?;
    let name = format!("cache_bench_{}", std::process::id());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await?;
    let prefix = format!("bench_{}:", std::process::id());
    let result = run(
        &examples::database_url(&admin_url, &name),
        &redis_url,
        &prefix,
        sizes,
    )
    .await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    if let Err(e) = examples::delete_prefix(&redis_url, &prefix).await {
        eprintln!("could not delete the keys under {prefix}: {e}");
    }
    result
}

impl Sizes {
    fn quick(&self) -> bool {
        self.single == Self::QUICK.single
    }
}

/// What the write and read rows need, on either database: the cached pool, a plain pool on the same
/// database (the hand-written and raw sqlx variants), and the labels that differ.
struct BenchEnv<DB: Backend> {
    pool: CachedPool<DB>,
    raw: Pool<DB>,
    sizes: Sizes,
    /// The PostgreSQL run's Redis: the hand-written variants pipeline their `DEL`s on it. `None` on the
    /// SQLite run, where they call `invalidate` of the pool's own (in-process) store.
    redis: Option<redis::aio::MultiplexedConnection>,
    /// The Redis key prefix (empty on SQLite: the store's keys are its own).
    prefix: String,
    /// The Redis server's URL (empty on SQLite).
    redis_url: String,
    /// Before each group's name: `""` (PostgreSQL) or `"SQLite "`.
    db: &'static str,
    /// The cached pool's type, as the rows name it.
    pool_name: &'static str,
    /// The store of `pool`, as the rows name it.
    store_name: &'static str,
}

type Env = BenchEnv<Postgres>;

/// A variant of the read-hit rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hit {
    /// `GET` of the same value stored by hand in Redis, and its MessagePack decode.
    RawGet,
    /// The primary-key `SELECT`.
    Select,
    /// `get_or_load` on the pool's cache.
    Cache,
    /// `get_or_load` on a cache of its own on an in-process store.
    Memory,
    /// `get` of the same MessagePack bytes from a raw moka cache, and their decode.
    RawMoka,
    /// The peek's `MGET` (the value slot and its namespace token) by hand, without the store's sequence.
    MgetWithoutSequence,
    /// The same `MGET` with the store's sequence, as `RedisStore::peek` sends it.
    MgetWithSequence,
}

impl<DB: Backend> BenchEnv<DB> {
    /// A clone of the Redis connection (the PostgreSQL run only).
    fn redis(&self) -> Result<redis::aio::MultiplexedConnection, BoxError> {
        Ok(self.redis.clone().ok_or("this section needs Redis")?)
    }

    /// The keys of a product row, as the hand-written variant knows them (with the Redis prefix).
    fn keys(&self, id: i64) -> [String; 2] {
        [
            format!("{}product:{id}", self.prefix),
            format!("{}category:{}:products", self.prefix, id % CATEGORIES),
        ]
    }

    /// The keys of the 10k-row `UPDATE`: every returned product and every category list.
    fn bulk_keys(&self, rows: &[(i64, i64)]) -> Vec<String> {
        let mut keys: Vec<String> = rows
            .iter()
            .map(|(id, _)| format!("{}product:{id}", self.prefix))
            .collect();
        keys.extend((0..CATEGORIES).map(|c| format!("{}category:{c}:products", self.prefix)));
        keys
    }

    /// The hand-written invalidation: a pipeline of `DEL`s on Redis, or the store's `invalidate`.
    async fn invalidate_by_hand(&mut self, keys: &[String]) -> Result<(), BoxError> {
        match &mut self.redis {
            Some(redis) => {
                let mut pipe = redis::pipe();
                for key in keys {
                    pipe.del(key).ignore();
                }
                pipe.query_async::<()>(redis).await?;
            }
            None => drop(self.pool.store().invalidate(keys).await?),
        }
        Ok(())
    }
}

/// The write and read rows, one implementation for both databases: the bounds say what they need from sqlx.
impl<DB> BenchEnv<DB>
where
    DB: Backend,
    for<'c> &'c CachedPool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'c, 't> &'c mut CachedTransaction<'t, DB>: sqlx::Executor<'c, Database = DB>,
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    i64: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
    Product: for<'r> sqlx::FromRow<'r, DB::Row>,
    (i64, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    /// Adds the three write variants of a group, ratios against the hand-written one.
    fn write_rows(&self, report: &mut Report, group: &str, s: &[Samples; 3]) {
        let group = format!("{}write: {group}", self.db);
        let (ours, manual, raw) = (s[0].stats(), s[1].stats(), s[2].stats());
        let by_hand = match self.redis {
            Some(_) => "hand-written UPDATE + DEL (baseline)",
            None => "hand-written UPDATE + store invalidate (baseline)",
        };
        report.latency(&group, by_hand, manual, Some(manual.median_us));
        report.latency(&group, self.pool_name, ours, Some(manual.median_us));
        report.latency(&group, "raw sqlx, no cache", raw, Some(manual.median_us));
        let vs = format!("{} vs raw sqlx (median ratio)", self.pool_name);
        report.value_vs(&group, &vs, ours.median_us, "µs", raw.median_us);
    }

    async fn write_single(&mut self, report: &mut Report) -> Result<(), BoxError> {
        let mut s: [Samples; 3] = Default::default();
        for i in 0..self.sizes.single {
            let id = 1 + (i as i64 * 37) % ROWS;
            for v in 0..3 {
                let start = Instant::now();
                match (i + v) % 3 {
                    0 => {
                        sqlx::query(UPDATE).bind(id).execute(&self.pool).await?;
                    }
                    1 => {
                        sqlx::query(UPDATE_PLAIN)
                            .bind(id)
                            .execute(&self.raw)
                            .await?;
                        let keys = self.keys(id);
                        self.invalidate_by_hand(&keys).await?;
                    }
                    _ => {
                        sqlx::query(UPDATE_PLAIN)
                            .bind(id)
                            .execute(&self.raw)
                            .await?;
                    }
                }
                s[(i + v) % 3].push(start.elapsed());
            }
        }
        self.write_rows(report, "1-row autocommit UPDATE", &s);
        Ok(())
    }

    async fn write_tx(&mut self, report: &mut Report) -> Result<(), BoxError> {
        let mut s: [Samples; 3] = Default::default();
        // The commit alone: `CachedTransaction::commit` against `COMMIT` then the `DEL`s.
        let mut commits: [Samples; 2] = Default::default();
        for i in 0..self.sizes.tx {
            let ids: Vec<i64> = (0..5)
                .map(|k| 1 + (i as i64 * 53 + k * 997) % ROWS)
                .collect();
            for v in 0..3 {
                let start = Instant::now();
                match (i + v) % 3 {
                    0 => {
                        let mut tx = self.pool.begin().await?;
                        for &id in &ids {
                            sqlx::query(UPDATE).bind(id).execute(&mut tx).await?;
                        }
                        let commit = Instant::now();
                        tx.commit().await?;
                        commits[0].push(commit.elapsed());
                    }
                    1 => {
                        let commit = self.plain_tx(&ids).await?;
                        let keys: Vec<String> = ids.iter().flat_map(|&id| self.keys(id)).collect();
                        self.invalidate_by_hand(&keys).await?;
                        commits[1].push(commit.elapsed());
                    }
                    _ => drop(self.plain_tx(&ids).await?),
                }
                s[(i + v) % 3].push(start.elapsed());
            }
        }
        self.write_rows(report, "5-UPDATE transaction", &s);
        let group = format!("{}write: 5-UPDATE transaction, the commit alone", self.db);
        let base = commits[1].stats();
        report.latency(
            &group,
            "CachedTransaction::commit (keys read, COMMIT, invalidate)",
            commits[0].stats(),
            Some(base.median_us),
        );
        report.latency(
            &group,
            "hand-written COMMIT then DEL (baseline)",
            base,
            Some(base.median_us),
        );
        Ok(())
    }

    /// The 5-`UPDATE` transaction on the plain pool; returns when its `COMMIT` was sent.
    async fn plain_tx(&self, ids: &[i64]) -> Result<Instant, sqlx::Error> {
        let mut tx = self.raw.begin().await?;
        for &id in ids {
            sqlx::query(UPDATE_PLAIN).bind(id).execute(&mut *tx).await?;
        }
        let commit = Instant::now();
        tx.commit().await?;
        Ok(commit)
    }

    async fn write_bulk(&mut self, report: &mut Report) -> Result<(), BoxError> {
        let mut s: [Samples; 3] = Default::default();
        for i in 0..self.sizes.bulk {
            for v in 0..3 {
                let start = Instant::now();
                match (i + v) % 3 {
                    0 => {
                        sqlx::query(UPDATE_ALL).execute(&self.pool).await?;
                    }
                    1 => {
                        let rows: Vec<(i64, i64)> = sqlx::query_as(UPDATE_ALL_PLAIN_RETURNING)
                            .fetch_all(&self.raw)
                            .await?;
                        let keys = self.bulk_keys(&rows);
                        self.invalidate_by_hand(&keys).await?;
                    }
                    _ => {
                        sqlx::query(UPDATE_ALL_PLAIN).execute(&self.raw).await?;
                    }
                }
                s[(i + v) % 3].push(start.elapsed());
            }
            if DB::NAME == "PostgreSQL" {
                // Keep the heaps the same shape for every variant.
                sqlx::raw_sql("VACUUM products, plain_products")
                    .execute(&self.raw)
                    .await?;
            }
        }
        self.write_rows(report, "10k-row UPDATE", &s);
        Ok(())
    }

    /// The primary-key `SELECT` of the read rows and their loaders, on `executor`.
    async fn select<'e>(
        executor: impl sqlx::Executor<'e, Database = DB>,
        id: i64,
    ) -> Result<Option<Product>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, category_id, name, price_cents, version FROM products WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(executor)
        .await
    }

    /// In-process hits in a tight loop (1,000 in a row, the batches of the two variants alternating):
    /// `get_or_load` on a `MemoryStore` cache against a raw moka `get` + decode, per hit.
    async fn tight_hits(
        &self,
        memory: &Cache,
        moka: &moka::sync::Cache<String, Vec<u8>>,
        value: &Option<Product>,
        report: &mut Report,
    ) -> Result<(), BoxError> {
        const BATCH: u32 = 1_000;
        let mut s: [Samples; 2] = Default::default();
        for i in 0..self.sizes.reads / 50 {
            for v in 0..2 {
                let k = (i + v) % 2;
                let start = Instant::now();
                for _ in 0..BATCH {
                    let got: Option<Product> = if k == 0 {
                        let bytes = moka.get("product:1").ok_or("raw moka entry gone")?;
                        rmp_serde::from_slice(&bytes)?
                    } else {
                        memory
                            .get_or_load(Product::cache_key_for(&1), || async {
                                Err::<Option<Product>, _>("a measured hit ran the loader")
                            })
                            .await
                            .map_err(|e| e.to_string())?
                    };
                    if got != *value {
                        return Err(format!("read returned {got:?}, expected {value:?}").into());
                    }
                }
                s[k].push(start.elapsed() / BATCH);
            }
        }
        let group = format!(
            "{}read: in-process hit, tight loop (per hit, 1,000 in a row)",
            self.db
        );
        let base = s[0].stats();
        report.latency(
            &group,
            "raw moka get + decode (baseline)",
            base,
            Some(base.median_us),
        );
        report.latency(
            &group,
            "get_or_load, in-process store",
            s[1].stats(),
            Some(base.median_us),
        );
        Ok(())
    }

    /// The read rows: a hit of one cached product in each of `hits` (the first is the baseline), then a miss
    /// (the key invalidated, untimed; `get_or_load` takes the lease, loads, stores) against the bare
    /// `SELECT`, named `select_name`. `executor` runs the `SELECT`s and the loaders.
    async fn reads<'e, E>(
        &'e self,
        executor: E,
        hits: &[(&str, Hit)],
        select_name: &str,
        report: &mut Report,
    ) -> Result<(), BoxError>
    where
        E: sqlx::Executor<'e, Database = DB> + Copy,
    {
        let cache = self.pool.cache().clone();
        let memory = Cache::new(MemoryStore::default());
        let uses = |hit| hits.iter().any(|&(_, h)| h == hit);
        let mut redis = self.redis.clone();
        let raw_key = format!("{}raw:product:1", self.prefix);
        let value = Self::select(executor, 1).await?;
        if let Some(redis) = redis.as_mut().filter(|_| uses(Hit::RawGet)) {
            redis::cmd("SET")
                .arg(&raw_key)
                .arg(rmp_serde::to_vec(&value)?)
                .query_async::<()>(redis)
                .await?;
        }
        let moka: moka::sync::Cache<String, Vec<u8>> = moka::sync::Cache::new(10_000);
        moka.insert("product:1".to_owned(), rmp_serde::to_vec(&value)?);
        let key = || Product::cache_key_for(&1);
        let load = || Self::select(executor, 1);
        cache
            .get_or_load(key(), load)
            .await
            .map_err(|e| e.to_string())?;
        if uses(Hit::Memory) {
            memory
                .get_or_load(key(), load)
                .await
                .map_err(|e| e.to_string())?;
        }
        let loads_before = cache.stats().loads;
        let mut s = vec![Samples::default(); hits.len()];
        for i in 0..self.sizes.reads {
            for v in 0..hits.len() {
                let k = (i + v) % hits.len();
                let start = Instant::now();
                let got: Option<Product> = match hits[k].1 {
                    Hit::RawGet => {
                        let bytes: Vec<u8> = redis::cmd("GET")
                            .arg(&raw_key)
                            .query_async(redis.as_mut().ok_or("no Redis")?)
                            .await?;
                        rmp_serde::from_slice(&bytes)?
                    }
                    Hit::Select => Self::select(executor, 1).await?,
                    Hit::RawMoka => {
                        let bytes = moka.get("product:1").ok_or("raw moka entry gone")?;
                        rmp_serde::from_slice(&bytes)?
                    }
                    Hit::MgetWithoutSequence | Hit::MgetWithSequence => {
                        let mut mget = redis::cmd("MGET");
                        mget.arg(format!("{}product:1", self.prefix))
                            .arg(format!("{}<tag>product:<>", self.prefix));
                        if hits[k].1 == Hit::MgetWithSequence {
                            mget.arg(format!("{}<sequence>", self.prefix));
                        }
                        let slots: Vec<Option<Vec<u8>>> =
                            mget.query_async(redis.as_mut().ok_or("no Redis")?).await?;
                        if slots.first().is_none_or(Option::is_none) {
                            return Err("the peek's slots are gone".into());
                        }
                        value.clone()
                    }
                    hit => {
                        let cache = if hit == Hit::Memory { &memory } else { &cache };
                        cache
                            .get_or_load(key(), load)
                            .await
                            .map_err(|e| e.to_string())?
                    }
                };
                s[k].push(start.elapsed());
                if got != value {
                    return Err(format!("read returned {got:?}, expected {value:?}").into());
                }
            }
        }
        let loads = cache.stats().loads - loads_before;
        if loads != 0 {
            return Err(format!("{loads} measured {}hits were loads", self.db).into());
        }
        let (group, base) = (format!("{}read: hit", self.db), s[0].stats());
        for ((name, _), s) in hits.iter().zip(&s) {
            report.latency(&group, name, s.stats(), Some(base.median_us));
        }

        if uses(Hit::Memory) && uses(Hit::RawMoka) {
            self.tight_hits(&memory, &moka, &value, report).await?;
        }

        // With Redis, a third variant: the naive miss (`GET` finds nothing, `SELECT`, `SET … EX`).
        let variants = if redis.is_some() { 3 } else { 2 };
        let mut s: [Samples; 3] = Default::default();
        for i in 0..self.sizes.misses {
            let id = 2 + (i as i64 * 31) % (ROWS - 1);
            cache
                .invalidate(&[Product::cache_key_for(&id).into_string()])
                .await?;
            let naive_key = format!("{}naive-miss:product:{id}:{i}", self.prefix);
            for v in 0..variants {
                let variant = (i + v) % variants;
                let start = Instant::now();
                match variant {
                    0 => {
                        Self::select(executor, id).await?;
                    }
                    1 => {
                        cache
                            .get_or_load(Product::cache_key_for(&id), || Self::select(executor, id))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    _ => {
                        let redis = redis.as_mut().ok_or("no Redis")?;
                        let cached: Option<Vec<u8>> =
                            redis::cmd("GET").arg(&naive_key).query_async(redis).await?;
                        if cached.is_none() {
                            let row = Self::select(executor, id).await?;
                            redis::cmd("SET")
                                .arg(&naive_key)
                                .arg(rmp_serde::to_vec(&row)?)
                                .arg("EX")
                                .arg(600)
                                .query_async::<()>(redis)
                                .await?;
                        }
                    }
                }
                s[variant].push(start.elapsed());
            }
        }
        let (group, base) = (format!("{}read: miss", self.db), s[0].stats());
        report.latency(&group, select_name, base, Some(base.median_us));
        let miss = format!(
            "get_or_load miss, {} (lease + load + fill)",
            self.store_name
        );
        report.latency(&group, &miss, s[1].stats(), Some(base.median_us));
        if variants == 3 {
            let naive = s[2].stats();
            report.latency(
                &group,
                "naive miss: GET, SELECT, SET EX",
                naive,
                Some(base.median_us),
            );
            let vs = "get_or_load miss vs the naive miss (median ratio)";
            report.value_vs(&group, vs, s[1].stats().median_us, "µs", naive.median_us);
        }
        Ok(())
    }
}

async fn run(url: &str, redis_url: &str, prefix: &str, sizes: Sizes) -> Result<Report, BoxError> {
    let raw = PgPoolOptions::new()
        .max_connections(CLIENTS as u32)
        .connect(url)
        .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
                                price_cents bigint NOT NULL, version bigint NOT NULL DEFAULT 0);
         INSERT INTO products SELECT i, i % {CATEGORIES}, 'Product number ' || i, i, 0
           FROM generate_series(1, {ROWS}) AS i;
         CREATE TABLE plain_products (LIKE products INCLUDING ALL);
         INSERT INTO plain_products SELECT * FROM products;
         CREATE TABLE l1_products (LIKE products INCLUDING ALL);
         INSERT INTO l1_products SELECT * FROM products;
         {}
         {}",
        load::TABLES,
        hot::TABLES
    )))
    .execute(&raw)
    .await?;
    sqlx::raw_sql("VACUUM ANALYZE").execute(&raw).await?;
    let store = RedisStore::connect(redis_url, prefix.to_owned())
        .await
        .map_err(|e| {
            format!("Redis is not reachable at {redis_url} ({e}); start it or set REDIS_URL")
        })?;
    let pool = CachedPgPool::options()
        .registry(Registry::new([
            Product::META,
            L1Product::META,
            load::D5Product::META,
            load::D20Product::META,
        ]))
        .auto_install(true)
        .pool_options(PgPoolOptions::new().max_connections(CLIENTS as u32))
        .connect(url, store)
        .await?;
    let redis = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut env = Env {
        pool,
        raw,
        sizes,
        redis: Some(redis),
        prefix: prefix.to_owned(),
        redis_url: redis_url.to_owned(),
        db: "",
        pool_name: "CachedPool",
        store_name: "Redis",
    };
    let mut report = Report::default();
    if sizes.hot_only {
        hot_rows(url, redis_url, prefix, sizes, &mut report).await?;
        env.pool.close().await;
        return Ok(report);
    }
    report.fact("rows", ROWS);
    report.fact("codec", "MessagePack (rmp-serde) for every cached variant");
    report.fact(
        "pools",
        format!("{CLIENTS} connections each (CachedPool, plain PgPool)"),
    );

    if wanted("single") {
        eprintln!("write path…");
        env.write_single(&mut report).await?;
        write_breakdown(&mut env, &mut report).await?;
    }
    if wanted("tx") {
        env.write_tx(&mut report).await?;
    }
    if wanted("bulk") {
        env.write_bulk(&mut report).await?;
        load::wide_depends(&mut env, &mut report).await?;
    }
    if wanted("throughput") {
        eprintln!("write throughput…");
        load::throughput(&mut env, &mut report).await?;
    }
    if wanted("reads") {
        eprintln!("read path…");
        read_rows(&env, &mut report).await?;
    }
    if wanted("tiers") {
        eprintln!("two tiers…");
        tiered::hits(&env, &mut report).await?;
        tiered::fanout(&env, &mut report).await?;
        eprintln!("Redis Cluster…");
        cluster::rows(&env, &mut report).await?;
    }
    if wanted("memory") {
        eprintln!("memory…");
        load::memory(&env, url, redis_url, &mut report).await?;
    }
    if wanted("stampede") {
        eprintln!("stampede…");
        stampede(&mut env, &mut report).await?;
    }
    if wanted("mixed") {
        eprintln!("mixed workload…");
        mixed(&mut env, url, &mut report).await?;
    }
    if wanted("foreign") {
        eprintln!("foreign writes…");
        foreign(&mut env, &mut report).await?;
    }
    if wanted("hot") {
        hot_rows(url, redis_url, prefix, sizes, &mut report).await?;
    }
    env.pool.close().await;
    if wanted("backlog") {
        eprintln!("backlog drain…");
        backlog(&env, url, redis_url, &mut report).await?;
    }
    env.raw.close().await;
    Ok(report)
}

/// The groups `--only` may name.
const GROUPS: [&str; 13] = [
    "single",
    "tx",
    "bulk",
    "throughput",
    "reads",
    "tiers",
    "memory",
    "stampede",
    "mixed",
    "foreign",
    "hot",
    "backlog",
    "sqlite",
];

/// The groups `--only` named (every group without it).
static ONLY: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Whether the group `name` runs.
fn wanted(name: &str) -> bool {
    ONLY.get().is_none_or(|only| only.iter().any(|g| g == name))
}

/// The read-hit and read-miss rows.
async fn read_rows(env: &Env, report: &mut Report) -> Result<(), BoxError> {
    let hits = [
        ("raw GET + decode, Redis (baseline)", Hit::RawGet),
        ("get_or_load, Redis", Hit::Cache),
        ("get_or_load, in-process store", Hit::Memory),
        ("raw moka get + decode", Hit::RawMoka),
        (
            "peek MGET by hand, without the sequence",
            Hit::MgetWithoutSequence,
        ),
        (
            "peek MGET by hand, with the sequence",
            Hit::MgetWithSequence,
        ),
    ];
    let select = "SELECT by primary key (baseline)";
    env.reads(&env.pool, &hits, select, report).await
}

/// The hot-key (delete vs refresh) and consistency-SLI rows.
async fn hot_rows(
    url: &str,
    redis_url: &str,
    prefix: &str,
    sizes: Sizes,
    report: &mut Report,
) -> Result<(), BoxError> {
    eprintln!("hot key: delete vs refresh…");
    hot::hot_key(url, redis_url, prefix, sizes.quick(), report).await?;
    eprintln!("consistency SLI overhead…");
    hot::sli_overhead(url, redis_url, prefix, sizes.quick(), report).await
}

const UPDATE: &str =
    "UPDATE products SET price_cents = price_cents + 1, version = version + 1 WHERE id = $1";
const UPDATE_PLAIN: &str =
    "UPDATE plain_products SET price_cents = price_cents + 1, version = version + 1 WHERE id = $1";

const UPDATE_RETURNING: &str = "UPDATE products SET price_cents = price_cents + 1, version = version + 1 \
     WHERE id = $1 RETURNING version";
const UPDATE_L1_RETURNING: &str = "UPDATE l1_products SET price_cents = price_cents + 1, \
     version = version + 1 WHERE id = $1 RETURNING version";
const UPDATE_PLAIN_RETURNING: &str = "UPDATE plain_products SET price_cents = price_cents + 1, \
     version = version + 1 WHERE id = $1 RETURNING version";

const UPDATE_ALL: &str = "UPDATE products SET price_cents = price_cents + 1, version = version + 1";
const UPDATE_ALL_PLAIN: &str =
    "UPDATE plain_products SET price_cents = price_cents + 1, version = version + 1";
const UPDATE_ALL_PLAIN_RETURNING: &str = "UPDATE plain_products SET price_cents = price_cents + 1, \
     version = version + 1 RETURNING id, category_id";

/// Where the single-row overhead goes: the pieces of a `CachedPool` autocommit write, timed alone.
async fn write_breakdown(env: &mut Env, report: &mut Report) -> Result<(), BoxError> {
    const PARTS: [&str; 6] = [
        "SELECT 1 (one PostgreSQL round trip)",
        "session_keys() on an empty outbox (the extra round trip after a write)",
        "UPDATE on the table with the capture trigger (plain pool)",
        "UPDATE on the table without trigger (plain pool)",
        "RedisStore::invalidate of the 2 keys (value + tag slots)",
        "hand-written DEL of the 2 keys",
    ];
    let mut s: [Samples; 6] = Default::default();
    let store = Arc::clone(env.pool.store());
    for i in 0..env.sizes.single / 2 {
        let id = 1 + (i as i64 * 41) % ROWS;
        for v in 0..PARTS.len() {
            let part = (i + v) % PARTS.len();
            let start = Instant::now();
            match part {
                0 => {
                    sqlx::query("SELECT 1").execute(&env.raw).await?;
                }
                1 => {
                    sqlx::query("SELECT id, keys FROM cache_invalidation.session_keys()")
                        .execute(&env.raw)
                        .await?;
                }
                2 => {
                    sqlx::query(UPDATE).bind(id).execute(&env.raw).await?;
                }
                3 => {
                    sqlx::query(UPDATE_PLAIN).bind(id).execute(&env.raw).await?;
                }
                4 => {
                    store
                        .invalidate(&[
                            format!("product:{id}"),
                            format!("category:{}:products", id % CATEGORIES),
                        ])
                        .await?;
                }
                _ => {
                    let keys = env.keys(id);
                    env.invalidate_by_hand(&keys).await?;
                }
            }
            s[part].push(start.elapsed());
        }
    }
    for (name, samples) in PARTS.iter().zip(&s) {
        report.latency("write: 1-row breakdown", name, samples.stats(), None);
    }
    Ok(())
}

/// The loader of the stampede: a 20 ms query standing for an expensive page.
async fn slow_select(pool: &PgPool, id: i64) -> Result<Option<Product>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, category_id, name, price_cents, version FROM products, pg_sleep(0.02) WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

async fn stampede(env: &mut Env, report: &mut Report) -> Result<(), BoxError> {
    const READERS: usize = 1_000;
    let group = "stampede: 1,000 concurrent cold reads, 20 ms loader";
    let id = 3;
    let key = Product::cache_key_for(&id);
    let naive_key = format!("{}naive:product:{id}", env.prefix);
    let mut redis = env.redis()?;
    for variant in [
        "naive cache-aside (GET, SELECT, SET)",
        "get_or_load, Redis",
        "get_or_load, in-process store",
    ] {
        let calls = Arc::new(AtomicUsize::new(0));
        let cache = match variant {
            "get_or_load, Redis" => env.pool.cache().clone(),
            _ => Cache::new(MemoryStore::default()),
        };
        cache.invalidate(&[key.as_str().to_owned()]).await?;
        redis::cmd("DEL")
            .arg(&naive_key)
            .query_async::<()>(&mut redis)
            .await?;
        let naive = variant.starts_with("naive");
        let start = Arc::new(tokio::sync::Barrier::new(READERS));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..READERS {
            let (cache, calls, raw, start) = (
                cache.clone(),
                Arc::clone(&calls),
                env.raw.clone(),
                Arc::clone(&start),
            );
            let (mut redis, naive_key) = (redis.clone(), naive_key.clone());
            tasks.spawn(async move {
                start.wait().await;
                let begin = Instant::now();
                let got = if naive {
                    let hit: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(&naive_key)
                        .query_async(&mut redis)
                        .await?;
                    match hit {
                        Some(bytes) => rmp_serde::from_slice(&bytes)?,
                        None => {
                            calls.fetch_add(1, Ordering::Relaxed);
                            let v = slow_select(&raw, id).await?;
                            redis::cmd("SET")
                                .arg(&naive_key)
                                .arg(rmp_serde::to_vec(&v)?)
                                .arg("EX")
                                .arg(600)
                                .query_async::<()>(&mut redis)
                                .await?;
                            v
                        }
                    }
                } else {
                    cache
                        .get_or_load(Product::cache_key_for(&id), || async {
                            calls.fetch_add(1, Ordering::Relaxed);
                            slow_select(&raw, id).await
                        })
                        .await
                        .map_err(|e| e.to_string())?
                };
                if got.is_none() {
                    return Err::<Duration, BoxError>("product 3 missing".into());
                }
                Ok(begin.elapsed())
            });
        }
        let mut s = Samples::default();
        while let Some(done) = tasks.join_next().await {
            s.push(done??);
        }
        report.latency(group, variant, s.stats(), None);
        report.value(
            group,
            &format!("{variant}: loader calls"),
            calls.load(Ordering::Relaxed) as f64,
            "calls",
        );
    }
    Ok(())
}

/// The three mixed-workload variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    NoCache,
    Naive,
    Ours,
    OursL1,
    OursTiered,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::NoCache => "no cache (SELECT / UPDATE)",
            Mode::Naive => "naive cache-aside (GET, SELECT+SET EX / UPDATE+DEL)",
            Mode::Ours => "this library, Redis (get_or_load / CachedPool UPDATE)",
            Mode::OursL1 => "this library, in-process store (one process)",
            Mode::OursTiered => "this library, TieredStore (in-process tier over Redis)",
        }
    }
}

/// Accumulated results of one mixed-workload variant.
#[derive(Default)]
struct Mixed {
    ops: u64,
    elapsed: Duration,
    reads: Samples,
    writes: Samples,
    stale: u64,
}

/// Per row, the highest version whose write had returned: a read that began later must not see less.
struct Floors(Vec<AtomicI64>);

impl Floors {
    fn new() -> Self {
        Self((0..=ROWS).map(|_| AtomicI64::new(0)).collect())
    }
    fn get(&self, id: i64) -> &AtomicI64 {
        &self.0[usize::try_from(id).unwrap_or(0)]
    }
}

/// The mixed workload. The in-process and two-tier variants run on databases of their own
/// (`<bench database>_l1`, `_tiered`, each with `l1_products`), so that every variant's pool is the only
/// consumer of its outbox: on one database, every consumer delivers every write, and each variant's writes
/// would also be relayed to the other variants' stores.
async fn mixed(env: &mut Env, url: &str, report: &mut Report) -> Result<(), BoxError> {
    let mut admin = PgConnection::connect(url).await?;
    let mut sides = Vec::new();
    for suffix in ["l1", "tiered"] {
        let name = format!("cache_bench_{}_{suffix}", std::process::id());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
        sides.push(name);
    }
    let result = mixed_on(env, url, &sides, report).await;
    for name in &sides {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await?;
    }
    result
}

/// A cached pool on the side database `name` (next to `url`'s), its `l1_products` created and seeded.
async fn side_pool<S: cache_runtime::Store + 'static>(
    url: &str,
    name: &str,
    store: S,
) -> Result<CachedPgPool, BoxError> {
    let side = examples::database_url(url, name);
    let mut conn = PgConnection::connect(&side).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE l1_products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
                                   price_cents bigint NOT NULL, version bigint NOT NULL DEFAULT 0);
         INSERT INTO l1_products SELECT i, i % {CATEGORIES}, 'Product number ' || i, i, 0
           FROM generate_series(1, {ROWS}) AS i;"
    )))
    .execute(&mut conn)
    .await?;
    sqlx::raw_sql("VACUUM ANALYZE l1_products")
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(CachedPgPool::options()
        .registry(Registry::new([L1Product::META]))
        .auto_install(true)
        .pool_options(PgPoolOptions::new().max_connections(CLIENTS as u32))
        .connect(&side, store)
        .await?)
}

async fn mixed_on(
    env: &mut Env,
    url: &str,
    sides: &[String],
    report: &mut Report,
) -> Result<(), BoxError> {
    const ROUNDS: u32 = 3;
    let redis = env.redis()?;
    let zipf = Arc::new(Zipf::new(usize::try_from(ROWS)?, 0.99));
    let plain_floor = Arc::new(Floors::new());
    let ours_floor = Arc::new(Floors::new());
    let l1_floor = Arc::new(Floors::new());
    let tiered_floor = Arc::new(Floors::new());
    let tier = TieredStore::builder().build(
        RedisStore::connect(&env.redis_url, format!("{}t:", env.prefix)).await?,
        redis::Client::open(env.redis_url.as_str())?,
    );
    if !tier.ready(Duration::from_secs(5)).await {
        return Err("the TieredStore's tier did not come up".into());
    }
    let [l1_db, tiered_db] = sides else {
        return Err("mixed: two side databases expected".into());
    };
    let tiered = side_pool(url, tiered_db, tier.clone()).await?;
    let l1 = side_pool(url, l1_db, MemoryStore::default()).await?;
    let modes = [
        Mode::NoCache,
        Mode::Naive,
        Mode::Ours,
        Mode::OursL1,
        Mode::OursTiered,
    ];
    let mut results: [Mixed; 5] = Default::default();
    let slice = env.sizes.mixed / (ROUNDS * 5);
    // The caches' counters when the measured rounds began (and the tier's hits).
    let mut measured_from = [(cache_runtime::cache::Stats::default(), 0); 3];
    // Round 0 warms every cache (every row read once, untimed): the measured rounds see steady state,
    // not the cold misses that a slower variant would otherwise pay for a larger share of its reads.
    for round in 0..=ROUNDS as usize {
        let warm = round == 0;
        if round == 1 {
            measured_from = [
                (env.pool.cache().stats(), 0),
                (l1.cache().stats(), 0),
                (tiered.cache().stats(), tier.stats().hits),
            ];
        }
        for k in 0..modes.len() {
            let m = (round + k) % modes.len();
            let mode = modes[m];
            let floors = match mode {
                Mode::Ours => &ours_floor,
                Mode::OursL1 => &l1_floor,
                Mode::OursTiered => &tiered_floor,
                _ => &plain_floor,
            };
            let start = Instant::now();
            let deadline = start + slice;
            let mut tasks = tokio::task::JoinSet::new();
            for client in 0..CLIENTS {
                let (zipf, floors) = (Arc::clone(&zipf), Arc::clone(floors));
                let (pool, raw, mut redis) = (env.pool.clone(), env.raw.clone(), redis.clone());
                let (l1, tiered) = (l1.clone(), tiered.clone());
                let prefix = env.prefix.clone();
                tasks.spawn(async move {
                    let mut rng = fastrand::Rng::with_seed((round * 100 + client) as u64);
                    let (mut reads, mut writes, mut stale, mut ops) = (Samples::default(), Samples::default(), 0u64, 0u64);
                    let mut warming = (client as i64 + 1..=ROWS).step_by(CLIENTS);
                    loop {
                        // The warm-up round reads every row once; the measured rounds run to the deadline.
                        let (id, write) = if warm {
                            let Some(id) = warming.next() else { break };
                            (id, false)
                        } else if Instant::now() < deadline {
                            (zipf.sample(rng.f64()), rng.f64() < 0.05)
                        } else {
                            break;
                        };
                        let begin = Instant::now();
                        if write {
                            let version: i64 = match mode {
                                Mode::NoCache => {
                                    sqlx::query_scalar(UPDATE_PLAIN_RETURNING).bind(id).fetch_one(&raw).await?
                                }
                                Mode::Naive => {
                                    let v = sqlx::query_scalar(UPDATE_PLAIN_RETURNING).bind(id).fetch_one(&raw).await?;
                                    redis::cmd("DEL").arg(format!("{prefix}naive:product:{id}")).query_async::<()>(&mut redis).await?;
                                    v
                                }
                                Mode::Ours => {
                                    sqlx::query_scalar(UPDATE_RETURNING).bind(id).fetch_one(&pool).await?
                                }
                                Mode::OursL1 => {
                                    sqlx::query_scalar(UPDATE_L1_RETURNING).bind(id).fetch_one(&l1).await?
                                }
                                Mode::OursTiered => {
                                    sqlx::query_scalar(UPDATE_L1_RETURNING).bind(id).fetch_one(&tiered).await?
                                }
                            };
                            writes.push(begin.elapsed());
                            floors.get(id).fetch_max(version, Ordering::SeqCst);
                        } else {
                            let floor = floors.get(id).load(Ordering::SeqCst);
                            let got: Option<Product> = match mode {
                                Mode::NoCache => sqlx::query_as("SELECT id, category_id, name, price_cents, version FROM plain_products WHERE id = $1")
                                    .bind(id).fetch_optional(&raw).await?,
                                Mode::Naive => {
                                    let key = format!("{prefix}naive:product:{id}");
                                    let hit: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(&mut redis).await?;
                                    match hit {
                                        Some(bytes) => rmp_serde::from_slice(&bytes)?,
                                        None => {
                                            let v: Option<Product> = sqlx::query_as("SELECT id, category_id, name, price_cents, version FROM plain_products WHERE id = $1")
                                                .bind(id).fetch_optional(&raw).await?;
                                            redis::cmd("SET").arg(&key).arg(rmp_serde::to_vec(&v)?).arg("EX").arg(600)
                                                .query_async::<()>(&mut redis).await?;
                                            v
                                        }
                                    }
                                }
                                Mode::Ours => pool.cache().get_or_load(Product::cache_key_for(&id), || Env::select(&pool, id))
                                    .await.map_err(|e| e.to_string())?,
                                Mode::OursL1 => l1.cache().get_or_load(L1Product::cache_key_for(&id), || async {
                                        sqlx::query_as("SELECT id, category_id, name, price_cents, version FROM l1_products WHERE id = $1")
                                            .bind(id).fetch_optional(&l1).await
                                    })
                                    .await.map_err(|e| e.to_string())?,
                                Mode::OursTiered => tiered.cache().get_or_load(L1Product::cache_key_for(&id), || async {
                                        sqlx::query_as("SELECT id, category_id, name, price_cents, version FROM l1_products WHERE id = $1")
                                            .bind(id).fetch_optional(&tiered).await
                                    })
                                    .await.map_err(|e| e.to_string())?,
                            };
                            reads.push(begin.elapsed());
                            if got.is_some_and(|p| p.version < floor) {
                                stale += 1;
                            }
                        }
                        ops += 1;
                    }
                    Ok::<_, BoxError>((ops, reads, writes, stale))
                });
            }
            let r = &mut results[m];
            while let Some(done) = tasks.join_next().await {
                let (ops, reads, writes, stale) = done??;
                if warm {
                    continue;
                }
                r.ops += ops;
                r.reads.merge(&reads);
                r.writes.merge(&writes);
                r.stale += stale;
            }
            if !warm {
                r.elapsed += start.elapsed();
            }
        }
    }
    let group = "mixed 95/5, zipf(0.99) over 10k rows, 16 clients";
    let tput = |r: &Mixed| r.ops as f64 / r.elapsed.as_secs_f64();
    let base = tput(&results[0]);
    for (m, r) in results.iter().enumerate() {
        let name = modes[m].name();
        report.value_vs(
            group,
            &format!("{name}: throughput"),
            tput(r),
            "ops/s",
            base,
        );
        report.latency(group, &format!("{name}: reads"), r.reads.stats(), None);
        report.latency(group, &format!("{name}: writes"), r.writes.stats(), None);
        if modes[m] != Mode::NoCache {
            report.value(
                group,
                &format!("{name}: stale reads"),
                r.stale as f64,
                "reads",
            );
        }
    }
    report.fact(
        "mixed workload",
        format!(
            "{:?} per variant, in {ROUNDS} alternating slices",
            env.sizes.mixed / 5
        ),
    );
    let caches = [env.pool.cache(), l1.cache(), tiered.cache()];
    for ((what, cache), before) in ["on Redis", "in-process", "on a TieredStore"]
        .iter()
        .zip(caches)
        .zip(&measured_from)
    {
        let (a, b) = (cache.stats(), before.0);
        report.fact(
            &format!("mixed workload (measured rounds), this library {what}"),
            format!(
                "hits {}, coalesced {}, loads {}, fills {}, fills rejected {}, lease waits {}",
                a.hits - b.hits,
                a.coalesced - b.coalesced,
                a.loads - b.loads,
                a.fills - b.fills,
                a.fills_rejected - b.fills_rejected,
                a.lease_waits - b.lease_waits
            ),
        );
    }
    report.fact(
        "mixed workload (measured rounds), TieredStore's in-process tier",
        format!("hits {}", tier.stats().hits - measured_from[2].1),
    );
    l1.close().await;
    tiered.close().await;
    Ok(())
}

async fn foreign(env: &mut Env, report: &mut Report) -> Result<(), BoxError> {
    let mut redis = env.redis()?;
    let mut s = Samples::default();
    for i in 0..env.sizes.foreign {
        let id = 1 + (i as i64 * 13) % ROWS;
        let key = format!("{}product:{id}", env.prefix);
        redis::cmd("SET")
            .arg(&key)
            .arg("cached")
            .query_async::<()>(&mut redis)
            .await?;
        sqlx::query(UPDATE).bind(id).execute(&env.raw).await?;
        let committed = Instant::now();
        loop {
            let exists: bool = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut redis)
                .await?;
            if !exists {
                break;
            }
            if committed.elapsed() > Duration::from_secs(5) {
                return Err(format!("foreign write to {key} not invalidated within 5 s").into());
            }
        }
        s.push(committed.elapsed());
    }
    report.latency(
        "foreign write: plain PgPool commit → key gone (relay)",
        "relay (LISTEN/NOTIFY)",
        s.stats(),
        None,
    );
    Ok(())
}

/// How the backlog is drained. The relay has no public drain API on this branch: a `CachedPool` with the
/// relay off calls `relay().deliver_pending()` until nothing is left (one call delivers what is claimable, in batches).
async fn drain(pool: &CachedPool) -> Result<usize, BoxError> {
    let drained = pool.relay().deliver_all().await?;
    Ok(usize::try_from(drained.rows).unwrap_or(usize::MAX))
}

async fn backlog(
    env: &Env,
    url: &str,
    redis_url: &str,
    report: &mut Report,
) -> Result<(), BoxError> {
    let store = RedisStore::connect(redis_url, env.prefix.clone()).await?;
    let drainer = CachedPgPool::options()
        .registry(Registry::new([
            Product::META,
            L1Product::META,
            load::D5Product::META,
            load::D20Product::META,
        ]))
        .run_relay(false)
        .pool_options(PgPoolOptions::new().max_connections(2))
        .connect(url, store)
        .await?;
    drain(&drainer).await?;
    let n = env.sizes.backlog;
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (raw, next) = (env.raw.clone(), Arc::clone(&next));
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, sqlx::Error>(());
                }
                let id = 1 + (i as i64 * 7) % ROWS;
                sqlx::query(UPDATE).bind(id).execute(&raw).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let (rows, keys): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(cardinality(keys)), 0)::bigint FROM cache_invalidation.outbox",
    )
    .fetch_one(&env.raw)
    .await?;
    let start = Instant::now();
    let delivered = drain(&drainer).await?;
    let elapsed = start.elapsed();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_invalidation.outbox")
        .fetch_one(&env.raw)
        .await?;
    drainer.close().await;
    if left != 0 {
        return Err(format!("{left} outbox rows left after the drain").into());
    }
    let group = "backlog drain (relay off while a plain pool wrote)";
    report.value(
        group,
        "outbox rows (one per statement)",
        rows as f64,
        "rows",
    );
    report.value(group, "drain time", elapsed.as_secs_f64() * 1e3, "ms");
    report.value(
        group,
        "rows/s",
        delivered as f64 / elapsed.as_secs_f64(),
        "rows/s",
    );
    report.value(
        group,
        "keys/s",
        keys as f64 / elapsed.as_secs_f64(),
        "keys/s",
    );
    Ok(())
}

/// The SQLite section: what a `CachedSqlitePool` costs on the write path against the same work written by
/// hand and against raw sqlx, and what the in-process store's hit costs against SQLite's own primary-key
/// `SELECT`. A temporary database file in WAL mode (`synchronous = NORMAL`, the usual WAL setting), removed
/// afterwards; the store is the in-process `MemoryStore` for the pool and for the hand-written variant.
async fn sqlite_section(sizes: Sizes, report: &mut Report) -> Result<(), BoxError> {
    let path = std::env::temp_dir().join(format!("cache_bench_{}.sqlite3", std::process::id()));
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal);
    let result = async {
        let raw = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE products (id INTEGER PRIMARY KEY, category_id INTEGER NOT NULL, name TEXT NOT NULL,
                                    price_cents INTEGER NOT NULL, version INTEGER NOT NULL DEFAULT 0);
             WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {ROWS})
             INSERT INTO products SELECT i, i % {CATEGORIES}, 'Product number ' || i, i, 0 FROM s;
             CREATE TABLE plain_products (id INTEGER PRIMARY KEY, category_id INTEGER NOT NULL,
                                          name TEXT NOT NULL, price_cents INTEGER NOT NULL,
                                          version INTEGER NOT NULL DEFAULT 0);
             INSERT INTO plain_products SELECT * FROM products;"
        )))
        .execute(&raw)
        .await?;
        let pool = CachedSqlitePool::options()
            .registry(Registry::new([Product::META]))
            .auto_install(true)
            .pool_options(SqlitePoolOptions::new().max_connections(4))
            .connect_with(options.clone(), MemoryStore::default())
            .await?;
        let mut env = BenchEnv {
            pool,
            raw,
            sizes,
            redis: None,
            prefix: String::new(),
            redis_url: String::new(),
            db: "SQLite ",
            pool_name: "CachedSqlitePool",
            store_name: "in-process store",
        };
        report.fact(
            "sqlite",
            format!(
                "temporary file, WAL, synchronous = NORMAL, SQLite {}; in-process MemoryStore",
                sqlx::query_scalar::<_, String>("SELECT sqlite_version()")
                    .fetch_one(&env.raw)
                    .await?
            ),
        );
        env.write_single(report).await?;
        sqlite_write_breakdown(&mut env, report).await?;
        env.write_tx(report).await?;
        env.write_bulk(report).await?;
        sqlite_bulk_breakdown(&env, report).await?;
        let hits = [
            ("SELECT by primary key, raw SqlitePool (baseline)", Hit::Select),
            ("get_or_load hit, in-process store", Hit::Cache),
        ];
        let select = "SELECT by primary key, raw SqlitePool (baseline)";
        env.reads(&env.raw, &hits, select, report).await?;
        env.pool.close().await;
        env.raw.close().await;
        Ok::<_, BoxError>(())
    }
    .await;
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
    result
}

/// Where the hand-written 10k-row variant's time goes: the `RETURNING` rows, and the in-process
/// invalidation of 10,100 keys (which the pool pays too, for 10,100 distinct keys).
async fn sqlite_bulk_breakdown(
    env: &BenchEnv<Sqlite>,
    report: &mut Report,
) -> Result<(), BoxError> {
    let mut parts: [Samples; 2] = Default::default();
    for _ in 0..env.sizes.bulk {
        let start = Instant::now();
        let rows: Vec<(i64, i64)> = sqlx::query_as(UPDATE_ALL_PLAIN_RETURNING)
            .fetch_all(&env.raw)
            .await?;
        parts[0].push(start.elapsed());
        let keys = env.bulk_keys(&rows);
        // Timed around the call: `MemoryStore` does its work when called, before the future is polled.
        let start = Instant::now();
        env.pool.store().invalidate(&keys).await?;
        parts[1].push(start.elapsed());
    }
    let group = "SQLite write: 10k-row breakdown";
    let returning = "UPDATE … RETURNING id, category_id (10k rows to the client)";
    report.latency(group, returning, parts[0].stats(), None);
    let invalidate = "MemoryStore::invalidate of 10,100 keys";
    report.latency(group, invalidate, parts[1].stats(), None);
    Ok(())
}

/// Where the SQLite single-row overhead goes: the writer's steps, done by hand with a plain pool and timed
/// one by one (the trigger's `UPDATE`, reading the outbox above the watermark, the store invalidation, the
/// `DELETE` of the delivered row), against the `UPDATE` of the table without trigger.
async fn sqlite_write_breakdown(
    env: &mut BenchEnv<Sqlite>,
    report: &mut Report,
) -> Result<(), BoxError> {
    const PARTS: [&str; 5] = [
        "UPDATE on the table without trigger (plain pool)",
        "UPDATE on the table with the capture trigger (writes the JSON outbox row)",
        "SELECT the outbox rows above the watermark",
        "MemoryStore::invalidate of the 2 keys (value + tag slots)",
        "DELETE the delivered outbox row (a second write transaction)",
    ];
    let mut s: [Samples; 5] = Default::default();
    for i in 0..env.sizes.single / 2 {
        let id = 1 + (i as i64 * 41) % ROWS;
        let watermark: i64 =
            sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM cache_invalidation_outbox")
                .fetch_one(&env.raw)
                .await?;
        let mut timed = Instant::now();
        sqlx::query(UPDATE_PLAIN).bind(id).execute(&env.raw).await?;
        s[0].push(timed.elapsed());
        timed = Instant::now();
        sqlx::query(UPDATE).bind(id).execute(&env.raw).await?;
        s[1].push(timed.elapsed());
        timed = Instant::now();
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT id, tbl, image FROM cache_invalidation_outbox WHERE id > $1 ORDER BY id",
        )
        .bind(watermark)
        .fetch_all(&env.raw)
        .await?;
        s[2].push(timed.elapsed());
        timed = Instant::now();
        env.pool.store().invalidate(&env.keys(id)).await?;
        s[3].push(timed.elapsed());
        timed = Instant::now();
        let last = rows.last().map_or(watermark, |r| r.0);
        sqlx::query("DELETE FROM cache_invalidation_outbox WHERE id <= $1")
            .bind(last)
            .execute(&env.raw)
            .await?;
        s[4].push(timed.elapsed());
    }
    for (name, samples) in PARTS.iter().zip(&s) {
        report.latency("SQLite write: 1-row breakdown", name, samples.stats(), None);
    }
    Ok(())
}
