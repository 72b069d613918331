//! Delivery of outbox rows the writing session did not deliver itself.
//!
//! A background task of [`CachedPool`](crate::CachedPool) `LISTEN`s on [`NOTIFY_CHANNEL`] (written at commit by
//! sessions that do not go through the wrapper: `psql`, a plain `PgPool`, another service) and sweeps the
//! outbox periodically. A sweep claims rows with `FOR UPDATE SKIP LOCKED` (several relays can run at once),
//! invalidates their keys in the store, deletes them and commits; when the store fails, the transaction rolls
//! back and the rows stay for the next sweep (at-least-once delivery).
//!
//! It delivers the rows of unwrapped sessions at once, and rows of wrapped sessions once they are older than
//! the grace period ([`CachedPoolOptions::wrapped_grace`](crate::CachedPoolOptions::wrapped_grace)): those
//! are normally delivered by the writing call itself; rows still there later were left behind (the store call
//! failed, the process crashed after `COMMIT`, or the statement was not classified as a write).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;

use crate::error::Error;
use crate::schema::NOTIFY_CHANNEL;
use crate::store::Store;

/// How the relay runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayConfig {
    /// Age after which rows of wrapped sessions are delivered by the relay.
    pub(crate) wrapped_grace: Duration,
    /// Time between two sweeps when no notification arrives.
    pub(crate) sweep_interval: Duration,
    /// Outbox rows per sweep transaction.
    pub(crate) batch: i32,
    /// The longest a delivery waits for the store.
    pub(crate) store_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            wrapped_grace: Duration::from_secs(2),
            sweep_interval: Duration::from_millis(500),
            batch: 500,
            store_timeout: Duration::from_millis(500),
        }
    }
}

/// Runs the relay until the task is aborted.
///
/// `listen_pool` is a pool of its own (one connection) for the `LISTEN` connection, which a `PgListener`
/// holds for as long as it lives: it must not take a connection of the application's pool.
pub(crate) async fn run(
    pool: PgPool,
    listen_pool: PgPool,
    store: Arc<dyn Store>,
    config: RelayConfig,
) {
    let mut listener = None;
    let mut tick = tokio::time::interval(config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if listener.is_none() {
            listener = listen(&listen_pool).await;
        }
        if let Err(error) = sweep(&pool, store.as_ref(), &config).await {
            tracing::warn!(%error, "cache invalidation relay: sweep failed; retrying at the next tick");
        }
        match listener.as_mut() {
            Some(l) => {
                tokio::select! {
                    received = l.recv() => match received {
                        // Coalesce a burst of notifications into one sweep.
                        Ok(_) => while l.next_buffered().is_some() {},
                        Err(error) => {
                            tracing::warn!(%error, "cache invalidation relay: LISTEN connection lost; reconnecting");
                            listener = None;
                            tick.tick().await;
                        }
                    },
                    _ = tick.tick() => {}
                }
            }
            None => {
                tick.tick().await;
            }
        }
    }
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let result = async {
        let mut listener = PgListener::connect_with(pool).await?;
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

/// Delivers every deliverable outbox row, batch by batch; returns the number of rows delivered.
pub(crate) async fn sweep(
    pool: &PgPool,
    store: &dyn Store,
    config: &RelayConfig,
) -> Result<usize, Error> {
    let mut delivered = 0;
    loop {
        let mut tx = pool.begin().await?;
        let rows: Vec<(i64, Vec<String>)> =
            sqlx::query_as("SELECT id, keys FROM cache_invalidation.claim($1, $2)")
                .bind(config.batch)
                .bind(config.wrapped_grace)
                .fetch_all(&mut *tx)
                .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(delivered);
        }
        let (ids, keys) = split(rows);
        // On a store error the transaction rolls back on drop: the rows stay for the next sweep.
        match tokio::time::timeout(config.store_timeout, store.invalidate(&keys)).await {
            Ok(result) => result?,
            Err(_) => return Err(Error::StoreTimeout(config.store_timeout)),
        }
        sqlx::query("SELECT cache_invalidation.delivered($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::debug!(
            rows = ids.len(),
            keys = keys.len(),
            "relay delivered outbox rows"
        );
        delivered += ids.len();
        if ids.len() < usize::try_from(config.batch).unwrap_or(usize::MAX) {
            return Ok(delivered);
        }
    }
}

/// The row ids and the distinct keys of outbox rows.
pub(crate) fn split(rows: Vec<(i64, Vec<String>)>) -> (Vec<i64>, Vec<String>) {
    let mut ids = Vec::with_capacity(rows.len());
    let mut keys = BTreeSet::new();
    for (id, row_keys) in rows {
        ids.push(id);
        keys.extend(row_keys);
    }
    (ids, keys.into_iter().collect())
}
