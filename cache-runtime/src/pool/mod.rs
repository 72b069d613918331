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
//! The triggers installed by the [`backend`](crate::backend) write the keys of every changed row into the outbox, in the writing
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
//! and every relay is asked to deliver at once (see the [`health`](crate::health) module and
//! [`crate::outbox::Relay`]). While the circuit breaker is open, commits do not call the store at
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
//! Not detected, so delivered by the relay (within [`RelayConfig::wrapped_grace`](crate::outbox::RelayConfig::wrapped_grace) plus a sweep
//! interval, 2.5 s by default) instead of before the call returns: a *read-looking* statement that writes
//! through a function, such as `SELECT my_writing_function()` or `VALUES (nextval_and_write())`. Run such
//! statements in a [`CachedTransaction`] (always synchronous), or choose [`WriteDetection::Always`], which
//! follows every autocommit statement with the outbox query (one extra round trip per read).
//!
//! Writes through [`CachedPool::sqlx_pool`] (the bare pool) are not delivered synchronously either; they are
//! relayed like the above.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use sqlx::{Pool, Postgres};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backend::{Backend, Rows};
use crate::cache::{Cache, CacheBuilder, SharedHealth};
use crate::error::Error;
use crate::health::Guarded;
use crate::outbox::{Consumer, Outbox, Relay, cleanup, heartbeat};
use crate::registry::Registry;
use crate::store::Store;
use crate::token::WriteToken;

mod autocommit;
mod classify;
mod executor;
mod options;
mod reads;
mod transaction;

pub use classify::WRITE_WORDS;
pub use options::CachedPoolOptions;
pub use transaction::CachedTransaction;

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
    /// Statements containing a writing keyword ([`WRITE_WORDS`]) are followed by the outbox query; others
    /// rely on the relay. No extra round trip for plain reads.
    #[default]
    Keywords,
    /// Every autocommit statement is followed by the outbox query: synchronous for every write, one extra
    /// round trip per read.
    Always,
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
/// [`store_timeout`](crate::outbox::RelayConfig::store_timeout)).
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

/// The state of a pool, shared by its clones and tasks: it owns the outbox (pool, backend state, the
/// guarded store, the delivery settings) through its relay; the cache borrows the same guarded store.
struct Core<DB: Backend> {
    /// The application's pool (through the pooler, if any); the outbox's pool may be a direct one.
    pool: Pool<DB>,
    relay: Relay<DB>,
    cache: Cache,
    registry: Registry,
    options: CachedPoolOptions<DB>,
    delivered: mpsc::UnboundedSender<(Vec<i64>, u64)>,
    tasks: Vec<JoinHandle<()>>,
}

impl<DB: Backend> Drop for Core<DB> {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
        // This pool no longer delivers: let the consumer's other processes (if any) keep it live, else let
        // the outbox stop keeping rows for it (best effort; otherwise it expires).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let outbox = Arc::clone(&self.relay.outbox);
            runtime.spawn(async move {
                let _ = DB::unregister(&outbox.pool, &outbox.consumer, &outbox.process).await;
            });
        }
    }
}

impl<DB: Backend> fmt::Debug for CachedPool<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedPool")
            .field("pool", self.sqlx_pool())
            .field("store", self.store())
            .field("detection", &self.core.options.detection)
            .field("relay", &self.core.options.run_relay)
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

    /// Wraps `pool`, a sqlx pool the application already has, with default options (see
    /// [`CachedPoolOptions::wrap`]).
    ///
    /// # Errors
    ///
    /// As [`CachedPoolOptions::wrap`].
    ///
    /// # Cancel safety
    ///
    /// As [`CachedPoolOptions::wrap`].
    pub async fn wrap(pool: Pool<DB>, store: impl Store) -> Result<Self, Error> {
        CachedPoolOptions::new().wrap(pool, store).await
    }

    /// The pool's state and tasks, on a connected and verified `pool`.
    fn start(
        pool: Pool<DB>,
        direct: Pool<DB>,
        store: Arc<dyn Store>,
        registry: Registry,
        consumer: Consumer,
        options: &CachedPoolOptions<DB>,
    ) -> Self {
        let guarded = Arc::new(Guarded::new(store, options.breaker, true));
        let mut outbox = Outbox::new(
            direct.clone(),
            &registry,
            Arc::clone(&guarded),
            options.relay,
            consumer.clone(),
        );
        // Notifications through a transaction pooler are lost: listen only on a direct connection.
        outbox.listen = !options.pooler || options.direct.is_some();
        let relay = Relay::new(outbox);
        let (delivered, receiver) = mpsc::unbounded_channel();
        let mut tasks = vec![tokio::spawn(cleanup::delete_delivered(
            direct, consumer, receiver,
        ))];
        let recovering = relay.clone();
        tasks.push(tokio::spawn(async move { recovering.recover().await }));
        if options.run_relay {
            // The relay tells the database that this build runs (see `Relay::run`).
            let running = relay.clone();
            tasks.push(tokio::spawn(async move { running.run().await }));
        } else {
            tasks.push(tokio::spawn(heartbeat(Arc::clone(&relay.outbox))));
        }
        // Weak: the outbox holds the guarded store.
        let positions: Arc<dyn crate::token::Positions> = relay.outbox.clone();
        let _ = guarded.positions.set(Arc::downgrade(&positions));
        let mut builder =
            CacheBuilder::on_pool(guarded, registry.clone()).token_wait(options.token_wait);
        if let Some(sampling) = options.sampling {
            builder = builder.sampling(sampling);
        }
        let cache = builder.build();
        Self {
            core: Arc::new(Core {
                pool,
                relay,
                cache,
                registry,
                options: options.clone(),
                delivered,
                tasks,
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
        let tx = if self.core.options.marks_transactions() {
            self.core.begin_marked("BEGIN").await?
        } else {
            self.sqlx_pool().begin().await?
        };
        Ok(CachedTransaction::outermost(tx, Arc::clone(&self.core)))
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
        let tx = if self.core.options.marks_transactions() {
            let statement = statement.into_sql_str();
            self.core.begin_marked(statement.as_str()).await?
        } else {
            self.sqlx_pool().begin_with(statement).await?
        };
        Ok(CachedTransaction::outermost(tx, Arc::clone(&self.core)))
    }

    /// Invalidates `keys` as a captured write does, for data that changed outside the registered tables:
    /// the keys are written to the outbox in a transaction of their own and delivered after its `COMMIT`,
    /// before this call returns. Unlike [`Cache::invalidate`] (a store call, lost if the store is down),
    /// they are durable: a store outage leaves them in the outbox for the relay (the read gate closes
    /// meanwhile), and a store that forgets them gets them again from the replay window.
    ///
    /// # Errors
    ///
    /// The [`sqlx::Error`] of the transaction: then nothing is invalidated. A store failure after the
    /// `COMMIT` is not an error (the relay delivers).
    ///
    /// # Cancel safety
    ///
    /// As [`CachedTransaction::commit`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use cache_runtime::{CachedEntity, CachedPgPool, key};
    /// # #[derive(CachedEntity)]
    /// # #[cached_entity(table = "products", key = "product:<id>")]
    /// # struct Product { id: i64 }
    /// # async fn f(pool: CachedPgPool) -> Result<(), sqlx::Error> {
    /// pool.invalidate(key!("product:<id>", id = 7)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn invalidate(&self, key: impl Into<crate::key::Key>) -> Result<(), sqlx::Error> {
        self.invalidate_many([key]).await
    }

    /// [`invalidate`](Self::invalidate) of several keys, in one transaction.
    ///
    /// # Errors
    ///
    /// As [`invalidate`](Self::invalidate).
    ///
    /// # Cancel safety
    ///
    /// As [`invalidate`](Self::invalidate).
    pub async fn invalidate_many(
        &self,
        keys: impl IntoIterator<Item = impl Into<crate::key::Key>>,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.begin().await?;
        tx.invalidate_many(keys).await?;
        tx.commit().await
    }

    /// The bare sqlx pool. Writes through it are **not** delivered before the call returns: the relay
    /// delivers them (PostgreSQL: after the grace period, its connections being marked as wrapped; SQLite:
    /// at the next sweep or the next write through the wrapper). Use it for things the wrapper does not
    /// offer (listeners, `acquire` for session-level work), not for writes.
    pub fn sqlx_pool(&self) -> &Pool<DB> {
        &self.core.pool
    }

    /// The store invalidated after writes.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.core.relay.outbox.guarded.store
    }

    /// The read side on the same store: [`Cache::get_or_load`] and friends, with default settings (for
    /// others, use [`cache_builder`](Self::cache_builder)). It shares the pool's circuit breaker and
    /// post-outage gate (see the [`health`](crate::health) module), and takes TTLs from the pool's registry.
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
    /// circuit breaker, post-outage gate and registry; it has no breaker setting of its own. A cache built
    /// with [`Cache::builder`] instead has a breaker of its own and no gate: after a store outage it could
    /// serve entries the outage's writes invalidated until the relay delivered them.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn f(pool: cache_runtime::CachedPool) {
    /// let cache = pool.cache_builder().lease_wait(std::time::Duration::from_millis(200)).build();
    /// # }
    /// ```
    pub fn cache_builder(&self) -> CacheBuilder<SharedHealth> {
        CacheBuilder::on_pool(
            Arc::clone(&self.core.relay.outbox.guarded),
            self.core.registry.clone(),
        )
    }

    /// The registry the pool was verified against.
    pub fn registry(&self) -> &Registry {
        &self.core.registry
    }

    /// Installs (or updates) the triggers of this pool's registry, with the pool's
    /// [`trigger_mode`](CachedPoolOptions::trigger_mode).
    ///
    /// # Errors
    ///
    /// As the install at connect ([`CachedPoolOptions::auto_install`]): [`Error::Registry`],
    /// [`Error::Columns`], [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// All or nothing: the install is one transaction.
    pub async fn install_schema(&self) -> Result<(), Error> {
        let mut conn = self.core.relay.outbox.pool.acquire().await?;
        DB::install(
            &self.core.registry,
            self.core.options.trigger_mode,
            &mut conn,
        )
        .await
    }

    /// The pool's relay (whether or not its background task runs): [`Relay::deliver_pending`] delivers
    /// by hand, [`Relay::backlog`] measures the outbox.
    pub fn relay(&self) -> &Relay<DB> {
        &self.core.relay
    }

    /// Closes the pool: stops the relay and waits for the connections to close.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the pool closed (as [`sqlx::Pool::close`]).
    pub async fn close(&self) {
        self.core.tasks.iter().for_each(JoinHandle::abort);
        let outbox = &self.core.relay.outbox;
        if let Err(error) = DB::unregister(&outbox.pool, &outbox.consumer, &outbox.process).await {
            tracing::debug!(%error, "could not unregister the cache consumer; it expires on its own");
        }
        self.sqlx_pool().close().await;
        outbox.pool.close().await;
    }
}

impl<DB: Backend> Core<DB> {
    /// A transaction begun with `statement` and marked as this pool's (behind a transaction pooler).
    async fn begin_marked(
        &self,
        statement: &str,
    ) -> Result<sqlx::Transaction<'static, DB>, sqlx::Error> {
        let sql = DB::begin_sql(statement, &self.relay.outbox.consumer);
        self.pool.begin_with(sqlx::AssertSqlSafe(sql)).await
    }

    /// Invalidates the keys of a writer's outbox rows and queues the rows for deletion; a store failure is
    /// logged and left to the relay (see [`Outbox::deliver`]). Returns the write's token (`None` without
    /// rows), acknowledged when the store took the invalidation. `committed`: when the write committed
    /// (for the commit → invalidation lag).
    async fn deliver(&self, rows: Rows, committed: Instant) -> Option<WriteToken> {
        let position = rows.iter().map(|(id, _)| *id).max()?;
        let consumer = self.relay.outbox.consumer.id();
        #[cfg(feature = "fault-injection")]
        if self.options.crash_after_commit {
            return Some(WriteToken::new(position, consumer, false));
        }
        let Some(delivered) = self.relay.outbox.deliver(rows, committed).await else {
            return Some(WriteToken::new(position, consumer, false));
        };
        // The receiver only stops with the runtime; undeleted rows are re-delivered by the relay.
        let _ = self.delivered.send(delivered);
        Some(WriteToken::new(position, consumer, true))
    }
}
