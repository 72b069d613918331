//! The outbox: rows of keys the capture triggers write in the writing transaction, and their delivery to
//! the store. One delivery path serves the commit of a wrapped writer and the [`Relay`]: invalidate the
//! rows' distinct keys through the circuit breaker, then delete the rows.
//!
//! - [`Relay`] delivers what writers did not deliver themselves (other clients, crashes, store outages);
//!   see its module docs for when.
//! - `recovery` reopens a pool's read gate after a store outage, once the outage's rows are delivered.
//! - `cleanup` deletes the rows a writer delivered, in batches, off the caller's path.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::Pool;
use tracing::Instrument as _;

use crate::backend::{Backend, Rows};
use crate::error::Error;
use crate::health::Guarded;
use crate::observe;
use crate::registry::Registry;

pub(crate) mod cleanup;
pub(crate) mod recovery;
mod relay;

pub use crate::consumer::Consumer;
pub use relay::{Backlog, Drained, Relay, RelayBuilder};

/// How outbox rows are delivered: by the relay (grace period, sweeps, batches) and by writers (the store
/// timeout). One configuration serves a pool ([`CachedPoolOptions::relay_config`](crate::CachedPoolOptions::relay_config))
/// and a standalone relay ([`RelayBuilder::config`]).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use cache_runtime::outbox::RelayConfig;
///
/// let config = RelayConfig::new()
///     .sweep_interval(Duration::from_millis(250))
///     .store_timeout(Duration::from_millis(200));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayConfig {
    pub(crate) wrapped_grace: Duration,
    pub(crate) sweep_interval: Duration,
    pub(crate) batch: i32,
    pub(crate) store_timeout: Duration,
    pub(crate) consumer_expiry: Duration,
    pub(crate) replay_window: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayConfig {
    /// Defaults: grace 2 s, sweep every 500 ms, 5,000 rows per batch, store timeout 500 ms, consumer
    /// expiry 5 minutes, replay window 5 minutes.
    pub const fn new() -> Self {
        Self {
            wrapped_grace: Duration::from_secs(2),
            sweep_interval: Duration::from_millis(500),
            batch: 5_000,
            store_timeout: Duration::from_millis(500),
            consumer_expiry: Duration::from_secs(300),
            replay_window: Duration::from_secs(300),
        }
    }

    /// How long the keys of a delivery are kept after its outbox rows are deleted (default 5 minutes), for
    /// a store that forgets what it acknowledged (a Redis restarted from an older RDB snapshot, a replica
    /// promoted before it received the last deletes; see [`Store::sequence`](crate::Store::sequence)).
    /// When the pool finds the store's sequence gone back, it sends the store again the keys of every
    /// delivery above that sequence, and the cache stays warm; when the window does not reach back that
    /// far (a snapshot older than the window), it drops every namespace of the registry instead: a cold
    /// cache, never a stale one. The window costs one row per delivery (a writer's deliveries are batched
    /// every 50 ms) holding its keys; the gauge `cache_replay_window_deliveries` shows its size. Size it to
    /// the oldest dataset the store can come back with: Redis's default `save` rules snapshot at most
    /// 5 minutes apart under 100 changes per 5 minutes, and a Sentinel failover takes 30 s to be declared
    /// by default. Ignored for stores without a sequence.
    #[must_use]
    pub const fn replay_window(mut self, window: Duration) -> Self {
        self.replay_window = window;
        self
    }

    /// How long this process's [consumer](Consumer) stays live without a heartbeat (default 5 minutes;
    /// PostgreSQL): outbox rows are kept until every live consumer delivered them, so a consumer that is
    /// gone holds rows back this long. Its processes register every quarter of it (at most every minute).
    #[must_use]
    pub const fn consumer_expiry(mut self, expiry: Duration) -> Self {
        self.consumer_expiry = expiry;
        self
    }

    /// Age after which the relay delivers rows written through a [`CachedPool`](crate::CachedPool)
    /// (default 2 s). The writing call normally delivers them itself; this bounds delivery after a crash
    /// between `COMMIT` and the store call.
    #[must_use]
    pub const fn wrapped_grace(mut self, grace: Duration) -> Self {
        self.wrapped_grace = grace;
        self
    }

    /// Time between two relay sweeps without notification (default 500 ms).
    #[must_use]
    pub const fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Outbox rows per relay batch: one claim, one store pipeline, one delete (default 5,000; at least 1).
    #[must_use]
    pub fn batch_rows(mut self, rows: u32) -> Self {
        self.batch = i32::try_from(rows.max(1)).unwrap_or(i32::MAX);
        self
    }

    /// The longest a delivery waits for the store (default 500 ms), for a writer after `COMMIT` and for a
    /// relay batch. When the store is slower or down, a write returns `Ok` anyway, the keys stay in the
    /// outbox and a relay delivers them later.
    #[must_use]
    pub const fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }
}

/// Keys per store call of a delivery: small enough for one call to fit in the store timeout on a loaded
/// machine (10,000 keys: ~10 ms on loopback Redis), large enough for few round trips.
const INVALIDATE_CHUNK: usize = 10_000;

/// The most keys a repair of a forgetful store replays; beyond, it drops every namespace instead.
const REPLAY_MAX_KEYS: usize = 1_000_000;

/// A database's outbox and the store it is delivered to: shared by a pool's commit path and its relay.
pub(crate) struct Outbox<DB: Backend> {
    pub(crate) pool: Pool<DB>,
    /// The fingerprint of the registry this process captures with (its build).
    pub(crate) installer: String,
    /// The namespaces of the registry's entities: what the store drops after its consumer lapsed.
    pub(crate) shapes: Vec<String>,
    pub(crate) state: DB::State,
    pub(crate) guarded: Arc<Guarded>,
    pub(crate) config: RelayConfig,
    pub(crate) consumer: Consumer,
    /// This pool's or relay's registration as a process of the consumer.
    pub(crate) process: String,
    /// The consumer missed rows and its store has not dropped the namespaces yet.
    pub(crate) lapsed: AtomicBool,
    /// Registered at least once.
    pub(crate) registered: AtomicBool,
    /// The store has no sequence (it cannot forget what it acknowledged).
    pub(crate) unsequenced: AtomicBool,
    /// Whether the relay may `LISTEN` on `pool` (not through a transaction pooler).
    pub(crate) listen: bool,
}

impl<DB: Backend> Outbox<DB> {
    /// The outbox of `pool` delivered to `store` as `consumer`, for `registry`'s entities.
    pub(crate) fn new(
        pool: Pool<DB>,
        registry: &Registry,
        guarded: Arc<Guarded>,
        config: RelayConfig,
        consumer: Consumer,
    ) -> Self {
        let shapes = registry
            .entities()
            .iter()
            .flat_map(|entity| entity.templates().map(|t| t.shape().to_owned()))
            .collect::<BTreeSet<_>>();
        Self {
            pool,
            installer: registry.fingerprint(),
            shapes: shapes.into_iter().collect(),
            state: DB::state(registry),
            guarded,
            config,
            consumer,
            process: crate::store::nonce(),
            lapsed: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            unsequenced: AtomicBool::new(false),
            listen: true,
        }
    }

    /// Registers the consumer; when it had lapsed, drops the registry's namespaces from the store (on a
    /// store failure, the read gate is closed and the recovery drops them before it opens again).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the registration fails.
    pub(crate) async fn register(&self) -> Result<(), Error> {
        let expiry = self.config.consumer_expiry;
        if DB::register(&self.pool, &self.consumer, expiry, &self.process).await? {
            tracing::warn!(
                consumer = self.consumer.name(),
                "outbox rows were deleted while this cache consumer was not live (no process of it ran \
                 or its heartbeats lapsed): dropping every namespace of the registry from its store"
            );
            self.lapsed.store(true, Ordering::Release);
        }
        self.registered.store(true, Ordering::Release);
        let _ = self.drop_lost_namespaces().await;
        // The store's sequence is checked by the recovery pass (at connect, after a failure) and by the
        // heartbeat every second, not here.
        Ok(())
    }

    /// Raises the floor to the store sequence the database recorded with this consumer's deliveries, then
    /// reads the store's: when it is lower (or a call found it lower since the last check), the store
    /// forgot acknowledged invalidations. Then the read gate closes, and every namespace of the registry
    /// is dropped with the sequence raised to the floor, in one round trip (see
    /// [`acknowledged`](crate::acknowledged)). Nothing to do for a store without a sequence.
    ///
    /// # Errors
    ///
    /// [`Error::Database`], or a store error (counted as a failure): the check runs again.
    pub(crate) async fn check_sequence(&self) -> Result<(), Error> {
        if self.unsequenced.load(Ordering::Acquire) {
            return Ok(());
        }
        let ack = &self.guarded.acknowledged;
        // The database first: every sequence it recorded was reached before the store is read.
        ack.raise(DB::acknowledged(&self.pool, &self.consumer).await?);
        let floor = ack.floor();
        let timeout = self.config.store_timeout;
        let Some(seen) = self
            .guarded
            .call("sequence", timeout, |store| store.sequence(0))
            .await?
        else {
            self.unsequenced.store(true, Ordering::Release);
            return Ok(());
        };
        // Replay from the lowest sequence the store may have gone back to: `seen` may already count
        // invalidations sent since (the call that found it forgetful, and others).
        let from = match ack.take_forgot() {
            None if seen >= floor => {
                ack.raise(seen);
                return Ok(());
            }
            None => seen,
            Some(at) => at.min(seen),
        };
        // Reads stop using the store until the repair (a pass's own, see `recover_once`); not a failure of
        // the store's connection, so the breaker does not count it.
        self.guarded.health.skipped();
        match self.repair(from, floor).await {
            Ok(seen) => {
                ack.raise(seen);
                Ok(())
            }
            Err(error) => {
                ack.mark_forgot(from);
                Err(error)
            }
        }
    }

    /// Repairs a store that forgot invalidations back to its sequence `seen`: sends it again the keys of
    /// every delivery of the replay window above `seen` (see [`RelayConfig::replay_window`]) or, when the
    /// window does not reach back that far, drops every namespace of the registry; the last call raises
    /// its sequence to `floor`, so that reads use it again only once it is repaired. Returns the sequence.
    async fn repair(&self, seen: u64, floor: u64) -> Result<u64, Error> {
        let replay = DB::replay(
            &self.pool,
            &self.state,
            &self.consumer,
            seen,
            REPLAY_MAX_KEYS,
        )
        .await?;
        let (how, keys) = match replay {
            Some(keys) => ("replayed", keys),
            None => ("dropped", self.shapes.clone()),
        };
        tracing::warn!(
            consumer = self.consumer.name(),
            sequence = seen,
            acknowledged = floor,
            how,
            keys = keys.len(),
            "the cache store forgot acknowledged invalidations (restarted from an older snapshot, or a \
             replica promoted before it had them): repairing it before reads use it again (`replayed`: \
             the replay window's keys above its sequence, `dropped`: every namespace of the registry)"
        );
        let timeout = self.config.store_timeout;
        let mut chunks: Vec<&[String]> = keys.chunks(INVALIDATE_CHUNK).collect();
        let last = chunks.pop().unwrap_or_default();
        for chunk in chunks {
            self.guarded
                .call("replay", timeout, |store| store.invalidate(chunk))
                .await?;
        }
        let seen = self
            .guarded
            .call("reset", timeout, |store| store.reset(last, floor))
            .await?;
        observe::store_reset(how);
        observe::invalidations_sent(how, keys.len());
        Ok(seen.unwrap_or(0))
    }

    /// Purges the replay window of deliveries older than it (see [`RelayConfig::replay_window`]).
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    pub(crate) async fn purge_replay(&self) -> Result<(), Error> {
        if self.unsequenced.load(Ordering::Acquire) {
            return Ok(());
        }
        let left = DB::purge_replay(&self.pool, &self.consumer, self.config.replay_window).await?;
        observe::replay_window(left);
        Ok(())
    }

    /// Drops the registry's namespaces from the store if the consumer lapsed.
    ///
    /// # Errors
    ///
    /// As [`invalidate`](Self::invalidate); the namespaces stay to drop.
    pub(crate) async fn drop_lost_namespaces(&self) -> Result<(), Error> {
        if self.lapsed.load(Ordering::Acquire) {
            let delivery = self
                .invalidate([(0, self.shapes.clone())], "lapsed")
                .await?;
            // The rows the consumer missed are in no replay: a store that forgets this drop cannot be
            // repaired by one.
            if delivery.sequence > 0 {
                DB::cut_replay(&self.pool, &self.consumer, delivery.sequence).await?;
            }
            self.lapsed.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Invalidates the distinct keys of `rows` through the breaker, bounded by the store timeout, and marks
    /// the rows invalidated; `path` (`commit`, `relay`) labels the metrics. Returns the rows' ids, the
    /// number of distinct keys, and the store's [sequence](crate::Store::sequence) after the invalidation
    /// (0 for a store without one): recorded with the rows' deletion.
    ///
    /// # Errors
    ///
    /// [`Error::CircuitOpen`], [`Error::Store`] or [`Error::StoreTimeout`]: the rows stay in the outbox.
    pub(crate) async fn invalidate(
        &self,
        rows: impl IntoIterator<Item = (i64, Vec<String>)>,
        path: &'static str,
    ) -> Result<Delivery, Error> {
        let (ids, keys) = split(rows);
        tracing::Span::current().record("rows", ids.len());
        tracing::Span::current().record("keys", keys.len());
        let sequence = self.invalidate_keys(&keys, path).await?;
        DB::invalidated(&self.state, &ids);
        Ok(Delivery {
            ids,
            keys: keys.len(),
            sequence,
        })
    }

    /// Invalidates `keys` through the breaker, in chunks each bounded by the store timeout: one statement
    /// can change a million rows, and its keys must reach the store however long all of them take (a
    /// rejected chunk is retried whole). Returns the store's sequence after the last chunk.
    ///
    /// # Errors
    ///
    /// As [`invalidate`](Self::invalidate); also [`StoreError::Forgot`](crate::StoreError::Forgot) when the
    /// store's sequence shows that it went back.
    async fn invalidate_keys(&self, keys: &[String], path: &'static str) -> Result<u64, Error> {
        let mut sequence = 0;
        for chunk in keys.chunks(INVALIDATE_CHUNK) {
            let span = tracing::debug_span!(
                "cache.invalidate",
                path,
                keys = chunk.len(),
                "db.system.name" = self.guarded.store.system_name(),
                "db.operation.name" = "UNLINK"
            );
            let floor = self.guarded.acknowledged.floor();
            let result = self
                .guarded
                .call("invalidate", self.config.store_timeout, |store| {
                    store.invalidate(chunk)
                })
                .instrument(span)
                .await
                .and_then(|seen| {
                    // The invalidation raised the sequence: its answer is above the floor of the call.
                    self.guarded.observe(floor + 1, seen)?;
                    Ok(seen)
                });
            match result {
                Ok(seen) => sequence = sequence.max(seen.unwrap_or(0)),
                Err(error) => {
                    observe::invalidation_failed(path);
                    if matches!(error, Error::CircuitOpen) {
                        self.guarded.health.skipped();
                    }
                    return Err(error);
                }
            }
            observe::invalidations_sent(path, chunk.len());
            self.guarded.recent.note(chunk);
            if !self.guarded.health.gated() {
                self.guarded.refresh.invalidated(chunk);
            }
        }
        Ok(sequence)
    }

    /// Delivers the rows a writer read after its statement or before its `COMMIT`; returns the ids to
    /// delete and the sequence to record with them; `committed`: when the `COMMIT` answered (for the lag
    /// histogram). A store failure is logged (never returned: the `COMMIT` stands) and every relay is asked
    /// to deliver at once.
    pub(crate) async fn deliver(
        &self,
        rows: Rows,
        committed: std::time::Instant,
    ) -> Option<(Vec<i64>, u64)> {
        if rows.is_empty() {
            return None;
        }
        let keys: usize = rows.iter().map(|(_, keys)| keys.len()).sum();
        match self.invalidate(rows, "commit").await {
            Ok(delivery) => {
                observe::invalidation_lag("commit", committed.elapsed().as_secs_f64());
                Some((delivery.ids, delivery.sequence))
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    keys,
                    "cache invalidation failed after COMMIT; the outbox keeps the keys, the relay retries, and \
                     reads bypass the cache until they are delivered"
                );
                // Relays of processes that can reach the store: deliver now, not after the grace period.
                // (Also while the breaker is open: these rows committed after earlier requests. Relays
                // coalesce the notifications, and those whose own breaker is open skip the drain.)
                if let Err(error) = DB::notify_drain(&self.pool).await {
                    tracing::debug!(%error, "could not ask the relays to drain; they deliver after the grace period");
                }
                None
            }
        }
    }
}

/// Tells the database that this build runs, so that no install retires its capture while a process of it
/// runs (see `PgSchema::retire_unseen_after`), and that its consumer is live (see [`Consumer`]); and checks
/// every second that the store did not forget acknowledged invalidations (see
/// [`Outbox::check_sequence`]). Runs until dropped.
pub(crate) async fn heartbeat<DB: Backend>(outbox: Arc<Outbox<DB>>) {
    // Registered at connect (pools) or at the start of `Relay::run`. The first beat comes within a second:
    // a delete that ran concurrently with that registration, still counting this consumer as gone, marks
    // it as having missed rows only after the registration answered.
    let period = crate::consumer::heartbeat_interval(outbox.config.consumer_expiry);
    let first = tokio::time::Instant::now() + period.min(SEQUENCE_CHECK);
    let mut beat = tokio::time::interval_at(first, period);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check =
        tokio::time::interval_at(tokio::time::Instant::now() + SEQUENCE_CHECK, SEQUENCE_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let result = tokio::select! {
            _ = beat.tick() => async {
                DB::alive(&outbox.pool, &outbox.installer).await?;
                outbox.register().await?;
                outbox.purge_replay().await
            }.await,
            _ = check.tick() => outbox.check_sequence().await,
        };
        if let Err(error) = result {
            tracing::debug!(%error, "could not tell the database that this build and consumer run, or check the store; retrying");
        }
    }
}

/// How often a process compares the store's sequence with the one the database recorded.
const SEQUENCE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Aborts a heartbeat task when dropped (with the future that started it).
pub(crate) struct HeartbeatTask(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for HeartbeatTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What [`Outbox::invalidate`] delivered.
pub(crate) struct Delivery {
    /// The rows' ids.
    pub(crate) ids: Vec<i64>,
    /// The number of distinct keys.
    pub(crate) keys: usize,
    /// The store's sequence after the invalidation (0 for a store without one).
    pub(crate) sequence: u64,
}

/// The row ids and the distinct keys of outbox rows.
fn split(rows: impl IntoIterator<Item = (i64, Vec<String>)>) -> (Vec<i64>, Vec<String>) {
    let mut ids = Vec::new();
    let mut keys = BTreeSet::new();
    for (id, row_keys) in rows {
        ids.push(id);
        keys.extend(row_keys);
    }
    (ids, keys.into_iter().collect())
}

impl<DB: Backend> crate::token::Positions for Outbox<DB> {
    fn consumer(&self) -> u64 {
        self.consumer.id()
    }

    fn delivered(&self, position: i64) -> futures_core::future::BoxFuture<'_, Result<bool, Error>> {
        Box::pin(
            async move { Ok(DB::pending_upto(&self.pool, &self.consumer, position).await? == 0) },
        )
    }
}
