//! The rows of sustained and wide writes: write throughput at 1, 8 and 32 concurrent writers (distinct rows
//! and one hot row), the 10k-row `UPDATE` with 5 and 20 `depends` templates, what the outbox looks like
//! after the sustained runs, and Redis memory per cached entry against a plain `SET` of the same value.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::{CachedEntity, CachedPgPool, RedisStore, Registry};
use examples::{Report, Samples};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::{BoxError, CATEGORIES, CLIENTS, Env, Product, ROWS, UPDATE, UPDATE_PLAIN};

/// A product with 5 `depends` templates (each a per-category list).
#[derive(CachedEntity)]
#[cached_entity(
    table = "products_d5",
    key = "d5:product:<id>",
    depends = [
        "d5:a:<category_id>", "d5:b:<category_id>", "d5:c:<category_id>", "d5:d:<category_id>",
        "d5:e:<category_id>"
    ]
)]
pub(super) struct D5Product {
    id: i64,
    category_id: i64,
}

/// A product with 20 `depends` templates.
#[derive(CachedEntity)]
#[cached_entity(
    table = "products_d20",
    key = "d20:product:<id>",
    depends = [
        "d20:a:<category_id>", "d20:b:<category_id>", "d20:c:<category_id>", "d20:d:<category_id>",
        "d20:e:<category_id>", "d20:f:<category_id>", "d20:g:<category_id>", "d20:h:<category_id>",
        "d20:i:<category_id>", "d20:j:<category_id>", "d20:k:<category_id>", "d20:l:<category_id>",
        "d20:m:<category_id>", "d20:n:<category_id>", "d20:o:<category_id>", "d20:p:<category_id>",
        "d20:q:<category_id>", "d20:r:<category_id>", "d20:s:<category_id>", "d20:t:<category_id>"
    ]
)]
pub(super) struct D20Product {
    id: i64,
    category_id: i64,
}

/// The tables of the wide-`depends` rows (registered and plain twins), created before the pool installs.
pub(super) const TABLES: &str = "
CREATE TABLE products_d5 (LIKE products INCLUDING ALL);
INSERT INTO products_d5 SELECT * FROM products;
CREATE TABLE plain_products_d5 (LIKE products INCLUDING ALL);
INSERT INTO plain_products_d5 SELECT * FROM products;
CREATE TABLE products_d20 (LIKE products INCLUDING ALL);
INSERT INTO products_d20 SELECT * FROM products;
CREATE TABLE plain_products_d20 (LIKE products INCLUDING ALL);
INSERT INTO plain_products_d20 SELECT * FROM products;
";

/// The writer counts of the throughput rows.
const WRITERS: [usize; 3] = [1, 8, 32];

/// A variant of the throughput rows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Writer {
    Cached,
    ByHand,
    Raw,
}

impl Writer {
    const ALL: [Self; 3] = [Self::Cached, Self::ByHand, Self::Raw];

    fn name(self) -> &'static str {
        match self {
            Self::Cached => "CachedPool",
            Self::ByHand => "hand-written UPDATE + DEL (baseline)",
            Self::Raw => "raw sqlx, no cache",
        }
    }
}

/// What every writer task shares.
#[derive(Clone)]
struct Writers {
    pool: CachedPgPool,
    raw: PgPool,
    redis: redis::aio::MultiplexedConnection,
    prefix: String,
}

impl Writers {
    /// One write of product `id` by `variant`.
    async fn write(&mut self, variant: Writer, id: i64) -> Result<(), BoxError> {
        match variant {
            Writer::Cached => {
                sqlx::query(UPDATE).bind(id).execute(&self.pool).await?;
            }
            Writer::ByHand => {
                sqlx::query(UPDATE_PLAIN)
                    .bind(id)
                    .execute(&self.raw)
                    .await?;
                let mut pipe = redis::pipe();
                pipe.del(format!("{}product:{id}", self.prefix)).ignore();
                pipe.del(format!(
                    "{}category:{}:products",
                    self.prefix,
                    id % CATEGORIES
                ))
                .ignore();
                pipe.query_async::<()>(&mut self.redis).await?;
            }
            Writer::Raw => {
                sqlx::query(UPDATE_PLAIN)
                    .bind(id)
                    .execute(&self.raw)
                    .await?;
            }
        }
        Ok(())
    }

    /// `writers` tasks writing for `time` (each its own rows, or all of them row 1 with `hot`): the
    /// latencies of every write.
    async fn run(
        &self,
        variant: Writer,
        writers: usize,
        hot: bool,
        time: Duration,
    ) -> Result<Samples, BoxError> {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let (mut this, stop) = (self.clone(), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut samples = Samples::default();
                    let mut i = 0_i64;
                    while !stop.load(Ordering::Relaxed) {
                        // Distinct rows: writer `w` owns the ids ≡ w (mod writers).
                        let id = if hot {
                            1
                        } else {
                            1 + (w as i64 + i * writers as i64) % ROWS
                        };
                        let start = Instant::now();
                        this.write(variant, id).await?;
                        samples.push(start.elapsed());
                        i += 1;
                    }
                    Ok::<_, BoxError>(samples)
                })
            })
            .collect();
        tokio::time::sleep(time).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Samples::default();
        for task in tasks {
            all.merge(&task.await??);
        }
        Ok(all)
    }
}

/// Write throughput (ops/s over the whole run, each variant in 3 alternating slices) and latency at 1, 8
/// and 32 writers, on distinct rows and on one hot row; then the outbox after these sustained writes.
pub(super) async fn throughput(env: &mut Env, report: &mut Report) -> Result<(), BoxError> {
    let writers = Writers {
        pool: env.pool.clone(),
        raw: env.raw.clone(),
        redis: env.redis()?,
        prefix: env.prefix.clone(),
    };
    let slice = if env.sizes.quick() {
        Duration::from_millis(400)
    } else {
        Duration::from_secs(2)
    };
    for hot in [false, true] {
        for n in WRITERS {
            let mut samples: [Samples; 3] = Default::default();
            for round in 0..3 {
                for k in 0..3 {
                    let v = (round + k) % 3;
                    samples[v].merge(&writers.run(Writer::ALL[v], n, hot, slice).await?);
                }
            }
            let rows = if hot { "one hot row" } else { "distinct rows" };
            let group = format!(
                "write throughput: {n} writer{}, {rows}",
                if n == 1 { "" } else { "s" }
            );
            let seconds = 3.0 * slice.as_secs_f64();
            let ops = |s: &Samples| s.len() as f64 / seconds;
            let baseline = ops(&samples[1]);
            for (variant, s) in Writer::ALL.iter().zip(&samples) {
                report.value_vs(
                    &group,
                    &format!("{}: throughput", variant.name()),
                    ops(s),
                    "ops/s",
                    baseline,
                );
            }
            let median = samples[1].stats().median_us;
            for (variant, s) in Writer::ALL.iter().zip(&samples) {
                report.latency(
                    &group,
                    &format!("{}: latency", variant.name()),
                    s.stats(),
                    Some(median),
                );
            }
        }
    }
    outbox_after(env, report).await
}

/// The outbox after the sustained runs: rows left, the table's size, dead tuples, autovacuum runs.
async fn outbox_after(env: &Env, report: &mut Report) -> Result<(), BoxError> {
    // Let the writers' background deletes (every 50 ms) finish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rows, bytes, dead, vacuums): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM cache_invalidation.outbox),
                pg_total_relation_size('cache_invalidation.outbox'),
                coalesce(s.n_dead_tup, 0), coalesce(s.autovacuum_count, 0)
         FROM pg_stat_user_tables s WHERE s.relid = 'cache_invalidation.outbox'::regclass",
    )
    .fetch_one(&env.raw)
    .await?;
    let group = "outbox after the write-throughput runs";
    report.value(group, "rows left", rows as f64, "rows");
    report.value(group, "table + indexes", bytes as f64 / 1024.0, "KiB");
    report.value(
        group,
        "dead tuples (pg_stat_user_tables)",
        dead as f64,
        "tuples",
    );
    report.value(
        group,
        "autovacuum runs on the outbox",
        vacuums as f64,
        "runs",
    );
    // The replay window holds every delivery of the run (it is shorter than the window's 5 minutes).
    let (deliveries, keys, bytes): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(cardinality(keys)), 0),
                pg_total_relation_size('cache_invalidation.replay')
         FROM cache_invalidation.replay",
    )
    .fetch_one(&env.raw)
    .await?;
    report.value(
        group,
        "replay window: deliveries held",
        deliveries as f64,
        "rows",
    );
    report.value(group, "replay window: keys held", keys as f64, "keys");
    report.value(
        group,
        "replay window: table + indexes",
        bytes as f64 / 1024.0,
        "KiB",
    );
    if keys > 0 {
        report.value(
            group,
            "replay window: bytes per key held",
            bytes as f64 / keys as f64,
            "bytes",
        );
    }
    Ok(())
}

/// The 10k-row `UPDATE` of a table whose entity has 5 and 20 `depends` templates (10,000 product keys
/// and 100 lists per template): `CachedPool` against the hand-written `UPDATE … RETURNING` + `DEL` of the
/// same keys and the raw `UPDATE`.
pub(super) async fn wide_depends(env: &mut Env, report: &mut Report) -> Result<(), BoxError> {
    for (templates, prefix) in [(5, "d5"), (20, "d20")] {
        let update = format!(
            "UPDATE products_{prefix} SET price_cents = price_cents + 1, version = version + 1"
        );
        let plain = format!(
            "UPDATE plain_products_{prefix} SET price_cents = price_cents + 1, version = version + 1"
        );
        let returning = format!("{plain} RETURNING id, category_id");
        let mut s: [Samples; 3] = Default::default();
        for i in 0..env.sizes.bulk {
            for v in 0..3 {
                let start = Instant::now();
                match (i + v) % 3 {
                    0 => {
                        sqlx::query(sqlx::AssertSqlSafe(update.clone()))
                            .execute(&env.pool)
                            .await?;
                    }
                    1 => {
                        let rows: Vec<(i64, i64)> =
                            sqlx::query_as(sqlx::AssertSqlSafe(returning.clone()))
                                .fetch_all(&env.raw)
                                .await?;
                        let mut keys: Vec<String> = rows
                            .iter()
                            .map(|(id, _)| format!("{}{prefix}:product:{id}", env.prefix))
                            .collect();
                        for t in 0..templates {
                            let letter = char::from(b'a' + t);
                            keys.extend(
                                (0..CATEGORIES)
                                    .map(|c| format!("{}{prefix}:{letter}:{c}", env.prefix)),
                            );
                        }
                        env.invalidate_by_hand(&keys).await?;
                    }
                    _ => {
                        sqlx::query(sqlx::AssertSqlSafe(plain.clone()))
                            .execute(&env.raw)
                            .await?;
                    }
                }
                s[(i + v) % 3].push(start.elapsed());
            }
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "VACUUM products_{prefix}, plain_products_{prefix}"
            )))
            .execute(&env.raw)
            .await?;
        }
        env.write_rows(report, &format!("10k-row UPDATE, {templates} depends"), &s);
    }
    Ok(())
}

/// Redis memory per cached entry: `entries` products filled through `get_or_load` (the value slot with
/// its envelope, the key's tag token, shared namespace tokens) against a plain `SET … EX` of the same
/// MessagePack bytes, measured as `used_memory` before and after, per entry.
pub(super) async fn memory(
    env: &Env,
    url: &str,
    redis_url: &str,
    report: &mut Report,
) -> Result<(), BoxError> {
    let entries: i64 = if env.sizes.quick() { 10_000 } else { 100_000 };
    let prefix = format!("{}mem:", env.prefix);
    let store = RedisStore::connect(redis_url, prefix.clone()).await?;
    let pool = CachedPgPool::options()
        .registry(Registry::new([Product::META]))
        .pool_options(PgPoolOptions::new().max_connections(2))
        .run_relay(false)
        .connect(url, store)
        .await?;
    let mut redis = env.redis()?;
    let used = |mut redis: redis::aio::MultiplexedConnection| async move {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut redis)
            .await?;
        let used = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or("INFO memory without used_memory")?;
        Ok::<_, BoxError>(used)
    };
    let product = |id: i64| Product {
        id,
        category_id: id % CATEGORIES,
        name: format!("Product number {id}"),
        price_cents: id,
        version: 0,
    };
    let before = used(redis.clone()).await?;
    let chunks: Vec<_> = (0..CLIENTS as i64)
        .map(|c| {
            let cache = pool.cache().clone();
            tokio::spawn(async move {
                let mut id = 1 + c;
                while id <= entries {
                    let value = product(id);
                    cache
                        .get_or_load(cache_runtime::key!("product:<id>", id), || async move {
                            Ok::<_, std::convert::Infallible>(Some(value))
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                    id += CLIENTS as i64;
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    for chunk in chunks {
        chunk.await??;
    }
    let ours = (used(redis.clone()).await? - before) / entries as f64;
    let plain_prefix = format!("{}plainmem:", env.prefix);
    let before = used(redis.clone()).await?;
    for start in (1..=entries).step_by(1000) {
        let mut pipe = redis::pipe();
        for id in start..(start + 1000).min(entries + 1) {
            let bytes = rmp_serde::to_vec(&Some(product(id)))?;
            pipe.set_ex(format!("{plain_prefix}product:{id}"), bytes, 600)
                .ignore();
        }
        pipe.query_async::<()>(&mut redis).await?;
    }
    let plain = (used(redis.clone()).await? - before) / entries as f64;
    let group = format!("Redis memory per cached entry ({entries} entries, used_memory delta)");
    report.value_vs(
        &group,
        "plain SET … EX of the MessagePack value (baseline)",
        plain,
        "bytes",
        plain,
    );
    report.value_vs(
        &group,
        "get_or_load fill (value slot + envelope + tag token)",
        ours,
        "bytes",
        plain,
    );
    pool.close().await;
    examples::delete_prefix(redis_url, &prefix).await?;
    Ok(examples::delete_prefix(redis_url, &plain_prefix).await?)
}
