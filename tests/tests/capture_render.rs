//! Property: keys rendered by the database triggers equal, byte for byte, the keys rendered in Rust.
//!
//! Random rows (unicode, separators, quotes, backslashes, `%`, very long text, any integer, booleans,
//! `NULL`s) are inserted through the real statement-level and row-level triggers of PostgreSQL; the keys they
//! write to the outbox are compared with `CachedEntity::cache_keys` and `Template::render`.
//!
//! On SQLite the triggers write the rows' values and the keys are rendered in Rust: random rows are inserted,
//! updated and deleted through a `CachedSqlitePool`, and the keys it delivers to the store are compared with
//! `cache_keys` of the rows written (the old and the new row on update).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeSet;

use cache_runtime::backend::TriggerMode;
use cache_runtime::backend::postgres::PgSchema;
use cache_runtime::key::KeyValue;
use cache_runtime::{CachedEntity, CachedSqlitePool, MemoryStore, Registry};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sqlx::{Connection as _, PgConnection};
use tests::{RecordingStore, TestDb, TestSqlite};

#[derive(Debug, Clone, CachedEntity)]
#[cached_entity(table = "props", key = "prop:<name>:<n>", depends = ["flag:<flag>/<label>"])]
struct Prop {
    name: Option<String>,
    n: Option<i64>,
    flag: Option<bool>,
    label: String,
}

const TABLE: &str =
    "CREATE TABLE props (name text, n bigint, flag boolean, label varchar NOT NULL)";

/// Random text, NUL included (SQLite text holds it).
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9_.~%:/ '\"\\\\<>{}\0-]{0,24}",
        "[a-z]{0,8}",
        proptest::collection::vec(any::<char>(), 300..3000)
            .prop_map(|chars| chars.into_iter().collect::<String>()),
    ]
}

/// Random text without NUL: PostgreSQL text cannot hold NUL.
fn text() -> impl Strategy<Value = String> {
    any_text().prop_map(|s| s.replace('\0', ""))
}

fn prop() -> impl Strategy<Value = Prop> {
    prop_with(text)
}

fn prop_with<S: Strategy<Value = String>>(text: impl Fn() -> S) -> impl Strategy<Value = Prop> {
    (
        proptest::option::of(text()),
        proptest::option::of(any::<i64>()),
        proptest::option::of(any::<bool>()),
        text(),
    )
        .prop_map(|(name, n, flag, label)| Prop {
            name,
            n,
            flag,
            label,
        })
}

/// The keys the trigger of `conn`'s database writes for `p`.
async fn sql_keys(conn: &mut PgConnection, p: &Prop) -> BTreeSet<String> {
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("INSERT INTO props VALUES ($1, $2, $3, $4)")
        .bind(&p.name)
        .bind(p.n)
        .bind(p.flag)
        .bind(&p.label)
        .execute(&mut *tx)
        .await
        .unwrap();
    let keys: Vec<Vec<String>> =
        sqlx::query_scalar("SELECT keys FROM cache_invalidation.transaction_keys()")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    keys.into_iter().flatten().collect()
}

#[test]
fn sql_and_rust_render_identical_keys() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_dbs, conns) = rt.block_on(async {
        let registry = Registry::new([Prop::META]);
        let mut dbs = Vec::new();
        let mut conns = Vec::new();
        for mode in [TriggerMode::Statement, TriggerMode::Row] {
            let db = TestDb::create("render").await;
            let mut conn = PgConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(TABLE).execute(&mut conn).await.unwrap();
            PgSchema::new(&registry)
                .trigger_mode(mode)
                .install(&mut conn)
                .await
                .unwrap();
            dbs.push(db);
            conns.push(conn);
        }
        (dbs, conns)
    });

    let conns = std::cell::RefCell::new(conns);
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&prop(), |p| {
            let rust: BTreeSet<String> = p
                .cache_keys()
                .into_iter()
                .map(|k| k.into_string())
                .collect();
            // The dynamic rendering agrees with the typed one.
            let text = |v: &Option<String>| v.clone().map_or(KeyValue::Null, KeyValue::Text);
            let dynamic = Prop::META
                .key
                .render(&[text(&p.name), p.n.map_or(KeyValue::Null, KeyValue::Int)])
                .unwrap();
            prop_assert!(rust.contains(dynamic.as_str()));
            for conn in conns.borrow_mut().iter_mut() {
                let sql = rt.block_on(sql_keys(conn, &p));
                prop_assert_eq!(&sql, &rust);
            }
            Ok(())
        })
        .unwrap();

    // The standalone rendering functions agree too, including on NULL.
    let mut conns = conns.into_inner();
    rt.block_on(async {
        let conn = &mut conns[0];
        let row: (String, String, String, String, String) = sqlx::query_as(
            "SELECT cache_invalidation.render_text($1), cache_invalidation.render_text(NULL),
                    cache_invalidation.render_int($2), cache_invalidation.render_bool($3),
                    cache_invalidation.render_bool(NULL)",
        )
        .bind("a:b%c ü<>{}~")
        .bind(i64::MIN)
        .bind(false)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(
            row,
            (
                "a%3Ab%25c%20%C3%BC%3C%3E%7B%7D%7E".to_owned(),
                "~".to_owned(),
                i64::MIN.to_string(),
                "false".to_owned(),
                "~".to_owned()
            )
        );
    });
}

/// The keys of `p`, as the read side renders them.
fn rust_keys(p: &Prop) -> BTreeSet<String> {
    p.cache_keys()
        .into_iter()
        .map(|k| k.into_string())
        .collect()
}

#[test]
fn sqlite_keys_delivered_equal_cache_keys() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (db, pool, store) = rt.block_on(async {
        let db = TestSqlite::create("render").await;
        let admin = db.pool().await;
        sqlx::raw_sql(TABLE).execute(&admin).await.unwrap();
        admin.close().await;
        let store = RecordingStore::new(MemoryStore::new(10_000));
        // No relay: every key must come from the write itself, before it returns. WAL without an fsync
        // per commit, so that the cases run in a few seconds.
        let options = db
            .options()
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
        let pool = CachedSqlitePool::options()
            .registry(Registry::new([Prop::META]))
            .auto_install(true)
            .run_relay(false)
            .connect_with(options, store.clone())
            .await
            .unwrap();
        (db, pool, store)
    });
    let delivered_by =
        |write: sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>| {
            let before = store.calls().len();
            let result = rt.block_on(write.execute(&pool)).unwrap();
            assert_eq!(result.rows_affected(), 1);
            store
                .calls()
                .into_iter()
                .skip(before)
                .flatten()
                .collect::<BTreeSet<String>>()
        };

    let mut runner = TestRunner::new(Config {
        cases: 80,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&(prop_with(any_text), prop_with(any_text)), |(p, q)| {
            // Insert p.
            let keys = delivered_by(
                sqlx::query(
                    "INSERT INTO props (rowid, name, n, flag, label) VALUES (1, $1, $2, $3, $4)",
                )
                .bind(p.name.clone())
                .bind(p.n)
                .bind(p.flag)
                .bind(p.label.clone()),
            );
            prop_assert_eq!(&keys, &rust_keys(&p));
            // Update it to q: the old and the new keys.
            let keys = delivered_by(
                sqlx::query(
                    "UPDATE props SET name = $1, n = $2, flag = $3, label = $4 WHERE rowid = 1",
                )
                .bind(q.name.clone())
                .bind(q.n)
                .bind(q.flag)
                .bind(q.label.clone()),
            );
            let mut both = rust_keys(&p);
            both.extend(rust_keys(&q));
            prop_assert_eq!(&keys, &both);
            // Delete it: q's keys.
            let keys = delivered_by(sqlx::query("DELETE FROM props WHERE rowid = 1"));
            prop_assert_eq!(&keys, &rust_keys(&q));
            Ok(())
        })
        .unwrap();
    rt.block_on(pool.close());
    drop(db);
}
