//! [`CachedTransaction`]: the outermost commit reads the transaction's keys, commits, then invalidates them.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Instant;

use sqlx::Postgres;
use tracing::Instrument as _;

use super::Core;
use crate::backend::Backend;
use crate::cache::scope;
use crate::key::Key;
use crate::token::WriteToken;

/// A transaction (or savepoint) of a [`CachedPool`](super::CachedPool).
///
/// `&mut CachedTransaction` is a [`sqlx::Executor`], and `&mut *tx` is the transaction's `PgConnection`:
/// both work with every sqlx query function. Dropping it without `commit` rolls back and publishes nothing.
///
/// A cache loader may read through the transaction (`&mut tx`), but what it loads is stored (and shared
/// with other readers) only when the load's statements are the transaction's first and none of them may
/// write (as the pool's [`WriteDetection`](crate::WriteDetection) tells). Otherwise the value may never
/// commit (the transaction can roll back), or come from a `REPEATABLE READ` snapshot older than a write
/// invalidated before the load: it is returned to its caller and not stored. A load through the bare
/// connection (`&mut *tx`) is never stored.
///
/// # Examples
///
/// ```no_run
/// # async fn f(pool: cache_runtime::CachedPool) -> Result<(), sqlx::Error> {
/// let mut tx = pool.begin().await?;
/// sqlx::query("UPDATE products SET category_id = 2 WHERE id = 1").execute(&mut tx).await?;
/// {
///     let mut savepoint = tx.begin().await?;
///     sqlx::query("DELETE FROM products WHERE id = 2").execute(&mut *savepoint).await?;
///     savepoint.rollback().await?; // product:2 is not invalidated
/// }
/// tx.commit().await?; // invalidates product:1, category:<old>:products, category:2:products
/// # Ok(()) }
/// ```
pub struct CachedTransaction<'c, DB: Backend = Postgres> {
    pub(super) tx: sqlx::Transaction<'c, DB>,
    pub(super) core: Arc<Core<DB>>,
    outermost: bool,
    /// How the transaction was used so far (shared with its savepoints): for cache loads through it.
    pub(super) used: Arc<scope::TransactionUse>,
}

impl<'c, DB: Backend> CachedTransaction<'c, DB> {
    /// The outermost transaction of a pool.
    pub(super) fn outermost(tx: sqlx::Transaction<'c, DB>, core: Arc<Core<DB>>) -> Self {
        Self {
            tx,
            core,
            outermost: true,
            used: Arc::default(),
        }
    }
}

impl<DB: Backend> fmt::Debug for CachedTransaction<'_, DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedTransaction")
            .field("outermost", &self.outermost)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> CachedTransaction<'_, DB> {
    /// Begins a nested transaction (a `SAVEPOINT`). Its commit only releases the savepoint; its writes are
    /// published by the outermost commit, and vanish if it rolls back.
    ///
    /// # Errors
    ///
    /// The [`sqlx::Error`] of `SAVEPOINT`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave the savepoint created; it is rolled back with the next use of the
    /// outer transaction, as for a dropped nested transaction.
    pub async fn begin(&mut self) -> Result<CachedTransaction<'_, DB>, sqlx::Error> {
        let tx = sqlx::Acquire::begin(&mut self.tx).await?;
        Ok(CachedTransaction {
            tx,
            core: Arc::clone(&self.core),
            outermost: false,
            used: Arc::clone(&self.used),
        })
    }

    /// Invalidates `key` when the outermost transaction commits, as if the transaction had written its
    /// data: the key is written to the outbox in this transaction (rolled back with it, savepoints
    /// included) and delivered with its other keys. For data that changed outside the registered tables
    /// (another database, a file, a computed value).
    ///
    /// # Errors
    ///
    /// The [`sqlx::Error`] of writing to the outbox.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave the keys written or not; they commit only with the transaction.
    pub async fn invalidate(&mut self, key: impl Into<Key>) -> Result<(), sqlx::Error> {
        self.invalidate_many([key]).await
    }

    /// [`invalidate`](Self::invalidate) of several keys.
    ///
    /// # Errors
    ///
    /// As [`invalidate`](Self::invalidate).
    ///
    /// # Cancel safety
    ///
    /// As [`invalidate`](Self::invalidate).
    pub async fn invalidate_many(
        &mut self,
        keys: impl IntoIterator<Item = impl Into<Key>>,
    ) -> Result<(), sqlx::Error> {
        let keys: Vec<String> = keys.into_iter().map(|k| k.into().into_string()).collect();
        if keys.is_empty() {
            return Ok(());
        }
        DB::enqueue(&mut self.tx, &keys).await
    }

    /// Commits. For the outermost transaction: reads the transaction's keys, sends `COMMIT`, invalidates the
    /// keys in the store (one round trip), and returns. For a savepoint: `RELEASE SAVEPOINT` only.
    ///
    /// # Errors
    ///
    /// The [`sqlx::Error`] of reading the keys or of `COMMIT`: then nothing was published (and, when the
    /// `COMMIT` itself failed, the transaction is rolled back or its outcome unknown, as with sqlx). Never an
    /// error once `COMMIT` succeeded: a store failure is logged and the relay delivers the keys.
    ///
    /// # Cancel safety
    ///
    /// Dropped before `COMMIT` was sent: the transaction rolls back, nothing is published. Dropped after
    /// `COMMIT` was sent: the transaction may be committed; the invalidation runs in a task of its own
    /// (spawned right after `COMMIT`), which completes even when this future is dropped; if the future is
    /// dropped between the `COMMIT` and that spawn, the keys stay in the outbox and the relay delivers them
    /// within the grace period.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.commit_with_token().await.map(drop)
    }

    /// [`commit`](Self::commit), returning the transaction's [`WriteToken`]: its outbox position, and
    /// whether the store acknowledged its invalidation. A read in another process given the token never
    /// returns a value older than this transaction (see the [`token`](crate::token) module).
    /// [`WriteToken::NONE`] when the transaction wrote no captured row, and for a savepoint (the
    /// outermost commit publishes). The token is also recorded in the task's
    /// [`token::scope`](crate::token::scope), if any.
    ///
    /// # Errors
    ///
    /// As [`commit`](Self::commit).
    ///
    /// # Cancel safety
    ///
    /// As [`commit`](Self::commit).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(pool: cache_runtime::CachedPool) -> Result<(), sqlx::Error> {
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("UPDATE products SET price_cents = 900 WHERE id = 7").execute(&mut tx).await?;
    /// let token = tx.commit_with_token().await?;
    /// println!("x-cache-token: {token}");
    /// # Ok(()) }
    /// ```
    pub async fn commit_with_token(self) -> Result<WriteToken, sqlx::Error> {
        if !self.outermost {
            return self.tx.commit().await.map(|()| WriteToken::NONE);
        }
        let span = tracing::debug_span!(
            "cache.commit",
            "db.system.name" = DB::SYSTEM_NAME,
            "db.operation.name" = "COMMIT"
        );
        self.commit_outermost().instrument(span).await
    }

    async fn commit_outermost(self) -> Result<WriteToken, sqlx::Error> {
        let rows = DB::commit_written(self.tx, &self.core.relay.outbox.state).await?;
        let committed = Instant::now();
        if rows.is_empty() {
            return Ok(WriteToken::NONE);
        }
        let position = rows.iter().map(|(id, _)| *id).max().unwrap_or(0);
        let undelivered = WriteToken::new(position, self.core.relay.outbox.consumer.id(), false);
        let core = Arc::clone(&self.core);
        // A task of its own, so that dropping this future cannot interrupt the invalidation.
        let token = tokio::spawn(async move { core.deliver(rows, committed).await })
            .await
            .ok()
            .flatten()
            .unwrap_or(undelivered);
        if let Some(sink) = crate::token::sink() {
            sink.record(token);
        }
        Ok(token)
    }

    /// Rolls back the transaction or savepoint; nothing is published.
    ///
    /// # Errors
    ///
    /// The [`sqlx::Error`] of `ROLLBACK`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future still rolls back (with the next use of the connection).
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }

    /// Before a statement through `&mut tx` that `may_write`: tells a cache load reading through it
    /// whether it may store (see the `scope` module).
    pub(super) fn before_statement(&self, may_write: bool) {
        self.used.statement(may_write);
    }
}

impl<DB: Backend> Deref for CachedTransaction<'_, DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.tx
    }
}

impl<DB: Backend> DerefMut for CachedTransaction<'_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        // Whatever runs on the bare connection is unseen.
        self.used.connection();
        &mut self.tx
    }
}
