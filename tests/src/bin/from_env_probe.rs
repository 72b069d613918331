//! Run by the `compose` tests: connects a pool with `CachedPool::from_env` (the environment is
//! process-wide, so it runs in a process of its own), reads item 1 through it and prints what it found,
//! or the error.

use cache_runtime::{CachedEntity, CachedPgPool, Registry};
use serde::{Deserialize, Serialize};

/// A versioned row (the `compose` tests' table).
#[derive(Debug, Clone, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

#[tokio::main]
async fn main() {
    let connected = CachedPgPool::options()
        .registry(Registry::new([Item::META]))
        .auto_install(true)
        .from_env()
        .await;
    let pool = match connected {
        Ok(pool) => pool,
        Err(error) => {
            println!("from_env error: {error}");
            std::process::exit(2);
        }
    };
    let version = match pool.get::<Item>(&1).await {
        Ok(Some(item)) => item.version,
        other => {
            println!("read failed: {other:?}");
            std::process::exit(3);
        }
    };
    let prefix = std::env::var("CACHE_PREFIX").unwrap_or_default();
    let under_prefix = pool.store().consumer().contains(&prefix);
    println!(
        "from_env: version {version}, prefix {}",
        if under_prefix { "ok" } else { "wrong" }
    );
    pool.close().await;
}
