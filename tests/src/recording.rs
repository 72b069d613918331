//! A real store (Redis or in-process) that records what it was asked to invalidate (and counts its peeks
//! and lookups), and can be cut off on demand.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_runtime::store::BoxFuture;
use cache_runtime::store::{LeaseRequest, Lookup, Peek, TagToken};
use cache_runtime::{Store, StoreError};

/// The shared record of one or more [`RecordingStore`]s.
#[derive(Debug, Default)]
struct Record {
    /// Every `invalidate` call, in order, whether it succeeded or not.
    calls: Vec<Vec<String>>,
    /// How many times each key was invalidated successfully.
    delivered: BTreeMap<String, u32>,
    /// `peek` and `lookup` calls.
    peeks: usize,
    lookups: usize,
}

/// A real store (Redis or in-process), recording every `invalidate` call (attempted) and every key invalidated
/// (successfully). Clones, and stores made with [`sharing`](Self::sharing), share one record; clones share
/// the [cut-off](Self::cut_off) switch, which makes every call fail as if this process lost Redis while
/// others keep it.
#[derive(Debug, Clone)]
pub struct RecordingStore {
    inner: Arc<dyn Store>,
    record: Arc<Mutex<Record>>,
    cut: Arc<AtomicBool>,
}

impl RecordingStore {
    /// Records the calls made on `inner`.
    pub fn new(inner: impl Store) -> Self {
        Self {
            inner: Arc::new(inner),
            record: Arc::default(),
            cut: Arc::default(),
        }
    }

    /// Records the calls made on `inner` into the record of `other` (several pools or relays, one record).
    pub fn sharing(inner: impl Store, other: &Self) -> Self {
        Self {
            inner: Arc::new(inner),
            record: Arc::clone(&other.record),
            cut: Arc::default(),
        }
    }

    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Cuts this store (and its clones) off from Redis, or reconnects it.
    pub fn cut_off(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.cut.load(Ordering::SeqCst) {
            Err(StoreError::Protocol("cut off from Redis (test)".into()))
        } else {
            Ok(())
        }
    }

    /// Every `invalidate` call so far, in order.
    pub fn calls(&self) -> Vec<Vec<String>> {
        self.record().calls.clone()
    }

    /// How many times each key was invalidated successfully.
    pub fn delivered(&self) -> BTreeMap<String, u32> {
        self.record().delivered.clone()
    }

    /// The `peek` and `lookup` calls so far.
    pub fn reads(&self) -> (usize, usize) {
        let record = self.record();
        (record.peeks, record.lookups)
    }
}

impl Store for RecordingStore {
    fn consumer(&self) -> String {
        self.inner.consumer()
    }

    fn invalidate<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        self.record().calls.push(keys.to_vec());
        Box::pin(async move {
            self.check()?;
            let sequence = self.inner.invalidate(keys).await?;
            let mut record = self.record();
            for key in keys {
                *record.delivered.entry(key.clone()).or_default() += 1;
            }
            Ok(sequence)
        })
    }

    fn sequence(&self, at_least: u64) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.sequence(at_least).await
        })
    }

    fn peek<'a>(
        &'a self,
        key: &'a str,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Peek, StoreError>> {
        self.record().peeks += 1;
        Box::pin(async move {
            self.check()?;
            self.inner.peek(key, tags).await
        })
    }

    fn lookup<'a>(
        &'a self,
        key: &'a str,
        lease: LeaseRequest<'a>,
        tags: &'a [String],
        tag_ttl: Duration,
    ) -> BoxFuture<'a, Result<Lookup, StoreError>> {
        self.record().lookups += 1;
        Box::pin(async move {
            self.check()?;
            self.inner.lookup(key, lease, tags, tag_ttl).await
        })
    }

    fn tags<'a>(
        &'a self,
        tags: &'a [String],
        create: Option<Duration>,
    ) -> BoxFuture<'a, Result<Vec<Option<TagToken>>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.tags(tags, create).await
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
            self.check()?;
            self.inner.fill(key, lease, value, ttl).await
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.release(key, lease).await
        })
    }
}
