//! The spans of the write path carry OpenTelemetry's database attributes (`db.system.name`,
//! `db.operation.name`), as an OpenTelemetry layer would export them: recorded here by a subscriber of the
//! test's own, on a transaction committed through the pool and a foreign write delivered by the relay.
//! Real PostgreSQL and Redis.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_runtime::{CachedEntity, CachedPgPool, RedisStore, Registry};
use serde::{Deserialize, Serialize};
use tests::{TestDb, TestPrefix};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// A versioned row.
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

/// Every span's name and fields (as text).
type Spans = Arc<Mutex<Vec<(String, BTreeMap<String, String>)>>>;

/// A subscriber that records the spans of cache-runtime.
#[derive(Debug, Default)]
struct Recorder {
    spans: Spans,
    next: AtomicU64,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("cache_runtime")
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = BTreeMap::new();
        span.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().expect("lock");
        spans.push((span.metadata().name().to_owned(), fields));
        let _ = self.next.fetch_add(1, Ordering::Relaxed);
        Id::from_u64(spans.len() as u64)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut spans = self.spans.lock().expect("lock");
        let index = usize::try_from(span.into_u64()).expect("id") - 1;
        values.record(&mut Fields(&mut spans[index].1));
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn attributes(spans: &Spans, name: &str) -> Vec<BTreeMap<String, String>> {
    spans
        .lock()
        .expect("lock")
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, f)| f.clone())
        .collect()
}

/// On one thread (`current_thread`), so that the subscriber set for this test sees every task's spans.
#[tokio::test(flavor = "current_thread")]
async fn write_path_spans_carry_opentelemetry_database_attributes() {
    let recorder = Recorder::default();
    let spans = Arc::clone(&recorder.spans);
    let _guard = tracing::subscriber::set_default(recorder);
    let db = TestDb::create("telemetry").await;
    let plain = db.pool().await;
    sqlx::raw_sql("CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL); INSERT INTO items VALUES (1, 1);")
        .execute(&plain)
        .await
        .expect("schema");
    let prefix = TestPrefix::create("telemetry").await;
    let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .expect("redis");
    let pool = CachedPgPool::options()
        .registry(Registry::new([Item::META]))
        .auto_install(true)
        .connect(&db.url, store)
        .await
        .expect("connect");
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("UPDATE items SET version = 2 WHERE id = 1")
        .execute(&mut *tx)
        .await
        .expect("write");
    tx.commit().await.expect("commit");
    let commit = attributes(&spans, "cache.commit");
    assert_eq!(commit.len(), 1, "{commit:?}");
    assert_eq!(
        commit[0].get("db.system.name").map(String::as_str),
        Some("postgresql")
    );
    assert_eq!(
        commit[0].get("db.operation.name").map(String::as_str),
        Some("COMMIT")
    );
    let invalidate = attributes(&spans, "cache.invalidate");
    assert!(!invalidate.is_empty(), "no cache.invalidate span");
    assert_eq!(
        invalidate[0].get("db.system.name").map(String::as_str),
        Some("redis")
    );
    assert_eq!(
        invalidate[0].get("db.operation.name").map(String::as_str),
        Some("UNLINK")
    );

    // A foreign write: the relay's batch span names the database too.
    sqlx::query("UPDATE items SET version = 3 WHERE id = 1")
        .execute(&plain)
        .await
        .expect("foreign write");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pool
        .get::<Item>(&1)
        .await
        .expect("read")
        .expect("row")
        .version
        != 3
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay never delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let batches = attributes(&spans, "cache.relay_batch");
    assert!(!batches.is_empty(), "no relay batch span");
    assert!(
        batches
            .iter()
            .all(|b| b.get("db.system.name").map(String::as_str) == Some("postgresql")),
        "{batches:?}"
    );
    pool.close().await;
}
