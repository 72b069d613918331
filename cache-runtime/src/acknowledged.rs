//! Detecting a store that forgot invalidations it acknowledged (a Redis server restarted from an older
//! snapshot, a replica promoted before it received the last deletes).
//!
//! A store that can forget keeps a [sequence](crate::Store::sequence): every invalidation raises it, and
//! every read returns it. A process keeps the **floor**: the highest sequence it knows the store reached
//! (answers of its own invalidations and reads, and the sequence the database recorded with the outbox
//! rows whose delivery it deleted). An answer below the floor current when its call was sent means the
//! dataset went back: the call fails as a store failure (so a pool's read gate closes), and the pool's
//! recovery drops every namespace of the registry and raises the store's sequence to the floor, in one
//! round trip, before reads use the store again (see [`health`](crate::health)).
//!
//! A process that has not seen the lost invalidations (started after them, or idle) learns the floor from
//! the database: at connect and once a second.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::StoreError;

/// The floor of one store, as one process knows it.
#[derive(Debug)]
pub(crate) struct Acknowledged {
    floor: AtomicU64,
    /// The lowest sequence the store may have gone back to, as calls that found it forgetful saw it
    /// (`u64::MAX`: none since it was last taken).
    forgot_at: AtomicU64,
}

impl Default for Acknowledged {
    fn default() -> Self {
        Self {
            floor: AtomicU64::new(0),
            forgot_at: AtomicU64::new(u64::MAX),
        }
    }
}

impl Acknowledged {
    /// The floor now: read before a call whose answer is then [`observe`](Self::observe)d.
    pub(crate) fn floor(&self) -> u64 {
        self.floor.load(Ordering::Acquire)
    }

    /// Raises the floor to `sequence` (a sequence the store is known to have reached).
    pub(crate) fn raise(&self, sequence: u64) {
        self.floor.fetch_max(sequence, Ordering::AcqRel);
    }

    /// Checks the sequence `seen` of an answer to a call sent while the floor was `floor`: it must be at
    /// least `floor` (`floor + 1` after an invalidation, which raised it).
    ///
    /// # Errors
    ///
    /// [`StoreError::Forgot`] when it is lower: the store forgot acknowledged invalidations.
    pub(crate) fn observe(&self, floor: u64, seen: Option<u64>) -> Result<(), StoreError> {
        let Some(seen) = seen else {
            return Ok(());
        };
        if seen < floor {
            // An invalidation's answer is its own raise: the dataset went back to `seen - 1` or lower
            // (a read's, to `seen`: one delivery more is replayed, harmlessly).
            self.mark_forgot(seen.saturating_sub(1));
            return Err(StoreError::Forgot {
                seen,
                acknowledged: self.floor(),
            });
        }
        self.raise(seen);
        Ok(())
    }

    /// The lowest sequence the store may have gone back to, if a call found it forgetful since this was
    /// last taken; clears it. A repair replays from there: the sequence read when repairing may already
    /// include invalidations sent since the store went back.
    pub(crate) fn take_forgot(&self) -> Option<u64> {
        let at = self.forgot_at.swap(u64::MAX, Ordering::AcqRel);
        (at != u64::MAX).then_some(at)
    }

    /// Marks the store as forgetful, having gone back to `at` or lower (also: a recovery that took the
    /// mark failed).
    pub(crate) fn mark_forgot(&self, at: u64) {
        self.forgot_at.fetch_min(at, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_below_the_floor_of_its_call_is_forgetting() {
        let ack = Acknowledged::default();
        assert!(
            ack.observe(ack.floor(), None).is_ok(),
            "stores that never forget"
        );
        assert!(ack.observe(ack.floor(), Some(5)).is_ok());
        assert_eq!(ack.floor(), 5);
        // An answer sent before a higher one was seen is not forgetting.
        ack.raise(9);
        assert!(ack.observe(5, Some(7)).is_ok());
        assert_eq!(ack.floor(), 9, "the floor never goes down");
        assert!(matches!(
            ack.observe(ack.floor(), Some(3)),
            Err(StoreError::Forgot {
                seen: 3,
                acknowledged: 9
            })
        ));
        assert_eq!(
            ack.take_forgot(),
            Some(2),
            "an invalidation's answer is its own raise"
        );
        assert_eq!(ack.take_forgot(), None);
        ack.mark_forgot(6);
        ack.mark_forgot(4);
        assert_eq!(ack.take_forgot(), Some(4), "the lowest");
    }
}
