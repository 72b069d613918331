//! Fills that are never older than a committed write, whatever the loader reads: a load through a
//! transaction that may hold uncommitted writes, or whose snapshot may predate the load, is never stored
//! nor shared. Real PostgreSQL and Redis; each test has its own database and key prefix.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use cache_runtime::{CachedEntity, CachedPgPool, RedisStore, Registry, key};
use sqlx::PgPool;
use tests::model::Product;
use tests::{TestDb, TestPrefix, redis_url};

const TABLES: &str = "
CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
  price_cents bigint NOT NULL);
INSERT INTO products SELECT i, 1, 'p' || i, 100 FROM generate_series(1, 10) i;
";

async fn setup(hint: &str) -> (TestDb, PgPool, TestPrefix, CachedPgPool) {
    let db = TestDb::create(hint).await;
    let admin = db.pool().await;
    sqlx::raw_sql(TABLES).execute(&admin).await.unwrap();
    let prefix = TestPrefix::create(hint).await;
    let store = RedisStore::connect(&redis_url(), prefix.prefix.clone())
        .await
        .unwrap();
    let pool = CachedPgPool::options()
        .registry(Registry::new([Product::META]))
        .auto_install(true)
        .connect(&db.url, store)
        .await
        .unwrap();
    (db, admin, prefix, pool)
}

/// Reads product `id`'s price through the pool's cache, with `load` as the loader; returns the price and
/// whether the cache stored it.
async fn read_with<F, Fut>(pool: &CachedPgPool, id: i64, load: F) -> (i64, bool)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<i64, sqlx::Error>>,
{
    let fills = pool.cache().stats().fills;
    let price = pool
        .cache()
        .get_or_load(key!("product:<id>", id), load)
        .await
        .unwrap();
    (price, pool.cache().stats().fills > fills)
}

const SELECT_PRICE: &str = "SELECT price_cents FROM products WHERE id = $1";

/// Product `id`'s price through the cache, loaded through the transaction's executor (`&mut tx`); and
/// whether the cache stored it.
async fn read_through(
    pool: &CachedPgPool,
    tx: &mut cache_runtime::CachedTransaction<'_>,
    id: i64,
) -> (i64, bool) {
    read_with(pool, id, || async move {
        sqlx::query_scalar(SELECT_PRICE)
            .bind(id)
            .fetch_one(tx)
            .await
    })
    .await
}

/// The price a fresh read (on the pool, autocommit) gets through the cache.
async fn committed_read(pool: &CachedPgPool, id: i64) -> i64 {
    let db = pool.sqlx_pool().clone();
    read_with(pool, id, || async move {
        sqlx::query_scalar(SELECT_PRICE)
            .bind(id)
            .fetch_one(&db)
            .await
    })
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_through_a_transaction_with_uncommitted_writes_is_never_stored() {
    let (_db, _admin, _prefix, pool) = setup("fresh_uncommitted").await;
    // Through the transaction's executor: a write, then the load.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE products SET price_cents = 999 WHERE id = 1")
        .execute(&mut tx)
        .await
        .unwrap();
    let (price, stored) = read_through(&pool, &mut tx, 1).await;
    assert_eq!(price, 999, "the loader sees its own transaction's write");
    assert!(
        !stored,
        "a value read from uncommitted writes is not stored"
    );
    tx.rollback().await.unwrap();
    assert_eq!(
        committed_read(&pool, 1).await,
        100,
        "the rolled-back value is never served"
    );

    // Through the bare connection (`&mut *tx`): the write is invisible to the wrapper.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE products SET price_cents = 777 WHERE id = 2")
        .execute(&mut *tx)
        .await
        .unwrap();
    let (price, stored) = read_with(&pool, 2, || async {
        sqlx::query_scalar(SELECT_PRICE)
            .bind(2_i64)
            .fetch_one(&mut *tx)
            .await
    })
    .await;
    assert_eq!(price, 777);
    assert!(
        !stored,
        "a load on the transaction's connection is not stored"
    );
    drop(tx);
    assert_eq!(committed_read(&pool, 2).await, 100);

    // A write inside the loader itself (`UPDATE … RETURNING`).
    let mut tx = pool.begin().await.unwrap();
    let (price, stored) = read_with(&pool, 3, || async {
        sqlx::query_scalar(
            "UPDATE products SET price_cents = 555 WHERE id = $1 RETURNING price_cents",
        )
        .bind(3_i64)
        .fetch_one(&mut tx)
        .await
    })
    .await;
    assert_eq!(price, 555);
    assert!(
        !stored,
        "a loader that writes through the transaction does not store"
    );
    tx.rollback().await.unwrap();
    assert_eq!(committed_read(&pool, 3).await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_through_a_transaction_that_wrote_nothing_is_stored() {
    let (_db, admin, _prefix, pool) = setup("fresh_clean_tx").await;
    let mut tx = pool.begin().await.unwrap();
    let (price, stored) = read_through(&pool, &mut tx, 4).await;
    tx.commit().await.unwrap();
    assert_eq!(price, 100);
    assert!(stored, "a read-only transaction's load is cached");
    // And the usual invalidation still reaches it.
    sqlx::query("UPDATE products SET price_cents = 101 WHERE id = 4")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(committed_read(&pool, 4).await, 101);
    drop(admin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_sharing_an_uncommitted_load_do_not_receive_its_value() {
    let (_db, _admin, _prefix, pool) = setup("fresh_shared").await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE products SET price_cents = 888 WHERE id = 5")
        .execute(&mut tx)
        .await
        .unwrap();
    let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
    let follower = {
        let pool = pool.clone();
        tokio::spawn(async move {
            gate_rx.await.unwrap();
            committed_read(&pool, 5).await
        })
    };
    let (price, stored) = read_with(&pool, 5, || async {
        // Let another reader of the key join this load while it runs.
        gate_tx.send(()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        sqlx::query_scalar(SELECT_PRICE)
            .bind(5_i64)
            .fetch_one(&mut tx)
            .await
    })
    .await;
    assert_eq!((price, stored), (888, false));
    assert_eq!(
        follower.await.unwrap(),
        100,
        "a reader waiting for the load reads the committed row on its own"
    );
    tx.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_on_a_repeatable_read_snapshot_older_than_a_write_is_not_stored() {
    let (_db, _admin, _prefix, pool) = setup("fresh_rr").await;
    let mut tx = pool
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    // The snapshot is taken by the transaction's first statement.
    let _: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut tx)
        .await
        .unwrap();
    // A write commits and is invalidated after that snapshot, before the read.
    sqlx::query("UPDATE products SET price_cents = 666 WHERE id = 6")
        .execute(&pool)
        .await
        .unwrap();
    let (price, stored) = read_through(&pool, &mut tx, 6).await;
    assert_eq!(price, 100, "the old snapshot does not see the write");
    assert!(
        !stored,
        "a value from a snapshot older than the load is not stored"
    );
    assert_eq!(
        committed_read(&pool, 6).await,
        666,
        "the committed value is read"
    );
    tx.commit().await.unwrap();
    assert_eq!(committed_read(&pool, 6).await, 666);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeatable_read_transaction_whose_first_statement_is_the_load_stores() {
    let (_db, _admin, _prefix, pool) = setup("fresh_rr_first").await;
    sqlx::query("UPDATE products SET price_cents = 321 WHERE id = 7")
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let (price, stored) = read_through(&pool, &mut tx, 7).await;
    assert_eq!(
        (price, stored),
        (321, true),
        "its snapshot is taken after the lease"
    );
    // A second load in the same transaction reads the same (now possibly old) snapshot: not stored.
    let (_, stored) = read_through(&pool, &mut tx, 8).await;
    assert!(!stored);
    tx.commit().await.unwrap();
}

// --- a lagging streaming standby ----------------------------------------------------------------------

/// A primary, a standby of it that applies commits 1.5 s late, a `shop` database with the products, and
/// a pool on the primary whose read replica is the standby (waiting up to `wait` for it).
struct Standby {
    _primary: tests::PgCluster,
    _standby: tests::PgCluster,
    _prefix: TestPrefix,
    pool: CachedPgPool,
    replica: PgPool,
}

async fn standby(wait: std::time::Duration) -> Standby {
    let primary = tests::PgCluster::start(&[]);
    let standby = tests::PgCluster::standby_of(&primary, &["recovery_min_apply_delay=1500ms"]);
    let admin = PgPool::connect(&primary.url("postgres")).await.unwrap();
    sqlx::query("CREATE DATABASE shop")
        .execute(&admin)
        .await
        .unwrap();
    let shop = PgPool::connect(&primary.url("shop")).await.unwrap();
    sqlx::raw_sql(TABLES).execute(&shop).await.unwrap();
    // The standby has the table once it applied the commits, 1.5 s later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let replica = loop {
        if let Ok(replica) = PgPool::connect(&standby.url("shop")).await
            && sqlx::query("SELECT 1 FROM products LIMIT 1")
                .execute(&replica)
                .await
                .is_ok()
        {
            break replica;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the standby did not catch up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let prefix = TestPrefix::create("fresh_standby").await;
    let store = RedisStore::connect(&redis_url(), prefix.prefix.clone())
        .await
        .unwrap();
    let pool = CachedPgPool::options()
        .registry(Registry::new([Product::META]))
        .auto_install(true)
        .read_replica(replica.clone())
        .replica_wait(wait)
        .connect(&primary.url("shop"), store)
        .await
        .unwrap();
    Standby {
        _primary: primary,
        _standby: standby,
        _prefix: prefix,
        pool,
        replica,
    }
}

/// Product `id`'s price through the cache, loaded on the replica by `get_or_load_on_replica`.
async fn replica_read(pool: &CachedPgPool, id: i64) -> i64 {
    pool.get_or_load_on_replica(key!("product:<id>", id), |mut conn| async move {
        sqlx::query_scalar(SELECT_PRICE)
            .bind(id)
            .fetch_one(&mut *conn)
            .await
    })
    .await
    .unwrap()
}

/// Writes products 1..=10 through the pool (acknowledged when the calls return).
async fn write_ten(pool: &CachedPgPool, price: i64) {
    for id in 1..=10_i64 {
        sqlx::query("UPDATE products SET price_cents = $1 WHERE id = $2")
            .bind(price)
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_on_a_lagging_standby_are_never_older_than_an_acknowledged_write() {
    let env = standby(std::time::Duration::from_secs(5)).await;
    let pool = &env.pool;
    write_ten(pool, 250).await;
    // The naive way (a loader on the standby pool) caches the standby's old rows...
    for id in 6..=10_i64 {
        let replica = env.replica.clone();
        let price: i64 = pool
            .cache()
            .get_or_load(key!("product:<id>", id), || async move {
                sqlx::query_scalar::<_, i64>(SELECT_PRICE)
                    .bind(id)
                    .fetch_one(&replica)
                    .await
            })
            .await
            .unwrap();
        assert_eq!(price, 100, "the control reads the lagging standby");
    }
    // Meanwhile, through `get_or_load_on_replica`: each load waits until the standby replayed the writes.
    for id in 1..=5 {
        assert_eq!(replica_read(pool, id).await, 250, "product {id}");
    }
    // ...which stay stale after the standby caught up; the safe reads stay fresh.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        committed_read(pool, 6).await,
        100,
        "the control's entry is stale"
    );
    for id in 1..=5 {
        assert_eq!(replica_read(pool, id).await, 250);
    }
    assert!(pool.cache().stats().hits >= 6, "the safe loads were cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_lagging_more_than_the_wait_is_skipped_for_the_primary() {
    let env = standby(std::time::Duration::from_millis(100)).await;
    let pool = &env.pool;
    write_ten(pool, 260).await;
    let started = std::time::Instant::now();
    for id in 1..=10 {
        assert_eq!(replica_read(pool, id).await, 260, "product {id}");
    }
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1400),
        "loads went to the primary instead of waiting for the standby"
    );
}

// --- entity-first reads --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_reads_an_entity_by_its_key_values_and_every_write_reaches_it() {
    let (_db, admin, _prefix, pool) = setup("fresh_get").await;
    let first = pool.get::<Product>(&1).await.unwrap().unwrap();
    assert_eq!((first.id, first.price_cents), (1, 100));
    let hits = pool.cache().stats().hits;
    assert_eq!(pool.get::<Product>(&1).await.unwrap(), Some(first));
    assert_eq!(
        pool.cache().stats().hits,
        hits + 1,
        "the second read is a hit"
    );
    sqlx::query("UPDATE products SET price_cents = 150 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        pool.get::<Product>(&1).await.unwrap().unwrap().price_cents,
        150
    );
    // A missing row is a tombstone, until another client's insert reaches it through the relay.
    assert_eq!(pool.get::<Product>(&99).await.unwrap(), None);
    sqlx::query("INSERT INTO products VALUES (99, 1, 'new', 5)")
        .execute(&admin)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pool.get::<Product>(&99).await.unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the insert never reached the tombstone"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_binds_composite_keys_and_renamed_columns() {
    use tests::model::User;
    let db = TestDb::create("fresh_get_user").await;
    let admin = db.pool().await;
    sqlx::raw_sql(
        "CREATE TABLE app_users (tenant text, handle text, team integer, is_admin boolean,
           PRIMARY KEY (tenant, handle));
         INSERT INTO app_users VALUES ('acme', 'ada', 3, true), ('acme', 'bob', NULL, false),
           ('other', 'ada', 4, false);",
    )
    .execute(&admin)
    .await
    .unwrap();
    let prefix = TestPrefix::create("fresh_get_user").await;
    let store = RedisStore::connect(&redis_url(), prefix.prefix.clone())
        .await
        .unwrap();
    let pool = CachedPgPool::options()
        .registry(Registry::new([User::META]))
        .auto_install(true)
        .connect(&db.url, store)
        .await
        .unwrap();
    let id = ("acme".to_owned(), "ada".to_owned());
    let ada = pool.get::<User>(&id).await.unwrap().unwrap();
    assert_eq!((ada.team_id, ada.is_admin), (Some(3), true));
    let other = pool
        .get::<User>(&("other".into(), "ada".into()))
        .await
        .unwrap();
    assert_eq!(
        other.map(|u| u.team_id),
        Some(Some(4)),
        "each tenant's own row"
    );
    sqlx::query("UPDATE app_users SET team = 5 WHERE tenant = 'acme' AND handle = 'ada'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        pool.get::<User>(&id).await.unwrap().unwrap().team_id,
        Some(5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_on_sqlite_reads_and_is_invalidated() {
    let db = tests::TestSqlite::create("fresh_get").await;
    let plain = db.pool().await;
    sqlx::raw_sql(
        "CREATE TABLE products (id INTEGER PRIMARY KEY, category_id INTEGER NOT NULL, name TEXT NOT NULL,
           price_cents INTEGER NOT NULL);
         INSERT INTO products VALUES (1, 1, 'p1', 100);",
    )
    .execute(&plain)
    .await
    .unwrap();
    let pool = cache_runtime::CachedSqlitePool::options()
        .registry(Registry::new([Product::META]))
        .auto_install(true)
        .connect(&db.url, cache_runtime::MemoryStore::new(1000))
        .await
        .unwrap();
    assert_eq!(
        pool.get::<Product>(&1).await.unwrap().unwrap().price_cents,
        100
    );
    sqlx::query("UPDATE products SET price_cents = 120 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        pool.get::<Product>(&1).await.unwrap().unwrap().price_cents,
        120
    );
    assert_eq!(pool.get::<Product>(&2).await.unwrap(), None);
    let many = pool.get_many::<Product>(&[3, 1, 2]).await.unwrap();
    let many: Vec<Option<i64>> = many
        .iter()
        .map(|p| p.as_ref().map(|p| p.price_cents))
        .collect();
    assert_eq!(many, [None, Some(120), None]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_on_a_lagging_standby_is_never_older_than_an_acknowledged_write() {
    let env = standby(std::time::Duration::from_secs(5)).await;
    let pool = &env.pool;
    write_ten(pool, 270).await;
    for id in 1..=10 {
        let product = pool.get::<Product>(&id).await.unwrap().unwrap();
        assert_eq!(product.price_cents, 270, "product {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_of_a_flood_of_missing_keys_live_at_most_the_negative_ttl() {
    let (_db, _admin, prefix, pool) = setup("fresh_tombstones").await;
    for id in 1_000..3_000_i64 {
        assert_eq!(pool.get::<Product>(&id).await.unwrap(), None);
    }
    assert!(pool.get::<Product>(&1).await.unwrap().is_some());
    let client = redis::Client::open(redis_url().as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pttl = |key: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("PTTL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    let mut longest = 0;
    for id in (1_000..3_000).step_by(97) {
        let ttl = pttl(format!("{}product:{id}", prefix.prefix)).await;
        assert!(ttl > 0, "product {id}: a tombstone with a TTL ({ttl})");
        longest = longest.max(ttl);
    }
    assert!(
        longest <= 60_000,
        "tombstones live at most 60 s ({longest} ms)"
    );
    let value_ttl = pttl(format!("{}product:1", prefix.prefix)).await;
    assert!(
        value_ttl > 60_000,
        "values keep their entity's TTL ({value_ttl} ms)"
    );
    let bytes: i64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(format!("{}product:1500", prefix.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    eprintln!("one tombstone: {bytes} bytes in Redis");
    assert!(bytes < 200, "{bytes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_reads_hits_and_loads_the_misses_together() {
    let (_db, _admin, _prefix, pool) = setup("fresh_get_many").await;
    // Two of them cached, one missing, one asked twice.
    pool.get::<Product>(&2).await.unwrap();
    pool.get::<Product>(&4).await.unwrap();
    let loads = pool.cache().stats().loads;
    let ids = [1, 2, 3, 4, 77, 3];
    let got = pool.get_many::<Product>(&ids).await.unwrap();
    let got: Vec<Option<i64>> = got.iter().map(|p| p.as_ref().map(|p| p.id)).collect();
    assert_eq!(got, [Some(1), Some(2), Some(3), Some(4), None, Some(3)]);
    assert_eq!(
        pool.cache().stats().loads - loads,
        3,
        "one load per missing key"
    );
    // Everything is cached now, tombstone included.
    let hits = pool.cache().stats().hits;
    pool.get_many::<Product>(&ids).await.unwrap();
    assert_eq!(pool.cache().stats().hits - hits, 5);
    // Writes reach them.
    sqlx::query("UPDATE products SET price_cents = 175 WHERE id IN (1, 4)")
        .execute(&pool)
        .await
        .unwrap();
    let prices: Vec<i64> = pool
        .get_many::<Product>(&[1, 4])
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.unwrap().price_cents)
        .collect();
    assert_eq!(prices, [175, 175]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_get_many_of_overlapping_keys_complete() {
    let (_db, _admin, _prefix, pool) = setup("fresh_get_many_overlap").await;
    for round in 0..20 {
        let (a, b) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::join!(
                pool.get_many::<Product>(&[1, 2, 3, 4, 5]),
                pool.get_many::<Product>(&[5, 4, 3, 2, 1]),
            )
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: the batches waited for each other"));
        assert_eq!(a.unwrap().len(), 5);
        assert_eq!(b.unwrap().len(), 5);
        sqlx::query("UPDATE products SET price_cents = price_cents + 1")
            .execute(&pool)
            .await
            .unwrap();
    }
}
