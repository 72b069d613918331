//! A read of a key this process just invalidated skips the read-only peek and asks for the lease at once
//! (one store round trip fewer on the likely miss); a key invalidated elsewhere is peeked first; a key
//! refilled by another process in between is still read from the store, not loaded. Real PostgreSQL and
//! Redis; the store below only counts the calls it forwards.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cache_runtime::store::{BoxFuture, LeaseRequest, Lookup, Peek, TagToken};
use cache_runtime::{
    Cache, CachedEntity, CachedPgPool, RedisStore, Registry, Store, StoreError, key,
};
use tests::model::Product;
use tests::{TestDb, TestPrefix, redis_url};

/// A store counting peeks and lookups.
#[derive(Debug, Clone)]
struct Counting {
    inner: RedisStore,
    peeks: Arc<AtomicUsize>,
    lookups: Arc<AtomicUsize>,
}

impl Store for Counting {
    fn invalidate<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.invalidate(keys)
    }
    fn peek<'a>(
        &'a self,
        key: &'a str,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Peek, StoreError>> {
        self.peeks.fetch_add(1, Ordering::SeqCst);
        self.inner.peek(key, tags)
    }
    fn lookup<'a>(
        &'a self,
        key: &'a str,
        lease: LeaseRequest<'a>,
        tags: &'a [String],
        tag_ttl: Duration,
    ) -> BoxFuture<'a, Result<Lookup, StoreError>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.lookup(key, lease, tags, tag_ttl)
    }
    fn tags<'a>(
        &'a self,
        tags: &'a [String],
        create: Option<Duration>,
    ) -> BoxFuture<'a, Result<Vec<Option<TagToken>>, StoreError>> {
        self.inner.tags(tags, create)
    }
    fn fill<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
        value: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.fill(key, lease, value, ttl)
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.release(key, lease)
    }
    fn consumer(&self) -> String {
        self.inner.consumer()
    }
}

async fn price(pool: &CachedPgPool, cache: &Cache, id: i64) -> i64 {
    let db = pool.sqlx_pool();
    cache
        .get_or_load(key!("product:<id>", id), || async {
            sqlx::query_scalar::<_, i64>("SELECT price_cents FROM products WHERE id = $1")
                .bind(id)
                .fetch_one(db)
                .await
        })
        .await
        .unwrap()
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
    let store = Counting {
        inner: RedisStore::connect(&redis_url(), prefix.prefix.clone())
            .await
            .unwrap(),
        peeks: Arc::default(),
        lookups: Arc::default(),
    };
    let (peeks, lookups) = (Arc::clone(&store.peeks), Arc::clone(&store.lookups));
    let pool = CachedPgPool::options()
        .registry(Registry::new([Product::META]))
        .auto_install(true)
        .connect(&db.url, store)
        .await
        .unwrap();
    let cache = pool.cache().clone();
    let calls = || (peeks.load(Ordering::SeqCst), lookups.load(Ordering::SeqCst));
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
