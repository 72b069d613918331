//! Construction that composes with what a service already has: wrapping its own sqlx pool
//! (`CachedPoolOptions::wrap`), its migrations at connect (`migrations`, and `sqlx::Acquire` for
//! `&CachedPool`), and the environment (`from_env`). Real PostgreSQL, SQLite and Redis.

use std::time::{Duration, Instant};

use cache_runtime::{CachedEntity, CachedPgPool, CachedSqlitePool, Error, RedisStore, Registry};
use serde::{Deserialize, Serialize};
use tests::{TestDb, TestPrefix, TestSqlite};

/// A versioned row.
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

async fn store(prefix: &TestPrefix) -> RedisStore {
    RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .expect("redis")
}

async fn version(pool: &CachedPgPool, id: i64) -> i64 {
    pool.get::<Item>(&id)
        .await
        .expect("read")
        .expect("row")
        .version
}

async fn items(db: &TestDb) -> sqlx::PgPool {
    let plain = db.pool().await;
    sqlx::raw_sql(
        "CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL);
         INSERT INTO items VALUES (1, 1), (2, 1);",
    )
    .execute(&plain)
    .await
    .expect("schema");
    plain
}

/// A pool the service connected itself: wrapped, its writes through the wrapper are delivered before
/// they return (autocommit and transactions, marked per transaction), and writes through the service's
/// own handle of the same pool are delivered by the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_pg_pool_is_shared_and_its_writes_are_invalidated() {
    let db = TestDb::create("wrap").await;
    let own = items(&db).await;
    let prefix = TestPrefix::create("wrap").await;
    let pool = CachedPgPool::options()
        .registry(Registry::new([Item::META]))
        .auto_install(true)
        .wrap(own.clone(), store(&prefix).await)
        .await
        .expect("wrap");
    assert_eq!(version(&pool, 1).await, 1);
    sqlx::query("UPDATE items SET version = 2 WHERE id = 1")
        .execute(&pool)
        .await
        .expect("autocommit write");
    assert_eq!(version(&pool, 1).await, 2, "read-your-writes, autocommit");
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("UPDATE items SET version = 3 WHERE id = 1")
        .execute(&mut tx)
        .await
        .expect("write");
    tx.commit().await.expect("commit");
    assert_eq!(version(&pool, 1).await, 3, "read-your-writes, transaction");
    // The rows of the wrapper's writes were delivered by the writer, not left to the relay.
    let undelivered: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_invalidation.outbox")
        .fetch_one(&own)
        .await
        .expect("outbox");
    assert!(
        undelivered <= 2,
        "{undelivered} rows wait (at most the last ones' deletes are queued)"
    );
    // The service's own handle on the same pool: an other client's write, delivered by the relay.
    assert_eq!(version(&pool, 2).await, 1);
    sqlx::query("UPDATE items SET version = 5 WHERE id = 2")
        .execute(&own)
        .await
        .expect("plain write");
    let deadline = Instant::now() + Duration::from_secs(5);
    while version(&pool, 2).await != 5 {
        assert!(
            Instant::now() < deadline,
            "the relay did not deliver the plain write"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One pool, not a copy: closing the service's handle closes the wrapper's.
    own.close().await;
    assert!(pool.sqlx_pool().is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_pool_without_recursive_triggers_is_refused_with_what_to_set() {
    let db = TestSqlite::create("wrap_sqlite").await;
    let plain = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(
            db.url
                .parse::<sqlx::sqlite::SqliteConnectOptions>()
                .expect("url")
                .pragma("recursive_triggers", "OFF"),
        )
        .await
        .expect("sqlite");
    sqlx::raw_sql("CREATE TABLE items (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)")
        .execute(&plain)
        .await
        .expect("schema");
    let prefix = TestPrefix::create("wrap_sqlite").await;
    let refused = CachedSqlitePool::options()
        .registry(Registry::new([Item::META]))
        .auto_install(true)
        .wrap(plain, store(&prefix).await)
        .await
        .expect_err("refused");
    assert!(matches!(refused, Error::UnsuitablePool(_)), "{refused}");
    assert!(
        refused.to_string().contains("recursive_triggers"),
        "{refused}"
    );
    let good = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(
            db.url
                .parse::<sqlx::sqlite::SqliteConnectOptions>()
                .expect("url")
                .pragma("recursive_triggers", "ON"),
        )
        .await
        .expect("sqlite");
    let pool = CachedSqlitePool::options()
        .registry(Registry::new([Item::META]))
        .auto_install(true)
        .wrap(good, store(&prefix).await)
        .await
        .expect("wrap");
    sqlx::query("INSERT INTO items VALUES (1, 1)")
        .execute(&pool)
        .await
        .expect("insert");
    assert_eq!(
        pool.get::<Item>(&1).await.expect("read").map(|i| i.version),
        Some(1)
    );
}

/// A fresh database: the pool runs the service's migrations before it installs capture on their tables,
/// so one pool does both; `&CachedPool` is also an `Acquire` for running them by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_at_connect_before_capture_is_installed() {
    let db = TestDb::create("migrate").await;
    let prefix = TestPrefix::create("migrate").await;
    let migrator = sqlx::migrate::Migrator::new(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/migrations/compose"
    )))
    .await
    .expect("migrations");
    let pool = CachedPgPool::options()
        .registry(Registry::new([Item::META]))
        .migrations(migrator)
        .auto_install(true)
        .connect(&db.url, store(&prefix).await)
        .await
        .expect("connect: migrated, then installed");
    assert_eq!(version(&pool, 1).await, 1);
    sqlx::query("UPDATE items SET version = 9 WHERE id = 1")
        .execute(&pool)
        .await
        .expect("write");
    assert_eq!(version(&pool, 1).await, 9);
    // Running them again through `&CachedPool` (sqlx::Acquire) finds nothing to do.
    let again = sqlx::migrate::Migrator::new(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/migrations/compose"
    )))
    .await
    .expect("migrations");
    again.run(&pool).await.expect("already applied");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(pool.sqlx_pool())
        .await
        .expect("migrations table");
    assert_eq!(applied, 1);
}

/// Without the migrations, the same fresh database is refused at connect, naming the missing table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_migrations_a_fresh_database_is_refused_naming_the_table() {
    let db = TestDb::create("migrate_missing").await;
    let prefix = TestPrefix::create("migrate_missing").await;
    let refused = CachedPgPool::options()
        .registry(Registry::new([Item::META]))
        .auto_install(true)
        .connect(&db.url, store(&prefix).await)
        .await
        .expect_err("no table yet");
    assert!(refused.to_string().contains("items"), "{refused}");
}

/// `CachedPool::from_env` in a child process (`from_env_probe`; the environment is process-wide): `DATABASE_URL`,
/// `REDIS_URL`, `CACHE_PREFIX` and the relay settings; a malformed variable is an error that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_env_connects_with_the_environment_and_names_a_bad_variable() {
    let db = TestDb::create("from_env").await;
    let _plain = items(&db).await;
    let prefix = TestPrefix::create("from_env").await;
    let child = |extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_from_env_probe"));
        cmd.env("DATABASE_URL", &db.url)
            .env("REDIS_URL", tests::redis_url())
            .env("CACHE_PREFIX", &prefix.prefix);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().expect("run the child")
    };
    let ok = child(&[("RELAY_SWEEP_MS", "100")]);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.contains("from_env: version 1, prefix ok"), "{out}");
    let bad = child(&[("RELAY_BATCH_ROWS", "lots")]);
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success());
    assert!(
        out.contains("environment variable `RELAY_BATCH_ROWS` is \"lots\", not a whole number"),
        "{out}"
    );
}
