//! SQLite: row triggers write the placeholder values of every changed row image into the outbox; keys are
//! rendered in Rust. [`SqliteSchema`] generates, installs and checks the SQL.
//!
//! The triggers write one outbox row per changed row image: the table and
//! the row's placeholder values as JSON. Keys are rendered here, in Rust, by the renderer the read side
//! uses, so both agree byte for byte.
//!
//! SQLite has one writer at a time and the outbox ids never repeat (`AUTOINCREMENT`), so ids are in commit
//! order: when a reader sees row `n`, it sees every committed row below `n`. A process therefore keeps a
//! *watermark*, the highest id whose keys it invalidated (every visible row up to it was delivered), and a
//! writer delivers every row above it after its statement or before its `COMMIT`: its own rows, and any
//! row another client left (delivered twice at worst, which is harmless). Delivered rows are deleted by
//! range (`id <= n`).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures_core::future::BoxFuture;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Sqlite, SqliteConnection, SqlitePool};

use super::{Backend, BacklogRow, ClaimedRows, Rows, TriggerMode, Wake};
use crate::consumer::Consumer;
use crate::error::Error;
use crate::registry::Registry;

/// Names the outbox table: every use, in Rust and in the generated SQL, goes through this macro or
/// `schema::OUTBOX`.
macro_rules! outbox {
    () => {
        "cache_invalidation_outbox"
    };
}

mod render;
mod schema;

use schema::{ACKNOWLEDGED, OUTBOX, REPLAY};

use render::Renderer;
pub use schema::SqliteSchema;

/// The SQLite backend's state: the key renderer and the delivered watermark.
#[doc(hidden)]
#[derive(Debug)]
pub struct SqliteState {
    renderer: Renderer,
    /// Every outbox row up to this id was delivered (by this process or another).
    delivered: AtomicI64,
}

impl SqliteState {
    /// The keys of outbox rows; a row that cannot be rendered invalidates the namespaces of its table's
    /// templates (never stale) and is logged.
    fn render(&self, rows: Vec<(i64, String, String)>) -> Vec<(i64, Vec<String>)> {
        rows.into_iter()
            .map(|(id, table, image)| {
                if table == KEYS_ROW {
                    return (id, self.hand_keys(id, &image));
                }
                let mut keys = Vec::new();
                if let Err(problem) = self.renderer.keys(&table, &image, &mut keys) {
                    tracing::error!(
                        id,
                        table,
                        %problem,
                        "cannot render the keys of an outbox row; invalidating the namespaces of its table"
                    );
                    keys = self.renderer.namespaces(&table);
                }
                (id, keys)
            })
            .collect()
    }
}

impl SqliteState {
    /// The keys of a row written by [`Backend::enqueue`] (a JSON array); one that cannot be decoded
    /// invalidates every namespace of the registry (never stale) and is logged.
    fn hand_keys(&self, id: i64, image: &str) -> Vec<String> {
        serde_json::from_str(image).unwrap_or_else(|error| {
            tracing::error!(id, %error, "cannot decode the keys of an outbox row; invalidating every namespace");
            self.renderer.all_namespaces()
        })
    }
}

/// The `tbl` of an outbox row holding keys written by hand (no table has this name: it is not an
/// identifier).
const KEYS_ROW: &str = "<keys>";

/// The longest a relay sweep leaves a fresh row to its writer (at most the configured
/// [`wrapped_grace`](crate::RelayBuilder::wrapped_grace)).
const SETTLE: Duration = Duration::from_millis(100);

/// Unix time in seconds, as the outbox's `created_at`.
const NOW: &str = "((julianday('now') - 2440587.5) * 86400.0)";

impl Backend for Sqlite {
    type State = SqliteState;
    type Listener = ();
    type Claim = SqlitePool;

    const SYSTEM_NAME: &'static str = "sqlite";

    super::connection_executor!();

    fn parameter(n: usize) -> String {
        format!("?{n}")
    }

    fn table_name(table: &str) -> String {
        super::ident(table)
    }

    fn caught_up<'a>(
        primary: &'a SqlitePool,
        _replica: Option<&'a SqlitePool>,
        _wait: Duration,
    ) -> BoxFuture<'a, Result<sqlx::pool::PoolConnection<Sqlite>, sqlx::Error>> {
        // One database file: every connection has every committed write.
        Box::pin(primary.acquire())
    }

    fn state(registry: &Registry) -> SqliteState {
        SqliteState {
            renderer: Renderer::new(registry),
            delivered: AtomicI64::new(0),
        }
    }

    fn begin_sql(statement: &str, _consumer: &Consumer) -> String {
        statement.to_owned()
    }

    #[cfg(feature = "migrate")]
    fn migrate<'a>(
        migrator: &'a sqlx::migrate::Migrator,
        pool: &'a SqlitePool,
    ) -> BoxFuture<'a, Result<(), sqlx::migrate::MigrateError>> {
        Box::pin(migrator.run(pool))
    }

    const SESSION_MARK: bool = false;

    fn check_shared(pool: &SqlitePool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            // Every connection of a pool is made from the same options: one tells for all.
            let on: bool = sqlx::query_scalar("PRAGMA recursive_triggers")
                .fetch_one(pool)
                .await?;
            if on {
                return Ok(());
            }
            Err(Error::UnsuitablePool(
                "SQLite's `recursive_triggers` is off, so the rows a `REPLACE` deletes on a conflict with \
                 another unique column would not be captured; connect the pool with \
                 `SqliteConnectOptions::pragma(\"recursive_triggers\", \"ON\")`"
                    .to_owned(),
            ))
        })
    }

    fn wrap(
        options: SqliteConnectOptions,
        _consumer: &Consumer,
        _pooler: bool,
    ) -> SqliteConnectOptions {
        // Delete triggers fire for the rows a `REPLACE` conflict deletes only with recursive triggers on.
        options.pragma("recursive_triggers", "ON")
    }

    fn install<'a>(
        registry: &'a Registry,
        _mode: TriggerMode,
        conn: &'a mut SqliteConnection,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { SqliteSchema::new(registry).install(conn).await })
    }

    fn verify<'a>(
        registry: &'a Registry,
        conn: &'a mut SqliteConnection,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { SqliteSchema::new(registry).verify(conn).await })
    }

    fn commit_written<'a>(
        mut tx: sqlx::Transaction<'a, Sqlite>,
        state: &'a SqliteState,
    ) -> BoxFuture<'a, Result<Rows, sqlx::Error>> {
        Box::pin(async move {
            let rows = Self::written_rows(&mut tx, state).await?;
            tx.commit().await?;
            Ok(rows)
        })
    }

    fn written_rows<'a>(
        conn: &'a mut SqliteConnection,
        state: &'a SqliteState,
    ) -> BoxFuture<'a, Result<Rows, sqlx::Error>> {
        Box::pin(async move {
            let rows = sqlx::query_as(concat!(
                "SELECT id, tbl, image FROM ",
                outbox!(),
                " WHERE id > ?1 ORDER BY id"
            ))
            .bind(state.delivered.load(Ordering::Acquire))
            .fetch_all(conn)
            .await?;
            Ok(state.render(rows))
        })
    }

    fn enqueue<'a>(
        conn: &'a mut SqliteConnection,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let image = serde_json::to_string(keys).map_err(|e| sqlx::Error::Encode(e.into()))?;
            sqlx::query(concat!(
                "INSERT INTO ",
                outbox!(),
                " (tbl, image) VALUES (?1, ?2)"
            ))
            .bind(KEYS_ROW)
            .bind(image)
            .execute(conn)
            .await
            .map(drop)
        })
    }

    fn invalidated(state: &SqliteState, ids: &[i64]) {
        if let Some(&max) = ids.iter().max() {
            state.delivered.fetch_max(max, Ordering::AcqRel);
        }
    }

    fn delete<'a>(
        pool: &'a SqlitePool,
        _consumer: &'a Consumer,
        ids: &'a [i64],
        sequence: u64,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let Some(&max) = ids.iter().max() else {
                return Ok(());
            };
            // The rows enter the replay window before they go (a copy recorded early is harmless).
            if sequence > 0 {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {REPLAY} (sequence, tbl, image, delivered_at) \
                     SELECT ?1, tbl, image, {NOW} FROM {OUTBOX} WHERE id <= ?2"
                )))
                .bind(i64::try_from(sequence).unwrap_or(i64::MAX))
                .bind(max)
                .execute(pool)
                .await?;
            }
            sqlx::query(concat!("DELETE FROM ", outbox!(), " WHERE id <= ?1"))
                .bind(max)
                .execute(pool)
                .await
                .map(drop)
        })
    }

    fn notify_drain(_pool: &SqlitePool) -> BoxFuture<'_, Result<(), sqlx::Error>> {
        // No notifications: relays sweep periodically.
        Box::pin(async { Ok(()) })
    }

    fn claim<'a>(
        pool: &'a SqlitePool,
        state: &'a SqliteState,
        _consumer: &'a Consumer,
        batch: i32,
        grace: Duration,
        upto: Option<i64>,
    ) -> BoxFuture<'a, Result<(SqlitePool, ClaimedRows), Error>> {
        Box::pin(async move {
            // A sweep takes the rows above the watermark that are older than the settle time, stopping at
            // the first younger row (the watermark must only pass delivered rows): a wrapped writer normally
            // delivers its rows within a millisecond, so the relay does not deliver them a second time.
            // Rows cannot say whether their writer was wrapped (no session state in SQLite triggers), so
            // the settle time is short: it delays other clients' writes by at most that much.
            // A drain up to an id takes every row up to it (also rows this process invalidated but could
            // not delete).
            let settle = grace.min(SETTLE).as_secs_f64();
            let rows: Vec<(i64, String, String, f64)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id, tbl, image, max({NOW} - created_at, 0.0) FROM {OUTBOX} \
                 WHERE CASE WHEN ?2 IS NULL THEN id > ?1 AND id < coalesce( \
                     (SELECT min(id) FROM {OUTBOX} WHERE id > ?1 AND created_at > {NOW} - ?4), \
                     9223372036854775807) \
                 ELSE id <= ?2 END ORDER BY id LIMIT ?3"
                )))
                .bind(state.delivered.load(Ordering::Acquire))
                .bind(upto)
                .bind(batch)
                .bind(settle)
                .fetch_all(pool)
                .await?;
            let ages: Vec<f64> = rows.iter().map(|r| r.3).collect();
            let rendered = state.render(rows.into_iter().map(|(id, t, i, _)| (id, t, i)).collect());
            let claimed = rendered
                .into_iter()
                .zip(ages)
                .map(|((id, keys), age)| (id, keys, age))
                .collect();
            Ok((pool.clone(), claimed))
        })
    }

    fn complete<'a>(
        pool: SqlitePool,
        _state: &'a SqliteState,
        consumer: &'a Consumer,
        ids: &'a [i64],
        sequence: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { Ok(Self::delete(&pool, consumer, ids, sequence).await?) })
    }

    fn acknowledged<'a>(
        pool: &'a SqlitePool,
        _consumer: &'a Consumer,
    ) -> BoxFuture<'a, Result<u64, Error>> {
        Box::pin(async move {
            let sequence: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT max(coalesce((SELECT store_sequence FROM {ACKNOWLEDGED} WHERE id = 1), 0), \
                            coalesce((SELECT max(sequence) FROM {REPLAY}), 0))"
            )))
            .fetch_one(pool)
            .await?;
            Ok(u64::try_from(sequence).unwrap_or(0))
        })
    }

    fn replay<'a>(
        pool: &'a SqlitePool,
        state: &'a SqliteState,
        _consumer: &'a Consumer,
        after: u64,
        max_keys: usize,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>, Error>> {
        Box::pin(async move {
            let after = i64::try_from(after).unwrap_or(i64::MAX);
            if cut(pool).await? > after {
                return Ok(None);
            }
            // With the window, in one statement (one snapshot), the rows still in the outbox: a delivery
            // the store acknowledged before it went back whose rows are not deleted yet is recorded
            // nowhere else (a row is either there or in the window: its deletion copies it).
            let rows: Vec<(i64, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT rowid, tbl, image FROM {REPLAY} WHERE sequence > ?1 \
                 UNION ALL SELECT id, tbl, image FROM {OUTBOX}"
            )))
            .bind(after)
            .fetch_all(pool)
            .await?;
            let keys: std::collections::BTreeSet<String> = state
                .render(rows)
                .into_iter()
                .flat_map(|(_, keys)| keys)
                .collect();
            Ok((keys.len() <= max_keys).then(|| keys.into_iter().collect()))
        })
    }

    fn cut_replay<'a>(
        pool: &'a SqlitePool,
        _consumer: &'a Consumer,
        sequence: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {ACKNOWLEDGED} (id, store_sequence) VALUES (1, ?1) ON CONFLICT (id) \
                 DO UPDATE SET store_sequence = max(store_sequence, excluded.store_sequence)"
            )))
            .bind(i64::try_from(sequence).unwrap_or(i64::MAX))
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    fn purge_replay<'a>(
        pool: &'a SqlitePool,
        consumer: &'a Consumer,
        keep: Duration,
    ) -> BoxFuture<'a, Result<u64, Error>> {
        Box::pin(async move {
            let before: f64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT {NOW} - ?1")))
                .bind(keep.as_secs_f64())
                .fetch_one(pool)
                .await?;
            let purged: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT max(sequence) FROM {REPLAY} WHERE delivered_at < ?1"
            )))
            .bind(before)
            .fetch_one(pool)
            .await?;
            // The cut is raised before the rows go.
            if let Some(purged) = purged {
                Self::cut_replay(pool, consumer, u64::try_from(purged).unwrap_or(0)).await?;
            }
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {REPLAY} WHERE delivered_at < ?1"
            )))
            .bind(before)
            .execute(pool)
            .await?;
            let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {REPLAY}"
            )))
            .fetch_one(pool)
            .await?;
            Ok(u64::try_from(left).unwrap_or(0))
        })
    }

    fn max_id(pool: &SqlitePool) -> BoxFuture<'_, Result<i64, Error>> {
        Box::pin(async move {
            Ok(
                sqlx::query_scalar(concat!("SELECT coalesce(max(id), 0) FROM ", outbox!()))
                    .fetch_one(pool)
                    .await?,
            )
        })
    }

    fn backlog<'a>(
        pool: &'a SqlitePool,
        _consumer: &'a Consumer,
    ) -> BoxFuture<'a, Result<BacklogRow, Error>> {
        Box::pin(async move {
            let (depth, max_id, age): (i64, i64, f64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT count(*), coalesce(max(id), 0), coalesce(max({NOW} - min(created_at), 0.0), 0.0) \
                 FROM {OUTBOX}"
            )))
            .fetch_one(pool)
            .await?;
            Ok((depth, max_id, age, depth, 1))
        })
    }

    fn register<'a>(
        _pool: &'a SqlitePool,
        _consumer: &'a Consumer,
        _expiry: Duration,
        _process: &'a str,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        // One consumer per database: nothing to register.
        Box::pin(async { Ok(false) })
    }

    fn unregister<'a>(
        _pool: &'a SqlitePool,
        _consumer: &'a Consumer,
        _process: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn alive<'a>(_pool: &'a SqlitePool, _installer: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        // One install per database: nothing to keep alive.
        Box::pin(async { Ok(()) })
    }

    fn pending_upto<'a>(
        pool: &'a SqlitePool,
        _consumer: &'a Consumer,
        upto: i64,
    ) -> BoxFuture<'a, Result<i64, Error>> {
        Box::pin(async move {
            Ok(sqlx::query_scalar(concat!(
                "SELECT count(*) FROM ",
                outbox!(),
                " WHERE id <= ?1"
            ))
            .bind(upto)
            .fetch_one(pool)
            .await?)
        })
    }

    fn listener(_pool: &SqlitePool, _enabled: bool) {}

    fn listen(_listener: &mut ()) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn wait<'a>(_listener: &'a mut (), tick: &'a mut tokio::time::Interval) -> BoxFuture<'a, Wake> {
        Box::pin(async move {
            tick.tick().await;
            Wake::Sweep
        })
    }
}

/// The highest store sequence the replay window no longer reaches below.
async fn cut(pool: &SqlitePool) -> Result<i64, sqlx::Error> {
    let cut: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT store_sequence FROM {ACKNOWLEDGED} WHERE id = 1"
    )))
    .fetch_optional(pool)
    .await?;
    Ok(cut.unwrap_or(0))
}
