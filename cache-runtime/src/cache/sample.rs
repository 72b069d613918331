//! The live consistency SLI: a sampled fraction of cache hits is checked against the database after a
//! delay Δ, off the request path.
//!
//! # What a sample measures
//!
//! A hit of a read that can reload its value from the database by itself (the entity-first
//! [`CachedPool::get`](crate::CachedPool::get)) is drawn with probability [`Sampling::fraction`]. Δ
//! ([`Sampling::delay`]) later, a background task reads the key's current entry from the store (without
//! counting it as a read) and the row from the primary, and compares their encoded bytes. Equal, or no
//! valid entry any more (invalidated or expired): consistent. Different: it waits Δ again and reads both
//! once more; when the store still holds the same entry and the row did not change, the sample is
//! **inconsistent**: the cache disagreed with an unchanged row for at least Δ after the hit. (A write
//! whose invalidation is in flight during the first check changes the row or removes the entry by the
//! second, so it is not counted.) A sample whose store or database read fails counts as dropped.
//!
//! # Bounded load
//!
//! Samples wait in a queue of at most [`Sampling::queue`] (a full queue drops the sample: counted, never
//! growing), and at most [`Sampling::concurrency`] checks run at once, each costing two store peeks and
//! two primary-key queries at most.
//!
//! # Metrics
//!
//! `cache_consistency_samples_total`, `cache_consistency_inconsistent_total`,
//! `cache_consistency_dropped_total` (counters) and `cache_consistency_delay_seconds` (gauge: Δ); see
//! [`observe`] for the PromQL of "N nines within Δ".

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_core::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use super::stats::Event;
use super::{Cache, Inner};
use crate::key::Key;
use crate::observe;

/// The settings of the consistency sampler (see the [module docs](self)).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use cache_runtime::cache::Sampling;
///
/// // 1% of hits, checked 2 s after the hit.
/// let sampling = Sampling::new(0.01).delay(Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    fraction: f64,
    delay: Duration,
    queue: usize,
    concurrency: usize,
}

impl Sampling {
    /// Samples `fraction` of the hits (clamped to 0..=1), Δ = 1 s, queue 1,024, 4 checks at once.
    pub fn new(fraction: f64) -> Self {
        Self {
            fraction: fraction.clamp(0.0, 1.0),
            delay: Duration::from_secs(1),
            queue: 1_024,
            concurrency: 4,
        }
    }

    /// Δ: how long after the hit the entry is compared with the database (default 1 s). Choose it above
    /// the invalidation lag you promise (the relay's p99 for foreign writes).
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The most samples waiting for their check (default 1,024; at least 1); more are dropped.
    #[must_use]
    pub fn queue(mut self, samples: usize) -> Self {
        self.queue = samples.max(1);
        self
    }

    /// The most checks running at once (default 4; at least 1).
    #[must_use]
    pub fn concurrency(mut self, checks: usize) -> Self {
        self.concurrency = checks.max(1);
        self
    }

    /// The fraction of hits sampled.
    pub fn fraction(&self) -> f64 {
        self.fraction
    }
}

/// Reads the sampled key's value from the database, encoded as the cache encodes it.
pub(crate) type Reload =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Vec<u8>, sqlx::error::BoxDynError>> + Send + Sync>;

/// A reload given with [`LoadOptions`](super::LoadOptions) (Debug for the options).
#[derive(Clone)]
pub(crate) struct SampleReload(pub(crate) Reload);

impl std::fmt::Debug for SampleReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SampleReload")
    }
}

/// One drawn hit, waiting for its check.
struct Sample {
    key: Key,
    due: Instant,
    reload: Reload,
}

/// The sampler of a cache: the queue to its background task.
#[derive(Debug)]
pub(crate) struct Sampler {
    pub(crate) config: Sampling,
    queue: mpsc::Sender<Sample>,
}

impl Sampler {
    /// The sampler of the cache `inner` (weak: the task ends with the cache); `None` outside a tokio
    /// runtime (sampling is then off, with a warning).
    pub(super) fn start(config: Sampling, inner: Weak<Inner>) -> Option<Self> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "consistency sampling needs a tokio runtime when the cache is built; it is off"
            );
            return None;
        };
        let (queue, receiver) = mpsc::channel(config.queue);
        runtime.spawn(run(inner, receiver, config));
        observe::consistency_sampler(config.delay.as_secs_f64());
        Some(Self { config, queue })
    }
}

/// Checks the samples in the order they are due, at most `concurrency` at once, until the cache is gone.
async fn run(inner: Weak<Inner>, mut queue: mpsc::Receiver<Sample>, config: Sampling) {
    let checks = Arc::new(Semaphore::new(config.concurrency));
    while let Some(sample) = queue.recv().await {
        tokio::time::sleep_until(sample.due).await;
        let Ok(permit) = Arc::clone(&checks).acquire_owned().await else {
            return;
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let cache = Cache { inner };
        tokio::spawn(async move {
            cache.check_sample(&sample, config.delay).await;
            drop(permit);
        });
    }
}

impl Cache {
    /// Whether to sample this hit: a draw with the sampler's fraction (`false` without a sampler).
    pub(crate) fn draw_sample(&self) -> bool {
        self.inner
            .sampler
            .as_ref()
            .is_some_and(|s| fastrand::f64() < s.config.fraction)
    }

    /// Queues a hit of `key` for its check Δ from now (dropped when the queue is full).
    pub(super) fn submit_sample(&self, key: &Key, reload: &SampleReload) {
        let Some(sampler) = &self.inner.sampler else {
            return;
        };
        let sample = Sample {
            key: key.clone(),
            due: Instant::now() + sampler.config.delay,
            reload: Arc::clone(&reload.0),
        };
        if sampler.queue.try_send(sample).is_err() {
            self.inner.stats.record(Event::SampleDropped);
        }
    }

    /// Checks one sample (see the module docs) and counts its outcome.
    async fn check_sample(&self, sample: &Sample, delay: Duration) {
        let verdict = async {
            let Some(cached) = self.current(&sample.key).await? else {
                return Ok(true);
            };
            let row = (sample.reload)().await.map_err(drop)?;
            if *cached == *row {
                return Ok(true);
            }
            tokio::time::sleep(delay).await;
            let again = self.current(&sample.key).await?;
            let row_again = (sample.reload)().await.map_err(drop)?;
            Ok::<_, ()>(!(again.as_deref() == Some(&*cached) && row_again == row))
        };
        match verdict.await {
            Ok(true) => self.inner.stats.record(Event::Sampled),
            Ok(false) => {
                self.inner.stats.record(Event::Sampled);
                self.inner.stats.record(Event::Inconsistent);
                tracing::warn!(
                    key = %sample.key,
                    delay_ms = delay.as_millis() as u64,
                    "cache entry differs from the database row for longer than the sampling delay: a write \
                     path outside capture (disabled triggers, an unregistered table, a hand-written store \
                     entry)?"
                );
            }
            Err(()) => self.inner.stats.record(Event::SampleDropped),
        }
    }
}
