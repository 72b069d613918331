//! The randomized freshness checker (see `tests::checker`) against `Cache::get_or_load` on Redis and on the
//! in-process store, and against hand-written cache-aside, which it must catch; on PostgreSQL and on SQLite
//! (one body per test, `tests::on_both_backends!`), so every store-dependent test runs on four combinations.
//!
//! Writers come in two kinds: real capture (plain sqlx statements through `CachedPool`, autocommit and in a
//! transaction: the triggers find the keys, the pool invalidates after `COMMIT`) and hand invalidation
//! (`UPDATE` then `Cache::invalidate`, which isolates the read side).
//!
//! SQLite has one writer at a time: its writers wait on each other (busy timeout), which is normal; its
//! transaction writers write first (a deferred transaction that reads first cannot take the write lock
//! once another writer committed).

use std::sync::Arc;
use std::time::Duration;

use cache_runtime::{
    Cache, CachedEntity, CachedPool, LoadOptions, MemoryStore, RedisStore, Registry, Store, key,
};
use tests::TestPrefix;
use tests::checker::{self, Config, Read, Report, Write};

/// The checker's row.
#[derive(Debug, Clone, CachedEntity, serde::Serialize, serde::Deserialize)]
#[cached_entity(table = "items", key = "item:<id>", depends = ["item:<id>:page"], ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

/// The store under test: Redis (a prefix of its own; every handle is a connection of its own, standing for
/// a process) or the in-process store (one store shared by every handle).
enum Env {
    Redis(TestPrefix),
    Memory(Arc<dyn Store>),
}

impl Env {
    async fn redis(hint: &str) -> Self {
        Self::Redis(TestPrefix::create(hint).await)
    }

    fn memory() -> Self {
        Self::Memory(Arc::new(MemoryStore::new(10_000)))
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Redis(_) => "Redis",
            Self::Memory(_) => "in-process store",
        }
    }

    async fn redis_store(prefix: &TestPrefix) -> RedisStore {
        RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
            .await
            .expect("connect Redis")
    }

    /// `n` cache handles on this store.
    async fn caches(&self, n: usize) -> Vec<Cache> {
        let mut caches = Vec::new();
        for _ in 0..n {
            caches.push(match self {
                Self::Redis(prefix) => Cache::new(Self::redis_store(prefix).await),
                Self::Memory(store) => Cache::builder(Arc::clone(store)).build(),
            });
        }
        caches
    }
}

/// Runs each generic body on Redis and on the in-process store.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Env::redis(stringify!($name)).await).await;
                }
            )*
        }
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Env::memory()).await;
                }
            )*
        }
    };
}

/// The caches' counters, to print a run's own counters (the caches outlive runs).
fn snapshot(caches: &[Cache]) -> Vec<cache_runtime::cache::Stats> {
    caches.iter().map(Cache::stats).collect()
}

/// Prints a run's report and its caches' counters since `before` (a [`snapshot`]).
fn print(what: &str, report: Report, caches: &[Cache], before: &[cache_runtime::cache::Stats]) {
    let stats: Vec<_> = caches.iter().map(Cache::stats).collect();
    let sum = |f: fn(&cache_runtime::cache::Stats) -> u64| {
        stats.iter().map(f).sum::<u64>() - before.iter().map(f).sum::<u64>()
    };
    eprintln!(
        "checker [{what}]: {} reads checked, {} violations, {} writes; hits {}, coalesced {}, loads {}, \
         fills {}, fills rejected (stale-set races defeated) {}, lease waits {}",
        report.reads,
        report.violations,
        report.writes,
        sum(|s| s.hits),
        sum(|s| s.coalesced),
        sum(|s| s.loads),
        sum(|s| s.fills),
        sum(|s| s.fills_rejected),
        sum(|s| s.lease_waits),
    );
}

tests::on_both_backends! {
    on_both_stores!(
        cached_pool_writers_never_read_stale,
        get_or_load_never_reads_stale,
        tagged_joined_values_never_read_stale,
    );

    /// Writers at once: SQLite has one writer at a time (the others wait on the busy timeout), so two.
    const WRITERS: usize = 2;

    async fn database() -> (TestDatabase, sqlx::Pool<Db>) {
        let db = TestDatabase::create("checker").await;
        let pool = db.pool().await;
        if BACKEND == "sqlite" {
            // sqlx leaves the journal mode alone (a new file: rollback journal, where readers and the writer
            // block each other); the checker runs in WAL, the mode of concurrent applications. The tests of
            // `read.rs` run in the default mode.
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode = WAL")
                .fetch_one(&pool)
                .await
                .expect("PRAGMA journal_mode");
            assert_eq!(mode, "wal");
        }
        checker::create_items(&pool, Config::default().rows).await;
        (db, pool)
    }

    fn config(duration: Duration) -> Config {
        Config {
            writers: WRITERS,
            duration,
            ..Config::default()
        }
    }

    /// Readers through `get_or_load`, spread over `caches` (standing for processes).
    fn cached_read(caches: Vec<Cache>, pool: sqlx::Pool<Db>) -> Read {
        Arc::new(move |id| {
            let cache = caches[fastrand::usize(..caches.len())].clone();
            let pool = pool.clone();
            Box::pin(async move {
                cache
                    .get_or_load(key!("item:<id>", id = id), || async {
                        let version = checker::select_version(&pool, id).await?;
                        checker::jitter().await;
                        Ok::<_, sqlx::Error>(version)
                    })
                    .await
                    .map(|version| vec![(id, version)])
                    .unwrap_or_else(|e| panic!("read: {e}"))
            })
        })
    }

    /// Readers of a page joined from rows `id` and `id + 1` (wrapping), cached with the rows' keys as tags
    /// found by the loader: only the rows' keys are ever invalidated.
    fn page_read(caches: Vec<Cache>, pool: sqlx::Pool<Db>, rows: i64) -> Read {
        Arc::new(move |id| {
            let cache = caches[fastrand::usize(..caches.len())].clone();
            let pool = pool.clone();
            Box::pin(async move {
                let ids = [id, id % rows + 1];
                cache
                    .get_or_load_tagged(
                        key!("item:<id>:page", id = id),
                        LoadOptions::new(),
                        || async {
                            let versions = checker::select_versions(&pool, &ids).await?;
                            checker::jitter().await;
                            let tags = ids.iter().map(|&id| key!("item:<id>", id = id)).collect();
                            Ok::<_, sqlx::Error>((versions, tags))
                        },
                    )
                    .await
                    .unwrap_or_else(|e| panic!("read: {e}"))
            })
        })
    }

    /// The writer `CachedPool` replaces: UPDATE (autocommit), then invalidate the row's key after the
    /// commit.
    fn invalidating_write(cache: Cache, pool: sqlx::Pool<Db>) -> Write {
        Arc::new(move |id| {
            let (cache, pool) = (cache.clone(), pool.clone());
            Box::pin(async move {
                let version = checker::bump_version(&pool, id).await;
                cache
                    .invalidate(&[key!("item:<id>", id = id).into_string()])
                    .await
                    .unwrap_or_else(|e| panic!("invalidate: {e}"));
                version
            })
        })
    }

    /// The same write through `CachedPool` with autocommit: the capture triggers write `item:<id>` and
    /// `item:<id>:page` to the outbox, the pool invalidates them after the commit. No hand-written
    /// invalidation.
    fn captured_write(pool: CachedPool<Db>) -> Write {
        Arc::new(move |id| {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query_scalar(
                    "UPDATE items SET version = version + 1 WHERE id = $1 RETURNING version",
                )
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap_or_else(|e| panic!("UPDATE through CachedPool: {e}"))
            })
        })
    }

    /// The same write in a `CachedTransaction` (a read, the update; SQLite: the update, a read), published
    /// at commit.
    fn captured_tx_write(pool: CachedPool<Db>) -> Write {
        Arc::new(move |id| {
            let pool = pool.clone();
            Box::pin(async move {
                let mut tx = pool.begin().await.expect("begin");
                if BACKEND == "postgres" {
                    sqlx::query("SELECT version FROM items WHERE id = $1 FOR UPDATE")
                        .bind(id)
                        .execute(&mut tx)
                        .await
                        .expect("SELECT");
                }
                let version: i64 = sqlx::query_scalar(
                    "UPDATE items SET version = version + 1 WHERE id = $1 RETURNING version",
                )
                .bind(id)
                .fetch_one(&mut tx)
                .await
                .expect("UPDATE");
                if BACKEND == "sqlite" {
                    let read: i64 = sqlx::query_scalar("SELECT version FROM items WHERE id = $1")
                        .bind(id)
                        .fetch_one(&mut tx)
                        .await
                        .expect("SELECT");
                    assert_eq!(read, version, "the transaction reads its own write");
                }
                checker::jitter().await;
                tx.commit().await.expect("commit");
                version
            })
        })
    }

    /// A `CachedPool` on the checker's database with a store of `env`'s kind (Redis: the same prefix;
    /// in-process: the shared store cannot be handed in, so the pool gets a store of its own and the other
    /// handles share it through `CachedPool::store`), with the schema installed.
    async fn cached_pool(url: &str, env: &Env) -> CachedPool<Db> {
        let options = CachedPool::<Db>::options()
            .registry(Registry::new([Item::META]))
            .auto_install(true)
            .pool_options(sqlx::pool::PoolOptions::<Db>::new().max_connections(4));
        match env {
            Env::Redis(prefix) => options.connect(url, Env::redis_store(prefix).await).await,
            Env::Memory(_) => options.connect(url, MemoryStore::new(10_000)).await,
        }
        .expect("connect CachedPool")
    }

    async fn cached_pool_writers_never_read_stale(env: Env) {
        let (db, pool) = database().await;
        let cached = cached_pool(&db.url, &env).await;
        // Readers on the pool's cache and on a second handle (standing for another process).
        let other = match &env {
            Env::Redis(prefix) => Cache::new(Env::redis_store(prefix).await),
            Env::Memory(_) => Cache::builder(Arc::clone(cached.store())).build(),
        };
        let caches = vec![cached.cache().clone(), other];
        let config = config(Duration::from_millis(1000));
        for (what, write) in [
            ("CachedPool autocommit writers", captured_write(cached.clone())),
            ("CachedPool transaction writers", captured_tx_write(cached.clone())),
        ] {
            let before = snapshot(&caches);
            let report = checker::run(
                config,
                cached_read(caches.clone(), pool.clone()),
                Arc::clone(&write),
            )
            .await;
            print(
                &format!("{BACKEND}, get_or_load, {}, {what}", env.kind()),
                report,
                &caches,
                &before,
            );
            assert!(report.reads > 100 && report.writes > 20, "{report:?}");
            assert_eq!(report.violations, 0, "{what}");
            let before = snapshot(&caches);
            let report = checker::run(
                config,
                page_read(caches.clone(), pool.clone(), config.rows),
                write,
            )
            .await;
            print(
                &format!("{BACKEND}, get_or_load_tagged pages, {}, {what}", env.kind()),
                report,
                &caches,
                &before,
            );
            assert!(report.reads > 50 && report.writes > 20, "{report:?}");
            assert_eq!(report.violations, 0, "{what}, pages");
        }
        cached.close().await;
    }

    /// Hand invalidation after each commit, readers on two handles.
    async fn get_or_load_never_reads_stale(env: Env) {
        let (_db, pool) = database().await;
        let caches = env.caches(2).await;
        let report = checker::run(
            config(Duration::from_millis(1500)),
            cached_read(caches.clone(), pool.clone()),
            invalidating_write(caches[0].clone(), pool.clone()),
        )
        .await;
        print(
            &format!("{BACKEND}, get_or_load, {}, 2 handles", env.kind()),
            report,
            &caches,
            &[],
        );
        assert!(report.reads > 200 && report.writes > 20, "{report:?}");
        assert_eq!(report.violations, 0);
    }

    async fn tagged_joined_values_never_read_stale(env: Env) {
        let (_db, pool) = database().await;
        let caches = env.caches(1).await;
        let report = checker::run(
            config(Duration::from_millis(1000)),
            page_read(caches.clone(), pool.clone(), Config::default().rows),
            invalidating_write(caches[0].clone(), pool.clone()),
        )
        .await;
        print(
            &format!("{BACKEND}, get_or_load_tagged, pages joined from 2 rows, {}", env.kind()),
            report,
            &caches,
            &[],
        );
        assert!(report.reads > 50 && report.writes > 20, "{report:?}");
        assert_eq!(report.violations, 0);
    }

    /// Hand-written cache-aside: GET; on a miss SELECT then SET; writers UPDATE then DEL. The control: the
    /// checker must be able to fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checker_catches_naive_cache_aside() {
        let (_db, pool) = database().await;
        let prefix = TestPrefix::create("checker_naive").await;
        let (conn, p) = (prefix.conn.clone(), prefix.prefix.clone());
        let read: Read = {
            let (conn, p, pool) = (conn.clone(), p.clone(), pool.clone());
            Arc::new(move |id| {
                let (mut conn, pool, key) = (conn.clone(), pool.clone(), format!("{p}item:{id}"));
                Box::pin(async move {
                    let cached: Option<i64> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .expect("GET");
                    if let Some(version) = cached {
                        return vec![(id, version)];
                    }
                    let version = checker::select_version(&pool, id).await.expect("SELECT");
                    checker::jitter().await;
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(version)
                        .arg("EX")
                        .arg(60)
                        .query_async::<()>(&mut conn)
                        .await
                        .expect("SET");
                    vec![(id, version)]
                })
            })
        };
        let write: Write = Arc::new(move |id| {
            let (mut conn, pool, key) = (conn.clone(), pool.clone(), format!("{p}item:{id}"));
            Box::pin(async move {
                let version = checker::bump_version(&pool, id).await;
                redis::cmd("DEL")
                    .arg(&key)
                    .query_async::<()>(&mut conn)
                    .await
                    .expect("DEL");
                version
            })
        });
        let report = checker::run(config(Duration::from_millis(1500)), read, write).await;
        print(&format!("{BACKEND}, naive cache-aside, Redis"), report, &[], &[]);
        assert!(
            report.violations > 0,
            "the checker must catch the stale-set race: {report:?}"
        );
    }
}
