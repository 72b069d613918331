//! Write overhead of [`CachedPool`] against a hand-written `UPDATE` + `DEL` and against raw sqlx.
//!
//! Creates a database of its own on `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! with two identical tables of 10,000 products: `products` (registered, with the capture triggers) and
//! `plain_products` (no triggers), and uses the Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`) under
//! a key prefix of its own. In one run, it times:
//!
//! - a single-row autocommit `UPDATE`: through `CachedPool`; raw sqlx `UPDATE` + Redis `DEL` of the two keys
//!   (hand-written invalidation); raw sqlx `UPDATE` alone (no cache);
//! - a transaction of 5 single-row `UPDATE`s, the same three ways;
//! - a 10k-row `UPDATE`, the same three ways (the hand-written one deletes 10,100 keys in one pipeline);
//! - foreign writes (a plain `PgPool` on the registered table): commit to key gone, via the relay, p50/p99.
//!
//! Prints medians and writes JSON to the first argument (default `target/write_bench.json`).
//!
//! Run: `cargo run --release -p examples --bin write_bench`.

use std::time::{Duration, Instant};

use cache_runtime::{CachedEntity, CachedPool, RedisStore, Registry};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection, PgPool};

/// The benchmarked entity.
#[derive(CachedEntity)]
#[cached_entity(table = "products", key = "product:<id>", depends = ["category:<category_id>:products"])]
struct Product {
    id: i64,
    category_id: i64,
}

const ROWS: i64 = 10_000;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/write_bench.json".to_owned());
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let name = format!("cache_write_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await?;
    let result = run(&database_url(&admin_url, &name), &redis_url).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    let (rows, foreign) = result?;

    println!(
        "{:<28} {:>16} {:>16} {:>16} {:>10} {:>10}",
        "operation", "CachedPool", "UPDATE + DEL", "raw sqlx", "vs DEL", "vs raw"
    );
    for r in &rows {
        println!(
            "{:<28} {:>13.1} µs {:>13.1} µs {:>13.1} µs {:>9.2}x {:>9.2}x",
            r.name,
            us(r.cached),
            us(r.manual),
            us(r.raw),
            r.cached.as_secs_f64() / r.manual.as_secs_f64(),
            r.cached.as_secs_f64() / r.raw.as_secs_f64(),
        );
    }
    let json = format!(
        "{{\n  \"unit\": \"microseconds (median)\",\n  \"foreign_write_to_key_gone\": {{\"writes\": {}, \
         \"p50\": {:.1}, \"p99\": {:.1}, \"max\": {:.1}}},\n  \"results\": [\n{}\n  ]\n}}\n",
        foreign.writes,
        us(foreign.p50),
        us(foreign.p99),
        us(foreign.max),
        rows.iter()
            .map(|r| format!(
                "    {{\"operation\": \"{}\", \"iterations\": {}, \"cached_pool\": {:.1}, \"update_plus_del\": {:.1}, \
                 \"raw_sqlx\": {:.1}}}",
                r.name,
                r.iterations,
                us(r.cached),
                us(r.manual),
                us(r.raw)
            ))
            .collect::<Vec<_>>()
            .join(",\n")
    );
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, json)?;
    println!("wrote {out}");
    Ok(())
}

struct Row {
    name: &'static str,
    iterations: usize,
    cached: Duration,
    manual: Duration,
    raw: Duration,
}

async fn run(url: &str, redis_url: &str) -> Result<(Vec<Row>, Foreign), BoxError> {
    let raw = PgPoolOptions::new().max_connections(2).connect(url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, price_cents bigint NOT NULL);
         INSERT INTO products SELECT i, i % 100, i FROM generate_series(1, {ROWS}) AS i;
         CREATE TABLE plain_products (LIKE products INCLUDING ALL);
         INSERT INTO plain_products SELECT * FROM products;"
    )))
    .execute(&raw)
    .await?;
    let prefix = format!("write_bench_{}:", std::process::id());
    let store = RedisStore::connect(redis_url, prefix.clone()).await?;
    let pool = CachedPool::options()
        .registry(Registry::new([Product::META]))
        .install_schema(true)
        .pool_options(PgPoolOptions::new().max_connections(2))
        .connect(url, store)
        .await?;
    let redis = redis::Client::open(redis_url)?;
    let mut redis = redis.get_multiplexed_async_connection().await?;
    let mut rows = Vec::new();

    // Single-row autocommit UPDATE.
    let n = 2000;
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..n {
        let id = 1 + (i as i64 * 37) % ROWS;
        let start = Instant::now();
        sqlx::query("UPDATE products SET price_cents = price_cents + 1 WHERE id = $1")
            .bind(id)
            .execute(&pool)
            .await?;
        times[0].push(start.elapsed());

        let start = Instant::now();
        sqlx::query("UPDATE plain_products SET price_cents = price_cents + 1 WHERE id = $1")
            .bind(id)
            .execute(&raw)
            .await?;
        redis::pipe()
            .del(format!("{prefix}product:{id}"))
            .ignore()
            .del(format!("{prefix}category:{}:products", id % 100))
            .ignore()
            .query_async::<()>(&mut redis)
            .await?;
        times[1].push(start.elapsed());

        let start = Instant::now();
        sqlx::query("UPDATE plain_products SET price_cents = price_cents + 1 WHERE id = $1")
            .bind(id)
            .execute(&raw)
            .await?;
        times[2].push(start.elapsed());
    }
    rows.push(row("1-row autocommit UPDATE", n, times));

    // A transaction of 5 single-row UPDATEs.
    let n = 500;
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..n {
        let ids: Vec<i64> = (0..5)
            .map(|k| 1 + (i as i64 * 53 + k * 997) % ROWS)
            .collect();
        let start = Instant::now();
        let mut tx = pool.begin().await?;
        for id in &ids {
            sqlx::query("UPDATE products SET price_cents = price_cents + 1 WHERE id = $1")
                .bind(id)
                .execute(&mut tx)
                .await?;
        }
        tx.commit().await?;
        times[0].push(start.elapsed());

        let start = Instant::now();
        let mut tx = raw.begin().await?;
        for id in &ids {
            sqlx::query("UPDATE plain_products SET price_cents = price_cents + 1 WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.del(format!("{prefix}product:{id}")).ignore();
            pipe.del(format!("{prefix}category:{}:products", id % 100))
                .ignore();
        }
        pipe.query_async::<()>(&mut redis).await?;
        times[1].push(start.elapsed());

        let start = Instant::now();
        plain_tx(&raw, &ids).await?;
        times[2].push(start.elapsed());
    }
    rows.push(row("5-UPDATE transaction", n, times));

    // 10k-row UPDATE.
    let n = 7;
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..n {
        let start = Instant::now();
        sqlx::query("UPDATE products SET price_cents = price_cents + 1")
            .execute(&pool)
            .await?;
        times[0].push(start.elapsed());

        let start = Instant::now();
        let ids: Vec<(i64, i64)> = sqlx::query_as(
            "UPDATE plain_products SET price_cents = price_cents + 1 RETURNING id, category_id",
        )
        .fetch_all(&raw)
        .await?;
        let mut pipe = redis::pipe();
        for (id, _) in &ids {
            pipe.del(format!("{prefix}product:{id}")).ignore();
        }
        for c in 0..100 {
            pipe.del(format!("{prefix}category:{c}:products")).ignore();
        }
        pipe.query_async::<()>(&mut redis).await?;
        times[1].push(start.elapsed());

        let start = Instant::now();
        sqlx::query("UPDATE plain_products SET price_cents = price_cents + 1")
            .execute(&raw)
            .await?;
        times[2].push(start.elapsed());
        sqlx::raw_sql("VACUUM products, plain_products")
            .execute(&raw)
            .await?;
    }
    rows.push(row("10k-row autocommit UPDATE", n, times));

    // Foreign writes (a plain pool on the registered table): commit -> key gone, through the relay.
    let n = 200;
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let id = 1 + (i as i64 * 13) % ROWS;
        let key = format!("{prefix}product:{id}");
        redis::cmd("SET")
            .arg(&key)
            .arg("cached")
            .query_async::<()>(&mut redis)
            .await?;
        sqlx::query("UPDATE products SET price_cents = price_cents + 1 WHERE id = $1")
            .bind(id)
            .execute(&raw)
            .await?;
        let committed = Instant::now();
        loop {
            let exists: bool = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut redis)
                .await?;
            if !exists {
                break;
            }
            if committed.elapsed() > Duration::from_secs(5) {
                return Err(format!("foreign write to {key} not invalidated within 5 s").into());
            }
        }
        latencies.push(committed.elapsed());
    }
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "foreign write (plain PgPool) -> key gone, {n} writes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(50).as_secs_f64() * 1e3,
        pct(99).as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3
    );
    let foreign = Foreign {
        writes: n,
        p50: pct(50),
        p99: pct(99),
        max: latencies[latencies.len() - 1],
    };
    pool.close().await;
    Ok((rows, foreign))
}

/// Latency of foreign writes, commit to key gone.
struct Foreign {
    writes: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

async fn plain_tx(raw: &PgPool, ids: &[i64]) -> Result<(), sqlx::Error> {
    let mut tx = raw.begin().await?;
    for id in ids {
        sqlx::query("UPDATE plain_products SET price_cents = price_cents + 1 WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

fn row(name: &'static str, iterations: usize, mut times: [Vec<Duration>; 3]) -> Row {
    for t in &mut times {
        t.sort();
    }
    let median = |t: &Vec<Duration>| t[t.len() / 2];
    Row {
        name,
        iterations,
        cached: median(&times[0]),
        manual: median(&times[1]),
        raw: median(&times[2]),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `url` with its database replaced.
fn database_url(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}
