//! Reads through the pool: the entity-first [`CachedPool::get`], and [`CachedPool::get_or_load_on_replica`]
//! for custom loaders. Both load a miss on a connection whose snapshot is taken after the lease, on the
//! [read replica](super::CachedPoolOptions::read_replica) once it replayed every write the primary had
//! when the lease was taken (a replica further behind than
//! [`replica_wait`](super::CachedPoolOptions::replica_wait) is skipped for the primary), so that neither a
//! lagging standby nor an old snapshot can fill the cache with a row older than an acknowledged write.

use std::future::Future;
use std::sync::Arc;

use futures_util::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::pool::PoolConnection;
use sqlx::{FromRow, IntoArguments};

use super::CachedPool;
use crate::backend::{Backend, select_by_keys};
use crate::cache::LoadOptions;
use crate::cache::codec;
use crate::cache::sample::{Reload, SampleReload};
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
        T: KeyedEntity<DB>
            + for<'r> FromRow<'r, DB::Row>
            + Serialize
            + DeserializeOwned
            + Send
            + 'static,
        DB::Arguments: IntoArguments<DB> + Clone,
    {
        let key = T::key_of(id);
        let mut options = LoadOptions::new().ttl(T::META.ttl);
        if self.cache().draw_sample() {
            options.sample = self.reload_of::<T>(id);
        }
        if let Some(window) = T::REFRESH {
            self.core
                .relay
                .outbox
                .guarded
                .refresh
                .read(key.as_str(), window, || self.refresh_of::<T>(&key, id));
        }
        self.cache()
            .get_or_load_with(key, options, || async move {
                let mut args = DB::Arguments::default();
                T::bind_id(id, &mut args).map_err(sqlx::Error::Encode)?;
                self.load_entity::<T>(args).await
            })
            .await
    }

    /// Loads the entity `T` whose key values are bound in `args`: `SELECT * FROM <table> WHERE <key
    /// columns> = …` on a connection with every write the primary has now.
    async fn load_entity<T>(&self, args: DB::Arguments) -> Result<Option<T>, sqlx::Error>
    where
        T: KeyedEntity<DB> + for<'r> FromRow<'r, DB::Row>,
        DB::Arguments: IntoArguments<DB>,
    {
        let sql = select_by_keys::<DB>(T::META, 1);
        let query = sqlx::query_with(sqlx::AssertSqlSafe(sql), args);
        let mut conn = self.caught_up().await?;
        match DB::fetch_optional(&mut conn, query).await? {
            Some(row) => T::from_row(&row).map(Some),
            None => Ok(None),
        }
    }

    /// How a hot key of `T` is refreshed after its invalidation (see [`refresh`](crate::refresh)): a
    /// read of `key` through the cache, as [`get`](Self::get) does on a miss. It holds the pool weakly
    /// (the pool's store holds it). `None` when `id` cannot be bound.
    fn refresh_of<T>(&self, key: &Key, id: &T::Id) -> Option<crate::refresh::Reload>
    where
        T: KeyedEntity<DB>
            + for<'r> FromRow<'r, DB::Row>
            + Serialize
            + DeserializeOwned
            + Send
            + 'static,
        DB::Arguments: IntoArguments<DB> + Clone,
    {
        let mut args = DB::Arguments::default();
        T::bind_id(id, &mut args).ok()?;
        // A mutex for `Sync` (the arguments are `Send` only); cloned for each refresh.
        let args = std::sync::Mutex::new(args);
        let core = Arc::downgrade(&self.core);
        let key = key.clone();
        Some(Arc::new(move || {
            let (core, key) = (core.clone(), key.clone());
            let args = args.lock().ok().map(|a| a.clone());
            Box::pin(async move {
                let (Some(core), Some(args)) = (core.upgrade(), args) else {
                    return;
                };
                let pool = CachedPool { core };
                let options = LoadOptions::new().ttl(T::META.ttl);
                let loaded = pool
                    .cache()
                    .get_or_load_with(key, options, || pool.load_entity::<T>(args))
                    .await;
                if let Err(error) = loaded {
                    tracing::debug!(%error, "refresh of a hot key failed; it stays invalidated");
                }
            })
        }))
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
    /// # use cache_runtime::{CachedEntity, CachedPgPool, key};
    /// # #[derive(CachedEntity)]
    /// # #[cached_entity(key = "product:<id>")]
    /// # struct Product { id: i64 }
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

    /// How the consistency sampler reads `id`'s row again (twice at most), encoded as the cache does:
    /// on the primary. `None` when `id` cannot be bound.
    fn reload_of<T>(&self, id: &T::Id) -> Option<SampleReload>
    where
        T: KeyedEntity<DB> + for<'r> FromRow<'r, DB::Row> + Serialize + 'static,
        DB::Arguments: IntoArguments<DB>,
    {
        let mut args = Vec::new();
        for _ in 0..2 {
            let mut one = DB::Arguments::default();
            T::bind_id(id, &mut one).ok()?;
            args.push(one);
        }
        let args = std::sync::Mutex::new(args);
        let pool = self.clone();
        let reload: Reload = Arc::new(move || {
            let args = args.lock().ok().and_then(|mut a| a.pop());
            let pool = pool.clone();
            Box::pin(async move {
                let args = args.ok_or("a consistency sample was reloaded more than twice")?;
                let sql = select_by_keys::<DB>(T::META, 1);
                let query = sqlx::query_with(sqlx::AssertSqlSafe(sql), args);
                let mut conn = pool.sqlx_pool().acquire().await?;
                let row = DB::fetch_optional(&mut conn, query).await?;
                let value: Option<T> = row.map(|row| T::from_row(&row)).transpose()?;
                Ok(codec::encode(&value)?)
            })
        });
        Some(SampleReload(reload))
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

impl<DB: Backend> CachedPool<DB> {
    /// [`get`](Self::get) for many entities at once: every key is read in the same round trip (the
    /// reads are pipelined on the store's connection), and the misses are loaded by **one** query
    /// (`… WHERE (key columns) IN (…)`) once each of them holds its lease, so its snapshot is taken after
    /// every lease. Returns the entities in the order of `ids` (`None`: no such row, cached as a
    /// tombstone).
    ///
    /// # Errors
    ///
    /// The [`sqlx::Error`] of the query (or of decoding a row).
    ///
    /// # Cancel safety
    ///
    /// As [`Cache::get_or_load`](crate::Cache::get_or_load).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use cache_runtime::{CachedEntity, CachedPgPool};
    /// # #[derive(Clone, CachedEntity, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
    /// # #[cached_entity(table = "products", key = "product:<id>")]
    /// # struct Product { id: i64, name: String }
    /// # async fn f(pool: CachedPgPool) -> Result<(), std::sync::Arc<sqlx::Error>> {
    /// let products: Vec<Option<Product>> = pool.get_many::<Product>(&[1, 2, 3]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_many<T>(&self, ids: &[T::Id]) -> Result<Vec<Option<T>>, Arc<sqlx::Error>>
    where
        T: KeyedEntity<DB>
            + for<'r> FromRow<'r, DB::Row>
            + Serialize
            + DeserializeOwned
            + Clone
            + Send,
        DB::Arguments: IntoArguments<DB>,
    {
        // One read per distinct key: two reads of one key in one batch would share one flight, whose
        // follower would wait for its leader's load, which waits for the batch.
        let mut distinct: Vec<usize> = Vec::new();
        let mut of: Vec<usize> = Vec::with_capacity(ids.len());
        let mut seen = std::collections::HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            let slot = *seen.entry(T::key_of(id).into_string()).or_insert_with(|| {
                distinct.push(i);
                distinct.len() - 1
            });
            of.push(slot);
        }
        let batch = batch::Batch::<T>::new(distinct.len());
        let reads = distinct.iter().map(|&i| {
            let batch = &batch;
            async move {
                let mut arrival = batch.arrival();
                let read = self
                    .cache()
                    .get_entity(T::key_of(&ids[i]), || async {
                        arrival.loading();
                        batch.wait(i).await
                    })
                    .await;
                drop(arrival);
                read.map_err(|e| Arc::clone(&*e))
            }
        });
        let load = batch.load(|indices| self.select_many(ids, indices));
        let (reads, ()) =
            futures_util::future::join(futures_util::future::join_all(reads), load).await;
        let reads: Vec<Option<T>> = reads.into_iter().collect::<Result<_, _>>()?;
        Ok(of.into_iter().map(|slot| reads[slot].clone()).collect())
    }

    /// The rows of `ids[indices]`, by index.
    async fn select_many<T>(
        &self,
        ids: &[T::Id],
        indices: Vec<usize>,
    ) -> Result<Vec<(usize, Option<T>)>, sqlx::Error>
    where
        T: KeyedEntity<DB> + for<'r> FromRow<'r, DB::Row> + Clone,
        DB::Arguments: IntoArguments<DB>,
    {
        let mut args = DB::Arguments::default();
        for &i in &indices {
            T::bind_id(&ids[i], &mut args).map_err(sqlx::Error::Encode)?;
        }
        let sql = select_by_keys::<DB>(T::META, indices.len());
        let query = sqlx::query_with(sqlx::AssertSqlSafe(sql), args);
        let mut conn = self.caught_up().await?;
        let rows: Vec<T> = DB::fetch_many(&mut conn, query)
            .try_filter_map(|item| async move { Ok(item.right()) })
            .map(|row| row.and_then(|row| T::from_row(&row)))
            .try_collect()
            .await?;
        let by_key: std::collections::HashMap<String, T> = rows
            .into_iter()
            .map(|row| (row.cache_key().into_string(), row))
            .collect();
        Ok(indices
            .into_iter()
            .map(|i| (i, by_key.get(T::key_of(&ids[i]).as_str()).cloned()))
            .collect())
    }
}

mod batch {
    //! The rendezvous of [`CachedPool::get_many`](super::CachedPool::get_many): each key's read either
    //! finishes (a hit, or a value shared by another reader) or reaches its loader (holding its lease).
    //! One query loads the keys whose loaders wait, as soon as every read is decided, or 20 ms after the
    //! first loader began waiting (a read may wait for a reader of another batch, whose load waits in
    //! turn); loaders that arrive later are loaded by the next query.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::sync::watch;

    /// How long loaders wait for undecided reads before their query runs anyway.
    const GATHER: Duration = Duration::from_millis(20);

    type Row<T> = Result<Option<T>, Arc<sqlx::Error>>;

    pub(super) struct Batch<T> {
        state: Mutex<State<T>>,
        /// Bumped at every change of `state`.
        changed: watch::Sender<u64>,
    }

    struct State<T> {
        /// Reads that have neither finished nor reached their loader.
        undecided: usize,
        /// Indices whose loaders wait for a query.
        waiting: Vec<usize>,
        /// What the queries found, by index.
        rows: HashMap<usize, Row<T>>,
    }

    /// One read's part in the batch: decided when its loader runs or when it is dropped.
    pub(super) struct Arrival<'b, T> {
        batch: &'b Batch<T>,
        decided: bool,
    }

    impl<T> Arrival<'_, T> {
        /// The read's loader runs: it waits for a query.
        pub(super) fn loading(&mut self) {
            self.decide();
        }

        fn decide(&mut self) {
            if !std::mem::replace(&mut self.decided, true) {
                self.batch.update(|state| state.undecided -= 1);
            }
        }
    }

    impl<T> Drop for Arrival<'_, T> {
        fn drop(&mut self) {
            self.decide();
        }
    }

    impl<T> Batch<T> {
        pub(super) fn new(reads: usize) -> Self {
            Self {
                state: Mutex::new(State {
                    undecided: reads,
                    waiting: Vec::new(),
                    rows: HashMap::new(),
                }),
                changed: watch::channel(0).0,
            }
        }

        fn update<R>(&self, change: impl FnOnce(&mut State<T>) -> R) -> R {
            let result = change(
                &mut self
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            self.changed.send_modify(|n| *n += 1);
            result
        }

        /// Reads (or takes from) the state without telling anyone: nothing they wait for changed.
        fn read<R>(&self, look: impl FnOnce(&mut State<T>) -> R) -> R {
            look(
                &mut self
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
        }

        /// The arrival of a read.
        pub(super) fn arrival(&self) -> Arrival<'_, T> {
            Arrival {
                batch: self,
                decided: false,
            }
        }

        /// The loader of read `index`: waits for a query and takes its row.
        pub(super) async fn wait(&self, index: usize) -> Row<T> {
            let mut changed = self.changed.subscribe();
            self.update(|state| state.waiting.push(index));
            loop {
                if let Some(row) = self.read(|state| state.rows.remove(&index)) {
                    return row;
                }
                if changed.changed().await.is_err() {
                    return Err(Arc::new(sqlx::Error::PoolClosed));
                }
            }
        }

        /// Runs `query` for the waiting indices, round after round, until every read is decided and no
        /// loader waits.
        pub(super) async fn load<F, Fut>(&self, query: F)
        where
            F: Fn(Vec<usize>) -> Fut,
            Fut: Future<Output = Result<Vec<(usize, Option<T>)>, sqlx::Error>>,
        {
            let mut changed = self.changed.subscribe();
            loop {
                let (undecided, waiting) =
                    self.read(|state| (state.undecided, !state.waiting.is_empty()));
                if undecided == 0 && !waiting {
                    return;
                }
                if waiting && undecided > 0 {
                    // Give the other reads a moment to reach their loaders (or to finish).
                    let _ = tokio::time::timeout(GATHER, async {
                        while self.read(|state| state.undecided) > 0 {
                            if changed.changed().await.is_err() {
                                return;
                            }
                        }
                    })
                    .await;
                }
                if waiting {
                    let indices = self.update(|state| std::mem::take(&mut state.waiting));
                    let found = query(indices.clone()).await.map_err(Arc::new);
                    self.update(|state| match found {
                        Ok(rows) => state
                            .rows
                            .extend(rows.into_iter().map(|(i, row)| (i, Ok(row)))),
                        Err(error) => state
                            .rows
                            .extend(indices.into_iter().map(|i| (i, Err(Arc::clone(&error))))),
                    });
                } else if changed.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}
