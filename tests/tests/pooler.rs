//! A real pgbouncer in transaction mode between the pool and PostgreSQL (2 server sessions shared by more
//! clients): without `transaction_pooler` the connect is refused with what to configure; with it, writes
//! through the pool are invalidated when they return, the pool's mark never leaks to another client's
//! session, and other clients' writes are delivered by the relay listening on a direct connection.
//!
//! pgbouncer is the Debian package (1.18 on Debian 12): it keeps no prepared statements in transaction
//! mode, so the test's own statements are `.persistent(false)` inside transactions (an autocommit write
//! through the pool is one) or simple-protocol reads, as sqlx users must do with pgbouncer < 1.21.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::time::{Duration, Instant};

use cache_runtime::{CachedEntity, CachedPgPool, Error, MemoryStore, Registry, key};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tests::model::Product;
use tests::{PgBouncer, TestDb};

const TABLES: &str = "
CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
  price_cents bigint NOT NULL);
INSERT INTO products SELECT i, 1, 'p' || i, 100 FROM generate_series(1, 20) i;
";

/// How long another client's write may take to reach the cache (with slack for a loaded machine).
const RELAY_BOUND: Duration = Duration::from_secs(3);

async fn setup(hint: &str) -> (TestDb, PgPool, PgBouncer) {
    let db = TestDb::create(hint).await;
    let admin = db.pool().await;
    sqlx::raw_sql(TABLES).execute(&admin).await.unwrap();
    (db, admin, PgBouncer::start())
}

async fn pooled(db: &TestDb, bouncer: &PgBouncer) -> CachedPgPool {
    let direct: PgConnectOptions = db.url.parse().unwrap();
    CachedPgPool::options()
        .registry(Registry::new([Product::META]))
        .auto_install(true)
        .transaction_pooler(true)
        .direct(direct)
        .pool_options(PgPoolOptions::new().max_connections(6))
        .connect(&bouncer.url(&db.name), MemoryStore::default())
        .await
        .unwrap()
}

/// The price of `id` read through the cache; the loader reads through pgbouncer (simple protocol).
async fn cached(pool: &CachedPgPool, id: i64) -> i64 {
    let db = pool.sqlx_pool();
    pool.cache()
        .get_or_load(key!("product:<id>", id), || async {
            use sqlx::Row as _;
            let sql = format!("SELECT price_cents FROM products WHERE id = {id}");
            let row = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .fetch_one(db)
                .await?;
            row.try_get::<i64, _>(0)
        })
        .await
        .unwrap()
}

fn update(
    id: i64,
    cents: i64,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query("UPDATE products SET price_cents = $1 WHERE id = $2")
        .bind(cents)
        .bind(id)
        .persistent(false)
}

#[tokio::test]
async fn a_pool_without_the_pooler_option_is_refused_with_what_to_configure() {
    let (db, _admin, bouncer) = setup("pooler_refused").await;
    let err = CachedPgPool::options()
        .registry(Registry::new([Product::META]))
        .connect(&bouncer.url(&db.name), MemoryStore::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PoolerRefusedOptions(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("transaction_pooler(true)"), "{message}");
    assert!(
        message.contains("unsupported startup parameter"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_pgbouncer_in_transaction_mode_are_invalidated_when_they_return() {
    let (db, admin, bouncer) = setup("pooler_writes").await;
    let pool = pooled(&db, &bouncer).await;
    // 8 writers on 6 client connections sharing 2 server sessions: each reads its writes back.
    let writers: Vec<_> = (1..=8_i64)
        .map(|id| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for round in 1..=15_i64 {
                    assert_eq!(cached(&pool, id).await, cached(&pool, id).await);
                    let cents = id * 1000 + round;
                    if round % 2 == 0 {
                        update(id, cents).execute(&pool).await.unwrap();
                    } else {
                        let mut tx = pool.begin().await.unwrap();
                        update(id, cents).execute(&mut tx).await.unwrap();
                        tx.commit().await.unwrap();
                    }
                    assert_eq!(
                        cached(&pool, id).await,
                        cents,
                        "product {id}, round {round}"
                    );
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    // A failed autocommit write rolls its own transaction back and leaves the session usable.
    let err = sqlx::query("UPDATE products SET price_cents = 1 / 0 WHERE id = 1")
        .persistent(false)
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("division by zero"), "{err}");
    assert_eq!(cached(&pool, 1).await, 1015);
    // Another client's write (directly on the server): delivered by the relay, which listens on the
    // direct connection.
    let started = Instant::now();
    sqlx::query("UPDATE products SET price_cents = 4242 WHERE id = 9")
        .execute(&admin)
        .await
        .unwrap();
    cached(&pool, 9).await;
    loop {
        if cached(&pool, 9).await == 4242 {
            break;
        }
        assert!(
            started.elapsed() < RELAY_BOUND,
            "another client's write not delivered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "another client's write reached the cache in {:?}",
        started.elapsed()
    );
    pool.close().await;
}

/// The pool's mark in the session `executor` reaches ('' when unmarked).
async fn read_mark(executor: impl sqlx::PgExecutor<'_>) -> String {
    use sqlx::Row as _;
    let mark = "SELECT coalesce(current_setting('cache_invalidation.wrapped', true), '')";
    let row = sqlx::raw_sql(mark).fetch_one(executor).await.unwrap();
    row.try_get::<String, _>(0).unwrap()
}

#[tokio::test]
async fn the_pools_mark_is_set_per_transaction_and_never_reaches_another_client() {
    let (db, _admin, bouncer) = setup("pooler_mark").await;
    let pool = pooled(&db, &bouncer).await;
    let mut tx = pool.begin().await.unwrap();
    let marked = read_mark(&mut *tx).await;
    tx.commit().await.unwrap();
    assert_eq!(
        marked,
        pool.relay().consumer().tag(),
        "the pool's transactions are marked"
    );
    // A plain client of the same pgbouncer, on the same two server sessions: never marked.
    let plain = PgPoolOptions::new()
        .max_connections(4)
        .connect(&bouncer.url(&db.name))
        .await
        .unwrap();
    for _ in 0..20 {
        let mut tx = pool.begin().await.unwrap();
        update(3, 300).execute(&mut tx).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            read_mark(&plain).await,
            "",
            "the mark leaked to another client's session"
        );
    }
    plain.close().await;
    pool.close().await;
}
