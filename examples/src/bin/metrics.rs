//! The library's metrics, exposed for Prometheus.
//!
//! cache-runtime records its metrics through the [`metrics`] facade (names and meanings:
//! `cache_runtime::observe`). Any recorder works (e.g. `metrics-exporter-prometheus`); to keep the build
//! lean, this example installs a tiny recorder of its own and serves the text exposition format on
//! `http://127.0.0.1:9898/metrics` (`METRICS_ADDR` to change it), while a small workload runs: cached reads,
//! writes through a `CachedPool`, and foreign writes delivered by the relay. The pool runs the live
//! consistency SLI on 5% of its hits (Δ = 500 ms): `cache_consistency_samples_total`,
//! `cache_consistency_inconsistent_total` and `cache_consistency_delay_seconds`, next to the invalidation
//! lag (`cache_invalidation_lag_seconds{path="commit"|"relay"}`) and the outbox's age
//! (`cache_outbox_oldest_age_seconds`). "N nines within Δ", as a dashboard query:
//! `-log10(rate(cache_consistency_inconsistent_total[1h]) / rate(cache_consistency_samples_total[1h]))`.
//!
//! It creates a database of its own on `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! uses the Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`) under a prefix of its own, runs for
//! `METRICS_SECONDS` (default 30), prints the final exposition and drops the database. `METRICS_PREFIX` sets
//! the metric names' prefix (`cache_runtime::observe::set_prefix`; default `cache`).
//!
//! Run: `cargo run -p examples --bin metrics`, then `curl http://127.0.0.1:9898/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_runtime::cache::Sampling;
use cache_runtime::{CachedEntity, CachedPgPool, RedisStore, Registry};
use examples::database_url;
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use serde::{Deserialize, Serialize};
use sqlx::{Connection as _, PgConnection};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The demo entity.
#[derive(Debug, Clone, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

/// A histogram kept as a Prometheus summary without quantiles: sum and count.
#[derive(Debug, Default)]
struct Summary {
    sum_count: Mutex<(f64, u64)>,
}

impl HistogramFn for Summary {
    fn record(&self, value: f64) {
        let mut s = self
            .sum_count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.0 += value;
        s.1 += 1;
    }
}

#[derive(Debug, Clone)]
enum Series {
    Counter(Arc<AtomicU64>),
    Gauge(Arc<AtomicU64>),
    Summary(Arc<Summary>),
}

/// A recorder that keeps every series in memory and renders the Prometheus text format (0.0.4): one
/// `# HELP` and `# TYPE` per name, before its samples; histograms as summaries without quantiles.
#[derive(Debug, Clone, Default)]
struct TextRecorder {
    series: Arc<Mutex<BTreeMap<(String, String), Series>>>,
    help: Arc<Mutex<BTreeMap<String, String>>>,
}

impl TextRecorder {
    fn entry(&self, key: &Key, make: impl FnOnce() -> Series) -> Series {
        let labels = key
            .labels()
            .map(|l| format!("{}=\"{}\"", l.key(), l.value().replace('"', "\\\"")))
            .collect::<Vec<_>>()
            .join(",");
        self.series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((key.name().to_owned(), labels))
            .or_insert_with(make)
            .clone()
    }

    fn describe(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        let unit = unit
            .filter(|u| *u != Unit::Count)
            .map_or(String::new(), |u| format!(" ({})", u.as_str()));
        // The exposition escapes `\\` and newlines in help text.
        let help = format!("{description}{unit}")
            .replace('\\', "\\\\")
            .replace('\n', "\\n");
        self.help
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.as_str().to_owned(), help);
    }

    fn help_of(&self, name: &str) -> Option<String> {
        self.help
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn render(&self) -> String {
        let series = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut out = String::new();
        let mut typed = String::new();
        for ((name, labels), s) in series {
            let kind = match s {
                Series::Counter(_) => "counter",
                Series::Gauge(_) => "gauge",
                Series::Summary(_) => "summary",
            };
            if typed != name {
                if let Some(help) = self.help_of(&name) {
                    let _ = writeln!(out, "# HELP {name} {help}");
                }
                let _ = writeln!(out, "# TYPE {name} {kind}");
                typed.clone_from(&name);
            }
            let braces = if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            };
            match s {
                Series::Counter(c) => {
                    let _ = writeln!(out, "{name}{braces} {}", c.load(Ordering::Relaxed));
                }
                Series::Gauge(g) => {
                    let _ = writeln!(
                        out,
                        "{name}{braces} {}",
                        f64::from_bits(g.load(Ordering::Relaxed))
                    );
                }
                Series::Summary(h) => {
                    let (sum, count) = *h
                        .sum_count
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let _ = writeln!(out, "{name}_sum{braces} {sum}");
                    let _ = writeln!(out, "{name}_count{braces} {count}");
                }
            }
        }
        out
    }
}

impl Recorder for TextRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match self.entry(key, || Series::Counter(Arc::default())) {
            Series::Counter(c) => Counter::from_arc(c),
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        match self.entry(key, || Series::Gauge(Arc::default())) {
            Series::Gauge(g) => Gauge::from_arc(g),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match self.entry(key, || Series::Summary(Arc::default())) {
            Series::Summary(h) => Histogram::from_arc(h),
            _ => Histogram::noop(),
        }
    }
}

/// Answers every connection with the current exposition.
async fn serve(listener: tokio::net::TcpListener, recorder: TextRecorder) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let body = recorder.render();
        tokio::spawn(async move {
            let mut request = [0_u8; 1024];
            let _ = socket.read(&mut request).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let recorder = TextRecorder::default();
    if let Ok(prefix) = std::env::var("METRICS_PREFIX") {
        cache_runtime::observe::set_prefix(&prefix)?;
    }
    metrics::set_global_recorder(recorder.clone())
        .map_err(|_| "a metrics recorder is already installed")?;
    cache_runtime::observe::describe();
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let addr = std::env::var("METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:9898".to_owned());
    let seconds: u64 = std::env::var("METRICS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);

    let name = format!("cache_metrics_example_{}", std::process::id());
    let mut admin = PgConnection::connect(&admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await?;
    let url = database_url(&admin_url, &name);
    let result = run(&url, &redis_url, &addr, seconds, &recorder).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    result?;
    println!("{}", recorder.render());
    Ok(())
}

async fn run(
    url: &str,
    redis_url: &str,
    addr: &str,
    seconds: u64,
    recorder: &TextRecorder,
) -> Result<(), BoxError> {
    let plain = sqlx::PgPool::connect(url).await?;
    sqlx::raw_sql(
        "CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL);
         INSERT INTO items SELECT i, 0 FROM generate_series(1, 100) AS i;",
    )
    .execute(&plain)
    .await?;
    let prefix = format!("metrics_example_{}:", std::process::id());
    let store = RedisStore::connect(redis_url, prefix).await?;
    let pool = CachedPgPool::options()
        .registry(Registry::new([Item::META]))
        .auto_install(true)
        .sampling(Sampling::new(0.05).delay(Duration::from_millis(500)))
        .connect(url, store)
        .await?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("serving metrics on http://{addr}/metrics for {seconds} s");
    let server = tokio::spawn(serve(listener, recorder.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut n = 0_u64;
    while tokio::time::Instant::now() < deadline {
        n += 1;
        let id = i64::try_from(n % 100).unwrap_or(0) + 1;
        // Entity-first reads: the pool loads misses itself, and the sampler can reload sampled hits.
        let _item: Option<Item> = pool.get::<Item>(&id).await?;
        if n.is_multiple_of(10) {
            sqlx::query("UPDATE items SET version = version + 1 WHERE id = $1")
                .bind(id)
                .execute(&pool)
                .await?;
        }
        if n.is_multiple_of(25) {
            // A foreign write: delivered by the relay.
            sqlx::query("UPDATE items SET version = version + 1 WHERE id = $1")
                .bind(id)
                .execute(&plain)
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.abort();
    pool.close().await;
    Ok(())
}
