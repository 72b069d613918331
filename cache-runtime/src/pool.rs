//! [`CachedPool`] and [`CachedTransaction`]: a `PgPool` or `SqlitePool` wrapper that invalidates the cache
//! after every committed write.
//!
//! One implementation serves both databases ([`CachedPgPool`], [`CachedSqlitePool`]); what differs is the
//! outbox query of each [`Backend`] (see the [`backend`](crate::backend) module for the differences in
//! guarantees). The text below describes PostgreSQL; on SQLite the same holds with these changes: the
//! statement or `COMMIT` is followed by a query for every outbox row above the process's delivered
//! watermark (SQLite has one writer at a time, so row ids are in commit order), which also delivers rows
//! other clients left; writes by other clients are delivered by the relay's periodic sweep, as SQLite has
//! no `NOTIFY`; `REPLACE INTO` counts as a writing keyword.
//!
//! # How writes reach the store
//!
//! The triggers installed by [`Schema`](crate::Schema) write the keys of every changed row into the outbox, in the writing
//! transaction. The wrapper then delivers them:
//!
//! - **Transactions** ([`CachedPool::begin`]): the outermost [`CachedTransaction::commit`] reads the
//!   transaction's outbox rows (`txid = pg_current_xact_id_if_assigned()`), sends `COMMIT`, invalidates the
//!   keys in one store round trip, and returns. Every write inside the transaction is covered, whatever the
//!   statement (functions, cascades, `COPY`, …). Savepoints ([`CachedTransaction::begin`]) publish nothing
//!   themselves; the rows of a rolled-back savepoint vanish with it. Rollback and drop publish nothing.
//! - **Autocommit statements on `&CachedPool`**: statements that *may write* (see below) are followed, on
//!   the same connection, by one query for this backend's new outbox rows, whose keys are invalidated before
//!   the call returns. Statements that cannot write cost nothing extra.
//!
//! After a successful `COMMIT`, a store failure is logged (`tracing`, target `cache_runtime`) and never
//! returned: the rows stay in the outbox and the relay delivers them. Before the call returns, the pool's
//! read gate is closed (reads of [`CachedPool::cache`] go to the loader until those rows are delivered)
//! and every relay is asked to deliver at once (see the [`breaker`](crate::breaker) and
//! [`relay`] modules). While the circuit breaker is open, commits do not call the store at
//! all. Delivered rows are deleted by a background task in batches, with `synchronous_commit = off`: the
//! caller's path has no extra WAL flush.
//!
//! # Which autocommit statements get read-your-writes synchronously
//!
//! With the default [`WriteDetection::Keywords`], a statement executed on `&CachedPool` is followed by the
//! outbox query when its SQL text, outside comments, string literals, quoted identifiers and dollar-quoted
//! bodies, contains one of the words `INSERT`, `UPDATE` (except in `FOR UPDATE` / `FOR NO KEY UPDATE`),
//! `DELETE`, `MERGE`, `CALL`, `COPY`, `TRUNCATE`, `DO`, `EXECUTE` (case-insensitive). That covers:
//! `INSERT`/`UPDATE`/`DELETE` (with `RETURNING`, `ON CONFLICT`, `FROM`, `USING`), data-modifying CTEs
//! (`WITH x AS (UPDATE …) SELECT …`) through any `fetch_*`, `MERGE`, `CALL` of procedures, `DO` blocks,
//! `TRUNCATE`, `EXECUTE` of prepared statements, `ON DELETE CASCADE` and trigger-made writes caused by such a
//! statement, and multi-statement `raw_sql` containing any of them.
//!
//! Not detected, so delivered by the relay (within [`CachedPoolOptions::wrapped_grace`] plus a sweep
//! interval, 2.5 s by default) instead of before the call returns: a *read-looking* statement that writes
//! through a function, such as `SELECT my_writing_function()` or `VALUES (nextval_and_write())`. Run such
//! statements in a [`CachedTransaction`] (always synchronous), or choose [`WriteDetection::Always`], which
//! follows every autocommit statement with the outbox query (one extra round trip per read).
//!
//! Writes through [`CachedPool::pg_pool`] (the bare pool) are not delivered synchronously either; they are
//! relayed like the above.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;
use futures_util::{StreamExt as _, TryStreamExt as _};
use sqlx::pool::{PoolConnection, PoolOptions};
use sqlx::{Database, Either, Execute, Executor, PgPool, Pool, Postgres};
use sqlx_core::ext::async_stream::TryAsyncStream;
use sqlx_core::sql_str::SqlStr;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::backend::{Backend, ConnectOptions, Rows};
use crate::breaker::{BreakerConfig, Health};
use crate::cache::Cache;
use crate::classify::may_write;
use crate::error::Error;
use crate::registry::{Registry, registry};
use crate::relay::{self, Relay, RelayConfig};
use crate::schema::TriggerMode;
use crate::store::Store;

/// A [`CachedPool`] on PostgreSQL.
pub type CachedPgPool = CachedPool<Postgres>;

/// A [`CachedPool`] on SQLite (feature `sqlite`, on by default).
#[cfg(feature = "sqlite")]
pub type CachedSqlitePool = CachedPool<sqlx::Sqlite>;

/// How [`CachedPool`] decides that an autocommit statement may have written (see the
/// [module docs](crate::pool)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WriteDetection {
    /// Statements containing a writing keyword ([`WRITE_WORDS`](crate::WRITE_WORDS)) are followed by the
    /// outbox query; others rely on the relay. No extra round trip for plain reads.
    #[default]
    Keywords,
    /// Every autocommit statement is followed by the outbox query: synchronous for every write, one extra
    /// round trip per read.
    Always,
}

/// Builder of a [`CachedPool`].
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> Result<(), cache_runtime::Error> {
/// use cache_runtime::{CachedPgPool, RedisStore};
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379", "myapp:").await?;
/// let pool = CachedPgPool::options()
///     .install_schema(true)
///     .connect("postgres://app@localhost/app", store)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CachedPoolOptions<DB: Backend = Postgres> {
    registry: Option<Registry>,
    pool_options: PoolOptions<DB>,
    install: bool,
    trigger_mode: TriggerMode,
    relay: bool,
    relay_config: RelayConfig,
    breaker: BreakerConfig,
    detection: WriteDetection,
    #[cfg(feature = "fault-injection")]
    crash_after_commit: bool,
}

impl<DB: Backend> Clone for CachedPoolOptions<DB> {
    fn clone(&self) -> Self {
        Self {
            registry: self.registry.clone(),
            pool_options: self.pool_options.clone(),
            ..*self
        }
    }
}

impl<DB: Backend> Default for CachedPoolOptions<DB> {
    fn default() -> Self {
        Self::new()
    }
}

impl<DB: Backend> CachedPoolOptions<DB> {
    /// Defaults: the program's [`registry()`], `PoolOptions::new()`, verify (not install) the schema, relay
    /// on, [`WriteDetection::Keywords`].
    pub fn new() -> Self {
        Self {
            registry: None,
            pool_options: PoolOptions::new(),
            install: false,
            trigger_mode: TriggerMode::default(),
            relay: true,
            relay_config: RelayConfig::default(),
            breaker: BreakerConfig::default(),
            detection: WriteDetection::default(),
            #[cfg(feature = "fault-injection")]
            crash_after_commit: false,
        }
    }

    /// Uses `registry` instead of every entity linked into the program.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Options of the underlying pool (size, timeouts, …).
    pub fn pool_options(mut self, options: PoolOptions<DB>) -> Self {
        self.pool_options = options;
        self
    }

    /// Installs (or updates) the triggers at connect instead of only checking them. Needs a role that may
    /// create triggers on the registered tables.
    pub fn install_schema(mut self, install: bool) -> Self {
        self.install = install;
        self
    }

    /// The trigger mode used when [installing](Self::install_schema).
    pub fn trigger_mode(mut self, mode: TriggerMode) -> Self {
        self.trigger_mode = mode;
        self
    }

    /// Runs the relay as a background task of the pool (default `true`). Without it, writes by other
    /// clients and left-behind rows wait for a relay running elsewhere (the pool still drains the outbox
    /// itself to reopen its read gate after a store outage). The relay's `LISTEN` connection is one
    /// connection outside the pool; its sweeps use the pool.
    pub fn relay(mut self, enabled: bool) -> Self {
        self.relay = enabled;
        self
    }

    /// Age after which the relay delivers outbox rows written through a wrapper (default 2 s). They are
    /// normally delivered by the writing call itself; this is the delay for the ones that were not.
    pub fn wrapped_grace(mut self, grace: Duration) -> Self {
        self.relay_config.wrapped_grace = grace;
        self
    }

    /// Time between two relay sweeps without notification (default 500 ms).
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.relay_config.sweep_interval = interval;
        self
    }

    /// The longest a write waits for the store after `COMMIT` (default 500 ms). When the store is slower or
    /// down, the call returns `Ok` anyway, the keys stay in the outbox and the relay delivers them later.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.relay_config.store_timeout = timeout;
        self
    }

    /// Outbox rows per relay batch (default 5,000; see [`RelayBuilder::batch_rows`](crate::RelayBuilder::batch_rows)).
    pub fn batch_rows(mut self, rows: u32) -> Self {
        self.relay_config.batch = i32::try_from(rows.max(1)).unwrap_or(i32::MAX);
        self
    }

    /// The circuit breaker in front of the store, shared by the pool's reads, commits and relay.
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// Fault injection for tests: writes commit but their keys are never sent to the store by the writing
    /// call, as if the process died between `COMMIT` and the store call. The relay delivers them after
    /// the grace period. Only with the `fault-injection` feature; never use it in production.
    #[cfg(feature = "fault-injection")]
    pub fn crash_after_commit(mut self, crash: bool) -> Self {
        self.crash_after_commit = crash;
        self
    }

    /// How autocommit writes are detected.
    pub fn write_detection(mut self, detection: WriteDetection) -> Self {
        self.detection = detection;
        self
    }

    /// Connects to `url` (see [`connect_with`](Self::connect_with)).
    ///
    /// # Errors
    ///
    /// As [`connect_with`](Self::connect_with); also [`Error::Database`] for an invalid URL.
    ///
    /// # Cancel safety
    ///
    /// As [`connect_with`](Self::connect_with).
    pub async fn connect(self, url: &str, store: impl Store) -> Result<CachedPool<DB>, Error> {
        let options: ConnectOptions<DB> = url.parse()?;
        self.connect_with(options, store).await
    }

    /// Connects, installs or verifies the schema, and starts the relay.
    ///
    /// # Errors
    ///
    /// [`Error::Registry`] when entities contradict each other; [`Error::Database`] when the database cannot
    /// be reached; [`Error::NotInstalled`],
    /// [`Error::FingerprintMismatch`] or [`Error::SchemaVersionMismatch`] when the installed triggers do not
    /// match this build (saying what to run); the errors of [`Schema::install`](crate::Schema::install) when installing.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the pool; a schema install in progress rolls back.
    pub async fn connect_with(
        self,
        options: ConnectOptions<DB>,
        store: impl Store,
    ) -> Result<CachedPool<DB>, Error> {
        let registry = self.registry.unwrap_or_else(|| registry().clone());
        registry.validate()?;
        let pool = self.pool_options.connect_with(DB::wrap(options)).await?;
        {
            let mut conn = pool.acquire().await?;
            if self.install {
                DB::install(&registry, self.trigger_mode, &mut conn).await?;
            }
            DB::verify(&registry, &mut conn).await?;
        }
        let mut pool = CachedPool::from_parts(
            pool,
            Arc::new(store),
            registry,
            self.relay_config,
            self.relay,
            self.breaker,
            self.detection,
        );
        #[cfg(feature = "fault-injection")]
        if let Some(core) = Arc::get_mut(&mut pool.core) {
            core.crash_after_commit = self.crash_after_commit;
        }
        #[cfg(not(feature = "fault-injection"))]
        let _ = &mut pool;
        Ok(pool)
    }
}

/// A PostgreSQL ([`CachedPgPool`]) or SQLite ([`CachedSqlitePool`]) pool whose committed writes invalidate
/// the cache.
///
/// Connect with `CachedPgPool::connect` / `CachedSqlitePool::connect` or their `options()` (as with sqlx's
/// `PgPool` and `SqlitePool`; `CachedPool::connect` alone cannot tell which database is meant). In type
/// positions `CachedPool` means `CachedPool<Postgres>`.
///
/// `&CachedPool` is a [`sqlx::Executor`]: `query`, `query_as`, `query_scalar` and the `query!` macros work
/// unchanged. See the [module docs](crate::pool) for what is delivered when.
///
/// Cloning is cheap and shares the pool, the store and the background tasks, which stop when the last clone
/// is dropped.
///
/// # Cancel safety
///
/// For the `Executor` methods on `&CachedPool` (autocommit statements): dropping the future or stream
/// before the statement was sent runs nothing. Dropping it later (the statement may have committed) still
/// delivers the statement's keys: the delivery is spawned as a task of its own when the statement completes
/// or when the future/stream is dropped, whichever comes first, and it is not interrupted by the caller.
/// A call that returns has awaited that delivery (bounded by
/// [`store_timeout`](CachedPoolOptions::store_timeout)).
///
/// # Examples
///
/// ```no_run
/// # async fn f(pool: cache_runtime::CachedPool) -> Result<(), sqlx::Error> {
/// // Autocommit: returns after the keys of row 123 were invalidated.
/// sqlx::query("UPDATE products SET price_cents = $1 WHERE id = $2")
///     .bind(8000_i64)
///     .bind(123_i64)
///     .execute(&pool)
///     .await?;
///
/// // Transaction: invalidates after COMMIT.
/// let mut tx = pool.begin().await?;
/// sqlx::query("DELETE FROM products WHERE id = $1").bind(7_i64).execute(&mut tx).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub struct CachedPool<DB: Backend = Postgres> {
    core: Arc<Core<DB>>,
}

impl<DB: Backend> Clone for CachedPool<DB> {
    fn clone(&self) -> Self {
        Self {
            core: Arc::clone(&self.core),
        }
    }
}

/// State shared by the pool's clones and its tasks.
struct Core<DB: Backend> {
    pool: Pool<DB>,
    state: Arc<DB::State>,
    store: Arc<dyn Store>,
    cache: Cache,
    registry: Registry,
    detection: WriteDetection,
    relay_config: RelayConfig,
    health: Arc<Health>,
    delivered: mpsc::UnboundedSender<Vec<i64>>,
    relay: Relay<DB>,
    relay_task: Option<JoinHandle<()>>,
    recovery_task: JoinHandle<()>,
    #[cfg(feature = "fault-injection")]
    crash_after_commit: bool,
}

impl<DB: Backend> Drop for Core<DB> {
    fn drop(&mut self) {
        if let Some(relay) = &self.relay_task {
            relay.abort();
        }
        self.recovery_task.abort();
    }
}

impl<DB: Backend> fmt::Debug for CachedPool<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedPool")
            .field("pool", &self.core.pool)
            .field("store", &self.core.store)
            .field("detection", &self.core.detection)
            .field("relay", &self.core.relay_task.is_some())
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> CachedPool<DB> {
    /// Connects with the default [options](CachedPoolOptions): the program's registry, the schema verified
    /// (not installed), the relay running.
    ///
    /// # Errors
    ///
    /// See [`CachedPoolOptions::connect_with`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the pool; nothing else happens.
    pub async fn connect(url: &str, store: impl Store) -> Result<Self, Error> {
        CachedPoolOptions::new().connect(url, store).await
    }

    /// A builder of options.
    pub fn options() -> CachedPoolOptions<DB> {
        CachedPoolOptions::new()
    }

    #[allow(clippy::too_many_arguments)]
    fn from_parts(
        pool: Pool<DB>,
        store: Arc<dyn Store>,
        registry: Registry,
        relay_config: RelayConfig,
        run_relay: bool,
        breaker: BreakerConfig,
        detection: WriteDetection,
    ) -> Self {
        let (delivered, receiver) = mpsc::unbounded_channel();
        tokio::spawn(delete_delivered(pool.clone(), receiver));
        let health = Arc::new(Health::new(breaker, true));
        let state = Arc::new(DB::state(&registry));
        let relay = Relay::from_parts(
            pool.clone(),
            Arc::clone(&store),
            relay_config,
            Arc::clone(&health),
            Arc::clone(&state),
        );
        let relay_task = run_relay.then(|| {
            let relay = relay.clone();
            tokio::spawn(async move { relay.run().await })
        });
        let recovery_task = {
            let (relay, health) = (relay.clone(), Arc::clone(&health));
            tokio::spawn(async move { relay.recover(health).await })
        };
        Self {
            core: Arc::new(Core {
                pool,
                state,
                cache: Cache::builder_shared(Arc::clone(&store))
                    .breaker(breaker)
                    .build_with(Arc::clone(&health)),
                store,
                registry,
                detection,
                relay_config,
                health,
                delivered,
                relay,
                relay_task,
                recovery_task,
                #[cfg(feature = "fault-injection")]
                crash_after_commit: false,
            }),
        }
    }

    /// Begins a transaction; its writes are invalidated when the outermost [`CachedTransaction::commit`]
    /// returns.
    ///
    /// # Errors
    ///
    /// The [`sqlx::Error`] of acquiring a connection or of `BEGIN`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future returns the connection to the pool (rolling back a started transaction).
    pub async fn begin(&self) -> Result<CachedTransaction<'static, DB>, sqlx::Error> {
        let tx = self.core.pool.begin().await?;
        Ok(CachedTransaction {
            tx,
            core: Arc::clone(&self.core),
            outermost: true,
        })
    }

    /// Begins a transaction with `statement` instead of `BEGIN`, as [`sqlx::Pool::begin_with`]. On SQLite,
    /// `pool.begin_with("BEGIN IMMEDIATE")` takes the write lock at once: a transaction that reads before it
    /// writes then waits for other writers (the busy timeout) instead of failing with `database is locked`
    /// when another connection committed in between, which a plain (deferred) `BEGIN` cannot avoid.
    ///
    /// # Errors
    ///
    /// The [`sqlx::Error`] of acquiring a connection or of `statement`.
    ///
    /// # Cancel safety
    ///
    /// As [`begin`](Self::begin).
    pub async fn begin_with(
        &self,
        statement: impl sqlx::SqlSafeStr,
    ) -> Result<CachedTransaction<'static, DB>, sqlx::Error> {
        let tx = self.core.pool.begin_with(statement).await?;
        Ok(CachedTransaction {
            tx,
            core: Arc::clone(&self.core),
            outermost: true,
        })
    }

    /// The bare pool. Writes through it are **not** delivered before the call returns: the relay delivers
    /// them (PostgreSQL: after the grace period, its connections being marked as wrapped; SQLite: at the
    /// next sweep or the next write through the wrapper). Use it for things the wrapper does not offer
    /// (listeners, `acquire` for session-level work), not for writes.
    pub fn sqlx_pool(&self) -> &Pool<DB> {
        &self.core.pool
    }

    /// The store invalidated after writes.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.core.store
    }

    /// The read side on the same store: [`Cache::get_or_load`] and friends, with default settings (for
    /// others, use [`cache_builder`](Self::cache_builder)). It shares the pool's circuit breaker and
    /// post-outage gate (see the [`breaker`](crate::breaker) module).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use cache_runtime::{CachedEntity, CachedPgPool, MemoryStore, key};
    /// # #[derive(CachedEntity, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
    /// # #[cached_entity(key = "product:<id>")]
    /// # struct Product { id: i64, name: String }
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = CachedPgPool::connect("postgres://localhost/shop", MemoryStore::new(10_000)).await?;
    /// let id = 123_i64;
    /// let product: Option<Product> = pool
    ///     .cache()
    ///     .get_or_load(key!("product:<id>", id), || async {
    ///         sqlx::query_as("SELECT id, name FROM products WHERE id = $1").bind(id).fetch_optional(&pool).await
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn cache(&self) -> &Cache {
        &self.core.cache
    }

    /// A builder of another read side on the pool's store (other TTLs, lease settings), sharing the pool's
    /// circuit breaker and post-outage gate; its own [`CacheBuilder::breaker`](crate::CacheBuilder::breaker)
    /// setting is ignored. A cache built with [`Cache::builder_shared`] instead has a breaker of its own
    /// and no gate: after a store outage it could serve entries the outage's writes invalidated until the
    /// relay delivered them.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn f(pool: cache_runtime::CachedPool) {
    /// let cache = pool.cache_builder().lease_wait(std::time::Duration::from_millis(200)).build();
    /// # }
    /// ```
    pub fn cache_builder(&self) -> crate::CacheBuilder {
        Cache::builder_shared(Arc::clone(&self.core.store)).health(Arc::clone(&self.core.health))
    }

    /// The registry the pool was verified against.
    pub fn registry(&self) -> &Registry {
        &self.core.registry
    }

    /// Installs (or updates) the triggers of this pool's registry (see [`Schema::install`](crate::Schema::install)).
    ///
    /// # Errors
    ///
    /// As [`Schema::install`](crate::Schema::install).
    ///
    /// # Cancel safety
    ///
    /// As [`Schema::install`](crate::Schema::install): all or nothing.
    pub async fn install_schema(&self) -> Result<(), Error> {
        let mut conn = self.core.pool.acquire().await?;
        DB::install(&self.core.registry, TriggerMode::default(), &mut conn).await
    }

    /// Delivers every outbox row the relay would deliver now, once; returns the number of rows delivered.
    /// The background relay does this on its own; this serves tools and tests.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] or [`Error::Store`]; undelivered rows stay in the outbox.
    ///
    /// # Cancel safety
    ///
    /// Each batch is one transaction: dropping the future leaves undelivered rows in the outbox (a batch
    /// whose keys were already invalidated may be delivered again, which is harmless).
    pub async fn sweep_outbox(&self) -> Result<usize, Error> {
        let drained = self.core.relay.drain_once().await?;
        Ok(usize::try_from(drained.rows).unwrap_or(usize::MAX))
    }

    /// The pool's relay (whether or not its background task runs): [`Relay::drain_once`],
    /// [`Relay::backlog`].
    pub fn relay(&self) -> &Relay<DB> {
        &self.core.relay
    }

    /// Closes the pool: stops the relay and waits for the connections to close.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the pool closed (as [`sqlx::Pool::close`]).
    pub async fn close(&self) {
        if let Some(relay) = &self.core.relay_task {
            relay.abort();
        }
        self.core.recovery_task.abort();
        self.core.pool.close().await;
    }
}

impl CachedPool<Postgres> {
    /// The bare pool (see [`sqlx_pool`](Self::sqlx_pool)).
    pub fn pg_pool(&self) -> &PgPool {
        &self.core.pool
    }
}

impl<DB: Backend> Core<DB> {
    /// Invalidates the keys of outbox rows and queues the rows for deletion; logs a store failure (the
    /// relay delivers the rows later).
    async fn deliver(&self, rows: Rows) {
        if rows.is_empty() {
            return;
        }
        #[cfg(feature = "fault-injection")]
        if self.crash_after_commit {
            return;
        }
        let (ids, keys) = relay::split(rows);
        let result = relay::invalidate(
            self.store.as_ref(),
            &self.health,
            &keys,
            self.relay_config.store_timeout,
            "commit",
        )
        .await;
        match result {
            Ok(()) => {
                DB::invalidated(&self.state, &ids);
                // The receiver only stops with the runtime; undeleted rows are re-delivered by the relay.
                let _ = self.delivered.send(ids);
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    keys = keys.len(),
                    "cache invalidation failed after COMMIT; the outbox keeps the keys, the relay retries, and \
                     reads bypass the cache until they are delivered"
                );
                // Relays of processes that can reach the store: deliver now, not after the grace period.
                // (Also while the breaker is open: these rows committed after earlier requests. Relays
                // coalesce the notifications, and those whose own breaker is open skip the drain.)
                let notified = DB::notify_drain(&self.pool).await;
                if let Err(error) = notified {
                    tracing::debug!(%error, "could not ask the relays to drain; they deliver after the grace period");
                }
            }
        }
    }
}

/// Deletes delivered outbox rows in batches, off the callers' path.
async fn delete_delivered<DB: Backend>(
    pool: Pool<DB>,
    mut receiver: mpsc::UnboundedReceiver<Vec<i64>>,
) {
    const BATCH: usize = 10_000;
    while let Some(mut ids) = receiver.recv().await {
        // Collect what arrives shortly after, so that a stream of writes costs few deletes; until deleted,
        // rows are younger than the relay's grace period, so nobody delivers them twice.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while ids.len() < BATCH {
            match receiver.try_recv() {
                Ok(more) => ids.extend(more),
                Err(_) => break,
            }
        }
        let result = DB::delete(&pool, &ids).await;
        if let Err(error) = result {
            tracing::debug!(%error, rows = ids.len(), "could not delete delivered outbox rows; the relay will deliver them again");
        }
    }
}

/// A transaction (or savepoint) of a [`CachedPool`].
///
/// `&mut CachedTransaction` is a [`sqlx::Executor`], and `&mut *tx` is the transaction's `PgConnection`:
/// both work with every sqlx query function. Dropping it without `commit` rolls back and publishes nothing.
///
/// # Examples
///
/// ```no_run
/// # async fn f(pool: cache_runtime::CachedPool) -> Result<(), sqlx::Error> {
/// let mut tx = pool.begin().await?;
/// sqlx::query("UPDATE products SET category_id = 2 WHERE id = 1").execute(&mut tx).await?;
/// {
///     let mut savepoint = tx.begin().await?;
///     sqlx::query("DELETE FROM products WHERE id = 2").execute(&mut *savepoint).await?;
///     savepoint.rollback().await?; // product:2 is not invalidated
/// }
/// tx.commit().await?; // invalidates product:1, category:<old>:products, category:2:products
/// # Ok(()) }
/// ```
pub struct CachedTransaction<'c, DB: Backend = Postgres> {
    tx: sqlx::Transaction<'c, DB>,
    core: Arc<Core<DB>>,
    outermost: bool,
}

impl<DB: Backend> fmt::Debug for CachedTransaction<'_, DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedTransaction")
            .field("outermost", &self.outermost)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> CachedTransaction<'_, DB> {
    /// Begins a nested transaction (a `SAVEPOINT`). Its commit only releases the savepoint; its writes are
    /// published by the outermost commit, and vanish if it rolls back.
    ///
    /// # Errors
    ///
    /// The [`sqlx::Error`] of `SAVEPOINT`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave the savepoint created; it is rolled back with the next use of the
    /// outer transaction, as for a dropped nested transaction.
    pub async fn begin(&mut self) -> Result<CachedTransaction<'_, DB>, sqlx::Error> {
        let tx = sqlx::Acquire::begin(&mut self.tx).await?;
        Ok(CachedTransaction {
            tx,
            core: Arc::clone(&self.core),
            outermost: false,
        })
    }

    /// Commits. For the outermost transaction: reads the transaction's keys, sends `COMMIT`, invalidates the
    /// keys in the store (one round trip), and returns. For a savepoint: `RELEASE SAVEPOINT` only.
    ///
    /// # Errors
    ///
    /// The [`sqlx::Error`] of reading the keys or of `COMMIT`: then nothing was published (and, when the
    /// `COMMIT` itself failed, the transaction is rolled back or its outcome unknown, as with sqlx). Never an
    /// error once `COMMIT` succeeded: a store failure is logged and the relay delivers the keys.
    ///
    /// # Cancel safety
    ///
    /// Dropped before `COMMIT` was sent: the transaction rolls back, nothing is published. Dropped after
    /// `COMMIT` was sent: the transaction may be committed; the invalidation runs in a task of its own
    /// (spawned right after `COMMIT`), which completes even when this future is dropped; if the future is
    /// dropped between the `COMMIT` and that spawn, the keys stay in the outbox and the relay delivers them
    /// within the grace period.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        if !self.outermost {
            return self.tx.commit().await;
        }
        let span = tracing::debug_span!("cache.commit");
        self.commit_outermost().instrument(span).await
    }

    async fn commit_outermost(mut self) -> Result<(), sqlx::Error> {
        let rows = DB::written_rows(&mut self.tx, &self.core.state, true).await?;
        self.tx.commit().await?;
        if !rows.is_empty() {
            let core = Arc::clone(&self.core);
            // A task of its own, so that dropping this future cannot interrupt the invalidation.
            let _ = tokio::spawn(async move { core.deliver(rows).await }).await;
        }
        Ok(())
    }

    /// Rolls back the transaction or savepoint; nothing is published.
    ///
    /// # Errors
    ///
    /// The [`sqlx::Error`] of `ROLLBACK`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future still rolls back (with the next use of the connection).
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl<DB: Backend> Deref for CachedTransaction<'_, DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.tx
    }
}

impl<DB: Backend> DerefMut for CachedTransaction<'_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
}

/// Implements [`Executor`] for `&mut CachedTransaction<'_, $db>` by delegating every method to the
/// transaction's connection (the style of sqlx-otel), and for `&CachedPool<$db>` by running each statement
/// as an [`Autocommit`] (`fetch_many` and `fetch_optional`; the other methods are sqlx's defaults over them).
macro_rules! executors {
    ($db:ty) => {
        impl<'c, 't> Executor<'c> for &'c mut CachedTransaction<'t, $db> {
            type Database = $db;

            fn execute<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> BoxFuture<'e, Result<<$db as Database>::QueryResult, sqlx::Error>>
            where
                'c: 'e,
                E: 'q + Execute<'q, $db>,
            {
                (&mut *self.tx).execute(query)
            }

            fn execute_many<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> BoxStream<'e, Result<<$db as Database>::QueryResult, sqlx::Error>>
            where
                'c: 'e,
                E: 'q + Execute<'q, $db>,
            {
                (&mut *self.tx).execute_many(query)
            }

            fn fetch<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> BoxStream<'e, Result<<$db as Database>::Row, sqlx::Error>>
            where
                'c: 'e,
                E: 'q + Execute<'q, $db>,
            {
                (&mut *self.tx).fetch(query)
            }

            fn fetch_many<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> BoxStream<
                'e,
                Result<Either<<$db as Database>::QueryResult, <$db as Database>::Row>, sqlx::Error>,
            >
            where
                'c: 'e,
                E: 'q + Execute<'q, $db>,
            {
                (&mut *self.tx).fetch_many(query)
            }

            fn fetch_all<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> BoxFuture<'e, Result<Vec<<$db as Database>::Row>, sqlx::Error>>
            where
                'c: 'e,
                E: 'q + Execute<'q, $db>,
            {
                (&mut *self.tx).fetch_all(query)
            }

            fn fetch_one<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> BoxFuture<'e, Result<<$db as Database>::Row, sqlx::Error>>
            where
                'c: 'e,
                E: 'q + Execute<'q, $db>,
            {
                (&mut *self.tx).fetch_one(query)
            }

            fn fetch_optional<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> BoxFuture<'e, Result<Option<<$db as Database>::Row>, sqlx::Error>>
            where
                'c: 'e,
                E: 'q + Execute<'q, $db>,
            {
                (&mut *self.tx).fetch_optional(query)
            }

            fn prepare_with<'e>(
                self,
                sql: SqlStr,
                parameters: &'e [<$db as Database>::TypeInfo],
            ) -> BoxFuture<'e, Result<<$db as Database>::Statement, sqlx::Error>>
            where
                'c: 'e,
            {
                (&mut *self.tx).prepare_with(sql, parameters)
            }

            fn describe<'e>(
                self,
                sql: SqlStr,
            ) -> BoxFuture<'e, Result<sqlx_core::describe::Describe<$db>, sqlx::Error>>
            where
                'c: 'e,
            {
                (&mut *self.tx).describe(sql)
            }
        }

        // `execute`, `execute_many`, `fetch` and `fetch_all` are sqlx's defaults, which run `fetch_many`
        // to its end: the stream ends only after the statement's keys were delivered.
        impl<'c> Executor<'c> for &'c CachedPool<$db> {
            type Database = $db;

            fn fetch_many<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> BoxStream<
                'e,
                Result<Either<<$db as Database>::QueryResult, <$db as Database>::Row>, sqlx::Error>,
            >
            where
                'c: 'e,
                E: 'q + Execute<'q, $db>,
            {
                let core = Arc::clone(&self.core);
                TryAsyncStream::new(move |yielder| async move {
                    let (mut statement, query) = Autocommit::start(core, query).await?;
                    let result = async {
                        let mut stream = statement.conn()?.fetch_many(query);
                        while let Some(item) = stream.try_next().await? {
                            yielder.r#yield(item).await;
                        }
                        Ok(())
                    }
                    .await;
                    statement.finish().await;
                    result
                })
                .boxed()
            }

            fn fetch_optional<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> BoxFuture<'e, Result<Option<<$db as Database>::Row>, sqlx::Error>>
            where
                'c: 'e,
                E: 'q + Execute<'q, $db>,
            {
                let core = Arc::clone(&self.core);
                Box::pin(async move {
                    let (mut statement, query) = Autocommit::start(core, query).await?;
                    let result = statement.conn()?.fetch_optional(query).await;
                    statement.finish().await;
                    result
                })
            }

            fn prepare_with<'e>(
                self,
                sql: SqlStr,
                parameters: &'e [<$db as Database>::TypeInfo],
            ) -> BoxFuture<'e, Result<<$db as Database>::Statement, sqlx::Error>>
            where
                'c: 'e,
            {
                self.core.pool.prepare_with(sql, parameters)
            }

            fn describe<'e>(
                self,
                sql: SqlStr,
            ) -> BoxFuture<'e, Result<sqlx_core::describe::Describe<$db>, sqlx::Error>>
            where
                'c: 'e,
            {
                self.core.pool.describe(sql)
            }
        }
    };
}

executors!(Postgres);
#[cfg(feature = "sqlite")]
executors!(sqlx::Sqlite);

/// An [`Execute`] that records whether its SQL may write when the connection reads it.
struct Classified<E> {
    inner: E,
    detection: WriteDetection,
    wrote: Arc<AtomicBool>,
}

impl<'q, DB: Database, E: Execute<'q, DB>> Execute<'q, DB> for Classified<E> {
    fn sql(self) -> SqlStr {
        let sql = self.inner.sql();
        let writes = match self.detection {
            WriteDetection::Always => true,
            WriteDetection::Keywords => may_write(sql.as_str()),
        };
        self.wrote.store(writes, Ordering::Release);
        sql
    }

    fn statement(&self) -> Option<&DB::Statement> {
        self.inner.statement()
    }

    fn take_arguments(&mut self) -> Result<Option<DB::Arguments>, sqlx::error::BoxDynError> {
        self.inner.take_arguments()
    }

    fn persistent(&self) -> bool {
        self.inner.persistent()
    }
}

/// One autocommit statement on a pool connection: after it (or when dropped), delivers the rows the
/// statement wrote if it may have written.
struct Autocommit<DB: Backend> {
    core: Arc<Core<DB>>,
    conn: Option<PoolConnection<DB>>,
    wrote: Arc<AtomicBool>,
}

impl<DB: Backend> Autocommit<DB> {
    async fn start<'q, E: Execute<'q, DB>>(
        core: Arc<Core<DB>>,
        query: E,
    ) -> Result<(Self, Classified<E>), sqlx::Error> {
        let conn = core.pool.acquire().await?;
        let wrote = Arc::new(AtomicBool::new(false));
        let query = Classified {
            inner: query,
            detection: core.detection,
            wrote: Arc::clone(&wrote),
        };
        Ok((
            Self {
                core,
                conn: Some(conn),
                wrote,
            },
            query,
        ))
    }

    fn conn(&mut self) -> Result<&mut DB::Connection, sqlx::Error> {
        self.conn.as_deref_mut().ok_or(sqlx::Error::PoolClosed)
    }

    /// Delivers the statement's keys (when it may have written) and returns the connection to the pool.
    async fn finish(mut self) {
        if let Some(task) = self.spawn_delivery() {
            let _ = task.await;
        }
    }

    /// Spawns the delivery, so that it completes even if the caller's future is dropped.
    fn spawn_delivery(&mut self) -> Option<JoinHandle<()>> {
        if !self.wrote.load(Ordering::Acquire) {
            return None;
        }
        let conn = self.conn.take()?;
        let core = Arc::clone(&self.core);
        let handle = tokio::runtime::Handle::try_current().ok()?;
        Some(handle.spawn(deliver_session(core, conn)))
    }
}

impl<DB: Backend> Drop for Autocommit<DB> {
    fn drop(&mut self) {
        // Dropped before `finish` (the caller dropped the future or the stream): deliver anyway.
        let _ = self.spawn_delivery();
    }
}

/// Reads the rows written by the statement, releases the connection, and delivers them.
async fn deliver_session<DB: Backend>(core: Arc<Core<DB>>, mut conn: PoolConnection<DB>) {
    let rows = DB::written_rows(&mut conn, &core.state, false).await;
    drop(conn);
    match rows {
        Ok(rows) => core.deliver(rows).await,
        Err(error) => tracing::warn!(
            %error,
            "could not read the outbox after a write; the relay will deliver its keys"
        ),
    }
}
