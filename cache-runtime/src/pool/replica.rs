//! Loads on a read replica that are never older than the lease: [`CachedPool::get_or_load_on_replica`].
//!
//! After the lease is taken, the load reads the primary's WAL insert position `L`: every write whose
//! invalidation came before the lease committed before, so its commit record lies below `L`. The load then
//! runs on a replica connection only once that server has replayed up to `L`
//! (`pg_last_wal_replay_lsn() >= L`, checked on the connection handed to the loader, so its next snapshot
//! includes every such commit); a replica further behind than
//! [`replica_wait`](super::CachedPoolOptions::replica_wait) is skipped and the load runs on the primary.
//! Invalidations after the lease fail the fill as usual.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use tokio::time::Instant;

use super::CachedPool;
use crate::key::Key;
use crate::observe;

impl CachedPool<Postgres> {
    /// Reads `key` through the cache; on a miss, runs `loader` on a connection to the pool's
    /// [read replica](super::CachedPoolOptions::read_replica), once that replica has replayed every write
    /// the primary had when the lease was taken (or on the primary, when the replica lags more than
    /// [`replica_wait`](super::CachedPoolOptions::replica_wait), or when there is no replica). So a lagging
    /// standby never fills the cache with a value older than an acknowledged write.
    ///
    /// The loader must read only through the connection it is given.
    ///
    /// # Errors
    ///
    /// The loader's error, or the [`sqlx::Error`] of reading the primary's position or of the replica's
    /// check, converted with `From` and shared as in [`Cache::get_or_load`](crate::Cache::get_or_load).
    ///
    /// # Cancel safety
    ///
    /// As [`Cache::get_or_load`](crate::Cache::get_or_load).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use cache_runtime::{CachedPgPool, key};
    /// # async fn f(pool: CachedPgPool) -> Result<(), std::sync::Arc<sqlx::Error>> {
    /// let price: i64 = pool
    ///     .get_or_load_on_replica(key!("product:<id>", id = 7), |mut conn| async move {
    ///         sqlx::query_scalar("SELECT price_cents FROM products WHERE id = 7")
    ///             .fetch_one(&mut *conn)
    ///             .await
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load_on_replica<V, E, F, Fut>(
        &self,
        key: Key,
        loader: F,
    ) -> Result<V, Arc<E>>
    where
        V: Serialize + DeserializeOwned,
        E: From<sqlx::Error> + Send + Sync + 'static,
        F: FnOnce(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        self.cache()
            .get_or_load(key, || async move {
                let conn = self.caught_up_connection().await?;
                loader(conn).await
            })
            .await
    }

    /// A connection whose server has replayed every write the primary had now: the replica's, once it
    /// caught up within the wait, else the primary's.
    async fn caught_up_connection(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let primary = self.sqlx_pool();
        let Some(replica) = &self.core.options.replica else {
            return primary.acquire().await;
        };
        let position: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
            .fetch_one(primary)
            .await?;
        let mut conn = replica.acquire().await?;
        let deadline = Instant::now() + self.core.options.replica_wait;
        let mut backoff = Duration::from_millis(1);
        loop {
            // NULL: not in recovery (a promoted replica has everything it replayed).
            let caught_up: Option<bool> =
                sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                    .bind(&position)
                    .fetch_one(&mut *conn)
                    .await?;
            if caught_up != Some(false) {
                observe::replica_load("replica");
                return Ok(conn);
            }
            let now = Instant::now();
            if now >= deadline {
                observe::replica_load("primary");
                return primary.acquire().await;
            }
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }
}
