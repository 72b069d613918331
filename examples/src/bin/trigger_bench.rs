//! Statement-level (transition tables) vs row-level capture triggers, on a 10k-row `UPDATE`.
//!
//! Creates a database of its own on `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! loads 10,000 products, and times the same `UPDATE` of every row without triggers, with statement triggers
//! and with row triggers (median of several runs, each in its own transaction, outbox emptied in between).
//! Prints a table and writes JSON (the shared `examples::Report`) to the path given as first argument (default
//! `target/trigger_bench.json`).
//!
//! Run: `cargo run --release -p examples --bin trigger_bench`.

use std::time::{Duration, Instant};

use cache_runtime::backend::TriggerMode;
use cache_runtime::backend::postgres::PgSchema;
use cache_runtime::{CachedEntity, Registry};
use examples::{Report, database_url};
use sqlx::{Connection as _, PgConnection};

/// The benchmarked entity.
#[derive(CachedEntity)]
#[cached_entity(table = "products", key = "product:<id>", depends = ["category:<category_id>:products"])]
struct Product {
    id: i64,
    category_id: i64,
}

const ROWS: i64 = 10_000;
const RUNS: usize = 7;
const SINGLE_RUNS: usize = 300;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Measure {
    variant: &'static str,
    bulk_median: Duration,
    bulk_min: Duration,
    single_median: Duration,
    outbox_rows: i64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/trigger_bench.json".to_owned());
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let name = format!("cache_trigger_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await?;
    let result = run(&database_url(&admin_url, &name)).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    let measures = result?;

    let mut report = Report::default();
    report.fact("rows", ROWS);
    report.fact("bulk runs", RUNS);
    report.fact("single-row runs", SINGLE_RUNS);
    let none = measures
        .iter()
        .find(|m| m.variant == "none")
        .ok_or("no baseline measure")?;
    let (bulk_base, single_base) = (ms(none.bulk_median), us(none.single_median));
    for m in &measures {
        let group = format!("triggers: {}", m.variant);
        report.value_vs(
            &group,
            "10k-row UPDATE, median",
            ms(m.bulk_median),
            "ms",
            bulk_base,
        );
        report.value(&group, "10k-row UPDATE, min", ms(m.bulk_min), "ms");
        report.value_vs(
            &group,
            "1-row UPDATE, median",
            us(m.single_median),
            "µs",
            single_base,
        );
        report.value(
            &group,
            "outbox rows per 10k-row UPDATE",
            m.outbox_rows as f64,
            "rows",
        );
    }
    report.finish(&out)?;
    Ok(())
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn run(url: &str) -> Result<Vec<Measure>, BoxError> {
    let mut conn = PgConnection::connect(url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
                                price_cents bigint NOT NULL);
         INSERT INTO products SELECT i, i % 100, 'product ' || i, i FROM generate_series(1, {ROWS}) AS i;"
    )))
    .execute(&mut conn)
    .await?;
    sqlx::raw_sql("VACUUM ANALYZE products")
        .execute(&mut conn)
        .await?;
    let registry = Registry::new([Product::META]);
    let mut measures = Vec::new();
    for (variant, mode) in [
        ("none", None),
        ("statement", Some(TriggerMode::Statement)),
        ("row", Some(TriggerMode::Row)),
    ] {
        if let Some(mode) = mode {
            PgSchema::new(&registry)
                .trigger_mode(mode)
                .install(&mut conn)
                .await?;
        }
        let mut bulk = Vec::new();
        let mut outbox_rows = 0;
        for _ in 0..RUNS {
            let start = Instant::now();
            let mut tx = conn.begin().await?;
            sqlx::query("UPDATE products SET price_cents = price_cents + 1")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            bulk.push(start.elapsed());
            if mode.is_some() {
                outbox_rows = sqlx::query_scalar("SELECT count(*) FROM cache_invalidation.outbox")
                    .fetch_one(&mut conn)
                    .await?;
                sqlx::query("TRUNCATE cache_invalidation.outbox")
                    .execute(&mut conn)
                    .await?;
            }
            sqlx::raw_sql("VACUUM products").execute(&mut conn).await?;
        }
        let mut single = Vec::new();
        for i in 0..SINGLE_RUNS {
            let start = Instant::now();
            sqlx::query("UPDATE products SET price_cents = price_cents + 1 WHERE id = $1")
                .bind(1 + (i as i64 * 31) % ROWS)
                .execute(&mut conn)
                .await?;
            single.push(start.elapsed());
        }
        if mode.is_some() {
            sqlx::query("TRUNCATE cache_invalidation.outbox")
                .execute(&mut conn)
                .await?;
        }
        bulk.sort();
        single.sort();
        measures.push(Measure {
            variant,
            bulk_median: bulk[bulk.len() / 2],
            bulk_min: bulk[0],
            single_median: single[single.len() / 2],
            outbox_rows,
        });
    }
    Ok(measures)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
