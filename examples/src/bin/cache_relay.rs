//! The standalone relay: delivers a database's outbox to a Redis store, for deployments that want one relay
//! per database in addition to (or instead of) the relays inside the applications.
//!
//! Configuration (environment):
//!
//! - `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`): the database whose
//!   `cache_invalidation` schema is installed;
//! - `REDIS_URL` (default `redis://127.0.0.1:6379`) and `CACHE_PREFIX` (default empty): the store, with
//!   the same prefix as the applications' `RedisStore`;
//! - `RELAY_SWEEP_MS` (default 500), `RELAY_GRACE_MS` (default 2000), `RELAY_BATCH_ROWS` (default 5000),
//!   `RELAY_STORE_TIMEOUT_MS`, `CACHE_REPLAY_WINDOW_S`: read by the library (`cache_runtime::environment`).
//!
//! `cache_relay` runs until killed (killing it loses nothing: a batch in flight rolls back or has
//! committed). `cache_relay --drain` delivers every row deliverable now, prints what it delivered and the
//! rate, and exits; `cache_relay --backlog` prints the outbox's depth and oldest age.
//!
//! Run: `cargo run --release -p examples --bin cache_relay`.

use std::time::Instant;

use cache_runtime::RedisStore;
use cache_runtime::outbox::{Relay, RelayConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&database_url)
        .await?;
    // REDIS_URL, CACHE_PREFIX and the RELAY_* settings (see `cache_runtime::environment`).
    let store = RedisStore::from_env().await?;
    let relay = Relay::builder(pool, store)
        .config(RelayConfig::from_env()?)
        .build();
    match std::env::args().nth(1).as_deref() {
        Some("--drain") => {
            let start = Instant::now();
            let drained = relay.deliver_pending().await?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "delivered {} rows, {} keys in {} batches, {:.3} s ({:.0} keys/s)",
                drained.rows,
                drained.keys,
                drained.batches,
                secs,
                drained.keys as f64 / secs.max(1e-9)
            );
        }
        Some("--backlog") => {
            let backlog = relay.backlog().await?;
            println!(
                "outbox: {} rows, highest id {}, oldest {:.3} s",
                backlog.depth,
                backlog.max_id,
                backlog.oldest_age.as_secs_f64()
            );
        }
        Some(other) => {
            return Err(format!(
                "unknown argument {other:?}; use no argument, --drain or --backlog"
            )
            .into());
        }
        None => {
            eprintln!("cache_relay: relaying {database_url}");
            relay.run().await;
        }
    }
    Ok(())
}
