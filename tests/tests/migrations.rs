//! The schema as a migration file the service commits (`PgSchema::write_migration`,
//! `SqliteSchema::write_migration`): written once per change of the registry, after the service's own
//! migrations, applied by sqlx's migrator; a pool then connects without installing anything, and capture
//! works. Real PostgreSQL, SQLite and Redis.

use cache_runtime::backend::postgres::PgSchema;
use cache_runtime::backend::sqlite::SqliteSchema;
use cache_runtime::{CachedEntity, CachedPgPool, CachedSqlitePool, RedisStore, Registry};
use serde::{Deserialize, Serialize};
use tests::{TestDb, TestDir, TestPrefix, TestSqlite};

/// A versioned row.
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

/// The same table in a later release of the service: one more dependent key (another fingerprint).
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", depends = ["items:all"], ttl = "1m")]
struct ItemV2 {
    id: i64,
    version: i64,
}

/// Another table, registered by a later release.
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "tags", key = "tag:<id>", ttl = "1m")]
struct Tag {
    id: i64,
    name: String,
}

/// A folder holding the service's own first migration (the `items` table).
fn service_migrations(hint: &str) -> TestDir {
    let dir = TestDir::new(hint);
    std::fs::create_dir_all(&dir.path).expect("mkdir");
    let own = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/migrations/compose/20261203000001_items.sql"
    );
    std::fs::copy(own, dir.path.join("20261203000001_items.sql")).expect("copy");
    dir
}

async fn store(prefix: &TestPrefix) -> RedisStore {
    RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .expect("redis")
}

/// Written after the service's migrations, once per registry: a second call returns the same file; a
/// changed registry gets a new file with a higher version.
#[test]
fn one_file_per_registry_after_the_services_own() {
    let dir = service_migrations("migration_files");
    let v1 = Registry::new([Item::META]);
    let first = PgSchema::new(&v1)
        .write_migration(&dir.path)
        .expect("write");
    let again = PgSchema::new(&v1)
        .write_migration(&dir.path)
        .expect("again");
    assert_eq!(first, again);
    let files = dir.files();
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(files[0], "20261203000001_items.sql");
    let name = &files[1];
    assert!(
        name.ends_with(&format!(
            "_cache_invalidation_{}_v{}.sql",
            v1.fingerprint(),
            cache_runtime::backend::postgres::SCHEMA_VERSION
        )),
        "{name}"
    );
    assert_eq!(
        std::fs::read_to_string(&first).expect("read"),
        PgSchema::new(&v1).sql()
    );
    let v2 = Registry::new([ItemV2::META]);
    let second = PgSchema::new(&v2)
        .write_migration(&dir.path)
        .expect("write v2");
    assert_ne!(first, second);
    let files = dir.files();
    assert_eq!(files.len(), 3, "{files:?}");
    let version = |name: &str| {
        name.split('_')
            .next()
            .expect("version")
            .parse::<u64>()
            .expect("digits")
    };
    assert!(version(&files[1]) < version(&files[2]), "{files:?}");
    assert!(files[2].contains(&v2.fingerprint()), "{files:?}");
}

/// A folder that cannot be created is an error that names it.
#[test]
fn an_unwritable_folder_is_an_error_naming_it() {
    let file = TestDir::new("migration_not_a_dir");
    std::fs::write(&file.path, "a file").expect("write");
    let inside = file.path.join("migrations");
    let error = PgSchema::new(&Registry::new([Item::META]))
        .write_migration(&inside)
        .expect_err("not a folder");
    assert!(
        matches!(error, cache_runtime::Error::Migration { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(&*inside.to_string_lossy()),
        "{error}"
    );
    let _ = std::fs::remove_file(&file.path);
}

async fn version(pool: &CachedPgPool) -> i64 {
    pool.get::<Item>(&1)
        .await
        .expect("read")
        .expect("row")
        .version
}

/// sqlx's migrator applies the service's migration and the library's file in order; a pool connects
/// without installing (the installed schema is this build's) and both the pool's writes and a plain
/// pool's are invalidated. The next release's file applies on top, and the next build connects; one that
/// changes the keys another build captures is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_database_migrated_with_the_file_needs_no_install() {
    let db = TestDb::create("migration_pg").await;
    let prefix = TestPrefix::create("migration_pg").await;
    let dir = service_migrations("migration_pg");
    let v1 = Registry::new([Item::META]);
    let plain = db.pool().await;
    migrate(&dir, &plain).await.expect("the service's own");
    // Before the file is applied, connecting without install names the way to write it.
    let refused = CachedPgPool::options()
        .registry(v1.clone())
        .connect(&db.url, store(&prefix).await)
        .await
        .expect_err("not installed");
    assert!(refused.to_string().contains("write_migration"), "{refused}");
    assert!(
        refused.to_string().contains("export_schema -- --migration"),
        "{refused}"
    );

    PgSchema::new(&v1)
        .write_migration(&dir.path)
        .expect("write");
    migrate(&dir, &plain).await.expect("migrate");
    let pool = CachedPgPool::options()
        .registry(v1)
        .connect(&db.url, store(&prefix).await)
        .await
        .expect("connect without install");
    assert_eq!(version(&pool).await, 1);
    sqlx::query("UPDATE items SET version = 2 WHERE id = 1")
        .execute(&pool)
        .await
        .expect("write");
    assert_eq!(version(&pool).await, 2);
    sqlx::query("UPDATE items SET version = 3 WHERE id = 1")
        .execute(&plain)
        .await
        .expect("foreign write");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while version(&pool).await != 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay never delivered the foreign write"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    pool.close().await;

    // The next release registers another table: its migration, then the library's next file, apply on
    // top, and the next build connects.
    std::fs::write(
        dir.path.join("20261203000002_tags.sql"),
        "CREATE TABLE tags (id bigint PRIMARY KEY, name text NOT NULL); INSERT INTO tags VALUES (1, 'a');",
    )
    .expect("own migration");
    let v2 = Registry::new([Item::META, Tag::META]);
    PgSchema::new(&v2)
        .write_migration(&dir.path)
        .expect("write v2");
    migrate(&dir, &plain).await.expect("migrate v2");
    let next = CachedPgPool::options()
        .registry(v2)
        .connect(&db.url, store(&prefix).await)
        .await
        .expect("the next build connects");
    assert!(next.get::<Tag>(&1).await.expect("read").is_some());
    sqlx::query("UPDATE items SET version = 4 WHERE id = 1")
        .execute(&next)
        .await
        .expect("write");
    assert_eq!(version(&next).await, 4);

    // A release that changes the keys of a table another build still captures is refused by the
    // migration (never silently dropping the other build's keys), naming the way out.
    let v3 = Registry::new([ItemV2::META, Tag::META]);
    PgSchema::new(&v3)
        .write_migration(&dir.path)
        .expect("write v3");
    let refused = migrate(&dir, &plain)
        .await
        .expect_err("another build's keys");
    assert!(
        refused.to_string().contains("also captures table items"),
        "{refused}"
    );
}

async fn migrate(dir: &TestDir, pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate::Migrator::new(dir.path.as_path())
        .await
        .expect("read the migrations")
        .run(pool)
        .await
}

/// The same on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_database_migrated_with_the_file_needs_no_install() {
    let db = TestSqlite::create("migration_sqlite").await;
    let prefix = TestPrefix::create("migration_sqlite").await;
    let dir = service_migrations("migration_sqlite");
    let registry = Registry::new([Item::META]);
    SqliteSchema::new(&registry)
        .write_migration(&dir.path)
        .expect("write");
    let plain = db.pool().await;
    sqlx::migrate::Migrator::new(dir.path.as_path())
        .await
        .expect("read")
        .run(&plain)
        .await
        .expect("migrate");
    let pool = CachedSqlitePool::options()
        .registry(registry)
        .connect_with(db.options(), store(&prefix).await)
        .await
        .expect("connect without install");
    assert_eq!(
        pool.get::<Item>(&1)
            .await
            .expect("read")
            .expect("row")
            .version,
        1
    );
    sqlx::query("UPDATE items SET version = 5 WHERE id = 1")
        .execute(&pool)
        .await
        .expect("write");
    assert_eq!(
        pool.get::<Item>(&1)
            .await
            .expect("read")
            .expect("row")
            .version,
        5
    );
}
