//! Run by the `tokens` tests: a second process on the same database and Redis prefix. It connects a pool
//! (`DATABASE_URL`, `REDIS_URL`, `CACHE_PREFIX`; its relay's grace period is a minute, so it does not
//! deliver wrapped writers' rows meanwhile), prints `ready`, then answers each line of stdin:
//!
//! - `read -`: reads item 1 through the cache and prints `version <v> hits <h> bypassed <b>`;
//! - `read <token>`: the same with `get_or_load_after(token, …)`.

use std::io::BufRead as _;
use std::time::Duration;

use cache_runtime::outbox::RelayConfig;
use cache_runtime::token::WriteToken;
use cache_runtime::{CachedEntity, CachedPgPool, RedisStore, Registry, key};
use serde::{Deserialize, Serialize};

/// A versioned row (the `tokens` tests' table).
#[derive(Debug, Clone, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        println!("error: set {name}");
        std::process::exit(2)
    })
}

#[tokio::main]
async fn main() {
    let store = match RedisStore::connect(&env("REDIS_URL"), env("CACHE_PREFIX")).await {
        Ok(store) => store,
        Err(error) => {
            println!("error: redis: {error}");
            std::process::exit(2)
        }
    };
    let connected = CachedPgPool::options()
        .registry(Registry::new([Item::META]))
        .relay_config(RelayConfig::new().wrapped_grace(Duration::from_secs(60)))
        .connect(&env("DATABASE_URL"), store)
        .await;
    let pool = match connected {
        Ok(pool) => pool,
        Err(error) => {
            println!("error: connect: {error}");
            std::process::exit(2)
        }
    };
    let cache = pool
        .cache_builder()
        .token_wait(Duration::from_millis(300))
        .build();
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let Some(arg) = line.strip_prefix("read ") else {
            println!("error: unknown command {line:?}");
            continue;
        };
        let load = || {
            sqlx::query_as::<_, Item>("SELECT id, version FROM items WHERE id = 1")
                .fetch_optional(pool.sqlx_pool())
        };
        let key = key!("item:<id>", id = 1);
        let item = if arg == "-" {
            cache.get_or_load(key, load).await
        } else {
            match arg.parse::<WriteToken>() {
                Ok(token) => cache.get_or_load_after(token, key, load).await,
                Err(error) => {
                    println!("error: {error}");
                    continue;
                }
            }
        };
        let stats = cache.stats();
        match item {
            Ok(Some(item)) => println!(
                "version {} hits {} bypassed {}",
                item.version, stats.hits, stats.bypassed
            ),
            other => println!("error: read: {other:?}"),
        }
    }
    pool.close().await;
}
