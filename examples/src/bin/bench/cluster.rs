//! Redis Cluster rows: a hit and invalidations through `RedisClusterStore` on a 6-node cluster this run
//! starts (3 primaries, 3 replicas, on free loopback ports), against `RedisStore` on the standalone
//! server. Skipped, with a note in the report, when `redis-server`/`redis-cli` are not installed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cache_runtime::{Cache, RedisClusterStore, RedisStore, Store};
use examples::{Report, Samples};

use super::{BoxError, Env, Product};

/// The cluster's processes, killed on drop.
struct Nodes {
    children: Vec<Child>,
    dir: std::path::PathBuf,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16, BoxError> {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
}

fn answers(port: u16, args: &[&str]) -> Option<String> {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .ok()?
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    let mut cmd = redis::cmd(args[0]);
    cmd.arg(&args[1..]);
    cmd.query::<String>(&mut conn).ok()
}

/// Starts 6 nodes and creates the cluster; returns the nodes and their URLs.
fn start() -> Result<(Nodes, Vec<String>), BoxError> {
    let dir = std::env::temp_dir().join(format!("bench_cluster_{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut nodes = Nodes {
        children: Vec::new(),
        dir: dir.clone(),
    };
    let mut ports = Vec::new();
    for _ in 0..6 {
        let port = free_port()?;
        nodes.children.push(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .spawn()?,
        );
        ports.push(port);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in &ports {
        while answers(*port, &["PING"]).as_deref() != Some("PONG") {
            if Instant::now() > deadline {
                return Err(format!("cluster node {port} did not start").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let status = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err("redis-cli --cluster create failed".into());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for port in &ports {
        while !answers(*port, &["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok"))
        {
            if Instant::now() > deadline {
                return Err("the cluster did not become ok".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let urls = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    Ok((nodes, urls))
}

async fn hit(cache: &Cache, id: i64) -> Result<(), BoxError> {
    let value = Product {
        id,
        category_id: id % 100,
        name: format!("Product number {id}"),
        price_cents: id,
        version: 0,
    };
    cache
        .get_or_load(Product::cache_key_for(&id), || async move {
            Ok::<_, std::convert::Infallible>(value)
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The rows; skipped (noted) when the cluster cannot be started.
pub(crate) async fn rows(env: &Env, report: &mut Report) -> Result<(), BoxError> {
    let (_nodes, urls) = match start() {
        Ok(started) => started,
        Err(e) => {
            report.fact(
                "Redis Cluster rows",
                format!("skipped: {e} (apt-get install redis-server)"),
            );
            return Ok(());
        }
    };
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let cluster = RedisClusterStore::connect(&urls, "bench:").await?;
    let standalone = RedisStore::connect(&env.redis_url, format!("{}cl:", env.prefix)).await?;
    let stores: [std::sync::Arc<dyn Store>; 2] = [
        std::sync::Arc::new(standalone),
        std::sync::Arc::new(cluster),
    ];
    let caches: Vec<Cache> = stores
        .iter()
        .map(|s| Cache::new(std::sync::Arc::clone(s)))
        .collect();
    for cache in &caches {
        hit(cache, 1).await?;
    }
    let hundred: Vec<String> = (1..=100)
        .map(|id| Product::cache_key_for(&id).into_string())
        .collect();
    let one = [Product::cache_key_for(&7).into_string()];
    let mut s: Vec<Samples> = vec![Samples::default(); 6];
    for i in 0..env.sizes.reads / 2 {
        for v in 0..2 {
            let k = (i + v) % 2;
            let start = Instant::now();
            hit(&caches[k], 1).await?;
            s[k].push(start.elapsed());
            let start = Instant::now();
            stores[k].invalidate(&one).await?;
            s[2 + k].push(start.elapsed());
            if i % 10 == 0 {
                let start = Instant::now();
                stores[k].invalidate(&hundred).await?;
                s[4 + k].push(start.elapsed());
            }
        }
    }
    let group = "Redis Cluster (3 primaries + 3 replicas) vs standalone";
    let rows = [
        "get_or_load hit, standalone RedisStore (baseline)",
        "get_or_load hit, RedisClusterStore",
        "invalidate 1 key, standalone",
        "invalidate 1 key, cluster",
        "invalidate 100 keys, standalone",
        "invalidate 100 keys, cluster",
    ];
    for (k, name) in rows.iter().enumerate() {
        let base = s[k - k % 2].stats().median_us;
        report.latency(group, name, s[k].stats(), Some(base));
    }
    report.fact(
        "Redis Cluster",
        "a cluster of this run's own on loopback; the standalone rows on the shared server; a cluster \
         invalidation is 2 round trips (UNLINK split by slot, then every primary's sequence + PUBLISH)",
    );
    Ok(())
}
