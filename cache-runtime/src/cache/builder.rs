//! [`CacheBuilder`] and [`LoadOptions`]: the settings of a cache and of one load.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::stats::Counters;
use super::{Cache, Inner};
use crate::cache::flight::Flights;
use crate::health::{BreakerConfig, Guarded};
use crate::key::{Key, Template};
use crate::registry::{Registry, registry};
use crate::store::Store;
use crate::token::WriteToken;

/// The settings of a [`Cache`].
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) default_ttl: Duration,
    pub(crate) jitter: f64,
    pub(crate) lease_ttl: Duration,
    pub(crate) lease_wait: Duration,
    pub(crate) negative_ttl: Duration,
    pub(crate) token_wait: Duration,
    pub(crate) sampling: Option<super::Sampling>,
}

/// Builds a [`Cache`] with non-default settings.
///
/// `CacheBuilder` (with [`OwnBreaker`]) comes from [`Cache::builder`]: the cache has a circuit breaker of
/// its own. `CacheBuilder<SharedHealth>` comes from
/// [`CachedPool::cache_builder`](crate::CachedPool::cache_builder): the cache shares the pool's breaker,
/// read gate and registry, so it has no breaker setting.
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
pub struct CacheBuilder<H = OwnBreaker> {
    health: H,
    config: Config,
    registry: Option<Registry>,
}

/// A [`CacheBuilder`] whose cache has a circuit breaker of its own.
#[derive(Debug)]
pub struct OwnBreaker {
    store: Arc<dyn Store>,
    breaker: BreakerConfig,
}

/// A [`CacheBuilder`] whose cache shares a pool's store, breaker, read gate and registry.
#[derive(Debug)]
pub struct SharedHealth(Arc<Guarded>);

impl CacheBuilder {
    /// A builder of a cache on `store` with a breaker of its own.
    pub(crate) fn own(store: Arc<dyn Store>) -> Self {
        Self::with(OwnBreaker {
            store,
            breaker: BreakerConfig::default(),
        })
    }

    /// The circuit breaker in front of the store (see [`BreakerConfig`]).
    #[must_use]
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.health.breaker = breaker;
        self
    }

    /// The entities whose `ttl` entries of their templates live for (default: the program's
    /// [`registry()`]).
    #[must_use]
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The cache.
    pub fn build(self) -> Cache {
        let OwnBreaker { store, breaker } = self.health;
        let guarded = Arc::new(Guarded::new(store, breaker, false));
        Cache::from_parts(guarded, self.config, self.registry.as_ref())
    }
}

impl CacheBuilder<SharedHealth> {
    /// A builder of a cache sharing a pool's guarded store and registry.
    pub(crate) fn on_pool(guarded: Arc<Guarded>, registry: Registry) -> Self {
        let mut builder = Self::with(SharedHealth(guarded));
        builder.registry = Some(registry);
        builder
    }

    /// The cache.
    pub fn build(self) -> Cache {
        Cache::from_parts(self.health.0, self.config, self.registry.as_ref())
    }
}

impl<H> CacheBuilder<H> {
    fn with(health: H) -> Self {
        Self {
            health,
            config: Config {
                default_ttl: Duration::from_secs(600),
                jitter: 0.1,
                lease_ttl: Duration::from_secs(5),
                lease_wait: Duration::from_secs(1),
                negative_ttl: Duration::from_secs(60),
                token_wait: Duration::from_secs(1),
                sampling: None,
            },
            registry: None,
        }
    }

    /// Time to live of entries whose key template no entity declares (default 10 minutes). Entries of
    /// declared templates live for their entity's `ttl`.
    #[must_use]
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.config.default_ttl = ttl;
        self
    }

    /// Fraction of the time to live removed at random from each entry, so that entries filled together do
    /// not expire together (default 0.1: an entry lives between 90% and 100% of its TTL).
    #[must_use]
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.config.jitter = fraction.clamp(0.0, 1.0);
        self
    }

    /// How long a lease lasts when its holder neither fills nor releases it, e.g. a crashed process
    /// (default 5 s). A load that takes longer still returns its value; its fill then fails harmlessly.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.lease_ttl = ttl;
        self
    }

    /// The longest a tombstone (a cached `None`: no such row) lives (default 60 s; entries of values live
    /// their TTL). Tombstones are removed by the write that creates the row, so this is not about
    /// freshness: it bounds the memory a flood of reads of distinct missing keys takes (at most the read
    /// rate times this, each tombstone some 150–200 bytes in Redis, key included).
    #[must_use]
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.config.negative_ttl = ttl;
        self
    }

    /// How long a read given a [`WriteToken`] waits for the write's invalidation to be delivered to this
    /// cache's store before it bypasses the cache and loads from the database (default 1 s; see the
    /// [`token`](crate::token) module).
    #[must_use]
    pub fn token_wait(mut self, wait: Duration) -> Self {
        self.config.token_wait = wait;
        self
    }

    /// Turns on the live consistency SLI: a fraction of the hits of reads that can reload their value
    /// (entity-first reads, [`CachedPool::get`](crate::CachedPool::get)) is compared with the database Δ
    /// later, off the request path (see [`sample`](crate::cache::sample)). Off by
    /// default. Needs a tokio runtime when the cache is built.
    #[must_use]
    pub fn sampling(mut self, sampling: super::Sampling) -> Self {
        self.config.sampling = Some(sampling);
        self
    }

    /// How long a reader waits for another reader's lease before loading without storing (default 1 s).
    #[must_use]
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.config.lease_wait = wait;
        self
    }
}

impl Cache {
    fn from_parts(guarded: Arc<Guarded>, config: Config, entities: Option<&Registry>) -> Self {
        let sampling = config.sampling;
        Self {
            inner: Arc::new_cyclic(|inner| Inner {
                guarded,
                flights: Flights::default(),
                config,
                stats: Counters::default(),
                ttls: ttls(entities.unwrap_or_else(|| registry())),
                bases: bases(entities.unwrap_or_else(|| registry())),
                sampler: sampling.and_then(|s| super::sample::Sampler::start(s, inner.clone())),
                recall: super::recall::Recall::default(),
            }),
        }
    }
}

/// The bases of each variant template shape.
fn bases(registry: &Registry) -> HashMap<&'static str, Vec<&'static Template>> {
    let mut bases: HashMap<&'static str, Vec<&'static Template>> = HashMap::new();
    for variant in registry.entities().iter().flat_map(|e| e.variants) {
        let shape = bases.entry(variant.template.shape()).or_default();
        if !shape.contains(&variant.base) {
            shape.push(variant.base);
        }
    }
    bases
}

/// The TTL of each declared template shape (variants included): the shortest of the entities that declare
/// it.
fn ttls(registry: &Registry) -> HashMap<&'static str, Duration> {
    let mut ttls: HashMap<&'static str, Duration> = HashMap::new();
    for entity in registry.entities() {
        let variants = entity.variants.iter().map(|v| v.template);
        for template in entity.templates().chain(variants) {
            let ttl = ttls.entry(template.shape()).or_insert(entity.ttl);
            *ttl = (*ttl).min(entity.ttl);
        }
    }
    ttls
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
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub(crate) ttl: Option<Duration>,
    pub(crate) tags: Vec<Key>,
    pub(crate) cache_none: bool,
    pub(crate) after: Option<WriteToken>,
    pub(crate) sample: Option<super::sample::SampleReload>,
    pub(crate) stale_while_revalidate: Option<Duration>,
    pub(crate) stale_on_error: Option<Duration>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            ttl: None,
            tags: Vec::new(),
            cache_none: true,
            after: None,
            sample: None,
            stale_while_revalidate: None,
            stale_on_error: None,
        }
    }
}

impl LoadOptions {
    /// Defaults: the key's entity TTL, no tags beyond the key's namespace, `None` cached as a tombstone.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a loaded "nothing" (`None`, `()`) is cached as a tombstone for at most the
    /// [negative TTL](CacheBuilder::negative_ttl) (default `true`; the write that creates the row removes
    /// it). With `false`, it is returned (and shared with the callers waiting for this load) but not
    /// stored: the next read loads again.
    #[must_use]
    pub fn cache_none(mut self, cache: bool) -> Self {
        self.cache_none = cache;
        self
    }

    /// Read-your-writes after the write of `token` (made by any process): the read never returns a value
    /// older than that write. It uses the cache once the write's invalidation is known delivered to this
    /// cache's store (at once when the writer's store acknowledged it), else waits up to
    /// [`token_wait`](CacheBuilder::token_wait) for it, then loads from the database without storing. See
    /// the [`token`](crate::token) module. Without this option, a read honors the token of its
    /// [`token::scope`](crate::token::scope), if any.
    #[must_use]
    pub fn after(mut self, token: WriteToken) -> Self {
        self.after = Some(token);
        self
    }

    /// **Stale-while-revalidate, bounded**: when the key's entry is gone (invalidated, expired) and another
    /// reader holds its lease (reloading it: a [refresh](crate::refresh), another process's miss), return
    /// the value this process last saw valid for the key, if it saw it at most `bound` ago, instead of
    /// waiting for the lease. The value returned is then at most `bound` old, *even after a write this
    /// process made* (it is not read-your-writes); without a value seen within `bound`, the read waits as
    /// usual. Never the default; ignored for a read with a [`WriteToken`]. Counted in
    /// [`Stats::stale_served`](super::Stats::stale_served) and
    /// `cache_stale_served_total{reason="revalidating"}`. Reads with this option remember their values
    /// (at most 10,000 keys per cache).
    #[must_use]
    pub fn stale_while_revalidate(mut self, bound: Duration) -> Self {
        self.stale_while_revalidate = Some(bound);
        self
    }

    /// **Stale-on-loader-error, bounded**: when the loader fails, return the value this process last saw
    /// valid for the key, if it saw it at most `bound` ago, instead of the error (which is logged by
    /// nobody: count it with `cache_stale_served_total{reason="loader_error"}`). The value returned is at
    /// most `bound` old, even after this process's own writes. Never the default; ignored for a read with a
    /// [`WriteToken`]. Reads with this option remember their values (at most 10,000 keys per cache).
    #[must_use]
    pub fn stale_on_error(mut self, bound: Duration) -> Self {
        self.stale_on_error = Some(bound);
        self
    }

    /// Overrides the time to live of the entry (jitter still applies).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Declares that the value is built from `key`'s data: invalidating `key` (or its namespace) makes the
    /// entry invalid. Tags declared here are read before the load, so they never prevent a fill.
    #[must_use]
    pub fn tag(mut self, key: Key) -> Self {
        self.tags.push(key);
        self
    }

    /// Declares several tags (see [`tag`](Self::tag)).
    #[must_use]
    pub fn tags(mut self, keys: impl IntoIterator<Item = Key>) -> Self {
        self.tags.extend(keys);
        self
    }
}
