//! Capture on servers set up as the shared one is not: a logical-replication subscriber (`wal_level =
//! logical`) and a server that allows prepared transactions. Each test starts a cluster of its own
//! (`initdb` as the `postgres` user, a free port), removed afterwards.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::time::{Duration, Instant};

use cache_runtime::outbox::RelayConfig;
use cache_runtime::{CachedEntity, CachedPgPool, MemoryStore, Registry, key};
use sqlx::{Connection as _, PgConnection, PgPool};
use tests::PgCluster;
use tests::model::Product;

const PRODUCTS: &str = "CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, \
                        name text NOT NULL, price_cents bigint NOT NULL);";

async fn exec(url: &str, sql: &str) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap();
}

/// A pool on `url` with capture installed, sweeping often.
async fn pool(url: &str) -> CachedPgPool {
    CachedPgPool::options()
        .registry(Registry::new([Product::META]))
        .auto_install(true)
        .relay_config(RelayConfig::new().sweep_interval(Duration::from_millis(50)))
        .connect(url, MemoryStore::default())
        .await
        .unwrap()
}

async fn cached_price(pool: &CachedPgPool, id: i64) -> Option<i64> {
    let db: &PgPool = pool.sqlx_pool();
    pool.cache()
        .get_or_load(key!("product:<id>", id), || async {
            sqlx::query_scalar("SELECT price_cents FROM products WHERE id = $1")
                .bind(id)
                .fetch_optional(db)
                .await
        })
        .await
        .unwrap()
}

/// Waits until `cond` holds, at most `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < within, "{what} after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Changes a logical-replication subscription applies to a registered table (in replica mode, by the
/// apply worker) reach the subscriber's cache.
#[tokio::test]
async fn changes_applied_by_a_logical_replication_subscription_are_captured() {
    let cluster = PgCluster::start(&[
        "wal_level=logical",
        "max_wal_senders=4",
        "max_replication_slots=4",
    ]);
    exec(&cluster.url("postgres"), "CREATE DATABASE publisher").await;
    exec(&cluster.url("postgres"), "CREATE DATABASE subscriber").await;
    let (publisher, subscriber) = (cluster.url("publisher"), cluster.url("subscriber"));
    exec(
        &publisher,
        &format!(
            "{PRODUCTS} INSERT INTO products VALUES (1, 1, 'lamp', 100);
             CREATE PUBLICATION shop FOR TABLE products;"
        ),
    )
    .await;
    exec(
        &publisher,
        "SELECT pg_create_logical_replication_slot('shop', 'pgoutput')",
    )
    .await;
    exec(&subscriber, PRODUCTS).await;
    let pool = pool(&subscriber).await;
    // The slot exists already: a subscription to the same cluster cannot create it (it would wait for
    // its own transaction).
    exec(
        &subscriber,
        &format!(
            "CREATE SUBSCRIPTION shop CONNECTION 'host=127.0.0.1 port={} dbname=publisher user=postgres' \
             PUBLICATION shop WITH (create_slot = false, slot_name = 'shop')",
            cluster.port
        ),
    )
    .await;
    let within = Duration::from_secs(20);
    eventually("the initial copy", within, || async {
        cached_price(&pool, 1).await == Some(100)
    })
    .await;
    assert_eq!(cached_price(&pool, 1).await, Some(100), "cached");
    exec(
        &publisher,
        "UPDATE products SET price_cents = 150 WHERE id = 1",
    )
    .await;
    eventually("the applied UPDATE in the cache", within, || async {
        cached_price(&pool, 1).await == Some(150)
    })
    .await;
    exec(&subscriber, "DROP SUBSCRIPTION shop").await;
}

/// Where the server allows prepared transactions, capture does not `NOTIFY` (which would make `PREPARE
/// TRANSACTION` fail): two-phase commits of registered tables work, and the relay's sweep delivers them.
#[tokio::test]
async fn two_phase_commits_of_registered_tables_work_and_are_delivered() {
    let cluster = PgCluster::start(&["max_prepared_transactions=4"]);
    let url = cluster.url("postgres");
    exec(
        &url,
        &format!("{PRODUCTS} INSERT INTO products VALUES (1, 1, 'lamp', 100);"),
    )
    .await;
    let pool = pool(&url).await;
    assert_eq!(cached_price(&pool, 1).await, Some(100));
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "BEGIN; UPDATE products SET price_cents = 120 WHERE id = 1; PREPARE TRANSACTION 'shop_1';",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        cached_price(&pool, 1).await,
        Some(100),
        "prepared, not committed"
    );
    sqlx::raw_sql("COMMIT PREPARED 'shop_1'")
        .execute(&mut conn)
        .await
        .unwrap();
    eventually(
        "the prepared UPDATE in the cache",
        Duration::from_secs(3),
        || async { cached_price(&pool, 1).await == Some(120) },
    )
    .await;
}
