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
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::entity::CachedEntity;
use crate::health::{BreakerState, Guarded};
use crate::key::Key;
use crate::store::{Store, StoreError};

mod after;
mod builder;
pub(crate) mod codec;
mod flight;
mod read;
mod recall;
pub mod sample;
pub(crate) mod scope;
mod stats;

pub use builder::{CacheBuilder, LoadOptions, OwnBreaker, SharedHealth};
pub use sample::Sampling;
pub use stats::Stats;

use builder::Config;
use flight::Flights;
use stats::{Counters, Event};

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
    guarded: Arc<Guarded>,
    flights: Flights,
    config: Config,
    stats: Counters,
    /// The TTL of each declared template shape.
    ttls: HashMap<&'static str, Duration>,
    /// The bases of each variant template shape (see [`Variant`](crate::entity::Variant)).
    bases: HashMap<&'static str, Vec<&'static crate::key::Template>>,
    /// The consistency sampler, when sampling is on.
    sampler: Option<sample::Sampler>,
    /// Values last seen valid, for the stale options (see the `recall` module).
    recall: recall::Recall,
}

impl Cache {
    /// A cache on `store`, with default settings (see [`CacheBuilder`]).
    pub fn new(store: impl Store) -> Self {
        Self::builder(store).build()
    }

    /// A builder for a cache on `store` (or on a store shared as `Arc<dyn Store>`, which is a `Store` too).
    pub fn builder(store: impl Store) -> CacheBuilder {
        CacheBuilder::own(Arc::new(store))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.guarded.store
    }

    /// The state of the circuit breaker in front of the store.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.guarded.health.state()
    }

    /// Whether reads currently bypass the store because of a store failure whose outbox rows are not yet
    /// delivered (see the [`health`](crate::health) module). Always `false` for a cache not built by a
    /// [`CachedPool`](crate::CachedPool).
    pub fn gate_closed(&self) -> bool {
        self.inner.guarded.health.gated()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.inner.stats.snapshot()
    }

    /// Invalidates `keys` in the store now ([`Key`]s, rendered keys, or namespace shapes such as
    /// `product:<>`): one store call, what the write side sends after `COMMIT` (see
    /// [`Store::invalidate`]). It is not durable: if the store is down the invalidation is lost, and a
    /// store that later forgets it does not get it again. Next to a database, prefer
    /// [`CachedPool::invalidate`](crate::CachedPool::invalidate), which goes through the outbox.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store cannot be reached; nothing is known to be invalidated then.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave any subset of `keys` invalidated; invalidation is idempotent, so
    /// calling again is always safe.
    pub async fn invalidate(
        &self,
        keys: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> Result<(), StoreError> {
        let keys: Vec<String> = keys.into_iter().map(|k| k.as_ref().to_owned()).collect();
        let guarded = &self.inner.guarded;
        let floor = guarded.acknowledged.floor();
        match guarded.store.invalidate(&keys).await {
            Ok(sequence) => {
                guarded.health.success();
                guarded.recent.note(&keys);
                // An invalidation raised the sequence: its answer is above the floor of the call.
                guarded.observe(floor + 1, sequence)
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

    /// Reads `key`; on a miss runs `init`, which cannot fail, and caches its value: moka's `get_with`,
    /// under the protocol of [`get_or_load`](Self::get_or_load) (lease, single flight, no stale fill).
    ///
    /// # Cancel safety
    ///
    /// As [`get_or_load`](Self::get_or_load).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use cache_runtime::{Cache, CachedEntity, key};
    /// # #[derive(CachedEntity)]
    /// # #[cached_entity(key = "product:<id>:views")]
    /// # struct Views { id: i64 }
    /// # async fn f(cache: Cache) {
    /// let views: u64 = cache
    ///     .get_with(key!("product:<id>:views", id = 7), || async { 42 })
    ///     .await;
    /// # }
    /// ```
    pub async fn get_with<V, F, Fut>(&self, key: impl Into<Key>, init: F) -> V
    where
        V: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        self.load_infallible(key.into(), LoadOptions::default(), init)
            .await
    }

    /// Reads `key`; on a miss runs `init` and caches its `Ok` value (errors are never cached): moka's
    /// `try_get_with`, the same call as [`get_or_load`](Self::get_or_load). The error is an `Arc<E>`
    /// because one load's error is handed to every caller that waited for it (moka does the same).
    ///
    /// # Errors
    ///
    /// The loader's error, shared.
    ///
    /// # Cancel safety
    ///
    /// As [`get_or_load`](Self::get_or_load).
    pub async fn try_get_with<V, E, F, Fut>(
        &self,
        key: impl Into<Key>,
        init: F,
    ) -> Result<V, Arc<E>>
    where
        V: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        self.get_or_load(key.into(), init).await
    }

    /// Reads `key`; on a miss runs `init` and caches a `Some` value. A `None` is returned but not cached
    /// (no tombstone): moka's `optionally_get_with`. Entries are stored as `Option<V>`, so readers of the
    /// same key through [`get_or_load`](Self::get_or_load) with `Option<V>` share them.
    ///
    /// # Cancel safety
    ///
    /// As [`get_or_load`](Self::get_or_load).
    pub async fn optionally_get_with<V, F, Fut>(&self, key: impl Into<Key>, init: F) -> Option<V>
    where
        V: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Option<V>>,
    {
        let options = LoadOptions::new().cache_none(false);
        self.load_infallible(key.into(), options, init).await
    }

    /// [`get_or_load_with`](Self::get_or_load_with) of a loader that cannot fail.
    async fn load_infallible<V, F, Fut>(&self, key: Key, options: LoadOptions, init: F) -> V
    where
        V: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let loaded = self
            .get_or_load_with(key, options, || async {
                Ok::<_, std::convert::Infallible>(init().await)
            })
            .await;
        match loaded {
            Ok(value) => value,
            Err(never) => match *never {},
        }
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
        self.get_or_load_tagged(key, options, || async move {
            loader().await.map(|v| (v, Vec::new()))
        })
        .await
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
        self.inner
            .ttls
            .get(key.template().shape())
            .copied()
            .unwrap_or(self.inner.config.default_ttl)
    }

    fn jittered(&self, ttl: Duration) -> Duration {
        let cut = self.inner.config.jitter * fastrand::f64();
        ttl.mul_f64(1.0 - cut).max(Duration::from_millis(1))
    }
}
