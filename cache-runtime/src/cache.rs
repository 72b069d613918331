//! The [`Cache`] handle: reads that are never stale.
//!
//! # The read protocol
//!
//! [`Cache::get_or_load`] first reads the key's value slot and the tokens of its tags in one read-only round
//! trip ([`Store::peek`]); a valid entry is a hit. Otherwise it reads the slot again and, if it is empty (or
//! still holds the invalid entry), takes a **lease** in the same atomic step ([`Store::lookup`]). The lease
//! holder runs the loader and stores the result with a
//! compare-and-set on its lease ([`Store::fill`]). Invalidation deletes the value slot, lease included, so a
//! fill whose load raced with a write fails: a value loaded before a commit can never be stored after that
//! commit's invalidation (the stale-set race). Readers that find another reader's lease wait for its value
//! (polling with backoff, up to [`CacheBuilder::lease_wait`]), then load without storing.
//!
//! # Tags
//!
//! An entry records the **tag tokens** of the keys it was built from: always the namespace of its own key's
//! shape (`product:<>`), the keys given in [`LoadOptions::tag`] (read before the load starts), and the keys
//! the loader returns ([`Cache::get_or_load_tagged`]), each with its shape's namespace. A hit is valid
//! only while every recorded token is still current; invalidating a key deletes its token, and a new random
//! token appears on next use, so an entry built from the old one never validates again, even if the store
//! loses or evicts tokens. Memory per tag is one token.
//!
//! A tag known only after the load has its token read after the load. It is accepted only if the token was
//! created before the lease was taken (tokens carry their creation time on the store's clock); otherwise the
//! tag may have been invalidated during the load and the value is returned but not stored. The first load
//! that uses a new tag therefore stores nothing; the next one does. Tags given up front do not have this
//! cost. On Redis the clock is the server's (`TIME`, one server in standalone mode): this check assumes it
//! does not step backwards during a load.
//!
//! # Single-flight
//!
//! Concurrent reads of one key in one process share one lookup and one load (see the `flight` module for
//! which readers may share a result without breaking freshness).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::breaker::{BreakerConfig, BreakerState, Health, Permit};
use crate::codec;
use crate::entity::CachedEntity;
use crate::flight::{self, Flights, Join, Outcome};
use crate::key::Key;
use crate::observe;
use crate::store::redis::nonce;
use crate::store::{LeaseRequest, Slot, Store, StoreError, TagToken};

/// A cache handle: cheap to clone, shared by every task of the service.
///
/// # Examples
///
/// ```
/// use cache_runtime::{Cache, CachedEntity, MemoryStore, key};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(CachedEntity, Serialize, Deserialize, Debug, PartialEq)]
/// #[cached_entity(key = "product:<id>", ttl = "10m")]
/// struct Product {
///     id: i64,
///     name: String,
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), std::sync::Arc<std::io::Error>> {
/// let cache = Cache::new(MemoryStore::default());
/// let load = || async { Ok::<_, std::io::Error>(Some(Product { id: 7, name: "lamp".into() })) };
/// let p: Option<Product> = cache.get_or_load(key!("product:<id>", id = 7), load).await?;
/// assert_eq!(p.map(|p| p.name).as_deref(), Some("lamp"));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Cache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    health: Arc<Health>,
    flights: Flights,
    config: Config,
    stats: Counters,
    ttls: OnceLock<HashMap<&'static str, Duration>>,
}

#[derive(Debug, Clone)]
struct Config {
    default_ttl: Duration,
    jitter: f64,
    lease_ttl: Duration,
    lease_wait: Duration,
}

/// Builds a [`Cache`] with non-default settings.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// let cache = cache_runtime::Cache::builder(cache_runtime::MemoryStore::default())
///     .default_ttl(Duration::from_secs(60))
///     .lease_wait(Duration::from_millis(500))
///     .build();
/// ```
#[derive(Debug)]
pub struct CacheBuilder {
    store: Arc<dyn Store>,
    config: Config,
    breaker: BreakerConfig,
    health: Option<Arc<Health>>,
}

impl CacheBuilder {
    /// Time to live of entries whose key template no entity declares (default 10 minutes). Entries of
    /// declared templates live for their entity's `ttl`.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.config.default_ttl = ttl;
        self
    }

    /// Fraction of the time to live removed at random from each entry, so that entries filled together do
    /// not expire together (default 0.1: an entry lives between 90% and 100% of its TTL).
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.config.jitter = fraction.clamp(0.0, 1.0);
        self
    }

    /// How long a lease lasts when its holder neither fills nor releases it, e.g. a crashed process
    /// (default 5 s). A load that takes longer still returns its value; its fill then fails harmlessly.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.lease_ttl = ttl;
        self
    }

    /// How long a reader waits for another reader's lease before loading without storing (default 1 s).
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.config.lease_wait = wait;
        self
    }

    /// The circuit breaker in front of the store (see [`BreakerConfig`]).
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// Shares `health` (a pool's breaker and gate) instead of a breaker of its own.
    pub(crate) fn health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// The cache.
    pub fn build(mut self) -> Cache {
        let health = self
            .health
            .take()
            .unwrap_or_else(|| Arc::new(Health::new(self.breaker, false)));
        self.build_with(health)
    }

    /// The cache, with the health (breaker and gate) shared with a pool's commit path and relay.
    pub(crate) fn build_with(self, health: Arc<Health>) -> Cache {
        Cache {
            inner: Arc::new(Inner {
                store: self.store,
                health,
                flights: Flights::default(),
                config: self.config,
                stats: Counters::default(),
                ttls: OnceLock::new(),
            }),
        }
    }
}

/// Per-call settings of a load.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use cache_runtime::{CachedEntity, LoadOptions, key};
/// # #[derive(CachedEntity)]
/// # #[cached_entity(key = "user:<id>")]
/// # struct User { id: i64 }
/// let options = LoadOptions::new()
///     .ttl(Duration::from_secs(30))
///     .tag(key!("user:<id>", id = 3));
/// ```
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    ttl: Option<Duration>,
    tags: Vec<Key>,
}

impl LoadOptions {
    /// Defaults: the key's entity TTL, no tags beyond the key's namespace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Overrides the time to live of the entry (jitter still applies).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Declares that the value is built from `key`'s data: invalidating `key` (or its namespace) makes the
    /// entry invalid. Tags declared here are read before the load, so they never prevent a fill.
    pub fn tag(mut self, key: Key) -> Self {
        self.tags.push(key);
        self
    }

    /// Declares several tags (see [`tag`](Self::tag)).
    pub fn tags(mut self, keys: impl IntoIterator<Item = Key>) -> Self {
        self.tags.extend(keys);
        self
    }
}

/// Counters of one [`Cache`] since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Reads answered by a valid entry of the store.
    pub hits: u64,
    /// Reads answered by another read of this process in flight (single-flight).
    pub coalesced: u64,
    /// Loader calls.
    pub loads: u64,
    /// Loader calls that returned an error (never cached).
    pub load_errors: u64,
    /// Values stored after a load.
    pub fills: u64,
    /// Fills refused because the key was invalidated during the load (the stale-set race, defeated).
    pub fills_rejected: u64,
    /// Loaded values not stored because a tag known only after the load may have changed during it, or
    /// the value could not be encoded.
    pub fills_skipped: u64,
    /// Entries found invalid because a tag (or the namespace) they recorded was invalidated.
    pub stale: u64,
    /// Entries that could not be decoded; each was replaced.
    pub undecodable: u64,
    /// Reads that found another reader's lease and waited.
    pub lease_waits: u64,
    /// Waits that reached the deadline and loaded without storing.
    pub lease_timeouts: u64,
    /// Store operations that failed; the read fell through to the loader.
    pub store_errors: u64,
    /// Reads that skipped the store (circuit breaker open, or the post-outage gate closed) and loaded
    /// without storing.
    pub bypassed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    coalesced: AtomicU64,
    loads: AtomicU64,
    load_errors: AtomicU64,
    fills: AtomicU64,
    fills_rejected: AtomicU64,
    fills_skipped: AtomicU64,
    stale: AtomicU64,
    undecodable: AtomicU64,
    lease_waits: AtomicU64,
    lease_timeouts: AtomicU64,
    store_errors: AtomicU64,
    bypassed: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What a stored entry turned out to be.
enum Hit<V> {
    Valid(V, Arc<[u8]>),
    Stale,
    Undecodable,
    StoreFailed,
}

/// A lease held while loading; released in the background if dropped while armed (cancellation).
struct LeaseGuard {
    store: Arc<dyn Store>,
    key: String,
    token: String,
    armed: bool,
}

impl LeaseGuard {
    async fn release(mut self) {
        self.armed = false;
        if let Err(e) = self.store.release(&self.key, &self.token).await {
            tracing::debug!(key = %self.key, error = %e, "could not release a lease; it will expire");
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (store, key, token) = (
            Arc::clone(&self.store),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // Best effort: otherwise the lease expires after `lease_ttl`.
                let _ = store.release(&key, &token).await;
            });
        }
    }
}

impl Cache {
    /// A cache on `store`, with default settings (see [`CacheBuilder`]).
    pub fn new(store: impl Store) -> Self {
        Self::builder(store).build()
    }

    /// A cache on a shared store, with default settings (see [`CacheBuilder`]).
    pub fn shared(store: Arc<dyn Store>) -> Self {
        Self::builder_shared(store).build()
    }

    /// A builder for a cache on `store`.
    pub fn builder(store: impl Store) -> CacheBuilder {
        Self::builder_shared(Arc::new(store))
    }

    /// A builder for a cache on a shared store.
    pub fn builder_shared(store: Arc<dyn Store>) -> CacheBuilder {
        CacheBuilder {
            store,
            config: Config {
                default_ttl: Duration::from_secs(600),
                jitter: 0.1,
                lease_ttl: Duration::from_secs(5),
                lease_wait: Duration::from_secs(1),
            },
            breaker: BreakerConfig::default(),
            health: None,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The state of the circuit breaker in front of the store.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.health.state()
    }

    /// Whether reads currently bypass the store because of a store failure whose outbox rows are not yet
    /// delivered (see the [`breaker`](crate::breaker) module). Always `false` for a cache not built by a
    /// [`CachedPool`](crate::CachedPool).
    pub fn gate_closed(&self) -> bool {
        self.inner.health.gated()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            hits: get(&c.hits),
            coalesced: get(&c.coalesced),
            loads: get(&c.loads),
            load_errors: get(&c.load_errors),
            fills: get(&c.fills),
            fills_rejected: get(&c.fills_rejected),
            fills_skipped: get(&c.fills_skipped),
            stale: get(&c.stale),
            undecodable: get(&c.undecodable),
            lease_waits: get(&c.lease_waits),
            lease_timeouts: get(&c.lease_timeouts),
            store_errors: get(&c.store_errors),
            bypassed: get(&c.bypassed),
        }
    }

    /// Invalidates `keys` (rendered keys, or namespace shapes such as `product:<>`): what the write side
    /// calls after COMMIT. See [`Store::invalidate`].
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store cannot be reached; nothing is known to be invalidated then.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave any subset of `keys` invalidated; invalidation is idempotent, so
    /// calling again is always safe.
    pub async fn invalidate(&self, keys: &[String]) -> Result<(), StoreError> {
        match self.inner.store.invalidate(keys).await {
            Ok(()) => {
                self.inner.health.success();
                Ok(())
            }
            Err(e) => {
                self.store_failed("invalidate", &e);
                Err(e)
            }
        }
    }

    /// Reads `key`; on a miss runs `loader` and caches its result (unless the key was invalidated during the
    /// load). `Option` values are cached too: `None` is a tombstone, removed by the write that creates the
    /// row.
    ///
    /// The entry lives for the TTL of the entity that declares `key`'s template (or the cache's default),
    /// minus jitter. Concurrent calls for one key in this process share one load; calls in other
    /// processes wait for the lease holder's value.
    ///
    /// # Errors
    ///
    /// The loader's error, shared (as `Arc<E>`) with every caller that was waiting for this load; errors
    /// are never cached. Store failures are not errors: the read falls through to the loader.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future is safe at any point. If it held the lease, the lease is released in the
    /// background (or expires after [`CacheBuilder::lease_ttl`]); readers sharing its load in this process
    /// start a new one. Nothing partial is ever stored.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use cache_runtime::{Cache, CachedEntity, key};
    /// # #[derive(CachedEntity, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
    /// # #[cached_entity(key = "product:<id>")]
    /// # struct Product { id: i64, name: String }
    /// # async fn f(cache: Cache, pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// let p: Option<Product> = cache
    ///     .get_or_load(key!("product:<id>", id = 123), || async {
    ///         sqlx::query_as("SELECT id, name FROM products WHERE id = $1")
    ///             .bind(123_i64)
    ///             .fetch_optional(&pool)
    ///             .await
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load<V, E, F, Fut>(&self, key: Key, loader: F) -> Result<V, Arc<E>>
    where
        V: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        self.get_or_load_with(key, LoadOptions::default(), loader)
            .await
    }

    /// [`get_or_load`](Self::get_or_load) with per-call [`LoadOptions`] (TTL, tags).
    ///
    /// # Errors
    ///
    /// As [`get_or_load`](Self::get_or_load).
    ///
    /// # Cancel safety
    ///
    /// As [`get_or_load`](Self::get_or_load).
    pub async fn get_or_load_with<V, E, F, Fut>(
        &self,
        key: Key,
        options: LoadOptions,
        loader: F,
    ) -> Result<V, Arc<E>>
    where
        V: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        self.read(key, &options, || async move {
            loader().await.map(|v| (v, Vec::new()))
        })
        .await
    }

    /// [`get_or_load_with`](Self::get_or_load_with) for values built from several rows whose keys are known
    /// only once loaded: the loader returns the value and the keys it was built from. Invalidating any of
    /// them (before, during or after the load) makes the entry invalid.
    ///
    /// A tag whose token did not exist before the load (first use, or invalidated during the load) makes
    /// this load return its value without storing it; tags known up front belong in
    /// [`LoadOptions::tag`].
    ///
    /// # Errors
    ///
    /// As [`get_or_load`](Self::get_or_load).
    ///
    /// # Cancel safety
    ///
    /// As [`get_or_load`](Self::get_or_load).
    ///
    /// # Examples
    ///
    /// ```
    /// # use cache_runtime::{Cache, CachedEntity, LoadOptions, MemoryStore, key};
    /// # #[derive(CachedEntity)]
    /// # #[cached_entity(key = "article:<id>:page")]
    /// # struct Page { id: i64 }
    /// # #[derive(CachedEntity)]
    /// # #[cached_entity(key = "user:<id>")]
    /// # struct User { id: i64 }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), std::sync::Arc<std::io::Error>> {
    /// let cache = Cache::new(MemoryStore::default());
    /// let page: String = cache
    ///     .get_or_load_tagged(key!("article:<id>:page", id = 5), LoadOptions::new(), || async {
    ///         let author_id = 3; // found by the query
    ///         Ok::<_, std::io::Error>(("by Ada".to_owned(), vec![key!("user:<id>", id = author_id)]))
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load_tagged<V, E, F, Fut>(
        &self,
        key: Key,
        options: LoadOptions,
        loader: F,
    ) -> Result<V, Arc<E>>
    where
        V: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Vec<Key>), E>>,
    {
        self.read(key, &options, loader).await
    }

    /// Reads the entity `T` stored under its own key, loading it with `loader` on a miss; the entry lives
    /// for `T`'s declared `ttl`. `None` (no such row) is cached as a tombstone.
    ///
    /// # Errors
    ///
    /// As [`get_or_load`](Self::get_or_load).
    ///
    /// # Cancel safety
    ///
    /// As [`get_or_load`](Self::get_or_load).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use cache_runtime::{Cache, CachedEntity};
    /// # #[derive(CachedEntity, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
    /// # #[cached_entity(key = "product:<id>", ttl = "10m")]
    /// # struct Product { id: i64, name: String }
    /// # async fn f(cache: Cache, pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// let p = cache
    ///     .get_entity(Product::cache_key_for(&123), || {
    ///         sqlx::query_as::<_, Product>("SELECT id, name FROM products WHERE id = 123")
    ///             .fetch_optional(&pool)
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_entity<T, E, F, Fut>(&self, key: Key, loader: F) -> Result<Option<T>, Arc<E>>
    where
        T: CachedEntity + Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        if key.template().shape() != T::META.key.shape() {
            tracing::warn!(
                key = %key,
                entity = T::META.type_name,
                "get_entity with a key that is not the entity's own key template; \
                 use get_or_load for derived keys"
            );
        }
        let options = LoadOptions::new().ttl(T::META.ttl);
        self.get_or_load_with(key, options, loader).await
    }

    /// The TTL of entries under `key` when the call does not set one.
    fn ttl_for(&self, key: &Key) -> Duration {
        let ttls = self.inner.ttls.get_or_init(|| {
            let mut ttls: HashMap<&'static str, Duration> = HashMap::new();
            for entity in crate::registry().entities() {
                for template in entity.templates() {
                    let ttl = ttls.entry(template.shape()).or_insert(entity.ttl);
                    *ttl = (*ttl).min(entity.ttl);
                }
            }
            ttls
        });
        ttls.get(key.template().shape())
            .copied()
            .unwrap_or(self.inner.config.default_ttl)
    }

    fn jittered(&self, ttl: Duration) -> Duration {
        let cut = self.inner.config.jitter * fastrand::f64();
        ttl.mul_f64(1.0 - cut).max(Duration::from_millis(1))
    }

    /// Every failed store operation goes through here: it counts towards the breaker and closes the gate.
    fn store_failed(&self, op: &'static str, error: &StoreError) {
        bump(&self.inner.stats.store_errors);
        observe::store_error(op);
        self.inner.health.failure();
        tracing::warn!(op, %error, "cache store failed; reading from the loader");
    }

    async fn read<V, E, F, Fut>(
        &self,
        key: Key,
        options: &LoadOptions,
        loader: F,
    ) -> Result<V, Arc<E>>
    where
        V: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Vec<Key>), E>>,
    {
        let (leader, after) = loop {
            match self.inner.flights.join(key.as_str()) {
                Join::Leader(leader, after) => break (leader, after),
                Join::Follower(done) => {
                    if let Some(result) = self.follow::<V, E>(done).await {
                        return result;
                    }
                }
            }
        };
        if let Some(previous) = after {
            // A load that failed while this reader waited fails it too (errors carry no staleness; values
            // do, so a value is never taken from a flight joined too late).
            if let Some(Outcome::Error(error)) = flight::wait(previous).await
                && let Some(e) = error.downcast_ref::<Arc<E>>()
            {
                let e = Arc::clone(e);
                leader.complete(Outcome::Error(error));
                bump(&self.inner.stats.coalesced);
                return Err(e);
            }
        }
        leader.pass();
        let span = tracing::debug_span!("cache.load", key = %key);
        let (result, outcome) = self.lead(&key, options, loader).instrument(span).await;
        leader.complete(outcome);
        result
    }

    /// Waits for a flight; `None` when the caller must read on its own.
    async fn follow<V, E>(
        &self,
        done: tokio::sync::watch::Receiver<Option<Outcome>>,
    ) -> Option<Result<V, Arc<E>>>
    where
        V: DeserializeOwned,
        E: Send + Sync + 'static,
    {
        let result = match flight::wait(done).await? {
            Outcome::Value(bytes) => Ok(codec::decode::<V>(&bytes).ok()?),
            Outcome::Error(error) => Err(Arc::clone(error.downcast_ref::<Arc<E>>()?)),
            Outcome::Unshared => return None,
        };
        bump(&self.inner.stats.coalesced);
        Some(result)
    }

    /// The leader's read: lookup (taking the lease on a miss), then load and fill.
    async fn lead<V, E, F, Fut>(
        &self,
        key: &Key,
        options: &LoadOptions,
        loader: F,
    ) -> (Result<V, Arc<E>>, Outcome)
    where
        V: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Vec<Key>), E>>,
    {
        let config = &self.inner.config;
        let stats = &self.inner.stats;
        let store = &self.inner.store;
        let health = &self.inner.health;
        if health.gated() {
            bump(&stats.bypassed);
            observe::bypassed("gate");
            return self.load_unstored(loader).await;
        }
        if health.permit() == Permit::Skip {
            bump(&stats.bypassed);
            observe::bypassed("breaker");
            return self.load_unstored(loader).await;
        }
        let epoch = health.epoch();
        let ttl = options.ttl.unwrap_or_else(|| self.ttl_for(key));
        let tag_ttl = ttl.saturating_add(Duration::from_secs(60));
        let pre = tag_names(key, &options.tags);
        let token = nonce();
        let deadline = Instant::now() + config.lease_wait;
        let mut replace: Option<Vec<u8>> = None;
        // The hit path: a read-only round trip.
        match store.peek(key.as_str(), &pre).await {
            Ok(peek) => {
                health.success();
                if let Some(bytes) = peek.value {
                    let current: Vec<Option<&str>> = peek
                        .tags
                        .iter()
                        .map(|t| t.as_ref().map(|t| t.id.as_str()))
                        .collect();
                    match self.examine::<V>(key, &bytes, &pre, &current).await {
                        Hit::Valid(value, payload) => return (Ok(value), Outcome::Value(payload)),
                        Hit::StoreFailed => return self.load_unstored(loader).await,
                        Hit::Stale | Hit::Undecodable => {}
                    }
                    replace = Some(bytes);
                }
            }
            Err(e) => {
                self.store_failed("peek", &e);
                return self.load_unstored(loader).await;
            }
        }
        observe::miss();
        let mut backoff = Duration::from_millis(1);
        let mut waited = false;
        let (started, pre_tokens) = loop {
            let lease = LeaseRequest {
                token: &token,
                ttl: config.lease_ttl,
                replace: replace.as_deref(),
            };
            let lookup = match store.lookup(key.as_str(), lease, &pre, tag_ttl).await {
                Ok(lookup) => {
                    health.success();
                    lookup
                }
                Err(e) => {
                    self.store_failed("lookup", &e);
                    return self.load_unstored(loader).await;
                }
            };
            match lookup.slot {
                Slot::Acquired { started } => break (started, lookup.tags),
                Slot::Value(bytes) => {
                    let current: Vec<Option<&str>> =
                        lookup.tags.iter().map(|t| Some(t.id.as_str())).collect();
                    match self.examine::<V>(key, &bytes, &pre, &current).await {
                        Hit::Valid(value, payload) => return (Ok(value), Outcome::Value(payload)),
                        Hit::StoreFailed => return self.load_unstored(loader).await,
                        Hit::Stale | Hit::Undecodable => {}
                    }
                    if replace.as_deref() == Some(bytes.as_slice()) {
                        // Replacing it did not work twice in a row: do not loop on a store that
                        // misbehaves.
                        return self.load_unstored(loader).await;
                    }
                    replace = Some(bytes);
                }
                Slot::Leased => {
                    if !waited {
                        waited = true;
                        bump(&stats.lease_waits);
                        observe::lease_wait();
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        bump(&stats.lease_timeouts);
                        return self.load_unstored(loader).await;
                    }
                    tokio::time::sleep(backoff.min(deadline - now)).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
            }
        };

        let guard = LeaseGuard {
            store: Arc::clone(store),
            key: key.as_str().to_owned(),
            token,
            armed: true,
        };
        bump(&stats.loads);
        observe::load();
        let (value, found_tags) = match loader().await {
            Ok(loaded) => loaded,
            Err(e) => {
                bump(&stats.load_errors);
                guard.release().await;
                let e = Arc::new(e);
                let shared: Arc<dyn std::any::Any + Send + Sync> = Arc::new(Arc::clone(&e));
                return (Err(e), Outcome::Error(shared));
            }
        };
        let payload = match codec::encode(&value) {
            Ok(payload) => payload,
            Err(e) => {
                bump(&stats.fills_skipped);
                tracing::warn!(key = %key, error = %e, "cannot encode the loaded value; not cached");
                guard.release().await;
                return (Ok(value), Outcome::Unshared);
            }
        };
        let mut recorded: Vec<(String, String)> = pre
            .into_iter()
            .zip(pre_tokens)
            .map(|(name, token)| (name, token.id))
            .collect();
        let late: Vec<String> = tag_names_of(&found_tags)
            .filter(|n| !recorded.iter().any(|(r, _)| r == n))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut storable = true;
        if !late.is_empty() {
            match store.tags(&late, Some(tag_ttl)).await {
                Ok(tokens) => {
                    for (name, token) in late.into_iter().zip(tokens) {
                        match token {
                            Some(TagToken { id, created }) if created < started => {
                                recorded.push((name, id));
                            }
                            _ => storable = false,
                        }
                    }
                }
                Err(e) => {
                    self.store_failed("tags", &e);
                    storable = false;
                }
            }
        }
        if storable && health.epoch() != epoch {
            // A store failure since the lease was taken: an invalidation may have been lost meanwhile, and
            // the lease would not show it. Do not store.
            storable = false;
        }
        if storable {
            let entry = codec::seal(
                recorded.iter().map(|(n, t)| (n.as_str(), t.as_str())),
                &payload,
            );
            let mut guard = guard;
            match store
                .fill(key.as_str(), &guard.token, &entry, self.jittered(ttl))
                .await
            {
                Ok(true) => {
                    health.success();
                    guard.armed = false;
                    bump(&stats.fills);
                }
                Ok(false) => {
                    guard.armed = false;
                    bump(&stats.fills_rejected);
                    observe::fill_rejected();
                    tracing::debug!(key = %key, "invalidated during the load; not stored");
                }
                Err(e) => self.store_failed("fill", &e),
            }
        } else {
            bump(&stats.fills_skipped);
            guard.release().await;
        }
        (Ok(value), Outcome::Value(payload.into()))
    }

    /// Loads without the store (store down, lease wait timed out): nothing is stored.
    async fn load_unstored<V, E, F, Fut>(&self, loader: F) -> (Result<V, Arc<E>>, Outcome)
    where
        V: Serialize,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Vec<Key>), E>>,
    {
        bump(&self.inner.stats.loads);
        observe::load();
        match loader().await {
            Ok((value, _)) => {
                let outcome =
                    codec::encode(&value).map_or(Outcome::Unshared, |p| Outcome::Value(p.into()));
                (Ok(value), outcome)
            }
            Err(e) => {
                bump(&self.inner.stats.load_errors);
                let e = Arc::new(e);
                let shared: Arc<dyn std::any::Any + Send + Sync> = Arc::new(Arc::clone(&e));
                (Err(e), Outcome::Error(shared))
            }
        }
    }

    /// [`check`](Self::check)s a stored entry and counts the outcome: a valid hit, a stale entry, an
    /// undecodable one (logged; the caller replaces it).
    async fn examine<V: DeserializeOwned>(
        &self,
        key: &Key,
        bytes: &[u8],
        pre: &[String],
        pre_tokens: &[Option<&str>],
    ) -> Hit<V> {
        let stats = &self.inner.stats;
        let hit = self.check::<V>(bytes, pre, pre_tokens).await;
        match &hit {
            Hit::Valid(..) => {
                bump(&stats.hits);
                observe::hit();
            }
            Hit::Stale => bump(&stats.stale),
            Hit::Undecodable => {
                bump(&stats.undecodable);
                tracing::warn!(key = %key, "undecodable cache entry; replacing it");
            }
            Hit::StoreFailed => {}
        }
        hit
    }

    /// Validates and decodes a stored entry.
    async fn check<V: DeserializeOwned>(
        &self,
        bytes: &[u8],
        pre: &[String],
        pre_tokens: &[Option<&str>],
    ) -> Hit<V> {
        let Some(envelope) = codec::open(bytes) else {
            return Hit::Undecodable;
        };
        // Every entry records its own namespace (pre[0]); one that does not was not written by this cache.
        if !envelope
            .tags
            .iter()
            .any(|(name, _)| Some(*name) == pre.first().map(String::as_str))
        {
            return Hit::Stale;
        }
        let mut others: Vec<(String, &str)> = Vec::new();
        for (name, recorded) in &envelope.tags {
            match pre.iter().position(|p| p == name) {
                Some(i) => {
                    if pre_tokens.get(i).copied().flatten() != Some(*recorded) {
                        return Hit::Stale;
                    }
                }
                None => others.push(((*name).to_owned(), recorded)),
            }
        }
        if !others.is_empty() {
            let names: Vec<String> = others.iter().map(|(n, _)| n.clone()).collect();
            match self.inner.store.tags(&names, None).await {
                Ok(current) => {
                    let valid = current.len() == others.len()
                        && others
                            .iter()
                            .zip(&current)
                            .all(|((_, rec), cur)| cur.as_ref().is_some_and(|c| c.id == *rec));
                    if !valid {
                        return Hit::Stale;
                    }
                }
                Err(e) => {
                    self.store_failed("tags", &e);
                    return Hit::StoreFailed;
                }
            }
        }
        match codec::decode::<V>(envelope.payload) {
            Ok(value) => Hit::Valid(value, envelope.payload.into()),
            Err(_) => Hit::Undecodable,
        }
    }
}

/// The tags read before a load: the key's namespace first, then each declared tag and its namespace.
fn tag_names(key: &Key, tags: &[Key]) -> Vec<String> {
    let mut names = vec![key.template().shape().to_owned()];
    for name in tag_names_of(tags) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Each key and its namespace shape.
fn tag_names_of(tags: &[Key]) -> impl Iterator<Item = String> + '_ {
    tags.iter()
        .flat_map(|k| [k.as_str().to_owned(), k.template().shape().to_owned()])
}
