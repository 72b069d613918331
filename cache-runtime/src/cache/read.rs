//! One read: peek (when no flight of the key is in progress: a hit needs none); on a miss, join the key's
//! single flight, then (as its leader) lease → load → fill.
//!
//! See the [module docs](super) for the protocol; each step is one function here:
//!
//! 1. [`Cache::peek`]: the hit path, one read-only round trip (value slot and tag tokens);
//! 2. [`Cache::acquire`]: on a miss, take the lease (or find a value, or wait for another reader's lease);
//! 3. [`Cache::load_and_fill`]: run the loader, then store the value if the lease is still ours and no
//!    tag it was built from changed.

use std::any::Any;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::flight::{self, Join, Outcome};
use super::{Cache, Event, LoadOptions, codec, scope};
use crate::key::Key;
use crate::store::{LeaseRequest, Slot, Store, StoreError, TagToken, nonce};

/// What a stored entry turned out to be: a valid one carries where its payload starts in its bytes.
enum Hit<V> {
    Valid(V, usize),
    Stale,
    Undecodable,
    StoreFailed,
}

/// What a read returns to its caller and to the readers sharing its flight.
type Read<V, E> = (Result<V, Arc<E>>, Outcome);

/// The outcome of a step: the read is over, or goes on with `T`.
enum Step<V, T> {
    /// A valid entry.
    Hit(V, Payload),
    /// The store cannot be used for this read: load without storing.
    Unstored,
    /// A value this process saw valid within the read's stale-while-revalidate bound, returned while
    /// another reader holds the lease (never shared with other readers).
    Recalled(V),
    /// Go on.
    Next(T),
}

/// A valid entry's payload, still in the bytes the store returned: copied out only when shared with a
/// flight's readers (a hit without followers never copies it).
struct Payload {
    bytes: Vec<u8>,
    start: usize,
}

impl Payload {
    fn shared(self) -> Arc<[u8]> {
        Arc::from(self.bytes.get(self.start..).unwrap_or_default())
    }
}

/// What one leader's read is about: computed once, used by every step.
struct Plan<'k> {
    key: &'k Key,
    /// The tags read before the load: the key's namespace first, then the declared tags.
    pre: Vec<String>,
    /// The lease token.
    token: String,
    ttl: Duration,
    tag_ttl: Duration,
    /// The health epoch when the read started: a store failure since then forbids the fill.
    epoch: u64,
    /// Whether a loaded "nothing" is stored (see [`LoadOptions::cache_none`]).
    cache_none: bool,
    /// [`LoadOptions::stale_while_revalidate`].
    stale_while_revalidate: Option<Duration>,
}

/// A lease taken by [`Cache::acquire`].
struct Lease {
    guard: LeaseGuard,
    /// The store's clock when it was taken.
    started: u64,
    /// The current tokens of the plan's `pre` tags.
    tokens: Vec<TagToken>,
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
    /// Every failed store operation goes through here: it counts towards the breaker and closes the gate.
    pub(super) fn store_failed(&self, op: &'static str, error: &StoreError) {
        self.inner.stats.record(Event::StoreError(op));
        self.inner.guarded.health.failure();
        // A cache with no recovery to check the store (no pool's gate) takes the new connection at once.
        if matches!(error, StoreError::Reconnected) && !self.inner.guarded.health.gate_enabled() {
            self.inner.guarded.store.vouch();
        }
        tracing::warn!(op, %error, "cache store failed; reading from the loader");
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
    ///
    /// Every read of the cache ends here: it honors the read's token, if any, joins the key's single
    /// flight in this process and, as its leader, runs the protocol below.
    pub async fn get_or_load_tagged<V, E, F, Fut>(
        &self,
        key: Key,
        mut options: LoadOptions,
        loader: F,
    ) -> Result<V, Arc<E>>
    where
        V: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Vec<Key>), E>>,
    {
        if let Some(token) = options.after.or_else(crate::token::current) {
            if !self.caught_up(&token).await {
                self.inner.stats.record(Event::Bypassed("token"));
                return self.load_unstored(loader).await.0;
            }
            // A read after a write never takes an older value: not from an in-process tier the write's
            // fan-out may not have reached yet (the shared store has the invalidation), nor a stale one.
            self.inner.guarded.store.forget_local(key.as_str());
            options.stale_while_revalidate = None;
            options.stale_on_error = None;
        }
        let Some(name) = options.recalls().then(|| key.as_str().to_owned()) else {
            return self.read_tagged(key, options, loader).await;
        };
        let stale_on_error = options.stale_on_error;
        let result = self.read_tagged(key, options, loader).await;
        match &result {
            Ok(value) => self.remember(name, value),
            Err(_) => {
                if let Some(value) =
                    stale_on_error.and_then(|b| self.recall(&name, b, "loader_error"))
                {
                    return Ok(value);
                }
            }
        }
        result
    }

    /// [`get_or_load_tagged`](Self::get_or_load_tagged) after the token and the stale options.
    async fn read_tagged<V, E, F, Fut>(
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
        // The hit path needs no flight: with none in progress for the key, peek first (a valid entry is
        // returned as the leader's peek would); a miss then joins a flight and asks for the lease at once.
        let mut peeked = None;
        if self.bypass().is_none() && !self.inner.flights.busy(key.as_str()) {
            let plan = self.plan(&key, &options);
            let replace = if self.inner.guarded.recent.take(key.as_str()) {
                Some(None)
            } else {
                match self.peek::<V>(&plan).await {
                    Step::Hit(value, _) => {
                        if let Some(reload) = &options.sample {
                            self.submit_sample(&key, reload);
                        }
                        // An in-process hit never waits: let a loop of them yield to other tasks now
                        // and then (as tokio's own resources do), or it starves the runtime.
                        tokio::task::consume_budget().await;
                        return Ok(value);
                    }
                    Step::Unstored | Step::Recalled(_) => None,
                    Step::Next(replace) => Some(replace),
                }
            };
            peeked = replace.map(|replace| (plan, replace));
        }
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
                self.inner.stats.record(Event::Coalesced);
                return Err(e);
            }
        }
        leader.pass();
        let span = tracing::debug_span!("cache.load", key = %key);
        let (result, outcome) = self
            .lead(&key, &options, loader, peeked)
            .instrument(span)
            .await;
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
        self.inner.stats.record(Event::Coalesced);
        Some(result)
    }

    /// The plan of a read of `key`.
    fn plan<'k>(&self, key: &'k Key, options: &LoadOptions) -> Plan<'k> {
        let ttl = options.ttl.unwrap_or_else(|| self.ttl_for(key));
        Plan {
            key,
            pre: self.tags_of(key, &options.tags),
            // Drawn when a lease is asked for: a hit needs none.
            token: String::new(),
            ttl,
            tag_ttl: ttl.saturating_add(Duration::from_secs(60)),
            epoch: self.inner.guarded.health.epoch(),
            cache_none: options.cache_none,
            stale_while_revalidate: options.stale_while_revalidate,
        }
    }

    /// The tags read before a load of `key`: its namespace, the declared `tags` and, for a variant key,
    /// the key of its base (see [`Variant`](crate::entity::Variant)).
    fn tags_of(&self, key: &Key, tags: &[Key]) -> Vec<String> {
        let Some(bases) = self.inner.bases.get(key.template().shape()) else {
            return tag_names(key, tags);
        };
        let mut all = tags.to_vec();
        all.extend(
            bases
                .iter()
                .filter_map(|base| base.key_prefix(key.as_str())),
        );
        tag_names(key, &all)
    }

    /// The leader's read: peek (unless the caller `peeked` already, finding no valid entry), lease, load
    /// and fill.
    async fn lead<V, E, F, Fut>(
        &self,
        key: &Key,
        options: &LoadOptions,
        loader: F,
        peeked: Option<(Plan<'_>, Option<Vec<u8>>)>,
    ) -> Read<V, E>
    where
        V: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Vec<Key>), E>>,
    {
        if let Some(reason) = self.bypass() {
            self.inner.stats.record(Event::Bypassed(reason));
            return self.load_unstored(loader).await;
        }
        // A key this process just invalidated is most likely empty: straight to the lease, which also
        // returns a value if one was filled meanwhile.
        let (mut plan, replace) = match peeked {
            Some(peeked) => peeked,
            None => {
                let plan = self.plan(key, options);
                if self.inner.guarded.recent.take(key.as_str()) {
                    (plan, None)
                } else {
                    match self.peek::<V>(&plan).await {
                        Step::Hit(value, payload) => {
                            if let Some(reload) = &options.sample {
                                self.submit_sample(key, reload);
                            }
                            return (Ok(value), Outcome::Value(payload.shared()));
                        }
                        Step::Unstored | Step::Recalled(_) => {
                            return self.load_unstored(loader).await;
                        }
                        Step::Next(replace) => (plan, replace),
                    }
                }
            }
        };
        self.inner.stats.record(Event::Miss);
        plan.token = nonce();
        match self.acquire::<V>(&plan, replace).await {
            Step::Hit(value, payload) => (Ok(value), Outcome::Value(payload.shared())),
            Step::Recalled(value) => (Ok(value), Outcome::Unshared),
            Step::Unstored => self.load_unstored(loader).await,
            Step::Next(lease) => self.load_and_fill(&plan, lease, loader).await,
        }
    }

    /// Why the store must not be used now: the post-outage gate is closed, or the breaker skips calls.
    fn bypass(&self) -> Option<&'static str> {
        let health = &self.inner.guarded.health;
        if health.gated() {
            Some("gate")
        } else if health.permit() == crate::health::Permit::Skip {
            Some("breaker")
        } else {
            None
        }
    }

    /// The hit path: one read-only round trip. `Next` carries the invalid entry found, if any, for the
    /// lease to replace.
    async fn peek<V: DeserializeOwned>(&self, plan: &Plan<'_>) -> Step<V, Option<Vec<u8>>> {
        let guarded = &self.inner.guarded;
        let floor = guarded.acknowledged.floor();
        let peek = match guarded.store.peek(plan.key.as_str(), &plan.pre).await {
            Ok(peek) => peek,
            Err(e) => {
                self.store_failed("peek", &e);
                return Step::Unstored;
            }
        };
        guarded.health.success();
        if guarded.observe(floor, peek.sequence).is_err() {
            self.inner.stats.record(Event::StoreError("peek"));
            return Step::Unstored;
        }
        let Some(bytes) = peek.value else {
            return Step::Next(None);
        };
        let current: Vec<Option<&str>> = peek
            .tags
            .iter()
            .map(|t| t.as_ref().map(|t| t.id.as_str()))
            .collect();
        match self.examine::<V>(plan, &bytes, &current).await {
            Hit::Valid(value, start) => Step::Hit(value, Payload { bytes, start }),
            Hit::StoreFailed => Step::Unstored,
            Hit::Stale | Hit::Undecodable => Step::Next(Some(bytes)),
        }
    }

    /// Takes the lease (replacing the invalid entry `replace`), or finds a valid value, or waits for
    /// another reader's lease until [`lease_wait`](super::CacheBuilder::lease_wait) has passed.
    async fn acquire<V: DeserializeOwned>(
        &self,
        plan: &Plan<'_>,
        mut replace: Option<Vec<u8>>,
    ) -> Step<V, Lease> {
        let config = &self.inner.config;
        let store = &self.inner.guarded.store;
        let deadline = Instant::now() + config.lease_wait;
        let mut backoff = Duration::from_millis(1);
        let mut waited = false;
        loop {
            let lease = LeaseRequest {
                token: &plan.token,
                ttl: config.lease_ttl,
                replace: replace.as_deref(),
            };
            let floor = self.inner.guarded.acknowledged.floor();
            let lookup = match store
                .lookup(plan.key.as_str(), lease, &plan.pre, plan.tag_ttl)
                .await
            {
                Ok(lookup) => lookup,
                Err(e) => {
                    self.store_failed("lookup", &e);
                    return Step::Unstored;
                }
            };
            self.inner.guarded.health.success();
            if self.inner.guarded.observe(floor, lookup.sequence).is_err() {
                // A lease taken on a dataset that went back expires on its own.
                self.inner.stats.record(Event::StoreError("lookup"));
                return Step::Unstored;
            }
            match lookup.slot {
                Slot::Acquired { started } => {
                    return Step::Next(Lease {
                        guard: LeaseGuard {
                            store: Arc::clone(store),
                            key: plan.key.as_str().to_owned(),
                            token: plan.token.clone(),
                            armed: true,
                        },
                        started,
                        tokens: lookup.tags,
                    });
                }
                Slot::Value(bytes) => {
                    let current: Vec<Option<&str>> =
                        lookup.tags.iter().map(|t| Some(t.id.as_str())).collect();
                    match self.examine::<V>(plan, &bytes, &current).await {
                        Hit::Valid(value, start) => {
                            return Step::Hit(value, Payload { bytes, start });
                        }
                        Hit::StoreFailed => return Step::Unstored,
                        Hit::Stale | Hit::Undecodable => {}
                    }
                    if replace.as_deref() == Some(bytes.as_slice()) {
                        // Replacing it did not work twice in a row: do not loop on a store that
                        // misbehaves.
                        return Step::Unstored;
                    }
                    replace = Some(bytes);
                }
                Slot::Leased => {
                    if let Some(value) = plan
                        .stale_while_revalidate
                        .and_then(|bound| self.recall(plan.key.as_str(), bound, "revalidating"))
                    {
                        return Step::Recalled(value);
                    }
                    if !std::mem::replace(&mut waited, true) {
                        self.inner.stats.record(Event::LeaseWait);
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        self.inner.stats.record(Event::LeaseTimeout);
                        return Step::Unstored;
                    }
                    tokio::time::sleep(backoff.min(deadline - now)).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
            }
        }
    }

    /// Runs the loader under the lease and stores its value if nothing it was built from changed meanwhile.
    async fn load_and_fill<V, E, F, Fut>(
        &self,
        plan: &Plan<'_>,
        lease: Lease,
        loader: F,
    ) -> Read<V, E>
    where
        V: Serialize,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Vec<Key>), E>>,
    {
        let stats = &self.inner.stats;
        stats.record(Event::Load);
        let (loaded, uncommitted) = scope::load(loader()).await;
        let (value, found_tags) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                stats.record(Event::LoadError);
                lease.guard.release().await;
                return shared_error(e);
            }
        };
        if uncommitted {
            stats.record(Event::FillSkipped);
            tracing::debug!(key = %plan.key, "loaded through a transaction that may hold uncommitted writes; not stored");
            lease.guard.release().await;
            return (Ok(value), Outcome::Unshared);
        }
        let payload = match codec::encode(&value) {
            Ok(payload) => payload,
            Err(e) => {
                stats.record(Event::FillSkipped);
                tracing::warn!(key = %plan.key, error = %e, "cannot encode the loaded value; not cached");
                lease.guard.release().await;
                return (Ok(value), Outcome::Unshared);
            }
        };
        if !plan.cache_none && codec::is_nothing(&payload) {
            lease.guard.release().await;
            return (Ok(value), Outcome::Value(payload.into()));
        }
        let Lease {
            guard,
            started,
            tokens,
        } = lease;
        let mut recorded: Vec<(String, String)> = plan
            .pre
            .iter()
            .cloned()
            .zip(tokens.into_iter().map(|t| t.id))
            .collect();
        let storable = self.record_late_tags(&mut recorded, &found_tags, started, plan).await
            // A store failure since the lease was taken: an invalidation may have been lost meanwhile,
            // and the lease would not show it.
            && self.inner.guarded.health.epoch() == plan.epoch;
        if storable {
            self.fill(plan, guard, &recorded, &payload).await;
        } else {
            stats.record(Event::FillSkipped);
            guard.release().await;
        }
        (Ok(value), Outcome::Value(payload.into()))
    }

    /// Adds to `recorded` the tokens of the tags the loader found that were not read before the load.
    /// Returns `false` (do not store) when one of them did not exist before the lease was taken: it may
    /// have been invalidated during the load.
    async fn record_late_tags(
        &self,
        recorded: &mut Vec<(String, String)>,
        found: &[Key],
        started: u64,
        plan: &Plan<'_>,
    ) -> bool {
        let late: Vec<String> = tag_names_of(found)
            .filter(|n| !recorded.iter().any(|(r, _)| r == n))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if late.is_empty() {
            return true;
        }
        match self
            .inner
            .guarded
            .store
            .tags(&late, Some(plan.tag_ttl))
            .await
        {
            Ok(tokens) => {
                let mut storable = true;
                for (name, token) in late.into_iter().zip(tokens) {
                    match token {
                        Some(TagToken { id, created }) if created < started => {
                            recorded.push((name, id));
                        }
                        _ => storable = false,
                    }
                }
                storable
            }
            Err(e) => {
                self.store_failed("tags", &e);
                false
            }
        }
    }

    /// Stores the entry if the lease is still ours.
    async fn fill(
        &self,
        plan: &Plan<'_>,
        mut guard: LeaseGuard,
        recorded: &[(String, String)],
        payload: &[u8],
    ) {
        let entry = codec::seal(
            recorded.iter().map(|(n, t)| (n.as_str(), t.as_str())),
            payload,
        );
        let ttl = if codec::is_nothing(payload) {
            self.jittered(plan.ttl.min(self.inner.config.negative_ttl))
        } else {
            self.jittered(plan.ttl)
        };
        let result = self
            .inner
            .guarded
            .store
            .fill(plan.key.as_str(), &guard.token, &entry, ttl)
            .await;
        match result {
            Ok(stored) => {
                guard.armed = false;
                if stored {
                    self.inner.guarded.health.success();
                    self.inner.stats.record(Event::Fill);
                } else {
                    self.inner.stats.record(Event::FillRejected);
                    tracing::debug!(key = %plan.key, "invalidated during the load; not stored");
                }
            }
            Err(e) => self.store_failed("fill", &e),
        }
    }

    /// Loads without the store (store down, lease wait timed out): nothing is stored.
    async fn load_unstored<V, E, F, Fut>(&self, loader: F) -> Read<V, E>
    where
        V: Serialize,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Vec<Key>), E>>,
    {
        self.inner.stats.record(Event::Load);
        match scope::load(loader()).await {
            (Ok((value, _)), true) => (Ok(value), Outcome::Unshared),
            (Ok((value, _)), false) => {
                let outcome =
                    codec::encode(&value).map_or(Outcome::Unshared, |p| Outcome::Value(p.into()));
                (Ok(value), outcome)
            }
            (Err(e), _) => {
                self.inner.stats.record(Event::LoadError);
                shared_error(e)
            }
        }
    }

    /// [`check`](Self::check)s a stored entry and counts the outcome: a valid hit, a stale entry, an
    /// undecodable one (logged; the caller replaces it).
    async fn examine<V: DeserializeOwned>(
        &self,
        plan: &Plan<'_>,
        bytes: &[u8],
        pre_tokens: &[Option<&str>],
    ) -> Hit<V> {
        let hit = self.check::<V>(bytes, &plan.pre, pre_tokens).await;
        match &hit {
            Hit::Valid(..) => self.inner.stats.record(Event::Hit),
            Hit::Stale => self.inner.stats.record(Event::Stale),
            Hit::Undecodable => {
                self.inner.stats.record(Event::Undecodable);
                tracing::warn!(key = %plan.key, "undecodable cache entry; replacing it");
            }
            Hit::StoreFailed => {}
        }
        hit
    }

    /// The payload of `key`'s valid entry now, read without counting a read (for the consistency
    /// sampler): `None` when there is no valid entry; `Err` when the store failed.
    pub(super) async fn current(&self, key: &Key) -> Result<Option<Arc<[u8]>>, ()> {
        let plan = self.plan(key, &LoadOptions::default());
        let peek = self
            .inner
            .guarded
            .store
            .peek(key.as_str(), &plan.pre)
            .await
            .map_err(drop)?;
        let Some(bytes) = peek.value else {
            return Ok(None);
        };
        let tokens: Vec<Option<&str>> = peek
            .tags
            .iter()
            .map(|t| t.as_ref().map(|t| t.id.as_str()))
            .collect();
        match self
            .check::<serde::de::IgnoredAny>(&bytes, &plan.pre, &tokens)
            .await
        {
            Hit::Valid(_, start) => Ok(Some(Payload { bytes, start }.shared())),
            Hit::Stale | Hit::Undecodable => Ok(None),
            Hit::StoreFailed => Err(()),
        }
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
            match self.inner.guarded.store.tags(&names, None).await {
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
            Ok(value) => Hit::Valid(value, bytes.len() - envelope.payload.len()),
            Err(_) => Hit::Undecodable,
        }
    }
}

/// A loader error, returned to the caller and shared with the readers of its flight.
fn shared_error<V, E: Send + Sync + 'static>(e: E) -> Read<V, E> {
    let e = Arc::new(e);
    let shared: Arc<dyn Any + Send + Sync> = Arc::new(Arc::clone(&e));
    (Err(e), Outcome::Error(shared))
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
