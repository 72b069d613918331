//! `sqlx::Executor` for `&mut CachedTransaction` (delegating to the transaction's connection through the
//! [`Backend`]) and for
//! `&CachedPool` (each statement an autocommit statement whose keys are delivered before it returns): one
//! generic impl each, over every [`Backend`], as sqlx-core writes its own for `Transaction` and `Pool`.
//!
//! Only the four required methods are written; `execute`, `execute_many`, `fetch`, `fetch_all` and
//! `fetch_one` are sqlx's defaults over `fetch_many` / `fetch_optional`, so on the pool every one of them
//! ends only after the statement's keys were delivered.

use std::sync::Arc;

use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;
use futures_util::{StreamExt as _, TryStreamExt as _};
use sqlx::{Execute, Executor};
use sqlx_core::describe::Describe;
use sqlx_core::ext::async_stream::TryAsyncStream;
use sqlx_core::sql_str::SqlStr;

use super::autocommit::{Autocommit, Materialized};
use super::{CachedPool, CachedTransaction};
use crate::backend::{Backend, Item};

impl<'c, 't, DB: Backend> Executor<'c> for &'c mut CachedTransaction<'t, DB> {
    type Database = DB;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Result<Item<DB>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, DB>,
    {
        let query = Materialized::new(query);
        self.before_statement(query.may_write(self.core.options.detection));
        DB::fetch_many(&mut self.tx, query)
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<DB::Row>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, DB>,
    {
        let query = Materialized::new(query);
        self.before_statement(query.may_write(self.core.options.detection));
        DB::fetch_optional(&mut self.tx, query)
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [DB::TypeInfo],
    ) -> BoxFuture<'e, Result<DB::Statement, sqlx::Error>>
    where
        'c: 'e,
    {
        DB::prepare_with(&mut self.tx, sql, parameters)
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, Result<Describe<DB>, sqlx::Error>>
    where
        'c: 'e,
    {
        DB::describe(&mut self.tx, sql)
    }
}

impl<'c, DB: Backend> Executor<'c> for &'c CachedPool<DB> {
    type Database = DB;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Result<Item<DB>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, DB>,
    {
        let core = Arc::clone(&self.core);
        TryAsyncStream::new(move |yielder| async move {
            let (mut statement, query) = Autocommit::start(core, query).await?;
            let result = async {
                let mut stream = DB::fetch_many(statement.conn()?, query);
                while let Some(item) = stream.try_next().await? {
                    yielder.r#yield(item).await;
                }
                Ok(())
            }
            .await;
            statement.finish(result.is_ok()).await;
            result
        })
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<DB::Row>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, DB>,
    {
        let core = Arc::clone(&self.core);
        Box::pin(async move {
            let (mut statement, query) = Autocommit::start(core, query).await?;
            let result = match statement.conn() {
                Ok(conn) => DB::fetch_optional(conn, query).await,
                Err(error) => Err(error),
            };
            statement.finish(result.is_ok()).await;
            result
        })
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [DB::TypeInfo],
    ) -> BoxFuture<'e, Result<DB::Statement, sqlx::Error>>
    where
        'c: 'e,
    {
        let pool = self.sqlx_pool().clone();
        Box::pin(async move {
            let mut conn = pool.acquire().await?;
            DB::prepare_with(&mut conn, sql, parameters).await
        })
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, Result<Describe<DB>, sqlx::Error>>
    where
        'c: 'e,
    {
        let pool = self.sqlx_pool().clone();
        Box::pin(async move {
            let mut conn = pool.acquire().await?;
            DB::describe(&mut conn, sql).await
        })
    }
}

/// `sqlx::Acquire` for `&CachedPool`, for code that takes `impl Acquire` (`sqlx::migrate!().run(&pool)`,
/// libraries): plain connections and transactions of the underlying pool. Writes through them are captured
/// (the triggers see every write) but delivered by the relay, within its grace period
/// ([`RelayConfig::wrapped_grace`](crate::outbox::RelayConfig::wrapped_grace)), not before the call
/// returns: write through `&CachedPool` or [`CachedPool::begin`] for read-your-writes.
impl<'a, DB: Backend> sqlx::Acquire<'a> for &'_ CachedPool<DB> {
    type Database = DB;
    type Connection = sqlx::pool::PoolConnection<DB>;

    fn acquire(self) -> BoxFuture<'static, Result<Self::Connection, sqlx::Error>> {
        let pool = self.sqlx_pool().clone();
        Box::pin(async move { pool.acquire().await })
    }

    fn begin(self) -> BoxFuture<'static, Result<sqlx::Transaction<'a, DB>, sqlx::Error>> {
        let pool = self.sqlx_pool().clone();
        Box::pin(async move { sqlx::Acquire::begin(&pool).await })
    }
}
