//! Autocommit statements on `&CachedPool`: a statement that may write is followed, on its connection, by the
//! query for the rows it wrote, whose keys are invalidated before the call returns. Behind a transaction
//! pooler, such a statement runs in a transaction of its own, whose rows are read before its `COMMIT`.

use std::sync::Arc;
use std::time::Instant;

use sqlx::error::BoxDynError;
use sqlx::pool::PoolConnection;
use sqlx::{Database, Execute};
use sqlx_core::sql_str::SqlStr;
use tokio::task::JoinHandle;

use super::classify::may_write;
use super::{Core, WriteDetection};
use crate::backend::Backend;

/// A statement taken apart before it runs (SQL, prepared statement, arguments), so that whether it may
/// write is known before it is sent: behind a transaction pooler, a write runs in a transaction of its own.
pub(super) struct Materialized<DB: Database> {
    sql: SqlStr,
    statement: Option<DB::Statement>,
    arguments: Option<Result<Option<DB::Arguments>, BoxDynError>>,
    persistent: bool,
}

impl<DB: Database> Materialized<DB> {
    pub(super) fn new<'q>(mut query: impl Execute<'q, DB>) -> Self {
        let arguments = Some(query.take_arguments());
        let statement = query.statement().cloned();
        let persistent = query.persistent();
        Self {
            sql: query.sql(),
            statement,
            arguments,
            persistent,
        }
    }
}

impl<DB: Database> Materialized<DB> {
    /// Whether the statement may write, as `detection` tells.
    pub(super) fn may_write(&self, detection: WriteDetection) -> bool {
        match detection {
            WriteDetection::Always => true,
            WriteDetection::Keywords => may_write(self.sql.as_str()),
        }
    }
}

impl<DB: Database> Execute<'_, DB> for Materialized<DB> {
    fn sql(self) -> SqlStr {
        self.sql
    }

    fn statement(&self) -> Option<&DB::Statement> {
        self.statement.as_ref()
    }

    fn take_arguments(&mut self) -> Result<Option<DB::Arguments>, BoxDynError> {
        self.arguments.take().unwrap_or(Ok(None))
    }

    fn persistent(&self) -> bool {
        self.persistent
    }
}

/// The connection of an autocommit statement: a pool connection, or (a write behind a transaction pooler)
/// a transaction of its own.
enum Conn<DB: Backend> {
    Plain(PoolConnection<DB>),
    Own(sqlx::Transaction<'static, DB>),
}

/// One autocommit statement on a pool connection: after it (or when dropped), delivers the rows the
/// statement wrote if it may have written.
pub(super) struct Autocommit<DB: Backend> {
    core: Arc<Core<DB>>,
    conn: Option<Conn<DB>>,
    wrote: bool,
}

impl<DB: Backend> Autocommit<DB> {
    pub(super) async fn start<'q, E: Execute<'q, DB>>(
        core: Arc<Core<DB>>,
        query: E,
    ) -> Result<(Self, Materialized<DB>), sqlx::Error> {
        let query = Materialized::new(query);
        let wrote = query.may_write(core.options.detection);
        let conn = if wrote && core.options.marks_transactions() {
            Conn::Own(core.begin_marked("BEGIN").await?)
        } else {
            Conn::Plain(core.pool.acquire().await?)
        };
        let statement = Self {
            core,
            conn: Some(conn),
            wrote,
        };
        Ok((statement, query))
    }

    pub(super) fn conn(&mut self) -> Result<&mut DB::Connection, sqlx::Error> {
        match self.conn.as_mut() {
            Some(Conn::Plain(conn)) => Ok(conn),
            Some(Conn::Own(tx)) => Ok(tx),
            None => Err(sqlx::Error::PoolClosed),
        }
    }

    /// Delivers the statement's keys (when it may have written) and returns the connection to the pool.
    /// A failed statement in a transaction of its own rolls it back and delivers nothing.
    pub(super) async fn finish(mut self, succeeded: bool) {
        if !succeeded && matches!(self.conn, Some(Conn::Own(_))) {
            self.conn = None;
            return;
        }
        if let Some(task) = self.spawn_delivery() {
            let _ = task.await;
        }
    }

    /// Spawns the delivery, so that it completes even if the caller's future is dropped.
    fn spawn_delivery(&mut self) -> Option<JoinHandle<()>> {
        if !self.wrote {
            return None;
        }
        let conn = self.conn.take()?;
        let core = Arc::clone(&self.core);
        let handle = tokio::runtime::Handle::try_current().ok()?;
        // The caller's token scope (task-locals do not cross the spawn).
        let sink = crate::token::sink();
        Some(handle.spawn(deliver(core, conn, sink)))
    }
}

impl<DB: Backend> Drop for Autocommit<DB> {
    fn drop(&mut self) {
        // Dropped before `finish` (the caller dropped the future or the stream): deliver anyway.
        let _ = self.spawn_delivery();
    }
}

/// Reads the rows written by the statement (and commits its own transaction), releases the connection,
/// and delivers them; records the write's token in the caller's token scope, if any.
async fn deliver<DB: Backend>(
    core: Arc<Core<DB>>,
    conn: Conn<DB>,
    sink: Option<Arc<crate::token::Scope>>,
) {
    let state = &core.relay.outbox.state;
    let committed = Instant::now();
    let rows = match conn {
        Conn::Plain(mut conn) => DB::written_rows(&mut conn, state).await,
        Conn::Own(tx) => DB::commit_written(tx, state).await,
    };
    match rows {
        Ok(rows) => {
            if let (Some(token), Some(sink)) = (core.deliver(rows, committed).await, sink) {
                sink.record(token);
            }
        }
        Err(error) => tracing::warn!(
            %error,
            "could not read the outbox after a write; the relay will deliver its keys"
        ),
    }
}
