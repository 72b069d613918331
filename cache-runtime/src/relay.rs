//! The relay: delivers outbox rows the writing session did not deliver itself.
//!
//! A [`Relay`] runs inside every application (a background task of [`CachedPool`](crate::CachedPool),
//! unless turned off with [`CachedPoolOptions::relay`](crate::CachedPoolOptions::relay)) and can run on its
//! own ([`Relay::run`], the `cache_relay` binary of the `examples` package). Any number of relays may serve
//! one database at once.
//!
//! # What it delivers, and when
//!
//! - Rows of sessions that do not go through the wrapper (`psql`, a plain `PgPool`, another service): at
//!   once. Their commit sends a `NOTIFY` on [`NOTIFY_CHANNEL`](crate::NOTIFY_CHANNEL); the relay `LISTEN`s on a connection of its
//!   own (application name `cache_invalidation_relay`) and sweeps when notified.
//! - Rows of wrapped sessions once they are older than the grace period
//!   ([`RelayBuilder::wrapped_grace`], default 2 s). The writing call delivers them itself, right after
//!   `COMMIT`, and queues them for deletion; rows still there after the grace period were left behind (the
//!   store call failed, the process crashed between `COMMIT` and the delete, or the statement was not
//!   classified as a write). So a wrapped row is delivered once in the normal case, and at least once always.
//! - Rows a wrapped writer could not deliver (its store call failed or its breaker is open): at once. The
//!   writer then sends `NOTIFY` with the payload `drain`, and every relay delivers every row up to the
//!   outbox's highest id, whatever its age, so that processes whose store connection works invalidate the
//!   keys without waiting for the grace period.
//! - A periodic sweep ([`RelayBuilder::sweep_interval`], default 500 ms) catches notifications that were lost
//!   (the `LISTEN` connection dropped: it reconnects, then sweeps at once) and rows whose grace period ended.
//!
//! # SQLite
//!
//! A SQLite relay has no `LISTEN`: it sweeps every [`RelayBuilder::sweep_interval`], delivering the rows
//! above its process's delivered watermark that are older than a settle time (100 ms, or the grace period
//! if shorter), whatever their writer: SQLite rows cannot tell a wrapped writer's from another client's, so
//! the wait is short. A wrapped writer delivers its rows well within it, so they are normally delivered
//! once; a writer slower than that (a slow store) may see them delivered a second time, which is harmless. Several relays
//! (processes) may deliver the same row; each deletes what it delivered by id range. Keys are rendered from
//! the rows' JSON images with the relay's registry ([`RelayBuilder::registry`]).
//!
//! # One batch
//!
//! A batch is one transaction: claim up to [`RelayBuilder::batch_rows`] rows with `FOR UPDATE SKIP LOCKED`
//! (several relays share the work, each row is held by one of them), invalidate their distinct keys in one
//! store pipeline (bounded by [`RelayBuilder::store_timeout`]), delete the rows and commit with
//! `synchronous_commit = off` (no WAL flush: losing the delete in a database crash only means a second,
//! harmless delivery). When the store fails, the transaction rolls back and the rows stay for the next sweep:
//! delivery is at least once. A backlog drains batch after batch ([`Relay::drain_once`]).
//!
//! # Store outages and the read gate
//!
//! Store calls go through the circuit breaker (see the [`breaker`](crate::breaker) module). In a
//! [`CachedPool`](crate::CachedPool), a store failure also closes the read gate of the pool's
//! [`Cache`](crate::Cache); the pool's recovery task then drains the outbox up to its highest id `W` read
//! after the store answers again (every row up to `W`, whatever its age) and waits until no row up to `W`
//! remains before reads use the cache again.
//!
//! **Guarantee.** In a process whose cache saw a store failure (a read, a commit's invalidation or a relay
//! batch failed or was skipped by the breaker), no read returns a cached value from the first failure
//! until every outbox row committed before the store answered again has been delivered: such reads go to
//! the loader and store nothing. Fills whose lease was taken before a failure are not stored either. So a
//! value cached before the outage, or filled during it from a load that raced with a lost invalidation, is
//! never served by that process, even when the server kept its data.
//!
//! **Limits.** The gate is per process. A process that performs no store call while the server is
//! unreachable (its reads happen only before and after) sees no failure; it may serve an entry that a write
//! of the outage window invalidated until a relay delivers that write. Every relay that failed a batch
//! during the outage delivers every row up to the highest id, whatever its age, at its first wake-up after
//! the store is back (within [`RelayBuilder::sweep_interval`] plus the breaker's backoff), and the
//! recovering processes drain at once, so that window is short but not zero. A process that must never serve
//! such an entry needs a store call that fails during the outage (any read does). A process whose store
//! connection works while another's does not (a partition between one application and Redis) likewise relies
//! on the relays: the failed writer asks every relay to deliver at once (`NOTIFY` with payload `drain`), so
//! its committed keys reach the store within a relay round trip, or within the grace period if that
//! notification is lost too. Rows of transactions still open when `W` is read are not waited for: their
//! writers deliver them after their own `COMMIT`, as usual.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Pool, Postgres};
use tracing::Instrument as _;

pub use crate::backend::LISTEN_APPLICATION_NAME;
use crate::backend::{Backend, Listener};
use crate::breaker::{BreakerConfig, Health, Permit};
use crate::error::Error;
use crate::observe;
use crate::registry::{Registry, registry};
use crate::store::Store;

/// How the relay runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayConfig {
    /// Age after which rows of wrapped sessions are delivered by the relay.
    pub(crate) wrapped_grace: Duration,
    /// Time between two sweeps when no notification arrives.
    pub(crate) sweep_interval: Duration,
    /// Outbox rows per batch.
    pub(crate) batch: i32,
    /// The longest a delivery waits for the store.
    pub(crate) store_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            wrapped_grace: Duration::from_secs(2),
            sweep_interval: Duration::from_millis(500),
            batch: 5_000,
            store_timeout: Duration::from_millis(500),
        }
    }
}

/// What a drain delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Drained {
    /// Outbox rows delivered and deleted.
    pub rows: u64,
    /// Keys invalidated (distinct per batch).
    pub keys: u64,
    /// Batches (transactions).
    pub batches: u64,
}

/// The outbox's size, as [`Relay::backlog`] measures it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct Backlog {
    /// Rows in the outbox (delivered or not yet deleted).
    pub depth: u64,
    /// The highest row id (0 when empty).
    pub max_id: i64,
    /// Age of the oldest row.
    pub oldest_age: Duration,
}

/// Builder of a [`Relay`].
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use cache_runtime::{RedisStore, Relay};
///
/// let pool = sqlx::PgPool::connect("postgres://relay@localhost/shop").await?;
/// let store = RedisStore::connect("redis://127.0.0.1:6379", "shop:").await?;
/// let relay = Relay::builder(pool, store).sweep_interval(Duration::from_millis(250)).build();
/// relay.run().await; // runs until the future is dropped
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RelayBuilder<DB: Backend = Postgres> {
    pool: Pool<DB>,
    store: Arc<dyn Store>,
    config: RelayConfig,
    breaker: BreakerConfig,
    registry: Option<Registry>,
}

impl<DB: Backend> RelayBuilder<DB> {
    /// Age after which the relay delivers rows written through a [`CachedPool`](crate::CachedPool)
    /// (default 2 s): the bound on delivery after a crash between `COMMIT` and the store call.
    pub fn wrapped_grace(mut self, grace: Duration) -> Self {
        self.config.wrapped_grace = grace;
        self
    }

    /// Time between two sweeps without notification (default 500 ms).
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.config.sweep_interval = interval;
        self
    }

    /// Outbox rows per batch: one claim, one store pipeline, one delete (default 5,000).
    pub fn batch_rows(mut self, rows: u32) -> Self {
        self.config.batch = i32::try_from(rows.max(1)).unwrap_or(i32::MAX);
        self
    }

    /// The longest a batch waits for the store (default 500 ms); the batch is retried at the next sweep.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config.store_timeout = timeout;
        self
    }

    /// The circuit breaker in front of the store.
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// The entities whose outbox rows the relay renders into keys (SQLite renders keys in Rust; default:
    /// the program's [`registry()`]). PostgreSQL renders them in SQL and ignores this.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The relay (nothing runs until [`Relay::run`] or a drain is called).
    pub fn build(self) -> Relay<DB> {
        let health = Arc::new(Health::new(self.breaker, false));
        let registry = self.registry.as_ref().unwrap_or_else(|| registry());
        let state = Arc::new(DB::state(registry));
        Relay::from_parts(self.pool, self.store, self.config, health, state)
    }
}

/// A relay of one database's outbox to one store. Cheap to clone.
///
/// See the [module docs](crate::relay) for what it delivers and when.
pub struct Relay<DB: Backend = Postgres> {
    inner: Arc<RelayInner<DB>>,
}

impl<DB: Backend> Clone for Relay<DB> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<DB: Backend> std::fmt::Debug for Relay<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("pool", &self.inner.pool)
            .field("store", &self.inner.store)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct RelayInner<DB: Backend> {
    pool: Pool<DB>,
    /// PostgreSQL: a pool of one connection for the `LISTEN`, which a `PgListener` holds while it lives.
    listen: DB::Listen,
    state: Arc<DB::State>,
    store: Arc<dyn Store>,
    config: RelayConfig,
    health: Arc<Health>,
}

impl<DB: Backend> Relay<DB> {
    /// A builder for a relay reading the outbox through `pool` and invalidating in `store`.
    ///
    /// The relay's batches use `pool`; its `LISTEN` connection is one more connection to the same
    /// database, outside `pool`.
    pub fn builder(pool: Pool<DB>, store: impl Store) -> RelayBuilder<DB> {
        Self::builder_shared(pool, Arc::new(store))
    }

    /// [`builder`](Self::builder) on a shared store.
    pub fn builder_shared(pool: Pool<DB>, store: Arc<dyn Store>) -> RelayBuilder<DB> {
        RelayBuilder {
            pool,
            store,
            config: RelayConfig::default(),
            breaker: BreakerConfig::default(),
            registry: None,
        }
    }

    pub(crate) fn from_parts(
        pool: Pool<DB>,
        store: Arc<dyn Store>,
        config: RelayConfig,
        health: Arc<Health>,
        state: Arc<DB::State>,
    ) -> Self {
        let listen = DB::listen_source(&pool);
        Self {
            inner: Arc::new(RelayInner {
                pool,
                listen,
                state,
                store,
                config,
                health,
            }),
        }
    }

    /// Runs the relay: `LISTEN`, sweep when notified and every sweep interval, reconnect when the `LISTEN`
    /// connection is lost. Never returns; errors are logged and retried.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the relay. A batch in flight rolls back (its rows stay in the outbox) or
    /// has committed; either way nothing is lost, at worst a batch is delivered again.
    pub async fn run(&self) {
        let mut listener = Listener::default();
        let mut tick = tokio::time::interval(self.inner.config.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gauges_at: Option<tokio::time::Instant> = None;
        loop {
            DB::listen(&self.inner.listen, &mut listener).await;
            let result = if std::mem::take(&mut listener.urgent) {
                self.drain_all().await
            } else {
                self.drain_once().await
            };
            match result {
                Ok(drained) if drained.rows == 0 => {
                    // The gauges, at most once a second (a count over the outbox).
                    if gauges_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        gauges_at = Some(tokio::time::Instant::now());
                        if let Ok(backlog) = self.backlog().await {
                            observe::backlog(
                                i64::try_from(backlog.depth).unwrap_or(i64::MAX),
                                backlog.oldest_age.as_secs_f64(),
                            );
                        }
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    // After a failure (store outage), deliver everything up to the highest id at the next
                    // wake-up, without waiting for the grace period of rows written during the outage.
                    listener.urgent = true;
                    tracing::warn!(%error, "cache invalidation relay: sweep failed; retrying at the next tick");
                }
            }
            DB::wait(&mut listener, &mut tick).await;
        }
    }

    /// Delivers every row a sweep would deliver now (rows of unwrapped sessions, and rows of wrapped
    /// sessions older than the grace period), batch after batch until none is left; returns what it
    /// delivered. This is what [`run`](Self::run) does at each wake-up, and what a benchmark can time.
    ///
    /// # Errors
    ///
    /// [`Error::Database`], [`Error::Store`], [`Error::StoreTimeout`], or [`Error::CircuitOpen`] when the
    /// circuit breaker is open: undelivered rows stay in the outbox; the batches delivered before the error
    /// are not reported.
    ///
    /// # Cancel safety
    ///
    /// Each batch is one transaction: dropping the future leaves undelivered rows in the outbox (a batch
    /// whose keys were already invalidated may be delivered again, which is harmless).
    pub async fn drain_once(&self) -> Result<Drained, Error> {
        self.drain(None).await
    }

    /// Delivers every row in the outbox up to its current highest id, whatever its age or writer: what
    /// the recovery after a store outage runs. Rows of wrapped sessions younger than the grace period may
    /// then be delivered twice (harmless).
    ///
    /// # Errors
    ///
    /// As [`drain_once`](Self::drain_once).
    ///
    /// # Cancel safety
    ///
    /// As [`drain_once`](Self::drain_once).
    pub async fn drain_all(&self) -> Result<Drained, Error> {
        if self.inner.health.is_open() {
            return Err(Error::CircuitOpen);
        }
        let upto = self.max_id().await?;
        self.drain(Some(upto)).await
    }

    /// The outbox's highest row id (0 when empty): one index lookup.
    async fn max_id(&self) -> Result<i64, Error> {
        DB::max_id(&self.inner.pool).await
    }

    /// The outbox's depth, highest id and oldest row's age.
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    ///
    /// # Cancel safety
    ///
    /// Read only: dropping the future has no effect.
    pub async fn backlog(&self) -> Result<Backlog, Error> {
        let (depth, max_id, age) = DB::backlog(&self.inner.pool).await?;
        Ok(Backlog {
            depth: u64::try_from(depth).unwrap_or(0),
            max_id,
            oldest_age: Duration::try_from_secs_f64(age).unwrap_or_default(),
        })
    }

    /// Batch after batch; `upto` drains every row up to that id, whatever its age.
    async fn drain(&self, upto: Option<i64>) -> Result<Drained, Error> {
        let mut drained = Drained::default();
        loop {
            if self.inner.health.is_open() {
                // Do not claim rows (nor touch the database) while the store is known to be down.
                return Err(Error::CircuitOpen);
            }
            let (rows, keys) = self.batch(upto).await?;
            if rows == 0 {
                return Ok(drained);
            }
            drained.rows += rows as u64;
            drained.keys += keys as u64;
            drained.batches += 1;
            if rows < usize::try_from(self.inner.config.batch).unwrap_or(usize::MAX) {
                return Ok(drained);
            }
        }
    }

    /// One batch: claim, invalidate, delete, commit. Returns the rows and keys delivered.
    async fn batch(&self, upto: Option<i64>) -> Result<(usize, usize), Error> {
        let inner = &self.inner;
        let span = tracing::debug_span!(
            "cache.relay_batch",
            rows = tracing::field::Empty,
            keys = tracing::field::Empty
        );
        async {
            let (claim, rows) = DB::claim(
                &inner.pool,
                &inner.state,
                inner.config.batch,
                inner.config.wrapped_grace,
                upto,
            )
            .await?;
            if rows.is_empty() {
                DB::complete(claim, &inner.state, &[]).await?;
                return Ok((0, 0));
            }
            let oldest = rows.iter().map(|r| r.2).fold(0.0_f64, f64::max);
            let (ids, keys) = split(rows.into_iter().map(|(id, keys, _)| (id, keys)));
            tracing::Span::current().record("rows", ids.len());
            tracing::Span::current().record("keys", keys.len());
            // On a store error the claim is dropped (PostgreSQL: the transaction rolls back): the rows stay
            // for the next sweep.
            invalidate(
                inner.store.as_ref(),
                &inner.health,
                &keys,
                inner.config.store_timeout,
                "relay",
            )
            .await?;
            DB::invalidated(&inner.state, &ids);
            DB::complete(claim, &inner.state, &ids).await?;
            observe::relay_batch(ids.len(), oldest);
            Ok((ids.len(), keys.len()))
        }
        .instrument(span)
        .await
    }

    /// Opens the read gate of `health` after a store failure: waits until the store answers, drains the
    /// outbox up to its highest id, waits until no row up to that id remains, and opens the gate unless
    /// another failure happened meanwhile. Runs until dropped.
    pub(crate) async fn recover(&self, health: Arc<Health>) {
        loop {
            if !health.gated() {
                health.tripped.notified().await;
                continue;
            }
            let epoch = health.epoch();
            match self.recover_once(&health).await {
                Ok(()) => {
                    if !health.open_gate(epoch) {
                        continue;
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "cache recovery: store or database not ready; retrying");
                    let wait = health
                        .until_probe()
                        .max(Duration::from_millis(20))
                        .min(Duration::from_secs(1));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn recover_once(&self, health: &Health) -> Result<(), Error> {
        // A probe through the breaker: a real round trip, changing nothing.
        invalidate_probe(
            self.inner.store.as_ref(),
            health,
            self.inner.config.store_timeout,
        )
        .await?;
        let upto = self.max_id().await?;
        self.drain(Some(upto)).await?;
        // Rows up to `upto` claimed by other relays: wait until they are delivered too.
        let mut wait = Duration::from_millis(5);
        loop {
            let pending = DB::pending_upto(&self.inner.pool, upto).await?;
            if pending == 0 {
                return Ok(());
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(200));
            // Rows released by a relay that failed: deliver them ourselves.
            self.drain(Some(upto)).await?;
        }
    }
}

/// Invalidates `keys` through the breaker, bounded by `timeout`; reports the outcome to `health`.
pub(crate) async fn invalidate(
    store: &dyn Store,
    health: &Health,
    keys: &[String],
    timeout: Duration,
    path: &'static str,
) -> Result<(), Error> {
    if keys.is_empty() {
        return Ok(());
    }
    if health.permit() == Permit::Skip {
        observe::invalidation_failed(path);
        health.skipped();
        return Err(Error::CircuitOpen);
    }
    let span = tracing::debug_span!("cache.invalidate", path, keys = keys.len());
    let result = tokio::time::timeout(timeout, store.invalidate(keys))
        .instrument(span)
        .await;
    match result {
        Ok(Ok(())) => {
            health.success();
            observe::invalidations_sent(path, keys.len());
            Ok(())
        }
        Ok(Err(error)) => {
            health.failure();
            observe::store_error("invalidate");
            observe::invalidation_failed(path);
            Err(error.into())
        }
        Err(_) => {
            health.failure();
            observe::store_error("invalidate");
            observe::invalidation_failed(path);
            Err(Error::StoreTimeout(timeout))
        }
    }
}

/// A read of a slot no key uses, through the breaker: does the store answer?
async fn invalidate_probe(
    store: &dyn Store,
    health: &Health,
    timeout: Duration,
) -> Result<(), Error> {
    if health.permit() == Permit::Skip {
        return Err(Error::CircuitOpen);
    }
    let probe = ["<health>".to_owned()];
    match tokio::time::timeout(timeout, store.tags(&probe, None)).await {
        Ok(Ok(_)) => {
            health.success();
            Ok(())
        }
        Ok(Err(error)) => {
            health.failure();
            observe::store_error("probe");
            Err(error.into())
        }
        Err(_) => {
            health.failure();
            observe::store_error("probe");
            Err(Error::StoreTimeout(timeout))
        }
    }
}

/// The row ids and the distinct keys of outbox rows.
pub(crate) fn split(rows: impl IntoIterator<Item = (i64, Vec<String>)>) -> (Vec<i64>, Vec<String>) {
    let mut ids = Vec::new();
    let mut keys = BTreeSet::new();
    for (id, row_keys) in rows {
        ids.push(id);
        keys.extend(row_keys);
    }
    (ids, keys.into_iter().collect())
}
