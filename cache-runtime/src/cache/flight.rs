//! Single-flight: concurrent reads of one key in one process share one store lookup and one load.
//!
//! # Who may share a result
//!
//! A read may only return a value that is at least as new as every write that had returned before the
//! read began. A flight's leader reads the store (or runs the loader) at some instant, its *linearization
//! point*; a reader that joins before that point may share the result, one that arrives after it may not
//! (a write may have committed and invalidated in between). So a flight is open for joining until its
//! leader passes the point; a reader that finds the newest flight past its point starts the next flight,
//! which waits for the previous one to end (its value is then in the store) before it reads. A burst of
//! concurrent misses thus costs one load and at most two store round trips.
//!
//! Errors carry no staleness: a flight that starts after a failed one, having waited for it, ends with the
//! same error instead of loading again, so every reader that waited on a failing load gets its error.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

/// What a flight ends with, as its followers see it.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// The value, encoded with the cache's codec (followers decode their own copy).
    Value(Arc<[u8]>),
    /// The loader's error: an `Arc<E>` behind `Any`.
    Error(Arc<dyn Any + Send + Sync>),
    /// Nothing followers can use (the value could not be encoded): they read again.
    Unshared,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Value(v) => write!(f, "Value({} bytes)", v.len()),
            Self::Error(_) => f.write_str("Error"),
            Self::Unshared => f.write_str("Unshared"),
        }
    }
}

type Done = watch::Receiver<Option<Outcome>>;

#[derive(Debug)]
struct State {
    /// Whether the leader passed its linearization point; read and written under the group's lock.
    passed: std::sync::atomic::AtomicBool,
    done: Done,
}

/// The flights of one cache, by key.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, Arc<State>>>,
}

/// The role of a reader in a flight.
pub(crate) enum Join<'a> {
    /// Lead: read the store / load, then [`Leader::complete`]. `after` is the previous flight, which must
    /// end before this one reads.
    Leader(Leader<'a>, Option<Done>),
    /// Wait for the leader's outcome.
    Follower(Done),
}

/// The leader of a flight; dropping it without [`complete`](Self::complete) abandons the flight (its
/// followers then read again).
#[derive(Debug)]
pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    state: Arc<State>,
    tx: Option<watch::Sender<Option<Outcome>>>,
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<State>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `key` has a flight (open or passed): a reader then joins it rather than reading alone.
    pub(crate) fn busy(&self, key: &str) -> bool {
        self.lock().contains_key(key)
    }

    /// Joins the open flight of `key`, or starts one.
    pub(crate) fn join(&self, key: &str) -> Join<'_> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut map = self.lock();
        let after = match map.get(key) {
            Some(state) if !state.passed.load(Relaxed) => {
                return Join::Follower(state.done.clone());
            }
            Some(state) => Some(state.done.clone()),
            None => None,
        };
        let (tx, done) = watch::channel(None);
        let state = Arc::new(State {
            passed: false.into(),
            done,
        });
        map.insert(key.to_owned(), Arc::clone(&state));
        Join::Leader(
            Leader {
                flights: self,
                key: key.to_owned(),
                state,
                tx: Some(tx),
            },
            after,
        )
    }
}

impl Leader<'_> {
    /// Closes the flight to new followers: call right before reading the store or running the loader.
    pub(crate) fn pass(&self) {
        let _map = self.flights.lock();
        self.state
            .passed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Ends the flight with `outcome`.
    pub(crate) fn complete(mut self, outcome: Outcome) {
        self.remove();
        if let Some(tx) = self.tx.take() {
            // No receiver left is fine: nobody was waiting.
            let _ = tx.send(Some(outcome));
        }
    }

    fn remove(&self) {
        let mut map = self.flights.lock();
        if map
            .get(&self.key)
            .is_some_and(|s| Arc::ptr_eq(s, &self.state))
        {
            map.remove(&self.key);
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if self.tx.is_some() {
            // Abandoned (the leader's future was dropped): followers see the channel close and read again.
            self.remove();
        }
    }
}

/// Waits until the flight behind `done` ends; `None` when its leader abandoned it.
pub(crate) async fn wait(mut done: Done) -> Option<Outcome> {
    match done.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone(),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_join_until_the_leader_passes() {
        let flights = Flights::default();
        let Join::Leader(leader, None) = flights.join("k") else {
            panic!("first reader leads")
        };
        let Join::Follower(early) = flights.join("k") else {
            panic!("joins before the point")
        };
        leader.pass();
        let Join::Leader(next, Some(after)) = flights.join("k") else {
            panic!("a late reader leads the next flight")
        };
        let Join::Follower(_) = flights.join("k") else {
            panic!("joins the next flight")
        };
        leader.complete(Outcome::Unshared);
        assert!(matches!(wait(early).await, Some(Outcome::Unshared)));
        assert!(matches!(wait(after).await, Some(Outcome::Unshared)));
        drop(next);
        assert!(flights.lock().is_empty(), "abandoned flights are removed");
    }
}
