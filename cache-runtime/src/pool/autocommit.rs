//! Autocommit statements on `&CachedPool`: a statement that may write is followed, on its connection, by the
//! query for the rows it wrote, whose keys are invalidated before the call returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::pool::PoolConnection;
use sqlx::{Database, Execute};
use sqlx_core::sql_str::SqlStr;
use tokio::task::JoinHandle;

use super::classify::may_write;
use super::{Core, WriteDetection};
use crate::backend::Backend;

/// An [`Execute`] that records whether its SQL may write when the connection reads it.
pub(super) struct Classified<E> {
    inner: E,
    detection: WriteDetection,
    wrote: Arc<AtomicBool>,
}

impl<'q, DB: Database, E: Execute<'q, DB>> Execute<'q, DB> for Classified<E> {
    fn sql(self) -> SqlStr {
        let sql = self.inner.sql();
        let writes = match self.detection {
            WriteDetection::Always => true,
            WriteDetection::Keywords => may_write(sql.as_str()),
        };
        self.wrote.store(writes, Ordering::Release);
        sql
    }

    fn statement(&self) -> Option<&DB::Statement> {
        self.inner.statement()
    }

    fn take_arguments(&mut self) -> Result<Option<DB::Arguments>, sqlx::error::BoxDynError> {
        self.inner.take_arguments()
    }

    fn persistent(&self) -> bool {
        self.inner.persistent()
    }
}

/// One autocommit statement on a pool connection: after it (or when dropped), delivers the rows the
/// statement wrote if it may have written.
pub(super) struct Autocommit<DB: Backend> {
    core: Arc<Core<DB>>,
    conn: Option<PoolConnection<DB>>,
    wrote: Arc<AtomicBool>,
}

impl<DB: Backend> Autocommit<DB> {
    pub(super) async fn start<'q, E: Execute<'q, DB>>(
        core: Arc<Core<DB>>,
        query: E,
    ) -> Result<(Self, Classified<E>), sqlx::Error> {
        let conn = core.relay.outbox.pool.acquire().await?;
        let wrote = Arc::new(AtomicBool::new(false));
        let query = Classified {
            inner: query,
            detection: core.options.detection,
            wrote: Arc::clone(&wrote),
        };
        Ok((
            Self {
                core,
                conn: Some(conn),
                wrote,
            },
            query,
        ))
    }

    pub(super) fn conn(&mut self) -> Result<&mut DB::Connection, sqlx::Error> {
        self.conn.as_deref_mut().ok_or(sqlx::Error::PoolClosed)
    }

    /// Delivers the statement's keys (when it may have written) and returns the connection to the pool.
    pub(super) async fn finish(mut self) {
        if let Some(task) = self.spawn_delivery() {
            let _ = task.await;
        }
    }

    /// Spawns the delivery, so that it completes even if the caller's future is dropped.
    fn spawn_delivery(&mut self) -> Option<JoinHandle<()>> {
        if !self.wrote.load(Ordering::Acquire) {
            return None;
        }
        let conn = self.conn.take()?;
        let core = Arc::clone(&self.core);
        let handle = tokio::runtime::Handle::try_current().ok()?;
        Some(handle.spawn(deliver_session(core, conn)))
    }
}

impl<DB: Backend> Drop for Autocommit<DB> {
    fn drop(&mut self) {
        // Dropped before `finish` (the caller dropped the future or the stream): deliver anyway.
        let _ = self.spawn_delivery();
    }
}

/// Reads the rows written by the statement, releases the connection, and delivers them.
async fn deliver_session<DB: Backend>(core: Arc<Core<DB>>, mut conn: PoolConnection<DB>) {
    let rows = DB::written_rows(&mut conn, &core.relay.outbox.state, false).await;
    drop(conn);
    match rows {
        Ok(rows) => core.deliver(rows).await,
        Err(error) => tracing::warn!(
            %error,
            "could not read the outbox after a write; the relay will deliver its keys"
        ),
    }
}
