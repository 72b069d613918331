//! Refresh instead of delete: hot keys of entities with `#[cached_entity(refresh = "…")]` are reloaded
//! after a write rather than left empty, so that readers of a frequently read, sometimes written key do not
//! miss.
//!
//! # What is refreshed, and when
//!
//! A key read through [`CachedPool::get`](crate::CachedPool::get) is *hot* for the entity's `refresh`
//! window after each read (at most 10,000 hot keys per pool; more are simply deleted on write). When this
//! process invalidates a hot key in its store (after its own commits, and for the writes its relay
//! delivers), it starts a background read of the key, which takes the lease, loads the row on a snapshot
//! taken after the lease (as a miss does) and stores it. At most 32 refreshes run at once; a refresh that
//! finds no free slot is skipped (the key is then just deleted, as without `refresh`), counted in
//! `cache_refreshes_total{outcome="skipped"}`.
//!
//! # Ordering
//!
//! A refresh is an ordinary read under the lease protocol, so it needs no ordering of its own: its fill is
//! stored only if its lease is still in the key's slot, and every later invalidation deletes the slot,
//! lease included. A refresh whose load read an older snapshot than a newer write's invalidation therefore
//! fails its fill (the newer write's own refresh stores the newer row); concurrent refreshes of one key share
//! one load in this process and wait for each other's lease across processes.
//!
//! The invalidation itself still happens first: between it and the refresh's fill, readers miss (or, with
//! [`LoadOptions::stale_while_revalidate`](crate::LoadOptions::stale_while_revalidate), may return the
//! value they last saw, within its bound). Refresh never serves a stale value by itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_core::future::BoxFuture;
use tokio::sync::Semaphore;

use crate::observe;

/// Reloads one hot key (a background read through the cache).
pub(crate) type Reload = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// The most hot keys a pool tracks.
const MAX_HOT: usize = 10_000;

/// The most refreshes running at once.
const MAX_RUNNING: usize = 32;

/// A hot key: when it was last read, for how long a read keeps it hot, and how to reload it.
struct Hot {
    read: Instant,
    window: Duration,
    reload: Reload,
}

/// The hot keys of a pool and the refreshes they start.
pub(crate) struct Refresher {
    hot: Mutex<HashMap<String, Hot>>,
    /// Whether any key was ever made hot (invalidations skip the lock otherwise).
    any: AtomicBool,
    running: Arc<Semaphore>,
}

impl Default for Refresher {
    fn default() -> Self {
        Self {
            hot: Mutex::new(HashMap::new()),
            any: AtomicBool::new(false),
            running: Arc::new(Semaphore::new(MAX_RUNNING)),
        }
    }
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hot = self.hot.lock().map(|h| h.len()).unwrap_or(0);
        f.debug_struct("Refresher").field("hot", &hot).finish()
    }
}

impl Refresher {
    /// Records a read of `key`, hot for `window`; `reload` makes its reload when the key is not tracked yet
    /// (`None`: it cannot be reloaded).
    pub(crate) fn read(
        &self,
        key: &str,
        window: Duration,
        reload: impl FnOnce() -> Option<Reload>,
    ) {
        let Ok(mut hot) = self.hot.lock() else {
            return;
        };
        let now = Instant::now();
        if let Some(entry) = hot.get_mut(key) {
            entry.read = now;
            return;
        }
        if hot.len() >= MAX_HOT {
            hot.retain(|_, h| now.duration_since(h.read) < h.window);
            if hot.len() >= MAX_HOT {
                return;
            }
        }
        if let Some(reload) = reload() {
            hot.insert(
                key.to_owned(),
                Hot {
                    read: now,
                    window,
                    reload,
                },
            );
            self.any.store(true, Ordering::Release);
        }
    }

    /// After `keys` were invalidated in the store: starts the refresh of each hot one.
    pub(crate) fn invalidated(&self, keys: &[String]) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let reloads: Vec<Reload> = {
            let Ok(hot) = self.hot.lock() else {
                return;
            };
            let now = Instant::now();
            keys.iter()
                .filter_map(|k| hot.get(k))
                .filter(|h| now.duration_since(h.read) < h.window)
                .map(|h| Arc::clone(&h.reload))
                .collect()
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for reload in reloads {
            let Ok(permit) = Arc::clone(&self.running).try_acquire_owned() else {
                observe::refresh("skipped");
                continue;
            };
            observe::refresh("started");
            runtime.spawn(async move {
                reload().await;
                drop(permit);
            });
        }
    }
}
