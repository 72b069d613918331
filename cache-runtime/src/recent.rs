//! Keys this process invalidated recently (its writes, its relay, `Cache::invalidate`): a read of one of
//! them is likely a miss, so it skips the read-only peek and goes straight to the lease, one store round
//! trip fewer (a miss then costs what a naive `GET`, `SELECT`, `SET` costs). A hint only: a key found here
//! that was filled meanwhile is read by the lease request, which returns the value.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::registry::fnv1a64;
use crate::store::is_shape;

/// Keys remembered at most; past it the set starts over (a lost hint only costs the peek).
const CAPACITY: usize = 4096;

/// Invalidations larger than this are not remembered (a bulk statement's keys are rarely all read soon,
/// and remembering them would cost more than the round trips it saves).
const LARGEST: usize = 64;

/// The recently invalidated keys, by hash; `any` lets a read skip the lock while none is remembered (the
/// hit path of a process that does not write).
#[derive(Debug, Default)]
pub(crate) struct Recent {
    keys: Mutex<HashSet<u64>>,
    any: AtomicBool,
}

impl Recent {
    /// Remembers `keys` (shapes are not keys; large sets are skipped).
    pub(crate) fn note(&self, keys: &[String]) {
        if keys.len() > LARGEST {
            return;
        }
        let Ok(mut set) = self.keys.lock() else {
            return;
        };
        if set.len() + keys.len() > CAPACITY {
            set.clear();
        }
        set.extend(
            keys.iter()
                .filter(|k| !is_shape(k))
                .map(|k| fnv1a64(k.as_bytes())),
        );
        self.any.store(!set.is_empty(), Ordering::Release);
    }

    /// Whether `key` was invalidated recently; forgets it.
    pub(crate) fn take(&self, key: &str) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let Ok(mut set) = self.keys.lock() else {
            return false;
        };
        let taken = set.remove(&fnv1a64(key.as_bytes()));
        self.any.store(!set.is_empty(), Ordering::Release);
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_small_invalidations_once() {
        let recent = Recent::default();
        recent.note(&["product:1".to_owned(), "product:<>".to_owned()]);
        assert!(recent.take("product:1"));
        assert!(!recent.take("product:1"), "taken once");
        assert!(!recent.take("product:<>"), "shapes are not keys");
        let bulk: Vec<String> = (0..100).map(|i| format!("product:{i}")).collect();
        recent.note(&bulk);
        assert!(
            !recent.take("product:5"),
            "bulk invalidations are not remembered"
        );
    }
}
