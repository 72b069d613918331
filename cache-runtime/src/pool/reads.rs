//! Reads through the pool: the entity-first [`CachedPool::get`], and [`CachedPool::get_or_load_on_replica`]
//! for custom loaders. Both load a miss on a connection whose snapshot is taken after the lease, on the
//! [read replica](super::CachedPoolOptions::read_replica) once it replayed every write the primary had
//! when the lease was taken (a replica further behind than
//! [`replica_wait`](super::CachedPoolOptions::replica_wait) is skipped for the primary), so that neither a
//! lagging standby nor an old snapshot can fill the cache with a row older than an acknowledged write.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::pool::PoolConnection;
use sqlx::{FromRow, IntoArguments};

use super::CachedPool;
use crate::backend::{Backend, select_by_key};
use crate::entity::KeyedEntity;
use crate::key::Key;

impl<DB: Backend> CachedPool<DB> {
    /// Reads the entity `T` whose own key has the values `id` (the key field's value, or a tuple of them
    /// in the key's order): a hit, or on a miss `SELECT * FROM <table> WHERE <key columns> = <id>` under
    /// the lease, decoded with `sqlx::FromRow` and cached for `T`'s `ttl` (`None`, no such row, as a
    /// tombstone). The safe way to read an entity: the query's snapshot is taken after the lease, on the
    /// primary or on a caught-up read replica.
    ///
    /// # Errors
    ///
    /// The [`sqlx::Error`] of the query (or of decoding the row), shared as in
    /// [`Cache::get_or_load`](crate::Cache::get_or_load).
    ///
    /// # Cancel safety
    ///
    /// As [`Cache::get_or_load`](crate::Cache::get_or_load).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use cache_runtime::{CachedEntity, CachedPgPool};
    /// #[derive(CachedEntity, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
    /// #[cached_entity(table = "products", key = "product:<id>")]
    /// struct Product {
    ///     id: i64,
    ///     name: String,
    /// }
    ///
    /// # async fn f(pool: CachedPgPool) -> Result<(), std::sync::Arc<sqlx::Error>> {
    /// let lamp: Option<Product> = pool.get::<Product>(&7).await?;
    /// # Ok(()) }
    /// ```
    pub async fn get<T>(&self, id: &T::Id) -> Result<Option<T>, Arc<sqlx::Error>>
    where
        T: KeyedEntity<DB> + for<'r> FromRow<'r, DB::Row> + Serialize + DeserializeOwned,
        DB::Arguments: IntoArguments<DB>,
    {
        self.cache()
            .get_entity(T::key_of(id), || async move {
                let mut args = DB::Arguments::default();
                T::bind_id(id, &mut args).map_err(sqlx::Error::Encode)?;
                let sql = select_by_key::<DB>(T::META);
                let query = sqlx::query_with(sqlx::AssertSqlSafe(sql), args);
                let mut conn = self.caught_up().await?;
                match DB::fetch_optional(&mut conn, query).await? {
                    Some(row) => T::from_row(&row).map(Some),
                    None => Ok(None),
                }
            })
            .await
    }

    /// Reads `key` through the cache; on a miss, runs `loader` on a connection whose server has every
    /// write the primary had when the lease was taken: the pool's
    /// [read replica](super::CachedPoolOptions::read_replica) once it caught up, else the primary. The
    /// loader must read only through the connection it is given.
    ///
    /// # Errors
    ///
    /// The loader's error, or the [`sqlx::Error`] of finding the connection, converted with `From` and
    /// shared as in [`Cache::get_or_load`](crate::Cache::get_or_load).
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
        F: FnOnce(PoolConnection<DB>) -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        self.cache()
            .get_or_load(key, || async move { loader(self.caught_up().await?).await })
            .await
    }

    /// A connection with every write the primary has now (see the module docs).
    async fn caught_up(&self) -> Result<PoolConnection<DB>, sqlx::Error> {
        let options = &self.core.options;
        DB::caught_up(
            self.sqlx_pool(),
            options.replica.as_ref(),
            options.replica_wait,
        )
        .await
    }
}
