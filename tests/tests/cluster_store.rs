//! `RedisClusterStore` on a real Redis Cluster of the test's own (6 `redis-server` processes: 3
//! primaries, 3 replicas): the store conformance suite, one slot per key, slot migration (`ASK` and
//! `MOVED`), and a shard's failover to a replica that missed acknowledged invalidations.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::{
    Cache, CachedEntity, CachedPgPool, RedisClusterStore, Registry, Store, TieredStore, key,
};
use sqlx::PgPool;
use tests::TestDb;
use tests::cluster::RedisCluster;
use tests::model::{Product, cached_price};

const ROWS: i64 = 20;
const PREFIX: &str = "cluster:";

async fn store(cluster: &RedisCluster) -> RedisClusterStore {
    let urls = cluster.urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    RedisClusterStore::connect(&urls, PREFIX).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_store_conforms() {
    let cluster = RedisCluster::start();
    let store = store(&cluster).await;
    cache_runtime::store::conformance::check(&store, "")
        .await
        .expect("RedisClusterStore conforms");
    let tiered = tiered(&cluster).await;
    cache_runtime::store::conformance::check(&tiered, "tiered:")
        .await
        .expect("a TieredStore over the cluster conforms");
}

/// The value (or lease) and the tag token of a key share a hash slot, by the server's own reckoning;
/// an invalidation spanning every shard removes them all and raises every shard's sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_lives_in_one_slot_and_invalidations_span_every_shard() {
    let cluster = RedisCluster::start();
    let store = store(&cluster).await;
    let any = cluster.live()[0];
    let slot = |k: &str| cluster.command(any, &["CLUSTER", "KEYSLOT", k]);
    for k in ["product:1", "a}b{c", "category:5:products"] {
        assert_eq!(slot(&store.value_key(k)), slot(&store.tag_key(k)), "{k}");
    }
    let cache = Cache::new(store.clone());
    let source = AtomicI64::new(1);
    let read = |id: i64| {
        let v = source.load(Ordering::SeqCst);
        let cache = cache.clone();
        async move {
            cache
                .get_or_load(key!("product:<id>", id = id), || async move {
                    Ok::<_, std::convert::Infallible>(v)
                })
                .await
                .unwrap()
        }
    };
    for id in 1..=50 {
        read(id).await;
    }
    let primaries: std::collections::HashSet<u16> = (1..=50)
        .map(|id| cluster.primary_of(&store.value_key(&format!("product:{id}"))))
        .collect();
    assert_eq!(primaries.len(), 3, "the keys spread over the 3 shards");
    let before = store.sequence(0).await.unwrap().unwrap();
    let keys: Vec<String> = (1..=50).map(|id| format!("product:{id}")).collect();
    let after = store.invalidate(&keys).await.unwrap().unwrap();
    assert_eq!(after, before + 1, "every shard's sequence was raised");
    for id in 1..=50 {
        let k = store.value_key(&format!("product:{id}"));
        assert_eq!(
            cluster.command(cluster.primary_of(&k), &["EXISTS", &k]),
            "int(0)"
        );
    }
    source.store(2, Ordering::SeqCst);
    assert_eq!(read(7).await, 2);
}

/// Moves the slot of a cached key to another primary by hand (`IMPORTING`/`MIGRATING`, `MIGRATE`, then
/// `SETSLOT … NODE`): reads during the migration follow `ASK`, reads and invalidations after it follow
/// `MOVED`, on the store's existing connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migration_is_followed() {
    let cluster = RedisCluster::start();
    let store = store(&cluster).await;
    let cache = Cache::new(store.clone());
    let source = AtomicI64::new(1);
    let read = || {
        let v = source.load(Ordering::SeqCst);
        let cache = cache.clone();
        async move {
            cache
                .get_or_load(key!("product:<id>", id = 3), || async move {
                    Ok::<_, std::convert::Infallible>(v)
                })
                .await
                .unwrap()
        }
    };
    read().await;
    let hits = cache.stats().hits;
    assert_eq!(read().await, 1);
    assert_eq!(cache.stats().hits, hits + 1);

    // The key's own tag token (what entries tagged with `product:3` record) lives in the slot too.
    store
        .tags(&["product:3".to_owned()], Some(Duration::from_secs(60)))
        .await
        .unwrap();
    let (value, tag) = (store.value_key("product:3"), store.tag_key("product:3"));
    let from = cluster.primary_of(&value);
    let nodes = cluster.nodes();
    let id_of = |port: u16| nodes.iter().find(|n| n.port == port).unwrap().id.clone();
    let to = nodes
        .iter()
        .find(|n| n.primary && n.port != from)
        .unwrap()
        .port;
    let slot = cluster.command(from, &["CLUSTER", "KEYSLOT", &value]);
    let slot = slot
        .trim_start_matches("int(")
        .trim_end_matches(')')
        .to_owned();
    assert_eq!(
        cluster.command(
            to,
            &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &id_of(from)]
        ),
        "OK"
    );
    assert_eq!(
        cluster.command(
            from,
            &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &id_of(to)]
        ),
        "OK"
    );
    let to_port = to.to_string();
    let migrate =
        |k: &str| cluster.command(from, &["MIGRATE", "127.0.0.1", &to_port, k, "0", "5000"]);
    assert_eq!(migrate(&value), "OK");
    // The value moved, its tag token not yet: the value is read through `ASK`.
    let hits = cache.stats().hits;
    assert_eq!(read().await, 1, "read during the migration");
    assert_eq!(cache.stats().hits, hits + 1, "a hit, through ASK");
    assert_eq!(migrate(&tag), "OK");
    // The new owner first, then the old one, then the other primary (replicas learn it by gossip).
    let mut primaries: Vec<u16> = vec![to, from];
    primaries.extend(
        nodes
            .iter()
            .filter(|n| n.primary && n.port != to && n.port != from)
            .map(|n| n.port),
    );
    for port in primaries {
        assert_eq!(
            cluster.command(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &id_of(to)]),
            "OK"
        );
    }
    assert_eq!(cluster.primary_of(&value), to);
    let hits = cache.stats().hits;
    assert_eq!(read().await, 1);
    assert_eq!(
        cache.stats().hits,
        hits + 1,
        "a hit after the migration, through MOVED"
    );
    source.store(2, Ordering::SeqCst);
    cache.invalidate(["product:3"]).await.unwrap();
    assert_eq!(
        cluster.command(to, &["EXISTS", &value]),
        "int(0)",
        "invalidated on the new owner"
    );
    assert_eq!(read().await, 2);
}

async fn database(hint: &str) -> (TestDb, PgPool) {
    tests::model::products_database(hint, ROWS).await
}

async fn pool(db: &TestDb, store: RedisClusterStore) -> CachedPgPool {
    CachedPgPool::options()
        .registry(Registry::new([Product::META]))
        .auto_install(true)
        .connect(&db.url, store)
        .await
        .unwrap()
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

/// Reads every product through `pool` for `during`: (stale reads, reads).
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

/// A shard fails over to a replica that missed the last invalidations (stopped, its replication link
/// cut, while the primary acknowledged them; then the primary dies and the replica takes over): the
/// promoted shard serves old entries and an older sequence, which every pool notices (the cluster-wide
/// minimum went below what was acknowledged) and repairs before serving hits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_invalidations_serves_no_invalidated_entry() {
    let (db, admin) = database("i15_cluster_failover").await;
    let mut cluster = RedisCluster::start();
    let running = pool(&db, store(&cluster).await).await;
    for id in 1..=ROWS {
        cached_price(running.cache(), running.sqlx_pool(), id).await;
    }
    let probe = store(&cluster).await;
    let victim = cluster.primary_of(&probe.value_key("product:1"));
    let replica = cluster.replica_of(victim);
    let on_victim: Vec<String> = (1..=ROWS)
        .map(|id| probe.value_key(&format!("product:{id}")))
        .filter(|k| cluster.primary_of(k) == victim)
        .collect();
    assert_eq!(cluster.command(victim, &["WAIT", "1", "5000"]), "int(1)");
    let held = |cluster: &RedisCluster, port: u16| {
        on_victim
            .iter()
            .filter(|k| cluster.command(port, &["EXISTS", k]) == "int(1)")
            .count()
    };
    assert_eq!(
        held(&cluster, replica),
        on_victim.len(),
        "the replica has every entry of the shard"
    );

    // The replica stops and its link is cut: it cannot receive what the primary acknowledges next.
    cluster.signal(replica, "-STOP");
    cluster.command(victim, &["CLIENT", "KILL", "TYPE", "replica"]);
    for id in 1..=ROWS {
        sqlx::query("UPDATE products SET price_cents = 400 WHERE id = $1")
            .bind(id)
            .execute(&running)
            .await
            .unwrap();
    }
    outbox_drained(&admin).await;
    assert_eq!(held(&cluster, victim), 0, "the primary applied the deletes");
    cluster.kill(victim);
    cluster.signal(replica, "-CONT");
    assert_eq!(
        cluster.command(replica, &["CLUSTER", "FAILOVER", "TAKEOVER"]),
        "OK"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.command(replica, &["ROLE"]).contains("master") {
        assert!(Instant::now() < deadline, "the replica took over");
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.wait_healthy(Duration::from_secs(20));
    assert_eq!(
        held(&cluster, replica),
        on_victim.len(),
        "the promoted replica kept the old entries"
    );

    let started_after = pool(&db, store(&cluster).await).await;
    let (stale, reads) = stale_reads(&started_after, 400, Duration::from_millis(500)).await;
    assert_eq!(
        stale, 0,
        "{stale} of {reads} reads of a pool started after the failover were stale"
    );
    let (stale, reads) = stale_reads(&running, 400, Duration::from_millis(1000)).await;
    assert_eq!(
        stale, 0,
        "{stale} of {reads} reads of the running pool were stale"
    );
    let hits = running.cache().stats().hits;
    stale_reads(&running, 400, Duration::from_millis(200)).await;
    assert!(
        running.cache().stats().hits > hits,
        "hits again after the repair"
    );
}

async fn tiered(cluster: &RedisCluster) -> TieredStore {
    let urls = cluster.urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let store = TieredStore::connect_cluster(&urls, PREFIX).await.unwrap();
    assert!(
        store.ready(Duration::from_secs(10)).await,
        "the tier serves"
    );
    store
}

/// Reads until `cache` returns `want` (at most `within`).
async fn sees(cache: &Cache, source: &AtomicI64, want: i64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let v = source.load(Ordering::SeqCst);
        let got = cache
            .get_or_load(key!("product:<id>", id = 5), || async move {
                Ok::<_, std::convert::Infallible>(v)
            })
            .await
            .unwrap();
        if got == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

/// Two tiers over the cluster: one's invalidation reaches the other's tier; the primary of the
/// channel's slot dies and its replica is promoted (automatic failover): the tiers flush, come back
/// once redis-rs resubscribed and a heartbeat came through, and invalidations reach them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_over_the_cluster_fan_out_and_survive_a_failover() {
    let mut cluster = RedisCluster::start();
    let (a, b) = (tiered(&cluster).await, tiered(&cluster).await);
    let (ca, cb) = (Cache::new(a.clone()), Cache::new(b.clone()));
    let source = AtomicI64::new(1);
    assert!(sees(&ca, &source, 1, Duration::from_secs(1)).await);
    assert!(sees(&cb, &source, 1, Duration::from_secs(1)).await);
    let hits = a.stats().hits;
    assert!(sees(&ca, &source, 1, Duration::from_secs(1)).await);
    assert_eq!(a.stats().hits, hits + 1, "held in A's tier");

    source.store(2, Ordering::SeqCst);
    cb.invalidate(["product:5"]).await.unwrap();
    assert!(
        sees(&cb, &source, 2, Duration::from_millis(1)).await,
        "B reads its write"
    );
    assert!(
        sees(&ca, &source, 2, Duration::from_secs(1)).await,
        "B's invalidation reached A's tier"
    );

    let channel = format!("{PREFIX}<invalidated>");
    let primary = cluster.primary_of(&channel);
    let replica = cluster.replica_of(primary);
    let flushes = a.stats().flushes;
    cluster.kill(primary);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.command(replica, &["ROLE"]).contains("master") {
        assert!(Instant::now() < deadline, "the replica was promoted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        a.stats().flushes > flushes,
        "the dropped subscription flushed A's tier"
    );
    assert!(
        a.ready(Duration::from_secs(20)).await,
        "A's tier serves again after the failover"
    );
    assert!(b.ready(Duration::from_secs(20)).await, "B's too");
    assert!(sees(&ca, &source, 2, Duration::from_secs(5)).await);
    assert!(sees(&ca, &source, 2, Duration::from_secs(1)).await);
    source.store(3, Ordering::SeqCst);
    // Right after a failover a store call can still fail while the client's slot map converges (a pool
    // keeps the keys in its outbox then); the invalidation is acknowledged once it succeeds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = cb.invalidate(["product:5"]).await {
        eprintln!("invalidate during the failover: {e}");
        assert!(
            Instant::now() < deadline,
            "invalidations succeed again: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        sees(&ca, &source, 3, Duration::from_secs(1)).await,
        "invalidations reach A again"
    );
}
