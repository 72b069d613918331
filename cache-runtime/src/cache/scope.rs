//! Loads whose value may not be a committed state at least as new as the lease.
//!
//! Every loader runs in a *load scope* (a tokio task-local with an id of its own). A
//! [`CachedTransaction`](crate::CachedTransaction) that the loader reads through marks the load when what it
//! reads may be:
//!
//! - **uncommitted**: the transaction ran a statement that may write (before or within the load), or its
//!   connection was used directly (`&mut *tx`, which the transaction cannot see through): the value may
//!   never commit (the transaction can still roll back);
//! - **older than the lease**: the transaction ran a statement before this load began. Under
//!   `REPEATABLE READ` or `SERIALIZABLE` (whether set by `BEGIN`, `SET TRANSACTION` or the role's
//!   `default_transaction_isolation`) its snapshot was taken then, and may predate a write whose
//!   invalidation came before the lease, which the lease cannot detect.
//!
//! A marked load is returned to its caller but neither stored nor shared with the other readers of the key.
//! A transaction whose first statement is the load's stores normally: its snapshot is taken after the
//! lease. The scope covers the loader's future, not tasks it spawns.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One load in progress.
#[derive(Debug)]
struct Load {
    id: u64,
    unsafe_read: AtomicBool,
}

tokio::task_local! {
    static LOAD: Arc<Load>;
}

/// Runs `load` in a load scope; returns its output and whether it read through a transaction whose data
/// may be uncommitted or older than the lease.
pub(crate) async fn load<F: Future>(load: F) -> (F::Output, bool) {
    static IDS: AtomicU64 = AtomicU64::new(1);
    let scope = Arc::new(Load {
        id: IDS.fetch_add(1, Ordering::Relaxed),
        unsafe_read: AtomicBool::new(false),
    });
    let output = LOAD.scope(Arc::clone(&scope), load).await;
    (output, scope.unsafe_read.load(Ordering::Acquire))
}

/// The id of the load in progress on this task, if any.
pub(crate) fn current() -> Option<u64> {
    LOAD.try_with(|load| load.id).ok()
}

/// Marks the load in progress on this task, if any: its value must not be stored.
pub(crate) fn mark_unsafe() {
    let _ = LOAD.try_with(|load| load.unsafe_read.store(true, Ordering::Release));
}

/// What a transaction knows of its own use, shared with its savepoints.
#[derive(Debug, Default)]
pub(crate) struct TransactionUse {
    /// A statement that may write ran, or the bare connection was used.
    may_hold_writes: AtomicBool,
    /// Who ran the first statement: 0 nobody yet, [`OUTSIDE`] no load (or unknown), else a load's id.
    first: AtomicU64,
}

/// [`TransactionUse::first`] when the first statement ran outside any load, or is unknown.
const OUTSIDE: u64 = u64::MAX;

impl TransactionUse {
    /// A statement through the transaction's executor, which `may_write`.
    pub(crate) fn statement(&self, may_write: bool) {
        let held = self.may_hold_writes.fetch_or(may_write, Ordering::AcqRel);
        let load = current();
        let by = load.unwrap_or(OUTSIDE);
        let first = match self
            .first
            .compare_exchange(0, by, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => by,
            Err(first) => first,
        };
        if load.is_some() && (held || may_write || first != by) {
            mark_unsafe();
        }
    }

    /// The bare connection is used: anything may run on it.
    pub(crate) fn connection(&self) {
        self.may_hold_writes.store(true, Ordering::Release);
        self.first.store(OUTSIDE, Ordering::Release);
        mark_unsafe();
    }
}
