//! The read side against the real servers: `get_or_load` with leases, single-flight, tombstones, errors,
//! TTLs, undecodable entries, namespaces and tags, and the stale-set race, on both stores.
//!
//! Every body is generic over the store and runs twice: on Redis (a key prefix of its own) and on the
//! in-process store. Bodies that use a database run on both backends too (PostgreSQL and SQLite, one body:
//! `tests::on_both_backends!`), so on four combinations. Last, a SQLite write by another client (a plain
//! `SqlitePool`) races with reads: after the relay's sweep no read returns the old value.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cache_runtime::outbox::RelayConfig;
use cache_runtime::store::{LeaseRequest, Slot};
use cache_runtime::{
    Cache, CachedEntity, CachedSqlitePool, LoadOptions, MemoryStore, RedisStore, Registry, Store,
    key,
};
use serde::{Deserialize, Serialize};
use tests::TestPrefix;
use tests::checker::{self, Config};
use tokio::sync::oneshot;

/// A versioned row.
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

/// An author, whose name appears on article pages.
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "authors", key = "author:<id>")]
struct Author {
    id: i64,
    name: String,
}

/// An article; its rendered page (a join with the author) is cached under `article:<id>:page`.
#[derive(Debug, Clone, PartialEq, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "articles", key = "article:<id>", depends = ["article:<id>:page"])]
struct Article {
    id: i64,
    author_id: i64,
    title: String,
}

/// One store under test, and what a test needs around it.
struct Env {
    store: Arc<dyn Store>,
    /// The Redis prefix (cleaned on drop); `None` for the in-process store.
    prefix: Option<TestPrefix>,
}

impl Env {
    async fn redis(hint: &str) -> Self {
        let prefix = TestPrefix::create(hint).await;
        let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
            .await
            .expect("connect");
        Self {
            store: Arc::new(store),
            prefix: Some(prefix),
        }
    }

    fn memory() -> Self {
        Self {
            store: Arc::new(MemoryStore::new(10_000)),
            prefix: None,
        }
    }

    fn cache(&self) -> Cache {
        Cache::builder(Arc::clone(&self.store)).build()
    }

    /// A cache standing for another process: its own Redis connection (the in-process store can only be
    /// shared, so it gets a cache of its own on the same store: separate single-flight, shared leases).
    async fn other_process(&self) -> Cache {
        match &self.prefix {
            Some(prefix) => Cache::new(
                RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
                    .await
                    .expect("connect"),
            ),
            None => self.cache(),
        }
    }

    /// Writes raw bytes into a key's value slot, through the store's own lease.
    async fn put_raw(&self, key: &str, bytes: &[u8]) {
        let lease = LeaseRequest {
            token: "raw",
            ttl: Duration::from_secs(5),
            replace: None,
        };
        let got = self
            .store
            .lookup(key, lease, &[], Duration::from_secs(60))
            .await
            .expect("lookup");
        assert!(matches!(got.slot, Slot::Acquired { .. }), "{got:?}");
        assert!(
            self.store
                .fill(key, "raw", bytes, Duration::from_secs(60))
                .await
                .expect("fill")
        );
    }
}

/// Runs each generic body on Redis and on the in-process store.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Env::redis(stringify!($name)).await).await;
                }
            )*
        }
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Env::memory()).await;
                }
            )*
        }
    };
}

on_both_stores!(
    hits_after_a_load_and_caches_none_as_a_tombstone,
    loader_errors_reach_every_waiter_and_are_not_cached,
    entries_expire_after_their_ttl,
    undecodable_entries_are_misses_replaced_and_counted,
    a_namespace_shape_invalidates_every_key_of_that_shape,
    declared_tags_invalidate_the_value,
    tags_found_by_the_loader_invalidate_the_value,
    stampede_in_one_process_loads_once,
    stampede_across_four_handles_loads_once,
    a_lease_whose_holder_vanished_delays_readers_only_boundedly,
    get_entity_reads_an_entity_by_its_key,
);

/// A loader that counts its calls and returns `value`.
fn counted<V: Clone>(
    calls: &Arc<AtomicUsize>,
    value: V,
) -> impl FnOnce() -> std::future::Ready<Result<V, std::io::Error>> {
    let calls = Arc::clone(calls);
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(value))
    }
}

fn item_key(id: i64) -> cache_runtime::Key {
    key!("item:<id>", id = id)
}

async fn hits_after_a_load_and_caches_none_as_a_tombstone(env: &Env) {
    let cache = env.cache();
    let calls = Arc::new(AtomicUsize::new(0));
    let none: Option<Item> = None;
    let got = cache
        .get_or_load(item_key(1), counted(&calls, none.clone()))
        .await
        .expect("load");
    assert_eq!(got, None);
    let got = cache
        .get_or_load(
            item_key(1),
            counted(&calls, Some(Item { id: 1, version: 9 })),
        )
        .await
        .expect("load");
    assert_eq!(got, None, "the tombstone answers");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The INSERT that creates the row invalidates its key: the tombstone goes.
    cache
        .invalidate(&["item:1".to_owned()])
        .await
        .expect("invalidate");
    let row = Some(Item { id: 1, version: 1 });
    let got = cache
        .get_or_load(item_key(1), counted(&calls, row.clone()))
        .await
        .expect("load");
    assert_eq!(got, row);
    let got = cache
        .get_or_load(item_key(1), counted(&calls, none))
        .await
        .expect("load");
    assert_eq!(got, row, "the row is cached now");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let stats = cache.stats();
    assert_eq!(
        (stats.loads, stats.fills, stats.hits),
        (2, 2, 2),
        "{stats:?}"
    );
}

#[derive(Debug, thiserror::Error)]
#[error("database unavailable")]
struct DbDown;

async fn loader_errors_reach_every_waiter_and_are_not_cached(env: &Env) {
    let cache = env.cache();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Arc::new(tokio::sync::Barrier::new(50));
    for _ in 0..50 {
        let (cache, calls, start) = (cache.clone(), Arc::clone(&calls), Arc::clone(&start));
        tasks.spawn(async move {
            start.wait().await;
            cache
                .get_or_load(item_key(2), || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err::<Option<Item>, _>(DbDown)
                })
                .await
        });
    }
    let mut errors = 0;
    while let Some(result) = tasks.join_next().await {
        let err = result.expect("task").expect_err("the loader failed");
        assert_eq!(err.to_string(), "database unavailable");
        errors += 1;
    }
    assert_eq!(errors, 50, "every waiter gets the error");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one load for all waiters");

    // Not cached: the next read loads again.
    let row = Some(Item { id: 2, version: 1 });
    let got = cache
        .get_or_load(item_key(2), counted(&calls, row.clone()))
        .await
        .expect("load");
    assert_eq!(got, row);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(cache.stats().load_errors, 1);
}

async fn entries_expire_after_their_ttl(env: &Env) {
    let cache = env.cache();
    let calls = Arc::new(AtomicUsize::new(0));
    let options = LoadOptions::new().ttl(Duration::from_millis(800));
    for _ in 0..2 {
        cache
            .get_or_load_with(item_key(3), options.clone(), counted(&calls, 1_i64))
            .await
            .expect("load");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "hit before the TTL");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cache
        .get_or_load_with(item_key(3), options.clone(), counted(&calls, 1_i64))
        .await
        .expect("load");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "miss after the TTL");
}

async fn undecodable_entries_are_misses_replaced_and_counted(env: &Env) {
    let cache = env.cache();
    let calls = Arc::new(AtomicUsize::new(0));
    // Raw garbage under the key.
    env.put_raw("item:4", b"garbage").await;
    let got = cache
        .get_or_load(item_key(4), counted(&calls, 7_i64))
        .await
        .expect("load");
    assert_eq!(got, 7);
    assert_eq!(cache.stats().undecodable, 1);
    let got = cache
        .get_or_load(item_key(4), counted(&calls, 8_i64))
        .await
        .expect("load");
    assert_eq!(got, 7, "the garbage was replaced by a good entry");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // A well-formed entry of another type (the struct changed between versions).
    let got: Vec<bool> = cache
        .get_or_load(item_key(4), counted(&calls, vec![true]))
        .await
        .expect("load");
    assert_eq!(got, [true]);
    assert_eq!(cache.stats().undecodable, 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

async fn a_namespace_shape_invalidates_every_key_of_that_shape(env: &Env) {
    let cache = env.cache();
    let calls = Arc::new(AtomicUsize::new(0));
    let author = key!("author:<id>", id = 1);
    for round in 0..2 {
        for id in [5, 6] {
            cache
                .get_or_load(item_key(id), counted(&calls, id))
                .await
                .expect("load");
        }
        cache
            .get_or_load(author.clone(), counted(&calls, 0_i64))
            .await
            .expect("load");
        assert_eq!(calls.load(Ordering::SeqCst), 3, "round {round}: cached");
    }
    // TRUNCATE items: one O(1) invalidation for the whole shape.
    cache
        .invalidate(&["item:<>".to_owned()])
        .await
        .expect("invalidate");
    for id in [5, 6] {
        cache
            .get_or_load(item_key(id), counted(&calls, id))
            .await
            .expect("load");
    }
    cache
        .get_or_load(author, counted(&calls, 0_i64))
        .await
        .expect("load");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "items reload, authors do not"
    );
    assert_eq!(cache.stats().stale, 2);
}

fn page_key(id: i64) -> cache_runtime::Key {
    key!("article:<id>:page", id = id)
}

async fn declared_tags_invalidate_the_value(env: &Env) {
    let cache = env.cache();
    let calls = Arc::new(AtomicUsize::new(0));
    let options = LoadOptions::new().tag(key!("author:<id>", id = 3));
    let read = || {
        cache.get_or_load_with(
            page_key(1),
            options.clone(),
            counted(&calls, "page".to_owned()),
        )
    };
    read().await.expect("load");
    read().await.expect("load");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    cache
        .invalidate(&["author:3".to_owned()])
        .await
        .expect("invalidate");
    read().await.expect("load");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the author changed");
    cache
        .invalidate(&["author:4".to_owned()])
        .await
        .expect("invalidate");
    read().await.expect("load");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "another author: still valid"
    );
    cache
        .invalidate(&["author:<>".to_owned()])
        .await
        .expect("invalidate");
    read().await.expect("load");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the authors' namespace changed"
    );
}

async fn tags_found_by_the_loader_invalidate_the_value(env: &Env) {
    let cache = env.cache();
    let calls = Arc::new(AtomicUsize::new(0));
    let read = || {
        let calls = Arc::clone(&calls);
        cache.get_or_load_tagged(page_key(2), LoadOptions::new(), move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(("page".to_owned(), vec![key!("author:<id>", id = 8)]))
        })
    };
    read().await.expect("load");
    assert_eq!(
        cache.stats().fills_skipped,
        1,
        "a tag first seen after the load"
    );
    read().await.expect("load");
    read().await.expect("load");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "stored by the second load");
    cache
        .invalidate(&["author:8".to_owned()])
        .await
        .expect("invalidate");
    read().await.expect("load");
    assert_eq!(calls.load(Ordering::SeqCst), 3, "the author changed");
}

async fn stampede_in_one_process_loads_once(env: &Env) {
    let cache = env.cache();
    let calls = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let (cache, calls, start) = (cache.clone(), Arc::clone(&calls), Arc::clone(&start));
        tasks.spawn(async move {
            start.wait().await;
            cache
                .get_or_load(item_key(10), || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, std::io::Error>(Some(Item { id: 10, version: 1 }))
                })
                .await
        });
    }
    while let Some(result) = tasks.join_next().await {
        assert_eq!(
            result.expect("task").expect("load").map(|i| i.version),
            Some(1)
        );
    }
    let loads = calls.load(Ordering::SeqCst);
    eprintln!(
        "stampede ({}): 1000 concurrent cold reads in one process -> {loads} loader call(s); {:?}",
        kind(env),
        cache.stats()
    );
    assert_eq!(loads, 1);
}

fn kind(env: &Env) -> &'static str {
    if env.prefix.is_some() {
        "redis"
    } else {
        "in-process"
    }
}

async fn stampede_across_four_handles_loads_once(env: &Env) {
    let mut caches = Vec::new();
    for _ in 0..4 {
        caches.push(env.other_process().await);
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let cache = caches[i % 4].clone();
        let (calls, start) = (Arc::clone(&calls), Arc::clone(&start));
        tasks.spawn(async move {
            start.wait().await;
            cache
                .get_or_load(item_key(11), || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, std::io::Error>(Some(Item { id: 11, version: 1 }))
                })
                .await
        });
    }
    while let Some(result) = tasks.join_next().await {
        assert_eq!(
            result.expect("task").expect("load").map(|i| i.version),
            Some(1)
        );
    }
    let loads = calls.load(Ordering::SeqCst);
    let waits: u64 = caches.iter().map(|c| c.stats().lease_waits).sum();
    eprintln!(
        "stampede ({}): 1000 concurrent cold reads over 4 handles (Redis: separate connections) -> \
         {loads} loader call(s), {waits} lease wait(s)",
        kind(env)
    );
    assert_eq!(loads, 1);
}

/// A lease taken by a reader that then vanished (crashed process): readers wait at most `lease_wait`, load
/// without storing, and once the lease expires the key is cached again.
async fn a_lease_whose_holder_vanished_delays_readers_only_boundedly(env: &Env) {
    let lease = LeaseRequest {
        token: "crashed",
        ttl: Duration::from_millis(1500),
        replace: None,
    };
    let got = env
        .store
        .lookup("item:12", lease, &[], Duration::from_secs(60))
        .await
        .expect("lookup");
    assert!(matches!(got.slot, Slot::Acquired { .. }));
    let cache = Cache::builder(Arc::clone(&env.store))
        .lease_wait(Duration::from_millis(200))
        .build();
    let calls = Arc::new(AtomicUsize::new(0));
    let started = std::time::Instant::now();
    let planted = started;
    let got = cache
        .get_or_load(item_key(12), counted(&calls, 1_i64))
        .await
        .expect("load");
    let waited = started.elapsed();
    assert_eq!(got, 1);
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_millis(1400),
        "waited {waited:?}"
    );
    let stats = cache.stats();
    assert_eq!((stats.lease_timeouts, stats.fills), (1, 0), "{stats:?}");
    tokio::time::sleep(Duration::from_millis(1600).saturating_sub(planted.elapsed())).await;
    cache
        .get_or_load(item_key(12), counted(&calls, 1_i64))
        .await
        .expect("load");
    cache
        .get_or_load(item_key(12), counted(&calls, 1_i64))
        .await
        .expect("load");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "cached again after the lease expired"
    );
}

async fn get_entity_reads_an_entity_by_its_key(env: &Env) {
    let cache = env.cache();
    let calls = Arc::new(AtomicUsize::new(0));
    let author = Author {
        id: 9,
        name: "Ada".into(),
    };
    for _ in 0..2 {
        let got = cache
            .get_entity(
                Author::cache_key_for(&9),
                counted(&calls, Some(author.clone())),
            )
            .await
            .expect("load");
        assert_eq!(got.as_ref(), Some(&author));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

// --- the stale-set race, with a real database (PostgreSQL and SQLite) -------------------------------------

tests::on_both_backends! {
    on_both_stores!(
        stale_set_race_cannot_leave_a_stale_value,
        tag_invalidated_during_the_load_cannot_leave_a_stale_value,
    );

    async fn items_db() -> (TestDatabase, sqlx::Pool<Db>) {
        let db = TestDatabase::create("read").await;
        let pool = db.pool().await;
        sqlx::raw_sql(
            "CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL);
             INSERT INTO items VALUES (1, 1);
             CREATE TABLE authors (id bigint PRIMARY KEY, name text NOT NULL);
             INSERT INTO authors VALUES (1, 'old');
             CREATE TABLE articles (id bigint PRIMARY KEY, author_id bigint NOT NULL, title text NOT NULL);
             INSERT INTO articles VALUES (1, 1, 'Leases');",
        )
        .execute(&pool)
        .await
        .expect("schema");
        (db, pool)
    }

    async fn select_version(pool: &sqlx::Pool<Db>) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT version FROM items WHERE id = 1")
            .fetch_one(pool)
            .await
    }

    /// Commits a new version of item 1, then invalidates its key: what `CachedPool` does on commit.
    async fn write_item(pool: &sqlx::Pool<Db>, cache: &Cache) {
        sqlx::query("UPDATE items SET version = version + 1 WHERE id = 1")
            .execute(pool)
            .await
            .expect("update");
        cache
            .invalidate(&["item:1".to_owned()])
            .await
            .expect("invalidate");
    }

    /// A reader loads the old row; the writer commits and invalidates; then the reader's fill arrives.
    async fn stale_set_race_cannot_leave_a_stale_value(env: &Env) {
        let (_db, pool) = items_db().await;
        let cache = env.cache();
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let reader = {
            let (cache, pool) = (cache.clone(), pool.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(item_key(1), || async move {
                        let v = select_version(&pool).await?;
                        let _ = loaded_tx.send(v);
                        let _ = go_rx.await;
                        Ok::<_, sqlx::Error>(v)
                    })
                    .await
            })
        };
        assert_eq!(loaded_rx.await.expect("loaded"), 1);
        write_item(&pool, &cache).await;
        go_tx.send(()).expect("go");
        assert_eq!(
            reader.await.expect("task").expect("read"),
            1,
            "began before the write"
        );
        assert_eq!(cache.stats().fills_rejected, 1, "the late fill was refused");

        let got = cache
            .get_or_load(item_key(1), || select_version(&pool))
            .await
            .expect("read");
        assert_eq!(got, 2, "no stale value was cached");
        let got = cache
            .get_or_load(item_key(1), || {
                std::future::ready(Ok::<i64, sqlx::Error>(-1))
            })
            .await
            .expect("read");
        assert_eq!(got, 2, "and the fresh one is");
    }

    async fn select_page(pool: &sqlx::Pool<Db>) -> Result<(String, i64), sqlx::Error> {
        sqlx::query_as(
            "SELECT a.title || ' by ' || u.name, u.id FROM articles a JOIN authors u ON u.id = a.author_id \
             WHERE a.id = 1",
        )
        .fetch_one(pool)
        .await
    }

    async fn rename_author(pool: &sqlx::Pool<Db>, name: &str) {
        sqlx::query("UPDATE authors SET name = $1 WHERE id = 1")
            .bind(name)
            .execute(pool)
            .await
            .expect("update");
    }

    /// A page joins an article with its author; the author is renamed while the page loads.
    async fn tag_invalidated_during_the_load_cannot_leave_a_stale_value(env: &Env) {
        let (_db, pool) = items_db().await;
        let cache = env.cache();
        // Twice: with the tag declared up front, and with the tag found by the loader (after a first load, so
        // that its token exists before the racing load starts).
        for declared in [true, false] {
            rename_author(&pool, "old").await;
            cache
                .invalidate(&["author:1".to_owned(), "article:1:page".to_owned()])
                .await
                .expect("invalidate");
            let options = if declared {
                LoadOptions::new().tag(key!("author:<id>", id = 1))
            } else {
                LoadOptions::new()
            };
            let load = |pool: sqlx::Pool<Db>| async move {
                let (page, author) = select_page(&pool).await?;
                Ok::<_, sqlx::Error>((page, vec![key!("author:<id>", id = author)]))
            };
            if !declared {
                cache
                    .get_or_load_tagged(page_key(1), options.clone(), || load(pool.clone()))
                    .await
                    .expect("warm the tag token");
                cache
                    .invalidate(&["article:1:page".to_owned()])
                    .await
                    .expect("invalidate");
            }
            let (loaded_tx, loaded_rx) = oneshot::channel();
            let (go_tx, go_rx) = oneshot::channel::<()>();
            let reader = {
                let (cache, pool, options) = (cache.clone(), pool.clone(), options.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_load_tagged(page_key(1), options.clone(), || async move {
                            let loaded = load(pool).await?;
                            let _ = loaded_tx.send(());
                            let _ = go_rx.await;
                            Ok::<_, sqlx::Error>(loaded)
                        })
                        .await
                })
            };
            loaded_rx.await.expect("loaded");
            rename_author(&pool, "new").await;
            cache
                .invalidate(&["author:1".to_owned()])
                .await
                .expect("invalidate");
            go_tx.send(()).expect("go");
            let old: String = reader.await.expect("task").expect("read");
            assert_eq!(old, "Leases by old", "began before the write");

            let fresh: String = cache
                .get_or_load_tagged(page_key(1), options.clone(), || load(pool.clone()))
                .await
                .expect("read");
            assert_eq!(
                fresh, "Leases by new",
                "declared = {declared}: no stale page"
            );
        }
    }

    // Redis only: hand-written cache-aside against the same races.

    /// Hand-written cache-aside: GET; on a miss run the loader, then SET. (Writers UPDATE, then DEL.)
    #[derive(Clone)]
    struct Naive {
        conn: redis::aio::MultiplexedConnection,
        prefix: String,
    }

    impl Naive {
        async fn get_or_load<V, F, Fut>(&self, key: &str, loader: F) -> V
        where
            V: Serialize + serde::de::DeserializeOwned,
            F: FnOnce() -> Fut,
            Fut: std::future::Future<Output = Result<V, sqlx::Error>>,
        {
            let mut conn = self.conn.clone();
            let key = format!("{}{key}", self.prefix);
            let cached: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("GET");
            if let Some(json) = cached {
                return serde_json::from_str(&json).expect("decode");
            }
            let value = loader().await.expect("load");
            redis::cmd("SET")
                .arg(&key)
                .arg(serde_json::to_string(&value).expect("encode"))
                .query_async::<()>(&mut conn)
                .await
                .expect("SET");
            value
        }

        async fn invalidate(&self, key: &str) {
            let mut conn = self.conn.clone();
            redis::cmd("DEL")
                .arg(format!("{}{key}", self.prefix))
                .query_async::<()>(&mut conn)
                .await
                .expect("DEL");
        }
    }

    /// The same interleavings as `stale_set_race_cannot_leave_a_stale_value` and
    /// `tag_invalidated_during_the_load_cannot_leave_a_stale_value`, on hand-written cache-aside: both leave a
    /// stale value cached (on both backends).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn naive_cache_aside_leaves_stale_values_in_the_same_races() {
        let (_db, pool) = items_db().await;
        let prefix = TestPrefix::create("naive_race").await;
        let naive = Naive {
            conn: prefix.conn.clone(),
            prefix: prefix.prefix.clone(),
        };

        // A reader loads the old row; the writer commits and deletes the key; then the reader's SET arrives.
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let reader = {
            let (naive, pool) = (naive.clone(), pool.clone());
            tokio::spawn(async move {
                naive
                    .get_or_load("item:1", || async move {
                        let v = select_version(&pool).await?;
                        let _ = loaded_tx.send(v);
                        let _ = go_rx.await;
                        Ok(v)
                    })
                    .await
            })
        };
        assert_eq!(loaded_rx.await.expect("loaded"), 1);
        sqlx::query("UPDATE items SET version = version + 1 WHERE id = 1")
            .execute(&pool)
            .await
            .expect("update");
        naive.invalidate("item:1").await;
        go_tx.send(()).expect("go");
        assert_eq!(reader.await.expect("task"), 1_i64);
        let got: i64 = naive.get_or_load("item:1", || select_version(&pool)).await;
        assert_eq!(select_version(&pool).await.expect("select"), 2);
        assert_eq!(
            got, 1,
            "naive cache-aside serves the old version after the write returned"
        );

        // A page joined with its author; the author is renamed (and its key deleted) during the load.
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let reader = {
            let (naive, pool) = (naive.clone(), pool.clone());
            tokio::spawn(async move {
                naive
                    .get_or_load("article:1:page", || async move {
                        let (page, _author) = select_page(&pool).await?;
                        let _ = loaded_tx.send(());
                        let _ = go_rx.await;
                        Ok(page)
                    })
                    .await
            })
        };
        loaded_rx.await.expect("loaded");
        rename_author(&pool, "new").await;
        // Even a writer that knows the page depends on the author, and deletes it too, loses the race.
        naive.invalidate("author:1").await;
        naive.invalidate("article:1:page").await;
        go_tx.send(()).expect("go");
        let _: String = reader.await.expect("task");
        let got: String = naive
            .get_or_load("article:1:page", || async {
                Ok(select_page(&pool).await?.0)
            })
            .await;
        assert_eq!(
            got, "Leases by old",
            "naive cache-aside serves the old page after the rename returned"
        );
    }
}
/// Entries live for their entity's TTL (`item` declares 1m) minus at most 10% jitter, or the per-call TTL;
/// tag tokens outlive the entries that record them.
#[tokio::test]
async fn entries_carry_the_entity_ttl_with_jitter() {
    let env = Env::redis("ttl").await;
    let prefix = env.prefix.as_ref().expect("redis");
    let cache = env.cache();
    let conn = prefix.conn.clone();
    let pttl = |key: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("PTTL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .expect("PTTL")
        }
    };
    let mut seen = Vec::new();
    for id in 0..20 {
        cache
            .get_or_load(item_key(100 + id), || async { Ok::<_, std::io::Error>(id) })
            .await
            .expect("load");
        seen.push(pttl(format!("{}item:{}", prefix.prefix, 100 + id)).await);
    }
    assert!(
        seen.iter().all(|&ms| (53_000..=60_000).contains(&ms)),
        "{seen:?}"
    );
    assert!(
        seen.iter().min() != seen.iter().max(),
        "jitter spreads expiries: {seen:?}"
    );
    let namespace = pttl(format!("{}<tag>item:<>", prefix.prefix)).await;
    assert!(
        namespace > 60_000,
        "the namespace token outlives entries: {namespace}"
    );
    cache
        .get_or_load_with(
            item_key(200),
            LoadOptions::new().ttl(Duration::from_secs(5)),
            || async { Ok::<_, std::io::Error>(0) },
        )
        .await
        .expect("load");
    let ms = pttl(format!("{}item:200", prefix.prefix)).await;
    assert!((4_400..=5_000).contains(&ms), "{ms}");
}

/// Raw garbage SET under the key with a plain Redis client.
#[tokio::test]
async fn raw_garbage_in_redis_is_a_miss_removed_and_counted() {
    let env = Env::redis("raw_garbage").await;
    let prefix = env.prefix.as_ref().expect("redis");
    prefix.set("item:20", "not an entry").await;
    let cache = env.cache();
    let calls = Arc::new(AtomicUsize::new(0));
    let got = cache
        .get_or_load(item_key(20), counted(&calls, 5_i64))
        .await
        .expect("load");
    assert_eq!(got, 5);
    assert_eq!(cache.stats().undecodable, 1);
    let got = cache
        .get_or_load(item_key(20), counted(&calls, 6_i64))
        .await
        .expect("load");
    assert_eq!(got, 5);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Redis down: reads fall through to the loader instead of failing.
#[tokio::test]
async fn reads_fall_through_to_the_loader_when_redis_is_down() {
    let mut server = tests::RedisServer::start();
    let store = RedisStore::connect(&server.url(), "t:")
        .await
        .expect("connect");
    let cache = Cache::new(store);
    let calls = Arc::new(AtomicUsize::new(0));
    cache
        .get_or_load(item_key(30), counted(&calls, 1_i64))
        .await
        .expect("load");
    server.kill();
    let got = cache
        .get_or_load(item_key(30), counted(&calls, 2_i64))
        .await
        .expect("the read still succeeds");
    assert_eq!(got, 2);
    assert!(cache.stats().store_errors >= 1);

    // Back up, empty and without the scripts: the store reconnects, reloads its scripts, caches again.
    server.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cache.stats().fills < 2 {
        assert!(std::time::Instant::now() < deadline, "{:?}", cache.stats());
        cache
            .get_or_load(item_key(30), counted(&calls, 3_i64))
            .await
            .expect("the read succeeds");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = cache
        .get_or_load(item_key(30), counted(&calls, 4_i64))
        .await
        .expect("read");
    assert_eq!(got, 3, "cached again after the restart");
}

/// A reader whose future is dropped mid-load releases its lease: the next reader does not wait for it.
#[tokio::test]
async fn a_cancelled_load_releases_its_lease() {
    let env = Env::redis("cancel").await;
    let cache = env.cache();
    let slow = cache.get_or_load(item_key(40), || async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, std::io::Error>(0_i64)
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(100), slow)
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let other = env.other_process().await;
    let started = std::time::Instant::now();
    let got = other
        .get_or_load(item_key(40), || async { Ok::<_, std::io::Error>(1_i64) })
        .await
        .expect("load");
    assert_eq!(got, 1);
    assert_eq!(other.stats().lease_waits, 0, "the lease was released");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "a held lease would have made it wait 1 s"
    );
}

// --- SQLite: writes of another client, delivered by the relay's sweep ------------------------------------

mod sqlite_another_client {
    use super::*;

    on_both_stores!(another_clients_writes_are_never_read_stale_after_the_relay_sweep);

    /// How often the pool's relay sweeps the outbox in these tests.
    const SWEEP: Duration = Duration::from_millis(100);
    /// The bound: a write of another client returned this long ago is never read stale (a sweep, the
    /// delivery, and slack for a loaded two-core machine).
    const BOUND: Duration = Duration::from_millis(600);

    /// A `CachedSqlitePool` on `db` with a store of `env`'s kind (Redis: the same prefix; in-process: a store
    /// of its own, as the pool's store cannot be shared in), relay sweeping every [`SWEEP`].
    async fn cached_pool(env: &Env, db: &tests::TestSqlite) -> CachedSqlitePool {
        let options = CachedSqlitePool::options()
            .registry(Registry::new([Item::META]))
            .auto_install(true)
            .relay_config(RelayConfig::new().sweep_interval(SWEEP));
        match &env.prefix {
            Some(prefix) => {
                let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
                    .await
                    .expect("connect");
                options.connect_with(db.options(), store).await
            }
            None => {
                options
                    .connect_with(db.options(), MemoryStore::new(10_000))
                    .await
            }
        }
        .expect("connect CachedSqlitePool")
    }

    /// A plain `SqlitePool` (another client, not wrapped) updates rows while readers read through the
    /// wrapped pool's cache: the old value may be read until the relay's sweep delivers the keys, never
    /// after it.
    async fn another_clients_writes_are_never_read_stale_after_the_relay_sweep(env: &Env) {
        let db = tests::TestSqlite::create("another_client").await;
        let plain = db.pool().await;
        checker::create_items(&plain, 4).await;
        let pool = cached_pool(env, &db).await;
        let cache = pool.cache().clone();
        let read = |id: i64| {
            let (cache, plain) = (cache.clone(), plain.clone());
            async move {
                cache
                    .get_or_load(item_key(id), || checker::select_version(&plain, id))
                    .await
                    .expect("read")
            }
        };

        // One write: cached 0, written 1 by the other client; reads converge to 1 within the bound and
        // stay there.
        assert_eq!(read(1).await, 0);
        assert_eq!(read(1).await, 0);
        assert_eq!(checker::bump_version(&plain, 1).await, 1);
        let written = std::time::Instant::now();
        let mut stale_reads = 0;
        while read(1).await == 0 {
            stale_reads += 1;
            assert!(
                written.elapsed() < BOUND,
                "still reading the old value {:?} after another client's write",
                written.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let converged = written.elapsed();
        for _ in 0..20 {
            assert_eq!(read(1).await, 1, "fresh once delivered");
        }
        eprintln!(
            "another client ({}, SQLite): old value read {stale_reads} time(s), fresh after {converged:?} \
             (sweep every {SWEEP:?})",
            kind(env)
        );

        // Randomized: readers on the pool's cache and on a second handle race one writer of the other
        // client; a read that began more than BOUND after a write returned must see it.
        let caches = [
            cache.clone(),
            Cache::builder(Arc::clone(pool.store())).build(),
        ];
        let reader: checker::Read = {
            let plain = plain.clone();
            Arc::new(move |id| {
                let cache = caches[fastrand::usize(..caches.len())].clone();
                let plain = plain.clone();
                Box::pin(async move {
                    let version = cache
                        .get_or_load(item_key(id), || async {
                            let version = checker::select_version(&plain, id).await?;
                            checker::jitter().await;
                            Ok::<_, sqlx::Error>(version)
                        })
                        .await
                        .unwrap_or_else(|e| panic!("read: {e}"));
                    vec![(id, version)]
                })
            })
        };
        let writer: checker::Write = {
            let plain = plain.clone();
            Arc::new(move |id| {
                let plain = plain.clone();
                Box::pin(async move {
                    let version = checker::bump_version(&plain, id).await;
                    // Another client writing at a human pace, not a tight loop.
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..20))).await;
                    version
                })
            })
        };
        let config = Config {
            readers: 6,
            writers: 1,
            duration: Duration::from_millis(2000),
            grace: BOUND,
            ..Config::default()
        };
        let report = checker::run(config, reader, writer).await;
        let stats = pool.cache().stats();
        eprintln!(
            "checker [another client's writes, SQLite, {}, bound {BOUND:?}]: {} reads checked, {} violations, \
             {} lagging within the bound, {} writes; fills rejected {}",
            kind(env),
            report.reads,
            report.violations,
            report.lagging,
            report.writes,
            stats.fills_rejected,
        );
        assert!(report.reads > 200 && report.writes > 20, "{report:?}");
        assert_eq!(report.violations, 0, "{report:?}");
        assert!(
            report.lagging > 0,
            "writes of another client are delivered by the sweep, not at once: some reads must lag {report:?}"
        );
        pool.close().await;
    }
}

/// `Item`'s rows with a longer TTL: the same capture (table, template shape, columns), so the program's
/// registry stays valid; its shortest TTL for `item:<>` is `Item`'s minute.
#[derive(CachedEntity, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<item_id>", ttl = "1h")]
#[allow(dead_code)] // only its metadata is used
struct LongLivedItem {
    #[sqlx(rename = "id")]
    item_id: i64,
}

/// A pool's caches live by the pool's registry, not the program's.
#[tokio::test]
async fn a_pools_caches_take_ttls_from_the_pools_registry() {
    let prefix = TestPrefix::create("pool_ttl").await;
    let db = tests::TestSqlite::create("pool_ttl").await;
    checker::create_items(&db.pool().await, 2).await;
    let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .expect("connect");
    let pool = CachedSqlitePool::options()
        .registry(Registry::new([LongLivedItem::META]))
        .auto_install(true)
        .run_relay(false)
        .connect_with(db.options(), store)
        .await
        .expect("connect CachedSqlitePool");
    let other = pool.cache_builder().build();
    for (cache, id) in [(pool.cache(), 1), (&other, 2)] {
        cache
            .get_or_load(item_key(id), || async { Ok::<_, std::io::Error>(id) })
            .await
            .expect("load");
        let ms: i64 = redis::cmd("PTTL")
            .arg(format!("{}item:{id}", prefix.prefix))
            .query_async(&mut prefix.conn.clone())
            .await
            .expect("PTTL");
        assert!(
            (3_240_000..=3_600_000).contains(&ms),
            "the pool's registry says 1h (minus jitter); the program's shortest is 1m: {ms} ms"
        );
    }
}

/// The Redis store passes the store conformance suite the in-process store runs in its unit tests.
#[tokio::test]
async fn the_redis_store_conforms() {
    let prefix = TestPrefix::create("conformance").await;
    let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .expect("connect");
    cache_runtime::store::conformance::check(&store, "")
        .await
        .expect("RedisStore conforms");
    let shared: Arc<dyn cache_runtime::Store> = Arc::new(store);
    cache_runtime::store::conformance::check(&shared, "shared:")
        .await
        .expect("a shared store conforms");
}

/// On Redis 7, a miss takes its lease without a script (`SET … NX GET`): once the namespace's tag exists,
/// the only script a miss runs is the fill's compare-and-set; the entry is then a hit. On a server of its
/// own, whose command counters no other test moves.
#[tokio::test]
async fn a_miss_on_redis_7_runs_one_script_the_fill() {
    let server = tests::RedisServer::start();
    let store = RedisStore::connect(&server.url(), "native:".to_owned())
        .await
        .expect("connect");
    let cache = Cache::new(store);
    let load = |n: i64| async move { Ok::<_, std::io::Error>(n) };
    // The first read of the namespace creates its tag (the tag script).
    let first = cache
        .get_or_load(item_key(1), || load(1))
        .await
        .expect("load");
    assert_eq!(first, 1);
    let evalsha = || {
        let stats = server.command(&["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |calls| calls.parse::<u64>().expect("a count"))
    };
    let before = evalsha();
    let second = cache
        .get_or_load(item_key(2), || load(2))
        .await
        .expect("load");
    assert_eq!(second, 2);
    assert_eq!(
        evalsha() - before,
        1,
        "the miss ran scripts besides the fill"
    );
    let hits = cache.stats().hits;
    let again = cache
        .get_or_load(item_key(2), || async {
            Err::<i64, _>(std::io::Error::other("a hit ran the loader"))
        })
        .await
        .expect("a hit");
    assert_eq!((again, cache.stats().hits), (2, hits + 1));
}
