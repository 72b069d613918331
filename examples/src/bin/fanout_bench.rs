//! Chooses the fan-out channel of `TieredStore` by measuring: the delay from an invalidation to its
//! notification reaching another connection, for the three candidates, side by side in one run (rounds
//! alternate):
//!
//! - **Redis pub/sub**: `UNLINK` and `PUBLISH` of the key in one pipeline (what `RedisStore` sends);
//!   a subscriber connection receives the message;
//! - **Redis RESP3 client tracking**: a tracking connection read the key (`CLIENT TRACKING ON`); the
//!   writer's `UNLINK` makes the server push an invalidation to it;
//! - **PostgreSQL `NOTIFY`**: `pg_notify` in the writer's autocommit statement; a `LISTEN` connection
//!   receives it (the relay's wake-up channel).
//!
//! Times are from the writer's call to the notification's arrival, and from the writer's
//! acknowledgement to the arrival (0 when the notification came first). One process, separate
//! connections, one clock. Run: `cargo run --release -p examples --bin fanout_bench`; writes
//! `target/fanout_bench.json`.

use std::time::Instant;

use examples::{Report, Samples};
use futures_util::StreamExt as _;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const ROUNDS: usize = 1_000;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let pg_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let prefix = format!("fanout_bench_{}:", std::process::id());
    let client = redis::Client::open(redis_url.as_str())?;
    let mut writer = client.get_multiplexed_async_connection().await?;

    let channel = format!("{prefix}<invalidated>");
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(&channel).await?;
    let mut messages = pubsub.into_on_message();

    let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let tracking_client = redis::Client::open(format!("{redis_url}/?protocol=resp3"))?;
    let config = redis::AsyncConnectionConfig::new().set_push_sender(tx);
    let mut tracked = tracking_client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .query_async::<()>(&mut tracked)
        .await?;

    let pg = sqlx::PgPool::connect(&pg_url).await?;
    let mut listener = sqlx::postgres::PgListener::connect(&pg_url).await?;
    let pg_channel = format!("fanout_bench_{}", std::process::id());
    listener.listen(&pg_channel).await?;

    let names = [
        "Redis pub/sub",
        "Redis RESP3 client tracking",
        "PostgreSQL NOTIFY",
    ];
    let mut called = vec![Samples::default(); 3];
    let mut acked = vec![Samples::default(); 3];
    for round in 0..ROUNDS {
        for v in 0..3 {
            let k = (round + v) % 3;
            let key = format!("{prefix}k{round}");
            let (start, ack, arrived) = match k {
                0 => {
                    let mut pipe = redis::pipe();
                    pipe.cmd("UNLINK")
                        .arg(&key)
                        .ignore()
                        .publish(&channel, &key)
                        .ignore();
                    let start = Instant::now();
                    pipe.query_async::<()>(&mut writer).await?;
                    let ack = Instant::now();
                    messages.next().await.ok_or("subscription ended")?;
                    (start, ack, Instant::now())
                }
                1 => {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg("v")
                        .query_async::<()>(&mut writer)
                        .await?;
                    redis::cmd("GET")
                        .arg(&key)
                        .query_async::<String>(&mut tracked)
                        .await?;
                    let start = Instant::now();
                    redis::cmd("UNLINK")
                        .arg(&key)
                        .query_async::<()>(&mut writer)
                        .await?;
                    let ack = Instant::now();
                    loop {
                        let push = pushes.recv().await.ok_or("tracking ended")?;
                        if push.kind == redis::PushKind::Invalidate {
                            break;
                        }
                    }
                    (start, ack, Instant::now())
                }
                _ => {
                    let start = Instant::now();
                    sqlx::query("SELECT pg_notify($1, $2)")
                        .bind(&pg_channel)
                        .bind(&key)
                        .execute(&pg)
                        .await?;
                    let ack = Instant::now();
                    listener.recv().await?;
                    (start, ack, Instant::now())
                }
            };
            called[k].push(arrived - start);
            acked[k].push(arrived.saturating_duration_since(ack));
        }
    }
    let mut report = Report::default();
    let group = "fan-out channel: invalidation → another connection notified";
    let base = called[0].stats().median_us;
    for k in 0..3 {
        report.latency(
            group,
            &format!("{}: from the call", names[k]),
            called[k].stats(),
            Some(base),
        );
        report.latency(
            group,
            &format!("{}: from the acknowledgement", names[k]),
            acked[k].stats(),
            None,
        );
    }
    report.fact("rounds", ROUNDS);
    report.fact("note", "pub/sub: the library's choice (reaches every process, in the invalidation's own round trip)");
    report.finish(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/fanout_bench.json"
    ))?;
    Ok(())
}
