//! The counter `/stats` shows that [`Cache::stats`](cache_runtime::Cache::stats) does not have: the keys
//! the pool and its relay invalidated. The library records them through the [`metrics`] facade
//! (`cache_invalidations_sent_total` with the default prefix, see `cache_runtime::observe`); this recorder keeps just that one
//! (summed over its labels) and ignores every other series.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Invalidated keys of this process so far.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counters {
    invalidations: Arc<AtomicU64>,
}

impl Counters {
    /// Installs these counters as the process's metrics recorder.
    ///
    /// # Errors
    ///
    /// When a recorder is already installed.
    pub(crate) fn install(&self) -> Result<(), String> {
        metrics::set_global_recorder(self.clone())
            .map_err(|_| "a metrics recorder is already installed".to_owned())
    }

    /// Keys invalidated in the store: after a commit through the pool, or by the relay.
    pub(crate) fn invalidations(&self) -> u64 {
        self.invalidations.load(Ordering::Relaxed)
    }
}

impl Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let sent = format!(
            "{}_invalidations_sent_total",
            cache_runtime::observe::prefix()
        );
        if key.name() == sent {
            Counter::from_arc(self.invalidations.clone())
        } else {
            Counter::noop()
        }
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}
