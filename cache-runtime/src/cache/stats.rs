//! What a [`Cache`](super::Cache) counts: each event bumps the cache's own counter ([`Stats`]) and the
//! process-wide metric (see [`observe`](crate::observe)), in one place.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::observe;

/// Counters of one [`Cache`](super::Cache) since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Reads answered by a valid entry of the store.
    pub hits: u64,
    /// Reads that found no valid entry in the store (then loaded, or waited for another reader's lease).
    pub misses: u64,
    /// Reads answered by another read of this process in flight (single-flight).
    pub coalesced: u64,
    /// Loader calls.
    pub loads: u64,
    /// Loader calls that returned an error (never cached).
    pub load_errors: u64,
    /// Values stored after a load.
    pub fills: u64,
    /// Fills refused because the key was invalidated during the load (the stale-set race, defeated).
    pub fills_rejected: u64,
    /// Loaded values not stored because a tag known only after the load may have changed during it, or
    /// the value could not be encoded.
    pub fills_skipped: u64,
    /// Entries found invalid because a tag (or the namespace) they recorded was invalidated.
    pub stale: u64,
    /// Entries that could not be decoded; each was replaced.
    pub undecodable: u64,
    /// Reads that found another reader's lease and waited.
    pub lease_waits: u64,
    /// Waits that reached the deadline and loaded without storing.
    pub lease_timeouts: u64,
    /// Store operations that failed; the read fell through to the loader.
    pub store_errors: u64,
    /// Reads that skipped the store (circuit breaker open, the post-outage gate closed, or a
    /// [write token](crate::token) not known delivered within `token_wait`) and loaded without storing.
    pub bypassed: u64,
    /// Hits checked against the database by the consistency sampler (see [`Sampling`](super::Sampling)).
    pub samples: u64,
    /// Checked hits whose entry still differed from an unchanged row Δ after the first check.
    pub inconsistent: u64,
    /// Samples dropped: the queue was full, or a check's store or database read failed.
    pub samples_dropped: u64,
    /// Reads that returned a value seen valid within their bound instead of waiting or failing
    /// ([`LoadOptions::stale_while_revalidate`](super::LoadOptions::stale_while_revalidate),
    /// [`LoadOptions::stale_on_error`](super::LoadOptions::stale_on_error)).
    pub stale_served: u64,
}

/// Something a read did.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    Hit,
    Miss,
    Coalesced,
    Load,
    LoadError,
    Fill,
    FillRejected,
    FillSkipped,
    Stale,
    Undecodable,
    LeaseWait,
    LeaseTimeout,
    /// A store operation (`peek`, `lookup`, `tags`, `fill`, `invalidate`) failed.
    StoreError(&'static str),
    /// The read skipped the store (`gate`, `breaker` or `token`).
    Bypassed(&'static str),
    /// A sampled hit was checked.
    Sampled,
    /// A checked hit was inconsistent.
    Inconsistent,
    /// A sample was dropped.
    SampleDropped,
    /// A bounded stale value was returned (`revalidating`, `loader_error`).
    ServedStale(&'static str),
}

/// The counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters([AtomicU64; 18]);

/// The index of each counter (the order of [`Stats`]' fields).
mod slot {
    pub(super) const HITS: usize = 0;
    pub(super) const COALESCED: usize = 1;
    pub(super) const LOADS: usize = 2;
    pub(super) const LOAD_ERRORS: usize = 3;
    pub(super) const FILLS: usize = 4;
    pub(super) const FILLS_REJECTED: usize = 5;
    pub(super) const FILLS_SKIPPED: usize = 6;
    pub(super) const STALE: usize = 7;
    pub(super) const UNDECODABLE: usize = 8;
    pub(super) const LEASE_WAITS: usize = 9;
    pub(super) const LEASE_TIMEOUTS: usize = 10;
    pub(super) const STORE_ERRORS: usize = 11;
    pub(super) const BYPASSED: usize = 12;
    pub(super) const MISSES: usize = 13;
    pub(super) const SAMPLES: usize = 14;
    pub(super) const INCONSISTENT: usize = 15;
    pub(super) const SAMPLES_DROPPED: usize = 16;
    pub(super) const STALE_SERVED: usize = 17;
}

impl Counters {
    /// Counts `event` here and in the metrics.
    pub(crate) fn record(&self, event: Event) {
        let counter = match event {
            Event::Hit => {
                observe::hit();
                slot::HITS
            }
            Event::Miss => {
                observe::miss();
                slot::MISSES
            }
            Event::Coalesced => slot::COALESCED,
            Event::Load => {
                observe::load();
                slot::LOADS
            }
            Event::LoadError => slot::LOAD_ERRORS,
            Event::Fill => slot::FILLS,
            Event::FillRejected => {
                observe::fill_rejected();
                slot::FILLS_REJECTED
            }
            Event::FillSkipped => slot::FILLS_SKIPPED,
            Event::Stale => slot::STALE,
            Event::Undecodable => slot::UNDECODABLE,
            Event::LeaseWait => {
                observe::lease_wait();
                slot::LEASE_WAITS
            }
            Event::LeaseTimeout => slot::LEASE_TIMEOUTS,
            Event::StoreError(op) => {
                observe::store_error(op);
                slot::STORE_ERRORS
            }
            Event::Bypassed(reason) => {
                observe::bypassed(reason);
                slot::BYPASSED
            }
            Event::Sampled => {
                observe::consistency_sample();
                slot::SAMPLES
            }
            Event::Inconsistent => {
                observe::consistency_inconsistent();
                slot::INCONSISTENT
            }
            Event::SampleDropped => {
                observe::consistency_dropped();
                slot::SAMPLES_DROPPED
            }
            Event::ServedStale(reason) => {
                observe::stale_served(reason);
                slot::STALE_SERVED
            }
        };
        self.0[counter].fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub(crate) fn snapshot(&self) -> Stats {
        let get = |i: usize| self.0[i].load(Ordering::Relaxed);
        Stats {
            hits: get(slot::HITS),
            misses: get(slot::MISSES),
            coalesced: get(slot::COALESCED),
            loads: get(slot::LOADS),
            load_errors: get(slot::LOAD_ERRORS),
            fills: get(slot::FILLS),
            fills_rejected: get(slot::FILLS_REJECTED),
            fills_skipped: get(slot::FILLS_SKIPPED),
            stale: get(slot::STALE),
            undecodable: get(slot::UNDECODABLE),
            lease_waits: get(slot::LEASE_WAITS),
            lease_timeouts: get(slot::LEASE_TIMEOUTS),
            store_errors: get(slot::STORE_ERRORS),
            bypassed: get(slot::BYPASSED),
            samples: get(slot::SAMPLES),
            inconsistent: get(slot::INCONSISTENT),
            samples_dropped: get(slot::SAMPLES_DROPPED),
            stale_served: get(slot::STALE_SERVED),
        }
    }
}
