//! [`Backend`]: what [`CachedPool`](crate::CachedPool), [`CachedTransaction`](crate::CachedTransaction) and
//! [`Relay`](crate::outbox::Relay) need from a database. One folder per database: [`postgres`] and
//! [`sqlite`] (feature `sqlite`) each hold their triggers, their SQL and their outbox queries; adding a
//! database is adding a folder and a feature.
//!
//! The pool, the commit path, the relay, the circuit breaker and the read gate are one implementation over
//! this trait; only the outbox queries differ. The two backends differ in what they guarantee:
//!
//! | | PostgreSQL | SQLite |
//! |---|---|---|
//! | capture | statement triggers (or row triggers) render keys in SQL | row triggers write the placeholder values as JSON; keys are rendered in Rust by the same code as the read side |
//! | writer's rows | by transaction id / backend pid | every row after the process's delivered watermark (ids are in commit order: one writer at a time) |
//! | other clients' writes | `NOTIFY`: delivered at once by a listening relay | no `NOTIFY`: delivered by the next wrapped write or the relay's sweep (every [`sweep_interval`](crate::outbox::RelayConfig::sweep_interval), once the row is 100 ms old) |
//! | several relays | share batches (`FOR UPDATE SKIP LOCKED`) | may deliver a row twice (harmless) |
//! | `TRUNCATE` | namespace invalidation of the entities' shapes | (no `TRUNCATE` in SQLite; `DELETE` fires the row triggers) |

use std::time::Duration;

use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;
use sqlx::{Either, Execute, Pool};
use sqlx_core::describe::Describe;
use sqlx_core::sql_str::SqlStr;

use crate::consumer::Consumer;
use crate::entity::EntityMeta;
use crate::error::Error;
use crate::registry::Registry;

pub(crate) mod migration;
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// The connect options of a database.
pub(crate) type ConnectOptions<DB> =
    <<DB as sqlx::Database>::Connection as sqlx::Connection>::Options;

/// What `fetch_many` streams: statement results and rows.
pub(crate) type Item<DB> = Either<<DB as sqlx::Database>::QueryResult, <DB as sqlx::Database>::Row>;

/// Outbox rows as the runtime delivers them: row id and the row's keys.
pub(crate) type Rows = Vec<(i64, Vec<String>)>;

/// Outbox rows claimed by a relay: row id, keys and the row's age in seconds.
pub(crate) type ClaimedRows = Vec<(i64, Vec<String>, f64)>;

/// The outbox as a consumer sees it: its undelivered rows, the highest id, the age of its oldest
/// undelivered row in seconds, every row, the live consumers.
pub(crate) type BacklogRow = (i64, i64, f64, i64, i32);

/// How the capture triggers fire (PostgreSQL; SQLite has row triggers only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TriggerMode {
    /// One trigger call per statement, reading the transition tables (`old_rows`, `new_rows`): one
    /// `INSERT … SELECT` per statement, however many rows it touched. The default: measured faster (see the
    /// `trigger_bench` example).
    #[default]
    Statement,
    /// One trigger call per row, reading `OLD` / `NEW`; one outbox row per changed row.
    Row,
}

impl TriggerMode {
    /// The mode's name, as recorded in the database.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Statement => "statement",
            Self::Row => "row",
        }
    }
}

/// What woke a relay up.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The sweep timer, or an ordinary notification: deliver what a sweep delivers.
    Sweep,
    /// A writer that could not deliver asked every relay to deliver every row now.
    Drain,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    #[cfg(feature = "sqlite")]
    impl Sealed for sqlx::Sqlite {}
}

/// A database supported by [`CachedPool`](crate::CachedPool): [`sqlx::Postgres`] or
/// [`sqlx::Sqlite`]. Sealed; its items are the runtime's outbox queries and not meant to be called.
pub trait Backend: sqlx::Database + sealed::Sealed {
    /// State shared by a pool and its relay.
    #[doc(hidden)]
    type State: Send + Sync + 'static;
    /// A relay's source of wake-ups besides its sweep timer.
    #[doc(hidden)]
    type Listener: Send + 'static;
    /// Rows claimed by a relay batch until they are deleted.
    #[doc(hidden)]
    type Claim: Send;

    /// The database's OpenTelemetry `db.system.name` (`postgresql`, `sqlite`), on this crate's spans.
    const SYSTEM_NAME: &'static str;

    /// The state for `registry`.
    #[doc(hidden)]
    fn state(registry: &Registry) -> Self::State;

    /// The `n`-th (from 1) bind parameter in SQL text.
    #[doc(hidden)]
    fn parameter(n: usize) -> String;

    /// `table` (possibly `schema.table`) quoted for SQL text.
    #[doc(hidden)]
    fn table_name(table: &str) -> String;

    /// A connection whose server has every write the primary had now: on `replica`, once it replayed
    /// them (waiting at most `wait`), else on `primary`.
    #[doc(hidden)]
    fn caught_up<'a>(
        primary: &'a Pool<Self>,
        replica: Option<&'a Pool<Self>>,
        wait: Duration,
    ) -> BoxFuture<'a, Result<sqlx::pool::PoolConnection<Self>, sqlx::Error>>;

    /// Marks the connections of a [`CachedPool`](crate::CachedPool) delivering to `consumer`; behind a
    /// transaction-mode `pooler`, the mark is set per transaction instead ([`begin_sql`](Self::begin_sql)).
    #[doc(hidden)]
    fn wrap(
        options: ConnectOptions<Self>,
        consumer: &Consumer,
        pooler: bool,
    ) -> ConnectOptions<Self>;

    /// `statement` (a `BEGIN`), followed by what marks the transaction as `consumer`'s (behind a
    /// transaction-mode pooler): one simple-protocol message.
    #[doc(hidden)]
    fn begin_sql(statement: &str, consumer: &Consumer) -> String;

    /// Runs `migrator` on `pool` (see [`CachedPoolOptions::migrations`](crate::CachedPoolOptions::migrations)).
    #[cfg(feature = "migrate")]
    #[doc(hidden)]
    fn migrate<'a>(
        migrator: &'a sqlx::migrate::Migrator,
        pool: &'a Pool<Self>,
    ) -> BoxFuture<'a, Result<(), sqlx::migrate::MigrateError>>;

    /// Whether the wrapper marks its sessions (in the connect options, see [`wrap`](Self::wrap)): a pool
    /// it did not connect is then marked per transaction instead.
    #[doc(hidden)]
    const SESSION_MARK: bool;

    /// Checks that a pool the application connected (see
    /// [`CachedPoolOptions::wrap`](crate::CachedPoolOptions::wrap)) has the connection settings capture
    /// needs.
    #[doc(hidden)]
    fn check_shared(pool: &Pool<Self>) -> BoxFuture<'_, Result<(), Error>>;

    /// Installs (or updates) the triggers.
    #[doc(hidden)]
    fn install<'a>(
        registry: &'a Registry,
        mode: TriggerMode,
        conn: &'a mut Self::Connection,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// Checks the installed triggers against `registry`.
    #[doc(hidden)]
    fn verify<'a>(
        registry: &'a Registry,
        conn: &'a mut Self::Connection,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// The rows an autocommit statement wrote, read after it on its connection.
    #[doc(hidden)]
    fn written_rows<'a>(
        conn: &'a mut Self::Connection,
        state: &'a Self::State,
    ) -> BoxFuture<'a, Result<Rows, sqlx::Error>>;

    /// Reads the rows the transaction `tx` wrote and commits it, in one round trip where the backend
    /// allows. An error means the keys were not read or the `COMMIT` failed: nothing is to be delivered.
    #[doc(hidden)]
    fn commit_written<'a>(
        tx: sqlx::Transaction<'a, Self>,
        state: &'a Self::State,
    ) -> BoxFuture<'a, Result<Rows, sqlx::Error>>;

    /// Writes `keys` to the outbox on `conn` (in its transaction), as a captured write would: delivered
    /// with the transaction's other keys after `COMMIT` (see [`CachedPool::invalidate`](crate::CachedPool::invalidate)).
    #[doc(hidden)]
    fn enqueue<'a>(
        conn: &'a mut Self::Connection,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<(), sqlx::Error>>;

    /// Called as soon as the keys of `ids` are invalidated, before they are queued for deletion.
    #[doc(hidden)]
    fn invalidated(state: &Self::State, ids: &[i64]);

    /// Records that a writer delivered the rows `ids` to `consumer` (deleting those every live consumer
    /// delivered) when the store's sequence was `sequence`, and wakes the relays of other consumers.
    #[doc(hidden)]
    fn delete<'a>(
        pool: &'a Pool<Self>,
        consumer: &'a Consumer,
        ids: &'a [i64],
        sequence: u64,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>>;

    /// The highest store sequence recorded with `consumer`'s deliveries (0 when none).
    #[doc(hidden)]
    fn acknowledged<'a>(
        pool: &'a Pool<Self>,
        consumer: &'a Consumer,
    ) -> BoxFuture<'a, Result<u64, Error>>;

    /// The distinct keys of `consumer`'s deliveries recorded with a store sequence above `after` (the
    /// replay window, see [`RelayConfig::replay_window`](crate::outbox::RelayConfig::replay_window)); `None` when
    /// the window no longer reaches back to `after`, or holds more than `max_keys` keys.
    #[doc(hidden)]
    fn replay<'a>(
        pool: &'a Pool<Self>,
        state: &'a Self::State,
        consumer: &'a Consumer,
        after: u64,
        max_keys: usize,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>, Error>>;

    /// Records that `consumer`'s replay window no longer reaches below `sequence`.
    #[doc(hidden)]
    fn cut_replay<'a>(
        pool: &'a Pool<Self>,
        consumer: &'a Consumer,
        sequence: u64,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// Purges `consumer`'s deliveries older than `keep` from the replay window; returns the deliveries
    /// left.
    #[doc(hidden)]
    fn purge_replay<'a>(
        pool: &'a Pool<Self>,
        consumer: &'a Consumer,
        keep: Duration,
    ) -> BoxFuture<'a, Result<u64, Error>>;

    /// Asks every relay to deliver every row now.
    #[doc(hidden)]
    fn notify_drain(pool: &Pool<Self>) -> BoxFuture<'_, Result<(), sqlx::Error>>;

    /// Claims up to `batch` rows `consumer` has not delivered for a relay batch: rows of other writers and
    /// rows older than `grace`, or, with `upto`, every such row up to that id.
    #[doc(hidden)]
    fn claim<'a>(
        pool: &'a Pool<Self>,
        state: &'a Self::State,
        consumer: &'a Consumer,
        batch: i32,
        grace: Duration,
        upto: Option<i64>,
    ) -> BoxFuture<'a, Result<(Self::Claim, ClaimedRows), Error>>;

    /// Records the claimed rows `ids`, whose keys were invalidated when the store's sequence was
    /// `sequence`, as delivered to `consumer`, and releases the claim.
    #[doc(hidden)]
    fn complete<'a>(
        claim: Self::Claim,
        state: &'a Self::State,
        consumer: &'a Consumer,
        ids: &'a [i64],
        sequence: u64,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// The outbox's highest row id (0 when empty).
    #[doc(hidden)]
    fn max_id(pool: &Pool<Self>) -> BoxFuture<'_, Result<i64, Error>>;

    /// The outbox as `consumer` sees it.
    #[doc(hidden)]
    fn backlog<'a>(
        pool: &'a Pool<Self>,
        consumer: &'a Consumer,
    ) -> BoxFuture<'a, Result<BacklogRow, Error>>;

    /// Registers the process `process` of `consumer` (live for `expiry` from now); returns whether the
    /// consumer missed rows while it was not live.
    #[doc(hidden)]
    fn register<'a>(
        pool: &'a Pool<Self>,
        consumer: &'a Consumer,
        expiry: Duration,
        process: &'a str,
    ) -> BoxFuture<'a, Result<bool, Error>>;

    /// The process `process` of `consumer` stops.
    #[doc(hidden)]
    fn unregister<'a>(
        pool: &'a Pool<Self>,
        consumer: &'a Consumer,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// Tells the database that a process of the build `installer` (a registry fingerprint) runs
    /// (PostgreSQL: an install does not retire its capture while it is seen).
    #[doc(hidden)]
    fn alive<'a>(pool: &'a Pool<Self>, installer: &'a str) -> BoxFuture<'a, Result<(), Error>>;

    /// Rows up to `upto` that `consumer` has not delivered.
    #[doc(hidden)]
    fn pending_upto<'a>(
        pool: &'a Pool<Self>,
        consumer: &'a Consumer,
        upto: i64,
    ) -> BoxFuture<'a, Result<i64, Error>>;

    /// A relay's listener for `pool` (PostgreSQL: a `LISTEN` connection of its own, opened lazily); one
    /// that never listens when not `enabled` (behind a transaction pooler).
    #[doc(hidden)]
    fn listener(pool: &Pool<Self>, enabled: bool) -> Self::Listener;

    /// Makes sure `listener` listens; called before each sweep, so that no notification sent after the
    /// sweep's query is missed.
    #[doc(hidden)]
    fn listen(listener: &mut Self::Listener) -> BoxFuture<'_, ()>;

    /// `sqlx::Executor::fetch_many` on a connection.
    #[doc(hidden)]
    fn fetch_many<'e, 'q: 'e, E: 'q + Execute<'q, Self>>(
        conn: &'e mut Self::Connection,
        query: E,
    ) -> BoxStream<'e, Result<Item<Self>, sqlx::Error>>;

    /// `sqlx::Executor::fetch_optional` on a connection.
    #[doc(hidden)]
    fn fetch_optional<'e, 'q: 'e, E: 'q + Execute<'q, Self>>(
        conn: &'e mut Self::Connection,
        query: E,
    ) -> BoxFuture<'e, Result<Option<Self::Row>, sqlx::Error>>;

    /// `sqlx::Executor::prepare_with` on a connection.
    #[doc(hidden)]
    fn prepare_with<'e>(
        conn: &'e mut Self::Connection,
        sql: SqlStr,
        parameters: &'e [Self::TypeInfo],
    ) -> BoxFuture<'e, Result<Self::Statement, sqlx::Error>>;

    /// `sqlx::Executor::describe` on a connection.
    #[doc(hidden)]
    fn describe<'e>(
        conn: &'e mut Self::Connection,
        sql: SqlStr,
    ) -> BoxFuture<'e, Result<Describe<Self>, sqlx::Error>>;

    /// Waits for a notification or the next `tick`.
    #[doc(hidden)]
    fn wait<'a>(
        listener: &'a mut Self::Listener,
        tick: &'a mut tokio::time::Interval,
    ) -> BoxFuture<'a, Wake>;
}

/// The four required `sqlx::Executor` methods of a backend's connection, for [`Backend`]'s impls: the
/// wrapper's generic `Executor` impls call them instead of requiring `&mut DB::Connection: Executor` in a
/// where clause (which makes generic user code over `CachedTransaction` overflow the trait solver).
macro_rules! connection_executor {
    () => {
        fn fetch_many<'e, 'q: 'e, E: 'q + sqlx::Execute<'q, Self>>(
            conn: &'e mut Self::Connection,
            query: E,
        ) -> futures_core::stream::BoxStream<
            'e,
            Result<sqlx::Either<Self::QueryResult, Self::Row>, sqlx::Error>,
        > {
            sqlx::Executor::fetch_many(conn, query)
        }

        fn fetch_optional<'e, 'q: 'e, E: 'q + sqlx::Execute<'q, Self>>(
            conn: &'e mut Self::Connection,
            query: E,
        ) -> futures_core::future::BoxFuture<'e, Result<Option<Self::Row>, sqlx::Error>> {
            sqlx::Executor::fetch_optional(conn, query)
        }

        fn prepare_with<'e>(
            conn: &'e mut Self::Connection,
            sql: sqlx_core::sql_str::SqlStr,
            parameters: &'e [Self::TypeInfo],
        ) -> futures_core::future::BoxFuture<'e, Result<Self::Statement, sqlx::Error>> {
            sqlx::Executor::prepare_with(conn, sql, parameters)
        }

        fn describe<'e>(
            conn: &'e mut Self::Connection,
            sql: sqlx_core::sql_str::SqlStr,
        ) -> futures_core::future::BoxFuture<
            'e,
            Result<sqlx_core::describe::Describe<Self>, sqlx::Error>,
        > {
            sqlx::Executor::describe(conn, sql)
        }
    };
}
use connection_executor;

/// Runs `work` in `tx` and commits; when `work` fails, rolls back at once (a dropped transaction would keep
/// its locks, e.g. the install lock, until the connection's next use) and returns its error.
///
/// # Errors
///
/// The error of `work`, or of `COMMIT`.
pub(crate) async fn all_or_nothing<DB: sqlx::Database>(
    mut tx: sqlx::Transaction<'_, DB>,
    work: impl AsyncFnOnce(&mut DB::Connection) -> Result<(), Error>,
) -> Result<(), Error> {
    if let Err(error) = work(&mut tx).await {
        let _ = tx.rollback().await;
        return Err(error);
    }
    tx.commit().await?;
    Ok(())
}

/// A quoted SQL identifier (PostgreSQL and SQLite).
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The query reading `meta`'s rows for `count` values of its own key's columns: `SELECT * FROM table
/// WHERE (col1, col2) IN ((<p1>, <p2>), …)`, the parameters in the key's order, value after value.
pub(crate) fn select_by_keys<DB: Backend>(meta: &EntityMeta, count: usize) -> String {
    let columns: Vec<String> = meta
        .key
        .placeholders()
        .map(|field| ident(meta.column(field).map_or(field, |c| c.column)))
        .collect();
    let width = columns.len();
    let rows: Vec<String> = (0..count)
        .map(|row| {
            let parameters: Vec<String> = (1..=width)
                .map(|i| DB::parameter(row * width + i))
                .collect();
            format!("({})", parameters.join(", "))
        })
        .collect();
    format!(
        "SELECT * FROM {} WHERE ({}) IN ({})",
        DB::table_name(meta.table),
        columns.join(", "),
        rows.join(", ")
    )
}

/// A quoted SQL string literal (standard conforming strings; PostgreSQL and SQLite).
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }
}
