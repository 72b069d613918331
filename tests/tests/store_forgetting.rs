//! A Redis that forgets acknowledged invalidations: restarted from an RDB snapshot taken before them, or a
//! replica promoted before it received them. No read after a write's acknowledgement returns the old value,
//! in a process that ran through it or one started after. Each test runs its own `redis-server`s on free
//! ports and its own database; the shared servers are never touched.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::time::{Duration, Instant};

use cache_runtime::outbox::RelayConfig;
use cache_runtime::{CachedEntity, CachedPgPool, RedisStore, Registry};
use sqlx::PgPool;
use tests::model::{Product, cached_price};
use tests::{RedisServer, TcpProxy, TestDb};

const ROWS: i64 = 20;
const PREFIX: &str = "forget:";

async fn database(hint: &str) -> (TestDb, PgPool) {
    tests::model::products_database(hint, ROWS).await
}

async fn pool(db: &TestDb, store: RedisStore) -> CachedPgPool {
    pool_with(db, store, RelayConfig::new()).await
}

async fn pool_with(db: &TestDb, store: RedisStore, relay: RelayConfig) -> CachedPgPool {
    CachedPgPool::options()
        .registry(Registry::new([Product::META]))
        .auto_install(true)
        .relay_config(relay)
        .connect(&db.url, store)
        .await
        .unwrap()
}

/// Updates products `ids` through the pool to `price`, and waits until the outbox is empty.
async fn write(
    pool: &CachedPgPool,
    admin: &PgPool,
    ids: std::ops::RangeInclusive<i64>,
    price: i64,
) {
    for id in ids {
        sqlx::query("UPDATE products SET price_cents = $1 WHERE id = $2")
            .bind(price)
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
    }
    outbox_drained(admin).await;
}

async fn outbox_drained(admin: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_invalidation.outbox")
            .fetch_one(admin)
            .await
            .unwrap();
        if rows == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "outbox not drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads products `ids` once through `pool`: (reads that returned another price than `price`, hits).
async fn read_once(
    pool: &CachedPgPool,
    ids: std::ops::RangeInclusive<i64>,
    price: i64,
) -> (usize, u64) {
    let hits = pool.cache().stats().hits;
    let mut stale = 0;
    for id in ids {
        stale += usize::from(cached_price(pool.cache(), pool.sqlx_pool(), id).await != price);
    }
    (stale, pool.cache().stats().hits - hits)
}

async fn store(url: &str) -> RedisStore {
    RedisStore::connect(url, PREFIX).await.unwrap()
}

/// Caches every product and checks that they are hits.
async fn warm(pool: &CachedPgPool) {
    for id in 1..=ROWS {
        cached_price(pool.cache(), pool.sqlx_pool(), id).await;
    }
    let hits = pool.cache().stats().hits;
    for id in 1..=ROWS {
        cached_price(pool.cache(), pool.sqlx_pool(), id).await;
    }
    assert_eq!(pool.cache().stats().hits, hits + ROWS as u64, "warm");
}

/// Writes every product through the pool (acknowledged once the calls return), and waits until the
/// outbox is empty (the deliveries are recorded).
async fn write_all(pool: &CachedPgPool, admin: &PgPool, price: i64) {
    write(pool, admin, 1..=ROWS, price).await;
}

/// Reads every product through `pool` for `during`; returns the number of reads that returned another
/// price than `price` (the committed one) and the number of reads.
async fn stale_reads(pool: &CachedPgPool, price: i64, during: Duration) -> (usize, usize) {
    let (mut stale, mut reads) = (0, 0);
    let end = Instant::now() + during;
    while Instant::now() < end {
        for id in 1..=ROWS {
            reads += 1;
            if cached_price(pool.cache(), pool.sqlx_pool(), id).await != price {
                stale += 1;
            }
        }
    }
    (stale, reads)
}

/// A loopback port nothing listens on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// How many of the products' value slots `server` holds.
fn cached_slots(server: &RedisServer) -> usize {
    (1..=ROWS)
        .filter(|id| server.command(&["EXISTS", &format!("{PREFIX}product:{id}")]) == "int(1)")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_from_an_older_snapshot_serves_no_invalidated_entry() {
    let (db, admin) = database("forget_rdb").await;
    let mut redis = RedisServer::start_persistent();
    let running = pool(&db, store(&redis.url()).await).await;
    warm(&running).await;
    assert_eq!(redis.command(&["SAVE"]), "OK");
    write_all(&running, &admin, 200).await;
    assert_eq!(cached_slots(&redis), 0, "the writes emptied the slots");
    redis.kill();
    redis.restart();
    assert_eq!(
        cached_slots(&redis),
        ROWS as usize,
        "the snapshot brought the old entries back"
    );

    // A process started after the restart, before the running one noticed anything.
    let started_after = pool(&db, store(&redis.url()).await).await;
    let (stale, reads) = stale_reads(&started_after, 200, Duration::from_millis(500)).await;
    assert_eq!(
        stale, 0,
        "{stale} of {reads} reads of a process started after the restore were stale"
    );
    let (stale, reads) = stale_reads(&running, 200, Duration::from_millis(500)).await;
    assert_eq!(
        stale, 0,
        "{stale} of {reads} reads of the running process were stale"
    );
    // And the cache is used again.
    let hits = running.cache().stats().hits;
    stale_reads(&running, 200, Duration::from_millis(100)).await;
    assert!(
        running.cache().stats().hits > hits,
        "hits again after the recovery"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_process_that_did_not_write_notices_the_restore_too() {
    let (db, admin) = database("forget_reader").await;
    let mut redis = RedisServer::start_persistent();
    let writer = pool(&db, store(&redis.url()).await).await;
    let reader = pool(&db, store(&redis.url()).await).await;
    warm(&reader).await;
    assert_eq!(redis.command(&["SAVE"]), "OK");
    write_all(&writer, &admin, 300).await;
    // The reader reads once after the writes (so its floor is current), then the server restarts.
    let (stale, _) = stale_reads(&reader, 300, Duration::from_millis(1)).await;
    assert_eq!(stale, 0);
    redis.kill();
    redis.restart();
    assert_eq!(cached_slots(&redis), ROWS as usize);
    drop(writer);
    let (stale, reads) = stale_reads(&reader, 300, Duration::from_millis(1500)).await;
    assert_eq!(stale, 0, "{stale} of {reads} reads were stale");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_that_missed_deletes_serves_no_invalidated_entry() {
    let (db, admin) = database("forget_promote").await;
    let mut primary = RedisServer::start();
    // The replication link runs through a proxy of its own, so that the test can cut it.
    let link = TcpProxy::start(primary.port).await;
    let replica = RedisServer::start_replica_of(link.port);
    let proxy = TcpProxy::start(primary.port).await;
    let running = pool(&db, store(&proxy.redis_url()).await).await;
    warm(&running).await;
    // Every entry (and the consumer id) reached the replica.
    assert_eq!(primary.command(&["WAIT", "1", "5000"]), "int(1)");
    assert_eq!(cached_slots(&replica), ROWS as usize);
    // The replica stops receiving (the link is cut, and cannot reconnect); the primary acknowledges the
    // deletes of the writes.
    link.switch(free_port());
    write_all(&running, &admin, 400).await;
    assert_eq!(cached_slots(&primary), 0);
    // Failover: the primary dies, the replica is promoted, the address moves to it.
    primary.kill();
    assert_eq!(replica.command(&["REPLICAOF", "NO", "ONE"]), "OK");
    proxy.switch(replica.port);
    assert_eq!(
        cached_slots(&replica),
        ROWS as usize,
        "the replica kept the old entries"
    );

    let started_after = pool(&db, store(&proxy.redis_url()).await).await;
    let (stale, reads) = stale_reads(&started_after, 400, Duration::from_millis(500)).await;
    assert_eq!(
        stale, 0,
        "{stale} of {reads} reads of a process started after the failover were stale"
    );
    let (stale, reads) = stale_reads(&running, 400, Duration::from_millis(500)).await;
    assert_eq!(
        stale, 0,
        "{stale} of {reads} reads of the running process were stale"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_for_replicas_an_unreplicated_invalidation_is_not_acknowledged() {
    let (db, admin) = database("forget_wait").await;
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(primary.port);
    let store = store(&primary.url())
        .await
        .wait_for_replicas(1, Duration::from_millis(200));
    let pool = pool(&db, store).await;
    warm(&pool).await;
    replica.pause();
    sqlx::query("UPDATE products SET price_cents = 500 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_invalidation.outbox")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(rows, 1, "the row stays until a replica has the delete");
    assert!(
        pool.cache().gate_closed(),
        "reads bypass the cache meanwhile"
    );
    assert_eq!(cached_price(pool.cache(), pool.sqlx_pool(), 1).await, 500);
    replica.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.cache().gate_closed() {
        assert!(
            Instant::now() < deadline,
            "the gate did not open after the replica came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cached_price(pool.cache(), pool.sqlx_pool(), 1).await, 500);
}

/// Within the replay window, the repair sends again only the keys delivered after the snapshot: the
/// entries no write touched stay cached (hits), the others are reloaded, in a process started after the
/// restore and in the one that ran through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_within_the_replay_window_keeps_untouched_entries_warm() {
    let (db, admin) = database("forget_replay").await;
    let mut redis = RedisServer::start_persistent();
    let running = pool(&db, store(&redis.url()).await).await;
    warm(&running).await;
    assert_eq!(redis.command(&["SAVE"]), "OK");
    write(&running, &admin, 1..=10, 200).await;
    let window: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_invalidation.replay")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(window > 0, "the deliveries are in the replay window");
    redis.kill();
    redis.restart();
    assert_eq!(
        cached_slots(&redis),
        ROWS as usize,
        "the snapshot's entries are back"
    );

    let started_after = pool(&db, store(&redis.url()).await).await;
    assert_eq!(
        cached_slots(&redis),
        ROWS as usize - 10,
        "the connect repaired the store: the written products' slots are gone, the others stay"
    );
    let (stale, _) = read_once(&started_after, 1..=10, 200).await;
    assert_eq!(stale, 0, "written products: the new price");
    // On a loaded machine a store call of the new process (its relay's first sweep, its sequence check)
    // can outlast the store timeout: that closes its gate until the outbox is drained, and reads bypass
    // the store meanwhile (fresh, but not hits). Warmth is what is asserted here, so wait for the gate.
    let deadline = Instant::now() + Duration::from_secs(10);
    while started_after.cache().gate_closed() {
        assert!(
            Instant::now() < deadline,
            "the gate stayed closed after the repair"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (stale, hits) = read_once(&started_after, 11..=ROWS, 100).await;
    assert_eq!(stale, 0);
    assert_eq!(
        hits,
        10,
        "untouched products are still cached after the repair: {:?}",
        started_after.cache().stats()
    );
    let (stale, reads) = stale_reads(&running, 200, Duration::from_millis(1)).await;
    let (other, _) = read_once(&running, 11..=ROWS, 100).await;
    assert_eq!(
        stale,
        reads / 2,
        "the running process reads the written products' new prices ({stale} of {reads} reads are the \
         untouched ones)"
    );
    assert_eq!(other, 0);
}

/// A snapshot older than the replay window cannot be repaired by a replay: every namespace is dropped,
/// a cold cache but never a stale one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_older_than_the_replay_window_drops_every_namespace() {
    let (db, admin) = database("forget_window").await;
    let mut redis = RedisServer::start_persistent();
    // Deliveries leave the window at the next heartbeat (every 250 ms here).
    let relay = RelayConfig::new()
        .replay_window(Duration::ZERO)
        .consumer_expiry(Duration::from_secs(1));
    let running = pool_with(&db, store(&redis.url()).await, relay).await;
    warm(&running).await;
    assert_eq!(redis.command(&["SAVE"]), "OK");
    write(&running, &admin, 1..=10, 200).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let window: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_invalidation.replay")
            .fetch_one(&admin)
            .await
            .unwrap();
        if window == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the window was not purged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.kill();
    redis.restart();
    let started_after = pool(&db, store(&redis.url()).await).await;
    let (stale, _) = read_once(&started_after, 1..=10, 200).await;
    assert_eq!(stale, 0, "written products: the new price");
    let (stale, hits) = read_once(&started_after, 11..=ROWS, 100).await;
    assert_eq!(stale, 0);
    assert_eq!(
        hits, 0,
        "every namespace was dropped: untouched products are loaded again"
    );
    let (stale, reads) = stale_reads(&running, 200, Duration::from_millis(1)).await;
    assert_eq!(
        stale,
        reads / 2,
        "only the untouched products have the old price"
    );
}

/// SQLite keeps the same replay window (the delivered outbox rows, rendered again for the repair).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_restore_within_the_replay_window_keeps_untouched_entries_warm() {
    let db = tests::TestSqlite::create("forget_replay").await;
    let plain = db.pool().await;
    sqlx::raw_sql(
        "CREATE TABLE products (id INTEGER PRIMARY KEY, category_id INTEGER NOT NULL, name TEXT NOT NULL,
           price_cents INTEGER NOT NULL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20)
         INSERT INTO products SELECT i, 1, 'p' || i, 100 FROM n;",
    )
    .execute(&plain)
    .await
    .unwrap();
    let mut redis = RedisServer::start_persistent();
    let connect = |url: String| {
        let db_url = db.url.clone();
        async move {
            cache_runtime::CachedSqlitePool::options()
                .registry(Registry::new([Product::META]))
                .auto_install(true)
                .connect(&db_url, store(&url).await)
                .await
                .unwrap()
        }
    };
    let running = connect(redis.url()).await;
    let price = |pool: &cache_runtime::CachedSqlitePool, id: i64| {
        let pool = pool.clone();
        async move { pool.get::<Product>(&id).await.unwrap().unwrap().price_cents }
    };
    for id in 1..=ROWS {
        price(&running, id).await;
    }
    assert_eq!(redis.command(&["SAVE"]), "OK");
    for id in 1..=10 {
        sqlx::query("UPDATE products SET price_cents = 200 WHERE id = ?1")
            .bind(id)
            .execute(&running)
            .await
            .unwrap();
    }
    // The deliveries are recorded (deleted from the outbox, copied into the window).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (outbox, window): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM cache_invalidation_outbox), \
                    (SELECT count(*) FROM cache_invalidation_replay)",
        )
        .fetch_one(&plain)
        .await
        .unwrap();
        if outbox == 0 && window > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "deliveries not recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.kill();
    redis.restart();
    assert_eq!(cached_slots(&redis), ROWS as usize);
    let started_after = connect(redis.url()).await;
    assert_eq!(
        cached_slots(&redis),
        ROWS as usize - 10,
        "repaired at connect"
    );
    for id in 1..=ROWS {
        let expected = if id <= 10 { 200 } else { 100 };
        assert_eq!(price(&started_after, id).await, expected, "product {id}");
        assert_eq!(price(&running, id).await, expected, "product {id}");
    }
    assert!(
        started_after.cache().stats().hits >= 10,
        "untouched products are hits"
    );
}

/// A store on the application's deadpool-redis pool (`RedisStore::with_pool`): reads and invalidations
/// work through pooled connections, and a restore from an older snapshot is repaired too (each new pooled
/// connection's first read counts as a reconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_on_a_deadpool_pool_is_repaired_after_a_restore() {
    let (db, admin) = database("forget_deadpool").await;
    let mut redis = RedisServer::start_persistent();
    let deadpool = || {
        deadpool_redis::Config::from_url(redis.url())
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .unwrap()
    };
    let pooled = RedisStore::with_pool(deadpool(), PREFIX).await.unwrap();
    let running = pool(&db, pooled).await;
    warm(&running).await;
    assert_eq!(redis.command(&["SAVE"]), "OK");
    write(&running, &admin, 1..=10, 200).await;
    let (stale, _) = read_once(&running, 1..=10, 200).await;
    assert_eq!(stale, 0, "invalidated through the pool's connections");
    redis.kill();
    redis.restart();
    assert_eq!(
        cached_slots(&redis),
        ROWS as usize,
        "the snapshot's entries are back"
    );
    let (stale, reads) = stale_reads(&running, 200, Duration::from_millis(1500)).await;
    assert_eq!(
        stale,
        reads / 2,
        "only the untouched products (half the reads) have the old price: {stale} of {reads}"
    );
    let (stale, _) = read_once(&running, 11..=ROWS, 100).await;
    assert_eq!(stale, 0);
}

/// A restore brings back leases taken before its snapshot. A reader that took one, loaded, and fills
/// after the restore must not store its value: the invalidation that deleted its lease (acknowledged,
/// after the snapshot) is forgotten, so the value may be older than a committed write. The fill is
/// answered on a new connection: it fails as `Reconnected` and the value is taken back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_with_a_lease_a_restore_brought_back_is_taken_back() {
    use cache_runtime::store::{LeaseRequest, Slot};
    use cache_runtime::{Store as _, StoreError};
    let mut redis = RedisServer::start_persistent();
    let store = store(&redis.url()).await;
    // A read learns the connection; then the lease is taken.
    store.peek("item:1", &[]).await.unwrap();
    let lease = LeaseRequest {
        token: "lease-before-snapshot",
        ttl: Duration::from_secs(60),
        replace: None,
    };
    let lookup = store
        .lookup("item:1", lease, &[], Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(lookup.slot, Slot::Acquired { .. }), "{lookup:?}");
    assert_eq!(redis.command(&["SAVE"]), "OK");
    // A write's invalidation deletes the lease (acknowledged), then the server restarts from the snapshot.
    store.invalidate(&["item:1".to_owned()]).await.unwrap();
    redis.kill();
    redis.restart();
    let slot = format!("{PREFIX}item:1");
    assert!(
        redis
            .command(&["GET", &slot])
            .contains("lease-before-snapshot"),
        "the snapshot brought the lease back"
    );
    // The first call on the dead connection may fail; the fill then answers on the new one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let filled = loop {
        match store
            .fill(
                "item:1",
                "lease-before-snapshot",
                b"old",
                Duration::from_secs(60),
            )
            .await
        {
            Err(StoreError::Redis(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other,
        }
    };
    assert!(
        matches!(filled, Err(StoreError::Reconnected)),
        "a fill on the new connection fails: {filled:?}"
    );
    assert_eq!(
        redis.command(&["EXISTS", &slot]),
        "int(0)",
        "the value filled with the restored lease was taken back"
    );
}
