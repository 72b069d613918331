//! Capture of writes: generated triggers + outbox, `CachedPool` / `CachedTransaction`, the relay.
//!
//! The tests in the `on_both_backends!` block run against PostgreSQL (a database of its own) and SQLite (a
//! file of its own); the core write tests run once with the Redis store (a key prefix of its own) and once
//! with the in-process `MemoryStore`. Each seeds a known set of cache keys, writes, and asserts the exact
//! set of keys that is gone and that every other key survived. PostgreSQL-only and SQLite-only behaviour
//! is tested at the end, outside the block.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::backend::TriggerMode;
use cache_runtime::backend::postgres::PgSchema;
use cache_runtime::error::{ColumnProblem, Problem};
use cache_runtime::outbox::RelayConfig;
use cache_runtime::store::{LeaseRequest, Slot};
use cache_runtime::{
    CachedEntity, CachedPgPool, CachedPool, CachedPoolOptions, CachedSqlitePool, Error,
    MemoryStore, RedisStore, Registry, Store,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor as _, Row as _};
use tests::model::{Category, Product};
use tests::{RecordingStore, TestDb, TestPrefix, TestSqlite, redis_url};

/// A review of a product (child of `products`, `ON DELETE CASCADE`).
#[derive(Debug, CachedEntity)]
#[cached_entity(table = "reviews", key = "review:<id>", depends = ["product:<product_id>:reviews"])]
struct Review {
    id: i64,
    product_id: i64,
}

/// An entity whose table lacks a placeholder column.
#[derive(Debug, CachedEntity)]
#[cached_entity(table = "gadgets", key = "gadget:<id>:<owner>", depends = ["maker:<maker_id>"])]
struct Gadget {
    id: i64,
    owner: String,
    maker_id: i64,
}

/// An entity whose table does not exist.
#[derive(Debug, CachedEntity)]
#[cached_entity(table = "nowhere", key = "nowhere:<id>")]
struct Nowhere {
    id: i64,
}

/// Every key passed to `invalidate`, deduplicated.
fn invalidated(store: &RecordingStore) -> BTreeSet<String> {
    store.calls().into_iter().flatten().collect()
}

fn shop() -> Registry {
    Registry::new([Category::META, Product::META, Review::META])
}

/// The schema and seed data, identical on both backends.
const TABLES: &str = "
CREATE TABLE categories (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE products (
  id bigint PRIMARY KEY,
  category_id bigint NOT NULL REFERENCES categories (id) ON DELETE CASCADE,
  name text NOT NULL,
  price_cents bigint NOT NULL
);
CREATE TABLE reviews (
  id bigint PRIMARY KEY,
  product_id bigint NOT NULL REFERENCES products (id) ON DELETE CASCADE,
  body text NOT NULL DEFAULT ''
);
CREATE TABLE unrelated (id bigint PRIMARY KEY, v text);
INSERT INTO categories VALUES (1, 'lamps'), (2, 'chairs'), (3, 'tables');
INSERT INTO products VALUES (1, 1, 'a', 100), (2, 1, 'b', 200), (3, 1, 'c', 300), (4, 2, 'd', 400), (5, 2, 'e', 500);
INSERT INTO reviews (id, product_id) VALUES (1, 1), (2, 1), (3, 2);
INSERT INTO unrelated VALUES (1, 'x');
";

/// Every key the seeded data can have, plus keys no write may touch.
fn universe() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for c in 1..=3 {
        keys.insert(format!("category:{c}"));
        keys.insert(format!("category:{c}:products"));
    }
    for p in 1..=5 {
        keys.insert(format!("product:{p}"));
        keys.insert(format!("product:{p}:reviews"));
    }
    for r in 1..=3 {
        keys.insert(format!("review:{r}"));
    }
    keys.insert("unrelated:1".to_owned());
    keys.insert("product:10".to_owned());
    keys
}

/// Which real store the pool invalidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    /// `RedisStore` on a key prefix of the test's own.
    Redis,
    /// The in-process `MemoryStore`.
    Memory,
}

/// Caches `key` in `store` the way a reader does (lease, then fill), unless it is cached already.
async fn put(store: &dyn Store, key: &str) {
    let lease = LeaseRequest {
        token: "seed",
        ttl: Duration::from_secs(60),
        replace: None,
    };
    let found = store
        .lookup(key, lease, &[], Duration::from_secs(600))
        .await
        .unwrap();
    match found.slot {
        // `false` when an invalidation took the lease in between; callers check with `cached`.
        Slot::Acquired { .. } => {
            let _ = store
                .fill(key, "seed", b"cached", Duration::from_secs(600))
                .await
                .unwrap();
        }
        Slot::Value(_) => {}
        Slot::Leased => panic!("{key} is leased"),
    }
}

/// Whether `key` holds a value in `store`.
async fn cached(store: &dyn Store, key: &str) -> bool {
    store.peek(key, &[]).await.unwrap().value.is_some()
}

/// The in-process store, with every `invalidate` taking `delay` (a store far away, or loaded).
#[derive(Debug, Clone)]
struct SlowStore {
    inner: MemoryStore,
    delay: Duration,
}

impl Store for SlowStore {
    fn invalidate<'a>(
        &'a self,
        keys: &'a [String],
    ) -> cache_runtime::store::BoxFuture<'a, Result<Option<u64>, cache_runtime::StoreError>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.invalidate(keys).await
        })
    }

    fn peek<'a>(
        &'a self,
        key: &'a str,
        tags: &'a [String],
    ) -> cache_runtime::store::BoxFuture<
        'a,
        Result<cache_runtime::store::Peek, cache_runtime::StoreError>,
    > {
        self.inner.peek(key, tags)
    }

    fn lookup<'a>(
        &'a self,
        key: &'a str,
        lease: LeaseRequest<'a>,
        tags: &'a [String],
        tag_ttl: Duration,
    ) -> cache_runtime::store::BoxFuture<
        'a,
        Result<cache_runtime::store::Lookup, cache_runtime::StoreError>,
    > {
        self.inner.lookup(key, lease, tags, tag_ttl)
    }

    fn tags<'a>(
        &'a self,
        tags: &'a [String],
        create: Option<Duration>,
    ) -> cache_runtime::store::BoxFuture<
        'a,
        Result<Vec<Option<cache_runtime::store::TagToken>>, cache_runtime::StoreError>,
    > {
        self.inner.tags(tags, create)
    }

    fn fill<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
        value: &'a [u8],
        ttl: Duration,
    ) -> cache_runtime::store::BoxFuture<'a, Result<bool, cache_runtime::StoreError>> {
        self.inner.fill(key, lease, value, ttl)
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
    ) -> cache_runtime::store::BoxFuture<'a, Result<(), cache_runtime::StoreError>> {
        self.inner.release(key, lease)
    }
}

/// Expands each `name => body_fn` into two tests, `name_redis` and `name_memory`, calling
/// `body_fn(StoreKind::Redis)` and `body_fn(StoreKind::Memory)`.
macro_rules! per_store {
    ($($name:ident => $body:ident;)*) => {
        $(
            mod $name {
                use super::*;
                #[tokio::test]
                async fn redis() {
                    $body(StoreKind::Redis).await;
                }
                #[tokio::test]
                async fn memory() {
                    $body(StoreKind::Memory).await;
                }
            }
        )*
    };
}

tests::on_both_backends! {
    /// One test's world: a database of its own with the shop schema, a store (Redis on a prefix of its own,
    /// or in-process) wrapped in a `RecordingStore`, a `CachedPool` on both, and a plain pool (another
    /// client).
    pub(crate) struct Env {
        pub(crate) pool: CachedPool<Db>,
        /// The store the pool invalidates, recording every call.
        pub(crate) store: RecordingStore,
        /// The same store, unrecorded (never cut off): for seeding and assertions.
        pub(crate) raw: Arc<dyn Store>,
        /// A plain pool: writes through it are what other clients do.
        pub(crate) admin: sqlx::Pool<Db>,
        pub(crate) prefix: Option<TestPrefix>,
        pub(crate) db: TestDatabase,
    }

    impl Env {
        pub(crate) async fn new(hint: &str) -> Self {
            Self::with(hint, |o| o).await
        }

        pub(crate) async fn on(hint: &str, kind: StoreKind) -> Self {
            Self::build(hint, kind, |o| o).await
        }

        pub(crate) async fn with(
            hint: &str,
            options: impl FnOnce(CachedPoolOptions<Db>) -> CachedPoolOptions<Db>,
        ) -> Self {
            Self::build(hint, StoreKind::Redis, options).await
        }

        pub(crate) async fn build(
            hint: &str,
            kind: StoreKind,
            options: impl FnOnce(CachedPoolOptions<Db>) -> CachedPoolOptions<Db>,
        ) -> Self {
            let db = TestDatabase::create(hint).await;
            let admin = db.pool().await;
            sqlx::raw_sql(TABLES).execute(&admin).await.unwrap();
            let (prefix, raw, store): (_, Arc<dyn Store>, _) = match kind {
                StoreKind::Redis => {
                    let prefix = TestPrefix::create(hint).await;
                    let store = RedisStore::connect(&redis_url(), prefix.prefix.clone())
                        .await
                        .unwrap();
                    let recording = RecordingStore::new(store.clone());
                    (Some(prefix), Arc::new(store), recording)
                }
                StoreKind::Memory => {
                    // Clones share the cache.
                    let store = MemoryStore::new(100_000);
                    let recording = RecordingStore::new(store.clone());
                    (None, Arc::new(store), recording)
                }
            };
            let pool = options(
                CachedPool::<Db>::options()
                    .registry(shop())
                    .auto_install(true)
                    .pool_options(sqlx::pool::PoolOptions::<Db>::new().max_connections(4)),
            )
            .connect(&db.url, store.clone())
            .await
            .unwrap();
            let env = Self {
                pool,
                store,
                raw,
                admin,
                prefix,
                db,
            };
            env.seed().await;
            env
        }

        /// Caches every key of the universe.
        pub(crate) async fn seed(&self) {
            for key in universe() {
                let mut tries = 0;
                while !self.cached(&key).await {
                    tries += 1;
                    assert!(tries < 100, "could not cache {key}");
                    put(&*self.raw, &key).await;
                }
            }
        }

        /// A product's name read through `cache` (`None`: no such row, cached as a miss), loaded through
        /// the pool.
        pub(crate) async fn product_name(&self, cache: &cache_runtime::Cache, id: i64) -> Option<String> {
            let pool = &self.pool;
            cache
                .get_or_load(Product::cache_key_for(&id), || async move {
                    sqlx::query_scalar::<_, String>("SELECT name FROM products WHERE id = $1")
                        .bind(id)
                        .fetch_optional(pool)
                        .await
                })
                .await
                .unwrap()
        }

        /// Whether `key` is cached.
        pub(crate) async fn cached(&self, key: &str) -> bool {
            cached(&*self.raw, key).await
        }

        /// Asserts that exactly `gone` (a subset of the universe) was removed from the store.
        pub(crate) async fn assert_gone(&self, gone: &[&str]) {
            let expected: BTreeSet<String> = universe()
                .into_iter()
                .filter(|k| !gone.contains(&k.as_str()))
                .collect();
            let mut present = BTreeSet::new();
            for key in universe() {
                if self.cached(&key).await {
                    present.insert(key);
                }
            }
            assert_eq!(present, expected, "keys left in the store ({BACKEND})");
        }

        /// Waits (bounded) until `key` is gone from the store; returns how long it took.
        pub(crate) async fn wait_gone(&self, key: &str, within: Duration) -> Duration {
            let start = Instant::now();
            while self.cached(key).await {
                assert!(
                    start.elapsed() < within,
                    "`{key}` still cached after {within:?} ({BACKEND})"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            start.elapsed()
        }

        /// Rows in the outbox (undelivered, or delivered but not yet deleted).
        pub(crate) async fn outbox_rows(&self) -> i64 {
            let sql = if BACKEND == "postgres" {
                "SELECT count(*) FROM cache_invalidation.outbox"
            } else {
                "SELECT count(*) FROM cache_invalidation_outbox"
            };
            sqlx::query_scalar(sql).fetch_one(&self.admin).await.unwrap()
        }

        /// Waits (bounded) until the outbox is empty.
        pub(crate) async fn wait_outbox_empty(&self, within: Duration) {
            let deadline = Instant::now() + within;
            while self.outbox_rows().await > 0 {
                assert!(Instant::now() < deadline, "outbox not drained after {within:?} ({BACKEND})");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// For the tests that count `invalidate` calls: on SQLite the relay's sweep may deliver a wrapped write's
    /// rows a second time while the writer is still delivering them (the SQLite relay has no grace period),
    /// so there the relay is off and the count is the writer's alone. PostgreSQL keeps its relay: its grace
    /// period must keep it from delivering a wrapped write twice.
    fn counted(options: CachedPoolOptions<Db>) -> CachedPoolOptions<Db> {
        if BACKEND == "sqlite" {
            options.run_relay(false)
        } else {
            options
        }
    }

    /// The keys of every `invalidate` call from the `from`-th on, deduplicated.
    fn invalidated_since(store: &RecordingStore, from: usize) -> BTreeSet<String> {
        store.calls().into_iter().skip(from).flatten().collect()
    }

    fn keys(keys: &[&str]) -> BTreeSet<String> {
        keys.iter().map(|k| (*k).to_owned()).collect()
    }

    per_store! {
        insert => insert_on;
        update => update_on;
        delete => delete_on;
        on_delete_cascade_into_a_registered_child => cascade_on;
        nested_transactions_with_a_rolled_back_savepoint => nested_on;
        rollback_and_drop_publish_nothing => rollback_on;
        write_through_a_plain_pool_is_relayed => plain_pool_on;
        cache_reads_see_every_committed_write => read_your_writes_on;
    }

    async fn insert_on(kind: StoreKind) {
        let env = Env::build("insert", kind, counted).await;
        let result = sqlx::query("INSERT INTO products VALUES (10, 3, 'new', 1)")
            .execute(&env.pool)
            .await
            .unwrap();
        assert_eq!(result.rows_affected(), 1);
        env.assert_gone(&["product:10", "category:3:products"]).await;
        assert_eq!(
            env.store.calls(),
            [vec!["category:3:products".to_owned(), "product:10".to_owned()]]
        );
    }

    async fn update_on(kind: StoreKind) {
        let env = Env::build("update", kind, counted).await;
        sqlx::query("UPDATE products SET price_cents = $1 WHERE id = $2")
            .bind(8000_i64)
            .bind(2_i64)
            .execute(&env.pool)
            .await
            .unwrap();
        env.assert_gone(&["product:2", "category:1:products"]).await;
        // A plain read afterwards sends nothing to the store.
        let name: String = sqlx::query_scalar("SELECT name FROM products WHERE id = 2")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(name, "b");
        assert_eq!(env.store.calls().len(), 1);
    }

    async fn delete_on(kind: StoreKind) {
        let env = Env::on("delete", kind).await;
        sqlx::query("DELETE FROM products WHERE id = 5")
            .execute(&env.pool)
            .await
            .unwrap();
        env.assert_gone(&["product:5", "category:2:products"]).await;
        assert_eq!(
            invalidated(&env.store),
            keys(&["product:5", "category:2:products"])
        );
    }

    async fn cascade_on(kind: StoreKind) {
        let env = Env::on("cascade", kind).await;
        sqlx::query("DELETE FROM categories WHERE id = 1")
            .execute(&env.pool)
            .await
            .unwrap();
        env.assert_gone(&[
            "category:1",
            "category:1:products",
            "product:1",
            "product:2",
            "product:3",
            "review:1",
            "review:2",
            "review:3",
            "product:1:reviews",
            "product:2:reviews",
        ])
        .await;
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM reviews")
            .fetch_one(&env.admin)
            .await
            .unwrap();
        assert_eq!(left, 0, "the cascade did not run ({BACKEND})");
    }

    async fn nested_on(kind: StoreKind) {
        let env = Env::build("nested", kind, counted).await;
        let mut tx = env.pool.begin().await.unwrap();
        sqlx::query("UPDATE products SET price_cents = 1 WHERE id = 1")
            .execute(&mut tx)
            .await
            .unwrap();
        {
            let mut kept = tx.begin().await.unwrap();
            sqlx::query("UPDATE products SET price_cents = 1 WHERE id = 4")
                .execute(&mut *kept)
                .await
                .unwrap();
            kept.commit().await.unwrap();
        }
        {
            let mut dropped = tx.begin().await.unwrap();
            sqlx::query("DELETE FROM reviews WHERE id = 3")
                .execute(&mut dropped)
                .await
                .unwrap();
            dropped.rollback().await.unwrap();
        }
        // Nothing is published before the outermost commit.
        assert!(env.store.calls().is_empty());
        env.assert_gone(&[]).await;
        tx.commit().await.unwrap();
        env.assert_gone(&[
            "product:1",
            "category:1:products",
            "product:4",
            "category:2:products",
        ])
        .await;
        assert_eq!(env.store.calls().len(), 1);
        // The rolled-back review still exists, and its keys were not invalidated.
        let reviews: i64 = sqlx::query_scalar("SELECT count(*) FROM reviews")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(reviews, 3);
        assert!(!invalidated(&env.store).contains("review:3"));
    }

    async fn rollback_on(kind: StoreKind) {
        let env = Env::on("rollback", kind).await;
        let mut tx = env.pool.begin().await.unwrap();
        sqlx::query("DELETE FROM products WHERE id = 1")
            .execute(&mut tx)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        {
            let mut tx = env.pool.begin().await.unwrap();
            sqlx::query("UPDATE products SET name = 'x' WHERE id = 2")
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        // Give a (wrong) relay every chance to deliver something.
        env.pool.relay().deliver_pending().await.unwrap();
        assert!(env.store.calls().is_empty(), "{:?}", env.store.calls());
        env.assert_gone(&[]).await;
        assert_eq!(env.outbox_rows().await, 0);
        // The next write delivers its own keys only.
        sqlx::query("UPDATE products SET name = 'y' WHERE id = 3")
            .execute(&env.pool)
            .await
            .unwrap();
        assert_eq!(
            invalidated(&env.store),
            keys(&["product:3", "category:1:products"])
        );
    }

    async fn plain_pool_on(kind: StoreKind) {
        let env = Env::on("plain_pool", kind).await;
        let mut latencies = Vec::new();
        for (id, cat) in [(1, 1), (4, 2)] {
            sqlx::query("UPDATE products SET price_cents = 7 WHERE id = $1")
                .bind(id)
                .execute(&env.admin)
                .await
                .unwrap();
            latencies.push(
                env.wait_gone(&format!("product:{id}"), Duration::from_secs(5))
                    .await,
            );
            env.wait_gone(&format!("category:{cat}:products"), Duration::from_secs(5))
                .await;
        }
        eprintln!("relay latency (plain {BACKEND} pool, {kind:?}): {latencies:?}");
        env.assert_gone(&[
            "product:1",
            "category:1:products",
            "product:4",
            "category:2:products",
        ])
        .await;
        // Delivered rows are deleted.
        env.wait_outbox_empty(Duration::from_secs(5)).await;
    }

    async fn read_your_writes_on(kind: StoreKind) {
        use cache_runtime::Cache;
        let env = Env::build("read_your_writes", kind, |o| {
            o.relay_config(RelayConfig::new().wrapped_grace(Duration::from_millis(200)).sweep_interval(Duration::from_millis(50)))
        })
        .await;
        let cache = Cache::new(Arc::clone(env.pool.store()));
        let pool = &env.pool;
        let name = |id: i64| env.product_name(&cache, id);
        assert_eq!(name(1).await.as_deref(), Some("a"));
        assert_eq!(name(2).await.as_deref(), Some("b"));

        // Autocommit write: the next read is fresh.
        sqlx::query("UPDATE products SET name = 'a2' WHERE id = 1")
            .execute(pool)
            .await
            .unwrap();
        assert_eq!(name(1).await.as_deref(), Some("a2"));

        // Transaction: fresh after commit.
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("UPDATE products SET name = 'a3' WHERE id = 1")
            .execute(&mut tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(name(1).await.as_deref(), Some("a3"));

        // A foreign write (plain pool): fresh within the relay's bound.
        sqlx::query("UPDATE products SET name = 'b2' WHERE id = 2")
            .execute(&env.admin)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while name(2).await.as_deref() != Some("b2") {
            assert!(Instant::now() < deadline, "foreign write not invalidated ({BACKEND})");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // A deleted row is cached as a miss; the INSERT that creates it again invalidates the miss.
        assert_eq!(name(3).await.as_deref(), Some("c"));
        sqlx::query("DELETE FROM products WHERE id = 3")
            .execute(pool)
            .await
            .unwrap();
        assert_eq!(name(3).await, None);
        assert_eq!(name(3).await, None);
        sqlx::query("INSERT INTO products VALUES (3, 1, 'c2', 1)")
            .execute(pool)
            .await
            .unwrap();
        assert_eq!(name(3).await.as_deref(), Some("c2"));
    }

    #[tokio::test]
    async fn concurrent_writers_each_see_their_own_invalidation() {
        let env = Env::new("concurrent_writers").await;
        let mut tasks = Vec::new();
        for id in 1..=5_i64 {
            let (pool, raw) = (env.pool.clone(), Arc::clone(&env.raw));
            tasks.push(tokio::spawn(async move {
                let key = format!("product:{id}");
                for round in 0..20_i64 {
                    // A late, duplicate invalidation of an earlier write (delivered by another writer or
                    // the relay) may take the seeding lease: seed until the value is cached.
                    let mut tries = 0;
                    while !cached(&*raw, &key).await {
                        tries += 1;
                        assert!(tries < 100, "could not cache {key}");
                        put(&*raw, &key).await;
                    }
                    sqlx::query("UPDATE products SET price_cents = $1 WHERE id = $2")
                        .bind(round)
                        .bind(id)
                        .execute(&pool)
                        .await
                        .unwrap();
                    // Read-your-writes: whoever delivered it, the key is gone when the write returns.
                    assert!(
                        !cached(&*raw, &key).await,
                        "{key} still cached after write {round} returned ({BACKEND})"
                    );
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let delivered = env.store.delivered();
        for id in 1..=5 {
            assert!(delivered[&format!("product:{id}")] >= 20, "{delivered:?}");
        }
    }

    #[tokio::test]
    async fn several_statements_in_one_raw_sql_call() {
        let env = Env::new("raw_sql").await;
        sqlx::raw_sql(
            "UPDATE products SET price_cents = 1 WHERE id = 2; DELETE FROM reviews WHERE id = 3;
             INSERT INTO categories VALUES (4, 'beds')",
        )
        .execute(&env.pool)
        .await
        .unwrap();
        env.assert_gone(&["product:2", "category:1:products", "review:3", "product:2:reviews"])
            .await;
        assert!(invalidated(&env.store).contains("category:4"));
    }

    #[tokio::test]
    async fn writes_made_by_a_user_trigger_are_captured() {
        let env = Env::new("user_trigger").await;
        // A trigger of the application's own: a new review reprices its product.
        let ddl = if BACKEND == "postgres" {
            "CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN UPDATE products SET price_cents = price_cents + 1 WHERE id = NEW.product_id; RETURN NEW; END $$;
             CREATE TRIGGER bump AFTER INSERT ON reviews FOR EACH ROW EXECUTE FUNCTION bump();"
        } else {
            "CREATE TRIGGER bump AFTER INSERT ON reviews FOR EACH ROW BEGIN
             UPDATE products SET price_cents = price_cents + 1 WHERE id = NEW.product_id; END;"
        };
        sqlx::raw_sql(ddl).execute(&env.admin).await.unwrap();
        sqlx::query("INSERT INTO reviews (id, product_id) VALUES (9, 4)")
            .execute(&env.pool)
            .await
            .unwrap();
        assert_eq!(
            invalidated(&env.store),
            keys(&["review:9", "product:4:reviews", "product:4", "category:2:products"])
        );
        env.assert_gone(&["product:4:reviews", "product:4", "category:2:products"])
            .await;
    }

    /// A wrapped write is delivered once even when the store is slow and the relay sweeps often (called by
    /// the tests below).
    pub(crate) async fn a_slow_store_gets_each_wrapped_write_once() {
        let db = TestDatabase::create("slow_store").await;
        let admin = db.pool().await;
        sqlx::raw_sql(TABLES).execute(&admin).await.unwrap();
        let store = RecordingStore::new(SlowStore {
            inner: MemoryStore::new(1000),
            // Slower than many sweeps, within what the relay leaves to the writer (PostgreSQL: the 2 s
            // grace of wrapped rows; SQLite: the 100 ms settle time of every row).
            delay: Duration::from_millis(if BACKEND == "postgres" { 300 } else { 60 }),
        });
        let pool = CachedPool::<Db>::options()
            .registry(shop())
            .auto_install(true)
            .relay_config(RelayConfig::new().sweep_interval(Duration::from_millis(20)))
            .connect(&db.url, store.clone())
            .await
            .unwrap();
        sqlx::query("INSERT INTO products VALUES (10, 3, 'new', 1)")
            .execute(&pool)
            .await
            .unwrap();
        // Give the relay many sweeps.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            store.calls(),
            [vec!["category:3:products".to_owned(), "product:10".to_owned()]],
            "({BACKEND})"
        );
        pool.close().await;
    }

    /// Transactions that read before they write, concurrently, begun with `begin_with` (SQLite: `BEGIN
    /// IMMEDIATE`, which a deferred `BEGIN` cannot replace there): every one commits, no update is lost,
    /// and every commit invalidates the row's keys.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_then_write_transactions_with_begin_with() {
        let env = Env::with("begin_with", |o| o.run_relay(false)).await;
        let begin = if BACKEND == "sqlite" {
            "BEGIN IMMEDIATE"
        } else {
            "BEGIN ISOLATION LEVEL READ COMMITTED"
        };
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let pool = env.pool.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..5 {
                    let mut tx = pool.begin_with(begin).await.unwrap();
                    let price: i64 = if BACKEND == "sqlite" {
                        sqlx::query_scalar("SELECT price_cents FROM products WHERE id = 1")
                    } else {
                        sqlx::query_scalar("SELECT price_cents FROM products WHERE id = 1 FOR UPDATE")
                    }
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                    sqlx::query("UPDATE products SET price_cents = $1 WHERE id = 1")
                        .bind(price + 1)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let price: i64 = sqlx::query_scalar("SELECT price_cents FROM products WHERE id = 1")
            .fetch_one(&env.admin)
            .await
            .unwrap();
        assert_eq!(price, 100 + 20, "no lost update ({BACKEND})");
        let commits = env
            .store
            .calls()
            .iter()
            .filter(|call| call.iter().any(|k| k == "product:1"))
            .count();
        assert_eq!(commits, 20, "every commit invalidated product:1 ({BACKEND})");
        env.assert_gone(&["product:1", "category:1:products"]).await;
    }

    #[tokio::test]
    async fn update_moving_a_row_between_parents() {
        let env = Env::new("move").await;
        sqlx::query("UPDATE products SET category_id = 2 WHERE id = 1")
            .execute(&env.pool)
            .await
            .unwrap();
        env.assert_gone(&["product:1", "category:1:products", "category:2:products"])
            .await;
    }

    #[tokio::test]
    async fn upsert_on_conflict() {
        let env = Env::new("upsert").await;
        // One row inserted (10), one updated (3).
        let rows = sqlx::query(
            "INSERT INTO products VALUES (10, 3, 'new', 1), (3, 2, 'moved', 1)
             ON CONFLICT (id) DO UPDATE SET category_id = EXCLUDED.category_id RETURNING id",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 2);
        env.assert_gone(&[
            "product:10",
            "category:3:products",
            "product:3",
            "category:1:products",
            "category:2:products",
        ])
        .await;
    }

    #[tokio::test]
    async fn update_from() {
        let env = Env::new("update_from").await;
        sqlx::query(
            "UPDATE products AS p SET name = c.name FROM categories AS c
             WHERE c.id = p.category_id AND c.id = 2",
        )
        .execute(&env.pool)
        .await
        .unwrap();
        env.assert_gone(&["product:4", "product:5", "category:2:products"])
            .await;
    }

    #[tokio::test]
    async fn bulk_update_of_10k_rows() {
        let env = Env::new("bulk").await;
        sqlx::query(
            "WITH RECURSIVE s(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM s WHERE i < 10099)
             INSERT INTO products SELECT i, 1 + i % 3, 'bulk', i FROM s",
        )
        .execute(&env.admin)
        .await
        .unwrap();
        // Let the relay deliver the plain pool's insert, then seed the universe again.
        env.wait_outbox_empty(Duration::from_secs(10)).await;
        env.seed().await;
        let before = env.store.calls().len();

        let start = Instant::now();
        let result =
            sqlx::query("UPDATE products SET price_cents = price_cents + 1 WHERE name = 'bulk'")
                .execute(&env.pool)
                .await
                .unwrap();
        eprintln!("10k-row UPDATE through CachedPool ({BACKEND}): {:?}", start.elapsed());
        assert_eq!(result.rows_affected(), 10_000);
        // Every bulk product key and the three category lists, nothing else; the rest of the universe
        // survives.
        env.assert_gone(&[
            "category:1:products",
            "category:2:products",
            "category:3:products",
        ])
        .await;
        let mut expected: BTreeSet<String> = (100..10100).map(|i| format!("product:{i}")).collect();
        expected.extend(keys(&[
            "category:1:products",
            "category:2:products",
            "category:3:products",
        ]));
        assert_eq!(invalidated_since(&env.store, before), expected);
        let delivered = env.store.delivered();
        assert!(expected.iter().all(|k| delivered.contains_key(k)));
    }

    #[tokio::test]
    async fn every_executor_method_works_on_pool_and_transaction() {
        use futures_util::TryStreamExt as _;
        let env = Env::new("methods").await;
        let p = &env.pool;
        let update = |id: i64| {
            sqlx::query("UPDATE products SET price_cents = price_cents + 1 WHERE id = $1 RETURNING id")
                .bind(id)
        };
        // execute, fetch_one, fetch_optional, fetch_all, fetch, fetch_many on &pool: each write is
        // delivered before the call returns.
        update(1).execute(p).await.unwrap();
        assert!(!env.cached("product:1").await);
        let _ = update(2).fetch_one(p).await.unwrap();
        assert!(!env.cached("product:2").await);
        assert!(update(3).fetch_optional(p).await.unwrap().is_some());
        assert!(!env.cached("product:3").await);
        assert_eq!(update(4).fetch_all(p).await.unwrap().len(), 1);
        assert!(!env.cached("product:4").await);
        let rows: Vec<_> = update(5).fetch(p).try_collect().await.unwrap();
        assert_eq!(rows.len(), 1);
        assert!(!env.cached("product:5").await);
        let items: Vec<_> = p
            .fetch_many(sqlx::query("DELETE FROM reviews WHERE id = 1"))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(items.len(), 1);
        assert!(!env.cached("review:1").await);
        // query_as and query_scalar reads.
        let (name,): (String,) = sqlx::query_as("SELECT name FROM categories WHERE id = 1")
            .fetch_one(p)
            .await
            .unwrap();
        assert_eq!(name, "lamps");
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
            .fetch_one(p)
            .await
            .unwrap();
        assert_eq!(n, 5);
        env.assert_gone(&[
            "product:1",
            "product:2",
            "product:3",
            "product:4",
            "product:5",
            "category:1:products",
            "category:2:products",
            "review:1",
            "product:1:reviews",
        ])
        .await;

        // The same methods in a transaction, through `&mut tx` and `&mut *tx`.
        env.seed().await;
        let mut tx = env.pool.begin().await.unwrap();
        update(1).execute(&mut tx).await.unwrap();
        let _ = update(2).fetch_one(&mut *tx).await.unwrap();
        assert!(update(3).fetch_optional(&mut tx).await.unwrap().is_some());
        assert_eq!(update(4).fetch_all(&mut *tx).await.unwrap().len(), 1);
        let rows: Vec<_> = update(5).fetch(&mut tx).try_collect().await.unwrap();
        assert_eq!(rows.len(), 1);
        let items: Vec<_> = (&mut tx)
            .fetch_many(sqlx::query("DELETE FROM reviews WHERE id = 2"))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(items.len(), 1);
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM reviews")
            .fetch_one(&mut tx)
            .await
            .unwrap();
        assert_eq!(n, 1);
        env.assert_gone(&[]).await;
        tx.commit().await.unwrap();
        env.assert_gone(&[
            "product:1",
            "product:2",
            "product:3",
            "product:4",
            "product:5",
            "category:1:products",
            "category:2:products",
            "review:2",
            "product:1:reviews",
        ])
        .await;
    }

    #[tokio::test]
    async fn a_dropped_fetch_stream_still_delivers_its_keys() {
        use futures_util::StreamExt as _;
        let env = Env::new("dropped_stream").await;
        {
            let mut rows = env.pool.fetch(sqlx::query(
                "UPDATE products SET price_cents = 0 WHERE category_id = 1 RETURNING id",
            ));
            assert!(rows.next().await.is_some());
            // Dropped after the first of three rows.
        }
        // Well before the relay's grace period (2 s) on PostgreSQL: delivered by the dropped statement's
        // guard.
        for key in ["product:1", "product:2", "product:3", "category:1:products"] {
            env.wait_gone(key, Duration::from_millis(1500)).await;
        }
        env.assert_gone(&["product:1", "product:2", "product:3", "category:1:products"])
            .await;
    }

    #[tokio::test]
    async fn a_store_cut_off_after_commit_is_not_an_error_and_the_relay_catches_up() {
        let env = Env::with("cut_off", |o| {
            o.relay_config(RelayConfig::new().wrapped_grace(Duration::from_millis(200)).sweep_interval(Duration::from_millis(100)).store_timeout(Duration::from_millis(200)))
        })
        .await;
        env.store.cut_off(true);
        let start = Instant::now();
        // Both writes commit and return Ok although the store cannot be reached.
        sqlx::query("UPDATE products SET price_cents = 1 WHERE id = 1")
            .execute(&env.pool)
            .await
            .unwrap();
        let mut tx = env.pool.begin().await.unwrap();
        sqlx::query("DELETE FROM reviews WHERE id = 3")
            .execute(&mut tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let took = start.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
        let price: i64 = sqlx::query_scalar("SELECT price_cents FROM products WHERE id = 1")
            .fetch_one(&env.admin)
            .await
            .unwrap();
        assert_eq!(price, 1);
        // Attempted, but nothing delivered: the keys are still cached and wait in the outbox.
        assert!(!env.store.calls().is_empty());
        assert!(env.store.delivered().is_empty());
        env.assert_gone(&[]).await;
        assert!(env.outbox_rows().await >= 2);
        // Let the relay fail a few sweeps too.
        tokio::time::sleep(Duration::from_millis(300)).await;
        env.assert_gone(&[]).await;

        env.store.cut_off(false);
        let back = Instant::now();
        for key in ["product:1", "category:1:products", "review:3", "product:2:reviews"] {
            env.wait_gone(key, Duration::from_secs(10)).await;
        }
        env.wait_outbox_empty(Duration::from_secs(10)).await;
        eprintln!("relay caught up {:?} after the store came back ({BACKEND})", back.elapsed());
        env.assert_gone(&["product:1", "category:1:products", "review:3", "product:2:reviews"])
            .await;
    }

    #[tokio::test]
    async fn each_write_is_delivered_once_on_a_shared_connection() {
        // One connection: the transaction and the autocommit statements run on the same connection.
        let env = Env::with("once", |o| {
            counted(o.pool_options(sqlx::pool::PoolOptions::<Db>::new().max_connections(1)))
        })
        .await;
        let mut tx = env.pool.begin().await.unwrap();
        sqlx::query("UPDATE products SET price_cents = 1 WHERE id = 1")
            .execute(&mut tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        sqlx::query("UPDATE products SET price_cents = 1 WHERE id = 4")
            .execute(&env.pool)
            .await
            .unwrap();
        sqlx::query("DELETE FROM reviews WHERE id = 3")
            .execute(&env.pool)
            .await
            .unwrap();
        assert_eq!(
            env.store.calls(),
            [
                vec!["category:1:products", "product:1"],
                vec!["category:2:products", "product:4"],
                vec!["product:2:reviews", "review:3"],
            ]
        );
        env.assert_gone(&[
            "product:1",
            "category:1:products",
            "product:4",
            "category:2:products",
            "review:3",
            "product:2:reviews",
        ])
        .await;
    }

    #[tokio::test]
    async fn install_is_idempotent() {
        let env = Env::with("idempotent", |o| o.run_relay(false)).await;
        env.pool.install_schema().await.unwrap();
        env.pool.install_schema().await.unwrap();
        // A second pool installing again on the same database.
        let again = CachedPool::<Db>::options()
            .registry(shop())
            .auto_install(true)
            .run_relay(false)
            .connect(&env.db.url, MemoryStore::new(100))
            .await
            .unwrap();
        again.close().await;
        let trigger_sql = if BACKEND == "postgres" {
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'products'::regclass AND NOT tgisinternal"
        } else {
            "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'products'"
        };
        let triggers: i64 = sqlx::query_scalar(trigger_sql)
            .fetch_one(&env.admin)
            .await
            .unwrap();
        // PostgreSQL: insert, update, delete and truncate statement triggers, and the row trigger of
        // replica mode (logical-replication apply); SQLite: insert, update, delete and the `REPLACE` probe.
        assert_eq!(triggers, if BACKEND == "postgres" { 5 } else { 4 });
        // One write by another client, one outbox row (no duplicate triggers).
        sqlx::query("UPDATE products SET name = 'z' WHERE id = 1")
            .execute(&env.admin)
            .await
            .unwrap();
        assert_eq!(env.outbox_rows().await, 1);
        // Delivered by a drain, with exactly its keys.
        env.pool.relay().deliver_all().await.unwrap();
        assert_eq!(
            invalidated(&env.store),
            keys(&["product:1", "category:1:products"])
        );
        env.assert_gone(&["product:1", "category:1:products"]).await;
    }

    #[tokio::test]
    async fn connecting_to_a_database_without_or_with_other_triggers_fails() {
        let db = TestDatabase::create("fingerprint").await;
        let admin = db.pool().await;
        sqlx::raw_sql(TABLES).execute(&admin).await.unwrap();

        let err = CachedPool::<Db>::options()
            .registry(shop())
            .run_relay(false)
            .connect(&db.url, MemoryStore::new(100))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotInstalled { .. }), "{err}");
        assert!(err.to_string().contains("install"), "{err}");

        // Installed for another registry.
        let products_only = Registry::new([Product::META]);
        CachedPool::<Db>::options()
            .registry(products_only.clone())
            .auto_install(true)
            .run_relay(false)
            .connect(&db.url, MemoryStore::new(100))
            .await
            .unwrap()
            .close()
            .await;
        let err = CachedPool::<Db>::options()
            .registry(shop())
            .run_relay(false)
            .connect(&db.url, MemoryStore::new(100))
            .await
            .unwrap_err();
        match &err {
            Error::FingerprintMismatch {
                installed,
                expected,
            } => {
                assert_eq!(installed, &products_only.fingerprint());
                assert_eq!(expected, &shop().fingerprint());
            }
            other => panic!("expected a fingerprint mismatch, got {other}"),
        }
        assert!(err.to_string().contains("install"), "{err}");
        // What to run, for either database.
        let message = err.to_string();
        assert!(
            message.contains("auto_install(true)")
                && message.contains("PgSchema::new(registry()).write_migration(")
                && message.contains("SQLite: `SqliteSchema`"),
            "{message}"
        );
        // The installing pool's registry still connects.
        CachedPool::<Db>::options()
            .registry(products_only)
            .run_relay(false)
            .connect(&db.url, MemoryStore::new(100))
            .await
            .unwrap()
            .close()
            .await;
    }

    #[tokio::test]
    async fn missing_columns_and_tables_are_install_errors() {
        let db = TestDatabase::create("columns").await;
        let admin = db.pool().await;
        sqlx::raw_sql("CREATE TABLE gadgets (id bigint PRIMARY KEY, maker_id bigint)")
            .execute(&admin)
            .await
            .unwrap();
        let err = CachedPool::<Db>::options()
            .registry(Registry::new([Gadget::META, Nowhere::META]))
            .auto_install(true)
            .run_relay(false)
            .connect(&db.url, MemoryStore::new(100))
            .await
            .unwrap_err();
        let Error::Columns(problems) = &err else {
            panic!("expected column problems, got {err}");
        };
        assert_eq!(
            problems,
            &[
                ColumnProblem {
                    entity: "Gadget".into(),
                    table: "gadgets".into(),
                    column: Some("owner".into()),
                    problem: Problem::MissingColumn,
                },
                ColumnProblem {
                    entity: "Nowhere".into(),
                    table: "nowhere".into(),
                    column: None,
                    problem: Problem::MissingTable,
                },
            ]
        );
        let message = err.to_string();
        assert!(
            message.contains(
                "table `gadgets` has no column `owner`, used by a key template of entity `Gadget`"
            ),
            "{message}"
        );
        // Nothing was installed: a write by another client leaves no outbox behind.
        sqlx::query("INSERT INTO gadgets VALUES (1, 2)")
            .execute(&admin)
            .await
            .unwrap();
        let outbox = if BACKEND == "postgres" {
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'cache_invalidation'"
        } else {
            "SELECT count(*) FROM sqlite_master WHERE name LIKE 'cache_invalidation%'"
        };
        let installed: i64 = sqlx::query_scalar(outbox).fetch_one(&admin).await.unwrap();
        assert_eq!(installed, 0);
    }
}

// PostgreSQL only: MERGE, TRUNCATE, data-modifying CTEs, DELETE … USING, plpgsql functions, psql, roles,
// row locks, trigger modes, a killed Redis server.

type Env = postgres::Env;

#[tokio::test]
async fn delete_using() {
    let env = Env::new("delete_using").await;
    sqlx::query(
        "DELETE FROM reviews r USING products p WHERE p.id = r.product_id AND p.price_cents = 200",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    env.assert_gone(&["review:3", "product:2:reviews"]).await;
}

#[tokio::test]
async fn data_modifying_cte_through_fetch_one() {
    let env = Env::new("cte").await;
    let row = sqlx::query(
        "WITH moved AS (UPDATE products SET price_cents = price_cents + 1 WHERE id = 4 RETURNING id, price_cents)
         SELECT id, price_cents FROM moved",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>("price_cents"), 401);
    env.assert_gone(&["product:4", "category:2:products"]).await;
}

#[tokio::test]
async fn merge() {
    let env = Env::new("merge").await;
    sqlx::query(
        "MERGE INTO products p
         USING (VALUES (1::bigint, 999::bigint), (11::bigint, 5::bigint)) AS s(id, price) ON p.id = s.id
         WHEN MATCHED THEN UPDATE SET price_cents = s.price
         WHEN NOT MATCHED THEN INSERT VALUES (s.id, 3, 'merged', s.price)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    // product:11 is not in the universe; it must have been invalidated all the same.
    env.assert_gone(&["product:1", "category:1:products", "category:3:products"])
        .await;
    assert!(invalidated(&env.store).contains("product:11"));
}

#[tokio::test]
async fn truncate_invalidates_the_namespaces() {
    let env = Env::new("truncate").await;
    sqlx::query("TRUNCATE reviews")
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        env.store.calls(),
        [vec![
            "product:<>:reviews".to_owned(),
            "review:<>".to_owned()
        ]]
    );
    // TRUNCATE … CASCADE reaches every registered child.
    sqlx::query("TRUNCATE categories CASCADE")
        .execute(&env.pool)
        .await
        .unwrap();
    let last = env.store.calls().pop().unwrap();
    assert_eq!(
        last.into_iter().collect::<BTreeSet<_>>(),
        [
            "category:<>",
            "category:<>:products",
            "product:<>",
            "product:<>:reviews",
            "review:<>"
        ]
        .map(str::to_owned)
        .into_iter()
        .collect()
    );
}

#[tokio::test]
async fn function_that_writes_called_with_select() {
    let env = Env::with("function", |o| {
        o.relay_config(
            RelayConfig::new()
                .wrapped_grace(Duration::from_millis(100))
                .sweep_interval(Duration::from_millis(50)),
        )
    })
    .await;
    sqlx::raw_sql(
        "CREATE FUNCTION reprice(p bigint) RETURNS bigint LANGUAGE plpgsql AS $$
         BEGIN UPDATE products SET price_cents = 1 WHERE id = p; RETURN p; END $$",
    )
    .execute(&env.admin)
    .await
    .unwrap();
    // Inside a transaction: synchronous, whatever the statement.
    let mut tx = env.pool.begin().await.unwrap();
    let id: i64 = sqlx::query_scalar("SELECT reprice(3)")
        .fetch_one(&mut tx)
        .await
        .unwrap();
    assert_eq!(id, 3);
    tx.commit().await.unwrap();
    env.assert_gone(&["product:3", "category:1:products"]).await;

    // Autocommit: not classified as a write, so the relay delivers it (bounded by grace + sweep interval).
    let id: i64 = sqlx::query_scalar("SELECT reprice(4)")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(id, 4);
    env.wait_gone("product:4", Duration::from_secs(5)).await;
    env.wait_gone("category:2:products", Duration::from_secs(5))
        .await;
    env.assert_gone(&[
        "product:3",
        "category:1:products",
        "product:4",
        "category:2:products",
    ])
    .await;
}

#[tokio::test]
async fn write_through_psql_is_relayed() {
    let env = Env::new("psql").await;
    let db_url = env.db.url.clone();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .arg(&db_url)
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
            .arg("DELETE FROM reviews WHERE id = 1")
            .status()
    })
    .await
    .unwrap()
    .expect("psql must be installed (Debian: apt-get install postgresql-client)");
    assert!(status.success());
    let took = env.wait_gone("review:1", Duration::from_secs(5)).await;
    env.wait_gone("product:1:reviews", Duration::from_secs(5))
        .await;
    eprintln!("relay latency (psql): {took:?}");
    env.assert_gone(&["review:1", "product:1:reviews"]).await;
}

#[tokio::test]
async fn two_concurrent_transactions_writing_the_same_row() {
    let env = Env::new("concurrent").await;
    let mut first = env.pool.begin().await.unwrap();
    sqlx::query("UPDATE products SET price_cents = 1 WHERE id = 2")
        .execute(&mut first)
        .await
        .unwrap();
    let pool = env.pool.clone();
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let second = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        // Blocks on the row lock until `first` commits.
        sqlx::query("UPDATE products SET price_cents = price_cents + 1 WHERE id = 2")
            .execute(&mut tx)
            .await
            .unwrap();
        wait.await.unwrap();
        tx.commit().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(env.store.calls().is_empty());
    first.commit().await.unwrap();
    env.assert_gone(&["product:2", "category:1:products"]).await;
    // A reader refills the keys between the two commits; the second commit invalidates them again.
    env.seed().await;
    go.send(()).unwrap();
    second.await.unwrap();
    let calls = env.store.calls();
    assert_eq!(calls.len(), 2);
    for call in calls {
        assert_eq!(call, ["category:1:products", "product:2"]);
    }
    env.assert_gone(&["product:2", "category:1:products"]).await;
    let price: i64 = sqlx::query_scalar("SELECT price_cents FROM products WHERE id = 2")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(price, 2);
}

#[tokio::test]
async fn install_is_idempotent_and_replaces_old_triggers() {
    let db = TestDb::create("idempotent").await;
    let admin = db.pool().await;
    sqlx::raw_sql(TABLES).execute(&admin).await.unwrap();
    let registry = shop();
    let schema = PgSchema::new(&registry);
    let mut conn = admin.acquire().await.unwrap();
    schema.install(&mut conn).await.unwrap();
    schema.install(&mut conn).await.unwrap();
    drop(conn);
    // Concurrent installs serialize on the advisory lock.
    let (a, b) = tokio::join!(
        async {
            let mut c = admin.acquire().await.unwrap();
            PgSchema::new(&registry).install(&mut c).await
        },
        async {
            let mut c = admin.acquire().await.unwrap();
            PgSchema::new(&registry).install(&mut c).await
        }
    );
    a.unwrap();
    b.unwrap();
    let triggers = |table: &'static str| {
        let admin = admin.clone();
        async move {
            let names: Vec<String> = sqlx::query_scalar(
                "SELECT tgname::text FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal ORDER BY 1",
            )
            .bind(table)
            .fetch_all(&admin)
            .await
            .unwrap();
            names
        }
    };
    assert_eq!(
        triggers("products").await,
        [
            "cache_invalidation_delete",
            "cache_invalidation_insert",
            "cache_invalidation_replica",
            "cache_invalidation_truncate",
            "cache_invalidation_update"
        ]
    );
    // One write, one outbox row (no duplicate triggers).
    sqlx::query("UPDATE products SET name = 'z' WHERE id = 1")
        .execute(&admin)
        .await
        .unwrap();
    let mut keys: Vec<Vec<String>> =
        sqlx::query_scalar("SELECT keys FROM cache_invalidation.outbox")
            .fetch_all(&admin)
            .await
            .unwrap();
    keys.iter_mut().for_each(|k| k.sort());
    assert_eq!(keys, [vec!["category:1:products", "product:1"]]);

    // Installs are additive: installing fewer entities (another build) keeps the first build's capture
    // of the other tables, and can switch to row triggers. Retiring the first build removes its capture
    // of the tables no other build records.
    let products_only = Registry::new([Product::META]);
    let mut conn = admin.acquire().await.unwrap();
    PgSchema::new(&products_only)
        .trigger_mode(TriggerMode::Row)
        .install(&mut conn)
        .await
        .unwrap();
    assert_eq!(triggers("reviews").await.len(), 5);
    PgSchema::new(&products_only)
        .trigger_mode(TriggerMode::Row)
        .retire(&mut conn, &registry.fingerprint())
        .await
        .unwrap();
    assert!(triggers("categories").await.is_empty());
    assert!(triggers("reviews").await.is_empty());
    assert_eq!(
        triggers("products").await,
        ["cache_invalidation_row", "cache_invalidation_truncate"]
    );
    PgSchema::new(&products_only)
        .verify(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        PgSchema::new(&registry).verify(&mut conn).await,
        Err(Error::FingerprintMismatch { .. })
    ));

    // The exported SQL is the same script, and applies on its own (as a migration would).
    let sql = PgSchema::new(&registry).sql();
    let mut tx = sqlx::Acquire::begin(&mut *conn).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    PgSchema::new(&registry).verify(&mut conn).await.unwrap();
    assert_eq!(triggers("reviews").await.len(), 5);
}

/// `CachedPool::install_schema` re-installs with the pool's trigger mode (it used to fall back to the
/// default, statement triggers).
#[tokio::test]
async fn install_schema_keeps_the_pools_trigger_mode() {
    let db = TestDb::create("install_mode").await;
    let admin = db.pool().await;
    sqlx::raw_sql(TABLES).execute(&admin).await.unwrap();
    let pool = CachedPgPool::options()
        .registry(shop())
        .trigger_mode(TriggerMode::Row)
        .auto_install(true)
        .run_relay(false)
        .connect(&db.url, MemoryStore::default())
        .await
        .unwrap();
    pool.install_schema().await.unwrap();
    let mode: String = sqlx::query_scalar("SELECT trigger_mode FROM cache_invalidation.installed")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(mode, "row");
    let triggers: Vec<String> = sqlx::query_scalar(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'products'::regclass AND NOT tgisinternal \
         ORDER BY 1",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(
        triggers,
        ["cache_invalidation_row", "cache_invalidation_truncate"]
    );
}

/// The install creates exactly the functions the runtime calls (and the renderers the property tests
/// call), and drops `claim(integer, interval)`, which schema version 2 created and nothing called.
#[tokio::test]
async fn the_install_creates_only_functions_that_are_called() {
    let db = TestDb::create("functions").await;
    let admin = db.pool().await;
    sqlx::raw_sql(TABLES).execute(&admin).await.unwrap();
    sqlx::raw_sql(
        "CREATE SCHEMA cache_invalidation;
         CREATE FUNCTION cache_invalidation.claim(integer, interval) RETURNS void LANGUAGE sql AS 'SELECT';",
    )
    .execute(&admin)
    .await
    .unwrap();
    let registry = shop();
    let mut conn = admin.acquire().await.unwrap();
    PgSchema::new(&registry).install(&mut conn).await.unwrap();
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = 'cache_invalidation' \
           AND p.proname NOT LIKE 'capture\\_%' AND p.proname NOT LIKE 'replica\\_%' \
           AND p.proname NOT LIKE 'truncate\\_%' ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(
        functions,
        [
            "cache_invalidation.acknowledged(text)",
            "cache_invalidation.alive(text)",
            "cache_invalidation.backlog(text)",
            "cache_invalidation.claim_rows(integer,interval,bigint,text)",
            "cache_invalidation.cut_replay(text,bigint)",
            // Schema version 4's signature, which processes of older builds call during a rolling deploy.
            "cache_invalidation.delivered(bigint[],text)",
            "cache_invalidation.delivered(bigint[],text,bigint)",
            "cache_invalidation.escape_text(text)",
            "cache_invalidation.forget(bigint[],text[],boolean)",
            "cache_invalidation.install_triggers(text)",
            "cache_invalidation.invalidate(text[])",
            "cache_invalidation.invalidate_namespaces(text[])",
            "cache_invalidation.live_consumers()",
            "cache_invalidation.max_id()",
            "cache_invalidation.on_ddl()",
            "cache_invalidation.on_rewrite_or_drop()",
            "cache_invalidation.pending_upto(bigint,text)",
            "cache_invalidation.prune()",
            "cache_invalidation.purge_replay(text,interval)",
            "cache_invalidation.register(text,text,interval,text)",
            "cache_invalidation.render_bool(boolean)",
            "cache_invalidation.render_int(bigint)",
            "cache_invalidation.render_text(text)",
            "cache_invalidation.replay_keys(text,bigint,integer)",
            "cache_invalidation.session_keys()",
            "cache_invalidation.transaction_keys()",
            "cache_invalidation.tree(regclass)",
            "cache_invalidation.unregister(text,text)",
        ]
    );
    // Every function a client calls is granted by `grant_sql`, and only those.
    let grant = PgSchema::grant_sql("app");
    for called in [
        "alive(text)",
        "backlog(text)",
        "claim_rows(integer, interval, bigint, text)",
        "delivered(bigint[], text)",
        "delivered(bigint[], text, bigint)",
        "acknowledged(text)",
        "invalidate(text[])",
        "replay_keys(text, bigint, integer)",
        "cut_replay(text, bigint)",
        "purge_replay(text, interval)",
        "max_id()",
        "pending_upto(bigint, text)",
        "register(text, text, interval, text)",
        "unregister(text, text)",
        "prune()",
        "session_keys()",
        "transaction_keys()",
    ] {
        assert!(
            grant.contains(&format!("cache_invalidation.{called}")),
            "{grant}"
        );
    }
    assert!(!grant.contains(".claim("), "{grant}");
}

#[tokio::test]
async fn missing_or_mistyped_columns_are_install_errors() {
    let db = TestDb::create("columns").await;
    let admin = db.pool().await;
    sqlx::raw_sql("CREATE TABLE gadgets (id bigint PRIMARY KEY, maker_id text)")
        .execute(&admin)
        .await
        .unwrap();
    let registry = Registry::new([Gadget::META, Nowhere::META]);
    let mut conn = admin.acquire().await.unwrap();
    let err = PgSchema::new(&registry)
        .install(&mut conn)
        .await
        .unwrap_err();
    let Error::Columns(problems) = &err else {
        panic!("expected column problems, got {err}");
    };
    assert_eq!(
        problems,
        &[
            ColumnProblem {
                entity: "Gadget".into(),
                table: "gadgets".into(),
                column: Some("maker_id".into()),
                problem: Problem::IncompatibleType {
                    found: "text".into(),
                    expected: "smallint, integer or bigint"
                },
            },
            ColumnProblem {
                entity: "Gadget".into(),
                table: "gadgets".into(),
                column: Some("owner".into()),
                problem: Problem::MissingColumn,
            },
            ColumnProblem {
                entity: "Nowhere".into(),
                table: "nowhere".into(),
                column: None,
                problem: Problem::MissingTable,
            },
        ]
    );
    let message = err.to_string();
    assert!(
        message.contains(
            "table `gadgets` has no column `owner`, used by a key template of entity `Gadget`"
        ),
        "{message}"
    );
    // Nothing was installed.
    let schema: Option<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname = 'cache_invalidation'",
    )
    .fetch_optional(&admin)
    .await
    .unwrap();
    assert_eq!(schema, None);
    // The exported SQL fails the same way when applied by a migration tool.
    let err = sqlx::raw_sql(sqlx::AssertSqlSafe(
        PgSchema::new(&Registry::new([Gadget::META])).sql(),
    ))
    .execute(&admin)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("column"), "{err}");
}

/// A login role of the test's own, dropped (with its privileges) on drop.
struct TestRole {
    name: String,
    db_url: String,
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let (url, name) = (self.db_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                use sqlx::Connection as _;
                let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP OWNED BY \"{name}\"; DROP ROLE \"{name}\""
                )))
                .execute(&mut conn)
                .await
                .ok()
            })
        })
        .join();
    }
}

#[tokio::test]
async fn a_role_with_only_dml_rights_writes_normally() {
    let env = Env::new("role").await;
    let role = TestRole {
        name: format!("dml_{}", env.db.name).chars().take(63).collect(),
        db_url: env.db.url.clone(),
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE \"{0}\" LOGIN;
         GRANT SELECT, INSERT, UPDATE, DELETE ON categories, products, reviews TO \"{0}\";",
        role.name
    )))
    .execute(&env.admin)
    .await
    .unwrap();
    let options: PgConnectOptions = env.db.url.parse().unwrap();
    // Without the grant, the role may write (the triggers capture its writes) but not touch the outbox:
    // it cannot delete undelivered rows.
    let plain = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone().username(&role.name))
        .await
        .unwrap();
    let err = sqlx::query("SELECT cache_invalidation.delivered(ARRAY[1::bigint], 'x')")
        .execute(&plain)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    sqlx::query("UPDATE products SET price_cents = 2 WHERE id = 2")
        .execute(&plain)
        .await
        .unwrap();
    env.wait_gone("product:2", Duration::from_secs(5)).await;
    plain.close().await;
    // Cache the keys again for the checks below (the relay has delivered that write).
    env.seed().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(PgSchema::grant_sql(&role.name)))
        .execute(&env.admin)
        .await
        .unwrap();
    let pool = CachedPgPool::options()
        .registry(shop())
        .connect_with(options.username(&role.name), env.store.clone())
        .await
        .unwrap();
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(user, role.name);
    // Autocommit and transaction writes are captured and delivered.
    sqlx::query("UPDATE products SET price_cents = 1 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("DELETE FROM reviews WHERE id = 3")
        .execute(&mut tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    env.assert_gone(&[
        "product:1",
        "category:1:products",
        "review:3",
        "product:2:reviews",
    ])
    .await;
    // The outbox itself stays out of reach.
    let err = sqlx::query("SELECT * FROM cache_invalidation.outbox")
        .fetch_all(&pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    // The relay runs as this role too: a write of another client is delivered.
    sqlx::query("UPDATE categories SET name = 'x' WHERE id = 3")
        .execute(&env.admin)
        .await
        .unwrap();
    env.wait_gone("category:3", Duration::from_secs(5)).await;
    pool.close().await;
    drop(role);
}

#[tokio::test]
async fn a_store_outage_after_commit_is_not_an_error_and_the_relay_catches_up() {
    let mut server = tests::RedisServer::start();
    let db = TestDb::create("outage").await;
    let admin = db.pool().await;
    sqlx::raw_sql(TABLES).execute(&admin).await.unwrap();
    let store = RedisStore::connect(&server.url(), "outage:").await.unwrap();
    let pool = CachedPgPool::options()
        .registry(shop())
        .auto_install(true)
        .relay_config(
            RelayConfig::new()
                .wrapped_grace(Duration::from_millis(200))
                .sweep_interval(Duration::from_millis(100))
                .store_timeout(Duration::from_millis(200)),
        )
        .connect(&db.url, store)
        .await
        .unwrap();
    let outbox = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM cache_invalidation.outbox")
            .fetch_one(&admin)
            .await
            .unwrap()
    };

    server.kill();
    let start = Instant::now();
    // Both writes commit and return Ok although the store is down.
    sqlx::query("UPDATE products SET price_cents = 1 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("DELETE FROM reviews WHERE id = 3")
        .execute(&mut tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let took = start.elapsed();
    eprintln!("two writes during the outage took {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let price: i64 = sqlx::query_scalar("SELECT price_cents FROM products WHERE id = 1")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(price, 1);
    // The keys wait in the outbox.
    assert!(outbox().await >= 2);

    // Redis is back (empty); values are cached again before the relay catches up.
    server.restart();
    let client = redis::Client::open(server.url().as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for key in [
        "product:1",
        "category:1:products",
        "review:3",
        "product:2:reviews",
        "product:2",
    ] {
        redis::cmd("SET")
            .arg(format!("outage:{key}"))
            .arg("stale")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    let restarted = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left: Vec<String> = redis::cmd("KEYS")
            .arg("outage:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        // The store's own slots (its sequence) are not cache entries.
        left.retain(|k| !k.ends_with("<sequence>"));
        if left == ["outage:product:2"] && outbox().await == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not deliver after the outage: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "relay caught up {:?} after the restart",
        restarted.elapsed()
    );
    pool.close().await;
}

#[tokio::test]
async fn write_detection_always_makes_writing_functions_synchronous() {
    let env = Env::with("always", |o| {
        o.write_detection(cache_runtime::WriteDetection::Always)
    })
    .await;
    sqlx::raw_sql(
        "CREATE FUNCTION reprice(p bigint) RETURNS bigint LANGUAGE plpgsql AS $$
         BEGIN UPDATE products SET price_cents = 1 WHERE id = p; RETURN p; END $$",
    )
    .execute(&env.admin)
    .await
    .unwrap();
    let id: i64 = sqlx::query_scalar("SELECT reprice(5)")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(id, 5);
    // Delivered before the call returned (the relay's grace period is 2 s).
    env.assert_gone(&["product:5", "category:2:products"]).await;
}

#[tokio::test]
async fn cache_reads_after_truncate_see_no_row() {
    use cache_runtime::Cache;
    let env = Env::new("read_truncate").await;
    let cache = Cache::new(Arc::clone(env.pool.store()));
    let pool = &env.pool;
    let name = |id: i64| env.product_name(&cache, id);
    assert_eq!(name(1).await.as_deref(), Some("a"));
    assert_eq!(name(3).await.as_deref(), Some("c"));
    // TRUNCATE: the whole namespace goes (tag tokens), including cached misses turned into rows.
    sqlx::query("TRUNCATE products CASCADE")
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(name(1).await, None);
    assert_eq!(name(3).await, None);
    sqlx::query("INSERT INTO products VALUES (3, 1, 'c2', 1)")
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(name(3).await.as_deref(), Some("c2"));
}

// SQLite only: another process (the `sqlite3` CLI), REPLACE, BLOB UUIDs.

/// Runs `sql` with the `sqlite3` command-line shell on `db`'s file.
async fn sqlite3_cli(db: &TestSqlite, sql: &str) {
    let (path, sql) = (db.path.clone(), sql.to_owned());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sqlite3")
            .args(["-bail", "-cmd", ".timeout 5000"])
            .arg(&path)
            .arg(&sql)
            .output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| {
        panic!("the `sqlite3` command-line shell must be installed (Debian: apt-get install sqlite3): {e}")
    });
    assert!(
        output.status.success(),
        "sqlite3 failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn sqlite_write_by_the_sqlite3_cli_is_relayed() {
    let env = sqlite::Env::new("sqlite3_cli").await;
    sqlite3_cli(
        &env.db,
        "UPDATE products SET price_cents = 9 WHERE id = 4; DELETE FROM reviews WHERE id = 1;",
    )
    .await;
    // The triggers fired in the other process: its rows wait in the outbox.
    let took = env.wait_gone("product:4", Duration::from_secs(5)).await;
    for key in ["category:2:products", "review:1", "product:1:reviews"] {
        env.wait_gone(key, Duration::from_secs(5)).await;
    }
    eprintln!("relay latency (sqlite3 CLI): {took:?}");
    env.assert_gone(&[
        "product:4",
        "category:2:products",
        "review:1",
        "product:1:reviews",
    ])
    .await;
    env.wait_outbox_empty(Duration::from_secs(5)).await;
    // Each key delivered once (the writer did not deliver the other process's rows a second time).
    assert!(
        env.store.delivered().values().all(|&n| n == 1),
        "{:?}",
        env.store.delivered()
    );
}

#[tokio::test]
async fn sqlite_insert_or_replace_invalidates_the_new_keys_synchronously() {
    let env = sqlite::Env::new("insert_or_replace").await;
    // Product 1 (category 1, reviews 1 and 2) replaced by a row in category 3: the conflict resolution
    // deletes the old row (cascading to its reviews), then inserts the new one.
    sqlx::query("INSERT OR REPLACE INTO products VALUES (1, 3, 'r', 1)")
        .execute(&env.pool)
        .await
        .unwrap();
    // Synchronous (`INSERT` is a write word): the new row's keys and the cascaded reviews' keys.
    let sync = invalidated(&env.store);
    for key in [
        "product:1",
        "category:3:products",
        "review:1",
        "review:2",
        "product:1:reviews",
    ] {
        assert!(
            sync.contains(key),
            "`{key}` not invalidated by INSERT OR REPLACE: {sync:?}"
        );
        assert!(!env.cached(key).await, "`{key}` still cached");
    }
}

#[tokio::test]
async fn sqlite_replace_into_is_delivered_before_the_call_returns() {
    let env = sqlite::Env::with("replace_into", |o| o.run_relay(false)).await;
    sqlx::query("REPLACE INTO products VALUES (4, 3, 'r', 1)")
        .execute(&env.pool)
        .await
        .unwrap();
    // `REPLACE INTO` is a writing statement (write detection), so its keys are gone when the call returns:
    // the new row's, and the replaced row's (product 4 was in category 2).
    let sync = invalidated(&env.store);
    for key in ["product:4", "category:3:products", "category:2:products"] {
        assert!(
            sync.contains(key),
            "{key} not invalidated synchronously: {sync:?}"
        );
    }
}

/// The rows that `REPLACE` conflict resolution deletes fire no `DELETE` trigger on a connection without
/// `PRAGMA recursive_triggers = ON` (SQLite's default, e.g. another client's): the `_replace` trigger
/// captures them before the insert, so the old row's keys (`category:<old>:products`) are invalidated too.
#[tokio::test]
async fn sqlite_replace_invalidates_the_old_row_keys() {
    let env = sqlite::Env::with("replace_old", |o| o.run_relay(false)).await;
    sqlx::query("INSERT OR REPLACE INTO products VALUES (1, 3, 'r', 1)")
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("REPLACE INTO products VALUES (4, 3, 'r', 1)")
        .execute(&env.pool)
        .await
        .unwrap();
    let sync = invalidated(&env.store);
    for key in [
        "category:1:products",
        "category:2:products",
        "category:3:products",
    ] {
        assert!(sync.contains(key), "{key} not invalidated: {sync:?}");
    }
    // Another client (a plain pool: recursive triggers off) replacing a row: the relay delivers the old
    // row's keys too.
    let before = env.store.calls().len();
    sqlx::query("REPLACE INTO products VALUES (5, 1, 'r', 1)")
        .execute(&env.admin)
        .await
        .unwrap();
    env.pool.relay().deliver_all().await.unwrap();
    let relayed: BTreeSet<String> = env
        .store
        .calls()
        .into_iter()
        .skip(before)
        .flatten()
        .collect();
    // Product 5 was in category 2.
    for key in ["product:5", "category:1:products", "category:2:products"] {
        assert!(relayed.contains(key), "{key} not invalidated: {relayed:?}");
    }
}

/// A device keyed by a UUID (stored by sqlx as a 16-byte BLOB) and a free-text label.
#[derive(Debug, CachedEntity)]
#[cached_entity(table = "devices", key = "device:<id>", depends = ["site:<site>/devices"])]
struct Device {
    id: uuid::Uuid,
    site: String,
}

#[tokio::test]
async fn sqlite_uuid_blob_and_text_with_separators_render_like_cache_keys() {
    let db = TestSqlite::create("uuid").await;
    let admin = db.pool().await;
    sqlx::raw_sql("CREATE TABLE devices (id blob PRIMARY KEY, site text NOT NULL)")
        .execute(&admin)
        .await
        .unwrap();
    let store = RecordingStore::new(MemoryStore::new(1000));
    let pool = CachedSqlitePool::options()
        .registry(Registry::new([Device::META]))
        .auto_install(true)
        .connect(&db.url, store.clone())
        .await
        .unwrap();
    let device = Device {
        id: uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
        site: "a:b/c%d e~<>{}'\"\\ü€𝄞".to_owned(),
    };
    let expected = |d: &Device| -> BTreeSet<String> {
        d.cache_keys()
            .into_iter()
            .map(|k| k.into_string())
            .collect()
    };
    sqlx::query("INSERT INTO devices VALUES ($1, $2)")
        .bind(device.id.as_bytes().as_slice())
        .bind(&device.site)
        .execute(&pool)
        .await
        .unwrap();
    let inserted = invalidated(&store);
    assert_eq!(inserted, expected(&device));
    assert!(
        inserted.contains("device:01234567-89ab-cdef-fedc-ba9876543210"),
        "{inserted:?}"
    );
    // An update of the text placeholder: the old and the new keys.
    let moved = Device {
        id: device.id,
        site: "x/y:z %25".to_owned(),
    };
    let before = store.calls().len();
    sqlx::query("UPDATE devices SET site = $1 WHERE id = $2")
        .bind(&moved.site)
        .bind(device.id.as_bytes().as_slice())
        .execute(&pool)
        .await
        .unwrap();
    let updated: BTreeSet<String> = store.calls().into_iter().skip(before).flatten().collect();
    let mut both = expected(&device);
    both.extend(expected(&moved));
    assert_eq!(updated, both);
    pool.close().await;
}

#[tokio::test]
async fn a_slow_store_gets_each_wrapped_write_once() {
    postgres::a_slow_store_gets_each_wrapped_write_once().await;
}

#[tokio::test]
async fn sqlite_a_slow_store_gets_each_wrapped_write_once() {
    sqlite::a_slow_store_gets_each_wrapped_write_once().await;
}

/// SQLite drops a table's triggers with the table: a table dropped and created again (or a rebuilt table
/// renamed into place, the usual SQLite migration) is refused at connect until capture is re-installed.
#[tokio::test]
async fn sqlite_a_table_dropped_and_created_again_is_refused_at_connect() {
    let db = TestSqlite::create("sqlite_recreated").await;
    let plain = db.pool().await;
    sqlx::raw_sql(TABLES).execute(&plain).await.unwrap();
    let connect = |install: bool| {
        CachedSqlitePool::options()
            .registry(shop())
            .auto_install(install)
            .run_relay(false)
            .connect_with(db.options(), MemoryStore::new(100))
    };
    connect(true).await.unwrap().close().await;
    connect(false).await.unwrap().close().await;
    sqlx::raw_sql(
        "CREATE TABLE products_new (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
           price_cents bigint NOT NULL);
         INSERT INTO products_new SELECT * FROM products;
         DROP TABLE products;
         ALTER TABLE products_new RENAME TO products;",
    )
    .execute(&plain)
    .await
    .unwrap();
    match connect(false).await {
        Err(Error::CaptureBroken(problems)) => {
            assert!(
                problems.contains(
                    &"products has no trigger cache_invalidation_products_update".to_owned()
                ),
                "{problems:?}"
            );
            assert!(
                Error::CaptureBroken(problems)
                    .to_string()
                    .contains("SqliteSchema::new(registry()).sql()")
            );
        }
        other => panic!("expected CaptureBroken, got {other:?}"),
    }
    connect(true).await.unwrap().close().await;
    connect(false).await.unwrap().close().await;
}
