//! Loads that may read uncommitted data.
//!
//! Every loader runs in a *load scope* (a tokio task-local). A statement that a loader runs through a
//! [`CachedTransaction`](crate::CachedTransaction) which may hold uncommitted writes marks the load: the value
//! may never be committed (the transaction can still roll back), so it is returned to its caller but
//! neither stored nor shared with the other readers of the key. The transaction reports it: a statement
//! through `&mut tx` after one that may write (or that itself may write), and any use of its connection
//! (`&mut *tx`, which the transaction cannot see through) within the scope.
//!
//! The scope covers the loader's future, not tasks it spawns.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

tokio::task_local! {
    static UNCOMMITTED: Arc<AtomicBool>;
}

/// Runs `load` in a load scope; returns its output and whether it read through a transaction that may
/// hold uncommitted writes.
pub(crate) async fn load<F: Future>(load: F) -> (F::Output, bool) {
    let flag = Arc::new(AtomicBool::new(false));
    let output = UNCOMMITTED.scope(Arc::clone(&flag), load).await;
    (output, flag.load(Ordering::Acquire))
}

/// Called by a transaction that may hold uncommitted writes when a statement runs on it: marks the load
/// in progress on this task, if any.
pub(crate) fn read_uncommitted() {
    let _ = UNCOMMITTED.try_with(|flag| flag.store(true, Ordering::Release));
}

/// Whether a load is in progress on this task.
pub(crate) fn loading() -> bool {
    UNCOMMITTED.try_with(|_| ()).is_ok()
}
