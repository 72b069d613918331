//! The moka-style read calls (`get_with`, `try_get_with`, `optionally_get_with`), the per-call opt-out of
//! negative caching, and invalidation by hand through the outbox (`CachedPool::invalidate`), against the
//! real servers: Redis (a prefix of its own, or a `redis-server` of its own for the outage) and both
//! databases.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::{Cache, CachedEntity, CachedPool, LoadOptions, RedisStore, Registry, key};
use serde::{Deserialize, Serialize};
use tests::{RedisServer, TcpProxy, TestPrefix};

/// A versioned row.
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", depends = ["item:<id>:label"], ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

async fn redis_cache(hint: &str) -> (Cache, TestPrefix) {
    let prefix = TestPrefix::create(hint).await;
    let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .expect("connect");
    (Cache::new(store), prefix)
}

/// Counts the calls of a loader.
fn calls() -> (Arc<AtomicUsize>, impl Fn() -> usize) {
    let calls = Arc::new(AtomicUsize::new(0));
    let read = Arc::clone(&calls);
    (calls, move || read.load(Ordering::SeqCst))
}

#[tokio::test]
async fn get_with_loads_once_and_needs_no_error_type() {
    let (cache, _prefix) = redis_cache("get_with").await;
    let (counter, count) = calls();
    for _ in 0..3 {
        let counter = Arc::clone(&counter);
        let got: i64 = cache
            .get_with(key!("item:<id>", id = 1), || async move {
                counter.fetch_add(1, Ordering::SeqCst);
                41
            })
            .await;
        assert_eq!(got, 41);
    }
    assert_eq!(count(), 1, "one load, then hits");
    // A `&Key` works as well as a `Key`.
    let k = key!("item:<id>", id = 1);
    assert_eq!(cache.get_with(&k, || async { 0_i64 }).await, 41);
}

#[tokio::test]
async fn try_get_with_caches_values_never_errors() {
    let (cache, _prefix) = redis_cache("try_get_with").await;
    let (counter, count) = calls();
    let failing = {
        let counter = Arc::clone(&counter);
        cache
            .try_get_with(key!("item:<id>", id = 2), || async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Err::<i64, _>(std::io::Error::other("database down"))
            })
            .await
    };
    assert_eq!(failing.expect_err("the error").to_string(), "database down");
    for _ in 0..2 {
        let counter = Arc::clone(&counter);
        let got = cache
            .try_get_with(key!("item:<id>", id = 2), || async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(7_i64)
            })
            .await
            .expect("value");
        assert_eq!(got, 7);
    }
    assert_eq!(count(), 2, "the error was not cached; the value was");
}

#[tokio::test]
async fn optionally_get_with_does_not_cache_none() {
    let (cache, _prefix) = redis_cache("optionally").await;
    let (counter, count) = calls();
    let read = |value: Option<i64>| {
        let counter = Arc::clone(&counter);
        let cache = cache.clone();
        async move {
            cache
                .optionally_get_with(key!("item:<id>", id = 3), || async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    value
                })
                .await
        }
    };
    assert_eq!(read(None).await, None);
    assert_eq!(read(None).await, None);
    assert_eq!(count(), 2, "None was not cached: loaded again");
    assert_eq!(read(Some(5)).await, Some(5));
    assert_eq!(read(None).await, Some(5), "Some is cached");
    assert_eq!(count(), 3);
    // The entry is an `Option<i64>`: a `get_or_load` of that type shares it.
    let shared: Option<i64> = cache
        .get_or_load(key!("item:<id>", id = 3), || async {
            Ok::<_, std::io::Error>(None)
        })
        .await
        .expect("read");
    assert_eq!(shared, Some(5));
}

#[tokio::test]
async fn cache_none_false_opts_one_call_out_of_tombstones() {
    let (cache, _prefix) = redis_cache("cache_none").await;
    let (counter, count) = calls();
    for cache_none in [false, false, true, true] {
        let counter = Arc::clone(&counter);
        let got: Option<i64> = cache
            .get_or_load_with(
                key!("item:<id>", id = 4),
                LoadOptions::new().cache_none(cache_none),
                || async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(None)
                },
            )
            .await
            .expect("read");
        assert_eq!(got, None);
    }
    assert_eq!(
        count(),
        3,
        "two uncached misses, then one tombstone that answers the last read"
    );
    assert_eq!(cache.stats().fills, 1);
}

/// An article, whose page is rendered per viewer (`favorited`, `following`), and whose category's list is
/// paged: variant keys of its key and of a `depends` template.
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(
    table = "articles",
    key = "article:<slug>",
    depends = ["topic:<topic_id>:articles"],
    variants = ["article:<slug>:as:<viewer>", "topic:<topic_id>:articles:page:<page>"]
)]
struct Article {
    slug: String,
    topic_id: i64,
    title: String,
}

tests::on_both_backends! {
    async fn items(hint: &str) -> (TestDatabase, sqlx::Pool<Db>) {
        let db = TestDatabase::create(hint).await;
        let plain = db.pool().await;
        sqlx::raw_sql(
            "CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL);
             INSERT INTO items VALUES (1, 1);",
        )
        .execute(&plain)
        .await
        .expect("schema");
        (db, plain)
    }

    async fn pool(db: &TestDatabase, store: RedisStore) -> CachedPool<Db> {
        CachedPool::<Db>::options()
            .registry(Registry::new([Item::META]))
            .auto_install(true)
            .connect(&db.url, store)
            .await
            .expect("connect")
    }

    /// A label derived from data outside the database, cached under `item:<id>:label`.
    async fn label(pool: &CachedPool<Db>, text: &str) -> String {
        let text = text.to_owned();
        pool.cache()
            .get_with(key!("item:<id>:label", id = 1), || async move { text })
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalidate_goes_through_the_outbox_and_is_delivered_before_it_returns() {
        let (db, plain) = items("invalidate").await;
        let prefix = TestPrefix::create("invalidate").await;
        let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
            .await
            .expect("redis");
        let pool = pool(&db, store).await;
        assert_eq!(label(&pool, "v1").await, "v1");
        assert_eq!(label(&pool, "v2").await, "v1", "cached");
        pool.invalidate(key!("item:<id>:label", id = 1)).await.expect("invalidate");
        assert_eq!(label(&pool, "v2").await, "v2", "delivered before the call returned");
        // In a transaction: only if it commits.
        let mut tx = pool.begin().await.expect("begin");
        tx.invalidate_many([key!("item:<id>:label", id = 1), key!("item:<id>", id = 1)])
            .await
            .expect("invalidate");
        tx.rollback().await.expect("rollback");
        assert_eq!(label(&pool, "v3").await, "v2", "a rolled-back invalidation is nothing");
        let mut tx = pool.begin().await.expect("begin");
        tx.invalidate(key!("item:<id>:label", id = 1)).await.expect("invalidate");
        tx.commit().await.expect("commit");
        assert_eq!(label(&pool, "v3").await, "v3");
        let outbox: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            if BACKEND == "postgres" { "cache_invalidation.outbox" } else { "cache_invalidation_outbox" }
        )))
        .fetch_one(&plain)
        .await
        .expect("outbox");
        assert!(outbox <= 2, "delivered rows are deleted (at most the last ones are still queued)");
    }

    /// With the store unreachable, the invalidation is kept in the outbox, the read gate closes (reads go
    /// to the loader), and the relay delivers it once the store is back: never lost, unlike
    /// `Cache::invalidate`. The store is reached through a proxy that the test cuts (dropping every
    /// connection, so nothing sent meanwhile reaches the server).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalidate_survives_a_store_outage() {
        let (db, _plain) = items("invalidate_outage").await;
        let server = RedisServer::start();
        let proxy = TcpProxy::start(server.port).await;
        let store = RedisStore::connect(&proxy.redis_url(), "outage:").await.expect("redis");
        let pool = pool(&db, store).await;
        let reopened = || async {
            let deadline = Instant::now() + Duration::from_secs(10);
            while pool.cache().gate_closed() {
                assert!(Instant::now() < deadline, "the gate did not reopen");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        assert_eq!(label(&pool, "v1").await, "v1");
        proxy.switch(dead_port());
        pool.invalidate(key!("item:<id>:label", id = 1)).await.expect("Ok: the key is in the outbox");
        assert!(pool.cache().gate_closed(), "reads bypass the store until the key is delivered");
        assert_eq!(label(&pool, "v2").await, "v2", "the loader answers meanwhile");
        proxy.switch(server.port);
        reopened().await;
        assert_eq!(label(&pool, "v3").await, "v3", "the old entry was invalidated by the relay");
        // Control: the same through `Cache::invalidate` (one store call) is lost. (The first reads after
        // the outage may bypass the store while its new connection is checked: wait until one is cached.)
        let cached = settled(&pool, "v4").await;
        proxy.switch(dead_port());
        let lost = pool.cache().invalidate([key!("item:<id>:label", id = 1)]).await;
        assert!(lost.is_err(), "the store call failed");
        proxy.switch(server.port);
        reopened().await;
        assert_eq!(settled(&pool, "v6").await, cached, "nothing redelivers a store call");
    }

    /// The cached label once reads hit again after an outage (the first reads on a new store connection
    /// bypass the store while it is checked): a value that two reads with other loaders both return.
    async fn settled(pool: &CachedPool<Db>, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let first = label(pool, text).await;
            if label(pool, &format!("{text}'")).await == first {
                return first;
            }
            assert!(Instant::now() < deadline, "nothing was cached after the outage");
        }
    }

    /// A loopback port nothing listens on.
    fn dead_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port")
    }

    async fn articles(hint: &str) -> (TestDatabase, sqlx::Pool<Db>, CachedPool<Db>, TestPrefix) {
        let db = TestDatabase::create(hint).await;
        let plain = db.pool().await;
        sqlx::raw_sql(
            "CREATE TABLE articles (slug text PRIMARY KEY, topic_id bigint NOT NULL, title text NOT NULL);
             INSERT INTO articles VALUES ('leases', 1, 'Leases'), ('tags', 1, 'Tags'), ('other', 2, 'Other');",
        )
        .execute(&plain)
        .await
        .expect("schema");
        let prefix = TestPrefix::create(hint).await;
        let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
            .await
            .expect("redis");
        let pool = CachedPool::<Db>::options()
            .registry(Registry::new([Article::META]))
            .auto_install(true)
            .connect(&db.url, store)
            .await
            .expect("connect");
        (db, plain, pool, prefix)
    }

    /// The page of `slug` as `viewer` sees it: its title, and a per-viewer mark (`text`, standing for what
    /// the loader would compute for that viewer).
    async fn page(pool: &CachedPool<Db>, slug: &str, viewer: i64, text: &str) -> String {
        let loaded = format!("{text} for {viewer}");
        let (pool2, slug2) = (pool.clone(), slug.to_owned());
        pool.cache()
            .try_get_with(key!("article:<slug>:as:<viewer>", slug = slug, viewer = viewer), || async move {
                let title: String = sqlx::query_scalar("SELECT title FROM articles WHERE slug = $1")
                    .bind(slug2)
                    .fetch_one(pool2.sqlx_pool())
                    .await?;
                Ok::<_, sqlx::Error>(format!("{title}: {loaded}"))
            })
            .await
            .expect("page")
    }

    async fn list_page(pool: &CachedPool<Db>, topic: i64, page: i64, text: &str) -> String {
        let text = text.to_owned();
        pool.cache()
            .get_with(key!("topic:<topic_id>:articles:page:<page>", topic_id = topic, page = page), || async move { text })
            .await
    }

    /// Every viewer's page of an article is invalidated by a write to the article, in one store operation
    /// (the variants are tagged with the article's key), and only that article's; pages of a topic's list
    /// by a write to any article of the topic; every variant by `TRUNCATE`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn variant_keys_are_invalidated_with_their_base() {
        let (_db, _plain, pool, _prefix) = articles("variants").await;
        for viewer in 1..=3 {
            assert_eq!(page(&pool, "leases", viewer, "v1").await, format!("Leases: v1 for {viewer}"));
            assert_eq!(page(&pool, "leases", viewer, "v2").await, format!("Leases: v1 for {viewer}"), "cached");
        }
        assert_eq!(page(&pool, "tags", 1, "v1").await, "Tags: v1 for 1");
        for page_no in 1..=2 {
            assert_eq!(list_page(&pool, 1, page_no, "l1").await, "l1");
        }
        assert_eq!(list_page(&pool, 2, 1, "l1").await, "l1");
        sqlx::query("UPDATE articles SET title = 'Leases!' WHERE slug = 'leases'")
            .execute(&pool)
            .await
            .expect("write");
        for viewer in 1..=3 {
            assert_eq!(
                page(&pool, "leases", viewer, "v2").await,
                format!("Leases!: v2 for {viewer}"),
                "every viewer's page of the written article was invalidated"
            );
        }
        assert_eq!(page(&pool, "tags", 1, "v2").await, "Tags: v1 for 1", "another article's stays");
        for page_no in 1..=2 {
            assert_eq!(list_page(&pool, 1, page_no, "l2").await, "l2", "the written article's topic pages");
        }
        assert_eq!(list_page(&pool, 2, 1, "l2").await, "l1", "another topic's pages stay");
        sqlx::query(if BACKEND == "postgres" { "TRUNCATE articles" } else { "DELETE FROM articles" })
            .execute(&pool)
            .await
            .expect("truncate");
        assert_eq!(list_page(&pool, 2, 1, "l3").await, "l3", "TRUNCATE (or a delete of all) reaches variants");
    }
}
