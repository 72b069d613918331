//! A randomized freshness checker: readers and writers race over real PostgreSQL rows, and every read is
//! checked against the contract "no read returns a value older than a write whose commit returned before
//! the read began".
//!
//! Rows are `items(id, version)`; a write increments one row's version and returns the committed version
//! once the write is complete (committed *and* invalidated: what `CachedPool::execute` returning means). A
//! read returns the version it saw. The checker keeps, per row, the highest version whose write had returned;
//! a read that began after that and returns less is a violation.
//!
//! Readers and writers are plain async functions ([`Read`], [`Write`]), so the same checker runs against
//! `Cache::get_or_load`, hand-written cache-aside, and later `CachedPool` writes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;

/// A boxed future, for the pluggable functions.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Reads something about row `id` through the cache under test; returns every `(row, version)` it saw (one
/// pair for a plain row read, several for a value joined from several rows).
pub type Read = Arc<dyn Fn(i64) -> BoxFuture<Vec<(i64, i64)>> + Send + Sync>;

/// Writes row `id` (increments its version) and returns the committed version once the write is complete
/// (committed and invalidated).
pub type Write = Arc<dyn Fn(i64) -> BoxFuture<i64> + Send + Sync>;

/// The shape of a run.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Number of rows (fewer rows: more contention).
    pub rows: i64,
    /// Concurrent reader tasks.
    pub readers: usize,
    /// Concurrent writer tasks.
    pub writers: usize,
    /// How long to run.
    pub duration: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            rows: 4,
            readers: 8,
            writers: 2,
            duration: Duration::from_secs(2),
        }
    }
}

/// What a run found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Reads checked.
    pub reads: u64,
    /// Reads that returned a version (of any row they saw) older than a write that had returned before the
    /// read began.
    pub violations: u64,
    /// Writes completed.
    pub writes: u64,
}

/// Creates `items` with `rows` rows at version 0.
///
/// # Panics
///
/// When the statements fail.
pub async fn create_items(pool: &PgPool, rows: i64) {
    sqlx::query("CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL)")
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("CREATE TABLE items: {e}"));
    sqlx::query("INSERT INTO items SELECT g, 0 FROM generate_series(1, $1) g")
        .bind(rows)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("INSERT items: {e}"));
}

/// The version of row `id`.
///
/// # Errors
///
/// The query's error.
pub async fn select_version(pool: &PgPool, id: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT version FROM items WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
}

/// The versions of rows `ids`, read in one statement (one snapshot).
///
/// # Errors
///
/// The query's error.
pub async fn select_versions(pool: &PgPool, ids: &[i64]) -> Result<Vec<(i64, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT id, version FROM items WHERE id = ANY($1) ORDER BY id")
        .bind(ids)
        .fetch_all(pool)
        .await
}

/// Increments the version of row `id` (autocommit) and returns the new version.
///
/// # Panics
///
/// When the statement fails.
pub async fn bump_version(pool: &PgPool, id: i64) -> i64 {
    sqlx::query_scalar("UPDATE items SET version = version + 1 WHERE id = $1 RETURNING version")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("UPDATE items: {e}"))
}

/// A short random pause (none half of the time), to widen the windows between a loader's SELECT and its
/// fill the way a loaded database or a slow network does.
pub async fn jitter() {
    if fastrand::bool() {
        tokio::time::sleep(Duration::from_micros(fastrand::u64(100..2_000))).await;
    }
}

/// Runs readers and writers for `config.duration` and checks every read.
///
/// # Panics
///
/// When a reader or writer task panics.
pub async fn run(config: Config, read: Read, write: Write) -> Report {
    let rows = usize::try_from(config.rows).unwrap_or(0);
    let committed: Arc<Vec<AtomicI64>> = Arc::new((0..rows).map(|_| AtomicI64::new(0)).collect());
    let (reads, violations, writes) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let deadline = Instant::now() + config.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.writers {
        let (write, committed, writes) = (
            Arc::clone(&write),
            Arc::clone(&committed),
            Arc::clone(&writes),
        );
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let id = fastrand::i64(1..=config.rows);
                let version = write(id).await;
                // The write has returned: from now on no read may see an older version.
                committed[row(id)].fetch_max(version, Ordering::SeqCst);
                writes.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    for _ in 0..config.readers {
        let (read, committed) = (Arc::clone(&read), Arc::clone(&committed));
        let (reads, violations) = (Arc::clone(&reads), Arc::clone(&violations));
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let id = fastrand::i64(1..=config.rows);
                let floors: Vec<i64> = committed.iter().map(|c| c.load(Ordering::SeqCst)).collect();
                let seen = read(id).await;
                reads.fetch_add(1, Ordering::Relaxed);
                if seen.iter().any(|&(id, version)| version < floors[row(id)]) {
                    violations.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            panic!("checker task failed: {e}");
        }
    }
    Report {
        reads: reads.load(Ordering::Relaxed),
        violations: violations.load(Ordering::Relaxed),
        writes: writes.load(Ordering::Relaxed),
    }
}

fn row(id: i64) -> usize {
    usize::try_from(id - 1).unwrap_or(0)
}
