//! The live consistency SLI (`Sampling`): every hit of `CachedPool::get` is checked against the database
//! Δ later. With capture intact (writes through the pool and through a plain pool, delivered by the
//! relay) it reports samples and 0 inconsistencies; with capture disabled by a superuser (the DDL guard's
//! event trigger and the table's triggers turned off: a write path outside capture) it fires. Real
//! PostgreSQL and Redis.

use std::time::{Duration, Instant};

use cache_runtime::cache::Sampling;
use cache_runtime::{CachedEntity, CachedPgPool, RedisStore, Registry};
use serde::{Deserialize, Serialize};
use tests::{TestDb, TestPrefix};

/// A versioned row.
#[derive(Debug, Clone, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

const DELTA: Duration = Duration::from_millis(100);

async fn read_all(pool: &CachedPgPool) {
    for id in 1..=5 {
        pool.get::<Item>(&id).await.expect("read").expect("row");
    }
}

/// Waits until the sampler checked every queued sample (no change for 3 Δ).
async fn settle(pool: &CachedPgPool) {
    let mut last = pool.cache().stats();
    loop {
        tokio::time::sleep(DELTA * 3).await;
        let now = pool.cache().stats();
        if now == last {
            return;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sli_reports_zero_with_capture_and_fires_on_a_write_outside_it() {
    let db = TestDb::create("sli").await;
    let prefix = TestPrefix::create("sli").await;
    let plain = db.pool().await;
    sqlx::raw_sql(
        "CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL);
         INSERT INTO items SELECT g, 1 FROM generate_series(1, 5) g;",
    )
    .execute(&plain)
    .await
    .expect("schema");
    let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .expect("redis");
    let pool = CachedPgPool::options()
        .registry(Registry::new([Item::META]))
        .auto_install(true)
        .sampling(Sampling::new(1.0).delay(DELTA))
        .connect(&db.url, store)
        .await
        .expect("pool");

    // Correct setup: reads, and a write every 50 ms alternating between the pool and a plain pool.
    let start = Instant::now();
    let mut writes = 0_i64;
    while start.elapsed() < Duration::from_millis(1500) {
        read_all(&pool).await;
        read_all(&pool).await;
        writes += 1;
        let sql = "UPDATE items SET version = version + 1 WHERE id = $1";
        let id = writes % 5 + 1;
        if writes % 2 == 0 {
            sqlx::query(sql)
                .bind(id)
                .execute(&pool)
                .await
                .expect("write");
        } else {
            sqlx::query(sql)
                .bind(id)
                .execute(&plain)
                .await
                .expect("foreign write");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    settle(&pool).await;
    let correct = pool.cache().stats();
    assert!(
        correct.samples >= 20,
        "the sampler checked hits: {correct:?}"
    );
    assert_eq!(correct.inconsistent, 0, "capture intact: {correct:?}");

    // Broken setup: a superuser turns capture off and writes; the cached item 1 is now wrong.
    pool.get::<Item>(&1).await.expect("read");
    sqlx::raw_sql(
        "ALTER EVENT TRIGGER cache_invalidation_ddl DISABLE;
         ALTER TABLE items DISABLE TRIGGER ALL;
         UPDATE items SET version = version + 100 WHERE id = 1;",
    )
    .execute(&plain)
    .await
    .expect("a write outside capture");
    for _ in 0..10 {
        let item = pool.get::<Item>(&1).await.expect("read").expect("row");
        assert!(item.version < 100, "the cache serves the old row: {item:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    settle(&pool).await;
    let broken = pool.cache().stats();
    assert!(
        broken.inconsistent >= 5,
        "the SLI fires on the write outside capture: {broken:?}"
    );
    assert_eq!(broken.samples_dropped, 0, "{broken:?}");
    pool.close().await;
}
