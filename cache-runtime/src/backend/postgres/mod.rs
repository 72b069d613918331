//! PostgreSQL: statement (or row) triggers render the keys in SQL into the outbox table of the writing
//! transaction; a relay `LISTEN`s for the commits of sessions that do not go through the wrapper.
//!
//! [`PgSchema`] generates, installs and checks the SQL (see its docs for what is installed).

use std::time::Duration;

use futures_core::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres};

use super::{Backend, BacklogRow, ClaimedRows, Rows, TriggerMode, Wake};
use crate::consumer::Consumer;
use crate::error::Error;
use crate::registry::Registry;

mod check;
mod parts;
mod records;
mod replica;
mod schema;

pub use schema::PgSchema;

/// Names the SQL objects: every use, in Rust and in the generated SQL, goes through these macros or the
/// constants built from them.
macro_rules! schema_name {
    () => {
        "cache_invalidation"
    };
}
macro_rules! function {
    ($name:literal) => {
        concat!($crate::backend::postgres::schema_name!(), ".", $name)
    };
}
pub(crate) use {function, schema_name};

/// The PostgreSQL schema holding the outbox and the functions.
pub const SCHEMA: &str = schema_name!();

/// The `LISTEN`/`NOTIFY` channel written by sessions that do not go through [`CachedPool`](crate::CachedPool).
pub const NOTIFY_CHANNEL: &str = schema_name!();

/// The session setting that marks a connection of [`CachedPool`](crate::CachedPool).
pub const WRAPPED_SETTING: &str = function!("wrapped");

/// The session setting holding the highest outbox id a session already returned.
pub(crate) const SEEN_SETTING: &str = function!("seen");

/// The version of the generated SQL; an installed schema of another version must be re-installed.
pub const SCHEMA_VERSION: i32 = 7;

/// The application name of the relay's `LISTEN` connection (visible in `pg_stat_activity`).
pub const LISTEN_APPLICATION_NAME: &str = "cache_invalidation_relay";

/// The notification payload that asks every relay to deliver every row now, whatever its age: sent by a
/// writer whose own delivery failed after `COMMIT`, so that relays of processes that can reach the store do
/// not wait for the grace period.
pub(crate) const DRAIN_PAYLOAD: &str = "drain";

/// A relay's `LISTEN`: a pool of one connection (outside the application's pool) and the listener on it.
#[doc(hidden)]
#[derive(Debug)]
pub struct Listener {
    pool: PgPool,
    pg: Option<PgListener>,
    enabled: bool,
}

impl Backend for Postgres {
    type State = ();
    type Listener = Listener;
    type Claim = sqlx::Transaction<'static, Postgres>;

    const SYSTEM_NAME: &'static str = "postgresql";

    super::connection_executor!();

    fn state(_registry: &Registry) -> Self::State {}

    fn parameter(n: usize) -> String {
        format!("${n}")
    }

    fn table_name(table: &str) -> String {
        schema::qualified(table)
    }

    fn caught_up<'a>(
        primary: &'a PgPool,
        replica: Option<&'a PgPool>,
        wait: Duration,
    ) -> BoxFuture<'a, Result<sqlx::pool::PoolConnection<Postgres>, sqlx::Error>> {
        Box::pin(replica::caught_up(primary, replica, wait))
    }

    fn wrap(options: PgConnectOptions, consumer: &Consumer, pooler: bool) -> PgConnectOptions {
        if pooler {
            // A pooler rejects (pgbouncer) or drops the `options` startup parameter, and would hand the
            // session to other clients: `begin_sql` marks each transaction instead.
            return options;
        }
        options.options([(WRAPPED_SETTING, consumer.tag())])
    }

    #[cfg(feature = "migrate")]
    fn migrate<'a>(
        migrator: &'a sqlx::migrate::Migrator,
        pool: &'a PgPool,
    ) -> BoxFuture<'a, Result<(), sqlx::migrate::MigrateError>> {
        Box::pin(migrator.run(pool))
    }

    const SESSION_MARK: bool = true;

    fn check_shared(_pool: &PgPool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn begin_sql(statement: &str, consumer: &Consumer) -> String {
        format!(
            "{statement}; SELECT pg_catalog.set_config({}, {}, true)",
            super::literal(WRAPPED_SETTING),
            super::literal(consumer.tag())
        )
    }

    fn install<'a>(
        registry: &'a Registry,
        mode: TriggerMode,
        conn: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            PgSchema::new(registry)
                .trigger_mode(mode)
                .install(conn)
                .await
        })
    }

    fn verify<'a>(
        registry: &'a Registry,
        conn: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { PgSchema::new(registry).verify(conn).await })
    }

    fn written_rows<'a>(
        conn: &'a mut PgConnection,
        _state: &'a (),
    ) -> BoxFuture<'a, Result<Rows, sqlx::Error>> {
        let sql = concat!("SELECT id, keys FROM ", function!("session_keys()"));
        Box::pin(sqlx::query_as(sql).fetch_all(conn))
    }

    fn commit_written<'a>(
        mut tx: sqlx::Transaction<'a, Postgres>,
        _state: &'a (),
    ) -> BoxFuture<'a, Result<Rows, sqlx::Error>> {
        // One simple-query message: fire the deferred constraint triggers (so that the rows they write are
        // read too), read the rows, `COMMIT`. An error skips the rest of the message (a failed `COMMIT`
        // rolls back). The trailing `BEGIN` opens an empty transaction for sqlx's transaction, which still
        // counts one level: dropped, it queues the `ROLLBACK` that closes it, sent with the connection's
        // next use or its release to the pool, not waited for here.
        Box::pin(async move {
            use sqlx::Row as _;
            let sql = concat!(
                "SET CONSTRAINTS ALL IMMEDIATE; SELECT id, keys FROM ",
                function!("transaction_keys()"),
                "; COMMIT; BEGIN"
            );
            let rows = sqlx::raw_sql(sql).fetch_all(&mut *tx).await?;
            drop(tx);
            rows.iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                .collect()
        })
    }

    fn enqueue<'a>(
        conn: &'a mut PgConnection,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query(concat!("SELECT ", function!("invalidate($1)")))
                .bind(keys)
                .execute(conn)
                .await
                .map(drop)
        })
    }

    fn invalidated(_state: &(), _ids: &[i64]) {}

    fn delete<'a>(
        pool: &'a PgPool,
        consumer: &'a Consumer,
        ids: &'a [i64],
        sequence: u64,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move { delivered(pool, consumer, ids, sequence).await })
    }

    fn acknowledged<'a>(
        pool: &'a PgPool,
        consumer: &'a Consumer,
    ) -> BoxFuture<'a, Result<u64, Error>> {
        Box::pin(async move {
            let sequence: i64 =
                sqlx::query_scalar(concat!("SELECT ", function!("acknowledged($1)")))
                    .bind(consumer.tag())
                    .fetch_one(pool)
                    .await?;
            Ok(u64::try_from(sequence).unwrap_or(0))
        })
    }

    fn replay<'a>(
        pool: &'a PgPool,
        _state: &'a (),
        consumer: &'a Consumer,
        after: u64,
        max_keys: usize,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>, Error>> {
        Box::pin(async move {
            let keys: Option<Vec<String>> =
                sqlx::query_scalar(concat!("SELECT ", function!("replay_keys($1, $2, $3)")))
                    .bind(consumer.tag())
                    .bind(i64::try_from(after).unwrap_or(i64::MAX))
                    .bind(i32::try_from(max_keys).unwrap_or(i32::MAX - 1))
                    .fetch_one(pool)
                    .await?;
            Ok(keys.filter(|keys| keys.len() <= max_keys))
        })
    }

    fn cut_replay<'a>(
        pool: &'a PgPool,
        consumer: &'a Consumer,
        sequence: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            sqlx::query(concat!("SELECT ", function!("cut_replay($1, $2)")))
                .bind(consumer.tag())
                .bind(i64::try_from(sequence).unwrap_or(i64::MAX))
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    fn purge_replay<'a>(
        pool: &'a PgPool,
        consumer: &'a Consumer,
        keep: Duration,
    ) -> BoxFuture<'a, Result<u64, Error>> {
        Box::pin(async move {
            let left: i64 =
                sqlx::query_scalar(concat!("SELECT ", function!("purge_replay($1, $2)")))
                    .bind(consumer.tag())
                    .bind(keep)
                    .fetch_one(pool)
                    .await?;
            Ok(u64::try_from(left).unwrap_or(0))
        })
    }

    fn notify_drain(pool: &PgPool) -> BoxFuture<'_, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(DRAIN_PAYLOAD)
                .execute(pool)
                .await
                .map(drop)
        })
    }

    fn claim<'a>(
        pool: &'a PgPool,
        _state: &'a (),
        consumer: &'a Consumer,
        batch: i32,
        grace: Duration,
        upto: Option<i64>,
    ) -> BoxFuture<'a, Result<(Self::Claim, ClaimedRows), Error>> {
        Box::pin(async move {
            let mut tx = pool.begin().await?;
            let rows = sqlx::query_as(concat!(
                "SELECT id, keys, age_seconds FROM ",
                function!("claim_rows($1, $2, $3, $4)")
            ))
            .bind(batch)
            .bind(grace)
            .bind(upto)
            .bind(consumer.tag())
            .fetch_all(&mut *tx)
            .await?;
            Ok((tx, rows))
        })
    }

    fn complete<'a>(
        mut claim: Self::Claim,
        _state: &'a (),
        consumer: &'a Consumer,
        ids: &'a [i64],
        sequence: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if !ids.is_empty() {
                delivered(&mut *claim, consumer, ids, sequence).await?;
            }
            claim.commit().await?;
            Ok(())
        })
    }

    fn max_id(pool: &PgPool) -> BoxFuture<'_, Result<i64, Error>> {
        Box::pin(async move {
            Ok(
                sqlx::query_scalar(concat!("SELECT ", function!("max_id()")))
                    .fetch_one(pool)
                    .await?,
            )
        })
    }

    fn backlog<'a>(
        pool: &'a PgPool,
        consumer: &'a Consumer,
    ) -> BoxFuture<'a, Result<BacklogRow, Error>> {
        Box::pin(async move {
            Ok(sqlx::query_as(concat!(
                "SELECT depth, max_id, oldest_age_seconds, total, consumers FROM ",
                function!("backlog($1)")
            ))
            .bind(consumer.tag())
            .fetch_one(pool)
            .await?)
        })
    }

    fn register<'a>(
        pool: &'a PgPool,
        consumer: &'a Consumer,
        expiry: Duration,
        process: &'a str,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(async move {
            let lost =
                sqlx::query_scalar(concat!("SELECT ", function!("register($1, $2, $3, $4)")))
                    .bind(consumer.tag())
                    .bind(consumer.name())
                    .bind(expiry)
                    .bind(process)
                    .fetch_one(pool)
                    .await?;
            // A transaction of its own (see the function's SQL).
            sqlx::query(concat!("SELECT ", function!("prune()")))
                .execute(pool)
                .await?;
            Ok(lost)
        })
    }

    fn unregister<'a>(
        pool: &'a PgPool,
        consumer: &'a Consumer,
        process: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            sqlx::query(concat!("SELECT ", function!("unregister($1, $2)")))
                .bind(consumer.tag())
                .bind(process)
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    fn alive<'a>(pool: &'a PgPool, installer: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            sqlx::query(concat!("SELECT ", function!("alive($1)")))
                .bind(installer)
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    fn pending_upto<'a>(
        pool: &'a PgPool,
        consumer: &'a Consumer,
        upto: i64,
    ) -> BoxFuture<'a, Result<i64, Error>> {
        Box::pin(async move {
            Ok(
                sqlx::query_scalar(concat!("SELECT ", function!("pending_upto($1, $2)")))
                    .bind(upto)
                    .bind(consumer.tag())
                    .fetch_one(pool)
                    .await?,
            )
        })
    }

    fn listener(pool: &PgPool, enabled: bool) -> Listener {
        let options = (*pool.connect_options())
            .clone()
            .application_name(LISTEN_APPLICATION_NAME);
        Listener {
            pool: PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(options),
            pg: None,
            enabled,
        }
    }

    fn listen(listener: &mut Listener) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if listener.enabled && listener.pg.is_none() {
                listener.pg = pg_listen(&listener.pool).await;
            }
        })
    }

    fn wait<'a>(
        listener: &'a mut Listener,
        tick: &'a mut tokio::time::Interval,
    ) -> BoxFuture<'a, Wake> {
        Box::pin(async move {
            let Some(l) = listener.pg.as_mut() else {
                tick.tick().await;
                return Wake::Sweep;
            };
            let mut wake = Wake::Sweep;
            tokio::select! {
                received = l.try_recv() => match received {
                    // Coalesce a burst of notifications into one sweep.
                    Ok(Some(first)) => {
                        let mut next = Some(first);
                        while let Some(n) = next {
                            if n.payload() == DRAIN_PAYLOAD {
                                wake = Wake::Drain;
                            }
                            next = l.next_buffered();
                        }
                    }
                    Ok(None) => tracing::warn!(
                        "cache invalidation relay: LISTEN connection lost and re-established; sweeping"
                    ),
                    Err(error) => {
                        tracing::warn!(%error, "cache invalidation relay: LISTEN connection lost; reconnecting");
                        listener.pg = None;
                    }
                },
                _ = tick.tick() => {}
            }
            wake
        })
    }
}

/// Records rows as delivered to `consumer`, deleting those every live consumer delivered
/// (`synchronous_commit = off`: see the function's SQL).
async fn delivered<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    consumer: &Consumer,
    ids: &[i64],
    sequence: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(concat!("SELECT ", function!("delivered($1, $2, $3)")))
        .bind(ids)
        .bind(consumer.tag())
        .bind(i64::try_from(sequence).unwrap_or(i64::MAX))
        .execute(executor)
        .await
        .map(drop)
}

async fn pg_listen(listen: &PgPool) -> Option<PgListener> {
    let result = async {
        let mut listener = PgListener::connect_with(listen).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    }
    .await;
    match result {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::warn!(%error, "cache invalidation relay: cannot LISTEN; sweeping periodically only");
            None
        }
    }
}
