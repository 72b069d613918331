//! The freshness checker across 3 OS processes (`checker-node`), each with its own `CachedPool` and
//! in-process tier (`TieredStore`) over one Redis (and over a Redis Cluster of the test's own), each writing through its pool, plus a plain-pool writer
//! in the test (delivered by the nodes' relays): 0 reads miss a write of their own process, 0 reads are
//! older than the bound. The naive control (a moka map per process, cleared only by its own writes) must
//! show violations.

use std::time::{Duration, Instant};

use cache_runtime::{CachedPool, RedisClusterStore, RedisStore};
use sqlx::Postgres;
#[path = "../src/processes.rs"]
mod processes;

use processes::{Event, Mode, Node, PLAIN, Verdict};
use tests::{TestDb, TestPrefix};

const ROWS: i64 = 4;
const NODES: u32 = 3;
/// The tier's `max_lag`: the bound of writes through a pool.
const MAX_LAG: Duration = Duration::from_millis(50);
/// The bound of plain-pool writes: the relay's delivery, then the fan-out.
const RELAY_BOUND: Duration = Duration::from_secs(1);

/// Runs the nodes and the plain writer (on `cluster`'s nodes when given, else the shared Redis);
/// returns the merged log.
async fn run(mode: Mode, hint: &str, cluster: &[String]) -> Vec<Event> {
    let db = TestDb::create(hint).await;
    let pool = db.pool().await;
    tests::checker::create_items(&pool, ROWS).await;
    let prefix = TestPrefix::create(hint).await;
    // Install the capture once, before the nodes connect.
    let options = CachedPool::<Postgres>::options()
        .registry(processes::registry())
        .auto_install(true);
    let installed = if cluster.is_empty() {
        let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone()).await;
        options
            .connect(&db.url, store.expect("connect Redis"))
            .await
    } else {
        let nodes: Vec<&str> = cluster.iter().map(String::as_str).collect();
        let store = RedisClusterStore::connect(&nodes, prefix.prefix.clone()).await;
        options
            .connect(&db.url, store.expect("connect the cluster"))
            .await
    };
    installed.expect("install").close().await;
    let duration = Duration::from_millis(2500);
    let children: Vec<_> = (0..NODES)
        .map(|node| {
            let node = Node {
                node,
                database_url: db.url.clone(),
                redis_url: tests::redis_url(),
                prefix: prefix.prefix.clone(),
                duration,
                rows: ROWS,
                mode,
                max_lag: MAX_LAG,
                cluster: cluster.to_vec(),
            };
            std::process::Command::new(env!("CARGO_BIN_EXE_checker_node"))
                .envs(node.env())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn checker-node")
        })
        .collect();
    let mut events = plain_writer(&pool, duration + Duration::from_millis(500)).await;
    for child in children {
        let output = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("join")
            .expect("checker-node output");
        assert!(
            output.status.success(),
            "a checker-node failed: {:?}",
            output.status
        );
        let text = String::from_utf8_lossy(&output.stdout);
        events.extend(text.lines().filter_map(Event::parse));
    }
    events
}

/// Bumps random rows with plain sqlx (no cache: the outbox and the nodes' relays invalidate).
async fn plain_writer(pool: &sqlx::PgPool, duration: Duration) -> Vec<Event> {
    let deadline = Instant::now() + duration;
    let mut events = Vec::new();
    while Instant::now() < deadline {
        let id = fastrand::i64(1..=ROWS);
        let version = tests::checker::bump_version(pool, id).await;
        events.push(Event::Write {
            node: PLAIN,
            id,
            version,
            at: processes::now_us(),
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    events
}

fn bound(writer: u32) -> Duration {
    if writer == PLAIN {
        RELAY_BOUND
    } else {
        MAX_LAG
    }
}

fn print(what: &str, v: &Verdict) {
    eprintln!(
        "checker [{what}]: {} reads, {} writes; {} read-your-writes violations, {} older than the bound; \
         {} lagging within it, staleness p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        v.reads,
        v.writes,
        v.own_violations,
        v.bound_violations,
        v.lagging,
        v.staleness_ms(0.5),
        v.staleness_ms(0.99),
        v.staleness_ms(1.0),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_with_tiers_never_read_stale() {
    let events = run(Mode::Tiered, "i15_tiered", &[]).await;
    verify("3 processes, TieredStore", &events);
}

/// The same over a Redis Cluster of the test's own (3 primaries, 3 replicas).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_with_tiers_over_a_cluster_never_read_stale() {
    let cluster = tests::cluster::RedisCluster::start();
    let events = run(Mode::Tiered, "i15_tiered_cluster", &cluster.urls()).await;
    verify("3 processes, TieredStore over a Redis Cluster", &events);
}

/// Checks a tiered run: no read-your-writes violation, no read older than the bound.
fn verify(what: &str, events: &[Event]) {
    let all = processes::check(events, bound);
    print(&format!("{what}, pool writers + plain writer"), &all);
    // The fan-out alone: the staleness behind writes through the pools.
    let pooled: Vec<Event> = events
        .iter()
        .copied()
        .filter(|e| !matches!(e, Event::Write { node: PLAIN, .. }))
        .collect();
    print(
        &format!("{what}, pool writes only"),
        &processes::check(&pooled, bound),
    );
    assert!(all.reads > 1000 && all.writes > 100, "{all:?}");
    assert_eq!(all.own_violations, 0, "read-your-writes");
    assert_eq!(all.bound_violations, 0, "no read older than the bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_naive_tier() {
    let events = run(Mode::Naive, "i15_naive", &[]).await;
    let verdict = processes::check(&events, bound);
    print("3 processes, naive moka tier (no fan-out)", &verdict);
    assert!(verdict.reads > 1000, "{verdict:?}");
    assert!(
        verdict.bound_violations > 0,
        "a tier without fan-out serves other processes' old values: {verdict:?}"
    );
}
