//! A randomized freshness checker: readers and writers race over real database rows (PostgreSQL or SQLite,
//! see [`Items`]), and every read is checked against the contract "no read returns a value older than a
//! write whose commit returned before the read began".
//!
//! Rows are `items(id, version)`; a write increments one row's version and returns the committed version
//! once the write is complete (committed *and* invalidated: what `CachedPool::execute` returning means). A
//! read returns the version it saw. The checker keeps, per row, the highest version whose write had returned;
//! a read that began after that and returns less is a violation.
//!
//! Writes that are delivered asynchronously (another client's, delivered by a relay) get a bound instead:
//! with [`Config::grace`] a read is a violation only if it began more than `grace` after the write returned;
//! reads that lag within the grace are counted apart ([`Report::lagging`]), which shows the window was real.
//!
//! Readers and writers are plain async functions ([`Read`], [`Write`]), so the same checker runs against
//! `Cache::get_or_load`, hand-written cache-aside, and later `CachedPool` writes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::{PgPool, SqlitePool};

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
    /// How long after a write returned its version becomes the floor of later reads (zero: at once, the
    /// contract of synchronous invalidation; a relay's sweep bound for writes of other clients).
    pub grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            rows: 4,
            readers: 8,
            writers: 2,
            duration: Duration::from_secs(2),
            grace: Duration::ZERO,
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
    /// Reads that returned a version older than a write that had returned before the read began, but less
    /// than [`Config::grace`] before: allowed lag (always 0 with no grace).
    pub lagging: u64,
}

/// The checker's table `items(id, version)` on one backend: the statements differ (PostgreSQL arrays and
/// `generate_series`, SQLite JSON and recursive CTEs); the contract does not.
pub trait Items: Clone + Send + Sync + 'static {
    /// Creates `items` with `rows` rows at version 0.
    fn create_items(&self, rows: i64) -> impl Future<Output = ()> + Send;
    /// The version of row `id`.
    fn select_version(&self, id: i64) -> impl Future<Output = Result<i64, sqlx::Error>> + Send;
    /// The versions of rows `ids`, read in one statement (one snapshot), ordered by id.
    fn select_versions(
        &self,
        ids: &[i64],
    ) -> impl Future<Output = Result<Vec<(i64, i64)>, sqlx::Error>> + Send;
    /// Increments the version of row `id` (autocommit) and returns the new version.
    fn bump_version(&self, id: i64) -> impl Future<Output = i64> + Send;
}

const BUMP: &str = "UPDATE items SET version = version + 1 WHERE id = $1 RETURNING version";
const SELECT: &str = "SELECT version FROM items WHERE id = $1";
const CREATE: &str = "CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL)";

impl Items for PgPool {
    async fn create_items(&self, rows: i64) {
        sqlx::query(CREATE)
            .execute(self)
            .await
            .unwrap_or_else(|e| panic!("CREATE TABLE items: {e}"));
        sqlx::query("INSERT INTO items SELECT g, 0 FROM generate_series(1, $1) g")
            .bind(rows)
            .execute(self)
            .await
            .unwrap_or_else(|e| panic!("INSERT items: {e}"));
    }

    async fn select_version(&self, id: i64) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(SELECT).bind(id).fetch_one(self).await
    }

    async fn select_versions(&self, ids: &[i64]) -> Result<Vec<(i64, i64)>, sqlx::Error> {
        sqlx::query_as("SELECT id, version FROM items WHERE id = ANY($1) ORDER BY id")
            .bind(ids)
            .fetch_all(self)
            .await
    }

    async fn bump_version(&self, id: i64) -> i64 {
        sqlx::query_scalar(BUMP)
            .bind(id)
            .fetch_one(self)
            .await
            .unwrap_or_else(|e| panic!("UPDATE items: {e}"))
    }
}

impl Items for SqlitePool {
    async fn create_items(&self, rows: i64) {
        sqlx::query(CREATE)
            .execute(self)
            .await
            .unwrap_or_else(|e| panic!("CREATE TABLE items: {e}"));
        sqlx::query(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < $1) \
             INSERT INTO items SELECT n, 0 FROM g",
        )
        .bind(rows)
        .execute(self)
        .await
        .unwrap_or_else(|e| panic!("INSERT items: {e}"));
    }

    async fn select_version(&self, id: i64) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(SELECT).bind(id).fetch_one(self).await
    }

    async fn select_versions(&self, ids: &[i64]) -> Result<Vec<(i64, i64)>, sqlx::Error> {
        let ids = format!(
            "[{}]",
            ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
        );
        sqlx::query_as(
            "SELECT id, version FROM items WHERE id IN (SELECT value FROM json_each($1)) ORDER BY id",
        )
        .bind(ids)
        .fetch_all(self)
        .await
    }

    async fn bump_version(&self, id: i64) -> i64 {
        sqlx::query_scalar(BUMP)
            .bind(id)
            .fetch_one(self)
            .await
            .unwrap_or_else(|e| panic!("UPDATE items: {e}"))
    }
}

/// Creates `items` with `rows` rows at version 0.
///
/// # Panics
///
/// When the statements fail.
pub async fn create_items(pool: &impl Items, rows: i64) {
    pool.create_items(rows).await;
}

/// The version of row `id`.
///
/// # Errors
///
/// The query's error.
pub async fn select_version(pool: &impl Items, id: i64) -> Result<i64, sqlx::Error> {
    pool.select_version(id).await
}

/// The versions of rows `ids`, read in one statement (one snapshot).
///
/// # Errors
///
/// The query's error.
pub async fn select_versions(
    pool: &impl Items,
    ids: &[i64],
) -> Result<Vec<(i64, i64)>, sqlx::Error> {
    pool.select_versions(ids).await
}

/// Increments the version of row `id` (autocommit) and returns the new version.
///
/// # Panics
///
/// When the statement fails.
pub async fn bump_version(pool: &impl Items, id: i64) -> i64 {
    pool.bump_version(id).await
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
    let floors =
        || -> Arc<Vec<AtomicI64>> { Arc::new((0..rows).map(|_| AtomicI64::new(0)).collect()) };
    // `returned`: the highest version whose write returned; `committed`: the same, `grace` later.
    let (returned, committed) = (floors(), floors());
    let (reads, violations, writes, lagging) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let grace = config.grace;
    let deadline = Instant::now() + config.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.writers {
        let (write, returned, committed, writes) = (
            Arc::clone(&write),
            Arc::clone(&returned),
            Arc::clone(&committed),
            Arc::clone(&writes),
        );
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let id = fastrand::i64(1..=config.rows);
                let version = write(id).await;
                returned[row(id)].fetch_max(version, Ordering::SeqCst);
                writes.fetch_add(1, Ordering::Relaxed);
                if grace.is_zero() {
                    // The write has returned: from now on no read may see an older version.
                    committed[row(id)].fetch_max(version, Ordering::SeqCst);
                } else {
                    // `grace` after it returned, no read may see an older version.
                    let committed = Arc::clone(&committed);
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        committed[row(id)].fetch_max(version, Ordering::SeqCst);
                    });
                }
            }
        });
    }
    for _ in 0..config.readers {
        let (read, returned, committed) = (
            Arc::clone(&read),
            Arc::clone(&returned),
            Arc::clone(&committed),
        );
        let (reads, violations, lagging) = (
            Arc::clone(&reads),
            Arc::clone(&violations),
            Arc::clone(&lagging),
        );
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let id = fastrand::i64(1..=config.rows);
                let load = |floors: &[AtomicI64]| -> Vec<i64> {
                    floors.iter().map(|c| c.load(Ordering::SeqCst)).collect()
                };
                let (floors, latest) = (load(&committed), load(&returned));
                let seen = read(id).await;
                reads.fetch_add(1, Ordering::Relaxed);
                if seen.iter().any(|&(id, version)| version < floors[row(id)]) {
                    violations.fetch_add(1, Ordering::Relaxed);
                } else if seen.iter().any(|&(id, version)| version < latest[row(id)]) {
                    lagging.fetch_add(1, Ordering::Relaxed);
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
        lagging: lagging.load(Ordering::Relaxed),
    }
}

fn row(id: i64) -> usize {
    usize::try_from(id - 1).unwrap_or(0)
}
