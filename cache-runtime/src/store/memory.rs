//! The in-process store, on a bounded [`moka`] cache.
//!
//! Same layout and semantics as the Redis store: the value slot of `K` (entry or lease) under `K`, tag
//! tokens under `<tag>K` and `<tag>S` for shapes. Each primitive runs under moka's per-key lock
//! (`and_compute_with`), so it is atomic on its key. The store's clock is a process-wide counter: strictly
//! increasing, so "created after the lease was taken" is exact.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::ops::compute::Op;
use moka::sync::Cache as Moka;

use super::{
    BoxFuture, LeaseRequest, Lookup, Peek, Slot, Store, StoreError, TagToken, is_shape, nonce,
    tag_slot,
};

#[derive(Debug, Clone)]
enum Held {
    Value(Arc<[u8]>),
    Lease(Arc<str>),
    Tag(TagToken),
}

#[derive(Debug, Clone)]
struct Entry {
    held: Held,
    ttl: Duration,
}

struct EntryExpiry;

impl Expiry<String, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &String, value: &Entry, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        value: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// A [`Store`] in this process's memory: the embedded default, with the same guarantees as
/// [`RedisStore`](crate::RedisStore) for readers and writers of this process.
///
/// **One process per database.** Relays deliver each outbox row to *their* store and then delete it, so when
/// several processes write to one database, each with its own `MemoryStore`, a row delivered by one process
/// never reaches the others' stores. Share a [`RedisStore`](crate::RedisStore) between processes instead.
///
/// Bounded: at most `capacity` slots (entries, leases and tag tokens); the least useful are evicted first.
/// An evicted tag token only turns the entries that recorded it into misses.
///
/// # Examples
///
/// ```
/// let cache = cache_runtime::Cache::new(cache_runtime::MemoryStore::new(10_000));
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    slots: Moka<String, Entry>,
    clock: Arc<AtomicU64>,
    consumer: String,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("slots", &self.slots.entry_count())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    /// A store of at most 100,000 slots.
    fn default() -> Self {
        Self::new(100_000)
    }
}

impl MemoryStore {
    /// A store of at most `capacity` slots.
    pub fn new(capacity: u64) -> Self {
        Self {
            slots: Moka::builder()
                .max_capacity(capacity)
                .expire_after(EntryExpiry)
                .build(),
            clock: Arc::new(AtomicU64::new(1)),
            consumer: format!("memory {}", nonce()),
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// The token of `tag`, or `create` it (living at least `create`).
    fn tag(&self, tag: &str, create: Option<Duration>) -> Option<TagToken> {
        match create {
            None => self.current_tag(tag),
            Some(ttl) => self.created_tag(tag, ttl),
        }
    }

    /// The token of `tag`, read only: no per-key lock (a read racing an invalidation sees either side).
    fn current_tag(&self, tag: &str) -> Option<TagToken> {
        match self.slots.get(&tag_slot(tag)).map(|e| e.held) {
            Some(Held::Tag(token)) => Some(token),
            _ => None,
        }
    }

    /// The token of `tag`, created if missing (it lives at least `ttl`); `None` when the slot holds
    /// something else.
    fn created_tag(&self, tag: &str, ttl: Duration) -> Option<TagToken> {
        let mut out = None;
        self.slots
            .entry(tag_slot(tag))
            .and_compute_with(|current| match current {
                Some(e) => {
                    let entry = e.into_value();
                    let Held::Tag(token) = &entry.held else {
                        return Op::Nop;
                    };
                    out = Some(token.clone());
                    if ttl > entry.ttl {
                        Op::Put(Entry { ttl, ..entry })
                    } else {
                        Op::Nop
                    }
                }
                None => {
                    let now = self.tick();
                    let token = TagToken {
                        id: now.to_string(),
                        created: now,
                    };
                    out = Some(token.clone());
                    Op::Put(Entry {
                        held: Held::Tag(token),
                        ttl,
                    })
                }
            });
        out
    }
}

impl Store for MemoryStore {
    fn consumer(&self) -> String {
        self.consumer.clone()
    }

    fn invalidate<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        // Through the per-key lock (not `Cache::invalidate`, which does not serialize with
        // `and_compute_with`), so that a fill's compare-and-set and an invalidation are ordered.
        let remove = |slot: String| {
            self.slots.entry(slot).and_compute_with(|_| Op::Remove);
        };
        for key in keys {
            if !is_shape(key) {
                remove(key.clone());
            }
            remove(tag_slot(key));
        }
        // Dies with the process: never forgets what it acknowledged.
        Box::pin(std::future::ready(Ok(None)))
    }

    fn peek<'a>(
        &'a self,
        key: &'a str,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Peek, StoreError>> {
        let value = match self.slots.get(key).map(|e| e.held) {
            Some(Held::Value(v)) => Some(v.to_vec()),
            _ => None,
        };
        let tags = tags.iter().map(|t| self.current_tag(t)).collect();
        Box::pin(std::future::ready(Ok(Peek {
            value,
            tags,
            sequence: None,
        })))
    }

    fn lookup<'a>(
        &'a self,
        key: &'a str,
        lease: LeaseRequest<'a>,
        tags: &'a [String],
        tag_ttl: Duration,
    ) -> BoxFuture<'a, Result<Lookup, StoreError>> {
        let mut slot = Slot::Leased;
        self.slots
            .entry(key.to_owned())
            .and_compute_with(|current| {
                let current = current.map(|e| e.into_value().held);
                let replaceable = match (&current, lease.replace) {
                    (None, _) => true,
                    (Some(Held::Value(v)), Some(r)) => **v == *r,
                    _ => false,
                };
                if replaceable {
                    slot = Slot::Acquired {
                        started: self.tick(),
                    };
                    return Op::Put(Entry {
                        held: Held::Lease(lease.token.into()),
                        ttl: lease.ttl,
                    });
                }
                slot = match current {
                    Some(Held::Value(v)) => Slot::Value(v.to_vec()),
                    _ => Slot::Leased,
                };
                Op::Nop
            });
        let tags = tags
            .iter()
            .map(|t| self.created_tag(t, tag_ttl))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| StoreError::Protocol("a tag slot holds a value".into()));
        Box::pin(std::future::ready(tags.map(|tags| Lookup {
            slot,
            tags,
            sequence: None,
        })))
    }

    fn tags<'a>(
        &'a self,
        tags: &'a [String],
        create: Option<Duration>,
    ) -> BoxFuture<'a, Result<Vec<Option<TagToken>>, StoreError>> {
        let tokens = tags.iter().map(|t| self.tag(t, create)).collect();
        Box::pin(std::future::ready(Ok(tokens)))
    }

    fn fill<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
        value: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let mut stored = false;
        self.slots
            .entry(key.to_owned())
            .and_compute_with(|current| match current.map(|e| e.into_value().held) {
                Some(Held::Lease(l)) if *l == *lease => {
                    stored = true;
                    Op::Put(Entry {
                        held: Held::Value(value.into()),
                        ttl,
                    })
                }
                _ => Op::Nop,
            });
        Box::pin(std::future::ready(Ok(stored)))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.slots
            .entry(key.to_owned())
            .and_compute_with(|current| match current.map(|e| e.into_value().held) {
                Some(Held::Lease(l)) if *l == *lease => Op::Remove,
                _ => Op::Nop,
            });
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conforms() {
        crate::store::conformance::check(&MemoryStore::new(1_000), "conformance:")
            .await
            .unwrap();
    }
}
