//! Store health: a circuit breaker, and the gate that keeps reads off the cache after a store failure until
//! the invalidations of the outage are delivered.
//!
//! # Breaker
//!
//! Every store call of a [`Cache`](crate::Cache), of the commit path and of the relay reports its outcome.
//! After [`BreakerConfig::failure_threshold`] consecutive failures the breaker **opens**: store calls are
//! skipped (reads go to the loader at once, commits leave their keys in the outbox) for a backoff that starts
//! at [`BreakerConfig::open_min`] and doubles after each failed probe up to [`BreakerConfig::open_max`].
//! When the backoff has passed, the breaker is **half-open**: exactly one call (the probe) reaches the store;
//! its success closes the breaker, its failure opens it again for a longer backoff. A dead server therefore
//! sees at most one request per backoff period from each process.
//!
//! Until the breaker opens, a store call waits at most for the store's own timeout ([`RedisStore`]: 1 s per
//! command, reconnects failing fast), and the commit path and the relay bound theirs by
//! [`RelayConfig::store_timeout`](crate::outbox::RelayConfig::store_timeout) (default 500 ms). Reads never return a store error: they fall
//! through to the loader.
//!
//! [`RedisStore`]: crate::RedisStore
//!
//! # Gate
//!
//! A store failure may mean an invalidation was lost (a commit whose delete did not reach the store, in this
//! process or another). The outbox still holds those keys, but until they are delivered the store may hold
//! entries older than those writes: entries cached before the outage (when the server kept its data), or
//! filled by loads that raced with the lost invalidation. So the **first** store failure closes the gate of
//! the [`Cache`](crate::Cache) of a [`CachedPool`](crate::CachedPool) (one failure is enough: a single lost
//! invalidation makes a stale hit possible). While the gate is closed, reads go to the loader and store
//! nothing. The pool's recovery task then waits until a probe succeeds, reads the outbox's highest id `W`,
//! delivers every row up to `W` (whatever its age and whoever wrote it), waits until no row up to `W`
//! remains (other relays may hold some), and opens the gate, unless another failure happened meanwhile (then
//! it starts over). See the [`outbox::Relay`](crate::outbox::Relay) docs for the guarantee and its limits.
//!
//! A [`Cache`](crate::Cache) built on its own (not by a pool) has no outbox to drain: it has the breaker
//! only, and reads use the store again as soon as it answers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::Error;
use crate::observe;
use crate::store::{BoxFuture, Store, StoreError};

/// Settings of the circuit breaker in front of the store.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// let breaker = cache_runtime::health::BreakerConfig::default()
///     .failure_threshold(3)
///     .open_min(Duration::from_millis(100))
///     .open_max(Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    threshold: u32,
    open_min: Duration,
    open_max: Duration,
}

impl Default for BreakerConfig {
    /// 3 consecutive failures open the breaker for 100 ms, doubling after each failed probe up to 5 s.
    fn default() -> Self {
        Self {
            threshold: 3,
            open_min: Duration::from_millis(100),
            open_max: Duration::from_secs(5),
        }
    }
}

impl BreakerConfig {
    /// Consecutive failures that open the breaker (at least 1; default 3).
    #[must_use]
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.threshold = failures.max(1);
        self
    }

    /// The first backoff after the breaker opens (default 100 ms).
    #[must_use]
    pub fn open_min(mut self, backoff: Duration) -> Self {
        self.open_min = backoff;
        self
    }

    /// The longest backoff between two probes (default 5 s).
    #[must_use]
    pub fn open_max(mut self, backoff: Duration) -> Self {
        self.open_max = backoff;
        self
    }
}

/// The state of the breaker, as reported by [`Cache::breaker_state`](crate::Cache::breaker_state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Store calls go through.
    Closed,
    /// One probe call is in flight; other calls skip the store.
    HalfOpen,
    /// Store calls are skipped until the backoff has passed.
    Open,
}

#[derive(Debug)]
enum Mode {
    Closed,
    Open { until: Instant },
    HalfOpen { since: Instant },
}

#[derive(Debug)]
struct State {
    failures: u32,
    mode: Mode,
    backoff: Duration,
}

/// Whether a store call may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Yes (breaker closed, or this call is the half-open probe).
    Go,
    /// No: the breaker is open, or another call is probing.
    Skip,
}

/// A probe that did not report within this time is presumed lost (its future was dropped).
const PROBE_LOST: Duration = Duration::from_secs(5);

/// Shared health of one store, as seen by one process's cache, commit path and relay.
#[derive(Debug)]
pub(crate) struct Health {
    config: BreakerConfig,
    state: Mutex<State>,
    /// Incremented by every failure: a recovery that saw another failure while it ran must start over.
    epoch: AtomicU64,
    /// Whether failures close the gate (only when an outbox drain can open it again).
    gate_enabled: bool,
    gated: AtomicBool,
    /// False while the breaker is closed with no failure counted: the hot path then takes no lock.
    dirty: AtomicBool,
    /// Woken by a failure that closed the gate.
    pub(crate) tripped: Notify,
}

impl Health {
    pub(crate) fn new(config: BreakerConfig, gate_enabled: bool) -> Self {
        observe::breaker_state(0);
        if gate_enabled {
            observe::gate_closed(false);
        }
        Self {
            state: Mutex::new(State {
                failures: 0,
                mode: Mode::Closed,
                backoff: config.open_min,
            }),
            config,
            epoch: AtomicU64::new(0),
            gate_enabled,
            gated: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            tripped: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a store call may go ahead now; the caller must report its outcome.
    pub(crate) fn permit(&self) -> Permit {
        if !self.dirty.load(Ordering::Acquire) {
            return Permit::Go;
        }
        let mut state = self.lock();
        let now = Instant::now();
        match state.mode {
            Mode::Closed => Permit::Go,
            Mode::Open { until } if now >= until => {
                state.mode = Mode::HalfOpen { since: now };
                observe::breaker_state(1);
                Permit::Go
            }
            Mode::HalfOpen { since } if now.duration_since(since) >= PROBE_LOST => {
                state.mode = Mode::HalfOpen { since: now };
                Permit::Go
            }
            Mode::Open { .. } | Mode::HalfOpen { .. } => Permit::Skip,
        }
    }

    /// The breaker's state.
    pub(crate) fn state(&self) -> BreakerState {
        match self.lock().mode {
            Mode::Closed => BreakerState::Closed,
            Mode::HalfOpen { .. } => BreakerState::HalfOpen,
            Mode::Open { .. } => BreakerState::Open,
        }
    }

    /// A store call succeeded.
    pub(crate) fn success(&self) {
        if !self.dirty.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.lock();
        state.failures = 0;
        self.dirty.store(false, Ordering::Release);
        if !matches!(state.mode, Mode::Closed) {
            state.mode = Mode::Closed;
            state.backoff = self.config.open_min;
            observe::breaker_state(0);
            tracing::info!("cache store answers again; circuit breaker closed");
        }
    }

    /// Whether failures close a read gate (a pool's health, which a recovery reopens).
    pub(crate) fn gate_enabled(&self) -> bool {
        self.gate_enabled
    }

    /// A store call failed (or timed out): counts towards opening the breaker, and closes the gate.
    pub(crate) fn failure(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.gate_enabled && !self.gated.swap(true, Ordering::SeqCst) {
            observe::gate_closed(true);
            tracing::warn!(
                "cache store failed: reads bypass the cache until the outbox rows of the outage are delivered"
            );
        }
        {
            let mut state = self.lock();
            state.failures = state.failures.saturating_add(1);
            let now = Instant::now();
            match state.mode {
                Mode::HalfOpen { .. } => {
                    state.backoff = (state.backoff * 2).min(self.config.open_max);
                    state.mode = Mode::Open {
                        until: now + state.backoff,
                    };
                    observe::breaker_state(2);
                }
                Mode::Closed if state.failures >= self.config.threshold => {
                    state.backoff = self.config.open_min;
                    state.mode = Mode::Open {
                        until: now + state.backoff,
                    };
                    observe::breaker_state(2);
                    tracing::warn!(
                        failures = state.failures,
                        "cache store failing; circuit breaker open"
                    );
                }
                Mode::Closed | Mode::Open { .. } => {}
            }
        }
        self.dirty.store(true, Ordering::SeqCst);
        self.tripped.notify_one();
    }

    /// A store call was skipped because the breaker is open (its work is left to the outbox), or the store
    /// answered but must not be used until it is repaired (it forgot acknowledged invalidations). Closes
    /// the gate and restarts a recovery in progress, without counting a failure towards the breaker.
    pub(crate) fn skipped(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.gate_enabled && !self.gated.swap(true, Ordering::SeqCst) {
            observe::gate_closed(true);
        }
        self.tripped.notify_one();
    }

    /// Whether the breaker is open and its backoff has not passed (a call now would be skipped).
    pub(crate) fn is_open(&self) -> bool {
        if !self.dirty.load(Ordering::Acquire) {
            return false;
        }
        matches!(self.lock().mode, Mode::Open { until } if Instant::now() < until)
    }

    /// How long until the breaker lets a probe through (zero when it would now).
    pub(crate) fn until_probe(&self) -> Duration {
        match self.lock().mode {
            Mode::Open { until } => until.saturating_duration_since(Instant::now()),
            Mode::Closed | Mode::HalfOpen { .. } => Duration::ZERO,
        }
    }

    /// The failure count so far (changes with every failure).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Whether reads must bypass the store: the gate is closed, or the breaker skips calls.
    pub(crate) fn gated(&self) -> bool {
        self.gated.load(Ordering::SeqCst)
    }

    /// Opens the gate, unless a failure happened since `epoch` was read. Returns whether it is open.
    pub(crate) fn open_gate(&self, epoch: u64) -> bool {
        // Hold the breaker lock so that a concurrent failure is ordered before or after as a whole.
        let _state = self.lock();
        if self.epoch.load(Ordering::SeqCst) != epoch {
            return false;
        }
        if self.gated.swap(false, Ordering::SeqCst) {
            observe::gate_closed(false);
            tracing::info!("outbox rows of the store outage delivered; reads use the cache again");
        }
        true
    }
}

/// A store behind its circuit breaker: what a process's cache, commit path and relay share (one per
/// [`CachedPool`](crate::CachedPool); a standalone [`Cache`](crate::Cache) or relay has its own).
#[derive(Debug)]
pub(crate) struct Guarded {
    /// The store.
    pub(crate) store: Arc<dyn Store>,
    /// Its breaker and read gate.
    pub(crate) health: Health,
    /// The keys this process invalidated recently (reads of them skip the peek).
    pub(crate) recent: crate::recent::Recent,
    /// The highest sequence the store is known to have reached.
    pub(crate) acknowledged: crate::acknowledged::Acknowledged,
    /// Where a read given a [`WriteToken`](crate::token::WriteToken) asks whether its write was delivered
    /// to this store: the pool's outbox (unset for a standalone cache).
    pub(crate) positions: std::sync::OnceLock<std::sync::Weak<dyn crate::token::Positions>>,
    /// The hot keys refreshed after their invalidation (see [`refresh`](crate::refresh)).
    pub(crate) refresh: crate::refresh::Refresher,
}

impl Guarded {
    /// `store` behind a breaker of `config`; with `gate`, failures also close the read gate (only where an
    /// outbox drain can open it again: in a pool).
    pub(crate) fn new(store: Arc<dyn Store>, config: BreakerConfig, gate: bool) -> Self {
        Self {
            store,
            health: Health::new(config, gate),
            recent: crate::recent::Recent::default(),
            acknowledged: crate::acknowledged::Acknowledged::default(),
            positions: std::sync::OnceLock::new(),
            refresh: crate::refresh::Refresher::default(),
        }
    }

    /// Checks the sequence of an answer to a call sent while the floor was `floor` (see
    /// [`Acknowledged::observe`](crate::acknowledged::Acknowledged::observe)); a store that forgot counts
    /// as a failure.
    ///
    /// # Errors
    ///
    /// [`StoreError::Forgot`].
    pub(crate) fn observe(&self, floor: u64, seen: Option<u64>) -> Result<(), StoreError> {
        let result = self.acknowledged.observe(floor, seen);
        if let Err(error) = &result {
            tracing::warn!(%error, "cache store went back in time");
            // The store answered: close the gate until it is repaired, but count no failure towards the
            // breaker (which would skip the writers' deliveries for a backoff after the store is back).
            self.health.skipped();
            observe::store_error("forgot");
        }
        result
    }

    /// Runs `op` on the store through the breaker, bounded by `timeout`, and reports its outcome; `name`
    /// labels the store-error metric.
    ///
    /// # Errors
    ///
    /// [`Error::CircuitOpen`] when the breaker skipped the call, [`Error::Store`] or
    /// [`Error::StoreTimeout`] when it failed (counted as a failure).
    pub(crate) async fn call<'a, T>(
        &'a self,
        name: &'static str,
        timeout: Duration,
        op: impl FnOnce(&'a dyn Store) -> BoxFuture<'a, Result<T, StoreError>>,
    ) -> Result<T, Error> {
        if self.health.permit() == Permit::Skip {
            return Err(Error::CircuitOpen);
        }
        let result = match tokio::time::timeout(timeout, op(self.store.as_ref())).await {
            Ok(Ok(value)) => {
                self.health.success();
                return Ok(value);
            }
            Ok(Err(error)) => Error::Store(error),
            Err(_) => Error::StoreTimeout(timeout),
        };
        self.health.failure();
        observe::store_error(name);
        Err(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_probes_once_and_backs_off() {
        let ms = Duration::from_millis;
        let config = BreakerConfig::default()
            .failure_threshold(2)
            .open_min(ms(20))
            .open_max(ms(60));
        let health = Health::new(config, true);
        assert_eq!(health.permit(), Permit::Go);
        health.failure();
        assert!(health.gated(), "the first failure closes the gate");
        assert_eq!(health.state(), BreakerState::Closed);
        health.failure();
        assert_eq!(health.state(), BreakerState::Open);
        assert_eq!(health.permit(), Permit::Skip);
        std::thread::sleep(ms(21));
        assert_eq!(health.permit(), Permit::Go, "one probe");
        assert_eq!(health.permit(), Permit::Skip, "only one");
        health.failure();
        assert!(health.until_probe() > ms(20), "doubled");
        std::thread::sleep(ms(41));
        assert_eq!(health.permit(), Permit::Go);
        health.failure();
        assert!(
            health.until_probe() > ms(40) && health.until_probe() <= ms(60),
            "capped"
        );
        std::thread::sleep(ms(61));
        assert_eq!(health.permit(), Permit::Go);
        health.success();
        assert_eq!(health.state(), BreakerState::Closed);
        assert_eq!(health.permit(), Permit::Go);
        assert!(health.gated(), "success alone does not open the gate");
        let epoch = health.epoch();
        health.failure();
        assert!(!health.open_gate(epoch), "a failure since the epoch");
        assert!(health.open_gate(health.epoch()));
        assert!(!health.gated());
    }

    #[test]
    fn without_gate_failures_only_count() {
        let health = Health::new(BreakerConfig::default(), false);
        health.failure();
        assert!(!health.gated());
    }
}
