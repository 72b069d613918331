//! Reads on a streaming standby that are never older than the primary when they start.
//!
//! The primary's WAL insert position `L` is read first: every transaction that committed before, commit
//! records included, lies below it. The standby connection handed out has replayed up to `L`
//! (`pg_last_wal_replay_lsn() >= L`, checked on that connection, so its next snapshot includes every such
//! commit); a standby further behind than the wait is skipped for the primary.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use tokio::time::Instant;

use crate::observe;

/// A connection to `replica` once it replayed what `primary` had written now (waiting at most `wait`), or
/// to `primary`.
pub(super) async fn caught_up(
    primary: &PgPool,
    replica: Option<&PgPool>,
    wait: Duration,
) -> Result<PoolConnection<Postgres>, sqlx::Error> {
    let Some(replica) = replica else {
        return primary.acquire().await;
    };
    let position: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(primary)
        .await?;
    let mut conn = replica.acquire().await?;
    let deadline = Instant::now() + wait;
    let mut backoff = Duration::from_millis(1);
    loop {
        // NULL: not in recovery (a promoted replica has everything it replayed).
        let caught_up: Option<bool> =
            sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                .bind(&position)
                .fetch_one(&mut *conn)
                .await?;
        if caught_up != Some(false) {
            observe::replica_load("replica");
            return Ok(conn);
        }
        let now = Instant::now();
        if now >= deadline {
            observe::replica_load("primary");
            return primary.acquire().await;
        }
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2).min(Duration::from_millis(50));
    }
}
