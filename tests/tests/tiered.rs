//! The two-tier store (`TieredStore`): an in-process tier in front of Redis, kept consistent by the
//! invalidation fan-out. Real Redis servers: the shared one under a prefix of its own, and servers of the
//! test's own for faults (a killed subscription, a paused server).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use cache_runtime::{Cache, CachedEntity, Key, LoadOptions, RedisStore, Store, TieredStore, key};
use tests::{RedisServer, TestPrefix};

#[derive(Debug, Clone, CachedEntity, serde::Serialize, serde::Deserialize)]
#[cached_entity(table = "items", key = "item:<id>", depends = ["item:<id>:page"], ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

async fn tiered(url: &str, prefix: &str) -> TieredStore {
    let store = TieredStore::connect(url, prefix.to_owned())
        .await
        .expect("connect TieredStore");
    assert!(
        store.ready(Duration::from_secs(5)).await,
        "the in-process tier serves once subscribed"
    );
    store
}

/// Reads `item:<id>` through `cache`, loading the current value of `source`.
async fn read(cache: &Cache, id: i64, source: &AtomicI64) -> i64 {
    let version = source.load(Ordering::SeqCst);
    cache
        .get_or_load(key!("item:<id>", id = id), || async move {
            Ok::<_, std::convert::Infallible>(version)
        })
        .await
        .expect("read")
}

/// Reads until `cache` returns `want`, for at most a second; returns whether it did.
async fn sees(cache: &Cache, id: i64, source: &AtomicI64, want: i64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < deadline {
        if read(cache, id, source).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

#[tokio::test]
async fn the_tiered_store_conforms() {
    let prefix = TestPrefix::create("tiered_conformance").await;
    let store = tiered(&tests::redis_url(), &prefix.prefix).await;
    cache_runtime::store::conformance::check(&store, "")
        .await
        .expect("TieredStore conforms");
    let shared: Arc<dyn Store> = Arc::new(store);
    cache_runtime::store::conformance::check(&shared, "shared:")
        .await
        .expect("a shared TieredStore conforms");
}

/// A second read is answered by the in-process tier, without Redis: a value planted in Redis behind the
/// tier's back is not seen (nothing ever writes Redis that way; it shows where the hit came from).
#[tokio::test]
async fn hits_are_answered_in_process() {
    let prefix = TestPrefix::create("tiered_hits").await;
    let store = tiered(&tests::redis_url(), &prefix.prefix).await;
    let cache = Cache::new(store.clone());
    let source = AtomicI64::new(1);
    assert_eq!(read(&cache, 1, &source).await, 1, "a miss loads");
    let before = store.stats().hits;
    assert_eq!(read(&cache, 1, &source).await, 1, "then hits");
    assert_eq!(
        store.stats().hits,
        before + 1,
        "answered by the in-process tier"
    );
    prefix.set("item:1", "not an entry").await;
    assert_eq!(read(&cache, 1, &source).await, 1, "Redis was not asked");
    assert_eq!(store.stats().hits, before + 2);
}

/// Invalidations of the writing instance, of another tiered instance and of a plain `RedisStore` (a relay,
/// a pool without the tier) remove the key from every instance's tier: the writer reads its write at once,
/// the others within the fan-out delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_from_every_writer_reach_every_tier() {
    let prefix = TestPrefix::create("tiered_fanout").await;
    let url = tests::redis_url();
    let (a, b) = (
        tiered(&url, &prefix.prefix).await,
        tiered(&url, &prefix.prefix).await,
    );
    let plain = RedisStore::connect(&url, prefix.prefix.clone())
        .await
        .expect("connect RedisStore");
    let (ca, cb) = (Cache::new(a.clone()), Cache::new(b.clone()));
    let source = AtomicI64::new(1);
    assert_eq!(read(&ca, 7, &source).await, 1);
    assert_eq!(read(&cb, 7, &source).await, 1);
    let hits = (a.stats().hits, b.stats().hits);
    assert_eq!(read(&ca, 7, &source).await, 1);
    assert_eq!(read(&cb, 7, &source).await, 1);
    assert_eq!(
        (a.stats().hits, b.stats().hits),
        (hits.0 + 1, hits.1 + 1),
        "both in process"
    );

    source.store(2, Ordering::SeqCst);
    cb.invalidate([key!("item:<id>", id = 7).as_str()])
        .await
        .expect("invalidate");
    assert_eq!(
        read(&cb, 7, &source).await,
        2,
        "the writer reads its write at once"
    );
    assert!(
        sees(&ca, 7, &source, 2).await,
        "another instance's tier lost the key"
    );

    for (id, _) in [(7, ()), (7, ())] {
        assert_eq!(read(&ca, id, &source).await, 2);
        assert_eq!(read(&cb, id, &source).await, 2);
    }
    source.store(3, Ordering::SeqCst);
    plain
        .invalidate(&[key!("item:<id>", id = 7).into_string()])
        .await
        .expect("plain invalidate");
    assert!(
        sees(&ca, 7, &source, 3).await,
        "a plain store's invalidation reaches A"
    );
    assert!(sees(&cb, 7, &source, 3).await, "and B");
}

/// Reads a page tagged with the key of row `row` through `cache`.
async fn page(cache: &Cache, id: i64, row: i64, source: &AtomicI64) -> i64 {
    let version = source.load(Ordering::SeqCst);
    cache
        .get_or_load_tagged(
            key!("item:<id>:page", id = id),
            LoadOptions::new(),
            || async move {
                let tags: Vec<Key> = vec![key!("item:<id>", id = row)];
                Ok::<_, std::convert::Infallible>((version, tags))
            },
        )
        .await
        .expect("page")
}

/// Tags and namespaces work through both tiers: a tagged entry held in an instance's tier stops
/// validating when another process invalidates its tag, or its whole namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_namespaces_invalidate_through_both_tiers() {
    let prefix = TestPrefix::create("tiered_tags").await;
    let url = tests::redis_url();
    let a = tiered(&url, &prefix.prefix).await;
    let plain = RedisStore::connect(&url, prefix.prefix.clone())
        .await
        .expect("connect RedisStore");
    let ca = Cache::new(a.clone());
    let source = AtomicI64::new(1);
    // The first load creates the tag's token and does not store (see `get_or_load_tagged`); the second
    // stores.
    assert_eq!(page(&ca, 1, 9, &source).await, 1);
    assert_eq!(page(&ca, 1, 9, &source).await, 1);
    let hits = a.stats().hits;
    assert_eq!(page(&ca, 1, 9, &source).await, 1);
    assert!(a.stats().hits > hits, "the tagged page is held in process");

    source.store(2, Ordering::SeqCst);
    plain
        .invalidate(&[key!("item:<id>", id = 9).into_string()])
        .await
        .expect("invalidate the tag");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while page(&ca, 1, 9, &source).await != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tag's invalidation reached the tier"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(page(&ca, 1, 9, &source).await, 2);

    source.store(3, Ordering::SeqCst);
    plain
        .invalidate(&[Item::META.key.shape().to_owned()])
        .await
        .expect("invalidate the namespace");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while page(&ca, 1, 9, &source).await != 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the namespace's invalidation reached the tier"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A dropped subscription flushes the tier and bypasses it until the subscription is back and a
/// heartbeat came through it; a paused server (no heartbeat back) stops the tier from serving within
/// `max_lag`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_channel_flushes_and_bypasses_the_tier() {
    let server = RedisServer::start();
    let url = server.url();
    let a = tiered(&url, "t:").await;
    let ca = Cache::new(a.clone());
    let source = AtomicI64::new(1);
    read(&ca, 1, &source).await;
    read(&ca, 1, &source).await;
    let before = a.stats();
    assert!(before.hits >= 1);

    let killed = server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed, "int(1)", "one subscription");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while a.stats().flushes == before.flushes {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the drop flushed the tier"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        a.ready(Duration::from_secs(5)).await,
        "the tier serves again once resubscribed"
    );
    let hits = a.stats().hits;
    read(&ca, 1, &source).await;
    assert_eq!(a.stats().hits, hits, "the flushed entry came from Redis");
    read(&ca, 1, &source).await;
    assert_eq!(a.stats().hits, hits + 1, "then from the tier again");

    server.pause();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let serving = a.serving();
    server.resume();
    assert!(
        !serving,
        "no heartbeat back for longer than max_lag: the tier does not serve"
    );
    assert!(
        a.ready(Duration::from_secs(5)).await,
        "and serves again once heartbeats come back"
    );
}

/// A read given another instance's write token is not answered by this instance's tier, which the
/// write's fan-out has not reached yet (its subscription stalls behind a proxy that holds every byte):
/// a read without the token still gets the old value from the tier (the bound allows it), the read with
/// the token gets the write. Real PostgreSQL and a Redis server of the test's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_read_skips_a_tier_the_fan_out_has_not_reached() {
    use cache_runtime::{CachedPgPool, Registry};
    let server = RedisServer::start();
    let proxy = tests::TcpProxy::start(server.port).await;
    let db = tests::TestDb::create("tier_token").await;
    let plain = db.pool().await;
    sqlx::raw_sql(
        "CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL); INSERT INTO items VALUES (1, 1);",
    )
    .execute(&plain)
    .await
    .expect("schema");
    let connect = |store: Arc<dyn Store>| {
        CachedPgPool::options()
            .registry(Registry::new([Item::META]))
            .auto_install(true)
            .connect(&db.url, store)
    };
    let l2 = RedisStore::connect(&server.url(), "tok:".to_owned())
        .await
        .expect("redis");
    let tier = TieredStore::builder()
        .max_lag(Duration::from_secs(30))
        .build(l2, redis::Client::open(proxy.redis_url()).expect("client"));
    assert!(tier.ready(Duration::from_secs(5)).await, "subscribed");
    let reader = connect(Arc::new(tier.clone())).await.expect("reader pool");
    let writer_store = RedisStore::connect(&server.url(), "tok:".to_owned())
        .await
        .expect("redis");
    let writer = connect(Arc::new(writer_store)).await.expect("writer pool");
    let version = |pool: &CachedPgPool, token: Option<cache_runtime::token::WriteToken>| {
        let pool = pool.clone();
        async move {
            let loader = || async {
                sqlx::query_scalar::<_, i64>("SELECT version FROM items WHERE id = 1")
                    .fetch_one(pool.sqlx_pool())
                    .await
            };
            let key = key!("item:<id>", id = 1);
            match token {
                Some(token) => pool.cache().get_or_load_after(token, key, loader).await,
                None => pool.cache().get_or_load(key, loader).await,
            }
            .expect("read")
        }
    };
    assert_eq!(version(&reader, None).await, 1);
    assert_eq!(version(&reader, None).await, 1);
    let hits = tier.stats().hits;
    assert!(hits >= 1, "the second read came from the tier");

    proxy.hold();
    let mut tx = writer.begin().await.expect("begin");
    sqlx::query("UPDATE items SET version = 2 WHERE id = 1")
        .execute(&mut *tx)
        .await
        .expect("write");
    let token = tx.commit_with_token().await.expect("commit");
    assert!(token.acknowledged(), "{token}");
    assert_eq!(
        version(&reader, None).await,
        1,
        "control: without the token, the stalled tier still answers (within max_lag)"
    );
    assert_eq!(version(&reader, Some(token)).await, 2, "the token's read");
    proxy.release();
    assert!(
        tier.ready(Duration::from_secs(5)).await,
        "the fan-out arrives once released"
    );
    assert_eq!(version(&reader, None).await, 2);
    reader.close().await;
    writer.close().await;
}
