//! Several stores on one database: every consumer (a Redis prefix, another Redis server, an in-process
//! store) receives every outbox row, a row is deleted only once every live consumer delivered it, a
//! consumer that is gone stops holding rows back after its expiry, and one that comes back after missing
//! rows drops its namespaces before serving again. Real PostgreSQL and Redis; each test has its own
//! database and key prefixes.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::time::{Duration, Instant};

use cache_runtime::outbox::{Consumer, RelayConfig};
use cache_runtime::{CachedEntity, CachedPgPool, MemoryStore, RedisStore, Registry, Store, key};
use sqlx::PgPool;
use tests::model::{Product, cached_price};
use tests::{TestDb, TestPrefix, redis_url};

/// How long another consumer's relay may take (a `NOTIFY` and a batch, with slack for a loaded machine).
const RELAY_BOUND: Duration = Duration::from_secs(3);

const TABLES: &str = "
CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
  price_cents bigint NOT NULL);
INSERT INTO products SELECT i, 1, 'p' || i, 100 FROM generate_series(1, 10) i;
";

async fn database(hint: &str) -> (TestDb, PgPool) {
    let db = TestDb::create(hint).await;
    let admin = db.pool().await;
    sqlx::raw_sql(TABLES).execute(&admin).await.unwrap();
    (db, admin)
}

async fn pool(db: &TestDb, store: impl Store, relay: bool, config: RelayConfig) -> CachedPgPool {
    CachedPgPool::options()
        .registry(Registry::new([Product::META]))
        .auto_install(true)
        .run_relay(relay)
        .relay_config(config)
        .connect(&db.url, store)
        .await
        .unwrap()
}

/// The price of product `id` read through `pool`'s cache.
async fn cached(pool: &CachedPgPool, id: i64) -> i64 {
    cached_price(pool.cache(), pool.sqlx_pool(), id).await
}

async fn price(admin: &PgPool, id: i64) -> i64 {
    sqlx::query_scalar("SELECT price_cents FROM products WHERE id = $1")
        .bind(id)
        .fetch_one(admin)
        .await
        .unwrap()
}

async fn outbox_rows(admin: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM cache_invalidation.outbox")
        .fetch_one(admin)
        .await
        .unwrap()
}

/// Caches product `id` in `pool`'s store and checks that the next read is a hit.
async fn warm(pool: &CachedPgPool, id: i64) {
    cached(pool, id).await;
    let hits = pool.cache().stats().hits;
    cached(pool, id).await;
    assert_eq!(
        pool.cache().stats().hits,
        hits + 1,
        "product {id} is cached"
    );
}

/// Waits until `pool` reads the database's price of `id` through its cache.
async fn fresh_within_bound(pool: &CachedPgPool, admin: &PgPool, id: i64, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        let (got, stored) = (cached(pool, id).await, price(admin, id).await);
        if got == stored {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < RELAY_BOUND,
            "{what}: product {id} still reads {got} from the cache, the database has {stored}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_until<F: Future<Output = bool>>(
    what: &str,
    bound: Duration,
    mut check: impl FnMut() -> F,
) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn set_price(executor: impl sqlx::PgExecutor<'_>, id: i64, cents: i64) {
    sqlx::query("UPDATE products SET price_cents = $1 WHERE id = $2")
        .bind(cents)
        .bind(id)
        .execute(executor)
        .await
        .unwrap();
}

#[tokio::test]
async fn two_redis_prefixes_on_one_database_each_receive_every_write() {
    let (db, admin) = database("consumers_prefixes").await;
    let (a, b) = (
        TestPrefix::create("consumer_a").await,
        TestPrefix::create("consumer_b").await,
    );
    let store = |prefix: &TestPrefix| {
        let prefix = prefix.prefix.clone();
        async move { RedisStore::connect(&redis_url(), prefix).await.unwrap() }
    };
    let one = pool(&db, store(&a).await, true, RelayConfig::new()).await;
    let two = pool(&db, store(&b).await, true, RelayConfig::new()).await;
    assert_ne!(one.relay().consumer(), two.relay().consumer());
    // The same prefix on the same server is the same consumer, however the store was connected.
    let again = store(&a).await;
    assert_eq!(Consumer::new(again.consumer()), *one.relay().consumer());

    for id in [1, 2, 3] {
        warm(&one, id).await;
        warm(&two, id).await;
    }
    // A write through one service's pool: its own store at once, the other's through its relay.
    set_price(&one, 1, 111).await;
    assert_eq!(
        cached(&one, 1).await,
        111,
        "the writer's store, when the call returns"
    );
    let took = fresh_within_bound(&two, &admin, 1, "the other service's store").await;
    eprintln!("a write through one service reached the other service's store within {took:?}");
    // And the other way round, in a transaction.
    let mut tx = two.begin().await.unwrap();
    set_price(&mut tx, 2, 222).await;
    tx.commit().await.unwrap();
    assert_eq!(cached(&two, 2).await, 222);
    fresh_within_bound(&one, &admin, 2, "the first service's store").await;
    // A write by another client reaches both.
    set_price(&admin, 3, 333).await;
    fresh_within_bound(&one, &admin, 3, "psql write, first store").await;
    fresh_within_bound(&two, &admin, 3, "psql write, second store").await;
    // Every row is deleted once both delivered it.
    wait_until("outbox empty", RELAY_BOUND, || async {
        outbox_rows(&admin).await == 0
    })
    .await;
    let backlog = one.relay().backlog().await.unwrap();
    assert_eq!(backlog.consumers, 2, "{backlog:?}");
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn in_process_stores_of_two_pools_each_receive_every_write() {
    // Two processes with in-process stores (here: two pools in one test): each store is its own
    // consumer, so a write through one pool reaches the other pool's memory too.
    let (db, admin) = database("consumers_memory").await;
    let one = pool(&db, MemoryStore::default(), true, RelayConfig::new()).await;
    let two = pool(&db, MemoryStore::default(), true, RelayConfig::new()).await;
    warm(&one, 5).await;
    warm(&two, 5).await;
    set_price(&one, 5, 555).await;
    assert_eq!(cached(&one, 5).await, 555);
    fresh_within_bound(&two, &admin, 5, "the other pool's in-process store").await;
    wait_until("outbox empty", RELAY_BOUND, || async {
        outbox_rows(&admin).await == 0
    })
    .await;
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn a_row_is_kept_until_every_live_consumer_delivered_it() {
    let (db, admin) = database("consumers_kept").await;
    let writer = pool(&db, MemoryStore::default(), true, RelayConfig::new()).await;
    // A second consumer whose relay does not run: its rows wait for it.
    let idle = pool(&db, MemoryStore::default(), false, RelayConfig::new()).await;
    warm(&idle, 4).await;
    set_price(&writer, 4, 444).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        outbox_rows(&admin).await,
        1,
        "kept for the consumer that has not delivered it"
    );
    let backlog = idle.relay().backlog().await.unwrap();
    assert_eq!(
        (backlog.depth, backlog.total, backlog.consumers),
        (1, 1, 2),
        "{backlog:?}"
    );
    assert_eq!(
        writer.relay().backlog().await.unwrap().depth,
        0,
        "the writer delivered it"
    );
    assert_ne!(
        cached(&idle, 4).await,
        444,
        "not delivered to the idle consumer yet"
    );
    let drained = idle.relay().deliver_pending().await.unwrap();
    assert_eq!(drained.rows, 1);
    assert_eq!(cached(&idle, 4).await, 444);
    assert_eq!(
        outbox_rows(&admin).await,
        0,
        "deleted once both consumers delivered it"
    );
    writer.close().await;
    idle.close().await;
}

#[tokio::test]
async fn a_consumer_that_is_gone_stops_holding_rows_and_drops_its_namespaces_when_it_returns() {
    let (db, admin) = database("consumers_gone").await;
    let prefix = TestPrefix::create("consumer_gone").await;
    let expiry = Duration::from_secs(1);
    let writer = pool(
        &db,
        MemoryStore::default(),
        true,
        RelayConfig::new().consumer_expiry(expiry),
    )
    .await;
    // The other consumer, a pool on a Redis prefix, in a process that then crashes (its own runtime,
    // dropped with the pool leaked: no unregistration, its registration expires).
    let url = db.url.clone();
    let name = prefix.prefix.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let redis = RedisStore::connect(&redis_url(), name).await.unwrap();
            let reader = CachedPgPool::options()
                .registry(Registry::new([Product::META]))
                .relay_config(RelayConfig::new().consumer_expiry(expiry))
                .connect(&url, redis)
                .await
                .unwrap();
            warm(&reader, 6).await;
            warm(&reader, 7).await;
            std::mem::forget(reader);
        });
    })
    .join()
    .unwrap();
    let gone_at = Instant::now();
    set_price(&writer, 6, 666).await;
    assert_eq!(
        outbox_rows(&admin).await,
        1,
        "kept while the other consumer may still come back"
    );
    wait_until(
        "the gone consumer's rows deleted",
        Duration::from_secs(10),
        || async { outbox_rows(&admin).await == 0 },
    )
    .await;
    eprintln!(
        "a gone consumer held rows back for {:?} (expiry {expiry:?})",
        gone_at.elapsed()
    );
    // Its store still holds the old price of 6 (and of 7, untouched): a returning process must not serve
    // them, since it missed the delete.
    let redis = RedisStore::connect(&redis_url(), prefix.prefix.clone())
        .await
        .unwrap();
    let stale = cache_runtime::Cache::new(redis.clone());
    let id = 6_i64;
    let served: i64 = stale
        .get_or_load(key!("product:<id>", id), || async {
            Ok::<_, sqlx::Error>(-1)
        })
        .await
        .unwrap();
    assert_eq!(
        served, 100,
        "control: the missed invalidation left the old price in the store"
    );
    let back = pool(
        &db,
        redis,
        false,
        RelayConfig::new().consumer_expiry(expiry),
    )
    .await;
    assert_eq!(
        cached(&back, 6).await,
        666,
        "the returning consumer dropped its namespaces"
    );
    let loads = back.cache().stats().loads;
    cached(&back, 7).await;
    assert_eq!(
        back.cache().stats().loads,
        loads + 1,
        "every entry of the namespace was dropped"
    );
    writer.close().await;
    back.close().await;
}

#[tokio::test]
async fn a_registration_reaching_the_server_after_close_does_not_revive_the_process() {
    let (db, admin) = database("consumers_closed").await;
    let pool = pool(&db, MemoryStore::default(), true, RelayConfig::new()).await;
    let tag = pool.relay().consumer().tag().to_owned();
    let live = || async {
        sqlx::query_scalar::<_, Vec<String>>("SELECT cache_invalidation.live_consumers()")
            .fetch_one(&admin)
            .await
            .unwrap()
    };
    assert!(live().await.contains(&tag));
    pool.close().await;
    assert!(!live().await.contains(&tag), "closed: no longer live");
    // A heartbeat that was in flight at close reaches the server afterwards.
    let process: String = sqlx::query_scalar(
        "SELECT process FROM cache_invalidation.consumer_processes WHERE tag = $1",
    )
    .bind(&tag)
    .fetch_one(&admin)
    .await
    .unwrap();
    sqlx::query("SELECT cache_invalidation.register($1, 'late', interval '5 minutes', $2)")
        .bind(&tag)
        .bind(&process)
        .execute(&admin)
        .await
        .unwrap();
    assert!(
        !live().await.contains(&tag),
        "a late registration does not revive a closed process"
    );
}
