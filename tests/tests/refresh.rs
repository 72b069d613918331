//! Refresh instead of delete (`#[cached_entity(refresh = "…")]`): a hot key is reloaded and stored after a
//! write, so the next read is a hit with the new row, while an entity without `refresh` is deleted. Under
//! concurrent writes from two pools (each refreshing the key after its own commits, competing for its
//! lease), no read returns a version older than a write that returned before the read began, every
//! writer reads its own write, and the entry left is the last row. Real PostgreSQL and Redis.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::{CachedEntity, CachedPgPool, RedisStore, Registry};
use serde::{Deserialize, Serialize};
use tests::{TestDb, TestPrefix};

/// Refreshed after writes while read within the last minute.
#[derive(Debug, Clone, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "hot_items", key = "hot_item:<id>", ttl = "5m", refresh = "1m")]
struct HotItem {
    id: i64,
    version: i64,
}

/// Deleted on write (the default).
#[derive(Debug, Clone, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "cold_items", key = "cold_item:<id>", ttl = "5m")]
struct ColdItem {
    id: i64,
    version: i64,
}

async fn setup(hint: &str) -> (TestDb, TestPrefix) {
    let db = TestDb::create(hint).await;
    let prefix = TestPrefix::create(hint).await;
    sqlx::raw_sql(
        "CREATE TABLE hot_items (id bigint PRIMARY KEY, version bigint NOT NULL);
         CREATE TABLE cold_items (id bigint PRIMARY KEY, version bigint NOT NULL);
         INSERT INTO hot_items VALUES (1, 1); INSERT INTO cold_items VALUES (1, 1);",
    )
    .execute(&db.pool().await)
    .await
    .expect("schema");
    (db, prefix)
}

async fn pool(db: &TestDb, prefix: &TestPrefix) -> CachedPgPool {
    let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .expect("redis");
    CachedPgPool::options()
        .registry(Registry::new([HotItem::META, ColdItem::META]))
        .auto_install(true)
        .connect(&db.url, store)
        .await
        .expect("pool")
}

async fn hot(pool: &CachedPgPool) -> i64 {
    pool.get::<HotItem>(&1)
        .await
        .expect("read")
        .expect("row")
        .version
}

/// Waits up to 5 s for `key` to exist.
async fn appears(prefix: &TestPrefix, key: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if prefix.exists(key).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_is_reloaded_after_a_write_and_a_plain_one_is_deleted() {
    assert_eq!(
        <HotItem as cache_runtime::KeyedEntity<sqlx::Postgres>>::REFRESH,
        Some(Duration::from_secs(60)),
        "the derive's `refresh`"
    );
    assert_eq!(
        <ColdItem as cache_runtime::KeyedEntity<sqlx::Postgres>>::REFRESH,
        None
    );
    let (db, prefix) = setup("refresh").await;
    let pool = pool(&db, &prefix).await;
    assert_eq!(hot(&pool).await, 1);
    pool.get::<ColdItem>(&1).await.expect("read");
    for table in ["hot_items", "cold_items"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} SET version = 2 WHERE id = 1"
        )))
        .execute(&pool)
        .await
        .expect("write");
    }
    assert!(
        appears(&prefix, "hot_item:1").await,
        "the hot key is stored again"
    );
    assert!(
        !prefix.exists("cold_item:1").await,
        "the plain key stays deleted"
    );
    let before = pool.cache().stats();
    assert_eq!(hot(&pool).await, 2, "the refreshed entry is the new row");
    let after = pool.cache().stats();
    assert_eq!(
        (after.hits - before.hits, after.misses - before.misses),
        (1, 0),
        "the read after the write is a hit: {after:?}"
    );
    // A write by another client, delivered by this pool's relay, refreshes too.
    sqlx::query("UPDATE hot_items SET version = 3 WHERE id = 1")
        .execute(&db.pool().await)
        .await
        .expect("foreign write");
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.cache().stats().fills < after.fills + 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = pool.cache().stats();
    assert_eq!(hot(&pool).await, 3);
    assert_eq!(
        pool.cache().stats().misses,
        before.misses,
        "refreshed by the relay's delivery"
    );
    pool.close().await;
}

/// Under concurrent writes and refreshes from two pools, no read returns a version older than one whose
/// write had returned before the read began (the contract), and every writer reads its own write.
///
/// A reader's successive reads are not promised to be monotonic while a write's invalidation is in
/// flight, and this test does not assert it: a traced failure of that stronger check showed a fill of
/// version 58 (its lease taken after the previous invalidation, its load before the commit of 59) stored
/// while 59's invalidation was still on its way, and a concurrent miss (whose lease that invalidation had
/// deleted) reading 59 from the database; a reader saw 59 from the miss, then 58 from the cache, until
/// 59's invalidation removed it, before 59's writer returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_never_store_an_older_row() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    let (db, prefix) = setup("refresh_race").await;
    let pools = [pool(&db, &prefix).await, pool(&db, &prefix).await];
    for pool in &pools {
        assert_eq!(hot(pool).await, 1);
    }
    let stop = Arc::new(AtomicBool::new(false));
    // The highest version whose write returned.
    let returned = Arc::new(AtomicI64::new(1));
    let mut readers = Vec::new();
    for pool in &pools {
        for _ in 0..2 {
            let (pool, stop, returned) = (pool.clone(), Arc::clone(&stop), Arc::clone(&returned));
            readers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let floor = returned.load(Ordering::SeqCst);
                    let seen = hot(&pool).await;
                    assert!(
                        seen >= floor,
                        "a read returned {seen}, older than {floor}, whose write had returned before it began"
                    );
                }
            }));
        }
    }
    let mut writers = Vec::new();
    for pool in &pools {
        for _ in 0..2 {
            let (pool, returned) = (pool.clone(), Arc::clone(&returned));
            writers.push(tokio::spawn(async move {
                for _ in 0..40 {
                    let written: i64 = sqlx::query_scalar(
                        "UPDATE hot_items SET version = version + 1 WHERE id = 1 RETURNING version",
                    )
                    .fetch_one(&pool)
                    .await
                    .expect("write");
                    returned.fetch_max(written, Ordering::SeqCst);
                    let seen = hot(&pool).await;
                    assert!(seen >= written, "the writer of {written} read {seen}");
                }
            }));
        }
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.expect("reader");
    }
    // Let the last refreshes finish, then the entry must be the last row, and reads hit it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        prefix.exists("hot_item:1").await,
        "refreshed after the last write"
    );
    for pool in &pools {
        let before = pool.cache().stats();
        assert_eq!(hot(pool).await, 161, "the entry is the last row");
        assert_eq!(pool.cache().stats().misses, before.misses);
    }
    for pool in &pools {
        pool.close().await;
    }
}
