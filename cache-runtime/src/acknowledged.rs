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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::store::StoreError;

/// The floor of one store, as one process knows it.
#[derive(Debug, Default)]
pub(crate) struct Acknowledged {
    floor: AtomicU64,
    forgot: AtomicBool,
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
            self.forgot.store(true, Ordering::Release);
            return Err(StoreError::Forgot {
                seen,
                acknowledged: self.floor(),
            });
        }
        self.raise(seen);
        Ok(())
    }

    /// Whether a call found the store forgetful since it was last taken; clears it.
    pub(crate) fn take_forgot(&self) -> bool {
        self.forgot.swap(false, Ordering::AcqRel)
    }

    /// Marks the store as forgetful again (a recovery that took the mark failed).
    pub(crate) fn mark_forgot(&self) {
        self.forgot.store(true, Ordering::Release);
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
        assert!(ack.take_forgot());
        assert!(!ack.take_forgot());
    }
}
