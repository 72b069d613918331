//! Two tiers: an in-process tier (moka) in front of a [`RedisStore`], kept consistent across instances
//! by the invalidation fan-out: every [`RedisStore`] publishes the keys it invalidates on its
//! [channel](RedisStore::channel), in the pipeline of the invalidation itself, and every tier subscribes.
//!
//! Every primitive of the lease protocol (lookup, fill, release, sequence, reset) runs on Redis exactly as
//! with a plain [`RedisStore`]; the tier only answers [`Store::peek`] (and [`Store::tags`] without
//! creation) when it holds the entry and every tag token asked for. What it holds was read from Redis
//! (by a peek, a lookup or a fill) and leaves it when any process invalidates the key or tag: the
//! writing process removes it before and after its Redis call returns (read-your-writes), every other
//! instance when the invalidation's message arrives on the channel.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use super::{
    BoxFuture, LeaseRequest, Lookup, Peek, RedisStore, Slot, Store, StoreError, TagToken, tag_slot,
};

pub(crate) mod fanout;
mod local;

use local::{Held, Local};

/// A [`Store`] of two tiers: an in-process moka tier in front of Redis, for microsecond hits in every
/// instance of a service that shares one Redis.
///
/// **Bound.** After an invalidation is acknowledged (a commit through a pool returns, a relay delivered
/// a row), the instance that sent it never serves the old value (its tier is cleared before the call
/// returns), and no other instance serves it for longer than the fan-out delay: the time for the
/// invalidation's pub/sub message to arrive (about a millisecond on loopback; see the benchmark), and
/// never longer than [`max_lag`](TieredStoreBuilder::max_lag) (default 250 ms), because an instance stops
/// serving from its tier when its last heartbeat through the channel came back longer ago than that.
/// When the subscription drops (server restart, failover, a killed connection), the tier is flushed and
/// reads go to Redis until it is re-established and a heartbeat came back through it.
///
/// Invalidations reach the tier from every writer on the same Redis and prefix, tiered or not: every
/// [`RedisStore`] publishes the keys it invalidates (pools, relays, `psql` writes through the outbox).
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> Result<(), cache_runtime::StoreError> {
/// use cache_runtime::{Cache, TieredStore};
///
/// let store = TieredStore::connect("redis://127.0.0.1:6379", "myapp:").await?;
/// let cache = Cache::new(store);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TieredStore {
    l1: Arc<Local>,
    l2: Backend,
    /// Closing it (dropping the last clone) stops the subscriber and heartbeat tasks.
    _shutdown: Arc<watch::Sender<()>>,
}

/// Builds a [`TieredStore`]: tier size, time to live, heartbeat.
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> Result<(), cache_runtime::StoreError> {
/// use std::time::Duration;
/// use cache_runtime::{RedisStore, TieredStore};
///
/// let url = "redis://127.0.0.1:6379";
/// let l2 = RedisStore::connect(url, "myapp:").await?;
/// let store = TieredStore::builder()
///     .capacity(50_000)
///     .max_lag(Duration::from_millis(100))
///     .build(l2, redis::Client::open(url)?);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TieredStoreBuilder {
    capacity: u64,
    ttl: Duration,
    heartbeat: Duration,
    max_lag: Duration,
}

impl Default for TieredStoreBuilder {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            ttl: Duration::from_secs(60),
            heartbeat: Duration::from_millis(25),
            max_lag: Duration::from_millis(250),
        }
    }
}

impl TieredStoreBuilder {
    /// At most `capacity` slots (entries and tag tokens) in the in-process tier (default 100,000).
    #[must_use]
    pub fn capacity(mut self, capacity: u64) -> Self {
        self.capacity = capacity;
        self
    }

    /// How long a slot stays in the in-process tier at most (default 60 s); Redis keeps its own TTL.
    /// A safety net only: invalidations remove slots at once.
    #[must_use]
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How often this instance sends a heartbeat through the invalidation channel (default 25 ms).
    #[must_use]
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// The longest an invalidation may be on its way: the tier serves only while a heartbeat sent at
    /// most this long ago came back through the channel (default 250 ms; keep it a few heartbeats).
    #[must_use]
    pub fn max_lag(mut self, max_lag: Duration) -> Self {
        self.max_lag = max_lag;
        self
    }

    /// The store, in front of `l2`; `client` opens the subscription to `l2`'s
    /// [channel](RedisStore::channel) (the same server). Spawns the subscriber and heartbeat tasks on
    /// the current Tokio runtime; they stop when the last clone of the store is dropped. The tier serves
    /// once the subscription is up and a first heartbeat came back (a few milliseconds).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn build(self, l2: RedisStore, client: redis::Client) -> TieredStore {
        let (l1, closed, store) = self.start(Backend::Standalone(l2));
        tokio::spawn(fanout::listen(client, store.l2.channel(), l1, closed));
        store
    }

    /// The store, in front of the cluster store `l2`; `nodes` (URLs of cluster nodes) open the
    /// subscription (RESP3, through redis-rs' cluster connection, which resubscribes after failovers;
    /// every disconnection flushes the tier, and it serves again once a heartbeat came back). Every
    /// invalidation and heartbeat is published on the primary of the channel's slot, so they arrive in
    /// order. Needs the `cluster` feature.
    ///
    /// # Errors
    ///
    /// [`StoreError::Redis`] when a URL is invalid.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    #[cfg(feature = "cluster")]
    pub fn build_cluster(
        self,
        l2: super::RedisClusterStore,
        nodes: &[&str],
    ) -> Result<TieredStore, StoreError> {
        let client = fanout::cluster_client(nodes)?;
        let (l1, closed, store) = self.start(Backend::Cluster(l2));
        tokio::spawn(fanout::listen_cluster(
            client,
            store.l2.channel(),
            l1,
            closed,
        ));
        Ok(store)
    }

    /// The tier and its heartbeat; the caller spawns the listener on the returned tier and receiver.
    fn start(self, l2: Backend) -> (Arc<Local>, watch::Receiver<()>, TieredStore) {
        let l1 = Arc::new(Local::new(self.capacity, self.ttl, self.max_lag));
        let (shutdown, closed) = watch::channel(());
        tokio::spawn(fanout::heartbeat(
            l2.clone(),
            Arc::clone(&l1),
            self.heartbeat,
            closed.clone(),
        ));
        let store = TieredStore {
            l1: Arc::clone(&l1),
            l2,
            _shutdown: Arc::new(shutdown),
        };
        (l1, closed, store)
    }
}

/// The Redis tier behind a [`TieredStore`].
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    /// A standalone server.
    Standalone(RedisStore),
    /// A cluster.
    #[cfg(feature = "cluster")]
    Cluster(super::RedisClusterStore),
}

impl Backend {
    fn store(&self) -> &dyn Store {
        match self {
            Self::Standalone(s) => s,
            #[cfg(feature = "cluster")]
            Self::Cluster(s) => s,
        }
    }

    fn channel(&self) -> String {
        match self {
            Self::Standalone(s) => s.channel(),
            #[cfg(feature = "cluster")]
            Self::Cluster(s) => s.channel(),
        }
    }

    /// Publishes `payload` on the channel (a heartbeat).
    pub(crate) async fn publish(&self, payload: &[u8]) -> Result<(), StoreError> {
        match self {
            Self::Standalone(s) => s.publish(payload).await,
            #[cfg(feature = "cluster")]
            Self::Cluster(s) => s.publish_payload(payload).await,
        }
    }
}

/// What a [`TieredStore`]'s in-process tier did since it was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierStats {
    /// Peeks answered by the in-process tier.
    pub hits: u64,
    /// Times the tier was flushed (its subscription dropped or was re-established).
    pub flushes: u64,
    /// Keys removed by invalidations (this instance's and the channel's).
    pub applied: u64,
}

impl TieredStore {
    /// A builder, for the tier's size and heartbeat.
    pub fn builder() -> TieredStoreBuilder {
        TieredStoreBuilder::default()
    }

    /// Connects to `url` ([`RedisStore::connect`]) with the default tier; every Redis key starts with
    /// `prefix`.
    ///
    /// # Errors
    ///
    /// As [`RedisStore::connect`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the connection being set up; nothing is written.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, StoreError> {
        let l2 = RedisStore::connect(url, prefix).await?;
        Ok(Self::builder().build(l2, redis::Client::open(url)?))
    }

    /// Connects to a Redis Cluster through any of `nodes` ([`RedisClusterStore::connect`](
    /// super::RedisClusterStore::connect)) with the default tier. Needs the `cluster` feature.
    ///
    /// # Errors
    ///
    /// As [`RedisClusterStore::connect`](super::RedisClusterStore::connect).
    ///
    /// # Cancel safety
    ///
    /// As [`connect`](Self::connect).
    #[cfg(feature = "cluster")]
    pub async fn connect_cluster(
        nodes: &[&str],
        prefix: impl Into<String>,
    ) -> Result<Self, StoreError> {
        let l2 = super::RedisClusterStore::connect(nodes, prefix).await?;
        Self::builder().build_cluster(l2, nodes)
    }

    /// The Redis tier.
    pub fn redis(&self) -> &dyn Store {
        self.l2.store()
    }

    /// Whether the in-process tier serves now (subscribed, and a recent heartbeat came back).
    pub fn serving(&self) -> bool {
        self.l1.usable()
    }

    /// Waits until the in-process tier serves, at most `timeout`; returns whether it does.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.serving() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }

    /// Whether the in-process tier holds an entry for `key` (diagnostics: the fan-out benchmark polls it).
    pub fn holds(&self, key: &str) -> bool {
        self.l1.holds(key)
    }

    /// What the in-process tier did so far.
    pub fn stats(&self) -> TierStats {
        let c = &self.l1.counts;
        TierStats {
            hits: c.hits.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            applied: c.applied.load(Ordering::Relaxed),
        }
    }
}

/// The slot names a read of `key` and `tags` may put in the tier.
fn slots_of(key: &str, tags: &[String]) -> Vec<String> {
    std::iter::once(key.to_owned())
        .chain(tags.iter().map(|t| tag_slot(t)))
        .collect()
}

/// The tier's entries for tokens read from Redis (missing tokens are not held).
fn tag_entries<'a>(
    names: &[String],
    tokens: impl IntoIterator<Item = Option<&'a TagToken>>,
) -> Vec<(String, Held)> {
    names
        .iter()
        .zip(tokens)
        .filter_map(|(n, t)| t.map(|t| (tag_slot(n), Held::Tag(t.clone()))))
        .collect()
}

impl Store for TieredStore {
    fn consumer(&self) -> String {
        // The same data as the Redis tier: instances share the delivery of each outbox row, and the
        // fan-out carries it to every instance's tier.
        self.l2.store().consumer()
    }

    fn invalidate<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            self.l1.apply(keys);
            let result = self.l2.store().invalidate(keys).await;
            // A read of Redis sent before the invalidation may have put the old slot back meanwhile.
            self.l1.apply(keys);
            crate::observe::tier_invalidated(keys.len());
            result
        })
    }

    fn sequence(&self, at_least: u64) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        self.l2.store().sequence(at_least)
    }

    fn forget_local(&self, key: &str) {
        self.l1.forget_value(key);
    }

    fn vouch(&self) {
        self.l2.store().vouch();
    }

    fn system_name(&self) -> Option<&'static str> {
        Some("redis")
    }

    fn reset<'a>(
        &'a self,
        keys: &'a [String],
        at_least: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            self.l1.flush();
            let result = self.l2.store().reset(keys, at_least).await;
            self.l1.flush();
            result
        })
    }

    fn peek<'a>(
        &'a self,
        key: &'a str,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Peek, StoreError>> {
        Box::pin(async move {
            if self.l1.usable()
                && let Some(peek) = self.l1.peek(key, tags)
            {
                crate::observe::tier_hit("l1");
                return Ok(peek);
            }
            let stamp = self.l1.stamp(&slots_of(key, tags));
            let peek = self.l2.store().peek(key, tags).await?;
            if let Some(value) = &peek.value
                && peek.tags.iter().all(Option::is_some)
            {
                let mut entries = vec![(key.to_owned(), Held::Value(value.as_slice().into()))];
                entries.extend(tag_entries(tags, peek.tags.iter().map(Option::as_ref)));
                self.l1.store_if(&stamp, entries);
            }
            crate::observe::tier_hit("l2");
            Ok(peek)
        })
    }

    fn lookup<'a>(
        &'a self,
        key: &'a str,
        lease: LeaseRequest<'a>,
        tags: &'a [String],
        tag_ttl: Duration,
    ) -> BoxFuture<'a, Result<Lookup, StoreError>> {
        Box::pin(async move {
            // The entry found invalid (or missing) must not be served from the tier meanwhile.
            self.l1.forget_value(key);
            let stamp = self.l1.stamp(&slots_of(key, tags));
            let lookup = self.l2.store().lookup(key, lease, tags, tag_ttl).await?;
            let mut entries = tag_entries(tags, lookup.tags.iter().map(Some));
            if let Slot::Value(value) = &lookup.slot {
                entries.push((key.to_owned(), Held::Value(value.as_slice().into())));
            }
            self.l1.store_if(&stamp, entries);
            Ok(lookup)
        })
    }

    fn tags<'a>(
        &'a self,
        tags: &'a [String],
        create: Option<Duration>,
    ) -> BoxFuture<'a, Result<Vec<Option<TagToken>>, StoreError>> {
        Box::pin(async move {
            if create.is_none()
                && self.l1.usable()
                && let Some(held) = tags
                    .iter()
                    .map(|t| self.l1.tag(t).map(Some))
                    .collect::<Option<Vec<_>>>()
            {
                return Ok(held);
            }
            let slots: Vec<String> = tags.iter().map(|t| tag_slot(t)).collect();
            let stamp = self.l1.stamp(&slots);
            let tokens = self.l2.store().tags(tags, create).await?;
            self.l1
                .store_if(&stamp, tag_entries(tags, tokens.iter().map(Option::as_ref)));
            Ok(tokens)
        })
    }

    fn fill<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
        value: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let stamp = self.l1.stamp(&[key]);
            let stored = self.l2.store().fill(key, lease, value, ttl).await?;
            if stored {
                self.l1
                    .store_if(&stamp, vec![(key.to_owned(), Held::Value(value.into()))]);
            }
            Ok(stored)
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.l2.store().release(key, lease)
    }
}
