//! [`Backend`]: what [`CachedPool`](crate::CachedPool), [`CachedTransaction`](crate::CachedTransaction) and
//! [`Relay`](crate::Relay) need from a database, implemented for [`sqlx::Postgres`] and
//! [`sqlx::Sqlite`].
//!
//! The pool, the commit path, the relay, the circuit breaker and the read gate are one implementation over
//! this trait; only the outbox queries differ. The two backends differ in what they guarantee:
//!
//! | | PostgreSQL | SQLite |
//! |---|---|---|
//! | capture | statement triggers (or row triggers) render keys in SQL | row triggers write the placeholder values as JSON; keys are rendered in Rust by the same code as the read side |
//! | writer's rows | by transaction id / backend pid | every row after the process's delivered watermark (ids are in commit order: one writer at a time) |
//! | other clients' writes | `NOTIFY`: delivered at once by a listening relay | no `NOTIFY`: delivered by the next wrapped write or the relay's sweep (every [`sweep_interval`](crate::RelayBuilder::sweep_interval), once the row is 100 ms old) |
//! | several relays | share batches (`FOR UPDATE SKIP LOCKED`) | may deliver a row twice (harmless) |
//! | `TRUNCATE` | namespace invalidation of the entities' shapes | (no `TRUNCATE` in SQLite; `DELETE` fires the row triggers) |

use std::time::Duration;

use futures_core::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Pool, Postgres};

use crate::error::Error;
use crate::registry::Registry;
use crate::schema::{NOTIFY_CHANNEL, Schema, TriggerMode, WRAPPED_SETTING};

#[cfg(feature = "sqlite")]
mod sqlite;

/// The connect options of a database.
pub(crate) type ConnectOptions<DB> =
    <<DB as sqlx::Database>::Connection as sqlx::Connection>::Options;

/// Outbox rows as the runtime delivers them: row id and the row's keys.
pub(crate) type Rows = Vec<(i64, Vec<String>)>;

/// Outbox rows claimed by a relay: row id, keys and the row's age in seconds.
pub(crate) type ClaimedRows = Vec<(i64, Vec<String>, f64)>;

/// The application name of the relay's `LISTEN` connection (visible in `pg_stat_activity`).
pub const LISTEN_APPLICATION_NAME: &str = "cache_invalidation_relay";

/// The notification payload that asks every relay to deliver every row now, whatever its age: sent by a
/// writer whose own delivery failed after `COMMIT`, so that relays of processes that can reach the store do
/// not wait for the grace period.
pub(crate) const DRAIN_PAYLOAD: &str = "drain";

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
    /// What a relay waits on besides its sweep timer.
    #[doc(hidden)]
    type Listen: Send + Sync + std::fmt::Debug + 'static;
    /// Rows claimed by a relay batch until they are deleted.
    #[doc(hidden)]
    type Claim: Send;

    /// The state for `registry`.
    #[doc(hidden)]
    fn state(registry: &Registry) -> Self::State;

    /// Marks the connections of a [`CachedPool`](crate::CachedPool).
    #[doc(hidden)]
    fn wrap(options: ConnectOptions<Self>) -> ConnectOptions<Self>;

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

    /// The rows a writer delivers: after an autocommit statement (`in_transaction == false`, on the
    /// statement's connection) or before `COMMIT` (inside the transaction).
    #[doc(hidden)]
    fn written_rows<'a>(
        conn: &'a mut Self::Connection,
        state: &'a Self::State,
        in_transaction: bool,
    ) -> BoxFuture<'a, Result<Rows, sqlx::Error>>;

    /// Called as soon as the keys of `ids` are invalidated, before they are queued for deletion.
    #[doc(hidden)]
    fn invalidated(state: &Self::State, ids: &[i64]);

    /// Deletes delivered rows.
    #[doc(hidden)]
    fn delete<'a>(pool: &'a Pool<Self>, ids: &'a [i64]) -> BoxFuture<'a, Result<(), sqlx::Error>>;

    /// Asks every relay to deliver every row now.
    #[doc(hidden)]
    fn notify_drain(pool: &Pool<Self>) -> BoxFuture<'_, Result<(), sqlx::Error>>;

    /// Claims up to `batch` rows for a relay batch: rows of unwrapped sessions and rows older than `grace`,
    /// or, with `upto`, every row up to that id.
    #[doc(hidden)]
    fn claim<'a>(
        pool: &'a Pool<Self>,
        state: &'a Self::State,
        batch: i32,
        grace: Duration,
        upto: Option<i64>,
    ) -> BoxFuture<'a, Result<(Self::Claim, ClaimedRows), Error>>;

    /// Deletes the claimed rows `ids`, whose keys were invalidated, and releases the claim.
    #[doc(hidden)]
    fn complete<'a>(
        claim: Self::Claim,
        state: &'a Self::State,
        ids: &'a [i64],
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// The outbox's highest row id (0 when empty).
    #[doc(hidden)]
    fn max_id(pool: &Pool<Self>) -> BoxFuture<'_, Result<i64, Error>>;

    /// The outbox's depth, highest id and oldest row's age in seconds.
    #[doc(hidden)]
    fn backlog(pool: &Pool<Self>) -> BoxFuture<'_, Result<(i64, i64, f64), Error>>;

    /// Rows up to `upto` still in the outbox.
    #[doc(hidden)]
    fn pending_upto(pool: &Pool<Self>, upto: i64) -> BoxFuture<'_, Result<i64, Error>>;

    /// The relay's source of wake-ups for `pool`.
    #[doc(hidden)]
    fn listen_source(pool: &Pool<Self>) -> Self::Listen;

    /// Makes sure `listener` listens (PostgreSQL: `LISTEN` on a connection of `listen`); called before
    /// each sweep, so that no notification sent after the sweep's query is missed.
    #[doc(hidden)]
    fn listen<'a>(listen: &'a Self::Listen, listener: &'a mut Listener) -> BoxFuture<'a, ()>;

    /// Waits for a notification or the next `tick`; records in `listener` whether a drain of every row was
    /// asked for.
    #[doc(hidden)]
    fn wait<'a>(
        listener: &'a mut Listener,
        tick: &'a mut tokio::time::Interval,
    ) -> BoxFuture<'a, ()>;
}

/// A relay's open `LISTEN` connection (PostgreSQL), if any.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Listener {
    pg: Option<PgListener>,
    /// A notification asked for a drain of every row.
    pub(crate) urgent: bool,
}

impl Backend for Postgres {
    type State = ();
    type Listen = PgPool;
    type Claim = sqlx::Transaction<'static, Postgres>;

    fn state(_registry: &Registry) -> Self::State {}

    fn wrap(options: PgConnectOptions) -> PgConnectOptions {
        options.options([(WRAPPED_SETTING, "on")])
    }

    fn install<'a>(
        registry: &'a Registry,
        mode: TriggerMode,
        conn: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { Schema::new(registry).trigger_mode(mode).install(conn).await })
    }

    fn verify<'a>(
        registry: &'a Registry,
        conn: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { Schema::new(registry).verify(conn).await })
    }

    fn written_rows<'a>(
        conn: &'a mut PgConnection,
        _state: &'a (),
        in_transaction: bool,
    ) -> BoxFuture<'a, Result<Rows, sqlx::Error>> {
        let sql = if in_transaction {
            "SELECT id, keys FROM cache_invalidation.transaction_keys()"
        } else {
            "SELECT id, keys FROM cache_invalidation.session_keys()"
        };
        Box::pin(sqlx::query_as(sql).fetch_all(conn))
    }

    fn invalidated(_state: &(), _ids: &[i64]) {}

    fn delete<'a>(pool: &'a PgPool, ids: &'a [i64]) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query("SELECT cache_invalidation.delivered($1)")
                .bind(ids)
                .execute(pool)
                .await
                .map(drop)
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
        batch: i32,
        grace: Duration,
        upto: Option<i64>,
    ) -> BoxFuture<'a, Result<(Self::Claim, ClaimedRows), Error>> {
        Box::pin(async move {
            let mut tx = pool.begin().await?;
            let rows = sqlx::query_as(
                "SELECT id, keys, age_seconds FROM cache_invalidation.claim_rows($1, $2, $3)",
            )
            .bind(batch)
            .bind(grace)
            .bind(upto)
            .fetch_all(&mut *tx)
            .await?;
            Ok((tx, rows))
        })
    }

    fn complete<'a>(
        mut claim: Self::Claim,
        _state: &'a (),
        ids: &'a [i64],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if !ids.is_empty() {
                sqlx::query("SELECT cache_invalidation.delivered($1)")
                    .bind(ids)
                    .execute(&mut *claim)
                    .await?;
            }
            claim.commit().await?;
            Ok(())
        })
    }

    fn max_id(pool: &PgPool) -> BoxFuture<'_, Result<i64, Error>> {
        Box::pin(async move {
            Ok(sqlx::query_scalar("SELECT cache_invalidation.max_id()")
                .fetch_one(pool)
                .await?)
        })
    }

    fn backlog(pool: &PgPool) -> BoxFuture<'_, Result<(i64, i64, f64), Error>> {
        Box::pin(async move {
            Ok(sqlx::query_as(
                "SELECT depth, max_id, oldest_age_seconds FROM cache_invalidation.backlog()",
            )
            .fetch_one(pool)
            .await?)
        })
    }

    fn pending_upto(pool: &PgPool, upto: i64) -> BoxFuture<'_, Result<i64, Error>> {
        Box::pin(async move {
            Ok(
                sqlx::query_scalar("SELECT cache_invalidation.pending_upto($1)")
                    .bind(upto)
                    .fetch_one(pool)
                    .await?,
            )
        })
    }

    fn listen_source(pool: &PgPool) -> PgPool {
        let options = (*pool.connect_options())
            .clone()
            .application_name(LISTEN_APPLICATION_NAME);
        PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(options)
    }

    fn listen<'a>(listen: &'a PgPool, listener: &'a mut Listener) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if listener.pg.is_none() {
                listener.pg = pg_listen(listen).await;
            }
        })
    }

    fn wait<'a>(
        listener: &'a mut Listener,
        tick: &'a mut tokio::time::Interval,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(l) = listener.pg.as_mut() else {
                tick.tick().await;
                return;
            };
            tokio::select! {
                received = l.try_recv() => match received {
                    // Coalesce a burst of notifications into one sweep.
                    Ok(Some(n)) => {
                        listener.urgent |= n.payload() == DRAIN_PAYLOAD;
                        while let Some(n) = l.next_buffered() {
                            listener.urgent |= n.payload() == DRAIN_PAYLOAD;
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
        })
    }
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
