//! The randomized freshness checker (see `tests::checker`) against `Cache::get_or_load` on Redis and on the
//! in-process store, and against hand-written cache-aside, which it must catch.
//!
//! Writers come in two kinds: real capture (plain sqlx statements through `CachedPool`, autocommit and in a
//! transaction: the triggers find the keys, the pool invalidates after `COMMIT`) and hand invalidation
//! (`UPDATE` then `Cache::invalidate`, which isolates the read side).

use std::sync::Arc;
use std::time::Duration;

use cache_runtime::{
    Cache, CachedEntity, CachedPgPool, CachedPool, LoadOptions, MemoryStore, RedisStore, Registry,
    key,
};
use sqlx::PgPool;
use tests::checker::{self, Config, Read, Report, Write};
use tests::{TestDb, TestPrefix};

/// The checker's row.
#[derive(Debug, Clone, CachedEntity, serde::Serialize, serde::Deserialize)]
#[cached_entity(table = "items", key = "item:<id>", depends = ["item:<id>:page"], ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

async fn database() -> (TestDb, PgPool) {
    let db = TestDb::create("checker").await;
    let pool = db.pool().await;
    checker::create_items(&pool, Config::default().rows).await;
    (db, pool)
}

/// Readers through `get_or_load`, spread over `caches` (standing for processes).
fn cached_read(caches: Vec<Cache>, pool: PgPool) -> Read {
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

/// Readers of a page joined from rows `id` and `id + 1` (wrapping), cached with the rows' keys as tags found
/// by the loader: only the rows' keys are ever invalidated.
fn page_read(caches: Vec<Cache>, pool: PgPool, rows: i64) -> Read {
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

/// The writer `CachedPool` replaces: UPDATE (autocommit), then invalidate the row's key after the commit.
fn invalidating_write(cache: Cache, pool: PgPool) -> Write {
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
/// `item:<id>:page` to the outbox, the pool invalidates them after the commit. No hand-written invalidation.
fn captured_write(pool: CachedPool) -> Write {
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

/// The same write in a `CachedTransaction` (a read, the update, a second statement), published at commit.
fn captured_tx_write(pool: CachedPool) -> Write {
    Arc::new(move |id| {
        let pool = pool.clone();
        Box::pin(async move {
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query("SELECT version FROM items WHERE id = $1 FOR UPDATE")
                .bind(id)
                .execute(&mut tx)
                .await
                .expect("SELECT");
            let version: i64 = sqlx::query_scalar(
                "UPDATE items SET version = version + 1 WHERE id = $1 RETURNING version",
            )
            .bind(id)
            .fetch_one(&mut tx)
            .await
            .expect("UPDATE");
            checker::jitter().await;
            tx.commit().await.expect("commit");
            version
        })
    })
}

/// A `CachedPool` on the checker's database whose store shares `prefix`, with the schema installed.
async fn cached_pool(url: &str, prefix: &str) -> CachedPool {
    let store = RedisStore::connect(&tests::redis_url(), prefix.to_owned())
        .await
        .expect("connect Redis");
    CachedPgPool::options()
        .registry(Registry::new([Item::META]))
        .install_schema(true)
        .connect(url, store)
        .await
        .expect("connect CachedPool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_pool_writers_never_read_stale() {
    let (db, pool) = database().await;
    let prefix = TestPrefix::create("checker_capture").await;
    let cached = cached_pool(&db.url, &prefix.prefix).await;
    // Readers on the pool's cache and on a second handle (standing for another process).
    let other = Cache::new(
        RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
            .await
            .expect("connect"),
    );
    let caches = vec![cached.cache().clone(), other];
    let config = Config {
        duration: Duration::from_millis(1500),
        ..Config::default()
    };
    for (what, write) in [
        (
            "CachedPool autocommit writers",
            captured_write(cached.clone()),
        ),
        (
            "CachedPool transaction writers",
            captured_tx_write(cached.clone()),
        ),
    ] {
        let report = checker::run(
            config,
            cached_read(caches.clone(), pool.clone()),
            Arc::clone(&write),
        )
        .await;
        print(&format!("get_or_load, Redis, {what}"), report, &caches);
        assert!(report.reads > 100 && report.writes > 20, "{report:?}");
        assert_eq!(report.violations, 0, "{what}");
        let report = checker::run(
            config,
            page_read(caches.clone(), pool.clone(), config.rows),
            write,
        )
        .await;
        print(
            &format!("get_or_load_tagged pages, Redis, {what}"),
            report,
            &caches,
        );
        assert!(report.reads > 100 && report.writes > 20, "{report:?}");
        assert_eq!(report.violations, 0, "{what}, pages");
    }
    cached.close().await;
}

fn print(what: &str, report: Report, caches: &[Cache]) {
    let stats: Vec<_> = caches.iter().map(Cache::stats).collect();
    let sum = |f: fn(&cache_runtime::Stats) -> u64| stats.iter().map(f).sum::<u64>();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_load_on_redis_never_reads_stale() {
    let (_db, pool) = database().await;
    let prefix = TestPrefix::create("checker").await;
    let mut caches = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
            .await
            .expect("connect");
        caches.push(Cache::new(store));
    }
    let report = checker::run(
        Config::default(),
        cached_read(caches.clone(), pool.clone()),
        invalidating_write(caches[0].clone(), pool.clone()),
    )
    .await;
    print("get_or_load, Redis, 2 handles", report, &caches);
    assert!(report.reads > 200 && report.writes > 20, "{report:?}");
    assert_eq!(report.violations, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_load_in_process_never_reads_stale() {
    let (_db, pool) = database().await;
    let cache = Cache::new(MemoryStore::default());
    let caches = vec![cache.clone()];
    let report = checker::run(
        Config::default(),
        cached_read(caches.clone(), pool.clone()),
        invalidating_write(cache, pool.clone()),
    )
    .await;
    print("get_or_load, in-process store", report, &caches);
    assert!(report.reads > 200 && report.writes > 20, "{report:?}");
    assert_eq!(report.violations, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_joined_values_never_read_stale() {
    let (_db, pool) = database().await;
    let prefix = TestPrefix::create("checker_tags").await;
    let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .expect("connect");
    let redis = Cache::new(store);
    let memory = Cache::new(MemoryStore::default());
    for (what, cache) in [("Redis", redis), ("in-process store", memory)] {
        let caches = vec![cache.clone()];
        let report = checker::run(
            Config {
                duration: Duration::from_millis(1500),
                ..Config::default()
            },
            page_read(caches.clone(), pool.clone(), Config::default().rows),
            invalidating_write(cache, pool.clone()),
        )
        .await;
        print(
            &format!("get_or_load_tagged, pages joined from 2 rows, {what}"),
            report,
            &caches,
        );
        assert!(report.reads > 100 && report.writes > 20, "{report:?}");
        assert_eq!(report.violations, 0);
    }
}

/// Hand-written cache-aside: GET; on a miss SELECT then SET; writers UPDATE then DEL.
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
    let config = Config {
        duration: Duration::from_secs(2),
        ..Config::default()
    };
    let report = checker::run(config, read, write).await;
    print("naive cache-aside, Redis", report, &[]);
    assert!(
        report.violations > 0,
        "the checker must catch the stale-set race: {report:?}"
    );
}
