//! [`CachedPoolOptions`]: how a [`CachedPool`] connects, installs or checks its schema, and delivers.

use std::sync::Arc;

use sqlx::Postgres;
use sqlx::pool::PoolOptions;

use super::{CachedPool, WriteDetection};
use crate::backend::{Backend, ConnectOptions, TriggerMode};
use crate::error::Error;
use crate::health::BreakerConfig;
use crate::outbox::{Consumer, RelayConfig};
use crate::registry::{Registry, registry};
use crate::store::Store;

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
///     .auto_install(true)
///     .connect("postgres://app@localhost/app", store)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CachedPoolOptions<DB: Backend = Postgres> {
    pub(super) registry: Option<Registry>,
    pub(super) pool_options: PoolOptions<DB>,
    pub(super) auto_install: bool,
    pub(super) trigger_mode: TriggerMode,
    pub(super) run_relay: bool,
    pub(super) relay: RelayConfig,
    pub(super) breaker: BreakerConfig,
    pub(super) detection: WriteDetection,
    pub(super) consumer: Option<Consumer>,
    pub(super) pooler: bool,
    /// The pool was handed in by the application ([`wrap`](Self::wrap)): its sessions carry no mark.
    pub(super) shared: bool,
    pub(super) direct: Option<ConnectOptions<DB>>,
    pub(super) replica: Option<sqlx::Pool<DB>>,
    pub(super) replica_wait: std::time::Duration,
    pub(super) sampling: Option<crate::cache::Sampling>,
    pub(super) token_wait: std::time::Duration,
    #[cfg(feature = "migrate")]
    pub(super) migrator: Option<Arc<sqlx::migrate::Migrator>>,
    #[cfg(feature = "fault-injection")]
    pub(super) crash_after_commit: bool,
}

impl<DB: Backend> Clone for CachedPoolOptions<DB> {
    fn clone(&self) -> Self {
        Self {
            registry: self.registry.clone(),
            pool_options: self.pool_options.clone(),
            consumer: self.consumer.clone(),
            direct: self.direct.clone(),
            replica: self.replica.clone(),
            #[cfg(feature = "migrate")]
            migrator: self.migrator.clone(),
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
    /// running with [`RelayConfig::new`], [`WriteDetection::Keywords`].
    pub fn new() -> Self {
        Self {
            registry: None,
            pool_options: PoolOptions::new(),
            auto_install: false,
            trigger_mode: TriggerMode::default(),
            run_relay: true,
            relay: RelayConfig::new(),
            breaker: BreakerConfig::default(),
            detection: WriteDetection::default(),
            consumer: None,
            pooler: false,
            shared: false,
            direct: None,
            replica: None,
            replica_wait: std::time::Duration::from_secs(1),
            sampling: None,
            token_wait: std::time::Duration::from_secs(1),
            #[cfg(feature = "migrate")]
            migrator: None,
            #[cfg(feature = "fault-injection")]
            crash_after_commit: false,
        }
    }

    /// The pool's connections go through a transaction-mode pooler (pgbouncer with `pool_mode =
    /// transaction`, PgCat, Supavisor), which hands a server session to another client after each
    /// transaction (PostgreSQL; default `false`). Then:
    ///
    /// - no `options` startup parameter is sent (pgbouncer refuses it): the pool's mark is set in each
    ///   transaction it begins (`BEGIN; SELECT set_config(…, true)`, one round trip);
    /// - an autocommit statement that may write runs in a transaction of its own (`BEGIN`, the statement,
    ///   the outbox read, `COMMIT`: two round trips more than without a pooler), since the next statement
    ///   may reach another session;
    /// - the relay `LISTEN`s only on a [`direct`](Self::direct) connection (notifications through a
    ///   transaction pooler are lost); without one, it finds other clients' writes by its sweep
    ///   ([`RelayConfig::sweep_interval`]).
    ///
    /// Your own statements must suit the pooler: sqlx prepares named statements, which pgbouncer supports
    /// in transaction mode from version 1.21 with `max_prepared_statements` above 0. With an older
    /// pgbouncer, use `.persistent(false)` statements inside transactions (an autocommit write through
    /// this pool is one), and give the pool a [`direct`](Self::direct) connection for its own queries.
    #[must_use]
    pub fn transaction_pooler(mut self, pooler: bool) -> Self {
        self.pooler = pooler;
        self
    }

    /// A connection that bypasses the pooler (see [`transaction_pooler`](Self::transaction_pooler)), for
    /// the pool's own session-level work: the relay's `LISTEN` and batches, the delete of delivered rows,
    /// the heartbeat, and the install and check at connect. At most 2 connections of its own, plus the
    /// `LISTEN` connection.
    #[must_use]
    pub fn direct(mut self, options: ConnectOptions<DB>) -> Self {
        self.direct = Some(options);
        self
    }

    /// A pool on a read replica (a PostgreSQL streaming standby, one server) for [`CachedPool::get`] and
    /// [`CachedPool::get_or_load_on_replica`]: misses load there once it has replayed what the primary had
    /// written when the lease was taken, so that a lagging standby never fills the cache with a row older
    /// than an invalidated write. Without it, those loads run on the primary.
    #[must_use]
    pub fn read_replica(mut self, replica: sqlx::Pool<DB>) -> Self {
        self.replica = Some(replica);
        self
    }

    /// How long a load waits for the [read replica](Self::read_replica) to catch up before it runs on the
    /// primary instead (default 1 s).
    #[must_use]
    pub fn replica_wait(mut self, wait: std::time::Duration) -> Self {
        self.replica_wait = wait;
        self
    }

    /// The consumer the pool delivers to (default: the store's [`Store::consumer`] name). Pools and relays
    /// of one consumer share the delivery of each outbox row; every consumer receives every row (see
    /// [`Consumer`]).
    #[must_use]
    pub fn consumer(mut self, consumer: Consumer) -> Self {
        self.consumer = Some(consumer);
        self
    }

    /// Uses `registry` instead of every entity linked into the program (capture, the relay's rendering and
    /// the cache's TTLs).
    #[must_use]
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Options of the underlying pool (size, timeouts, …).
    #[must_use]
    pub fn pool_options(mut self, options: PoolOptions<DB>) -> Self {
        self.pool_options = options;
        self
    }

    /// Runs `migrator` (`sqlx::migrate!()`) when the pool connects, before the schema is installed or
    /// verified: the startup order a service needs (its tables exist before capture is checked on them),
    /// with one pool. The migrations' writes are other clients' writes (delivered by the relay once it
    /// runs). Needs the `migrate` feature.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// use cache_runtime::{CachedPgPool, RedisStore};
    ///
    /// let store = RedisStore::connect("redis://127.0.0.1:6379", "myapp:").await?;
    /// // `sqlx::migrate!()` in an application; here, the same migrations read at run time.
    /// let migrator = sqlx::migrate::Migrator::new(std::path::Path::new("migrations")).await?;
    /// let pool = CachedPgPool::options()
    ///     .migrations(migrator)
    ///     .auto_install(true)
    ///     .connect("postgres://app@localhost/app", store)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "migrate")]
    #[must_use]
    pub fn migrations(mut self, migrator: sqlx::migrate::Migrator) -> Self {
        self.migrator = Some(Arc::new(migrator));
        self
    }

    /// Installs (or updates) the triggers at connect instead of only checking them (default `false`). Needs
    /// a role that may create triggers on the registered tables.
    #[must_use]
    pub fn auto_install(mut self, install: bool) -> Self {
        self.auto_install = install;
        self
    }

    /// The trigger mode of installs: at connect ([`auto_install`](Self::auto_install)) and by
    /// [`CachedPool::install_schema`] (PostgreSQL; SQLite has row triggers only).
    #[must_use]
    pub fn trigger_mode(mut self, mode: TriggerMode) -> Self {
        self.trigger_mode = mode;
        self
    }

    /// Runs the relay as a background task of the pool (default `true`). Without it, writes by other
    /// clients and left-behind rows wait for a relay running elsewhere (the pool still drains the outbox
    /// itself to reopen its read gate after a store outage). The relay's `LISTEN` connection is one
    /// connection outside the pool; its sweeps use the pool.
    #[must_use]
    pub fn run_relay(mut self, run: bool) -> Self {
        self.run_relay = run;
        self
    }

    /// How outbox rows are delivered: the relay's grace period, sweep interval and batch size, and the
    /// longest a write waits for the store after `COMMIT` (see [`RelayConfig`]).
    #[must_use]
    pub fn relay_config(mut self, config: RelayConfig) -> Self {
        self.relay = config;
        self
    }

    /// Turns on the live consistency SLI for the pool's cache ([`CachedPool::cache`](crate::CachedPool::cache)):
    /// a fraction of the hits of [`CachedPool::get`](crate::CachedPool::get) is compared with the
    /// database Δ later, off the request path (see [`Sampling`](crate::cache::Sampling)). Off by default.
    #[must_use]
    pub fn sampling(mut self, sampling: crate::cache::Sampling) -> Self {
        self.sampling = Some(sampling);
        self
    }

    /// How long a read of the pool's cache given a [`WriteToken`](crate::token::WriteToken) waits for the
    /// write's delivery before it bypasses the cache (default 1 s; see
    /// [`CacheBuilder::token_wait`](crate::cache::CacheBuilder::token_wait)).
    #[must_use]
    pub fn token_wait(mut self, wait: std::time::Duration) -> Self {
        self.token_wait = wait;
        self
    }

    /// The circuit breaker in front of the store, shared by the pool's reads, commits and relay.
    #[must_use]
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// Fault injection for tests: writes commit but their keys are never sent to the store by the writing
    /// call, as if the process died between `COMMIT` and the store call. The relay delivers them after
    /// the grace period. Only with the `fault-injection` feature; never use it in production.
    #[cfg(feature = "fault-injection")]
    #[must_use]
    pub fn crash_after_commit(mut self, crash: bool) -> Self {
        self.crash_after_commit = crash;
        self
    }

    /// How autocommit writes are detected.
    #[must_use]
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

    /// Whether the pool's mark is set per transaction (behind a pooler, or on a pool it did not connect).
    pub(super) fn marks_transactions(&self) -> bool {
        self.pooler || self.shared
    }

    /// Wraps `pool`, a sqlx pool the application already has, instead of connecting one: installs or
    /// verifies the schema and starts the relay as [`connect_with`](Self::connect_with) does, and shares
    /// the pool's connections (its size and timeouts are the application's; [`pool_options`] is ignored).
    ///
    /// On PostgreSQL the wrapper cannot mark sessions it did not open (the mark rides on the connect
    /// options), so it marks each transaction it begins instead, as behind a
    /// [transaction pooler](Self::transaction_pooler): an autocommit statement through the wrapper that
    /// may write runs in a transaction of its own (two round trips more than on a pool the wrapper
    /// connected). Writes through the application's own handle on `pool` are other clients' writes: the
    /// relay delivers them within milliseconds. On SQLite the pool must have `recursive_triggers` on.
    ///
    /// [`pool_options`]: Self::pool_options
    ///
    /// # Errors
    ///
    /// As [`connect_with`](Self::connect_with); also [`Error::UnsuitablePool`] for a SQLite pool without
    /// `recursive_triggers`.
    ///
    /// # Cancel safety
    ///
    /// As [`connect_with`](Self::connect_with).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// use cache_runtime::{CachedPgPool, RedisStore};
    ///
    /// let pool = sqlx::PgPool::connect("postgres://app@localhost/app").await?; // the service's own
    /// let store = RedisStore::connect("redis://127.0.0.1:6379", "myapp:").await?;
    /// let cached = CachedPgPool::options().wrap(pool.clone(), store).await?;
    /// # Ok(()) }
    /// ```
    pub async fn wrap(
        mut self,
        pool: sqlx::Pool<DB>,
        store: impl Store,
    ) -> Result<CachedPool<DB>, Error> {
        self.shared = DB::SESSION_MARK;
        DB::check_shared(&pool).await?;
        let consumer = self.consumer_of(&store);
        self.start_on(pool, consumer, store).await
    }

    /// The consumer the pool delivers to.
    fn consumer_of(&mut self, store: &impl Store) -> Consumer {
        self.consumer
            .take()
            .unwrap_or_else(|| Consumer::new(store.consumer()))
    }

    /// Connects, installs or verifies the schema, and starts the relay.
    ///
    /// # Errors
    ///
    /// [`Error::Registry`] when entities contradict each other; [`Error::Database`] when the database cannot
    /// be reached; [`Error::NotInstalled`], [`Error::FingerprintMismatch`] or
    /// [`Error::SchemaVersionMismatch`] when the installed triggers do not match this build (saying what to
    /// run); the errors of an install ([`Error::Columns`], …) with [`auto_install`](Self::auto_install).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the pool; a schema install in progress rolls back.
    pub async fn connect_with(
        mut self,
        options: ConnectOptions<DB>,
        store: impl Store,
    ) -> Result<CachedPool<DB>, Error> {
        self.registry
            .get_or_insert_with(|| registry().clone())
            .validate()?;
        let consumer = self.consumer_of(&store);
        let pool = self
            .pool_options
            .clone()
            .connect_with(DB::wrap(options, &consumer, self.pooler))
            .await
            .map_err(refused_options)?;
        self.start_on(pool, consumer, store).await
    }

    /// Installs or verifies the schema on `pool` and starts the pool's tasks.
    async fn start_on(
        mut self,
        pool: sqlx::Pool<DB>,
        consumer: Consumer,
        store: impl Store,
    ) -> Result<CachedPool<DB>, Error> {
        let registry = self.registry.take().unwrap_or_else(|| registry().clone());
        registry.validate()?;
        let direct = match self.direct.clone() {
            Some(direct) => {
                PoolOptions::new()
                    .max_connections(2)
                    .connect_with(direct)
                    .await?
            }
            None => pool.clone(),
        };
        #[cfg(feature = "migrate")]
        if let Some(migrator) = &self.migrator {
            DB::migrate(migrator, &direct).await?;
        }
        {
            let mut conn = direct.acquire().await?;
            if self.auto_install {
                DB::install(&registry, self.trigger_mode, &mut conn).await?;
            }
            DB::verify(&registry, &mut conn).await?;
        }
        let pool = CachedPool::start(pool, direct, Arc::new(store), registry, consumer, &self);
        // Live before the first write: from now on no row is deleted before this consumer delivered it.
        pool.relay().outbox.register().await?;
        // One recovery pass before the first read: rows delivered but not yet deleted by other processes
        // are delivered again, then the store's sequence is checked against what the database recorded.
        // If it cannot run (the store is down), the gate closes and the recovery task opens it later.
        let health = &pool.relay().outbox.guarded.health;
        match pool.relay().recover_once().await {
            // A store repaired by the pass (which closed the gate) is used at once.
            Ok(epoch) => {
                let _ = health.open_gate(epoch);
            }
            Err(error) => {
                tracing::warn!(%error, "cache store not ready at connect; reads bypass it until it is");
                health.skipped();
            }
        }
        Ok(pool)
    }
}

/// A connect refused because of the `options` startup parameter (a pooler: pgbouncer answers
/// `unsupported startup parameter: options`) becomes [`Error::PoolerRefusedOptions`], which says what to
/// configure.
fn refused_options(error: sqlx::Error) -> Error {
    if error.to_string().contains("unsupported startup parameter") {
        Error::PoolerRefusedOptions(error)
    } else {
        Error::Database(error)
    }
}
