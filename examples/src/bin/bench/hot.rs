//! The hot-key and SLI rows: a read-heavy workload on one hot key written every 100 ms, with delete on
//! write against `refresh` (miss rate, read latency), and the cost of the consistency sampler at 1%
//! (hit latency with and without it). Each on pools of their own, on the benchmark's database and a
//! sub-prefix of its Redis prefix.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::cache::Sampling;
use cache_runtime::{CachedEntity, CachedPgPool, KeyedEntity, RedisStore, Registry};
use examples::{Report, Samples};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, Postgres};

use super::BoxError;

/// Deleted on write (the default).
#[derive(Debug, Clone, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "hk_deleted", key = "hk_deleted:<id>", ttl = "10m")]
pub(crate) struct Deleted {
    id: i64,
    version: i64,
    payload: String,
}

/// Refreshed after writes while read within the last minute.
#[derive(Debug, Clone, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(
    table = "hk_refreshed",
    key = "hk_refreshed:<id>",
    ttl = "10m",
    refresh = "1m"
)]
pub(crate) struct Refreshed {
    id: i64,
    version: i64,
    payload: String,
}

/// The section's tables: 1,000 rows each.
pub(crate) const TABLES: &str = "
    CREATE TABLE hk_deleted (id bigint PRIMARY KEY, version bigint NOT NULL, payload text NOT NULL);
    INSERT INTO hk_deleted SELECT i, 0, repeat('x', 200) FROM generate_series(1, 1000) AS i;
    CREATE TABLE hk_refreshed (LIKE hk_deleted INCLUDING ALL);
    INSERT INTO hk_refreshed SELECT * FROM hk_deleted;";

/// Concurrent readers of the hot key.
const READERS: usize = 8;

/// A pool for the section's entities, sampling `sampling` of its hits.
async fn pool(
    url: &str,
    redis_url: &str,
    prefix: &str,
    sampling: Option<Sampling>,
) -> Result<CachedPgPool, BoxError> {
    let store = RedisStore::connect(redis_url, format!("{prefix}hot:")).await?;
    let mut options = CachedPgPool::options()
        .registry(Registry::new([Deleted::META, Refreshed::META]))
        .auto_install(true);
    if let Some(sampling) = sampling {
        options = options.sampling(sampling);
    }
    Ok(options.connect(url, store).await?)
}

/// What one run of the hot-key workload measured.
#[derive(Default)]
struct Run {
    reads: Samples,
    /// Reads not answered by a valid store entry (reads minus the cache's hits).
    misses: u64,
    writes: u64,
}

/// `READERS` tasks read row 1 of `T` through `pool.get` for `length` (each read `pace` after the
/// previous one, or back to back) while its row is written through the pool every 100 ms.
async fn workload<T>(
    pool: &CachedPgPool,
    table: &str,
    length: Duration,
    pace: Option<Duration>,
) -> Result<Run, BoxError>
where
    T: KeyedEntity<Postgres, Id = i64>
        + for<'r> FromRow<'r, sqlx::postgres::PgRow>
        + Serialize
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    pool.get::<T>(&1).await?;
    let before = pool.cache().stats();
    let deadline = Instant::now() + length;
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let pool = pool.clone();
        readers.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            while Instant::now() < deadline {
                samples.time(pool.get::<T>(&1)).await?;
                if let Some(pace) = pace {
                    tokio::time::sleep(pace).await;
                }
            }
            Ok::<_, Arc<sqlx::Error>>(samples)
        }));
    }
    let update = format!("UPDATE {table} SET version = version + 1 WHERE id = 1");
    let mut writes = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < deadline {
        tick.tick().await;
        sqlx::query(sqlx::AssertSqlSafe(update.clone()))
            .execute(pool)
            .await?;
        writes += 1;
    }
    let mut run = Run {
        writes,
        ..Run::default()
    };
    for reader in readers {
        run.reads.merge(&reader.await??);
    }
    let hits = pool.cache().stats().hits - before.hits;
    run.misses = (run.reads.len() as u64).saturating_sub(hits);
    Ok(run)
}

/// The hot-key rows: delete on write against `refresh`, in alternating rounds; readers back to back, and
/// paced (a read every 2 ms each).
pub(crate) async fn hot_key(
    url: &str,
    redis_url: &str,
    prefix: &str,
    quick: bool,
    report: &mut Report,
) -> Result<(), BoxError> {
    let pool = pool(url, redis_url, prefix, None).await?;
    let length = Duration::from_secs(if quick { 2 } else { 5 });
    hot_key_rows(&pool, length, None, report).await?;
    hot_key_rows(&pool, length, Some(Duration::from_millis(2)), report).await?;
    pool.close().await;
    Ok(())
}

/// One shape of the hot-key workload: both variants, its rows.
async fn hot_key_rows(
    pool: &CachedPgPool,
    length: Duration,
    pace: Option<Duration>,
    report: &mut Report,
) -> Result<(), BoxError> {
    let (mut deleted, mut refreshed) = (Run::default(), Run::default());
    for round in 0..2 {
        let mut pair = [None, None];
        for side in [round % 2, 1 - round % 2] {
            pair[side] = Some(if side == 0 {
                workload::<Deleted>(pool, "hk_deleted", length, pace).await?
            } else {
                workload::<Refreshed>(pool, "hk_refreshed", length, pace).await?
            });
        }
        for (total, run) in [&mut deleted, &mut refreshed].into_iter().zip(pair) {
            let run = run.ok_or("a run is missing")?;
            total.reads.merge(&run.reads);
            total.misses += run.misses;
            total.writes += run.writes;
        }
    }
    let readers = match pace {
        None => format!("{READERS} readers back to back"),
        Some(pace) => format!(
            "{READERS} readers, a read every {} ms each",
            pace.as_millis()
        ),
    };
    let group = format!("hot key written every 100 ms, {readers}: pool.get");
    let base = deleted.reads.stats();
    report.latency(
        &group,
        "delete on write (baseline)",
        base,
        Some(base.median_us),
    );
    report.latency(
        &group,
        "refresh = \"1m\"",
        refreshed.reads.stats(),
        Some(base.median_us),
    );
    // Per write: the reads that found the key empty after it (a miss, or a wait for the load in flight).
    let per_write = |run: &Run| run.misses as f64 / run.writes.max(1) as f64;
    let group = format!("hot key, {readers}: reads not answered by the store");
    report.value(
        &group,
        "delete on write, per write",
        per_write(&deleted),
        "reads",
    );
    let (base, refreshed_per_write) = (per_write(&deleted), per_write(&refreshed));
    report.value_vs(
        &group,
        "refresh, per write",
        refreshed_per_write,
        "reads",
        base,
    );
    let share = |run: &Run| 1e6 * run.misses as f64 / run.reads.len().max(1) as f64;
    report.value(
        &group,
        "delete on write, per million reads",
        share(&deleted),
        "reads",
    );
    report.value_vs(
        &group,
        "refresh, per million reads",
        share(&refreshed),
        "reads",
        share(&deleted),
    );
    report.value(
        &group,
        "writes (each variant)",
        deleted.writes as f64,
        "writes",
    );
    Ok(())
}

/// The sampler's cost: `pool.get` hits with sampling at 1% against none, alternating in blocks.
pub(crate) async fn sli_overhead(
    url: &str,
    redis_url: &str,
    prefix: &str,
    quick: bool,
    report: &mut Report,
) -> Result<(), BoxError> {
    let plain = pool(url, redis_url, prefix, None).await?;
    let sampled = pool(url, redis_url, prefix, Some(Sampling::new(0.01))).await?;
    for id in 1..=1000 {
        plain.get::<Deleted>(&id).await?;
    }
    let blocks = if quick { 10 } else { 40 };
    let (mut without, mut with) = (Samples::default(), Samples::default());
    for block in 0..blocks {
        for side in [block % 2, 1 - block % 2] {
            let (pool, samples) = if side == 0 {
                (&plain, &mut without)
            } else {
                (&sampled, &mut with)
            };
            for id in 1..=500 {
                samples.time(pool.get::<Deleted>(&id)).await?;
            }
        }
    }
    // Let the last samples be checked.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let checked = sampled.cache().stats();
    let group = "consistency SLI: pool.get hit, Redis";
    let base = without.stats();
    report.latency(group, "no sampling (baseline)", base, Some(base.median_us));
    report.latency(
        group,
        "sampling 1%, Δ = 1 s",
        with.stats(),
        Some(base.median_us),
    );
    report.value(group, "samples checked", checked.samples as f64, "samples");
    report.value(
        group,
        "inconsistent",
        checked.inconsistent as f64,
        "samples",
    );
    plain.close().await;
    sampled.close().await;
    Ok(())
}
