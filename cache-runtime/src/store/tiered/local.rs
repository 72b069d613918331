//! The in-process tier: a bounded moka map of value slots and tag tokens, with the counters that keep a
//! read of Redis from putting back a slot an invalidation removed while the read was in flight.
//!
//! Every removal first raises the counter of the slot's stripe (and a flush raises the epoch); a slot
//! read from Redis is put in only if its stripe's counter and the epoch are still those read before the
//! Redis call was sent, checked again after the insert (so an invalidation racing the insert removes it
//! either way).

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use moka::sync::Cache as Moka;

use crate::store::{Peek, TagToken, is_shape, tag_slot};

/// Stripes of removal counters (a power of two).
const STRIPES: usize = 4096;

/// What the tier holds under a slot name.
#[derive(Debug, Clone)]
pub(super) enum Held {
    /// An entry (the value slot of a key).
    Value(Arc<[u8]>),
    /// A tag token.
    Tag(TagToken),
}

/// The counters seen before a Redis call, for the slots its answer may put in.
#[derive(Debug)]
pub(super) struct Stamp {
    epoch: u64,
    stripes: Vec<(usize, u64)>,
}

/// Counts of what the tier did, since it was built.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub(super) hits: AtomicU64,
    pub(super) flushes: AtomicU64,
    pub(super) applied: AtomicU64,
}

/// The in-process tier.
pub(super) struct Local {
    slots: Moka<String, Held>,
    stripes: Box<[AtomicU64]>,
    hasher: BuildHasherDefault<DefaultHasher>,
    epoch: AtomicU64,
    /// Subscribed to the invalidation channel.
    up: AtomicBool,
    /// The send time (µs since `clock`) of the latest heartbeat of this instance received back: every
    /// invalidation published before it was sent has been applied.
    confirmed: AtomicU64,
    clock: Instant,
    max_lag: Duration,
    /// This instance's id in heartbeats.
    pub(super) id: String,
    pub(super) counts: Counts,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("slots", &self.slots.entry_count())
            .field("usable", &self.usable())
            .finish_non_exhaustive()
    }
}

impl Local {
    pub(super) fn new(capacity: u64, ttl: Duration, max_lag: Duration) -> Self {
        Self {
            slots: Moka::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: BuildHasherDefault::default(),
            epoch: AtomicU64::new(0),
            up: AtomicBool::new(false),
            confirmed: AtomicU64::new(0),
            clock: Instant::now(),
            max_lag,
            id: crate::store::nonce(),
            counts: Counts::default(),
        }
    }

    fn stripe(&self, slot: &str) -> usize {
        // Truncation is the point: the low bits pick the stripe.
        (self.hasher.hash_one(slot) as usize) & (STRIPES - 1)
    }

    /// Microseconds since the tier was built (never 0).
    pub(super) fn now(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_micros()).unwrap_or(u64::MAX) + 1
    }

    /// Whether the tier may serve and take slots: subscribed, and a heartbeat sent at most `max_lag` ago
    /// came back (so no invalidation acknowledged more than `max_lag` ago is still on its way).
    pub(super) fn usable(&self) -> bool {
        let confirmed = self.confirmed.load(SeqCst);
        self.up.load(SeqCst)
            && confirmed != 0
            && self.now().saturating_sub(confirmed) <= self.max_lag.as_micros() as u64
    }

    /// A heartbeat of this instance, sent at `sent` (µs), came back.
    pub(super) fn confirm(&self, sent: u64) {
        self.confirmed.fetch_max(sent, SeqCst);
    }

    /// The subscription is (re-)established: what was published meanwhile is unknown, so forget all.
    pub(super) fn connected(&self) {
        self.flush();
        self.up.store(true, SeqCst);
    }

    /// The subscription dropped: stop serving and forget all until it is back and confirmed.
    pub(super) fn disconnected(&self) {
        self.up.store(false, SeqCst);
        self.confirmed.store(0, SeqCst);
        self.flush();
    }

    /// Forgets every slot, and refuses the answers of Redis calls in flight.
    pub(super) fn flush(&self) {
        self.epoch.fetch_add(1, SeqCst);
        self.slots.invalidate_all();
        self.counts.flushes.fetch_add(1, SeqCst);
    }

    /// Removes one slot (counter first: see the module docs).
    fn forget(&self, slot: &str) {
        self.stripes[self.stripe(slot)].fetch_add(1, SeqCst);
        self.slots.invalidate(slot);
    }

    /// Removes the value slot of a key from the tier (before a lease replaces it in Redis).
    pub(super) fn forget_value(&self, key: &str) {
        self.forget(key);
    }

    /// Applies an invalidation of `keys` (rendered keys or shapes): value slots and tag tokens.
    pub(super) fn apply<S: AsRef<str>>(&self, keys: &[S]) {
        for key in keys {
            let key = key.as_ref();
            if !is_shape(key) {
                self.forget(key);
            }
            self.forget(&tag_slot(key));
        }
        self.counts.applied.fetch_add(keys.len() as u64, SeqCst);
    }

    /// The counters of `slots`, before a Redis call whose answer may put them in.
    pub(super) fn stamp<S: AsRef<str>>(&self, slots: &[S]) -> Stamp {
        let epoch = self.epoch.load(SeqCst);
        let stripes = slots
            .iter()
            .map(|s| {
                let i = self.stripe(s.as_ref());
                (i, self.stripes[i].load(SeqCst))
            })
            .collect();
        Stamp { epoch, stripes }
    }

    fn unchanged(&self, stamp: &Stamp) -> bool {
        stamp
            .stripes
            .iter()
            .all(|(i, seen)| self.stripes[*i].load(SeqCst) == *seen)
            && self.epoch.load(SeqCst) == stamp.epoch
    }

    /// Puts in `entries` (read under `stamp`) unless a removal or flush happened since the stamp.
    pub(super) fn store_if(&self, stamp: &Stamp, entries: Vec<(String, Held)>) {
        if !self.usable() || !self.unchanged(stamp) {
            return;
        }
        let names: Vec<String> = entries.iter().map(|(n, _)| n.clone()).collect();
        for (name, held) in entries {
            self.slots.insert(name, held);
        }
        if !self.unchanged(stamp) {
            for name in &names {
                self.slots.invalidate(name);
            }
        }
    }

    /// Whether an entry of `key` is held.
    pub(super) fn holds(&self, key: &str) -> bool {
        matches!(self.slots.get(key), Some(Held::Value(_)))
    }

    /// The tag token of `tag`, if held.
    pub(super) fn tag(&self, tag: &str) -> Option<TagToken> {
        match self.slots.get(&tag_slot(tag)) {
            Some(Held::Tag(token)) => Some(token),
            _ => None,
        }
    }

    /// A peek answered by the tier alone: the entry of `key` and every tag token, or `None`.
    pub(super) fn peek(&self, key: &str, tags: &[String]) -> Option<Peek> {
        let Some(Held::Value(value)) = self.slots.get(key) else {
            return None;
        };
        let tags = tags
            .iter()
            .map(|t| self.tag(t).map(Some))
            .collect::<Option<Vec<_>>>()?;
        self.counts.hits.fetch_add(1, SeqCst);
        Some(Peek {
            value: Some(value.to_vec()),
            tags,
            // Served from memory: never older than an invalidation this process applied.
            sequence: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving() -> Local {
        let local = Local::new(100, Duration::from_secs(60), Duration::from_secs(60));
        local.connected();
        local.confirm(local.now());
        assert!(local.usable());
        local
    }

    fn value(key: &str) -> Vec<(String, Held)> {
        vec![(key.to_owned(), Held::Value(Arc::from(&b"v"[..])))]
    }

    #[test]
    fn an_answer_read_before_an_invalidation_is_not_put_in() {
        let local = serving();
        let stamp = local.stamp(&["k"]);
        local.apply(&["k"]);
        local.store_if(&stamp, value("k"));
        assert!(
            !local.holds("k"),
            "the invalidation came after the read was sent"
        );
        let stamp = local.stamp(&["k"]);
        local.store_if(&stamp, value("k"));
        assert!(local.holds("k"), "a read sent after it is put in");
        local.apply(&["k"]);
        assert!(!local.holds("k"), "and removed by the next invalidation");
    }

    #[test]
    fn a_flush_refuses_answers_in_flight_and_a_lost_link_stops_the_tier() {
        let local = serving();
        let stamp = local.stamp(&["k"]);
        local.flush();
        local.store_if(&stamp, value("k"));
        assert!(!local.holds("k"));
        local.disconnected();
        assert!(!local.usable());
        let stamp = local.stamp(&["k"]);
        local.store_if(&stamp, value("k"));
        assert!(
            !local.holds("k"),
            "nothing is put in while the link is down"
        );
        local.connected();
        assert!(
            !local.usable(),
            "serving needs a heartbeat through the new link"
        );
        local.confirm(local.now());
        assert!(local.usable());
    }
}
