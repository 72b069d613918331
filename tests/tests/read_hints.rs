//! A read of a key this process just invalidated skips the read-only peek and asks for the lease at once
//! (one store round trip fewer on the likely miss); a key invalidated elsewhere is peeked first; a key
//! refilled by another process in between is still read from the store, not loaded. Real PostgreSQL and
//! Redis; `RecordingStore` counts the calls it forwards.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use cache_runtime::{Cache, CachedEntity, CachedPgPool, RedisStore, Registry, key};
use tests::model::{Product, cached_price};
use tests::{RecordingStore, TestDb, TestPrefix, redis_url};

async fn price(pool: &CachedPgPool, cache: &Cache, id: i64) -> i64 {
    cached_price(cache, pool.sqlx_pool(), id).await
}

#[tokio::test]
async fn a_read_after_this_processs_write_skips_the_peek() {
    let db = TestDb::create("read_hints").await;
    let admin = db.pool().await;
    sqlx::raw_sql(
        "CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
           price_cents bigint NOT NULL);
         INSERT INTO products VALUES (1, 1, 'lamp', 100), (2, 1, 'chair', 200);",
    )
    .execute(&admin)
    .await
    .unwrap();
    let prefix = TestPrefix::create("read_hints").await;
    let store = RecordingStore::new(
        RedisStore::connect(&redis_url(), prefix.prefix.clone())
            .await
            .unwrap(),
    );
    let counts = store.clone();
    let pool = CachedPgPool::options()
        .registry(Registry::new([Product::META]))
        .auto_install(true)
        .connect(&db.url, store)
        .await
        .unwrap();
    let cache = pool.cache().clone();
    let calls = || counts.reads();
    assert_eq!(price(&pool, &cache, 1).await, 100);
    assert_eq!(price(&pool, &cache, 2).await, 200);

    // Written through this pool: the next read goes straight to the lease, and loads the new price.
    sqlx::query("UPDATE products SET price_cents = 111 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let before = calls();
    assert_eq!(price(&pool, &cache, 1).await, 111);
    assert_eq!(
        calls(),
        (before.0, before.1 + 1),
        "no peek, one lease request"
    );
    // The next read is an ordinary hit: one peek.
    let before = calls();
    assert_eq!(price(&pool, &cache, 1).await, 111);
    assert_eq!(calls(), (before.0 + 1, before.1));

    // Invalidated elsewhere (another process's cache): peeked first, then the lease.
    let other = Cache::new(
        RedisStore::connect(&redis_url(), prefix.prefix.clone())
            .await
            .unwrap(),
    );
    sqlx::query("UPDATE products SET price_cents = 222 WHERE id = 2")
        .execute(pool.sqlx_pool())
        .await
        .unwrap();
    other.invalidate(&["product:2".to_owned()]).await.unwrap();
    let before = calls();
    assert_eq!(price(&pool, &cache, 2).await, 222);
    assert_eq!(
        calls(),
        (before.0 + 1, before.1 + 1),
        "a peek, then the lease"
    );

    // Invalidated here, then refilled by another process before this one reads: the lease request finds
    // the value, nothing is loaded.
    sqlx::query("UPDATE products SET price_cents = 333 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let db2 = pool.sqlx_pool().clone();
    let refilled: i64 = other
        .get_or_load(key!("product:<id>", id = 1_i64), || async move {
            sqlx::query_scalar::<_, i64>("SELECT price_cents FROM products WHERE id = 1")
                .fetch_one(&db2)
                .await
        })
        .await
        .unwrap();
    assert_eq!(refilled, 333);
    let loads = cache.stats().loads;
    assert_eq!(price(&pool, &cache, 1).await, 333);
    assert_eq!(
        cache.stats().loads,
        loads,
        "the refilled value was read, not loaded"
    );
    pool.close().await;
}
