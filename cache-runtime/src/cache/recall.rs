//! The values a process last saw valid, for the explicit, bounded stale options
//! ([`LoadOptions::stale_while_revalidate`], [`LoadOptions::stale_on_error`]): kept only for reads that
//! ask for one of them, at most 10,000 keys per cache (least recently used out first).

use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::stats::Event;
use super::{Cache, LoadOptions, codec};

/// The most keys a cache remembers values of.
const CAPACITY: u64 = 10_000;

/// The values a cache last saw valid, by key.
pub(super) struct Recall(moka::sync::Cache<String, Seen>);

impl Default for Recall {
    fn default() -> Self {
        Self(moka::sync::Cache::new(CAPACITY))
    }
}

impl std::fmt::Debug for Recall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recall")
            .field("keys", &self.0.entry_count())
            .finish()
    }
}

/// A value as last seen valid: its encoding, and when.
#[derive(Clone)]
pub(super) struct Seen {
    payload: std::sync::Arc<[u8]>,
    at: Instant,
}

impl LoadOptions {
    /// Whether the read needs the value it returns remembered.
    pub(super) fn recalls(&self) -> bool {
        self.stale_while_revalidate.is_some() || self.stale_on_error.is_some()
    }
}

impl Cache {
    /// Remembers `value`, returned valid now by a read of `key`.
    pub(super) fn remember<V: Serialize>(&self, key: String, value: &V) {
        if let Ok(payload) = codec::encode(value) {
            let seen = Seen {
                payload: payload.into(),
                at: Instant::now(),
            };
            self.inner.recall.0.insert(key, seen);
        }
    }

    /// The value of `key` this process saw valid at most `bound` ago, counted as served stale for
    /// `reason`.
    pub(super) fn recall<V: DeserializeOwned>(
        &self,
        key: &str,
        bound: Duration,
        reason: &'static str,
    ) -> Option<V> {
        let seen = self.inner.recall.0.get(key)?;
        if seen.at.elapsed() > bound {
            return None;
        }
        let value = codec::decode(&seen.payload).ok()?;
        self.inner.stats.record(Event::ServedStale(reason));
        Some(value)
    }
}
