//! Where cached values live: the [`Store`] trait, with Redis and in-process implementations.
//!
//! A store is a map of byte strings with four kinds of slots, all addressed by rendered keys (see
//! [`crate::Key`]):
//!
//! - the **value slot** of a key holds either an encoded entry or a **lease** (a random token that says
//!   "a reader is loading this key"); both live under the key itself, so every atomic operation on a
//!   value touches exactly one key (one Redis Cluster slot);
//! - the **tag token** of a key (or of a namespace shape) is a random token, created on first use, that
//!   entries built from that key record; invalidating the key deletes the token, so entries that recorded
//!   it never validate again, whatever the store later loses or evicts.
//!
//! Invalidation takes rendered keys and namespace shapes (strings containing `<>`, such as `product:<>`,
//! which no rendered key can contain). A rendered key loses its value slot (entry or lease) and its tag
//! token; a shape loses its tag token, which every entry of that shape records, so a whole namespace is
//! invalidated in O(1).
//!
//! A store that can lose what it acknowledged (a Redis server restarted from an older snapshot, or a replica
//! promoted before it received the last deletes) keeps a **sequence**: a count of the invalidations its
//! dataset has applied, raised by every [`Store::invalidate`] and returned with every read. The dataset
//! went back in time exactly when the sequence is lower than one already seen; pools compare it with the
//! highest sequence the database recorded for delivered outbox rows, and drop every namespace of their
//! registry before reads use the store again (see [`health`](crate::health)).
//!
//! [`Cache`](crate::Cache) builds every guarantee on these primitives; a store only has to make each
//! primitive atomic on its key. [`RedisStore`] and [`MemoryStore`] are the two implementations, with the same
//! semantics.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub mod conformance;
mod memory;
mod redis;
pub mod tiered;

pub use memory::MemoryStore;
pub use redis::RedisStore;
#[cfg(feature = "cluster")]
pub use redis::cluster::RedisClusterStore;
pub use tiered::{TierStats, TieredStore, TieredStoreBuilder};

/// A boxed, sendable future: what [`Store`] methods return, so that stores can be used as `dyn Store`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The prefix of tag-token slots: `<tag>` followed by the key or shape. No rendered key contains `<`.
pub(crate) const TAG_PREFIX: &str = "<tag>";

/// The slot name of the tag token of `key_or_shape`.
pub(crate) fn tag_slot(key_or_shape: &str) -> String {
    let mut s = String::with_capacity(TAG_PREFIX.len() + key_or_shape.len());
    s.push_str(TAG_PREFIX);
    s.push_str(key_or_shape);
    s
}

/// A random 128-bit nonce, in hex: lease tokens and tag tokens.
pub(crate) fn nonce() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// Whether `key` is a namespace shape (`product:<>`) rather than a rendered key.
pub(crate) fn is_shape(key: &str) -> bool {
    key.contains("<>")
}

/// A cache backend.
///
/// Implementations make each method atomic on the one key it names (value slot or tag token); methods
/// that take several keys may run them in one round trip but need not be atomic across keys.
///
/// # Cancel safety
///
/// Dropping a returned future may or may not have applied its operation. Every operation is safe either
/// way: invalidation is idempotent, a lease that was taken but not reported expires after its TTL, and a
/// fill or release that did not happen leaves the lease to expire.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Invalidates `keys` (rendered keys, or namespace shapes containing `<>`), in one round trip where the
    /// backend allows it.
    ///
    /// A rendered key loses its value slot (entry or lease: a fill in progress then fails) and its tag
    /// token (entries built from it stop validating). A shape loses its namespace tag token (every entry of
    /// that shape stops validating).
    ///
    /// Returns the store's [sequence](Self::sequence) after the invalidation (`None` for a store that
    /// cannot lose what it acknowledged).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend cannot be reached; nothing is known to be invalidated then.
    fn invalidate<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>>;

    /// The store's sequence: the number of invalidations its dataset has applied (0 when it has none),
    /// first raised to `at_least` if it is lower. `None` (the default) for a store that cannot lose what it
    /// acknowledged, such as one in the process's memory.
    ///
    /// A sequence lower than one seen before means the dataset went back in time (a restart from an older
    /// snapshot, a promoted replica that missed writes): invalidations it acknowledged are lost.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend cannot be reached.
    fn sequence(&self, at_least: u64) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        let _ = at_least;
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Invalidates `keys` (as [`invalidate`](Self::invalidate)), then raises the
    /// [sequence](Self::sequence) to at least `at_least`, in one round trip where the backend allows it
    /// (so that a server that goes away in between applies neither, or only the first): how a pool
    /// repairs a store that forgot acknowledged invalidations (the keys are those of the replay window,
    /// or every namespace). Returns the sequence.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend cannot be reached.
    fn reset<'a>(
        &'a self,
        keys: &'a [String],
        at_least: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            self.invalidate(keys).await?;
            self.sequence(at_least).await
        })
    }

    /// Reads the value slot of `key` (an entry; `None` when empty or leased) and the current tag tokens of
    /// `tags` (`None` when missing), in one round trip, changing nothing: the hit path.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend cannot be reached or answers unexpectedly.
    fn peek<'a>(
        &'a self,
        key: &'a str,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Peek, StoreError>>;

    /// Reads the value slot of `key`; when it is empty (or holds exactly `lease.replace`), takes the lease
    /// for the caller, atomically. In the same round trip, returns the tag tokens of `tags`, creating the
    /// missing ones (with time to live at least `tag_ttl`).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend cannot be reached or answers unexpectedly.
    fn lookup<'a>(
        &'a self,
        key: &'a str,
        lease: LeaseRequest<'a>,
        tags: &'a [String],
        tag_ttl: Duration,
    ) -> BoxFuture<'a, Result<Lookup, StoreError>>;

    /// The current tag tokens of `tags`, in order. With `create = Some(ttl)` missing tokens are created
    /// (and every token lives at least `ttl`); with `None` a missing token is `None`.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend cannot be reached or answers unexpectedly.
    fn tags<'a>(
        &'a self,
        tags: &'a [String],
        create: Option<Duration>,
    ) -> BoxFuture<'a, Result<Vec<Option<TagToken>>, StoreError>>;

    /// Stores `value` under `key` for `ttl` if, and only if, the value slot still holds the lease `lease`
    /// (no invalidation and no other writer touched the key since the lease was taken). Returns whether it
    /// stored.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend cannot be reached; the value is not known to be stored then.
    fn fill<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
        value: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Empties the value slot of `key` if it still holds the lease `lease` (a load failed or was abandoned).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend cannot be reached; the lease then expires on its own.
    fn release<'a>(&'a self, key: &'a str, lease: &'a str)
    -> BoxFuture<'a, Result<(), StoreError>>;

    /// The name of the data this store holds, as an outbox [consumer](crate::outbox::Consumer): pools and
    /// relays whose stores have the same name share the delivery of each outbox row (one of them delivers
    /// it); stores with different names each receive every row. [`RedisStore`]: the
    /// server and the prefix; [`MemoryStore`]: unique to the instance. The default, the
    /// type's name, suits a store type of which one dataset exists; override it otherwise (or name the
    /// consumer in [`CachedPoolOptions::consumer`](crate::CachedPoolOptions::consumer)).
    fn consumer(&self) -> String {
        std::any::type_name::<Self>().to_owned()
    }

    /// The store's OpenTelemetry `db.system.name` (`redis`), recorded on the `cache.invalidate` span; `None`
    /// (the default) for a store that is not a database server, such as one in the process's memory.
    fn system_name(&self) -> Option<&'static str> {
        None
    }

    /// Drops what a tier local to this process holds of `key`'s value slot, so that the next
    /// [`peek`](Self::peek) reads the shared store, and a read of the shared store sent before this call
    /// does not put its answer back: how a read given a write's [token](crate::token) of another instance
    /// avoids an in-process tier the write's fan-out may not have reached yet. Nothing (the default) for a
    /// store without such a tier.
    fn forget_local(&self, key: &str) {
        let _ = key;
    }

    /// Accepts the connection the store's reads found new (see [`StoreError::Reconnected`]): until then
    /// every read answered on it fails, so that no read is served from a server that may have restarted
    /// from an older snapshot before a check vouched for it. A pool's recovery calls it once it checked
    /// the store's sequence (and repaired it); a cache without one, at the failure. Nothing (the default)
    /// for a store that does not watch its connection.
    fn vouch(&self) {}
}

/// A shared store is a store: `Arc<dyn Store>` (or `Arc<S>`) can be handed wherever a `Store` is taken.
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn consumer(&self) -> String {
        (**self).consumer()
    }

    fn system_name(&self) -> Option<&'static str> {
        (**self).system_name()
    }

    fn forget_local(&self, key: &str) {
        (**self).forget_local(key);
    }

    fn vouch(&self) {
        (**self).vouch();
    }

    fn invalidate<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        (**self).invalidate(keys)
    }

    fn sequence(&self, at_least: u64) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        (**self).sequence(at_least)
    }

    fn reset<'a>(
        &'a self,
        keys: &'a [String],
        at_least: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        (**self).reset(keys, at_least)
    }

    fn peek<'a>(
        &'a self,
        key: &'a str,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Peek, StoreError>> {
        (**self).peek(key, tags)
    }

    fn lookup<'a>(
        &'a self,
        key: &'a str,
        lease: LeaseRequest<'a>,
        tags: &'a [String],
        tag_ttl: Duration,
    ) -> BoxFuture<'a, Result<Lookup, StoreError>> {
        (**self).lookup(key, lease, tags, tag_ttl)
    }

    fn tags<'a>(
        &'a self,
        tags: &'a [String],
        create: Option<Duration>,
    ) -> BoxFuture<'a, Result<Vec<Option<TagToken>>, StoreError>> {
        (**self).tags(tags, create)
    }

    fn fill<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
        value: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        (**self).fill(key, lease, value, ttl)
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).release(key, lease)
    }
}

/// The lease a [`Store::lookup`] takes when the value slot is empty.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRequest<'a> {
    /// The caller's random lease token.
    pub token: &'a str,
    /// How long the lease lasts if its holder never fills nor releases it (a crashed or cancelled reader).
    pub ttl: Duration,
    /// Treat the slot as empty when it holds exactly these bytes (an entry the caller found undecodable or
    /// invalid), so that the lease replaces it atomically.
    pub replace: Option<&'a [u8]>,
}

/// What [`Store::peek`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peek {
    /// The bytes in the value slot, unless it is empty or holds a lease.
    pub value: Option<Vec<u8>>,
    /// The tag tokens asked for, in order; `None` where a token does not exist.
    pub tags: Vec<Option<TagToken>>,
    /// The store's [sequence](Store::sequence) when it answered.
    pub sequence: Option<u64>,
}

/// What [`Store::lookup`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// The value slot.
    pub slot: Slot,
    /// The tag tokens asked for, in order.
    pub tags: Vec<TagToken>,
    /// The store's [sequence](Store::sequence) when it answered.
    pub sequence: Option<u64>,
}

/// The state of a value slot, as [`Store::lookup`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// The slot holds these bytes (an entry, or something undecodable).
    Value(Vec<u8>),
    /// Another reader holds the lease: it is loading the value.
    Leased,
    /// The slot was empty and the caller now holds the lease, taken at `started` on the store's clock.
    Acquired {
        /// The store's clock when the lease was taken (microseconds; compared with
        /// [`TagToken::created`]).
        started: u64,
    },
}

/// The current token of a tag: entries record it, and validate only while it is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TagToken {
    /// The token (random, unique for the life of the store).
    pub id: String,
    /// The store's clock when the token was created (microseconds): a token created after a lease was
    /// taken means the tag may have been invalidated during that load.
    pub created: u64,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// The store's dataset is older than invalidations it acknowledged: its [sequence](Store::sequence)
    /// went back (a restart from an older snapshot, a promoted replica that missed writes).
    #[error(
        "the store forgot acknowledged invalidations (its sequence is {seen}, {acknowledged} were acknowledged); \
         dropping every namespace of the registry before reads use it again"
    )]
    Forgot {
        /// The sequence the store answered.
        seen: u64,
        /// The highest sequence known to have been acknowledged.
        acknowledged: u64,
    },
    /// A read was answered on another connection than the one it was sent for: the connection manager
    /// reconnected, maybe to a server restarted from an older snapshot or to a promoted replica. Counted
    /// as a failure, so that a pool checks the store (redelivering the outbox, comparing the sequence)
    /// before its reads use it again.
    #[error(
        "the store connection was re-established; checking the store before reads use it again"
    )]
    Reconnected,
    /// Fewer replicas than asked acknowledged an invalidation in time
    /// ([`RedisStore::wait_for_replicas`]); the keys stay in the outbox and are delivered again.
    #[error("only {acknowledged} of {wanted} replicas acknowledged the invalidation in time")]
    Replication {
        /// Replicas that acknowledged.
        acknowledged: u64,
        /// Replicas asked for.
        wanted: u64,
    },
    /// The backend answered something this version does not understand (a different script, a changed
    /// server); check that every process runs the same version of this crate.
    #[error("unexpected answer from the store: {0}")]
    Protocol(String),

    /// No connection could be taken from the application's connection pool (see
    /// [`RedisStore::with_pool`](crate::RedisStore::with_pool)).
    #[error("redis connection pool: {0}")]
    Pool(String),
}
