//! The relay: delivers outbox rows the writing session did not deliver itself.
//!
//! A [`Relay`] runs inside every application (a background task of [`CachedPool`](crate::CachedPool),
//! unless turned off with [`CachedPoolOptions::run_relay`](crate::CachedPoolOptions::run_relay)) and can run on its
//! own ([`Relay::run`], the `cache_relay` binary of the `examples` package). Any number of relays may serve
//! one database at once.
//!
//! # What it delivers, and when
//!
//! - Rows of sessions that do not go through the wrapper (`psql`, a plain `PgPool`, another service): at
//!   once. Their commit sends a `NOTIFY` on [`NOTIFY_CHANNEL`](crate::backend::postgres::NOTIFY_CHANNEL); the relay `LISTEN`s on a connection of its
//!   own (application name `cache_invalidation_relay`) and sweeps when notified.
//! - Rows of wrapped sessions once they are older than the grace period
//!   ([`RelayConfig::wrapped_grace`](super::RelayConfig::wrapped_grace), default 2 s). The writing call delivers them itself, right after
//!   `COMMIT`, and queues them for deletion; rows still there after the grace period were left behind (the
//!   store call failed, the process crashed between `COMMIT` and the delete, or the statement was not
//!   classified as a write). So a wrapped row is delivered once in the normal case, and at least once always.
//! - Rows a wrapped writer could not deliver (its store call failed or its breaker is open): at once. The
//!   writer then sends `NOTIFY` with the payload `drain`, and every relay delivers every row up to the
//!   outbox's highest id, whatever its age, so that processes whose store connection works invalidate the
//!   keys without waiting for the grace period.
//! - A periodic sweep ([`RelayConfig::sweep_interval`](super::RelayConfig::sweep_interval), default 500 ms) catches notifications that were lost
//!   (the `LISTEN` connection dropped: it reconnects, then sweeps at once) and rows whose grace period ended.
//!
//! # SQLite
//!
//! A SQLite relay has no `LISTEN`: it sweeps every [`RelayConfig::sweep_interval`](super::RelayConfig::sweep_interval), delivering the rows
//! above its process's delivered watermark that are older than a settle time (100 ms, or the grace period
//! if shorter), whatever their writer: SQLite rows cannot tell a wrapped writer's from another client's, so
//! the wait is short. A wrapped writer delivers its rows well within it, so they are normally delivered
//! once; a writer slower than that (a slow store) may see them delivered a second time, which is harmless. Several relays
//! (processes) may deliver the same row; each deletes what it delivered by id range. Keys are rendered from
//! the rows' JSON images with the relay's registry ([`RelayBuilder::registry`]).
//!
//! # One batch
//!
//! A batch is one transaction: claim up to [`RelayConfig::batch_rows`](super::RelayConfig::batch_rows) rows its [`Consumer`] has not
//! delivered, with `FOR UPDATE SKIP LOCKED` (several relays share the work, each row is held by one of
//! them; a relay of another consumer that skipped a held row is notified again when the batch leaves the
//! row to others), invalidate their distinct keys in one
//! store pipeline (bounded by [`RelayConfig::store_timeout`](super::RelayConfig::store_timeout)), record them as delivered (deleting those
//! every live consumer delivered) and commit with
//! `synchronous_commit = off` (no WAL flush: losing the delete in a database crash only means a second,
//! harmless delivery). When the store fails, the transaction rolls back and the rows stay for the next sweep:
//! delivery is at least once. A backlog drains batch after batch ([`Relay::deliver_pending`]).
//!
//! # Store outages and the read gate
//!
//! Store calls go through the circuit breaker (see the [`health`](crate::health) module). In a
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
//! the store is back (within [`RelayConfig::sweep_interval`](super::RelayConfig::sweep_interval) plus the breaker's backoff), and the
//! recovering processes drain at once, so that window is short but not zero. A process that must never serve
//! such an entry needs a store call that fails during the outage (any read does). A process whose store
//! connection works while another's does not (a partition between one application and Redis) likewise relies
//! on the relays: the failed writer asks every relay to deliver at once (`NOTIFY` with payload `drain`), so
//! its committed keys reach the store within a relay round trip, or within the grace period if that
//! notification is lost too. Rows of transactions still open when `W` is read are not waited for: their
//! writers deliver them after their own `COMMIT`, as usual.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Pool, Postgres};
use tracing::Instrument as _;

use super::{Consumer, Outbox, RelayConfig};
use crate::backend::{Backend, Wake};
use crate::error::Error;
use crate::health::{BreakerConfig, Guarded};
use crate::observe;
use crate::registry::{Registry, registry};
use crate::store::Store;

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
    /// Rows this relay's consumer has not delivered (or delivered and not yet deleted, for rows a writer
    /// delivered).
    pub depth: u64,
    /// The highest row id (0 when empty).
    pub max_id: i64,
    /// Age of the oldest of those rows.
    pub oldest_age: Duration,
    /// Every row in the outbox, including those other consumers still need.
    pub total: u64,
    /// Live consumers (see [`Consumer`](super::Consumer)).
    pub consumers: u32,
}

/// Builder of a standalone [`Relay`].
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use cache_runtime::RedisStore;
/// use cache_runtime::outbox::{Relay, RelayConfig};
///
/// let pool = sqlx::PgPool::connect("postgres://relay@localhost/shop").await?;
/// let store = RedisStore::connect("redis://127.0.0.1:6379", "shop:").await?;
/// let relay = Relay::builder(pool, store)
///     .config(RelayConfig::new().sweep_interval(Duration::from_millis(250)))
///     .build();
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
    consumer: Option<Consumer>,
}

impl<DB: Backend> RelayBuilder<DB> {
    /// The consumer this relay delivers to (default: the store's [`Store::consumer`] name): relays and
    /// pools of one consumer share the delivery of each row (see [`Consumer`]).
    #[must_use]
    pub fn consumer(mut self, consumer: Consumer) -> Self {
        self.consumer = Some(consumer);
        self
    }

    /// The delivery settings (default [`RelayConfig::new`]).
    #[must_use]
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// The circuit breaker in front of the store.
    #[must_use]
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// The entities whose outbox rows the relay renders into keys (SQLite renders keys in Rust; default:
    /// the program's [`registry()`]). PostgreSQL renders them in SQL and ignores this.
    #[must_use]
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The relay (nothing runs until [`Relay::run`] or a delivery is called).
    pub fn build(self) -> Relay<DB> {
        let registry = self.registry.as_ref().unwrap_or_else(|| registry());
        let consumer = self
            .consumer
            .unwrap_or_else(|| Consumer::new(self.store.consumer()));
        Relay::new(Outbox::new(
            self.pool,
            registry,
            Arc::new(Guarded::new(self.store, self.breaker, false)),
            self.config,
            consumer,
        ))
    }
}

/// A relay of one database's outbox to one store. Cheap to clone.
///
/// See the [module docs](crate::outbox::Relay) for what it delivers and when.
pub struct Relay<DB: Backend = Postgres> {
    pub(crate) outbox: Arc<Outbox<DB>>,
}

impl<DB: Backend> Clone for Relay<DB> {
    fn clone(&self) -> Self {
        Self {
            outbox: Arc::clone(&self.outbox),
        }
    }
}

impl<DB: Backend> std::fmt::Debug for Relay<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("pool", &self.outbox.pool)
            .field("store", &self.outbox.guarded.store)
            .field("config", &self.outbox.config)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> Relay<DB> {
    /// A builder for a relay reading the outbox through `pool` and invalidating in `store`.
    ///
    /// The relay's batches use `pool`; its `LISTEN` connection (PostgreSQL) is one more connection to the
    /// same database, outside `pool`.
    pub fn builder(pool: Pool<DB>, store: impl Store) -> RelayBuilder<DB> {
        RelayBuilder {
            pool,
            store: Arc::new(store),
            config: RelayConfig::new(),
            breaker: BreakerConfig::default(),
            registry: None,
            consumer: None,
        }
    }

    pub(crate) fn new(outbox: Outbox<DB>) -> Self {
        Self {
            outbox: Arc::new(outbox),
        }
    }

    /// Runs the relay: `LISTEN`, deliver when notified and every sweep interval, reconnect when the `LISTEN`
    /// connection is lost. Never returns; errors are logged and retried.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the relay. A batch in flight rolls back (its rows stay in the outbox) or
    /// has committed; either way nothing is lost, at worst a batch is delivered again.
    pub async fn run(&self) {
        // A standalone relay keeps its build's capture from being retired, as a pool does.
        if !self
            .outbox
            .registered
            .load(std::sync::atomic::Ordering::Acquire)
        {
            // A standalone relay: its consumer is live from now on.
            if let Err(error) = self.outbox.register().await {
                tracing::warn!(%error, "cache invalidation relay: could not register its consumer; retrying");
            }
        }
        let _alive = super::HeartbeatTask(tokio::spawn(super::heartbeat(Arc::clone(&self.outbox))));
        let mut listener = DB::listener(&self.outbox.pool, self.outbox.listen);
        let mut tick = tokio::time::interval(self.outbox.config.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gauges_at: Option<tokio::time::Instant> = None;
        let mut wake = Wake::Sweep;
        loop {
            DB::listen(&mut listener).await;
            let result = match wake {
                Wake::Drain => self.deliver_all().await,
                Wake::Sweep => self.deliver_pending().await,
            };
            let failed = result.is_err();
            match result {
                Ok(drained) if drained.rows == 0 => {
                    // The gauges, at most once a second (a count over the outbox).
                    if gauges_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        gauges_at = Some(tokio::time::Instant::now());
                        self.report_backlog().await;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    // After a failure (store outage), deliver everything up to the highest id at the next
                    // wake-up, without waiting for the grace period of rows written during the outage.
                    tracing::warn!(%error, "cache invalidation relay: sweep failed; retrying at the next tick");
                }
            }
            wake = DB::wait(&mut listener, &mut tick).await;
            if failed {
                wake = Wake::Drain;
            }
        }
    }

    /// Delivers every row a sweep would deliver now (rows of unwrapped sessions, and rows of wrapped
    /// sessions older than the grace period), batch after batch until none is left; returns what it
    /// delivered. This is what [`run`](Self::run) does at each wake-up, and what tools and tests call to
    /// deliver by hand.
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
    pub async fn deliver_pending(&self) -> Result<Drained, Error> {
        self.drain(None).await
    }

    /// Delivers every row in the outbox up to its current highest id, whatever its age or writer: what
    /// the recovery after a store outage runs. Rows of wrapped sessions younger than the grace period may
    /// then be delivered twice (harmless).
    ///
    /// # Errors
    ///
    /// As [`deliver_pending`](Self::deliver_pending).
    ///
    /// # Cancel safety
    ///
    /// As [`deliver_pending`](Self::deliver_pending).
    pub async fn deliver_all(&self) -> Result<Drained, Error> {
        if self.outbox.guarded.health.is_open() {
            return Err(Error::CircuitOpen);
        }
        let upto = DB::max_id(&self.outbox.pool).await?;
        self.drain(Some(upto)).await
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
        let (depth, max_id, age, total, consumers) =
            DB::backlog(&self.outbox.pool, &self.outbox.consumer).await?;
        Ok(Backlog {
            depth: u64::try_from(depth).unwrap_or(0),
            max_id,
            oldest_age: Duration::try_from_secs_f64(age).unwrap_or_default(),
            total: u64::try_from(total).unwrap_or(0),
            consumers: u32::try_from(consumers).unwrap_or(0),
        })
    }

    /// The consumer this relay delivers to.
    pub fn consumer(&self) -> &Consumer {
        &self.outbox.consumer
    }

    async fn report_backlog(&self) {
        if let Ok(backlog) = self.backlog().await {
            observe::backlog(
                backlog.depth,
                backlog.oldest_age.as_secs_f64(),
                backlog.total,
                backlog.consumers,
            );
        }
    }

    /// Batch after batch; `upto` drains every row up to that id, whatever its age.
    pub(crate) async fn drain(&self, upto: Option<i64>) -> Result<Drained, Error> {
        let mut drained = Drained::default();
        loop {
            if self.outbox.guarded.health.is_open() {
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
            if rows < usize::try_from(self.outbox.config.batch).unwrap_or(usize::MAX) {
                return Ok(drained);
            }
        }
    }

    /// One batch: claim, invalidate, delete, commit. Returns the rows and keys delivered.
    async fn batch(&self, upto: Option<i64>) -> Result<(usize, usize), Error> {
        let outbox = &self.outbox;
        let span = tracing::debug_span!(
            "cache.relay_batch",
            "db.system.name" = DB::SYSTEM_NAME,
            rows = tracing::field::Empty,
            keys = tracing::field::Empty
        );
        async {
            let config = &outbox.config;
            let (claim, rows) = DB::claim(
                &outbox.pool,
                &outbox.state,
                &outbox.consumer,
                config.batch,
                config.wrapped_grace,
                upto,
            )
            .await?;
            let oldest = rows.iter().map(|r| r.2).fold(0.0_f64, f64::max);
            // On a store error the claim is dropped (PostgreSQL: the transaction rolls back): the rows stay
            // for the next sweep.
            let delivery = outbox
                .invalidate(rows.into_iter().map(|(id, keys, _)| (id, keys)), "relay")
                .await?;
            let ids = &delivery.ids;
            DB::complete(
                claim,
                &outbox.state,
                &outbox.consumer,
                ids,
                delivery.sequence,
            )
            .await?;
            if !ids.is_empty() {
                observe::relay_batch(ids.len(), oldest);
            }
            Ok((ids.len(), delivery.keys))
        }
        .instrument(span)
        .await
    }
}
