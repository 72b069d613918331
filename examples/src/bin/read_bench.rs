//! Read-side benchmark: a `get_or_load` hit against a raw Redis `GET` + decode with the same codec
//! (MessagePack), and an in-process store hit; plus a 1,000-reader stampede on one cold key.
//!
//! Variants alternate within each iteration, so drift on the machine hits all alike. Run with
//! `cargo run --release -p examples --bin read_bench` (Redis from `REDIS_URL`, default
//! `redis://127.0.0.1:6379`); prints a table and writes `target/read_bench.json`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cache_runtime::{Cache, CachedEntity, MemoryStore, RedisStore};
use examples::{Report, Samples};
use serde::{Deserialize, Serialize};

/// A product row as a shop caches it.
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize)]
#[cached_entity(key = "product:<id>", depends = ["category:<category_id>:products"], ttl = "10m")]
struct Product {
    id: i64,
    category_id: i64,
    sku: String,
    name: String,
    description: Option<String>,
    price_cents: i64,
    in_stock: bool,
    tags: Vec<String>,
}

fn product(id: i64) -> Product {
    Product {
        id,
        category_id: 42,
        sku: format!("SKU-{id:08}"),
        name: "Ergonomic aluminium desk lamp, warm white".to_owned(),
        description: Some(
            "A dimmable LED desk lamp with an adjustable arm and a USB-C port.".to_owned(),
        ),
        price_cents: 4_999,
        in_stock: true,
        tags: vec!["lighting".into(), "office".into()],
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    const ITERATIONS: usize = 5_000;
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("read_bench:{}:", std::process::id());
    let redis_cache = Cache::new(RedisStore::connect(&url, prefix.clone()).await?);
    let memory_cache = Cache::new(MemoryStore::default());
    let client = redis::Client::open(url.as_str())?;
    let mut raw = redis::aio::ConnectionManager::new(client).await?;
    let raw_key = format!("{prefix}raw:product:1");
    let value = Some(product(1));
    redis::cmd("SET")
        .arg(&raw_key)
        .arg(rmp_serde::to_vec(&value)?)
        .query_async::<()>(&mut raw)
        .await?;
    let load = || async { Ok::<_, std::io::Error>(Some(product(1))) };
    // Warm: fill both caches.
    redis_cache
        .get_or_load(Product::cache_key_for(&1), load)
        .await
        .map_err(|e| e.to_string())?;
    memory_cache
        .get_or_load(Product::cache_key_for(&1), load)
        .await
        .map_err(|e| e.to_string())?;

    let (mut s_raw, mut s_redis, mut s_memory) =
        (Samples::default(), Samples::default(), Samples::default());
    for i in 0..ITERATIONS {
        // Rotate the order too.
        for v in 0..3 {
            match (i + v) % 3 {
                0 => {
                    let got: Option<Product> = s_raw
                        .time(async {
                            let bytes: Vec<u8> = redis::cmd("GET")
                                .arg(&raw_key)
                                .query_async(&mut raw)
                                .await?;
                            Ok::<_, Error>(rmp_serde::from_slice(&bytes)?)
                        })
                        .await?;
                    assert_eq!(got.as_ref(), value.as_ref());
                }
                1 => {
                    let got: Option<Product> = s_redis
                        .time(redis_cache.get_or_load(Product::cache_key_for(&1), load))
                        .await
                        .map_err(|e| e.to_string())?;
                    assert_eq!(got.as_ref(), value.as_ref());
                }
                _ => {
                    let got: Option<Product> = s_memory
                        .time(memory_cache.get_or_load(Product::cache_key_for(&1), load))
                        .await
                        .map_err(|e| e.to_string())?;
                    assert_eq!(got.as_ref(), value.as_ref());
                }
            }
        }
    }
    let stats = redis_cache.stats();
    assert_eq!(
        stats.loads, 1,
        "every measured get_or_load was a hit: {stats:?}"
    );

    let mut report = Report::default();
    report
        .context
        .push(("iterations".into(), ITERATIONS.to_string()));
    report.context.push((
        "codec".into(),
        "MessagePack (rmp-serde), both variants".into(),
    ));
    let base = s_raw.stats();
    report.latency(
        "read hit",
        "raw GET + decode (Redis)",
        base,
        Some(base.median_us),
    );
    report.latency(
        "read hit",
        "get_or_load (Redis)",
        s_redis.stats(),
        Some(base.median_us),
    );
    report.latency(
        "read hit",
        "get_or_load (in-process store)",
        s_memory.stats(),
        Some(base.median_us),
    );

    for (name, cache) in [("Redis", &redis_cache), ("in-process", &memory_cache)] {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..1_000 {
            let (cache, calls) = (cache.clone(), Arc::clone(&calls));
            tasks.spawn(async move {
                cache
                    .get_or_load(Product::cache_key_for(&2), || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, std::io::Error>(Some(product(2)))
                    })
                    .await
                    .map(|_| ())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done?.map_err(|e| e.to_string())?;
        }
        report.value(
            "stampede: 1,000 concurrent cold reads",
            &format!("get_or_load ({name})"),
            calls.load(Ordering::SeqCst) as f64,
            "loader calls",
        );
    }

    redis_cache
        .invalidate(&["product:1".into(), "product:2".into(), "product:<>".into()])
        .await?;
    redis::cmd("DEL")
        .arg(&raw_key)
        .query_async::<()>(&mut raw)
        .await?;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/read_bench.json");
    report.finish(path)?;
    Ok(())
}
