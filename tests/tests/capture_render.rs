//! Property: keys rendered by the database triggers equal, byte for byte, the keys rendered in Rust.
//!
//! Random rows (unicode, separators, quotes, backslashes, `%`, very long text, any integer, booleans,
//! `NULL`s) are inserted through the real statement-level and row-level triggers; the keys they write to the
//! outbox are compared with `CachedEntity::cache_keys` and `Template::render`.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeSet;

use cache_runtime::{CachedEntity, KeyValue, Registry, Schema, TriggerMode};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sqlx::{Connection as _, PgConnection};
use tests::TestDb;

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

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9_.~%:/ '\"\\\\<>{}-]{0,24}",
        "[a-z]{0,8}",
        proptest::collection::vec(any::<char>(), 300..3000)
            .prop_map(|chars| chars.into_iter().collect::<String>()),
    ]
    // PostgreSQL text cannot hold NUL.
    .prop_map(|s| s.replace('\0', ""))
}

fn prop() -> impl Strategy<Value = Prop> {
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
            Schema::new(&registry)
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
